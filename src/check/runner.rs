//! Running a set of checks on their intervals and publishing what is worth
//! reporting, as one snapshot on a watch channel.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Spec, Status, Tracker, run_once};

/// The reported state of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reported {
    pub status: Status,
    pub output: String,
    pub since: SystemTime,
}

/// What the checks say, as one value.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    pub results: BTreeMap<String, Reported>,
    /// Set while a check with `deregister_after` has been critical that long.
    pub withdraw: Option<String>,
    /// Every check has produced at least one result.
    pub complete: bool,
}

impl Snapshot {
    /// The host's health: the worst status of all checks, passing with none.
    pub fn health(&self) -> Status {
        self.results
            .values()
            .map(|r| r.status)
            .max()
            .unwrap_or(Status::Passing)
    }
}

struct Entry {
    spec: Spec,
    tracker: Tracker,
}

struct Shared {
    entries: BTreeMap<String, Entry>,
    tx: watch::Sender<Snapshot>,
}

impl Shared {
    fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let withdraw = self.entries.values().find_map(|e| {
            let after = e.spec.deregister_after?;
            let since = e.tracker.critical_since?;
            (e.tracker.ran && now.duration_since(since) >= after).then(|| {
                format!(
                    "check {:?} has been critical for over {}",
                    e.spec.name,
                    humantime::format_duration(after)
                )
            })
        });
        Snapshot {
            results: self
                .entries
                .iter()
                .map(|(name, e)| {
                    (
                        name.clone(),
                        Reported {
                            status: e.tracker.status,
                            output: e.tracker.output.clone(),
                            since: e.tracker.since,
                        },
                    )
                })
                .collect(),
            withdraw,
            complete: self.entries.values().all(|e| e.tracker.ran),
        }
    }

    fn publish(&self) {
        let next = self.snapshot();
        self.tx.send_if_modified(|cur| {
            if *cur == next {
                false
            } else {
                *cur = next;
                true
            }
        });
    }
}

/// A running set of checks.
pub struct CheckSet {
    pub rx: watch::Receiver<Snapshot>,
    cancel: CancellationToken,
    /// Keeps the sender alive also when there are no checks, so that
    /// `rx.changed()` pends instead of failing.
    _shared: Arc<Mutex<Shared>>,
}

/// Where the runner reports each run, for metrics: all it needs of them.
pub trait CheckMetrics: Send + Sync {
    /// Check `check` ran, taking `took`; its status is now `status`.
    fn check_ran(&self, check: &str, status: super::Status, took: Duration);
}

impl CheckSet {
    /// Starts every check on `tracker`. Checks whose spec is unchanged from
    /// `previous` keep their reported state (a reload does not reset them).
    pub fn start(
        specs: &[Spec],
        output_refresh: Duration,
        previous: Option<(&[Spec], &Snapshot)>,
        parent: &CancellationToken,
        tasks: &TaskTracker,
        metrics: Option<Arc<dyn CheckMetrics>>,
    ) -> CheckSet {
        let http = super::http::Client::default();
        let now = Instant::now();
        let wall = SystemTime::now();
        let entries = specs
            .iter()
            .map(|spec| {
                let mut tracker = Tracker::new(spec.thresholds, now, wall);
                if let Some((old_specs, snap)) = previous
                    && old_specs.contains(spec)
                    && let Some(r) = snap.results.get(&spec.name)
                {
                    tracker.resume(r.status, r.output.clone(), r.since, now);
                }
                (
                    spec.name.clone(),
                    Entry {
                        spec: spec.clone(),
                        tracker,
                    },
                )
            })
            .collect();
        let (tx, rx) = watch::channel(Snapshot::default());
        let shared = Arc::new(Mutex::new(Shared { entries, tx }));
        if let Ok(s) = shared.lock() {
            s.publish();
        }
        let cancel = parent.child_token();
        for spec in specs {
            let shared = Arc::clone(&shared);
            let spec = spec.clone();
            let http = http.clone();
            let cancel = cancel.clone();
            let metrics = metrics.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(spec.interval);
                tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let started = Instant::now();
                    let outcome = tokio::select! {
                        _ = cancel.cancelled() => return,
                        o = run_once(&spec, &http) => o,
                    };
                    let took = started.elapsed();
                    tracing::debug!(check = %spec.name, status = %outcome.status, ?took, "check ran");
                    let Ok(mut s) = shared.lock() else { return };
                    if let Some(e) = s.entries.get_mut(&spec.name) {
                        let before = e.tracker.status;
                        e.tracker.observe(
                            &outcome,
                            Instant::now(),
                            SystemTime::now(),
                            output_refresh,
                        );
                        if let Some(m) = &metrics {
                            m.check_ran(&spec.name, e.tracker.status, took);
                        }
                        if before != e.tracker.status {
                            tracing::info!(
                                check = %spec.name,
                                from = %before,
                                to = %e.tracker.status,
                                output = %printable(outcome.output.lines().next().unwrap_or("")),
                                "check status changed"
                            );
                        }
                    }
                    // Published after every run, not only on a change: a
                    // deregister_after deadline may have passed. An unchanged
                    // snapshot is not sent.
                    s.publish();
                }
            });
        }
        CheckSet {
            rx,
            cancel,
            _shared: shared,
        }
    }

    /// Stops every check of this set.
    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

impl Drop for CheckSet {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A check's output line as it may go into a text log: control bytes
/// (escape sequences, carriage returns) escaped, so a check cannot forge
/// log lines or drive the reader's terminal.
pub fn printable(line: &str) -> String {
    line.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

#[cfg(test)]
mod printable_tests {
    use super::printable;

    #[test]
    fn control_bytes_are_escaped_and_text_is_kept() {
        assert_eq!(printable("ok: 3 of 3 ✓"), "ok: 3 of 3 ✓");
        assert_eq!(
            printable("\u{1b}[31mred\rINFO forged"),
            "\\u{1b}[31mred\\rINFO forged"
        );
    }
}
