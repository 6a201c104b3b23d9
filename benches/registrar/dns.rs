//! The `dns` part of the benchmark: `registrar dns` against NSD serving the
//! same records from a zone file (a static authoritative server: the
//! physical limit for this kind of answer on this machine), both driven by
//! dnsperf with the same question file in the same run.

use std::time::Duration;

use etcd_client::{Client, Txn, TxnOp};
use hickory_server::proto::op::{Message, Query};
use hickory_server::proto::rr::{Name, RecordType};
use tokio::time::Instant;

use super::support::{Agent, Cluster, free_port};
use super::{ms, percentile, proc_usage, range_requests};

/// Hosts per role: a role's SRV answer, with its targets' addresses, stays
/// under 1,232 bytes, so neither server truncates over UDP.
const PER_ROLE: usize = 20;
const DOMAIN: &str = "registry.internal";

fn host(i: usize) -> (String, String, String) {
    (
        format!("h{i:05}"),
        format!("r{:04}", i / PER_ROLE),
        format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256),
    )
}

/// `n` passing hosts in dc `bench`, `PER_ROLE` to a role, each publishing
/// `http`, written straight into etcd.
async fn seed(c: &mut Client, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(30) {
        let mut ops = Vec::new();
        for &i in chunk {
            let (h, r, ip) = host(i);
            let dir = format!("/infrastructure/bench/{r}/{h}/");
            ops.push(TxnOp::put(format!("{dir}ip"), ip, None));
            ops.push(TxnOp::put(format!("{dir}health"), "passing", None));
            ops.push(TxnOp::put(format!("{dir}owner"), format!("m{i}"), None));
            ops.push(TxnOp::put(format!("{dir}services/http"), "8080", None));
        }
        c.txn(Txn::new().and_then(ops)).await.expect("seed hosts");
    }
}

/// The same records as a zone file for NSD.
fn zone_file(n: usize) -> String {
    let mut z = format!(
        "$ORIGIN {DOMAIN}.\n$TTL 5\n@ IN SOA ns.{DOMAIN}. hostmaster.{DOMAIN}. 1 3600 600 86400 5\n"
    );
    for i in 0..n {
        let (h, r, ip) = host(i);
        z.push_str(&format!("{h}.{r}.bench IN A {ip}\n"));
        z.push_str(&format!("{r}.bench IN A {ip}\n"));
        z.push_str(&format!(
            "_http._tcp.{r}.bench IN SRV 10 10 8080 {h}.{r}.bench\n"
        ));
    }
    z
}

/// Every host name (A), and each role's name (A) and SRV name five times:
/// mostly small answers, with a share of 20-record ones.
fn questions(n: usize) -> String {
    let mut q = String::new();
    let roles = n.div_ceil(PER_ROLE);
    for i in 0..n {
        let (h, r, _) = host(i);
        q.push_str(&format!("{h}.{r}.bench.{DOMAIN} A\n"));
        if i % PER_ROLE == 0 {
            for _ in 0..5 {
                q.push_str(&format!("{r}.bench.{DOMAIN} A\n"));
                q.push_str(&format!("_http._tcp.{r}.bench.{DOMAIN} SRV\n"));
            }
        }
    }
    let _ = roles;
    q
}

/// One question over UDP; the answer's data, sorted.
async fn ask(sock: &tokio::net::UdpSocket, id: u16, name: &str) -> Vec<String> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.add_query(Query::query(
        Name::from_ascii(name).expect("name"),
        RecordType::A,
    ));
    let _ = sock.send(&m.to_vec().expect("encode")).await;
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), sock.recv(&mut buf)).await
        else {
            return vec![];
        };
        if let Ok(a) = Message::from_vec(&buf[..n])
            && a.metadata.id == id
        {
            let mut v: Vec<String> = a.answers.iter().map(|r| r.data.to_string()).collect();
            v.sort();
            return v;
        }
    }
}

