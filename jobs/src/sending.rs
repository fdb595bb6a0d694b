//! SendReply: an agent's reply leaves exactly once, is saved on the ticket, and threads back.
//!
//! The send row is a state machine; every transition is a compare-and-set on the status, so a
//! retry, or two executions at once, resume from what is recorded:
//!
//! - `queued` → `draft_created`: createReply on the ticket's latest inbound message (a new
//!   draft message when this mailbox holds none), then store the draft's (immutable) id and
//!   internetMessageId. A crash before storing leaves an orphan draft that is never sent; the
//!   retry makes a new one.
//! - `draft_created` → `sent`: PATCH the draft (ticket token in the subject, recipients), then
//!   look at the draft: gone or no longer a draft means an earlier execution already sent it;
//!   otherwise send it. Graph refuses to send a non-draft, so two executions cannot both send.
//! - `sent` → `confirmed`: find the Sent Items copy by internetMessageId (it appears late; the
//!   job comes back with backoff), store it as the ticket's outbound message, set the ticket to
//!   pending. If the copy never appears and the draft is still a draft, the send did not
//!   happen: back to `draft_created`.
//! - `failed`: a permanent refusal (recipient rejected, access denied), with a reason.

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde_json::json;
use sqlx::PgPool;
use tracing::{info, warn};
use uuid::Uuid;

use crate::db::tenant_tx;
use crate::graph::{
    ErrorClass, GraphClient, GraphError, ItemBody, MessagePatch, Recipient, ReplyContent,
};
use crate::ids::{
    AccountId, InternetMessageId, MessageId, MicrosoftMessageId, SendId, TenantId, TicketId,
};
use crate::mail::subject::with_ticket_token;
use crate::queue::JobError;
use crate::services::Services;

/// Outlook's limit of sends per minute per mailbox.
pub const SENDS_PER_MINUTE: i32 = 30;

#[derive(Debug, thiserror::Error)]
pub enum SendJobError {
    #[error("send not found")]
    NotFound,
    #[error("Graph: {0}")]
    Graph(#[from] GraphError),
    #[error("database error while sending")]
    Db(#[from] sqlx::Error),
}

#[derive(sqlx::FromRow, Debug)]
struct SendRow {
    ticket_id: i64,
    email_account_id: Uuid,
    status: String,
    to_recipients: serde_json::Value,
    cc_recipients: serde_json::Value,
    subject: String,
    body_html: String,
    draft_id: Option<String>,
    internet_message_id: Option<String>,
    created_by: String,
    updated_at: chrono::DateTime<Utc>,
}

fn recipients(v: &serde_json::Value) -> Vec<Recipient> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str())
        .map(|a| Recipient::new(a, None))
        .collect()
}

async fn load(pool: &PgPool, tenant: TenantId, send: SendId) -> Result<SendRow, SendJobError> {
    let mut tx = crate::db::tenant_tx(pool, tenant).await?;
    sqlx::query_as(
        "SELECT ticket_id, email_account_id, status, to_recipients, cc_recipients, subject,
                body_html, draft_id, internet_message_id, created_by, updated_at
         FROM helpdesk_outbound_sends WHERE id = $1 AND tenant_id = $2",
    )
    .bind(send.as_uuid())
    .bind(tenant.as_uuid())
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(SendJobError::NotFound)
}

