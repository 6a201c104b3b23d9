//! Local health checks (design.md section 3): what a check is, how one run
//! becomes a raw status, and how Consul-style thresholds turn raw results
//! into the status that is reported.
//!
//! Invariant: the reported state of a check changes only when its status
//! changes, or when its output changed and the last output write is older
//! than `output_refresh`. Everything downstream writes to etcd only on such
//! a change, so a stable host causes no raft writes.

mod exec;
pub mod http;
mod runner;
mod tcp;

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::time::Instant;

pub use runner::{CheckMetrics, CheckSet, Reported, Snapshot};

/// Output kept per check result: stdout+stderr, or the HTTP status line and
/// the head of the body.
pub use crate::child::MAX_OUTPUT;

/// A check's status. The order is "worse is greater", so the host's health
/// is the maximum over its checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Passing,
    Warning,
    Critical,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Passing => "passing",
            Status::Warning => "warning",
            Status::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "passing" => Some(Status::Passing),
            "warning" => Some(Status::Warning),
            "critical" => Some(Status::Critical),
            _ => None,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a check runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A program and its arguments, run without a shell.
    Exec(Vec<String>),
    /// A command line run by `/bin/sh -c` (explicit opt-in).
    Shell(String),
    /// An http:// or https:// URL fetched with GET.
    Http(String),
    /// A `host:port` to connect to.
    Tcp(String),
}

/// Consul's thresholds: consecutive results needed before a status changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub success_before_passing: u32,
    pub failures_before_warning: u32,
    pub failures_before_critical: u32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            success_before_passing: 1,
            failures_before_warning: 1,
            failures_before_critical: 1,
        }
    }
}

/// One validated check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub name: String,
    pub kind: Kind,
    pub interval: Duration,
    pub timeout: Duration,
    pub thresholds: Thresholds,
    pub deregister_after: Option<Duration>,
}

/// The result of one run, before thresholds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: Status,
    pub output: String,
}

impl Outcome {
    pub fn new(status: Status, output: impl Into<String>) -> Self {
        Self {
            status,
            output: cap_output(output.into()),
        }
    }
}

/// Cuts to [`MAX_OUTPUT`] bytes on a character boundary.
pub fn cap_output(s: String) -> String {
    crate::child::cap_text(s, MAX_OUTPUT)
}

/// Runs a check once, bounded by its timeout.
pub async fn run_once(spec: &Spec, http: &http::Client) -> Outcome {
    match &spec.kind {
        Kind::Exec(argv) => exec::run(argv, spec.timeout).await,
        Kind::Shell(line) => {
            let argv = vec!["/bin/sh".to_string(), "-c".to_string(), line.clone()];
            exec::run(&argv, spec.timeout).await
        }
        Kind::Http(url) => http::run(http, url, spec.timeout).await,
        Kind::Tcp(addr) => tcp::run(addr, spec.timeout).await,
    }
}

/// The threshold state machine of one check. Pure: time is passed in.
#[derive(Debug, Clone)]
pub struct Tracker {
    thresholds: Thresholds,
    /// The reported status; `critical` until the first result.
    pub status: Status,
    /// The reported output.
    pub output: String,
    /// Wall-clock time of the last status change.
    pub since: SystemTime,
    /// Since when the reported status has been critical.
    pub critical_since: Option<Instant>,
    ok_streak: u32,
    fail_streak: u32,
    output_reported_at: Instant,
    /// Whether any result has been seen yet.
    pub ran: bool,
}

impl Tracker {
    pub fn new(thresholds: Thresholds, now: Instant, wall: SystemTime) -> Self {
        Self {
            thresholds,
            status: Status::Critical,
            output: "no result yet".into(),
            since: wall,
            critical_since: Some(now),
            ok_streak: 0,
            fail_streak: 0,
            output_reported_at: now,
            ran: false,
        }
    }

    /// Continues from a previously reported state (after a reload).
    pub fn resume(&mut self, status: Status, output: String, since: SystemTime, now: Instant) {
        self.status = status;
        self.output = output;
        self.since = since;
        self.critical_since = (status == Status::Critical).then_some(now);
        self.output_reported_at = now;
        self.ran = true;
    }

