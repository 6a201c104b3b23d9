//! The `haproxy` part of the benchmark: `registrar render` driving a real
//! haproxy (master-worker, stats socket) through its runtime API, beside
//! the same template with a reload for every change, in the same run.
//!
//! For each mode: the time from an etcd put (a server's address changed)
//! until haproxy's `show servers state` shows it, and, after a churn of
//! 1,000 address changes, the reloads run and the haproxy processes alive.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::support::{Agent, Cluster, free_port};
use super::{ms, percentile, seed_hosts};

const TEMPLATE: &str = r#"global
    stats socket SOCKET level admin
    maxconn 1000

defaults
    mode tcp
    timeout connect 1s
    timeout client 10s
    timeout server 10s

frontend www
    bind 127.0.0.1:PORT
    default_backend web

backend web
    balance roundrobin
{%- for h in hosts("bench/web", healthy=true) %}
    server {{ h.host }} {{ h.ip }}:80
{%- endfor %}
"#;

async fn ask(socket: &Path, command: &str) -> String {
    let Ok(mut s) = tokio::net::UnixStream::connect(socket).await else {
        return String::new();
    };
    if s.write_all(format!("{command}\n").as_bytes())
        .await
        .is_err()
    {
        return String::new();
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}

/// The address haproxy runs server `name` of backend web at.
async fn address(socket: &Path, name: &str) -> Option<String> {
    let state = ask(socket, "show servers state web").await;
    let servers = registrar::render::runtime::parse_state(&state)?;
    servers
        .get(&("web".to_string(), name.to_string()))
        .map(|r| r.addr.clone())
}

/// haproxy's processes: the master and every worker, old or new.
fn processes(master: u32) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let after = stat.rsplit(')').next().unwrap_or("");
        let pgrp = after.split_whitespace().nth(2);
        if pgrp == Some(master.to_string().as_str()) {
            n += 1;
        }
    }
    n
}

struct Haproxy {
    master: std::process::Child,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.master.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.master.wait();
    }
}

