//! The ops actions and views shared by the dashboard and the JSON ops API, so both apply the
//! same role rules and write the same audit rows: ops act on every tenant, admins only on
//! their own, agents on nothing.

use chrono::{Duration, Utc};
use jobs::accounts::connect::{ConnectError, start_reconnect};
use jobs::ids::{AccountId, JobId, TenantId};
use jobs::queue::{
    AccountHealth, Actor, AuditEntry, ConcurrencyLimit, JobFilter, JobRecord, OldestPending,
    QueueCount, QueueError, RetryOutcome, TenantConcurrency, ThroughputBucket,
};
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::{Principal, Role};

/// The width of a throughput bucket and the window the charts cover.
pub const BUCKET_SECS: i64 = 300;
pub const WINDOW_SECS: i64 = 3600;
/// The longest purge horizon accepted: ten years, i.e. "everything" without overflow.
pub const MAX_PURGE_DAYS: u32 = 3650;

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("{0}")]
    Forbidden(&'static str),
    /// What was not found: "job", "tenant".
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

/// Which tenant a principal's ops views are limited to: `None` means every tenant.
pub fn scope(p: &Principal) -> Result<Option<TenantId>, OpsError> {
    match p.role {
        Role::Ops => Ok(None),
        Role::Admin => Ok(Some(p.tenant)),
        Role::Agent => Err(OpsError::Forbidden(
            "the ops views need the ops or admin role",
        )),
    }
}

/// Narrows a filter to what the principal may see. An admin naming another tenant is refused
/// rather than silently shown their own jobs under the other tenant's filter.
pub fn scoped_filter(p: &Principal, mut filter: JobFilter) -> Result<JobFilter, OpsError> {
    if let Some(own) = scope(p)? {
        if filter.tenant.is_some_and(|t| t != own) {
            return Err(OpsError::Forbidden(
                "admins see only their own tenant's jobs",
            ));
        }
        filter.tenant = Some(own);
    }
    Ok(filter)
}

pub async fn list_jobs(
    state: &AppState,
    p: &Principal,
    filter: JobFilter,
) -> Result<Vec<JobRecord>, OpsError> {
    let filter = scoped_filter(p, filter)?;
    Ok(state.queue.list_jobs(&filter).await?)
}

/// A job the principal may see; another tenant's job is indistinguishable from a missing one.
pub async fn get_job(state: &AppState, p: &Principal, id: i64) -> Result<JobRecord, OpsError> {
    let own = scope(p)?;
    state
        .queue
        .get_job(JobId::new(id))
        .await?
        .filter(|j| own.is_none_or(|t| j.tenant_id == Some(t.as_uuid())))
        .ok_or(OpsError::NotFound("job"))
}

pub async fn retry_job(state: &AppState, p: &Principal, id: i64) -> Result<JobRecord, OpsError> {
    let job = get_job(state, p, id).await?;
    let entity_id = id.to_string();
    let entry = audit_entry(
        p,
        job.tenant_id,
        "job.retried",
        "job",
        &entity_id,
        json!({ "queue": job.queue, "previous_status": job.status, "previous_attempts": job.attempts }),
    );
    match state.queue.retry_job(JobId::new(id), &entry).await? {
        RetryOutcome::Retried => {}
        RetryOutcome::NotRetryable => {
            return Err(OpsError::Conflict(format!(
                "job {id} is {}: only dead or cancelled jobs can be retried",
                job.status
            )));
        }
        RetryOutcome::Covered(pending) => {
            return Err(OpsError::Conflict(format!(
                "job {id} was not retried: pending job {pending} with the same coalesce key \
                 already covers this work"
            )));
        }
    }
    counted("job.retried");
    get_job(state, p, id).await
}

pub async fn cancel_job(state: &AppState, p: &Principal, id: i64) -> Result<JobRecord, OpsError> {
    let job = get_job(state, p, id).await?;
    let entity_id = id.to_string();
    let entry = audit_entry(
        p,
        job.tenant_id,
        "job.cancelled",
        "job",
        &entity_id,
        json!({ "queue": job.queue }),
    );
    if !state.queue.cancel_job(JobId::new(id), &entry).await? {
        return Err(OpsError::Conflict(format!(
            "job {id} is {}: only pending jobs can be cancelled",
            job.status
        )));
    }
    counted("job.cancelled");
    get_job(state, p, id).await
}

/// Retries every dead or cancelled job matching the filter (its status is ignored).
pub async fn bulk_retry(
    state: &AppState,
    p: &Principal,
    filter: JobFilter,
) -> Result<u64, OpsError> {
    let filter = scoped_filter(p, filter)?;
    let n = state
        .queue
        .retry_matching(&filter, |n| {
            audit_entry(
                p,
                filter.tenant.map(|t| t.as_uuid()),
                "job.bulk_retried",
                "jobs",
                "filter",
                json!({ "filter": filter_json(&filter), "retried": n }),
            )
        })
        .await?;
    counted("job.bulk_retried");
    Ok(n)
}

/// Deletes finished jobs older than `days`. Purging is not tenant-scoped, so only ops may.
pub async fn purge(state: &AppState, p: &Principal, days: u32) -> Result<u64, OpsError> {
    if scope(p)?.is_some() {
        return Err(OpsError::Forbidden(
            "purging finished jobs affects every tenant and needs the ops role",
        ));
    }
    if !(1..=MAX_PURGE_DAYS).contains(&days) {
        return Err(OpsError::Invalid(format!(
            "older_than_days must be between 1 and {MAX_PURGE_DAYS}"
        )));
    }
    let before = Utc::now() - Duration::days(i64::from(days));
    let n = state
        .queue
        .purge_finished_audited(before, |n| {
            audit_entry(
                p,
                None,
                "jobs.purged",
                "jobs",
                "finished",
                json!({ "older_than_days": days, "before": before, "purged": n }),
            )
        })
        .await?;
    counted("jobs.purged");
    Ok(n)
}

/// A tenant's concurrency limit and running jobs: ops for any tenant, admins for their own.
pub async fn tenant_concurrency(
    state: &AppState,
    p: &Principal,
    tenant: TenantId,
) -> Result<TenantConcurrency, OpsError> {
    if scope(p)?.is_some_and(|own| own != tenant) {
        return Err(OpsError::Forbidden(
            "admins see only their own tenant's settings",
        ));
    }
    state
        .queue
        .tenant_concurrency(tenant)
        .await?
        .ok_or(OpsError::NotFound("tenant"))
}

/// Every tenant's concurrency setting and load, busiest first: ops see all, admins their own.
pub async fn tenant_concurrencies(
    state: &AppState,
    p: &Principal,
) -> Result<Vec<TenantConcurrency>, OpsError> {
    Ok(state.queue.tenant_concurrencies(scope(p)?).await?)
}

/// Sets or clears a tenant's own concurrency limit. Ops only: a tenant's limit is its share
/// of workers every tenant uses, so its own admin may not raise it.
pub async fn set_tenant_concurrency(
    state: &AppState,
    p: &Principal,
    tenant: TenantId,
    limit: Option<u32>,
) -> Result<TenantConcurrency, OpsError> {
    if scope(p)?.is_some() {
        return Err(OpsError::Forbidden(
            "a tenant's concurrency limit is its share of workers every tenant uses; changing it needs the ops role",
        ));
    }
    let limit = limit
        .map(ConcurrencyLimit::new)
        .transpose()
        .map_err(|e| OpsError::Invalid(e.to_string()))?;
    let actor = Actor {
        subject: &p.subject,
        role: p.role.as_str(),
    };
    let setting = state
        .queue
        .set_tenant_concurrency(tenant, limit, actor)
        .await?
        .ok_or(OpsError::NotFound("tenant"))?;
    metrics::counter!("graphdesk_ops_actions_total", "action" => "tenant.concurrency_limit_set")
        .increment(1);
    Ok(setting)
}

pub struct Overview {
    pub counts: Vec<QueueCount>,
    pub oldest: Vec<OldestPending>,
    pub throughput: Vec<ThroughputBucket>,
}

pub async fn overview(state: &AppState, p: &Principal) -> Result<Overview, OpsError> {
    let own = scope(p)?;
    let since = Utc::now() - Duration::seconds(WINDOW_SECS - BUCKET_SECS);
    Ok(Overview {
        counts: state.queue.queue_counts(own).await?,
        oldest: state.queue.oldest_pending(own).await?,
        throughput: state.queue.throughput(own, since, BUCKET_SECS).await?,
    })
}

pub async fn accounts(state: &AppState, p: &Principal) -> Result<Vec<AccountHealth>, OpsError> {
    let own = scope(p)?;
    Ok(state.queue.account_health(own).await?)
}

/// Where to send an admin's browser to re-consent `account`: the Microsoft sign-in, for the
/// mailbox's address, with the OAuth state in the account's tenant. Ops may reconnect any
/// tenant's mailbox, an admin only their own tenant's (another's is not found).
pub async fn reconnect_account(
    state: &AppState,
    p: &Principal,
    account: AccountId,
) -> Result<String, OpsError> {
    let within = scope(p)?;
    start_reconnect(&state.services, account, within, &p.subject)
        .await?
        .map(String::from)
        .ok_or(OpsError::NotFound("account"))
}

fn filter_json(f: &JobFilter) -> Value {
    json!({
        "queue": f.queue,
        "tenant_id": f.tenant.map(|t| t.as_uuid()),
        "account_id": f.account.map(|a| a.as_uuid()),
        "error": f.error_contains,
    })
}

/// The audit row of an ops action; the queue writes it in the action's own transaction.
fn audit_entry<'a>(
    p: &'a Principal,
    tenant: Option<uuid::Uuid>,
    action: &'static str,
    entity_type: &'static str,
    entity_id: &'a str,
    details: Value,
) -> AuditEntry<'a> {
    AuditEntry {
        tenant,
        actor: &p.subject,
        action,
        entity_type,
        entity_id,
        details: json!({ "role": p.role.as_str(), "detail": details }),
    }
}

