//! Job handlers: the application logic each queue runs. Every handler is a reconciler.

mod accounts;
mod probe;
mod send;
mod sync;

use std::time::Duration;

use chrono::Utc;

pub use accounts::{refresh_token, validate_account};
pub use probe::run_probe;
pub use send::send_reply;
pub use sync::sync_mailbox;

use crate::graph::{ErrorClass, GraphError};
use crate::queue::JobError;

/// A Retry-After at least this long is not waited out in a retry slot: the job is deferred to
/// that time without spending an attempt.
pub const DEFER_THRESHOLD: Duration = Duration::from_secs(5);

/// What the queue does with a Graph failure.
pub fn from_class(class: ErrorClass, reason: String) -> JobError {
    match class {
        ErrorClass::Retryable { after: Some(after) } if after >= DEFER_THRESHOLD => {
            JobError::defer(
                Utc::now()
                    + chrono::Duration::from_std(after).unwrap_or(chrono::Duration::minutes(10)),
                reason,
            )
        }
        ErrorClass::Retryable { after } => JobError::Retryable { reason, after },
        ErrorClass::Permanent => JobError::permanent(reason),
        ErrorClass::NeedsReauth => {
            JobError::permanent(format!("account needs to be reconnected: {reason}"))
        }
        ErrorClass::Configuration => JobError::permanent(format!(
            "configuration error (operator action needed): {reason}"
        )),
        ErrorClass::Resync => JobError::retry(reason),
    }
}

pub fn from_graph(e: &GraphError) -> JobError {
    from_class(e.class(), e.to_string())
}
