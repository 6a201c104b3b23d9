//! The long-running agent, and the one place that holds its start and
//! shutdown order.
//!
//! ```text
//!  start      metrics server ─> composer ─> lease session ─> writer
//!  run        until shutdown, the writer gives up (auth or a rejected
//!             request before the first registration), or the composer ends;
//!             a failed metrics server is logged, and the agent goes on
//!  shutdown   writer stops ─> session closes (revoke: every key gone at once)
//!             ─> composer (with its checks) and metrics server, together
//! ```
//!
//! The tasks and their cancellation tokens: the writer's is a child of
//! `shutdown`; the session's is its own, so that it revokes only after the
//! writer has stopped; the composer's and the metrics server's are roots of
//! their own, cancelled once the lease is revoked, so that `/health` and the
//! checks last until the keys are gone:
//! - [`composer`]: checks, maintenance and reloads ([`reload`]) → the latest
//!   [`Desired`](crate::registration::Desired) on a watch channel;
//! - the lease [`Session`]: grant, keep-alive, loss, re-grant, revoke;
//! - the [`writer`]: keeps etcd's keys equal to the latest Desired on the
//!   session's lease, with the [`own_keys`] watch beside it per lease.
//!
//! The writer's writes may hang for a whole request timeout on a stalled
//! member; the session's keep-alives never wait for them.

pub mod composer;
pub mod own_keys;
pub mod presence;
pub mod reload;
pub mod writer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::etcd::{Class, Etcd};
use crate::identity::Identity;
use crate::lease::{Session, SessionError};
use crate::registration::Observer;
use crate::registration::RegisterError;
use crate::telemetry::{Metrics, Telemetry};
use reload::Reloads;

/// How long stopping tasks (checks, the metrics server) get after the
/// lease is revoked.
const GRACE: Duration = Duration::from_secs(5);

/// What runs: the full agent, or `register --keep-alive` (no checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Agent,
    KeepAlive,
}

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Session(#[from] SessionError),
    #[error("cannot register this host: {0}")]
    Register(#[from] RegisterError),
    #[error("metrics_listen: cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the check composer failed: {0}")]
    Composer(String),
    #[error("the writer task failed: {0}")]
    Writer(String),
}

impl AgentError {
    /// What kind of failure this is, for the exit code.
    pub fn class(&self) -> Option<Class> {
        match self {
            AgentError::Session(SessionError(e)) => Some(e.class()),
            AgentError::Register(e) => Some(e.class()),
            AgentError::Listen { .. } | AgentError::Composer(_) | AgentError::Writer(_) => None,
        }
    }
}

/// Runs the agent until `shutdown` fires, then revokes the lease. Returns
/// an error for what retrying cannot fix: auth or a rejected request before
/// the first registration, a metrics address that cannot be bound, a
/// composer that died.
pub async fn run(
    config: Config,
    identity: Identity,
    etcd: Etcd,
    shutdown: CancellationToken,
    reloads: Option<Reloads>,
    mode: Mode,
) -> Result<(), AgentError> {
    let etcd = Arc::new(etcd);
    let tasks = TaskTracker::new();
    let _presence = presence::announce(&config.state_dir);
    let metrics = Metrics::new();
    let ttl = config.ttl;
    let observer: Arc<dyn Observer> = Arc::new(Telemetry::new(metrics.clone()));

    // 1. The metrics server, first: a bad address is a config error, found
    //    before anything is written.
    // The composer and the metrics server outlive `shutdown` until the
    // lease is revoked; their guards stop them if this future is dropped.
    let serving = CancellationToken::new();
    let _serving = serving.clone().drop_guard();
    if let Some(addr) = config.metrics_listen {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AgentError::Listen { addr, source })?;
        tracing::info!(%addr, "serving /metrics and /health");
        let (m, c) = (metrics.clone(), serving.clone());
        tasks.spawn(async move {
            if let Err(e) = crate::telemetry::serve(listener, m, c).await {
                tracing::error!(error = %e, "the metrics server failed");
            }
        });
    }

    // 2. The composer: checks, maintenance and reloads → the latest Desired.
    let composing = CancellationToken::new();
    let _composing = composing.clone().drop_guard();
    let (desired_tx, desired) = tokio::sync::watch::channel(None);
    let mut composer = tasks.spawn(composer::run(
        composer::Composer {
            config,
            identity,
            with_checks: mode == Mode::Agent,
            tx: desired_tx,
            reload: reloads,
            metrics: metrics.clone(),
        },
        composing.clone(),
        tasks.clone(),
    ));

    // 3 and 4. The lease session and the writer.
    let registering = shutdown.child_token();
    let held = keep_registered(etcd, ttl, desired, observer.clone(), registering.clone());
    tokio::pin!(held);
    let result = tokio::select! {
        r = &mut held => r,
        r = &mut composer => {
            // The composer ends only by failing: stop (and revoke) first.
            registering.cancel();
            let held = held.await;
            held.and(Err(AgentError::Composer(match r {
                Ok(()) => "it stopped".into(),
                Err(e) => e.to_string(),
            })))
        }
    };

    // Then the rest: checks, the metrics server.
    composing.cancel();
    serving.cancel();
    tasks.close();
    if tokio::time::timeout(GRACE, tasks.wait()).await.is_err() {
        tracing::warn!(
            "some checks did not stop within {}",
            humantime::format_duration(GRACE)
        );
    }
    result
}

