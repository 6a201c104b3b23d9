//! The soak: N agents against a 3-member cluster while random faults are
//! injected for M minutes. Not part of the normal run (`#[ignore]`); run it
//! with `scripts/soak`. Invariants, checked on an independent watcher's
//! history: every gap is explained by an injected fault longer than the TTL
//! (or a deliberate agent restart), no host ever overwrites another, and at
//! the end every host is registered.

use std::collections::BTreeMap;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::Instant;

use crate::registered;
use crate::support::proc::{cmd, host_args};
use crate::support::proxy::{self, Proxy};
use crate::support::{Agent, Cluster, Watcher};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Debug, Clone)]
enum Fault {
    KillMember(usize),
    /// SIGSTOP member `member`, which led the cluster when paused if `leader`.
    PauseMember {
        member: usize,
        leader: bool,
    },
    Partition(Vec<usize>),
    RestartAgent(usize),
}

#[derive(Debug, Clone)]
struct Injected {
    fault: Fault,
    start: Instant,
    end: Instant,
}

struct Host {
    name: String,
    machine_id: String,
    proxies: Vec<Proxy>,
    agent: Agent,
}

fn spawn_agent(eps: &str, name: &str, machine_id: &str, ttl: u64) -> Agent {
    let mut args = cmd(
        "agent",
        host_args(eps, "soak", "web", name, machine_id, &format!("{ttl}s")),
    );
    args.extend(["--request-timeout", "1s", "--connect-timeout", "500ms"].map(String::from));
    Agent::spawn(name, &args)
}

/// A small deterministic generator, seeded from the clock (printed so a
/// run can be repeated).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = (hi - lo).as_millis() as u64;
        lo + Duration::from_millis(self.below(span + 1))
    }
}

