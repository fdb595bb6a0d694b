//! SyncMailbox: one folder's delta round becomes tickets and messages, exactly once.
//!
//! - Each page is one transaction of a few set-based statements: a dedupe query, the threading
//!   prefetch ([`lookup::PageLookup`]), then batched inserts and updates, and the page's
//!   nextLink/deltaLink stored with it, so a crash resumes at the last committed page.
//! - Idempotent on (tenant, account, microsoft_message_id) with immutable ids; the same
//!   internetMessageId in two mailboxes of one tenant is one message (a second sighting).
//! - Ingest transactions of one tenant are serialised by an advisory lock, so racing syncs of
//!   two mailboxes cannot both create a ticket for one mail; syncs of one folder are exclusive.
//! - 410 SyncStateNotFound drops the stored links and runs a full round; dedupe makes it safe.

pub mod lookup;

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::json;
use sqlx::{PgConnection, PgPool};
use tracing::{info, warn};
use uuid::Uuid;

use crate::graph::{
    BodyType, DeltaChange, DeltaNext, DeltaOptions, ErrorClass, FolderRef, GraphClient, GraphError,
    Message, WellKnownFolder,
};
use crate::ids::{AccountId, EmailAddress, InternetMessageId, MessageId, TenantId, TicketId};
use crate::mail::autoreply::classify;
use crate::mail::headers::MessageHeaders;
use crate::mail::sanitize::{html_to_text, preview, sanitize_html, text_to_html};
use crate::mail::subject::normalize_subject;
use crate::mail::threading::{
    ThreadInput, ThreadPolicy, ThreadRule, ThreadTarget, TicketRef, TicketStatus, decide,
};
use crate::services::Services;
use lookup::PageLookup;

/// Properties each delta page carries: the client's delta set plus the internet headers
/// threading needs (In-Reply-To, References, Auto-Submitted, ...), so a page costs no
/// per-message request.
fn sync_select() -> Vec<String> {
    crate::graph::client::DELTA_SELECT
        .iter()
        .copied()
        .chain(["internetMessageHeaders"])
        .map(str::to_string)
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("account not found")]
    AccountNotFound,
    #[error("the account is {status} and cannot be synced: {reason}")]
    AccountUnavailable { status: String, reason: String },
    #[error("Graph: {0}")]
    Graph(#[from] GraphError),
    #[error("threading lookup failed")]
    Lookup(#[from] crate::mail::threading::LookupError),
    #[error("database error during sync")]
    Db(#[from] sqlx::Error),
}

impl SyncError {
    #[must_use]
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::AccountNotFound | Self::AccountUnavailable { .. } => ErrorClass::Permanent,
            Self::Graph(e) => e.class(),
            Self::Lookup(_) | Self::Db(_) => ErrorClass::Retryable { after: None },
        }
    }
}

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub pages: u32,
    pub ingested: u64,
    pub duplicates: u64,
    pub removed: u64,
    pub new_tickets: u64,
    pub full_resyncs: u32,
}

fn folder_ref(folder: &str) -> FolderRef {
    match folder.to_ascii_lowercase().as_str() {
        "inbox" => WellKnownFolder::Inbox.into(),
        "archive" => WellKnownFolder::Archive.into(),
        "sentitems" => WellKnownFolder::SentItems.into(),
        "junkemail" => WellKnownFolder::JunkEmail.into(),
        "deleteditems" => WellKnownFolder::DeletedItems.into(),
        "drafts" => WellKnownFolder::Drafts.into(),
        _ => FolderRef::Id(folder.to_string()),
    }
}

fn lock_key(parts: &str) -> i64 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(parts.as_bytes());
    i64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// Syncs one folder of one account. Returns `Ok(None)` when another sync of the same folder is
/// running right now (the caller defers).
pub async fn sync_folder(
    services: &Services,
    tenant: TenantId,
    account: AccountId,
    folder: &str,
) -> Result<Option<SyncReport>, SyncError> {
    let mut tx = crate::db::tenant_tx(&services.pool, tenant).await?;
    let (status, reason, sync_since): (String, Option<String>, Option<DateTime<Utc>>) =
        sqlx::query_as(
            "SELECT status, status_reason, sync_since FROM helpdesk_email_accounts
             WHERE id = $1 AND tenant_id = $2",
        )
        .bind(account.as_uuid())
        .bind(tenant.as_uuid())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(SyncError::AccountNotFound)?;
    tx.commit().await?;
    if matches!(status.as_str(), "needs_reauth" | "disabled") {
        return Err(SyncError::AccountUnavailable {
            status,
            reason: reason.unwrap_or_default(),
        });
    }
    // One sync per folder at a time, across every process: a session lock on a connection
    // held for the whole round.
    let key = lock_key(&format!("sync:{account}:{folder}"));
    let _holding = services
        .connection_holders
        .acquire()
        .await
        .expect("the semaphore is never closed");
    let Some(lock) = FolderLock::try_take(&services.pool, key).await? else {
        return Ok(None);
    };
    let result = run_sync(services, tenant, account, folder, sync_since).await;
    lock.release().await;
    record_outcome(&services.pool, tenant, account, folder, &result).await?;
    result.map(Some)
}

