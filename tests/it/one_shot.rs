//! One-shot commands: register, deregister, check-config, and bad input.

use std::time::Duration;

use tokio::time::Instant;

use crate::support::proc::{cmd, host_args, run};
use crate::support::{Cluster, eventually, free_port};
use crate::{keys, read_prefix, registered, value};

#[tokio::test]
async fn register_writes_every_key_at_one_revision_with_the_lease() {
    let cluster = Cluster::start(1).await;
    let mut args = cmd(
        "register",
        host_args(&cluster.endpoint_list(), "dc1", "web", "h1", "m1", "4s"),
    );
    args.extend(
        [
            "--role",
            "db",
            "--service",
            "http=8080",
            "--meta",
            "rack=r1",
        ]
        .map(String::from),
    );
    let r = run(&args).await;
    assert_eq!(r.code, 0, "register failed: {}", r.stderr);

    let mut c = cluster.client().await;
    let (kvs, _) = read_prefix(&mut c, "/infrastructure/").await;
    let expected: std::collections::BTreeSet<String> = ["web", "db"]
        .iter()
        .flat_map(|role| {
            ["ip", "health", "owner", "services/http", "meta/rack"]
                .map(|leaf| format!("/infrastructure/dc1/{role}/h1/{leaf}"))
        })
        .collect();
    assert_eq!(keys(&kvs), expected);
    let revs: std::collections::BTreeSet<i64> = kvs.iter().map(|kv| kv.mod_revision()).collect();
    assert_eq!(revs.len(), 1, "keys written at several revisions: {revs:?}");
    let leases: std::collections::BTreeSet<i64> = kvs.iter().map(|kv| kv.lease()).collect();
    assert_eq!(leases.len(), 1);
    let lease = *leases.iter().next().unwrap();
    assert_ne!(lease, 0, "keys are not attached to a lease");
    assert_eq!(
        value(&mut c, "/infrastructure/dc1/web/h1/ip")
            .await
            .unwrap()
            .0,
        "127.0.0.1"
    );
    assert_eq!(
        value(&mut c, "/infrastructure/dc1/web/h1/health")
            .await
            .unwrap()
            .0,
        "passing"
    );
    assert_eq!(
        value(&mut c, "/infrastructure/dc1/web/h1/owner")
            .await
            .unwrap()
            .0,
        "m1"
    );
    assert_eq!(
        value(&mut c, "/infrastructure/dc1/db/h1/services/http")
            .await
            .unwrap()
            .0,
        "8080"
    );
    assert_eq!(
        value(&mut c, "/infrastructure/dc1/db/h1/meta/rack")
            .await
            .unwrap()
            .0,
        "r1"
    );
    let ttl = c.lease_time_to_live(lease, None).await.unwrap();
    assert_eq!(ttl.granted_ttl(), 4, "granted TTL differs from --ttl");

    // Nothing keeps a one-shot lease alive: the keys expire with the TTL.
    let gone_by = Instant::now();
    eventually(Duration::from_secs(7), "one-shot keys to expire", || {
        let mut c = c.clone();
        async move {
            let (kvs, _) = read_prefix(&mut c, "/infrastructure/").await;
            if kvs.is_empty() {
                Ok(())
            } else {
                Err(format!("{} keys left", kvs.len()))
            }
        }
    })
    .await;
    assert!(
        gone_by.elapsed() > Duration::from_secs(2),
        "keys vanished long before the TTL"
    );
}

