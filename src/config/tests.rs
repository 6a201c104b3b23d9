use super::*;
use std::io::Write;

fn load_yaml(yaml: &str, flags: Common) -> Result<Config, ConfigError> {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(yaml.as_bytes()).unwrap();
    let mut flags = flags;
    flags.connection.config = Some(f.path().to_path_buf());
    Config::load(&flags, &Env::new())
}

#[test]
fn full_file_loads() {
    let c = load_yaml(
        "endpoints: [http://10.0.0.1:2379, http://10.0.0.2:2379]\ndc: dc1\nroles: [web, etcd]\n\
         host: web-1\nip: 10.1.2.3\nttl: 20s\nservices:\n  http: 8080\nmeta:\n  rack: r1\n",
        Common::default(),
    )
    .unwrap();
    assert_eq!(c.etcd.endpoints.len(), 2);
    assert_eq!(c.roles, ["web", "etcd"]);
    assert_eq!(c.ttl, Duration::from_secs(20));
    assert_eq!(c.services["http"], 8080);
    assert_eq!(
        c.address,
        AddressChoice::Explicit("10.1.2.3".parse().unwrap())
    );
}

#[test]
fn flags_beat_etcdctl_env_beats_file() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(b"endpoints: [http://file:2379]\ndc: filedc\n")
        .unwrap();
    let mut env = Env::new();
    env.insert("ETCDCTL_ENDPOINTS".into(), "http://env:2379".into());
    let mut flags = Common::default();
    flags.connection.config = Some(f.path().to_path_buf());
    let c = Config::load(&flags, &env).unwrap();
    assert_eq!(c.etcd.endpoints, ["http://env:2379"]);
    assert_eq!(c.dc.as_deref(), Some("filedc"));
    let mut flags = Common {
        dc: Some("flagdc".into()),
        ..flags
    };
    flags.connection.endpoints = vec!["http://flag:2379".into()];
    let c = Config::load(&flags, &env).unwrap();
    assert_eq!(c.etcd.endpoints, ["http://flag:2379"]);
    assert_eq!(c.dc.as_deref(), Some("flagdc"));
}

#[test]
fn all_problems_are_reported_with_positions() {
    let err = load_yaml(
        "dc: a/b\nroles: [web, web]\nttl: 30\nservices:\n  http: 0\nhost: ..\n",
        Common::default(),
    )
    .unwrap_err();
    let text = err.to_string();
    assert_eq!(err.problems.len(), 5, "{text}");
    assert!(text.contains(":1:1: dc: \"a/b\" contains '/'"), "{text}");
    assert!(
        text.contains(":2:1: roles: role \"web\" is listed twice"),
        "{text}"
    );
    assert!(text.contains(":3:1: ttl: 30 has no unit"), "{text}");
    assert!(text.contains(":5:3: services.http: port 0"), "{text}");
    assert!(text.contains(":6:1: host: \"..\""), "{text}");
}

#[test]
fn checks_are_validated_with_positions() {
    let c = load_yaml(
        "dc: a\nroles: [r]\nchecks:\n  - name: web\n    http: http://127.0.0.1:8080/health\n    interval: 2s\n\
         \x20 - name: disk\n    exec: [/usr/lib/check_disk, -w, \"10%\"]\n    failures_before_critical: 3\n    deregister_after: 5m\n",
        Common::default(),
    )
    .unwrap();
    assert_eq!(c.checks.len(), 2);
    assert_eq!(c.checks[0].interval, Duration::from_secs(2));
    assert_eq!(c.checks[1].thresholds.failures_before_critical, 3);
    assert_eq!(c.checks[1].deregister_after, Some(Duration::from_secs(300)));

    let err = load_yaml(
        "dc: a\nroles: [r]\nchecks:\n- name: web\n  http: ftp://x\n- name: web\n  tcp: nope\n  interval: 3\n- name: both\n  exec: [a]\n  shell: b\n- name: none\n  failures_before_warning: 0\n",
        Common::default(),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(":4:1: checks[web]: http \"ftp://x\" is not an http"),
        "{text}"
    );
    assert!(
        text.contains(":6:1: checks[web]: the name \"web\" is used by two checks"),
        "{text}"
    );
    assert!(text.contains("tcp \"nope\" is not host:port"), "{text}");
    assert!(
        text.contains(":8:3: checks[web].interval: interval: 3 has no unit"),
        "{text}"
    );
    assert!(
        text.contains(":9:1: checks[both]: has more than one of"),
        "{text}"
    );
    assert!(
        text.contains("needs one of exec, shell, http or tcp"),
        "{text}"
    );
    assert!(
        text.contains("failures_before_warning must be at least 1"),
        "{text}"
    );
}

