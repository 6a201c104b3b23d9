//! `registrar render`: templates over the registry, checked, written
//! atomically, reloaded; fail closed; and haproxy carrying real traffic.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::proc::{cmd, host_args, registrar, run};
use crate::support::{Agent, Cluster, eventually};

/// Registers one host one-shot with an http service.
pub(crate) async fn register(eps: &str, role: &str, host: &str, ip: &str, port: u16) {
    let mut a = cmd(
        "register",
        host_args(eps, "dc1", role, host, &format!("id-{host}"), "60s"),
    );
    if let Some(i) = a.iter().position(|x| x == "127.0.0.1") {
        a[i] = ip.to_string();
    }
    a.extend(["--service".into(), format!("http={port}")]);
    let r = run(&a).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
}

pub(crate) struct Dir {
    pub(crate) dir: tempfile::TempDir,
}

impl Dir {
    pub(crate) fn new() -> Dir {
        Dir {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub(crate) fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }
    pub(crate) fn read(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.path(name)).ok()
    }
}

/// A render config with one template.
pub(crate) fn config(d: &Dir, eps: &str, template: &Path, extra: &str) -> PathBuf {
    d.write(
        "render.yaml",
        &format!(
            "endpoints: [{eps}]\ntemplates:\n  - source: {}\n    destination: {}\n{extra}",
            template.display(),
            d.path("out.cfg").display()
        ),
    )
}

pub(crate) async fn render_once(cfg: &Path, extra: &[&str]) -> crate::support::proc::Run {
    let mut a = vec![
        "render".to_string(),
        "--config".into(),
        cfg.to_string_lossy().into_owned(),
    ];
    if !extra.contains(&"--dry-run") {
        a.push("--once".into());
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    run(&a).await
}

#[tokio::test]
async fn render_once_writes_checks_refuses_and_restores() {
    let cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    register(&eps, "web", "w1", "10.0.0.1", 8081).await;
    register(&eps, "web", "w2", "10.0.0.2", 8082).await;
    register(&eps, "db", "d1", "10.0.1.1", 5432).await;
    let d = Dir::new();

    // The data: hosts(), revision, and confd's functions over raw keys.
    let t = d.write(
        "data.j2",
        "{% for h in hosts(\"dc1/web\", healthy=true) %}{{ h.host }} {{ h.ip }}:{{ h.services.http }} {{ h.health }}\n{% endfor %}\
         roles={{ lsdir(\"/infrastructure/dc1\") | join(\",\") }}\n\
         leaves={{ ls(\"/infrastructure/dc1/db/d1\") | join(\",\") }}\n\
         ip={{ getv(\"/infrastructure/dc1/db/d1/ip\") }} none={{ getv(\"/nope\", \"-\") }}\n\
         exists={{ exists(\"/infrastructure/dc1/web\") }},{{ exists(\"/infrastructure/dc9\") }}\n\
         rev={{ revision > 0 }}\n",
    );
    let cfg = config(&d, &eps, &t, "");
    let r = render_once(&cfg, &["--dry-run"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout,
        "w1 10.0.0.1:8081 passing\nw2 10.0.0.2:8082 passing\nroles=db,web\n\
         leaves=health,ip,owner\nip=10.0.1.1 none=-\nexists=True,False\nrev=True\n"
    );
    assert!(d.read("out.cfg").is_none(), "--dry-run wrote the file");

    // --once writes it, with mode 0644; a second run writes nothing and
    // runs no reload.
    let marker = d.path("reloads");
    let reload = format!(
        "    reload: [sh, -c, 'echo reload >> {}']\n",
        marker.display()
    );
    let cfg = config(&d, &eps, &t, &reload);
    assert_eq!(render_once(&cfg, &[]).await.code, 0);
    let first = d.read("out.cfg").expect("written");
    assert!(first.starts_with("w1 10.0.0.1:8081"), "{first}");
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(d.path("out.cfg")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o644);
    assert_eq!(d.read("reloads").as_deref(), Some("reload\n"));
    assert_eq!(render_once(&cfg, &[]).await.code, 0);
    assert_eq!(
        d.read("reloads").as_deref(),
        Some("reload\n"),
        "reloaded without a change"
    );

    // A strict error: the template, the line, and nothing written.
    let bad = d.write("bad.j2", "ok\n{{ hosts()[0].hostname }}\n");
    let cfg_bad = config(&d, &eps, &bad, "");
    let r = render_once(&cfg_bad, &[]).await;
    assert_eq!(r.code, 78, "{}", r.stderr);
    assert!(
        r.stderr.contains("bad.j2:2") && r.stderr.contains("2 > {{ hosts()[0].hostname }}"),
        "{}",
        r.stderr
    );
    assert_eq!(
        d.read("out.cfg").as_deref(),
        Some(first.as_str()),
        "a broken template replaced the file"
    );

    // min_hosts: fewer hosts than that keeps the previous file.
    register(&eps, "web", "w3", "10.0.0.3", 8083).await;
    let cfg_min = config(&d, &eps, &t, "    min_hosts: 10\n");
    let r = render_once(&cfg_min, &[]).await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("fewer than min_hosts 10"), "{}", r.stderr);
    assert_eq!(d.read("out.cfg").as_deref(), Some(first.as_str()));

    // A failing check keeps the old file and runs no reload.
    let cfg_check = config(
        &d,
        &eps,
        &t,
        &format!("    check: [sh, -c, 'echo bad config in $0; exit 1', '{{{{src}}}}']\n{reload}"),
    );
    let r = render_once(&cfg_check, &[]).await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("bad config in"),
        "the check's output is not logged: {}",
        r.stderr
    );
    assert_eq!(d.read("out.cfg").as_deref(), Some(first.as_str()));
    assert_eq!(d.read("reloads").as_deref(), Some("reload\n"));

    // A failing reload restores the previous file and reloads again.
    let attempts = d.path("attempts");
    let cfg_reload = config(
        &d,
        &eps,
        &t,
        &format!(
            "    reload: [sh, -c, 'echo x >> {}; exit 3']\n",
            attempts.display()
        ),
    );
    let r = render_once(&cfg_reload, &[]).await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("restoring the previous files"),
        "{}",
        r.stderr
    );
    assert_eq!(
        d.read("out.cfg").as_deref(),
        Some(first.as_str()),
        "not restored"
    );
    assert_eq!(
        d.read("attempts").as_deref(),
        Some("x\nx\n"),
        "reload not run again"
    );
    // No staged files are left behind.
    let left: Vec<_> = std::fs::read_dir(d.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // etcd unreachable: 69, and the file stays.
    let cfg_down = d.write(
        "down.yaml",
        &format!(
            "endpoints: [http://127.0.0.1:1]\ntemplates:\n  - source: {}\n    destination: {}\n",
            t.display(),
            d.path("out.cfg").display()
        ),
    );
    let r = render_once(&cfg_down, &["--timeout", "1s"]).await;
    assert_eq!(r.code, 69, "{}", r.stderr);
    assert_eq!(d.read("out.cfg").as_deref(), Some(first.as_str()));
}

