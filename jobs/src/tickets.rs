//! Reading tickets and their messages for one tenant.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgPool};
use uuid::Uuid;

use crate::ids::{AccountId, TenantId, TicketId};

#[derive(Debug, Clone, Serialize, FromRow)]
pub struct TicketSummary {
    pub id: i64,
    pub email_account_id: Uuid,
    pub subject: String,
    pub customer_email: String,
    pub status: String,
    pub merged_into_ticket_id: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub last_message_at: DateTime<Utc>,
    pub message_count: i64,
}

#[derive(Debug, Clone, Serialize, FromRow)]
pub struct MessageView {
    pub id: Uuid,
    pub direction: String,
    pub internet_message_id: Option<String>,
    pub subject: String,
    pub from_address: String,
    pub from_name: Option<String>,
    pub to_recipients: serde_json::Value,
    pub cc_recipients: serde_json::Value,
    pub body_html: Option<String>,
    pub body_text: Option<String>,
    pub received_at: Option<DateTime<Utc>>,
    pub is_auto_reply: bool,
    pub auto_reply_reason: Option<String>,
    pub thread_rule: String,
    pub thread_detail: Option<String>,
    pub attachments: serde_json::Value,
}

#[derive(Debug, Clone, Default)]
pub struct TicketFilter {
    pub status: Option<String>,
    pub account: Option<AccountId>,
    pub text: Option<String>,
    pub before_id: Option<i64>,
    pub limit: i64,
}

pub const TICKET_STATUSES: [&str; 5] = ["open", "pending", "solved", "closed", "archived"];

fn escape_like(raw: &str) -> String {
    raw.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

pub async fn list_tickets(
    pool: &PgPool,
    tenant: TenantId,
    filter: &TicketFilter,
) -> Result<Vec<TicketSummary>, sqlx::Error> {
    let mut tx = crate::db::tenant_tx(pool, tenant).await?;
    sqlx::query_as(
        "SELECT t.id, t.email_account_id, t.subject, t.customer_email, t.status,
                t.merged_into_ticket_id, t.created_at, t.last_message_at,
                (SELECT count(*) FROM helpdesk_messages m WHERE m.ticket_id = t.id) AS message_count
         FROM helpdesk_tickets t
         WHERE t.tenant_id = $1
           AND ($2::text IS NULL OR t.status = $2)
           AND ($3::uuid IS NULL OR t.email_account_id = $3)
           AND ($4::text IS NULL OR t.subject ILIKE '%' || $4 || '%'
                OR t.customer_email ILIKE '%' || $4 || '%'
                OR EXISTS (SELECT 1 FROM helpdesk_messages m WHERE m.ticket_id = t.id
                           AND m.body_text ILIKE '%' || $4 || '%'))
           AND ($5::bigint IS NULL OR t.id < $5)
         ORDER BY t.id DESC LIMIT $6",
    )
    .bind(tenant.as_uuid())
    .bind(filter.status.as_deref())
    .bind(filter.account.map(|a| a.as_uuid()))
    .bind(filter.text.as_deref().map(escape_like))
    .bind(filter.before_id)
    .bind(filter.limit.clamp(1, 200))
    .fetch_all(&mut *tx)
    .await
}

pub async fn get_ticket(
    pool: &PgPool,
    tenant: TenantId,
    id: TicketId,
) -> Result<Option<(TicketSummary, Vec<MessageView>)>, sqlx::Error> {
    let mut tx = crate::db::tenant_tx(pool, tenant).await?;
    let ticket: Option<TicketSummary> = sqlx::query_as(
        "SELECT t.id, t.email_account_id, t.subject, t.customer_email, t.status,
                t.merged_into_ticket_id, t.created_at, t.last_message_at,
                (SELECT count(*) FROM helpdesk_messages m WHERE m.ticket_id = t.id) AS message_count
         FROM helpdesk_tickets t WHERE t.tenant_id = $1 AND t.id = $2",
    )
    .bind(tenant.as_uuid())
    .bind(id.get())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(ticket) = ticket else {
        return Ok(None);
    };
    let messages = sqlx::query_as(
        "SELECT id, direction, internet_message_id, subject, from_address, from_name,
                to_recipients, cc_recipients, body_html, body_text, received_at, is_auto_reply,
                auto_reply_reason, thread_rule, thread_detail, attachments
         FROM helpdesk_messages WHERE tenant_id = $1 AND ticket_id = $2
         ORDER BY coalesce(received_at, created_at), id",
    )
    .bind(tenant.as_uuid())
    .bind(id.get())
    .fetch_all(&mut *tx)
    .await?;
    Ok(Some((ticket, messages)))
}

#[derive(Debug, Clone, Serialize, FromRow)]
pub struct AccountStatus {
    pub id: Uuid,
    pub email_address: String,
    pub display_name: Option<String>,
    pub status: String,
    pub status_reason: Option<String>,
    pub token_expires_at: Option<DateTime<Utc>>,
    pub last_sync_started_at: Option<DateTime<Utc>>,
    pub last_sync_success_at: Option<DateTime<Utc>>,
    pub last_sync_error: Option<String>,
    pub messages_ingested: i64,
    pub duplicates_skipped: i64,
    pub throttled_until: Option<DateTime<Utc>>,
    pub validation: Option<serde_json::Value>,
    pub validated_at: Option<DateTime<Utc>>,
}

pub async fn account_status(
    pool: &PgPool,
    tenant: TenantId,
    account: AccountId,
) -> Result<Option<AccountStatus>, sqlx::Error> {
    let mut tx = crate::db::tenant_tx(pool, tenant).await?;
    sqlx::query_as(
        "SELECT id, email_address, display_name, status, status_reason, token_expires_at,
                last_sync_started_at, last_sync_success_at, last_sync_error, messages_ingested,
                duplicates_skipped, throttled_until, validation, validated_at
         FROM helpdesk_email_accounts WHERE tenant_id = $1 AND id = $2",
    )
    .bind(tenant.as_uuid())
    .bind(account.as_uuid())
    .fetch_optional(&mut *tx)
    .await
}