/// Keeps one host registered until `shutdown`: the lease session and the
/// writer, fed by `desired`. Shutdown stops the writer, then closes the
/// session, which revokes the lease. (The agent runs this beside its
/// composer; the bench runs thousands of them in one process.)
pub async fn keep_registered(
    etcd: Arc<Etcd>,
    ttl: Duration,
    desired: tokio::sync::watch::Receiver<Option<crate::registration::Desired>>,
    observer: Arc<dyn Observer>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let mut session = Session::start(etcd.clone(), ttl, observer.clone());
    let (leaving_etcd, last_desired) = (etcd.clone(), desired.clone());
    let writing = shutdown.child_token();
    let lost = session.reporter();
    let mut writer = tokio::spawn(
        writer::Writer {
            etcd,
            desired,
            session: session.state(),
            report_lost: Box::new(move |id| lost.report(id)),
            observer: observer.clone(),
        }
        .run(writing.clone()),
    );
    let mut writer_done = false;
    let mut result = tokio::select! {
        _ = shutdown.cancelled() => Ok(()),
        r = &mut writer => {
            writer_done = true;
            writer_result(r)
        }
        r = session.ended() => r.map_err(AgentError::from),
    };
    // No more writes, then the revoke.
    observer.stopping();
    writing.cancel();
    if !writer_done {
        result = result.and(writer_result((&mut writer).await));
    }
    if shutdown.is_cancelled() {
        announce_leaving(&leaving_etcd, &session, &last_desired).await;
    }
    result.and(session.close().await.map_err(AgentError::from))
}

/// How long a graceful stop waits to announce `leaving` before it revokes
/// anyway: shutdown stays bounded with every endpoint dead.
const LEAVING_WITHIN: Duration = Duration::from_secs(2);

/// Sets `health: leaving` on every role of the host before the revoke
/// (design.md rule 4), bounded by [`LEAVING_WITHIN`]. A failure is logged:
/// the revoke still removes the host, only consumers may hold it a while
/// (design.md section 8).
async fn announce_leaving(
    etcd: &Etcd,
    session: &Session,
    desired: &tokio::sync::watch::Receiver<Option<crate::registration::Desired>>,
) {
    let Some(lease) = session.lease() else { return };
    let Some(desired) = desired.borrow().clone() else {
        return;
    };
    let within = etcd.request_timeout().min(LEAVING_WITHIN);
    match tokio::time::timeout(
        within,
        crate::registration::announce_leaving(etcd, &desired, lease.id),
    )
    .await
    {
        Ok(Ok(true)) => tracing::info!("announced leaving (health: leaving) on every role"),
        Ok(Ok(false)) => tracing::debug!("nothing to announce leaving on"),
        Ok(Err(e)) => tracing::warn!(error = %e, "could not announce leaving; revoking anyway"),
        Err(_) => tracing::warn!(
            "could not announce leaving within {}; revoking anyway",
            humantime::format_duration(within)
        ),
    }
}

fn writer_result(
    joined: Result<Result<(), RegisterError>, tokio::task::JoinError>,
) -> Result<(), AgentError> {
    match joined {
        Ok(r) => r.map_err(AgentError::from),
        Err(e) => Err(AgentError::Writer(e.to_string())),
    }
}
