//! Fail static (design.md rule 4 and section 8) with real agents, a real
//! 3-member etcd, render feeding `haproxy -c`, and dns probed every 10 ms:
//! a registry glitch (a wipe, a replaced cluster, a restore, hosts
//! vanishing together) never empties the file or the answers, and a host
//! that leaves on purpose is removed at once.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, DeleteOptions, GetOptions};
use nix::sys::signal::Signal;
use tokio::time::Instant;

use crate::render::Dir;
use crate::support::proc::{cmd, host_args, registrar};
use crate::support::{Agent, Cluster, eventually, free_port};

const ROLE: &str = "web.dc1.registry.internal.";

/// What a fail-static test runs: three agents of role web (w1..w3 at
/// 10.0.0.1..3), render of the shipped haproxy template (every staged
/// file copied aside by its check, then `haproxy -c`), and dns.
struct Stage {
    cluster: Cluster,
    eps: String,
    d: Dir,
    agents: Vec<Option<Agent>>,
    render: Agent,
    dns: Agent,
    dns_port: u16,
    render_metrics: u16,
    dns_metrics: u16,
}

/// An agent for host `w{i}` with a 3 s TTL.
fn agent(eps: &str, d: &Dir, i: usize) -> Agent {
    let host = format!("w{i}");
    let mut args = cmd(
        "agent",
        host_args(eps, "dc1", "web", &host, &format!("id-{host}"), "3s"),
    );
    if let Some(at) = args.iter().position(|a| a == "127.0.0.1") {
        args[at] = format!("10.0.0.{i}");
    }
    args.extend([
        "--service".into(),
        format!("http={}", 8080 + i),
        "--state-dir".into(),
        d.path(&format!("{host}.state"))
            .to_string_lossy()
            .into_owned(),
    ]);
    Agent::spawn(&host, &args)
}

impl Stage {
    async fn start(fail_static: &str) -> Stage {
        let cluster = Cluster::start(3).await;
        let eps = cluster.endpoint_list();
        let d = Dir::new();
        let agents = (1..=3).map(|i| Some(agent(&eps, &d, i))).collect();
        let example = std::fs::read_to_string(format!(
            "{}/examples/haproxy/haproxy.cfg.j2",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let t = d.write(
            "haproxy.cfg.j2",
            &example
                .replace("\"*:80\"", &format!("\"127.0.0.1:{}\"", free_port()))
                .replace(
                    "/run/haproxy/admin.sock",
                    &d.path("admin.sock").to_string_lossy(),
                ),
        );
        std::fs::create_dir(d.path("staged")).unwrap();
        let render_metrics = free_port();
        let cfg = d.write(
            "render.yaml",
            &format!(
                "endpoints: [{eps}]\nmetrics_listen: 127.0.0.1:{render_metrics}\ntemplates:\n  - source: {}\n    destination: {}\n    check: [sh, -c, 'cp \"$0\" {}/$(date +%s%N).cfg && haproxy -c -q -f \"$0\"', '{{{{src}}}}']\n    wait: {{min: 100ms}}\n    fail_static: {fail_static}\n",
                t.display(),
                d.path("haproxy.cfg").display(),
                d.path("staged").display(),
            ),
        );
        let mut render = registrar();
        render.arg("render").arg("--config").arg(&cfg);
        let render = Agent::spawn_command("render", render);
        let dns_port = free_port();
        let dns_metrics = free_port();
        let dns_cfg = d.write(
            "dns.yaml",
            &format!(
                "endpoints: [{eps}]\nmetrics_listen: 127.0.0.1:{dns_metrics}\nfail_static: {fail_static}\n"
            ),
        );
        let mut dns = registrar();
        dns.arg("dns")
            .arg("--config")
            .arg(&dns_cfg)
            .args(["--listen", &format!("127.0.0.1:{dns_port}")]);
        let dns = Agent::spawn_command("dns", dns);
        let stage = Stage {
            cluster,
            eps,
            d,
            agents,
            render,
            dns,
            dns_port,
            render_metrics,
            dns_metrics,
        };
        stage.converged(3).await;
        stage
    }

    /// The servers in the live haproxy.cfg.
    fn servers(&self) -> usize {
        servers_in(&self.d.read("haproxy.cfg").unwrap_or_default())
    }

    /// Waits until the file and the answers list `n` hosts.
    async fn converged(&self, n: usize) {
        let port = self.dns_port;
        eventually(
            Duration::from_secs(20),
            "file and answers converged",
            || {
                let servers = self.servers();
                async move {
                    let answers = ask(port).await;
                    if servers == n && answers == Some(n) {
                        Ok(())
                    } else {
                        Err(format!("{servers} servers, {answers:?} answers, want {n}"))
                    }
                }
            },
        )
        .await;
    }

    /// Sends `sig` to the agents at `which` (SIGSTOP, SIGCONT).
    fn pause_agents(&self, which: &[usize], sig: Signal) {
        for &i in which {
            if let Some(a) = &self.agents[i] {
                a.signal(sig);
            }
        }
    }

    async fn client(&self) -> Client {
        self.cluster.client().await
    }

    /// The hosts of role web present in etcd.
    async fn registered(&self) -> usize {
        let mut c = self.client().await;
        let Ok(r) = c
            .get(
                "/infrastructure/dc1/web/",
                Some(GetOptions::new().with_prefix()),
            )
            .await
        else {
            return 0;
        };
        r.kvs()
            .iter()
            .filter(|kv| kv.key().ends_with(b"/health"))
            .count()
    }

    async fn metric(&self, port: u16, name: &str) -> f64 {
        let text = crate::support::etcd::try_http_get(&format!("http://127.0.0.1:{port}/metrics"))
            .await
            .unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0)
    }

    /// Every file render staged (and so could have written) since start.
    fn staged(&self) -> Vec<(PathBuf, usize)> {
        let mut v: Vec<(PathBuf, usize)> = std::fs::read_dir(self.d.path("staged"))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                (e.path(), servers_in(&text))
            })
            .collect();
        v.sort();
        v
    }

    /// Waits for `what` in both consumers' logs.
    async fn logged(&self, what: &str) {
        for consumer in [&self.render, &self.dns] {
            eventually(Duration::from_secs(20), what, || {
                let log = consumer.log();
                let what = what.to_string();
                async move {
                    if log.contains(&what) {
                        Ok(())
                    } else {
                        Err(log)
                    }
                }
            })
            .await;
        }
    }
}

