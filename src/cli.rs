//! clap definitions only: the command line of design.md section 4.
//!
//! Every connection and identity flag also reads its `REGISTRAR_*` variable,
//! so a flag beats the environment. The config file and the etcdctl variables
//! (`ETCDCTL_ENDPOINTS`, ...) are merged below both in [`crate::config`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Keeps this host's entry in an etcd v3 infrastructure registry alive and correct.
///
/// One lease per host; every key of the host (ip, health, services, meta,
/// owner) is written in one transaction and attached to that lease. The agent
/// keeps the lease alive, re-registers when it is lost, and revokes it on
/// shutdown so the keys vanish at once.
#[derive(Debug, Clone, Parser)]
#[command(name = "registrar", version, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Register this host and keep it registered until stopped (the systemd unit runs this).
    ///
    /// An unreachable etcd is retried forever with jittered backoff; SIGTERM or
    /// SIGINT revokes the lease, so the host's keys are gone before the process exits.
    Agent(AgentArgs),
    /// One-shot: grant a lease, write this host's keys, exit 0 (for cloud-init).
    ///
    /// The keys expire after --ttl unless --keep-alive is given, in which case
    /// this stays in the foreground and behaves like `agent` without checks.
    /// Exits 3 when the host name is held by another live machine.
    Register(RegisterArgs),
    /// Revoke this host's lease so that all of its keys disappear at once.
    ///
    /// Exits 0 also when nothing was registered. Refuses (exit 3) to remove a
    /// registration owned by another machine id.
    Deregister(OneShotArgs),
    /// Validate the configuration and print the effective values (without secrets).
    ///
    /// Every problem is reported at once, with the file, line and column where
    /// it is known. Exits 78 when the configuration is invalid. Checks an
    /// agent's config, or render's or dns's (see --for).
    CheckConfig(CheckConfigArgs),
    /// Drain this host without stopping the agent: publish a `maintenance` key.
    ///
    /// The state is kept in the state dir, so it survives agent restarts and
    /// lease loss; the running agent picks up a change within a second.
    Maintenance(MaintenanceArgs),
    /// List registered hosts, read at one revision.
    ///
    /// PATH narrows the listing: `dc1`, `dc1/web` or `dc1/web/web-1`.
    /// Malformed keys are reported on stderr and skipped.
    Ls(LsArgs),
    /// Print the registry, then one line per host event (up, down, health
    /// a→b, maintenance on/off, changed) as it happens.
    Watch(WatchArgs),
    /// Block until N hosts of a role are registered (a readiness gate).
    ///
    /// Exits 0 printing them once there are enough, 1 at --timeout
    /// printing how many were found.
    Wait(WaitArgs),
    /// Keep config files (haproxy's, ...) rendered from the registry.
    ///
    /// One watch of the registry; each template in the config file's
    /// `templates:` list is rendered at one revision, checked, written
    /// atomically and reloaded (see README "Rendering configs"). SIGHUP
    /// re-reads the config and the templates.
    Render(RenderArgs),
    /// Answer DNS from the registry: host and role A/AAAA, SRV per service.
    ///
    /// Names under --domain: `<host>.<role>.<dc>` (that host's address),
    /// `<role>.<dc>` (the role's healthy hosts, shuffled) and
    /// `_<service>._tcp.<role>.<dc>` (SRV, so `etcd --discovery-srv
    /// <role>.<dc>.<domain>` can bootstrap). One watch feeds the answers: no
    /// etcd request per query. `srv_min: {etcd.dc1: 3}` in the config file
    /// withholds SRV answers until 3 healthy hosts publish the service. See
    /// README "DNS".
    Dns(DnsArgs),
    /// Print a shell completion script: bash, zsh, fish, elvish or powershell.
    ///
    /// e.g. `registrar completions bash > /etc/bash_completion.d/registrar`
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print registrar(1) (roff) to stdout, or write every page to a directory.
    ///
    /// `registrar man | man -l -` reads it; `registrar man --dir DIR` writes
    /// registrar.1 and one page per command (registrar-agent.1, ...), each
    /// with its flags, environment, exit status, files and examples.
    Man {
        /// Write registrar.1 and every registrar-<command>.1 here (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// Output format of `ls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LsFormat {
    Table,
    Json,
    Ip,
}

