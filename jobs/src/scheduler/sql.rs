//! The scheduler's statements. Each concern is one set-based statement over every account,
//! however many there are; nothing here loops over accounts in Rust.
//!
//! Payloads are built in SQL, so their shape must stay the serde form of the job structs in
//! [`crate::kinds`] (field names `tenant`, `account`, `folder`, `force`), and the coalesce keys
//! must stay those of their `JobKind` impls; the integration suite decodes what these
//! statements write back into the structs to hold both in place.

use chrono::{DateTime, TimeDelta, Utc};
use sqlx::{PgConnection, PgPool};

use crate::kinds::{RefreshToken, SyncMailbox, ValidateAccount};
use crate::queue::{JobKind, NOTIFY_CHANNEL};

/// The leader lease after a successful take or renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct Lease {
    /// The database clock when this holder took or renewed it.
    pub renewed_at: DateTime<Utc>,
    pub acquired_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// Takes the lease if it is free or expired, or renews it if we hold it; one UPDATE, so two
/// replicas racing for an expired lease serialise on the row and the second finds it taken.
/// `now()` is the transaction's start, never later than the real time: a takeover is only
/// ever judged against a clock that is behind, so it cannot come early.
pub async fn take_lease(
    conn: &mut PgConnection,
    name: &str,
    holder: &str,
    lease: std::time::Duration,
) -> Result<Option<Lease>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE scheduler_leases SET
            acquired_at = CASE WHEN holder = $2 AND expires_at >= now() THEN acquired_at
                               ELSE now() END,
            holder = $2,
            renewed_at = now(),
            expires_at = now() + make_interval(secs => $3)
         WHERE name = $1 AND (holder = $2 OR expires_at < now())
         RETURNING renewed_at, acquired_at, expires_at",
    )
    .bind(name)
    .bind(holder)
    .bind(lease.as_secs_f64())
    .fetch_optional(conn)
    .await
}

/// Gives the lease up (on shutdown) so a standby takes over at its next tick, not after the
/// lease runs out.
pub async fn release_lease(pool: &PgPool, name: &str, holder: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE scheduler_leases SET expires_at = '-infinity'
         WHERE name = $1 AND holder = $2",
    )
    .bind(name)
    .bind(holder)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Runs `insert` (an INSERT … RETURNING 1 into queue_jobs, as CTE `ins`; $1 queue, $2 max
/// attempts, $4 a number of seconds), wakes the queue's workers when it inserted anything, and
/// returns how many jobs it created.
async fn insert_and_notify(
    conn: &mut PgConnection,
    insert: &'static str,
    queue: &'static str,
    max_attempts: i32,
    secs: f64,
) -> Result<u64, sqlx::Error> {
    let sql = format!(
        "WITH {insert},
         woke AS (SELECT pg_notify($3, $1) FROM (SELECT 1 FROM ins LIMIT 1) one)
         SELECT (SELECT count(*) FROM ins) + 0 * (SELECT count(*) FROM woke)"
    );
    let created: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(queue)
        .bind(max_attempts)
        .bind(NOTIFY_CHANNEL)
        .bind(secs)
        .fetch_one(conn)
        .await?;
    Ok(created as u64)
}

/// One SyncMailbox per folder of every active account whose interval has passed since its
/// last sync started. The partial unique index on pending coalesce keys turns a still-pending
/// sync into a no-op (`ON CONFLICT DO NOTHING`).
pub async fn enqueue_due_syncs(conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
    insert_and_notify(
        conn,
        "ins AS (
            INSERT INTO queue_jobs
                (queue, tenant_id, email_account_id, payload, max_attempts, coalesce_key)
            SELECT DISTINCT $1, a.tenant_id, a.id,
                   jsonb_build_object('tenant', a.tenant_id, 'account', a.id, 'folder', f.folder),
                   $2, 'sync:' || a.id::text || ':' || f.folder
            FROM helpdesk_email_accounts a
            CROSS JOIN LATERAL unnest(a.sync_folders) AS f(folder)
            WHERE a.status = 'active'
              AND now() - coalesce(a.last_sync_started_at, 'epoch'::timestamptz)
                  >= make_interval(secs => a.sync_interval_seconds)
              -- Skip what is already pending (found through the coalesce index) instead of
              -- building the row and letting the conflict discard it: idle ticks stay cheap.
              AND NOT EXISTS (SELECT 1 FROM queue_jobs q
                              WHERE q.queue = $1 AND q.status = 'pending'
                                AND q.coalesce_key = 'sync:' || a.id::text || ':' || f.folder)
            ON CONFLICT DO NOTHING
            RETURNING 1)",
        SyncMailbox::QUEUE,
        SyncMailbox::MAX_ATTEMPTS,
        0.0,
    )
    .await
}

