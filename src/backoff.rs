//! The one retry policy (exponential backoff with full jitter), and how a
//! retry loop speaks during an outage.
//!
//! Every retry loop in registrar (grants, writes, stream re-opens, one-shot
//! commands) draws its delays from a [`Policy`], so that thousands of hosts
//! that lost their leases at once spread their retries instead of
//! stampeding a recovering cluster.
//!
//! An outage of hours must not write a log line per retry: [`Outage`] says
//! the first failure, then a summary at most once a minute, and lets the
//! caller say one line when it is over.

use std::fmt::Display;
use std::time::Duration;

use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

/// A policy that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("backoff base must be greater than zero")]
    ZeroBase,
    #[error(
        "backoff base {} is larger than its maximum {}",
        humantime::format_duration(*.base),
        humantime::format_duration(*.max)
    )]
    BaseAboveMax { base: Duration, max: Duration },
}

/// A validated backoff policy: attempt `n` waits a random duration in
/// `[1 ms, min(max, base * 2^n)]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    base: Duration,
    max: Duration,
}

impl Policy {
    /// The policy of design.md rule 3: 100 ms doubling up to 10 s.
    pub const STANDARD: Policy = Policy {
        base: Duration::from_millis(100),
        max: Duration::from_secs(10),
    };

    /// A policy; `base` must be non-zero and no larger than `max`.
    pub fn new(base: Duration, max: Duration) -> Result<Policy, PolicyError> {
        if base.is_zero() {
            return Err(PolicyError::ZeroBase);
        }
        if base > max {
            return Err(PolicyError::BaseAboveMax { base, max });
        }
        Ok(Policy { base, max })
    }

    /// The same policy with its maximum lowered to `cap` (never below the
    /// base, so the result is always valid).
    pub fn capped(self, cap: Duration) -> Policy {
        Policy {
            base: self.base,
            max: self.max.min(cap).max(self.base),
        }
    }

    /// Running state at the start of the curve.
    pub fn start(self) -> Backoff {
        Backoff {
            policy: self,
            attempt: 0,
        }
    }
}

/// A policy and how far up its curve a retry loop has climbed.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: Policy,
    attempt: u32,
}

impl Backoff {
    /// [`Policy::STANDARD`] from the start of its curve.
    pub fn standard() -> Self {
        Policy::STANDARD.start()
    }

    /// The upper bound of the next delay, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.policy.base.saturating_mul(factor).min(self.policy.max)
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

    /// Waits the next delay; `false` when `cancel` fired first.
    pub async fn pause(&mut self, cancel: &CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = sleep(delay) => true,
        }
    }

    /// Back to the start of the curve, after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// How often a continuing outage is summarised in the log.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// The failures of one retry loop since its last success.
#[derive(Debug)]
pub struct Outage {
    /// What is failing, e.g. "etcd unreachable for the lease keep-alive".
    what: &'static str,
    since: Option<Instant>,
    attempts: u32,
    last_error: String,
    last_said: Option<Instant>,
}

/// An outage that ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub lasted: Duration,
    pub attempts: u32,
}

impl Outage {
    pub fn new(what: &'static str) -> Self {
        Outage {
            what,
            since: None,
            attempts: 0,
            last_error: String::new(),
            last_said: None,
        }
    }

    /// Whether the loop is failing now.
    pub fn ongoing(&self) -> bool {
        self.since.is_some()
    }

    /// Counts a failure; returns the line to log, if one is due: the first
    /// failure, then a summary at most once per [`SUMMARY_EVERY`].
    pub fn note(&mut self, error: &dyn Display) -> Option<String> {
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        self.attempts += 1;
        self.last_error = error.to_string();
        let line = match self.last_said {
            None => format!("{}: {}", self.what, self.last_error),
            Some(said) if now.duration_since(said) >= SUMMARY_EVERY => format!(
                "{} for {}; {} attempts; last error: {}",
                self.what,
                humantime::format_duration(Duration::from_secs(
                    now.duration_since(since).as_secs()
                )),
                self.attempts,
                self.last_error
            ),
            Some(_) => return None,
        };
        self.last_said = Some(now);
        Some(line)
    }