fn servers_in(text: &str) -> usize {
    text.lines()
        .filter(|l| l.trim_start().starts_with("server "))
        .count()
}

/// The number of A records for the role, or `None` without an answer.
async fn ask(port: u16) -> Option<usize> {
    crate::support::dns::a_records(port, ROLE).await
}

/// What the probe saw: (when, answers).
type Seen = Arc<Mutex<Vec<(Instant, Option<usize>)>>>;

/// Asks dns every 10 ms until dropped.
struct Probe {
    seen: Seen,
    task: tokio::task::JoinHandle<()>,
}

impl Probe {
    fn start(port: u16) -> Probe {
        let seen: Seen = Arc::default();
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let n = ask(port).await;
                sink.lock().unwrap().push((Instant::now(), n));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        Probe { seen, task }
    }

    /// Answers that listed fewer than `n` hosts (unanswered ones apart).
    fn short(&self, n: usize) -> Vec<(Instant, Option<usize>)> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, a)| a.is_some_and(|a| a < n))
            .cloned()
            .collect()
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Checks the glitch was ridden out: every answer and every staged file
/// listed all three hosts, and a hold that was said was released.
async fn rode_it_out(s: &Stage, probe: &Probe, staged_before: usize) {
    if s.render.log().contains("holding") || s.dns.log().contains("holding") {
        s.logged("hold released").await;
    }
    s.converged(3).await;
    // Half a second more of answers after it settled.
    let seen = probe.count();
    eventually(Duration::from_secs(10), "50 more probes", || {
        let n = probe.count();
        async move {
            if n >= seen + 50 {
                Ok(())
            } else {
                Err(format!("{n} probes"))
            }
        }
    })
    .await;
    let short = probe.short(3);
    assert!(
        short.is_empty(),
        "{} of {} answers listed fewer hosts: {:?}",
        short.len(),
        probe.count(),
        &short[..short.len().min(5)]
    );
    let staged = s.staged();
    let thin: Vec<_> = staged
        .iter()
        .skip(staged_before)
        .filter(|(_, n)| *n != 3)
        .collect();
    assert!(
        thin.is_empty(),
        "render staged files with fewer servers: {thin:?}"
    );
}

