//! The read model behind the ops dashboard, the ops API and /metrics: aggregate views that
//! operators look at, optionally narrowed to one tenant (admins only ever see their own).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgConnection};
use uuid::Uuid;

use super::error::DbContext;
use super::{Queue, QueueError};
use crate::ids::TenantId;

/// How many jobs of one queue are in one status.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct QueueCount {
    pub queue: String,
    pub status: String,
    pub count: i64,
}

/// The age of the oldest job of a queue that is due and still waiting for a worker.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct OldestPending {
    pub queue: String,
    pub oldest_run_at: DateTime<Utc>,
    pub age_seconds: f64,
}

/// Jobs finished and attempts failed in one time bucket.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct ThroughputBucket {
    pub bucket_start: DateTime<Utc>,
    pub done: i64,
    pub failed: i64,
}

/// One mailbox's health as ops need it.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct AccountHealth {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub email_address: String,
    pub status: String,
    pub status_reason: Option<String>,
    pub last_sync_success_at: Option<DateTime<Utc>>,
    /// Seconds since the last successful sync; None when it never succeeded.
    pub sync_lag_seconds: Option<f64>,
    pub last_sync_error: Option<String>,
    pub token_expires_at: Option<DateTime<Utc>>,
    pub throttled_until: Option<DateTime<Utc>>,
    pub messages_ingested: i64,
    pub duplicates_skipped: i64,
}

/// Account counts and message totals over every mailbox (for /metrics).
#[derive(Debug, Clone, Default, Serialize)]
pub struct AccountTotals {
    pub by_status: Vec<(String, i64)>,
    pub messages_ingested: i64,
    pub duplicates_skipped: i64,
}

