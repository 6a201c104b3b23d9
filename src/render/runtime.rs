//! haproxy's runtime API (its stats socket, `level admin`): applying a
//! [`plan`](super::haproxy::plan) without a reload (design.md section 6.9).
//!
//! The file is always written first (checked, fsynced, renamed); this module
//! then makes the running haproxy equal to it. Before it changes anything
//! it asks haproxy which servers it runs (`show servers state`), and goes
//! on only when those are the servers of the previous file: what haproxy
//! runs is known, not assumed, so a haproxy started from another file, or
//! changed by hand, is reloaded instead. Any command that fails stops the
//! cycle and asks for a reload, which makes haproxy equal to the file
//! whatever was applied before it.
//!
//! A removed server is put in maintenance at once, so it takes no new
//! request, and deleted (`del server`) once its last connection closed;
//! after `drain` its sessions are shut and it is deleted. One a stopped
//! render left in maintenance is found by [`runs`] and deleted the same
//! way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::haproxy::{Change, Parsed, Reload};

/// How long one command may take, connect to answer.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// The most a command's answer is read (a `show servers state` of 10,000
/// servers is about 1.5 MB).
const MAX_ANSWER: u64 = 64 << 20;

/// A stats socket at `level admin`.
#[derive(Debug, Clone)]
pub struct Socket {
    path: PathBuf,
}

impl Socket {
    pub fn new(path: &Path) -> Socket {
        Socket {
            path: path.to_path_buf(),
        }
    }

    /// Runs one command (haproxy answers and closes the connection).
    async fn ask(&self, command: &str) -> Result<String, Reload> {
        let unreachable = |e: String| Reload {
            reason: "socket",
            detail: format!(
                "haproxy's socket {} does not answer '{command}': {e}",
                self.path.display()
            ),
        };
        let talk = async {
            let mut s = tokio::net::UnixStream::connect(&self.path)
                .await
                .map_err(|e| e.to_string())?;
            s.write_all(format!("{command}\n").as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            (&mut s)
                .take(MAX_ANSWER)
                .read_to_end(&mut out)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<String, String>(String::from_utf8_lossy(&out).into_owned())
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, talk).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(unreachable(e)),
            Err(_) => Err(unreachable(format!("no answer within {COMMAND_TIMEOUT:?}"))),
        }
    }

    /// Runs a command that answers nothing, or one of `ok` on success.
    async fn run(&self, command: &str, ok: &[&str]) -> Result<(), Reload> {
        let answer = self.ask(command).await?;
        let said = answer.trim();
        if said.is_empty() || ok.iter().any(|o| said.starts_with(o)) {
            return Ok(());
        }
        Err(Reload {
            reason: "command",
            detail: format!("haproxy refused '{command}': {said}"),
        })
    }

    /// haproxy's version as (major, minor), from `show info`.
    async fn version(&self) -> Result<(u32, u32), Reload> {
        let info = self.ask("show info").await?;
        let version = info
            .lines()
            .find_map(|l| l.strip_prefix("Version: "))
            .unwrap_or("")
            .trim()
            .to_string();
        let mut parts = version.split(['.', '-']).map(|p| p.parse::<u32>().ok());
        match (parts.next().flatten(), parts.next().flatten()) {
            (Some(major), Some(minor)) => Ok((major, minor)),
            _ => Err(Reload {
                reason: "version",
                detail: format!(
                    "haproxy's 'show info' gives no version render can read ('{version}')"
                ),
            }),
        }
    }

    /// The servers haproxy runs, by backend and name.
    async fn servers(&self) -> Result<BTreeMap<(String, String), Running>, Reload> {
        let state = self.ask("show servers state").await?;
        parse_state(&state).ok_or_else(|| Reload {
            reason: "socket",
            detail: "haproxy's 'show servers state' is not in the format render reads".into(),
        })
    }
}

