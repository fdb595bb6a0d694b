use jobs::ids::{EmailAddress, IdempotencyKey, TicketId};
use jobs::sends::{NewReply, SendError, create_send};
use poem_openapi::{
    ApiResponse, Object, OpenApi,
    param::{Header, Path},
    payload::Json,
};
use uuid::Uuid;

use crate::AppState;
use crate::auth::BearerAuth;
use crate::error::{ApiError, ApiResult};
use crate::routes::ApiTags;

#[derive(Debug, Object)]
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
pub struct ReplyAccepted {
    pub send_id: Uuid,
    pub job_id: Option<i64>,
    /// False when this Idempotency-Key had already created this reply.
    pub created: bool,
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
    /// Sends an agent's reply on a ticket, exactly once per Idempotency-Key.
    #[oai(path = "/tickets/:ticket_id/replies", method = "post")]
    async fn reply(
        &self,
        auth: BearerAuth,
        ticket_id: Path<i64>,
        /// A client-chosen key (1–128 visible ASCII characters) that makes retries safe.
        #[oai(name = "Idempotency-Key")]
        idempotency_key: Header<String>,
        body: Json<ReplyRequest>,
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