/// One mode: haproxy on render's first output, render following the
/// registry with (`runtime`) or without `haproxy:`.
async fn run_mode(
    c: &mut Client,
    endpoint: &str,
    dir: &Path,
    n: usize,
    runtime: bool,
) -> (Vec<Duration>, usize, usize) {
    let label = if runtime { "runtime" } else { "reload" };
    let socket = dir.join(format!("{label}.sock"));
    let template = dir.join(format!("{label}.j2"));
    std::fs::write(
        &template,
        TEMPLATE
            .replace("SOCKET", &socket.to_string_lossy())
            .replace("PORT", &free_port().to_string()),
    )
    .expect("template");
    let cfg_path = dir.join(format!("{label}.cfg"));
    let base = format!(
        "endpoints: [{endpoint}]\ntemplates:\n  - source: {}\n    destination: {}\n",
        template.display(),
        cfg_path.display()
    );
    let dry = dir.join(format!("{label}-dry.yaml"));
    std::fs::write(&dry, &base).expect("config");
    let out = std::process::Command::new(super::bin())
        .args(["render", "--dry-run", "--config"])
        .arg(&dry)
        .output()
        .expect("render --dry-run");
    std::fs::write(&cfg_path, &out.stdout).expect("first file");
    let haproxy = {
        use std::os::unix::process::CommandExt;
        Haproxy {
            master: std::process::Command::new("haproxy")
                .args(["-W", "-db", "-f"])
                .arg(&cfg_path)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .process_group(0)
                .spawn()
                .expect("haproxy (scripts/bench installs it)"),
        }
    };
    let started = Instant::now();
    while ask(&socket, "show info").await.is_empty() && started.elapsed() < Duration::from_secs(20)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reloads = dir.join(format!("{label}.reloads"));
    let runtime_part = if runtime {
        format!("    haproxy: {{socket: {}}}\n", socket.display())
    } else {
        String::new()
    };
    let cfg = dir.join(format!("{label}.yaml"));
    std::fs::write(
        &cfg,
        format!(
            "{base}    reload: [sh, -c, 'echo r >> {}; kill -USR2 {}']\n{runtime_part}",
            reloads.display(),
            haproxy.master.id()
        ),
    )
    .expect("config");
    let metrics = free_port();
    let _render = Agent::spawn(
        "render",
        &[
            "render".to_string(),
            "--config".into(),
            cfg.to_string_lossy().into_owned(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics}"),
        ],
    );
    // Ready: render's first render is done (it found the file unchanged).
    let health = format!("http://127.0.0.1:{metrics}/health");
    let started = Instant::now();
    while !super::support::etcd::try_http_get(&health)
        .await
        .is_ok_and(|h| h.contains("200 OK"))
        && started.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Change → routing: one address change at a time, until haproxy runs it.
    let mut latencies = Vec::new();
    for k in 0..40 {
        let i = (k * 7919) % n;
        let name = format!("h{i:05}");
        let ip = format!("10.250.{}.{}", k / 250, 1 + k % 250);
        let start = Instant::now();
        c.put(
            format!("/infrastructure/bench/web/{name}/ip"),
            ip.clone(),
            None,
        )
        .await
        .expect("put");
        while address(&socket, &name).await.as_deref() != Some(ip.as_str()) {
            if start.elapsed() > Duration::from_secs(30) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        latencies.push(start.elapsed());
    }
    latencies.sort();

    // A churn of 1,000 changes, one every 5 ms; then the reloads run and
    // the processes alive once the last change is in.
    let before = std::fs::read_to_string(&reloads).map_or(0, |t| t.lines().count());
    let mut last = (String::new(), String::new());
    for k in 0..1000usize {
        let i = (k * 104_729) % n;
        let name = format!("h{i:05}");
        let ip = format!("10.251.{}.{}", k / 250, 1 + k % 250);
        c.put(
            format!("/infrastructure/bench/web/{name}/ip"),
            ip.clone(),
            None,
        )
        .await
        .expect("put");
        last = (name, ip);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let start = Instant::now();
    while address(&socket, &last.0).await.as_deref() != Some(last.1.as_str())
        && start.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reloaded = std::fs::read_to_string(&reloads).map_or(0, |t| t.lines().count()) - before;
    let alive = processes(haproxy.master.id());
    (latencies, reloaded, alive)
}

/// `render` with `haproxy:` against reload-per-change, at `n` servers.
pub async fn haproxy_bench(n: usize) -> Vec<(String, String)> {
    let cluster = Cluster::start(1).await;
    let endpoint = cluster.endpoints()[0].clone();
    let mut c = cluster.client().await;
    seed_hosts(&mut c, n).await;
    let temp = tempfile::tempdir().expect("temp dir");
    let dir: PathBuf = temp.path().to_path_buf();
    let (rt, rt_reloads, rt_alive) = run_mode(&mut c, &endpoint, &dir, n, true).await;
    let (rl, rl_reloads, rl_alive) = run_mode(&mut c, &endpoint, &dir, n, false).await;
    vec![
        (
            format!("haproxy, {n} servers: etcd put → haproxy runs it, p50 / p99"),
            format!(
                "{} / {} through the runtime API (reload per change: {} / {})",
                ms(percentile(&rt, 0.5)),
                ms(percentile(&rt, 0.99)),
                ms(percentile(&rl, 0.5)),
                ms(percentile(&rl, 0.99))
            ),
        ),
        (
            format!("haproxy, {n} servers: reloads for 1,000 address changes"),
            format!("{rt_reloads} through the runtime API (reload per change: {rl_reloads})"),
        ),
        (
            format!("haproxy, {n} servers: haproxy processes alive after that churn"),
            format!("{rt_alive} through the runtime API (reload per change: {rl_alive})"),
        ),
    ]
}
