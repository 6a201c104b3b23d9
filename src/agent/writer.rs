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
                    match e.class() {
                        Class::Auth | Class::Fatal if !registered_once => return Err(e),
                        Class::LeaseGone => {
                            tracing::warn!(lease = %lease.id, error = %e, "the lease vanished during registration");
                            (self.report_lost)(lease.id);
                            return Ok(Err(Next::NewLease));
                        }
                        _ => outage.failed(&e),
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
        // When to reconcile etcd with the latest Desired next, and whether
        // a full conditional rewrite (rather than an update) is needed.
        let mut due: Option<Instant> = None;
        let mut rewrite = false;
        let mut desired_open = true;
        // Changes that happened between the write and now.
        if self.current().as_ref() != Some(&written.borrow().desired) {
            due = Some(Instant::now());
        }
        loop {
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
                        due = Some(Instant::now());
                    }
                }
                Some(why) = suspects.recv() => {
                    match self.judge(lease.id, &why, written).await {
                        Judged::Intact => {}
                        Judged::Gone => return Next::NewLease,
                        Judged::Damaged => {
                            tracing::warn!("{why}; rewriting this host's keys");
                            rewrite = true;
                            due = Some(Instant::now());
                        }
                    }
                }
                _ = timer => {
                    due = None;
                    let Some(target) = self.current() else { continue };
                    let old = written.borrow().desired.clone();
                    let result = if rewrite {
                        registration::write(&self.etcd, &target, lease.id).await.map(Some)
                    } else if target != old {
                        registration::update(&self.etcd, &old, &target, lease.id).await.map(Some)
                    } else {
                        Ok(None)
                    };
                    match result {
                        Ok(Some(at)) => {
                            if let Some(ended) = outage.recovered() {
                                tracing::info!("etcd takes this host's updates again {}", ended.describe());
                            }
                            tracing::info!(
                                revision = at.map_or(0, Revision::get),
                                keys = target.kvs.len(),
                                "{}", if rewrite { "rewrote this host's keys" } else { "updated this host's keys" }
                            );
                            self.observer.updated(&target);
                            written.send_replace(Written { desired: target, at });
                            rewrite = false;
                            backoff.reset();
                        }
                        Ok(None) => {
                            // Nothing to write (a change and its undo): the
                            // watch still waits for an answer when it asked.
                            written.send_modify(|_| {});
                        }
                        Err(RegisterError::Mismatch) => {
                            tracing::warn!("the registry no longer matches this agent's lease; rewriting");
                            rewrite = true;
                            due = Some(Instant::now());
                        }
                        Err(e) if e.class() == Class::LeaseGone => {
                            tracing::warn!(lease = %lease.id, error = %e, "the lease is gone");
                            (self.report_lost)(lease.id);
                            return Next::NewLease;
                        }
                        Err(e) => {
                            self.observer.failed(&e.to_string(), e.class());
                            outage.failed(&e);
                            due = Some(Instant::now() + backoff.next_delay());
                        }
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

/// Resolves when the session no longer holds `lease`.
async fn lease_replaced(mut session: watch::Receiver<State>, lease: LeaseId) {
    // An ended session also counts: there is no lease to write on.
    let _ = session
        .wait_for(|s| s.lease().map(|l| l.id) != Some(lease))
        .await;
}
