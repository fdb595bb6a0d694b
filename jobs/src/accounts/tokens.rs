//! Account tokens at rest and their refresh. One function, [`refresh_tokens`], serves every
//! path (the RefreshToken job, the scheduler's sweep, a 401 from Graph, "expires within 5
//! minutes" before a call): it locks the account row, re-checks under the lock, refreshes, and
//! stores the new access AND refresh token in the same transaction. Concurrent callers in any
//! number of processes queue on the row lock and find the work done.

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use futures::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};
use sqlx::{PgConnection, PgPool};
use tracing::{info, warn};

use crate::graph::{
    AccessTokenSource, ErrorClass, GraphClient, IdentityClient, TenantSegment, TokenSet,
    TokenSourceError,
};
use crate::ids::{AccountId, TenantId};
use crate::services::Services;
use crate::vault::{AssociatedData, Column, TokenVault};

/// Tokens are refreshed when they expire within this margin.
pub const REFRESH_MARGIN: TimeDelta = TimeDelta::minutes(5);

#[derive(Debug, thiserror::Error)]
pub enum TokenStoreError {
    #[error("account not found")]
    AccountNotFound,
    #[error("the account must be reconnected: {reason}")]
    NeedsReauth { reason: String },
    #[error("the account has no stored tokens; connect it first")]
    NoTokens,
    #[error("the application's OAuth configuration was refused: {0}")]
    Configuration(String),
    #[error("the identity platform failed: {0}")]
    Identity(#[source] crate::graph::TokenError),
    #[error("stored tokens could not be decrypted")]
    Vault(#[from] crate::vault::VaultError),
    #[error("database error in the token store")]
    Db(#[from] sqlx::Error),
}

impl From<TokenStoreError> for TokenSourceError {
    fn from(e: TokenStoreError) -> Self {
        match e {
            TokenStoreError::NeedsReauth { reason } => Self::NeedsReauth { reason },
            TokenStoreError::Identity(t) => Self::Token(t),
            other => Self::Store(Box::new(other)),
        }
    }
}

impl TokenStoreError {
    #[must_use]
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::NeedsReauth { .. } | Self::NoTokens => ErrorClass::NeedsReauth,
            Self::Configuration(_) => ErrorClass::Configuration,
            Self::Identity(e) => e.class(),
            Self::AccountNotFound => ErrorClass::Permanent,
            Self::Vault(_) => ErrorClass::Configuration,
            Self::Db(_) => ErrorClass::Retryable { after: None },
        }
    }
}

/// Writes a fresh token set (after a code redemption or a refresh) into the account row,
/// encrypted and bound to the row, in the caller's transaction.
pub async fn store_tokens(
    conn: &mut PgConnection,
    vault: &TokenVault,
    tenant: TenantId,
    account: AccountId,
    tokens: &TokenSet,
) -> Result<(), TokenStoreError> {
    let access = vault.encrypt(
        &AssociatedData::for_account(tenant, account, Column::AccessToken),
        &tokens.access_token,
    );
    let refresh = tokens.refresh_token.as_ref().map(|r| {
        vault.encrypt(
            &AssociatedData::for_account(tenant, account, Column::RefreshToken),
            r,
        )
    });
    sqlx::query(
        "UPDATE helpdesk_email_accounts SET
            access_token_enc = $3,
            refresh_token_enc = coalesce($4, refresh_token_enc),
            token_key_id = $5,
            token_expires_at = $6,
            granted_scopes = $7,
            token_refreshed_at = now(),
            updated_at = now()
         WHERE id = $1 AND tenant_id = $2",
    )
    .bind(account.as_uuid())
    .bind(tenant.as_uuid())
    .bind(access)
    .bind(refresh)
    .bind(vault.current_key_id().as_str())
    .bind(tokens.expires_at)
    .bind(&tokens.scope)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// When a refresh is needed.
#[derive(Debug, Clone)]
pub enum RefreshMode {
    /// Only if the access token expires within the margin (proactive paths).
    IfExpiringWithin(TimeDelta),
    /// Unless someone else refreshed after `since` (Graph rejected the token we held since
    /// then; or an explicit RefreshToken job).
    Force {
        unless_refreshed_since: DateTime<Utc>,
    },
    /// Graph refused this access token: refresh unless the stored token is already another.
    Rejected(SecretString),
}

#[derive(sqlx::FromRow)]
struct StoredAccessToken {
    access_token_enc: Option<Vec<u8>>,
    token_expires_at: Option<DateTime<Utc>>,
    status: String,
    status_reason: Option<String>,
}

#[derive(sqlx::FromRow)]
struct TokenRow {
    status: String,
    status_reason: Option<String>,
    access_token_enc: Option<Vec<u8>>,
    refresh_token_enc: Option<Vec<u8>>,
    token_expires_at: Option<DateTime<Utc>>,
    token_refreshed_at: Option<DateTime<Utc>>,
}

/// How a refused refresh's `status_reason` starts; a refresh that works clears only these.
const REFRESH_REFUSED: &str = "token refresh refused by the identity platform:";

/// Returns a valid access token, refreshing first when `mode` says so. Holds the account row
/// lock across the token request: that is what makes it single-flight across processes.
pub async fn refresh_tokens(
    pool: &PgPool,
    vault: &TokenVault,
    identity: &IdentityClient,
    authority: &TenantSegment,
    tenant: TenantId,
    account: AccountId,
    mode: RefreshMode,
) -> Result<SecretString, TokenStoreError> {
    let mut tx = crate::db::tenant_tx(pool, tenant).await?;
    let row: TokenRow = sqlx::query_as(
        "SELECT status, status_reason, access_token_enc, refresh_token_enc, token_expires_at,
                token_refreshed_at
         FROM helpdesk_email_accounts WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
    )
    .bind(account.as_uuid())
    .bind(tenant.as_uuid())
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(TokenStoreError::AccountNotFound)?;
    if row.status == "needs_reauth" {
        return Err(TokenStoreError::NeedsReauth {
            reason: row
                .status_reason
                .unwrap_or_else(|| "the grant was revoked".into()),
        });
    }
    let (Some(access_enc), Some(refresh_enc)) = (row.access_token_enc, row.refresh_token_enc)
    else {
        return Err(TokenStoreError::NoTokens);
    };
    let current = vault.decrypt(
        &AssociatedData::for_account(tenant, account, Column::AccessToken),
        &access_enc,
    )?;
    // Re-check under the lock: another caller may have done the work while we waited.
    let still_needed = match &mode {
        RefreshMode::IfExpiringWithin(margin) => row
            .token_expires_at
            .is_none_or(|at| at <= Utc::now() + *margin),
        RefreshMode::Force {
            unless_refreshed_since,
        } => row
            .token_refreshed_at
            .is_none_or(|at| at <= *unless_refreshed_since),
        RefreshMode::Rejected(rejected) => current.expose_secret() == rejected.expose_secret(),
    };
    if !still_needed {
        return Ok(current);
    }
    let refresh_token = vault.decrypt(
        &AssociatedData::for_account(tenant, account, Column::RefreshToken),
        &refresh_enc,
    )?;
    match identity.refresh(authority, &refresh_token).await {
        Ok(tokens) => {
            store_tokens(&mut tx, vault, tenant, account, &tokens).await?;
            // Only the error a refused refresh set is cleared by a refresh that works; what a
            // connection test found (a missing permission, an unreadable inbox) stays until the
            // next test passes.
            sqlx::query(
                "UPDATE helpdesk_email_accounts SET status = 'active', status_reason = NULL
                 WHERE id = $1 AND status = 'error' AND starts_with(status_reason, $2)",
            )
            .bind(account.as_uuid())
            .bind(REFRESH_REFUSED)
            .execute(&mut *tx)
            .await?;
            crate::audit::record(
                &mut tx,
                Some(tenant),
                "system",
                "token.refreshed",
                "account",
                &account.to_string(),
                serde_json::json!({ "expires_at": tokens.expires_at }),
            )
            .await?;
            tx.commit().await?;
            metrics::counter!("graphdesk_token_refresh_total", "outcome" => "ok").increment(1);
            info!(%account, "tokens refreshed");
            Ok(tokens.access_token)
        }
        Err(e) => match e.class() {
            ErrorClass::NeedsReauth => {
                let reason = format!("reconnect needed: {e}");
                sqlx::query(
                    "UPDATE helpdesk_email_accounts
                     SET status = 'needs_reauth', status_reason = $2, updated_at = now()
                     WHERE id = $1",
                )
                .bind(account.as_uuid())
                .bind(&reason)
                .execute(&mut *tx)
                .await?;
                crate::audit::record(
                    &mut tx,
                    Some(tenant),
                    "system",
                    "account.needs_reauth",
                    "account",
                    &account.to_string(),
                    serde_json::json!({ "reason": reason }),
                )
                .await?;
                tx.commit().await?;
                metrics::counter!("graphdesk_token_refresh_total", "outcome" => "needs_reauth")
                    .increment(1);
                warn!(%account, "refresh token no longer valid; account needs reconnect");
                Err(TokenStoreError::NeedsReauth { reason })
            }
            ErrorClass::Configuration => {
                // Our app registration was refused (an expired client secret, a wrong client
                // id or authority): no retry can fix it. Out of `active`, the account leaves
                // the scheduler's refresh and sync sweeps, which would otherwise ask Microsoft
                // again every tick; the periodic connection test of failing accounts tries
                // again, and a refresh that works puts it back.
                let reason = format!(
                    "{REFRESH_REFUSED} {e}; check OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET and OAUTH_AUTHORITY"
                );
                let marked = sqlx::query(
                    "UPDATE helpdesk_email_accounts
                     SET status = 'error', status_reason = $2, updated_at = now()
                     WHERE id = $1 AND status = 'active'",
                )
                .bind(account.as_uuid())
                .bind(&reason)
                .execute(&mut *tx)
                .await?;
                if marked.rows_affected() == 1 {
                    crate::audit::record(
                        &mut tx,
                        Some(tenant),
                        "system",
                        "account.error",
                        "account",
                        &account.to_string(),
                        serde_json::json!({ "reason": reason }),
                    )
                    .await?;
                }
                tx.commit().await?;
                metrics::counter!("graphdesk_token_refresh_total", "outcome" => "configuration")
                    .increment(1);
                warn!(%account, "token refresh refused: the app's credentials or authority are wrong");
                Err(TokenStoreError::Configuration(e.to_string()))
            }
            _ => {
                metrics::counter!("graphdesk_token_refresh_total", "outcome" => "transient")
                    .increment(1);
                Err(TokenStoreError::Identity(e))
            }
        },
    }
}

/// The access-token source a Graph client uses for one account: reads the stored token, and
/// refreshes through [`refresh_tokens`] when it is near expiry or Graph rejects it.
#[derive(Debug, Clone)]
pub struct AccountTokenSource {
    services: Services,
    tenant: TenantId,
    account: AccountId,
}

impl AccountTokenSource {
    #[must_use]
    pub fn new(services: Services, tenant: TenantId, account: AccountId) -> Self {
        Self {
            services,
            tenant,
            account,
        }
    }

    async fn current(&self) -> Result<SecretString, TokenStoreError> {
        let mut tx = crate::db::tenant_tx(&self.services.pool, self.tenant).await?;
        let row: Option<StoredAccessToken> = sqlx::query_as(
            "SELECT access_token_enc, token_expires_at, status, status_reason
             FROM helpdesk_email_accounts WHERE id = $1 AND tenant_id = $2",
        )
        .bind(self.account.as_uuid())
        .bind(self.tenant.as_uuid())
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        let StoredAccessToken {
            access_token_enc: enc,
            token_expires_at: expires,
            status,
            status_reason: reason,
        } = row.ok_or(TokenStoreError::AccountNotFound)?;
        if status == "needs_reauth" {
            return Err(TokenStoreError::NeedsReauth {
                reason: reason.unwrap_or_else(|| "the grant was revoked".into()),
            });
        }
        let fresh = expires.is_some_and(|at| at > Utc::now() + REFRESH_MARGIN);
        match enc {
            Some(enc) if fresh => Ok(self.services.vault.decrypt(
                &AssociatedData::for_account(self.tenant, self.account, Column::AccessToken),
                &enc,
            )?),
            Some(_) => {
                self.refresh(RefreshMode::IfExpiringWithin(REFRESH_MARGIN))
                    .await
            }
            None => Err(TokenStoreError::NoTokens),
        }
    }

    pub async fn refresh(&self, mode: RefreshMode) -> Result<SecretString, TokenStoreError> {
        refresh_tokens(
            &self.services.pool,
            &self.services.vault,
            &self.services.identity,
            &self.services.authority,
            self.tenant,
            self.account,
            mode,
        )
        .await
    }
}

impl AccessTokenSource for AccountTokenSource {
    fn access_token(&self) -> BoxFuture<'_, Result<SecretString, TokenSourceError>> {
        Box::pin(async move { self.current().await.map_err(Into::into) })
    }

    fn force_refresh<'a>(
        &'a self,
        rejected: &'a SecretString,
    ) -> BoxFuture<'a, Result<SecretString, TokenSourceError>> {
        Box::pin(async move {
            self.refresh(RefreshMode::Rejected(rejected.clone()))
                .await
                .map_err(Into::into)
        })
    }
}

/// A Graph client for one connected account: its tokens, and the cross-process mailbox gate.
#[must_use]
pub fn graph_client(services: &Services, tenant: TenantId, account: AccountId) -> GraphClient {
    let tokens = Arc::new(AccountTokenSource::new(services.clone(), tenant, account));
    let gate = Arc::new(super::gate::PgMailboxGate::new(
        services.pool.clone(),
        account,
        services.mailbox_concurrency,
        services.mailbox_budget_per_10_min,
    ));
    GraphClient::new(services.http.clone(), services.graph.clone(), tokens).with_gate(gate)
}
