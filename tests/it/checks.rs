//! Health checks, maintenance and reload against real etcd.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::Client;
use nix::sys::signal::Signal;

use crate::support::proc::{cmd, run};
use crate::support::{Agent, Cluster, Watcher, eventually};
use crate::{read_prefix, registered, value};

const DIR: &str = "/infrastructure/dc1/web/h1/";

/// A fake host with a config file and a state dir of its own.
struct Host {
    dir: tempfile::TempDir,
    endpoints: String,
}

impl Host {
    fn new(cluster: &Cluster) -> Host {
        Host {
            dir: tempfile::tempdir().unwrap(),
            endpoints: cluster.endpoint_list(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn p(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }

    fn write_config(&self, yaml: &str) {
        std::fs::write(self.path("registrar.yaml"), yaml).unwrap();
    }

    fn args(&self, command: &str) -> Vec<String> {
        cmd(
            command,
            [
                "--config",
                &self.p("registrar.yaml"),
                "--endpoints",
                &self.endpoints,
                "--host",
                "h1",
                "--machine-id",
                "m1",
                "--ip",
                "127.0.0.1",
                "--allow-loopback",
                "--state-dir",
                &self.p("state"),
            ]
            .map(String::from)
            .to_vec(),
        )
    }

    fn agent(&self) -> Agent {
        Agent::spawn("agent", &self.args("agent"))
    }

    /// Number of runs recorded by a script that appends to `file`.
    fn runs(&self, file: &str) -> Vec<String> {
        std::fs::read_to_string(self.path(file))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    async fn wait_runs(&self, file: &str, at_least: usize) {
        eventually(
            Duration::from_secs(15),
            &format!("{at_least} runs of the {file} check"),
            || {
                let n = self.runs(file).len();
                async move {
                    if n >= at_least {
                        Ok(())
                    } else {
                        Err(format!("{n} runs"))
                    }
                }
            },
        )
        .await;
    }
}

/// The parsed JSON of `checks/<name>`.
async fn check(c: &Client, name: &str) -> Option<serde_json::Value> {
    let (v, _) = value(&mut c.clone(), &format!("{DIR}checks/{name}")).await?;
    serde_json::from_str(&v).ok()
}

async fn wait_value(c: &Client, leaf: &str, want: Option<&str>) {
    eventually(
        Duration::from_secs(10),
        &format!("{leaf} = {want:?}"),
        || {
            let mut c = c.clone();
            let key = format!("{DIR}{leaf}");
            async move {
                let got = value(&mut c, &key).await.map(|v| v.0);
                if got.as_deref() == want {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                }
            }
        },
    )
    .await;
}

async fn wait_check_status(c: &Client, name: &str, want: &str) -> serde_json::Value {
    eventually(
        Duration::from_secs(10),
        &format!("check {name} = {want}"),
        || {
            let c = c.clone();
            async move {
                match check(&c, name).await {
                    Some(v) if v["status"] == want => Ok(v),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await
}

/// An independent model of Consul's thresholds, to check the agent against.
fn model(raw: &[i32], sbp: usize, fbw: usize, fbc: usize) -> Vec<&'static str> {
    let mut status = "critical";
    let (mut ok, mut bad) = (0usize, 0usize);
    let mut seen = vec![];
    for r in raw {
        match r {
            0 => {
                ok += 1;
                bad = 0;
                if ok >= sbp {
                    status = "passing";
                }
            }
            code => {
                bad += 1;
                ok = 0;
                if *code != 1 && bad >= fbc {
                    status = "critical";
                } else if bad >= fbw && (status == "passing" || *code == 1) {
                    status = "warning";
                }
            }
        }
        if seen.last() != Some(&status) {
            seen.push(status);
        }
    }
    seen
}

#[tokio::test]
async fn flapping_exec_check_respects_every_threshold() {
    let cluster = Cluster::start(1).await;
    let host = Host::new(&cluster);
    std::fs::write(host.path("status"), "0").unwrap();
    host.write_config(&format!(
        "dc: dc1\nroles: [web]\nttl: 10s\nchecks:\n  - name: flappy\n    exec: [sh, -c, 's=$(cat {status}); echo $s >> {runs}; echo raw $s; exit $s']\n    interval: 150ms\n    success_before_passing: 2\n    failures_before_warning: 2\n    failures_before_critical: 3\n",
        status = host.p("status"),
        runs = host.p("runs"),
    ));
    let watcher = Watcher::start(cluster.endpoints(), DIR).await;
    let _agent = host.agent();
    let c = cluster.client().await;
    eventually(Duration::from_secs(10), "registration", || {
        let mut c = c.clone();
        async move { registered(&mut c, DIR).await }
    })
    .await;
    // Drive raw results: each step holds a status for a number of runs.
    for (status, runs) in [
        (0, 3),
        (2, 1),
        (0, 1),
        (2, 2),
        (2, 1),
        (1, 2),
        (0, 1),
        (0, 2),
        (2, 4),
    ] {
        std::fs::write(host.path("status"), status.to_string()).unwrap();
        let before = host.runs("runs").len();
        host.wait_runs("runs", before + runs + 1).await;
    }
    let raw: Vec<i32> = host
        .runs("runs")
        .iter()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let expected = model(&raw, 2, 2, 3);
    assert!(
        expected.len() >= 5,
        "the drive did not exercise the thresholds: {expected:?}"
    );
    eventually(
        Duration::from_secs(10),
        "the health history to match the thresholds",
        || {
            let raw: Vec<i32> = host
                .runs("runs")
                .iter()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            let expected = model(&raw, 2, 2, 3);
            let mut seen: Vec<String> = Vec::new();
            for e in watcher.events() {
                if e.put && e.key.ends_with("/health") {
                    let v = e.value.clone();
                    if seen.last() != Some(&v) {
                        seen.push(v);
                    }
                }
            }
            async move {
                // The first registration carries the first result's status.
                let seen: Vec<&str> = seen.iter().map(String::as_str).collect();
                if seen == expected {
                    Ok(())
                } else {
                    Err(format!(
                        "health {seen:?}, expected {expected:?} from raw {raw:?}"
                    ))
                }
            }
        },
    )
    .await;
}

#[tokio::test]
async fn stable_checks_write_nothing_even_when_output_changes() {
    let cluster = Cluster::start(1).await;
    let host = Host::new(&cluster);
    host.write_config(&format!(
        "dc: dc1\nroles: [web]\nchecks:\n  - name: quiet\n    exec: [sh, -c, 'echo run >> {a}']\n    interval: 100ms\n  - name: chatty\n    exec: [sh, -c, 'date +%N; echo run >> {b}']\n    interval: 100ms\n",
        a = host.p("a"),
        b = host.p("b"),
    ));
    let _agent = host.agent();
    let mut c = cluster.client().await;
    wait_check_status(&c, "chatty", "passing").await;
    let (_, rev) = read_prefix(&mut c, "/").await;
    let (a, b) = (host.runs("a").len(), host.runs("b").len());
    host.wait_runs("a", a + 10).await;
    host.wait_runs("b", b + 10).await;
    let (_, rev_after) = read_prefix(&mut c, "/").await;
    assert_eq!(rev, rev_after, "stable statuses caused etcd writes");
}

#[tokio::test]
async fn hung_check_and_its_child_are_killed_at_the_timeout() {
    let cluster = Cluster::start(1).await;
    let host = Host::new(&cluster);
    host.write_config(&format!(
        "dc: dc1\nroles: [web]\nchecks:\n  - name: hung\n    shell: 'sleep 300 & echo $! >> {pids}; sleep 300'\n    interval: 1s\n    timeout: 300ms\n",
        pids = host.p("pids"),
    ));
    let _agent = host.agent();
    let c = cluster.client().await;
    let v = wait_check_status(&c, "hung", "critical").await;
    assert!(
        v["output"]
            .as_str()
            .unwrap_or("")
            .contains("timed out after 300ms"),
        "{v}"
    );
    host.wait_runs("pids", 1).await;
    let child: i32 = host.runs("pids")[0].trim().parse().unwrap();
    eventually(
        Duration::from_secs(5),
        "the check's child to be killed",
        || async move {
            // Gone, or a zombie waiting for its reaper: either way not running.
            match std::fs::read_to_string(format!("/proc/{child}/stat")) {
                Err(_) => Ok(()),
                Ok(stat) if stat.split_whitespace().nth(2) == Some("Z") => Ok(()),
                Ok(stat) => Err(stat),
            }
        },
    )
    .await;
}

#[tokio::test]
async fn flooding_check_output_is_capped_at_4_kib_and_notify_socket_is_hidden() {
    let cluster = Cluster::start(1).await;
    let host = Host::new(&cluster);
    // `mb` prints 'x' then 3000 'é': byte 4096 falls inside a character.
    host.write_config(
        "dc: dc1\nroles: [web]\nchecks:\n  - name: flood\n    exec: [sh, -c, 'head -c 1000000 /dev/zero | tr \"\\0\" x']\n  - name: nosocket\n    exec: [sh, -c, 'test -z \"$NOTIFY_SOCKET\"']\n  - name: mb\n    exec: [sh, -c, 'printf x; i=0; while [ $i -lt 3000 ]; do printf \"\\303\\251\"; i=$((i+1)); done; exit 1']\n",
    );
    let mut a = crate::support::proc::registrar();
    a.args(host.args("agent"))
        .env("NOTIFY_SOCKET", host.p("notify.sock"));
    let _agent = crate::support::proc::Agent::spawn_command("agent", a);
    let c = cluster.client().await;
    let v = wait_check_status(&c, "flood", "passing").await;
    let out = v["output"].as_str().unwrap();
    assert_eq!(out.len(), 4096, "output not capped at 4 KiB");
    assert!(out.chars().all(|ch| ch == 'x'));
    wait_check_status(&c, "nosocket", "passing").await;
    // Multi-byte output is cut on a character boundary, not mangled.
    let v = wait_check_status(&c, "mb", "warning").await;
    let out = v["output"].as_str().unwrap();
    assert!(out.len() <= 4096 && out.len() > 4090, "{} bytes", out.len());
    assert!(
        out.starts_with("xé") && out[1..].chars().all(|ch| ch == 'é'),
        "{out}"
    );
}

/// A local HTTP server answering every request with `status`.
async fn http_server(status: u16) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = sock.read(&mut buf).await;
                let body = format!("status {status}");
                let resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    port
}

#[tokio::test]
async fn http_and_tcp_checks_map_statuses() {
    let cluster = Cluster::start(1).await;
    let host = Host::new(&cluster);
    let (ok, busy, broken) = (
        http_server(200).await,
        http_server(429).await,
        http_server(500).await,
    );
    let refused = crate::support::free_port();
    let open = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let open_port = open.local_addr().unwrap().port();
    host.write_config(&format!(
        "dc: dc1\nroles: [web]\nchecks:\n\
         - {{name: ok, http: 'http://127.0.0.1:{ok}/health', interval: 200ms}}\n\
         - {{name: busy, http: 'http://127.0.0.1:{busy}/', interval: 200ms}}\n\
         - {{name: broken, http: 'http://127.0.0.1:{broken}/', interval: 200ms}}\n\
         - {{name: refused, http: 'http://127.0.0.1:{refused}/', interval: 200ms}}\n\
         - {{name: open, tcp: '127.0.0.1:{open_port}', interval: 200ms}}\n\
         - {{name: closed, tcp: '127.0.0.1:{refused}', interval: 200ms}}\n"
    ));
    let _agent = host.agent();
    let c = cluster.client().await;
    let v = wait_check_status(&c, "ok", "passing").await;
    assert!(v["output"].as_str().unwrap().contains("status 200"), "{v}");
    assert!(
        v["since"].as_str().unwrap().ends_with('Z'),
        "since is RFC 3339: {v}"
    );
    wait_check_status(&c, "busy", "warning").await;
    wait_check_status(&c, "broken", "critical").await;
    let v = wait_check_status(&c, "refused", "critical").await;
    assert!(
        v["output"]
            .as_str()
            .unwrap()
            .contains("GET http://127.0.0.1:"),
        "{v}"
    );
    wait_check_status(&c, "open", "passing").await;
    wait_check_status(&c, "closed", "critical").await;
    wait_value(&c, "health", Some("critical")).await;
    drop(open);
}

/// Serves every connection on `listener` with one HTTP answer: `head` is
/// the status line's code and reason plus any header lines.
async fn serve_answer<S>(mut sock: S, head: String, body: &'static str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = [0u8; 1024];
    let _ = sock.read(&mut buf).await;
    let resp = format!(
        "HTTP/1.1 {head}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
    let _ = sock.shutdown().await;
}

/// An https server (certificate for 127.0.0.1 and localhost, signed by the
/// test CA) answering 200; it listens on every address so that a name the
/// certificate does not cover can reach it too.
async fn https_server(pki: &crate::support::etcd::Pki) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&pki.server_cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&pki.server_key).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(sock).await {
                    serve_answer(tls, "200 OK".into(), "secure").await;
                }
            });
        }
    });
    port
}