/// A folder's session advisory lock and the pooled connection holding it. The connection never
/// goes back to the pool while it may hold the lock: a sync cut short (the job timeout drops
/// its future) closes it instead, and closing ends the session and so the lock. Returned to
/// the pool, the lock would have blocked the folder until the pool recycled the connection.
struct FolderLock {
    conn: Option<sqlx::pool::PoolConnection<sqlx::Postgres>>,
    key: i64,
}

impl FolderLock {
    async fn try_take(pool: &PgPool, key: i64) -> Result<Option<Self>, sqlx::Error> {
        let mut conn = pool.acquire().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut *conn)
            .await?;
        Ok(locked.then_some(Self {
            conn: Some(conn),
            key,
        }))
    }

    /// Unlocks and returns the connection to the pool; if unlocking fails (or is itself cut
    /// short), `Drop` closes the connection instead.
    async fn release(mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(self.key)
            .execute(&mut **conn)
            .await;
        if unlocked.is_ok() {
            drop(self.conn.take());
        }
    }
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            drop(conn.detach());
        }
    }
}

async fn record_outcome(
    pool: &PgPool,
    tenant: TenantId,
    account: AccountId,
    folder: &str,
    result: &Result<SyncReport, SyncError>,
) -> Result<(), sqlx::Error> {
    let mut tx = crate::db::tenant_tx(pool, tenant).await?;
    match result {
        Ok(r) => {
            sqlx::query(
                "UPDATE helpdesk_email_accounts SET last_sync_success_at = now(),
                    last_sync_error = NULL, throttled_until = NULL, updated_at = now()
                 WHERE id = $1 AND tenant_id = $2",
            )
            .bind(account.as_uuid())
            .bind(tenant.as_uuid())
            .execute(&mut *tx)
            .await?;
            metrics::counter!("graphdesk_sync_total", "outcome" => "ok").increment(1);
            metrics::counter!("graphdesk_messages_ingested_total").increment(r.ingested);
            metrics::counter!("graphdesk_messages_duplicates_total").increment(r.duplicates);
        }
        Err(e) => {
            let text: String = e.to_string().chars().take(500).collect();
            // Shown on the Accounts page: how long Microsoft holds this mailbox back. Without a
            // Retry-After, Graph's advice is to back off; a minute is what the page shows then.
            let throttled_for = match e {
                SyncError::Graph(GraphError::Throttled { retry_after, .. }) => {
                    Some(retry_after.unwrap_or(std::time::Duration::from_secs(60)))
                }
                _ => None,
            };
            sqlx::query(
                "UPDATE helpdesk_email_accounts SET last_sync_error = $3, updated_at = now(),
                    throttled_until = CASE WHEN $4::float8 IS NULL THEN throttled_until
                                           ELSE now() + make_interval(secs => $4) END
                 WHERE id = $1 AND tenant_id = $2",
            )
            .bind(account.as_uuid())
            .bind(tenant.as_uuid())
            .bind(&text)
            .bind(throttled_for.map(|d| d.as_secs_f64()))
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE helpdesk_sync_state SET last_error = $3
                 WHERE email_account_id = $1 AND folder = $2",
            )
            .bind(account.as_uuid())
            .bind(folder)
            .bind(&text)
            .execute(&mut *tx)
            .await?;
            metrics::counter!("graphdesk_sync_total", "outcome" => "error").increment(1);
        }
    }
    tx.commit().await
}

async fn run_sync(
    services: &Services,
    tenant: TenantId,
    account: AccountId,
    folder: &str,
    sync_since: Option<DateTime<Utc>>,
) -> Result<SyncReport, SyncError> {
    let mut tx = crate::db::tenant_tx(&services.pool, tenant).await?;
    sqlx::query("UPDATE helpdesk_email_accounts SET last_sync_started_at = now() WHERE id = $1")
        .bind(account.as_uuid())
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO helpdesk_sync_state (tenant_id, email_account_id, folder)
         VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
    )
    .bind(tenant.as_uuid())
    .bind(account.as_uuid())
    .bind(folder)
    .execute(&mut *tx)
    .await?;
    let own: Vec<String> = sqlx::query_scalar(
        "SELECT email_address FROM helpdesk_email_accounts WHERE tenant_id = $1",
    )
    .bind(tenant.as_uuid())
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let own: Vec<EmailAddress> = own
        .iter()
        .filter_map(|a| EmailAddress::parse(a).ok())
        .collect();
    let client = crate::accounts::graph_client(services, tenant, account);
    let mut report = SyncReport::default();
    let ctx = IngestContext {
        tenant,
        account,
        folder: folder.to_string(),
        own,
        policy: ThreadPolicy::default(),
    };
    match delta_round(services, &client, &ctx, sync_since, &mut report).await {
        Err(SyncError::Graph(e)) if e.class() == ErrorClass::Resync => {
            warn!(%account, folder, error = %e, "delta state gone; running a full resync");
            let mut tx = crate::db::tenant_tx(&services.pool, tenant).await?;
            sqlx::query(
                "UPDATE helpdesk_sync_state SET delta_link = NULL, next_link = NULL,
                    full_syncs = full_syncs + 1
                 WHERE email_account_id = $1 AND folder = $2",
            )
            .bind(account.as_uuid())
            .bind(folder)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            report.full_resyncs += 1;
            delta_round(services, &client, &ctx, sync_since, &mut report).await?;
        }
        other => other?,
    }
    info!(%account, folder, pages = report.pages, ingested = report.ingested,
          duplicates = report.duplicates, new_tickets = report.new_tickets, "sync finished");
    Ok(report)
}

