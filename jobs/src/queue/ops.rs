//! What ops (the dashboard, the API) can see and do with jobs. Every action is a single
//! set-based statement guarded by the current status, so two operators clicking at once
//! cannot resurrect a job twice, and it commits together with its audit row.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{AssertSqlSafe, FromRow, PgConnection};
use uuid::Uuid;

use super::dashboard_queries::{AuditEntry, insert_audit};
use super::error::DbContext;
use super::{Queue, QueueError};
use crate::ids::{AccountId, JobId, TenantId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Pending,
    Running,
    Done,
    Dead,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        Self::Pending,
        Self::Running,
        Self::Done,
        Self::Dead,
        Self::Cancelled,
    ];
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Done => "done",
            Self::Dead => "dead",
            Self::Cancelled => "cancelled",
        }
    }
    #[must_use]
    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }
}

#[derive(Debug, Clone, Serialize, FromRow)]
pub struct JobRecord {
    pub id: i64,
    pub queue: String,
    pub tenant_id: Option<Uuid>,
    pub email_account_id: Option<Uuid>,
    pub payload: serde_json::Value,
    pub status: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub locked_by: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub idempotency_key: Option<String>,
    pub last_error: Option<String>,
    pub errors: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// What an ops retry of one job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOutcome {
    Retried,
    /// The job is not dead or cancelled.
    NotRetryable,
    /// A pending job with the same coalesce key already covers this work.
    Covered(JobId),
}

/// A filter over jobs; empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub queue: Option<String>,
    pub status: Option<JobStatus>,
    pub tenant: Option<TenantId>,
    pub account: Option<AccountId>,
    pub error_contains: Option<String>,
    /// Keyset pagination: only jobs with a smaller id.
    pub before_id: Option<i64>,
    pub limit: i64,
}

#[derive(Debug, Clone, Serialize, FromRow)]
pub struct JobStats {
    pub queue: String,
    pub status: String,
    pub count: i64,
    pub oldest_run_at: Option<DateTime<Utc>>,
}

const FILTER_SQL: &str = "($1::text IS NULL OR queue = $1)
      AND ($2::text IS NULL OR status = $2)
      AND ($3::uuid IS NULL OR tenant_id = $3)
      AND ($4::uuid IS NULL OR email_account_id = $4)
      AND ($5::text IS NULL OR last_error ILIKE '%' || $5 || '%')";

const COLUMNS: &str = "id, queue, tenant_id, email_account_id, payload, status, attempts,
    max_attempts, run_at, locked_by, lease_expires_at, idempotency_key, last_error, errors,
    created_at, updated_at, finished_at";

