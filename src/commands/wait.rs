//! `registrar wait --role R [--dc D] --count N [--healthy] [--timeout D]`:
//! the readiness gate of cluster bootstrapping. It watches, it does not poll.

use std::io::Write;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Failure, etcd_failure, exit, report_malformed};
use crate::cli::{WaitArgs, WaitFormat};
use crate::config::Config;
use crate::etcd::Etcd;
use crate::registry::follow::Follower;
use crate::registry::{HostId, HostView, Registry};

fn matching<'r>(
    registry: &'r Registry,
    role: &str,
    dc: Option<&str>,
    healthy: bool,
) -> Vec<(&'r HostId, &'r HostView)> {
    registry
        .present()
        .filter(|(id, h)| {
            id.role == role && dc.is_none_or(|d| id.dc == d) && (!healthy || h.healthy())
        })
        .collect()
}

pub async fn run(
    config: &Config,
    args: &WaitArgs,
    cancel: &CancellationToken,
) -> Result<(), Failure> {
    let role = match config.roles.as_slice() {
        [r] => r.clone(),
        [] => {
            return Err(Failure::new(
                exit::USAGE,
                anyhow::anyhow!("wait needs --role ROLE"),
            ));
        }
        many => {
            return Err(Failure::new(
                exit::USAGE,
                anyhow::anyhow!("wait takes one --role, got {}", many.join(",")),
            ));
        }
    };
    let dc = config.dc.clone();
    let scope = match &dc {
        Some(d) => format!("{}/{d}/{role}/", config.prefix),
        None => format!("{}/", config.prefix),
    };
    let etcd = Etcd::new(&config.etcd).map_err(|e| Failure::new(exit::DENIED, e))?;
    let deadline = args.wait_timeout.map(|t| Instant::now() + t);
    let timed_out = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(timed_out);
    let far = crate::etcd::never();
    let start = tokio::select! {
        r = crate::etcd::retry_until(deadline.unwrap_or(far), || Follower::start(&etcd, &config.prefix, &scope)) => r,
        _ = cancel.cancelled() => return Err(Failure::new(exit::RUNTIME, anyhow::anyhow!("interrupted"))),
    };
    let (mut follower, bad) = start.map_err(|e| etcd_failure(e, &etcd))?;
    bad.into_iter().for_each(report_malformed);
    let mut report = report_malformed;
    loop {
        let found = matching(&follower.registry, &role, dc.as_deref(), args.healthy);
        if found.len() >= args.count {
            let text: String = found
                .iter()
                .map(|(id, h)| match (args.output, h.ip) {
                    (WaitFormat::Ip, Some(ip)) => format!("{ip}\n"),
                    (_, ip) => format!("{id} {}\n", ip.map(|i| i.to_string()).unwrap_or_default()),
                })
                .collect();
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
            return Ok(());
        }
        let have = found.len();
        tokio::select! {
            _ = cancel.cancelled() => return Err(Failure::new(exit::RUNTIME, anyhow::anyhow!("interrupted with {have} of {} hosts", args.count))),
            _ = &mut timed_out => {
                let what = if args.healthy { "healthy hosts" } else { "hosts" };
                return Err(Failure::new(
                    exit::RUNTIME,
                    anyhow::anyhow!(
                        "timed out: found {have} of {} {what} in role {role}{}",
                        args.count,
                        dc.as_deref().map(|d| format!(" of dc {d}")).unwrap_or_default()
                    ),
                ));
            }
            b = follower.next(&mut report) => { b.map_err(|e| etcd_failure(e, &etcd))?; }
        }
    }
}
