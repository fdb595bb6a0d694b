//! Managing a connected mailbox: what it can reach (its folders, and shared mailboxes an admin
//! names), disconnecting it, and re-encrypting every stored secret under a new key.

use serde::Serialize;
use sqlx::PgPool;

use crate::graph::{GraphError, MailboxProbe};
use crate::ids::{AccountId, EmailAddress, TenantId};
use crate::services::Services;
use crate::vault::{AssociatedData, Column, TokenVault};

#[derive(Debug, Clone, Serialize)]
pub struct FolderInfo {
    pub id: String,
    pub name: String,
    pub total: Option<u32>,
    pub unread: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SharedAccess {
    /// The signed-in user can open it.
    Accessible,
    /// It exists, but the user has no rights on it (Graph 403 ErrorAccessDenied).
    NoAccess,
    /// No cloud mailbox at that address.
    NoMailbox,
}

#[derive(Debug, Clone, Serialize)]
pub struct SharedProbe {
    pub address: EmailAddress,
    pub access: SharedAccess,
}

#[derive(Debug, Clone, Serialize)]
pub struct MailboxListing {
    pub folders: Vec<FolderInfo>,
    pub shared: Vec<SharedProbe>,
}

/// The account's own folders (every page) and, for each address the admin names, whether the
/// account can open it as a shared mailbox.
pub async fn list_mailboxes(
    services: &Services,
    tenant: TenantId,
    account: AccountId,
    shared: &[EmailAddress],
) -> Result<MailboxListing, GraphError> {
    let client = super::graph_client(services, tenant, account);
    let mut page = client.list_mail_folders().await?;
    let mut folders = Vec::new();
    loop {
        folders.extend(page.value.drain(..).map(|f| FolderInfo {
            id: f.id,
            name: f.display_name.unwrap_or_default(),
            total: f.total_item_count,
            unread: f.unread_item_count,
        }));
        match page.next_link.take() {
            Some(link) => page = client.next_page(&link).await?,
            None => break,
        }
    }
    let mut probes = Vec::with_capacity(shared.len());
    for address in shared {
        let access = match client.probe_mailbox(address.as_str()).await? {
            MailboxProbe::Accessible(_) => SharedAccess::Accessible,
            MailboxProbe::NoAccess => SharedAccess::NoAccess,
            MailboxProbe::NoMailbox => SharedAccess::NoMailbox,
        };
        probes.push(SharedProbe {
            address: address.clone(),
            access,
        });
    }
    Ok(MailboxListing {
        folders,
        shared: probes,
    })
}

/// Disconnects a mailbox: its tokens are wiped, it is no longer synced, its pending jobs are
/// cancelled, and the change is audited. Returns false when the account does not exist for
/// this tenant.
pub async fn disconnect(
    services: &Services,
    tenant: TenantId,
    account: AccountId,
    actor: &str,
) -> Result<bool, sqlx::Error> {
    let mut tx = crate::db::tenant_tx(&services.pool, tenant).await?;
    let done = sqlx::query(
        "UPDATE helpdesk_email_accounts SET status = 'disabled',
            status_reason = 'disconnected by ' || $3, access_token_enc = NULL,
            refresh_token_enc = NULL, token_expires_at = NULL, updated_at = now()
         WHERE id = $1 AND tenant_id = $2",
    )
    .bind(account.as_uuid())
    .bind(tenant.as_uuid())
    .bind(actor)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    let cancelled = sqlx::query(
        "UPDATE queue_jobs SET status = 'cancelled', finished_at = now(), updated_at = now(),
            last_error = 'the account was disconnected'
         WHERE email_account_id = $1 AND tenant_id = $2 AND status = 'pending'",
    )
    .bind(account.as_uuid())
    .bind(tenant.as_uuid())
    .execute(&mut *tx)
    .await?;
    crate::audit::record(
        &mut tx,
        Some(tenant),
        actor,
        "account.disconnected",
        "account",
        &account.to_string(),
        serde_json::json!({ "cancelled_jobs": cancelled.rows_affected() }),
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RotationReport {
    pub rows_checked: u64,
    pub rows_reencrypted: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error("a stored secret could not be decrypted with the configured keyring")]
    Vault(#[from] crate::vault::VaultError),
    #[error("database error during re-encryption")]
    Db(#[from] sqlx::Error),
}

#[derive(sqlx::FromRow)]
struct SecretRow {
    id: uuid::Uuid,
    tenant_id: uuid::Uuid,
    access_token_enc: Option<Vec<u8>>,
    refresh_token_enc: Option<Vec<u8>>,
}

/// Rewrites every stored token not encrypted under the keyring's current key. Run it after
/// putting a new key first in TOKEN_ENCRYPTION_KEYS; when it reports nothing left, the old key
/// can leave the ring. `pool` must be the system (or owner) pool: it spans every tenant. Each
/// row is a compare-and-set, so a refresh racing with it keeps its newer tokens.
pub async fn reencrypt_all(
    pool: &PgPool,
    vault: &TokenVault,
    mut progress: impl FnMut(RotationReport),
) -> Result<RotationReport, RotationError> {
    let mut report = RotationReport::default();
    let mut after = uuid::Uuid::nil();
    loop {
        let rows: Vec<SecretRow> = sqlx::query_as(
            "SELECT id, tenant_id, access_token_enc, refresh_token_enc
             FROM helpdesk_email_accounts WHERE id > $1 ORDER BY id LIMIT 500",
        )
        .bind(after)
        .fetch_all(pool)
        .await?;
        let Some(last) = rows.last() else { break };
        after = last.id;
        for row in rows {
            report.rows_checked += 1;
            let stale =
                |c: &Option<Vec<u8>>| c.as_deref().is_some_and(|c| vault.needs_reencrypt(c));
            if !stale(&row.access_token_enc) && !stale(&row.refresh_token_enc) {
                continue;
            }
            let tenant = TenantId::from_uuid(row.tenant_id);
            let account = AccountId::from_uuid(row.id);
            let rewrap = |c: &Option<Vec<u8>>, column| -> Result<Option<Vec<u8>>, RotationError> {
                let Some(c) = c else { return Ok(None) };
                let ad = AssociatedData::for_account(tenant, account, column);
                Ok(Some(vault.encrypt(&ad, &vault.decrypt(&ad, c)?)))
            };
            let access = rewrap(&row.access_token_enc, Column::AccessToken)?;
            let refresh = rewrap(&row.refresh_token_enc, Column::RefreshToken)?;
            let done = sqlx::query(
                "UPDATE helpdesk_email_accounts
                 SET access_token_enc = $2, refresh_token_enc = $3, token_key_id = $4
                 WHERE id = $1 AND access_token_enc IS NOT DISTINCT FROM $5
                   AND refresh_token_enc IS NOT DISTINCT FROM $6",
            )
            .bind(row.id)
            .bind(access)
            .bind(refresh)
            .bind(vault.current_key_id().as_str())
            .bind(&row.access_token_enc)
            .bind(&row.refresh_token_enc)
            .execute(pool)
            .await?;
            report.rows_reencrypted += done.rows_affected();
        }
        progress(report);
    }
    Ok(report)
}
