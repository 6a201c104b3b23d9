//! `render` with `haproxy: {socket}`: server changes reach a real haproxy
//! 2.6 (master-worker, stats socket at level admin) through its runtime
//! API, with no reload; anything else, and a socket that is gone, reloads.
//! The backends are real HTTP/1.1 servers that answer every request with
//! their name and keep the connection alive; haproxy passes connections
//! through (mode tcp), so a long-lived connection stays on one server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::time::Instant;

use crate::render::Dir;
use crate::support::proc::{Agent, cmd, host_args, registrar, run_with};
use crate::support::{Cluster, eventually, free_port};

/// A backend: an HTTP/1.1 server that answers every request with its
/// name, and keeps the connection open for the next one (keep-alive)
/// until the client closes it.
struct Backend {
    name: String,
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    async fn start(name: &str) -> Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{name}",
            name.len()
        );
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let reply = reply.clone();
                tokio::spawn(async move {
                    let (r, mut w) = sock.into_split();
                    let mut lines = BufReader::new(r).lines();
                    // A request ends with an empty line (GETs have no body).
                    while let Ok(Some(line)) = lines.next_line().await {
                        if line.is_empty() && w.write_all(reply.as_bytes()).await.is_err() {
                            break;
                        }
                    }
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

/// One HTTP/1.1 keep-alive connection through haproxy: which backend
/// answers each request on it.
struct Conn {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Conn {
    async fn open(port: u16) -> Result<Conn, String> {
        let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let (r, w) = s.into_split();
        Ok(Conn {
            r: BufReader::new(r),
            w,
        })
    }

    /// A connection that lands on backend `name`: new ones are opened
    /// (round robin spreads them) until one does, within 10 s.
    async fn to(port: u16, name: &str) -> Conn {
        eventually(
            Duration::from_secs(10),
            &format!("a connection to {name}"),
            || async {
                let mut c = Conn::open(port).await?;
                match c.ask().await {
                    Ok(got) if got == name => Ok(c),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await
    }

    /// One `GET /`: the body of the answer (the backend's name).
    async fn ask(&mut self) -> Result<String, String> {
        use tokio::io::AsyncReadExt;
        let go = async {
            self.w
                .write_all(b"GET / HTTP/1.1\r\nHost: registrar.test\r\n\r\n")
                .await
                .map_err(|e| e.to_string())?;
            let mut length = None;
            let mut status = None;
            loop {
                let mut line = String::new();
                match self.r.read_line(&mut line).await {
                    Ok(0) => return Err("closed".to_string()),
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                }
                let line = line.trim_end();
                if status.is_none() {
                    status = Some(line.to_string());
                } else if line.is_empty() {
                    break;
                } else if let Some(n) = line
                    .to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .and_then(|n| n.trim().parse::<usize>().ok())
                {
                    length = Some(n);
                }
            }
            let status = status.unwrap_or_default();
            if !status.starts_with("HTTP/1.1 200") {
                return Err(status);
            }
            let mut body = vec![0; length.ok_or("no Content-Length")?];
            self.r
                .read_exact(&mut body)
                .await
                .map_err(|e| e.to_string())?;
            Ok(String::from_utf8_lossy(&body).into_owned())
        };
        tokio::time::timeout(Duration::from_secs(3), go)
            .await
            .unwrap_or_else(|_| Err("no answer within 3s".into()))
    }
}

/// A new connection every 10 ms: (when, the backend that answered).
type Log = std::sync::Arc<std::sync::Mutex<Vec<(Instant, Result<String, String>)>>>;

fn traffic(port: u16) -> (Log, tokio::task::JoinHandle<()>) {
    let log: Log = Default::default();
    let sink = log.clone();
    let task = tokio::spawn(async move {
        loop {
            let answer = match Conn::open(port).await {
                Ok(mut c) => c.ask().await,
                Err(e) => Err(e),
            };
            sink.lock().unwrap().push((Instant::now(), answer));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    (log, task)
}

/// The backends that answered after `since`.
fn answered_since(log: &Log, since: Instant) -> std::collections::BTreeSet<String> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|(at, _)| *at >= since)
        .filter_map(|(_, r)| r.clone().ok())
        .collect()
}

/// haproxy in master-worker mode; its process group is killed on drop.
struct Haproxy {
    master: std::process::Child,
    socket: PathBuf,
}

impl Haproxy {
    fn start(cfg: &Path, socket: &Path) -> Haproxy {
        use std::os::unix::process::CommandExt;
        let master = std::process::Command::new("haproxy")
            .args(["-W", "-db", "-f"])
            .arg(cfg)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start haproxy (./scripts/test installs it)");
        Haproxy {
            master,
            socket: socket.to_path_buf(),
        }
    }

    async fn ask(&self, command: &str) -> Result<String, String> {
        use tokio::io::AsyncReadExt;
        let mut s = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| format!("{}: {e}", self.socket.display()))?;
        s.write_all(format!("{command}\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out)
            .await
            .map_err(|e| e.to_string())?;
        Ok(out)
    }

    /// The pid of the worker serving the socket: a reload makes a new one.
    async fn worker(&self) -> Result<u32, String> {
        let info = self.ask("show info").await?;
        info.lines()
            .find_map(|l| l.strip_prefix("Pid: "))
            .and_then(|p| p.trim().parse().ok())
            .ok_or(info)
    }

    /// The servers of `backend`: name → (address:port, in maintenance,
    /// weight).
    async fn servers(
        &self,
        backend: &str,
    ) -> Result<std::collections::BTreeMap<String, (String, bool, u32)>, String> {
        let state = self.ask(&format!("show servers state {backend}")).await?;
        let parsed = registrar::render::runtime::parse_state(&state).ok_or(state)?;
        Ok(parsed
            .into_iter()
            .map(|((_, name), r)| {
                let at = format!("{}:{}", r.addr, r.port.unwrap_or(0));
                (name, (at, r.in_maintenance(), r.weight))
            })
            .collect())
    }

    /// A reload as `systemctl reload` does it: SIGUSR2 to the master; waits
    /// for the new worker.
    async fn reload(&self) {
        let before = self.worker().await.unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.master.id() as i32),
            Signal::SIGUSR2,
        )
        .unwrap();
        eventually(Duration::from_secs(10), "a new haproxy worker", || async {
            match self.worker().await {
                Ok(pid) if pid != before => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.master.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, Signal::SIGKILL);
        let _ = self.master.wait();
    }
}

/// One backend per role of dc1 (a new role is a new backend); a server per
/// host, `disabled` unless it passes and is not in maintenance; a host
/// that is leaving is left out.
const TEMPLATE: &str = r#"global
    stats socket SOCKET level admin
    hard-stop-after 1s

defaults
    mode tcp
    timeout connect 1s
    timeout client 30s
    timeout server 30s

frontend www
    bind 127.0.0.1:PORT
    default_backend web
{%- set ns = namespace(roles=[]) %}
{%- for h in hosts("dc1") %}{% if h.role not in ns.roles %}{% set ns.roles = ns.roles + [h.role] %}{% endif %}{% endfor %}
{% for role in ns.roles %}
backend {{ role }}
    balance roundrobin
{%- for h in hosts("dc1/" ~ role) if h.health != "leaving" %}
    server {{ h.host }} {{ h.ip }}:{{ h.services.tcp }}{% if h.health != "passing" or h.maintenance %} disabled{% endif %}
{%- endfor %}
{% endfor %}"#;

/// An agent for backend `b` in role `role`.
fn agent(eps: &str, d: &Dir, role: &str, b: &Backend) -> Agent {
    let mut args = cmd(
        "agent",
        host_args(eps, "dc1", role, &b.name, &format!("id-{}", b.name), "5s"),
    );
    args.extend([
        "--service".into(),
        format!("tcp={}", b.port),
        "--state-dir".into(),
        d.path(&format!("{}.state", b.name))
            .to_string_lossy()
            .into_owned(),
    ]);
    Agent::spawn(&b.name, &args)
}

/// How many times the reload command ran.
fn reloads(d: &Dir) -> usize {
    d.read("reloads").map_or(0, |t| t.lines().count())
}

struct Setup {
    d: Dir,
    cluster: Cluster,
    eps: String,
    port: u16,
    metrics: u16,
    haproxy: Haproxy,
    render: Agent,
}

/// A cluster, the given agents registered, haproxy started on render's
/// first output, then render following the registry with `haproxy:`.
async fn setup(d: Dir, cluster: Cluster, hosts: usize) -> Setup {
    let eps = cluster.endpoint_list();
    let port = free_port();
    let socket = d.path("admin.sock");
    let template = d.write(
        "t.j2",
        &TEMPLATE
            .replace("SOCKET", &socket.to_string_lossy())
            .replace("PORT", &port.to_string()),
    );
    let cfg_path = d.path("haproxy.cfg");
    // haproxy's first file: what render would write, from a dry run.
    let base = format!(
        "endpoints: [{eps}]\ntemplates:\n  - source: {}\n    destination: {}\n",
        template.display(),
        cfg_path.display()
    );
    let dry = d.write("dry.yaml", &base);
    let first = eventually(Duration::from_secs(15), "every host in the file", || {
        let dry = dry.clone();
        async move {
            let mut c = registrar();
            c.args(["render", "--dry-run", "--config"]).arg(&dry);
            let r = run_with(&mut c).await;
            if r.code == 0 && r.stdout.matches("    server ").count() == hosts {
                Ok(r.stdout)
            } else {
                Err(format!("exit {}: {}{}", r.code, r.stdout, r.stderr))
            }
        }
    })
    .await;
    std::fs::write(&cfg_path, first).unwrap();
    let haproxy = Haproxy::start(&cfg_path, &socket);
    eventually(Duration::from_secs(10), "haproxy's socket", || async {
        haproxy.worker().await
    })
    .await;
    let metrics = free_port();
    let render_cfg = d.write(
        "render.yaml",
        &format!(
            "{base}    check: [haproxy, -c, -q, -f, \"{{{{src}}}}\"]\n    reload: [sh, -c, 'echo r >> {}; kill -USR2 {}']\n    wait: {{min: 50ms, max: 200ms}}\n    haproxy: {{socket: {}, drain: 2s}}\n",
            d.path("reloads").display(),
            haproxy.master.id(),
            socket.display()
        ),
    );
    let render = start_render(&render_cfg, metrics).await;
    Setup {
        d,
        cluster,
        eps,
        port,
        metrics,
        haproxy,
        render,
    }
}

/// render with its config, serving metrics on `metrics`, once ready.
async fn start_render(cfg: &Path, metrics: u16) -> Agent {
    let mut c = registrar();
    c.args(["render", "--config"])
        .arg(cfg)
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")]);
    let render = Agent::spawn_command("render", c);
    let url = format!("http://127.0.0.1:{metrics}/health");
    eventually(Duration::from_secs(15), "render ready", || {
        let url = url.clone();
        async move {
            let h = crate::support::etcd::try_http_get(&url).await?;
            if h.contains("200 OK") { Ok(()) } else { Err(h) }
        }
    })
    .await;
    render
}

async fn metric(port: u16, name: &str) -> u64 {
    let text = crate::support::etcd::http_get(&format!("http://127.0.0.1:{port}/metrics")).await;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn server_changes_reach_haproxy_at_runtime_with_no_reload() {
    let cluster = Cluster::start(1).await;
    let d = Dir::new();
    let eps = cluster.endpoint_list();
    let keep = Backend::start("keep").await;
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    let b3 = Backend::start("b3").await;
    let _a_keep = agent(&eps, &d, "web", &keep);
    let _a1 = agent(&eps, &d, "web", &b1);
    let a2 = agent(&eps, &d, "web", &b2);
    let s = setup(d, cluster, 3).await;
    let pid = s.haproxy.worker().await.unwrap();
    let (log, probe) = traffic(s.port);
    eventually(Duration::from_secs(10), "traffic to all three", || {
        let seen = answered_since(&log, Instant::now() - Duration::from_millis(500));
        async move {
            if seen.len() == 3 {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            }
        }
    })
    .await;

    // A long-lived connection to `keep`, which no change touches.
    let mut long = Conn::to(s.port, "keep").await;

    // A host added: in the traffic within 1 s, with no reload.
    let a3 = agent(&s.eps, &s.d, "web", &b3);
    let added = registry_says(&s, "b3", "health", &[Some("passing")]).await;
    eventually(Duration::from_secs(1), "b3 in the traffic", || {
        let seen = answered_since(&log, added);
        async move {
            if seen.contains("b3") {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            }
        }
    })
    .await;

    // A host put in maintenance: out of the traffic within 1 s.
    let mut m = registrar();
    m.args(["maintenance", "on", "--reason", "test", "--state-dir"])
        .arg(s.d.path("b1.state"));
    let r = run_with(&mut m).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let maint = registry_says(&s, "b1", "maintenance", &[Some("test")]).await;
    out_of_traffic(&log, "b1", maint).await;
    assert!(
        s.haproxy.servers("web").await.unwrap()["b1"].1,
        "b1 in maintenance in haproxy"
    );

    // A host stopped (SIGTERM: it says leaving, then revokes): out of the
    // traffic within 1 s, and deleted from haproxy once drained.
    a2.signal(Signal::SIGTERM);
    let stopped = registry_says(&s, "b2", "health", &[Some("leaving"), None]).await;
    out_of_traffic(&log, "b2", stopped).await;
    eventually(
        Duration::from_secs(10),
        "b2 deleted from haproxy",
        || async {
            let servers = s.haproxy.servers("web").await?;
            if servers.contains_key("b2") {
                Err(format!("{servers:?}"))
            } else {
                Ok(())
            }
        },
    )
    .await;

    // No reload: the same worker, the reload command never ran, and the
    // long-lived connection still answers.
    assert_eq!(
        s.haproxy.worker().await.unwrap(),
        pid,
        "haproxy was reloaded"
    );
    assert_eq!(reloads(&s.d), 0, "{}", s.render.log());
    assert_eq!(long.ask().await.as_deref(), Ok("keep"));
    assert!(metric(s.metrics, "registrar_render_runtime_changes_total").await >= 3);
    assert!(metric(s.metrics, "registrar_render_reloads_avoided_total").await >= 3);
    assert_eq!(metric(s.metrics, "registrar_render_reloads_total").await, 0);
    let log_text = s.render.log();
    assert!(
        log_text.contains("applied through haproxy's runtime API, no reload: added web/b3")
            && log_text.contains("disabled web/b1")
            && log_text.contains("removed web/b2"),
        "{log_text}"
    );

    // The file says what haproxy runs: a reload changes no server.
    let before = s.haproxy.servers("web").await.unwrap();
    s.haproxy.reload().await;
    let after = s.haproxy.servers("web").await.unwrap();
    assert_eq!(before, after);
    probe.abort();
    drop(a3);
}

/// The moment host `host`'s `field` key in dc1/web reads one of `want`
/// (`None`: the key is gone): when the registry changed.
async fn registry_says(s: &Setup, host: &str, field: &str, want: &[Option<&str>]) -> Instant {
    let c = s.cluster.client().await;
    let key = format!("/infrastructure/dc1/web/{host}/{field}");
    eventually(
        Duration::from_secs(15),
        &format!("{key} = {want:?}"),
        || {
            let mut c = c.clone();
            let key = key.clone();
            async move {
                let r = c.get(key.as_str(), None).await.map_err(|e| e.to_string())?;
                let value = r
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
                if want.contains(&value.as_deref()) {
                    Ok(Instant::now())
                } else {
                    Err(format!("{value:?}"))
                }
            }
        },
    )
    .await
}

/// Waits up to 1 s after `since` for `who` to stop answering new
/// connections, then checks it stays out for half a second more.
async fn out_of_traffic(log: &Log, who: &str, since: Instant) {
    let deadline = since + Duration::from_secs(1);
    let gone = eventually(
        Duration::from_secs(1),
        &format!("{who} out of the traffic"),
        || {
            // The last answer from `who`, and whether answers came after it.
            let entries = log.lock().unwrap().clone();
            let who = who.to_string();
            async move {
                let last = entries
                    .iter()
                    .rposition(|(_, r)| r.as_deref() == Ok(who.as_str()));
                let after = last.map_or(entries.len(), |i| entries.len() - i - 1);
                if after >= 10 {
                    Ok(last.map(|i| entries[i].0))
                } else {
                    Err(format!("{after} answers since {who}'s last"))
                }
            }
        },
    )
    .await;
    assert!(
        gone.is_none_or(|t| t <= deadline),
        "{who} answered until {gone:?}"
    );
    let check = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !answered_since(log, check).contains(who),
        "{who} got new connections after it was taken out"
    );
}

#[tokio::test]
async fn a_new_backend_and_a_missing_socket_reload_once() {
    let cluster = Cluster::start(1).await;
    let d = Dir::new();
    let eps = cluster.endpoint_list();
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    let db = Backend::start("db1").await;
    let _a1 = agent(&eps, &d, "web", &b1);
    let mut s = setup(d, cluster, 1).await;
    let pid = s.haproxy.worker().await.unwrap();

    // A new role is a new backend: one reload, a new worker.
    let _adb = agent(&s.eps, &s.d, "db", &db);
    eventually(Duration::from_secs(15), "one reload", || async {
        match reloads(&s.d) {
            1 => Ok(()),
            n => Err(format!("{n} reloads")),
        }
    })
    .await;
    eventually(
        Duration::from_secs(10),
        "a new worker with backend db",
        || async {
            let w = s.haproxy.worker().await?;
            let servers = s.haproxy.servers("db").await?;
            if w != pid && servers.contains_key("db1") {
                Ok(())
            } else {
                Err(format!("worker {w}, db {servers:?}"))
            }
        },
    )
    .await;
    let log = s.render.log();
    assert!(
        log.contains("reloading haproxy: the sections differ"),
        "{log}"
    );

    // A server change with the socket gone (renamed away): a reload
    // instead. haproxy keeps the socket's listener across the reload, so
    // it answers at the new name.
    let pid = s.haproxy.worker().await.unwrap();
    let path = s.haproxy.socket.clone();
    let away = s.d.path("admin.sock.away");
    std::fs::rename(&path, &away).unwrap();
    let _a2 = agent(&s.eps, &s.d, "web", &b2);
    eventually(Duration::from_secs(15), "a second reload", || async {
        match reloads(&s.d) {
            2 => Ok(()),
            n => Err(format!("{n} reloads")),
        }
    })
    .await;
    s.haproxy.socket = away.clone();
    eventually(
        Duration::from_secs(10),
        "the new worker runs b2",
        || async {
            let w = s.haproxy.worker().await?;
            let servers = s.haproxy.servers("web").await?;
            if w != pid && servers.contains_key("b2") {
                Ok(())
            } else {
                Err(format!("worker {w}, web {servers:?}"))
            }
        },
    )
    .await;
    let log = s.render.log();
    assert!(
        log.contains("reloading haproxy: haproxy's socket") && log.contains("does not answer"),
        "{log}"
    );
    std::fs::rename(&away, &path).unwrap();
    s.haproxy.socket = path;
    // Back on the runtime path once the socket is there again.
    let b3 = Backend::start("b3").await;
    let _a3 = agent(&s.eps, &s.d, "web", &b3);
    eventually(Duration::from_secs(15), "b3 added at runtime", || async {
        let servers = s.haproxy.servers("web").await?;
        if servers.contains_key("b3") {
            Ok(())
        } else {
            Err(format!("{servers:?}"))
        }
    })
    .await;
    assert_eq!(reloads(&s.d), 2);
    let text =
        crate::support::etcd::http_get(&format!("http://127.0.0.1:{}/metrics", s.metrics)).await;
    for reason in ["sections", "socket"] {
        assert!(
            text.contains(&format!(
                "registrar_render_runtime_fallbacks_total{{reason=\"{reason}\"}} 1"
            )),
            "{text}"
        );
    }
}

#[tokio::test]
async fn haproxy_settings_are_checked_at_load_time() {
    let d = Dir::new();
    let t = d.write("t.j2", "backend web\n");
    let out = d.path("out.cfg");
    let with = |name: &str, extra: &str| {
        d.write(
            name,
            &format!(
                "templates:\n  - source: {}\n    destination: {}\n{extra}",
                t.display(),
                out.display()
            ),
        )
    };
    let check = |cfg: PathBuf| async move {
        let mut c = registrar();
        c.args(["check-config", "--config"]).arg(&cfg);
        run_with(&mut c).await
    };
    let good = with(
        "good.yaml",
        "    reload: [\"true\"]\n    haproxy: {socket: /run/haproxy/admin.sock}\n",
    );
    let r = check(good).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .contains("socket /run/haproxy/admin.sock, drain 1m"),
        "{}",
        r.stdout
    );
    let relative = with(
        "relative.yaml",
        "    haproxy: {socket: admin.sock, drain: soon}\n",
    );
    let r = check(relative).await;
    assert_eq!(r.code, 78, "{}", r.stderr);
    for want in [
        "haproxy.socket admin.sock must be an absolute path",
        "haproxy needs a reload as well",
        "soon",
    ] {
        assert!(r.stderr.contains(want), "no {want:?} in:\n{}", r.stderr);
    }
    let missing = with(
        "missing.yaml",
        "    reload: [\"true\"]\n    haproxy: {drain: 5s}\n",
    );
    let r = check(missing).await;
    assert_eq!(r.code, 78, "{}", r.stderr);
    assert!(r.stderr.contains("haproxy needs a socket"), "{}", r.stderr);
}

#[tokio::test]
async fn a_removed_server_drains_then_is_deleted_even_across_a_render_restart() {
    let cluster = Cluster::start(1).await;
    let d = Dir::new();
    let eps = cluster.endpoint_list();
    let keep = Backend::start("keep").await;
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    let b3 = Backend::start("b3").await;
    let _a_keep = agent(&eps, &d, "web", &keep);
    let a1 = agent(&eps, &d, "web", &b1);
    let a2 = agent(&eps, &d, "web", &b2);
    let mut s = setup(d, cluster, 3).await;
    let pid = s.haproxy.worker().await.unwrap();
    // A connection to b1, open while b1 is removed.
    let mut on_b1 = Conn::to(s.port, "b1").await;
    a1.signal(Signal::SIGTERM);
    registry_says(&s, "b1", "health", &[Some("leaving"), None]).await;
    eventually(Duration::from_secs(5), "b1 in maintenance", || async {
        let servers = s.haproxy.servers("web").await?;
        match servers.get("b1") {
            Some((_, true, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // Draining: its open connection still works, and it stays until the
    // bound (drain: 2s), then its session is shut and it is deleted.
    assert_eq!(on_b1.ask().await.as_deref(), Ok("b1"));
    eventually(
        Duration::from_secs(10),
        "b1 deleted after the drain bound",
        || async {
            let servers = s.haproxy.servers("web").await?;
            if servers.contains_key("b1") {
                Err(format!("{servers:?}"))
            } else {
                Ok(())
            }
        },
    )
    .await;
    assert!(
        on_b1.ask().await.is_err(),
        "b1's session outlived the drain bound"
    );
    assert!(
        s.render.log().contains("after the drain bound; shut them"),
        "{}",
        s.render.log()
    );

    // render killed while b2 drains: the next render finds b2 in
    // maintenance, and deletes it once drained, without a reload.
    let mut on_b2 = Conn::to(s.port, "b2").await;
    a2.signal(Signal::SIGTERM);
    registry_says(&s, "b2", "health", &[Some("leaving"), None]).await;
    eventually(Duration::from_secs(5), "b2 in maintenance", || async {
        let servers = s.haproxy.servers("web").await?;
        match servers.get("b2") {
            Some((_, true, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    s.render.signal(Signal::SIGKILL);
    let _ = s.render.wait_exit(Duration::from_secs(5)).await;
    s.render = start_render(&s.d.path("render.yaml"), s.metrics).await;
    let _a3 = agent(&s.eps, &s.d, "web", &b3);
    eventually(Duration::from_secs(15), "b3 added, b2 deleted", || async {
        let servers = s.haproxy.servers("web").await?;
        if servers.contains_key("b3") && !servers.contains_key("b2") {
            Ok(())
        } else {
            Err(format!("{servers:?}"))
        }
    })
    .await;
    assert!(on_b2.ask().await.is_err());
    assert!(
        s.render.log().contains("still has web/b2 in maintenance"),
        "{}",
        s.render.log()
    );
    assert_eq!(
        s.haproxy.worker().await.unwrap(),
        pid,
        "haproxy was reloaded"
    );
    assert_eq!(reloads(&s.d), 0);
}
