use chrono::{TimeDelta, Utc};

use crate::kinds::SyncMailbox;
use crate::queue::JobError;
use crate::queue::runtime::JobContext;
use crate::services::Services;
use crate::sync::sync_folder;

pub async fn sync_mailbox(
    services: Services,
    job: SyncMailbox,
    _ctx: JobContext,
) -> Result<(), JobError> {
    match sync_folder(&services, job.tenant, job.account, &job.folder).await {
        Ok(Some(_)) => Ok(()),
        // Another worker is syncing this folder right now; run after it instead of beside it.
        Ok(None) => Err(JobError::defer(
            Utc::now() + TimeDelta::seconds(2),
            "another sync of this folder is running",
        )),
        Err(e) => Err(super::from_class(e.class(), e.to_string())),
    }
}
