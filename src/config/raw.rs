//! The config file as written: serde structs (every field optional, unknown
//! fields refused) and the position finder that turns a field path into
//! `file:line:col` for error messages.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;
use crate::cli::LogFormat;

/// The config file as written. Every field is optional: flags and the
/// environment may supply it instead.
#[derive(Debug, Default, Deserialize)]
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
    pub meta: Option<BTreeMap<String, serde_yaml::Value>>,
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
    /// Files `registrar render` keeps in step with the registry.
    pub templates: Option<Vec<RawTemplate>>,
    /// `registrar dns`'s quorum gate: `<role>.<dc>` → the number of healthy
    /// hosts that must publish a service before its SRV records are served.
    pub srv_min: Option<BTreeMap<String, i64>>,
    /// Fail static for `dns`, and for render templates that do not set
    /// their own.
    pub fail_static: Option<RawFailStatic>,
}

/// `fail_static: {settle, max_drop}` (design.md section 8).
#[derive(Debug, Default, Deserialize)]
pub struct RawFailStatic {
    /// How long a host that vanished without `leaving` is held at most
    /// (default 60s; 0s turns fail static off).
    pub settle: Option<RawDuration>,
    /// The share of a role's hosts that may vanish within `settle` without
    /// a hold, e.g. "50%" (the default); "100%" turns the drop guards off.
    pub max_drop: Option<RawPercent>,
}

/// A percentage as written: "50%", or a number of percent.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawPercent {
    Number(f64),
    Text(String),
}

impl RawPercent {
    /// The share, 0 to 1.
    pub fn parse(&self) -> Result<f64, String> {
        let n = match self {
            RawPercent::Number(n) => *n,
            RawPercent::Text(t) => t
                .trim()
                .trim_end_matches('%')
                .trim()
                .parse::<f64>()
                .map_err(|_| format!("{t:?} is not a percentage; write it like \"50%\""))?,
        };
        if (0.0..=100.0).contains(&n) {
            Ok(n / 100.0)
        } else {
            Err(format!("{n}% is not between 0% and 100%"))
        }
    }
}

/// One template of `registrar render` (design.md section 6).
#[derive(Debug, Default, Deserialize)]
pub struct RawTemplate {
    /// The minijinja template file.
    pub source: Option<PathBuf>,
    /// The file it renders to.
    pub destination: Option<PathBuf>,
    /// argv run on the staged file before it replaces the destination;
    /// `{{src}}` is the staged file.
    pub check: Option<Vec<String>>,
    /// argv run after the destination changed.
    pub reload: Option<Vec<String>>,
    /// Quiescence: render once the registry was quiet for `min`, and no
    /// later than `max` after the first unrendered change.
    pub wait: Option<RawWait>,
    /// Refuse a render that lists fewer hosts (hosts whose address it wrote).
    pub min_hosts: Option<usize>,
    /// Octal file mode, e.g. "0644" (default: the current file's, else 0644).
    pub mode: Option<String>,
    /// Owner of the file (default: the current file's, else render's user).
    pub owner: Option<String>,
    /// Group of the file (default: the current file's, else render's group).
    pub group: Option<String>,
    /// Bound on `check` and `reload` (default 30s).
    pub command_timeout: Option<RawDuration>,
    /// Refuse a render whose output is larger: bytes, or with a unit
    /// (KiB, MiB, GiB), e.g. "64MiB" (the default).
    pub max_output: Option<RawSize>,
    /// Fail static for this template (default: the top-level `fail_static`).
    pub fail_static: Option<RawFailStatic>,
    /// haproxy's runtime API: server changes go through its socket
    /// instead of `reload` (design.md section 6.9).
    pub haproxy: Option<RawHaproxy>,
}

/// `haproxy: {socket, drain}` of a template.
#[derive(Debug, Default, Deserialize)]
pub struct RawHaproxy {
    /// haproxy's stats socket at `level admin`.
    pub socket: Option<PathBuf>,
    /// How long a removed server may keep its connections before they are
    /// shut and it is deleted (default 1m).
    pub drain: Option<RawDuration>,
}

/// A size as written in YAML: a number of bytes, or text with a unit.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    Bytes(u64),
    Text(String),
}

impl RawSize {
    /// Bytes, from `1048576`, `"512KiB"`, `"64MiB"` or `"1GiB"`.
    pub fn parse(&self) -> Result<u64, String> {
        let text = match self {
            RawSize::Bytes(0) => return Err("must be greater than zero".into()),
            RawSize::Bytes(n) => return Ok(*n),
            RawSize::Text(t) => t.trim(),
        };
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let unit_size: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            _ => {
                return Err(format!(
                    "{text:?} is not a size; write bytes or a number with KiB, MiB or GiB, e.g. \"64MiB\""
                ));
            }
        };
        match number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(unit_size))
        {
            Some(0) => Err("must be greater than zero".into()),
            Some(n) => Ok(n),
            None => Err(format!(
                "{text:?} is not a size; write bytes or a number with KiB, MiB or GiB, e.g. \"64MiB\""
            )),
        }
    }
}

/// `wait: {min, max}` of a template.
#[derive(Debug, Default, Deserialize)]
pub struct RawWait {
    /// Quiet time before a render (default 0: at once).
    pub min: Option<RawDuration>,
    /// Longest delay after the first unrendered change (default 4 × min).
    pub max: Option<RawDuration>,
}

/// One health check as written in the config file.
#[derive(Debug, Default, Deserialize)]
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

impl RawDuration {
    /// The one duration parser of the config: a positive humantime
    /// duration. The message says how to write it.
    pub fn parse(&self) -> Result<std::time::Duration, String> {
        match self {
            RawDuration::Number(n) => Err(format!("{n} has no unit; write it like {n}s")),
            RawDuration::Text(s) => match crate::cli::parse_duration(s) {
                Ok(d) if d.is_zero() => Err("must be greater than zero".into()),
                other => other,
            },
        }
    }
}

/// The config file's text and where its fields are, for error positions.
pub(super) struct FileSource {
    pub(super) path: PathBuf,
    pub(super) text: String,
}

impl FileSource {
    /// `file:line:col` of a top-level field (or of `field.sub` one level
    /// below), or just the file when it cannot be found.
    pub(super) fn locate(&self, path: &[&str]) -> String {
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

pub(super) fn read_config_file(path: &Path) -> Result<String, ConfigError> {
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

/// The file's settings, and the path of every field it has that is not a
/// setting (each reported with the other problems, not the first alone).
pub(super) fn parse_yaml(
    path: &Path,
    text: &str,
) -> Result<(RawConfig, Vec<Vec<String>>), ConfigError> {
    if text.trim().is_empty() {
        return Ok((RawConfig::default(), Vec::new()));
    }
    let mut unknown = Vec::new();
    let parsed = serde_ignored::deserialize(serde_yaml::Deserializer::from_str(text), |p| {
        unknown.push(segments(&p))
    });
    parsed
        .map(|raw| (raw, unknown))
        .map_err(|e: serde_yaml::Error| {
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

/// A field's path as [`FileSource::locate`] takes it: names, and `[i]`
/// for the i-th item of a list.
fn segments(p: &serde_ignored::Path) -> Vec<String> {
    use serde_ignored::Path;
    match p {
        Path::Root => Vec::new(),
        Path::Seq { parent, index } => {
            let mut v = segments(parent);
            v.push(format!("[{index}]"));
            v
        }
        Path::Map { parent, key } => {
            let mut v = segments(parent);
            v.push(key.clone());
            v
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => segments(parent),
    }
}
