//! `registrar dns`: the registry answers DNS (design.md section 7).
//!
//! One watch of the prefix feeds the registry mirror
//! ([`Follower`](crate::registry::follow::Follower)), the same one `render`
//! and `watch` use. After each change the [`zone::Zone`] catches up with
//! the mirror, for the hosts that changed and their roles, at one revision;
//! questions read only that zone, so a question costs no etcd request.
//! Changes that arrive together are applied together.
//!
//! SIGHUP re-reads the configuration; a new `srv_min` applies at once.
//!
//! Fail safe: until the registry has been read once every query gets
//! SERVFAIL (not NXDOMAIN for names that may exist); while etcd is
//! unreachable the last zone keeps being served.

pub mod server;
pub mod zone;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::etcd::{Etcd, EtcdError, Revision};
use crate::registry::follow::Follower;
use crate::registry::hold::{self, FailStatic, Holds};
use crate::registry::{HostId, Hosts, Shown};
use crate::reload::Reloads;
use crate::telemetry::DnsMetrics;
use server::{Handler, Published};
pub use zone::Settings;
use zone::Zone;

/// How long a TCP client may stay silent before its connection is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// The sockets of every `--listen` address, bound before anything else so
/// that a busy or privileged port fails at start.
pub struct Sockets {
    udp: Vec<tokio::net::UdpSocket>,
    tcp: Vec<tokio::net::TcpListener>,
}

/// Why a listen address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({proto}): {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub proto: &'static str,
    #[source]
    pub source: std::io::Error,
}

impl Sockets {
    pub async fn bind(addrs: &[SocketAddr]) -> Result<Sockets, BindError> {
        let mut out = Sockets {
            udp: Vec::new(),
            tcp: Vec::new(),
        };
        for &addr in addrs {
            let udp = tokio::net::UdpSocket::bind(addr)
                .await
                .map_err(|source| BindError {
                    addr,
                    proto: "udp",
                    source,
                })?;
            // Room for bursts while the loop is busy or descheduled (the
            // kernel caps it at net.core.rmem_max); too small a buffer
            // drops questions under load. Best effort.
            let _ =
                nix::sys::socket::setsockopt(&udp, nix::sys::socket::sockopt::RcvBuf, &(4 << 20));
            // Port 0 (tests): TCP takes the port UDP was given.
            let addr = udp.local_addr().unwrap_or(addr);
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| BindError {
                    addr,
                    proto: "tcp",
                    source,
                })?;
            out.udp.push(udp);
            out.tcp.push(tcp);
        }
        Ok(out)
    }

    /// The bound addresses (UDP and TCP share each).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.udp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }
}

/// Serves DNS until `cancel`. Returns only fatal etcd errors.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    prefix: &str,
    etcd: &Etcd,
    settings: Settings,
    fail_static: FailStatic,
    sockets: Sockets,
    cancel: &CancellationToken,
    reloads: Option<Reloads>,
    metrics: &DnsMetrics,
) -> Result<(), EtcdError> {
    let published = Arc::new(Published::default());
    let handler = Arc::new(Handler::new(published.clone(), metrics.clone()));
    let serving = cancel.child_token();
    let _stop = serving.clone().drop_guard();
    for udp in sockets.udp {
        tokio::spawn(server::serve_udp(udp, handler.clone(), serving.clone()));
    }
    let mut tcp_server =
        hickory_server::Server::new(Handler::new(published.clone(), metrics.clone()));
    for tcp in sockets.tcp {
        tcp_server.register_listener(tcp, TCP_IDLE, 64);
    }
    let result = follow(
        prefix,
        etcd,
        settings,
        Holds::new(fail_static),
        &published,
        cancel,
        reloads,
        metrics,
    )
    .await;
    if let Err(e) = tcp_server.shutdown_gracefully().await {
        tracing::debug!(error = %e, "the DNS server stopped with an error");
    }
    result
}

