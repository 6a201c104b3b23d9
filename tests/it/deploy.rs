//! systemd notifications, metrics, completions, and the consistency of the
//! unit files, the CoreOS bundle and the compose demo.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support::proc::{host_args, registrar, run};
use crate::support::{Agent, Cluster, eventually, free_port};
use crate::{read_prefix, registered};

const DIR: &str = "/infrastructure/dc1/web/h1/";
const BIN: &str = "/opt/bin/registrar";
const CONFIG: &str = "/etc/registrar/registrar.yaml";

/// Reads every pending notification (non-blocking).
fn drain(sock: &UnixDatagram, into: &mut Vec<(Instant, String)>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        into.push((
            Instant::now(),
            String::from_utf8_lossy(&buf[..n]).into_owned(),
        ));
    }
}

#[tokio::test]
async fn sd_notify_ready_after_registration_watchdog_only_while_keepalives_succeed_stopping_on_sigterm()
 {
    let mut cluster = Cluster::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_nonblocking(true).unwrap();
    let cfg = dir.path().join("registrar.yaml");
    std::fs::write(
        &cfg,
        "checks:\n  - {name: slow-start, shell: 'sleep 0.5'}\n",
    )
    .unwrap();
    let mut cmd = registrar();
    cmd.arg("agent")
        .args(host_args(
            &cluster.endpoint_list(),
            "dc1",
            "web",
            "h1",
            "m1",
            "3s",
        ))
        .args(["--config", cfg.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &path);
    let mut agent = Agent::spawn_command("agent", cmd);
    let c = cluster.client().await;

    // READY=1 only once the keys are in etcd.
    let mut msgs = Vec::new();
    eventually(Duration::from_secs(10), "READY=1", || {
        drain(&sock, &mut msgs);
        let ready = msgs.iter().any(|(_, m)| m.contains("READY=1"));
        let c = c.clone();
        async move {
            if ready {
                let mut c = c;
                // The keys must already exist when READY arrives.
                registered(&mut c, DIR)
                    .await
                    .map(|_| ())
                    .map_err(|e| panic!("READY before registration: {e}"))
            } else {
                Err("no READY yet".to_string())
            }
        }
    })
    .await;
    let ready_msg = msgs
        .iter()
        .find(|(_, m)| m.contains("READY=1"))
        .unwrap()
        .1
        .clone();
    assert!(
        ready_msg.contains("STATUS=registered lease="),
        "{ready_msg}"
    );
    assert!(ready_msg.contains("checks 1/1 passing"), "{ready_msg}");

    // Watchdog pings while keep-alives succeed (every TTL/3 = 1 s).
    eventually(Duration::from_secs(5), "two WATCHDOG=1 pings", || {
        drain(&sock, &mut msgs);
        let n = msgs
            .iter()
            .filter(|(_, m)| m.contains("WATCHDOG=1"))
            .count();
        async move {
            if n >= 2 {
                Ok(())
            } else {
                Err(format!("{n} pings"))
            }
        }
    })
    .await;

    // etcd down: the pings stop (one in flight may still arrive).
    cluster.kill(0);
    let killed = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the status to report etcd trouble",
        || {
            drain(&sock, &mut msgs);
            let said = msgs
                .iter()
                .any(|(t, m)| *t > killed && m.contains("STATUS=etcd unreachable"));
            let seen = format!(
                "{:?}",
                msgs.iter().map(|(_, m)| m.as_str()).collect::<Vec<_>>()
            );
            async move { if said { Ok(()) } else { Err(seen) } }
        },
    )
    .await;
    let quiet_from = Instant::now();
    // Three keep-alive periods with no successful keep-alive possible.
    while quiet_from.elapsed() < Duration::from_secs(3) {
        drain(&sock, &mut msgs);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let late: Vec<_> = msgs
        .iter()
        .filter(|(t, m)| *t > killed + Duration::from_millis(1500) && m.contains("WATCHDOG=1"))
        .collect();
    assert!(
        late.is_empty(),
        "watchdog pings while etcd was down: {late:?}"
    );

    // etcd back: pings resume.
    cluster.restart(0).await;
    let back = Instant::now();
    eventually(
        Duration::from_secs(20),
        "WATCHDOG=1 after etcd came back",
        || {
            drain(&sock, &mut msgs);
            let resumed = msgs
                .iter()
                .any(|(t, m)| *t > back && m.contains("WATCHDOG=1"));
            async move {
                if resumed {
                    Ok(())
                } else {
                    Err("no ping yet".into())
                }
            }
        },
    )
    .await;

    // SIGTERM: STOPPING=1, then the lease is revoked.
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(10)).await, 0);
    drain(&sock, &mut msgs);
    assert!(
        msgs.iter().any(|(_, m)| m.contains("STOPPING=1")),
        "no STOPPING=1: {msgs:?}"
    );
    let (kvs, _) = read_prefix(&mut c.clone(), DIR).await;
    assert!(kvs.is_empty());
}