#[tokio::test]
#[ignore = "long-running; use scripts/soak"]
async fn soak() {
    let agents: usize = env_or("SOAK_AGENTS", 50);
    let minutes: f64 = env_or("SOAK_MINUTES", 20.0);
    let ttl: u64 = env_or("SOAK_TTL", 6);
    let seed: u64 = env_or(
        "SOAK_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1,
    );
    let ttl_d = Duration::from_secs(ttl);
    // SOAK_FAULTS=kill,pause,partition,restart (default: all).
    let kinds: String = env_or("SOAK_FAULTS", "kill,pause,partition,restart".to_string());
    let allowed: Vec<u64> = ["kill", "pause", "partition", "restart"]
        .iter()
        .enumerate()
        .filter(|(_, k)| kinds.split(',').any(|w| w.trim() == **k))
        .map(|(i, _)| i as u64)
        .collect();
    assert!(!allowed.is_empty(), "SOAK_FAULTS names no fault kind");
    eprintln!("soak: {agents} agents, {minutes} min, TTL {ttl}s, seed {seed}");
    let mut rng = Rng(seed);

    let mut cluster = Cluster::start(3).await;
    // One watcher per member: a paused member delays its own watchers'
    // events, so each event's time is the earliest any watcher saw it.
    let mut watchers = Vec::new();
    for ep in cluster.endpoints() {
        watchers.push(Watcher::start(vec![ep], "/infrastructure/").await);
    }
    let mut hosts = Vec::new();
    for i in 0..agents {
        let (proxies, eps) = proxy::in_front_of(&cluster).await;
        let name = format!("h{i:03}");
        let machine_id = format!("machine-{i:03}");
        let agent = spawn_agent(&eps, &name, &machine_id, ttl);
        hosts.push(Host {
            name,
            machine_id,
            proxies,
            agent,
        });
    }
    let c = cluster.client_of(0).await;
    let all_registered = |c: etcd_client::Client, names: Vec<String>| async move {
        let mut missing = Vec::new();
        for n in names {
            if registered(&mut c.clone(), &format!("/infrastructure/soak/web/{n}/"))
                .await
                .is_err()
            {
                missing.push(n);
            }
        }
        missing
    };
    let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
    let started = Instant::now();
    let wall_start = std::time::SystemTime::now();
    while !all_registered(c.clone(), names.clone()).await.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "agents did not all register"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "soak: all {agents} registered after {:?}",
        started.elapsed()
    );

    let deadline = Instant::now() + Duration::from_secs_f64(minutes * 60.0);
    let mut injected: Vec<Injected> = Vec::new();
    while Instant::now() < deadline {
        tokio::time::sleep(rng.between(Duration::from_secs(2), Duration::from_secs(8))).await;
        let hold = rng.between(Duration::from_millis(500), ttl_d * 2);
        let kind = loop {
            let k = rng.below(4);
            if allowed.contains(&k) {
                break k;
            }
        };
        let fault = match kind {
            0 => Fault::KillMember(rng.below(3) as usize),
            1 => {
                let member = rng.below(3) as usize;
                let leader = cluster.try_leader((member + 1) % 3).await == Some(member);
                Fault::PauseMember { member, leader }
            }
            2 => {
                let k = 1 + rng.below(5) as usize;
                Fault::Partition((0..k).map(|_| rng.below(agents as u64) as usize).collect())
            }
            _ => Fault::RestartAgent(rng.below(agents as u64) as usize),
        };
        let start = Instant::now();
        match &fault {
            Fault::KillMember(i) => {
                cluster.kill(*i);
                tokio::time::sleep(hold).await;
                cluster.start_members(&[*i]).await;
            }
            Fault::PauseMember { member, .. } => {
                cluster.signal(*member, Signal::SIGSTOP);
                tokio::time::sleep(hold).await;
                cluster.signal(*member, Signal::SIGCONT);
            }
            Fault::Partition(which) => {
                which
                    .iter()
                    .for_each(|&a| hosts[a].proxies.iter().for_each(|p| p.block(true)));
                tokio::time::sleep(hold).await;
                which
                    .iter()
                    .for_each(|&a| hosts[a].proxies.iter().for_each(|p| p.block(false)));
            }
            Fault::RestartAgent(a) => {
                let h = &mut hosts[*a];
                h.agent.signal(Signal::SIGTERM);
                let _ = h.agent.wait_exit(Duration::from_secs(15)).await;
                let eps = proxy::endpoint_list(&h.proxies);
                h.agent = spawn_agent(&eps, &h.name, &h.machine_id, ttl);
            }
        }
        injected.push(Injected {
            fault,
            start,
            end: Instant::now(),
        });
    }
    let faults_over = Instant::now();
    let mut missing = all_registered(c.clone(), names.clone()).await;
    while !missing.is_empty() && faults_over.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        missing = all_registered(c.clone(), names.clone()).await;
    }
    let settle = faults_over.elapsed();

    // Judge the history.
    let events = merged(&watchers);
    let host_of = |key: &str| key.split('/').nth(4).unwrap_or("").to_string();
    let index_of = |name: &str| names.iter().position(|n| n == name);
    let judge = Judge {
        ttl: ttl_d,
        injected: &injected,
    };
    let mut gaps = Vec::new();
    let mut clobbers = Vec::new();
    let mut open: BTreeMap<String, (Instant, Cause)> = BTreeMap::new();
    for e in events.iter().filter(|e| e.key.ends_with("/owner")) {
        let host = host_of(&e.key);
        let Some(idx) = index_of(&host) else { continue };
        if e.put && e.value != hosts[idx].machine_id {
            clobbers.push(format!("{} written by {}", e.key, e.value));
        }
        if !e.put {
            open.insert(host, (e.at, judge.cause(idx, e.at)));
        } else if let Some((at, cause)) = open.remove(&host) {
            gaps.push(Gap {
                host,
                deleted: at,
                back: Some(e.at),
                cause,
            });
        }
    }
    gaps.extend(open.into_iter().map(|(host, (at, cause))| Gap {
        host,
        deleted: at,
        back: None,
        cause,
    }));
    let unexplained: Vec<String> = gaps
        .iter()
        .filter(|g| matches!(g.cause, Cause::Unexplained))
        .map(|g| {
            format!(
                "{} lost its keys at +{:?}, {}",
                g.host,
                g.deleted.duration_since(started),
                judge.context(g.deleted)
            )
        })
        .collect();
    let of = |c: fn(&Cause) -> bool| gaps.iter().filter(|g| c(&g.cause)).count();
    let mut lengths: Vec<Duration> = gaps.iter().filter_map(Gap::length).collect();
    lengths.sort();
    // Recovery: from the later of the delete and the end of the fault that
    // explains it, until the host's keys are back.
    let mut recoveries: Vec<Duration> = gaps.iter().filter_map(|g| g.recovery(&injected)).collect();
    recoveries.sort();
    let pct = |v: &[Duration], p: f64| {
        v.get(((v.len().max(1) as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or_default()
    };
    let count = |f: fn(&Fault) -> bool| injected.iter().filter(|i| f(&i.fault)).count();
    println!();
    println!("| soak ({agents} agents, {minutes} min, TTL {ttl}s, seed {seed}) | value |");
    println!("|---|---|");
    println!("| faults injected | {} |", injected.len());
    println!(
        "| member kills (kill -9, restart) | {} |",
        count(|f| matches!(f, Fault::KillMember(_)))
    );
    println!(
        "| member pauses (SIGSTOP) | {} |",
        count(|f| matches!(f, Fault::PauseMember { .. }))
    );
    println!(
        "| agent partitions (black-holed proxies) | {} |",
        count(|f| matches!(f, Fault::Partition(_)))
    );
    println!(
        "| graceful agent restarts | {} |",
        count(|f| matches!(f, Fault::RestartAgent(_)))
    );
    println!("| watch events | {} |", events.len());
    println!("| gaps (a host's keys deleted) | {} |", gaps.len());
    println!(
        "| explained: agent partitioned longer than 0.6 x TTL | {} |",
        of(|c| matches!(c, Cause::Partition(_)))
    );
    println!(
        "| explained: graceful agent restart | {} |",
        of(|c| matches!(c, Cause::Restart(_)))
    );
    println!(
        "| explained: a leader paused past the keep-alive margin revoked leases when it resumed (etcd issues 12528/15247, fixed upstream by etcd PR 16822) | {} |",
        of(|c| matches!(c, Cause::StaleLeader(_)))
    );
    println!("| unexplained gaps | {} |", unexplained.len());
    println!(
        "| gap length (owner deleted → re-registered): median / p95 / max | {:?} / {:?} / {:?} |",
        pct(&lengths, 0.5),
        pct(&lengths, 0.95),
        lengths.last().copied().unwrap_or_default()
    );
    println!(
        "| recovery (fault over or keys deleted, whichever is later → re-registered): median / p95 / max | {:?} / {:?} / {:?} |",
        pct(&recoveries, 0.5),
        pct(&recoveries, 0.95),
        recoveries.last().copied().unwrap_or_default()
    );
    println!(
        "| clobbers (a host overwritten by another) | {} |",
        clobbers.len()
    );
    println!(
        "| hosts registered at the end | {}/{} (settled {:?} after the last fault) |",
        agents - missing.len(),
        agents,
        settle
    );
    if let Some(first) = gaps.iter().find(|g| matches!(g.cause, Cause::Unexplained)) {
        // What etcd said around the first unexplained gap: elections, stalls.
        let wall = wall_start + first.deleted.duration_since(started);
        for i in 0..3 {
            for line in cluster.log_of(i).lines().filter(|l| {
                [
                    "became leader",
                    "fdatasync",
                    "took too long",
                    "revoke",
                    "overloaded",
                ]
                .iter()
                .any(|k| l.contains(k))
            }) {
                let ts = line
                    .split("\"ts\":\"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .and_then(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok());
                if let Some(ts) = ts
                    && ts + Duration::from_secs(15) >= wall
                    && ts <= wall + Duration::from_secs(2)
                {
                    eprintln!("m{i}: {}", &line[..line.len().min(240)]);
                }
            }
        }
    }
    assert!(unexplained.is_empty(), "unexplained gaps: {unexplained:#?}");
    assert!(clobbers.is_empty(), "clobbers: {clobbers:#?}");
    assert!(missing.is_empty(), "not registered at the end: {missing:?}");
}

/// Every event any watcher saw, once, in revision order, timed by the
/// watcher that saw it first.
fn merged(watchers: &[Watcher]) -> Vec<crate::support::watcher::Seen> {
    let mut first: BTreeMap<(i64, String), crate::support::watcher::Seen> = BTreeMap::new();
    for e in watchers.iter().flat_map(Watcher::events) {
        let slot = first
            .entry((e.revision, e.key.clone()))
            .or_insert_with(|| e.clone());
        if e.at < slot.at {
            slot.at = e.at;
        }
    }
    first.into_values().collect()
}

/// Why a host's keys were deleted; the index is into the injected faults.
#[derive(Debug, Clone, Copy)]
enum Cause {
    Partition(usize),
    Restart(usize),
    StaleLeader(usize),
    Unexplained,
}

struct Gap {
    host: String,
    deleted: Instant,
    back: Option<Instant>,
    cause: Cause,
}

impl Gap {
    fn length(&self) -> Option<Duration> {
        self.back.map(|b| b - self.deleted)
    }

    fn recovery(&self, injected: &[Injected]) -> Option<Duration> {
        let fault_end = match self.cause {
            Cause::Partition(i) | Cause::Restart(i) | Cause::StaleLeader(i) => injected[i].end,
            Cause::Unexplained => self.deleted,
        };
        self.back
            .map(|b| b.saturating_duration_since(self.deleted.max(fault_end)))
    }
}

/// etcd's request timeout with the test cluster's election timeout
/// (5 s + 2 x 500 ms): a stale leader's revoke proposals can be committed
/// up to this long after it resumes.
const STALE_REVOKE_WINDOW: Duration = Duration::from_secs(6);

struct Judge<'a> {
    ttl: Duration,
    injected: &'a [Injected],
}

impl Judge<'_> {
    /// The injected fault that explains host `idx` losing its keys at `at`.
    fn cause(&self, idx: usize, at: Instant) -> Cause {
        let slack = Duration::from_secs(2);
        let found = |f: &dyn Fn(&Injected) -> bool| self.injected.iter().rposition(f);
        // The lease expires up to a TTL after the last keep-alive before the
        // partition, and the agent needs a moment to renew after it heals;
        // etcd's lessor checks every 500 ms.
        if let Some(i) = found(&|f| match &f.fault {
            Fault::Partition(which) => {
                which.contains(&idx)
                    && f.end - f.start >= self.ttl.mul_f64(0.6)
                    && at >= f.start
                    && at <= f.end.max(f.start + self.ttl) + slack
            }
            _ => false,
        }) {
            return Cause::Partition(i);
        }
        if let Some(i) = found(&|f| {
            matches!(f.fault, Fault::RestartAgent(a) if a == idx)
                && at >= f.start
                && at <= f.end + slack
        }) {
            return Cause::Restart(i);
        }
        // etcd issues 12528 and 15247 (fixed upstream by PR 16822, which
        // Debian's 3.4.23 predates): a
        // leader that was stopped longer than a lease's remaining TTL still
        // believes it leads when it resumes, and proposes revoking every
        // lease it thinks expired. The proposals reach the new leader, which
        // commits them although it kept the leases alive. Keep-alives come
        // every TTL/3, so a pause over 2/3 of the TTL is enough. The revokes
        // land right after the resume or up to a request timeout later.
        if let Some(i) = found(&|f| {
            matches!(f.fault, Fault::PauseMember { leader: true, .. })
                && f.end - f.start >= self.ttl.mul_f64(0.6)
                && at >= f.end
                && at <= f.end + STALE_REVOKE_WINDOW + slack
        }) {
            return Cause::StaleLeader(i);
        }
        Cause::Unexplained
    }

    /// The faults in the 20 s before `at`, for a report.
    fn context(&self, at: Instant) -> String {
        self.injected
            .iter()
            .rev()
            .filter(|f| f.start <= at && at.duration_since(f.end) < Duration::from_secs(20))
            .map(|f| {
                let when = if at <= f.end {
                    "during".to_string()
                } else {
                    format!("{:?} after", at - f.end)
                };
                format!("{when} {:?} (held {:?})", f.fault, f.end - f.start)
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}
