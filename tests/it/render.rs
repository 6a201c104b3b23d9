//! `registrar render`: templates over the registry, checked, written
//! atomically, reloaded; fail closed; and haproxy carrying real traffic.

use std::path::{Path, PathBuf};

use crate::support::Cluster;
use crate::support::proc::{cmd, host_args, run};

/// Registers one host one-shot with an http service.
async fn register(eps: &str, role: &str, host: &str, ip: &str, port: u16) {
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

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Dir {
        Dir {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }
    fn read(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.path(name)).ok()
    }
}

/// A render config with one template.
fn config(d: &Dir, eps: &str, template: &Path, extra: &str) -> PathBuf {
    d.write(
        "render.yaml",
        &format!(
            "endpoints: [{eps}]\ntemplates:\n  - source: {}\n    destination: {}\n{extra}",
            template.display(),
            d.path("out.cfg").display()
        ),
    )
}

async fn render_once(cfg: &Path, extra: &[&str]) -> crate::support::proc::Run {
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
