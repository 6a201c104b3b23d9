//! The named checks of each setting. Each reports every problem it finds
//! to [`Problems`], naming the field, the bad value and where it came from,
//! and returns what can be used of the value.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::origin::{Origin, Problems, file_origin, pick};
use super::raw::{RawCheck, RawConfig, RawDuration};
use super::*;
use crate::cli::Common;
use crate::layout::validate_segment;

pub(super) fn validate_endpoints(
    p: &mut Problems,
    (eps, origin): (Vec<String>, Origin),
) -> Vec<String> {
    let mut out = Vec::new();
    if eps.is_empty() {
        p.push(&origin, "endpoints", "no endpoint given");
    }
    for ep in eps {
        let ep = ep.trim().to_string();
        let rest = ep
            .strip_prefix("http://")
            .or_else(|| ep.strip_prefix("https://"));
        match rest {
            Some(hostport) if !hostport.is_empty() && !hostport.contains('/') && ep.parse::<http_uri::Uri>().is_ok() => {
                out.push(ep)
            }
            Some(_) | None => p.push(
                &origin,
                "endpoints",
                format_args!("{ep:?} is not an etcd URL; write it like http://10.0.0.1:2379 or https://etcd1:2379"),
            ),
        }
    }
    out
}

/// A tiny URI sanity check without pulling `http` into our public API.
pub(super) mod http_uri {
    pub struct Uri;
    impl std::str::FromStr for Uri {
        type Err = ();
        fn from_str(s: &str) -> Result<Self, ()> {
            let rest = s.split_once("://").map(|x| x.1).ok_or(())?;
            let (host, port) = match rest.rsplit_once(':') {
                Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, Some(p)),
                _ => (rest, None),
            };
            if host.is_empty() || host.chars().any(|c| c.is_whitespace()) {
                return Err(());
            }
            if let Some(port) = port {
                port.parse::<u16>().map_err(|_| ())?;
            }
            Ok(Uri)
        }
    }
}

/// A warning when `path` can be read by users other than its owner.
pub(super) fn readable_by_others(path: &Path, what: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o044 != 0).then(|| {
        format!(
            "{what} {} is readable by other users (mode {:o}); run chmod 600 on it",
            path.display(),
            mode & 0o777
        )
    })
}

pub(super) fn validate_user(
    p: &mut Problems,
    user: Option<(String, Origin)>,
    password_file: Option<(PathBuf, Origin)>,
) -> Option<Credentials> {
    let (user, origin) = user?;
    let (name, password) = match (user.split_once(':'), password_file) {
        (Some((name, pw)), _) => (name.to_string(), pw.to_string()),
        (None, Some((file, fo))) => match std::fs::read_to_string(&file) {
            Ok(text) => (user.clone(), text.lines().next().unwrap_or("").to_string()),
            Err(e) => {
                p.push(
                    &fo,
                    "password_file",
                    format_args!("cannot read {}: {e}", file.display()),
                );
                return None;
            }
        },
        (None, None) => {
            p.push(
                &origin,
                "user",
                format_args!("user {user:?} has no password: write it as name:password or give --password-file"),
            );
            return None;
        }
    };
    if name.is_empty() {
        p.push(&origin, "user", "the user name is empty");
        return None;
    }
    Some(Credentials { name, password })
}

pub(super) fn duration_field(
    p: &mut Problems,
    field: &str,
    flag: Option<Duration>,
    flag_name: &str,
    raw: &Option<RawDuration>,
    default: Duration,
) -> Duration {
    if let Some(d) = flag {
        if d.is_zero() {
            p.push(
                &Origin::Flag(flag_name.into()),
                field,
                "must be greater than zero",
            );
        }
        return d;
    }
    let origin = file_origin(field);
    match raw {
        None => default,
        Some(raw) => match raw.parse() {
            Ok(d) => d,
            Err(msg) => {
                p.push(&origin, field, msg);
                default
            }
        },
    }
}

