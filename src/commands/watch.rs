//! `registrar watch [DC[/ROLE]] [-o text|json]`: the registry, then one
//! line per host event. Ends cleanly on SIGINT/SIGTERM and when stdout is
//! closed (`| head`).

use std::io::Write;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{Failure, etcd_failure, exit, report_malformed, scope};
use crate::cli::{WatchArgs, WatchFormat};
use crate::config::Config;
use crate::etcd::{Etcd, Revision};
use crate::registry::follow::Follower;
use crate::registry::{Change, HostId, HostView, diff};

/// One line of `-o json`.
#[derive(Serialize)]
struct JsonEvent<'a> {
    time: String,
    revision: Revision,
    /// present (snapshot), up, down, health, maintenance_on, maintenance_off, changed.
    event: &'static str,
    dc: &'a str,
    role: &'a str,
    host: &'a str,
    ip: Option<String>,
    health: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// Formats one event line.
pub fn line(
    format: WatchFormat,
    revision: Revision,
    id: &HostId,
    host: Option<&HostView>,
    change: Option<&Change>,
) -> String {
    let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let (event, from, to, reason) = match change {
        None => ("present", None, None, None),
        Some(Change::Up) => ("up", None, None, None),
        Some(Change::Down) => ("down", None, None, None),
        Some(Change::Health { from, to }) => {
            ("health", Some(from.to_string()), Some(to.to_string()), None)
        }
        Some(Change::MaintenanceOn(r)) => ("maintenance_on", None, None, Some(r.clone())),
        Some(Change::MaintenanceOff) => ("maintenance_off", None, None, None),
        Some(Change::Changed) => ("changed", None, None, None),
    };
    let ip = host.and_then(|h| h.ip).map(|i| i.to_string());
    let health = host.and_then(|h| h.health).map(|s| s.to_string());
    match format {
        WatchFormat::Json => {
            let ev = JsonEvent {
                time,
                revision,
                event,
                dc: &id.dc,
                role: &id.role,
                host: &id.host,
                ip,
                health,
                from,
                to,
                reason,
            };
            serde_json::to_string(&ev).unwrap_or_default() + "\n"
        }
        WatchFormat::Text => {
            let what = match change {
                Some(Change::Health { from, to }) => format!("health {from}→{to}"),
                Some(Change::MaintenanceOn(r)) => format!("maintenance on ({r})"),
                Some(Change::MaintenanceOff) => "maintenance off".into(),
                _ => event.to_string(),
            };
            let mut s = format!("{time} {what} {id}");
            if let Some(ip) = ip
                && !matches!(change, Some(Change::Down))
            {
                s.push_str(&format!(" {ip}"));
            }
            if let Some(h) = health
                && matches!(change, None | Some(Change::Up))
            {
                s.push_str(&format!(" {h}"));
            }
            s + "\n"
        }
    }
}

pub async fn run(
    config: &Config,
    args: &WatchArgs,
    cancel: &CancellationToken,
) -> Result<(), Failure> {
    let scope = scope(config, args.path.as_deref(), &args.common, 2)?;
    let key_scope = scope.key.clone();
    let etcd = Etcd::new(&config.etcd).map_err(|e| Failure::new(exit::DENIED, e))?;
    let start = tokio::select! {
        r = crate::etcd::retry_until(crate::etcd::never(), || Follower::start(&etcd, &config.prefix, &key_scope)) => r,
        _ = cancel.cancelled() => return Ok(()),
    };
    let (mut follower, bad) = start.map_err(|e| etcd_failure(e, &etcd))?;
    bad.into_iter().for_each(report_malformed);
    let mut out = std::io::stdout().lock();
    let snapshot: String = follower
        .registry
        .present()
        .filter(|(id, _)| scope.includes(id))
        .map(|(id, h)| line(args.output, follower.revision, id, Some(h), None))
        .collect();
    if out
        .write_all(snapshot.as_bytes())
        .and_then(|_| out.flush())
        .is_err()
    {
        return Ok(());
    }
    let mut report = report_malformed;
    let closed = stdout_closed();
    tokio::pin!(closed);
    loop {
        let batch = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            // `| head -1` on a quiet registry: done, without waiting for
            // an event to fail to write.
            _ = &mut closed => return Ok(()),
            b = follower.next(&mut report) => b.map_err(|e| etcd_failure(e, &etcd))?,
        };
        let mut text = String::new();
        for (id, before, after) in batch.changes.iter().filter(|(id, ..)| scope.includes(id)) {
            for change in diff(before.as_ref(), after.as_ref()) {
                let shown = after.as_ref().or(before.as_ref());
                text.push_str(&line(args.output, batch.revision, id, shown, Some(&change)));
            }
        }
        if out
            .write_all(text.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            // stdout closed (`| head`): done.
            return Ok(());
        }
    }
}

/// Resolves when stdout's reader has gone (`watch | head -1`): a pipe whose
/// read end is closed reports an error condition on its write end, which
/// poll(2) sees without writing anything. On a quiet registry that is the
/// only way to notice before the next event. Resolves never for a stdout
/// that cannot be polled (a file, say).
async fn stdout_closed() {
    use std::os::fd::AsFd;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use nix::poll::{PollFd, PollFlags, poll};

    // Stop the poller when this future is dropped.
    struct Stop(Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let _stop = Stop(stop.clone());
    let closed = tokio::task::spawn_blocking(move || {
        let stdout = std::io::stdout();
        while !stop.load(Ordering::Relaxed) {
            let mut fds = [PollFd::new(stdout.as_fd(), PollFlags::empty())];
            match poll(&mut fds, 200u16) {
                Ok(n) if n > 0 => {
                    let gone = PollFlags::POLLERR | PollFlags::POLLHUP;
                    if fds[0].revents().is_some_and(|r| r.intersects(gone)) {
                        return true;
                    }
                    // POLLNVAL and the like: stdout cannot be watched.
                    return false;
                }
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return false,
            }
        }
        false
    });
    match closed.await {
        Ok(true) => {}
        _ => std::future::pending().await,
    }
}
