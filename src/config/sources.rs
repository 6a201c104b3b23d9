//! Precedence: each setting is taken from its flag, its environment
//! variable, etcdctl's `ETCDCTL_*` variable (connection settings only), the
//! config file, or its default, in that order, and keeps where it came from
//! for error messages. The environment variable of a flag is named once, in
//! cli.rs, and read from clap's definition here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::origin::{Origin, Problems, file_origin, pick};
use super::raw::{FileSource, RawConfig};
use super::validate::*;
use super::*;
use crate::cli::{Common, LogFormat};
use crate::layout::{self, validate_segment};

/// Merges flags, environment and file into a [`Config`], in three steps,
/// and checks the result against etcd's transaction limits. Every problem
/// of every step is reported at once.
pub(super) fn merge(
    flags: &Common,
    env: &Env,
    raw: RawConfig,
    file: Option<&FileSource>,
) -> Result<Config, ConfigError> {
    let mut p = Problems {
        file,
        list: Vec::new(),
    };
    let (etcd, mut warnings) = connection(&mut p, flags, env, &raw, file);
    let id = identity(&mut p, flags, &raw);
    let mut reports = reporting(&mut p, flags, &raw);
    warnings.append(&mut reports.warnings);
    let fail_static = fail_static_field(
        &mut p,
        &Origin::File(vec!["fail_static".into()]),
        "fail_static",
        raw.fail_static.as_ref(),
        crate::registry::hold::FailStatic::default(),
    );
    let config = Config {
        etcd,
        prefix: id.prefix,
        dc: id.dc,
        roles: id.roles,
        host: id.host,
        address: id.address,
        ipv6: id.ipv6,
        allow_loopback: id.allow_loopback,
        ttl: id.ttl,
        machine_id: id.machine_id,
        state_dir: id.state_dir,
        log_format: id.log_format,
        services: reports.services,
        meta: reports.meta,
        checks: reports.checks,
        output_refresh: reports.output_refresh,
        metrics_listen: reports.metrics_listen,
        templates: templates_field(
            &mut p,
            raw.templates.as_deref().unwrap_or_default(),
            env.get("PATH").map(String::as_str),
            fail_static,
        ),
        srv_min: srv_min_field(&mut p, raw.srv_min.as_ref()),
        fail_static,
        source: file.map(|f| f.path.clone()),
        warnings,
    };
    if let Err(e) = config.check_txn_limits() {
        p.list.push(e);
    }
    if p.list.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError { problems: p.list })
    }
}

