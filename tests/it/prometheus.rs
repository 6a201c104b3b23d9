//! Prometheus: what the agent, `render` and `dns` export passes `promtool
//! check metrics`, and the shipped alert rules
//! (examples/prometheus/registrar-alerts.yml) pass `promtool check rules`
//! and, in `promtool test rules`, fire on series scraped from real
//! processes: their names, labels and values as exported, only laid out in
//! time (Prometheus's own `up` aside, which no exporter exports). And real
//! Prometheus finds the fleet through a `file_sd` file that `render` writes
//! from the registry (examples/prometheus/file_sd.json.j2).

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use crate::support::proc::{cmd, host_args, run};
use crate::support::{Agent, Cluster, eventually, free_port};

const RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/prometheus/registrar-alerts.yml"
);

/// One sample of `text`: the labels inside `{}` (or "") and the value.
fn sample(text: &str, name: &str, labels: &str) -> Option<(String, String)> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, inner) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        (n == name && inner.contains(labels)).then(|| (inner.to_string(), value.to_string()))
    })
}

/// The series `name` of `text` with `job` and `instance` added, as
/// promtool's input wants it, and its scraped value.
fn series(text: &str, name: &str, labels: &str, job: &str, instance: &str) -> (String, f64) {
    let (inner, value) = sample(text, name, labels)
        .unwrap_or_else(|| panic!("{name}{{{labels}}} is not exported:\n{text}"));
    let mut all = vec![format!("job=\"{job}\""), format!("instance=\"{instance}\"")];
    if !inner.is_empty() {
        all.push(inner);
    }
    let value = value
        .parse()
        .unwrap_or_else(|_| panic!("{name}: value {value:?}"));
    (format!("{name}{{{}}}", all.join(",")), value)
}

/// `promtool check metrics` on an exposition.
fn promtool_check_metrics(what: &str, text: &str) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (package prometheus) is installed by scripts/test");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics on {what}:\n{said}\n{text}"
    );
}

/// The annotations a rule's alert carries for `labels`: its templates with
/// `{{ $labels.X }}` filled in.
fn annotations(alert: &str, labels: &BTreeMap<&str, &str>) -> BTreeMap<String, String> {
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(RULES).unwrap()).unwrap();
    let rule = rules["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap())
        .find(|r| r["alert"] == alert)
        .unwrap_or_else(|| panic!("no rule {alert}"));
    rule["annotations"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let mut text = v.as_str().unwrap().to_string();
            for (name, value) in labels {
                text = text.replace(&format!("{{{{ $labels.{name} }}}}"), value);
            }
            assert!(!text.contains("{{"), "{alert}: unexpanded template {text}");
            (k.as_str().unwrap().to_string(), text)
        })
        .collect()
}

/// One `alert_rule_test` entry: at `at`, `alert` fires exactly for `firing`
/// (label sets without alertname).
fn expect(at: &str, alert: &str, firing: &[BTreeMap<&str, &str>]) -> serde_yaml::Value {
    let alerts: Vec<serde_yaml::Value> = firing
        .iter()
        .map(|labels| {
            serde_yaml::to_value(BTreeMap::from([
                ("exp_labels", serde_yaml::to_value(labels).unwrap()),
                (
                    "exp_annotations",
                    serde_yaml::to_value(annotations(alert, labels)).unwrap(),
                ),
            ]))
            .unwrap()
        })
        .collect();
    serde_yaml::to_value(BTreeMap::from([
        ("eval_time", serde_yaml::Value::from(at)),
        ("alertname", serde_yaml::Value::from(alert)),
        ("exp_alerts", serde_yaml::Value::from(alerts)),
    ]))
    .unwrap()
}

async fn scrape_until(port: u16, what: &str, ready: impl Fn(&str) -> bool) -> String {
    eventually(Duration::from_secs(20), what, || {
        let url = format!("http://127.0.0.1:{port}/metrics");
        let ready = &ready;
        async move {
            // What curl and promtool get: no Accept header, classic text.
            let text = match reqwest::get(&url).await {
                Ok(r) => r.text().await.map_err(|e| e.to_string())?,
                Err(e) => return Err(e.to_string()),
            };
            if ready(&text) { Ok(text) } else { Err(text) }
        }
    })
    .await
}

