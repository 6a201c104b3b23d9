//! The agent's side of SIGHUP ([`crate::reload`] is where reloads come
//! from): a reload may change what the host reports (roles, services,
//! meta, checks, `output_refresh`); the composer applies those on the same
//! lease. Everything else (the etcd connection, identity, TTL) takes a
//! restart: a reload that changes it says so and keeps the old value. A
//! reload that does not validate changes nothing.

use crate::config::Config;
pub use crate::reload::{Reload, Reloads, sighup};

/// The new configuration, validated, or `None` (said in the log) when it
/// cannot be used. Warns about changes that take a restart.
pub fn load(load: &Reload, old: &Config) -> Option<Config> {
    let new = match load().and_then(|c| c.require_registration_fields().map(|_| c)) {
        Ok(new) => new,
        Err(e) => {
            tracing::error!("reload refused, the old configuration stays in force: {e}");
            return None;
        }
    };
    let kept = restart_only_changes(old, &new);
    if !kept.is_empty() {
        tracing::warn!(
            "reload: {} changed; that takes a restart, so the old value stays in force until then",
            kept.join(", ")
        );
    }
    Some(new)
}

/// The fields a reload cannot change on a running agent.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.etcd != new.etcd {
        changed.push("the etcd connection");
    }
    if old.prefix != new.prefix {
        changed.push("prefix");
    }
    if old.dc != new.dc {
        changed.push("dc");
    }
    if old.host != new.host {
        changed.push("host");
    }
    if old.address != new.address
        || old.ipv6 != new.ipv6
        || old.allow_loopback != new.allow_loopback
    {
        changed.push("the address");
    }
    if old.ttl != new.ttl {
        changed.push("ttl");
    }
    if old.machine_id != new.machine_id || old.state_dir != new.state_dir {
        changed.push("machine_id/state_dir");
    }
    changed
}
