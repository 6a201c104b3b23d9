//! Configuration: the raw YAML file, flags and environment merged into one
//! validated [`Config`].
//!
//! Precedence is flag > `REGISTRAR_*` environment > etcdctl's `ETCDCTL_*`
//! (connection settings only) > config file > default. Validation runs before
//! any side effect and reports every problem at once, each naming the field,
//! the bad value and where it came from (file:line:col for the file).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cli::{Common, LogFormat};
use crate::layout::{self, validate_segment};

/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;
/// etcd's default `--max-request-bytes` (1.5 MiB).
pub const MAX_TXN_BYTES: usize = 1536 * 1024;
/// Keys a registration may grow into per role beyond services, meta and
/// checks: ip, health, owner, maintenance.
const FIXED_KEYS_PER_ROLE: usize = 4;
/// Overhead per operation in a txn request (protobuf framing, lease id).
const PER_OP_OVERHEAD: usize = 32;

pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";
pub const DEFAULT_PREFIX: &str = "/infrastructure";
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);
pub const DEFAULT_STATE_DIR: &str = "/var/lib/registrar";
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const DEFAULT_OUTPUT_REFRESH: Duration = Duration::from_secs(300);
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The config file as written. Every field is optional: flags and the
/// environment may supply it instead.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// etcd endpoints, e.g. `[https://10.0.0.1:2379, https://10.0.0.2:2379]`.
    pub endpoints: Option<Vec<String>>,
    /// Registry prefix, default `/infrastructure`.
    pub prefix: Option<String>,
    /// Datacenter segment.
    pub dc: Option<String>,
    /// Roles of this host; all share one lease.
    pub roles: Option<Vec<String>>,
    /// Host name segment; default the short hostname.
    pub host: Option<String>,
    /// Explicit address to publish.
    pub ip: Option<String>,
    /// Interface whose first address is published.
    pub interface: Option<String>,
    /// Network inside which the published address is chosen.
    pub cidr: Option<String>,
    /// Detect IPv6 instead of IPv4.
    pub ipv6: Option<bool>,
    /// Accept loopback/unspecified addresses.
    pub allow_loopback: Option<bool>,
    /// Lease TTL (humantime).
    pub ttl: Option<RawDuration>,
    /// Machine id override.
    pub machine_id: Option<String>,
    /// CA bundle for etcd's certificate.
    pub cacert: Option<PathBuf>,
    /// Client certificate.
    pub cert: Option<PathBuf>,
    /// Client key.
    pub key: Option<PathBuf>,
    /// etcd user, `name:password` or `name` with `password_file`.
    pub user: Option<String>,
    /// File holding the etcd password.
    pub password_file: Option<PathBuf>,
    /// Persistent state directory.
    pub state_dir: Option<PathBuf>,
    /// `text` or `json`.
    pub log_format: Option<LogFormat>,
    /// Service name → port.
    pub services: Option<BTreeMap<String, u32>>,
    /// Operator-defined key → value.
    pub meta: Option<BTreeMap<String, String>>,
    /// Per-request timeout.
    pub request_timeout: Option<RawDuration>,
    /// Connect timeout.
    pub connect_timeout: Option<RawDuration>,
    /// Local health checks.
    pub checks: Option<Vec<RawCheck>>,
    /// Address for Prometheus metrics and /health, e.g. 127.0.0.1:9477.
    pub metrics_listen: Option<String>,
    /// How often a change of check output alone is written (default 5m).
    pub output_refresh: Option<RawDuration>,
}