/// The CPU the servers run on, and the one dnsperf runs on, when the
/// machine has two or more: pinned, each server gets a core of its own in
/// every run, whatever the scheduler would have placed where. Unpinned, a
/// server woken on dnsperf's core answers sooner than one woken on the
/// other, and which one a run gets is luck (NSD's p50 moved between 29 and
/// 47 µs from run to run on this 2-core machine).
fn cpus() -> Option<(usize, usize)> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    (n >= 2).then_some((0, 1))
}

/// dnsperf, on its own CPU when there is one.
fn dnsperf_command() -> tokio::process::Command {
    match cpus() {
        Some((_, load)) => {
            let mut c = tokio::process::Command::new("taskset");
            c.args(["-c", &load.to_string(), "dnsperf"]);
            c
        }
        None => tokio::process::Command::new("dnsperf"),
    }
}

/// Pins every thread of `pid` to the servers' CPU.
fn pin_server(pid: u32) {
    if let Some((server, _)) = cpus() {
        taskset(pid, &server.to_string());
    }
}

/// Lets `pid` run anywhere again (for the change rows, where etcd and
/// the server work in turn).
fn unpin(pid: u32) {
    if cpus().is_some() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        taskset(pid, &format!("0-{}", n - 1));
    }
}

/// Sets the CPUs every thread of `pid` may run on (util-linux's taskset).
fn taskset(pid: u32, list: &str) {
    let ok = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", list, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "taskset could not set process {pid}'s CPUs to {list}");
}

/// How much of a core the rest of the machine used over `window` (from
/// /proc/stat, everything but idle and iowait): the latency rows are
/// only worth comparing when this is near 0, for any other runnable
/// process makes a server wait for a scheduler slice (about 3 ms).
async fn other_load(window: Duration) -> f64 {
    fn busy() -> (f64, f64) {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let f: Vec<f64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        let total: f64 = f.iter().sum();
        let idle = f.get(3).copied().unwrap_or(0.0) + f.get(4).copied().unwrap_or(0.0);
        (total - idle, total)
    }
    let (b0, _) = busy();
    tokio::time::sleep(window).await;
    let (b1, _) = busy();
    (b1 - b0) / 100.0 / window.as_secs_f64()
}

