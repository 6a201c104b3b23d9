//! The Debian package that `./scripts/package` builds (./scripts/test builds
//! it before the tests): lintian, its contents, its units installed over
//! this machine's /usr in a private mount namespace and checked by
//! `systemd-analyze verify` with their man page, and its binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The package, or a failure that says how to build it.
fn deb() -> PathBuf {
    let path = std::env::var_os("REGISTRAR_DEB")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
                "target/debian/registrar_{}_amd64.deb",
                env!("CARGO_PKG_VERSION")
            ))
        });
    assert!(
        path.is_file(),
        "{} is missing: run ./scripts/package first (./scripts/test does)",
        path.display()
    );
    path
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}; ./scripts/test installs it"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The package unpacked into a scratch directory.
fn unpacked() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let out = run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb())
        .arg(root.path()));
    assert!(out.status.success(), "{}", text(&out));
    root
}

#[test]
fn lintian_reports_no_errors_or_warnings() {
    let out = run(Command::new("lintian")
        .args(["--fail-on", "error,warning", "--tag-display-limit", "0"])
        .arg(deb()));
    let said = text(&out);
    assert!(out.status.success(), "lintian:\n{said}");
    let tags: Vec<&str> = said
        .lines()
        .filter(|l| l.starts_with("E:") || l.starts_with("W:"))
        .collect();
    assert!(tags.is_empty(), "lintian:\n{said}");
}

#[test]
fn the_package_holds_every_file_and_marks_the_conffiles() {
    let out = run(Command::new("dpkg-deb").arg("-c").arg(deb()));
    assert!(out.status.success(), "{}", text(&out));
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut want = vec![
        "./usr/bin/registrar".to_string(),
        "./etc/registrar/registrar.yaml".into(),
        "./etc/registrar/render.yaml".into(),
        "./etc/registrar/dns.yaml".into(),
        "./etc/registrar/templates/haproxy.cfg.j2".into(),
        "./etc/default/registrar".into(),
        "./etc/default/registrar-dns".into(),
        "./usr/share/doc/registrar/examples/prometheus/file_sd.json.j2".into(),
        "./usr/share/bash-completion/completions/registrar".into(),
        "./usr/share/zsh/vendor-completions/_registrar".into(),
        "./usr/share/fish/vendor_completions.d/registrar.fish".into(),
        "./usr/share/doc/registrar/copyright".into(),
        "./usr/share/doc/registrar/changelog.gz".into(),
        "./usr/share/man/man1/registrar.1.gz".into(),
    ];
    for unit in [
        "registrar",
        "registrar-register",
        "registrar-render",
        "registrar-dns",
    ] {
        want.push(format!("./usr/lib/systemd/system/{unit}.service"));
    }
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
        "completions",
        "man",
    ] {
        want.push(format!("./usr/share/man/man1/registrar-{command}.1.gz"));
    }
    for file in &want {
        assert!(
            listing.lines().any(|l| l.ends_with(&format!(" {file}"))),
            "{file} is not in the package:\n{listing}"
        );
    }
    // The configs of the agent and of render may hold a password: root
    // only. dns's is read by the unit's dynamic user.
    for (mode, file) in [
        ("-rw------- 0/0", "./etc/registrar/registrar.yaml"),
        ("-rw------- 0/0", "./etc/registrar/render.yaml"),
        ("-rw-r--r-- 0/0", "./etc/registrar/dns.yaml"),
    ] {
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with(mode) && l.ends_with(file)),
            "{file} is not {mode}:\n{listing}"
        );
    }

    let control = tempfile::tempdir().unwrap();
    let out = run(Command::new("dpkg-deb")
        .arg("-e")
        .arg(deb())
        .arg(control.path()));
    assert!(out.status.success(), "{}", text(&out));
    let conffiles = std::fs::read_to_string(control.path().join("conffiles")).unwrap();
    let mut listed: Vec<&str> = conffiles.lines().collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            "/etc/default/registrar",
            "/etc/default/registrar-dns",
            "/etc/registrar/dns.yaml",
            "/etc/registrar/registrar.yaml",
            "/etc/registrar/render.yaml",
            "/etc/registrar/templates/haproxy.cfg.j2",
        ],
        "{conffiles}"
    );
    // Installed, not started: the scripts are debhelper's systemd snippets,
    // which start nothing, enable a unit again only when the admin had it
    // enabled (an upgrade), restart only a running one, and stop the units
    // on removal.
    let postinst = std::fs::read_to_string(control.path().join("postinst")).unwrap_or_default();
    let lines: Vec<&str> = postinst.lines().map(str::trim).collect();
    for (i, line) in lines.iter().enumerate() {
        assert!(
            !line.contains("deb-systemd-invoke start") && !line.contains("systemctl start"),
            "postinst starts a unit:\n{postinst}"
        );
        if line.starts_with("deb-systemd-helper enable") {
            assert!(
                lines[..i]
                    .iter()
                    .rev()
                    .take(3)
                    .any(|l| l.contains("was-enabled")),
                "postinst enables a unit the admin did not enable:\n{postinst}"
            );
        }
    }
    let prerm = std::fs::read_to_string(control.path().join("prerm")).unwrap_or_default();
    for unit in [
        "registrar",
        "registrar-register",
        "registrar-render",
        "registrar-dns",
    ] {
        assert!(
            prerm.contains(&format!("deb-systemd-invoke stop {unit}.service")),
            "prerm does not stop {unit}:\n{prerm}"
        );
    }
    let fields = std::fs::read_to_string(control.path().join("control")).unwrap();
    assert!(fields.contains("\nDepends: libc6"), "{fields}");
}