/// One health check as written in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCheck {
    /// Unique name; becomes `checks/<name>`.
    pub name: Option<String>,
    /// Program and arguments, run without a shell.
    pub exec: Option<Vec<String>>,
    /// A command line for /bin/sh -c (explicit opt-in to a shell).
    pub shell: Option<String>,
    /// URL fetched with GET.
    pub http: Option<String>,
    /// host:port to connect to.
    pub tcp: Option<String>,
    /// How often to run (default 10s).
    pub interval: Option<RawDuration>,
    /// Bound on one run (default 5s).
    pub timeout: Option<RawDuration>,
    /// Consecutive successes before passing (default 1).
    pub success_before_passing: Option<u32>,
    /// Consecutive failures before warning (default 1).
    pub failures_before_warning: Option<u32>,
    /// Consecutive failures before critical (default 1).
    pub failures_before_critical: Option<u32>,
    /// Withdraw the host's keys while this check has been critical this long.
    pub deregister_after: Option<RawDuration>,
}

/// A duration as written in YAML: normally `30s`; a bare number is caught so
/// the error can say that the unit is missing.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawDuration {
    Text(String),
    Number(f64),
}

/// User credentials for etcd. `Debug` and `Display` never show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub name: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Credentials {{ name: {:?}, password: <redacted> }}",
            self.name
        )
    }
}

/// TLS files for the etcd connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TlsFiles {
    pub cacert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub tls: Option<TlsFiles>,
    pub user: Option<Credentials>,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
}

/// How the published address is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressChoice {
    Explicit(IpAddr),
    Interface(String),
    Cidr(ipnet::IpNet),
    DefaultRoute,
}

/// The validated configuration every command works from.
#[derive(Debug, Clone)]
pub struct Config {
    pub etcd: EtcdConfig,
    pub prefix: String,
    pub dc: Option<String>,
    pub roles: Vec<String>,
    pub host: Option<String>,
    pub address: AddressChoice,
    pub ipv6: bool,
    pub allow_loopback: bool,
    pub ttl: Duration,
    pub machine_id: Option<String>,
    pub state_dir: PathBuf,
    pub log_format: LogFormat,
    pub services: BTreeMap<String, u16>,
    pub meta: BTreeMap<String, String>,
    pub checks: Vec<crate::check::Spec>,
    pub output_refresh: Duration,
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The file the config came from, for messages and reload.
    pub source: Option<PathBuf>,
    /// Things worth a warning that do not make the config invalid (logged
    /// once logging is set up).
    pub warnings: Vec<String>,
}

/// Every problem found in a configuration, reported together.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "invalid configuration ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    fn one(p: impl Into<String>) -> Self {
        Self {
            problems: vec![p.into()],
        }
    }
}

/// A snapshot of the process environment, passed in rather than read
/// globally so that tests can supply their own.
pub type Env = HashMap<String, String>;

/// The config file's text and where its fields are, for error positions.
struct FileSource {
    path: PathBuf,
    text: String,
}

impl FileSource {
    /// `file:line:col` of a top-level field (or of `field.sub` one level
    /// below), or just the file when it cannot be found.
    fn locate(&self, path: &[&str]) -> String {
        let file = self.path.display();
        let mut want = path.iter();
        let Some(mut name) = want.next() else {
            return file.to_string();
        };
        // Lines at or deeper than `min_indent` belong to the current parent;
        // the top level is searched at indentation 0 exactly.
        let mut min_indent = 0usize;
        let mut top = true;
        let mut item_indent: Option<usize> = None;
        let mut items_seen = 0usize;
        let mut found = None;
        for (i, line) in self.text.lines().enumerate() {
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let raw_indent = line.len() - trimmed.len();
            // "- key:" starts a list item whose keys sit two columns in.
            let item = trimmed.starts_with("- ");
            let indent = if item { raw_indent + 2 } else { raw_indent };
            if found.is_some() && indent < min_indent {
                break;
            }
            let indent_ok = if top {
                raw_indent == 0
            } else {
                indent >= min_indent
            };
            let key = trimmed.trim_start_matches("- ");
            let value_of = |k: &str| {
                key.strip_prefix(k)
                    .and_then(|r| r.trim_start().strip_prefix(':'))
                    .map(|r| r.trim().trim_matches('"').trim_matches('\'').to_string())
            };
            // "[i]=label" is the i-th item of a list.
            let index = name
                .strip_prefix('[')
                .and_then(|r| r.split_once(']'))
                .and_then(|(n, _)| n.parse::<usize>().ok());
            let (matches, by_value) = match index {
                Some(want_index) => {
                    let here = item && indent_ok;
                    if here {
                        items_seen += 1;
                    }
                    (here && items_seen == want_index + 1, true)
                }
                None => (
                    value_of(name).is_some() || value_of(&format!("\"{name}\"")).is_some(),
                    false,
                ),
            };
            if indent_ok && matches {
                found = Some((i + 1, raw_indent + 1));
                match want.next() {
                    Some(next) => {
                        name = next;
                        top = false;
                        // The siblings of a list item's `name:` are its fields.
                        min_indent = if by_value { indent } else { indent + 1 };
                        item_indent = by_value.then_some(indent);
                    }
                    None => break,
                }
            } else if item_indent.is_some_and(|at| item && indent <= at) {
                // The next list item began before the field was found: the
                // item's own line is the best position.
                break;
            }
        }
        match found {
            Some((line, col)) => format!("{file}:{line}:{col}"),
            None => file.to_string(),
        }
    }
}