pub(super) fn segment_field(
    p: &mut Problems,
    field: &str,
    flag: Option<String>,
    raw: &Option<String>,
) -> Option<(String, Origin)> {
    let v = pick(vec![
        (flag, Origin::Flag(field.into())),
        (raw.clone(), file_origin(field)),
    ])?;
    if let Err(e) = validate_segment(&v.0) {
        p.push(&v.1, field, format_args!("{:?} {e}", v.0));
    }
    Some(v)
}

/// Why an address can never be a host's published address, if it cannot.
fn unpublishable(addr: &IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(v4) if v4.is_multicast() => Some("a multicast address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("a multicast address"),
        // fe80::/10 needs a zone (%eth0) that a registry value cannot carry.
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => {
            Some("a link-local address, usable only with a zone (%eth0) that consumers do not have")
        }
        _ => None,
    }
}

pub(super) fn address_field(
    p: &mut Problems,
    flags: &Common,
    raw: &RawConfig,
    allow_loopback: bool,
    ipv6: bool,
) -> AddressChoice {
    let ip = pick(vec![
        (flags.ip.clone(), Origin::Flag("ip".into())),
        (raw.ip.clone(), file_origin("ip")),
    ]);
    let interface = pick(vec![
        (flags.interface.clone(), Origin::Flag("interface".into())),
        (raw.interface.clone(), file_origin("interface")),
    ]);
    let cidr = pick(vec![
        (flags.cidr.clone(), Origin::Flag("cidr".into())),
        (raw.cidr.clone(), file_origin("cidr")),
    ]);
    let chosen = [ip.is_some(), interface.is_some(), cidr.is_some()]
        .iter()
        .filter(|x| **x)
        .count();
    if chosen > 1 {
        let origin = ip
            .as_ref()
            .or(interface.as_ref())
            .map(|v| v.1.clone())
            .unwrap_or(Origin::Default);
        p.push(&origin, "ip", "set only one of ip, interface and cidr");
    }
    if let Some((s, origin)) = ip {
        return match s.parse::<IpAddr>() {
            Ok(addr) => {
                if let Some(why) = unpublishable(&addr) {
                    p.push(
                        &origin,
                        "ip",
                        format_args!("{addr} is {why}; consumers could not reach this host at it"),
                    );
                } else if !allow_loopback && (addr.is_loopback() || addr.is_unspecified()) {
                    p.push(
                        &origin,
                        "ip",
                        format_args!("{addr} is a loopback or unspecified address; consumers could not reach it (set allow_loopback: true for tests)"),
                    );
                } else if ipv6 && addr.is_ipv4() {
                    p.push(
                        &origin,
                        "ip",
                        format_args!("{addr} is an IPv4 address but ipv6 is set; give an IPv6 address or drop ipv6"),
                    );
                }
                AddressChoice::Explicit(addr)
            }
            Err(_) => {
                p.push(&origin, "ip", format_args!("{s:?} is not an IP address"));
                AddressChoice::DefaultRoute
            }
        };
    }
    if let Some((s, origin)) = interface {
        if s.is_empty() || s.len() > 15 || s.contains('/') || s.chars().any(char::is_whitespace) {
            p.push(
                &origin,
                "interface",
                format_args!("{s:?} is not a network interface name"),
            );
        }
        return AddressChoice::Interface(s);
    }
    if let Some((s, origin)) = cidr {
        return match s.parse::<ipnet::IpNet>() {
            Ok(net) => {
                if matches!(net, ipnet::IpNet::V6(_)) != ipv6 && ipv6 {
                    p.push(
                        &origin,
                        "cidr",
                        format_args!("{net} is IPv4 but ipv6 is set"),
                    );
                }
                AddressChoice::Cidr(net)
            }
            Err(_) => {
                p.push(
                    &origin,
                    "cidr",
                    format_args!("{s:?} is not a network; write it like 10.0.0.0/8"),
                );
                AddressChoice::DefaultRoute
            }
        };
    }
    AddressChoice::DefaultRoute
}