/// The etcd connection: endpoints, TLS, credentials, timeouts; with the
/// warnings about secrets readable by others.
fn connection(
    p: &mut Problems,
    flags: &Common,
    env: &Env,
    raw: &RawConfig,
    file: Option<&FileSource>,
) -> (EtcdConfig, Vec<String>) {
    let etcdctl = |name: &str| env.get(name).filter(|v| !v.is_empty()).cloned();
    let endpoints = pick(vec![
        (
            (!flags.connection.endpoints.is_empty()).then(|| flags.connection.endpoints.clone()),
            Origin::Flag("endpoints".into()),
        ),
        (
            etcdctl("ETCDCTL_ENDPOINTS")
                .map(|v| v.split(',').map(|s| s.trim().to_string()).collect()),
            Origin::Env("ETCDCTL_ENDPOINTS".into()),
        ),
        (raw.endpoints.clone(), file_origin("endpoints")),
    ])
    .unwrap_or((vec![DEFAULT_ENDPOINT.to_string()], Origin::Default));
    let endpoints_origin = endpoints.1.clone();
    let endpoints = validate_endpoints(p, endpoints);

    let path_opt = |flag: &Option<PathBuf>, name: &str, var: &str, raw: &Option<PathBuf>| {
        pick(vec![
            (flag.clone(), Origin::Flag(name.into())),
            (etcdctl(var).map(PathBuf::from), Origin::Env(var.into())),
            (raw.clone(), file_origin(name)),
        ])
    };
    let cacert = path_opt(
        &flags.connection.cacert,
        "cacert",
        "ETCDCTL_CACERT",
        &raw.cacert,
    );
    let cert = path_opt(&flags.connection.cert, "cert", "ETCDCTL_CERT", &raw.cert);
    let key = path_opt(&flags.connection.key, "key", "ETCDCTL_KEY", &raw.key);
    for (name, v) in [("cacert", &cacert), ("cert", &cert), ("key", &key)] {
        if let Some((path, origin)) = v
            && !path.is_file()
        {
            p.push(
                origin,
                name,
                format_args!("{} is not a readable file", path.display()),
            );
        }
    }
    if let Some((_, origin)) = match (&cert, &key) {
        (Some(c), None) => Some(c),
        (None, Some(k)) => Some(k),
        _ => None,
    } {
        p.push(
            origin,
            "cert",
            "a client certificate needs both cert and key",
        );
    }
    // TLS files with a plain http:// endpoint cannot work (etcd-client
    // refuses them at run time); an exported ETCDCTL_CACERT makes it easy.
    if let Some((_, origin)) = cacert.as_ref().or(cert.as_ref())
        && let Some(plain) = endpoints.iter().find(|e| e.starts_with("http://"))
    {
        p.push(
            origin,
            "cacert",
            format_args!(
                "TLS files are set, but endpoint {plain} (from {}) is plain http; use https:// endpoints, or unset the TLS files",
                p.describe(&endpoints_origin, "endpoints")
            ),
        );
    }
    let tls = (cacert.is_some() || cert.is_some()).then(|| TlsFiles {
        cacert: cacert.map(|v| v.0),
        cert: cert.map(|v| v.0),
        key: key.map(|v| v.0),
    });

    let user = pick(vec![
        (flags.connection.user.clone(), Origin::Flag("user".into())),
        (etcdctl("ETCDCTL_USER"), Origin::Env("ETCDCTL_USER".into())),
        (raw.user.clone(), file_origin("user")),
    ]);
    let password_file = pick(vec![
        (
            flags.connection.password_file.clone(),
            Origin::Flag("password-file".into()),
        ),
        (raw.password_file.clone(), file_origin("password_file")),
    ]);
    let mut warnings = Vec::new();
    if let Some((file, _)) = &password_file
        && let Some(w) = readable_by_others(file, "password file")
    {
        warnings.push(w);
    }
    if let (Some(f), Some((u, Origin::File(_)))) = (file, &user)
        && u.contains(':')
        && let Some(w) = readable_by_others(&f.path, "config file with a password")
    {
        warnings.push(w);
    }
    let user = validate_user(p, user, password_file);

    let request_timeout = duration_field(
        p,
        "request_timeout",
        flags.connection.request_timeout,
        "request-timeout",
        &raw.request_timeout,
        DEFAULT_REQUEST_TIMEOUT,
    );
    let connect_timeout = duration_field(
        p,
        "connect_timeout",
        flags.connection.connect_timeout,
        "connect-timeout",
        &raw.connect_timeout,
        DEFAULT_CONNECT_TIMEOUT,
    );

    (
        EtcdConfig {
            endpoints,
            tls,
            user,
            request_timeout,
            connect_timeout,
        },
        warnings,
    )
}

/// Who and where this host is: the key layout, the address, the TTL and
/// the machine id.
struct Placement {
    prefix: String,
    dc: Option<String>,
    roles: Vec<String>,
    host: Option<String>,
    address: AddressChoice,
    ipv6: bool,
    allow_loopback: bool,
    ttl: Duration,
    machine_id: Option<String>,
    state_dir: PathBuf,
    log_format: LogFormat,
}