/// Output format of `watch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WatchFormat {
    Text,
    Json,
}

/// Output format of `wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WaitFormat {
    Text,
    Ip,
}

#[derive(Debug, Clone, Args)]
pub struct LsArgs {
    /// DC[/ROLE[/HOST]] to list; everything when omitted.
    #[arg(value_name = "PATH")]
    pub path: Option<String>,
    /// Only hosts whose health is passing and that are not in maintenance.
    #[arg(long)]
    pub healthy: bool,
    /// table (default), json (stable schema, see README) or ip (one address per line).
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: LsFormat,
    #[command(flatten)]
    pub one_shot: OneShotArgs,
}

#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// DC[/ROLE] to watch; everything when omitted.
    #[arg(value_name = "PATH")]
    pub path: Option<String>,
    /// text (default) or json (one object per line).
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    pub output: WatchFormat,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Args)]
pub struct RenderArgs {
    /// Render, check, write and reload every template once, then exit: 0,
    /// 69 (etcd unreachable), 78 (config or template error) or 1 (a check,
    /// a reload or min_hosts failed).
    #[arg(long)]
    pub once: bool,
    /// Print the rendered output to stdout; write and run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// With --once or --dry-run: give up reaching etcd after this long (exit 69).
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(Debug, Clone, Args)]
pub struct DnsArgs {
    /// Address to serve UDP and TCP on, e.g. 127.0.0.1:8600 or [::1]:53; repeatable.
    #[arg(
        long = "listen",
        env = "REGISTRAR_DNS_LISTEN",
        value_delimiter = ',',
        value_parser = parse_listen,
        required = true,
        value_name = "ADDR:PORT"
    )]
    pub listen: Vec<std::net::SocketAddr>,
    /// The zone answered; names outside it are REFUSED.
    #[arg(
        long,
        env = "REGISTRAR_DNS_DOMAIN",
        default_value = "registry.internal",
        value_parser = parse_domain
    )]
    pub domain: String,
    /// The name server the zone's NS and SOA name. Default: ns.<domain>,
    /// answered with the listen addresses (give this when they are
    /// 0.0.0.0 or [::], or when the server is known by another name).
    #[arg(long = "ns-name", env = "REGISTRAR_DNS_NS_NAME", value_parser = parse_domain, value_name = "NAME")]
    pub ns_name: Option<String>,
    /// TTL of answers and of negative caching (NXDOMAIN), in whole seconds.
    #[arg(long = "ttl", env = "REGISTRAR_DNS_TTL", default_value = "5s", value_parser = parse_dns_ttl, value_name = "DURATION")]
    pub answer_ttl: Duration,
    /// Role and SRV answers include hosts whose health is `warning`.
    #[arg(long, env = "REGISTRAR_DNS_ALLOW_WARNING", action = clap::ArgAction::SetTrue, value_parser = env_bool_allow_warning)]
    pub allow_warning: bool,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    /// How many hosts to wait for.
    #[arg(long)]
    pub count: usize,
    /// Count only passing hosts that are not in maintenance.
    #[arg(long)]
    pub healthy: bool,
    /// Give up after this long and exit 1 [default: wait forever].
    #[arg(long = "timeout", value_parser = parse_duration, value_name = "DURATION")]
    pub wait_timeout: Option<Duration>,
    /// text (default: DC/ROLE/HOST IP per line) or ip (one address per line).
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    pub output: WaitFormat,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Args)]
pub struct MaintenanceArgs {
    #[command(subcommand)]
    pub action: MaintenanceAction,
}

#[derive(Debug, Clone, Subcommand)]
pub enum MaintenanceAction {
    /// Enter maintenance; consumers using `--healthy` stop sending traffic.
    On {
        /// Why (shown as the value of the `maintenance` key): one line of text.
        #[arg(long, value_parser = parse_one_line)]
        reason: String,
        /// Leave maintenance by itself after this long, e.g. 30m (at most a year).
        #[arg(long = "for", value_parser = parse_maintenance_for, value_name = "DURATION")]
        r#for: Option<Duration>,
        #[command(flatten)]
        common: Common,
    },
    /// Leave maintenance.
    Off {
        #[command(flatten)]
        common: Common,
    },
}