/// Where one value came from, for error messages.
fn flag_label(flag: &str, env: &str) -> String {
    format!("--{flag} (or {env})")
}

/// Collects problems during validation.
struct Problems<'a> {
    file: Option<&'a FileSource>,
    list: Vec<String>,
}

impl Problems<'_> {
    fn push(&mut self, origin: &Origin, field: &str, msg: impl fmt::Display) {
        let at = match origin {
            Origin::Flag(label) => label.clone(),
            Origin::Env(name) => name.clone(),
            Origin::File(path) => match self.file {
                Some(f) => {
                    let parts: Vec<&str> = path.iter().map(String::as_str).collect();
                    // "[i]=label" locates by index and shows the label.
                    let shown = path
                        .iter()
                        .map(|p| match p.split_once("]=") {
                            Some((_, label)) => format!("[{label}]"),
                            None => format!(".{p}"),
                        })
                        .collect::<String>();
                    format!("{}: {}", f.locate(&parts), shown.trim_start_matches('.'))
                }
                None => field.to_string(),
            },
            Origin::Default => format!("{field} (default)"),
        };
        self.list.push(format!("{at}: {msg}"));
    }
}

/// Where a value came from.
#[derive(Debug, Clone)]
enum Origin {
    Flag(String),
    Env(String),
    File(Vec<String>),
    Default,
}

fn file_origin(field: &str) -> Origin {
    Origin::File(vec![field.to_string()])
}

/// Picks the first present value by precedence, with its origin.
fn pick<T>(candidates: Vec<(Option<T>, Origin)>) -> Option<(T, Origin)> {
    candidates.into_iter().find_map(|(v, o)| v.map(|v| (v, o)))
}

impl Config {
    /// Loads and validates the configuration from flags, environment and the
    /// optional config file. Touches nothing but the config and password files.
    pub fn load(flags: &Common, env: &Env) -> Result<Config, ConfigError> {
        let (raw, file) = match &flags.config {
            Some(path) => {
                let text = read_config_file(path)?;
                let raw = parse_yaml(path, &text)?;
                (
                    raw,
                    Some(FileSource {
                        path: path.clone(),
                        text,
                    }),
                )
            }
            None => (RawConfig::default(), None),
        };
        Self::merge(flags, env, raw, file.as_ref())
    }

    /// Parses a config file on its own (used by reload and tests).
    pub fn parse_file(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = read_config_file(path)?;
        parse_yaml(path, &text)
    }

