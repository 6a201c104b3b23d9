//! The command layer: turns a parsed command line into work, and every
//! failure into one of the exit codes of design.md section 4.
//!
//! `anyhow` lives only here; below this layer every module has its own
//! `thiserror` enum.

mod check_config;
mod deregister;
mod dns;
mod ls;
mod maintenance;
mod register;
mod render;
mod wait;
mod watch;

use std::borrow::Cow;
use std::fmt;

use tokio_util::sync::CancellationToken;

use crate::agent::{AgentError, Mode};
use crate::cli::{Cli, Command, Common};
use crate::config::{Config, ConfigError, Env};
use crate::etcd::{Class, Etcd, EtcdError};
use crate::identity::{Identity, IdentityError};
use crate::registration::{Desired, RegisterError};

/// The exit codes of design.md section 4.
pub mod exit {
    pub const OK: u8 = 0;
    pub const RUNTIME: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const CONFLICT: u8 = 3;
    pub const UNAVAILABLE: u8 = 69;
    pub const DENIED: u8 = 77;
    pub const CONFIG: u8 = 78;
}

/// A failed command: the exit code and the error to print.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl Failure {
    fn new(code: u8, error: impl Into<anyhow::Error>) -> Self {
        Self {
            code,
            error: error.into(),
        }
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::new(exit::CONFIG, e)
    }
}

impl From<IdentityError> for Failure {
    fn from(e: IdentityError) -> Self {
        Failure::new(exit::CONFIG, e)
    }
}

/// Maps an etcd failure of a one-shot command to its exit code, naming the
/// endpoints when etcd could not be reached.
fn etcd_failure(e: EtcdError, etcd: &Etcd) -> Failure {
    if e.class().fails_over() && etcd.looks_like_missing_client_cert(&e) {
        return Failure::new(
            exit::DENIED,
            anyhow::anyhow!(
                "etcd closed every TLS connection: it probably requires a client certificate; \
                 pass --cert and --key (last error: {e})"
            ),
        );
    }
    match e.class() {
        Class::Retry => Failure::new(
            exit::UNAVAILABLE,
            anyhow::anyhow!(
                "etcd is unavailable at {}: last error: {e}",
                etcd.endpoints().join(",")
            ),
        ),
        Class::Auth => Failure::new(
            exit::DENIED,
            anyhow::anyhow!("etcd denied access: {e}; check --user, --cacert, --cert and --key"),
        ),
        Class::Tls => {
            let text = e.to_string();
            let plain = text.starts_with("https://")
                && [
                    "handshake eof",
                    "InvalidContentType",
                    "corrupt message",
                    "wrong version",
                    "Connection reset by peer",
                ]
                .iter()
                .any(|w| text.contains(w));
            let hint = if plain {
                "the endpoint does not seem to speak TLS: if that etcd serves plain http, give it as http://"
            } else {
                "check --cacert (the CA that signed etcd's certificate), --cert and --key"
            };
            Failure::new(
                exit::DENIED,
                anyhow::anyhow!("cannot set up TLS with etcd: {e}; {hint}"),
            )
        }
        Class::LeaseGone | Class::Fatal => Failure::new(exit::RUNTIME, e),
    }
}

fn register_failure(e: RegisterError, etcd: &Etcd) -> Failure {
    match e {
        RegisterError::Conflict { .. } => Failure::new(exit::CONFLICT, e),
        RegisterError::Contended | RegisterError::Mismatch => Failure::new(exit::RUNTIME, e),
        RegisterError::Etcd(e) => etcd_failure(e, etcd),
    }
}

/// Serves `/metrics` and `/health` of a consumer (`render`, `dns`) on
/// `addr`, when set, until the returned guard drops or `cancel` fires. A
/// taken port is exit 1 (systemd retries), as for the agent.
async fn serve_metrics<M: crate::telemetry::Exposed>(
    addr: Option<std::net::SocketAddr>,
    metrics: &M,
    cancel: &CancellationToken,
) -> Result<tokio_util::sync::DropGuard, Failure> {
    let serving = cancel.child_token();
    let guard = serving.clone().drop_guard();
    let Some(addr) = addr else {
        return Ok(guard);
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        Failure::new(
            exit::RUNTIME,
            anyhow::anyhow!("metrics_listen: cannot listen on {addr}: {e}"),
        )
    })?;
    tracing::info!(%addr, "serving /metrics and /health");
    let metrics = metrics.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::telemetry::serve(listener, metrics, serving).await {
            tracing::error!(error = %e, "the metrics server failed");
        }
    });
    Ok(guard)
}

