//! The writer: keeps etcd's copy of this host equal to the latest
//! [`Desired`], on whatever lease the session holds.
//!
//! ```text
//!  ┌─> wait for a lease from the session
//!  │        v
//!  │   conditional write of the current Desired (conflict, takeover)
//!  │        │ error/conflict: log (quietly), jittered backoff, retry
//!  │        v
//!  │   hold: Desired changes ─> update txn (compare owner lease == ours)
//!  │         own-key suspicion ─> read back; rewrite only what is damaged
//!  └──────── the session's lease changed (lost, re-granted)
//! ```
//!
//! Every await here may be slow (a write can hang on a stalled member for
//! the whole request timeout); none of them can delay a keep-alive, which
//! the session sends from its own task. A write that finds the lease gone
//! tells the session, which grants a new one; the writer then writes every
//! key on it.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::own_keys::{self, Written};
use crate::backoff::{Backoff, Outage};
use crate::etcd::{Class, Etcd, Revision};
use crate::lease::{Lease, LeaseId, State, time_to_live};
use crate::registration::Observer;
use crate::registration::{self, Desired, RegisterError, Verified};

/// Tells the session that etcd no longer knows a lease.
pub type ReportLost = Box<dyn Fn(LeaseId) + Send + Sync>;

/// The writer's inputs.
pub struct Writer {
    pub etcd: Arc<Etcd>,
    /// The latest registration the composer wants; `None` until the first
    /// check results are in.
    pub desired: watch::Receiver<Option<Desired>>,
    pub session: watch::Receiver<State>,
    pub report_lost: ReportLost,
    pub observer: Arc<dyn Observer>,
}

/// How a registration attempt or a hold ended.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Shutdown.
    Stop,
    /// The lease is gone or replaced: wait for the session's next one.
    NewLease,
}

