//! Keeping one lease alive, and noticing when it is lost (contract rule 3).
//!
//! Three traps shape this loop, each verified against etcd 3.4:
//! - etcd answers a keep-alive for a revoked or expired lease with TTL 0 on a
//!   healthy stream, and etcd-client passes that through as `Ok`. So every
//!   response's TTL is checked; `LeaseKeeper::keep_alive()` returning `Ok`
//!   only means the request was queued.
//! - A paused (SIGSTOPped) member keeps the TCP connection open and never
//!   answers: the stream goes silent with no error. So every response has a
//!   deadline of TTL/3, after which the stream is torn down and reopened on
//!   the next endpoint.
//! - etcd raises small TTLs to its minimum, so the period is TTL/3 of the
//!   *granted* TTL.

use std::time::Duration;

use etcd_client::{LeaseKeepAliveStream, LeaseKeeper};
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::etcd::{Class, Etcd, EtcdError, bounded, classify};
use crate::registration::{Lease, time_to_live};

/// Why keeping the lease alive stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeepAliveEnd {
    /// Shutdown was requested; the lease is still alive.
    Cancelled,
    /// The lease is gone; the reason says how we know.
    Lost(String),
}

/// Observations of the agent, for systemd and metrics. Every method has a
/// no-op default.
pub trait Observer: Send + Sync {
    /// A keep-alive succeeded; etcd says the lease has `ttl` left.
    fn alive(&self, _ttl: Duration) {}
    /// A whole TTL passed without a successful keep-alive.
    fn unconfirmed(&self) {}
    /// The host was written with `lease`; `first` is the first time.
    fn registered(
        &self,
        _lease: crate::registration::Lease,
        _desired: &crate::registration::Desired,
        _first: bool,
    ) {
    }
    /// What the host reports changed and was written.
    fn updated(&self, _desired: &crate::registration::Desired) {}
    /// An etcd call failed; the agent retries.
    fn failed(&self, _error: &str, _class: Class) {}
    /// The host name is held by another machine; the agent retries.
    fn conflict(&self, _message: &str) {}
    /// The lease was lost; the agent re-registers.
    fn lost(&self, _why: &str) {}
    /// Shutdown began.
    fn stopping(&self) {}
}

enum StreamEnd {
    Cancelled,
    Lost,
    Broken(String),
}

/// The keep-alive period for a granted TTL: a third of it.
pub fn period(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(100))
}