#[test]
fn installed_units_pass_systemd_analyze_verify_with_their_man_page() {
    let root = unpacked();
    // The package's /usr over this machine's, in a mount namespace of
    // this command only: the units see /usr/bin/registrar, /bin/kill and
    // systemd's own units, and `man` finds registrar(1).
    let script = format!(
        "mount -t overlay overlay -o lowerdir={}/usr:/usr /usr && \
         man -w registrar >/dev/null && \
         systemd-analyze verify --man=yes /usr/lib/systemd/system/registrar.service \
           /usr/lib/systemd/system/registrar-register.service \
           /usr/lib/systemd/system/registrar-render.service \
           /usr/lib/systemd/system/registrar-dns.service",
        root.path().display()
    );
    let out = run(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(&script));
    assert!(
        out.status.success(),
        "this test needs `unshare --mount` (root) and overlayfs; verify said:\n{}",
        text(&out)
    );
    assert!(
        !text(&out).contains("registrar"),
        "verify warned about a unit:\n{}",
        text(&out)
    );
}

#[test]
fn the_units_are_the_repository_units_with_the_binary_in_usr_bin() {
    let root = unpacked();
    for unit in [
        "registrar",
        "registrar-register",
        "registrar-render",
        "registrar-dns",
    ] {
        let source = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("systemd/{unit}.service")),
        )
        .unwrap();
        let packaged = std::fs::read_to_string(
            root.path()
                .join(format!("usr/lib/systemd/system/{unit}.service")),
        )
        .unwrap();
        assert_eq!(
            packaged,
            source.replace("/opt/bin/registrar", "/usr/bin/registrar"),
            "{unit}.service differs from systemd/{unit}.service"
        );
        assert!(!packaged.contains("/opt/bin"), "{unit}");
    }
}

#[test]
fn the_packaged_binary_runs_and_its_config_is_a_commented_template() {
    let root = unpacked();
    let bin = root.path().join("usr/bin/registrar");
    let out = run(Command::new(&bin).arg("--version"));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("registrar {}", env!("CARGO_PKG_VERSION"))
    );
    // Every setting is commented out: the file loads, and check-config and
    // the agent say what is missing before the agent can run.
    let config = root.path().join("etc/registrar/registrar.yaml");
    let text_of = std::fs::read_to_string(&config).unwrap();
    assert!(
        text_of
            .lines()
            .all(|l| l.trim().is_empty() || l.starts_with('#')),
        "{text_of}"
    );
    for command in ["check-config", "agent"] {
        let out = run(Command::new(&bin)
            .args([command, "--config"])
            .arg(&config)
            .env_clear());
        assert_eq!(out.status.code(), Some(78), "{}", text(&out));
        for missing in ["dc is not set", "no role is set"] {
            assert!(text(&out).contains(missing), "{}", text(&out));
        }
    }
}

/// The render and dns units work from the shipped files: dns's config is
/// valid as it is; render's lists no template, and says which file to edit
/// (exit 78, so systemd does not restart it in a loop). The shipped
/// haproxy template is where render.yaml's example points, and parses.
#[test]
fn the_shipped_render_and_dns_configs_say_what_to_edit_or_just_work() {
    let root = unpacked();
    let bin = root.path().join("usr/bin/registrar");
    let etc = root.path().join("etc/registrar");
    let check = |file: &str, for_: &str| {
        run(Command::new(&bin)
            .args(["check-config", "--for", for_, "--config"])
            .arg(etc.join(file))
            .env_clear())
    };
    let out = check("dns.yaml", "dns");
    assert!(out.status.success(), "{}", text(&out));
    let out = check("render.yaml", "render");
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "no templates in {}: add a `templates:` list there, or uncomment the example in it",
            etc.join("render.yaml").display()
        )),
        "{}",
        text(&out)
    );
    let render = std::fs::read_to_string(etc.join("render.yaml")).unwrap();
    assert!(
        render.contains("#  - source: /etc/registrar/templates/haproxy.cfg.j2"),
        "{render}"
    );
    // The example, uncommented and pointed at the unpacked tree, checks.
    let example = render
        .lines()
        .skip_while(|l| !l.starts_with("#templates:"))
        .take_while(|l| l.starts_with('#') && !l.contains("prometheus"))
        .map(|l| l.trim_start_matches('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(
            "/etc/registrar/templates",
            &etc.join("templates").to_string_lossy(),
        )
        .replace(
            "/etc/haproxy/haproxy.cfg",
            &root.path().join("haproxy.cfg").to_string_lossy(),
        )
        .replace("[systemctl, reload, haproxy]", "[\"true\"]")
        .lines()
        .filter(|l| !l.trim_start().starts_with("- source: /usr/share") && !l.contains("file_sd"))
        .collect::<Vec<_>>()
        .join("\n");
    let uncommented = root.path().join("render-example.yaml");
    std::fs::write(&uncommented, format!("{example}\n")).unwrap();
    let out = run(Command::new(&bin)
        .args(["check-config", "--for", "render", "--config"])
        .arg(&uncommented)
        .env("PATH", std::env::var("PATH").unwrap_or_default()));
    assert!(out.status.success(), "{example}\n{}", text(&out));
}
