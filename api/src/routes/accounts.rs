use crate::body::JsonBody;
use jobs::ids::{AccountId, TenantId};
use jobs::kinds::{RefreshToken, SyncMailbox, ValidateAccount};
use jobs::queue::EnqueueOptions;
use poem_openapi::{
    Object, OpenApi,
    param::{Path, Query},
    payload::Json,
};
use uuid::Uuid;

use crate::AppState;
use crate::auth::BearerAuth;
use crate::error::{ApiError, ApiResult};
use crate::routes::ApiTags;
use crate::routes::jobs_api::{Accepted, accepted};

#[derive(Debug, Object, Default)]
#[oai(skip_serializing_if_is_none)]
pub struct SyncRequest {
    /// A well-known folder name (inbox, archive, …) or a Graph folder id. Default: inbox.
    pub folder: Option<String>,
}

pub struct AccountsApi {
    pub state: AppState,
}

fn parse_account(raw: &str) -> ApiResult<AccountId> {
    raw.parse()
        .map_err(|e: jobs::ids::ParseError| ApiError::bad_request(e.to_string()))
}

fn require_admin(auth: &BearerAuth) -> ApiResult<()> {
    if auth.0.at_least_admin() {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "managing accounts needs the admin role",
        ))
    }
}

impl AccountsApi {
    /// The account, if it belongs to `tenant`; another tenant's account is indistinguishable
    /// from a missing one.
    async fn own_account(&self, tenant: TenantId, account: AccountId) -> ApiResult<AccountId> {
        let mut tx = jobs::db::tenant_tx(&self.state.pool, tenant).await?;
        let found: Option<Uuid> = sqlx::query_scalar(
            "SELECT id FROM helpdesk_email_accounts WHERE id = $1 AND tenant_id = $2",
        )
        .bind(account.as_uuid())
        .bind(tenant.as_uuid())
        .fetch_optional(&mut *tx)
        .await?;
        found
            .map(AccountId::from_uuid)
            .ok_or_else(|| ApiError::not_found("account"))
    }
}

fn valid_folder(folder: &str) -> bool {
    !folder.is_empty()
        && folder.len() <= 512
        && folder
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'=' | b'+' | b'/'))
}

/// A mailbox's connection and sync health.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct AccountView {
    pub id: Uuid,
    pub email_address: String,
    pub display_name: Option<String>,
    /// pending, active, needs_reauth, error or disabled.
    pub status: String,
    pub status_reason: Option<String>,
    pub token_expires_at: Option<chrono::DateTime<chrono::Utc>>,
    pub last_sync_started_at: Option<chrono::DateTime<chrono::Utc>>,
    pub last_sync_success_at: Option<chrono::DateTime<chrono::Utc>>,
    pub last_sync_error: Option<String>,
    pub messages_ingested: i64,
    pub duplicates_skipped: i64,
    pub throttled_until: Option<chrono::DateTime<chrono::Utc>>,
    /// The last connection test: profile, inbox, scopes, send permission.
    pub validation: Option<serde_json::Value>,
    pub validated_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct FolderView {
    pub id: String,
    pub name: String,
    pub total: Option<u32>,
    pub unread: Option<u32>,
}

#[derive(Debug, Object)]
pub struct SharedMailboxView {
    pub address: String,
    /// accessible, no_access (it exists but the user has no rights) or no_mailbox.
    pub access: String,
}

#[derive(Debug, Object)]
pub struct MailboxesView {
    /// The account's own folders.
    pub folders: Vec<FolderView>,
    /// Each address asked about, probed as a shared mailbox.
    pub shared: Vec<SharedMailboxView>,
}

#[derive(Debug, poem_openapi::ApiResponse)]
pub enum Disconnected {
    /// The mailbox is disconnected: tokens wiped, syncs stopped, pending jobs cancelled.
    #[oai(status = 204)]
    Done,
}

fn graph_api_error(e: &jobs::graph::GraphError) -> ApiError {
    use jobs::graph::ErrorClass;
    match e.class() {
        ErrorClass::NeedsReauth => {
            ApiError::conflict("the account must be reconnected before its mailboxes can be listed")
        }
        ErrorClass::Permanent => ApiError::unprocessable(format!("Microsoft refused: {e}")),
        _ => {
            tracing::warn!(error = %e, "Graph unavailable while listing mailboxes");
            ApiError::Unavailable(
                crate::error::ErrorBody::new(
                    "graph_unavailable",
                    "Microsoft Graph is busy or unavailable; try again shortly",
                ),
                None,
            )
        }
    }
}