/// A backend: an HTTP server on loopback answering with its name.
struct Backend {
    name: String,
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    async fn start(name: &str) -> Backend {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let body = name.to_string();
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = sock.read(&mut buf).await;
                    let resp = format!(
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Backend {
            name: name.to_string(),
            port,
            task,
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An agent for a backend, with an exec check that passes while its flag
/// file exists.
fn backend_agent(eps: &str, d: &Dir, b: &Backend) -> Agent {
    let flag = d.write(&format!("{}.up", b.name), "");
    let cfg = d.write(
        &format!("{}.yaml", b.name),
        &format!(
            "checks:\n  - name: up\n    shell: 'test -f {} || exit 2'\n    interval: 200ms\n",
            flag.display()
        ),
    );
    let mut args = cmd(
        "agent",
        host_args(eps, "dc1", "web", &b.name, &format!("id-{}", b.name), "3s"),
    );
    args.extend([
        "--service".into(),
        format!("http={}", b.port),
        "--config".into(),
        cfg.to_string_lossy().into_owned(),
        "--state-dir".into(),
        d.path(&format!("{}.state", b.name))
            .to_string_lossy()
            .into_owned(),
    ]);
    Agent::spawn(&b.name, &args)
}

/// haproxy in master-worker mode, its whole process group killed on drop.
struct Haproxy {
    child: std::process::Child,
}

impl Haproxy {
    fn start(cfg: &Path) -> Haproxy {
        use std::os::unix::process::CommandExt;
        let child = std::process::Command::new("haproxy")
            .args(["-W", "-db", "-f"])
            .arg(cfg)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start haproxy (./scripts/test installs it)");
        Haproxy { child }
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Requests through haproxy, every 20 ms: (when, answer or error).
type Log = std::sync::Arc<std::sync::Mutex<Vec<(tokio::time::Instant, Result<String, String>)>>>;

fn traffic(port: u16) -> (Log, tokio::task::JoinHandle<()>) {
    let log: Log = Default::default();
    let sink = log.clone();
    let task = tokio::spawn(async move {
        loop {
            let answer = async {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .map_err(|e| e.to_string())?;
                s.write_all(b"GET /web/ HTTP/1.0\r\nHost: x\r\n\r\n")
                    .await
                    .map_err(|e| e.to_string())?;
                let mut out = String::new();
                s.read_to_string(&mut out)
                    .await
                    .map_err(|e| e.to_string())?;
                match out.split_once("\r\n\r\n") {
                    Some((head, body))
                        if head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200") =>
                    {
                        Ok(body.to_string())
                    }
                    _ => Err(out.lines().next().unwrap_or("empty answer").to_string()),
                }
            };
            let r = tokio::time::timeout(Duration::from_secs(5), answer)
                .await
                .unwrap_or_else(|_| Err("no answer within 5s".into()));
            sink.lock().unwrap().push((tokio::time::Instant::now(), r));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    (log, task)
}

/// Waits until, after `since`, `window` of consecutive answers all come
/// from exactly `want`; returns how long that took to begin.
async fn traffic_settles(
    log: &Log,
    since: tokio::time::Instant,
    want: &[&str],
    within: Duration,
) -> Duration {
    let want: std::collections::BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    eventually(within, "the traffic to follow the registry", || {
        let entries: Vec<_> = log
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| *at >= since)
            .cloned()
            .collect();
        let want = want.clone();
        async move {
            // The first point after which the last 60 answers came only
            // from `want` and from every one of them.
            let n = entries.len();
            if n < 60 {
                return Err(format!("{n} answers so far"));
            }
            let tail = &entries[n - 60..];
            let seen: std::collections::BTreeSet<String> =
                tail.iter().filter_map(|(_, r)| r.clone().ok()).collect();
            if seen == want && tail.iter().all(|(_, r)| r.is_ok()) {
                // Settled when the last answer from outside `want` is
                // past and every member of `want` has answered.
                let left = entries
                    .iter()
                    .rposition(|(_, r)| r.as_ref().map_or(true, |b| !want.contains(b)))
                    .map_or(since, |i| entries[(i + 1).min(n - 1)].0);
                let joined = want
                    .iter()
                    .filter_map(|w| {
                        entries
                            .iter()
                            .find(|(_, r)| r.as_ref().ok() == Some(w))
                            .map(|(at, _)| *at)
                    })
                    .max()
                    .unwrap_or(since);
                Ok(left.max(joined).duration_since(since))
            } else {
                Err(format!("last answers from {seen:?}"))
            }
        }
    })
    .await
}

#[tokio::test]
async fn haproxy_follows_the_registry_with_no_failed_request() {
    let cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    let d = Dir::new();
    let mut backends = vec![
        Backend::start("b1").await,
        Backend::start("b2").await,
        Backend::start("b3").await,
    ];
    let mut agents: Vec<Agent> = backends
        .iter()
        .map(|b| backend_agent(&eps, &d, b))
        .collect();
    let c = cluster.client().await;
    eventually(Duration::from_secs(15), "three healthy backends", || {
        let mut c = c.clone();
        async move {
            let (kvs, _) = crate::read_prefix(&mut c, "/infrastructure/dc1/web/").await;
            let passing = kvs
                .iter()
                .filter(|kv| kv.key().ends_with(b"/health") && kv.value() == b"passing")
                .count();
            if passing == 3 {
                Ok(())
            } else {
                Err(format!("{passing} passing"))
            }
        }
    })
    .await;

    // The shipped template, bound to a free port on loopback.
    let listen = crate::support::free_port();
    let example = std::fs::read_to_string(format!(
        "{}/examples/haproxy/haproxy.cfg.j2",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let template = d.write(
        "haproxy.cfg.j2",
        &example
            .replace("\"*:80\"", &format!("\"127.0.0.1:{listen}\""))
            .replace(
                "/run/haproxy/admin.sock",
                &d.path("admin.sock").to_string_lossy(),
            ),
    );
    let out = d.path("out.cfg");
    let base = format!(
        "endpoints: [{eps}]\ntemplates:\n  - source: {}\n    destination: {}\n    check: [haproxy, -c, -q, -f, \"{{{{src}}}}\"]\n    wait: {{min: 100ms, max: 1s}}\n    min_hosts: 1\n",
        template.display(),
        out.display()
    );
    let first = d.write("first.yaml", &base);
    let r = render_once(&first, &[]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let haproxy = Haproxy::start(&out);
    let metrics_port = crate::support::free_port();
    let cfg = d.write(
        "render.yaml",
        &format!(
            "metrics_listen: 127.0.0.1:{metrics_port}\n{base}    reload: [kill, -USR2, \"{}\"]\n",
            haproxy.pid()
        ),
    );
    let mut render_args = vec!["render".to_string(), "--config".into()];
    render_args.push(cfg.to_string_lossy().into_owned());
    let render = Agent::spawn("render", &render_args);
    eventually(
        Duration::from_secs(10),
        "haproxy listening",
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", listen))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
    )
    .await;
    let (log, requests) = traffic(listen);
    let started = tokio::time::Instant::now();
    traffic_settles(&log, started, &["b1", "b2", "b3"], Duration::from_secs(15)).await;

    // A check fails: b1 leaves the backend.
    std::fs::remove_file(d.path("b1.up")).unwrap();
    let t = tokio::time::Instant::now();
    let took = traffic_settles(&log, t, &["b2", "b3"], Duration::from_secs(10)).await;
    eprintln!("check failed: traffic followed after {took:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");

    // An agent stops: its host is revoked and leaves the backend.
    agents[1].signal(nix::sys::signal::Signal::SIGTERM);
    let t = tokio::time::Instant::now();
    let took = traffic_settles(&log, t, &["b3"], Duration::from_secs(10)).await;
    eprintln!("agent stopped: traffic followed after {took:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");

    // A fourth backend registers and joins.
    backends.push(Backend::start("b4").await);
    agents.push(backend_agent(&eps, &d, &backends[3]));
    let t = tokio::time::Instant::now();
    let took = traffic_settles(&log, t, &["b3", "b4"], Duration::from_secs(15)).await;
    eprintln!("backend added: traffic followed after {took:?}");
    assert!(took < Duration::from_secs(4), "took {took:?}");

    // A template that renders an invalid config is refused by haproxy -c:
    // the running config stays, and so does the traffic.
    let before = std::fs::read_to_string(&out).unwrap();
    std::fs::write(&template, format!("{example}\nthis is not haproxy\n")).unwrap();
    render.signal(nix::sys::signal::Signal::SIGHUP);
    eventually(
        Duration::from_secs(10),
        "the check's refusal in the log",
        || {
            let log = render.log();
            async move {
                if log.contains("refused the new") {
                    Ok(())
                } else {
                    Err(log)
                }
            }
        },
    )
    .await;
    assert_eq!(std::fs::read_to_string(&out).unwrap(), before);

    // The metrics say it: writes, the refused check, no lag.
    let text =
        crate::support::etcd::http_get(&format!("http://127.0.0.1:{metrics_port}/metrics")).await;
    let metric = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    assert!(metric("registrar_render_writes_total") >= 3.0, "{text}");
    assert!(
        metric("registrar_render_check_failures_total") >= 1.0,
        "{text}"
    );
    assert_eq!(
        metric("registrar_render_rendered_revision"),
        metric("registrar_render_registry_revision"),
        "{text}"
    );
    let health =
        crate::support::etcd::http_get(&format!("http://127.0.0.1:{metrics_port}/health")).await;
    assert!(
        health.contains("200 OK") && health.contains("rendered"),
        "{health}"
    );

    requests.abort();
    let failed: Vec<_> = log
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(at, r)| {
            r.as_ref()
                .err()
                .map(|e| (at.duration_since(started), e.clone()))
        })
        .collect();
    let total = log.lock().unwrap().len();
    eprintln!("{total} requests through haproxy, {} failed", failed.len());
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(total > 100, "only {total} requests");
    drop(haproxy);
}

/// Under systemd: READY=1 only once every template has rendered, then
/// WATCHDOG=1 from the render loop.
#[tokio::test]
async fn render_notifies_ready_after_the_first_render_then_the_watchdog() {
    let cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    register(&eps, "web", "w1", "10.0.0.1", 8081).await;
    let d = Dir::new();
    let t = d.write("t.j2", "{% for h in hosts() %}{{ h.host }}\n{% endfor %}");
    let cfg = config(&d, &eps, &t, "");
    let path = d.path("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_nonblocking(true).unwrap();
    let mut command = registrar();
    command
        .args(["render", "--config"])
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &path);
    let _render = Agent::spawn_command("render", command);
    let mut got: Vec<String> = Vec::new();
    let mut buf = [0u8; 4096];
    eventually(Duration::from_secs(15), "READY=1 then WATCHDOG=1", || {
        while let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.contains("READY=1") {
                // The file is there when READY=1 is sent.
                assert_eq!(d.read("out.cfg").as_deref(), Some("w1\n"));
            }
            got.push(msg);
        }
        let ready = got.iter().position(|m| m.contains("READY=1"));
        let dog = got.iter().rposition(|m| m.contains("WATCHDOG=1"));
        let state = format!("{got:?}");
        async move {
            match (ready, dog) {
                (Some(r), Some(w)) if w > r => Ok(()),
                _ => Err(state),
            }
        }
    })
    .await;
}

/// `wait.min`: a burst of changes is rendered once it is quiet (not once
/// per change); `wait.max`: changes that never stop are still rendered at
/// least every `max`. While etcd is down the last file stays.
#[tokio::test]
async fn quiescence_batches_bursts_and_bounds_the_delay_and_etcd_down_keeps_the_file() {
    let mut cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    for i in 0..20 {
        register(&eps, "web", &format!("w{i:02}"), "10.0.0.1", 8080).await;
    }
    let d = Dir::new();
    let t = d.write(
        "t.j2",
        "{% for h in hosts(healthy=true) %}{{ h.host }}\n{% endfor %}",
    );
    let metrics_port = crate::support::free_port();
    let cfg = d.write(
        "render.yaml",
        &format!(
            "endpoints: [{eps}]\nmetrics_listen: 127.0.0.1:{metrics_port}\ntemplates:\n  - source: {}\n    destination: {}\n    wait: {{min: 500ms, max: 2s}}\n",
            t.display(),
            d.path("out.cfg").display()
        ),
    );
    let _render = Agent::spawn(
        "render",
        &[
            "render".to_string(),
            "--config".into(),
            cfg.to_string_lossy().into_owned(),
        ],
    );
    let renders = || async move {
        let text =
            crate::support::etcd::http_get(&format!("http://127.0.0.1:{metrics_port}/metrics"))
                .await;
        text.lines()
            .find(|l| l.starts_with("registrar_render_renders_total"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(-1.0)
    };
    eventually(Duration::from_secs(10), "the first render", || {
        let text = d.read("out.cfg").unwrap_or_default();
        async move {
            if text.lines().count() == 20 {
                Ok(())
            } else {
                Err(text)
            }
        }
    })
    .await;
    let before = renders().await;

    // A burst: 20 changes, 20 ms apart (well inside wait.min).
    let mut c = cluster.client().await;
    for i in 0..20 {
        c.put(
            format!("/infrastructure/dc1/web/w{i:02}/health"),
            "critical",
            None,
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually(Duration::from_secs(10), "the burst rendered", || {
        let text = d.read("out.cfg").unwrap_or_default();
        async move { if text.is_empty() { Ok(()) } else { Err(text) } }
    })
    .await;
    let after_burst = renders().await;
    assert!(
        after_burst - before <= 2.0,
        "a burst of 20 changes took {} renders",
        after_burst - before
    );

    // Changes every 200 ms for 5 s never leave 500 ms of quiet: wait.max
    // (2 s) still renders them.
    let start = tokio::time::Instant::now();
    let mut seen_early = false;
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(5) {
        c.put(
            format!("/infrastructure/dc1/web/w{:02}/health", i % 20),
            "passing",
            None,
        )
        .await
        .unwrap();
        i += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
        if start.elapsed() < Duration::from_millis(3500)
            && !d.read("out.cfg").unwrap_or_default().is_empty()
        {
            seen_early = true;
        }
    }
    assert!(
        seen_early,
        "nothing rendered within wait.max while changes kept coming"
    );

    // etcd down: the last output stays.
    eventually(
        Duration::from_secs(10),
        "all hosts back in the file",
        || {
            let text = d.read("out.cfg").unwrap_or_default();
            async move {
                if text.lines().count() == 20 {
                    Ok(())
                } else {
                    Err(text)
                }
            }
        },
    )
    .await;
    let last = d.read("out.cfg");
    cluster.kill(0);
    let down = tokio::time::Instant::now();
    while down.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            d.read("out.cfg"),
            last,
            "the file changed while etcd was down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