#[tokio::test]
async fn second_machine_with_the_same_host_name_gets_exit_3_and_overwrites_nothing() {
    let cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    let first = run(&cmd(
        "register",
        host_args(&eps, "dc1", "web", "h1", "machine-a", "10s"),
    ))
    .await;
    assert_eq!(first.code, 0, "{}", first.stderr);
    let mut c = cluster.client().await;
    let (before, _) = read_prefix(&mut c, "/infrastructure/").await;

    let second = run(&cmd(
        "register",
        host_args(&eps, "dc1", "web", "h1", "machine-b", "10s"),
    ))
    .await;
    assert_eq!(second.code, 3, "expected a conflict: {}", second.stderr);
    assert!(
        second.stderr.contains("machine-a") && second.stderr.contains("\"h1\""),
        "{}",
        second.stderr
    );

    let (after, _) = read_prefix(&mut c, "/infrastructure/").await;
    let summary = |kvs: &[etcd_client::KeyValue]| -> Vec<(Vec<u8>, Vec<u8>, i64, i64)> {
        kvs.iter()
            .map(|kv| {
                (
                    kv.key().to_vec(),
                    kv.value().to_vec(),
                    kv.lease(),
                    kv.mod_revision(),
                )
            })
            .collect()
    };
    assert_eq!(
        summary(&before),
        summary(&after),
        "the conflicting register changed the registry"
    );

    // The same machine id may re-register at once (takeover of its own lease).
    let again = run(&cmd(
        "register",
        host_args(&eps, "dc1", "web", "h1", "machine-a", "10s"),
    ))
    .await;
    assert_eq!(again.code, 0, "{}", again.stderr);
    let old_lease = before[0].lease();
    let new_lease = registered(&mut c, "/infrastructure/dc1/web/h1/")
        .await
        .unwrap();
    assert_ne!(old_lease, new_lease);
    let old = c.lease_time_to_live(old_lease, None).await.unwrap();
    assert!(old.ttl() <= 0, "the old lease was not revoked");
}

#[tokio::test]
async fn deregister_revokes_only_this_machines_registration() {
    let cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    let mut c = cluster.client().await;

    let nothing = run(&cmd(
        "deregister",
        host_args(&eps, "dc1", "web", "h1", "m1", "10s"),
    ))
    .await;
    assert_eq!(
        nothing.code, 0,
        "deregister of nothing must succeed: {}",
        nothing.stderr
    );

    assert_eq!(
        run(&cmd(
            "register",
            host_args(&eps, "dc1", "web", "h1", "m1", "30s")
        ))
        .await
        .code,
        0
    );
    registered(&mut c, "/infrastructure/dc1/web/h1/")
        .await
        .unwrap();

    let other = run(&cmd(
        "deregister",
        host_args(&eps, "dc1", "web", "h1", "m2", "10s"),
    ))
    .await;
    assert_eq!(other.code, 3, "{}", other.stderr);
    registered(&mut c, "/infrastructure/dc1/web/h1/")
        .await
        .unwrap();

    let mine = run(&cmd(
        "deregister",
        host_args(&eps, "dc1", "web", "h1", "m1", "10s"),
    ))
    .await;
    assert_eq!(mine.code, 0, "{}", mine.stderr);
    let (kvs, _) = read_prefix(&mut c, "/infrastructure/").await;
    assert!(
        kvs.is_empty(),
        "keys left after deregister: {:?}",
        keys(&kvs)
    );
}

#[tokio::test]
async fn unreachable_etcd_exits_69_naming_the_endpoint() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut args = cmd(
        "register",
        host_args(&dead, "dc1", "web", "h1", "m1", "10s"),
    );
    args.extend(["--timeout", "1s", "--log-format", "json"].map(String::from));
    let started = Instant::now();
    let r = run(&args).await;
    assert_eq!(r.code, 69, "{}", r.stderr);
    assert!(
        r.stderr.contains(&dead),
        "error does not name the endpoint: {}",
        r.stderr
    );
    // Every line is JSON; quiet while it retries (DEBUG at most), then the
    // error once.
    let mut levels = Vec::new();
    for line in r.stderr.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("every log line is JSON");
        assert!(v.get("fields").is_some(), "{line}");
        levels.push(v["level"].as_str().unwrap_or("").to_string());
    }
    assert!(
        levels
            .iter()
            .all(|l| l == "DEBUG" || l == "TRACE" || l == "ERROR")
            && levels.iter().filter(|l| *l == "ERROR").count() == 1,
        "{levels:?}\n{}",
        r.stderr
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "--timeout 1s took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn register_works_every_time_with_a_dead_and_a_hung_endpoint_listed_first() {
    let cluster = Cluster::start(1).await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    // A black hole: accepts TCP connections and never answers.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung = format!("http://{}", hole.local_addr().unwrap());
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in hole.incoming().take(64) {
            held.push(conn);
        }
    });
    let eps = format!("{dead},{hung},{}", cluster.endpoint_list());
    let mut c = cluster.client().await;
    for i in 0..6 {
        let host = format!("h{i}");
        let mut args = cmd(
            "register",
            host_args(&eps, "dc1", "web", &host, &format!("m{i}"), "30s"),
        );
        args.extend(["--request-timeout", "1s", "--connect-timeout", "500ms"].map(String::from));
        let r = run(&args).await;
        assert_eq!(r.code, 0, "attempt {i} failed: {}", r.stderr);
        registered(&mut c, &format!("/infrastructure/dc1/web/{host}/"))
            .await
            .unwrap();
    }
    drop(holder);
}