/// dnsperf against `port`, 10 s as fast as it goes (4 clients, 200
/// outstanding, EDNS0): questions a second, and those lost.
async fn throughput(port: u16, questions: &std::path::Path) -> (f64, String) {
    let out = dnsperf_command()
        .args(["-s", "127.0.0.1", "-p", &port.to_string(), "-e", "-d"])
        .arg(questions)
        .args(["-l", "10", "-c", "4", "-q", "200"])
        .output()
        .await
        .expect("dnsperf (package dnsperf; scripts/bench installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |key: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let qps = field("Queries per second")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    (qps, field("Queries lost"))
}

/// What one paced dnsperf run measured.
struct Latency {
    p50: Duration,
    p99: Duration,
    not_noerror: usize,
}

/// dnsperf against `port`, 3 s paced at 20,000 questions/s with every
/// answer's latency (-v).
async fn latency(port: u16, questions: &std::path::Path) -> Latency {
    let out = dnsperf_command()
        .args(["-s", "127.0.0.1", "-p", &port.to_string(), "-e", "-d"])
        .arg(questions)
        .args(["-l", "3", "-Q", "20000", "-v"])
        .output()
        .await
        .expect("dnsperf");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lat = Vec::new();
    let mut not_noerror = 0;
    for l in text.lines().filter(|l| l.starts_with("> ")) {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.get(1) != Some(&"NOERROR") {
            not_noerror += 1;
        }
        if let Some(s) = f.last().and_then(|v| v.parse::<f64>().ok()) {
            lat.push(Duration::from_secs_f64(s));
        }
    }
    lat.sort();
    Latency {
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        not_noerror,
    }
}

/// Paced runs, taken in turns so that a passing disturbance falls on both
/// servers alike.
const LATENCY_ROUNDS: usize = 3;

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

/// `registrar dns` and NSD with `n` hosts.
pub async fn dns_bench(n: usize) -> Vec<(String, String)> {
    let cluster = Cluster::start(1).await;
    let endpoint = cluster.endpoints()[0].clone();
    let mut c = cluster.client().await;
    seed(&mut c, n).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let qfile = dir.path().join("questions.txt");
    std::fs::write(&qfile, questions(n)).expect("question file");

    // registrar dns
    let port = free_port();
    let started = Instant::now();
    let dns = Agent::spawn(
        "registrar dns",
        &[
            "dns".to_string(),
            "--endpoints".into(),
            endpoint.clone(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ],
    );
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("udp");
    sock.connect(("127.0.0.1", port)).await.expect("connect");
    let last = host(n - 1);
    let last_name = format!("{}.{}.bench.{DOMAIN}.", last.0, last.1);
    let mut id = 1u16;
    while ask(&sock, id, &last_name).await.is_empty() {
        id = id.wrapping_add(1);
        if started.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first = started.elapsed();
    let pid = dns.pid().as_raw() as u32;
    pin_server(pid);

    // NSD with the same records, on the same CPU.
    let nsd_port = free_port();
    std::fs::write(dir.path().join("zone"), zone_file(n)).expect("zone");
    let conf = dir.path().join("nsd.conf");
    let d = dir.path().display();
    std::fs::write(
        &conf,
        format!(
            "server:\n  ip-address: 127.0.0.1@{nsd_port}\n  server-count: 1\n  username: \"\"\n  \
             chroot: \"\"\n  zonesdir: \"{d}\"\n  database: \"\"\n  pidfile: \"{d}/nsd.pid\"\n  \
             xfrdfile: \"{d}/xfrd.state\"\n  zonelistfile: \"{d}/zone.list\"\n  \
             logfile: \"{d}/nsd.log\"\n  verbosity: 0\n  rrl-ratelimit: 0\n  \
             rrl-whitelist-ratelimit: 0\nremote-control:\n  control-enable: no\n\
             zone:\n  name: {DOMAIN}\n  zonefile: zone\n"
        ),
    )
    .expect("nsd.conf");
    // NSD forks its server processes (the one that answers is a
    // grandchild): started under taskset, they all inherit the CPU.
    let mut cmd = match cpus() {
        Some((server, _)) => {
            let mut c = tokio::process::Command::new("taskset");
            c.args(["-c", &server.to_string(), "nsd"]);
            c
        }
        None => tokio::process::Command::new("nsd"),
    };
    cmd.arg("-d").arg("-c").arg(&conf).kill_on_drop(true);
    let nsd = Agent::spawn_command("nsd", cmd);
    let nsd_started = Instant::now();
    let nsd_sock = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("udp");
    nsd_sock
        .connect(("127.0.0.1", nsd_port))
        .await
        .expect("connect");
    while ask(&nsd_sock, id, &last_name).await.is_empty() {
        id = id.wrapping_add(1);
        if nsd_started.elapsed() > Duration::from_secs(60) {
            eprintln!("nsd did not answer: {}", nsd.log());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ranges_before = range_requests(&endpoint).await;
    let (cpu0, _) = proc_usage(pid);
    let ours_qps = throughput(port, &qfile).await;
    let theirs_qps = throughput(nsd_port, &qfile).await;
    let mut ours_lat = Vec::new();
    let mut theirs_lat = Vec::new();
    let mut load = Vec::new();
    for _ in 0..LATENCY_ROUNDS {
        load.push(other_load(Duration::from_millis(500)).await);
        ours_lat.push(latency(port, &qfile).await);
        theirs_lat.push(latency(nsd_port, &qfile).await);
    }
    let (cpu1, rss) = proc_usage(pid);
    let ranges = range_requests(&endpoint).await - ranges_before;
    drop(nsd);
    unpin(pid);

    // A change → the answer: take host k out of its role's answer and back.
    let mut changes = Vec::new();
    for k in 0..50 {
        let i = (k * 7919) % n;
        let (h, r, ip) = host(i);
        let role = format!("{r}.bench.{DOMAIN}.");
        for health in ["critical", "passing"] {
            let start = Instant::now();
            c.put(
                format!("/infrastructure/bench/{r}/{h}/health"),
                health,
                None,
            )
            .await
            .expect("put");
            loop {
                id = id.wrapping_add(1);
                let listed = ask(&sock, id, &role).await.contains(&ip);
                if listed == (health == "passing") || start.elapsed() > Duration::from_secs(10) {
                    break;
                }
            }
            changes.push(start.elapsed());
        }
    }
    changes.sort();
    drop(dns);

    let ratio = if theirs_qps.0 > 0.0 {
        ours_qps.0 / theirs_qps.0
    } else {
        0.0
    };
    // The median round's figures, and every round's p99.
    let summary = |runs: &[Latency]| {
        let mut p50: Vec<Duration> = runs.iter().map(|l| l.p50).collect();
        let mut p99: Vec<Duration> = runs.iter().map(|l| l.p99).collect();
        let each: Vec<String> = p99.iter().map(|d| us(*d)).collect();
        p50.sort();
        p99.sort();
        (p50[p50.len() / 2], p99[p99.len() / 2], each.join(", "))
    };
    let (o50, o99, o_each) = summary(&ours_lat);
    let (t50, t99, t_each) = summary(&theirs_lat);
    let not_noerror: (usize, usize) = (
        ours_lat.iter().map(|l| l.not_noerror).sum(),
        theirs_lat.iter().map(|l| l.not_noerror).sum(),
    );
    let busiest = load.iter().copied().fold(0.0, f64::max);
    vec![
        (
            format!("dns {n} hosts: answering after start (one range read of the registry)"),
            ms(first),
        ),
        (
            format!("dns {n} hosts: questions/s, dnsperf 10 s, UDP, 4 clients"),
            format!(
                "registrar {:.0}/s (lost {}); NSD {:.0}/s (lost {}); ratio {:.2}",
                ours_qps.0, ours_qps.1, theirs_qps.0, theirs_qps.1, ratio
            ),
        ),
        (
            format!(
                "dns {n} hosts: answer latency p50 / p99 at 20,000 questions/s (median of {LATENCY_ROUNDS} runs each, in turns)"
            ),
            format!(
                "registrar {} / {}; NSD {} / {} (p99 of each run: registrar {o_each}; NSD {t_each}){}{}",
                us(o50),
                us(o99),
                us(t50),
                us(t99),
                if not_noerror.0 + not_noerror.1 > 0 {
                    format!(
                        " (answers not NOERROR: registrar {}, NSD {})",
                        not_noerror.0, not_noerror.1
                    )
                } else {
                    String::new()
                },
                if busiest > 0.1 {
                    format!(
                        "; NOT COMPARABLE: other processes used up to {:.0} % of a core just before a run",
                        busiest * 100.0
                    )
                } else {
                    String::new()
                }
            ),
        ),
        (
            format!("dns {n} hosts: where the servers and dnsperf ran"),
            match cpus() {
                Some((server, perf)) => format!(
                    "each server pinned to CPU {server}, dnsperf to CPU {perf}; the machine's load in the 0.5 s before each paced round: {}",
                    load.iter()
                        .map(|l| format!("{:.0} %", l * 100.0))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None => "one CPU: servers and dnsperf share it".into(),
            },
        ),
        (
            format!("dns {n} hosts: an etcd change in the answers, p50 / p99 (100 changes)"),
            format!(
                "{} / {}",
                ms(percentile(&changes, 0.5)),
                ms(percentile(&changes, 0.99))
            ),
        ),
        (
            format!("dns {n} hosts: etcd range requests during the dnsperf runs"),
            format!("{ranges}"),
        ),
        (
            format!("dns {n} hosts: registrar dns CPU over the dnsperf runs, RSS"),
            format!("{:.1} s CPU, {} MiB RSS", cpu1 - cpu0, rss / 1024),
        ),
    ]
}
