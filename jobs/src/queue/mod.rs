//! The durable job queue: one Postgres table (`queue_jobs`), read by apalis workers through
//! graphdesk's own backend ([`runtime`]).
//!
//! Guarantees (see ARCHITECTURE.md): at-least-once execution; every state change after the
//! claim is a compare-and-set on (id, attempts, status = running), so a stale execution can
//! never overwrite a newer one; retries move `run_at` (exponential backoff with jitter);
//! deferral does not spend an attempt; a claimed job carries a lease that the owner renews and
//! that anyone may reap once it expires; per-tenant limits are enforced inside the claim.

mod dashboard_queries;
mod error;
mod ops;
mod retry;
pub mod runtime;
mod tenant_limits;

use chrono::{DateTime, Utc};
use serde::{Serialize, de::DeserializeOwned};
use sqlx::{PgConnection, PgPool};

pub use dashboard_queries::{
    AccountHealth, AccountTotals, AuditEntry, OldestPending, QueueCount, ThroughputBucket,
};
pub use error::{JobError, QueueError};
pub use ops::{JobFilter, JobRecord, JobStats, JobStatus, RetryOutcome};
pub use retry::RetryPolicy;
pub use tenant_limits::{
    Actor, ConcurrencyLimit, InvalidConcurrencyLimit, TENANT_LIST_MAX, TENANT_LOAD,
    TenantConcurrency,
};

use crate::ids::{AccountId, JobId, TenantId};
use error::DbContext;

/// The Postgres notification channel that wakes idle workers; the payload is the queue name.
pub const NOTIFY_CHANNEL: &str = "graphdesk_jobs";

/// A typed job. Each kind lives on its own explicitly named queue: a Rust rename must never
/// orphan jobs already stored under the old name.
pub trait JobKind: Serialize + DeserializeOwned + Send + Sync + Unpin + 'static {
    const QUEUE: &'static str;
    const MAX_ATTEMPTS: i32;
    fn retry_policy() -> RetryPolicy {
        RetryPolicy::default()
    }
    fn tenant(&self) -> Option<TenantId>;
    fn account(&self) -> Option<AccountId> {
        None
    }
    /// Jobs with the same key coalesce: at most one is pending at a time.
    fn coalesce_key(&self) -> Option<String> {
        None
    }
}

#[derive(Debug, Clone, Default)]
pub struct EnqueueOptions {
    pub idempotency_key: Option<String>,
    pub run_at: Option<DateTime<Utc>>,
    pub priority: i16,
    pub max_attempts: Option<i32>,
}

impl EnqueueOptions {
    #[must_use]
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
    #[must_use]
    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(at);
        self
    }
    #[must_use]
    pub fn max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = Some(n);
        self
    }
}

/// The result of an enqueue: the job's id, and whether this call created it or found an
/// existing job with the same idempotency or coalesce key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    pub id: JobId,
    pub created: bool,
}

/// Producer and operations handle; cheap to clone.
#[derive(Debug, Clone)]
pub struct Queue {
    pool: PgPool,
}

impl Queue {
    #[must_use]
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn enqueue<J: JobKind>(
        &self,
        job: &J,
        opts: EnqueueOptions,
    ) -> Result<Enqueued, QueueError> {
        let mut conn = self.pool.acquire().await.ctx("acquire")?;
        let enqueued = insert_job(&mut conn, job, opts, false).await?;
        if enqueued.created {
            notify_after_commit::<J>(&mut conn).await?;
        }
        Ok(enqueued)
    }

    /// Enqueues many jobs of one kind in one statement (no idempotency keys); returns their ids
    /// in input order.
    pub async fn enqueue_batch<J: JobKind>(&self, jobs: &[J]) -> Result<Vec<JobId>, QueueError> {
        let mut conn = self.pool.acquire().await.ctx("acquire")?;
        let ids = insert_batch(&mut conn, jobs, false).await?;
        if !ids.is_empty() {
            notify_after_commit::<J>(&mut conn).await?;
        }
        Ok(ids)
    }
}

/// Wakes the workers for an insert that has already committed on its own. Postgres commits
/// notifying transactions one at a time (NOTIFY takes a database-wide lock held through the
/// commit's WAL flush), so outside a caller's transaction the notification goes in a
/// statement of its own, which writes nothing and so waits for no flush.
async fn notify_after_commit<J: JobKind>(conn: &mut PgConnection) -> Result<(), QueueError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(NOTIFY_CHANNEL)
        .bind(J::QUEUE)
        .execute(&mut *conn)
        .await
        .ctx("notify")?;
    Ok(())
}

/// [`Queue::enqueue_batch`] inside the caller's transaction: the jobs become visible, and the
/// workers are woken, only when the caller commits.
pub async fn enqueue_batch_in<J: JobKind>(
    conn: &mut PgConnection,
    jobs: &[J],
) -> Result<Vec<JobId>, QueueError> {
    insert_batch(conn, jobs, true).await
}

