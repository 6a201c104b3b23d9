//! What this host reports: composes the desired registration from the
//! config, the identity, the check results and maintenance, and republishes
//! it whenever one of them changes (including a SIGHUP reload).
//!
//! The agent only ever sees the latest [`Desired`] on a watch channel; it
//! writes to etcd when that value differs from what it wrote last. So an
//! unchanged input produces no write.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::reload::{self, Reloads};
use crate::check::{CheckSet, Snapshot};
use crate::config::Config;
use crate::identity::Identity;
use crate::maintenance;
use crate::registration::{Desired, Spec};

/// The JSON value of `checks/<name>`.
pub fn check_json(r: &crate::check::Reported) -> String {
    crate::registry::CheckView {
        status: r.status,
        output: r.output.clone(),
        since: humantime::format_rfc3339_seconds(r.since).to_string(),
    }
    .to_json()
}

/// The registration for this config, identity, check results and maintenance.
pub fn compose(
    config: &Config,
    identity: &Identity,
    checks: &Snapshot,
    maintenance: Option<&str>,
) -> Desired {
    let json: BTreeMap<String, String> = checks
        .results
        .iter()
        .map(|(name, r)| (name.clone(), check_json(r)))
        .collect();
    let health = checks.health();
    Desired::build(
        &Spec {
            prefix: &config.prefix,
            dc: config.dc.as_deref().unwrap_or_default(),
            roles: &config.roles,
            services: &config.services,
            meta: &config.meta,
            health: health.as_str(),
            checks: &json,
            passing: checks
                .results
                .values()
                .filter(|r| r.status == crate::check::Status::Passing)
                .count(),
            maintenance,
            withdrawn: checks.withdraw.is_some(),
        },
        identity,
    )
}

/// Everything the composer works from.
pub struct Composer {
    pub config: Config,
    pub identity: Identity,
    /// `register --keep-alive` runs no checks.
    pub with_checks: bool,
    pub tx: watch::Sender<Option<Desired>>,
    /// SIGHUP notifications and how to load the config again.
    pub reload: Option<Reloads>,
    pub metrics: crate::telemetry::Metrics,
}

/// Runs the composer until `cancel`: starts the checks, waits for their first
/// results, then publishes the desired registration on every change.
pub async fn run(composer: Composer, cancel: CancellationToken, tasks: TaskTracker) {
    let Composer {
        mut config,
        identity,
        with_checks,
        tx,
        reload,
        metrics,
    } = composer;
    if !with_checks {
        config.checks.clear();
    }
    let mut checks = CheckSet::start(
        &config.checks,
        config.output_refresh,
        None,
        &cancel,
        &tasks,
        Some(Arc::new(metrics.clone())),
    );
    let mut maint = maintenance::Watcher::new(&config.state_dir);
    let mut tick = tokio::time::interval(maintenance::POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut withdrawn = false;
    let (notify, reload_fn) = match reload {
        Some(r) => (Some(r.notify), Some(r.load)),
        None => (None, None),
    };
    loop {
        let snapshot = checks.rx.borrow_and_update().clone();
        if snapshot.withdraw.is_some() != withdrawn {
            withdrawn = snapshot.withdraw.is_some();
            match &snapshot.withdraw {
                Some(why) => tracing::warn!(
                    "{why}: withdrawing this host's keys (the lease and owner key stay)"
                ),
                None => {
                    tracing::info!("the withdrawing check passes again: restoring this host's keys")
                }
            }
        }
        metrics.set_maintenance(maint.current().is_some(), maint.until());
        if snapshot.complete {
            let desired = compose(&config, &identity, &snapshot, maint.current());
            tx.send_if_modified(|cur| {
                if cur.as_ref() == Some(&desired) {
                    false
                } else {
                    *cur = Some(desired);
                    true
                }
            });
        }
        let reloaded = reload::sighup(notify.as_deref());
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = checks.rx.changed() => {
                if r.is_err() {
                    // Only possible while shutting down.
                    return;
                }
            }
            _ = tick.tick() => {
                if !maint.poll() {
                    continue;
                }
            }
            _ = reloaded => {
                let Some(load) = &reload_fn else { continue };
                let Some(mut new) = reload::load(load, &config) else { continue };
                if !with_checks {
                    new.checks.clear();
                }
                let previous = checks.rx.borrow().clone();
                let next = CheckSet::start(
                    &new.checks,
                    new.output_refresh,
                    Some((&config.checks, &previous)),
                    &cancel,
                    &tasks,
                    Some(Arc::new(metrics.clone())),
                );
                for old in &config.checks {
                    if !new.checks.iter().any(|c| c.name == old.name) {
                        metrics.check_removed(&old.name);
                    }
                }
                checks.stop();
                checks = next;
                config.roles = new.roles;
                config.services = new.services;
                config.meta = new.meta;
                config.checks = new.checks;
                config.output_refresh = new.output_refresh;
                tracing::info!(
                    roles = ?config.roles,
                    checks = config.checks.len(),
                    "configuration reloaded"
                );
            }
        }
    }
}