impl Writer {
    /// Runs until `cancel`. Returns an error only for failures that
    /// retrying cannot fix at the first registration (auth, a rejected
    /// request).
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), RegisterError> {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = self.desired.wait_for(Option::is_some) => if r.is_err() { return Ok(()) },
        }
        let mut registered_once = false;
        // The lease last written on: after it is lost, only another one will do.
        let mut previous: Option<LeaseId> = None;
        loop {
            let mut session = self.session.clone();
            let usable = |s: &State| s.lease().is_some_and(|l| Some(l.id) != previous);
            let lease = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                s = session.wait_for(usable) => match s.ok().and_then(|s| s.lease()) {
                    Some(lease) => lease,
                    // The session ended: shutdown.
                    None => return Ok(()),
                },
            };
            previous = Some(lease.id);
            let written = match self.register(lease, registered_once, &cancel).await? {
                Ok(written) => written,
                Err(Next::Stop) => return Ok(()),
                Err(Next::NewLease) => continue,
            };
            registered_once = true;
            if let Next::Stop = self.hold(lease, written, &cancel).await {
                return Ok(());
            }
        }
    }

    fn current(&self) -> Option<Desired> {
        self.desired.borrow().clone()
    }

    /// Writes every key on `lease`, retrying until it lands, the lease is
    /// replaced, or shutdown.
    async fn register(
        &self,
        lease: Lease,
        registered_once: bool,
        cancel: &CancellationToken,
    ) -> Result<Result<Written, Next>, RegisterError> {
        let mut backoff = Backoff::standard();
        let mut outage = Outage::new("cannot register this host");
        loop {
            let Some(desired) = self.current() else {
                return Ok(Err(Next::Stop));
            };
            let r = tokio::select! {
                _ = cancel.cancelled() => return Ok(Err(Next::Stop)),
                _ = lease_replaced(self.session.clone(), lease.id) => return Ok(Err(Next::NewLease)),
                r = registration::write(&self.etcd, &desired, lease.id) => r,
            };
            match r {
                Ok(at) => {
                    if let Some(ended) = outage.recovered() {
                        tracing::info!("registration went through {}", ended.describe());
                    }
                    tracing::info!(
                        host = desired.host(),
                        lease = %lease.id,
                        ttl = %humantime::format_duration(lease.ttl),
                        revision = at.map_or(0, Revision::get),
                        keys = desired.kvs.len(),
                        "{}", if registered_once { "re-registered on a new lease" } else { "registered" }
                    );
                    self.observer.registered(lease, &desired, !registered_once);
                    return Ok(Ok(Written { desired, at }));
                }
                Err(e) => {
                    match &e {
                        RegisterError::Conflict { .. } => self.observer.conflict(&e.to_string()),
                        _ => self.observer.failed(&e.to_string(), e.class()),
                    }
                    match on_register_error(e.class(), registered_once) {
                        Failure::GiveUp => return Err(e),
                        Failure::NewLease => {
                            tracing::warn!(lease = %lease.id, error = %e, "the lease vanished during registration");
                            (self.report_lost)(lease.id);
                            return Ok(Err(Next::NewLease));
                        }
                        Failure::Retry => outage.failed(&e),
                    }
                }
            }
            tokio::select! {
                _ = lease_replaced(self.session.clone(), lease.id) => return Ok(Err(Next::NewLease)),
                more = backoff.pause(cancel) => if !more { return Ok(Err(Next::Stop)) },
            }
        }
    }

    /// Keeps the keys on `lease` equal to the latest Desired until the
    /// session's lease changes or shutdown. The own-key watch runs as its
    /// own task for as long as this lease is held.
    async fn hold(&mut self, lease: Lease, written: Written, cancel: &CancellationToken) -> Next {
        let (written_tx, written_rx) = watch::channel(written);
        let (suspect_tx, mut suspects) = mpsc::channel(4);
        let watch_cancel = cancel.child_token();
        let watcher = tokio::spawn(own_keys::run(
            self.etcd.clone(),
            lease.id,
            written_rx,
            self.session.clone(),
            suspect_tx,
            watch_cancel.clone(),
        ));
        let next = self
            .hold_with(lease, &written_tx, &mut suspects, cancel)
            .await;
        watch_cancel.cancel();
        if let Err(e) = watcher.await {
            tracing::error!(error = %e, "the watch on this host's keys failed");
        }
        next
    }

    async fn hold_with(
        &mut self,
        lease: Lease,
        written: &watch::Sender<Written>,
        suspects: &mut mpsc::Receiver<String>,
        cancel: &CancellationToken,
    ) -> Next {
        let mut backoff = Backoff::standard();
        let mut outage = Outage::new("cannot update this host's keys");
        let mut desired_open = true;
        // Changes that happened between the write and now are owed at once.
        let mut owed = Owed::default();
        if self.current().as_ref() != Some(&written.borrow().desired) {
            owed.desired_changed(Instant::now());
        }
        loop {
            let due = owed.due;
            let timer = async {
                match due {
                    Some(at) => sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return Next::Stop,
                _ = lease_replaced(self.session.clone(), lease.id) => return Next::NewLease,
                changed = self.desired.changed(), if desired_open => {
                    if changed.is_err() {
                        desired_open = false;
                    } else {
                        owed.desired_changed(Instant::now());
                    }
                }
                Some(why) = suspects.recv() => {
                    match self.judge(lease.id, &why, written).await {
                        Judged::Intact => {}
                        Judged::Gone => return Next::NewLease,
                        Judged::Damaged => {
                            tracing::warn!("{why}; rewriting this host's keys");
                            owed.damaged(Instant::now());
                        }
                    }
                }
                _ = timer => {
                    let Some(target) = self.current() else {
                        owed.due = None;
                        continue;
                    };
                    let old = written.borrow().desired.clone();
                    let write = owed.fire(&target, &old);
                    let result = match write {
                        Write::Rewrite => registration::write(&self.etcd, &target, lease.id).await,
                        Write::Update => registration::update(&self.etcd, &old, &target, lease.id).await,
                        // Nothing to write (a change and its undo): the
                        // watch still waits for an answer when it asked.
                        Write::Nothing => {
                            written.send_modify(|_| {});
                            continue;
                        }
                    };
                    let outcome = Outcome::of(&result);
                    match result {
                        Ok(at) => {
                            if let Some(ended) = outage.recovered() {
                                tracing::info!("etcd takes this host's updates again {}", ended.describe());
                            }
                            tracing::info!(
                                revision = at.map_or(0, Revision::get),
                                keys = target.kvs.len(),
                                "{}", if write == Write::Rewrite { "rewrote this host's keys" } else { "updated this host's keys" }
                            );
                            self.observer.updated(&target);
                            written.send_replace(Written { desired: target, at });
                            backoff.reset();
                        }
                        Err(RegisterError::Mismatch) => {
                            tracing::warn!("the registry no longer matches this agent's lease; rewriting");
                        }
                        Err(e) if outcome == Outcome::LeaseGone => {
                            tracing::warn!(lease = %lease.id, error = %e, "the lease is gone");
                            (self.report_lost)(lease.id);
                        }
                        Err(e) => {
                            self.observer.failed(&e.to_string(), e.class());
                            outage.failed(&e);
                        }
                    }
                    if let Some(next) = owed.after(outcome, Instant::now(), || backoff.next_delay()) {
                        return next;
                    }
                }
            }
        }
    }

    /// Reads the keys back after the own-key watch suspected damage, and
    /// answers the watch (by sending `written` again) when nothing needs
    /// writing.
    async fn judge(&self, lease: LeaseId, why: &str, written: &watch::Sender<Written>) -> Judged {
        let desired = written.borrow().desired.clone();
        match registration::verify(&self.etcd, &desired, lease).await {
            Ok(Verified::Intact { at }) => {
                tracing::debug!("{why}, but this host's keys are intact");
                written.send_replace(Written { desired, at });
                return Judged::Intact;
            }
            Ok(Verified::Changed) => {}
            Err(e) => tracing::debug!(error = %e, "cannot read this host's keys back"),
        }
        match time_to_live(&self.etcd, lease).await {
            Ok(None) => {
                tracing::warn!("{why} and lease {lease} is gone");
                (self.report_lost)(lease);
                Judged::Gone
            }
            _ => Judged::Damaged,
        }
    }
}