    fn merge(
        flags: &Common,
        env: &Env,
        raw: RawConfig,
        file: Option<&FileSource>,
    ) -> Result<Config, ConfigError> {
        let mut p = Problems {
            file,
            list: Vec::new(),
        };
        let etcdctl = |name: &str| env.get(name).filter(|v| !v.is_empty()).cloned();

        // --- connection ---
        let endpoints = pick(vec![
            (
                (!flags.endpoints.is_empty()).then(|| flags.endpoints.clone()),
                Origin::Flag(flag_label("endpoints", "REGISTRAR_ENDPOINTS")),
            ),
            (
                etcdctl("ETCDCTL_ENDPOINTS")
                    .map(|v| v.split(',').map(|s| s.trim().to_string()).collect()),
                Origin::Env("ETCDCTL_ENDPOINTS".into()),
            ),
            (raw.endpoints.clone(), file_origin("endpoints")),
        ])
        .unwrap_or((vec![DEFAULT_ENDPOINT.to_string()], Origin::Default));
        let endpoints = validate_endpoints(&mut p, endpoints);

        let path_opt = |flag: &Option<PathBuf>, name: &str, var: &str, raw: &Option<PathBuf>| {
            pick(vec![
                (
                    flag.clone(),
                    Origin::Flag(flag_label(
                        name,
                        &format!("REGISTRAR_{}", name.to_uppercase()),
                    )),
                ),
                (etcdctl(var).map(PathBuf::from), Origin::Env(var.into())),
                (raw.clone(), file_origin(name)),
            ])
        };
        let cacert = path_opt(&flags.cacert, "cacert", "ETCDCTL_CACERT", &raw.cacert);
        let cert = path_opt(&flags.cert, "cert", "ETCDCTL_CERT", &raw.cert);
        let key = path_opt(&flags.key, "key", "ETCDCTL_KEY", &raw.key);
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
        let tls = (cacert.is_some() || cert.is_some()).then(|| TlsFiles {
            cacert: cacert.map(|v| v.0),
            cert: cert.map(|v| v.0),
            key: key.map(|v| v.0),
        });

        let user = pick(vec![
            (
                flags.user.clone(),
                Origin::Flag(flag_label("user", "REGISTRAR_USER")),
            ),
            (etcdctl("ETCDCTL_USER"), Origin::Env("ETCDCTL_USER".into())),
            (raw.user.clone(), file_origin("user")),
        ]);
        let password_file = pick(vec![
            (
                flags.password_file.clone(),
                Origin::Flag(flag_label("password-file", "REGISTRAR_PASSWORD_FILE")),
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
        let user = validate_user(&mut p, user, password_file);

        let request_timeout = duration_field(
            &mut p,
            "request_timeout",
            flags.request_timeout,
            "request-timeout",
            &raw.request_timeout,
            DEFAULT_REQUEST_TIMEOUT,
        );
        let connect_timeout = duration_field(
            &mut p,
            "connect_timeout",
            flags.connect_timeout,
            "connect-timeout",
            &raw.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
        );

        // --- identity and layout ---
        let (prefix, origin) = pick(vec![
            (
                flags.prefix.clone(),
                Origin::Flag(flag_label("prefix", "REGISTRAR_PREFIX")),
            ),
            (raw.prefix.clone(), file_origin("prefix")),
        ])
        .unwrap_or((DEFAULT_PREFIX.to_string(), Origin::Default));
        if let Err(e) = layout::validate_prefix(&prefix) {
            p.push(&origin, "prefix", format_args!("{prefix:?} {e}"));
        }

        let dc = segment_field(&mut p, "dc", flags.dc.clone(), &raw.dc);
        let host = segment_field(&mut p, "host", flags.host.clone(), &raw.host);

        let (roles, origin) = pick(vec![
            (
                (!flags.roles.is_empty()).then(|| flags.roles.clone()),
                Origin::Flag(flag_label("role", "REGISTRAR_ROLE")),
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
        let address = address_field(&mut p, flags, &raw, allow_loopback, ipv6);

        let ttl = duration_field(&mut p, "ttl", flags.ttl, "ttl", &raw.ttl, DEFAULT_TTL);
        if !ttl.is_zero() && (ttl.subsec_nanos() != 0 || ttl < Duration::from_secs(1)) {
            let origin = if flags.ttl.is_some() {
                Origin::Flag(flag_label("ttl", "REGISTRAR_TTL"))
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
            (
                flags.machine_id.clone(),
                Origin::Flag(flag_label("machine-id", "REGISTRAR_MACHINE_ID")),
            ),
            (raw.machine_id.clone(), file_origin("machine_id")),
        ]);
        if let Some((id, origin)) = &machine_id
            && let Err(e) = crate::identity::validate_machine_id(id)
        {
            p.push(origin, "machine_id", e);
        }

        let state_dir = flags
            .state_dir
            .clone()
            .or(raw.state_dir.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let log_format = flags
            .log_format
            .or(raw.log_format)
            .unwrap_or(LogFormat::Text);

        // --- services and meta ---
        let mut services = BTreeMap::new();
        for (name, port, origin) in services_input(&mut p, flags, &raw) {
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
        for (k, v, origin) in meta_input(&mut p, flags, &raw) {
            if let Err(e) = validate_segment(&k) {
                p.push(&origin, "meta", format_args!("meta key {k:?} {e}"));
                continue;
            }
            meta.insert(k, v);
        }

        let checks = checks_field(&mut p, raw.checks.as_deref().unwrap_or_default());
        let output_refresh = duration_field(
            &mut p,
            "output_refresh",
            None,
            "output-refresh",
            &raw.output_refresh,
            DEFAULT_OUTPUT_REFRESH,
        );

        let metrics_listen = match pick(vec![
            (
                flags.metrics_listen.clone(),
                Origin::Flag(flag_label("metrics-listen", "REGISTRAR_METRICS_LISTEN")),
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

        let config = Config {
            etcd: EtcdConfig {
                endpoints,
                tls,
                user,
                request_timeout,
                connect_timeout,
            },
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
            services,
            meta,
            checks,
            output_refresh,
            metrics_listen,
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

    /// Checks that a registration of this config fits in one etcd
    /// transaction (contract rule 7), counting the longest host name.
    fn check_txn_limits(&self) -> Result<(), String> {
        let roles = self.roles.len().max(1);
        let per_role =
            FIXED_KEYS_PER_ROLE + self.services.len() + self.meta.len() + self.checks.len();
        let ops = roles * per_role;
        if ops > MAX_TXN_OPS {
            return Err(format!(
                "a registration would need {ops} keys ({roles} roles x {per_role} keys each) but etcd \
                 allows {MAX_TXN_OPS} operations per transaction; use fewer roles, services, meta keys or checks"
            ));
        }
        let dir_len = self.prefix.len() + 3 * (layout::MAX_SEGMENT_LEN + 1);
        let leaf_bytes: usize = self
            .services
            .keys()
            .map(|k| dir_len + 9 + k.len() + 5 + PER_OP_OVERHEAD)
            .chain(
                self.meta
                    .iter()
                    .map(|(k, v)| dir_len + 5 + k.len() + v.len() + PER_OP_OVERHEAD),
            )
            .chain(self.checks.iter().map(|c| {
                // {"status":..,"output":<4 KiB, JSON-escaped up to 6x>,"since":..}
                dir_len + 7 + c.name.len() + 6 * crate::check::MAX_OUTPUT + 96 + PER_OP_OVERHEAD
            }))
            .sum::<usize>()
            + FIXED_KEYS_PER_ROLE * (dir_len + 16 + 256 + PER_OP_OVERHEAD);
        let bytes = roles * leaf_bytes * 2;
        if bytes > MAX_TXN_BYTES {
            return Err(format!(
                "a registration would be about {bytes} bytes but etcd accepts {MAX_TXN_BYTES} per \
                 transaction; shorten the meta values or use fewer checks or roles"
            ));
        }
        Ok(())
    }

    /// The configuration as check-config prints it: every effective value,
    /// never a password.
    pub fn to_display_yaml(&self) -> String {
        #[derive(Serialize)]
        struct Shown<'a> {
            endpoints: &'a [String],
            prefix: &'a str,
            dc: &'a Option<String>,
            roles: &'a [String],
            host: &'a Option<String>,
            address: String,
            allow_loopback: bool,
            ttl: String,
            machine_id: &'a Option<String>,
            tls: &'a Option<TlsFiles>,
            user: Option<String>,
            state_dir: &'a Path,
            log_format: LogFormat,
            request_timeout: String,
            connect_timeout: String,
            services: &'a BTreeMap<String, u16>,
            meta: &'a BTreeMap<String, String>,
            output_refresh: String,
            checks: Vec<BTreeMap<&'static str, String>>,
            metrics_listen: Option<String>,
        }
        let address = match &self.address {
            AddressChoice::Explicit(ip) => format!("ip {ip}"),
            AddressChoice::Interface(i) => {
                format!("first {} address of interface {i}", self.family())
            }
            AddressChoice::Cidr(n) => format!("first local address in {n}"),
            AddressChoice::DefaultRoute => {
                format!(
                    "first {} address of the default-route interface",
                    self.family()
                )
            }
        };
        let shown = Shown {
            endpoints: &self.etcd.endpoints,
            prefix: &self.prefix,
            dc: &self.dc,
            roles: &self.roles,
            host: &self.host,
            address,
            allow_loopback: self.allow_loopback,
            ttl: humantime::format_duration(self.ttl).to_string(),
            machine_id: &self.machine_id,
            tls: &self.etcd.tls,
            user: self
                .etcd
                .user
                .as_ref()
                .map(|u| format!("{} (password hidden)", u.name)),
            state_dir: &self.state_dir,
            log_format: self.log_format,
            request_timeout: humantime::format_duration(self.etcd.request_timeout).to_string(),
            connect_timeout: humantime::format_duration(self.etcd.connect_timeout).to_string(),
            services: &self.services,
            meta: &self.meta,
            output_refresh: humantime::format_duration(self.output_refresh).to_string(),
            checks: self.checks.iter().map(check_display).collect(),
            metrics_listen: self.metrics_listen.map(|a| a.to_string()),
        };
        serde_yaml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    fn family(&self) -> &'static str {
        if self.ipv6 { "IPv6" } else { "IPv4" }
    }

    /// The fields a registering command cannot do without.
    pub fn require_registration_fields(&self) -> Result<(String, Vec<String>), ConfigError> {
        let mut problems = Vec::new();
        if self.dc.is_none() {
            problems.push(
                "dc is not set: pass --dc, set REGISTRAR_DC, or add `dc:` to the config file"
                    .to_string(),
            );
        }
        if self.roles.is_empty() {
            problems.push(
                "no role is set: pass --role (repeatable), set REGISTRAR_ROLE, or add `roles: [...]` to the config file"
                    .to_string(),
            );
        }
        match &self.dc {
            Some(dc) if problems.is_empty() => Ok((dc.clone(), self.roles.clone())),
            _ => Err(ConfigError { problems }),
        }
    }
}

fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    let shown = path.display();
    if path.is_dir() {
        return Err(ConfigError::one(format!(
            "{shown}: is a directory; --config needs a YAML file"
        )));
    }
    let bytes = std::fs::read(path)
        .map_err(|e| ConfigError::one(format!("{shown}: cannot read config file: {e}")))?;
    String::from_utf8(bytes).map_err(|e| {
        ConfigError::one(format!(
            "{shown}: is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })
}

fn parse_yaml(path: &Path, text: &str) -> Result<RawConfig, ConfigError> {
    if text.trim().is_empty() {
        return Ok(RawConfig::default());
    }
    serde_yaml::from_str(text).map_err(|e| {
        let at = match e.location() {
            Some(l) => format!("{}:{}:{}", path.display(), l.line(), l.column()),
            None => path.display().to_string(),
        };
        // serde_yaml appends " at line X column Y"; the position is already in front.
        let msg = e.to_string();
        let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        ConfigError::one(format!("{at}: {msg}"))
    })
}

fn validate_endpoints(p: &mut Problems, (eps, origin): (Vec<String>, Origin)) -> Vec<String> {
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
mod http_uri {
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
fn readable_by_others(path: &Path, what: &str) -> Option<String> {
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

fn validate_user(
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

fn duration_field(
    p: &mut Problems,
    field: &str,
    flag: Option<Duration>,
    flag_name: &str,
    raw: &Option<RawDuration>,
    default: Duration,
) -> Duration {
    if let Some(d) = flag {
        if d.is_zero() {
            let env = format!("REGISTRAR_{}", flag_name.replace('-', "_").to_uppercase());
            p.push(
                &Origin::Flag(flag_label(flag_name, &env)),
                field,
                "must be greater than zero",
            );
        }
        return d;
    }
    let origin = file_origin(field);
    match raw {
        None => default,
        Some(RawDuration::Number(n)) => {
            p.push(
                &origin,
                field,
                format_args!("{n} has no unit; write it like {n}s"),
            );
            default
        }
        Some(RawDuration::Text(s)) => match humantime::parse_duration(s) {
            Ok(d) if d.is_zero() => {
                p.push(&origin, field, "must be greater than zero");
                default
            }
            Ok(d) => d,
            Err(e) => {
                p.push(
                    &origin,
                    field,
                    format_args!("{s:?} is not a duration ({e}); write it like 30s, 1m or 500ms"),
                );
                default
            }
        },
    }
}

fn segment_field(
    p: &mut Problems,
    field: &str,
    flag: Option<String>,
    raw: &Option<String>,
) -> Option<(String, Origin)> {
    let env = format!("REGISTRAR_{}", field.to_uppercase());
    let v = pick(vec![
        (flag, Origin::Flag(flag_label(field, &env))),
        (raw.clone(), file_origin(field)),
    ])?;
    if let Err(e) = validate_segment(&v.0) {
        p.push(&v.1, field, format_args!("{:?} {e}", v.0));
    }
    Some(v)
}

fn address_field(
    p: &mut Problems,
    flags: &Common,
    raw: &RawConfig,
    allow_loopback: bool,
    ipv6: bool,
) -> AddressChoice {
    let ip = pick(vec![
        (
            flags.ip.clone(),
            Origin::Flag(flag_label("ip", "REGISTRAR_IP")),
        ),
        (raw.ip.clone(), file_origin("ip")),
    ]);
    let interface = pick(vec![
        (
            flags.interface.clone(),
            Origin::Flag(flag_label("interface", "REGISTRAR_INTERFACE")),
        ),
        (raw.interface.clone(), file_origin("interface")),
    ]);
    let cidr = pick(vec![
        (
            flags.cidr.clone(),
            Origin::Flag(flag_label("cidr", "REGISTRAR_CIDR")),
        ),
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
                if !allow_loopback && (addr.is_loopback() || addr.is_unspecified()) {
                    p.push(
                        &origin,
                        "ip",
                        format_args!("{addr} is a loopback or unspecified address; consumers could not reach it (set allow_loopback: true for tests)"),
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

fn services_input(p: &mut Problems, flags: &Common, raw: &RawConfig) -> Vec<(String, u32, Origin)> {
    if !flags.services.is_empty() {
        let origin = Origin::Flag(flag_label("service", "REGISTRAR_SERVICES"));
        let mut out = Vec::new();
        for s in &flags.services {
            match s.split_once('=').map(|(n, port)| (n, port.parse::<u32>())) {
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

fn meta_input(p: &mut Problems, flags: &Common, raw: &RawConfig) -> Vec<(String, String, Origin)> {
    if !flags.meta.is_empty() {
        let origin = Origin::Flag("--meta".into());
        let mut out = Vec::new();
        for s in &flags.meta {
            match s.split_once('=') {
                Some((k, v)) => out.push((k.to_string(), v.to_string(), origin.clone())),
                None => p.push(&origin, "meta", format_args!("{s:?} is not KEY=VALUE")),
            }
        }
        return out;
    }
    raw.meta
        .iter()
        .flatten()
        .map(|(k, v)| {
            (
                k.clone(),
                v.clone(),
                Origin::File(vec!["meta".into(), k.clone()]),
            )
        })
        .collect()
}

fn check_display(c: &crate::check::Spec) -> BTreeMap<&'static str, String> {
    use crate::check::Kind;
    let d = |d: Duration| humantime::format_duration(d).to_string();
    let mut m = BTreeMap::new();
    m.insert("name", c.name.clone());
    match &c.kind {
        Kind::Exec(argv) => m.insert("exec", format!("{argv:?}")),
        Kind::Shell(line) => m.insert("shell", line.clone()),
        Kind::Http(url) => m.insert("http", url.clone()),
        Kind::Tcp(addr) => m.insert("tcp", addr.clone()),
    };
    m.insert("interval", d(c.interval));
    m.insert("timeout", d(c.timeout));
    m.insert(
        "thresholds",
        format!(
            "success_before_passing {}, failures_before_warning {}, failures_before_critical {}",
            c.thresholds.success_before_passing,
            c.thresholds.failures_before_warning,
            c.thresholds.failures_before_critical
        ),
    );
    if let Some(after) = c.deregister_after {
        m.insert("deregister_after", d(after));
    }
    m
}

fn checks_field(p: &mut Problems, raw: &[RawCheck]) -> Vec<crate::check::Spec> {
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
                Some(RawDuration::Number(n)) => {
                    p.push(
                        &at,
                        &field,
                        format_args!("{sub}: {n} has no unit; write it like {n}s"),
                    );
                    default
                }
                Some(RawDuration::Text(s)) => match humantime::parse_duration(s) {
                    Ok(d) if !d.is_zero() => d,
                    Ok(_) => {
                        p.push(
                            &at,
                            &field,
                            format_args!("{sub}: must be greater than zero"),
                        );
                        default
                    }
                    Err(e) => {
                        p.push(
                            &at,
                            &field,
                            format_args!("{sub}: {s:?} is not a duration ({e})"),
                        );
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
        let mut threshold = |sub: &str, v: Option<u32>| match v {
            Some(0) => {
                p.push(&origin, &field, format_args!("{sub} must be at least 1"));
                1
            }
            Some(n) => n,
            None => 1,
        };
        let thresholds = Thresholds {
            success_before_passing: threshold("success_before_passing", c.success_before_passing),
            failures_before_warning: threshold(
                "failures_before_warning",
                c.failures_before_warning,
            ),
            failures_before_critical: threshold(
                "failures_before_critical",
                c.failures_before_critical,
            ),
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load_yaml(yaml: &str, flags: Common) -> Result<Config, ConfigError> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(yaml.as_bytes()).unwrap();
        let flags = Common {
            config: Some(f.path().to_path_buf()),
            ..flags
        };
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
        let flags = Common {
            config: Some(f.path().to_path_buf()),
            ..Common::default()
        };
        let c = Config::load(&flags, &env).unwrap();
        assert_eq!(c.etcd.endpoints, ["http://env:2379"]);
        assert_eq!(c.dc.as_deref(), Some("filedc"));
        let flags = Common {
            endpoints: vec!["http://flag:2379".into()],
            dc: Some("flagdc".into()),
            ..flags
        };
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
        let readme = include_str!("../README.md");
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
                    // The examples point at certificates that only exist on a real host.
                    let other: Vec<&String> = e
                        .problems
                        .iter()
                        .filter(|p| !p.contains("is not a readable file"))
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
        let flags = Common {
            user: Some("root:s3cr3t-pw".into()),
            dc: Some("a".into()),
            ..Common::default()
        };
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
}
