//! TLS and etcd authentication: the connection settings of the core agent.

use std::time::Duration;

use etcd_client::{Permission, PermissionType};
use nix::sys::signal::Signal;

use crate::agent::wait_keepalives;
use crate::support::proc::{cmd, host_args, run};
use crate::support::{Agent, Cluster, Options, eventually};
use crate::{read_prefix, registered};

const DIR: &str = "/infrastructure/dc1/web/h1/";

fn tls_args(cluster: &Cluster) -> Vec<String> {
    cluster.pki.as_ref().expect("a TLS cluster").client_args()
}

#[tokio::test]
async fn mutual_tls_registers_and_bad_tls_exits_77() {
    let cluster = Cluster::start_with(
        1,
        Options {
            tls: true,
            ..Options::default()
        },
    )
    .await;
    let eps = cluster.endpoint_list();
    assert!(eps.starts_with("https://"));
    let mut ok = cmd("register", host_args(&eps, "dc1", "web", "h1", "m1", "30s"));
    ok.extend(tls_args(&cluster));
    let r = run(&ok).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut c = cluster.client().await;
    registered(&mut c, DIR).await.unwrap();

    // The same settings through etcdctl's variables.
    let pki = cluster.pki.as_ref().unwrap();
    let via_env = crate::support::proc::run_with(
        crate::support::proc::registrar()
            .args(cmd(
                "register",
                host_args(&eps, "dc1", "web", "h2", "m2", "30s"),
            ))
            .env("ETCDCTL_CACERT", &pki.ca)
            .env("ETCDCTL_CERT", &pki.client_cert)
            .env("ETCDCTL_KEY", &pki.client_key),
    )
    .await;
    assert_eq!(via_env.code, 0, "{}", via_env.stderr);

    // Wrong CA: etcd's certificate cannot be verified.
    let mut wrong_ca = cmd("register", host_args(&eps, "dc1", "web", "h3", "m3", "30s"));
    wrong_ca.extend([
        "--cacert".into(),
        pki.other_ca.to_string_lossy().into_owned(),
        "--cert".into(),
        pki.client_cert.to_string_lossy().into_owned(),
        "--key".into(),
        pki.client_key.to_string_lossy().into_owned(),
        "--timeout".into(),
        "2s".into(),
    ]);
    let r = run(&wrong_ca).await;
    assert_eq!(r.code, 77, "wrong CA: {}", r.stderr);
    assert!(
        r.stderr.to_lowercase().contains("certificate"),
        "{}",
        r.stderr
    );

    // No client certificate: etcd refuses the handshake.
    let mut no_cert = cmd("register", host_args(&eps, "dc1", "web", "h4", "m4", "30s"));
    no_cert.extend([
        "--cacert".into(),
        pki.ca.to_string_lossy().into_owned(),
        "--timeout".into(),
        "2s".into(),
    ]);
    let r = run(&no_cert).await;
    assert_eq!(r.code, 77, "missing client cert: {}", r.stderr);

    let (kvs, _) = read_prefix(&mut c, "/infrastructure/dc1/web/").await;
    let hosts: std::collections::BTreeSet<String> = kvs
        .iter()
        .map(|kv| {
            String::from_utf8_lossy(kv.key())
                .split('/')
                .nth(4)
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(
        hosts,
        ["h1", "h2"].map(String::from).into(),
        "failed registrations wrote keys"
    );
}

/// A user that may only touch its own host's keys (plus leases, which etcd
/// grants to every authenticated user).
async fn least_privilege_user(cluster: &Cluster, user: &str, password: &str, dir: &str) {
    let mut c = cluster.client().await;
    c.role_add(user).await.unwrap();
    c.role_grant_permission(
        user,
        Permission::new(PermissionType::Readwrite, dir).with_prefix(),
    )
    .await
    .unwrap();
    c.user_add(user, password, None).await.unwrap();
    c.user_grant_role(user, user).await.unwrap();
}

#[tokio::test]
async fn auth_with_least_privilege_and_expiring_tokens() {
    // Tokens expire after 1 s of disuse: every call after an idle keep-alive
    // period needs the automatic refresh.
    let mut cluster = Cluster::start_with(
        1,
        Options {
            extra_args: vec![
                "--auth-token".into(),
                "simple".into(),
                "--auth-token-ttl".into(),
                "1".into(),
            ],
            ..Options::default()
        },
    )
    .await;
    least_privilege_user(&cluster, "h1", "pw-h1-secret", DIR).await;
    cluster.enable_auth("root-secret").await;
    let eps = cluster.endpoint_list();

    let wrong = run(&[
        cmd("register", host_args(&eps, "dc1", "web", "h1", "m1", "6s")),
        vec!["--user".into(), "h1:nope".into()],
    ]
    .concat())
    .await;
    assert_eq!(wrong.code, 77, "wrong password: {}", wrong.stderr);
    assert!(
        !wrong.stderr.contains("nope"),
        "the password appeared in the error"
    );

    // No credentials where etcd requires them: etcd 3.4 and 3.5 answer
    // InvalidArgument "user name is empty", which is an auth problem (77)
    // with a hint, not a runtime failure.
    let anonymous = run(&cmd(
        "register",
        host_args(&eps, "dc1", "web", "h1", "m1", "6s"),
    ))
    .await;
    assert_eq!(anonymous.code, 77, "no --user: {}", anonymous.stderr);
    assert!(anonymous.stderr.contains("--user"), "{}", anonymous.stderr);

    // Writing another host's prefix is denied by etcd, and reported as such.
    let other = run(&[
        cmd("register", host_args(&eps, "dc1", "web", "h2", "m1", "6s")),
        vec!["--user".into(), "h1:pw-h1-secret".into()],
    ]
    .concat())
    .await;
    assert_eq!(other.code, 77, "foreign prefix: {}", other.stderr);
    assert!(
        other.stderr.contains("permission denied"),
        "{}",
        other.stderr
    );

    let dir = tempfile::tempdir().unwrap();
    let pwfile = dir.path().join("password");
    std::fs::write(&pwfile, "pw-h1-secret\n").unwrap();
    let mut args = cmd("agent", host_args(&eps, "dc1", "web", "h1", "m1", "6s"));
    args.extend([
        "--user".into(),
        "h1".into(),
        "--password-file".into(),
        pwfile.to_string_lossy().into_owned(),
    ]);
    let mut agent = Agent::spawn("agent", &args);
    let c = cluster.client().await;
    let lease = eventually(Duration::from_secs(10), "registration with auth", || {
        let mut c = c.clone();
        async move { registered(&mut c, DIR).await }
    })
    .await;
    // Idle for longer than the token TTL, then force a re-registration.
    wait_keepalives(&c, lease, 2, Duration::from_secs(12)).await;
    let mut c2 = c.clone();
    c2.lease_revoke(lease).await.unwrap();
    eventually(
        Duration::from_secs(5),
        "re-registration after the token expired",
        || {
            let mut c = c.clone();
            async move {
                match registered(&mut c, DIR).await {
                    Ok(l) if l != lease => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;
    wait_keepalives(
        &c,
        registered(&mut c.clone(), DIR).await.unwrap(),
        2,
        Duration::from_secs(12),
    )
    .await;
    // Revoke on shutdown also needs a fresh token.
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(10)).await, 0);
    let (kvs, _) = read_prefix(&mut c.clone(), DIR).await;
    assert!(kvs.is_empty(), "keys left after SIGTERM");
    assert!(
        !agent.log().contains("pw-h1-secret"),
        "the password appeared in the log"
    );
}

#[tokio::test]
async fn readable_secrets_are_warned_about_and_never_printed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("password");
    std::fs::write(&pw, "pw-in-file-secret\n").unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = dir.path().join("registrar.yaml");
    std::fs::write(
        &cfg,
        "dc: dc1\nroles: [web]\nuser: admin:pw-in-config-secret\n",
    )
    .unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let dead = format!("http://127.0.0.1:{}", crate::support::free_port());

    // Password file readable by others: warned about; the password appears nowhere.
    let mut args = cmd(
        "register",
        host_args(&dead, "dc1", "web", "h1", "m1", "10s"),
    );
    args.extend(
        [
            "--user",
            "admin",
            "--password-file",
            pw.to_str().unwrap(),
            "--timeout",
            "1s",
        ]
        .map(String::from),
    );
    let r = run(&args).await;
    assert_eq!(r.code, 69, "{}", r.stderr);
    assert!(
        r.stderr.contains("password file") && r.stderr.contains("readable by other users"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("pw-in-file-secret") && !r.stdout.contains("pw-in-file-secret"));

    // A config file holding a password, readable by others.
    let r = run(&[
        "check-config",
        "--config",
        cfg.to_str().unwrap(),
        "--host",
        "h1",
        "--ip",
        "10.0.0.1",
        "--machine-id",
        "m1",
    ])
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("config file with a password") && r.stderr.contains("chmod 600"),
        "{}",
        r.stderr
    );
    for out in [&r.stdout, &r.stderr] {
        assert!(
            !out.contains("pw-in-config-secret"),
            "password printed: {out}"
        );
    }
    // Errors do not carry it either.
    let r = run(&[
        "register",
        "--config",
        cfg.to_str().unwrap(),
        "--endpoints",
        &dead,
        "--host",
        "h1",
        "--ip",
        "10.0.0.1",
        "--machine-id",
        "m1",
        "--timeout",
        "1s",
        "--log-format",
        "json",
    ])
    .await;
    assert_eq!(r.code, 69);
    assert!(!r.stderr.contains("pw-in-config-secret"), "{}", r.stderr);

    // Private files: no warning.
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = run(&args).await;
    assert!(
        !r.stderr.contains("readable by other users"),
        "{}",
        r.stderr
    );
}

/// A TLS failure is per endpoint: with one endpoint given as https:// to a
/// plain-http etcd and the other right, every register succeeds through the
/// other. Given alone, it exits 77 saying the endpoint does not speak TLS,
/// without the transport's debug chain.
#[tokio::test]
async fn a_tls_failure_on_one_endpoint_fails_over_and_alone_says_what_to_do() {
    let cluster = Cluster::start(1).await;
    let port = cluster.members[0].client_port;
    let mixed = format!("https://127.0.0.1:{port},http://127.0.0.1:{port}");
    for i in 0..8 {
        let r = run(&cmd(
            "register",
            host_args(
                &mixed,
                "dc1",
                "web",
                &format!("h{i}"),
                &format!("m{i}"),
                "30s",
            ),
        ))
        .await;
        assert_eq!(r.code, 0, "run {i}: {}", r.stderr);
    }
    let mut args = cmd(
        "register",
        host_args(
            &format!("https://127.0.0.1:{port}"),
            "dc1",
            "web",
            "x",
            "mx",
            "30s",
        ),
    );
    args.extend(["--timeout".into(), "2s".into()]);
    let r = run(&args).await;
    assert_eq!(r.code, 77, "{}", r.stderr);
    let last = r.stderr.lines().last().unwrap_or_default();
    assert!(last.contains("does not seem to speak TLS"), "{last}");
    assert!(
        !last.contains("tonic::"),
        "a debug chain in the error: {last}"
    );
}
