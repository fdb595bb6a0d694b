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
        // Spent attempts would let a mailbox that stays busy (a crashed worker's request slots
        // are held until their lease ends) kill a reply that never failed. A little later at
        // random (up to half again, at most 5 s), so the jobs that found the mailbox busy
        // together do not all come back together.
        ErrorClass::Busy { after } => {
            let jitter = (after / 2)
                .min(Duration::from_secs(5))
                .mul_f64(rand::random::<f64>());
            JobError::defer(
                Utc::now()
                    + chrono::Duration::from_std(after + jitter)
                        .unwrap_or(chrono::Duration::minutes(10)),
                reason,
            )
        }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::Utc;

    use super::from_class;
    use crate::graph::{ErrorClass, GateError};
    use crate::queue::JobError;

    #[test]
    fn a_busy_mailbox_defers_the_job_instead_of_spending_an_attempt() {
        let class = GateError::Busy {
            retry_after: Some(Duration::from_secs(2)),
        }
        .class();
        assert_eq!(
            class,
            ErrorClass::Busy {
                after: Duration::from_secs(2)
            }
        );
        for _ in 0..50 {
            let before = Utc::now();
            match from_class(class, "the mailbox is busy".into()) {
                JobError::Defer { until, reason } => {
                    let waits = (until - before).num_milliseconds();
                    assert!((2_000..=3_100).contains(&waits), "deferred {waits} ms");
                    assert_eq!(reason, "the mailbox is busy");
                }
                other => panic!("a busy mailbox must defer, not {other:?}"),
            }
        }
    }

    #[test]
    fn a_spent_request_budget_defers_to_when_the_window_reopens() {
        let class = GateError::Busy {
            retry_after: Some(Duration::from_secs(300)),
        }
        .class();
        let before = Utc::now();
        match from_class(class, "budget".into()) {
            JobError::Defer { until, .. } => {
                let waits = (until - before).num_milliseconds();
                assert!((300_000..=305_100).contains(&waits), "deferred {waits} ms");
            }
            other => panic!("a spent budget must defer, not {other:?}"),
        }
    }

    #[test]
    fn a_gate_without_a_time_still_defers_for_a_while() {
        let class = GateError::Busy { retry_after: None }.class();
        assert!(
            matches!(from_class(class, "busy".into()), JobError::Defer { until, .. } if until > Utc::now()),
        );
    }

    #[test]
    fn a_short_graph_retry_after_still_spends_an_attempt() {
        let class = ErrorClass::Retryable {
            after: Some(Duration::from_secs(2)),
        };
        assert!(matches!(
            from_class(class, "throttled".into()),
            JobError::Retryable { after: Some(_), .. }
        ));
    }
}