fn escape_like(raw: &str) -> String {
    raw.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

impl Queue {
    pub async fn get_job(&self, id: JobId) -> Result<Option<JobRecord>, QueueError> {
        // A packed job's row is found by its id range (GiST) before anything is unpacked.
        sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM queue_jobs WHERE id = $1
             UNION ALL
             SELECT {COLUMNS} FROM (
                 SELECT j.* FROM queue_jobs_done d CROSS JOIN LATERAL unnest(d.jobs) AS j
                 WHERE d.job_ids @> $1::bigint) AS p
             WHERE id = $1
             LIMIT 1"
        )))
        .bind(id.get())
        .fetch_optional(self.pool())
        .await
        .ctx("get_job")
    }

    pub async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<JobRecord>, QueueError> {
        // Packed jobs are all done: their side is skipped whole when the filter asks for
        // another status, and otherwise walked newest first only as far as the page needs.
        let sql = format!(
            "SELECT {COLUMNS} FROM queue_jobs WHERE {FILTER_SQL}
               AND ($6::bigint IS NULL OR id < $6)
             UNION ALL
             SELECT {COLUMNS} FROM queue_jobs_done_page($1, $3, $4, $5, $6, $7::int)
             WHERE $2::text IS NULL OR $2::text = 'done'
             ORDER BY id DESC LIMIT $7"
        );
        sqlx::query_as(AssertSqlSafe(sql))
            .bind(filter.queue.as_deref())
            .bind(filter.status.map(|s| s.as_str()))
            .bind(filter.tenant.map(|t| t.as_uuid()))
            .bind(filter.account.map(|a| a.as_uuid()))
            .bind(filter.error_contains.as_deref().map(escape_like))
            .bind(filter.before_id)
            .bind(filter.limit.clamp(1, 500))
            .fetch_all(self.pool())
            .await
            .ctx("list_jobs")
    }

    /// Puts a dead or cancelled job back to pending with a fresh attempt budget; its error
    /// history is kept. The change, its audit row and the workers' wake-up commit together:
    /// when the audit row cannot be written the job stays as it was. Nothing changes (and
    /// nothing is audited) when the job is not dead or cancelled, or when a pending job with
    /// its coalesce key already covers the same work: at most one is pending per key, and the
    /// unique index would refuse a second.
    pub async fn retry_job(
        &self,
        id: JobId,
        audit: &AuditEntry<'_>,
    ) -> Result<RetryOutcome, QueueError> {
        let mut tx = self.pool().begin().await.ctx("begin retry_job")?;
        let (found, covered_by, queue): (bool, Option<i64>, Option<String>) = sqlx::query_as(
            "WITH target AS (
                SELECT id, queue, coalesce_key FROM queue_jobs
                WHERE id = $1 AND status IN ('dead', 'cancelled') FOR UPDATE
             ), cover AS (
                SELECT p.id FROM queue_jobs p JOIN target t
                  ON p.queue = t.queue AND p.coalesce_key = t.coalesce_key
                WHERE p.status = 'pending' LIMIT 1
             ), moved AS (
                UPDATE queue_jobs j SET status = 'pending', run_at = now(), attempts = 0,
                       finished_at = NULL, updated_at = now()
                FROM target t
                WHERE j.id = t.id AND NOT EXISTS (SELECT 1 FROM cover)
                RETURNING j.queue
             )
             SELECT EXISTS (SELECT 1 FROM target), (SELECT id FROM cover),
                    (SELECT queue FROM moved)",
        )
        .bind(id.get())
        .fetch_one(&mut *tx)
        .await
        .ctx("retry_job")?;
        let Some(queue) = queue else {
            return Ok(match covered_by {
                Some(pending) if found => RetryOutcome::Covered(JobId::new(pending)),
                _ => RetryOutcome::NotRetryable,
            });
        };
        insert_audit(&mut tx, audit).await.ctx("audit retry_job")?;
        notify_queues(&mut tx, &[queue]).await?;
        tx.commit().await.ctx("commit retry_job")?;
        Ok(RetryOutcome::Retried)
    }

    /// Retries every dead or cancelled job that matches `filter` (the status in the filter is
    /// ignored) and writes the audit row `audit` builds from how many, in one transaction;
    /// returns how many.
    pub async fn retry_matching<'a>(
        &self,
        filter: &JobFilter,
        audit: impl FnOnce(u64) -> AuditEntry<'a>,
    ) -> Result<u64, QueueError> {
        // The count and the queues to wake come back in one row rather than one row per job.
        // Of several matching jobs with one coalesce key only the newest goes back, and none
        // whose key already has a pending job: one pending per key, which the unique index
        // enforces (a bulk retry of superseded jobs used to fail whole on it).
        let sql = format!(
            "WITH candidates AS (
                SELECT id, queue, coalesce_key,
                       row_number() OVER (PARTITION BY queue, coalesce_key ORDER BY id DESC) AS newest
                FROM queue_jobs
                WHERE status IN ('dead', 'cancelled') AND {}
             ), moved AS (
                UPDATE queue_jobs j SET status = 'pending', run_at = now(), attempts = 0,
                       finished_at = NULL, updated_at = now()
                FROM candidates c
                WHERE j.id = c.id
                  AND (c.coalesce_key IS NULL
                       OR (c.newest = 1 AND NOT EXISTS (
                               SELECT 1 FROM queue_jobs p
                               WHERE p.queue = c.queue AND p.coalesce_key = c.coalesce_key
                                 AND p.status = 'pending')))
                RETURNING j.queue)
             SELECT count(*), coalesce(array_agg(DISTINCT queue), '{{}}') FROM moved",
            FILTER_SQL.replace(
                "($2::text IS NULL OR status = $2)",
                "($2::text IS NULL OR TRUE)"
            )
        );
        let mut tx = self.pool().begin().await.ctx("begin retry_matching")?;
        let (n, queues): (i64, Vec<String>) = sqlx::query_as(AssertSqlSafe(sql))
            .bind(filter.queue.as_deref())
            .bind(None::<String>)
            .bind(filter.tenant.map(|t| t.as_uuid()))
            .bind(filter.account.map(|a| a.as_uuid()))
            .bind(filter.error_contains.as_deref().map(escape_like))
            .fetch_one(&mut *tx)
            .await
            .ctx("retry_matching")?;
        let n = n.unsigned_abs();
        // A bulk retry that matched nothing is still an action an operator took: audited.
        insert_audit(&mut tx, &audit(n))
            .await
            .ctx("audit retry_matching")?;
        notify_queues(&mut tx, &queues).await?;
        tx.commit().await.ctx("commit retry_matching")?;
        Ok(n)
    }

    /// Cancels a job that has not started, with its audit row in the same transaction. A
    /// running job is not interrupted: false, nothing audited.
    pub async fn cancel_job(&self, id: JobId, audit: &AuditEntry<'_>) -> Result<bool, QueueError> {
        let mut tx = self.pool().begin().await.ctx("begin cancel_job")?;
        let done = sqlx::query(
            "UPDATE queue_jobs SET status = 'cancelled', finished_at = now(), updated_at = now()
             WHERE id = $1 AND status = 'pending'",
        )
        .bind(id.get())
        .execute(&mut *tx)
        .await
        .ctx("cancel_job")?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        insert_audit(&mut tx, audit).await.ctx("audit cancel_job")?;
        tx.commit().await.ctx("commit cancel_job")?;
        Ok(true)
    }

    /// Deletes finished (done, dead, cancelled) jobs that finished before `before`: the
    /// scheduler's retention clean-up, which is not an operator's action and is not audited.
    pub async fn purge_finished(&self, before: DateTime<Utc>) -> Result<u64, QueueError> {
        let mut conn = self.pool().acquire().await.ctx("purge_finished")?;
        purge_finished_on(&mut conn, before).await
    }

    /// An operator's purge: [`Queue::purge_finished`] and the audit row `audit` builds from how
    /// many, in one transaction.
    pub async fn purge_finished_audited<'a>(
        &self,
        before: DateTime<Utc>,
        audit: impl FnOnce(u64) -> AuditEntry<'a>,
    ) -> Result<u64, QueueError> {
        let mut tx = self.pool().begin().await.ctx("begin purge_finished")?;
        let n = purge_finished_on(&mut tx, before).await?;
        insert_audit(&mut tx, &audit(n))
            .await
            .ctx("audit purge_finished")?;
        tx.commit().await.ctx("commit purge_finished")?;
        Ok(n)
    }

    pub async fn stats(&self) -> Result<Vec<JobStats>, QueueError> {
        // A packed row's `job_count` is its count; its jobs' run_at are not read (for done jobs
        // the oldest run_at says nothing an operator needs).
        sqlx::query_as(
            "SELECT queue, status, sum(n)::bigint AS count, min(oldest) AS oldest_run_at FROM (
                 SELECT queue, status, count(*) AS n, min(run_at) AS oldest
                 FROM queue_jobs GROUP BY queue, status
                 UNION ALL
                 SELECT queue, 'done', sum(job_count), NULL::timestamptz
                 FROM queue_jobs_done GROUP BY queue) AS s
             GROUP BY queue, status ORDER BY queue, status",
        )
        .fetch_all(self.pool())
        .await
        .ctx("stats")
    }
}

