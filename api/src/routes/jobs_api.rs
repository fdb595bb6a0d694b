use crate::body::JsonBody;
use chrono::{DateTime, Utc};
use jobs::ids::JobId;
use jobs::kinds::Probe;
use jobs::queue::{EnqueueOptions, JobRecord};
use poem_openapi::{ApiResponse, Object, OpenApi, param::Path, payload::Json};
use uuid::Uuid;

use crate::AppState;
use crate::auth::BearerAuth;
use crate::error::{ApiError, ApiResult};
use crate::routes::ApiTags;

/// A job as ops and clients see it.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct JobView {
    pub id: i64,
    pub queue: String,
    /// pending, running, done, dead or cancelled.
    pub status: String,
    pub tenant_id: Option<Uuid>,
    pub account_id: Option<Uuid>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub last_error: Option<String>,
    /// One entry per failed, deferred or recovered attempt.
    pub errors: serde_json::Value,
    pub arguments: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<JobRecord> for JobView {
    fn from(r: JobRecord) -> Self {
        Self {
            id: r.id,
            queue: r.queue,
            status: r.status,
            tenant_id: r.tenant_id,
            account_id: r.email_account_id,
            attempts: r.attempts,
            max_attempts: r.max_attempts,
            run_at: r.run_at,
            last_error: r.last_error,
            errors: r.errors,
            arguments: r.payload,
            created_at: r.created_at,
            updated_at: r.updated_at,
            finished_at: r.finished_at,
        }
    }
}

impl JobView {
    /// The view every endpoint shows: credential-like argument values redacted, so whoever may
    /// read a job never reads a secret a handler was given.
    #[must_use]
    pub fn redacted(job: JobRecord) -> Self {
        let mut v = Self::from(job);
        v.arguments = crate::dashboard::service::redact(v.arguments);
        v
    }
}

/// The answer to every request that enqueues work.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct JobAccepted {
    pub job_id: i64,
    pub queue: String,
    /// False when an equivalent job was already pending and this request joined it.
    pub created: bool,
}

/// Knobs for a diagnostic probe job.
#[derive(Debug, Object, Default)]
#[oai(skip_serializing_if_is_none)]
pub struct ProbeRequest {
    /// Simulated work in milliseconds (at most 60,000).
    #[oai(default)]
    pub sleep_ms: u64,
    /// Fail the first N attempts (retryably).
    #[oai(default)]
    pub fail_attempts: u32,
    /// Fail permanently.
    #[oai(default)]
    pub permanent_failure: bool,
    /// A label stored with the probe's run.
    pub marker: Option<String>,
}

pub struct JobsApi {
    pub state: AppState,
}

#[OpenApi(prefix_path = "/api/v1", tag = "ApiTags::Jobs")]
impl JobsApi {
    /// A job's state, attempts and errors. Ops see every job, admins their tenant's; agents
    /// are refused. Argument values of keys naming a token, secret, password or code_verifier
    /// are redacted.
    #[oai(path = "/jobs/:job_id", method = "get")]
    async fn get_job(&self, auth: BearerAuth, job_id: Path<i64>) -> ApiResult<Json<JobView>> {
        // Jobs carry arguments and errors of every mailbox of the tenant: README gives them to
        // admins, not to agents.
        if !auth.0.at_least_admin() {
            return Err(ApiError::forbidden(
                "only the admin and ops roles may read jobs",
            ));
        }
        let job = self
            .state
            .queue
            .get_job(JobId::new(job_id.0))
            .await?
            .filter(|j| auth.0.is_ops() || j.tenant_id == Some(auth.0.tenant.as_uuid()))
            .ok_or_else(|| ApiError::not_found("job"))?;
        Ok(Json(JobView::redacted(job)))
    }

    /// Enqueues a diagnostic probe job to check the pipeline end to end (ops only).
    #[oai(path = "/ops/probe", method = "post")]
    async fn probe(&self, auth: BearerAuth, body: JsonBody<ProbeRequest>) -> ApiResult<Accepted> {
        if !auth.0.is_ops() {
            return Err(ApiError::forbidden("only the ops role may enqueue probes"));
        }
        if body.sleep_ms > 60_000 {
            return Err(ApiError::unprocessable("sleep_ms must be at most 60000"));
        }
        let probe = Probe {
            tenant: Some(auth.0.tenant),
            sleep_ms: body.sleep_ms,
            fail_attempts: body.fail_attempts,
            permanent_failure: body.permanent_failure,
            record: true,
            marker: body.0.marker,
            ..Probe::default()
        };
        let enq = self
            .state
            .queue
            .enqueue(&probe, EnqueueOptions::default())
            .await?;
        Ok(accepted::<Probe>(enq))
    }
}

#[derive(Debug, ApiResponse)]
pub enum Accepted {
    /// The job is stored; poll GET /api/v1/jobs/{job_id} for its progress.
    #[oai(status = 202)]
    Accepted(Json<JobAccepted>),
}

pub fn accepted<J: jobs::queue::JobKind>(enq: jobs::queue::Enqueued) -> Accepted {
    Accepted::Accepted(Json(JobAccepted {
        job_id: enq.id.get(),
        queue: J::QUEUE.to_string(),
        created: enq.created,
    }))
}