enum Judged {
    Intact,
    Damaged,
    Gone,
}

/// What to do when a registration attempt fails.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// Retrying cannot fix it (auth, a rejected request) and the host was
    /// never registered: the agent exits with it.
    GiveUp,
    /// The lease is gone: tell the session and wait for its next one.
    NewLease,
    /// Log it (quietly), back off, and try again.
    Retry,
}

fn on_register_error(class: Class, registered_once: bool) -> Failure {
    match class {
        Class::Auth | Class::Fatal if !registered_once => Failure::GiveUp,
        Class::LeaseGone => Failure::NewLease,
        // Once registered, even auth and rejected requests are retried: the
        // keys stay on the lease meanwhile, and an operator can fix RBAC.
        _ => Failure::Retry,
    }
}

/// What a hold owes etcd: whether and when to reconcile it with the latest
/// Desired, and whether that takes a full conditional rewrite (after the
/// keys were damaged or moved off the lease) rather than an update. Its
/// transitions are pure, so they are unit-tested without etcd.
#[derive(Debug, Default, PartialEq, Eq)]
struct Owed {
    due: Option<Instant>,
    rewrite: bool,
}

/// The write a due reconcile makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    Rewrite,
    Update,
    Nothing,
}

/// A write's result, as the hold sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Written,
    /// The keys are no longer on this lease: rewrite them, now.
    Mismatch,
    LeaseGone,
    /// Anything else: try again after a backoff.
    Failed,
}

impl Outcome {
    fn of<T>(result: &Result<T, RegisterError>) -> Outcome {
        match result {
            Ok(_) => Outcome::Written,
            Err(RegisterError::Mismatch) => Outcome::Mismatch,
            Err(e) if e.class() == Class::LeaseGone => Outcome::LeaseGone,
            Err(_) => Outcome::Failed,
        }
    }
}

impl Owed {
    fn desired_changed(&mut self, now: Instant) {
        self.due = Some(now);
    }

    fn damaged(&mut self, now: Instant) {
        self.rewrite = true;
        self.due = Some(now);
    }

    /// The reconcile is due: what to write to bring etcd from `old` (what
    /// was last written) to `target`.
    fn fire(&mut self, target: &Desired, old: &Desired) -> Write {
        self.due = None;
        if self.rewrite {
            Write::Rewrite
        } else if target != old {
            Write::Update
        } else {
            Write::Nothing
        }
    }

    /// After a write: when to try again, if at all; `Some` when the hold
    /// is over.
    fn after(
        &mut self,
        outcome: Outcome,
        now: Instant,
        backoff: impl FnOnce() -> std::time::Duration,
    ) -> Option<Next> {
        match outcome {
            Outcome::Written => self.rewrite = false,
            Outcome::Mismatch => {
                self.rewrite = true;
                self.due = Some(now);
            }
            Outcome::LeaseGone => return Some(Next::NewLease),
            // A failed rewrite stays a rewrite.
            Outcome::Failed => self.due = Some(now + backoff()),
        }
        None
    }
}

