//! The long-running agent: register, keep the lease alive, keep the keys
//! equal to what the host reports, re-register when the lease is lost, and
//! revoke on shutdown.
//!
//! ```text
//!  ┌─> grant lease (if none) ─> conditional write of the current Desired
//!  │        │ error/conflict: log, jittered backoff, retry
//!  │        v
//!  │   hold: keep-alive ∥ watch own keys ∥ Desired changes
//!  │        │ change: update txn (compare owner lease == ours)
//!  │        │ damage (keys deleted/overwritten): rewrite on the same lease
//!  └────────┘ lease lost: drop it, re-register with the *current* Desired
//!  cancel ─> revoke lease ─> return
//! ```
//!
//! The keep-alive stream keeps running while updates and repairs happen, so
//! a slow or failing write never costs the lease.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::etcd::{Class, Etcd};
use crate::guard::{self, WatchEnd};
use crate::lease::{self, KeepAliveEnd, Observer};
use crate::registration::{self, Desired, Lease, RegisterError};

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("etcd refused this agent: {0}")]
    Denied(RegisterError),
    #[error("etcd rejected a request: {0}")]
    Fatal(RegisterError),
}

/// The agent's inputs: where to write, with what TTL, and the latest
/// desired registration (`None` until the first check results are in).
pub struct Agent<'a> {
    pub etcd: &'a Etcd,
    pub ttl: Duration,
    pub desired: watch::Receiver<Option<Desired>>,
}

/// A registration in force.
struct Registered {
    lease: Lease,
    since: Instant,
    revision: i64,
    written: Desired,
}

enum Held {
    Cancelled,
    Lost(String),
}

