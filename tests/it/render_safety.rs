//! `registrar render` in front of a real service: no crash on any command
//! output, no lost or re-owned file, no line injected from a key, no
//! needless reload, flags and signals that do what they say (design.md
//! section 6, rules 8, 10 and 11).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::render::{Dir, config, register, render_once};
use crate::support::proc::{registrar, run, run_with};
use crate::support::{Agent, Cluster, eventually, free_port};

/// A template listing every present host.
const LIST: &str = "{% for h in hosts() %}{{ h.host }} {{ h.ip }}\n{% endfor %}";

/// A shell command printing 'x' and then 3000 'é' (6001 bytes: byte 4096
/// falls inside a character), then running `then`.
fn multibyte(then: &str) -> String {
    format!(
        "[sh, -c, 'printf x; i=0; while [ $i -lt 3000 ]; do printf \"\\303\\251\"; i=$((i+1)); done; {then}']"
    )
}

/// The pid written to `file` by a command, once it is there.
async fn pid_in(file: &Path) -> Pid {
    eventually(Duration::from_secs(10), "the command's pid file", || {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        async move {
            text.trim()
                .parse::<i32>()
                .map(Pid::from_raw)
                .map_err(|_| format!("{text:?}"))
        }
    })
    .await
}

/// `registrar render --config CFG EXTRA...`, running.
fn spawn_render(cfg: &Path, extra: &[&str]) -> Agent {
    let mut command = registrar();
    command.arg("render").arg("--config").arg(cfg).args(extra);
    Agent::spawn_command("render", command)
}

/// What a fresh read renders equals, before long, what the running
/// render wrote, and the file no longer contains `absent`.
async fn agrees_with_a_fresh_read(d: &Dir, cfg: &Path, absent: &str) {
    eventually(Duration::from_secs(10), "render to drop the host", || {
        let text = d.read("out.cfg").unwrap_or_default();
        let absent = absent.to_string();
        async move {
            if !text.is_empty() && !text.contains(&absent) {
                Ok(())
            } else {
                Err(text)
            }
        }
    })
    .await;
    let fresh = render_once(cfg, &["--dry-run"]).await;
    assert_eq!(fresh.code, 0, "{}", fresh.stderr);
    assert_eq!(d.read("out.cfg").unwrap_or_default(), fresh.stdout);
}

fn alive(pid: Pid) -> bool {
    kill(pid, None).is_ok()
}

/// The dot files (staged files) left in `d`.
fn staged(d: &Dir) -> Vec<String> {
    std::fs::read_dir(d.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[tokio::test]
async fn commands_that_flood_multibyte_text_daemonise_or_hang_are_bounded() {
    let cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    register(&eps, "web", "w1", "10.0.0.1", 8081).await;
    let d = Dir::new();
    let t = d.write("t.j2", LIST);

    // A check that prints 6001 bytes of 'é' and fails: refused, its
    // output logged, no crash, nothing written, nothing staged left.
    let cfg = config(
        &d,
        &eps,
        &t,
        &format!("    check: {}\n", multibyte("exit 1")),
    );
    let r = render_once(&cfg, &[]).await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("refused the new") && r.stderr.contains("xéé"),
        "{}",
        r.stderr
    );
    assert!(d.read("out.cfg").is_none());
    assert!(staged(&d).is_empty(), "{:?}", staged(&d));

    // A reload that prints the same and fails: the previous file is put
    // back, and the reload runs again; no crash.
    std::fs::write(d.path("out.cfg"), "old\n").unwrap();
    let cfg = config(
        &d,
        &eps,
        &t,
        &format!("    reload: {}\n", multibyte("exit 3")),
    );
    let r = render_once(&cfg, &[]).await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("restoring the previous files") && r.stderr.contains("xéé"),
        "{}",
        r.stderr
    );
    assert_eq!(d.read("out.cfg").as_deref(), Some("old\n"));
    assert!(staged(&d).is_empty(), "{:?}", staged(&d));

    // A reload that starts a background process holding its output and
    // exits 0 is done when it exits: the new file stays, and what it
    // started is left running (a daemon is its business).
    let bg = d.path("bg.pid");
    let cfg = config(
        &d,
        &eps,
        &t,
        &format!(
            "    reload: [sh, -c, 'sleep 30 & echo $! > {}; exit 0']\n    command_timeout: 5s\n",
            bg.display()
        ),
    );
    let started = tokio::time::Instant::now();
    let r = render_once(&cfg, &[]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the reload was waited for past its own exit: {:?}",
        started.elapsed()
    );
    assert_eq!(d.read("out.cfg").as_deref(), Some("w1 10.0.0.1\n"));
    let daemon = pid_in(&bg).await;
    assert!(alive(daemon), "the reload's background process was killed");
    let _ = kill(daemon, Signal::SIGKILL);

    // A reload that hangs, with a child: killed with its whole process
    // group at command_timeout, and the previous file is put back.
    std::fs::write(d.path("out.cfg"), "old\n").unwrap();
    let child = d.path("child.pid");
    let cfg = config(
        &d,
        &eps,
        &t,
        &format!(
            "    reload: [sh, -c, 'sleep 300 & echo $! > {}; sleep 300']\n    command_timeout: 1s\n",
            child.display()
        ),
    );
    let r = render_once(&cfg, &[]).await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("timed out after 1s"), "{}", r.stderr);
    assert_eq!(d.read("out.cfg").as_deref(), Some("old\n"));
    let orphan = pid_in(&child).await;
    eventually(
        Duration::from_secs(5),
        "the hung reload's child gone",
        || async move {
            if alive(orphan) {
                Err(format!("{orphan} still runs"))
            } else {
                Ok(())
            }
        },
    )
    .await;
    assert!(staged(&d).is_empty(), "{:?}", staged(&d));
}

