use crate::body::JsonBody;
use jobs::ids::{EmailAddress, IdempotencyKey, TicketId};
use jobs::sends::{NewReply, SendError, create_send};
use poem_openapi::{
    ApiResponse, Object, OpenApi,
    param::{Header, Path, Query},
    payload::Json,
};
use uuid::Uuid;

use crate::AppState;
use crate::auth::BearerAuth;
use crate::error::{ApiError, ApiResult};
use crate::routes::ApiTags;

#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct ReplyRequest {
    /// Recipients; default: the ticket's customer.
    #[oai(default)]
    pub to: Vec<String>,
    #[oai(default)]
    pub cc: Vec<String>,
    /// The reply body as HTML.
    pub body_html: String,
}

#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct ReplyAccepted {
    pub send_id: Uuid,
    pub job_id: Option<i64>,
    /// False when this Idempotency-Key had already created this reply.
    pub created: bool,
}

/// A ticket in a list.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct TicketView {
    /// The ticket number, also the `[#n]` token in reply subjects.
    pub id: i64,
    pub account_id: Uuid,
    pub subject: String,
    pub customer_email: String,
    /// open, pending, solved, closed or archived.
    pub status: String,
    /// Set when later evidence showed this ticket is the same conversation as another.
    pub merged_into: Option<i64>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub last_message_at: chrono::DateTime<chrono::Utc>,
    pub message_count: i64,
}

impl From<jobs::tickets::TicketSummary> for TicketView {
    fn from(t: jobs::tickets::TicketSummary) -> Self {
        Self {
            id: t.id,
            account_id: t.email_account_id,
            subject: t.subject,
            customer_email: t.customer_email,
            status: t.status,
            merged_into: t.merged_into_ticket_id,
            created_at: t.created_at,
            last_message_at: t.last_message_at,
            message_count: t.message_count,
        }
    }
}

/// A message on a ticket, with the threading rule that put it there.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct MessageItem {
    pub id: Uuid,
    /// inbound or outbound.
    pub direction: String,
    pub internet_message_id: Option<String>,
    pub subject: String,
    pub from_address: String,
    pub from_name: Option<String>,
    pub to: serde_json::Value,
    pub cc: serde_json::Value,
    /// Sanitised HTML.
    pub body_html: Option<String>,
    pub body_text: Option<String>,
    pub received_at: Option<chrono::DateTime<chrono::Utc>>,
    pub is_auto_reply: bool,
    pub auto_reply_reason: Option<String>,
    /// in_reply_to, references, referenced_by, conversation_id, ticket_token, subject,
    /// new_ticket, or outbound_reply.
    pub thread_rule: String,
    /// The evidence, e.g. `In-Reply-To <a@b> → ticket 42`.
    pub thread_detail: Option<String>,
    /// Metadata only: name, content type, size, content id, inline.
    pub attachments: serde_json::Value,
}

#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct TicketDetail {
    pub ticket: TicketView,
    pub messages: Vec<MessageItem>,
}

#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct TicketPage {
    pub tickets: Vec<TicketView>,
    /// Pass as `before_id` for the next page; absent on the last page.
    pub next_before_id: Option<i64>,
}

#[derive(Debug, ApiResponse)]
pub enum ReplyResponse {
    /// The reply is stored and queued; the same Idempotency-Key returns the same send.
    #[oai(status = 202)]
    Accepted(Json<ReplyAccepted>),
}

pub struct TicketsApi {
    pub state: AppState,
}

fn default_limit() -> i64 {
    50
}

fn parse_addresses(field: &str, raw: &[String]) -> ApiResult<Vec<EmailAddress>> {
    if raw.len() > 50 {
        return Err(ApiError::unprocessable(format!(
            "{field}: at most 50 recipients"
        )));
    }
    raw.iter()
        .map(|a| {
            EmailAddress::parse(a).map_err(|e| ApiError::unprocessable(format!("{field}: {e}")))
        })
        .collect()
}