#[tokio::test]
async fn exported_metrics_pass_promtool_and_the_alert_rules_fire_on_them() {
    let cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    let dir = tempfile::tempdir().unwrap();

    // Agent "a": one passing and one critical check, in maintenance for an hour.
    let state_a = dir.path().join("state-a");
    let r = run(&[
        "maintenance",
        "on",
        "--reason",
        "kernel upgrade",
        "--for",
        "1h",
        "--state-dir",
        state_a.to_str().unwrap(),
    ])
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let config_a = dir.path().join("a.yaml");
    std::fs::write(
        &config_a,
        "checks:\n  - {name: ok, exec: [true], interval: 1s}\n  - {name: broken, exec: [sh, -c, \"exit 2\"], interval: 1s}\n",
    )
    .unwrap();
    let port_a = free_port();
    let mut args = cmd(
        "agent",
        host_args(&eps, "dc1", "web", "a", "machine-a", "3s"),
    );
    args.extend(
        [
            "--config",
            config_a.to_str().unwrap(),
            "--state-dir",
            state_a.to_str().unwrap(),
            "--metrics-listen",
            &format!("127.0.0.1:{port_a}"),
        ]
        .map(String::from),
    );
    let _a = Agent::spawn("agent a", &args);
    let a = scrape_until(
        port_a,
        "agent a registered, critical and in maintenance",
        |t| {
            t.contains("registrar_lease_info{")
                && t.contains("registrar_check_status{check=\"broken\"} 2")
                && sample(t, "registrar_maintenance", "").is_some_and(|(_, v)| v == "1")
        },
    )
    .await;
    let until = sample(&a, "registrar_maintenance_until_timestamp_seconds", "")
        .and_then(|(_, v)| v.parse::<f64>().ok())
        .expect("a planned end");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (3500.0..3700.0).contains(&(until - now)),
        "until {until} is not an hour from {now}"
    );

    // Agent "b": the same host name from another machine.
    let port_b = free_port();
    let mut args = cmd(
        "agent",
        host_args(&eps, "dc1", "web", "a", "machine-b", "3s"),
    );
    args.extend(
        [
            "--state-dir",
            dir.path().join("state-b").to_str().unwrap(),
            "--metrics-listen",
            &format!("127.0.0.1:{port_b}"),
        ]
        .map(String::from),
    );
    let _b = Agent::spawn("agent b", &args);
    let b = scrape_until(port_b, "agent b in conflict", |t| {
        // Not `contains("registrar_conflict 1")`: the HELP line says
        // "registrar_conflict 1 while ...", which matched before b knew.
        sample(t, "registrar_conflict", "").is_some_and(|(_, v)| v == "1")
    })
    .await;
    assert!(
        b.contains("registrar_keepalive_age_seconds NaN"),
        "b never registered, so its keep-alive age is NaN:\n{b}"
    );

    // render, whose reload fails.
    let template = dir.path().join("t.j2");
    std::fs::write(
        &template,
        "{% for h in hosts() %}{{ h.host }}\n{% endfor %}",
    )
    .unwrap();
    let port_r = free_port();
    let render_cfg = dir.path().join("render.yaml");
    std::fs::write(
        &render_cfg,
        format!(
            "endpoints: [{eps}]\nmetrics_listen: 127.0.0.1:{port_r}\ntemplates:\n  - source: {}\n    destination: {}\n    reload: [\"false\"]\n",
            template.display(),
            dir.path().join("out").display()
        ),
    )
    .unwrap();
    let _render = Agent::spawn(
        "render",
        &["render", "--config", render_cfg.to_str().unwrap()],
    );
    let rendered = scrape_until(port_r, "a failed reload", |t| {
        sample(t, "registrar_render_reload_failures_total", "").is_some_and(|(_, v)| v != "0")
    })
    .await;

    // dns.
    let port_d = free_port();
    let _dns = Agent::spawn(
        "dns",
        &[
            "dns",
            "--endpoints",
            &eps,
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--metrics-listen",
            &format!("127.0.0.1:{port_d}"),
        ],
    );
    let dns = scrape_until(port_d, "dns serving", |t| {
        t.contains("registrar_dns_answer_revision")
    })
    .await;

    for (what, text) in [
        ("agent a", &a),
        ("agent b", &b),
        ("render", &rendered),
        ("dns", &dns),
    ] {
        promtool_check_metrics(what, text);
    }
    let check = std::process::Command::new("promtool")
        .args(["check", "rules", RULES])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    // The scraped series, laid out over an hour and ten minutes.
    let mut input: Vec<(String, String)> = vec![(
        "up{job=\"registrar\",instance=\"a\"}".into(),
        "1 1 0x10".into(),
    )];
    let (s, ttl) = series(&a, "registrar_lease_ttl_seconds", "", "registrar", "a");
    input.push((s, format!("{ttl}x70")));
    let (s, age) = series(&a, "registrar_keepalive_age_seconds", "", "registrar", "a");
    // Keep-alives stop: the age grows by a minute each minute.
    input.push((s, format!("{age}+60x70")));
    for (text, instance) in [(&a, "a"), (&b, "b")] {
        let (s, v) = series(text, "registrar_conflict", "", "registrar", instance);
        input.push((s, format!("{v}x70")));
    }
    for check in ["ok", "broken"] {
        let labels = format!("check=\"{check}\"");
        let (s, v) = series(&a, "registrar_check_status", &labels, "registrar", "a");
        input.push((s, format!("{v}x70")));
    }
    let (s, on) = series(&a, "registrar_maintenance", "", "registrar", "a");
    input.push((s, format!("{on}x70")));
    // The planned end on the test's clock, which starts at 0: an hour on.
    let (s, end) = series(
        &a,
        "registrar_maintenance_until_timestamp_seconds",
        "",
        "registrar",
        "a",
    );
    input.push((s, format!("{}x70", (end - now).round())));
    let render_job = "registrar-render";
    let (s, v) = series(
        &rendered,
        "registrar_render_reload_failures_total",
        "",
        render_job,
        "r",
    );
    input.push((s, format!("{v}+1x70")));
    for name in [
        "registrar_render_template_errors_total",
        "registrar_render_check_failures_total",
    ] {
        let (s, v) = series(&rendered, name, "", render_job, "r");
        input.push((s, format!("{v}x70")));
    }

    // dns holds hosts without a break: held for 60 s more each minute.
    let dns_job = "registrar-dns";
    let (s, settle) = series(&dns, "registrar_dns_settle_seconds", "", dns_job, "d");
    input.push((s, format!("{settle}x70")));
    let (s, held) = series(&dns, "registrar_dns_holding_seconds", "", dns_job, "d");
    input.push((s, format!("{held}+60x70")));

    let a_labels = |severity| {
        BTreeMap::from([
            ("job", "registrar"),
            ("instance", "a"),
            ("severity", severity),
        ])
    };
    let tests = vec![
        expect("5m", "RegistrarDown", &[a_labels("critical")]),
        expect("1m", "RegistrarDown", &[]),
        expect("3m", "RegistrarLeaseNotRenewed", &[a_labels("critical")]),
        expect(
            "5m",
            "RegistrarHostNameConflict",
            &[BTreeMap::from([
                ("job", "registrar"),
                ("instance", "b"),
                ("severity", "warning"),
            ])],
        ),
        expect(
            "6m",
            "RegistrarCheckCritical",
            &[BTreeMap::from([
                ("job", "registrar"),
                ("instance", "a"),
                ("check", "broken"),
                ("severity", "warning"),
            ])],
        ),
        expect("61m", "RegistrarMaintenanceOverdue", &[]),
        expect("67m", "RegistrarMaintenanceOverdue", &[a_labels("warning")]),
        expect(
            "5m",
            "RegistrarReloadFailing",
            &[BTreeMap::from([
                ("job", render_job),
                ("instance", "r"),
                ("severity", "warning"),
            ])],
        ),
        expect("5m", "RegistrarRenderFailing", &[]),
        expect("1m", "RegistrarConsumerHolding", &[]),
        expect(
            "4m",
            "RegistrarConsumerHolding",
            &[BTreeMap::from([
                ("job", dns_job),
                ("instance", "d"),
                ("severity", "warning"),
            ])],
        ),
    ];
    let input: Vec<serde_yaml::Value> = input
        .into_iter()
        .map(|(s, values)| {
            serde_yaml::to_value(BTreeMap::from([("series", s), ("values", values)])).unwrap()
        })
        .collect();
    let file = serde_yaml::to_value(BTreeMap::from([
        ("rule_files", serde_yaml::to_value([RULES]).unwrap()),
        ("evaluation_interval", serde_yaml::Value::from("1m")),
        (
            "tests",
            serde_yaml::to_value([BTreeMap::from([
                ("interval", serde_yaml::Value::from("1m")),
                ("input_series", serde_yaml::Value::from(input)),
                ("alert_rule_test", serde_yaml::Value::from(tests)),
            ])])
            .unwrap(),
        ),
    ]))
    .unwrap();
    let test_file = dir.path().join("registrar-alerts.test.yml");
    std::fs::write(&test_file, serde_yaml::to_string(&file).unwrap()).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["test", "rules"])
        .arg(&test_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool test rules:\n{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        serde_yaml::to_string(&file).unwrap()
    );
}