/// Needs root: it gives files to `nobody` and runs render as `nobody`.
fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (it chowns files and runs render as nobody); run ./scripts/test as root"
    );
}

#[tokio::test]
async fn files_keep_their_owner_mode_and_links_and_are_never_lost() {
    require_root();
    let cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    register(&eps, "web", "w1", "10.0.0.1", 8081).await;
    let d = Dir::new();
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let t = d.write("t.j2", LIST);
    std::fs::set_permissions(&t, std::fs::Permissions::from_mode(0o644)).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());

    // An existing file's owner, group and mode are kept.
    let out = d.path("out.cfg");
    std::fs::write(&out, "old\n").unwrap();
    std::os::unix::fs::chown(&out, Some(uid), Some(gid)).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o640)).unwrap();
    let cfg = config(&d, &eps, &t, "");
    let r = render_once(&cfg, &[]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let meta = std::fs::metadata(&out).unwrap();
    assert_eq!(d.read("out.cfg").as_deref(), Some("w1 10.0.0.1\n"));
    assert_eq!((meta.uid(), meta.gid()), (uid, gid), "owner changed");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640, "mode changed");

    // A symlinked destination stays a link; its target is written.
    std::fs::create_dir(d.path("real")).unwrap();
    std::fs::write(d.path("real/target.cfg"), "old\n").unwrap();
    std::os::unix::fs::symlink("real/target.cfg", d.path("link.cfg")).unwrap();
    let cfg = d.write(
        "link.yaml",
        &format!(
            "endpoints: [{eps}]\ntemplates:\n  - source: {}\n    destination: {}\n",
            t.display(),
            d.path("link.cfg").display()
        ),
    );
    let r = render_once(&cfg, &[]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        std::fs::symlink_metadata(d.path("link.cfg"))
            .unwrap()
            .file_type()
            .is_symlink(),
        "the link was replaced by a file"
    );
    assert_eq!(d.read("real/target.cfg").as_deref(), Some("w1 10.0.0.1\n"));

    // render as nobody, a destination it cannot read (root's, 0600) in a
    // directory it can write, and a reload that fails: the file is not
    // replaced (it could not be put back), let alone removed.
    let secret = d.path("secret.cfg");
    std::fs::write(&secret, "root's config\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = d.write(
        "secret.yaml",
        &format!(
            "endpoints: [{eps}]\ntemplates:\n  - source: {}\n    destination: {}\n    reload: [\"false\"]\n",
            t.display(),
            secret.display()
        ),
    );
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut as_nobody = registrar();
    as_nobody
        .args(["render", "--once", "--config"])
        .arg(&cfg)
        .uid(uid)
        .gid(gid);
    let r = run_with(&mut as_nobody).await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("read the current file"), "{}", r.stderr);
    assert_eq!(d.read("secret.cfg").as_deref(), Some("root's config\n"));
    let meta = std::fs::metadata(&secret).unwrap();
    assert_eq!((meta.uid(), meta.permissions().mode() & 0o777), (0, 0o600));

    // A staged file left by a render that was killed is swept at start.
    std::fs::write(d.path(".out.cfg.abc123.staged"), "half").unwrap();
    let cfg = config(&d, &eps, &t, "");
    let r = render_once(&cfg, &[]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(staged(&d).is_empty(), "{:?}", staged(&d));
    assert!(r.stderr.contains("removed 1 staged file"), "{}", r.stderr);
}