/// An http server redirecting every request to `location`.
async fn redirect_server(location: String) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let head = format!("302 Found\r\nlocation: {location}");
            tokio::spawn(serve_answer(sock, head, ""));
        }
    });
    port
}

#[tokio::test]
async fn https_checks_verify_the_server_and_redirects_are_followed() {
    let cluster = Cluster::start(1).await;
    let host = Host::new(&cluster);
    let pki = crate::support::etcd::Pki::generate(host.dir.path());
    let tls = https_server(&pki).await;
    let to_tls = redirect_server(format!("https://localhost:{tls}/ok")).await;
    let looping = redirect_server("/again".into()).await;
    host.write_config(&format!(
        "dc: dc1\nroles: [web]\nchecks:\n\
         - {{name: secure, http: 'https://127.0.0.1:{tls}/ok', interval: 200ms}}\n\
         - {{name: redirected, http: 'http://127.0.0.1:{to_tls}/', interval: 200ms}}\n\
         - {{name: wrong_name, http: 'https://127.0.0.2:{tls}/ok', interval: 200ms}}\n\
         - {{name: looping, http: 'http://127.0.0.1:{looping}/', interval: 200ms}}\n"
    ));
    // The system's CA certificates are read from SSL_CERT_FILE when it is set.
    let mut a = crate::support::proc::registrar();
    a.args(host.args("agent")).env("SSL_CERT_FILE", &pki.ca);
    let _agent = crate::support::proc::Agent::spawn_command("agent", a);
    let c = cluster.client().await;
    let v = wait_check_status(&c, "secure", "passing").await;
    assert_eq!(v["output"], "HTTP 200 OK\nsecure", "{v}");
    let v = wait_check_status(&c, "redirected", "passing").await;
    assert_eq!(v["output"], "HTTP 200 OK\nsecure", "{v}");
    let v = wait_check_status(&c, "wrong_name", "critical").await;
    let out = v["output"].as_str().unwrap();
    assert!(out.contains("TLS with 127.0.0.2"), "{v}");
    let v = wait_check_status(&c, "looping", "critical").await;
    assert!(
        v["output"]
            .as_str()
            .unwrap()
            .ends_with("more than 5 redirects"),
        "{v}"
    );
}

