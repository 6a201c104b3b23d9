//! The one retry policy: exponential backoff with full jitter.
//!
//! Every retry loop in registrar (registration, stream re-opens, one-shot
//! commands) draws its delays from here, so that thousands of hosts that lost
//! their leases at once spread their retries instead of stampeding a
//! recovering cluster.

use std::time::Duration;

/// Exponential backoff with full jitter: attempt `n` sleeps a random duration
/// in `[0, min(max, base * 2^n)]`, never less than 1 ms.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Builds a policy. `base` must be non-zero and no larger than `max`.
    pub fn new(base: Duration, max: Duration) -> Result<Self, String> {
        if base.is_zero() {
            return Err("backoff base must be greater than zero".into());
        }
        if base > max {
            return Err(format!(
                "backoff base {base:?} is larger than its maximum {max:?}"
            ));
        }
        Ok(Self {
            base,
            max,
            attempt: 0,
        })
    }

    /// The policy of contract rule 3: 100 ms doubling up to 10 s.
    pub fn standard() -> Self {
        Self {
            base: Duration::from_millis(100),
            max: Duration::from_secs(10),
            attempt: 0,
        }
    }

    /// The upper bound of the next delay, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The next delay, and one step further up the curve.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let millis = u64::try_from(ceiling.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        Duration::from_millis(rand::random_range(1..=millis))
    }

    /// Back to the start of the curve, after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_the_growing_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10)).unwrap();
        let mut last_ceiling = Duration::ZERO;
        for _ in 0..200 {
            let ceiling = b.ceiling();
            assert!(ceiling >= last_ceiling);
            assert!(ceiling <= Duration::from_secs(10));
            let d = b.next_delay();
            assert!(
                d <= ceiling && d >= Duration::from_millis(1),
                "{d:?} > {ceiling:?}"
            );
            last_ceiling = ceiling;
        }
        assert_eq!(b.ceiling(), Duration::from_secs(10));
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn invalid_policies_are_refused() {
        assert!(Backoff::new(Duration::ZERO, Duration::from_secs(1)).is_err());
        assert!(Backoff::new(Duration::from_secs(2), Duration::from_secs(1)).is_err());
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let mut b = Backoff::standard();
            for _ in 0..6 {
                b.next_delay();
            }
            seen.insert(b.next_delay());
        }
        assert!(
            seen.len() > 10,
            "jitter produced only {} values",
            seen.len()
        );
    }

    proptest::proptest! {
        #[test]
        fn every_delay_is_within_its_ceiling(base_ms in 1u64..5_000, extra_ms in 0u64..60_000, attempts in 0usize..100) {
            let base = Duration::from_millis(base_ms);
            let max = base + Duration::from_millis(extra_ms);
            let mut b = Backoff::new(base, max).unwrap();
            for _ in 0..attempts {
                let ceiling = b.ceiling();
                proptest::prop_assert!(ceiling <= max && ceiling >= base);
                let d = b.next_delay();
                proptest::prop_assert!(d >= Duration::from_millis(1) && d <= ceiling);
            }
        }
    }
}
