use std::time::Duration;

use chrono::{DateTime, Utc};

/// What a handler tells the queue about a failed run. The queue, not the handler, decides when
/// the job runs again.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JobError {
    /// Worth another attempt: backoff with jitter, but never sooner than `after`.
    #[error("{reason}")]
    Retryable {
        reason: String,
        after: Option<Duration>,
    },
    /// Retrying cannot help (bad request, access denied, revoked consent): the job is dead at
    /// once, with `reason` visible to ops.
    #[error("{reason}")]
    Permanent { reason: String },
    /// Not this job's fault (tenant at its limit, a long Retry-After from Graph): run again at
    /// `until` without spending an attempt.
    #[error("deferred until {until}: {reason}")]
    Defer {
        until: DateTime<Utc>,
        reason: String,
    },
}

impl JobError {
    pub fn retry(reason: impl std::fmt::Display) -> Self {
        Self::Retryable {
            reason: reason.to_string(),
            after: None,
        }
    }
    pub fn retry_after(reason: impl std::fmt::Display, after: Duration) -> Self {
        Self::Retryable {
            reason: reason.to_string(),
            after: Some(after),
        }
    }
    pub fn permanent(reason: impl std::fmt::Display) -> Self {
        Self::Permanent {
            reason: reason.to_string(),
        }
    }
    pub fn defer(until: DateTime<Utc>, reason: impl std::fmt::Display) -> Self {
        Self::Defer {
            until,
            reason: reason.to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("job payload could not be encoded for queue {queue}")]
    Encode {
        queue: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("queue database operation `{op}` failed")]
    Db {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("enqueue into {queue} kept conflicting with a job that changed state; try again")]
    Contended { queue: &'static str },
}

pub(crate) trait DbContext<T> {
    fn ctx(self, op: &'static str) -> Result<T, QueueError>;
}

impl<T> DbContext<T> for Result<T, sqlx::Error> {
    fn ctx(self, op: &'static str) -> Result<T, QueueError> {
        self.map_err(|source| QueueError::Db { op, source })
    }
}
