//! Connecting a mailbox through Microsoft's authorization-code flow with PKCE. The `state` is a
//! single-use, expiring server-side token bound to tenant and user; the callback verifies it
//! before redeeming the code, and writes the account, its tokens and its first jobs in one
//! transaction, so a failure anywhere leaves nothing half-created.
//!
//! A flow started for a specific mailbox (a reconnect, or a connect with a `login_hint`) records
//! that address in its state, and the callback connects only that mailbox: Microsoft's
//! `login_hint` merely pre-fills the sign-in, so whoever finishes it may be someone else. A
//! connect without a hint connects whoever signs in (an admin connects a mailbox by signing in
//! as it).

use std::sync::Arc;

use chrono::{TimeDelta, Utc};
use rand::RngCore;
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use url::Url;

use crate::graph::{GraphClient, Pkce, StaticToken, WellKnownFolder};
use crate::ids::{AccountId, EmailAddress, TenantId};
use crate::kinds::{SyncMailbox, ValidateAccount};
use crate::queue::{EnqueueOptions, enqueue_in};
use crate::services::Services;
use crate::vault::{AssociatedData, Column};

/// How long a user has to finish signing in.
pub const STATE_LIFETIME: TimeDelta = TimeDelta::minutes(15);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("this sign-in link is unknown or was already used; start the connection again")]
    UnknownState,
    #[error("this sign-in link expired; start the connection again")]
    ExpiredState,
    #[error("Microsoft sign-in was cancelled or refused: {0}")]
    Denied(String),
    #[error("Microsoft did not accept the sign-in: {0}")]
    Token(#[source] crate::graph::TokenError),
    #[error("the mailbox could not be read after sign-in: {0}")]
    Graph(#[source] crate::graph::GraphError),
    #[error("the signed-in account has no usable email address")]
    NoAddress,
    /// The flow was started for `expected`, but `signed_in` finished the sign-in. Nothing was
    /// stored; the state is spent.
    #[error("this sign-in link was for {expected}, but {signed_in} signed in")]
    WrongMailbox {
        expected: EmailAddress,
        signed_in: EmailAddress,
    },
    #[error("the stored sign-in secret could not be decrypted")]
    Vault(#[from] crate::vault::VaultError),
    #[error("storing the connection failed")]
    Db(#[from] sqlx::Error),
    #[error("queueing the first jobs failed")]
    Queue(#[from] crate::queue::QueueError),
    #[error("storing the tokens failed")]
    Tokens(#[from] super::tokens::TokenStoreError),
}

fn state_hash(state: &str) -> String {
    hex::encode(Sha256::digest(state.as_bytes()))
}

/// Starts a connection: stores a fresh state with its PKCE verifier (encrypted) and returns
/// the URL to send the user's browser to. With a `login_hint` the sign-in is pre-filled with
/// that address and the callback connects only that mailbox ([`ConnectError::WrongMailbox`]
/// for anyone else); without one, whoever signs in is connected.
pub async fn start_connect(
    services: &Services,
    tenant: TenantId,
    user_subject: &str,
    login_hint: Option<&EmailAddress>,
) -> Result<Url, ConnectError> {
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let state = hex::encode(raw);
    let hash = state_hash(&state);
    let pkce = Pkce::new_random();
    let verifier_enc = services.vault.encrypt(
        &AssociatedData::for_owner(tenant, format!("oauth_state:{hash}"), Column::CodeVerifier),
        pkce.verifier(),
    );
    let mut tx = crate::db::tenant_tx(&services.pool, tenant).await?;
    sqlx::query(
        "INSERT INTO oauth_states
            (state_hash, tenant_id, user_subject, code_verifier_enc, expires_at, expected_mailbox)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&hash)
    .bind(tenant.as_uuid())
    .bind(user_subject)
    .bind(verifier_enc)
    .bind(Utc::now() + STATE_LIFETIME)
    .bind(login_hint.map(EmailAddress::as_str))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(services.identity.authorize_url(
        &services.authority,
        &state,
        pkce.challenge(),
        login_hint.map(EmailAddress::as_str),
    ))
}

/// Starts re-consenting an existing mailbox: [`start_connect`] for the account's own tenant
/// (never the caller's: ops act across tenants, and the callback stores the tokens in the
/// state's tenant), for the mailbox's address: the sign-in is pre-filled with it and the
/// callback refuses anyone else, so a reconnect never connects another mailbox. `within` is the
/// only tenant the caller may act in (`None`: any). `None` when the account does not exist
/// there, so another tenant's account is indistinguishable from a missing one.
pub async fn start_reconnect(
    services: &Services,
    account: AccountId,
    within: Option<TenantId>,
    user_subject: &str,
) -> Result<Option<Url>, ConnectError> {
    const FIND: &str = "SELECT tenant_id, email_address FROM helpdesk_email_accounts
                        WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2)";
    let found: Option<(uuid::Uuid, String)> = match within {
        // A tenant's own admin looks through Row Level Security as well as the WHERE clause.
        Some(tenant) => {
            let mut tx = crate::db::tenant_tx(&services.pool, tenant).await?;
            let row = sqlx::query_as(FIND)
                .bind(account.as_uuid())
                .bind(tenant.as_uuid())
                .fetch_optional(&mut *tx)
                .await?;
            tx.commit().await?;
            row
        }
        // Until the account is read its tenant is unknown: a cross-tenant look-up.
        None => {
            sqlx::query_as(FIND)
                .bind(account.as_uuid())
                .bind(None::<uuid::Uuid>)
                .fetch_optional(&services.system_pool)
                .await?
        }
    };
    let Some((tenant, email)) = found else {
        return Ok(None);
    };
    // Stored through `EmailAddress`, so it parses; if it ever did not, the row is corrupt.
    let email = EmailAddress::parse(&email).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    let url = start_connect(
        services,
        TenantId::from_uuid(tenant),
        user_subject,
        Some(&email),
    )
    .await?;
    Ok(Some(url))
}

#[derive(Debug, Clone)]
pub struct Connected {
    pub tenant: TenantId,
    pub account: AccountId,
    pub email: EmailAddress,
    pub created: bool,
}

/// A consumed state: what the flow was started for.
struct StartedFlow {
    tenant: TenantId,
    subject: String,
    verifier: SecretString,
    /// The only mailbox this flow may connect (`None`: whoever signs in).
    expected: Option<EmailAddress>,
}

/// Consumes `state` (single use, even when a later step fails) and returns what it was for.
async fn consume_state(services: &Services, state: &str) -> Result<StartedFlow, ConnectError> {
    let hash = state_hash(state);
    type Row = (
        uuid::Uuid,
        String,
        Vec<u8>,
        chrono::DateTime<Utc>,
        Option<String>,
    );
    let row: Option<Row> = sqlx::query_as(
        "UPDATE oauth_states SET consumed_at = now()
         WHERE state_hash = $1 AND consumed_at IS NULL
         RETURNING tenant_id, user_subject, code_verifier_enc, expires_at, expected_mailbox",
    )
    .bind(&hash)
    // The state names the tenant; until it is read, this is a cross-tenant look-up.
    .fetch_optional(&services.system_pool)
    .await?;
    let (tenant, subject, verifier_enc, expires_at, expected) =
        row.ok_or(ConnectError::UnknownState)?;
    if expires_at < Utc::now() {
        return Err(ConnectError::ExpiredState);
    }
    // Written through `EmailAddress` by `start_connect`; a value that no longer parses is a
    // corrupt row, never a reason to connect whoever signs in.
    let expected = expected
        .map(|e| EmailAddress::parse(&e))
        .transpose()
        .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    let tenant = TenantId::from_uuid(tenant);
    let verifier = services.vault.decrypt(
        &AssociatedData::for_owner(tenant, format!("oauth_state:{hash}"), Column::CodeVerifier),
        &verifier_enc,
    )?;
    Ok(StartedFlow {
        tenant,
        subject,
        verifier,
        expected,
    })
}

/// The callback with `?error=…`: the state is still consumed so the link cannot be replayed.
pub async fn fail_connect(
    services: &Services,
    state: Option<&str>,
    error: &str,
    description: Option<&str>,
) -> ConnectError {
    if let Some(state) = state {
        let _ = consume_state(services, state).await;
    }
    let text = match error {
        "access_denied" => "you declined the permissions graphdesk asked for".to_string(),
        "consent_required" | "interaction_required" | "login_required" => {
            "Microsoft needs you (or an administrator) to sign in and consent again".to_string()
        }
        "temporarily_unavailable" | "server_error" => {
            "Microsoft's sign-in service was unavailable; try again in a minute".to_string()
        }
        other => format!(
            "{other}{}",
            description
                .map(|d| format!(": {}", d.chars().take(200).collect::<String>()))
                .unwrap_or_default()
        ),
    };
    ConnectError::Denied(text)
}

/// The callback with `?code=…&state=…`.
pub async fn complete_connect(
    services: &Services,
    state: &str,
    code: SecretString,
) -> Result<Connected, ConnectError> {
    let StartedFlow {
        tenant,
        subject,
        verifier,
        expected,
    } = consume_state(services, state).await?;
    let tokens = services
        .identity
        .exchange_code(&services.authority, &code, &verifier)
        .await
        .map_err(ConnectError::Token)?;
    let graph = GraphClient::new(
        services.http.clone(),
        services.graph.clone(),
        Arc::new(StaticToken(tokens.access_token.clone())),
    );
    let me = graph.get_me().await.map_err(ConnectError::Graph)?;
    let address = me
        .mail
        .as_deref()
        .or(me.user_principal_name.as_deref())
        .and_then(|a| EmailAddress::parse(a).ok())
        .ok_or(ConnectError::NoAddress)?;
    // A flow for a specific mailbox connects only that mailbox: the person who signed in may
    // not be the one the link was for. The address compared is the one the account would be
    // stored under, so a reconnect can only ever write its own account's row. Refused before
    // anything is written: the tokens are dropped, the state is already spent.
    if let Some(expected) = expected
        && expected.key() != address.key()
    {
        return Err(ConnectError::WrongMailbox {
            expected,
            signed_in: address,
        });
    }

    let mut tx = crate::db::tenant_tx(&services.pool, tenant).await?;
    let sync_days = i64::from(services.sync.initial_days);
    let (account, created): (uuid::Uuid, bool) = sqlx::query_as(
        "INSERT INTO helpdesk_email_accounts
            (id, tenant_id, email_address, display_name, ms_user_id, status, sync_since)
         VALUES ($1, $2, $3, $4, $5, 'active', now() - make_interval(days => $6::int))
         ON CONFLICT (tenant_id, email_address) DO UPDATE SET
            display_name = EXCLUDED.display_name, ms_user_id = EXCLUDED.ms_user_id,
            status = 'active', status_reason = NULL, updated_at = now()
         RETURNING id, (xmax = 0)",
    )
    .bind(AccountId::new().as_uuid())
    .bind(tenant.as_uuid())
    .bind(address.as_str())
    .bind(me.display_name.as_deref())
    .bind(&me.id)
    .bind(sync_days as i32)
    .fetch_one(&mut *tx)
    .await?;
    let account = AccountId::from_uuid(account);
    super::tokens::store_tokens(&mut tx, &services.vault, tenant, account, &tokens).await?;
    enqueue_in(
        &mut tx,
        &ValidateAccount { tenant, account },
        EnqueueOptions::default(),
    )
    .await?;
    enqueue_in(
        &mut tx,
        &SyncMailbox {
            tenant,
            account,
            folder: WellKnownFolder::Inbox.as_str().into(),
        },
        EnqueueOptions::default(),
    )
    .await?;
    crate::audit::record(
        &mut tx,
        Some(tenant),
        &subject,
        if created {
            "account.connected"
        } else {
            "account.reconnected"
        },
        "account",
        &account.to_string(),
        serde_json::json!({ "email": address.as_str() }),
    )
    .await?;
    tx.commit().await?;
    Ok(Connected {
        tenant,
        account,
        email: address,
        created,
    })
}

/// Removes OAuth states older than `older_than` (the scheduler runs this; default 24 h).
/// `pool` must be the system pool: states of every tenant are purged.
pub async fn purge_states(pool: &sqlx::PgPool, older_than: TimeDelta) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM oauth_states WHERE created_at < now() - make_interval(secs => $1)",
    )
    .bind(older_than.num_seconds() as f64)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
