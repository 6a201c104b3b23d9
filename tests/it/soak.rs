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
    PauseMember(usize),
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
    let watcher = Watcher::start(cluster.endpoints(), "/infrastructure/").await;
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
            1 => Fault::PauseMember(rng.below(3) as usize),
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
            Fault::PauseMember(i) => {
                cluster.signal(*i, Signal::SIGSTOP);
                tokio::time::sleep(hold).await;
                cluster.signal(*i, Signal::SIGCONT);
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
    let events = watcher.events();
    let host_of = |key: &str| key.split('/').nth(4).unwrap_or("").to_string();
    let index_of = |name: &str| names.iter().position(|n| n == name);
    let mut gaps = 0;
    let mut paused_leader_revokes = 0;
    let mut unexplained = Vec::new();
    let mut clobbers = Vec::new();
    let mut last_owner_delete: BTreeMap<String, Instant> = BTreeMap::new();
    for e in &events {
        let host = host_of(&e.key);
        let Some(idx) = index_of(&host) else { continue };
        if e.key.ends_with("/owner") && e.put && e.value != hosts[idx].machine_id {
            clobbers.push(format!("{} written by {}", e.key, e.value));
        }
        if !e.put && e.key.ends_with("/owner") {
            gaps += 1;
            last_owner_delete.insert(host.clone(), e.at);
            let slack = Duration::from_secs(2);
            let explained = injected.iter().any(|f| match &f.fault {
                // The lease expires up to a TTL after the last keep-alive
                // before the partition, and the agent needs a moment to
                // renew after it heals; etcd's lessor checks every 500 ms.
                Fault::Partition(which) => {
                    which.contains(&idx)
                        && f.end - f.start >= ttl_d.mul_f64(0.6)
                        && e.at >= f.start
                        && e.at <= (f.end).max(f.start + ttl_d) + slack
                }
                Fault::RestartAgent(a) => *a == idx && e.at >= f.start && e.at <= f.end + slack,
                // A member fault alone never justifies a gap (but see below).
                _ => false,
            });
            // etcd 3.4 bug (etcd issues 12528, 15247): a leader that was
            // stopped longer than a lease's remaining TTL still believes it
            // leads when it resumes and revokes every lease it thinks has
            // expired, although the new leader kept them alive. Such gaps hit
            // all hosts at once, right after the pause ends; count them apart.
            let etcd_bug = !explained
                && injected.iter().any(|f| {
                    matches!(f.fault, Fault::PauseMember(_))
                        && f.end - f.start >= ttl_d.mul_f64(0.5)
                        && e.at >= f.end
                        && e.at <= f.end + slack
                });
            if etcd_bug {
                paused_leader_revokes += 1;
                continue;
            }
            if !explained {
                let during = injected
                    .iter()
                    .rev()
                    .find(|f| f.start <= e.at)
                    .map(|f| {
                        let when = if e.at <= f.end {
                            "during".to_string()
                        } else {
                            format!("{:?} after", e.at - f.end)
                        };
                        format!("{when} {:?} (held {:?})", f.fault, f.end - f.start)
                    })
                    .unwrap_or_default();
                unexplained.push(format!(
                    "{host} lost its keys at +{:?}, {during}",
                    e.at.duration_since(started)
                ));
            }
        }
    }
    // How long each gap lasted: from the owner key's delete to its next put.
    let mut gap_lengths = Vec::new();
    let mut open: BTreeMap<String, Instant> = BTreeMap::new();
    for e in &events {
        if !e.key.ends_with("/owner") {
            continue;
        }
        let host = host_of(&e.key);
        if !e.put {
            open.insert(host, e.at);
        } else if let Some(t) = open.remove(&host) {
            gap_lengths.push(e.at - t);
        }
    }
    gap_lengths.sort();
    let pct = |p: f64| {
        gap_lengths
            .get(((gap_lengths.len().max(1) as f64 - 1.0) * p) as usize)
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
        count(|f| matches!(f, Fault::PauseMember(_)))
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
    println!("| gaps (a host's keys deleted) | {gaps} |");
    println!(
        "| gaps from etcd 3.4 revoking every lease when a paused old leader resumes (etcd issues 12528/15247) | {paused_leader_revokes} |"
    );
    println!("| unexplained gaps | {} |", unexplained.len());
    println!(
        "| gap length (owner deleted → re-registered): median / p95 / max | {:?} / {:?} / {:?} |",
        pct(0.5),
        pct(0.95),
        gap_lengths.last().copied().unwrap_or_default()
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
    assert!(unexplained.is_empty(), "unexplained gaps: {unexplained:#?}");
    assert!(clobbers.is_empty(), "clobbers: {clobbers:#?}");
    assert!(missing.is_empty(), "not registered at the end: {missing:?}");
}