/// Counts an ops action once it committed, so the metric never counts a rolled-back one.
fn counted(action: &'static str) {
    metrics::counter!("graphdesk_ops_actions_total", "action" => action).increment(1);
}

/// Job arguments as ops may see them: the value of any key that names a credential is
/// replaced, at any depth, so the dashboard and the API never echo one.
#[must_use]
pub fn redact(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    if is_sensitive(&k) {
                        (k, Value::String("[REDACTED]".into()))
                    } else {
                        (k, redact(v))
                    }
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(redact).collect()),
        other => other,
    }
}

fn is_sensitive(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["token", "secret", "password", "code_verifier"]
        .iter()
        .any(|word| key.contains(word))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_redacted_at_any_depth_and_other_keys_kept() {
        let raw = json!({
            "account": "a1",
            "access_token": "x",
            "nested": [{ "Client_Secret": "y", "keep": 1 }, { "deep": { "password": "z" } }],
            "pkce": { "code_verifier": "v" },
            "folder": "inbox",
        });
        assert_eq!(
            redact(raw),
            json!({
                "account": "a1",
                "access_token": "[REDACTED]",
                "nested": [{ "Client_Secret": "[REDACTED]", "keep": 1 },
                           { "deep": { "password": "[REDACTED]" } }],
                "pkce": { "code_verifier": "[REDACTED]" },
                "folder": "inbox",
            })
        );
    }
}