/// The value of a metric line (`name{labels} value`), if present.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn get(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(r) => {
            let code = r.status().as_u16();
            (code, r.text().await.unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

#[tokio::test]
async fn metrics_and_health_follow_registration_and_lease_loss() {
    let mut cluster = Cluster::start(1).await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("registrar.yaml");
    std::fs::write(
        &cfg,
        "checks:\n  - {name: disk, exec: ['true']}\n  - {name: app, exec: ['false']}\n",
    )
    .unwrap();
    let mut args = vec!["agent".to_string()];
    args.extend(host_args(
        &cluster.endpoint_list(),
        "dc1",
        "web",
        "h1",
        "m1",
        "3s",
    ));
    args.extend([
        "--config".into(),
        cfg.to_string_lossy().into_owned(),
        "--metrics-listen".into(),
        format!("127.0.0.1:{port}"),
    ]);
    let _agent = Agent::spawn("agent", &args);
    let mut c = cluster.client().await;
    let lease = eventually(Duration::from_secs(10), "registration", || {
        let mut c = c.clone();
        async move { registered(&mut c, DIR).await }
    })
    .await;
    let base = format!("http://127.0.0.1:{port}");
    let text = eventually(Duration::from_secs(5), "metrics after registration", || {
        let url = format!("{base}/metrics");
        async move {
            let (code, text) = get(&url).await;
            if code == 200
                && text.contains(&format!("registrar_lease_info{{lease_id=\"{lease:x}\"}} 1"))
            {
                Ok(text)
            } else {
                Err(text)
            }
        }
    })
    .await;
    assert_eq!(
        metric(&text, "registrar_registrations_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "registrar_reregistrations_total"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "registrar_lease_ttl_seconds"),
        Some(3.0),
        "{text}"
    );
    assert!(
        metric(&text, "registrar_keepalive_age_seconds").is_some_and(|a| (0.0..3.0).contains(&a)),
        "{text}"
    );
    assert!(
        text.contains("registrar_check_status{check=\"disk\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("registrar_check_status{check=\"app\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("registrar_check_duration_seconds{check=\"disk\"}"),
        "{text}"
    );
    // curl and promtool get the classic text format; Prometheus asks for
    // OpenMetrics and gets it.
    assert!(!text.contains("# EOF"), "{text}");
    assert!(
        text.contains("# TYPE registrar_registrations_total counter"),
        "{text}"
    );
    let open = reqwest::Client::new()
        .get(format!("{base}/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        )
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        open.trim_end().ends_with("# EOF"),
        "not OpenMetrics text: {open}"
    );
    assert!(
        open.contains("# TYPE registrar_registrations counter"),
        "{open}"
    );
    // Every error class is there from the start, at 0; no conflict.
    for kind in ["retry", "auth", "tls", "fatal", "lease_gone"] {
        assert!(
            text.contains(&format!("registrar_etcd_errors_total{{kind=\"{kind}\"}} 0")),
            "{kind}: {text}"
        );
    }
    assert_eq!(metric(&text, "registrar_conflict"), Some(0.0), "{text}");
    assert_eq!(metric(&text, "registrar_maintenance"), Some(0.0), "{text}");
    assert!(
        text.contains("registrar_maintenance_until_timestamp_seconds NaN"),
        "{text}"
    );
    assert_eq!(get(&format!("{base}/health")).await.0, 200);
    assert_eq!(get(&format!("{base}/other")).await.0, 404);

    // Lease loss: re-registration shows in the metrics.
    c.lease_revoke(lease).await.unwrap();
    let text = eventually(
        Duration::from_secs(10),
        "metrics after re-registration",
        || {
            let url = format!("{base}/metrics");
            async move {
                let (_, text) = get(&url).await;
                if metric(&text, "registrar_reregistrations_total") == Some(1.0) {
                    Ok(text)
                } else {
                    Err(text)
                }
            }
        },
    )
    .await;
    let new_lease = registered(&mut c, DIR).await.unwrap();
    assert_ne!(new_lease, lease);
    // One lease series: the new one (the lost one's is gone).
    assert!(
        text.contains(&format!(
            "registrar_lease_info{{lease_id=\"{new_lease:x}\"}} 1"
        )),
        "{text}"
    );
    assert_eq!(text.matches("registrar_lease_info{").count(), 1, "{text}");

    // etcd gone for longer than the TTL: /health says so, errors are counted.
    cluster.kill(0);
    eventually(Duration::from_secs(10), "/health 503", || {
        let url = format!("{base}/health");
        async move {
            let (code, body) = get(&url).await;
            if code == 503 {
                Ok(())
            } else {
                Err(format!("{code} {body}"))
            }
        }
    })
    .await;
    let (_, text) = get(&format!("{base}/metrics")).await;
    assert!(
        metric(&text, "registrar_etcd_errors_total").is_some(),
        "{text}"
    );
}

#[tokio::test]
async fn completions_and_man_page() {
    for shell in ["bash", "zsh", "fish"] {
        let r = run(&["completions", shell]).await;
        assert_eq!(r.code, 0, "{shell}: {}", r.stderr);
        assert!(
            r.stdout.contains("registrar") && r.stdout.contains("maintenance"),
            "{shell}"
        );
    }
    let bash = run(&["completions", "bash"]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("registrar.bash");
    std::fs::write(&file, &bash.stdout).unwrap();
    let syntax = std::process::Command::new("bash")
        .arg("-n")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        syntax.status.success(),
        "bash completion does not parse: {}",
        String::from_utf8_lossy(&syntax.stderr)
    );
    let man = run(&["man"]).await;
    assert_eq!(man.code, 0);
    assert!(
        man.stdout.contains(".TH registrar 1"),
        "{}",
        &man.stdout[..200.min(man.stdout.len())]
    );
    // Every command has a page, and man formats it with the exit codes.
    let pages = dir.path().join("man1");
    let written = run(&["man", "--dir", pages.to_str().unwrap()]).await;
    assert_eq!(written.code, 0, "{}", written.stderr);
    for command in [
        "agent",
        "register",
        "deregister",
        "check-config",
        "maintenance",
        "ls",
        "watch",
        "wait",
        "render",
        "dns",
    ] {
        let page = pages.join(format!("registrar-{command}.1"));
        assert!(
            written.stdout.contains(page.to_str().unwrap()),
            "{}",
            written.stdout
        );
        let shown = std::process::Command::new("man")
            .arg("-l")
            .arg(&page)
            .env("MANWIDTH", "100")
            .output()
            .expect("man (package man-db)");
        let text = String::from_utf8_lossy(&shown.stdout);
        for section in [
            "SYNOPSIS",
            "OPTIONS",
            "EXIT STATUS",
            "ENVIRONMENT",
            "EXAMPLES",
            "SEE ALSO",
        ] {
            assert!(
                text.contains(section),
                "registrar-{command}(1) has no {section}:\n{text}"
            );
        }
        assert!(text.contains("78"), "registrar-{command}(1):\n{text}");
    }
    let bad = run(&["completions", "tcsh"]).await;
    assert_eq!(bad.code, 2);
}

fn repo(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> serde_yaml::Value {
    serde_yaml::from_str(&repo(path)).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
}

/// The `ExecStart=` of a unit's text.
fn exec_start(unit: &str) -> String {
    unit.lines()
        .find_map(|l| l.trim().strip_prefix("ExecStart="))
        .unwrap_or_else(|| panic!("no ExecStart in {unit}"))
        .to_string()
}

fn unit_setting<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit.lines()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    let agent_unit = repo("systemd/registrar.service");
    let cc = yaml("coreos/cloud-config.yaml");
    let cc_unit = cc["coreos"]["units"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "registrar.service")
        .unwrap()["content"]
        .as_str()
        .unwrap()
        .to_string();
    for (name, text) in [
        ("registrar.service", agent_unit),
        (
            "registrar-register.service",
            repo("systemd/registrar-register.service"),
        ),
        (
            "registrar-render.service",
            repo("systemd/registrar-render.service"),
        ),
        (
            "registrar-dns.service",
            repo("systemd/registrar-dns.service"),
        ),
        (
            "cc-registrar.service",
            cc_unit
                .replace("Requires=registrar-install.service\n", "")
                .replace("After=registrar-install.service ", "After="),
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text.replace(BIN, env!("CARGO_BIN_EXE_registrar"))).unwrap();
        units.push(path);
    }
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .output()
        .expect("systemd-analyze (package systemd) is installed by scripts/test");
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn units_bundle_and_compose_agree() {
    let unit = repo("systemd/registrar.service");
    let start = exec_start(&unit);
    assert_eq!(
        start,
        format!("{BIN} agent --config {CONFIG} $REGISTRAR_OPTS")
    );
    assert_eq!(unit_setting(&unit, "Type"), Some("notify"));
    assert_eq!(unit_setting(&unit, "Restart"), Some("always"));
    assert_eq!(unit_setting(&unit, "RestartPreventExitStatus"), Some("78"));
    assert_eq!(
        unit_setting(&unit, "EnvironmentFile"),
        Some("-/etc/default/registrar")
    );
    assert_eq!(unit_setting(&unit, "StateDirectory"), Some("registrar"));
    assert_eq!(
        unit_setting(&unit, "ExecReload"),
        Some("/bin/kill -HUP $MAINPID")
    );
    assert!(unit_setting(&unit, "WatchdogSec").is_some());
    let oneshot = repo("systemd/registrar-register.service");
    assert_eq!(
        exec_start(&oneshot),
        format!("{BIN} register --config {CONFIG} $REGISTRAR_OPTS")
    );
    assert_eq!(unit_setting(&oneshot, "Type"), Some("oneshot"));

    // The cloud-config and the Butane config run the same command, write the
    // same config path, and install the binary at the same path.
    let cc = yaml("coreos/cloud-config.yaml");
    assert!(repo("coreos/cloud-config.yaml").starts_with("#cloud-config\n"));
    let cc_units = cc["coreos"]["units"].as_sequence().unwrap();
    let cc_agent = cc_units
        .iter()
        .find(|u| u["name"] == "registrar.service")
        .unwrap();
    assert_eq!(cc_agent["enable"], true);
    assert_eq!(cc_agent["command"], "start");
    let cc_text = cc_agent["content"].as_str().unwrap();
    assert_eq!(exec_start(cc_text), start);
    for key in [
        "Type",
        "Restart",
        "RestartPreventExitStatus",
        "WatchdogSec",
        "ExecReload",
        "EnvironmentFile",
    ] {
        assert_eq!(
            unit_setting(cc_text, key),
            unit_setting(&unit, key),
            "cloud-config {key}"
        );
    }
    let cc_files = cc["write_files"].as_sequence().unwrap();
    let cc_config = cc_files
        .iter()
        .find(|f| f["path"] == CONFIG)
        .expect("cloud-config writes the config");
    assert!(
        cc_config["content"]
            .as_str()
            .unwrap()
            .contains("ip: $private_ipv4")
    );
    let install = cc_units
        .iter()
        .find(|u| u["name"] == "registrar-install.service")
        .unwrap()["content"]
        .as_str()
        .unwrap();
    assert!(
        install.contains("REGISTRAR_URL=") && install.contains(&format!("{BIN}.part {BIN}")),
        "{install}"
    );

    let bu = yaml("coreos/registrar.bu");
    assert_eq!(bu["variant"], "fcos");
    let bu_units = bu["systemd"]["units"].as_sequence().unwrap();
    let bu_agent = bu_units
        .iter()
        .find(|u| u["name"] == "registrar.service")
        .unwrap();
    assert_eq!(bu_agent["enabled"], true);
    let bu_text = bu_agent["contents"].as_str().unwrap();
    assert_eq!(exec_start(bu_text), start);
    for key in [
        "Type",
        "Restart",
        "RestartPreventExitStatus",
        "WatchdogSec",
        "ExecReload",
    ] {
        assert_eq!(
            unit_setting(bu_text, key),
            unit_setting(&unit, key),
            "butane {key}"
        );
    }
    let bu_files = bu["storage"]["files"].as_sequence().unwrap();
    assert!(
        bu_files.iter().any(|f| f["path"] == CONFIG),
        "butane writes the config"
    );
    let bu_install = bu_units
        .iter()
        .find(|u| u["name"] == "registrar-install.service")
        .unwrap()["contents"]
        .as_str()
        .unwrap();
    let service_part = |u: &str| u.split("[Install]").next().unwrap_or(u).to_string();
    assert_eq!(
        service_part(bu_install),
        service_part(install),
        "both bundles install the binary the same way"
    );

    // The configs they ship are valid registrar configs.
    for (name, text) in [
        (
            "cloud-config",
            cc_config["content"]
                .as_str()
                .unwrap()
                .replace("$private_ipv4", "10.0.0.5"),
        ),
        (
            "butane",
            bu_files.iter().find(|f| f["path"] == CONFIG).unwrap()["contents"]["inline"]
                .as_str()
                .unwrap()
                .to_string(),
        ),
        ("systemd example", repo("systemd/registrar.yaml")),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(&f, text).unwrap();
        let mut flags = registrar::cli::Common::default();
        flags.connection.config = Some(f);
        match registrar::config::Config::load(&flags, &Default::default()) {
            Ok(_) => {}
            Err(e) => assert!(
                e.problems
                    .iter()
                    .all(|p| p.contains("is not a readable file")),
                "{name} config is invalid: {e}"
            ),
        }
    }

    // Compose: the image puts the binary at the same path; the etcd cluster
    // is coherent; agents talk to its members.
    let dockerfile = repo("Dockerfile");
    assert!(
        dockerfile.contains(&format!("/registrar {BIN}")),
        "Dockerfile installs elsewhere"
    );
    assert!(dockerfile.contains(&format!("ENTRYPOINT [\"{BIN}\"]")));
    let mut compose = yaml("docker-compose.yml");
    compose.apply_merge().expect("compose merge keys");
    let services = compose["services"].as_mapping().unwrap();
    let mut members = std::collections::BTreeMap::new();
    let mut initial = None;
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        let cmd: Vec<&str> = svc["command"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        if name.starts_with("etcd") {
            let flag = |f: &str| cmd.iter().position(|c| *c == f).map(|i| cmd[i + 1]);
            let member = flag("--name").unwrap();
            assert_eq!(member, name);
            members.insert(
                member.to_string(),
                flag("--initial-advertise-peer-urls").unwrap().to_string(),
            );
            assert_eq!(
                flag("--advertise-client-urls"),
                Some(format!("http://{name}:2379").as_str())
            );
            let ic = svc["environment"]["ETCD_INITIAL_CLUSTER"]
                .as_str()
                .unwrap()
                .to_string();
            assert!(
                initial.get_or_insert(ic.clone()) == &ic,
                "members disagree on initial-cluster"
            );
        }
    }
    let initial = initial.expect("etcd services");
    let expected: Vec<String> = members
        .iter()
        .map(|(n, peer)| format!("{n}={peer}"))
        .collect();
    assert_eq!(members.len(), 3, "a 3-member cluster");
    assert_eq!(
        initial,
        expected.join(","),
        "initial-cluster does not match the members"
    );
    let mut agents = 0;
    let mut roles = std::collections::BTreeSet::new();
    let mut flapping = false;
    let mut watcher = false;
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        if name.starts_with("etcd") {
            continue;
        }
        let eps = svc["environment"]["REGISTRAR_ENDPOINTS"].as_str().unwrap();
        for m in members.keys() {
            assert!(
                eps.contains(&format!("http://{m}:2379")),
                "{name} does not list {m}"
            );
        }
        let cmd: Vec<&str> = svc["command"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        match cmd[0] {
            "agent" => {
                agents += 1;
                assert_eq!(&cmd[1..3], ["--config", CONFIG]);
                let volume = svc["volumes"][0].as_str().unwrap();
                let local = volume.split(':').next().unwrap();
                let config = repo(local.trim_start_matches("./"));
                flapping |= config.contains("flappy");
                let parsed: serde_yaml::Value = serde_yaml::from_str(&config).unwrap();
                for r in parsed["roles"].as_sequence().unwrap() {
                    roles.insert(r.as_str().unwrap().to_string());
                }
            }
            "watch" => watcher = true,
            other => panic!("unexpected command {other} in {name}"),
        }
    }
    assert_eq!(agents, 3);
    assert!(
        roles.len() >= 2 && flapping && watcher,
        "{roles:?} flapping={flapping} watcher={watcher}"
    );
}

/// Runs `scripts/install-deps --dry-run GROUPS` against a fake root holding
/// only `present`; returns (exit code, stdout).
fn install_deps_dry_run(present: &[&str], groups: &[&str]) -> (i32, String) {
    let root = tempfile::tempdir().unwrap();
    for file in present {
        let path = root.path().join(file.trim_start_matches('/'));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "").unwrap();
    }
    let out = std::process::Command::new(format!(
        "{}/scripts/install-deps",
        env!("CARGO_MANIFEST_DIR")
    ))
    .arg("--dry-run")
    .args(groups)
    .env("REGISTRAR_DEPS_ROOT", root.path())
    .output()
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn install_deps_decides_by_files_not_commands() {
    // protoc present but not the well-known .proto includes etcd-client's
    // build imports: the machine that once built nothing.
    let (code, out) = install_deps_dry_run(
        &["/usr/bin/protoc", "/usr/bin/etcd", "/usr/bin/etcdctl"],
        &["build", "etcd"],
    );
    assert_eq!((code, out.trim()), (0, "would install: libprotobuf-dev"));

    // Everything there: nothing to do, nothing printed.
    let all = [
        "/usr/bin/protoc",
        "/usr/include/google/protobuf/descriptor.proto",
        "/usr/include/google/protobuf/timestamp.proto",
        "/usr/bin/etcd",
        "/usr/bin/etcdctl",
    ];
    assert_eq!(
        install_deps_dry_run(&all, &["build", "etcd"]),
        (0, String::new())
    );

    // A bare machine: each package once, in the table's order.
    let (code, out) = install_deps_dry_run(&[], &["build", "etcd", "test"]);
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        "would install: protobuf-compiler libprotobuf-dev etcd-server etcd-client haproxy jq systemd \
         bind9-dnsutils iproute2 util-linux python3 man-db prometheus"
    );
    // What compose-test needs: runc named beside podman, so apt never
    // picks crun for podman's "crun | runc".
    let (code, out) = install_deps_dry_run(&[], &["compose"]);
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        "would install: podman runc conmon netavark aardvark-dns iptables mmdebstrap"
    );

    // A misspelt group is an error that names the known ones.
    let (code, _) = install_deps_dry_run(&[], &["biuld"]);
    assert_eq!(code, 2);
}

/// A metrics port already in use is a runtime condition: exit 1, which
/// systemd restarts, not 78, which the unit's RestartPreventExitStatus
/// would leave stopped for good.
#[tokio::test]
async fn a_busy_metrics_port_exits_1_not_78() {
    let cluster = Cluster::start(1).await;
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let mut args = vec!["agent".to_string()];
    args.extend(host_args(
        &cluster.endpoint_list(),
        "dc1",
        "web",
        "h1",
        "m1",
        "6s",
    ));
    args.extend(["--metrics-listen".into(), addr.clone()]);
    let r = run(&args).await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains(&addr), "{}", r.stderr);
    let mut c = cluster.client().await;
    let (kvs, _) = read_prefix(&mut c, DIR).await;
    assert!(kvs.is_empty(), "registered although it could not start");
}