/// A server as haproxy runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub addr: String,
    pub port: Option<u16>,
    /// `srv_admin_state`: bit 0x01 is forced maintenance (`disabled`, or
    /// `set server ... state maint`).
    pub admin: u32,
    pub weight: u32,
}

impl Running {
    pub fn in_maintenance(&self) -> bool {
        self.admin & 0x01 != 0
    }
}

/// `show servers state` (format 1): a version line, a `#` header naming
/// the columns, one line per server.
pub fn parse_state(text: &str) -> Option<BTreeMap<(String, String), Running>> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    if lines.next()?.trim() != "1" {
        return None;
    }
    let header: Vec<&str> = lines
        .next()?
        .trim_start_matches('#')
        .split_whitespace()
        .collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (be, name, addr, admin, weight, port) = (
        col("be_name")?,
        col("srv_name")?,
        col("srv_addr")?,
        col("srv_admin_state")?,
        col("srv_uweight")?,
        col("srv_port")?,
    );
    let mut out = BTreeMap::new();
    for line in lines.filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let get = |i: usize| f.get(i).copied();
        out.insert(
            (get(be)?.to_string(), get(name)?.to_string()),
            Running {
                addr: get(addr)?.to_string(),
                port: get(port)?.parse().ok().filter(|p| *p != 0),
                admin: get(admin)?.parse().ok()?,
                weight: get(weight)?.parse().ok()?,
            },
        );
    }
    Some(out)
}

/// Whether haproxy runs the servers of `old` (but for those still
/// draining): the one thing that makes a runtime change safe. A server
/// haproxy runs in maintenance that the file does not list is one removed
/// at runtime and not yet deleted (by a render that stopped since): it is
/// returned, to be drained and deleted. Any other difference is drift.
pub fn runs(
    old: &Parsed,
    running: &BTreeMap<(String, String), Running>,
    draining: &[Draining],
) -> Result<Vec<(String, String)>, String> {
    let mut adopt = Vec::new();
    for (backend, servers) in old.backends() {
        for s in servers {
            let key = (backend.to_string(), s.name.clone());
            let Some(r) = running.get(&key) else {
                return Err(format!("haproxy runs no server {backend}/{}", s.name));
            };
            if let Some((ip, port)) = s.ip
                && (r.addr.parse().ok() != Some(ip) || (port.is_some() && r.port != port))
            {
                return Err(format!(
                    "haproxy runs {backend}/{} at {}:{}, not at {}",
                    s.name,
                    r.addr,
                    r.port.map_or("-".into(), |p| p.to_string()),
                    s.addr
                ));
            }
            // Without `weight` the line takes a default-server's, or 1.
            if let Some(w) = s.weight
                && r.weight != w
            {
                return Err(format!(
                    "haproxy runs {backend}/{} with weight {}, not {w}",
                    s.name, r.weight
                ));
            }
            if r.in_maintenance() != s.disabled {
                return Err(format!(
                    "haproxy has {backend}/{} {}",
                    s.name,
                    if r.in_maintenance() {
                        "in maintenance"
                    } else {
                        "out of maintenance"
                    }
                ));
            }
        }
        let listed: std::collections::BTreeSet<&str> =
            servers.iter().map(|s| s.name.as_str()).collect();
        for ((b, extra), r) in running.iter().filter(|((b, s), _)| {
            b == backend
                && !listed.contains(s.as_str())
                && !draining.iter().any(|d| d.backend == *b && d.server == *s)
        }) {
            if !r.in_maintenance() {
                return Err(format!(
                    "haproxy runs a server {backend}/{extra} the file does not list"
                ));
            }
            adopt.push((b.clone(), extra.clone()));
        }
    }
    Ok(adopt)
}

/// A removed server waiting for its last connection to close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draining {
    pub backend: String,
    pub server: String,
    pub since: Instant,
}

