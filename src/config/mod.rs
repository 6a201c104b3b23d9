//! Configuration: the raw YAML file, flags and environment merged into one
//! validated [`Config`].
//!
//! Precedence is flag > `REGISTRAR_*` environment > etcdctl's `ETCDCTL_*`
//! (connection settings only) > config file > default. Validation runs before
//! any side effect and reports every problem at once, each naming the field,
//! the bad value and where it came from (file:line:col for the file).
//!
//! The modules:
//! - [`raw`]: the YAML file into serde structs, and positions (file:line:col)
//!   of its fields for error messages;
//! - `sources`: the merge. For each setting it picks the flag, environment
//!   variable, file field or default (with where it came from) and runs
//!   that setting's check from `validate` on it;
//! - `validate`: named checks, each reporting every problem it finds; the
//!   list-valued fields (checks, templates) are picked and checked there;
//! - `origin`: where a value came from, and the list of problems, which
//!   `sources` and `validate` share;
//! - `limits`: the etcd transaction size rules (design.md rule 7);
//! - `display`: what `check-config` prints.
//!
//! So picking and checking are not two passes: `sources` picks a setting
//! and calls its check from `validate` on it at once, and every problem
//! lands in one list. `validate` does not call back into `sources`.

mod display;
mod limits;
mod origin;
pub mod raw;
mod sources;
mod validate;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::cli::{Common, LogFormat};
pub use raw::{RawCheck, RawConfig, RawDuration, RawFailStatic, RawHaproxy, RawSize, RawTemplate};

pub use limits::{MAX_TXN_BYTES, MAX_TXN_OPS};

pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";
pub const DEFAULT_PREFIX: &str = "/infrastructure";
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);
pub const DEFAULT_STATE_DIR: &str = "/var/lib/registrar";
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const DEFAULT_OUTPUT_REFRESH: Duration = Duration::from_secs(300);
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// One template of `registrar render`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateSpec {
    pub source: PathBuf,
    pub destination: PathBuf,
    pub check: Option<Vec<String>>,
    pub reload: Option<Vec<String>>,
    pub wait_min: Duration,
    /// At least `wait_min` (4 × `wait_min` when not set), so that changes
    /// that never stop cannot starve a render.
    pub wait_max: Duration,
    pub min_hosts: Option<usize>,
    pub mode: Option<u32>,
    pub owner: Option<u32>,
    pub group: Option<u32>,
    pub command_timeout: Duration,
    /// Output larger than this many bytes is refused.
    pub max_output: usize,
    /// When vanished hosts are held (design.md section 8).
    pub fail_static: crate::registry::hold::FailStatic,
    /// haproxy's runtime API, when the template names it.
    pub haproxy: Option<HaproxySpec>,
}

/// `haproxy:` of a template (design.md section 6.9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaproxySpec {
    /// The stats socket (`stats socket PATH level admin`).
    pub socket: PathBuf,
    /// How long a removed server may keep its connections.
    pub drain: Duration,
}

/// `haproxy.drain` when a template does not set it.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(60);

/// `max_output` when a template does not set it.
pub const DEFAULT_MAX_OUTPUT: usize = 64 << 20;

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
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// The templates of `registrar render`.
    pub templates: Vec<TemplateSpec>,
    /// `registrar dns`'s quorum gate: `<role>.<dc>` (lower case, as the DNS
    /// name spells it) → healthy hosts needed before SRV answers are served.
    pub srv_min: BTreeMap<String, usize>,
    /// Fail static for `dns`, and the templates' default.
    pub fail_static: crate::registry::hold::FailStatic,
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

impl Config {
    /// Loads and validates the configuration from flags, environment and the
    /// optional config file. Touches nothing but the config and password files.
    pub fn load(flags: &Common, env: &Env) -> Result<Config, ConfigError> {
        let (raw, unknown, file) = match &flags.connection.config {
            Some(path) => {
                let text = raw::read_config_file(path)?;
                let (raw, unknown) = raw::parse_yaml(path, &text)?;
                (
                    raw,
                    unknown,
                    Some(raw::FileSource {
                        path: path.clone(),
                        text,
                    }),
                )
            }
            None => (RawConfig::default(), Vec::new(), None),
        };
        // Fields that are no setting are problems like any other: reported
        // together with the rest, not instead of them.
        let unknown: Vec<String> = unknown
            .iter()
            .filter_map(|segments| {
                let at: Vec<&str> = segments.iter().map(String::as_str).collect();
                let name = at.last()?;
                let place = file.as_ref().map_or(String::new(), |f| f.locate(&at));
                Some(format!(
                    "{place}: unknown field `{name}`: not a setting here (a typo, or the wrong indentation?)"
                ))
            })
            .collect();
        match sources::merge(flags, env, raw, file.as_ref()) {
            Ok(config) if unknown.is_empty() => Ok(config),
            Ok(_) => Err(ConfigError { problems: unknown }),
            Err(mut e) => {
                e.problems.splice(0..0, unknown);
                Err(e)
            }
        }
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

#[cfg(test)]
mod tests;
