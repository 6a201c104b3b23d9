//! `registrar dns`: the registry answers DNS (contract section 7).
//!
//! One watch of the prefix feeds the registry mirror
//! ([`Follower`](crate::registry::follow::Follower)), the same one `render`
//! and `watch` use. After each change the whole [`zone::Zone`] is rebuilt
//! from the mirror at one revision and swapped in; queries read only that
//! zone, so a query costs no etcd request. Changes that arrive together
//! are applied together and cost one rebuild.
//!
//! Fail safe: until the registry has been read once every query gets
//! SERVFAIL (not NXDOMAIN for names that may exist); while etcd is
//! unreachable the last zone keeps being served.

pub mod server;
pub mod zone;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::etcd::{Etcd, EtcdError};
use crate::registry::follow::Follower;
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
pub async fn run(
    prefix: &str,
    etcd: &Etcd,
    settings: Settings,
    sockets: Sockets,
    cancel: &CancellationToken,
    metrics: &DnsMetrics,
) -> Result<(), EtcdError> {
    let published = Arc::new(Published::default());
    let mut server = hickory_server::Server::new(Handler {
        zone: published.clone(),
        metrics: metrics.clone(),
    });
    for udp in sockets.udp {
        server.register_socket(udp);
    }
    for tcp in sockets.tcp {
        server.register_listener(tcp, TCP_IDLE, 64);
    }
    let result = follow(prefix, etcd, &settings, &published, cancel, metrics).await;
    if let Err(e) = server.shutdown_gracefully().await {
        tracing::debug!(error = %e, "the DNS server stopped with an error");
    }
    result
}

/// Keeps the published zone in step with the registry.
async fn follow(
    prefix: &str,
    etcd: &Etcd,
    settings: &Settings,
    published: &Published,
    cancel: &CancellationToken,
    metrics: &DnsMetrics,
) -> Result<(), EtcdError> {
    let scope = format!("{prefix}/");
    let forever = tokio::time::Instant::now() + Duration::from_secs(3600 * 24 * 365 * 100);
    let start = tokio::select! {
        _ = cancel.cancelled() => return Ok(()),
        r = crate::etcd::retry_until(forever, || Follower::start(etcd, prefix, &scope)) => r,
    };
    let (mut follower, bad) = start?;
    for m in bad {
        tracing::debug!(key = m.key, why = m.why, "skipping a malformed key");
    }
    let mut shown = Shown::default();
    publish(&follower, settings, published, metrics, &mut shown);
    metrics.set_ready();
    crate::telemetry::notify_ready(&format!(
        "serving {} names at revision {}",
        shown.names, follower.revision
    ));
    let mut watchdog = tokio::time::interval(Duration::from_secs(10));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dirty = false;
    let mut report = |m: crate::registry::Malformed| {
        tracing::debug!(key = m.key, why = m.why, "skipping a malformed key");
    };
    loop {
        // Biased: every change that is already here is applied before the
        // zone is rebuilt, so a burst costs one rebuild. The follower keeps
        // its watch when its future is dropped.
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            batch = follower.next(&mut report) => {
                batch?;
                dirty = true;
            }
            _ = std::future::ready(()), if dirty => {
                dirty = false;
                publish(&follower, settings, published, metrics, &mut shown);
            }
            _ = watchdog.tick() => crate::telemetry::notify_watchdog(),
        }
    }
}

/// What the log last said about the zone, so that only changes are logged.
#[derive(Default)]
struct Shown {
    names: usize,
    unnamed: usize,
    withheld: Vec<zone::Withheld>,
}

fn publish(
    follower: &Follower<'_>,
    settings: &Settings,
    published: &Published,
    metrics: &DnsMetrics,
    shown: &mut Shown,
) {
    let zone = Zone::build(&follower.registry, follower.revision, settings);
    metrics.answer_revision.set(zone.revision);
    metrics.withheld.set(zone.withheld.len() as i64);
    metrics.unnamed.set(zone.unnamed.len() as i64);
    if zone.unnamed.len() != shown.unnamed && !zone.unnamed.is_empty() {
        let list: Vec<String> = zone.unnamed.iter().take(5).map(|h| h.to_string()).collect();
        tracing::warn!(
            "{} host entries have names DNS cannot carry (a label over 63 bytes or a name over 255) and are served under no name: {}",
            zone.unnamed.len(),
            list.join(", ")
        );
    }
    if zone.withheld != shown.withheld {
        for w in &zone.withheld {
            tracing::info!(
                "withholding {} until {} hosts publish it (srv_min); {} do",
                w.name,
                w.need,
                w.have
            );
        }
        for w in shown
            .withheld
            .iter()
            .filter(|w| !zone.withheld.iter().any(|z| z.name == w.name))
        {
            tracing::info!("serving {}: srv_min {} reached", w.name, w.need);
        }
    }
    shown.names = zone.names();
    shown.unnamed = zone.unnamed.len();
    shown.withheld = zone.withheld.clone();
    tracing::debug!(
        revision = zone.revision,
        names = zone.names(),
        "answers rebuilt"
    );
    published.set(zone);
}
