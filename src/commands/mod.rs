//! The command layer: turns a parsed command line into work, and every
//! failure into one of the contract's exit codes.
//!
//! `anyhow` lives only here; below this layer every module has its own
//! `thiserror` enum.

mod check_config;
mod deregister;
mod register;

use std::fmt;

use tokio_util::sync::CancellationToken;

use crate::agent::{Agent, AgentError};
use crate::cli::{Cli, Command, Common, LogFormat};
use crate::config::{Config, ConfigError, Env};
use crate::etcd::{Class, Etcd, EtcdError};
use crate::identity::{Identity, IdentityError};
use crate::registration::{Desired, RegisterError, Spec};

/// The contract's exit codes (section 4).
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
        Class::LeaseGone | Class::Fatal => Failure::new(exit::RUNTIME, e),
    }
}

fn register_failure(e: RegisterError, etcd: &Etcd) -> Failure {
    match e {
        RegisterError::Conflict { .. } => Failure::new(exit::CONFLICT, e),
        RegisterError::Contended => Failure::new(exit::RUNTIME, e),
        RegisterError::Etcd(e) => etcd_failure(e, etcd),
    }
}

/// The common part of the flags of any command.
fn common(cli: &Cli) -> &Common {
    match &cli.command {
        Command::Agent(a) => &a.common,
        Command::Register(r) => &r.one_shot.common,
        Command::Deregister(d) => &d.common,
        Command::CheckConfig(c) => &c.common,
    }
}

/// Loads and validates the configuration for `cli`.
pub fn load_config(cli: &Cli, env: &Env) -> Result<Config, Failure> {
    Ok(Config::load(common(cli), env)?)
}

/// Sets up logging on stderr in the configured format. `REGISTRAR_LOG`
/// takes a tracing filter (default `info`).
pub fn init_logging(format: LogFormat, env: &Env) {
    let filter = env
        .get("REGISTRAR_LOG")
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // A second initialisation (tests running commands in-process) is harmless.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Everything a registering command needs, resolved before any network call.
struct Prepared {
    desired: Desired,
    etcd: Etcd,
}

fn prepare(config: &Config) -> Result<Prepared, Failure> {
    let (dc, roles) = config.require_registration_fields()?;
    let identity = Identity::resolve(config)?;
    let desired = Desired::build(
        &Spec {
            prefix: &config.prefix,
            dc: &dc,
            roles: &roles,
            services: &config.services,
            meta: &config.meta,
            health: "passing",
        },
        &identity,
    );
    let etcd = Etcd::new(&config.etcd).map_err(|e| Failure::new(exit::DENIED, e))?;
    Ok(Prepared { desired, etcd })
}

/// Runs a parsed command with a validated config. `cancel` fires on
/// SIGTERM/SIGINT (wired up by the caller).
pub async fn run(cli: Cli, config: Config, cancel: CancellationToken) -> Result<(), Failure> {
    match cli.command {
        Command::CheckConfig(_) => check_config::run(&config),
        Command::Agent(_) => run_agent(&config, &cancel).await,
        Command::Register(args) if args.keep_alive => run_agent(&config, &cancel).await,
        Command::Register(args) => register::run(&config, args.one_shot.timeout, &cancel).await,
        Command::Deregister(args) => deregister::run(&config, args.timeout, &cancel).await,
    }
}

async fn run_agent(config: &Config, cancel: &CancellationToken) -> Result<(), Failure> {
    let p = prepare(config)?;
    let agent = Agent {
        etcd: &p.etcd,
        desired: p.desired,
        ttl: config.ttl,
    };
    agent
        .run(cancel, &mut crate::lease::Quiet)
        .await
        .map_err(|e| match e {
            AgentError::Denied(_) => Failure::new(exit::DENIED, e),
            AgentError::Fatal(_) => Failure::new(exit::RUNTIME, e),
        })
}

/// Waits for SIGTERM or SIGINT and fires `cancel`. SIGHUP (systemd's
/// ExecReload) must not kill the agent without revoking its lease, so it is
/// caught and logged: live reload is not implemented yet.
pub async fn cancel_on_signals(cancel: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
            _ = int.recv() => tracing::info!("SIGINT received; shutting down"),
            _ = hup.recv() => {
                tracing::warn!("SIGHUP received: live reload is not supported yet; restart the agent to apply config changes");
                continue;
            }
            _ = cancel.cancelled() => return Ok(()),
        }
        cancel.cancel();
        return Ok(());
    }
}