impl Queue {
    /// Jobs per queue and status.
    pub async fn queue_counts(
        &self,
        tenant: Option<TenantId>,
    ) -> Result<Vec<QueueCount>, QueueError> {
        sqlx::query_as(
            // Packed jobs (queue_jobs_done) are only unpacked to narrow them to one tenant:
            // across all tenants a packed row's `job_count` is its count.
            "SELECT queue, status, sum(n)::bigint AS count FROM (
                 SELECT queue, status, count(*) AS n FROM queue_jobs
                 WHERE ($1::uuid IS NULL OR tenant_id = $1)
                 GROUP BY queue, status
                 UNION ALL
                 SELECT d.queue, 'done', sum(d.job_count) FROM queue_jobs_done d
                 WHERE $1::uuid IS NULL
                 GROUP BY d.queue
                 UNION ALL
                 SELECT j.queue, j.status, count(*)
                 FROM queue_jobs_done d CROSS JOIN LATERAL unnest(d.jobs) AS j
                 WHERE $1::uuid = ANY (d.tenant_ids) AND j.tenant_id = $1
                 GROUP BY j.queue, j.status) AS c
             GROUP BY queue, status ORDER BY queue, status",
        )
        .bind(tenant.map(|t| t.as_uuid()))
        .fetch_all(self.pool())
        .await
        .ctx("queue_counts")
    }

    /// Per queue, the oldest pending job that is already due. Jobs scheduled for a later retry
    /// are not waiting on capacity, so they would only make the age look alarming.
    pub async fn oldest_pending(
        &self,
        tenant: Option<TenantId>,
    ) -> Result<Vec<OldestPending>, QueueError> {
        sqlx::query_as(
            "SELECT queue, min(run_at) AS oldest_run_at,
                    greatest(extract(epoch FROM now() - min(run_at)), 0)::float8 AS age_seconds
             FROM queue_jobs
             WHERE status = 'pending' AND run_at <= now()
               AND ($1::uuid IS NULL OR tenant_id = $1)
             GROUP BY queue ORDER BY queue",
        )
        .bind(tenant.map(|t| t.as_uuid()))
        .fetch_all(self.pool())
        .await
        .ctx("oldest_pending")
    }

    /// Jobs done and attempts failed per bucket since `since`, oldest bucket first, every
    /// bucket present (zeros included) so a chart has no gaps. Failures are read from each
    /// job's error history, so a job that failed twice and then succeeded counts twice;
    /// deferrals are not failures.
    pub async fn throughput(
        &self,
        tenant: Option<TenantId>,
        since: DateTime<Utc>,
        bucket_secs: i64,
    ) -> Result<Vec<ThroughputBucket>, QueueError> {
        sqlx::query_as(
            "WITH buckets AS (
                 SELECT generate_series(
                     to_timestamp(floor(extract(epoch FROM $2::timestamptz) / $3) * $3),
                     now(), make_interval(secs => $3)) AS bucket_start
             ),
             -- A packed job finished (and was last updated) when its row was written, so the
             -- rows finished since $2 hold every packed job that counts here.
             recent AS (
                 SELECT status, finished_at, errors, tenant_id FROM queue_jobs
                 WHERE updated_at >= $2
                 UNION ALL
                 SELECT j.status, j.finished_at, j.errors, j.tenant_id
                 FROM queue_jobs_done d CROSS JOIN LATERAL unnest(d.jobs) AS j
                 WHERE d.finished_at >= $2 AND ($1::uuid IS NULL OR $1::uuid = ANY (d.tenant_ids))
             ),
             done AS (
                 SELECT to_timestamp(floor(extract(epoch FROM finished_at) / $3) * $3) AS b,
                        count(*) AS n
                 FROM recent
                 WHERE status = 'done' AND finished_at >= $2
                   AND ($1::uuid IS NULL OR tenant_id = $1)
                 GROUP BY 1
             ),
             failed AS (
                 SELECT to_timestamp(floor(extract(epoch FROM (e->>'at')::timestamptz) / $3) * $3)
                            AS b,
                        count(*) AS n
                 FROM recent, jsonb_array_elements(errors) e
                 WHERE ($1::uuid IS NULL OR tenant_id = $1)
                   AND coalesce(e->>'kind', '') <> 'deferred'
                   AND (e->>'at')::timestamptz >= $2
                 GROUP BY 1
             )
             SELECT bk.bucket_start, coalesce(d.n, 0) AS done, coalesce(f.n, 0) AS failed
             FROM buckets bk
             LEFT JOIN done d ON d.b = bk.bucket_start
             LEFT JOIN failed f ON f.b = bk.bucket_start
             ORDER BY bk.bucket_start",
        )
        .bind(tenant.map(|t| t.as_uuid()))
        .bind(since)
        .bind(bucket_secs.max(1) as f64)
        .fetch_all(self.pool())
        .await
        .ctx("throughput")
    }

    /// Every mailbox's health, worst first (needs_reauth and errors on top).
    pub async fn account_health(
        &self,
        tenant: Option<TenantId>,
    ) -> Result<Vec<AccountHealth>, QueueError> {
        sqlx::query_as(
            "SELECT id, tenant_id, email_address, status, status_reason, last_sync_success_at,
                    extract(epoch FROM now() - last_sync_success_at)::float8 AS sync_lag_seconds,
                    last_sync_error, token_expires_at, throttled_until, messages_ingested,
                    duplicates_skipped
             FROM helpdesk_email_accounts
             WHERE ($1::uuid IS NULL OR tenant_id = $1)
             ORDER BY CASE status WHEN 'needs_reauth' THEN 0 WHEN 'error' THEN 1 ELSE 2 END,
                      email_address, id",
        )
        .bind(tenant.map(|t| t.as_uuid()))
        .fetch_all(self.pool())
        .await
        .ctx("account_health")
    }

    pub async fn account_totals(&self) -> Result<AccountTotals, QueueError> {
        let by_status: Vec<(String, i64)> = sqlx::query_as(
            "SELECT status, count(*) FROM helpdesk_email_accounts GROUP BY status ORDER BY status",
        )
        .fetch_all(self.pool())
        .await
        .ctx("account_totals")?;
        let (messages_ingested, duplicates_skipped): (i64, i64) = sqlx::query_as(
            "SELECT coalesce(sum(messages_ingested), 0)::bigint,
                    coalesce(sum(duplicates_skipped), 0)::bigint
             FROM helpdesk_email_accounts",
        )
        .fetch_one(self.pool())
        .await
        .ctx("account_totals")?;
        Ok(AccountTotals {
            by_status,
            messages_ingested,
            duplicates_skipped,
        })
    }
}

/// Inserts one audit row inside the transaction of the action it records, so the action and
/// its row land together or not at all (README: every ops action writes one). The row
/// carries the job's tenant so a tenant's own audit trail shows it; a job's tenant is not a
/// foreign key, so an unknown one is recorded as no tenant rather than losing the row.
pub(super) async fn insert_audit(
    conn: &mut PgConnection,
    entry: &AuditEntry<'_>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit_log (tenant_id, actor, action, entity_type, entity_id, details)
         VALUES ((SELECT id FROM tenants WHERE id = $1), $2, $3, $4, $5, $6)",
    )
    .bind(entry.tenant)
    .bind(entry.actor)
    .bind(entry.action)
    .bind(entry.entity_type)
    .bind(entry.entity_id)
    .bind(&entry.details)
    .execute(conn)
    .await?;
    Ok(())
}

/// One row of audit_log.
#[derive(Debug, Clone)]
pub struct AuditEntry<'a> {
    pub tenant: Option<Uuid>,
    pub actor: &'a str,
    pub action: &'a str,
    pub entity_type: &'a str,
    pub entity_id: &'a str,
    pub details: serde_json::Value,
}