#[tokio::test]
async fn bad_config_and_flags_exit_78_or_2_naming_the_field_and_write_nothing() {
    let cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    };
    let unknown = file("unknown.yaml", "dc: dc1\nroles: [web]\nbogus: 1\n");
    let no_unit = file("nounit.yaml", "dc: dc1\nroles: [web]\nttl: 30\n");
    let bad_type = file("type.yaml", "dc: dc1\nroles: web\n");
    let bad_port = file(
        "port.yaml",
        "dc: dc1\nroles: [web]\nservices:\n  http: 70000\n",
    );
    let not_utf8 = dir.path().join("latin1.yaml");
    std::fs::write(&not_utf8, b"dc: caf\xe9\n").unwrap();
    let not_utf8 = not_utf8.to_string_lossy().into_owned();
    let dir_path = dir.path().to_string_lossy().into_owned();

    let no_ip = |extra: &[&str]| -> Vec<String> {
        let mut a = vec![
            "register".to_string(),
            "--endpoints".into(),
            eps.clone(),
            "--host".into(),
            "h1".into(),
        ];
        a.extend(["--machine-id", "m1", "--allow-loopback"].map(String::from));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let base = |extra: &[&str]| -> Vec<String> { no_ip(&[&["--ip", "127.0.0.1"], extra].concat()) };
    let mut cases: Vec<(Vec<String>, i32, &str)> = vec![
        (
            base(&["--dc", "a/b", "--role", "web"]),
            78,
            "--dc (or REGISTRAR_DC): \"a/b\" contains '/'",
        ),
        (
            base(&["--dc", "dc1", "--role", ".."]),
            78,
            "role \"..\" may not be",
        ),
        (
            base(&["--dc", "", "--role", "web"]),
            78,
            "--dc (or REGISTRAR_DC): \"\" is empty",
        ),
        (
            base(&["--dc", &"x".repeat(300), "--role", "web"]),
            78,
            "300 characters long",
        ),
        (base(&["--role", "web"]), 78, "dc is not set"),
        (base(&["--dc", "dc1"]), 78, "no role is set"),
        (
            base(&["--dc", "dc1", "--role", "web", "--ttl", "abc"]),
            2,
            "--ttl",
        ),
        (
            base(&["--dc", "dc1", "--role", "web", "--ttl", "1500ms"]),
            78,
            "ttl",
        ),
        (
            base(&["--dc", "dc1", "--role", "web", "--nope"]),
            2,
            "--nope",
        ),
        (
            base(&["--dc", "dc1", "--role", "web", "--service", "http"]),
            78,
            "is not NAME=PORT",
        ),
        (
            base(&["--dc", "dc1", "--role", "web", "--endpoints", "etcd:2379"]),
            78,
            "is not an etcd URL",
        ),
        (
            no_ip(&["--dc", "dc1", "--role", "web", "--cidr", "10.0.0.0/99"]),
            78,
            "--cidr (or REGISTRAR_CIDR): \"10.0.0.0/99\" is not a network",
        ),
        (
            no_ip(&["--dc", "dc1", "--role", "web", "--interface", "nope0"]),
            78,
            "interface \"nope0\" does not exist",
        ),
        (
            base(&["--dc", "dc1", "--role", "web", "--cidr", "10.0.0.0/8"]),
            78,
            "set only one of ip, interface and cidr",
        ),
        (
            no_ip(&["--dc", "dc1", "--role", "web", "--ip", "300.1.1.1"]),
            78,
            "\"300.1.1.1\" is not an IP address",
        ),
        (
            base(&["--dc", "dc1", "--role", "web", "--user", "root"]),
            78,
            "has no password",
        ),
        (
            base(&["--config", &unknown]),
            78,
            "unknown.yaml:3:1: unknown field `bogus`",
        ),
        (
            base(&["--config", &no_unit]),
            78,
            "nounit.yaml:3:1: ttl: 30 has no unit",
        ),
        (
            base(&["--config", &bad_type]),
            78,
            "type.yaml:2:8: roles: invalid type",
        ),
        (
            base(&["--config", &bad_port]),
            78,
            "port.yaml:4:3: services.http: port 70000",
        ),
        (base(&["--config", &not_utf8]), 78, "is not UTF-8"),
        (base(&["--config", &dir_path]), 78, "is a directory"),
        (
            base(&["--config", "/nonexistent/registrar.yaml"]),
            78,
            "cannot read config file",
        ),
        (
            vec![
                "register".into(),
                "--endpoints".into(),
                eps.clone(),
                "--dc".into(),
                "dc1".into(),
                "--role".into(),
                "web".into(),
                "--host".into(),
                "h1".into(),
                "--ip".into(),
                "127.0.0.1".into(),
                "--machine-id".into(),
                "m1".into(),
            ],
            78,
            "127.0.0.1 is a loopback",
        ),
    ];
    // Config files, each with one problem.
    let yaml_cases: Vec<(&str, &str)> = vec![
        (
            "checks:\n  - {name: a, exec: ['true']}\n  - {name: a, exec: ['true']}\n",
            "the name \"a\" is used by two checks",
        ),
        (
            "checks:\n  - {name: a}\n",
            "needs one of exec, shell, http or tcp",
        ),
        ("checks:\n  - {exec: ['true']}\n", "has no name"),
        (
            "checks:\n  - {name: a/b, exec: ['true']}\n",
            "name \"a/b\" contains '/'",
        ),
        (
            "checks:\n  - {name: a, exec: ['true'], interval: fast}\n",
            "interval: \"fast\" is not a duration",
        ),
        (
            "checks:\n  - {name: a, exec: ['true'], timeout: 0s}\n",
            "timeout: must be greater than zero",
        ),
        (
            "checks:\n  - {name: a, http: 'not a url'}\n",
            "is not an http:// or https:// URL",
        ),
        (
            "checks:\n  - {name: a, tcp: localhost}\n",
            "tcp \"localhost\" is not host:port",
        ),
        ("checks:\n  - {name: a, exec: []}\n", "exec needs a program"),
        ("checks:\n  - {name: a, shell: ''}\n", "shell is empty"),
        (
            "checks:\n  - {name: a, exec: ['true'], failures_before_critical: 0}\n",
            "failures_before_critical must be at least 1",
        ),
        (
            "checks:\n  - {name: a, exec: ['true'], failures_before_critical: -1}\n",
            "checks[0].failures_before_critical: invalid type: integer `-1`",
        ),
        (
            "checks:\n  - {name: a, exec: ['true'], deregister_after: soon}\n",
            "deregister_after: \"soon\" is not a duration",
        ),
        (
            "checks:\n  - {name: a, exec: ['true'], retries: 3}\n",
            "unknown field `retries`",
        ),
        ("checks: {a: b}\n", "checks: invalid type"),
        ("services: [http]\n", "services: invalid type"),
        (
            "services:\n  'ht tp': 80\n",
            "service name \"ht tp\" contains ' '",
        ),
        ("meta:\n  'a/b': x\n", "meta key \"a/b\" contains '/'"),
        ("ttl: -5s\n", "ttl: \"-5s\" is not a duration"),
        ("ttl: 48h\n", "is longer than 24h"),
        (
            "output_refresh: 0s\n",
            "output_refresh: must be greater than zero",
        ),
        (
            "prefix: infrastructure\n",
            "prefix: \"infrastructure\" must start with '/'",
        ),
        (
            "prefix: /infrastructure/\n",
            "prefix: \"/infrastructure/\" segment \"\" is empty",
        ),
        (
            "metrics_listen: nowhere\n",
            "metrics_listen: \"nowhere\" is not an address:port",
        ),
        (
            "cacert: /nonexistent/ca.pem\n",
            "cacert: /nonexistent/ca.pem is not a readable file",
        ),
        ("log_format: xml\n", "log_format: unknown variant `xml`"),
        ("dc: [a]\n", "dc: invalid type"),
        ("allow_loopback: maybe\n", "allow_loopback: invalid type"),
        ("\tdc: a\n", "found character that cannot start any token"),
        ("- a\n- b\n", "invalid type: sequence"),
        (
            "user: root\npassword_file: /nonexistent/pw\n",
            "password_file: cannot read /nonexistent/pw",
        ),
        // Check timing that cannot be meant.
        (
            "checks:\n  - {name: a, exec: ['true'], interval: 1ms}\n",
            "would run the check more than 10 times a second",
        ),
        (
            "checks:\n  - {name: a, exec: ['true'], failures_before_warning: 3, failures_before_critical: 2}\n",
            "failures_before_warning 3 is more than failures_before_critical 2",
        ),
        (
            "checks:\n  - {name: a, exec: ['true'], success_before_passing: 1000000}\n",
            "success_before_passing 1000000 is more than 1000 runs in a row",
        ),
        // Meta that would be published wrong.
        ("meta:\n  rack: ~\n", "\"rack\" has no value"),
        ("meta:\n  rack: null\n", "\"rack\" has no value"),
        (
            "meta:\n  rack: \"r1\\nINFO forged\"\n",
            "the value of \"rack\" contains the control character '\\n'",
        ),
        ("meta:\n  rack: [a, b]\n", "must be a single value"),
    ];
    for (i, (yaml, needle)) in yaml_cases.into_iter().enumerate() {
        let text = if yaml.contains("dc:") || yaml.starts_with('-') || yaml.starts_with('\t') {
            yaml.to_string()
        } else {
            format!("dc: dc1\nroles: [web]\n{yaml}")
        };
        let path = file(&format!("case{i}.yaml"), &text);
        cases.push((base(&["--config", &path]), 78, needle));
    }
    // More flags.
    let web = |extra: &[&str]| base(&[&["--dc", "dc1", "--role", "web"], extra].concat());
    cases.extend([
        (
            web(&["--cacert", &unknown]),
            78,
            "TLS files are set, but endpoint http://",
        ),
        (
            no_ip(&["--dc", "dc1", "--role", "web", "--ip", "224.0.0.1"]),
            78,
            "224.0.0.1 is a multicast address",
        ),
        (
            no_ip(&["--dc", "dc1", "--role", "web", "--ip", "255.255.255.255"]),
            78,
            "255.255.255.255 is the broadcast address",
        ),
        (
            no_ip(&["--dc", "dc1", "--role", "web", "--ip", "fe80::1"]),
            78,
            "fe80::1 is a link-local address",
        ),
        (
            no_ip(&["--dc", "dc1", "--role", "web", "--ip", "10.0.0.1", "--ipv6"]),
            78,
            "10.0.0.1 is an IPv4 address but ipv6 is set",
        ),
        (
            web(&["--service", "http=80", "--service", "http=81"]),
            78,
            "service \"http\" is given twice",
        ),
        (
            web(&["--meta", "rack=r1\nINFO forged"]),
            78,
            "the value of \"rack\" contains the control character",
        ),
        (
            vec![
                "maintenance".into(),
                "on".into(),
                "--reason".into(),
                "x".into(),
                "--for".into(),
                "8000y".into(),
            ],
            2,
            "is more than a year",
        ),
        (
            vec![
                "maintenance".into(),
                "on".into(),
                "--reason".into(),
                "kernel\nupgrade".into(),
            ],
            2,
            "contains the control character",
        ),
    ]);
    cases.extend([
        (
            base(&["--dc", "dc1", "--role", "web", "--request-timeout", "0s"]),
            78,
            "--request-timeout (or REGISTRAR_REQUEST_TIMEOUT): must be greater than zero",
        ),
        (
            base(&["--dc", "dc1", "--role", "web", "--connect-timeout", "abc"]),
            2,
            "--connect-timeout",
        ),
        (
            base(&["--dc", "dc1", "--role", "web", "--log-format", "xml"]),
            2,
            "--log-format",
        ),
        (
            base(&[
                "--dc",
                "dc1",
                "--role",
                "web",
                "--cert",
                "/nonexistent/c.pem",
            ]),
            78,
            "a client certificate needs both cert and key",
        ),
        (
            base(&["--dc", "dc1", "--role", "web", "--meta", "novalue"]),
            78,
            "is not KEY=VALUE",
        ),
        (
            base(&["--dc", "dc1", "--role", "web", "--service", "http=0"]),
            78,
            "port 0 of service \"http\"",
        ),
        (
            base(&["--dc", "dc1", "--role", "web", "--metrics-listen", "9477"]),
            78,
            "--metrics-listen",
        ),
        (
            [
                "register",
                "--endpoints",
                eps.as_str(),
                "--dc",
                "dc1",
                "--role",
                "web",
                "--host",
                "h1",
                "--ip",
                "10.1.1.1",
                "--machine-id",
                "has space",
            ]
            .map(String::from)
            .to_vec(),
            78,
            "--machine-id (or REGISTRAR_MACHINE_ID): \"has space\" is not a machine id",
        ),
        (
            base(&["--dc", "dc1", "--role", "web", "--timeout", "soon"]),
            2,
            "--timeout",
        ),
        (
            base(&[
                "--dc",
                "dc1",
                "--role",
                "web",
                "--endpoints",
                "http://10.0.0.1:2379/v3",
            ]),
            78,
            "\"http://10.0.0.1:2379/v3\" is not an etcd URL",
        ),
        (
            base(&[
                "--dc",
                "dc1",
                "--role",
                "web",
                "--endpoints",
                "http://10.0.0.1:99999",
            ]),
            78,
            "\"http://10.0.0.1:99999\" is not an etcd URL",
        ),
    ]);
    assert!(cases.len() >= 40, "only {} bad-input cases", cases.len());
    let mut c = cluster.client().await;
    for (args, code, needle) in cases {
        let r = run(&args).await;
        assert_eq!(
            r.code, code,
            "{args:?}: expected exit {code}, got {}: {}",
            r.code, r.stderr
        );
        assert!(
            r.stderr.contains(needle),
            "{args:?}: stderr does not contain {needle:?}:\n{}",
            r.stderr
        );
        assert!(
            !r.stderr.contains("panicked"),
            "{args:?} panicked: {}",
            r.stderr
        );
        let (kvs, _) = read_prefix(&mut c, "/").await;
        assert!(kvs.is_empty(), "{args:?} wrote {:?}", keys(&kvs));
    }
}