async fn maintenance(host: &Host, args: &[&str]) {
    let mut a = vec!["maintenance".to_string()];
    a.extend(args.iter().map(|s| s.to_string()));
    a.extend(["--state-dir".to_string(), host.p("state")]);
    let r = run(&a).await;
    assert_eq!(r.code, 0, "maintenance {args:?}: {}", r.stderr);
}

#[tokio::test]
async fn maintenance_on_off_expiry_and_restart() {
    let cluster = Cluster::start(1).await;
    let host = Host::new(&cluster);
    host.write_config("dc: dc1\nroles: [web]\n");
    let mut agent = host.agent();
    let c = cluster.client().await;
    let lease = eventually(Duration::from_secs(10), "registration", || {
        let mut c = c.clone();
        async move { registered(&mut c, DIR).await }
    })
    .await;

    maintenance(&host, &["on", "--reason", "kernel upgrade"]).await;
    wait_value(&c, "maintenance", Some("kernel upgrade")).await;
    assert_eq!(
        registered(&mut c.clone(), DIR).await,
        Ok(lease),
        "maintenance changed the lease"
    );

    // It survives a restart of the agent (and so a new lease).
    agent.signal(Signal::SIGTERM);
    agent.wait_exit(Duration::from_secs(10)).await;
    let _agent = host.agent();
    eventually(
        Duration::from_secs(10),
        "re-registration in maintenance",
        || {
            let mut c = c.clone();
            async move {
                let l = registered(&mut c, DIR).await?;
                match value(&mut c, &format!("{DIR}maintenance")).await {
                    Some((r, ml)) if r == "kernel upgrade" && ml == l => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;

    maintenance(&host, &["off"]).await;
    wait_value(&c, "maintenance", None).await;

    maintenance(&host, &["on", "--reason", "short", "--for", "2s"]).await;
    wait_value(&c, "maintenance", Some("short")).await;
    wait_value(&c, "maintenance", None).await;
}

#[tokio::test]
async fn reload_adds_and_removes_a_check_and_a_role_on_the_same_lease() {
    let cluster = Cluster::start(1).await;
    let host = Host::new(&cluster);
    host.write_config("dc: dc1\nroles: [web]\nchecks:\n  - {name: a, exec: ['true']}\n");
    let agent = host.agent();
    let c = cluster.client().await;
    wait_check_status(&c, "a", "passing").await;
    let lease = registered(&mut c.clone(), DIR).await.unwrap();

    host.write_config("dc: dc1\nroles: [web, db]\nchecks:\n  - {name: b, exec: ['false']}\n");
    agent.signal(Signal::SIGHUP);
    eventually(Duration::from_secs(10), "the reloaded registration", || {
        let mut c = c.clone();
        async move {
            let web = registered(&mut c, DIR).await?;
            let db = registered(&mut c, "/infrastructure/dc1/db/h1/").await?;
            let (kvs, _) = read_prefix(&mut c, DIR).await;
            let keys = crate::keys(&kvs);
            let ok = keys.contains(&format!("{DIR}checks/b"))
                && !keys.contains(&format!("{DIR}checks/a"));
            if web == lease && db == lease && ok {
                Ok(())
            } else {
                Err(format!("{web:x} {db:x} {keys:?}"))
            }
        }
    })
    .await;
    wait_check_status(&c, "b", "warning").await;
    wait_value(&c, "health", Some("warning")).await;

    // And back: the db role goes away, still on the same lease.
    host.write_config("dc: dc1\nroles: [web]\n");
    agent.signal(Signal::SIGHUP);
    eventually(Duration::from_secs(10), "the db role to be gone", || {
        let mut c = c.clone();
        async move {
            let (db, _) = read_prefix(&mut c, "/infrastructure/dc1/db/").await;
            if db.is_empty() {
                Ok(())
            } else {
                Err(format!("{} db keys", db.len()))
            }
        }
    })
    .await;
    wait_value(&c, "health", Some("passing")).await;
    assert_eq!(registered(&mut c.clone(), DIR).await, Ok(lease));
}

#[tokio::test]
async fn reload_with_a_broken_config_keeps_the_old_one() {
    let cluster = Cluster::start(1).await;
    let host = Host::new(&cluster);
    host.write_config("dc: dc1\nroles: [web]\nservices:\n  http: 80\n");
    let agent = host.agent();
    let mut c = cluster.client().await;
    let lease = eventually(Duration::from_secs(10), "registration", || {
        let mut c = c.clone();
        async move { registered(&mut c, DIR).await }
    })
    .await;
    let (before, rev) = read_prefix(&mut c, "/").await;
    host.write_config("dc: dc1\nroles: [web]\nservices:\n  http: 0\nbogus: true\n");
    agent.signal(Signal::SIGHUP);
    eventually(
        Duration::from_secs(5),
        "the refused reload to be logged",
        || {
            let log = agent.log();
            async move {
                if log.contains("reload refused") && log.contains("unknown field `bogus`") {
                    Ok(())
                } else {
                    Err(log)
                }
            }
        },
    )
    .await;
    let (after, rev_after) = read_prefix(&mut c, "/").await;
    assert_eq!(rev, rev_after, "a refused reload wrote to etcd");
    assert_eq!(before.len(), after.len());
    assert_eq!(registered(&mut c, DIR).await, Ok(lease));
}

#[tokio::test]
async fn deregister_after_withdraws_and_restores_the_keys_on_the_same_lease() {
    let cluster = Cluster::start(1).await;
    let host = Host::new(&cluster);
    std::fs::write(host.path("status"), "0").unwrap();
    host.write_config(&format!(
        "dc: dc1\nroles: [web]\nservices:\n  http: 80\nchecks:\n  - name: app\n    exec: [sh, -c, 'exit $(cat {})']\n    interval: 100ms\n    deregister_after: 1s\n",
        host.p("status")
    ));
    let _agent = host.agent();
    let c = cluster.client().await;
    wait_check_status(&c, "app", "passing").await;
    let lease = registered(&mut c.clone(), DIR).await.unwrap();

    std::fs::write(host.path("status"), "2").unwrap();
    wait_check_status(&c, "app", "critical").await;
    // Withdrawn: consumers no longer see the host, but the name stays held.
    wait_value(&c, "ip", None).await;
    let (kvs, _) = read_prefix(&mut c.clone(), DIR).await;
    assert_eq!(
        crate::keys(&kvs),
        [format!("{DIR}owner")].into(),
        "only the owner key stays"
    );
    assert_eq!(kvs[0].lease(), lease, "the lease was not kept");

    std::fs::write(host.path("status"), "0").unwrap();
    wait_value(&c, "ip", Some("127.0.0.1")).await;
    wait_check_status(&c, "app", "passing").await;
    assert_eq!(registered(&mut c.clone(), DIR).await, Ok(lease));
    wait_value(&c, "services/http", Some("80")).await;
}

#[tokio::test]
async fn re_registration_after_lease_loss_carries_the_current_check_state() {
    let cluster = Cluster::start(1).await;
    let host = Host::new(&cluster);
    host.write_config(
        "dc: dc1\nroles: [web]\nttl: 30s\nchecks:\n  - {name: app, exec: ['true'], interval: 1h}\n",
    );
    let _agent = host.agent();
    let mut c = cluster.client().await;
    let before = wait_check_status(&c, "app", "passing").await;
    let lease = registered(&mut c, DIR).await.unwrap();
    let watcher = Watcher::start(cluster.endpoints(), DIR).await;
    c.lease_revoke(lease).await.unwrap();
    eventually(Duration::from_secs(5), "re-registration", || {
        let mut c = c.clone();
        async move {
            match registered(&mut c, DIR).await {
                Ok(l) if l != lease => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    // The check (interval 1h) has not run again: its state was carried over.
    let after = check(&c, "app").await.unwrap();
    assert_eq!(before, after, "re-registration reset the check state");
    let healths: Vec<String> = watcher
        .events()
        .into_iter()
        .filter(|e| e.put && e.key.ends_with("/health"))
        .map(|e| e.value)
        .collect();
    assert_eq!(healths, ["passing"], "health went through another value");
}

/// The README's example thresholds as written (`failures_before_critical:
/// 3`, `success_before_passing: 2`, no `failures_before_warning`): one or
/// two failures are ridden out with no write at all; a third makes the
/// check critical. Check output with control bytes reaches the log escaped.
#[tokio::test]
async fn the_readme_thresholds_ride_out_two_failures_and_output_is_logged_escaped() {
    let cluster = Cluster::start(1).await;
    let host = Host::new(&cluster);
    std::fs::write(host.path("status"), "0").unwrap();
    host.write_config(&format!(
        "dc: dc1\nroles: [web]\nttl: 10s\nchecks:\n  - name: http\n    exec: [sh, -c, 's=$(cat {status}); echo $s >> {runs}; printf \"\\033[31mred\\rINFO forged $s\\n\"; exit $s']\n    interval: 150ms\n    failures_before_critical: 3\n    success_before_passing: 2\n",
        status = host.p("status"),
        runs = host.p("runs"),
    ));
    let watcher = Watcher::start(cluster.endpoints(), DIR).await;
    let agent = host.agent();
    let c = cluster.client().await;
    eventually(Duration::from_secs(10), "registration", || {
        let mut c = c.clone();
        async move { registered(&mut c, DIR).await }
    })
    .await;
    let health_puts = || {
        watcher
            .events()
            .into_iter()
            .filter(|e| e.put && e.key.ends_with("/health"))
            .map(|e| e.value)
            .collect::<Vec<_>>()
    };
    // success_before_passing: 2 — passing after the second success, as
    // the watcher sees it.
    let registered_puts = eventually(Duration::from_secs(10), "health passing", || {
        let puts = health_puts();
        async move {
            if puts.last().map(String::as_str) == Some("passing") {
                Ok(puts)
            } else {
                Err(format!("{puts:?}"))
            }
        }
    })
    .await;
    // Two failures in a row, then passing again: ridden out.
    for (status, runs) in [(0, 2), (2, 2), (0, 3)] {
        std::fs::write(host.path("status"), status.to_string()).unwrap();
        let before = host.runs("runs").len();
        host.wait_runs("runs", before + runs).await;
    }
    assert_eq!(
        health_puts(),
        registered_puts,
        "two failures changed the health"
    );
    // Three failures: critical.
    std::fs::write(host.path("status"), "2").unwrap();
    eventually(Duration::from_secs(10), "health critical", || {
        let mut c = c.clone();
        async move {
            match value(&mut c, &format!("{DIR}health")).await {
                Some((h, _)) if h == "critical" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    let log = agent.log();
    assert!(
        !log.contains('\u{1b}') && !log.contains("\rINFO forged"),
        "raw control bytes in the log"
    );
    assert!(
        log.contains("\\u{1b}[31mred\\rINFO forged 2"),
        "the output is not in the log, escaped:\n{log}"
    );
}

/// Whether a process is running (not gone, not a zombie).
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => stat.split_whitespace().nth(2) != Some("Z"),
    }
}

/// A check that exits at once but leaves a child ignoring SIGTERM: when
/// the run ends, the child is ended too (SIGTERM, a grace, SIGKILL), so
/// runs do not pile up orphans.
#[tokio::test]
async fn a_check_that_leaves_a_stubborn_child_leaves_no_orphan() {
    let cluster = Cluster::start(1).await;
    let host = Host::new(&cluster);
    host.write_config(&format!(
        "dc: dc1\nroles: [web]\nchecks:\n  - name: leaky\n    shell: '(trap \"\" TERM; sleep 300) & echo $! >> {pids}; echo ok'\n    interval: 200ms\n",
        pids = host.p("pids"),
    ));
    let _agent = host.agent();
    let c = cluster.client().await;
    eventually(Duration::from_secs(10), "registration", || {
        let mut c = c.clone();
        async move { registered(&mut c, DIR).await }
    })
    .await;
    host.wait_runs("pids", 5).await;
    eventually(Duration::from_secs(5), "no child left running", || {
        let alive: Vec<i32> = host
            .runs("pids")
            .iter()
            .filter_map(|l| l.trim().parse().ok())
            .take(4)
            .filter(|pid| running(*pid))
            .collect();
        async move {
            if alive.is_empty() {
                Ok(())
            } else {
                Err(format!("still running: {alive:?}"))
            }
        }
    })
    .await;
    // The run in flight when the agent is killed leaves its child: end it.
    for pid in host
        .runs("pids")
        .iter()
        .filter_map(|l| l.trim().parse().ok())
    {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
}