/// Resolves when the session no longer holds `lease`.
async fn lease_replaced(mut session: watch::Receiver<State>, lease: LeaseId) {
    // An ended session also counts: there is no lease to write on.
    let _ = session
        .wait_for(|s| s.lease().map(|l| l.id) != Some(lease))
        .await;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::registration::desired_for_tests;

    fn never() -> Duration {
        panic!("no backoff expected here")
    }

    #[test]
    fn registration_errors_give_up_only_before_the_first_registration() {
        assert_eq!(on_register_error(Class::Auth, false), Failure::GiveUp);
        assert_eq!(on_register_error(Class::Fatal, false), Failure::GiveUp);
        assert_eq!(on_register_error(Class::Auth, true), Failure::Retry);
        assert_eq!(on_register_error(Class::Fatal, true), Failure::Retry);
        for once in [false, true] {
            assert_eq!(on_register_error(Class::LeaseGone, once), Failure::NewLease);
            assert_eq!(on_register_error(Class::Retry, once), Failure::Retry);
            assert_eq!(on_register_error(Class::Tls, once), Failure::Retry);
        }
    }

    #[test]
    fn outcomes_of_a_write() {
        assert_eq!(Outcome::of::<()>(&Ok(())), Outcome::Written);
        assert_eq!(
            Outcome::of::<()>(&Err(RegisterError::Mismatch)),
            Outcome::Mismatch
        );
        // A conflict or contention during an update is retried after a
        // backoff, never taken as a lost lease.
        assert_eq!(
            Outcome::of::<()>(&Err(RegisterError::Contended)),
            Outcome::Failed
        );
    }

    #[test]
    fn a_change_is_owed_at_once_and_written_as_an_update() {
        let old = desired_for_tests(&["web"], "passing", &[]);
        let new = desired_for_tests(&["web"], "critical", &[]);
        let now = Instant::now();
        let mut owed = Owed::default();
        assert_eq!(owed.due, None, "nothing owed while nothing changes");
        owed.desired_changed(now);
        assert_eq!(owed.due, Some(now));
        assert_eq!(owed.fire(&new, &old), Write::Update);
        assert_eq!(owed.due, None);
        assert_eq!(owed.after(Outcome::Written, now, never), None);
        assert_eq!(owed, Owed::default());
        // A change and its undo before the timer: nothing to write.
        owed.desired_changed(now);
        assert_eq!(owed.fire(&old, &old), Write::Nothing);
        assert_eq!(owed, Owed::default());
    }

    #[test]
    fn keys_off_the_lease_are_rewritten_until_a_rewrite_lands() {
        let d = desired_for_tests(&["web"], "passing", &[]);
        let now = Instant::now();
        let later = now + Duration::from_secs(2);
        let mut owed = Owed::default();
        // An update finds the keys on another lease: rewrite, now, even
        // though Desired has not changed since.
        owed.desired_changed(now);
        owed.fire(&d, &d);
        assert_eq!(owed.after(Outcome::Mismatch, now, never), None);
        assert_eq!(
            owed,
            Owed {
                due: Some(now),
                rewrite: true
            }
        );
        assert_eq!(owed.fire(&d, &d), Write::Rewrite);
        // The rewrite fails: still a rewrite, after the backoff.
        assert_eq!(
            owed.after(Outcome::Failed, now, || Duration::from_secs(2)),
            None
        );
        assert_eq!(
            owed,
            Owed {
                due: Some(later),
                rewrite: true
            }
        );
        assert_eq!(owed.fire(&d, &d), Write::Rewrite);
        // It lands: later changes are updates again.
        assert_eq!(owed.after(Outcome::Written, later, never), None);
        assert!(!owed.rewrite);
        let changed = desired_for_tests(&["web"], "warning", &[]);
        owed.desired_changed(later);
        assert_eq!(owed.fire(&changed, &d), Write::Update);
    }

    #[test]
    fn damaged_keys_are_rewritten_and_a_lost_lease_ends_the_hold() {
        let d = desired_for_tests(&["web"], "passing", &[]);
        let now = Instant::now();
        let mut owed = Owed::default();
        owed.damaged(now);
        assert_eq!(owed.due, Some(now));
        assert_eq!(owed.fire(&d, &d), Write::Rewrite);
        assert_eq!(
            owed.after(Outcome::LeaseGone, now, never),
            Some(Next::NewLease)
        );
    }
}
