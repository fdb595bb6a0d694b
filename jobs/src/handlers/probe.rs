use chrono::Utc;
use sqlx::PgPool;

use crate::kinds::Probe;
use crate::queue::JobError;
use crate::queue::runtime::JobContext;

/// Runs a [`Probe`]. Its defer counter is the number of recorded deferrals, which lives in the
/// job's own error history, so the handler stays stateless.
pub async fn run_probe(pool: PgPool, job: Probe, ctx: JobContext) -> Result<(), JobError> {
    let started_at = Utc::now();
    if job.defer_times > 0 {
        let deferrals: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM queue_jobs, jsonb_array_elements(errors) e
             WHERE id = $1 AND e->>'kind' = 'deferred'",
        )
        .bind(ctx.id.get())
        .fetch_one(&pool)
        .await
        .map_err(|e| JobError::retry(format!("probe could not read its history: {e}")))?;
        if deferrals < i64::from(job.defer_times) {
            return Err(JobError::defer(
                Utc::now() + chrono::Duration::milliseconds(job.defer_ms as i64),
                "probe asked to be deferred",
            ));
        }
    }
    if job.sleep_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(job.sleep_ms)).await;
    }
    if job.record {
        sqlx::query(
            "INSERT INTO queue_probe_runs (job_id, attempt, tenant_id, marker, worker_id, started_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(ctx.id.get())
        .bind(ctx.attempt)
        .bind(job.tenant.map(|t| t.as_uuid()))
        .bind(job.marker.as_deref())
        .bind(&*ctx.worker_id)
        .bind(started_at)
        .execute(&pool)
        .await
        .map_err(|e| JobError::retry(format!("probe could not record its run: {e}")))?;
    }
    if (ctx.attempt as u32) <= job.panic_attempts {
        panic!("probe asked to panic on attempt {}", ctx.attempt);
    }
    if (ctx.attempt as u32) <= job.fail_attempts {
        return Err(JobError::retry(format!(
            "probe asked to fail on attempt {}",
            ctx.attempt
        )));
    }
    if job.permanent_failure {
        return Err(JobError::permanent("probe asked to fail permanently"));
    }
    Ok(())
}
