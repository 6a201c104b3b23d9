//! `registrar dns`: see [`crate::dns`]. Here: the flags, the sockets and
//! exit codes.

use super::{Control, Failure, etcd_failure, exit, serve_metrics};
use crate::cli::DnsArgs;
use crate::config::Config;
use crate::dns::{Settings, Sockets};
use crate::etcd::Etcd;

pub async fn run(config: Config, args: &DnsArgs, mut control: Control) -> Result<(), Failure> {
    let domain =
        hickory_server::proto::rr::Name::from_ascii(format!("{}.", args.domain)).map_err(|e| {
            Failure::new(
                exit::USAGE,
                anyhow::anyhow!("--domain {:?} is not a DNS name: {e}", args.domain),
            )
        })?;
    let (ns, ns_addrs) = match &args.ns_name {
        Some(name) => (
            hickory_server::proto::rr::Name::from_ascii(format!("{name}.")).map_err(|e| {
                Failure::new(
                    exit::USAGE,
                    anyhow::anyhow!("--ns-name {name:?} is not a DNS name: {e}"),
                )
            })?,
            Vec::new(),
        ),
        None => {
            let addrs: Vec<std::net::IpAddr> = args
                .listen
                .iter()
                .map(|a| a.ip())
                .filter(|ip| !ip.is_unspecified())
                .collect();
            if addrs.is_empty() {
                tracing::warn!(
                    "ns.{} has no address: every --listen is 0.0.0.0 or [::]; give --ns-name the name this server is known by",
                    args.domain
                );
            }
            let ns = hickory_server::proto::rr::Name::from_ascii(format!("ns.{}.", args.domain))
                .map_err(|e| {
                    Failure::new(exit::USAGE, anyhow::anyhow!("ns.{}: {e}", args.domain))
                })?;
            (ns, addrs)
        }
    };
    let settings = Settings {
        ns,
        ns_addrs,
        domain,
        // parse_dns_ttl keeps it to whole seconds, at most a day.
        ttl: u32::try_from(args.answer_ttl.as_secs()).unwrap_or(86_400),
        allow_warning: args.allow_warning,
        srv_min: config.srv_min.clone(),
    };
    let etcd = Etcd::new(&config.etcd).map_err(|e| Failure::new(exit::DENIED, e))?;
    let sockets = Sockets::bind(&args.listen).await.map_err(|e| {
        if e.source.kind() == std::io::ErrorKind::PermissionDenied {
            Failure::new(
                exit::DENIED,
                anyhow::anyhow!(
                    "{e}; ports below 1024 need CAP_NET_BIND_SERVICE (registrar-dns.service grants it) \
                     or root, or serve a high port such as 8600 behind a resolver"
                ),
            )
        } else {
            // Busy: a runtime condition (exit 1), so systemd retries.
            Failure::new(exit::RUNTIME, e)
        }
    })?;
    for addr in sockets.local_addrs() {
        tracing::info!(%addr, domain = %args.domain, "serving DNS (UDP and TCP)");
    }
    let metrics = crate::telemetry::DnsMetrics::new();
    let _serving = serve_metrics(config.metrics_listen, &metrics, &control.cancel).await?;
    let reloads = control.reloads();
    crate::dns::run(
        &config.prefix,
        &etcd,
        settings,
        config.fail_static,
        sockets,
        &control.cancel,
        reloads,
        &metrics,
    )
    .await
    .map_err(|e| etcd_failure(e, &etcd))
}
