//! registrar keeps one host's entry in an etcd v3 infrastructure registry
//! alive and correct for as long as the host lives.
//!
//! What it promises (the key layout, the rules, the commands, render, dns
//! and fail static) is docs/design.md; comments cite it as "design.md
//! section N" and "design.md rule N".
//!
//! The architecture, one line per module:
//! - [`cli`]: clap definitions of the command line.
//! - [`config`]: raw YAML + flags + environment → validated [`config::Config`],
//!   one module per step (raw, sources, validate, limits, display).
//! - [`error`]: the error-chain text shared by the etcd classifier and the checks.
//! - [`identity`]: host name, published address, machine id.
//! - [`layout`]: the key layout of the registry; build keys, parse them back.
//! - [`etcd`]: per-endpoint clients, fail-over, timeouts, error classification.
//! - [`backoff`]: the one retry policy (jittered exponential backoff).
//! - [`check`]: health checks (exec, http, tcp), thresholds, the check runner.
//! - [`child`]: the one bounded way to run a program (checks, render's commands).
//! - [`registration`]: the conditional transactions over a host's keys:
//!   write, update, conflict, takeover, verify, deregister.
//! - [`lease`]: the lease session task: grant, keep-alive, loss, re-grant,
//!   revoke; lease ids and time-to-live.
//! - [`maintenance`]: the maintenance state file and its poller.
//! - [`registry`]: the read model of the registry, and [`registry::follow`],
//!   the one watch that keeps it current, for ls, watch, wait, render and
//!   dns; [`registry::hold`], fail static's decisions.
//! - [`render`]: `registrar render`: templates over the registry, checked,
//!   written atomically, reloaded, or applied through haproxy's runtime API
//!   ([`render::haproxy`] decides, [`render::runtime`] talks to the socket).
//! - [`dns`]: `registrar dns`: the zone built from the mirror, and the server.
//! - [`telemetry`]: systemd notifications and Prometheus metrics, fed by the agent.
//! - [`agent`]: the long-running agent and its start and shutdown order:
//!   [`agent::composer`] (what the host reports), [`agent::reload`] (what a
//!   SIGHUP may change),
//!   [`agent::writer`] (keys = latest report, on the session's lease),
//!   [`agent::own_keys`] (the watch that notices outside damage).
//! - [`process`]: logging set-up and signal handling.
//! - [`reload`]: what a running command can be asked from outside: stop,
//!   and SIGHUP's reload.
//! - [`commands`]: one module per command; errors → exit codes.
#![forbid(unsafe_code)]

pub mod agent;
pub mod backoff;
pub mod check;
pub mod child;
pub mod cli;
pub mod commands;
pub mod config;
pub mod dns;
pub mod error;
pub mod etcd;
pub mod identity;
pub mod layout;
pub mod lease;
pub mod maintenance;
pub mod manual;
pub mod process;
pub mod registration;
pub mod registry;
pub mod reload;
pub mod render;
pub mod telemetry;