#[OpenApi(prefix_path = "/api/v1", tag = "ApiTags::Tickets")]
impl TicketsApi {
    /// Lists the caller's tenant's tickets, newest first.
    #[oai(path = "/tickets", method = "get")]
    async fn list(
        &self,
        auth: BearerAuth,
        /// open, pending, solved, closed or archived.
        status: Query<Option<String>>,
        account_id: Query<Option<Uuid>>,
        /// Matches subject, customer address or message text.
        q: Query<Option<String>>,
        before_id: Query<Option<i64>>,
        /// 1–200, default 50.
        #[oai(default = "default_limit")]
        limit: Query<i64>,
    ) -> ApiResult<Json<TicketPage>> {
        if let Some(s) = &status.0
            && !jobs::tickets::TICKET_STATUSES.contains(&s.as_str())
        {
            return Err(ApiError::unprocessable(format!(
                "status must be one of {}",
                jobs::tickets::TICKET_STATUSES.join(", ")
            )));
        }
        if !(1..=200).contains(&limit.0) {
            return Err(ApiError::unprocessable("limit must be between 1 and 200"));
        }
        if q.0.as_ref().is_some_and(|q| q.len() > 200) {
            return Err(ApiError::unprocessable("q must be at most 200 characters"));
        }
        let filter = jobs::tickets::TicketFilter {
            status: status.0,
            account: account_id.0.map(jobs::ids::AccountId::from_uuid),
            text: q.0,
            before_id: before_id.0,
            limit: limit.0,
        };
        let rows = jobs::tickets::list_tickets(&self.state.pool, auth.0.tenant, &filter).await?;
        let next_before_id = (rows.len() as i64 == limit.0)
            .then(|| rows.last().map(|t| t.id))
            .flatten();
        Ok(Json(TicketPage {
            tickets: rows.into_iter().map(Into::into).collect(),
            next_before_id,
        }))
    }

    /// A ticket with its messages, each with the rule that threaded it.
    #[oai(path = "/tickets/:ticket_id", method = "get")]
    async fn get(&self, auth: BearerAuth, ticket_id: Path<i64>) -> ApiResult<Json<TicketDetail>> {
        let (ticket, messages) =
            jobs::tickets::get_ticket(&self.state.pool, auth.0.tenant, TicketId::new(ticket_id.0))
                .await?
                .ok_or_else(|| ApiError::not_found("ticket"))?;
        Ok(Json(TicketDetail {
            ticket: ticket.into(),
            messages: messages
                .into_iter()
                .map(|m| MessageItem {
                    id: m.id,
                    direction: m.direction,
                    internet_message_id: m.internet_message_id,
                    subject: m.subject,
                    from_address: m.from_address,
                    from_name: m.from_name,
                    to: m.to_recipients,
                    cc: m.cc_recipients,
                    body_html: m.body_html,
                    body_text: m.body_text,
                    received_at: m.received_at,
                    is_auto_reply: m.is_auto_reply,
                    auto_reply_reason: m.auto_reply_reason,
                    thread_rule: m.thread_rule,
                    thread_detail: m.thread_detail,
                    attachments: m.attachments,
                })
                .collect(),
        }))
    }

    /// Sends an agent's reply on a ticket, exactly once per Idempotency-Key.
    #[oai(path = "/tickets/:ticket_id/replies", method = "post")]
    async fn reply(
        &self,
        auth: BearerAuth,
        ticket_id: Path<i64>,
        /// A client-chosen key (1–128 visible ASCII characters) that makes retries safe.
        #[oai(name = "Idempotency-Key")]
        idempotency_key: Header<String>,
        body: JsonBody<ReplyRequest>,
    ) -> ApiResult<ReplyResponse> {
        let key = IdempotencyKey::try_from(idempotency_key.0)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let body = body.0;
        let max = self.state.limits.max_reply_body_bytes;
        if body.body_html.trim().is_empty() {
            return Err(ApiError::unprocessable("body_html must not be empty"));
        }
        if body.body_html.len() > max {
            return Err(ApiError::unprocessable(format!(
                "body_html is {} bytes; the limit is {max}",
                body.body_html.len()
            )));
        }
        let reply = NewReply {
            to: parse_addresses("to", &body.to)?,
            cc: parse_addresses("cc", &body.cc)?,
            body_html: body.body_html,
        };
        let created = create_send(
            &self.state.pool,
            auth.0.tenant,
            TicketId::new(ticket_id.0),
            &auth.0.subject,
            &key,
            reply,
        )
        .await
        .map_err(|e| match e {
            SendError::TicketNotFound => ApiError::not_found("ticket"),
            SendError::KeyReusedWithDifferentRequest => ApiError::conflict(e.to_string()),
            SendError::NoRecipient => ApiError::unprocessable(e.to_string()),
            other => ApiError::internal(&other),
        })?;
        Ok(ReplyResponse::Accepted(Json(ReplyAccepted {
            send_id: created.send_id.as_uuid(),
            job_id: created.job_id.map(|j| j.get()),
            created: created.created,
        })))
    }
}
