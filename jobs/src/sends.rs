//! Creating an agent's reply: the send row and its SendReply job are written in one
//! transaction (transactional outbox), keyed by the client's Idempotency-Key.

use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::ids::{EmailAddress, IdempotencyKey, JobId, SendId, TenantId, TicketId};
use crate::kinds::SendReply;
use crate::queue::{EnqueueOptions, QueueError, enqueue_in};

#[derive(Debug, Clone, Serialize)]
pub struct NewReply {
    pub to: Vec<EmailAddress>,
    pub cc: Vec<EmailAddress>,
    pub body_html: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendCreated {
    pub send_id: SendId,
    pub job_id: Option<JobId>,
    /// False when the Idempotency-Key had been used for this same reply before.
    pub created: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("ticket not found")]
    TicketNotFound,
    #[error(
        "this Idempotency-Key was already used for a different reply; use a new key for a new reply"
    )]
    KeyReusedWithDifferentRequest,
    #[error("the reply has no recipient and the ticket has no customer address")]
    NoRecipient,
    #[error("storing the reply failed")]
    Db(#[from] sqlx::Error),
    #[error("enqueueing the reply failed")]
    Queue(#[from] QueueError),
}

fn request_hash(ticket: TicketId, reply: &NewReply) -> String {
    let canonical = serde_json::json!({
        "ticket": ticket.get(),
        "to": reply.to.iter().map(EmailAddress::key).collect::<Vec<_>>(),
        "cc": reply.cc.iter().map(EmailAddress::key).collect::<Vec<_>>(),
        "body_html": reply.body_html,
    });
    hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
}

pub async fn create_send(
    pool: &PgPool,
    tenant: TenantId,
    ticket: TicketId,
    actor: &str,
    key: &IdempotencyKey,
    mut reply: NewReply,
) -> Result<SendCreated, SendError> {
    let mut tx = crate::db::tenant_tx(pool, tenant).await?;
    let row: Option<(Uuid, String, String)> = sqlx::query_as(
        "SELECT email_account_id, subject, customer_email FROM helpdesk_tickets
         WHERE id = $1 AND tenant_id = $2",
    )
    .bind(ticket.get())
    .bind(tenant.as_uuid())
    .fetch_optional(&mut *tx)
    .await?;
    let Some((account, subject, customer)) = row else {
        return Err(SendError::TicketNotFound);
    };
    if reply.to.is_empty() {
        let customer = EmailAddress::parse(&customer).map_err(|_| SendError::NoRecipient)?;
        reply.to.push(customer);
    }
    let hash = request_hash(ticket, &reply);
    let send_id = SendId::new();
    let inserted: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO helpdesk_outbound_sends
            (id, tenant_id, ticket_id, email_account_id, idempotency_key, request_hash,
             to_recipients, cc_recipients, subject, body_html, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         ON CONFLICT (tenant_id, idempotency_key) DO NOTHING
         RETURNING id",
    )
    .bind(send_id.as_uuid())
    .bind(tenant.as_uuid())
    .bind(ticket.get())
    .bind(account)
    .bind(key.as_str())
    .bind(&hash)
    .bind(serde_json::to_value(&reply.to).unwrap_or_default())
    .bind(serde_json::to_value(&reply.cc).unwrap_or_default())
    .bind(&subject)
    .bind(&reply.body_html)
    .bind(actor)
    .fetch_optional(&mut *tx)
    .await?;
    if inserted.is_none() {
        let (existing, existing_hash, job): (Uuid, String, Option<i64>) = sqlx::query_as(
            "SELECT id, request_hash, job_id FROM helpdesk_outbound_sends
             WHERE tenant_id = $1 AND idempotency_key = $2",
        )
        .bind(tenant.as_uuid())
        .bind(key.as_str())
        .fetch_one(&mut *tx)
        .await?;
        if existing_hash != hash {
            return Err(SendError::KeyReusedWithDifferentRequest);
        }
        return Ok(SendCreated {
            send_id: SendId::from_uuid(existing),
            job_id: job.map(JobId::new),
            created: false,
        });
    }
    let job = SendReply {
        tenant,
        send: send_id,
    };
    let enq = enqueue_in(
        &mut tx,
        &job,
        EnqueueOptions::default().idempotency_key(format!("send:{send_id}")),
    )
    .await?;
    sqlx::query("UPDATE helpdesk_outbound_sends SET job_id = $1 WHERE id = $2")
        .bind(enq.id.get())
        .bind(send_id.as_uuid())
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO audit_log (tenant_id, actor, action, entity_type, entity_id, details)
         VALUES ($1, $2, 'send.created', 'send', $3, jsonb_build_object('ticket_id', $4::bigint))",
    )
    .bind(tenant.as_uuid())
    .bind(actor)
    .bind(send_id.to_string())
    .bind(ticket.get())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(SendCreated {
        send_id,
        job_id: Some(enq.id),
        created: true,
    })
}