impl MaintenanceAction {
    pub fn common(&self) -> &Common {
        match self {
            MaintenanceAction::On { common, .. } | MaintenanceAction::Off { common } => common,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Args)]
pub struct RegisterArgs {
    #[command(flatten)]
    pub one_shot: OneShotArgs,
    /// Stay in the foreground and keep the lease alive (an agent without checks).
    #[arg(long, env = "REGISTRAR_KEEP_ALIVE", action = clap::ArgAction::SetTrue, value_parser = env_bool_keep_alive)]
    pub keep_alive: bool,
}

#[derive(Debug, Clone, Args)]
pub struct OneShotArgs {
    #[command(flatten)]
    pub common: Common,
    /// Give up after this long when etcd cannot be reached, and exit 69.
    #[arg(long, env = "REGISTRAR_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct CheckConfigArgs {
    /// Which command the config is for [default: render when it has
    /// `templates:`, dns when it has `srv_min:`, else agent].
    #[arg(long = "for", value_enum, value_name = "COMMAND")]
    pub purpose: Option<Purpose>,
    #[command(flatten)]
    pub common: Common,
}

/// The commands whose config `check-config` checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Purpose {
    /// The agent (and register, deregister): dc, roles, the host's identity.
    Agent,
    /// render: at least one template, each of which parses.
    Render,
    /// dns: the connection and srv_min.
    Dns,
}

/// Output format of the logs (always on stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Flags shared by every command that talks to etcd or describes this host.
#[derive(Debug, Args, Default, Clone)]
pub struct Common {
    #[command(flatten)]
    pub connection: Connection,

    /// Datacenter segment of the keys, e.g. `dc1`.
    #[arg(long, env = "REGISTRAR_DC")]
    pub dc: Option<String>,

    /// Role of this host; repeat (or comma-separate) for several roles under one lease.
    #[arg(
        long = "role",
        env = "REGISTRAR_ROLE",
        value_delimiter = ',',
        value_name = "ROLE"
    )]
    pub roles: Vec<String>,

    /// Host name segment [default: the short hostname].
    #[arg(long, env = "REGISTRAR_HOST")]
    pub host: Option<String>,

    /// Address to publish, instead of detecting one.
    #[arg(long, env = "REGISTRAR_IP")]
    pub ip: Option<String>,

    /// Publish the first address of this network interface.
    #[arg(long, env = "REGISTRAR_INTERFACE", value_name = "NAME")]
    pub interface: Option<String>,

    /// Publish the first local address inside this network, e.g. 10.0.0.0/8.
    #[arg(long, env = "REGISTRAR_CIDR")]
    pub cidr: Option<String>,

    /// Detect an IPv6 address instead of IPv4 (for --interface and the default route).
    #[arg(long, env = "REGISTRAR_IPV6", action = clap::ArgAction::SetTrue, value_parser = env_bool_ipv6)]
    pub ipv6: bool,

    /// Accept a loopback or unspecified address (tests and demos only).
    #[arg(long, env = "REGISTRAR_ALLOW_LOOPBACK", action = clap::ArgAction::SetTrue, value_parser = env_bool_allow_loopback)]
    pub allow_loopback: bool,

    /// Lease TTL, e.g. 30s [default: 30s]. etcd may raise it to its minimum.
    #[arg(long, env = "REGISTRAR_TTL", value_parser = parse_duration)]
    pub ttl: Option<Duration>,

    /// Machine id that proves ownership of the host name [default: /etc/machine-id].
    #[arg(long, env = "REGISTRAR_MACHINE_ID", value_name = "ID")]
    pub machine_id: Option<String>,

    /// Directory for persistent state (a generated machine id) [default: /var/lib/registrar].
    #[arg(long, env = "REGISTRAR_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// A service port to publish, as NAME=PORT; repeatable.
    #[arg(
        long = "service",
        env = "REGISTRAR_SERVICES",
        value_delimiter = ',',
        value_name = "NAME=PORT"
    )]
    pub services: Vec<String>,

    /// A meta key to publish, as KEY=VALUE; repeatable.
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    pub meta: Vec<String>,
}

