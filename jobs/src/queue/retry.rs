use std::time::Duration;

use rand::Rng;

/// Exponential backoff with full jitter on the upper half: attempt n waits between
/// `base * 2^(n-1) / 2` and `base * 2^(n-1)`, capped at `max`. Jitter keeps a burst of
/// failures (a Graph outage) from retrying in lock-step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub base: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    pub const fn new(base: Duration, max: Duration) -> Self {
        Self { base, max }
    }

    /// The delay before attempt `attempt + 1`, after `attempt` (1-based) failed.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let ceiling = self
            .base
            .saturating_mul(1u32 << exp.min(20))
            .min(self.max)
            .max(Duration::from_millis(1));
        let floor = ceiling / 2;
        let spread = ceiling.saturating_sub(floor).as_millis() as u64;
        floor + Duration::from_millis(rand::rng().random_range(0..=spread))
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::new(Duration::from_secs(5), Duration::from_secs(30 * 60))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_grows_exponentially_within_jitter_bounds_and_is_capped() {
        let p = RetryPolicy::new(Duration::from_secs(2), Duration::from_secs(60));
        for _ in 0..200 {
            let d1 = p.delay(1);
            assert!(
                d1 >= Duration::from_secs(1) && d1 <= Duration::from_secs(2),
                "{d1:?}"
            );
            let d3 = p.delay(3);
            assert!(
                d3 >= Duration::from_secs(4) && d3 <= Duration::from_secs(8),
                "{d3:?}"
            );
            let d20 = p.delay(20);
            assert!(
                d20 >= Duration::from_secs(30) && d20 <= Duration::from_secs(60),
                "{d20:?}"
            );
        }
    }

    #[test]
    fn delays_are_jittered() {
        let p = RetryPolicy::new(Duration::from_secs(10), Duration::from_secs(600));
        let samples: std::collections::HashSet<_> = (0..50).map(|_| p.delay(4)).collect();
        assert!(samples.len() > 10, "jitter should spread retries");
    }
}