    /// [`note`](Self::note), logging the line at WARN.
    pub fn failed(&mut self, error: &dyn Display) {
        if let Some(line) = self.note(error) {
            tracing::warn!("{line}");
        }
    }

    /// A success: the outage that it ended, if there was one.
    pub fn recovered(&mut self) -> Option<Ended> {
        let since = self.since.take()?;
        let ended = Ended {
            lasted: since.elapsed(),
            attempts: std::mem::take(&mut self.attempts),
        };
        self.last_said = None;
        Some(ended)
    }
}

impl Ended {
    /// "after 3m 12s and 41 failed attempts", whole seconds.
    pub fn describe(&self) -> String {
        format!(
            "after {} and {} failed attempt{}",
            humantime::format_duration(Duration::from_secs(self.lasted.as_secs())),
            self.attempts,
            if self.attempts == 1 { "" } else { "s" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_the_growing_ceiling() {
        let mut b = Policy::new(Duration::from_millis(100), Duration::from_secs(10))
            .unwrap()
            .start();
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
    fn invalid_policies_are_refused_and_a_cap_keeps_a_policy_valid() {
        assert_eq!(
            Policy::new(Duration::ZERO, Duration::from_secs(1)),
            Err(PolicyError::ZeroBase)
        );
        assert!(matches!(
            Policy::new(Duration::from_secs(2), Duration::from_secs(1)),
            Err(PolicyError::BaseAboveMax { .. })
        ));
        let capped = Policy::STANDARD.capped(Duration::from_millis(10));
        assert_eq!(capped.start().ceiling(), Duration::from_millis(100));
        let mut b = Policy::STANDARD.capped(Duration::from_secs(2)).start();
        for _ in 0..20 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), Duration::from_secs(2));
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

    #[tokio::test(start_paused = true)]
    async fn pause_waits_the_delay_or_returns_false_on_cancel() {
        let cancel = CancellationToken::new();
        let mut b = Backoff::standard();
        let start = Instant::now();
        assert!(b.pause(&cancel).await);
        assert!(start.elapsed() <= Duration::from_millis(100));
        cancel.cancel();
        assert!(!b.pause(&cancel).await);
    }

    #[tokio::test(start_paused = true)]
    async fn an_hour_of_failures_says_the_first_then_one_summary_a_minute() {
        let mut outage = Outage::new("etcd unreachable");
        let mut lines = Vec::new();
        // A failure every 250 ms for an hour: 14 400 attempts.
        for i in 0..14_400 {
            if let Some(line) = outage.note(&format!("error {i}")) {
                lines.push(line);
            }
            tokio::time::advance(Duration::from_millis(250)).await;
        }
        assert_eq!(lines.len(), 60, "{lines:#?}");
        assert_eq!(lines[0], "etcd unreachable: error 0");
        assert_eq!(
            lines[1],
            "etcd unreachable for 1m; 241 attempts; last error: error 240"
        );
        let ended = outage.recovered().expect("an outage");
        assert_eq!(ended.attempts, 14_400);
        assert_eq!(ended.describe(), "after 1h and 14400 failed attempts");
        assert_eq!(outage.recovered(), None, "said once");
        // The next outage starts afresh with its first failure.
        assert_eq!(
            outage.note(&"again").as_deref(),
            Some("etcd unreachable: again")
        );
    }

    proptest::proptest! {
        #[test]
        fn every_delay_is_within_its_ceiling(base_ms in 1u64..5_000, extra_ms in 0u64..60_000, attempts in 0usize..100) {
            let base = Duration::from_millis(base_ms);
            let max = base + Duration::from_millis(extra_ms);
            let mut b = Policy::new(base, max).unwrap().start();
            for _ in 0..attempts {
                let ceiling = b.ceiling();
                proptest::prop_assert!(ceiling <= max && ceiling >= base);
                let d = b.next_delay();
                proptest::prop_assert!(d >= Duration::from_millis(1) && d <= ceiling);
            }
        }
    }
}