pub(super) fn services_input(
    p: &mut Problems,
    flags: &Common,
    raw: &RawConfig,
) -> Vec<(String, u32, Origin)> {
    if !flags.services.is_empty() {
        let origin = Origin::Flag("service".into());
        let mut out: Vec<(String, u32, Origin)> = Vec::new();
        for s in &flags.services {
            match s.split_once('=').map(|(n, port)| (n, port.parse::<u32>())) {
                Some((n, Ok(_))) if out.iter().any(|(seen, ..)| seen == n) => p.push(
                    &origin,
                    "services",
                    format_args!("service {n:?} is given twice; give each service once"),
                ),
                Some((n, Ok(port))) => out.push((n.to_string(), port, origin.clone())),
                _ => p.push(
                    &origin,
                    "services",
                    format_args!("{s:?} is not NAME=PORT, e.g. http=8080"),
                ),
            }
        }
        return out;
    }
    raw.services
        .iter()
        .flatten()
        .map(|(n, port)| {
            (
                n.clone(),
                *port,
                Origin::File(vec!["services".into(), n.clone()]),
            )
        })
        .collect()
}

pub(super) fn meta_input(
    p: &mut Problems,
    flags: &Common,
    raw: &RawConfig,
) -> Vec<(String, String, Origin)> {
    let mut out = Vec::new();
    let mut keep = |p: &mut Problems, k: &str, v: String, origin: Origin| {
        if let Some(c) = v.chars().find(|c| c.is_control()) {
            p.push(
                &origin,
                "meta",
                format_args!(
                    "the value of {k:?} contains the control character {c:?}; give one line of text"
                ),
            );
        } else {
            out.push((k.to_string(), v, origin));
        }
    };
    if !flags.meta.is_empty() {
        let origin = Origin::Flag("meta".into());
        for s in &flags.meta {
            match s.split_once('=') {
                Some((k, v)) => keep(p, k, v.to_string(), origin.clone()),
                None => p.push(&origin, "meta", format_args!("{s:?} is not KEY=VALUE")),
            }
        }
        return out;
    }
    for (k, v) in raw.meta.iter().flatten() {
        let origin = Origin::File(vec!["meta".into(), k.clone()]);
        use serde_yaml::Value;
        let text = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Null => {
                p.push(
                    &origin,
                    "meta",
                    format_args!("{k:?} has no value (YAML reads ~ and null as nothing); quote it if you mean the text, e.g. \"~\""),
                );
                continue;
            }
            _ => {
                p.push(
                    &origin,
                    "meta",
                    format_args!("{k:?} must be a single value, not a list or a map"),
                );
                continue;
            }
        };
        keep(p, k, text, origin);
    }
    out
}

/// The shortest check interval accepted: more often is a fork storm.
const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// The largest threshold accepted.
const MAX_THRESHOLD: u32 = 1000;

