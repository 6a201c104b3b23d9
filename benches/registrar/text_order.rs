//! The `order` part: writes `link/agent.order`, the functions an idle agent
//! runs, for the linker to put first (see build.rs). Not a benchmark, but
//! it needs what the benchmark has: etcd, check targets, the release
//! binary. `scripts/order-text` runs it and relinks.
//!
//! The agent runs under valgrind's callgrind, which records every function
//! executed, however rarely: start-up, registration, three rounds of its
//! exec, tcp and http checks, keep-alives, and the graceful stop; once
//! against etcd over plain HTTP and once over mutual TLS. Sampling
//! (perf) would miss the functions run once, and each one missed is a
//! 64 KiB window of code made resident.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use super::support::{Agent, Cluster, Options};
use super::{agent_config, bin, host_flags, keys_under};

/// Where the order is kept, from the package's root.
pub const ORDER: &str = "link/agent.order";

/// Every defined function symbol of `binary`: name → (address, size), from
/// `nm` (binutils).
fn symbols(binary: &Path) -> HashMap<String, (u64, u64)> {
    let out = std::process::Command::new("nm")
        .args(["-S", "--defined-only"])
        .arg(binary)
        .output()
        .expect("nm (package binutils; scripts/bench installs it)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let [addr, size, kind, name] = f.as_slice() else {
                return None;
            };
            if !matches!(*kind, "t" | "T" | "w" | "W") {
                return None;
            }
            Some((
                name.to_string(),
                (
                    u64::from_str_radix(addr, 16).ok()?,
                    u64::from_str_radix(size, 16).ok()?,
                ),
            ))
        })
        .collect()
}

/// The functions of `object` a callgrind profile shows executed, in the
/// order it first names them. Callgrind names each object and function
/// once, as `ob=(N) path` and `fn=(N) name`, and by number after that.
fn executed(profile: &str, object: &str) -> Vec<String> {
    let mut objects: HashMap<&str, &str> = HashMap::new();
    let mut functions: HashMap<&str, &str> = HashMap::new();
    let mut current = "";
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for line in profile.lines() {
        let Some((kind, rest)) = line.split_once('=') else {
            continue;
        };
        let Some((id, name)) = rest
            .strip_prefix('(')
            .and_then(|r| r.split_once(')'))
            .map(|(id, name)| (id, name.trim()))
        else {
            continue;
        };
        match kind {
            "ob" | "cob" => {
                if !name.is_empty() {
                    objects.insert(id, name);
                }
                if kind == "ob" {
                    current = objects.get(id).copied().unwrap_or("");
                }
            }
            "fn" | "cfn" => {
                if !name.is_empty() {
                    functions.insert(id, name);
                }
                if kind == "fn"
                    && current == object
                    && let Some(f) = functions.get(id)
                    && seen.insert(*f)
                {
                    out.push(f.to_string());
                }
            }
            _ => {}
        }
    }
    out
}

/// How many of the functions `order` lists `binary` has, and how many it
/// lists: below about 90 %, the order is stale (`scripts/order-text`).
pub fn coverage(binary: &Path, order: &Path) -> (usize, usize) {
    let listed: Vec<String> = std::fs::read_to_string(order)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    let symbols = symbols(binary);
    let found = listed.iter().filter(|n| symbols.contains_key(*n)).count();
    (found, listed.len())
}

/// The functions one idle agent runs: against etcd over plain HTTP, or
/// over mutual TLS.
async fn trace(binary: &Path, tls: bool) -> Vec<String> {
    let cluster = if tls {
        Cluster::start_with(
            1,
            Options {
                tls: true,
                ..Options::default()
            },
        )
        .await
    } else {
        Cluster::start(1).await
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = agent_config(dir.path(), cluster.members[0].client_port).await;
    let profile = dir.path().join("callgrind.out");
    let mut cmd = tokio::process::Command::new("valgrind");
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("REGISTRAR_LOG", "info,registrar=debug")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .arg("--tool=callgrind")
        .arg("--demangle=no")
        .arg(format!("--callgrind-out-file={}", profile.display()))
        .arg(binary)
        .args(["agent", "--config"])
        .arg(&cfg)
        .args(host_flags(&cluster.endpoint_list(), "traced", "traced"));
    if let Some(pki) = &cluster.pki {
        cmd.args(pki.client_args());
    }
    let mut agent = Agent::spawn_command("agent under callgrind", cmd);
    // Registered (its six keys), then three rounds of checks and
    // keep-alives (10 s each), then the graceful stop.
    let c = cluster.client().await;
    let registered = keys_under(
        &c,
        "/infrastructure/dc1/web/traced/",
        6,
        Duration::from_secs(120),
    )
    .await;
    assert!(
        registered,
        "the traced agent did not register within 120 s: {}",
        agent.log()
    );
    tokio::time::sleep(Duration::from_secs(35)).await;
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    // callgrind writes the profile as the agent exits.
    let code = agent.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(code, 0, "the traced agent's stop failed: {}", agent.log());
    let text = std::fs::read_to_string(&profile).expect("callgrind's profile");
    executed(&text, &binary.to_string_lossy())
}

/// Traces an idle agent over plain HTTP and one over TLS, and writes the
/// functions they ran to `order`: the plain agent's first, then those only
/// TLS needed, each part sorted by its place in the binary traced (code
/// that sits together stays together).
pub async fn write(order: &Path) -> Vec<(String, String)> {
    let binary = std::fs::canonicalize(bin()).expect("the release binary");
    let symbols = symbols(&binary);
    let mut listed = std::collections::HashSet::new();
    let mut lines = String::new();
    let mut rows = Vec::new();
    for (tls, what) in [(false, "over plain HTTP"), (true, "over TLS, beyond those")] {
        let ran = trace(&binary, tls).await;
        let mut known: Vec<(&String, (u64, u64))> = ran
            .iter()
            .filter(|n| !listed.contains(*n))
            .filter_map(|n| symbols.get(n).map(|s| (n, *s)))
            .collect();
        known.sort_by_key(|(_, (addr, _))| *addr);
        let bytes: u64 = known.iter().map(|(_, (_, size))| size).sum();
        for (n, _) in &known {
            lines.push_str(n);
            lines.push('\n');
            listed.insert((*n).clone());
        }
        rows.push((
            format!("text order: functions an idle agent ran {what}"),
            format!(
                "{}, {} KiB of code ({} in all had no symbol)",
                known.len(),
                bytes / 1024,
                ran.iter().filter(|n| !symbols.contains_key(*n)).count()
            ),
        ));
    }
    if lines.is_empty() {
        lines.push('\n');
    }
    std::fs::write(order, lines).expect("write the order");
    rows.push(("text order written to".into(), order.display().to_string()));
    rows
}