/// Reports a key or value that does not follow the layout, and moves on.
fn report_malformed(m: crate::registry::Malformed) {
    eprintln!(
        "registrar: skipping malformed key {}: {}",
        m.key.escape_debug(),
        m.why.escape_debug()
    );
}

/// What part of the registry a consumer shows: a key prefix to read or
/// watch, and the hosts within it to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// `<prefix>/[dc/[role/[host/]]]`: what is read.
    pub key: String,
    pub dc: Option<String>,
    pub role: Option<String>,
    pub host: Option<String>,
}

impl Scope {
    /// Whether a host is in scope.
    pub fn includes(&self, id: &crate::registry::HostId) -> bool {
        self.dc.as_ref().is_none_or(|d| *d == id.dc)
            && self.role.as_ref().is_none_or(|r| *r == id.role)
            && self.host.as_ref().is_none_or(|h| *h == id.host)
    }
}

/// The scope of a consumer: a `DC[/ROLE[/HOST]]` argument of at most
/// `depth` segments, narrowed by `--dc` and one `--role` as given on the
/// command line or in the environment (a config file's `dc`/`roles` describe
/// the agent's own host and do not scope a listing). A flag that disagrees
/// with the argument is a usage error (exit 2), never silently dropped.
fn scope(
    config: &Config,
    path: Option<&str>,
    flags: &Common,
    depth: usize,
) -> Result<Scope, Failure> {
    let usage = |msg: String| Failure::new(exit::USAGE, anyhow::anyhow!(msg));
    let mut segs: Vec<String> = Vec::new();
    if let Some(path) = path.map(|p| p.trim_matches('/')).filter(|p| !p.is_empty()) {
        let parts: Vec<&str> = path.split('/').collect();
        if parts.len() > depth {
            let want = ["DC", "DC/ROLE", "DC/ROLE/HOST"][depth - 1];
            return Err(usage(format!(
                "{path:?} has {} segments; give {want}",
                parts.len()
            )));
        }
        for p in parts {
            crate::layout::validate_segment(p)
                .map_err(|e| usage(format!("path segment {p:?} {e}")))?;
            segs.push(p.to_string());
        }
    }
    let role_flag = match flags.roles.as_slice() {
        [] => None,
        [r] => Some(r.clone()),
        many => {
            return Err(usage(format!(
                "give one --role to narrow a listing, not {}",
                many.join(",")
            )));
        }
    };
    let pick = |i: usize, flag: Option<String>, name: &str| -> Result<Option<String>, Failure> {
        match (segs.get(i).cloned(), flag) {
            (Some(a), Some(b)) if a != b => Err(usage(format!(
                "the path says {name} {a:?} but --{name} says {b:?}; give one of them"
            ))),
            (Some(a), _) => Ok(Some(a)),
            (None, Some(b)) => {
                crate::layout::validate_segment(&b)
                    .map_err(|e| usage(format!("--{name} {b:?} {e}")))?;
                Ok(Some(b))
            }
            (None, None) => Ok(None),
        }
    };
    let dc = pick(0, flags.dc.clone(), "dc")?;
    let role = pick(1, role_flag, "role")?;
    let host = segs.get(2).cloned();
    // Read as narrow a prefix as the scope allows; a role without a DC is
    // filtered after the read.
    let mut key = format!("{}/", config.prefix);
    for seg in [&dc, &role, &host] {
        match seg {
            Some(s) if dc.is_some() => {
                key.push_str(s);
                key.push('/');
            }
            _ => break,
        }
    }
    Ok(Scope {
        key,
        dc,
        role,
        host,
    })
}

/// Output of the commands that need neither config nor etcd
/// (completions, man), or `None` for every other command.
pub fn generated(cli: &Cli) -> Option<Result<Vec<u8>, Failure>> {
    match &cli.command {
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(*shell, &mut crate::cli::command(), "registrar", &mut out);
            Some(Ok(out))
        }
        Command::Man { dir } => Some(man(dir.as_deref())),
        _ => None,
    }
}

/// `registrar man`: registrar(1) as bytes for stdout, or every page written
/// to `dir` (and their paths for stdout).
fn man(dir: Option<&std::path::Path>) -> Result<Vec<u8>, Failure> {
    let failed = |e: std::io::Error| Failure::new(exit::RUNTIME, e);
    let pages = crate::manual::pages().map_err(failed)?;
    let Some(dir) = dir else {
        return Ok(pages.into_iter().next().map(|(_, p)| p).unwrap_or_default());
    };
    std::fs::create_dir_all(dir).map_err(|e| {
        Failure::new(
            exit::RUNTIME,
            anyhow::anyhow!("cannot create {}: {e}", dir.display()),
        )
    })?;
    let mut written = String::new();
    for (name, page) in pages {
        let path = dir.join(name);
        std::fs::write(&path, page).map_err(|e| {
            Failure::new(
                exit::RUNTIME,
                anyhow::anyhow!("cannot write {}: {e}", path.display()),
            )
        })?;
        written.push_str(&format!("{}\n", path.display()));
    }
    Ok(written.into_bytes())
}