/// A permanent failure: the row says why, the ticket's agents can see it.
async fn fail(
    pool: &PgPool,
    tenant: TenantId,
    send: SendId,
    from: &str,
    reason: &str,
) -> Result<(), sqlx::Error> {
    let mut tx = crate::db::tenant_tx(pool, tenant).await?;
    let done = sqlx::query(
        "UPDATE helpdesk_outbound_sends SET status = 'failed', failure_reason = $4, updated_at = now()
         WHERE id = $1 AND tenant_id = $2 AND status = $3",
    )
    .bind(send.as_uuid())
    .bind(tenant.as_uuid())
    .bind(from)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 1 {
        crate::audit::record(
            &mut tx,
            Some(tenant),
            "system",
            "send.failed",
            "send",
            &send.to_string(),
            json!({ "reason": reason }),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

fn job_error(e: &GraphError) -> JobError {
    crate::handlers::from_graph(e)
}

/// Runs the send state machine from wherever the row is.
pub async fn send_reply(
    services: &Services,
    tenant: TenantId,
    send: SendId,
) -> Result<(), JobError> {
    let pool = &services.pool;
    for _ in 0..4 {
        let row = match load(pool, tenant, send).await {
            Ok(r) => r,
            Err(SendJobError::NotFound) => {
                return Err(JobError::permanent("the send no longer exists"));
            }
            Err(e) => return Err(JobError::retry(e)),
        };
        let account = AccountId::from_uuid(row.email_account_id);
        let client = crate::accounts::graph_client(services, tenant, account);
        let step = match row.status.as_str() {
            "confirmed" | "failed" => return Ok(()),
            "queued" => create_draft(services, &client, tenant, send, &row).await,
            "draft_created" => send_draft(services, &client, tenant, send, account, &row).await,
            "sent" => confirm(services, &client, tenant, send, account, &row).await,
            other => return Err(JobError::permanent(format!("unknown send status {other}"))),
        };
        step?;
    }
    Ok(())
}

async fn create_draft(
    services: &Services,
    client: &GraphClient,
    tenant: TenantId,
    send: SendId,
    row: &SendRow,
) -> Result<(), JobError> {
    let pool = &services.pool;
    // Reply to the customer's latest mail that this mailbox has seen.
    let target: Option<String> = sqlx::query_scalar(
        "SELECT s.microsoft_message_id FROM helpdesk_messages m
         JOIN helpdesk_message_sightings s ON s.message_id = m.id
         WHERE m.tenant_id = $1 AND m.ticket_id = $2 AND m.direction = 'inbound'
           AND s.email_account_id = $3 AND s.removed_at IS NULL
         ORDER BY m.received_at DESC NULLS LAST LIMIT 1",
    )
    .bind(tenant.as_uuid())
    .bind(row.ticket_id)
    .bind(row.email_account_id)
    .fetch_optional(&mut *tenant_tx(pool, tenant).await.map_err(JobError::retry)?)
    .await
    .map_err(JobError::retry)?;
    // The customer's mail reached the tenant through another mailbox (or was deleted here): a
    // new message instead. It is a draft with an id like a reply draft, so the steps after
    // this one, and their exactly-once argument, stay the same; sendMail would return no id
    // to check or find again.
    let message = MessagePatch {
        subject: Some(with_ticket_token(
            &format!("RE: {}", strip_reply_prefix(&row.subject)),
            TicketId::new(row.ticket_id),
        )),
        body: Some(ItemBody::html(row.body_html.clone())),
        to_recipients: Some(recipients(&row.to_recipients)),
        cc_recipients: Some(recipients(&row.cc_recipients)),
        ..MessagePatch::default()
    };
    let new_message = || client.create_message(&message);
    let created = match target.and_then(|t| MicrosoftMessageId::try_from(t).ok()) {
        Some(target) => match client
            .create_reply(&target, &ReplyContent::Comment(row.body_html.clone()))
            .await
        {
            // Deleted in the mailbox since the last sync saw it: nothing to reply to, but the
            // answer still goes out.
            Err(e) if e.is_not_found() => new_message().await,
            created => created,
        },
        None => new_message().await,
    };
    let draft = match created {
        Ok(d) => d,
        Err(e) if e.class() == ErrorClass::Permanent => {
            fail(
                pool,
                tenant,
                send,
                "queued",
                &format!("Microsoft refused the reply: {e}"),
            )
            .await
            .map_err(JobError::retry)?;
            return Ok(());
        }
        Err(e) => return Err(job_error(&e)),
    };
    let stored = crate::db::tenant_execute(
        pool,
        tenant,
        sqlx::query(
            "UPDATE helpdesk_outbound_sends SET status = 'draft_created', draft_id = $3,
            internet_message_id = $4, updated_at = now()
         WHERE id = $1 AND tenant_id = $2 AND status = 'queued'",
        )
        .bind(send.as_uuid())
        .bind(tenant.as_uuid())
        .bind(draft.id.as_str())
        .bind(draft.internet_message_id().map(|i| i.as_str().to_string())),
    )
    .await
    .map_err(JobError::retry)?;
    if stored.rows_affected() == 0 {
        // Another execution got there first: this draft is surplus, never send it.
        warn!(%send, "surplus draft from a concurrent execution; deleting it");
        let _ = client.delete_message(&draft.id).await;
    }
    Ok(())
}

/// Counts a send against the mailbox's per-minute allowance and returns the minute it was
/// counted in; `Err` defers the job.
async fn take_send_slot(pool: &PgPool, account: AccountId) -> Result<DateTime<Utc>, JobError> {
    let now = Utc::now();
    let minute = now.duration_trunc(TimeDelta::minutes(1)).unwrap_or(now);
    let used: i32 = sqlx::query_scalar(
        "INSERT INTO graph_send_rate (email_account_id, minute_start, sends) VALUES ($1, $2, 1)
         ON CONFLICT (email_account_id, minute_start)
         DO UPDATE SET sends = graph_send_rate.sends + 1 RETURNING sends",
    )
    .bind(account.as_uuid())
    .bind(minute)
    .fetch_one(pool)
    .await
    .map_err(JobError::retry)?;
    if used > SENDS_PER_MINUTE {
        metrics::counter!("graphdesk_send_rate_deferred_total").increment(1);
        return Err(JobError::defer(
            minute + TimeDelta::minutes(1),
            "the mailbox reached 30 sends this minute",
        ));
    }
    Ok(minute)
}

/// Uncounts a send that never reached Microsoft. Best effort: a count left behind only makes
/// that one minute's allowance smaller.
async fn give_back_send_slot(pool: &PgPool, account: AccountId, minute: DateTime<Utc>) {
    let given_back = sqlx::query(
        "UPDATE graph_send_rate SET sends = sends - 1
         WHERE email_account_id = $1 AND minute_start = $2 AND sends > 0",
    )
    .bind(account.as_uuid())
    .bind(minute)
    .execute(pool)
    .await;
    if let Err(e) = given_back {
        warn!(%account, error = %e, "could not give back a send-rate slot");
    }
}

async fn send_draft(
    services: &Services,
    client: &GraphClient,
    tenant: TenantId,
    send: SendId,
    account: AccountId,
    row: &SendRow,
) -> Result<(), JobError> {
    let pool = &services.pool;
    let Some(draft_id) = row
        .draft_id
        .clone()
        .and_then(|d| MicrosoftMessageId::try_from(d).ok())
    else {
        return Err(JobError::permanent("draft_created without a draft id"));
    };
    // Was it sent already (a crash after `send`, or a concurrent execution)?
    let already_sent = match client.get_message(&draft_id).await {
        Ok(m) => m.is_draft == Some(false),
        Err(e) if e.is_not_found() => true,
        Err(e) => return Err(job_error(&e)),
    };
    if !already_sent {
        let ticket = TicketId::new(row.ticket_id);
        let patch = MessagePatch {
            subject: Some(with_ticket_token(
                &format!("RE: {}", strip_reply_prefix(&row.subject)),
                ticket,
            )),
            to_recipients: Some(recipients(&row.to_recipients)),
            cc_recipients: Some(recipients(&row.cc_recipients)),
            ..MessagePatch::default()
        };
        if let Err(e) = client.update_message(&draft_id, &patch).await {
            // Another execution sent the draft between our look and this update: the draft is
            // gone, or Graph refuses to change a sent message. The reply is out and the next
            // step confirms it; failing the send here recorded a reply that had left as failed.
            if e.is_not_found()
                || e.code().is_some_and(|c| {
                    c.eq_ignore_ascii_case("ErrorInvalidPropertyUpdateSentMessage")
                })
            {
                return mark_sent(pool, tenant, send).await;
            }
            return match e.class() {
                ErrorClass::Permanent => {
                    fail(
                        pool,
                        tenant,
                        send,
                        "draft_created",
                        &format!("Microsoft refused the reply: {e}"),
                    )
                    .await
                    .map_err(JobError::retry)?;
                    Ok(())
                }
                _ => Err(job_error(&e)),
            };
        }
        let counted_in = take_send_slot(pool, account).await?;
        let refused = match client.send_draft(&draft_id).await {
            Ok(()) => None,
            // Refused before it left (the mailbox gate was full, no token): nothing was sent,
            // and a job waiting on a busy mailbox would otherwise use the minute's sends up.
            Err(e) if e.was_not_sent() => {
                give_back_send_slot(pool, account, counted_in).await;
                return Err(job_error(&e));
            }
            // Gone: an earlier execution sent it (the confirm step settles it if not).
            Err(e) if e.is_not_found() => None,
            // What Graph answers for sending a message that is no longer a draft; but the code
            // is Graph's generic 400, so look: a draft still there was refused, not sent, and
            // reading it as sent would send it again every ten minutes from the confirm step.
            Err(e)
                if e.code()
                    .is_some_and(|c| c.eq_ignore_ascii_case("ErrorInvalidRequest")) =>
            {
                match client.get_message(&draft_id).await {
                    Ok(m) if m.is_draft == Some(true) => Some(e),
                    Ok(_) => None,
                    Err(seen) if seen.is_not_found() => None,
                    Err(seen) => return Err(job_error(&seen)),
                }
            }
            Err(e) if e.class() == ErrorClass::Permanent => Some(e),
            // An unknown outcome is resolved by the next run's look at the draft.
            Err(e) => return Err(job_error(&e)),
        };
        if let Some(e) = refused {
            give_back_send_slot(pool, account, counted_in).await;
            fail(
                pool,
                tenant,
                send,
                "draft_created",
                &format!("Microsoft refused to send: {e}"),
            )
            .await
            .map_err(JobError::retry)?;
            return Ok(());
        }
        metrics::counter!("graphdesk_sends_total").increment(1);
        info!(%send, "reply sent");
    }
    mark_sent(pool, tenant, send).await
}

fn strip_reply_prefix(subject: &str) -> &str {
    crate::mail::subject::strip_reply_prefixes(subject)
}

async fn mark_sent(pool: &PgPool, tenant: TenantId, send: SendId) -> Result<(), JobError> {
    crate::db::tenant_execute(pool, tenant, sqlx::query(
        "UPDATE helpdesk_outbound_sends SET status = 'sent', sent_at = now(), updated_at = now()
         WHERE id = $1 AND tenant_id = $2 AND status = 'draft_created'",
    )
    .bind(send.as_uuid())
    .bind(tenant.as_uuid())
    )
    .await
    .map_err(JobError::retry)?;
    Ok(())
}

async fn confirm(
    services: &Services,
    client: &GraphClient,
    tenant: TenantId,
    send: SendId,
    account: AccountId,
    row: &SendRow,
) -> Result<(), JobError> {
    let pool = &services.pool;
    let Some(imid) = row
        .internet_message_id
        .as_deref()
        .and_then(|i| InternetMessageId::parse(i).ok())
    else {
        return Err(JobError::permanent(
            "sent without an internetMessageId to confirm",
        ));
    };
    // Transport places the Sent Items copy late: look a few times, then come back later.
    let mut found = None;
    for wait_ms in [0u64, 250, 500, 1000] {
        if wait_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(wait_ms)).await;
        }
        match client.find_sent_by_internet_message_id(&imid).await {
            Ok(Some(m)) => {
                found = Some(m);
                break;
            }
            Ok(None) => {}
            Err(e) => return Err(job_error(&e)),
        }
    }
    let Some(sent) = found else {
        if Utc::now() - row.updated_at > TimeDelta::minutes(10)
            && let Some(draft) = row
                .draft_id
                .clone()
                .and_then(|d| MicrosoftMessageId::try_from(d).ok())
        {
            match client.get_message(&draft).await {
                Ok(m) if m.is_draft == Some(true) => {
                    // The send never happened: try again from the draft.
                    crate::db::tenant_execute(pool, tenant, sqlx::query("UPDATE helpdesk_outbound_sends SET status = 'draft_created', updated_at = now() WHERE id = $1 AND status = 'sent'")
                        .bind(send.as_uuid())
                        )
                        .await
                        .map_err(JobError::retry)?;
                    return Ok(());
                }
                // An immutable id follows a sent draft into Sent Items, so a draft that is gone
                // and never showed up there was deleted (or moved away) before it was sent. It
                // cannot be sent again without risking a second copy if it did leave, so the
                // send fails where agents and ops see it, instead of reading `sent` forever.
                Err(e) if e.is_not_found() => {
                    fail(
                        pool,
                        tenant,
                        send,
                        "sent",
                        "the reply's draft disappeared from the mailbox (deleted or moved) and no \
                         message with its Internet message id reached Sent Items within 10 \
                         minutes; it was most likely never sent. Send the reply again.",
                    )
                    .await
                    .map_err(JobError::retry)?;
                    return Ok(());
                }
                _ => {}
            }
        }
        return Err(JobError::retry_after(
            "the sent message is not in Sent Items yet",
            std::time::Duration::from_secs(2),
        ));
    };
    let mut tx = tenant_tx(pool, tenant).await.map_err(JobError::retry)?;
    let message_id = MessageId::new().as_uuid();
    let (ticket_subject,): (String,) =
        sqlx::query_as("SELECT subject FROM helpdesk_tickets WHERE id = $1")
            .bind(row.ticket_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(JobError::retry)?;
    let inserted: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO helpdesk_messages
            (id, tenant_id, email_account_id, ticket_id, direction, microsoft_message_id,
             internet_message_id, conversation_id, subject, from_address, to_recipients,
             cc_recipients, body_html, sent_at, received_at, thread_rule, thread_detail)
         SELECT $1, $2, $3, $4, 'outbound', $5, $6, $7, $8, a.email_address, $9, $10, $11, now(), now(),
                'outbound_reply', 'sent by ' || $12
         FROM helpdesk_email_accounts a WHERE a.id = $3
         ON CONFLICT DO NOTHING
         RETURNING id",
    )
    .bind(message_id)
    .bind(tenant.as_uuid())
    .bind(account.as_uuid())
    .bind(row.ticket_id)
    .bind(sent.id.as_str())
    .bind(imid.as_str())
    .bind(sent.conversation_id.as_deref())
    .bind(sent.subject.clone().unwrap_or(ticket_subject))
    .bind(json!(row.to_recipients.as_array().cloned().unwrap_or_default().iter().map(|a| json!({"address": a})).collect::<Vec<_>>()))
    .bind(json!(row.cc_recipients.as_array().cloned().unwrap_or_default().iter().map(|a| json!({"address": a})).collect::<Vec<_>>()))
    .bind(&row.body_html)
    .bind(&row.created_by)
    .fetch_optional(&mut *tx)
    .await
    .map_err(JobError::retry)?;
    let message_id: Uuid = match inserted {
        Some(id) => id,
        None => sqlx::query_scalar(
            "SELECT id FROM helpdesk_messages WHERE tenant_id = $1 AND internet_message_id = $2",
        )
        .bind(tenant.as_uuid())
        .bind(imid.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(JobError::retry)?,
    };
    sqlx::query(
        "INSERT INTO helpdesk_message_sightings (tenant_id, email_account_id, microsoft_message_id, message_id, folder)
         VALUES ($1, $2, $3, $4, 'sentitems') ON CONFLICT DO NOTHING",
    )
    .bind(tenant.as_uuid())
    .bind(account.as_uuid())
    .bind(sent.id.as_str())
    .bind(message_id)
    .execute(&mut *tx)
    .await
    .map_err(JobError::retry)?;
    let confirmed = sqlx::query(
        "UPDATE helpdesk_outbound_sends SET status = 'confirmed', sent_message_id = $3,
            message_id = $4, updated_at = now()
         WHERE id = $1 AND tenant_id = $2 AND status = 'sent'",
    )
    .bind(send.as_uuid())
    .bind(tenant.as_uuid())
    .bind(sent.id.as_str())
    .bind(message_id)
    .execute(&mut *tx)
    .await
    .map_err(JobError::retry)?;
    if confirmed.rows_affected() == 1 {
        sqlx::query(
            "UPDATE helpdesk_tickets SET status = CASE WHEN status IN ('open', 'pending') THEN 'pending' ELSE status END,
                last_message_at = greatest(last_message_at, now()), updated_at = now()
             WHERE id = $1 AND tenant_id = $2",
        )
        .bind(row.ticket_id)
        .bind(tenant.as_uuid())
        .execute(&mut *tx)
        .await
        .map_err(JobError::retry)?;
        crate::audit::record(
            &mut tx,
            Some(tenant),
            &row.created_by,
            "send.sent",
            "send",
            &send.to_string(),
            json!({ "ticket_id": row.ticket_id, "internet_message_id": imid.as_str() }),
        )
        .await
        .map_err(JobError::retry)?;
    }
    tx.commit().await.map_err(JobError::retry)?;
    Ok(())
}
