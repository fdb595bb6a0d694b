use crate::kinds::SendReply;
use crate::queue::JobError;
use crate::queue::runtime::JobContext;
use crate::services::Services;

pub async fn send_reply(
    services: Services,
    job: SendReply,
    _ctx: JobContext,
) -> Result<(), JobError> {
    crate::sending::send_reply(&services, job.tenant, job.send).await
}