/// How to reach etcd and where the registry is: the flags of every command
/// that talks to etcd, `dns` included (which takes none of [`Common`]'s
/// host flags, and whose `--ttl` is the answers' TTL, not the lease's).
#[derive(Debug, Args, Default, Clone)]
pub struct Connection {
    /// YAML config file (see README "Configuration"). Flags and environment override it.
    #[arg(long, env = "REGISTRAR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// etcd endpoints, comma separated [default: http://127.0.0.1:2379; also ETCDCTL_ENDPOINTS].
    #[arg(
        long,
        env = "REGISTRAR_ENDPOINTS",
        value_delimiter = ',',
        value_name = "URLS"
    )]
    pub endpoints: Vec<String>,

    /// Registry prefix [default: /infrastructure].
    #[arg(long, env = "REGISTRAR_PREFIX")]
    pub prefix: Option<String>,

    /// CA bundle to verify etcd's certificate [also ETCDCTL_CACERT].
    #[arg(long, env = "REGISTRAR_CACERT", value_name = "FILE")]
    pub cacert: Option<PathBuf>,

    /// Client certificate for etcd [also ETCDCTL_CERT].
    #[arg(long, env = "REGISTRAR_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,

    /// Client key for etcd [also ETCDCTL_KEY].
    #[arg(long, env = "REGISTRAR_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,

    /// etcd user as `name:password`, or `name` with --password-file [also ETCDCTL_USER].
    #[arg(long, env = "REGISTRAR_USER", value_name = "NAME[:PASSWORD]")]
    pub user: Option<String>,

    /// File whose first line is the etcd password for --user.
    #[arg(long, env = "REGISTRAR_PASSWORD_FILE", value_name = "FILE")]
    pub password_file: Option<PathBuf>,

    /// Log format on stderr [default: text].
    #[arg(long, env = "REGISTRAR_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,

    /// Timeout of each etcd request [default: 5s].
    #[arg(long, env = "REGISTRAR_REQUEST_TIMEOUT", value_parser = parse_duration)]
    pub request_timeout: Option<Duration>,

    /// Serve Prometheus metrics and /health on this address, e.g. 127.0.0.1:9477.
    #[arg(long, env = "REGISTRAR_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<String>,

    /// Timeout of each TCP/TLS connect to etcd [default: 3s].
    #[arg(long, env = "REGISTRAR_CONNECT_TIMEOUT", value_parser = parse_duration)]
    pub connect_timeout: Option<Duration>,
}

/// `maintenance on --for`: a duration of at most a year. Longer is not a
/// drain but a decommission, and an end past year 9999 cannot be written.
fn parse_maintenance_for(s: &str) -> Result<Duration, String> {
    const YEAR: Duration = Duration::from_secs(366 * 24 * 3600);
    match parse_duration(s)? {
        d if d > YEAR => Err(format!(
            "{s:?} is more than a year; leave --for out to stay in maintenance until `maintenance off`"
        )),
        d if d.is_zero() => Err("must be greater than zero".into()),
        d => Ok(d),
    }
}

/// One line of printable text: a newline or another control character
/// would forge lines in `ls` and `watch` output.
pub fn parse_one_line(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("is empty".into());
    }
    match s.chars().find(|c| c.is_control()) {
        Some(c) => Err(format!(
            "{s:?} contains the control character {:?}; give one line of text",
            c
        )),
        None => Ok(s.to_string()),
    }
}

/// A yes/no value from the environment, spelled as people spell it: 1/0,
/// true/false, yes/no, on/off (any case). The message names the variable.
fn env_bool(var: &str, s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" | "y" => Ok(true),
        "0" | "false" | "no" | "off" | "n" | "" => Ok(false),
        _ => Err(format!(
            "{var}={s:?} is not a yes/no value; use 1 or 0, true or false, yes or no, on or off"
        )),
    }
}

fn env_bool_keep_alive(s: &str) -> Result<bool, String> {
    env_bool("REGISTRAR_KEEP_ALIVE", s)
}

fn env_bool_ipv6(s: &str) -> Result<bool, String> {
    env_bool("REGISTRAR_IPV6", s)
}