/// What one runtime cycle did, for the INFO line and the metrics.
#[derive(Debug, Default)]
pub struct Applied {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub moved: Vec<String>,
    pub reweighted: Vec<String>,
    pub disabled: Vec<String>,
    pub enabled: Vec<String>,
}

impl Applied {
    pub fn count(&self) -> usize {
        self.added.len()
            + self.removed.len()
            + self.moved.len()
            + self.reweighted.len()
            + self.disabled.len()
            + self.enabled.len()
    }
}

impl std::fmt::Display for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = [
            ("added", &self.added),
            ("removed", &self.removed),
            ("address", &self.moved),
            ("weight", &self.reweighted),
            ("disabled", &self.disabled),
            ("enabled", &self.enabled),
        ]
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(what, v)| format!("{what} {}", v.join(", ")))
        .collect();
        f.write_str(&parts.join("; "))
    }
}

/// Makes haproxy, running `old`, run `new`, through the socket; or says
/// why a reload must do it. Removed servers join `draining`.
pub async fn apply(
    socket: &Socket,
    old: &Parsed,
    changes: &[Change],
    draining: &mut Vec<Draining>,
) -> Result<Applied, Reload> {
    let (major, minor) = socket.version().await?;
    if (major, minor) < (2, 6) {
        return Err(Reload {
            reason: "version",
            detail: format!(
                "haproxy {major}.{minor} adds and deletes servers at runtime only in experimental mode; render needs 2.6 or later"
            ),
        });
    }
    let running = socket.servers().await?;
    let adopt = runs(old, &running, draining).map_err(|why| Reload {
        reason: "drift",
        detail: format!("haproxy does not run the previous file ({why})"),
    })?;
    for (backend, server) in adopt {
        tracing::info!(
            "haproxy still has {backend}/{server} in maintenance, removed earlier; deleting it once drained"
        );
        draining.push(Draining {
            backend,
            server,
            since: Instant::now(),
        });
    }
    if let Some(c) = changes.iter().find(|c| {
        matches!(c, Change::Add { .. })
            && draining
                .iter()
                .any(|d| d.backend == c.backend() && d.server == c.server())
    }) {
        return Err(Reload {
            reason: "draining",
            detail: format!(
                "server {}/{} is back while its old self still drains",
                c.backend(),
                c.server()
            ),
        });
    }
    let mut applied = Applied::default();
    for change in changes {
        let b = change.backend();
        let s = change.server();
        let who = format!("{b}/{s}");
        match change {
            Change::Remove { .. } => {
                socket
                    .run(&format!("set server {who} state maint"), &[])
                    .await?;
                draining.push(Draining {
                    backend: b.to_string(),
                    server: s.to_string(),
                    since: Instant::now(),
                });
                applied.removed.push(who);
            }
            Change::Addr { ip, port, .. } => {
                let port = port.map_or(String::new(), |p| format!(" port {p}"));
                socket
                    .run(
                        &format!("set server {who} addr {ip}{port}"),
                        &["IP changed", "no need to change", "port changed"],
                    )
                    .await?;
                applied.moved.push(who);
            }
            Change::Weight { weight, .. } => {
                socket
                    .run(&format!("set server {who} weight {weight}"), &[])
                    .await?;
                applied.reweighted.push(who);
            }
            Change::State { disabled, .. } => {
                let state = if *disabled { "maint" } else { "ready" };
                socket
                    .run(&format!("set server {who} state {state}"), &[])
                    .await?;
                if *disabled {
                    applied.disabled.push(who);
                } else {
                    applied.enabled.push(who);
                }
            }
            Change::Add { server, .. } => {
                socket
                    .run(
                        &format!("add server {who} {}", server.add_args()),
                        &["New server registered"],
                    )
                    .await?;
                if server.checks() {
                    socket.run(&format!("enable health {who}"), &[]).await?;
                }
                if server.agent_checks() {
                    socket.run(&format!("enable agent {who}"), &[]).await?;
                }
                if !server.disabled {
                    socket
                        .run(&format!("set server {who} state ready"), &[])
                        .await?;
                }
                applied.added.push(who);
            }
        }
    }
    sweep(socket, draining, None).await;
    Ok(applied)
}

