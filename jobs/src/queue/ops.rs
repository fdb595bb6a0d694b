//! What ops (the dashboard, the API) can see and do with jobs. Every action is a single
//! set-based statement guarded by the current status, so two operators clicking at once
//! cannot resurrect a job twice.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{AssertSqlSafe, FromRow};
use uuid::Uuid;

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
        sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM queue_jobs WHERE id = $1"
        )))
        .bind(id.get())
        .fetch_optional(self.pool())
        .await
        .ctx("get_job")
    }

    pub async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<JobRecord>, QueueError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM queue_jobs WHERE {FILTER_SQL}
               AND ($6::bigint IS NULL OR id < $6)
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
    /// history is kept. Returns false when the job is not in a retryable state.
    pub async fn retry_job(&self, id: JobId) -> Result<bool, QueueError> {
        let done = sqlx::query(
            "UPDATE queue_jobs SET status = 'pending', run_at = now(), attempts = 0,
                    finished_at = NULL, updated_at = now()
             WHERE id = $1 AND status IN ('dead', 'cancelled')",
        )
        .bind(id.get())
        .execute(self.pool())
        .await
        .ctx("retry_job")?;
        if done.rows_affected() > 0 {
            self.notify_all().await?;
        }
        Ok(done.rows_affected() > 0)
    }

    /// Retries every dead or cancelled job that matches `filter` (the status in the filter is
    /// ignored); returns how many.
    pub async fn retry_matching(&self, filter: &JobFilter) -> Result<u64, QueueError> {
        let sql = format!(
            "UPDATE queue_jobs SET status = 'pending', run_at = now(), attempts = 0,
                    finished_at = NULL, updated_at = now()
             WHERE status IN ('dead', 'cancelled') AND {}",
            FILTER_SQL.replace(
                "($2::text IS NULL OR status = $2)",
                "($2::text IS NULL OR TRUE)"
            )
        );
        let done = sqlx::query(AssertSqlSafe(sql))
            .bind(filter.queue.as_deref())
            .bind(None::<String>)
            .bind(filter.tenant.map(|t| t.as_uuid()))
            .bind(filter.account.map(|a| a.as_uuid()))
            .bind(filter.error_contains.as_deref().map(escape_like))
            .execute(self.pool())
            .await
            .ctx("retry_matching")?;
        if done.rows_affected() > 0 {
            self.notify_all().await?;
        }
        Ok(done.rows_affected())
    }

    /// Cancels a job that has not started. A running job is not interrupted.
    pub async fn cancel_job(&self, id: JobId) -> Result<bool, QueueError> {
        let done = sqlx::query(
            "UPDATE queue_jobs SET status = 'cancelled', finished_at = now(), updated_at = now()
             WHERE id = $1 AND status = 'pending'",
        )
        .bind(id.get())
        .execute(self.pool())
        .await
        .ctx("cancel_job")?;
        Ok(done.rows_affected() > 0)
    }

    /// Deletes finished (done, dead, cancelled) jobs that finished before `before`.
    pub async fn purge_finished(&self, before: DateTime<Utc>) -> Result<u64, QueueError> {
        let done = sqlx::query(
            "DELETE FROM queue_jobs
             WHERE status IN ('done', 'dead', 'cancelled') AND finished_at < $1",
        )
        .bind(before)
        .execute(self.pool())
        .await
        .ctx("purge_finished")?;
        Ok(done.rows_affected())
    }

    pub async fn stats(&self) -> Result<Vec<JobStats>, QueueError> {
        sqlx::query_as(
            "SELECT queue, status, count(*) AS count, min(run_at) AS oldest_run_at
             FROM queue_jobs GROUP BY queue, status ORDER BY queue, status",
        )
        .fetch_all(self.pool())
        .await
        .ctx("stats")
    }

    async fn notify_all(&self) -> Result<(), QueueError> {
        sqlx::query("SELECT pg_notify($1, q) FROM (SELECT DISTINCT queue AS q FROM queue_jobs WHERE status = 'pending') s")
            .bind(super::NOTIFY_CHANNEL)
            .execute(self.pool())
            .await
            .ctx("notify")?;
        Ok(())
    }
}
