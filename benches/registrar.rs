//! registrar's benchmark: side-by-side figures against the shell recipes
//! operators use today, and a swarm of simulated hosts. It starts its own
//! etcd clusters and prints tables; it asserts nothing. Run it with
//! `scripts/bench` (see docs/PERFORMANCE.md).
//!
//! Flags: `--window SECS` (steady-state measurement window, default 60),
//! `--runs N` (one-shot runs, default 25), `--swarm 1000,5000,10000`,
//! `--only oneshot,steady,swarm,render,haproxy,dns`, `--render 1000,10000`,
//! (`--only order` rewrites link/agent.order instead: see build.rs),
//! `--haproxy 1000`, `--dns 1000,10000`,
//! `--spread` (swarm hosts spread over all members instead of all on the leader).

#[path = "../tests/it/support/mod.rs"]
#[allow(unused_imports)]
mod support;

#[path = "registrar/dns.rs"]
mod dns;

#[path = "registrar/haproxy.rs"]
mod haproxy;

#[path = "registrar/text_order.rs"]
mod text_order;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions};
use nix::sys::signal::Signal;
use registrar::etcd::Etcd;
use registrar::identity::Identity;
use registrar::registration::{Desired, Spec};
use support::{Agent, Cluster, Options};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The binary measured: see [`support::proc::binary`].
fn bin() -> std::path::PathBuf {
    support::proc::binary()
}

struct Args {
    window: Duration,
    runs: usize,
    swarm: Vec<usize>,
    /// Parts to run: oneshot, steady, swarm, render, haproxy, dns (default all).
    only: Vec<String>,
    /// Spread the swarm's hosts over all members (default: all on the leader).
    spread: bool,
    /// Registry sizes for the render part.
    render: Vec<usize>,
    /// Registry sizes for the dns part.
    dns: Vec<usize>,
    /// Server counts for the haproxy part.
    haproxy: Vec<usize>,
}

