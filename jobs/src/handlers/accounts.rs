use chrono::{TimeDelta, Utc};

use crate::accounts::tokens::{REFRESH_MARGIN, RefreshMode, refresh_tokens};
use crate::kinds::{RefreshToken, ValidateAccount};
use crate::queue::JobError;
use crate::queue::runtime::JobContext;
use crate::services::Services;

pub async fn validate_account(
    services: Services,
    job: ValidateAccount,
    _ctx: JobContext,
) -> Result<(), JobError> {
    let report = crate::accounts::validate::validate_account(&services, job.tenant, job.account)
        .await
        .map_err(|e| match e {
            crate::accounts::validate::ValidateError::Graph(e) => super::from_graph(&e),
            crate::accounts::validate::ValidateError::Store(e) => JobError::retry(e),
        })?;
    tracing::info!(account = %job.account, ok = report.ok(), problems = ?report.problems, "account validated");
    Ok(())
}

pub async fn refresh_token(
    services: Services,
    job: RefreshToken,
    _ctx: JobContext,
) -> Result<(), JobError> {
    let mode = if job.force {
        // A refresh in the last 30 s already satisfies an explicit request.
        RefreshMode::Force {
            unless_refreshed_since: Utc::now() - TimeDelta::seconds(30),
        }
    } else {
        RefreshMode::IfExpiringWithin(REFRESH_MARGIN)
    };
    refresh_tokens(
        &services.pool,
        &services.vault,
        &services.identity,
        &services.authority,
        job.tenant,
        job.account,
        mode,
    )
    .await
    .map(|_| ())
    .map_err(|e| super::from_class(e.class(), e.to_string()))
}