/// Keeps the published zone in step with the registry, with the hosts
/// fail static holds put back ([`Shown`]).
#[allow(clippy::too_many_arguments)]
async fn follow(
    prefix: &str,
    etcd: &Etcd,
    mut settings: Settings,
    mut holds: Holds,
    published: &Published,
    cancel: &CancellationToken,
    reloads: Option<Reloads>,
    metrics: &DnsMetrics,
) -> Result<(), EtcdError> {
    let scope = format!("{prefix}/");
    let forever = crate::etcd::never();
    let start = tokio::select! {
        _ = cancel.cancelled() => return Ok(()),
        r = crate::etcd::retry_until(forever, || Follower::start_hosts_only(etcd, prefix, &scope)) => r,
    };
    let (mut follower, bad) = start?;
    for m in bad {
        tracing::debug!(key = %m.key.escape_debug(), why = m.why, "skipping a malformed key");
    }
    let zone = Zone::build(&follower.registry, follower.revision, settings.clone());
    metrics
        .holds
        .record(&holds, &[], tokio::time::Instant::now());
    let names = zone.names();
    show(&zone, metrics);
    published.set(zone);
    metrics.set_ready();
    crate::telemetry::notify_ready(&format!(
        "serving {names} names at revision {}",
        follower.revision
    ));
    let mut watchdog = tokio::time::interval(Duration::from_secs(10));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Hosts changed since the zone was last brought in step.
    let mut touched: BTreeSet<HostId> = BTreeSet::new();
    let mut report = |m: crate::registry::Malformed| {
        tracing::debug!(key = %m.key.escape_debug(), why = m.why, "skipping a malformed key");
    };
    loop {
        // Biased: every change already here is applied to the mirror before
        // the zone catches up, so a burst costs one update. The follower
        // keeps its watch when its future is dropped.
        let release = holds.next_release();
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            batch = follower.next(&mut report) => {
                let batch = batch?;
                let live = &follower.registry;
                let events = holds.observe(
                    tokio::time::Instant::now(),
                    batch.changes.iter().map(|(id, b, a)| (id, b.as_ref(), a.as_ref())),
                    batch.reset,
                    |dc, role| live.in_role(dc, role).filter(|id| live.hosts.get(*id).is_some_and(|h| h.present())).count(),
                );
                hold::log(&events, "dns");
                metrics.holds.record(&holds, &events, tokio::time::Instant::now());
                touched.extend(batch.changes.into_iter().map(|(id, _, _)| id));
                // A hold may put back a host an earlier batch removed.
                touched.extend(events.iter().flat_map(hold::Event::hosts).cloned());
            }
            _ = tokio::time::sleep_until(release.unwrap_or_else(tokio::time::Instant::now)), if release.is_some() => {
                let (ended, events) = holds.expire(tokio::time::Instant::now());
                hold::log(&events, "dns");
                metrics.holds.record(&holds, &events, tokio::time::Instant::now());
                touched.extend(ended);
            }
            _ = std::future::ready(()), if !touched.is_empty() => {
                let revision = follower.revision;
                let shown = Shown { live: &follower.registry, held: holds.held() };
                published.update(|zone| {
                    zone.apply(&shown, &touched, revision);
                    show(zone, metrics);
                    tracing::debug!(%revision, hosts = touched.len(), names = zone.names(), "answers updated");
                });
                let roles: BTreeSet<(&str, &str)> = holds
                    .held()
                    .keys()
                    .map(|id| (id.dc.as_str(), id.role.as_str()))
                    .collect();
                metrics.holds.units.set(roles.len() as i64);
                touched.clear();
            }
            _ = watchdog.tick() => {
                metrics.holds.record(&holds, &[], tokio::time::Instant::now());
                crate::telemetry::notify_watchdog();
            }
            _ = crate::reload::sighup(reloads.as_ref().map(|r| r.notify.as_ref())) => {
                let Some(r) = &reloads else { continue };
                match (r.load)() {
                    Err(e) => tracing::error!("reload refused, the old configuration stays in force: {e}"),
                    Ok(config) if config.srv_min == settings.srv_min => {
                        tracing::info!("configuration reloaded; srv_min is unchanged (other settings take a restart)");
                    }
                    Ok(config) => {
                        settings.srv_min = config.srv_min;
                        tracing::info!(srv_min = ?settings.srv_min, "configuration reloaded: new srv_min in force (other settings take a restart)");
                        let shown = Shown { live: &follower.registry, held: holds.held() };
                        let zone = Zone::build(&shown, follower.revision, settings.clone());
                        show(&zone, metrics);
                        published.set(zone);
                        touched.clear();
                    }
                }
            }
        }
    }
}

/// The zone's figures in the metrics.
fn show(zone: &Zone, metrics: &DnsMetrics) {
    metrics
        .answer_revision
        .set(zone.revision.map_or(0, Revision::get));
    metrics.withheld.set(zone.withheld().count() as i64);
    metrics.unnamed.set(zone.unnamed() as i64);
}