/// The checks, validated. Odd but usable settings are warned about.
pub(super) fn checks_field(
    p: &mut Problems,
    raw: &[RawCheck],
    warnings: &mut Vec<String>,
) -> Vec<crate::check::Spec> {
    use crate::check::{Kind, Spec, Thresholds};
    let mut out = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for (i, c) in raw.iter().enumerate() {
        let label = c.name.clone().unwrap_or_else(|| format!("#{}", i + 1));
        let item = format!("[{i}]={label}");
        let origin = Origin::File(vec!["checks".into(), item.clone()]);
        let field = format!("checks[{label}]");
        let before = p.list.len();
        let name = match &c.name {
            None => {
                p.push(&origin, &field, "has no name");
                String::new()
            }
            Some(n) => {
                if let Err(e) = validate_segment(n) {
                    p.push(&origin, &field, format_args!("name {n:?} {e}"));
                } else if !names.insert(n.clone()) {
                    p.push(
                        &origin,
                        &field,
                        format_args!("the name {n:?} is used by two checks"),
                    );
                }
                n.clone()
            }
        };
        let kinds = [
            c.exec.is_some(),
            c.shell.is_some(),
            c.http.is_some(),
            c.tcp.is_some(),
        ];
        let kind = match kinds.iter().filter(|k| **k).count() {
            1 => {
                if let Some(argv) = &c.exec {
                    if argv.is_empty() || argv[0].is_empty() {
                        p.push(
                            &origin,
                            &field,
                            "exec needs a program: exec: [/usr/bin/check, arg]",
                        );
                    }
                    Some(Kind::Exec(argv.clone()))
                } else if let Some(line) = &c.shell {
                    if line.trim().is_empty() {
                        p.push(&origin, &field, "shell is empty");
                    }
                    Some(Kind::Shell(line.clone()))
                } else if let Some(url) = &c.http {
                    if crate::check::http::parse(url).is_err() {
                        p.push(
                            &origin,
                            &field,
                            format_args!("http {url:?} is not an http:// or https:// URL"),
                        );
                    }
                    Some(Kind::Http(url.clone()))
                } else if let Some(addr) = &c.tcp {
                    let ok = addr.rsplit_once(':').is_some_and(|(h, port)| {
                        !h.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
                    });
                    if !ok {
                        p.push(
                            &origin,
                            &field,
                            format_args!("tcp {addr:?} is not host:port"),
                        );
                    }
                    Some(Kind::Tcp(addr.clone()))
                } else {
                    None
                }
            }
            0 => {
                p.push(&origin, &field, "needs one of exec, shell, http or tcp");
                None
            }
            _ => {
                p.push(
                    &origin,
                    &field,
                    "has more than one of exec, shell, http and tcp",
                );
                None
            }
        };
        let dur = |p: &mut Problems, sub: &str, raw: &Option<RawDuration>, default: Duration| {
            let at = Origin::File(vec!["checks".into(), item.clone(), sub.into()]);
            match raw {
                None => default,
                Some(raw) => match raw.parse() {
                    Ok(d) => d,
                    Err(msg) => {
                        p.push(&at, &field, format_args!("{sub}: {msg}"));
                        default
                    }
                },
            }
        };
        let interval = dur(p, "interval", &c.interval, DEFAULT_CHECK_INTERVAL);
        let timeout = dur(p, "timeout", &c.timeout, DEFAULT_CHECK_TIMEOUT);
        let deregister_after = c.deregister_after.as_ref().map(|d| {
            dur(
                p,
                "deregister_after",
                &Some(d.clone()),
                Duration::from_secs(60),
            )
        });
        if interval < MIN_CHECK_INTERVAL {
            p.push(
                &Origin::File(vec!["checks".into(), item.clone(), "interval".into()]),
                &field,
                format_args!(
                    "interval: {} would run the check more than 10 times a second; use at least {}",
                    humantime::format_duration(interval),
                    humantime::format_duration(MIN_CHECK_INTERVAL)
                ),
            );
        }
        let threshold = |p: &mut Problems, sub: &str, v: Option<u32>, default: u32| match v {
            Some(0) => {
                p.push(&origin, &field, format_args!("{sub} must be at least 1"));
                1
            }
            Some(n) if n > MAX_THRESHOLD => {
                p.push(
                    &origin,
                    &field,
                    format_args!("{sub} {n} is more than {MAX_THRESHOLD} runs in a row; the status would practically never change"),
                );
                1
            }
            Some(n) => n,
            None => default,
        };
        let critical = threshold(p, "failures_before_critical", c.failures_before_critical, 1);
        // As in Consul, whose names these are: warning defaults to the
        // critical threshold, so `failures_before_critical: 3` alone rides
        // out two failures instead of flapping to warning on the first.
        let warning = threshold(
            p,
            "failures_before_warning",
            c.failures_before_warning,
            critical,
        );
        if warning > critical {
            p.push(
                &origin,
                &field,
                format_args!(
                    "failures_before_warning {warning} is more than failures_before_critical {critical}; \
                     a check turns warning on the way to critical, so warning must come first (or equal)"
                ),
            );
        }
        let thresholds = Thresholds {
            success_before_passing: threshold(
                p,
                "success_before_passing",
                c.success_before_passing,
                1,
            ),
            failures_before_warning: warning,
            failures_before_critical: critical,
        };
        if timeout > interval {
            warnings.push(format!(
                "check {label}: timeout {} is longer than interval {}; a slow run delays the next one",
                humantime::format_duration(timeout),
                humantime::format_duration(interval)
            ));
        }
        let slowest = interval.saturating_mul(thresholds.success_before_passing.max(critical));
        if slowest > Duration::from_secs(3600) {
            warnings.push(format!(
                "check {label}: its thresholds take {} of runs to change its status",
                humantime::format_duration(slowest)
            ));
        }
        if let Some(kind) = kind
            && p.list.len() == before
        {
            out.push(Spec {
                name,
                kind,
                interval,
                timeout,
                thresholds,
                deregister_after,
            });
        }
    }
    out
}