#[tokio::test]
async fn check_config_prints_the_effective_config_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("registrar.yaml");
    std::fs::write(
        &cfg,
        "dc: dc1\nroles: [web]\nttl: 20s\nservices:\n  http: 80\n",
    )
    .unwrap();
    let r = run(&[
        "check-config",
        "--config",
        cfg.to_str().unwrap(),
        "--user",
        "root:hunter2-secret",
        "--host",
        "web-1",
        "--ip",
        "10.0.0.7",
        "--machine-id",
        "abc",
        "--ttl",
        "45s",
    ])
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        !r.stdout.contains("hunter2-secret") && !r.stderr.contains("hunter2-secret"),
        "password leaked"
    );
    for needle in [
        "dc: dc1",
        "- web",
        "ttl: 45s",
        "http: 80",
        "root (password hidden)",
        "resolved_ip: 10.0.0.7",
        "resolved_host: web-1",
    ] {
        assert!(
            r.stdout.contains(needle),
            "missing {needle:?} in:\n{}",
            r.stdout
        );
    }
    let bad = run(&[
        "check-config",
        "--dc",
        "a b",
        "--role",
        "x/y",
        "--ttl",
        "0s",
    ])
    .await;
    assert_eq!(bad.code, 78);
    assert!(
        bad.stderr.contains("3 problems"),
        "all problems at once: {}",
        bad.stderr
    );
}