fn args() -> Args {
    let mut a = Args {
        window: Duration::from_secs(60),
        runs: 25,
        swarm: vec![1000, 5000, 10000],
        only: vec![
            "oneshot".into(),
            "steady".into(),
            "swarm".into(),
            "render".into(),
            "haproxy".into(),
            "dns".into(),
        ],
        spread: false,
        render: vec![1000, 10000],
        dns: vec![1000, 10000],
        haproxy: vec![1000],
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let next = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--window" => a.window = Duration::from_secs(next.parse().unwrap_or(60)),
            "--runs" => a.runs = next.parse().unwrap_or(25),
            "--swarm" => a.swarm = next.split(',').filter_map(|n| n.parse().ok()).collect(),
            "--render" => a.render = next.split(',').filter_map(|n| n.parse().ok()).collect(),
            "--dns" => a.dns = next.split(',').filter_map(|n| n.parse().ok()).collect(),
            "--haproxy" => a.haproxy = next.split(',').filter_map(|n| n.parse().ok()).collect(),
            "--only" => a.only = next.split(',').map(String::from).collect(),
            "--spread" => {
                a.spread = true;
                i += 1;
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// CPU seconds (user+system) and RSS (KiB) of a process.
/// A `kB` field of /proc/PID/status (0 when unreadable).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn proc_usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = 100.0; // USER_HZ on Linux
    let cpu = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / ticks
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / ticks;
    (cpu, status_kib(pid, "VmRSS:"))
}

/// etcd_server_proposals_committed_total of one member.
async fn proposals(endpoint: &str) -> f64 {
    metric(endpoint, "etcd_server_proposals_committed_total").await
}

/// A `/metrics` page, or nothing after 5 s: an overloaded member must not
/// hang the run, and a missing figure reads as 0.
async fn metrics_text(endpoint: &str) -> String {
    let url = format!("{endpoint}/metrics");
    let fetch = async { reqwest::get(url).await?.text().await };
    match tokio::time::timeout(Duration::from_secs(5), fetch).await {
        Ok(Ok(t)) => t,
        _ => String::new(),
    }
}

/// One unlabelled counter or gauge from a `/metrics` page.
async fn metric(endpoint: &str, name: &str) -> f64 {
    metrics_text(endpoint)
        .await
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn timed(cmd: &mut tokio::process::Command) -> (Duration, bool) {
    let start = Instant::now();
    let ok = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map(|s| s.success())
        .unwrap_or(false);
    (start.elapsed(), ok)
}

/// The flags of a benchmark host in dc1/web at 10.0.0.1 with TTL 30 s.
fn host_flags(endpoints: &str, host: &str, machine_id: &str) -> Vec<String> {
    [
        "--endpoints",
        endpoints,
        "--dc",
        "dc1",
        "--role",
        "web",
        "--host",
        host,
        "--ip",
        "10.0.0.1",
        "--machine-id",
        machine_id,
        "--ttl",
        "30s",
    ]
    .map(String::from)
    .to_vec()
}

async fn one_shot(runs: usize) -> Vec<(String, String)> {
    let cluster = Cluster::start(1).await;
    let ep = cluster.endpoint_list();
    let mut reg = Vec::new();
    let mut shell = Vec::new();
    for i in 0..runs {
        let (d, ok) = timed(
            tokio::process::Command::new(bin())
                .arg("register")
                .args(host_flags(&ep, &format!("r{i}"), &format!("m{i}"))),
        )
        .await;
        assert!(ok, "registrar register failed");
        reg.push(d);
        let recipe = format!(
            "L=$(etcdctl --endpoints={ep} lease grant 30 | grep -o '[0-9a-f]\\{{16\\}}') && \
             etcdctl --endpoints={ep} put /infrastructure/dc1/web/s{i}/ip 10.0.0.1 --lease=$L"
        );
        let (d, ok) = timed(
            tokio::process::Command::new("bash")
                .args(["-c", &recipe])
                .env("ETCDCTL_API", "3"),
        )
        .await;
        assert!(ok, "the shell recipe failed");
        shell.push(d);
    }
    reg.sort();
    shell.sort();
    let (rm, rp, sm, sp) = (
        percentile(&reg, 0.5),
        percentile(&reg, 0.95),
        percentile(&shell, 0.5),
        percentile(&shell, 0.95),
    );
    vec![
        (
            format!("one-shot `registrar register` ({runs} runs)"),
            format!("median {}, p95 {}", ms(rm), ms(rp)),
        ),
        (
            format!("shell recipe: `etcdctl lease grant`, grep, `etcdctl put` ({runs} runs)"),
            format!("median {}, p95 {}", ms(sm), ms(sp)),
        ),
        (
            "register / shell recipe (median)".into(),
            format!(
                "{:.2}x (target ≤ 0.25x)",
                rm.as_secs_f64() / sm.as_secs_f64()
            ),
        ),
    ]
}

/// The idle agent's configuration: an exec, a tcp (to `tcp_port`) and an
/// http check, every 10 s; the http target is served from this process.
async fn agent_config(dir: &std::path::Path, tcp_port: u16) -> std::path::PathBuf {
    let cfg = dir.join("registrar.yaml");
    // The http check needs a target that is not etcd: etcd 3.4's /health is
    // a quorum read through raft and would count as a proposal.
    let http = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("http listener");
    let http_port = http.local_addr().expect("addr").port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut sock, _)) = http.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = sock.read(&mut buf).await;
                let _ = sock
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    std::fs::write(
        &cfg,
        format!(
            "checks:\n  - {{name: exec, exec: ['true'], interval: 10s}}\n  - {{name: tcp, tcp: '127.0.0.1:{tcp_port}', interval: 10s}}\n  - {{name: http, http: 'http://127.0.0.1:{http_port}/healthz', interval: 10s}}\n"
        ),
    )
    .expect("config");
    cfg
}

/// Waits until `prefix` holds `n` keys or `within` has passed; whether it
/// does.
async fn keys_under(c: &Client, prefix: &str, n: usize, within: Duration) -> bool {
    let started = Instant::now();
    loop {
        let have = c
            .clone()
            .get(
                prefix,
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .map(|r| r.count())
            .unwrap_or(0);
        if have >= n as i64 {
            return true;
        }
        if started.elapsed() > within {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn steady_state(window: Duration) -> Vec<(String, String)> {
    let hosts = 20;
    let ours = Cluster::start(1).await;
    let theirs = Cluster::start(1).await;
    let ep = ours.endpoint_list();
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = agent_config(dir.path(), ours.members[0].client_port).await;
    let mut agents = Vec::new();
    for i in 0..hosts {
        let mut args = vec![
            "agent".to_string(),
            "--config".into(),
            cfg.to_string_lossy().into_owned(),
        ];
        args.extend(host_flags(&ep, &format!("a{i}"), &format!("a{i}")));
        agents.push(Agent::spawn("agent", &args));
    }
    // The baseline for memory/CPU: etcdctl lease keep-alive on one lease.
    let other = theirs.endpoint_list();
    let grant = tokio::process::Command::new("etcdctl")
        .args([
            format!("--endpoints={other}"),
            "lease".into(),
            "grant".into(),
            "30".into(),
        ])
        .env("ETCDCTL_API", "3")
        .output()
        .await
        .expect("etcdctl lease grant");
    let text = String::from_utf8_lossy(&grant.stdout);
    let lease = text.split_whitespace().nth(1).unwrap_or("0").to_string();
    let mut keepalive = tokio::process::Command::new("etcdctl")
        .args([
            format!("--endpoints={other}"),
            "lease".into(),
            "keep-alive".into(),
            lease,
        ])
        .env("ETCDCTL_API", "3")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("etcdctl lease keep-alive");
    // One more agent, against etcd over mutual TLS: it runs the TLS code
    // as well, which link/agent.order places after the plain agent's.
    let secure = Cluster::start_with(
        1,
        Options {
            tls: true,
            ..Options::default()
        },
    )
    .await;
    let tls_agent = {
        let mut args = vec![
            "agent".to_string(),
            "--config".into(),
            cfg.to_string_lossy().into_owned(),
        ];
        args.extend(host_flags(&secure.endpoint_list(), "tls", "tls"));
        args.extend(secure.pki.as_ref().expect("a TLS cluster").client_args());
        Agent::spawn("agent over TLS", &args)
    };
    // Let everything register and settle before measuring.
    let c = ours.client().await;
    keys_under(
        &c,
        "/infrastructure/dc1/web/",
        hosts * 6,
        Duration::from_secs(30),
    )
    .await;
    keys_under(
        &secure.client().await,
        "/infrastructure/dc1/web/",
        6,
        Duration::from_secs(30),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let agent_pid = agents[0].pid().as_raw() as u32;
    let ka_pid = keepalive.id().unwrap_or(0);
    let (a_cpu0, _) = proc_usage(agent_pid);
    let (k_cpu0, _) = proc_usage(ka_pid);
    let ours_p0 = proposals(&ep).await;
    let theirs_p0 = proposals(&other).await;
    // The v2-style timer, emulated with v3 puts: 3 writes per host per minute.
    let timer = {
        let other = other.clone();
        tokio::spawn(async move {
            let mut c = Client::connect([other], None).await.expect("client");
            let mut tick = tokio::time::interval(Duration::from_secs(20));
            loop {
                tick.tick().await;
                for h in 0..hosts {
                    let _ = c
                        .put(format!("/infrastructure/dc1/web/t{h}/ip"), "10.0.0.1", None)
                        .await;
                }
            }
        })
    };
    tokio::time::sleep(window).await;
    timer.abort();
    let (a_cpu1, a_rss) = proc_usage(agent_pid);
    let (_, tls_rss) = proc_usage(tls_agent.pid().as_raw() as u32);
    drop(tls_agent);
    let (k_cpu1, k_rss) = proc_usage(ka_pid);
    // Anonymous memory is what the process itself allocated; the rest of
    // RSS is file pages of its binary and libraries.
    let (a_anon, k_anon) = (
        status_kib(agent_pid, "RssAnon:"),
        status_kib(ka_pid, "RssAnon:"),
    );
    let per_host_hour = |p0: f64, p1: f64| (p1 - p0) / hosts as f64 / window.as_secs_f64() * 3600.0;
    let ours_rate = per_host_hour(ours_p0, proposals(&ep).await);
    let theirs_rate = per_host_hour(theirs_p0, proposals(&other).await);
    let hour = 3600.0 / window.as_secs_f64();

    // Graceful stop and crash, seen by a watcher.
    let w = c.clone();
    let gone_after = |host: String, sig: Signal| {
        let pid = agents
            .iter()
            .find(|a| a.name == "agent" && a.log().contains(&format!("host=\"{host}\"")))
            .map(|a| a.pid());
        let mut w = w.clone();
        async move {
            let key = format!("/infrastructure/dc1/web/{host}/owner");
            let mut stream = w.watch(key.as_str(), None).await.expect("watch");
            let _ = stream.message().await; // created
            let start = Instant::now();
            if let Some(pid) = pid {
                let _ = nix::sys::signal::kill(pid, sig);
            }
            loop {
                match tokio::time::timeout(Duration::from_secs(60), stream.message()).await {
                    Ok(Ok(Some(r)))
                        if r.events()
                            .iter()
                            .any(|e| e.event_type() == EventType::Delete) =>
                    {
                        return start.elapsed();
                    }
                    Ok(Ok(Some(_))) => continue,
                    _ => return Duration::MAX,
                }
            }
        }
    };
    let graceful = gone_after("a1".into(), Signal::SIGTERM).await;
    let crash = gone_after("a2".into(), Signal::SIGKILL).await;
    let _ = keepalive.start_kill();
    drop(agents);
    let order = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(text_order::ORDER);
    let (found, listed) = text_order::coverage(&bin(), &order);
    vec![
        (
            "text order (build.rs): functions of link/agent.order in this binary".into(),
            format!(
                "{found} of {listed}{}",
                if found * 10 < listed * 9 {
                    "; STALE: scripts/order-text rewrites it, and the RSS below is higher than it should be"
                } else {
                    ""
                }
            ),
        ),
        (
            "idle agent RSS (3 checks, TTL 30s)".into(),
            format!("{:.1} MiB", a_rss as f64 / 1024.0),
        ),
        (
            "the same agent against etcd over mutual TLS: RSS".into(),
            format!(
                "{:.1} MiB ({:.2}x keep-alive's, which is over plain HTTP)",
                tls_rss as f64 / 1024.0,
                tls_rss as f64 / k_rss.max(1) as f64
            ),
        ),
        (
            "`etcdctl lease keep-alive` RSS".into(),
            format!("{:.1} MiB", k_rss as f64 / 1024.0),
        ),
        (
            "anonymous RSS: agent / `etcdctl lease keep-alive`".into(),
            format!(
                "{:.1} MiB / {:.1} MiB ({:.2}x)",
                a_anon as f64 / 1024.0,
                k_anon as f64 / 1024.0,
                a_anon as f64 / k_anon.max(1) as f64
            ),
        ),
        (
            "agent RSS / keep-alive RSS".into(),
            format!(
                "{:.2}x (target ≤ 0.33x)",
                a_rss as f64 / k_rss.max(1) as f64
            ),
        ),
        (
            "idle agent CPU".into(),
            format!("{:.2} s/hour", (a_cpu1 - a_cpu0) * hour),
        ),
        (
            "`etcdctl lease keep-alive` CPU".into(),
            format!("{:.2} s/hour", (k_cpu1 - k_cpu0) * hour),
        ),
        (
            "raft proposals per host-hour: registrar agents".into(),
            format!("{ours_rate:.1} (target 0)"),
        ),
        (
            "raft proposals per host-hour: v2-style timer (3 puts/min)".into(),
            format!("{theirs_rate:.1}"),
        ),
        (
            "graceful stop: SIGTERM → watcher sees the keys gone".into(),
            format!("{} (target ≤ 50 ms)", ms(graceful)),
        ),
        (
            "crash: kill -9 → keys expire (TTL 30 s)".into(),
            format!("{:.1} s", crash.as_secs_f64()),
        ),
    ]
}

/// What the simulated hosts report through the agent's observer, so that
/// following the swarm costs etcd nothing: keep-alives across the swarm,
/// and when each host registered first and last (ms since `start`, 0 for
/// never). Polling etcd instead meant a range read over every key of every
/// host several times a second, on the same two cores.
struct Tally {
    start: Instant,
    alive: AtomicU64,
    first: Vec<AtomicU64>,
    last: Vec<AtomicU64>,
}

impl Tally {
    fn new(n: usize, start: Instant) -> Tally {
        Tally {
            start,
            alive: AtomicU64::new(0),
            first: (0..n).map(|_| AtomicU64::new(0)).collect(),
            last: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn ms(&self, at: Instant) -> u64 {
        (at.duration_since(self.start).as_millis() as u64).max(1)
    }

    /// How many hosts registered after `after` (ms), and the latest such
    /// registration, from `times` (first or last).
    fn registered_after(times: &[AtomicU64], after: u64) -> (usize, Duration) {
        let mut count = 0;
        let mut latest = 0;
        for t in times {
            let t = t.load(Ordering::Relaxed);
            if t > after {
                count += 1;
                latest = latest.max(t);
            }
        }
        (count, Duration::from_millis(latest))
    }
}

/// The observer of simulated host `host`.
struct HostObserver {
    tally: Arc<Tally>,
    host: usize,
}

impl registrar::lease::LeaseObserver for HostObserver {
    fn alive(&self, _ttl: Duration) {
        self.tally.alive.fetch_add(1, Ordering::Relaxed);
    }
}

impl registrar::registration::Observer for HostObserver {
    fn registered(&self, _lease: registrar::lease::Lease, _desired: &Desired, _first: bool) {
        let now = self.tally.ms(Instant::now());
        let _ = self.tally.first[self.host].compare_exchange(
            0,
            now,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        self.tally.last[self.host].store(now, Ordering::Relaxed);
    }
}

/// How many simulated hosts have their owner key in etcd on a lease not in
/// `old`, or why that is unknown (an overloaded cluster may not answer).
async fn owners_in_etcd(
    c: &Client,
    old: &std::collections::BTreeSet<i64>,
) -> Result<usize, String> {
    let mut c = c.clone();
    let get = c.get(
        "/infrastructure/swarm/",
        Some(GetOptions::new().with_prefix().with_keys_only()),
    );
    match tokio::time::timeout(Duration::from_secs(10), get).await {
        Ok(Ok(r)) => Ok(r
            .kvs()
            .iter()
            .filter(|kv| kv.key().ends_with(b"/owner") && !old.contains(&kv.lease()))
            .count()),
        Ok(Err(e)) => Err(format!("reading the registry failed: {e}")),
        Err(_) => Err("etcd did not answer within 10 s".into()),
    }
}

async fn swarm(n: usize, window: Duration, spread: bool) -> Vec<(String, String)> {
    // etcd's default timing (heartbeat 100 ms, election timeout 1 s), as
    // production clusters run; the test suite's 50/500 ms makes a cluster
    // this loaded elect leaders over and over.
    let cluster = Cluster::start_with(
        3,
        Options {
            extra_args: ["--heartbeat-interval", "100", "--election-timeout", "1000"]
                .map(String::from)
                .to_vec(),
            ..Options::default()
        },
    )
    .await;
    // Elections so far: the distinct terms in which a member logged a
    // leader elected, after the first. (The leader-change metric cannot be
    // scraped from an overloaded member, and read as 0 then.)
    let elections = || {
        let mut terms = std::collections::BTreeSet::new();
        for i in 0..cluster.members.len() {
            for line in cluster.log_of(i).lines() {
                if let Some(term) = line
                    .split_once("elected leader")
                    .and_then(|(_, rest)| rest.split_once("at term "))
                    .and_then(|(_, t)| t.split(|c: char| !c.is_ascii_digit()).next())
                    .and_then(|t| t.parse::<u64>().ok())
                {
                    terms.insert(term);
                }
            }
        }
        terms.len().saturating_sub(1)
    };
    let config = registrar::config::EtcdConfig {
        endpoints: cluster.endpoints(),
        tls: None,
        user: None,
        request_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(3),
    };
    // Each agent has its own connection and its own idea of which
    // endpoint answers best. Here a group of hosts shares one set of
    // clients, so that one host's fail-over moves only its group, not the
    // whole swarm. By default every group starts on the leader: on one
    // machine, a follower's forwarding of requests and keep-alives to the
    // leader costs CPU that the leader then lacks, which in a real cluster
    // is on other machines. With `--spread`, the groups start on the
    // members in turn, as a fleet spreads (each agent starts at a random
    // endpoint).
    const GROUP: usize = 100;
    let leader = cluster.leader(0).await;
    let etcds: Vec<Arc<Etcd>> = (0..n.div_ceil(GROUP))
        .map(|g| {
            let etcd = Etcd::new(&config).expect("etcd");
            etcd.set_preferred(if spread {
                g % config.endpoints.len()
            } else {
                leader
            });
            Arc::new(etcd)
        })
        .collect();
    let cancel = CancellationToken::new();
    let pids: Vec<u32> = cluster
        .members
        .iter()
        .filter_map(|m| m.pid())
        .map(|p| p.as_raw() as u32)
        .collect();
    let roles = vec!["web".to_string()];
    let empty_services = BTreeMap::new();
    let empty_meta = BTreeMap::new();
    let empty_checks = BTreeMap::new();
    let e0 = elections();
    let start = Instant::now();
    let tally = Arc::new(Tally::new(n, start));
    let mut tasks = Vec::new();
    for i in 0..n {
        let identity = Identity {
            host: format!("s{i:05}"),
            ip: "10.0.0.1".parse().expect("ip"),
            machine_id: format!("swarm-{i}"),
        };
        let desired = Desired::build(
            &Spec {
                prefix: "/infrastructure",
                dc: "swarm",
                roles: &roles,
                services: &empty_services,
                meta: &empty_meta,
                health: "passing",
                checks: &empty_checks,
                passing: 0,
                maintenance: None,
                withdrawn: false,
            },
            &identity,
        );
        let (_tx, rx) = tokio::sync::watch::channel(Some(desired));
        let etcd = etcds[i / GROUP].clone();
        let cancel = cancel.clone();
        let observer = HostObserver {
            tally: tally.clone(),
            host: i,
        };
        tasks.push(tokio::spawn(async move {
            let _keep = _tx;
            let _ = registrar::agent::keep_registered(
                etcd,
                Duration::from_secs(30),
                rx,
                Arc::new(observer),
                cancel,
            )
            .await;
        }));
    }
    let c = cluster.client_of(0).await;
    let mut progress = Instant::now();
    let registered_in = loop {
        let (have, latest) = Tally::registered_after(&tally.first, 0);
        if have >= n {
            break Some(latest);
        }
        if start.elapsed() > Duration::from_secs(600) {
            break None;
        }
        if progress.elapsed() >= Duration::from_secs(5) {
            progress = Instant::now();
            let etcd_rss: u64 = pids.iter().map(|p| proc_usage(*p).1).sum();
            eprintln!(
                "swarm {n}: {have} registered after {:.0} s; this process {} MiB, etcd {} MiB; {} elections",
                start.elapsed().as_secs_f64(),
                proc_usage(std::process::id()).1 / 1024,
                etcd_rss / 1024,
                elections().saturating_sub(e0),
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // What the agents reported, checked once against etcd.
    let registered = owners_in_etcd(&c, &Default::default())
        .await
        .map_or_else(|e| format!("? ({e})"), |h| h.to_string());
    // Steady state.
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Leases beyond one per host are grants that answered after the host
    // had given up on them (request timeout); each expires unused, and its
    // expiry is a proposal.
    let leases_held = c
        .clone()
        .leases()
        .await
        .map_or_else(|e| format!("? ({e})"), |r| r.leases().len().to_string());
    let cpu0: f64 = pids.iter().map(|p| proc_usage(*p).0).sum();
    let own0 = proc_usage(std::process::id()).0;
    let p0 = proposals(&cluster.members[0].endpoint()).await;
    let k0 = tally.alive.load(Ordering::Relaxed);
    tokio::time::sleep(window).await;
    let k1 = tally.alive.load(Ordering::Relaxed);
    let p1 = proposals(&cluster.members[0].endpoint()).await;
    let usage: Vec<(f64, u64)> = pids.iter().map(|p| proc_usage(*p)).collect();
    let cpu1: f64 = usage.iter().map(|u| u.0).sum();
    let own1 = proc_usage(std::process::id()).0;
    let rss: u64 = usage.iter().map(|u| u.1).sum();
    let secs = window.as_secs_f64();
    // Mass revoke: every lease at once.
    let leases = c
        .clone()
        .leases()
        .await
        .map(|r| r.leases().iter().map(|l| l.id()).collect::<Vec<_>>())
        .unwrap_or_default();
    let revoked_at = Instant::now();
    let mut revokes = Vec::new();
    // Many concurrent revokers, so the revokes land as one burst.
    for chunk in leases.chunks(20) {
        let chunk = chunk.to_vec();
        let mut rc = c.clone();
        revokes.push(tokio::spawn(async move {
            for id in chunk {
                let _ = rc.lease_revoke(id).await;
            }
        }));
    }
    for r in revokes {
        let _ = r.await;
    }
    let revoking_took = revoked_at.elapsed();
    let old: std::collections::BTreeSet<i64> = leases.into_iter().collect();
    let since = tally.ms(revoked_at);
    let mut checked = Instant::now() - Duration::from_secs(1);
    let all_back = loop {
        // Every host has registered again since the revokes began, by its
        // own report; then etcd must agree: every owner key on a new lease.
        let (back, _) = Tally::registered_after(&tally.last, since);
        if back >= n && checked.elapsed() >= Duration::from_secs(1) {
            checked = Instant::now();
            if owners_in_etcd(&c, &old).await.is_ok_and(|o| o >= n) {
                let (_, latest) = Tally::registered_after(&tally.last, since);
                break Some(latest.saturating_sub(Duration::from_millis(since)));
            }
        }
        if revoked_at.elapsed() > Duration::from_secs(300) {
            eprintln!("swarm {n}: {back} of {n} hosts back 300 s after the mass revoke");
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let elections_total = elections().saturating_sub(e0);
    {
        // Why the members lost their leader, if they did: etcd logs stalls
        // of the disk and of the raft loop (CPU) with these phrases.
        for (i, _) in cluster.members.iter().enumerate() {
            let log = cluster.log_of(i);
            for phrase in [
                "slow fdatasync",
                "took too long",
                "failed to send out heartbeat",
                "is starting a new election",
                "elected leader",
                "failed to revoke lease",
            ] {
                let count = log.lines().filter(|l| l.contains(phrase)).count();
                if count > 0 {
                    eprintln!("swarm {n}: member {i}: {count} log lines with {phrase:?}");
                }
            }
        }
    }
    cancel.cancel();
    for t in tasks {
        let _ = t.await;
    }
    vec![
        (
            format!("swarm {n}: time to register all"),
            format!(
                "{} ({registered}/{n} registered {}; target ≤ 20 s for 10k)",
                registered_in.map_or_else(
                    || "not within 600 s".into(),
                    |d| format!("{:.1} s", d.as_secs_f64())
                ),
                if spread {
                    "through all 3 members"
                } else {
                    "through the leader"
                }
            ),
        ),
        (
            format!("swarm {n}: keep-alives per second"),
            format!("{:.0}", (k1 - k0) as f64 / secs),
        ),
        (
            format!("swarm {n}: etcd CPU (3 members)"),
            format!("{:.0}% of one core", (cpu1 - cpu0) / secs * 100.0),
        ),
        (
            format!("swarm {n}: the simulated hosts' CPU and RSS (one process)"),
            format!(
                "{:.0}% of one core, {} MiB",
                (own1 - own0) / secs * 100.0,
                proc_usage(std::process::id()).1 / 1024
            ),
        ),
        (
            format!("swarm {n}: etcd RSS (3 members)"),
            format!("{:.0} MiB", rss as f64 / 1024.0),
        ),
        (
            format!("swarm {n}: leases in etcd as the steady window starts"),
            format!("{leases_held} (one per host is {n})"),
        ),
        (
            format!("swarm {n}: raft proposals per minute, steady"),
            format!("{:.1} (target 0)", (p1 - p0) / secs * 60.0),
        ),
        (
            format!("swarm {n}: all re-registered after a mass revoke"),
            all_back
                .map(|d| {
                    format!(
                        "{:.1} s, none lost (target ≤ 30 s): etcd took {:.1} s to revoke all {n} leases, the last host was back {:.1} s after that",
                        d.as_secs_f64(),
                        revoking_took.as_secs_f64(),
                        d.saturating_sub(revoking_took).as_secs_f64()
                    )
                })
                .unwrap_or_else(|| "not within 300 s".into()),
        ),
        (
            format!("swarm {n}: etcd leader changes during the run"),
            elections_total.to_string(),
        ),
    ]
}

fn main() {
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let etcd_version = std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!("# registrar benchmark");
    println!();
    println!("- {etcd_version}; machine: {cores} cores, {cpu}");
    println!(
        "- method: real etcd processes on loopback; release build; steady-state window {}s; {} one-shot runs",
        a.window.as_secs(),
        a.runs
    );
    println!();
    println!("| measure | result |");
    println!("|---|---|");
    let print = |rows: Vec<(String, String)>| {
        for (k, v) in rows {
            println!("| {k} | {v} |");
        }
    };
    let part = |p: &str| a.only.iter().any(|o| o == p);
    if part("oneshot") {
        print(rt.block_on(one_shot(a.runs)));
    }
    if part("steady") {
        print(rt.block_on(steady_state(a.window)));
    }
    if part("render") {
        for n in a.render.clone() {
            print(rt.block_on(render_bench(n)));
        }
    }
    if part("haproxy") {
        for n in a.haproxy.clone() {
            print(rt.block_on(haproxy::haproxy_bench(n)));
        }
    }
    if part("dns") {
        for n in a.dns.clone() {
            print(rt.block_on(dns::dns_bench(n)));
        }
    }
    // Not a measurement and not in the default run: it rewrites a file of
    // the repository (scripts/order-text).
    if a.only.iter().any(|o| o == "order") {
        let order = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(text_order::ORDER);
        print(rt.block_on(text_order::write(&order)));
    }
    if part("swarm") {
        // The simulated hosts would run on other machines; here they share
        // two cores with the three etcd members. Their worker threads run
        // at nice 10 so that etcd's heartbeats are not starved (etcd itself
        // is started from the main thread, at normal priority).
        let swarm_rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .on_thread_start(|| {
                // SAFETY: setpriority has no memory-safety preconditions;
                // on Linux, `who = 0` means the calling thread.
                let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
            })
            .build()
            .expect("runtime");
        for n in a.swarm {
            print(swarm_rt.block_on(swarm(n, Duration::from_secs(20).min(a.window), a.spread)));
        }
    }
}

/// Waits until the baseline loop has rendered nothing for 500 ms (at most
/// 20 s): no read of it is in flight.
async fn settled(renders: &AtomicU64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = renders.load(Ordering::Relaxed);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = renders.load(Ordering::Relaxed);
        if now == last {
            return;
        }
        last = now;
    }
}

/// The number of Range requests a member has served.
async fn range_requests(endpoint: &str) -> f64 {
    metrics_text(endpoint)
        .await
        .lines()
        .filter(|l| {
            l.starts_with("grpc_server_handled_total") && l.contains("grpc_method=\"Range\"")
        })
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// Writes `n` present, passing hosts in bench/web directly, 40 a transaction.
async fn seed_hosts(c: &mut Client, n: usize) {
    use etcd_client::{Txn, TxnOp};
    for chunk in (0..n).collect::<Vec<_>>().chunks(40) {
        let mut ops = Vec::new();
        for i in chunk {
            let dir = format!("/infrastructure/bench/web/h{i:05}/");
            ops.push(TxnOp::put(
                format!("{dir}ip"),
                format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256),
                None,
            ));
            ops.push(TxnOp::put(format!("{dir}health"), "passing", None));
            ops.push(TxnOp::put(format!("{dir}owner"), format!("m{i}"), None));
        }
        c.txn(Txn::new().and_then(ops)).await.expect("seed hosts");
    }
}

/// The healthy hosts as the template renders them, from a range read (the
/// baseline's way: confd re-reads its whole prefix on every event).
fn baseline_render(kvs: &[etcd_client::KeyValue]) -> String {
    let mut hosts: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
    for kv in kvs {
        let key = String::from_utf8_lossy(kv.key());
        let Some(rest) = key.strip_prefix("/infrastructure/bench/web/") else {
            continue;
        };
        let Some((host, leaf)) = rest.split_once('/') else {
            continue;
        };
        let e = hosts.entry(host.to_string()).or_default();
        let v = String::from_utf8_lossy(kv.value()).into_owned();
        match leaf {
            "ip" => e.0 = Some(v),
            "health" => e.1 = Some(v),
            _ => {}
        }
    }
    hosts
        .iter()
        .filter(|(_, (ip, h))| ip.is_some() && h.as_deref() == Some("passing"))
        .map(|(host, (ip, _))| format!("{host} {}\n", ip.as_deref().unwrap_or("")))
        .collect()
}

/// The confd approach, as a loop: watch the prefix, and on every watch
/// response re-read the whole prefix and rewrite the file.
async fn baseline(
    endpoint: String,
    out: std::path::PathBuf,
    renders: Arc<AtomicU64>,
    cancel: CancellationToken,
) {
    let mut c = Client::connect([endpoint], None)
        .await
        .expect("baseline client");
    let prefix = "/infrastructure/bench/web/";
    let first = c
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .expect("read");
    let _ = std::fs::write(&out, baseline_render(first.kvs()));
    let mut stream = c
        .watch(prefix, Some(etcd_client::WatchOptions::new().with_prefix()))
        .await
        .expect("watch");
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => return,
            m = stream.message() => m,
        };
        let Ok(Some(resp)) = msg else { return };
        if resp.events().is_empty() {
            continue;
        }
        let all = c
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .expect("read");
        let text = baseline_render(all.kvs());
        let tmp = out.with_extension("tmp");
        let _ = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, &out));
        renders.fetch_add(1, Ordering::Relaxed);
    }
}

/// Flips host `i`'s health and waits until both files show it; the time
/// each took from the put.
async fn change_reaches_files(
    c: &mut Client,
    ours: &std::path::Path,
    theirs: &std::path::Path,
    i: usize,
    healthy: bool,
) -> (Duration, Duration) {
    let key = format!("/infrastructure/bench/web/h{i:05}/health");
    let line = format!("h{i:05} ");
    let start = Instant::now();
    c.put(key, if healthy { "passing" } else { "critical" }, None)
        .await
        .expect("put");
    let (mut a, mut b) = (None, None);
    while a.is_none() || b.is_none() {
        for (slot, path) in [(&mut a, ours), (&mut b, theirs)] {
            if slot.is_none()
                && std::fs::read_to_string(path)
                    .unwrap_or_default()
                    .contains(&line)
                    == healthy
            {
                *slot = Some(start.elapsed());
            }
        }
        if start.elapsed() > Duration::from_secs(30) {
            break;
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    (a.unwrap_or(start.elapsed()), b.unwrap_or(start.elapsed()))
}

/// `registrar render` against the confd approach, with `n` hosts: change
/// latency to the file, and the cost of a burst of 1,000 changes.
async fn render_bench(n: usize) -> Vec<(String, String)> {
    // Two members: registrar render reads from the first, the confd-style
    // baseline from the second, so the first member's Range counter is
    // registrar's own requests and nothing else's.
    let cluster = Cluster::start(2).await;
    let endpoint = cluster.endpoints()[0].clone();
    let base_endpoint = cluster.endpoints()[1].clone();
    let mut c = cluster.client().await;
    seed_hosts(&mut c, n).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let template = dir.path().join("hosts.j2");
    std::fs::write(
        &template,
        "{% for h in hosts(\"bench/web\", healthy=true) %}{{ h.host }} {{ h.ip }}\n{% endfor %}",
    )
    .expect("template");
    let mut rows = Vec::new();
    for (label, wait_min) in [("latency", "0s"), ("burst", "200ms")] {
        let out = dir.path().join(format!("{label}.out"));
        let metrics_port = support::free_port();
        let cfg = dir.path().join(format!("{label}.yaml"));
        std::fs::write(
            &cfg,
            format!(
                "endpoints: [{endpoint}]\nmetrics_listen: 127.0.0.1:{metrics_port}\ntemplates:\n  - source: {}\n    destination: {}\n    wait: {{min: {wait_min}}}\n",
                template.display(),
                out.display()
            ),
        )
        .expect("config");
        let render = Agent::spawn(
            "render",
            &[
                "render".to_string(),
                "--config".into(),
                cfg.to_string_lossy().into_owned(),
            ],
        );
        let started = Instant::now();
        while std::fs::read_to_string(&out).map_or(0, |t| t.lines().count()) < n {
            if started.elapsed() > Duration::from_secs(120) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let first = started.elapsed();
        let pid = render.pid().as_raw() as u32;
        let base_out = dir.path().join(format!("{label}.baseline"));
        let renders = Arc::new(AtomicU64::new(0));
        let cancel = CancellationToken::new();
        let base = tokio::spawn(baseline(
            base_endpoint.clone(),
            base_out.clone(),
            renders.clone(),
            cancel.clone(),
        ));
        while std::fs::read_to_string(&base_out).map_or(0, |t| t.lines().count()) < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if label == "latency" {
            rows.push((
                format!("render {n} hosts: first complete file after start"),
                ms(first),
            ));
            let mut ours = Vec::new();
            let mut theirs = Vec::new();
            for k in 0..40 {
                let i = (k * 7919) % n;
                let (a, b) = change_reaches_files(&mut c, &out, &base_out, i, false).await;
                ours.push(a);
                theirs.push(b);
                change_reaches_files(&mut c, &out, &base_out, i, true).await;
            }
            ours.sort();
            theirs.sort();
            rows.push((
                format!("render {n} hosts: one change to the file, p50 / p99 (wait.min 0)"),
                format!(
                    "{} / {} (confd-style re-read loop: {} / {})",
                    ms(percentile(&ours, 0.5)),
                    ms(percentile(&ours, 0.99)),
                    ms(percentile(&theirs, 0.5)),
                    ms(percentile(&theirs, 0.99))
                ),
            ));
        } else {
            let metric_url = format!("http://127.0.0.1:{metrics_port}");
            settled(&renders).await;
            let renders_before = metric(&metric_url, "registrar_render_renders_total").await;
            let ranges_before = range_requests(&endpoint).await;
            let base_before = renders.load(Ordering::Relaxed);
            let (cpu0, _) = proc_usage(pid);
            for k in 0..1000 {
                let key = format!("/infrastructure/bench/web/h{:05}/health", k % n);
                c.put(key, "critical", None).await.expect("put");
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                let text = std::fs::read_to_string(&out).unwrap_or_default();
                let base_text = std::fs::read_to_string(&base_out).unwrap_or_default();
                if text.lines().count() == n.saturating_sub(1000.min(n))
                    && base_text.lines().count() == text.lines().count()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // Let a late render show itself before counting.
            settled(&renders).await;
            let (cpu1, rss) = proc_usage(pid);
            let renders_after = metric(&metric_url, "registrar_render_renders_total").await;
            let ranges = range_requests(&endpoint).await - ranges_before;
            let base_renders = renders.load(Ordering::Relaxed) - base_before;
            rows.push((
                format!("render {n} hosts: a burst of 1,000 changes (wait.min 200ms): renders, etcd range requests"),
                format!(
                    "registrar: {} renders, {} range requests to its member (confd-style loop: {} renders, one range read of the prefix each, on the other member)",
                    renders_after - renders_before,
                    ranges,
                    base_renders
                ),
            ));
            rows.push((
                format!("render {n} hosts: the render process's CPU for the burst, RSS"),
                format!("{:.2} s CPU, {} MiB RSS", cpu1 - cpu0, rss / 1024),
            ));
        }
        cancel.cancel();
        let _ = base.await;
        drop(render);
    }
    rows
}