fn identity(p: &mut Problems, flags: &Common, raw: &RawConfig) -> Placement {
    let (prefix, origin) = pick(vec![
        (
            flags.connection.prefix.clone(),
            Origin::Flag("prefix".into()),
        ),
        (raw.prefix.clone(), file_origin("prefix")),
    ])
    .unwrap_or((DEFAULT_PREFIX.to_string(), Origin::Default));
    if let Err(e) = layout::validate_prefix(&prefix) {
        p.push(&origin, "prefix", format_args!("{prefix:?} {e}"));
    }

    let dc = segment_field(p, "dc", flags.dc.clone(), &raw.dc);
    let host = segment_field(p, "host", flags.host.clone(), &raw.host);

    let (roles, origin) = pick(vec![
        (
            (!flags.roles.is_empty()).then(|| flags.roles.clone()),
            Origin::Flag("role".into()),
        ),
        (raw.roles.clone(), file_origin("roles")),
    ])
    .unwrap_or((Vec::new(), Origin::Default));
    let mut seen = std::collections::BTreeSet::new();
    for r in &roles {
        if let Err(e) = validate_segment(r) {
            p.push(&origin, "roles", format_args!("role {r:?} {e}"));
        } else if !seen.insert(r.as_str()) {
            p.push(&origin, "roles", format_args!("role {r:?} is listed twice"));
        }
    }

    let allow_loopback = flags.allow_loopback || raw.allow_loopback.unwrap_or(false);
    let ipv6 = flags.ipv6 || raw.ipv6.unwrap_or(false);
    let address = address_field(p, flags, raw, allow_loopback, ipv6);

    let ttl = duration_field(p, "ttl", flags.ttl, "ttl", &raw.ttl, DEFAULT_TTL);
    if !ttl.is_zero() && (ttl.subsec_nanos() != 0 || ttl < Duration::from_secs(1)) {
        let origin = if flags.ttl.is_some() {
            Origin::Flag("ttl".into())
        } else {
            file_origin("ttl")
        };
        p.push(
            &origin,
            "ttl",
            format_args!(
                "{} is not a whole number of seconds (at least 1s); etcd leases count in seconds",
                humantime::format_duration(ttl)
            ),
        );
    }
    if ttl > Duration::from_secs(24 * 3600) {
        p.push(
            &file_origin("ttl"),
            "ttl",
            "is longer than 24h; a dead host would stay registered that long",
        );
    }

    let machine_id = pick(vec![
        (flags.machine_id.clone(), Origin::Flag("machine-id".into())),
        (raw.machine_id.clone(), file_origin("machine_id")),
    ]);
    if let Some((id, origin)) = &machine_id
        && let Err(e) = crate::layout::validate_machine_id(id)
    {
        p.push(origin, "machine_id", e);
    }

    let state_dir = flags
        .state_dir
        .clone()
        .or(raw.state_dir.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let log_format = flags
        .connection
        .log_format
        .or(raw.log_format)
        .unwrap_or(LogFormat::Text);

    Placement {
        prefix,
        dc: dc.map(|v| v.0),
        roles,
        host: host.map(|v| v.0),
        address,
        ipv6,
        allow_loopback,
        ttl,
        machine_id: machine_id.map(|v| v.0),
        state_dir,
        log_format,
    }
}

/// What the host reports besides its address: services, meta, checks,
/// and where metrics are served.
struct Reports {
    services: BTreeMap<String, u16>,
    meta: BTreeMap<String, String>,
    checks: Vec<crate::check::Spec>,
    output_refresh: Duration,
    metrics_listen: Option<std::net::SocketAddr>,
    warnings: Vec<String>,
}

fn reporting(p: &mut Problems, flags: &Common, raw: &RawConfig) -> Reports {
    let mut services = BTreeMap::new();
    for (name, port, origin) in services_input(p, flags, raw) {
        if let Err(e) = validate_segment(&name) {
            p.push(
                &origin,
                "services",
                format_args!("service name {name:?} {e}"),
            );
            continue;
        }
        match u16::try_from(port) {
            Ok(port) if port != 0 => {
                services.insert(name, port);
            }
            _ => p.push(
                &origin,
                "services",
                format_args!("port {port} of service {name:?} is not in 1-65535"),
            ),
        }
    }
    let mut meta = BTreeMap::new();
    for (k, v, origin) in meta_input(p, flags, raw) {
        if let Err(e) = validate_segment(&k) {
            p.push(&origin, "meta", format_args!("meta key {k:?} {e}"));
            continue;
        }
        meta.insert(k, v);
    }

    let mut warnings = Vec::new();
    let checks = checks_field(p, raw.checks.as_deref().unwrap_or_default(), &mut warnings);
    let output_refresh = duration_field(
        p,
        "output_refresh",
        None,
        "output-refresh",
        &raw.output_refresh,
        DEFAULT_OUTPUT_REFRESH,
    );

    let metrics_listen = match pick(vec![
        (
            flags.connection.metrics_listen.clone(),
            Origin::Flag("metrics-listen".into()),
        ),
        (raw.metrics_listen.clone(), file_origin("metrics_listen")),
    ]) {
        None => None,
        Some((text, origin)) => match text.parse::<std::net::SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                p.push(
                    &origin,
                    "metrics_listen",
                    format_args!("{text:?} is not an address:port, e.g. 127.0.0.1:9477"),
                );
                None
            }
        },
    };

    Reports {
        services,
        meta,
        checks,
        output_refresh,
        metrics_listen,
        warnings,
    }
}