async fn insert_batch<J: JobKind>(
    conn: &mut PgConnection,
    jobs: &[J],
    notify: bool,
) -> Result<Vec<JobId>, QueueError> {
    let mut payloads = Vec::with_capacity(jobs.len());
    let mut tenants = Vec::with_capacity(jobs.len());
    let mut accounts = Vec::with_capacity(jobs.len());
    for job in jobs {
        payloads.push(
            serde_json::to_value(job).map_err(|source| QueueError::Encode {
                queue: J::QUEUE,
                source,
            })?,
        );
        tenants.push(job.tenant().map(|t| t.as_uuid()));
        accounts.push(job.account().map(|a| a.as_uuid()));
    }
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    // Inside a caller's transaction the notification rides in the insert (Postgres sends it
    // at commit and folds duplicates): one round trip fewer.
    let ids: Vec<i64> = sqlx::query_scalar(
        "WITH ins AS (
            INSERT INTO queue_jobs (queue, tenant_id, email_account_id, payload, max_attempts)
            SELECT $1, t, a, p, $5
            FROM unnest($2::uuid[], $3::uuid[], $4::jsonb[]) WITH ORDINALITY AS u(t, a, p, ord)
            ORDER BY ord
            RETURNING id
        ), woken AS (SELECT pg_notify($6, $1) AS n WHERE $7)
        SELECT id FROM ins LEFT JOIN woken ON true ORDER BY id",
    )
    .bind(J::QUEUE)
    .bind(&tenants)
    .bind(&accounts)
    .bind(&payloads)
    .bind(J::MAX_ATTEMPTS)
    .bind(NOTIFY_CHANNEL)
    .bind(notify)
    .fetch_all(&mut *conn)
    .await
    .ctx("enqueue_batch")?;
    Ok(ids.into_iter().map(JobId::new).collect())
}

/// Enqueues inside the caller's transaction (transactional outbox): the job exists exactly when
/// the business write that asked for it commits. A duplicate idempotency key, or a pending job
/// with the same coalesce key, returns the existing job instead of an error.
pub async fn enqueue_in<J: JobKind>(
    conn: &mut PgConnection,
    job: &J,
    opts: EnqueueOptions,
) -> Result<Enqueued, QueueError> {
    insert_job(conn, job, opts, true).await
}

async fn insert_job<J: JobKind>(
    conn: &mut PgConnection,
    job: &J,
    opts: EnqueueOptions,
    notify: bool,
) -> Result<Enqueued, QueueError> {
    let payload = serde_json::to_value(job).map_err(|source| QueueError::Encode {
        queue: J::QUEUE,
        source,
    })?;
    let coalesce_key = job.coalesce_key();
    // A conflicting job can leave `pending` between our insert and our look-up (a worker
    // claimed it); then a new insert succeeds, so a few rounds always settle.
    for _ in 0..5 {
        // Inside a caller's transaction the notification rides in the insert: one round trip,
        // and none at all for a duplicate.
        let inserted: Option<i64> = sqlx::query_scalar(
            "WITH ins AS (
                INSERT INTO queue_jobs
                    (queue, tenant_id, email_account_id, payload, priority, max_attempts, run_at,
                     idempotency_key, coalesce_key)
                VALUES ($1, $2, $3, $4, $5, $6, coalesce($7, now()), $8, $9)
                ON CONFLICT DO NOTHING
                RETURNING id
             ), woken AS (SELECT pg_notify($10, $1) AS n FROM ins WHERE $11)
             SELECT id FROM ins LEFT JOIN woken ON true",
        )
        .bind(J::QUEUE)
        .bind(job.tenant().map(|t| t.as_uuid()))
        .bind(job.account().map(|a| a.as_uuid()))
        .bind(&payload)
        .bind(opts.priority)
        .bind(opts.max_attempts.unwrap_or(J::MAX_ATTEMPTS))
        .bind(opts.run_at)
        .bind(opts.idempotency_key.as_deref())
        .bind(coalesce_key.as_deref())
        .bind(NOTIFY_CHANNEL)
        .bind(notify)
        .fetch_optional(&mut *conn)
        .await
        .ctx("enqueue")?;
        if let Some(id) = inserted {
            return Ok(Enqueued {
                id: JobId::new(id),
                created: true,
            });
        }
        let existing: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM queue_jobs
             WHERE queue = $1
               AND (($2::text IS NOT NULL AND idempotency_key = $2)
                    OR ($3::text IS NOT NULL AND coalesce_key = $3 AND status = 'pending'))
             ORDER BY id LIMIT 1",
        )
        .bind(J::QUEUE)
        .bind(opts.idempotency_key.as_deref())
        .bind(coalesce_key.as_deref())
        .fetch_optional(&mut *conn)
        .await
        .ctx("enqueue_lookup")?;
        if let Some(id) = existing {
            return Ok(Enqueued {
                id: JobId::new(id),
                created: false,
            });
        }
    }
    Err(QueueError::Contended { queue: J::QUEUE })
}