fn env_bool_allow_warning(s: &str) -> Result<bool, String> {
    env_bool("REGISTRAR_DNS_ALLOW_WARNING", s)
}

/// `dns --listen`: an address and a port.
fn parse_listen(s: &str) -> Result<std::net::SocketAddr, String> {
    s.trim().parse().map_err(|_| {
        format!("{s:?} is not ADDR:PORT; write it like 127.0.0.1:8600, 0.0.0.0:53 or [::1]:53")
    })
}

/// `dns --domain`: a DNS name of one or more labels (1 to 63 letters,
/// digits, `-` or `_` each), kept in lower case without the final dot.
fn parse_domain(s: &str) -> Result<String, String> {
    let name = s.trim().trim_end_matches('.').to_ascii_lowercase();
    if name.is_empty() {
        return Err("is empty; give a zone such as registry.internal".into());
    }
    if name.len() > 200 {
        return Err(format!(
            "{s:?} is {} characters long; keep the zone under 200 so that host names fit in 255",
            name.len()
        ));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!(
                "{s:?} has a label of {} characters; each must have 1 to 63",
                label.len()
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!(
                "{s:?} contains {c:?}; a zone has letters, digits, '-' and '_' between dots"
            ));
        }
    }
    Ok(name)
}

/// `dns --ttl`: whole seconds, at most a day (answers follow health, so a
/// long TTL keeps sending clients to hosts that failed).
fn parse_dns_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.subsec_nanos() != 0 {
        return Err(format!(
            "{s:?} is not a whole number of seconds; DNS TTLs are seconds"
        ));
    }
    if d > Duration::from_secs(86_400) {
        return Err(format!(
            "{s:?} is more than a day; answers follow health, give a few seconds (default 5s)"
        ));
    }
    Ok(d)
}

fn env_bool_allow_loopback(s: &str) -> Result<bool, String> {
    env_bool("REGISTRAR_ALLOW_LOOPBACK", s)
}

/// The one duration parser: humantime (`30s`, `1m30s`, `500ms`), for clap
/// and for the config file ([`crate::config::RawDuration`]).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); write it like 30s, 1m or 500ms"))
}

/// The flags of [`Common`] that only describe the host this agent
/// registers: the consumers (`ls`, `watch`, `wait`) read the registry and
/// have no use for them.
const AGENT_ONLY: &[&str] = &[
    "host",
    "ip",
    "interface",
    "cidr",
    "ipv6",
    "allow_loopback",
    "ttl",
    "machine_id",
    "state_dir",
    "services",
    "meta",
    "metrics_listen",
];

/// The commands that read the registry with [`Common`]'s flags (`render`
/// and `dns` take only [`Connection`]'s, so clap refuses the others).
const CONSUMERS: &[&str] = &["ls", "watch", "wait"];

/// The command line as clap parses it and `--help`, the man page and the
/// completions show it: the consumers do not list the agent-only flags.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    for name in CONSUMERS {
        cmd = cmd.mut_subcommand(*name, |mut sub| {
            for id in AGENT_ONLY {
                sub = sub.mut_arg(*id, |a| a.hide(true));
            }
            sub
        });
    }
    cmd
}

/// Parses the process's arguments with [`command`] (exits with clap's usage
/// error, 2, on a bad one). An agent-only flag given to a consumer on the
/// command line is refused rather than silently ignored; the same setting
/// from the environment (an agent's unit file) is ignored.
pub fn parse() -> Cli {
    use clap::FromArgMatches;
    let mut cmd = command();
    let matches = cmd.clone().get_matches();
    if let Some((name, sub)) = matches.subcommand()
        && CONSUMERS.contains(&name)
        && let Some(id) = AGENT_ONLY
            .iter()
            .find(|id| sub.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
    {
        let flag = cmd
            .find_subcommand(name)
            .and_then(|s| s.get_arguments().find(|a| a.get_id() == *id))
            .and_then(|a| a.get_long())
            .unwrap_or(id);
        cmd.error(
            clap::error::ErrorKind::ArgumentConflict,
            format!("`registrar {name}` reads the registry and does not take --{flag} (a flag of the agent)"),
        )
        .exit();
    }
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}