/// Prometheus, started on `config`, killed on drop.
struct Prometheus {
    child: std::process::Child,
    port: u16,
}

impl Prometheus {
    fn start(dir: &std::path::Path, config: &str) -> Prometheus {
        let port = free_port();
        let cfg = dir.join("prometheus.yml");
        std::fs::write(&cfg, config).unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (./scripts/test installs it)");
        Prometheus { child, port }
    }

    /// The active targets: (health, labels).
    async fn targets(&self) -> Result<Vec<(String, BTreeMap<String, String>)>, String> {
        let text = crate::support::etcd::try_http_get(&format!(
            "http://127.0.0.1:{}/api/v1/targets?state=active",
            self.port
        ))
        .await?;
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let v: serde_json::Value =
            serde_json::from_str(body).map_err(|e| format!("{e}: {text}"))?;
        let targets = v["data"]["activeTargets"]
            .as_array()
            .ok_or_else(|| text.clone())?;
        Ok(targets
            .iter()
            .map(|t| {
                let labels = t["labels"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                (t["health"].as_str().unwrap_or("").to_string(), labels)
            })
            .collect())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// examples/prometheus/file_sd.json.j2 rendered by `registrar render`
/// feeds real Prometheus: every agent that publishes `metrics` is scraped
/// `up` with dc, role, host and its valid meta keys as labels; a host
/// without the service is skipped; a stopped agent leaves the targets.
#[tokio::test]
async fn prometheus_discovers_the_fleet_through_file_sd_rendered_from_the_registry() {
    let cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    let dir = tempfile::tempdir().unwrap();
    let agent = |host: &str, role: &str, metrics: Option<u16>, meta: &[&str]| {
        let mut a = cmd(
            "agent",
            host_args(&eps, "dc1", role, host, &format!("m-{host}"), "5s"),
        );
        if let Some(port) = metrics {
            a.extend([
                "--metrics-listen".into(),
                format!("127.0.0.1:{port}"),
                "--service".into(),
                format!("metrics={port}"),
            ]);
        }
        for m in meta {
            a.extend(["--meta".into(), m.to_string()]);
        }
        Agent::spawn(host, &a)
    };
    let _a1 = agent(
        "web-1",
        "web",
        Some(free_port()),
        &["rack=r1", "x-y=skipped", "dc=clash"],
    );
    let mut a2 = agent("web-2", "web", Some(free_port()), &[]);
    let _a3 = agent("db-1", "db", Some(free_port()), &["rack=r2"]);
    let _quiet = agent("batch-1", "batch", None, &[]);
    let out = dir.path().join("registrar.json");
    let cfg = dir.path().join("render.yaml");
    std::fs::write(
        &cfg,
        format!(
            "endpoints: [{eps}]\ntemplates:\n  - source: {}/examples/prometheus/file_sd.json.j2\n    destination: {}\n",
            env!("CARGO_MANIFEST_DIR"),
            out.display()
        ),
    )
    .unwrap();
    let render = Agent::spawn(
        "render",
        &[
            "render".to_string(),
            "--config".into(),
            cfg.display().to_string(),
        ],
    );
    eventually(Duration::from_secs(20), "three targets in the file", || {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        async move {
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
            match v.as_array() {
                Some(groups) if groups.len() == 3 => Ok(()),
                _ => Err(text),
            }
        }
    })
    .await;
    let prom = Prometheus::start(
        dir.path(),
        &format!(
            "global: {{scrape_interval: 1s, scrape_timeout: 1s}}\nscrape_configs:\n  - job_name: registrar\n    file_sd_configs: [{{files: ['{}'], refresh_interval: 1s}}]\n",
            out.display()
        ),
    );
    let up = eventually(
        Duration::from_secs(30),
        "every agent scraped up",
        || async {
            let t = prom.targets().await?;
            if t.len() == 3 && t.iter().all(|(h, _)| h == "up") {
                Ok(t)
            } else {
                Err(format!("{t:?}"))
            }
        },
    )
    .await;
    let by_host: BTreeMap<String, BTreeMap<String, String>> = up
        .into_iter()
        .map(|(_, l)| (l.get("host").cloned().unwrap_or_default(), l))
        .collect();
    assert_eq!(
        by_host.keys().collect::<Vec<_>>(),
        ["db-1", "web-1", "web-2"],
        "{by_host:?}"
    );
    let w1 = &by_host["web-1"];
    assert_eq!(w1["dc"], "dc1", "{w1:?}");
    assert_eq!(w1["role"], "web", "{w1:?}");
    assert_eq!(w1["rack"], "r1", "{w1:?}");
    assert!(!w1.contains_key("x-y") && !w1.contains_key("x_y"), "{w1:?}");
    assert_eq!(by_host["db-1"]["rack"], "r2");
    assert_eq!(by_host["db-1"]["role"], "db");

    // A stopped agent leaves the targets.
    a2.signal(nix::sys::signal::Signal::SIGTERM);
    let _ = a2.wait_exit(Duration::from_secs(10)).await;
    eventually(
        Duration::from_secs(30),
        "web-2 gone from the targets",
        || async {
            let t = prom.targets().await?;
            let hosts: Vec<String> = t
                .iter()
                .filter_map(|(_, l)| l.get("host").cloned())
                .collect();
            if hosts.len() == 2 && !hosts.iter().any(|h| h == "web-2") {
                Ok(())
            } else {
                Err(format!("{hosts:?}"))
            }
        },
    )
    .await;
    drop(render);
}