/// Deletes the draining servers whose connections are gone; those draining
/// longer than `drain` have their sessions shut first. Keeps the rest.
pub async fn sweep(socket: &Socket, draining: &mut Vec<Draining>, drain: Option<Duration>) {
    let now = Instant::now();
    let mut kept = Vec::new();
    for d in draining.drain(..) {
        let who = format!("{}/{}", d.backend, d.server);
        if drain.is_some_and(|bound| now.duration_since(d.since) >= bound) {
            match socket
                .run(&format!("shutdown sessions server {who}"), &[])
                .await
            {
                Ok(()) => tracing::info!(
                    "server {who} still had connections after the drain bound; shut them"
                ),
                Err(e) => tracing::warn!("{e}"),
            }
        }
        match socket.ask(&format!("del server {who}")).await {
            Ok(a) if a.trim().starts_with("Server deleted") => {
                tracing::debug!("deleted drained server {who}");
            }
            // Gone already (a reload in between, say): nothing to wait for.
            Ok(a) if a.contains("No such") => {}
            Ok(_) => kept.push(d),
            Err(e) => {
                tracing::debug!("{e}");
                kept.push(d);
            }
        }
    }
    *draining = kept;
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATE: &str = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n3 web 1 a 10.0.0.1 2 0 1 1 12 6 3 4 6 0 0 0 - 80 - 0 0 - - 0\n3 web 2 b 10.0.0.2 0 1 5 5 12 6 3 4 6 0 0 0 - 80 - 0 0 - - 0\n";

    #[test]
    fn servers_state_is_read_by_its_header() {
        let s = parse_state(STATE).unwrap();
        assert_eq!(
            s[&("web".to_string(), "a".to_string())],
            Running {
                addr: "10.0.0.1".into(),
                port: Some(80),
                admin: 0,
                weight: 1
            }
        );
        assert!(s[&("web".to_string(), "b".to_string())].in_maintenance());
        assert_eq!(parse_state("2\n# x\n"), None);
        assert_eq!(parse_state(""), None);
    }

    #[test]
    fn runtime_changes_need_haproxy_to_run_the_previous_file() {
        let running = parse_state(STATE).unwrap();
        let file =
            "backend web\n    server a 10.0.0.1:80\n    server b 10.0.0.2:80 weight 5 disabled\n";
        assert_eq!(runs(&Parsed::parse(file), &running, &[]), Ok(vec![]));
        for (other, says) in [
            (file.replace("10.0.0.1:80", "10.0.0.1:81"), "at 10.0.0.1:80"),
            (file.replace("weight 5", "weight 4"), "weight 5"),
            (file.replace(" disabled", ""), "in maintenance"),
            (file.replace("server b", "server c"), "no server web/c"),
            (
                file.replace("    server a 10.0.0.1:80\n", ""),
                "does not list",
            ),
        ] {
            let got = runs(&Parsed::parse(&other), &running, &[]);
            assert!(
                got.as_ref().is_err_and(|e| e.contains(says)),
                "{says}: {got:?}"
            );
        }
        // A server being drained is not drift; one in maintenance that
        // nothing drains is one to drain (a render stopped before it was
        // deleted); one serving is drift (above).
        let without_b = file.replace("    server b 10.0.0.2:80 weight 5 disabled\n", "");
        let draining = [Draining {
            backend: "web".into(),
            server: "b".into(),
            since: Instant::now(),
        }];
        assert_eq!(
            runs(&Parsed::parse(&without_b), &running, &draining),
            Ok(vec![])
        );
        assert_eq!(
            runs(&Parsed::parse(&without_b), &running, &[]),
            Ok(vec![("web".to_string(), "b".to_string())])
        );
    }
}
