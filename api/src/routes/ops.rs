//! The ops API: what the dashboard shows and does, as JSON. Ops see every tenant, admins
//! their own, agents nothing; every action writes an audit row.

use crate::body::JsonBody;
use chrono::{DateTime, Utc};
use jobs::ids::{AccountId, TenantId};
use jobs::queue::{
    AccountHealth, ConcurrencyLimit, JobFilter, JobRecord, JobStatus, TenantConcurrency,
};
use poem_openapi::{
    Object, OpenApi,
    param::{Path, Query},
    payload::Json,
};
use uuid::Uuid;

use crate::AppState;
use crate::auth::BearerAuth;
use crate::dashboard::service::{self, OpsError};
use crate::error::{ApiError, ApiResult};
use crate::routes::ApiTags;
use crate::routes::jobs_api::JobView;

impl From<OpsError> for ApiError {
    fn from(e: OpsError) -> Self {
        match e {
            OpsError::Forbidden(msg) => ApiError::forbidden(msg),
            OpsError::NotFound(what) => ApiError::not_found(what),
            OpsError::Conflict(msg) => ApiError::conflict(msg),
            OpsError::Invalid(msg) => ApiError::unprocessable(msg),
            OpsError::Queue(e) => ApiError::internal(&e),
            OpsError::Connect(e) => ApiError::internal(&e),
        }
    }
}

/// A job with credential-like argument values redacted.
fn view(job: JobRecord) -> JobView {
    let mut v = JobView::from(job);
    v.arguments = service::redact(v.arguments);
    v
}

/// One page of jobs, newest first.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct JobPage {
    pub jobs: Vec<JobView>,
    /// Pass as `before_id` for the next (older) page; absent on the last page.
    pub next_before_id: Option<i64>,
}

/// Which jobs a bulk retry acts on; empty fields match everything. Only dead and cancelled
/// jobs are retried.
#[derive(Debug, Object, Default)]
#[oai(skip_serializing_if_is_none)]
pub struct RetryFilter {
    pub queue: Option<String>,
    pub tenant_id: Option<Uuid>,
    pub account_id: Option<Uuid>,
    /// Case-insensitive substring of the job's last error.
    pub error: Option<String>,
}

#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct Affected {
    /// How many jobs the action changed.
    pub count: u64,
}

#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct PurgeRequest {
    /// Delete done, dead and cancelled jobs that finished more than this many days ago.
    #[oai(validator(minimum(value = "1"), maximum(value = "3650")))]
    pub older_than_days: u32,
}

/// A tenant's concurrency limit: how many of its jobs may run at once across every worker.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct TenantConcurrencyView {
    pub tenant_id: Uuid,
    pub name: String,
    /// The tenant's own limit; absent when the workers' default (WORKER_TENANT_CONCURRENCY)
    /// applies.
    pub concurrency_limit: Option<u32>,
    /// The tenant's jobs running now, on every worker.
    pub running_jobs: i64,
    /// The tenant's jobs waiting to run, due or not.
    pub pending_jobs: i64,
}

impl From<TenantConcurrency> for TenantConcurrencyView {
    fn from(t: TenantConcurrency) -> Self {
        Self {
            tenant_id: t.tenant.as_uuid(),
            name: t.name,
            concurrency_limit: t.limit.map(ConcurrencyLimit::get),
            running_jobs: t.running,
            pending_jobs: t.pending,
        }
    }
}

#[derive(Debug, Object)]
pub struct SetConcurrencyRequest {
    /// How many of the tenant's jobs may run at once, 1 to 1000. Applies from the next claim
    /// on; running jobs are not interrupted.
    #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
    pub concurrency_limit: u32,
}

/// One queue at a glance.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct QueueSummary {
    pub queue: String,
    pub pending: i64,
    pub running: i64,
    pub done: i64,
    pub dead: i64,
    pub cancelled: i64,
    /// Seconds the oldest due pending job has been waiting; absent when none waits.
    pub oldest_pending_seconds: Option<f64>,
}

/// Jobs done and attempts failed in one 5-minute bucket.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct ThroughputPoint {
    pub bucket_start: DateTime<Utc>,
    pub done: i64,
    pub failed: i64,
}

#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct OpsOverview {
    pub queues: Vec<QueueSummary>,
    /// The last hour, oldest bucket first.
    pub throughput: Vec<ThroughputPoint>,
    pub bucket_seconds: i64,
}