#[test]
fn readme_examples_are_valid_configs() {
    let readme = include_str!("../../README.md");
    let blocks: Vec<&str> = readme
        .split("```yaml\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .collect();
    assert!(blocks.len() >= 2, "README lost its config examples");
    for yaml in blocks {
        match load_yaml(yaml, Common::default()) {
            Ok(_) => {}
            Err(e) => {
                // The examples point at certificates, and run programs
                // (haproxy, systemctl), that only exist on a real host.
                let other: Vec<&String> = e
                    .problems
                    .iter()
                    .filter(|p| !p.contains("is not a readable file") && !p.contains("no program"))
                    .collect();
                assert!(
                    other.is_empty(),
                    "README example is invalid: {other:?}\n{yaml}"
                );
            }
        }
    }
}

#[test]
fn unknown_fields_are_reported_with_every_other_problem() {
    let err = load_yaml(
        "dc: a\nbogus: 1\nttl: soon\nchecks:\n  - name: c\n    exec: ['true']\n    retries: 3\n    interval: never\nmeta:\n  'a/b': x\n",
        Common::default(),
    )
    .unwrap_err();
    let text = err.to_string();
    for want in [
        ":2:1: unknown field `bogus`",
        ":7:5: unknown field `retries`",
        "\"soon\" is not a duration",
        "\"never\" is not a duration",
        "meta key \"a/b\"",
    ] {
        assert!(text.contains(want), "no {want:?} in {text}");
    }
}

#[test]
fn unknown_field_has_position() {
    let err = load_yaml("dc: a\nbogus: 1\n", Common::default()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains(":2:1: unknown field `bogus`"), "{text}");
}

#[test]
fn loopback_needs_opt_in() {
    let flags = Common {
        ip: Some("127.0.0.1".into()),
        ..Common::default()
    };
    let err = Config::load(&flags, &Env::new()).unwrap_err();
    assert!(
        err.to_string()
            .contains("--ip (or REGISTRAR_IP): 127.0.0.1 is a loopback")
    );
    let flags = Common {
        allow_loopback: true,
        ..flags
    };
    assert!(Config::load(&flags, &Env::new()).is_ok());
}

#[test]
fn txn_limit_is_checked_at_load() {
    let meta: String = (0..130).map(|i| format!("  k{i}: v\n")).collect();
    let err = load_yaml(
        &format!("dc: a\nroles: [r]\nmeta:\n{meta}"),
        Common::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("128 operations per transaction"),
        "{err}"
    );
    let big = "x".repeat(1024 * 1024);
    let err = load_yaml(
        &format!("dc: a\nroles: [r, s]\nmeta:\n  big: {big}\n"),
        Common::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("bytes but etcd accepts"), "{err}");
}

#[test]
fn password_never_in_debug_or_display() {
    let mut flags = Common {
        dc: Some("a".into()),
        ..Common::default()
    };
    flags.connection.user = Some("root:s3cr3t-pw".into());
    let c = Config::load(&flags, &Env::new()).unwrap();
    assert!(!format!("{c:?}").contains("s3cr3t-pw"));
    assert!(!c.to_display_yaml().contains("s3cr3t-pw"));
    assert!(c.to_display_yaml().contains("root (password hidden)"));
}

mod props {
    use super::*;
    use proptest::prelude::*;

    const FIELDS: &[&str] = &[
        "endpoints",
        "prefix",
        "dc",
        "roles",
        "host",
        "ip",
        "interface",
        "cidr",
        "ipv6",
        "allow_loopback",
        "ttl",
        "machine_id",
        "cacert",
        "cert",
        "key",
        "user",
        "password_file",
        "state_dir",
        "log_format",
        "services",
        "meta",
        "request_timeout",
        "connect_timeout",
        "checks",
        "output_refresh",
        "metrics_listen",
        "name",
        "exec",
        "shell",
        "http",
        "tcp",
        "interval",
        "timeout",
        "deregister_after",
        "failures_before_critical",
        "bogus",
    ];

    /// YAML values built from the config's own field names and
    /// assorted scalars, so parsing gets past the first line.
    fn value() -> impl Strategy<Value = serde_yaml::Value> {
        let leaf = prop_oneof![
            Just(serde_yaml::Value::Null),
            any::<bool>().prop_map(serde_yaml::Value::Bool),
            any::<i64>().prop_map(|n| serde_yaml::Value::Number(n.into())),
            any::<f64>().prop_map(|n| serde_yaml::Value::Number(n.into())),
            ".{0,40}".prop_map(serde_yaml::Value::String),
            "[0-9]{1,4}(ms|s|m|h)?".prop_map(serde_yaml::Value::String),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4)
                    .prop_map(serde_yaml::Value::Sequence),
                proptest::collection::vec((proptest::sample::select(FIELDS), inner), 0..6)
                    .prop_map(|kv| {
                        serde_yaml::Value::Mapping(
                            kv.into_iter()
                                .map(|(k, v)| (serde_yaml::Value::String(k.to_string()), v))
                                .collect(),
                        )
                    }),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_text_never_panics(text in ".{0,300}") {
            let _ = load_yaml(&text, Common::default());
        }

        #[test]
        fn arbitrary_yaml_never_panics(v in value()) {
            let text = serde_yaml::to_string(&v).unwrap_or_default();
            match load_yaml(&text, Common::default()) {
                Ok(c) => { let _ = c.to_display_yaml(); }
                Err(e) => prop_assert!(!e.problems.is_empty()),
            }
        }
    }
}