/// The templates of `registrar render`, validated: a readable source, an
/// absolute destination in an existing directory, written by one template
/// only (symlinks followed), commands whose program exists, `wait.min` no
/// longer than `wait.max` (which defaults to 4 × `wait.min`), an octal mode
/// that is neither setuid, setgid nor world-writable, known owner and
/// group, a positive `max_output`. `search_path` is the `PATH` that
/// programs without a `/` are looked up in.
pub(super) fn templates_field(
    p: &mut Problems,
    raw: &[super::RawTemplate],
    search_path: Option<&str>,
    fail_static: crate::registry::hold::FailStatic,
) -> Vec<TemplateSpec> {
    let mut out = Vec::new();
    // Each destination's final target → the first template writing it.
    let mut targets: BTreeMap<PathBuf, PathBuf> = BTreeMap::new();
    for (i, t) in raw.iter().enumerate() {
        let label = t
            .destination
            .as_ref()
            .map_or(format!("#{}", i + 1), |d| d.display().to_string());
        let item = format!("[{i}]={label}");
        let at = |sub: &str| Origin::File(vec!["templates".into(), item.clone(), sub.into()]);
        let field = format!("templates[{label}]");
        let before = p.list.len();
        let source = match &t.source {
            None => {
                p.push(&at("source"), &field, "has no source (the template file)");
                PathBuf::new()
            }
            Some(s) if !s.is_file() => {
                p.push(
                    &at("source"),
                    &field,
                    format_args!("source {} is not a readable file", s.display()),
                );
                s.clone()
            }
            Some(s) => s.clone(),
        };
        let destination = match &t.destination {
            None => {
                p.push(
                    &at("destination"),
                    &field,
                    "has no destination (the file to write)",
                );
                PathBuf::new()
            }
            Some(d) if !d.is_absolute() => {
                p.push(
                    &at("destination"),
                    &field,
                    format_args!("destination {} must be an absolute path", d.display()),
                );
                d.clone()
            }
            Some(d) if !d.parent().is_some_and(Path::is_dir) => {
                p.push(
                    &at("destination"),
                    &field,
                    format_args!(
                        "the directory of destination {} does not exist",
                        d.display()
                    ),
                );
                d.clone()
            }
            Some(d) => {
                let target = crate::render::link::target(d).unwrap_or_else(|_| d.clone());
                if let Some(first) = targets.get(&target) {
                    p.push(
                        &at("destination"),
                        &field,
                        format_args!(
                            "destination {} is also written by the template of {}{}; give each file one template",
                            d.display(),
                            first.display(),
                            if target == *d { String::new() } else { format!(" (both are {})", target.display()) }
                        ),
                    );
                } else {
                    targets.insert(target, d.clone());
                }
                d.clone()
            }
        };
        let argv = |p: &mut Problems, sub: &str, v: &Option<Vec<String>>| match v {
            Some(argv) if argv.first().is_none_or(|a| a.is_empty()) => {
                p.push(
                    &at(sub),
                    &field,
                    format_args!("{sub} needs a program: {sub}: [program, arg]"),
                );
                None
            }
            Some(argv) => {
                if let Some(why) = argv.first().and_then(|prog| unrunnable(prog, search_path)) {
                    p.push(&at(sub), &field, format_args!("{sub}: {why}"));
                }
                Some(argv.clone())
            }
            None => None,
        };
        let check = argv(p, "check", &t.check);
        let reload = argv(p, "reload", &t.reload);
        let dur =
            |p: &mut Problems, sub: &str, raw: Option<&RawDuration>, default: Duration| match raw {
                None => default,
                Some(RawDuration::Text(s)) if s.trim() == "0" || s.trim() == "0s" => Duration::ZERO,
                Some(raw) => match raw.parse() {
                    Ok(d) => d,
                    Err(msg) => {
                        p.push(&at(sub), &field, format_args!("{sub}: {msg}"));
                        default
                    }
                },
            };
        let wait = t.wait.as_ref();
        let wait_min = dur(p, "wait", wait.and_then(|w| w.min.as_ref()), Duration::ZERO);
        let wait_max = dur(p, "wait", wait.and_then(|w| w.max.as_ref()), wait_min * 4);
        if wait_min > wait_max {
            p.push(
                &at("wait"),
                &field,
                format_args!(
                    "wait.min {} is longer than wait.max {}",
                    humantime::format_duration(wait_min),
                    humantime::format_duration(wait_max)
                ),
            );
        }
        let command_timeout = dur(
            p,
            "command_timeout",
            t.command_timeout.as_ref(),
            Duration::from_secs(30),
        );
        let mode = t.mode.as_ref().and_then(|m| {
            match u32::from_str_radix(m.trim_start_matches("0o"), 8) {
                Ok(v) if v & 0o7000 != 0 && v <= 0o7777 => {
                    p.push(
                        &at("mode"),
                        &field,
                        format_args!(
                            "mode {m:?} sets the setuid, setgid or sticky bit; a rendered config file needs none: give e.g. \"0644\""
                        ),
                    );
                    None
                }
                Ok(v) if v & 0o002 != 0 && v <= 0o7777 => {
                    p.push(
                        &at("mode"),
                        &field,
                        format_args!(
                            "mode {m:?} lets every user write the file, and so rewrite the service's config: give e.g. \"0644\""
                        ),
                    );
                    None
                }
                Ok(v) if v <= 0o7777 => Some(v),
                _ => {
                    p.push(
                        &at("mode"),
                        &field,
                        format_args!("mode {m:?} is not an octal file mode like \"0644\""),
                    );
                    None
                }
            }
        });
        let owner = t
            .owner
            .as_ref()
            .and_then(|name| match nix::unistd::User::from_name(name) {
                Ok(Some(u)) => Some(u.uid.as_raw()),
                _ => {
                    p.push(
                        &at("owner"),
                        &field,
                        format_args!("owner {name:?} is not a user on this host"),
                    );
                    None
                }
            });
        let group = t
            .group
            .as_ref()
            .and_then(|name| match nix::unistd::Group::from_name(name) {
                Ok(Some(g)) => Some(g.gid.as_raw()),
                _ => {
                    p.push(
                        &at("group"),
                        &field,
                        format_args!("group {name:?} is not a group on this host"),
                    );
                    None
                }
            });
        let max_output = match &t.max_output {
            None => DEFAULT_MAX_OUTPUT,
            Some(raw) => match raw.parse().map(usize::try_from) {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => {
                    p.push(
                        &at("max_output"),
                        &field,
                        "max_output is too large for this machine",
                    );
                    DEFAULT_MAX_OUTPUT
                }
                Err(msg) => {
                    p.push(&at("max_output"), &field, format_args!("max_output: {msg}"));
                    DEFAULT_MAX_OUTPUT
                }
            },
        };
        let fail_static = fail_static_field(
            p,
            &at("fail_static"),
            &field,
            t.fail_static.as_ref(),
            fail_static,
        );
        let haproxy = t.haproxy.as_ref().and_then(|h| {
            let socket = match &h.socket {
                Some(s) if s.is_absolute() => Some(s.clone()),
                Some(s) => {
                    p.push(
                        &at("haproxy"),
                        &field,
                        format_args!(
                            "haproxy.socket {} must be an absolute path (haproxy.cfg's `stats socket PATH level admin`)",
                            s.display()
                        ),
                    );
                    None
                }
                None => {
                    p.push(
                        &at("haproxy"),
                        &field,
                        "haproxy needs a socket: haproxy: {socket: /run/haproxy/admin.sock} (haproxy.cfg's `stats socket PATH level admin`)",
                    );
                    None
                }
            };
            if reload.is_none() {
                p.push(
                    &at("haproxy"),
                    &field,
                    "haproxy needs a reload as well: what the runtime API cannot change (a new backend, a changed setting) still takes one, e.g. reload: [systemctl, reload, haproxy]",
                );
            }
            let drain = dur(p, "haproxy", h.drain.as_ref(), super::DEFAULT_DRAIN);
            socket.map(|socket| super::HaproxySpec { socket, drain })
        });
        if p.list.len() == before {
            out.push(TemplateSpec {
                source,
                destination,
                check,
                reload,
                wait_min,
                wait_max,
                min_hosts: t.min_hosts,
                mode,
                owner,
                group,
                command_timeout,
                max_output,
                fail_static,
                haproxy,
            });
        }
    }
    out
}