/// A mailbox's health.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct AccountHealthView {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub email_address: String,
    /// pending, active, needs_reauth, error or disabled.
    pub status: String,
    pub status_reason: Option<String>,
    pub last_sync_success_at: Option<DateTime<Utc>>,
    /// Seconds since the last successful sync; absent when none succeeded yet.
    pub sync_lag_seconds: Option<f64>,
    pub last_sync_error: Option<String>,
    pub token_expires_at: Option<DateTime<Utc>>,
    /// Set while Microsoft Graph is throttling this mailbox.
    pub throttled_until: Option<DateTime<Utc>>,
    pub messages_ingested: i64,
    pub duplicates_skipped: i64,
    /// The dashboard page where an admin (or ops) re-consents this mailbox: with a dashboard
    /// session it redirects to the Microsoft sign-in for the mailbox's address.
    pub reconnect_url: String,
}

impl From<AccountHealth> for AccountHealthView {
    fn from(a: AccountHealth) -> Self {
        Self {
            reconnect_url: reconnect_url(a.id),
            id: a.id,
            tenant_id: a.tenant_id,
            email_address: a.email_address,
            status: a.status,
            status_reason: a.status_reason,
            last_sync_success_at: a.last_sync_success_at,
            sync_lag_seconds: a.sync_lag_seconds,
            last_sync_error: a.last_sync_error,
            token_expires_at: a.token_expires_at,
            throttled_until: a.throttled_until,
            messages_ingested: a.messages_ingested,
            duplicates_skipped: a.duplicates_skipped,
        }
    }
}

/// A link for a browser: a dashboard route, authenticated by the session cookie a browser
/// sends, unlike the API's connect endpoint, which needs a bearer header no link can carry.
#[must_use]
pub fn reconnect_url(account: Uuid) -> String {
    format!("/dashboard/accounts/{account}/reconnect")
}

pub struct OpsApi {
    pub state: AppState,
}

fn parse_status(raw: Option<&str>) -> ApiResult<Option<JobStatus>> {
    raw.map(|s| {
        JobStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "unknown status `{s}`: use pending, running, done, dead or cancelled"
            ))
        })
    })
    .transpose()
}

fn filter_from(f: RetryFilter) -> JobFilter {
    JobFilter {
        queue: f.queue.filter(|q| !q.is_empty()),
        tenant: f.tenant_id.map(TenantId::from_uuid),
        account: f.account_id.map(AccountId::from_uuid),
        error_contains: f.error.filter(|e| !e.is_empty()),
        ..JobFilter::default()
    }
}

