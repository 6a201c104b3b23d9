//! The consumer commands: ls, watch, wait, and an haproxy config built from
//! the registry.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::proc::{cmd, host_args, registrar, run, run_with};
use crate::support::{Agent, Cluster, eventually};

fn register_args(eps: &str, role: &str, host: &str, ip: &str) -> Vec<String> {
    let mut a = cmd(
        "register",
        host_args(eps, "dc1", role, host, &format!("id-{host}"), "60s"),
    );
    // host_args publishes 127.0.0.1; a later --ip is rejected, so swap it.
    if let Some(i) = a.iter().position(|x| x == "127.0.0.1") {
        a[i] = ip.to_string();
    }
    a.extend(["--service".into(), "http=8080".into()]);
    a
}

fn deregister_args(eps: &str, role: &str, host: &str) -> Vec<String> {
    let mut a = cmd(
        "deregister",
        host_args(eps, "dc1", role, host, &format!("id-{host}"), "60s"),
    );
    // Elections after a member restart may take a few seconds.
    a.extend(["--timeout".into(), "30s".into()]);
    a
}

async fn ls(eps: &str, extra: &[&str]) -> crate::support::proc::Run {
    let mut a = vec!["ls".to_string(), "--endpoints".into(), eps.to_string()];
    a.extend(extra.iter().map(|s| s.to_string()));
    run(&a).await
}

