//! registrar keeps one host's entry in an etcd v3 infrastructure registry
//! alive and correct for as long as the host lives.
//!
//! The architecture, one line per module:
//! - [`cli`]: clap definitions of the command line.
//! - [`config`]: raw YAML + flags + environment → validated [`config::Config`].
//! - [`identity`]: host name, published address, machine id.
//! - [`layout`]: the key layout of the registry; build keys, parse them back.
//! - [`etcd`]: per-endpoint clients, fail-over, timeouts, error classification.
//! - [`backoff`]: the one retry policy (jittered exponential backoff).
//! - [`check`]: health checks (exec, http, tcp), thresholds, the check runner.
//! - [`registration`]: the conditional transactions: write, conflict, takeover, deregister.
//! - [`lease`]: keep-alive loop and lease-loss detection.
//! - [`guard`]: watch on the host's own keys, to repair outside damage at once.
//! - [`maintenance`]: the maintenance state file and its poller.
//! - [`registry`]: the read model of the registry for ls, watch and wait.
//! - [`report`]: composes what the host reports from config, checks and maintenance.
//! - [`telemetry`]: systemd notifications and Prometheus metrics, fed by the agent.
//! - [`agent`]: ties it together: register, hold, re-register, revoke on shutdown.
//! - [`commands`]: one module per command; errors → exit codes.
#![forbid(unsafe_code)]

pub mod agent;
pub mod backoff;
pub mod check;
pub mod cli;
pub mod commands;
pub mod config;
pub mod etcd;
pub mod guard;
pub mod identity;
pub mod layout;
pub mod lease;
pub mod maintenance;
pub mod registration;
pub mod registry;
pub mod report;
pub mod telemetry;