#[OpenApi(prefix_path = "/api/v1", tag = "ApiTags::Ops")]
impl OpsApi {
    /// Lists jobs newest first, filtered; page with `before_id`. Admins see their tenant's.
    #[allow(clippy::too_many_arguments)]
    #[oai(path = "/jobs", method = "get")]
    async fn list_jobs(
        &self,
        auth: BearerAuth,
        /// pending, running, done, dead or cancelled.
        status: Query<Option<String>>,
        queue: Query<Option<String>>,
        tenant_id: Query<Option<Uuid>>,
        account_id: Query<Option<Uuid>>,
        /// Case-insensitive substring of the last error.
        error: Query<Option<String>>,
        /// Only jobs with a smaller id (the previous page's `next_before_id`).
        before_id: Query<Option<i64>>,
        /// Page size, 1 to 500.
        #[oai(
            default = "default_limit",
            validator(minimum(value = "1"), maximum(value = "500"))
        )]
        limit: Query<i64>,
    ) -> ApiResult<Json<JobPage>> {
        let filter = JobFilter {
            status: parse_status(status.0.as_deref())?,
            before_id: before_id.0,
            limit: limit.0,
            ..filter_from(RetryFilter {
                queue: queue.0,
                tenant_id: tenant_id.0,
                account_id: account_id.0,
                error: error.0,
            })
        };
        let jobs = service::list_jobs(&self.state, &auth.0, filter).await?;
        let next_before_id = if jobs.len() as i64 == limit.0 {
            jobs.last().map(|j| j.id)
        } else {
            None
        };
        Ok(Json(JobPage {
            jobs: jobs.into_iter().map(view).collect(),
            next_before_id,
        }))
    }

    /// Puts a dead or cancelled job back to pending with a fresh attempt budget.
    #[oai(path = "/jobs/:job_id/retry", method = "post")]
    async fn retry_job(&self, auth: BearerAuth, job_id: Path<i64>) -> ApiResult<Json<JobView>> {
        Ok(Json(view(
            service::retry_job(&self.state, &auth.0, job_id.0).await?,
        )))
    }

    /// Cancels a pending job; a running job is not interrupted (409).
    #[oai(path = "/jobs/:job_id/cancel", method = "post")]
    async fn cancel_job(&self, auth: BearerAuth, job_id: Path<i64>) -> ApiResult<Json<JobView>> {
        Ok(Json(view(
            service::cancel_job(&self.state, &auth.0, job_id.0).await?,
        )))
    }

    /// Retries every dead or cancelled job matching the filter; returns how many.
    #[oai(path = "/jobs/retry", method = "post")]
    async fn bulk_retry(
        &self,
        auth: BearerAuth,
        body: JsonBody<RetryFilter>,
    ) -> ApiResult<Json<Affected>> {
        let count = service::bulk_retry(&self.state, &auth.0, filter_from(body.0)).await?;
        Ok(Json(Affected { count }))
    }

    /// Deletes finished jobs older than N days (ops only: it spans every tenant).
    #[oai(path = "/jobs/purge", method = "post")]
    async fn purge(
        &self,
        auth: BearerAuth,
        body: JsonBody<PurgeRequest>,
    ) -> ApiResult<Json<Affected>> {
        let count = service::purge(&self.state, &auth.0, body.older_than_days).await?;
        Ok(Json(Affected { count }))
    }

    /// Jobs per queue and status, the oldest waiting job per queue, and the last hour's
    /// throughput and failures.
    #[oai(path = "/ops/overview", method = "get")]
    async fn overview(&self, auth: BearerAuth) -> ApiResult<Json<OpsOverview>> {
        let o = service::overview(&self.state, &auth.0).await?;
        Ok(Json(OpsOverview {
            queues: summarize(&o.counts, &o.oldest),
            throughput: o
                .throughput
                .into_iter()
                .map(|b| ThroughputPoint {
                    bucket_start: b.bucket_start,
                    done: b.done,
                    failed: b.failed,
                })
                .collect(),
            bucket_seconds: service::BUCKET_SECS,
        }))
    }

    /// A tenant's concurrency limit and running jobs. Admins see their own tenant's.
    #[oai(path = "/tenants/:tenant_id/concurrency", method = "get")]
    async fn tenant_concurrency(
        &self,
        auth: BearerAuth,
        tenant_id: Path<Uuid>,
    ) -> ApiResult<Json<TenantConcurrencyView>> {
        let tenant = TenantId::from_uuid(tenant_id.0);
        Ok(Json(
            service::tenant_concurrency(&self.state, &auth.0, tenant)
                .await?
                .into(),
        ))
    }

    /// Sets a tenant's own concurrency limit (ops only). Audited.
    #[oai(path = "/tenants/:tenant_id/concurrency", method = "put")]
    async fn set_tenant_concurrency(
        &self,
        auth: BearerAuth,
        tenant_id: Path<Uuid>,
        body: JsonBody<SetConcurrencyRequest>,
    ) -> ApiResult<Json<TenantConcurrencyView>> {
        self.set_concurrency(&auth, tenant_id.0, Some(body.0.concurrency_limit))
            .await
    }

    /// Clears a tenant's own concurrency limit, so the workers' default applies again (ops
    /// only). Audited.
    #[oai(path = "/tenants/:tenant_id/concurrency", method = "delete")]
    async fn clear_tenant_concurrency(
        &self,
        auth: BearerAuth,
        tenant_id: Path<Uuid>,
    ) -> ApiResult<Json<TenantConcurrencyView>> {
        self.set_concurrency(&auth, tenant_id.0, None).await
    }

    /// Every mailbox's sync and token health, worst first.
    #[oai(path = "/accounts", method = "get")]
    async fn accounts(&self, auth: BearerAuth) -> ApiResult<Json<Vec<AccountHealthView>>> {
        let accounts = service::accounts(&self.state, &auth.0).await?;
        Ok(Json(accounts.into_iter().map(Into::into).collect()))
    }
}

impl OpsApi {
    async fn set_concurrency(
        &self,
        auth: &BearerAuth,
        tenant_id: Uuid,
        limit: Option<u32>,
    ) -> ApiResult<Json<TenantConcurrencyView>> {
        let tenant = TenantId::from_uuid(tenant_id);
        Ok(Json(
            service::set_tenant_concurrency(&self.state, &auth.0, tenant, limit)
                .await?
                .into(),
        ))
    }
}

fn default_limit() -> i64 {
    50
}

/// One row per known queue (and per unknown queue that has jobs), in a stable order.
#[must_use]
pub fn summarize(
    counts: &[jobs::queue::QueueCount],
    oldest: &[jobs::queue::OldestPending],
) -> Vec<QueueSummary> {
    let mut names: Vec<String> = jobs::kinds::QUEUES.iter().map(|q| q.to_string()).collect();
    for c in counts {
        if !names.contains(&c.queue) {
            names.push(c.queue.clone());
        }
    }
    names
        .into_iter()
        .map(|queue| {
            let n = |status: &str| {
                counts
                    .iter()
                    .find(|c| c.queue == queue && c.status == status)
                    .map_or(0, |c| c.count)
            };
            QueueSummary {
                pending: n("pending"),
                running: n("running"),
                done: n("done"),
                dead: n("dead"),
                cancelled: n("cancelled"),
                oldest_pending_seconds: oldest
                    .iter()
                    .find(|o| o.queue == queue)
                    .map(|o| o.age_seconds),
                queue,
            }
        })
        .collect()
}