/// `fail_static: {settle, max_drop}`, each part defaulting to `default`'s.
/// `settle: 0s` turns holding off.
pub(super) fn fail_static_field(
    p: &mut Problems,
    at: &Origin,
    field: &str,
    raw: Option<&super::RawFailStatic>,
    default: crate::registry::hold::FailStatic,
) -> crate::registry::hold::FailStatic {
    let Some(raw) = raw else { return default };
    let settle = match &raw.settle {
        None => default.settle,
        Some(RawDuration::Text(s)) if s.trim() == "0" || s.trim() == "0s" => Duration::ZERO,
        Some(d) => d.parse().unwrap_or_else(|msg| {
            p.push(at, field, format_args!("fail_static.settle: {msg}"));
            default.settle
        }),
    };
    let max_drop = match &raw.max_drop {
        None => default.max_drop,
        Some(m) => m.parse().unwrap_or_else(|msg| {
            p.push(at, field, format_args!("fail_static.max_drop: {msg}"));
            default.max_drop
        }),
    };
    crate::registry::hold::FailStatic { settle, max_drop }
}

/// Why `program` could not be started, if that can be told now: a path
/// that is not an executable file, or a name that no directory of
/// `search_path` has as one.
fn unrunnable(program: &str, search_path: Option<&str>) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        return (!executable(Path::new(program)))
            .then(|| format!("{program:?} is not an executable file"));
    }
    // Without PATH, systemd's default.
    let dirs =
        search_path.unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    if std::env::split_paths(dirs).any(|d| executable(&d.join(program))) {
        return None;
    }
    Some(format!(
        "no program {program:?} in PATH ({dirs}); install it or give its full path"
    ))
}