/// Keeps `lease` alive until it is lost or `cancel` fires. `granted_at` is
/// when the lease was granted (or last confirmed alive).
pub async fn keep_alive(
    etcd: &Etcd,
    lease: Lease,
    granted_at: Instant,
    cancel: &CancellationToken,
    observer: &dyn Observer,
) -> KeepAliveEnd {
    let period = period(lease.ttl);
    let mut last_ok = granted_at;
    let mut idx = etcd.preferred();
    // Re-open quickly: recovery after a partition heals should take about a
    // second, not a whole period. Jitter still spreads a fleet's attempts.
    let retry_cap = period.min(Duration::from_secs(1));
    let mut backoff =
        Backoff::new(Duration::from_millis(20), retry_cap).unwrap_or_else(|_| Backoff::standard());
    let mut reported_unconfirmed = false;
    loop {
        let endpoint = etcd.endpoint(idx).to_string();
        let opened = tokio::select! {
            _ = cancel.cancelled() => return KeepAliveEnd::Cancelled,
            r = open_stream(etcd, idx, lease.id, period) => r,
        };
        match opened {
            Ok((mut keeper, mut stream)) => {
                last_ok = Instant::now();
                reported_unconfirmed = false;
                etcd.set_preferred(idx);
                backoff.reset();
                observer.alive(lease.ttl);
                tracing::debug!(%endpoint, lease = format_args!("{:x}", lease.id), "keep-alive stream open");
                match run_stream(
                    &mut keeper,
                    &mut stream,
                    period,
                    cancel,
                    &mut last_ok,
                    observer,
                )
                .await
                {
                    StreamEnd::Cancelled => return KeepAliveEnd::Cancelled,
                    StreamEnd::Lost => {
                        return KeepAliveEnd::Lost(format!(
                            "etcd ({endpoint}) answered a keep-alive with TTL 0: lease {:x} was revoked or has expired",
                            lease.id
                        ));
                    }
                    StreamEnd::Broken(why) => {
                        tracing::warn!(%endpoint, "keep-alive stream {why}; reopening it on the next endpoint");
                    }
                }
            }
            Err(e) if e.class() == Class::LeaseGone => {
                return KeepAliveEnd::Lost(format!(
                    "etcd ({endpoint}) no longer knows lease {:x}: it was revoked or has expired",
                    lease.id
                ));
            }
            Err(e) => {
                observer.failed(&e.to_string(), e.class());
                tracing::warn!(error = %e, "cannot open a keep-alive stream; trying the next endpoint")
            }
        }
        etcd.forget(idx);
        idx = etcd.next(idx);
        if last_ok.elapsed() >= lease.ttl {
            // A whole TTL without a confirmed keep-alive: we must assume we are
            // unregistered, and ask etcd whether the lease still exists (a
            // leader change extends leases, so it may).
            if !reported_unconfirmed {
                observer.unconfirmed();
                reported_unconfirmed = true;
                tracing::warn!(
                    lease = format_args!("{:x}", lease.id),
                    "no keep-alive succeeded for a whole TTL; this host may be unregistered"
                );
            }
            match time_to_live(etcd, lease.id).await {
                Ok(None) => {
                    return KeepAliveEnd::Lost(format!(
                        "no keep-alive succeeded within the TTL and etcd no longer knows lease {:x}",
                        lease.id
                    ));
                }
                Ok(Some(_)) => {}
                Err(e) => tracing::debug!(error = %e, "cannot check the lease's time to live"),
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return KeepAliveEnd::Cancelled,
            _ = sleep(backoff.next_delay()) => {}
        }
    }
}

/// Opens a keep-alive stream on one endpoint. etcd-client sends the first
/// keep-alive and waits for its answer, so success means the lease is alive.
async fn open_stream(
    etcd: &Etcd,
    idx: usize,
    lease: i64,
    within: Duration,
) -> Result<(LeaseKeeper, LeaseKeepAliveStream), EtcdError> {
    let endpoint = etcd.endpoint(idx).to_string();
    let mut client = etcd.client_at(idx).await?;
    bounded(
        &endpoint,
        "open keep-alive stream",
        within,
        client.lease_keep_alive(lease),
    )
    .await
}

async fn run_stream(
    keeper: &mut LeaseKeeper,
    stream: &mut LeaseKeepAliveStream,
    period: Duration,
    cancel: &CancellationToken,
    last_ok: &mut Instant,
    observer: &dyn Observer,
) -> StreamEnd {
    // When the answer to the keep-alive in flight is due, if one is.
    let mut due: Option<Instant> = None;
    loop {
        let next_send = *last_ok + period;
        tokio::select! {
            _ = cancel.cancelled() => return StreamEnd::Cancelled,
            // Listening all the time, not only after a send, notices a
            // broken connection (a killed member) at once.
            answer = stream.message() => match answer {
                Ok(Some(resp)) if resp.ttl() <= 0 => return StreamEnd::Lost,
                Ok(Some(resp)) => {
                    due = None;
                    *last_ok = Instant::now();
                    observer.alive(Duration::from_secs(resp.ttl().unsigned_abs()));
                }
                Ok(None) => return StreamEnd::Broken("was closed by etcd".into()),
                Err(e) if classify(&e) == Class::LeaseGone => return StreamEnd::Lost,
                Err(e) => return StreamEnd::Broken(format!("failed: {e}")),
            },
            _ = sleep_until(next_send), if due.is_none() => {
                if let Err(e) = keeper.keep_alive().await {
                    return StreamEnd::Broken(format!("cannot send: {e}"));
                }
                due = Some(Instant::now() + period);
            }
            _ = sleep_until(due.unwrap_or(next_send)), if due.is_some() => {
                return StreamEnd::Broken(format!(
                    "was silent for {} (a paused or partitioned member)",
                    humantime::format_duration(period)
                ));
            }
        }
    }
}