/// A non-forced RefreshToken for every active account whose access token expires within
/// `margin` (the handler re-checks under the row lock, so an early one is harmless).
pub async fn enqueue_due_refreshes(
    conn: &mut PgConnection,
    margin: TimeDelta,
) -> Result<u64, sqlx::Error> {
    insert_and_notify(
        conn,
        "ins AS (
            INSERT INTO queue_jobs
                (queue, tenant_id, email_account_id, payload, max_attempts, coalesce_key)
            SELECT $1, a.tenant_id, a.id,
                   jsonb_build_object('tenant', a.tenant_id, 'account', a.id, 'force', false),
                   $2, 'refresh:' || a.id::text
            FROM helpdesk_email_accounts a
            WHERE a.status = 'active' AND a.refresh_token_enc IS NOT NULL
              AND a.token_expires_at < now() + make_interval(secs => $4)
              AND NOT EXISTS (SELECT 1 FROM queue_jobs q
                              WHERE q.queue = $1 AND q.status = 'pending'
                                AND q.coalesce_key = 'refresh:' || a.id::text)
            ON CONFLICT DO NOTHING
            RETURNING 1)",
        RefreshToken::QUEUE,
        RefreshToken::MAX_ATTEMPTS,
        margin.num_seconds() as f64,
    )
    .await
}

/// A ValidateAccount for accounts in `error` not validated for `every`, at most one per
/// `every` per account: a validation that itself fails leaves no trace on the account row, and
/// without the queue check every tick would enqueue another.
pub async fn enqueue_due_validations(
    conn: &mut PgConnection,
    every: TimeDelta,
) -> Result<u64, sqlx::Error> {
    insert_and_notify(
        conn,
        "ins AS (
            INSERT INTO queue_jobs
                (queue, tenant_id, email_account_id, payload, max_attempts, coalesce_key)
            SELECT $1, a.tenant_id, a.id,
                   jsonb_build_object('tenant', a.tenant_id, 'account', a.id),
                   $2, 'validate:' || a.id::text
            FROM helpdesk_email_accounts a
            WHERE a.status = 'error'
              AND (a.validated_at IS NULL
                   OR a.validated_at < now() - make_interval(secs => $4))
              -- The queue is spelled out, not $1, so that every plan (a generic one too)
              -- can use the partial index of this queue's jobs, queue_jobs_validation_idx.
              AND NOT EXISTS (
                  SELECT 1 FROM queue_jobs q
                  WHERE q.queue = 'graphdesk.validate_account'
                    AND q.email_account_id = a.id AND q.tenant_id = a.tenant_id
                    AND q.created_at > now() - make_interval(secs => $4))
            ON CONFLICT DO NOTHING
            RETURNING 1)",
        ValidateAccount::QUEUE,
        ValidateAccount::MAX_ATTEMPTS,
        every.num_seconds() as f64,
    )
    .await
}

/// Deletes audit rows older than their tenant's `audit_retention_days`; rows without a
/// tenant (system actions) are kept `default_days`. Both halves walk the
/// (tenant_id, created_at) index, so a tick with nothing due reads almost nothing.
pub async fn purge_audit(pool: &PgPool, default_days: i32) -> Result<u64, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(
        "WITH tenant_rows AS (
             DELETE FROM audit_log a USING tenants t
             WHERE a.tenant_id = t.id
               AND a.created_at < now() - make_interval(days => t.audit_retention_days)
             RETURNING 1),
         system_rows AS (
             DELETE FROM audit_log a
             WHERE a.tenant_id IS NULL
               AND a.created_at < now() - make_interval(days => $1)
             RETURNING 1)
         SELECT (SELECT count(*) FROM tenant_rows) + (SELECT count(*) FROM system_rows)",
    )
    .bind(default_days)
    .fetch_one(pool)
    .await?;
    Ok(n as u64)
}