#[tokio::test]
async fn a_running_render_and_dns_agree_with_a_fresh_read_on_malformed_keys_and_values() {
    let cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    for (h, ip) in [("w1", "10.0.0.1"), ("w2", "10.0.0.2"), ("w3", "10.0.0.3")] {
        register(&eps, "web", h, ip, 8080).await;
    }
    let d = Dir::new();
    let t = d.write(
        "t.j2",
        &format!("{LIST}dirs={{{{ lsdir(prefix ~ \"/dc1\") | join(\",\") }}}}\n"),
    );
    // Fail static off: two hosts made malformed within a minute would
    // otherwise be held (as a registry accident), where a fresh read
    // cannot hold anything. This test is about the values alone.
    let cfg = config(&d, &eps, &t, "    fail_static: {settle: 0s}\n");
    let render = spawn_render(&cfg, &[]);
    let port = free_port();
    let dns_cfg = d.write("dns.yaml", "fail_static: {settle: 0s}\n");
    let _dns = crate::dns::dns(&eps, port, &["--config", &dns_cfg.to_string_lossy()]).await;
    let answers = |host: &'static str| async move {
        crate::dns::dig(port, &[&format!("{host}.web.dc1.registry.internal"), "A"])
            .await
            .data()
    };
    assert!(!answers("w1").await.is_empty());

    let mut c = cluster.client().await;
    // An address overwritten with garbage.
    c.put("/infrastructure/dc1/web/w1/ip", "10.0.0.1.5", None)
        .await
        .unwrap();
    agrees_with_a_fresh_read(&d, &cfg, "w1 ").await;
    eventually(Duration::from_secs(5), "dns to drop w1", || async move {
        let a = answers("w1").await;
        if a.is_empty() {
            Ok(())
        } else {
            Err(format!("{a:?}"))
        }
    })
    .await;
    // A health nobody knows.
    c.put("/infrastructure/dc1/web/w2/health", "great", None)
        .await
        .unwrap();
    agrees_with_a_fresh_read(&d, &cfg, "w2 ").await;
    eventually(Duration::from_secs(5), "dns to drop w2", || async move {
        let a = answers("w2").await;
        if a.is_empty() {
            Ok(())
        } else {
            Err(format!("{a:?}"))
        }
    })
    .await;

    // A key whose path holds a newline: reported, never in the file.
    for (leaf, v) in [("ip", "10.0.0.9"), ("health", "passing")] {
        c.put(
            format!("/infrastructure/dc1/evil\nbackend x/h/{leaf}"),
            v,
            None,
        )
        .await
        .unwrap();
    }
    c.put("/infrastructure/dc1/web/w3/meta/touch", "1", None)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the malformed key reported",
        || {
            let log = render.log();
            async move {
                if log.contains("malformed key") && log.contains("evil\\nbackend x") {
                    Ok(())
                } else {
                    Err(log)
                }
            }
        },
    )
    .await;
    let text = d.read("out.cfg").unwrap_or_default();
    assert!(text.contains("dirs=web\n"), "{text}");
    assert!(
        !text.contains("backend x") && !text.contains("evil"),
        "{text}"
    );
    // The shipped haproxy template, too.
    let example = std::fs::read_to_string(format!(
        "{}/examples/haproxy/haproxy.cfg.j2",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let shipped = d.write("haproxy.cfg.j2", &example);
    let r = render_once(&config(&d, &eps, &shipped, ""), &["--dry-run"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        !r.stdout.contains("backend x") && !r.stdout.contains("evil"),
        "{}",
        r.stdout
    );
}

#[tokio::test]
async fn flags_and_sighup_do_what_they_say() {
    let cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    register(&eps, "web", "w1", "10.0.0.1", 8081).await;
    let d = Dir::new();
    let t = d.write("t.j2", LIST);
    let cfg = config(&d, &eps, &t, "");

    // Scope flags render cannot honour are refused.
    let cfg_arg = cfg.to_string_lossy().into_owned();
    for flag in [["--dc", "dc1"], ["--role", "web"]] {
        let r = run(&["render", "--config", &cfg_arg, flag[0], flag[1]]).await;
        assert_eq!(r.code, 2, "{flag:?}: {}", r.stderr);
    }
    // --dry-run gives up on an unreachable etcd at --timeout.
    let down = d.write(
        "down.yaml",
        &format!(
            "endpoints: [http://127.0.0.1:1]\ntemplates:\n  - source: {}\n    destination: {}\n",
            t.display(),
            d.path("out.cfg").display()
        ),
    );
    let started = tokio::time::Instant::now();
    let r = render_once(&down, &["--dry-run", "--timeout", "2s"]).await;
    assert_eq!(r.code, 69, "{}", r.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    // --metrics-listen on the command line.
    let metrics = free_port();
    let listen = format!("127.0.0.1:{metrics}");
    let render = spawn_render(&cfg, &["--metrics-listen", &listen]);
    let url = format!("http://127.0.0.1:{metrics}/metrics");
    eventually(Duration::from_secs(10), "metrics served", || {
        let url = url.clone();
        async move {
            let text = crate::support::etcd::try_http_get(&url).await?;
            if text.contains("registrar_render_writes_total 1") {
                Ok(())
            } else {
                Err(text)
            }
        }
    })
    .await;

    // SIGHUP with a template that does not parse: refused, and the old
    // one keeps rendering.
    std::fs::write(&t, "{% for h in hosts() %}").unwrap();
    render.signal(Signal::SIGHUP);
    eventually(Duration::from_secs(10), "the refusal logged", || {
        let log = render.log();
        async move {
            if log.contains("reload refused") && log.contains("does not parse") {
                Ok(())
            } else {
                Err(log)
            }
        }
    })
    .await;
    register(&eps, "web", "w2", "10.0.0.2", 8082).await;
    eventually(
        Duration::from_secs(10),
        "the old template renders w2",
        || {
            let text = d.read("out.cfg").unwrap_or_default();
            async move {
                if text == "w1 10.0.0.1\nw2 10.0.0.2\n" {
                    Ok(())
                } else {
                    Err(text)
                }
            }
        },
    )
    .await;

    // SIGHUP with new endpoints: followed once a read through them works.
    std::fs::write(&t, LIST).unwrap();
    let other = Cluster::start(1).await;
    let other_eps = other.endpoint_list();
    register(&other_eps, "web", "b1", "10.9.0.1", 8081).await;
    config(&d, &other_eps, &t, "");
    render.signal(Signal::SIGHUP);
    eventually(Duration::from_secs(15), "the new registry rendered", || {
        let text = d.read("out.cfg").unwrap_or_default();
        async move {
            if text == "b1 10.9.0.1\n" {
                Ok(())
            } else {
                Err(text)
            }
        }
    })
    .await;
    // Endpoints that do not answer: refused, the working ones stay.
    config(&d, "http://127.0.0.1:1", &t, "");
    render.signal(Signal::SIGHUP);
    eventually(
        Duration::from_secs(30),
        "the unreachable endpoints refused",
        || {
            let log = render.log();
            async move {
                if log.matches("reload refused").count() >= 2 {
                    Ok(())
                } else {
                    Err(log)
                }
            }
        },
    )
    .await;
    register(&other_eps, "web", "b2", "10.9.0.2", 8082).await;
    eventually(
        Duration::from_secs(10),
        "b2 rendered through the kept connection",
        || {
            let text = d.read("out.cfg").unwrap_or_default();
            async move {
                if text == "b1 10.9.0.1\nb2 10.9.0.2\n" {
                    Ok(())
                } else {
                    Err(text)
                }
            }
        },
    )
    .await;
}

/// `wait.min` without `max` under churn: changes under another DC, every
/// 200 ms, never reset the timer of a template that reads one DC.
#[tokio::test]
async fn wait_min_is_not_starved_by_churn_the_template_does_not_read() {
    let cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    register(&eps, "web", "w1", "10.0.0.1", 8081).await;
    let d = Dir::new();
    let t = d.write(
        "t.j2",
        "{% for h in hosts(\"dc1/web\") %}{{ h.host }}\n{% endfor %}",
    );
    // max is far away: only the quiet of dc1 can bring the render.
    let cfg = config(&d, &eps, &t, "    wait: {min: 1s, max: 1h}\n");
    let _render = spawn_render(&cfg, &[]);
    eventually(Duration::from_secs(10), "the first render", || {
        let text = d.read("out.cfg").unwrap_or_default();
        async move { if text == "w1\n" { Ok(()) } else { Err(text) } }
    })
    .await;
    let c = cluster.client().await;
    let churn = tokio::spawn(async move {
        let mut c = c;
        for i in 0.. {
            let _ = c
                .put("/infrastructure/dc2/web/x1/meta/tick", i.to_string(), None)
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    register(&eps, "web", "w2", "10.0.0.2", 8082).await;
    eventually(
        Duration::from_secs(10),
        "w2 rendered despite the churn",
        || {
            let text = d.read("out.cfg").unwrap_or_default();
            async move {
                if text == "w1\nw2\n" {
                    Ok(())
                } else {
                    Err(text)
                }
            }
        },
    )
    .await;
    churn.abort();
}

/// Undefined attributes are named; output past max_output is refused;
/// min_hosts counts the hosts whose address was written, and a render
/// held by it at start still becomes ready.
#[tokio::test]
async fn errors_name_the_attribute_output_is_bounded_and_min_hosts_counts_what_is_written() {
    let cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    register(&eps, "web", "w1", "10.0.0.1", 8081).await;
    let d = Dir::new();
    std::fs::write(d.path("out.cfg"), "old\n").unwrap();

    let t = d.write(
        "bad.j2",
        "ok\n{% for h in hosts() %}\n  server {{ h.hostname }}\n{% endfor %}\n",
    );
    let r = render_once(&config(&d, &eps, &t, ""), &[]).await;
    assert_eq!(r.code, 78, "{}", r.stderr);
    assert!(
        r.stderr.contains("`h.hostname` is undefined"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("bad.j2:3"), "{}", r.stderr);
    assert!(r.stderr.contains("server {{ h.hostname }}"), "{}", r.stderr);

    let t = d.write(
        "big.j2",
        "{% for i in range(1000) %}{% for j in range(1000) %}0123456789{% endfor %}{% endfor %}",
    );
    let r = render_once(&config(&d, &eps, &t, "    max_output: 1MiB\n"), &[]).await;
    assert_eq!(r.code, 78, "{}", r.stderr);
    assert!(r.stderr.contains("max_output"), "{}", r.stderr);
    assert_eq!(d.read("out.cfg").as_deref(), Some("old\n"));

    // A role's hosts looked at but not written (no `http` service) do not
    // count towards min_hosts.
    let mut c = cluster.client().await;
    c.delete("/infrastructure/dc1/web/w1/services/http", None)
        .await
        .unwrap();
    let t = d.write(
        "servers.j2",
        "{% for h in hosts() if \"http\" in h.services %}server {{ h.ip }}\n{% endfor %}",
    );
    let cfg = config(&d, &eps, &t, "    min_hosts: 1\n");
    let r = render_once(&cfg, &[]).await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("would list 0 hosts"), "{}", r.stderr);
    assert_eq!(d.read("out.cfg").as_deref(), Some("old\n"));

    // Held at start: READY=1 all the same (the previous file is the
    // state), with the hold in STATUS= and /health.
    let sock_path = d.path("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_nonblocking(true).unwrap();
    let metrics = free_port();
    let mut command = registrar();
    command
        .args(["render", "--config"])
        .arg(&cfg)
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
        .env("NOTIFY_SOCKET", &sock_path);
    let _render = Agent::spawn_command("render", command);
    let mut buf = [0u8; 4096];
    let ready = eventually(Duration::from_secs(15), "READY=1 while held", || {
        let mut got = None;
        while let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.contains("READY=1") {
                got = Some(msg);
            }
        }
        async move { got.ok_or_else(|| "no READY=1 yet".to_string()) }
    })
    .await;
    assert!(ready.contains("held by min_hosts"), "{ready}");
    let health =
        crate::support::etcd::http_get(&format!("http://127.0.0.1:{metrics}/health")).await;
    assert!(
        health.contains("200 OK") && health.contains("held"),
        "{health}"
    );
    // The host publishes the service again: written, no longer held.
    c.put("/infrastructure/dc1/web/w1/services/http", "8081", None)
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the file written", || {
        let text = d.read("out.cfg").unwrap_or_default();
        async move {
            if text == "server 10.0.0.1\n" {
                Ok(())
            } else {
                Err(text)
            }
        }
    })
    .await;
    let text = crate::support::etcd::http_get(&format!("http://127.0.0.1:{metrics}/metrics")).await;
    assert!(
        text.contains("registrar_render_min_hosts_refusing_templates 0"),
        "{text}"
    );
}

/// The shipped template: valid for haproxy, no default backend chosen by
/// alphabet, no role without the service, and no reload for changes it
/// does not show.
#[tokio::test]
async fn the_shipped_haproxy_template_is_safe_by_default() {
    let cluster = Cluster::start(1).await;
    let eps = cluster.endpoint_list();
    register(&eps, "web", "w1", "10.0.0.1", 8081).await;
    register(&eps, "web", "w2", "10.0.0.2", 8082).await;
    register(&eps, "api", "a1", "10.0.2.1", 9000).await;
    // A new role without the http service (it sorts first).
    let r = run(&crate::support::proc::cmd(
        "register",
        crate::support::proc::host_args(&eps, "dc1", "batch", "b1", "id-b1", "60s"),
    ))
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut c = cluster.client().await;
    c.put("/infrastructure/dc1/api/a1/health", "critical", None)
        .await
        .unwrap();
    let d = Dir::new();
    let example = std::fs::read_to_string(format!(
        "{}/examples/haproxy/haproxy.cfg.j2",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let bind = free_port();
    let haproxy_ok = |text: &str| {
        let path = d.write("check.cfg", text);
        let out = std::process::Command::new("haproxy")
            .args(["-c", "-q", "-f"])
            .arg(&path)
            .output()
            .expect("haproxy (./scripts/test installs it)");
        assert!(
            out.status.success(),
            "haproxy -c refused:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let render_with = |default_role: &str| {
        let t = d.write(
            "haproxy.cfg.j2",
            &example
                .replace("\"*:80\"", &format!("\"127.0.0.1:{bind}\""))
                .replace(
                    "default_role = \"\"",
                    &format!("default_role = \"{default_role}\""),
                ),
        );
        let cfg = config(&d, &eps, &t, "");
        async move {
            let r = render_once(&cfg, &["--dry-run"]).await;
            assert_eq!(r.code, 0, "{}", r.stderr);
            r.stdout
        }
    };
    let text = render_with("").await;
    haproxy_ok(&text);
    assert!(!text.contains("default_backend"), "{text}");
    assert!(!text.contains("batch"), "{text}");
    assert!(
        text.contains("backend api") && text.contains("backend web"),
        "{text}"
    );
    assert!(!text.contains("server a1"), "{text}");
    assert!(!text.contains("revision"), "{text}");
    // A default role with no healthy server is no default.
    let text = render_with("api").await;
    haproxy_ok(&text);
    assert!(!text.contains("default_backend"), "{text}");
    let text = render_with("web").await;
    haproxy_ok(&text);
    assert!(text.contains("default_backend web"), "{text}");

    // Running: meta changes in another DC and in this one rewrite nothing
    // and reload nothing.
    let t = d.path("haproxy.cfg.j2");
    let reloads = d.path("reloads");
    let metrics = free_port();
    let cfg = config(
        &d,
        &eps,
        &t,
        &format!(
            "    reload: [sh, -c, 'echo r >> {}']\n    wait: {{min: 50ms}}\n",
            reloads.display()
        ),
    );
    let listen = format!("127.0.0.1:{metrics}");
    let _render = spawn_render(&cfg, &["--metrics-listen", &listen]);
    let metric = |name: &'static str| async move {
        let text =
            crate::support::etcd::http_get(&format!("http://127.0.0.1:{metrics}/metrics")).await;
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(-1.0)
    };
    eventually(
        Duration::from_secs(10),
        "the first write and reload",
        || {
            let r = d.read("reloads").unwrap_or_default();
            async move { if r == "r\n" { Ok(()) } else { Err(r) } }
        },
    )
    .await;
    for i in 0..5 {
        for dc in ["dc1/web/w1", "dc2/web/x1"] {
            c.put(
                format!("/infrastructure/{dc}/meta/build"),
                i.to_string(),
                None,
            )
            .await
            .unwrap();
        }
    }
    // The last of them has been seen (and, for dc1, rendered) ...
    let rev = c
        .get("/infrastructure", None)
        .await
        .unwrap()
        .header()
        .map(|h| h.revision())
        .unwrap_or(0) as f64;
    eventually(
        Duration::from_secs(10),
        "the changes rendered",
        || async move {
            let (seen, rendered) = (
                metric("registrar_render_registry_revision").await,
                metric("registrar_render_rendered_revision").await,
            );
            if seen >= rev && rendered >= rev - 1.0 {
                Ok(())
            } else {
                Err(format!("seen {seen}, rendered {rendered}, want {rev}"))
            }
        },
    )
    .await;
    // ... and nothing was written or reloaded for them.
    assert_eq!(metric("registrar_render_writes_total").await, 1.0);
    assert_eq!(d.read("reloads").as_deref(), Some("r\n"));
}

/// Problems a render config can have are found when it is loaded, by
/// render and by check-config, which tells render's and dns's configs
/// from an agent's.
#[tokio::test]
async fn render_and_dns_configs_are_checked_at_load_time() {
    let d = Dir::new();
    let t = d.write("t.j2", LIST);
    let good = d.write(
        "good.yaml",
        &format!(
            "templates:\n  - source: {}\n    destination: {}\n    reload: [\"true\"]\n",
            t.display(),
            d.path("out.cfg").display()
        ),
    );
    let arg = |p: &Path| p.to_string_lossy().into_owned();
    let r = run(&["check-config", "--config", &arg(&good)]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("checked for: registrar render"),
        "{}",
        r.stdout
    );
    let dns = d.write("dns.yaml", "srv_min: {etcd.dc1: 3}\n");
    let r = run(&["check-config", "--config", &arg(&dns)]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("checked for: registrar dns"),
        "{}",
        r.stdout
    );
    let r = run(&["check-config", "--for", "agent", "--config", &arg(&dns)]).await;
    assert_eq!(r.code, 78, "{}", r.stderr);

    let broken = d.write("broken.j2", "{% for h in hosts() %}");
    std::os::unix::fs::symlink(d.path("out.cfg"), d.path("alias.cfg")).unwrap();
    let bad = d.write(
        "bad.yaml",
        &format!(
            "templates:\n\
             \x20 - source: {t}\n    destination: {out}\n    mode: \"4755\"\n    reload: [no-such-reload-program]\n\
             \x20 - source: {t}\n    destination: {alias}\n    mode: \"0666\"\n    check: [/nonexistent/haproxy, -c]\n",
            t = t.display(),
            out = d.path("out.cfg").display(),
            alias = d.path("alias.cfg").display(),
        ),
    );
    let r = run(&["check-config", "--config", &arg(&bad)]).await;
    assert_eq!(r.code, 78, "{}", r.stderr);
    for want in [
        "setuid",
        "every user write",
        "no program \"no-such-reload-program\"",
        "\"/nonexistent/haproxy\" is not an executable file",
        "also written by the template of",
    ] {
        assert!(r.stderr.contains(want), "no {want:?} in:\n{}", r.stderr);
    }
    let r = run(&["render", "--once", "--config", &arg(&bad)]).await;
    assert_eq!(r.code, 78, "{}", r.stderr);

    let unparsable = d.write(
        "unparsable.yaml",
        &format!(
            "templates:\n  - source: {}\n    destination: {}\n",
            broken.display(),
            d.path("out.cfg").display()
        ),
    );
    let r = run(&["check-config", "--config", &arg(&unparsable)]).await;
    assert_eq!(r.code, 78, "{}", r.stderr);
    assert!(
        r.stderr.contains("does not parse") && r.stderr.contains("broken.j2"),
        "{}",
        r.stderr
    );
}
