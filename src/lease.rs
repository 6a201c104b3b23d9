//! The lease session: one task that owns this host's lease. It grants it,
//! keeps it alive, notices its loss, grants a new one, and revokes it on
//! shutdown; shaped like etcd's `concurrency.Session`.
//!
//! Invariant: **nothing the agent awaits can delay a keep-alive.** The
//! session runs as its own task and awaits nothing but its own etcd calls,
//! so a write that hangs on a stalled member, a repair, a check run or a
//! reload runs beside it. (A keep-alive that waits behind a slow write
//! loses the lease: with a 6 s TTL and a 5 s request timeout, one hung
//! transaction is enough.) The runtime is single-threaded, so what blocks
//! the thread without awaiting does delay it: nothing on the agent's path
//! is meant to, and the one synchronous call there, the user and group
//! lookups of a SIGHUP reload, reads local files (or NSS) for milliseconds.
//!
//! Others see the session through a watch channel of [`State`]: `Granting`
//! while there is no lease in force, `Held` with the lease and the endpoint
//! its keep-alive stream runs on. A change of lease id *is* the lost signal.
//!
//! Three traps shape the keep-alive loop, each verified against etcd 3.4
//! and 3.5 (`tests/it/etcd_errors.rs`):
//! - etcd answers a keep-alive for a revoked or expired lease with TTL 0 on
//!   a healthy stream, and etcd-client passes that through as `Ok`. So every
//!   answer's TTL is checked; `LeaseKeeper::keep_alive()` returning `Ok`
//!   only means the request was queued.
//! - A paused (SIGSTOPped) member keeps the TCP connection open and never
//!   answers: the stream goes silent with no error. So every answer has a
//!   deadline of TTL/3, after which the stream is reopened on the next
//!   endpoint.
//! - etcd raises small TTLs to its minimum, so the period is a third of the
//!   *granted* TTL.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{LeaseGrantOptions, LeaseKeepAliveStream, LeaseKeeper};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::backoff::{Backoff, Ended, Outage, Policy};
use crate::etcd::{Class, Etcd, EtcdError, Rotation, bounded, classify};

/// An etcd lease id. etcd never grants 0 (its "no lease"), so "no lease"
/// is `Option<LeaseId>`, never a 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct LeaseId(i64);

impl LeaseId {
    /// The id of a key's lease as etcd reports it; `None` for 0 (no lease).
    pub fn of(raw: i64) -> Option<LeaseId> {
        (raw != 0).then_some(LeaseId(raw))
    }

    /// A fresh id for [`grant`]. etcd takes a client's choice of id; 63
    /// random bits do not collide.
    pub fn random() -> LeaseId {
        LeaseId(rand::random_range(1..i64::MAX))
    }

    /// The id on the wire.
    pub fn get(self) -> i64 {
        self.0
    }
}

impl std::fmt::Display for LeaseId {
    /// Hex, as etcdctl prints lease ids.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A granted lease. `ttl` is what etcd granted, which may be more than was
/// asked for: etcd raises small TTLs to its minimum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    pub ttl: Duration,
}

/// The keep-alive period for a granted TTL: a third of it.
pub fn period(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(100))
}