/// The common part of the flags of any command (`dns` and `render` have
/// only the connection part; they describe no host).
fn common(cli: &Cli) -> Cow<'_, Common> {
    match &cli.command {
        Command::Completions { .. } | Command::Man { .. } => Cow::Owned(Common::default()),
        Command::Dns(d) => Cow::Owned(Common {
            connection: d.connection.clone(),
            ..Common::default()
        }),
        Command::Render(r) => Cow::Owned(Common {
            connection: r.connection.clone(),
            ..Common::default()
        }),
        Command::Agent(a) => Cow::Borrowed(&a.common),
        Command::Register(r) => Cow::Borrowed(&r.one_shot.common),
        Command::Deregister(d) => Cow::Borrowed(&d.common),
        Command::CheckConfig(c) => Cow::Borrowed(&c.common),
        Command::Maintenance(m) => Cow::Borrowed(m.action.common()),
        Command::Ls(l) => Cow::Borrowed(&l.one_shot.common),
        Command::Watch(w) => Cow::Borrowed(&w.common),
        Command::Wait(w) => Cow::Borrowed(&w.common),
    }
}

/// Loads and validates the configuration for `cli`.
pub fn load_config(cli: &Cli, env: &Env) -> Result<Config, Failure> {
    Ok(Config::load(&common(cli), env)?)
}

/// Everything a registering command needs, resolved before any network call.
struct Prepared {
    identity: Identity,
    etcd: Etcd,
}

fn prepare(config: &Config) -> Result<Prepared, Failure> {
    config.require_registration_fields()?;
    let identity = Identity::resolve(config)?;
    let etcd = Etcd::new(&config.etcd).map_err(|e| Failure::new(exit::DENIED, e))?;
    Ok(Prepared { identity, etcd })
}

/// The registration a one-shot command writes: no checks are run, so health
/// is `passing`; an active maintenance is included.
fn one_shot_desired(config: &Config, identity: &Identity) -> Desired {
    let (maintenance, _) =
        crate::maintenance::active(&config.state_dir, std::time::SystemTime::now());
    crate::agent::composer::compose(
        config,
        identity,
        &crate::check::Snapshot::default(),
        maintenance.as_deref(),
    )
}

pub use crate::reload::Control;

/// Runs a parsed command with a validated config.
pub async fn run(cli: Cli, config: Config, control: Control) -> Result<(), Failure> {
    let cancel = control.cancel.clone();
    match cli.command {
        Command::CheckConfig(args) => check_config::run(&config, &args),
        Command::Agent(_) => run_agent(config, Mode::Agent, control).await,
        Command::Register(args) if args.keep_alive => {
            run_agent(config, Mode::KeepAlive, control).await
        }
        Command::Register(args) => register::run(&config, args.one_shot.timeout, &cancel).await,
        Command::Deregister(args) => deregister::run(&config, args.timeout, &cancel).await,
        Command::Maintenance(args) => maintenance::run(&config, &args.action),
        Command::Ls(args) => ls::run(&config, &args).await,
        Command::Watch(args) => watch::run(&config, &args, &cancel).await,
        Command::Wait(args) => wait::run(&config, &args, &cancel).await,
        Command::Render(args) => render::run(config, &args, control).await,
        Command::Dns(args) => dns::run(config, &args, control).await,
        // Handled by `generated` before any config is loaded.
        Command::Completions { .. } | Command::Man { .. } => Ok(()),
    }
}

/// The agent, or `register --keep-alive` (an agent without checks).
async fn run_agent(config: Config, mode: Mode, mut control: Control) -> Result<(), Failure> {
    let p = prepare(&config)?;
    let reloads = control.reloads();
    crate::agent::run(config, p.identity, p.etcd, control.cancel, reloads, mode)
        .await
        .map_err(|e| match e {
            // A busy port is a runtime condition (exit 1, so systemd
            // restarts the agent), not a configuration that cannot work.
            AgentError::Listen { .. } => Failure::new(exit::RUNTIME, e),
            _ if e.class() == Some(Class::Auth) => Failure::new(exit::DENIED, e),
            _ => Failure::new(exit::RUNTIME, e),
        })
}
