//! The long-running agent's lease lifecycle on a single-member cluster.

use std::time::Duration;

use etcd_client::Client;
use nix::sys::signal::Signal;
use tokio::time::Instant;

use crate::support::proc::{cmd, host_args};
use crate::support::{Agent, Cluster, eventually, free_port};
use crate::{read_prefix, registered, value};

const DIR: &str = "/infrastructure/dc1/web/h1/";

fn agent(cluster: &Cluster, machine_id: &str, ttl: &str) -> Agent {
    let args = cmd(
        "agent",
        host_args(
            &cluster.endpoint_list(),
            "dc1",
            "web",
            "h1",
            machine_id,
            ttl,
        ),
    );
    Agent::spawn(&format!("agent {machine_id}"), &args)
}

async fn wait_registered(c: &Client, within: Duration) -> i64 {
    eventually(within, "the host to be registered", || {
        let mut c = c.clone();
        async move { registered(&mut c, DIR).await }
    })
    .await
}

/// Waits until etcd has seen `n` keep-alives for `lease`, judged by its
/// remaining TTL going up. etcd reports whole seconds, so use a TTL of 6 s or
/// more: with 3 s the remaining time hovers around 2 and a renewal is invisible.
pub async fn wait_keepalives(c: &Client, lease: i64, n: usize, within: Duration) {
    let mut c = c.clone();
    let deadline = Instant::now() + within;
    let (mut last, mut seen) = (i64::MAX, 0usize);
    while seen < n {
        assert!(
            Instant::now() < deadline,
            "only {seen} of {n} keep-alives of lease {lease:x} within {within:?}"
        );
        let ttl = match c.lease_time_to_live(lease, None).await {
            Ok(r) => r.ttl(),
            Err(_) => last,
        };
        assert!(
            ttl > 0,
            "lease {lease:x} expired while waiting for keep-alives"
        );
        if ttl > last {
            seen += 1;
        }
        last = ttl;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn steady_state_agent_writes_nothing_and_keeps_the_lease() {
    let cluster = Cluster::start(1).await;
    let a = agent(&cluster, "m1", "6s");
    let mut c = cluster.client().await;
    let lease = wait_registered(&c, Duration::from_secs(10)).await;
    let (_, rev_before) = read_prefix(&mut c, "/").await;
    // Three keep-alive periods (TTL/3 each) must pass with no write at all.
    wait_keepalives(&c, lease, 3, Duration::from_secs(12)).await;
    let (_, rev_after) = read_prefix(&mut c, "/").await;
    assert_eq!(
        rev_before, rev_after,
        "the agent wrote to etcd in steady state"
    );
    assert_eq!(registered(&mut c, DIR).await.unwrap(), lease);
    drop(a);
}

#[tokio::test]
async fn lease_revoked_from_outside_is_replaced_within_two_seconds() {
    let cluster = Cluster::start(1).await;
    // A long TTL: the keep-alive tick (every 10 s) cannot be what notices.
    let _a = agent(&cluster, "m1", "30s");
    let mut c = cluster.client().await;
    let old = wait_registered(&c, Duration::from_secs(10)).await;
    c.lease_revoke(old).await.unwrap();
    let revoked_at = Instant::now();
    let new = eventually(
        Duration::from_secs(2),
        "every key back on a new lease",
        || {
            let mut c = c.clone();
            async move {
                match registered(&mut c, DIR).await {
                    Ok(l) if l != old => Ok(l),
                    Ok(_) => Err("still the old lease".into()),
                    Err(e) => Err(e),
                }
            }
        },
    )
    .await;
    eprintln!("re-registered {:?} after the revoke", revoked_at.elapsed());
    let (kvs, _) = read_prefix(&mut c, DIR).await;
    let revs: std::collections::BTreeSet<i64> = kvs.iter().map(|kv| kv.mod_revision()).collect();
    assert_eq!(revs.len(), 1, "re-registration was not one transaction");
    assert!(c.lease_time_to_live(new, None).await.unwrap().ttl() > 0);
}

#[tokio::test]
async fn keys_deleted_from_outside_are_rewritten_on_the_same_lease() {
    let cluster = Cluster::start(1).await;
    let _a = agent(&cluster, "m1", "30s");
    let mut c = cluster.client().await;
    let lease = wait_registered(&c, Duration::from_secs(10)).await;
    c.delete(format!("{DIR}ip"), None).await.unwrap();
    eventually(Duration::from_secs(2), "ip to be rewritten", || {
        let mut c = c.clone();
        async move {
            match value(&mut c, &format!("{DIR}ip")).await {
                Some((ip, l)) if l == lease && ip == "127.0.0.1" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
}

#[tokio::test]
async fn sigterm_removes_every_key_before_the_process_exits() {
    let cluster = Cluster::start(1).await;
    let mut a = agent(&cluster, "m1", "30s");
    let mut c = cluster.client().await;
    let lease = wait_registered(&c, Duration::from_secs(10)).await;
    a.signal(Signal::SIGTERM);
    let code = a.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(code, 0, "log:\n{}", a.log());
    let (kvs, _) = read_prefix(&mut c, "/infrastructure/").await;
    assert!(kvs.is_empty(), "keys left after the agent exited");
    assert!(
        c.lease_time_to_live(lease, None).await.unwrap().ttl() <= 0,
        "lease not revoked"
    );
}

#[tokio::test]
async fn sigint_also_revokes() {
    let cluster = Cluster::start(1).await;
    let mut a = agent(&cluster, "m1", "30s");
    let mut c = cluster.client().await;
    wait_registered(&c, Duration::from_secs(10)).await;
    a.signal(Signal::SIGINT);
    assert_eq!(a.wait_exit(Duration::from_secs(10)).await, 0);
    let (kvs, _) = read_prefix(&mut c, "/infrastructure/").await;
    assert!(kvs.is_empty());
}

#[tokio::test]
async fn kill_9_leaves_the_keys_until_the_ttl_and_no_longer() {
    let cluster = Cluster::start(1).await;
    let mut a = agent(&cluster, "m1", "3s");
    let mut c = cluster.client().await;
    wait_registered(&c, Duration::from_secs(10)).await;
    a.signal(Signal::SIGKILL);
    a.wait_exit(Duration::from_secs(5)).await;
    let killed = Instant::now();
    assert!(
        registered(&mut c, DIR).await.is_ok(),
        "keys vanished at once after kill -9"
    );
    eventually(
        Duration::from_secs(5),
        "keys to expire with the TTL",
        || {
            let mut c = c.clone();
            async move {
                let (kvs, _) = read_prefix(&mut c, DIR).await;
                if kvs.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{} keys", kvs.len()))
                }
            }
        },
    )
    .await;
    eprintln!("keys expired {:?} after kill -9 (TTL 3s)", killed.elapsed());
}

#[tokio::test]
async fn second_agent_never_overwrites_and_takes_over_when_the_first_stops() {
    let cluster = Cluster::start(1).await;
    let mut first = agent(&cluster, "machine-a", "3s");
    let mut c = cluster.client().await;
    let lease_a = wait_registered(&c, Duration::from_secs(10)).await;

    let second = agent(&cluster, "machine-b", "3s");
    eventually(
        Duration::from_secs(10),
        "the second agent to report the conflict",
        || {
            let log = second.log();
            async move {
                let n = log.matches("registered by another machine").count();
                if n >= 1 {
                    Ok(())
                } else {
                    Err(format!("{n} conflict reports"))
                }
            }
        },
    )
    .await;
    assert!(
        second.log().contains("machine-a"),
        "conflict report does not name the owner"
    );
    assert_eq!(
        value(&mut c, &format!("{DIR}owner")).await,
        Some(("machine-a".into(), lease_a))
    );

    first.signal(Signal::SIGTERM);
    first.wait_exit(Duration::from_secs(10)).await;
    eventually(
        Duration::from_secs(15),
        "the second agent to take over",
        || {
            let mut c = c.clone();
            async move {
                match value(&mut c, &format!("{DIR}owner")).await {
                    Some((owner, _)) if owner == "machine-b" => {
                        registered(&mut c, DIR).await.map(|_| ())
                    }
                    other => Err(format!("owner {other:?}")),
                }
            }
        },
    )
    .await;
    // It kept retrying (it took over) without a log line per retry: the
    // conflict is said once, then summarised at most once a minute.
    assert_eq!(
        second
            .log()
            .matches("registered by another machine")
            .count(),
        1,
        "{}",
        second.log()
    );
}

#[tokio::test]
async fn restart_with_the_same_machine_id_takes_over_at_once() {
    let cluster = Cluster::start(1).await;
    let mut first = agent(&cluster, "m1", "30s");
    let c = cluster.client().await;
    let old = wait_registered(&c, Duration::from_secs(10)).await;
    first.signal(Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(5)).await;

    // Without takeover this would wait out the 30 s TTL.
    let _second = agent(&cluster, "m1", "30s");
    eventually(
        Duration::from_secs(3),
        "immediate takeover on a new lease",
        || {
            let mut c = c.clone();
            async move {
                match registered(&mut c, DIR).await {
                    Ok(l) if l != old => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;
    let mut c = c.clone();
    assert!(
        c.lease_time_to_live(old, None).await.unwrap().ttl() <= 0,
        "old lease left alive"
    );
}

#[tokio::test]
async fn agent_started_while_etcd_is_down_registers_once_it_is_up() {
    let mut cluster = Cluster::start(1).await;
    cluster.kill(0);
    let a = agent(&cluster, "m1", "3s");
    eventually(
        Duration::from_secs(10),
        "the agent to report etcd unavailable",
        || {
            let log = a.log();
            async move {
                if log.contains("cannot grant a lease") {
                    Ok(())
                } else {
                    Err(log)
                }
            }
        },
    )
    .await;
    cluster.restart(0).await;
    let c = cluster.client().await;
    wait_registered(&c, Duration::from_secs(15)).await;
}

#[tokio::test]
async fn register_keep_alive_stays_registered_until_sigterm() {
    let cluster = Cluster::start(1).await;
    let mut args = cmd(
        "register",
        host_args(&cluster.endpoint_list(), "dc1", "web", "h1", "m1", "6s"),
    );
    args.push("--keep-alive".into());
    let mut a = Agent::spawn("register --keep-alive", &args);
    let mut c = cluster.client().await;
    let lease = wait_registered(&c, Duration::from_secs(10)).await;
    // Alive past its TTL: something keeps it alive.
    wait_keepalives(&c, lease, 3, Duration::from_secs(12)).await;
    assert_eq!(registered(&mut c, DIR).await, Ok(lease));
    a.signal(Signal::SIGTERM);
    assert_eq!(a.wait_exit(Duration::from_secs(10)).await, 0);
    let (kvs, _) = read_prefix(&mut c, DIR).await;
    assert!(kvs.is_empty(), "keys left after SIGTERM");
}

#[tokio::test]
async fn sighup_does_not_kill_the_agent() {
    let cluster = Cluster::start(1).await;
    let mut a = agent(&cluster, "m1", "30s");
    let mut c = cluster.client().await;
    let lease = wait_registered(&c, Duration::from_secs(10)).await;
    a.signal(Signal::SIGHUP);
    eventually(Duration::from_secs(5), "the SIGHUP to be logged", || {
        let log = a.log();
        async move {
            if log.contains("SIGHUP received") {
                Ok(())
            } else {
                Err(log)
            }
        }
    })
    .await;
    assert_eq!(registered(&mut c, DIR).await, Ok(lease));
    a.signal(Signal::SIGTERM);
    assert_eq!(a.wait_exit(Duration::from_secs(10)).await, 0);
}

#[tokio::test]
async fn a_grant_retried_with_its_id_uses_the_lease_it_already_granted() {
    use registrar::lease::{LeaseId, grant};
    let cluster = Cluster::start(1).await;
    let etcd = registrar::etcd::Etcd::new(&registrar::config::EtcdConfig {
        endpoints: cluster.endpoints(),
        tls: None,
        user: None,
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(3),
    })
    .unwrap();
    let id = LeaseId::random();
    let first = grant(&etcd, Duration::from_secs(30), id).await.unwrap();
    assert_eq!(first.id, id);
    // As if the first answer had been lost to a timeout: the same grant again.
    let again = grant(&etcd, Duration::from_secs(30), id).await.unwrap();
    assert_eq!((again.id, again.ttl), (id, Duration::from_secs(30)));
    let mut c = cluster.client().await;
    let leases = c.leases().await.unwrap();
    assert_eq!(
        leases.leases().iter().map(|l| l.id()).collect::<Vec<_>>(),
        vec![id.get()],
        "a retried grant must not leave a second lease"
    );
    // A new id is a new lease.
    let other = grant(&etcd, Duration::from_secs(30), LeaseId::random())
        .await
        .unwrap();
    assert_ne!(other.id, id);
}

/// `deregister` next to a running agent says that the agent will put the
/// host back (and it does); `maintenance on` says whether an agent will
/// apply it.
#[tokio::test]
async fn deregister_and_maintenance_say_what_the_running_agent_will_do() {
    let cluster = Cluster::start(1).await;
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_string_lossy().into_owned();
    let idle = tempfile::tempdir().unwrap();

    // No agent on that state dir: said.
    let r = crate::support::proc::run(&[
        "maintenance",
        "on",
        "--reason",
        "kernel upgrade",
        "--state-dir",
        &idle.path().to_string_lossy(),
    ])
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("no agent runs with state dir"),
        "{}",
        r.stderr
    );

    let mut args = cmd(
        "agent",
        host_args(&cluster.endpoint_list(), "dc1", "web", "h1", "m1", "6s"),
    );
    args.extend(["--state-dir".into(), state_dir.clone()]);
    let _agent = Agent::spawn("agent", &args);
    let c = cluster.client().await;
    let lease = wait_registered(&c, Duration::from_secs(10)).await;

    let mut dereg = cmd(
        "deregister",
        host_args(&cluster.endpoint_list(), "dc1", "web", "h1", "m1", "6s"),
    );
    dereg.extend(["--state-dir".into(), state_dir.clone()]);
    let r = crate::support::proc::run(&dereg).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("it will register the host again"),
        "{}",
        r.stderr
    );
    // And so it does, on a new lease.
    eventually(Duration::from_secs(10), "re-registration", || {
        let mut c = c.clone();
        async move {
            match registered(&mut c, DIR).await {
                Ok(l) if l != lease => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;

    let r = crate::support::proc::run(&[
        "maintenance",
        "on",
        "--reason",
        "drain",
        "--state-dir",
        &state_dir,
    ])
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("the running agent applies it"),
        "{}",
        r.stdout
    );
}

/// What the watcher saw of a graceful stop: `health: leaving` put on every
/// one of `roles` keys at one revision, and then (later) the deletes.
fn announced_then_revoked(
    events: &[crate::support::watcher::Seen],
    roles: usize,
) -> Result<(), String> {
    let leaving: Vec<_> = events
        .iter()
        .filter(|e| e.put && e.key.ends_with("/health") && e.value == "leaving")
        .collect();
    let keys: std::collections::BTreeSet<&str> = leaving.iter().map(|e| e.key.as_str()).collect();
    let revisions: std::collections::BTreeSet<i64> = leaving.iter().map(|e| e.revision).collect();
    let first_delete = events.iter().find(|e| !e.put);
    match (keys.len(), revisions.len(), first_delete) {
        (n, 1, Some(d)) if n == roles && d.revision > leaving[0].revision => Ok(()),
        _ => Err(format!(
            "leaving {leaving:?}, first delete {first_delete:?}"
        )),
    }
}

/// A graceful stop says so before it goes (design.md rule 4): `health`
/// becomes `leaving` on every role in one transaction, then the revoke
/// removes every key. SIGTERM of the agent and `deregister` alike; and
/// `watch` shows it.
#[tokio::test]
async fn a_graceful_stop_announces_leaving_on_every_role_then_revokes() {
    let cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    let watcher = crate::support::Watcher::start(cluster.endpoints(), "/infrastructure/").await;
    let watch = crate::consumers::WatchProc::start_with(&eps, &[]);
    let mut args = cmd("agent", host_args(&eps, "dc1", "web", "h1", "m1", "30s"));
    args.extend(["--role".into(), "db".into()]);
    let mut a = Agent::spawn("agent", &args);
    let c = cluster.client().await;
    wait_registered(&c, Duration::from_secs(10)).await;
    a.signal(Signal::SIGTERM);
    assert_eq!(a.wait_exit(Duration::from_secs(10)).await, 0);
    eventually(Duration::from_secs(5), "leaving, then the revoke", || {
        let r = announced_then_revoked(&watcher.events(), 2);
        async move { r }
    })
    .await;
    eventually(Duration::from_secs(5), "watch to show it", || {
        let events = watch.events();
        async move {
            let want = [
                ("health passing→leaving".to_string(), "h1".to_string()),
                ("down".to_string(), "h1".to_string()),
            ];
            if want.iter().all(|w| events.contains(w)) {
                Ok(())
            } else {
                Err(format!("{events:?}"))
            }
        }
    })
    .await;

    // deregister: the same, for a one-shot registration.
    let later = crate::support::Watcher::start(cluster.endpoints(), "/infrastructure/").await;
    let mut one = host_args(&eps, "dc1", "web", "h2", "m2", "60s");
    one.extend(["--role".into(), "db".into()]);
    let r = crate::support::proc::run(&cmd("register", one.clone())).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = crate::support::proc::run(&cmd("deregister", one)).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    eventually(
        Duration::from_secs(5),
        "deregister: leaving, then the revoke",
        || {
            let r = announced_then_revoked(&later.events(), 2);
            async move { r }
        },
    )
    .await;
}

/// Contract rule 4: a stop is bounded. With every member hung (SIGSTOP: a
/// connection opens, nothing answers), SIGTERM still ends the agent within
/// the 10 s systemd and docker give a stop, and it says where its keys go.
#[tokio::test]
async fn sigterm_with_every_member_hung_exits_within_10s_and_says_the_keys_expire() {
    let cluster = Cluster::start(3).await;
    let mut a = agent(&cluster, "m1", "30s");
    let c = cluster.client().await;
    wait_registered(&c, Duration::from_secs(10)).await;
    for i in 0..3 {
        cluster.signal(i, Signal::SIGSTOP);
    }
    let stop = Instant::now();
    a.signal(Signal::SIGTERM);
    let code = a.wait_exit(Duration::from_secs(20)).await;
    let took = stop.elapsed();
    eprintln!("SIGTERM to exit with every member hung: {took:?}");
    for i in 0..3 {
        cluster.signal(i, Signal::SIGCONT);
    }
    let log = a.log();
    assert!(took < Duration::from_secs(10), "took {took:?}:\n{log}");
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("could not announce leaving") && log.contains("keys expire within 30s"),
        "{log}"
    );
}

/// A stop is bounded even while a name lookup hangs (design.md rule 4).
/// etcd-client looks endpoint names up with getaddrinfo on a blocking
/// thread; in `docker compose down` etcd's containers go with the agent,
/// their names stop resolving, and a lookup waits for the resolver's
/// timeout. The agent must not wait for it on its way out: here the
/// namespace's resolver never answers (timeout 30 s), the only etcd member
/// is paused so the agent fails over to the named endpoint, and SIGTERM
/// still ends it within 10 s.
#[tokio::test]
async fn sigterm_exits_within_10s_while_an_endpoint_name_lookup_hangs() {
    let ns = crate::dns::Netns::with_resolver_options("timeout:30 attempts:1").await;
    // A resolver that takes every question and answers none.
    let mut silent = ns.command("/usr/bin/python3");
    silent.args([
        "-c",
        "import socket, sys, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('127.0.0.1', 53))\nprint('listening', file=sys.stderr, flush=True)\ntime.sleep(3600)",
    ]);
    let resolver = Agent::spawn_command("silent resolver", silent);
    resolver
        .wait_log("listening", Duration::from_secs(10))
        .await;
    let client = format!("http://127.0.0.1:{}", free_port());
    let mut e = ns.command(crate::support::etcd::etcd_binary());
    e.arg("--data-dir")
        .arg(ns.path("m0.etcd"))
        .args(["--listen-client-urls", &client])
        .args(["--advertise-client-urls", &client])
        .args([
            "--listen-peer-urls",
            &format!("http://127.0.0.1:{}", free_port()),
        ]);
    let etcd = Agent::spawn_command("etcd", e);
    let exe = env!("CARGO_BIN_EXE_registrar");
    let endpoints = format!("{client},http://etcd-b.registry.test:2379");
    let mut a = ns.command(exe);
    a.args(["agent", "--endpoints", &endpoints])
        .args(["--dc", "dc1", "--role", "web", "--host", "h1"])
        .args(["--ip", "10.0.0.1", "--machine-id", "m1", "--ttl", "6s"])
        .arg("--state-dir")
        .arg(ns.path("state"));
    let mut agent = Agent::spawn_command("agent", a);
    agent.wait_log("registered", Duration::from_secs(20)).await;
    // The member hangs: the keep-alive goes silent, and the agent turns to
    // the named endpoint, whose lookup hangs.
    etcd.signal(Signal::SIGSTOP);
    agent
        .wait_log(
            "etcd does not answer the lease keep-alive",
            Duration::from_secs(15),
        )
        .await;
    let stop = Instant::now();
    agent.signal(Signal::SIGTERM);
    let code = agent.wait_exit(Duration::from_secs(40)).await;
    let took = stop.elapsed();
    etcd.signal(Signal::SIGCONT);
    let log = agent.log();
    assert!(took < Duration::from_secs(10), "took {took:?}:\n{log}");
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("keys expire within"), "{log}");
}