async fn delta_round(
    services: &Services,
    client: &GraphClient,
    ctx: &IngestContext,
    sync_since: Option<DateTime<Utc>>,
    report: &mut SyncReport,
) -> Result<(), SyncError> {
    let mut tx = crate::db::tenant_tx(&services.pool, ctx.tenant).await?;
    let (delta_link, next_link): (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT delta_link, next_link FROM helpdesk_sync_state
         WHERE email_account_id = $1 AND folder = $2",
    )
    .bind(ctx.account.as_uuid())
    .bind(&ctx.folder)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    let folder = folder_ref(&ctx.folder);
    let options = DeltaOptions {
        select: sync_select(),
        max_page_size: Some(services.sync.page_size),
        received_since: if delta_link.is_none() && next_link.is_none() {
            sync_since
        } else {
            None
        },
    };
    let mut link = next_link.or(delta_link);
    loop {
        let page = client
            .delta_page(&folder, link.as_deref(), &options)
            .await?;
        report.pages += 1;
        let done = matches!(page.next, DeltaNext::DeltaLink(_));
        let next = match &page.next {
            DeltaNext::NextLink(l) | DeltaNext::DeltaLink(l) => l.clone(),
        };
        let changes = complete_partials(client, page.changes, ctx, &services.pool).await?;
        let attachments = fetch_attachments(client, &changes, ctx, &services.pool).await?;
        ingest_page(
            &services.pool,
            ctx,
            changes,
            &attachments,
            &page.next,
            report,
        )
        .await?;
        if done {
            return Ok(());
        }
        link = Some(next);
    }
}

