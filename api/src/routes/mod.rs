pub mod accounts;
pub mod health;
pub mod jobs_api;
pub mod oauth;
pub mod ops;
pub mod tickets;
pub mod webhooks;

use poem_openapi::Tags;

#[derive(Tags)]
pub enum ApiTags {
    /// Liveness and readiness.
    Health,
    /// Connected mailboxes and the jobs that act on them.
    Accounts,
    /// Tickets and agent replies.
    Tickets,
    /// Job state, and ops actions on jobs.
    Jobs,
    /// Ops views and actions: job lists, retries, purges, queue and mailbox health.
    Ops,
    /// Microsoft Graph change notifications (public; authenticated by clientState).
    Webhooks,
}