/// Grants lease `id` with `ttl`.
///
/// A grant whose answer was lost (a timeout, a connection cut) may have
/// been granted all the same. Retried with the same id, it finds "lease
/// already exists" and uses that lease, which can only be ours, instead of
/// granting a second one while the first expires unused (each expiry is a
/// raft proposal, and a storm of timeouts makes many). Callers keep `id`
/// across retries and draw a new one once a grant has succeeded.
pub async fn grant(etcd: &Etcd, ttl: Duration, id: LeaseId) -> Result<Lease, EtcdError> {
    let secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    // Twice at most: again only if the lease found under `id` expired
    // before it could be looked at, which frees the id.
    let mut tries = 0;
    loop {
        tries += 1;
        let grant = etcd
            .call("grant lease", |mut c| async move {
                c.lease_grant(secs, Some(LeaseGrantOptions::new().with_id(id.get())))
                    .await
            })
            .await;
        match grant {
            Ok(resp) => return Ok(granted(id, ttl, resp.ttl())),
            Err(e) if e.lease_exists() => {
                let resp = etcd
                    .call("lease time-to-live", |mut c| async move {
                        c.lease_time_to_live(id.get(), None).await
                    })
                    .await?;
                if resp.ttl() > 0 {
                    tracing::debug!(
                        lease = %id,
                        "an earlier try of this grant took effect; using its lease"
                    );
                    return Ok(granted(id, ttl, resp.granted_ttl()));
                }
                if tries == 2 {
                    // Something else keeps granting this very id: not a
                    // reason to give up, so worth a retry.
                    return Err(match e {
                        EtcdError::Call {
                            endpoint,
                            what,
                            cause,
                            ..
                        } => EtcdError::Call {
                            endpoint,
                            what,
                            class: Class::Retry,
                            cause,
                        },
                        other => other,
                    });
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// The lease etcd granted, warning when its TTL is not the one asked for.
fn granted(id: LeaseId, requested: Duration, secs: i64) -> Lease {
    let ttl = Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    if ttl != requested {
        tracing::warn!(
            requested = %humantime::format_duration(requested),
            granted = %humantime::format_duration(ttl),
            "etcd granted a different TTL than requested (it raises TTLs below its minimum); using the granted one"
        );
    }
    Lease { id, ttl }
}

/// Revokes a lease; a lease that is already gone counts as revoked.
pub async fn revoke(etcd: &Etcd, lease: LeaseId) -> Result<(), EtcdError> {
    match etcd
        .call("revoke lease", |mut c| async move {
            c.lease_revoke(lease.get()).await
        })
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.class() == Class::LeaseGone => Ok(()),
        Err(e) => Err(e),
    }
}

/// Remaining TTL of a lease, or `None` when it no longer exists.
pub async fn time_to_live(etcd: &Etcd, lease: LeaseId) -> Result<Option<Duration>, EtcdError> {
    match etcd
        .call("lease time-to-live", |mut c| async move {
            c.lease_time_to_live(lease.get(), None).await
        })
        .await
    {
        Ok(r) if r.ttl() > 0 => Ok(Some(Duration::from_secs(r.ttl().unsigned_abs()))),
        Ok(_) => Ok(None),
        Err(e) if e.class() == Class::LeaseGone => Ok(None),
        Err(e) => Err(e),
    }
}

/// What the session observes of its lease, for systemd and metrics. Every
/// method has a no-op default. The writer's observations extend it
/// ([`crate::registration::Observer`]).
pub trait LeaseObserver: Send + Sync {
    /// A keep-alive succeeded; etcd says the lease has `ttl` left.
    fn alive(&self, _ttl: Duration) {}
    /// A whole TTL passed without a successful keep-alive.
    fn unconfirmed(&self) {}
    /// etcd answers again after an outage, and `lease` lived through it.
    fn recovered(&self, _lease: Lease, _outage: &Ended) {}
    /// An etcd call failed; it is retried.
    fn failed(&self, _error: &str, _class: Class) {}
    /// The lease was lost; the agent re-registers.
    fn lost(&self, _why: &str) {}
}

/// What the session holds, as the others see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No lease in force: the first grant, or a new one after a loss.
    Granting,
    /// `lease` is in force. Its keep-alive stream runs on `endpoint`;
    /// `confirmed` is false once a whole TTL passed without a keep-alive.
    Held {
        lease: Lease,
        endpoint: usize,
        confirmed: bool,
    },
}

impl State {
    pub fn lease(&self) -> Option<Lease> {
        match self {
            State::Granting => None,
            State::Held { lease, .. } => Some(*lease),
        }
    }
}

/// Why a session gave up: only before its first grant, for failures that
/// retrying cannot fix (auth, a rejected request).
#[derive(Debug, thiserror::Error)]
#[error("cannot grant a lease: {0}")]
pub struct SessionError(pub EtcdError);

/// The handle of a running lease session.
pub struct Session {
    state: watch::Receiver<State>,
    lost: mpsc::UnboundedSender<LeaseId>,
    cancel: CancellationToken,
    /// `None` once the task's end was seen.
    task: Option<JoinHandle<Result<(), SessionError>>>,
}

/// Tells a session that etcd no longer knows a lease (a write or a
/// time-to-live said so). If it is still the session's lease, the session
/// grants a new one at once instead of at its next keep-alive. Other tasks
/// keep one ([`Session::reporter`]).
#[derive(Clone)]
pub struct LostReporter(mpsc::UnboundedSender<LeaseId>);

impl LostReporter {
    pub fn report(&self, lease: LeaseId) {
        // The session ended: nothing is left to tell.
        let _ = self.0.send(lease);
    }
}

impl Session {
    /// Starts the session task. It runs until [`close`](Self::close), or
    /// until the handle is dropped (which also revokes, without waiting).
    pub fn start(etcd: Arc<Etcd>, ttl: Duration, observer: Arc<dyn LeaseObserver>) -> Session {
        let cancel = CancellationToken::new();
        let (tx, state) = watch::channel(State::Granting);
        let (lost, reports) = mpsc::unbounded_channel();
        let task = tokio::spawn(
            Runner {
                etcd,
                ttl,
                observer,
                state: tx,
                reports,
                cancel: cancel.clone(),
            }
            .run(),
        );
        Session {
            state,
            lost,
            cancel,
            task: Some(task),
        }
    }

    /// The session's state, to watch.
    pub fn state(&self) -> watch::Receiver<State> {
        self.state.clone()
    }

    /// The lease in force, if any.
    pub fn lease(&self) -> Option<Lease> {
        self.state.borrow().lease()
    }

    /// A [`LostReporter`] for this session, for other tasks to keep.
    pub fn reporter(&self) -> LostReporter {
        LostReporter(self.lost.clone())
    }

    /// Waits until the session task ends by itself: only with an error
    /// (before its first grant), or when its token was cancelled. Once it
    /// has returned, it returns at once.
    pub async fn ended(&mut self) -> Result<(), SessionError> {
        let Some(task) = &mut self.task else {
            return Ok(());
        };
        let joined = task.await;
        self.task = None;
        match joined {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "the lease session task failed");
                Ok(())
            }
        }
    }

    /// Ends the session: revokes the lease (so every key on it goes at
    /// once) and waits for the task.
    pub async fn close(mut self) -> Result<(), SessionError> {
        self.cancel.cancel();
        self.ended().await
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The session task's inputs and outputs.
struct Runner {
    etcd: Arc<Etcd>,
    ttl: Duration,
    observer: Arc<dyn LeaseObserver>,
    state: watch::Sender<State>,
    reports: mpsc::UnboundedReceiver<LeaseId>,
    cancel: CancellationToken,
}

/// Why keeping one lease alive stopped.
enum Kept {
    Cancelled,
    Lost(String),
}

impl Runner {
    async fn run(mut self) -> Result<(), SessionError> {
        let mut granted_once = false;
        loop {
            self.state.send_replace(State::Granting);
            let Some((lease, since)) = self.grant(granted_once).await? else {
                return Ok(());
            };
            granted_once = true;
            tracing::debug!(lease = %lease.id, ttl = %humantime::format_duration(lease.ttl), "lease granted");
            match self.keep(lease, since).await {
                Kept::Cancelled => {
                    self.state.send_replace(State::Granting);
                    revoke_logged(&self.etcd, lease).await;
                    return Ok(());
                }
                Kept::Lost(why) => {
                    tracing::warn!("{why}; granting a new lease and re-registering");
                    self.observer.lost(&why);
                }
            }
        }
    }

    /// Grants a lease, retrying under the one policy. A retry asks for the
    /// same id, so a grant that took effect unseen is found and used, and
    /// the keep-alive timing counts from the first try, which is no later
    /// than the grant. `None` when cancelled.
    async fn grant(&self, granted_once: bool) -> Result<Option<(Lease, Instant)>, SessionError> {
        let (id, since) = (LeaseId::random(), Instant::now());
        let mut backoff = Backoff::standard();
        let mut outage = Outage::new("cannot grant a lease");
        loop {
            let r = tokio::select! {
                _ = self.cancel.cancelled() => return Ok(None),
                r = grant(&self.etcd, self.ttl, id) => r,
            };
            match r {
                Ok(lease) => {
                    if let Some(ended) = outage.recovered() {
                        tracing::info!(lease = %lease.id, "lease granted {}", ended.describe());
                    }
                    return Ok(Some((lease, since)));
                }
                Err(e) if !granted_once && matches!(e.class(), Class::Auth | Class::Fatal) => {
                    self.observer.failed(&e.to_string(), e.class());
                    return Err(SessionError(e));
                }
                Err(e) => {
                    self.observer.failed(&e.to_string(), e.class());
                    outage.failed(&e);
                }
            }
            if !backoff.pause(&self.cancel).await {
                return Ok(None);
            }
        }
    }

    fn publish(&self, lease: Lease, endpoint: usize, confirmed: bool) {
        self.state.send_if_modified(|s| {
            let next = State::Held {
                lease,
                endpoint,
                confirmed,
            };
            let changed = *s != next;
            *s = next;
            changed
        });
    }

    /// Keeps `lease` alive until it is lost or the session is cancelled.
    /// `granted_at` is no later than the grant.
    async fn keep(&mut self, lease: Lease, granted_at: Instant) -> Kept {
        let period = period(lease.ttl);
        let mut last_ok = granted_at;
        // One policy for every retry; capped at the keep-alive period, so
        // that a partition shorter than the TTL is not outlasted by the
        // wait before the next try.
        let mut rotation = self.etcd.rotation(None, Policy::STANDARD.capped(period));
        let mut outage = Outage::new("etcd does not answer the lease keep-alive");
        let mut confirmed = true;
        self.publish(lease, rotation.endpoint(), confirmed);
        loop {
            let idx = rotation.endpoint();
            let endpoint = self.etcd.endpoint(idx).to_string();
            let opened = tokio::select! {
                _ = self.cancel.cancelled() => return Kept::Cancelled,
                lost = self.reports.recv() => match lost {
                    Some(id) if id == lease.id => return Kept::Lost(format!("etcd no longer knows lease {id}")),
                    _ => continue,
                },
                r = open_stream(&self.etcd, &rotation, lease.id, period) => r,
            };
            match opened {
                Ok((mut keeper, mut stream)) => {
                    last_ok = Instant::now();
                    confirmed = true;
                    rotation.opened();
                    self.publish(lease, idx, confirmed);
                    self.observer.alive(lease.ttl);
                    if let Some(ended) = outage.recovered() {
                        tracing::info!(
                            %endpoint,
                            lease = %lease.id,
                            "etcd answers the keep-alive again {}; the same lease lived through it",
                            ended.describe()
                        );
                        self.observer.recovered(lease, &ended);
                    }
                    tracing::debug!(%endpoint, lease = %lease.id, "keep-alive stream open");
                    match self
                        .run_stream(&mut keeper, &mut stream, lease, period, &mut last_ok)
                        .await
                    {
                        StreamEnd::Cancelled => return Kept::Cancelled,
                        StreamEnd::Lost(why) => return Kept::Lost(why),
                        StreamEnd::Broken(why) => {
                            outage.failed(&format!("the stream on {endpoint} {why}"));
                        }
                    }
                }
                Err(e) if e.class() == Class::LeaseGone => {
                    return Kept::Lost(format!(
                        "etcd ({endpoint}) no longer knows lease {}: it was revoked or has expired",
                        lease.id
                    ));
                }
                Err(e) => {
                    self.observer.failed(&e.to_string(), e.class());
                    outage.failed(&e);
                }
            }
            let next = rotation.failed(&self.etcd);
            tracing::debug!(from = %endpoint, to = self.etcd.endpoint(next), "moving the keep-alive stream");
            if last_ok.elapsed() >= lease.ttl {
                // A whole TTL without a confirmed keep-alive: we must assume
                // we are unregistered, and ask etcd whether the lease still
                // exists (a leader change extends leases, so it may).
                if confirmed {
                    confirmed = false;
                    self.publish(lease, idx, confirmed);
                    self.observer.unconfirmed();
                    tracing::warn!(
                        lease = %lease.id,
                        "no keep-alive succeeded for a whole TTL; this host may be unregistered"
                    );
                }
                let ttl = tokio::select! {
                    _ = self.cancel.cancelled() => return Kept::Cancelled,
                    r = time_to_live(&self.etcd, lease.id) => r,
                };
                match ttl {
                    Ok(None) => {
                        return Kept::Lost(format!(
                            "no keep-alive succeeded within the TTL and etcd no longer knows lease {}",
                            lease.id
                        ));
                    }
                    Ok(Some(_)) => {}
                    Err(e) => tracing::debug!(error = %e, "cannot check the lease's time to live"),
                }
            }
            if !rotation.pause(&self.cancel).await {
                return Kept::Cancelled;
            }
        }
    }

    async fn run_stream(
        &mut self,
        keeper: &mut LeaseKeeper,
        stream: &mut LeaseKeepAliveStream,
        lease: Lease,
        period: Duration,
        last_ok: &mut Instant,
    ) -> StreamEnd {
        let lost = |how: &str| {
            StreamEnd::Lost(format!(
                "etcd answered a keep-alive {how}: lease {} was revoked or has expired",
                lease.id
            ))
        };
        // When the answer to the keep-alive in flight is due, if one is.
        let mut due: Option<Instant> = None;
        loop {
            let next_send = *last_ok + period;
            tokio::select! {
                _ = self.cancel.cancelled() => return StreamEnd::Cancelled,
                report = self.reports.recv() => {
                    if report == Some(lease.id) {
                        return StreamEnd::Lost(format!("etcd no longer knows lease {}", lease.id));
                    }
                }
                // Listening all the time, not only after a send, notices a
                // broken connection (a killed member) at once.
                answer = stream.message() => match answer {
                    Ok(Some(resp)) if resp.ttl() <= 0 => return lost("with TTL 0"),
                    Ok(Some(resp)) => {
                        due = None;
                        *last_ok = Instant::now();
                        self.observer.alive(Duration::from_secs(resp.ttl().unsigned_abs()));
                    }
                    Ok(None) => return StreamEnd::Broken("was closed by etcd".into()),
                    Err(e) if classify(&e) == Class::LeaseGone => return lost("with lease not found"),
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
}

enum StreamEnd {
    Cancelled,
    Lost(String),
    Broken(String),
}

/// Opens a keep-alive stream on the rotation's endpoint. etcd-client sends
/// the first keep-alive and waits for its answer, so success means the
/// lease is alive.
async fn open_stream(
    etcd: &Etcd,
    rotation: &Rotation,
    lease: LeaseId,
    within: Duration,
) -> Result<(LeaseKeeper, LeaseKeepAliveStream), EtcdError> {
    let endpoint = etcd.endpoint(rotation.endpoint()).to_string();
    let mut client = rotation.client(etcd).await?;
    bounded(
        &endpoint,
        "open keep-alive stream",
        within,
        client.lease_keep_alive(lease.get()),
    )
    .await
}

/// How long a revoke on shutdown may take over every endpoint. Each
/// endpoint gets the request timeout, so with all of them hung a revoke
/// alone could outlast the 10 s that systemd and docker give a stop; with
/// `leaving` (2 s at most) before it, the agent stops within about 7 s.
pub const REVOKE_WITHIN: Duration = Duration::from_secs(5);

/// Revokes on shutdown, within [`REVOKE_WITHIN`], saying what happened to
/// the host's keys. A revoke that fails is a WARN, not an ERROR: the stop
/// still succeeds (exit 0) and the keys go within the TTL, so an alert on
/// ERROR lines would fire for every stop during an etcd outage.
pub async fn revoke_logged(etcd: &Etcd, lease: Lease) {
    let expire = humantime::format_duration(lease.ttl);
    match tokio::time::timeout(REVOKE_WITHIN, revoke(etcd, lease.id)).await {
        Ok(Ok(())) => tracing::info!(
            lease = %lease.id,
            "lease revoked; this host's keys are gone"
        ),
        Ok(Err(e)) => tracing::warn!(
            error = %e,
            "could not revoke the lease; this host's keys expire within {expire}"
        ),
        Err(_) => tracing::warn!(
            "could not revoke the lease: etcd did not answer within {}; this host's keys expire within {expire}",
            humantime::format_duration(REVOKE_WITHIN)
        ),
    }
}