/// An update to a message we never stored (e.g. it predates the first sync's window and was
/// then changed) arrives without its content: fetch it whole. Known ones are left as they are.
async fn complete_partials(
    client: &GraphClient,
    changes: Vec<DeltaChange>,
    ctx: &IngestContext,
    pool: &PgPool,
) -> Result<Vec<DeltaChange>, SyncError> {
    let partial: Vec<String> = changes
        .iter()
        .filter_map(|c| match c {
            DeltaChange::Upsert(m) if m.received_date_time.is_none() => {
                Some(m.id.as_str().to_string())
            }
            _ => None,
        })
        .collect();
    if partial.is_empty() {
        return Ok(changes);
    }
    let mut tx = crate::db::tenant_tx(pool, ctx.tenant).await?;
    let known = known_sightings(&mut tx, ctx, &partial).await?;
    tx.commit().await?;
    let mut out = Vec::with_capacity(changes.len());
    for change in changes {
        match change {
            DeltaChange::Upsert(m)
                if m.received_date_time.is_none() && !known.contains(m.id.as_str()) =>
            {
                match client.get_message(&m.id).await {
                    Ok(full) => out.push(DeltaChange::Upsert(full)),
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
            }
            other => out.push(other),
        }
    }
    Ok(out)
}

/// Attachment metadata (name, type, size, content id, inline) for the new messages of a page
/// that have attachments: one request per such message, none for mail already stored.
async fn fetch_attachments(
    client: &GraphClient,
    changes: &[DeltaChange],
    ctx: &IngestContext,
    pool: &PgPool,
) -> Result<std::collections::HashMap<String, serde_json::Value>, SyncError> {
    let with: Vec<&Message> = changes
        .iter()
        .filter_map(|c| match c {
            // Graph's hasAttachments ignores inline attachments: a body that references a
            // `cid:` part has them too.
            DeltaChange::Upsert(m)
                if m.has_attachments == Some(true)
                    || m.body.as_ref().is_some_and(|b| b.content.contains("cid:")) =>
            {
                Some(m)
            }
            _ => None,
        })
        .collect();
    let mut out = std::collections::HashMap::new();
    if with.is_empty() {
        return Ok(out);
    }
    let ids: Vec<String> = with.iter().map(|m| m.id.as_str().to_string()).collect();
    let mut tx = crate::db::tenant_tx(pool, ctx.tenant).await?;
    let known = known_sightings(&mut tx, ctx, &ids).await?;
    tx.commit().await?;
    for m in with {
        if known.contains(m.id.as_str()) {
            continue;
        }
        match client.list_attachments(&m.id).await {
            Ok(list) => {
                let meta: Vec<serde_json::Value> = list
                    .iter()
                    .map(|a| {
                        json!({
                            "id": a.id, "name": a.name, "content_type": a.content_type,
                            "size": a.size, "is_inline": a.is_inline.unwrap_or(false),
                            "content_id": a.content_id, "kind": a.odata_type,
                        })
                    })
                    .collect();
                out.insert(m.id.as_str().to_string(), json!(meta));
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// Which of these Graph ids this mailbox has already stored.
async fn known_sightings(
    conn: &mut PgConnection,
    ctx: &IngestContext,
    ids: &[String],
) -> Result<HashSet<String>, sqlx::Error> {
    Ok(sqlx::query_scalar::<_, String>(
        "SELECT microsoft_message_id FROM helpdesk_message_sightings
         WHERE tenant_id = $1 AND email_account_id = $2 AND microsoft_message_id = ANY($3)",
    )
    .bind(ctx.tenant.as_uuid())
    .bind(ctx.account.as_uuid())
    .bind(ids)
    .fetch_all(conn)
    .await?
    .into_iter()
    .collect())
}

struct IngestContext {
    tenant: TenantId,
    account: AccountId,
    folder: String,
    own: Vec<EmailAddress>,
    policy: ThreadPolicy,
}

/// A Graph message parsed for storage.
struct Parsed {
    ms_id: String,
    input: ThreadInput,
    normalized_subject: String,
    from_name: Option<String>,
    to: serde_json::Value,
    cc: serde_json::Value,
    body_html: Option<String>,
    body_text: Option<String>,
    preview: Option<String>,
    sent_at: Option<DateTime<Utc>>,
    auto_reply: Option<String>,
    attachments: serde_json::Value,
}

fn recipients_json(list: &Option<Vec<crate::graph::Recipient>>) -> serde_json::Value {
    json!(
        list.iter()
            .flatten()
            .map(|r| json!({"name": r.email_address.name, "address": r.email_address.address}))
            .collect::<Vec<_>>()
    )
}

fn parse_message(m: Message, own: &[EmailAddress]) -> Parsed {
    let headers = MessageHeaders::from_pairs(
        m.internet_message_headers
            .iter()
            .flatten()
            .map(|h| (h.name.clone(), h.value.clone())),
    );
    let from_rec = m.from.as_ref().or(m.sender.as_ref());
    let from = from_rec
        .and_then(|r| r.email_address.address.as_deref())
        .and_then(|a| EmailAddress::parse(a).ok());
    let subject = m.subject.clone().unwrap_or_default();
    let auto_reply = classify(&headers, from.as_ref(), &subject, own).map(|r| r.code());
    let (body_html, body_text) = match &m.body {
        Some(b) if b.content_type == BodyType::Html => {
            let clean = sanitize_html(&b.content);
            let text = html_to_text(&clean);
            (Some(clean), Some(text))
        }
        Some(b) => (Some(text_to_html(&b.content)), Some(b.content.clone())),
        None => (None, None),
    };
    let preview = m
        .body_preview
        .clone()
        .or_else(|| body_text.as_deref().map(|t| preview(t, 255)));
    let internet_message_id = m.internet_message_id();
    // Some mailers list a message's own id among its references: never thread on it.
    let not_self = |id: &InternetMessageId| Some(id) != internet_message_id.as_ref();
    Parsed {
        ms_id: m.id.as_str().to_string(),
        normalized_subject: normalize_subject(&subject),
        input: ThreadInput {
            in_reply_to: headers.in_reply_to().into_iter().filter(not_self).collect(),
            references: headers.references().into_iter().filter(not_self).collect(),
            internet_message_id,
            conversation_id: m.conversation_id.clone(),
            subject,
            from,
            received_at: m.received_date_time.unwrap_or_else(Utc::now),
            is_auto_reply: auto_reply.is_some(),
        },
        from_name: from_rec.and_then(|r| r.email_address.name.clone()),
        to: recipients_json(&m.to_recipients),
        cc: recipients_json(&m.cc_recipients),
        body_html,
        body_text,
        preview,
        sent_at: m.sent_date_time,
        auto_reply,
        attachments: json!([]),
    }
}

#[derive(Default)]
struct PageWrites {
    tickets: Vec<NewTicket>,
    messages: Vec<NewMessage>,
    sightings: Vec<(String, Uuid)>,
    /// ticket → (last message time, becomes open)
    touched: std::collections::BTreeMap<i64, (DateTime<Utc>, bool)>,
    merges: Vec<(TicketId, Vec<TicketId>)>,
}

impl PageWrites {
    /// A message decided onto a ticket that a later message of the same page merged away
    /// belongs to the survivor: the merges are written before the messages, so the page's own
    /// rows would otherwise land on the merged ticket, and its status update would reopen it.
    fn follow_merges(&mut self) {
        let into: HashMap<i64, i64> = self
            .merges
            .iter()
            .flat_map(|(survivor, merged)| merged.iter().map(move |m| (m.get(), survivor.get())))
            .collect();
        if into.is_empty() {
            return;
        }
        let survivor = |mut id: i64| {
            // A merged ticket leaves the page's lookup, so it is never chosen again and the
            // chain has no cycle; the bound only guards against one.
            for _ in 0..=into.len() {
                match into.get(&id) {
                    Some(next) => id = *next,
                    None => break,
                }
            }
            id
        };
        for m in &mut self.messages {
            m.ticket = survivor(m.ticket);
        }
        for (ticket, (at, opens)) in std::mem::take(&mut self.touched) {
            let entry = self.touched.entry(survivor(ticket)).or_insert((at, false));
            entry.0 = entry.0.max(at);
            entry.1 |= opens;
        }
    }
}

struct NewTicket {
    id: i64,
    subject: String,
    normalized_subject: String,
    customer: String,
    conversation_id: Option<String>,
    ms_id: String,
    at: DateTime<Utc>,
}

struct NewMessage {
    id: Uuid,
    ticket: i64,
    parsed: Parsed,
    rule: ThreadRule,
    detail: String,
}

async fn ingest_page(
    pool: &PgPool,
    ctx: &IngestContext,
    changes: Vec<DeltaChange>,
    attachments: &std::collections::HashMap<String, serde_json::Value>,
    next: &DeltaNext,
    report: &mut SyncReport,
) -> Result<(), SyncError> {
    let mut removed: Vec<String> = Vec::new();
    let mut upserts: Vec<Message> = Vec::new();
    for c in changes {
        match c {
            DeltaChange::Upsert(m) if m.is_draft != Some(true) => upserts.push(m),
            DeltaChange::Upsert(_) => {}
            DeltaChange::Removed { id, .. } => removed.push(id.as_str().to_string()),
        }
    }
    let mut tx = crate::db::tenant_tx(pool, ctx.tenant).await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(lock_key(&format!("ingest:{}", ctx.tenant)))
        .execute(&mut *tx)
        .await?;

    // The same item twice in one page (Graph may replay items): one row per Graph id, the
    // last state winning. A page's sightings go out in one `INSERT … ON CONFLICT DO UPDATE`,
    // which fails on a row it touches twice, and a failed page would be retried forever.
    let mut page_ids: HashSet<String> = HashSet::new();
    let mut upserts: Vec<Message> = upserts
        .into_iter()
        .rev()
        .filter(|m| {
            let first = page_ids.insert(m.id.as_str().to_string());
            if !first {
                report.duplicates += 1;
            }
            first
        })
        .collect();
    upserts.reverse();

    // Dedupe: sightings of this mailbox, then messages seen in another mailbox of the tenant.
    let ms_ids: Vec<String> = upserts.iter().map(|m| m.id.as_str().to_string()).collect();
    let seen = known_sightings(&mut tx, ctx, &ms_ids).await?;
    let mut fresh: Vec<Parsed> = Vec::new();
    let mut resighted: Vec<String> = Vec::new();
    for m in upserts {
        if seen.contains(m.id.as_str()) {
            resighted.push(m.id.as_str().to_string());
            report.duplicates += 1;
        } else {
            let mut parsed = parse_message(m, &ctx.own);
            if let Some(a) = attachments.get(&parsed.ms_id) {
                parsed.attachments = a.clone();
            }
            fresh.push(parsed);
        }
    }
    let internet_ids: Vec<String> = fresh
        .iter()
        .filter_map(|p| {
            p.input
                .internet_message_id
                .as_ref()
                .map(|i| i.as_str().to_string())
        })
        .collect();
    let known_elsewhere: std::collections::HashMap<String, Uuid> =
        sqlx::query_as::<_, (String, Uuid)>(
            "SELECT internet_message_id, id FROM helpdesk_messages
             WHERE tenant_id = $1 AND internet_message_id = ANY($2)",
        )
        .bind(ctx.tenant.as_uuid())
        .bind(&internet_ids)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();

    let mut writes = PageWrites::default();
    let mut to_thread: Vec<Parsed> = Vec::new();
    let mut in_page: HashSet<String> = HashSet::new();
    for p in fresh {
        let iid = p
            .input
            .internet_message_id
            .as_ref()
            .map(|i| i.as_str().to_string());
        match iid.as_ref().and_then(|i| known_elsewhere.get(i)) {
            Some(existing) => {
                writes.sightings.push((p.ms_id.clone(), *existing));
                report.duplicates += 1;
            }
            None => {
                // The same mail twice in one page (replayed delta items): keep the first.
                if let Some(i) = &iid
                    && !in_page.insert(i.clone())
                {
                    report.duplicates += 1;
                    continue;
                }
                to_thread.push(p);
            }
        }
    }
    to_thread.sort_by_key(|p| p.input.received_at);

    if !to_thread.is_empty() {
        let inputs: Vec<ThreadInput> = to_thread.iter().map(|p| p.input.clone()).collect();
        // The subject rule's window counts from each message's own received time (so that
        // back-filled mail threads as it would have on arrival): the candidates go back from
        // the page's oldest message, not from now.
        let oldest = to_thread[0].input.received_at.min(Utc::now());
        let since = oldest - ctx.policy.subject_window - TimeDelta::days(1);
        let mut lookup = PageLookup::prefetch(&mut tx, ctx.tenant, &inputs, since).await?;
        let reserved: Vec<i64> = sqlx::query_scalar(
            "SELECT nextval(pg_get_serial_sequence('helpdesk_tickets', 'id'))
             FROM generate_series(1, $1)",
        )
        .bind(to_thread.len() as i32)
        .fetch_all(&mut *tx)
        .await?;
        let mut reserved = reserved.into_iter();
        let now = Utc::now();
        for p in to_thread {
            let decision = decide(&p.input, &lookup, now, &ctx.policy).await?;
            let customer =
                p.input.from.clone().unwrap_or_else(|| {
                    EmailAddress::parse("unknown@invalid.invalid").expect("valid")
                });
            let ticket_id = match decision.target {
                ThreadTarget::Existing(id) => id,
                ThreadTarget::New => {
                    let id = TicketId::new(reserved.next().expect("one id reserved per message"));
                    writes.tickets.push(NewTicket {
                        id: id.get(),
                        subject: if p.input.subject.is_empty() {
                            "(no subject)".into()
                        } else {
                            p.input.subject.clone()
                        },
                        normalized_subject: p.normalized_subject.clone(),
                        customer: customer.as_str().to_string(),
                        conversation_id: p.input.conversation_id.clone(),
                        ms_id: p.ms_id.clone(),
                        at: p.input.received_at,
                    });
                    report.new_tickets += 1;
                    id
                }
            };
            let mut merged: Vec<TicketId> = decision
                .adopt_orphans
                .iter()
                .chain(&decision.also_matches)
                .copied()
                .filter(|t| *t != ticket_id)
                .collect();
            merged.sort();
            merged.dedup();
            if !merged.is_empty() {
                lookup.merge(ticket_id, &merged);
                writes.merges.push((ticket_id, merged));
            }
            let opens = !p.input.is_auto_reply;
            let mut detail = decision.detail.clone();
            if let Some(prev) = decision.previous_ticket {
                detail.push_str(&format!(" (follows ticket {prev})"));
            }
            let entry = writes
                .touched
                .entry(ticket_id.get())
                .or_insert((p.input.received_at, false));
            entry.0 = entry.0.max(p.input.received_at);
            entry.1 |= opens;
            let existing = lookup.ticket(ticket_id).cloned();
            let ticket_ref = TicketRef {
                id: ticket_id,
                status: if opens {
                    TicketStatus::Open
                } else {
                    existing.as_ref().map_or(TicketStatus::Open, |t| t.status)
                },
                customer: existing.as_ref().map_or(customer, |t| t.customer.clone()),
                last_message_at: existing.as_ref().map_or(p.input.received_at, |t| {
                    t.last_message_at.max(p.input.received_at)
                }),
            };
            lookup.add_message(&p.input, ticket_ref, &p.normalized_subject);
            let id = MessageId::new().as_uuid();
            writes.sightings.push((p.ms_id.clone(), id));
            writes.messages.push(NewMessage {
                id,
                ticket: ticket_id.get(),
                parsed: p,
                rule: decision.rule,
                detail,
            });
        }
    }
    writes.follow_merges();
    report.ingested += writes.messages.len() as u64;
    write_page(&mut tx, ctx, &writes, &resighted, &removed).await?;
    report.removed += removed.len() as u64;

    let (next_link, delta_link) = match next {
        DeltaNext::NextLink(l) => (Some(l.as_str()), None),
        DeltaNext::DeltaLink(l) => (None, Some(l.as_str())),
    };
    sqlx::query(
        "UPDATE helpdesk_sync_state SET
            next_link = $3,
            delta_link = coalesce($4, delta_link),
            last_synced_at = CASE WHEN $4::text IS NOT NULL THEN now() ELSE last_synced_at END,
            last_error = NULL
         WHERE email_account_id = $1 AND folder = $2",
    )
    .bind(ctx.account.as_uuid())
    .bind(&ctx.folder)
    .bind(next_link)
    .bind(delta_link)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE helpdesk_email_accounts SET
            messages_ingested = messages_ingested + $2,
            duplicates_skipped = duplicates_skipped + $3
         WHERE id = $1",
    )
    .bind(ctx.account.as_uuid())
    .bind(writes.messages.len() as i64)
    .bind((writes.sightings.len() - writes.messages.len() + resighted.len()) as i64)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    // After the commit: a page that rolled back is fetched again and must not count twice.
    let now = Utc::now();
    for m in &writes.messages {
        metrics::histogram!("graphdesk_email_to_ticket_seconds")
            .record((now - m.parsed.input.received_at).as_seconds_f64().max(0.0));
    }
    Ok(())
}

async fn write_page(
    tx: &mut PgConnection,
    ctx: &IngestContext,
    w: &PageWrites,
    resighted: &[String],
    removed: &[String],
) -> Result<(), sqlx::Error> {
    let tenant = ctx.tenant.as_uuid();
    let account = ctx.account.as_uuid();
    if !w.tickets.is_empty() {
        sqlx::query(
            "INSERT INTO helpdesk_tickets
                (id, tenant_id, email_account_id, subject, normalized_subject, customer_email,
                 conversation_id, microsoft_message_id, created_at, updated_at, last_message_at)
             OVERRIDING SYSTEM VALUE
             SELECT id, $1, $2, subject, nsubject, customer, conv, msid, at, now(), at
             FROM unnest($3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[],
                         $8::text[], $9::timestamptz[])
                  AS u(id, subject, nsubject, customer, conv, msid, at)",
        )
        .bind(tenant)
        .bind(account)
        .bind(w.tickets.iter().map(|t| t.id).collect::<Vec<_>>())
        .bind(
            w.tickets
                .iter()
                .map(|t| t.subject.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            w.tickets
                .iter()
                .map(|t| t.normalized_subject.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            w.tickets
                .iter()
                .map(|t| t.customer.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            w.tickets
                .iter()
                .map(|t| t.conversation_id.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            w.tickets
                .iter()
                .map(|t| t.ms_id.clone())
                .collect::<Vec<_>>(),
        )
        .bind(w.tickets.iter().map(|t| t.at).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    for (survivor, merged) in &w.merges {
        let ids: Vec<i64> = merged.iter().map(TicketId::get).collect();
        sqlx::query("UPDATE helpdesk_messages SET ticket_id = $2 WHERE tenant_id = $3 AND ticket_id = ANY($1)")
            .bind(&ids)
            .bind(survivor.get())
            .bind(tenant)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE helpdesk_outbound_sends SET ticket_id = $2 WHERE tenant_id = $3 AND ticket_id = ANY($1)")
            .bind(&ids)
            .bind(survivor.get())
            .bind(tenant)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE helpdesk_tickets SET merged_into_ticket_id = $2, updated_at = now(),
                status = CASE WHEN id = ANY($1) THEN 'closed' ELSE status END
             WHERE tenant_id = $3 AND (id = ANY($1) OR merged_into_ticket_id = ANY($1))",
        )
        .bind(&ids)
        .bind(survivor.get())
        .bind(tenant)
        .execute(&mut *tx)
        .await?;
    }
    if !w.messages.is_empty() {
        let m = &w.messages;
        sqlx::query(
            "INSERT INTO helpdesk_messages
                (id, tenant_id, email_account_id, ticket_id, direction, microsoft_message_id,
                 internet_message_id, in_reply_to, \"references\", conversation_id, subject,
                 from_address, from_name, to_recipients, cc_recipients, body_html, body_text,
                 body_preview, received_at, sent_at, is_auto_reply, auto_reply_reason,
                 thread_rule, thread_detail, attachments)
             SELECT id, $1, $2, ticket, 'inbound', msid, iid, irt,
                    coalesce((SELECT array_agg(x) FROM jsonb_array_elements_text(refs) x), '{}'),
                    conv, subject, from_addr, from_name, to_r, cc_r, html, txt, prev, recv, sent,
                    auto IS NOT NULL, auto, rule, detail, att
             FROM unnest($3::uuid[], $4::bigint[], $5::text[], $6::text[], $7::text[],
                         $8::jsonb[], $9::text[], $10::text[], $11::text[], $12::text[],
                         $13::jsonb[], $14::jsonb[], $15::text[], $16::text[], $17::text[],
                         $18::timestamptz[], $19::timestamptz[], $20::text[], $21::text[],
                         $22::text[], $23::jsonb[])
                  AS u(id, ticket, msid, iid, irt, refs, conv, subject, from_addr, from_name,
                       to_r, cc_r, html, txt, prev, recv, sent, auto, rule, detail, att)
             ON CONFLICT DO NOTHING",
        )
        .bind(tenant)
        .bind(account)
        .bind(m.iter().map(|x| x.id).collect::<Vec<_>>())
        .bind(m.iter().map(|x| x.ticket).collect::<Vec<_>>())
        .bind(m.iter().map(|x| x.parsed.ms_id.clone()).collect::<Vec<_>>())
        .bind(
            m.iter()
                .map(|x| {
                    x.parsed
                        .input
                        .internet_message_id
                        .as_ref()
                        .map(|i| i.as_str().to_string())
                })
                .collect::<Vec<_>>(),
        )
        .bind(
            m.iter()
                .map(|x| {
                    x.parsed
                        .input
                        .in_reply_to
                        .first()
                        .map(|i| i.as_str().to_string())
                })
                .collect::<Vec<_>>(),
        )
        .bind(
            m.iter()
                .map(|x| {
                    json!(
                        x.parsed
                            .input
                            .references
                            .iter()
                            .map(InternetMessageId::as_str)
                            .collect::<Vec<_>>()
                    )
                })
                .collect::<Vec<_>>(),
        )
        .bind(
            m.iter()
                .map(|x| x.parsed.input.conversation_id.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            m.iter()
                .map(|x| x.parsed.input.subject.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            m.iter()
                .map(|x| {
                    x.parsed
                        .input
                        .from
                        .as_ref()
                        .map(|f| f.as_str().to_string())
                        .unwrap_or_default()
                })
                .collect::<Vec<_>>(),
        )
        .bind(
            m.iter()
                .map(|x| x.parsed.from_name.clone())
                .collect::<Vec<_>>(),
        )
        .bind(m.iter().map(|x| x.parsed.to.clone()).collect::<Vec<_>>())
        .bind(m.iter().map(|x| x.parsed.cc.clone()).collect::<Vec<_>>())
        .bind(
            m.iter()
                .map(|x| x.parsed.body_html.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            m.iter()
                .map(|x| x.parsed.body_text.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            m.iter()
                .map(|x| x.parsed.preview.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            m.iter()
                .map(|x| x.parsed.input.received_at)
                .collect::<Vec<_>>(),
        )
        .bind(m.iter().map(|x| x.parsed.sent_at).collect::<Vec<_>>())
        .bind(
            m.iter()
                .map(|x| x.parsed.auto_reply.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            m.iter()
                .map(|x| x.rule.as_str().to_string())
                .collect::<Vec<_>>(),
        )
        .bind(m.iter().map(|x| x.detail.clone()).collect::<Vec<_>>())
        .bind(
            m.iter()
                .map(|x| x.parsed.attachments.clone())
                .collect::<Vec<_>>(),
        )
        .execute(&mut *tx)
        .await?;
    }
    if !w.sightings.is_empty() {
        sqlx::query(
            "INSERT INTO helpdesk_message_sightings
                (tenant_id, email_account_id, microsoft_message_id, message_id, folder)
             SELECT $1, $2, msid, mid, $5 FROM unnest($3::text[], $4::uuid[]) AS u(msid, mid)
             ON CONFLICT (tenant_id, email_account_id, microsoft_message_id)
             DO UPDATE SET removed_at = NULL, folder = EXCLUDED.folder",
        )
        .bind(tenant)
        .bind(account)
        .bind(w.sightings.iter().map(|s| s.0.clone()).collect::<Vec<_>>())
        .bind(w.sightings.iter().map(|s| s.1).collect::<Vec<_>>())
        .bind(&ctx.folder)
        .execute(&mut *tx)
        .await?;
    }
    if !resighted.is_empty() {
        sqlx::query(
            "UPDATE helpdesk_message_sightings SET removed_at = NULL, folder = $4
             WHERE tenant_id = $1 AND email_account_id = $2 AND microsoft_message_id = ANY($3)
               AND (removed_at IS NOT NULL OR folder <> $4)",
        )
        .bind(tenant)
        .bind(account)
        .bind(resighted)
        .bind(&ctx.folder)
        .execute(&mut *tx)
        .await?;
    }
    if !removed.is_empty() {
        sqlx::query(
            "UPDATE helpdesk_message_sightings SET removed_at = now()
             WHERE tenant_id = $1 AND email_account_id = $2 AND microsoft_message_id = ANY($3)
               AND folder = $4",
        )
        .bind(tenant)
        .bind(account)
        .bind(removed)
        .bind(&ctx.folder)
        .execute(&mut *tx)
        .await?;
    }
    if !w.touched.is_empty() {
        let ids: Vec<i64> = w.touched.keys().copied().collect();
        let ats: Vec<DateTime<Utc>> = w.touched.values().map(|v| v.0).collect();
        let opens: Vec<bool> = w.touched.values().map(|v| v.1).collect();
        // New customer mail puts a pending, solved or (recently) closed ticket back to open;
        // auto-replies only move the timestamps. Archived tickets never reopen.
        sqlx::query(
            "UPDATE helpdesk_tickets t SET
                last_message_at = greatest(t.last_message_at, u.at), updated_at = now(),
                status = CASE WHEN u.opens AND t.status IN ('pending', 'solved', 'closed')
                              THEN 'open' ELSE t.status END
             FROM unnest($1::bigint[], $2::timestamptz[], $3::bool[]) AS u(id, at, opens)
             WHERE t.id = u.id AND t.tenant_id = $4",
        )
        .bind(&ids)
        .bind(&ats)
        .bind(&opens)
        .bind(tenant)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}