/// `srv_min`, validated: each key is `<role>.<dc>` made of valid segments,
/// each value a whole number of hosts from 1 up.
pub(super) fn srv_min_field(
    p: &mut Problems,
    raw: Option<&BTreeMap<String, i64>>,
) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for (name, value) in raw.into_iter().flatten() {
        let at = Origin::File(vec!["srv_min".into(), name.clone()]);
        let field = format!("srv_min[{name}]");
        let parts: Vec<&str> = name.split('.').collect();
        if parts.len() < 2 {
            p.push(
                &at,
                &field,
                format_args!("{name:?} is not <role>.<dc>, e.g. etcd.dc1"),
            );
            continue;
        }
        if let Some((part, e)) = parts
            .iter()
            .find_map(|s| crate::layout::validate_segment(s).err().map(|e| (s, e)))
        {
            p.push(&at, &field, format_args!("{name:?}: {part:?} {e}"));
            continue;
        }
        match usize::try_from(*value) {
            Ok(n) if n >= 1 => {
                out.insert(name.to_ascii_lowercase(), n);
            }
            _ => p.push(
                &at,
                &field,
                format_args!(
                    "{value} is not a number of hosts; give 1 or more, e.g. `etcd.dc1: 3`"
                ),
            ),
        }
    }
    out
}