#[OpenApi(prefix_path = "/api/v1", tag = "ApiTags::Accounts")]
impl AccountsApi {
    /// The mailbox's folders, and for each address in `shared` (comma-separated, at most 20)
    /// whether this account can open it as a shared mailbox (admin).
    #[oai(path = "/accounts/:account_id/mailboxes", method = "get")]
    async fn mailboxes(
        &self,
        auth: BearerAuth,
        account_id: Path<String>,
        shared: Query<Option<String>>,
    ) -> ApiResult<Json<MailboxesView>> {
        require_admin(&auth)?;
        let account = self
            .own_account(auth.0.tenant, parse_account(&account_id)?)
            .await?;
        let addresses: Vec<jobs::ids::EmailAddress> = shared
            .0
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| {
                jobs::ids::EmailAddress::parse(a)
                    .map_err(|e| ApiError::unprocessable(format!("shared: {e}")))
            })
            .collect::<Result<_, _>>()?;
        if addresses.len() > 20 {
            return Err(ApiError::unprocessable("shared: at most 20 addresses"));
        }
        let listing = jobs::accounts::manage::list_mailboxes(
            &self.state.services,
            auth.0.tenant,
            account,
            &addresses,
        )
        .await
        .map_err(|e| graph_api_error(&e))?;
        Ok(Json(MailboxesView {
            folders: listing
                .folders
                .into_iter()
                .map(|f| FolderView {
                    id: f.id,
                    name: f.name,
                    total: f.total,
                    unread: f.unread,
                })
                .collect(),
            shared: listing
                .shared
                .into_iter()
                .map(|p| SharedMailboxView {
                    address: p.address.to_string(),
                    access: serde_json::to_value(p.access)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                })
                .collect(),
        }))
    }

    /// Disconnects a mailbox (admin): its tokens are wiped, it is no longer synced, its pending
    /// jobs are cancelled, and the change is audited. Reconnect through /oauth/connect.
    #[oai(path = "/accounts/:account_id", method = "delete")]
    async fn disconnect(
        &self,
        auth: BearerAuth,
        account_id: Path<String>,
    ) -> ApiResult<Disconnected> {
        require_admin(&auth)?;
        let account = parse_account(&account_id)?;
        if jobs::accounts::manage::disconnect(
            &self.state.services,
            auth.0.tenant,
            account,
            &auth.0.subject,
        )
        .await?
        {
            Ok(Disconnected::Done)
        } else {
            Err(ApiError::not_found("account"))
        }
    }

    /// A mailbox's status: connection, token expiry, last sync, errors, counts.
    #[oai(path = "/accounts/:account_id", method = "get")]
    async fn get(
        &self,
        auth: BearerAuth,
        account_id: Path<String>,
    ) -> ApiResult<Json<AccountView>> {
        let a = jobs::tickets::account_status(
            &self.state.pool,
            auth.0.tenant,
            parse_account(&account_id)?,
        )
        .await?
        .ok_or_else(|| ApiError::not_found("account"))?;
        Ok(Json(AccountView {
            id: a.id,
            email_address: a.email_address,
            display_name: a.display_name,
            status: a.status,
            status_reason: a.status_reason,
            token_expires_at: a.token_expires_at,
            last_sync_started_at: a.last_sync_started_at,
            last_sync_success_at: a.last_sync_success_at,
            last_sync_error: a.last_sync_error,
            messages_ingested: a.messages_ingested,
            duplicates_skipped: a.duplicates_skipped,
            throttled_until: a.throttled_until,
            validation: a.validation,
            validated_at: a.validated_at,
        }))
    }

    /// Enqueues a delta sync of one folder. Coalesces: while a sync of the same account and
    /// folder is pending, this returns that job.
    #[oai(path = "/accounts/:account_id/sync", method = "post")]
    async fn sync(
        &self,
        auth: BearerAuth,
        account_id: Path<String>,
        body: JsonBody<SyncRequest>,
    ) -> ApiResult<Accepted> {
        require_admin(&auth)?;
        let account = self
            .own_account(auth.0.tenant, parse_account(&account_id)?)
            .await?;
        let folder = body.0.folder.unwrap_or_else(|| "inbox".into());
        if !valid_folder(&folder) {
            return Err(ApiError::unprocessable(
                "folder must be a well-known folder name or a Graph folder id",
            ));
        }
        let job = SyncMailbox {
            tenant: auth.0.tenant,
            account,
            folder,
        };
        let enq = self
            .state
            .queue
            .enqueue(&job, EnqueueOptions::default())
            .await?;
        Ok(accepted::<SyncMailbox>(enq))
    }

    /// Enqueues a connection test: /me, the inbox, granted scopes, send permission.
    #[oai(path = "/accounts/:account_id/validate", method = "post")]
    async fn validate(&self, auth: BearerAuth, account_id: Path<String>) -> ApiResult<Accepted> {
        require_admin(&auth)?;
        let account = self
            .own_account(auth.0.tenant, parse_account(&account_id)?)
            .await?;
        let job = ValidateAccount {
            tenant: auth.0.tenant,
            account,
        };
        let enq = self
            .state
            .queue
            .enqueue(&job, EnqueueOptions::default())
            .await?;
        Ok(accepted::<ValidateAccount>(enq))
    }

    /// Enqueues a token refresh for the account.
    #[oai(path = "/accounts/:account_id/refresh-token", method = "post")]
    async fn refresh_token(
        &self,
        auth: BearerAuth,
        account_id: Path<String>,
    ) -> ApiResult<Accepted> {
        require_admin(&auth)?;
        let account = self
            .own_account(auth.0.tenant, parse_account(&account_id)?)
            .await?;
        let job = RefreshToken {
            tenant: auth.0.tenant,
            account,
            force: true,
        };
        let enq = self
            .state
            .queue
            .enqueue(&job, EnqueueOptions::default())
            .await?;
        Ok(accepted::<RefreshToken>(enq))
    }
}