async fn purge_finished_on(
    conn: &mut PgConnection,
    before: DateTime<Utc>,
) -> Result<u64, QueueError> {
    let purged: i64 = sqlx::query_scalar(
        "WITH live AS (
             DELETE FROM queue_jobs
             WHERE status IN ('done', 'dead', 'cancelled') AND finished_at < $1
             RETURNING 1
         ), packed AS (
             DELETE FROM queue_jobs_done WHERE finished_at < $1 RETURNING job_count AS n
         )
         SELECT (SELECT count(*) FROM live) + (SELECT coalesce(sum(n), 0) FROM packed)::bigint",
    )
    .bind(before)
    .fetch_one(conn)
    .await
    .ctx("purge_finished")?;
    Ok(purged.max(0) as u64)
}

/// Wakes the workers of `queues` when the caller's transaction commits (a NOTIFY is delivered
/// at commit, and not at all on rollback), so they see the retried jobs at once rather than at
/// their next poll.
async fn notify_queues(conn: &mut PgConnection, queues: &[String]) -> Result<(), QueueError> {
    if queues.is_empty() {
        return Ok(());
    }
    sqlx::query("SELECT pg_notify($1, q) FROM unnest($2::text[]) AS q")
        .bind(super::NOTIFY_CHANNEL)
        .bind(queues)
        .execute(conn)
        .await
        .ctx("notify")?;
    Ok(())
}
