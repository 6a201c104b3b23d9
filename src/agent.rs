//! The long-running agent: register, keep the lease alive, repair or
//! re-register when anything is lost, and revoke on shutdown.
//!
//! The loop is a small state machine driven by one cancellation token:
//!
//! ```text
//!  ┌─> grant lease (if none) ─> conditional write ─> keep-alive ∥ watch own keys
//!  │        │ error/conflict: log, jittered backoff        │
//!  │        └──────────────────────────────────────────────┤ lost: drop lease
//!  └───────────────────────────────────────────────────────┘ damaged: verify, rewrite
//!  cancel ─> revoke lease ─> return
//! ```

use std::time::Duration;

use tokio::time::{Instant, sleep};
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

/// Everything the agent needs, resolved and validated beforehand.
pub struct Agent<'a> {
    pub etcd: &'a Etcd,
    pub desired: Desired,
    pub ttl: Duration,
}

/// What one registration attempt produced.
struct Registered {
    lease: Lease,
    since: Instant,
    revision: i64,
}

impl Agent<'_> {
    /// Runs until `cancel` fires, then revokes the lease. Returns an error
    /// only for failures that retrying cannot fix (auth, a rejected request).
    pub async fn run(
        &self,
        cancel: &CancellationToken,
        observer: &mut dyn Observer,
    ) -> Result<(), AgentError> {
        let mut backoff = Backoff::standard();
        let mut lease: Option<(Lease, Instant)> = None;
        let mut first = true;
        loop {
            let attempt = tokio::select! {
                _ = cancel.cancelled() => break,
                r = self.register(&mut lease) => r,
            };
            match attempt {
                Ok(reg) => {
                    backoff.reset();
                    tracing::info!(
                        host = self.desired.host(),
                        lease = format_args!("{:x}", reg.lease.id),
                        ttl = %humantime::format_duration(reg.lease.ttl),
                        revision = reg.revision,
                        keys = self.desired.kvs.len(),
                        "{}", if first { "registered" } else { "re-registered" }
                    );
                    first = false;
                    match self.hold(&reg, cancel, observer).await {
                        Held::Cancelled => break,
                        Held::Lost(why) => {
                            tracing::warn!("{why}; granting a new lease and re-registering");
                            lease = None;
                        }
                        Held::Repair(why) => {
                            tracing::warn!("{why}; rewriting this host's keys");
                            continue;
                        }
                    }
                }
                Err(e) => match e.class() {
                    Class::Auth => return Err(AgentError::Denied(e)),
                    Class::Fatal => return Err(AgentError::Fatal(e)),
                    Class::LeaseGone => {
                        tracing::warn!(error = %e, "lease vanished during registration; granting a new one");
                        lease = None;
                    }
                    Class::Retry => {
                        tracing::warn!(error = %e, "registration failed; retrying");
                    }
                },
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = sleep(delay) => {}
            }
        }
        if let Some((l, _)) = lease {
            self.revoke(l).await;
        }
        Ok(())
    }

    async fn register(
        &self,
        lease: &mut Option<(Lease, Instant)>,
    ) -> Result<Registered, RegisterError> {
        let (l, since) = match *lease {
            Some(pair) => pair,
            None => {
                let since = Instant::now();
                let l = registration::grant(self.etcd, self.ttl).await?;
                *lease = Some((l, since));
                (l, since)
            }
        };
        let revision = registration::write(self.etcd, &self.desired, l.id).await?;
        Ok(Registered {
            lease: l,
            since,
            revision,
        })
    }

    async fn hold(
        &self,
        reg: &Registered,
        cancel: &CancellationToken,
        observer: &mut dyn Observer,
    ) -> Held {
        tokio::select! {
            end = lease::keep_alive(self.etcd, reg.lease, reg.since, cancel, observer) => match end {
                KeepAliveEnd::Cancelled => Held::Cancelled,
                KeepAliveEnd::Lost(why) => Held::Lost(why),
            },
            end = guard::watch(self.etcd, &self.desired, reg.lease.id, reg.revision, cancel) => match end {
                WatchEnd::Cancelled => Held::Cancelled,
                WatchEnd::Damaged(why) => self.diagnose(reg.lease, why).await,
                WatchEnd::Compacted => {
                    match registration::verify(self.etcd, &self.desired, reg.lease.id).await {
                        Ok(true) => Box::pin(self.hold_after_verify(reg, cancel, observer)).await,
                        Ok(false) => self.diagnose(reg.lease, "the keys differ from what this agent wrote".into()).await,
                        Err(e) => self.diagnose(reg.lease, format!("cannot verify the keys ({e})")).await,
                    }
                }
            },
        }
    }

    /// After a compaction with everything intact: keep the lease alive and
    /// watch again from the current revision.
    async fn hold_after_verify(
        &self,
        reg: &Registered,
        cancel: &CancellationToken,
        observer: &mut dyn Observer,
    ) -> Held {
        let current = match self
            .etcd
            .call(
                "read revision",
                |mut c| async move { c.get("\0", None).await },
            )
            .await
        {
            Ok(r) => r.header().map(|h| h.revision()).unwrap_or(reg.revision),
            Err(_) => reg.revision,
        };
        let next = Registered {
            lease: reg.lease,
            since: Instant::now(),
            revision: current,
        };
        self.hold(&next, cancel, observer).await
    }

    /// Our keys were touched: is the lease itself gone, or just keys?
    async fn diagnose(&self, lease: Lease, why: String) -> Held {
        match registration::time_to_live(self.etcd, lease.id).await {
            Ok(None) => Held::Lost(format!("{why} and lease {:x} is gone", lease.id)),
            Ok(Some(_)) => Held::Repair(why),
            // Cannot tell: rewriting with the same lease is safe either way;
            // a lost lease will show up as LeaseGone there.
            Err(_) => Held::Repair(why),
        }
    }

    async fn revoke(&self, lease: Lease) {
        match registration::revoke(self.etcd, lease.id).await {
            Ok(()) => tracing::info!(
                host = self.desired.host(),
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
}

enum Held {
    Cancelled,
    Lost(String),
    Repair(String),
}