    /// Feeds one raw result. Returns true when the reported state changed
    /// (and so is worth a write).
    pub fn observe(
        &mut self,
        raw: &Outcome,
        now: Instant,
        wall: SystemTime,
        output_refresh: Duration,
    ) -> bool {
        let first = !self.ran;
        self.ran = true;
        let t = self.thresholds;
        let next = match raw.status {
            Status::Passing => {
                self.ok_streak = self.ok_streak.saturating_add(1);
                self.fail_streak = 0;
                if self.ok_streak >= t.success_before_passing {
                    Status::Passing
                } else {
                    self.status
                }
            }
            bad => {
                self.fail_streak = self.fail_streak.saturating_add(1);
                self.ok_streak = 0;
                if bad == Status::Critical && self.fail_streak >= t.failures_before_critical {
                    Status::Critical
                } else if self.fail_streak >= t.failures_before_warning
                    && (self.status == Status::Passing || bad == Status::Warning)
                {
                    Status::Warning
                } else {
                    self.status
                }
            }
        };
        if next != self.status {
            self.status = next;
            self.since = wall;
            self.critical_since = (next == Status::Critical).then_some(now);
            self.output = raw.output.clone();
            self.output_reported_at = now;
            return true;
        }
        if raw.output != self.output
            && (first || now.duration_since(self.output_reported_at) >= output_refresh)
        {
            self.output = raw.output.clone();
            self.output_reported_at = now;
            return true;
        }
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFRESH: Duration = Duration::from_secs(300);

    fn out(status: Status, text: &str) -> Outcome {
        Outcome::new(status, text)
    }

    fn tracker(sbp: u32, fbw: u32, fbc: u32) -> Tracker {
        Tracker::new(
            Thresholds {
                success_before_passing: sbp,
                failures_before_warning: fbw,
                failures_before_critical: fbc,
            },
            Instant::now(),
            SystemTime::now(),
        )
    }

    fn feed(t: &mut Tracker, s: Status) -> (bool, Status) {
        let changed = t.observe(&out(s, "x"), Instant::now(), SystemTime::now(), REFRESH);
        (changed, t.status)
    }

    #[tokio::test(start_paused = true)]
    async fn defaults_follow_every_result() {
        let mut t = tracker(1, 1, 1);
        assert_eq!(t.status, Status::Critical, "a check starts critical");
        assert_eq!(feed(&mut t, Status::Passing), (true, Status::Passing));
        assert_eq!(feed(&mut t, Status::Passing), (false, Status::Passing));
        assert_eq!(feed(&mut t, Status::Warning), (true, Status::Warning));
        assert_eq!(feed(&mut t, Status::Critical), (true, Status::Critical));
        assert_eq!(feed(&mut t, Status::Passing), (true, Status::Passing));
    }

    #[tokio::test(start_paused = true)]
    async fn thresholds_need_consecutive_results() {
        let mut t = tracker(3, 2, 4);
        // First result is always reported, even if the status stays critical.
        assert_eq!(feed(&mut t, Status::Passing), (true, Status::Critical));
        assert_eq!(feed(&mut t, Status::Passing), (false, Status::Critical));
        assert_eq!(feed(&mut t, Status::Passing), (true, Status::Passing));
        // One failure is not enough for warning; a success resets the streak.
        assert_eq!(feed(&mut t, Status::Critical), (false, Status::Passing));
        assert_eq!(feed(&mut t, Status::Passing), (false, Status::Passing));
        assert_eq!(feed(&mut t, Status::Critical), (false, Status::Passing));
        assert_eq!(feed(&mut t, Status::Critical), (true, Status::Warning));
        assert_eq!(feed(&mut t, Status::Critical), (false, Status::Warning));
        assert_eq!(feed(&mut t, Status::Critical), (true, Status::Critical));
        // Back to passing takes three successes again.
        assert_eq!(feed(&mut t, Status::Passing), (false, Status::Critical));
        assert_eq!(feed(&mut t, Status::Passing), (false, Status::Critical));
        assert_eq!(feed(&mut t, Status::Passing), (true, Status::Passing));
    }

    #[tokio::test(start_paused = true)]
    async fn warning_results_never_make_a_check_critical() {
        let mut t = tracker(1, 1, 1);
        feed(&mut t, Status::Passing);
        for _ in 0..5 {
            feed(&mut t, Status::Warning);
        }
        assert_eq!(t.status, Status::Warning);
    }

    #[tokio::test(start_paused = true)]
    async fn output_alone_is_reported_at_most_once_per_refresh() {
        let mut t = tracker(1, 1, 1);
        let now = Instant::now();
        assert!(t.observe(
            &out(Status::Passing, "load 0.1"),
            now,
            SystemTime::now(),
            REFRESH
        ));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!t.observe(
            &out(Status::Passing, "load 0.2"),
            Instant::now(),
            SystemTime::now(),
            REFRESH
        ));
        assert_eq!(t.output, "load 0.1");
        tokio::time::advance(REFRESH).await;
        assert!(t.observe(
            &out(Status::Passing, "load 0.3"),
            Instant::now(),
            SystemTime::now(),
            REFRESH
        ));
        assert_eq!(t.output, "load 0.3");
        // A status change carries its output at once.
        assert!(t.observe(
            &out(Status::Critical, "down"),
            Instant::now(),
            SystemTime::now(),
            REFRESH
        ));
        assert_eq!(t.output, "down");
    }

    #[tokio::test(start_paused = true)]
    async fn critical_since_tracks_the_critical_period() {
        let mut t = tracker(1, 1, 1);
        feed(&mut t, Status::Passing);
        assert!(t.critical_since.is_none());
        feed(&mut t, Status::Critical);
        let since = t.critical_since.expect("critical");
        tokio::time::advance(Duration::from_secs(30)).await;
        feed(&mut t, Status::Critical);
        assert_eq!(
            t.critical_since,
            Some(since),
            "still the same critical period"
        );
        feed(&mut t, Status::Passing);
        assert!(t.critical_since.is_none());
    }

    #[test]
    fn output_is_capped_on_a_char_boundary() {
        let s = "é".repeat(3000);
        let capped = cap_output(s);
        assert!(capped.len() <= MAX_OUTPUT);
        assert!(capped.chars().all(|c| c == 'é'));
    }
}