#[tokio::test]
async fn ls_formats_filters_and_malformed_keys() {
    let cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    for (role, host, ip) in [
        ("web", "web-1", "10.0.0.1"),
        ("web", "web-2", "10.0.0.2"),
        ("db", "db-1", "10.0.1.1"),
    ] {
        let r = run(&register_args(&eps, role, host, ip)).await;
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    let mut c = cluster.client().await;
    // Someone else's junk, and a host with a broken value.
    c.put("/infrastructure/dc1/web/junk-host/health", "great", None)
        .await
        .unwrap();
    c.put("/infrastructure/dc1/web/junk-host/ip", "10.9.9.9", None)
        .await
        .unwrap();
    c.put("/infrastructure/stray", "x", None).await.unwrap();

    let table = ls(&eps, &[]).await;
    assert_eq!(table.code, 0, "{}", table.stderr);
    assert_eq!(
        table.stdout,
        "DC   ROLE  HOST   IP        HEALTH   CHECKS  SERVICES   MAINT\n\
         dc1  db    db-1   10.0.1.1  passing  -       http:8080  -\n\
         dc1  web   web-1  10.0.0.1  passing  -       http:8080  -\n\
         dc1  web   web-2  10.0.0.2  passing  -       http:8080  -\n"
    );
    assert!(
        table
            .stderr
            .contains("skipping malformed key /infrastructure/dc1/web/junk-host/health"),
        "{}",
        table.stderr
    );
    assert!(
        table
            .stderr
            .contains("skipping malformed key /infrastructure/stray"),
        "{}",
        table.stderr
    );
    assert!(!table.stderr.contains("panicked"));

    let ips = ls(&eps, &["dc1/web", "-o", "ip"]).await;
    assert_eq!(ips.stdout, "10.0.0.1\n10.0.0.2\n");
    let one = ls(&eps, &["dc1/web/web-2", "-o", "ip"]).await;
    assert_eq!(one.stdout, "10.0.0.2\n");
    let none = ls(&eps, &["dc9"]).await;
    assert_eq!(
        (none.code, none.stdout.as_str()),
        (0, ""),
        "empty results print nothing"
    );

    let json = ls(&eps, &["dc1/db", "-o", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("ls -o json is JSON");
    let host = &v["hosts"][0];
    for field in [
        "dc",
        "role",
        "host",
        "ip",
        "health",
        "checks",
        "services",
        "meta",
        "maintenance",
        "owner",
        "lease",
        "lease_hex",
        "revision",
    ] {
        assert!(host.get(field).is_some(), "json lacks {field}: {host}");
    }
    assert_eq!(host["host"], "db-1");
    assert_eq!(host["services"]["http"], 8080);
    assert!(host["lease"].as_i64().unwrap() > 0);
    assert!(v["revision"].as_i64().unwrap() >= host["revision"].as_i64().unwrap());

    let bad = ls(&eps, &["a/b/c/d"]).await;
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    let bad = ls(&eps, &["dc1/we b"]).await;
    assert_eq!(bad.code, 2, "{}", bad.stderr);
}

#[tokio::test]
async fn ls_never_shows_a_half_written_host_while_hosts_register() {
    let cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    let registering = {
        let eps = eps.clone();
        tokio::spawn(async move {
            let mut all = Vec::new();
            for i in 0..30 {
                let eps = eps.clone();
                all.push(tokio::spawn(async move {
                    run(&register_args(
                        &eps,
                        "web",
                        &format!("h{i}"),
                        &format!("10.0.2.{}", i + 1),
                    ))
                    .await
                    .code
                }));
            }
            for h in all {
                assert_eq!(h.await.unwrap(), 0);
            }
        })
    };
    let mut listings = 0;
    while !registering.is_finished() {
        let r = ls(&eps, &["-o", "json"]).await;
        assert_eq!(r.code, 0, "{}", r.stderr);
        if !r.stdout.is_empty() {
            let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
            for h in v["hosts"].as_array().unwrap() {
                assert!(
                    h["ip"].is_string() && h["health"].is_string(),
                    "half-written host: {h}"
                );
            }
        }
        listings += 1;
    }
    registering.await.unwrap();
    let all = ls(&eps, &["-o", "ip"]).await;
    assert_eq!(all.stdout.lines().count(), 30);
    assert!(listings > 1, "ls never ran during the registrations");
}

/// A running `registrar watch -o json`, its lines collected.
pub(crate) struct WatchProc {
    child: tokio::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl WatchProc {
    fn start(eps: &str) -> WatchProc {
        Self::start_with(eps, &["dc1"])
    }

    /// `watch -o json ARGS...` through `eps`.
    pub(crate) fn start_with(eps: &str, args: &[&str]) -> WatchProc {
        let mut child = registrar()
            .arg("watch")
            .args(args)
            .args([
                "-o",
                "json",
                "--endpoints",
                eps,
                "--request-timeout",
                "1s",
                "--connect-timeout",
                "500ms",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut r = BufReader::new(out).lines();
            while let Ok(Some(l)) = r.next_line().await {
                if let Ok(v) = serde_json::from_str(&l) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        WatchProc { child, lines }
    }

    /// (event, host) pairs seen, snapshot lines included.
    pub(crate) fn events(&self) -> Vec<(String, String)> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|v| {
                let mut ev = v["event"].as_str().unwrap_or("").to_string();
                if ev == "health" {
                    ev = format!(
                        "health {}→{}",
                        v["from"].as_str().unwrap_or(""),
                        v["to"].as_str().unwrap_or("")
                    );
                }
                (ev, v["host"].as_str().unwrap_or("").to_string())
            })
            .collect()
    }

    async fn wait_for(&self, expected: &[(&str, &str)]) {
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        eventually(Duration::from_secs(20), "the watch output", || {
            let got = self.events();
            let expected = expected.clone();
            async move {
                if got == expected {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                }
            }
        })
        .await;
    }
}

impl WatchProc {
    /// Waits until an event of `host` is seen; returns every event so far.
    async fn wait_for_host(&self, host: &str) -> Vec<(String, String)> {
        eventually(Duration::from_secs(20), "an event of the host", || {
            let got = self.events();
            async move {
                if got.iter().any(|(_, h)| h == host) {
                    Ok(got)
                } else {
                    Err(format!("{got:?}"))
                }
            }
        })
        .await
    }
}

impl Drop for WatchProc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[tokio::test]
async fn watch_across_member_restarts_misses_and_repeats_nothing() {
    let mut cluster = Cluster::start(3).await;
    let eps = cluster.endpoint_list();
    assert_eq!(
        run(&register_args(&eps, "web", "a", "10.0.0.1")).await.code,
        0
    );
    let watch = WatchProc::start(&eps);
    watch.wait_for(&[("present", "a")]).await;
    let mut expected = vec![("present", "a")];
    for member in 0..3 {
        let host = ["b", "c", "d"][member];
        let r = run(&register_args(
            &eps,
            "web",
            host,
            &format!("10.0.0.{}", member + 2),
        ))
        .await;
        assert_eq!(r.code, 0, "{}", r.stderr);
        expected.push(("up", host));
        watch.wait_for(&expected).await;
        // Restart a member (the watch's own at some point) while changes happen.
        cluster.kill(member);
        let started = std::time::Instant::now();
        let r = run(&deregister_args(&eps, "web", host)).await;
        eprintln!(
            "deregister with member {member} down took {:?}",
            started.elapsed()
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        // deregister says the host is leaving, then revokes.
        expected.push(("health passing→leaving", host));
        expected.push(("down", host));
        cluster.restart(member).await;
        watch.wait_for(&expected).await;
    }
}

#[tokio::test]
async fn watch_after_compaction_reports_only_the_difference() {
    let mut cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    assert_eq!(
        run(&register_args(&eps, "web", "a", "10.0.0.1")).await.code,
        0
    );
    assert_eq!(
        run(&register_args(&eps, "web", "b", "10.0.0.2")).await.code,
        0
    );
    let watch = WatchProc::start(&eps);
    watch.wait_for(&[("present", "a"), ("present", "b")]).await;
    // Freeze the watch, change things, compact the history it would need,
    // and break its stream: it must resnapshot and diff.
    let pid = nix::unistd::Pid::from_raw(watch.child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, Signal::SIGSTOP).unwrap();
    // Its stream dies with the member while it is frozen.
    cluster.restart(0).await;
    assert_eq!(run(&deregister_args(&eps, "web", "a")).await.code, 0);
    assert_eq!(
        run(&register_args(&eps, "web", "c", "10.0.0.3")).await.code,
        0
    );
    assert_eq!(
        run(&register_args(&eps, "web", "d", "10.0.0.4")).await.code,
        0
    );
    assert_eq!(run(&deregister_args(&eps, "web", "d")).await.code, 0);
    let mut c = cluster.client().await;
    let rev = c.get("x", None).await.unwrap().header().unwrap().revision();
    c.compact(rev, None).await.unwrap();
    nix::sys::signal::kill(pid, Signal::SIGCONT).unwrap();
    // d came and went while nobody looked: it is not reported.
    watch
        .wait_for(&[
            ("present", "a"),
            ("present", "b"),
            ("down", "a"),
            ("up", "c"),
        ])
        .await;
}

#[tokio::test]
async fn wait_is_satisfied_by_registrations_and_times_out_otherwise() {
    let cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    let mut waiting = registrar();
    waiting.args([
        "wait",
        "--role",
        "etcd",
        "--dc",
        "dc1",
        "--count",
        "3",
        "--timeout",
        "30s",
        "-o",
        "ip",
        "--endpoints",
        &eps,
    ]);
    let waiter = tokio::spawn(async move { run_with(&mut waiting).await });
    for i in 1..=3 {
        assert_eq!(
            run(&register_args(
                &eps,
                "etcd",
                &format!("e{i}"),
                &format!("10.0.3.{i}")
            ))
            .await
            .code,
            0
        );
    }
    let r = waiter.await.unwrap();
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, "10.0.3.1\n10.0.3.2\n10.0.3.3\n");

    let r = run(&[
        "wait",
        "--role",
        "etcd",
        "--dc",
        "dc1",
        "--count",
        "5",
        "--timeout",
        "1s",
        "--endpoints",
        &eps,
    ])
    .await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("found 3 of 5 hosts in role etcd of dc dc1"),
        "{}",
        r.stderr
    );
    let r = run(&[
        "wait",
        "--role",
        "etcd",
        "--count",
        "3",
        "--timeout",
        "5s",
        "--endpoints",
        &eps,
    ])
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.lines().count(), 3);
    assert!(r.stdout.starts_with("dc1/etcd/e1 10.0.3.1"), "{}", r.stdout);
}

#[tokio::test]
async fn haproxy_config_built_from_the_registry_lists_only_healthy_hosts() {
    let cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    let dir = tempfile::tempdir().unwrap();
    let mut agents = Vec::new();
    for (i, (host, check)) in [
        ("ok-1", "exit 0"),
        ("ok-2", "exit 0"),
        ("warn-1", "exit 1"),
        ("crit-1", "exit 2"),
        ("maint-1", "exit 0"),
    ]
    .iter()
    .enumerate()
    {
        let state = dir.path().join(host);
        std::fs::create_dir_all(&state).unwrap();
        let cfg = state.join("registrar.yaml");
        std::fs::write(&cfg, format!("dc: dc1\nroles: [web]\nservices:\n  http: 808{i}\nchecks:\n  - {{name: app, shell: '{check}'}}\n")).unwrap();
        if *host == "maint-1" {
            let r = run(&[
                "maintenance",
                "on",
                "--reason",
                "draining",
                "--state-dir",
                state.to_str().unwrap(),
            ])
            .await;
            assert_eq!(r.code, 0, "{}", r.stderr);
        }
        let args = cmd(
            "agent",
            [
                "--config",
                cfg.to_str().unwrap(),
                "--endpoints",
                &eps,
                "--host",
                host,
                "--machine-id",
                host,
                "--ip",
                &format!("10.0.4.{}", i + 1),
                "--state-dir",
                state.to_str().unwrap(),
            ]
            .map(String::from)
            .to_vec(),
        );
        agents.push(Agent::spawn(host, &args));
    }
    eventually(Duration::from_secs(15), "five registered hosts", || {
        let eps = eps.clone();
        async move {
            let r = ls(&eps, &["-o", "ip"]).await;
            if r.stdout.lines().count() == 5 {
                Ok(())
            } else {
                Err(r.stdout)
            }
        }
    })
    .await;

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/haproxy/build-backend"
    );
    let mut build = tokio::process::Command::new(script);
    build
        .args(["dc1/web", "http", "--endpoints", &eps])
        .env("REGISTRAR", env!("CARGO_BIN_EXE_registrar"));
    let built = run_with(&mut build).await;
    assert_eq!(built.code, 0, "{}", built.stderr);
    let servers: Vec<&str> = built
        .stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("server "))
        .collect();
    assert_eq!(
        servers,
        [
            "    server ok-1 10.0.4.1:8080 check",
            "    server ok-2 10.0.4.2:8081 check"
        ],
        "config:\n{}",
        built.stdout
    );
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(&cfg, &built.stdout).unwrap();
    let mut check = tokio::process::Command::new("haproxy");
    check.args(["-c", "-f", cfg.to_str().unwrap()]);
    let checked = run_with(&mut check).await;
    assert_eq!(
        checked.code, 0,
        "haproxy -c rejected the config: {}{}",
        checked.stdout, checked.stderr
    );
}

#[tokio::test]
async fn watch_exits_cleanly_on_a_closed_stdout_and_on_sigint() {
    let cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    assert_eq!(
        run(&register_args(&eps, "web", "a", "10.0.0.1")).await.code,
        0
    );

    // `registrar watch | head -1`: the reader goes away after one line, on
    // a registry where nothing happens afterwards.
    let mut piped = registrar()
        .args(["watch", "--endpoints", &eps])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(piped.stdout.take().unwrap()).lines();
    let first = lines.next_line().await.unwrap().unwrap();
    assert!(
        first.contains("present dc1/web/a 10.0.0.1 passing"),
        "{first}"
    );
    drop(lines);
    let status = tokio::time::timeout(Duration::from_secs(10), piped.wait())
        .await
        .expect("watch kept running")
        .unwrap();
    assert_eq!(status.code(), Some(0));

    let mut interrupted = registrar()
        .args(["watch", "--endpoints", &eps])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(interrupted.stdout.take().unwrap()).lines();
    lines.next_line().await.unwrap().unwrap();
    let pid = nix::unistd::Pid::from_raw(interrupted.id().unwrap() as i32);
    nix::sys::signal::kill(pid, Signal::SIGINT).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), interrupted.wait())
        .await
        .expect("watch ignored SIGINT")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// Registers one host one-shot (machine id `id-HOST` unless given).