#[tokio::test]
async fn a_wiped_prefix_with_live_agents_never_empties_the_file_or_the_answers() {
    let s = Stage::start("{settle: 20s}").await;
    let before = s.staged().len();
    let probe = Probe::start(s.dns_port);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c = s.client().await;
    c.delete("/infrastructure/", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    s.logged("holding 3 host(s)").await;
    rode_it_out(&s, &probe, before).await;
    assert!(s.render.log().contains("one revision removed 3 machines"));
    assert!(
        s.metric(s.dns_metrics, "registrar_dns_holds_total{reason=\"mass\"}")
            .await
            >= 1.0
    );
    assert!(
        s.metric(
            s.render_metrics,
            "registrar_render_holds_total{reason=\"mass\"}"
        )
        .await
            >= 1.0
    );
}

#[tokio::test]
async fn a_replaced_cluster_and_a_restore_never_empty_the_file_or_the_answers() {
    let mut s = Stage::start("{settle: 30s}").await;
    // A replaced cluster: every member's data lost, the same addresses.
    // The agents are stopped meanwhile, so that the consumers see the
    // empty registry (they would often be back first).
    let before = s.staged().len();
    let probe = Probe::start(s.dns_port);
    s.pause_agents(&[0, 1, 2], Signal::SIGSTOP);
    s.cluster.wipe_all_and_restart().await;
    s.logged("history was reset").await;
    s.pause_agents(&[0, 1, 2], Signal::SIGCONT);
    rode_it_out(&s, &probe, before).await;
    drop(probe);

    // A restore from a snapshot taken before w3 registered.
    s.agents[2].take();
    eventually(Duration::from_secs(10), "w3 gone", || async {
        if s.registered().await == 2 {
            Ok(())
        } else {
            Err("w3 still there".to_string())
        }
    })
    .await;
    let snap = s.d.path("older.db");
    s.cluster.snapshot(&snap);
    s.agents[2] = Some(agent(&s.eps, &s.d, 3));
    s.converged(3).await;
    let before = s.staged().len();
    let released = s.render.log().matches("hold released").count();
    let probe = Probe::start(s.dns_port);
    // w3's agent is stopped during the restore, as above.
    s.pause_agents(&[2], Signal::SIGSTOP);
    let held = s.render.log().matches("history was reset").count();
    s.cluster.restore_all(&snap).await;
    // The restore lost w3: held, until its agent finds its lease gone and
    // registers again.
    eventually(Duration::from_secs(30), "the restore's hold", || {
        let n = s.render.log().matches("history was reset").count();
        async move {
            if n > held {
                Ok(())
            } else {
                Err(format!("{n} holds"))
            }
        }
    })
    .await;
    s.pause_agents(&[2], Signal::SIGCONT);
    eventually(Duration::from_secs(30), "the second release", || {
        let n = s.render.log().matches("hold released").count();
        async move {
            if n > released {
                Ok(())
            } else {
                Err(format!("{n} releases"))
            }
        }
    })
    .await;
    rode_it_out(&s, &probe, before).await;
    assert!(
        s.metric(s.dns_metrics, "registrar_dns_holds_total{reason=\"reset\"}")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn leaving_is_applied_at_once_and_vanishing_is_held_until_settle() {
    let mut s = Stage::start("{settle: 8s}").await;
    // Two of three stop gracefully: gone from the answers within a second
    // and from the file within wait.min + 1 s. No hold.
    let t = Instant::now();
    for a in s.agents[1..].iter().flatten() {
        a.signal(Signal::SIGTERM);
    }
    let port = s.dns_port;
    eventually(
        Duration::from_secs(1),
        "dns to drop the leavers",
        || async move {
            match ask(port).await {
                Some(1) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    eventually(
        Duration::from_millis(1100),
        "the file to drop the leavers",
        || {
            let n = s.servers();
            async move {
                if n == 1 {
                    Ok(())
                } else {
                    Err(format!("{n} servers"))
                }
            }
        },
    )
    .await;
    eprintln!("leavers applied after {:?}", t.elapsed());
    assert!(!s.render.log().contains("holding"), "{}", s.render.log());
    assert!(!s.dns.log().contains("holding"), "{}", s.dns.log());

    // They come back; then two of three are killed: their leases expire
    // without `leaving`. Held (the first one put back), then applied
    // after settle, said both times.
    for i in [2, 3] {
        s.agents[i - 1] = Some(agent(&s.eps, &s.d, i));
    }
    s.converged(3).await;
    for a in s.agents[1..].iter_mut() {
        if let Some(a) = a.take() {
            a.signal(Signal::SIGKILL);
        }
    }
    s.logged("holding").await;
    s.converged(3).await;
    assert_eq!(
        s.metric(s.dns_metrics, "registrar_dns_holding_hosts").await,
        2.0
    );
    assert!(
        s.metric(s.render_metrics, "registrar_render_holding_hosts")
            .await
            >= 1.0
    );
    let health =
        crate::support::etcd::http_get(&format!("http://127.0.0.1:{}/health", s.dns_metrics)).await;
    assert!(health.contains("holding 2 hosts"), "{health}");
    s.logged("not back after settle").await;
    s.converged(1).await;
    assert_eq!(
        s.metric(s.dns_metrics, "registrar_dns_holding_hosts").await,
        0.0
    );
}

#[tokio::test]
async fn max_drop_100_percent_turns_the_drop_guard_off() {
    let mut s = Stage::start("{settle: 30s, max_drop: 100%}").await;
    for a in s.agents[1..].iter_mut() {
        if let Some(a) = a.take() {
            a.signal(Signal::SIGKILL);
        }
    }
    // Applied once the leases expire, with no hold.
    s.converged(1).await;
    assert!(!s.render.log().contains("holding"), "{}", s.render.log());
    assert!(!s.dns.log().contains("holding"), "{}", s.dns.log());
}