#[tokio::test]
async fn flags_beat_environment_beat_the_config_file() {
    use crate::support::proc::{registrar, run_with};
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("registrar.yaml");
    std::fs::write(
        &cfg,
        "endpoints: [http://file:2379]\ndc: file-dc\nroles: [file-role]\nhost: file-host\nip: 10.0.0.1\nttl: 11s\nmachine_id: file-id\n",
    )
    .unwrap();
    let out = run_with(
        registrar()
            .args([
                "check-config",
                "--config",
                cfg.to_str().unwrap(),
                "--host",
                "flag-host",
            ])
            .env("REGISTRAR_DC", "env-dc")
            .env("REGISTRAR_HOST", "env-host")
            .env("REGISTRAR_TTL", "22s")
            .env("ETCDCTL_ENDPOINTS", "http://etcdctl:2379")
            .env("ETCDCTL_USER", "u:secret-from-env"),
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    for needle in [
        "- http://etcdctl:2379", // ETCDCTL_* beats the file
        "dc: env-dc",            // REGISTRAR_* beats the file
        "host: flag-host",       // a flag beats REGISTRAR_*
        "ttl: 22s",
        "- file-role", // the file beats the default
        "machine_id: file-id",
        "user: u (password hidden)",
    ] {
        assert!(
            out.stdout.contains(needle),
            "missing {needle:?} in:\n{}",
            out.stdout
        );
    }
    assert!(!out.stdout.contains("secret-from-env"));

    let env_wins = run_with(
        registrar()
            .args(["check-config", "--config", cfg.to_str().unwrap()])
            .env("REGISTRAR_ENDPOINTS", "http://registrar:2379")
            .env("ETCDCTL_ENDPOINTS", "http://etcdctl:2379"),
    )
    .await;
    assert!(
        env_wins.stdout.contains("- http://registrar:2379"),
        "{}",
        env_wins.stdout
    );
}

#[tokio::test]
async fn a_bad_log_filter_is_named_with_the_fix_and_logging_goes_on_at_info() {
    use crate::support::proc::{registrar, run_with};
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("registrar.yaml");
    std::fs::write(&cfg, "endpoints: [http://e:2379]\ndc: d\nroles: [r]\n").unwrap();
    let out = run_with(
        registrar()
            .args(["check-config", "--config", cfg.to_str().unwrap()])
            .env("REGISTRAR_LOG", "registrar=loud"),
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("REGISTRAR_LOG=\"registrar=loud\" is not a log filter")
            && out.stderr.contains("REGISTRAR_LOG=info,registrar=debug"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn a_ttl_below_etcds_minimum_is_raised_and_the_granted_ttl_used() {
    // With a 1 s election timeout etcd's minimum lease TTL is 2 s.
    let cluster = Cluster::start_with(
        1,
        crate::support::Options {
            extra_args: ["--heartbeat-interval", "100", "--election-timeout", "1000"]
                .map(String::from)
                .to_vec(),
            ..Default::default()
        },
    )
    .await;
    let r = run(&cmd(
        "register",
        host_args(&cluster.endpoint_list(), "dc1", "web", "h1", "m1", "1s"),
    ))
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("etcd granted a different TTL"),
        "no warning: {}",
        r.stderr
    );
    let mut c = cluster.client().await;
    let lease = registered(&mut c, "/infrastructure/dc1/web/h1/")
        .await
        .unwrap();
    assert_eq!(
        c.lease_time_to_live(lease, None)
            .await
            .unwrap()
            .granted_ttl(),
        2
    );
    assert!(
        r.stderr.contains("ttl=2s"),
        "the granted TTL is not the one reported: {}",
        r.stderr
    );
}

/// An exported ETCDCTL_CACERT with a plain http:// endpoint is a
/// configuration error that check-config reports, naming where each came
/// from (it used to pass check-config and exit 1 at run time).
#[tokio::test]
async fn tls_files_with_a_plain_http_endpoint_are_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not checked here").unwrap();
    let r = crate::support::proc::run_with(
        crate::support::proc::registrar()
            .args([
                "check-config",
                "--endpoints",
                "http://127.0.0.1:2379",
                "--dc",
                "dc1",
                "--role",
                "web",
            ])
            .env("ETCDCTL_CACERT", &ca),
    )
    .await;
    assert_eq!(r.code, 78, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("ETCDCTL_CACERT: TLS files are set, but endpoint http://127.0.0.1:2379 (from --endpoints (or REGISTRAR_ENDPOINTS)) is plain http"),
        "{}",
        r.stderr
    );
}

/// REGISTRAR_IPV6, REGISTRAR_ALLOW_LOOPBACK and REGISTRAR_KEEP_ALIVE take
/// 1/0, true/false, yes/no; a bad value names the variable.
#[tokio::test]
async fn environment_booleans_take_the_usual_spellings() {
    let cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    let register = |value: &str| {
        let mut c = crate::support::proc::registrar();
        c.args([
            "register",
            "--endpoints",
            &eps,
            "--dc",
            "dc1",
            "--role",
            "web",
            "--host",
            "h1",
            "--machine-id",
            "m1",
            "--ip",
            "127.0.0.1",
        ])
        .env("REGISTRAR_ALLOW_LOOPBACK", value);
        c
    };
    for yes in ["1", "yes", "TRUE", "on"] {
        let r = crate::support::proc::run_with(&mut register(yes)).await;
        assert_eq!(r.code, 0, "REGISTRAR_ALLOW_LOOPBACK={yes}: {}", r.stderr);
    }
    for no in ["0", "no", "false"] {
        let r = crate::support::proc::run_with(&mut register(no)).await;
        assert_eq!(r.code, 78, "REGISTRAR_ALLOW_LOOPBACK={no}: {}", r.stderr);
    }
    let r = crate::support::proc::run_with(&mut register("maybe")).await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("REGISTRAR_ALLOW_LOOPBACK=\"maybe\" is not a yes/no value"),
        "{}",
        r.stderr
    );
}