impl Agent<'_> {
    /// Runs until `cancel` fires, then revokes the lease. Returns an error
    /// only for failures that retrying cannot fix at the first registration
    /// (auth, a rejected request).
    pub async fn run(
        &mut self,
        cancel: &CancellationToken,
        observer: &dyn Observer,
    ) -> Result<(), AgentError> {
        let mut backoff = Backoff::standard();
        let mut lease: Option<(Lease, Instant)> = None;
        let mut pending: Option<(i64, Instant)> = None;
        let mut registered_once = false;
        // Wait for the first complete report (first check results).
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = self.desired.wait_for(Option::is_some) => if r.is_err() { return Ok(()) },
        }
        // The registration and hold futures are boxed: polled in place they
        // made this function's poll frame deep enough to keep 45 KiB more
        // stack resident for the agent's whole life.
        loop {
            let attempt = tokio::select! {
                _ = cancel.cancelled() => break,
                r = Box::pin(self.register(&mut lease, &mut pending)) => r,
            };
            match attempt {
                Ok(mut reg) => {
                    backoff.reset();
                    tracing::info!(
                        host = reg.written.host(),
                        lease = format_args!("{:x}", reg.lease.id),
                        ttl = %humantime::format_duration(reg.lease.ttl),
                        revision = reg.revision,
                        keys = reg.written.kvs.len(),
                        "{}", if registered_once { "re-registered" } else { "registered" }
                    );
                    observer.registered(reg.lease, &reg.written, !registered_once);
                    registered_once = true;
                    match Box::pin(self.hold(&mut reg, cancel, observer)).await {
                        Held::Cancelled => break,
                        Held::Lost(why) => {
                            tracing::warn!("{why}; granting a new lease and re-registering");
                            observer.lost(&why);
                            lease = None;
                        }
                    }
                }
                Err(e) => {
                    match &e {
                        RegisterError::Conflict { .. } => observer.conflict(&e.to_string()),
                        _ => observer.failed(&e.to_string(), e.class()),
                    }
                    match e.class() {
                        Class::Auth if !registered_once => return Err(AgentError::Denied(e)),
                        Class::Fatal if !registered_once => return Err(AgentError::Fatal(e)),
                        Class::LeaseGone => {
                            tracing::warn!(error = %e, "lease vanished during registration; granting a new one");
                            lease = None;
                        }
                        _ => tracing::warn!(error = %e, "registration failed; retrying"),
                    }
                }
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = sleep(delay) => {}
            }
        }
        observer.stopping();
        if let Some((l, _)) = lease {
            revoke(self.etcd, l).await;
        }
        Ok(())
    }

    fn current(&self) -> Option<Desired> {
        self.desired.borrow().clone()
    }

    /// Grants a lease unless `lease` holds one, then writes the keys.
    /// `pending` is the id of a grant not yet known to have succeeded and
    /// when it was first tried: a retry asks for the same id, so a grant
    /// that took effect unseen is found and used, and the keep-alive timing
    /// counts from the first try, which is no later than the grant.
    async fn register(
        &self,
        lease: &mut Option<(Lease, Instant)>,
        pending: &mut Option<(i64, Instant)>,
    ) -> Result<Registered, RegisterError> {
        let Some(desired) = self.current() else {
            return Err(RegisterError::Contended);
        };
        let (l, since) = match *lease {
            Some(pair) => pair,
            None => {
                let (id, since) =
                    *pending.get_or_insert_with(|| (registration::new_lease_id(), Instant::now()));
                let l = registration::grant(self.etcd, self.ttl, id).await?;
                *pending = None;
                *lease = Some((l, since));
                (l, since)
            }
        };
        let revision = registration::write(self.etcd, &desired, l.id).await?;
        Ok(Registered {
            lease: l,
            since,
            revision,
            written: desired,
        })
    }

    /// Holds a registration: keeps the lease alive and the keys equal to the
    /// latest Desired, until shutdown or loss of the lease.
    async fn hold(
        &mut self,
        reg: &mut Registered,
        cancel: &CancellationToken,
        observer: &dyn Observer,
    ) -> Held {
        let keep_alive = lease::keep_alive(self.etcd, reg.lease, reg.since, cancel, observer);
        tokio::pin!(keep_alive);
        let mut backoff = Backoff::standard();
        // When to reconcile etcd with the latest Desired next, and whether
        // a full conditional rewrite (rather than an update) is needed.
        let mut due: Option<Instant> = None;
        let mut rewrite = false;
        let mut desired_open = true;
        // Changes that happened between the write and now.
        if self.current().as_ref() != Some(&reg.written) {
            due = Some(Instant::now());
        }
        loop {
            let watch = guard::watch(
                self.etcd,
                &reg.written,
                reg.lease.id,
                reg.revision,
                lease::period(reg.lease.ttl),
                cancel,
            );
            let timer = async {
                match due {
                    Some(at) => sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                end = &mut keep_alive => return match end {
                    KeepAliveEnd::Cancelled => Held::Cancelled,
                    KeepAliveEnd::Lost(why) => Held::Lost(why),
                },
                end = watch => match end {
                    WatchEnd::Cancelled => return Held::Cancelled,
                    WatchEnd::Damaged(why) => {
                        match registration::time_to_live(self.etcd, reg.lease.id).await {
                            Ok(None) => return Held::Lost(format!("{why} and lease {:x} is gone", reg.lease.id)),
                            _ => {
                                tracing::warn!("{why}; rewriting this host's keys");
                                rewrite = true;
                                due = Some(Instant::now());
                            }
                        }
                    }
                    WatchEnd::Compacted => {
                        match registration::verify(self.etcd, &reg.written, reg.lease.id).await {
                            Ok(Some(revision)) if revision > 0 => reg.revision = revision,
                            _ => {
                                rewrite = true;
                                due = Some(Instant::now());
                            }
                        }
                    }
                },
                changed = self.desired.changed(), if desired_open => {
                    if changed.is_err() {
                        desired_open = false;
                    } else {
                        due = Some(Instant::now());
                    }
                }
                _ = timer => {
                    due = None;
                    let Some(target) = self.current() else { continue };
                    let result = if rewrite {
                        registration::write(self.etcd, &target, reg.lease.id).await.map(Some)
                    } else if target != reg.written {
                        registration::update(self.etcd, &reg.written, &target, reg.lease.id).await.map(Some)
                    } else {
                        Ok(None)
                    };
                    match result {
                        Ok(Some(revision)) => {
                            tracing::info!(
                                revision,
                                keys = target.kvs.len(),
                                "{}", if rewrite { "rewrote this host's keys" } else { "updated this host's keys" }
                            );
                            observer.updated(&target);
                            reg.written = target;
                            reg.revision = revision;
                            rewrite = false;
                            backoff.reset();
                        }
                        Ok(None) => {}
                        Err(RegisterError::Mismatch) => {
                            tracing::warn!("the registry no longer matches this agent's lease; rewriting");
                            rewrite = true;
                            due = Some(Instant::now());
                        }
                        Err(e) if e.class() == Class::LeaseGone => {
                            return Held::Lost(format!("lease {:x} is gone ({e})", reg.lease.id));
                        }
                        Err(e) => {
                            let delay = backoff.next_delay();
                            tracing::warn!(error = %e, retry_in = ?delay, "could not update this host's keys");
                            due = Some(Instant::now() + delay);
                        }
                    }
                }
            }
        }
    }
}

async fn revoke(etcd: &Etcd, lease: Lease) {
    match registration::revoke(etcd, lease.id).await {
        Ok(()) => tracing::info!(
            lease = format_args!("{:x}", lease.id),
            "lease revoked; this host's keys are gone"
        ),
        Err(e) => tracing::error!(
            error = %e,
            "could not revoke the lease; this host's keys expire within {}",
            humantime::format_duration(lease.ttl)
        ),
    }
}
