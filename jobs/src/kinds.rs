//! The typed jobs. Each has its own explicitly named queue (never the Rust type path, so a
//! rename cannot orphan stored jobs) and its own attempt budget and coalescing rule.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{AccountId, SendId, TenantId};
use crate::queue::{JobKind, RetryPolicy};

/// Delta-sync one folder of one mailbox into tickets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncMailbox {
    pub tenant: TenantId,
    pub account: AccountId,
    pub folder: String,
}

impl JobKind for SyncMailbox {
    const QUEUE: &'static str = "graphdesk.sync_mailbox";
    const MAX_ATTEMPTS: i32 = 8;
    fn retry_policy() -> RetryPolicy {
        RetryPolicy::new(Duration::from_secs(5), Duration::from_secs(10 * 60))
    }
    fn tenant(&self) -> Option<TenantId> {
        Some(self.tenant)
    }
    fn account(&self) -> Option<AccountId> {
        Some(self.account)
    }
    /// One pending sync per account and folder: a burst of webhooks or ticks is one sync.
    fn coalesce_key(&self) -> Option<String> {
        Some(format!("sync:{}:{}", self.account, self.folder))
    }
}

/// Send one agent reply (a row of helpdesk_outbound_sends).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendReply {
    pub tenant: TenantId,
    pub send: SendId,
}

impl JobKind for SendReply {
    const QUEUE: &'static str = "graphdesk.send_reply";
    const MAX_ATTEMPTS: i32 = 12;
    fn retry_policy() -> RetryPolicy {
        RetryPolicy::new(Duration::from_secs(3), Duration::from_secs(15 * 60))
    }
    fn tenant(&self) -> Option<TenantId> {
        Some(self.tenant)
    }
    fn coalesce_key(&self) -> Option<String> {
        Some(format!("send:{}", self.send))
    }
}

/// Refresh one account's OAuth tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshToken {
    pub tenant: TenantId,
    pub account: AccountId,
    /// Refresh even if the token is not near expiry (an admin asked for it).
    #[serde(default)]
    pub force: bool,
}

impl JobKind for RefreshToken {
    const QUEUE: &'static str = "graphdesk.refresh_token";
    const MAX_ATTEMPTS: i32 = 6;
    fn retry_policy() -> RetryPolicy {
        RetryPolicy::new(Duration::from_secs(5), Duration::from_secs(5 * 60))
    }
    fn tenant(&self) -> Option<TenantId> {
        Some(self.tenant)
    }
    fn account(&self) -> Option<AccountId> {
        Some(self.account)
    }
    fn coalesce_key(&self) -> Option<String> {
        Some(format!("refresh:{}", self.account))
    }
}

/// Test an account's connection: /me, the inbox, the granted scopes, send permission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidateAccount {
    pub tenant: TenantId,
    pub account: AccountId,
}

impl JobKind for ValidateAccount {
    const QUEUE: &'static str = "graphdesk.validate_account";
    const MAX_ATTEMPTS: i32 = 5;
    fn tenant(&self) -> Option<TenantId> {
        Some(self.tenant)
    }
    fn account(&self) -> Option<AccountId> {
        Some(self.account)
    }
    fn coalesce_key(&self) -> Option<String> {
        Some(format!("validate:{}", self.account))
    }
}

/// A diagnostic job: ops enqueue one to check the pipeline end to end; tests and benchmarks
/// use its knobs to simulate work, failures, panics and hangs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    #[serde(default)]
    pub tenant: Option<TenantId>,
    /// Simulated work.
    #[serde(default)]
    pub sleep_ms: u64,
    /// Fail (retryably) on the first N attempts.
    #[serde(default)]
    pub fail_attempts: u32,
    /// Panic on the first N attempts.
    #[serde(default)]
    pub panic_attempts: u32,
    /// Fail permanently.
    #[serde(default)]
    pub permanent_failure: bool,
    /// Defer (without spending an attempt) on the first N attempts, by `defer_ms`.
    #[serde(default)]
    pub defer_times: u32,
    #[serde(default)]
    pub defer_ms: u64,
    /// Record each execution in queue_probe_runs.
    #[serde(default)]
    pub record: bool,
    #[serde(default)]
    pub marker: Option<String>,
    /// Coalesce with other probes of the same key (at most one pending).
    #[serde(default)]
    pub coalesce: Option<String>,
}

impl JobKind for Probe {
    const QUEUE: &'static str = "graphdesk.probe";
    const MAX_ATTEMPTS: i32 = 5;
    fn retry_policy() -> RetryPolicy {
        // Fast, so the suite can watch several retries happen.
        RetryPolicy::new(Duration::from_millis(200), Duration::from_secs(2))
    }
    fn tenant(&self) -> Option<TenantId> {
        self.tenant
    }
    fn coalesce_key(&self) -> Option<String> {
        self.coalesce.as_ref().map(|k| format!("probe:{k}"))
    }
}

/// Every queue this deployment runs, for the dashboard and metrics.
pub const QUEUES: [&str; 5] = [
    SyncMailbox::QUEUE,
    SendReply::QUEUE,
    RefreshToken::QUEUE,
    ValidateAccount::QUEUE,
    Probe::QUEUE,
];