async fn register_host(eps: &str, dc: &str, role: &str, host: &str, ip: &str, id: Option<&str>) {
    let id = id.map_or(format!("id-{host}"), String::from);
    let mut a = cmd("register", host_args(eps, dc, role, host, &id, "60s"));
    if let Some(i) = a.iter().position(|x| x == "127.0.0.1") {
        a[i] = ip.to_string();
    }
    let r = run(&a).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// Hosts in two DCs and two roles, registered one-shot.
async fn two_dcs(eps: &str) {
    for (dc, role, host, ip) in [
        ("dc1", "web", "w1", "10.0.0.1"),
        ("dc1", "db", "d1", "10.0.0.2"),
        ("dc2", "web", "w2", "10.0.1.1"),
    ] {
        register_host(eps, dc, role, host, ip, None).await;
    }
}

fn hosts_of(json: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(json).expect("one JSON document");
    v["hosts"]
        .as_array()
        .expect("a hosts array")
        .iter()
        .map(|h| {
            format!(
                "{}/{}/{}",
                h["dc"].as_str().unwrap(),
                h["role"].as_str().unwrap(),
                h["host"].as_str().unwrap()
            )
        })
        .collect()
}

#[tokio::test]
async fn ls_and_watch_honour_dc_and_role_and_refuse_agent_flags() {
    let cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    two_dcs(&eps).await;
    for (args, want) in [
        (vec!["--dc", "dc2"], vec!["dc2/web/w2"]),
        (vec!["--role", "web"], vec!["dc1/web/w1", "dc2/web/w2"]),
        (vec!["dc1", "--role", "db"], vec!["dc1/db/d1"]),
        (
            vec!["--dc", "dc1", "--role", "web", "--healthy"],
            vec!["dc1/web/w1"],
        ),
        (vec!["dc2/web", "--dc", "dc2"], vec!["dc2/web/w2"]),
    ] {
        let mut a = args.clone();
        a.extend(["-o", "json"]);
        let r = ls(&eps, &a).await;
        assert_eq!(r.code, 0, "ls {args:?}: {}", r.stderr);
        assert_eq!(hosts_of(&r.stdout), want, "ls {args:?}");
    }
    // A scope that matches nothing is still one JSON document.
    let r = ls(&eps, &["--dc", "dc5", "-o", "json"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("JSON on an empty scope");
    assert_eq!(v["hosts"].as_array().map(Vec::len), Some(0));
    assert!(v["revision"].as_i64().is_some_and(|r| r > 0), "{v}");

    // Disagreeing scopes, several roles, and agent-only flags are refused.
    for bad in [
        vec!["dc1", "--dc", "dc2"],
        vec!["dc1/web", "--role", "db"],
        vec!["--role", "web", "--role", "db"],
        vec!["--ttl", "5s"],
        vec!["--service", "http=80"],
        vec!["--metrics-listen", "127.0.0.1:9477"],
    ] {
        let r = ls(&eps, &bad).await;
        assert_eq!(r.code, 2, "ls {bad:?} was accepted: {}", r.stdout);
    }
    for command in ["ls", "watch", "wait"] {
        let help = run(&[command, "--help"]).await;
        for flag in [
            "--ttl",
            "--service",
            "--metrics-listen",
            "--machine-id",
            "--ip ",
        ] {
            assert!(!help.stdout.contains(flag), "{command} --help lists {flag}");
        }
        assert!(help.stdout.contains("--endpoints"), "{command} --help");
    }

    // watch --dc: the snapshot and the events of that DC only.
    let watch = WatchProc::start_with(&eps, &["--dc", "dc2"]);
    watch.wait_for(&[("present", "w2")]).await;
    register_host(&eps, "dc1", "web", "w3", "10.0.0.3", None).await;
    register_host(&eps, "dc2", "web", "w4", "10.0.1.4", None).await;
    watch.wait_for(&[("present", "w2"), ("up", "w4")]).await;
}

#[tokio::test]
async fn watch_and_wait_notice_a_wiped_cluster() {
    let mut cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    two_dcs(&eps).await;
    // Some history, so that the wiped cluster starts far below it.
    let mut c = cluster.client().await;
    for i in 0..20 {
        c.put(format!("/elsewhere/{i}"), "x", None).await.unwrap();
    }
    let before = cluster.watch_streams(0).await;
    let watch = WatchProc::start_with(&eps, &["dc1"]);
    watch
        .wait_for(&[("present", "d1"), ("present", "w1")])
        .await;
    let wait = registrar()
        .args([
            "wait",
            "--endpoints",
            &eps,
            "--dc",
            "dc9",
            "--role",
            "web",
            "--count",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Both are watching the cluster that is about to be wiped.
    eventually(Duration::from_secs(10), "two watch streams", || {
        let cluster = &cluster;
        async move {
            let n = cluster.watch_streams(0).await;
            if n >= before + 2 {
                Ok(())
            } else {
                Err(format!("{n} watch streams"))
            }
        }
    })
    .await;

    // The cluster's data is lost and it starts afresh (a restore to an
    // empty snapshot, or a replaced cluster on the same addresses).
    cluster.wipe_and_restart(0).await;
    register_host(&eps, "dc1", "web", "w5", "10.0.0.5", None).await;
    // The vanished hosts go down, the new one comes up.
    watch
        .wait_for(&[
            ("present", "d1"),
            ("present", "w1"),
            ("down", "d1"),
            ("down", "w1"),
            ("up", "w5"),
        ])
        .await;
    // wait sees a host registered after the wipe.
    register_host(&eps, "dc9", "web", "w9", "10.0.9.9", None).await;
    let out = tokio::time::timeout(Duration::from_secs(15), wait.wait_with_output())
        .await
        .expect("wait never noticed the host registered after the wipe")
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("dc9/web/w9"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("went backwards"),
        "the wipe was not said: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_takeover_shows_consumers_one_change_not_down_and_up() {
    let cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    register_host(&eps, "dc1", "web", "a", "10.0.0.1", Some("same-id")).await;
    let watch = WatchProc::start(&eps);
    watch.wait_for(&[("present", "a")]).await;
    // The same machine registers again (a reboot): a new lease takes over.
    register_host(&eps, "dc1", "web", "a", "10.0.0.1", Some("same-id")).await;
    let mut c = cluster.client().await;
    let leases = c.leases().await.unwrap();
    assert_eq!(leases.leases().len(), 1, "the old lease was not revoked");
    // A later event proves the watch has seen everything before it.
    register_host(&eps, "dc1", "web", "b", "10.0.0.2", None).await;
    let events = watch.wait_for_host("b").await;
    let of_a: Vec<&(String, String)> = events.iter().filter(|(_, h)| h == "a").collect();
    assert!(
        !of_a.iter().any(|(e, _)| e == "down"),
        "consumers saw the host go down during the takeover: {of_a:?}"
    );
}
