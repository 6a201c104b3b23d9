//! `registrar render`: the registry drives config files (contract section 6).
//!
//! One watch of the prefix feeds an in-memory mirror
//! ([`Follower`](crate::registry::follow::Follower)); every render reads the
//! mirror only, at one revision. After a change, a template renders once
//! the registry was quiet for `wait.min`, and no later than `wait.max` after
//! its first unrendered change. A rendered file is checked, written
//! atomically, and reloaded; a failed reload puts the old file back.
//!
//! Fail closed: nothing is rendered before the first complete read; while
//! etcd is unreachable the last output stays; a render listing fewer hosts
//! than `min_hosts`, or a template error, keeps the previous file.

pub mod template;
pub mod write;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::agent::reload::{self, Reloads};
use crate::config::{Config, TemplateSpec};
use crate::etcd::{Etcd, EtcdError};
use crate::registry::follow::Follower;
use crate::telemetry::RenderMetrics;
use template::View;

/// How `render` runs.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Render every template once and exit.
    pub once: bool,
    /// Print the output to stdout; write and run nothing.
    pub dry_run: bool,
    /// With `once`: how long to try to reach etcd.
    pub timeout: Duration,
}

/// Why `render` stopped with an error (mapped to contract exit codes).
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// etcd could not be read (exit 69, or 77 for auth/TLS).
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// A template or the configuration cannot work (exit 78).
    #[error("{0}")]
    Config(String),
    /// `--once`: a check or a reload failed (exit 1).
    #[error("{0}")]
    Failed(String),
}

/// One template and what was last rendered from it.
struct Slot {
    spec: TemplateSpec,
    name: String,
    source: String,
    /// The first change not rendered yet, and the last change seen.
    dirty_since: Option<Instant>,
    last_change: Instant,
    /// The hosts the last written render listed.
    listed: Option<BTreeSet<String>>,
}

impl Slot {
    fn load(spec: &TemplateSpec) -> Result<Slot, RenderError> {
        let source = std::fs::read_to_string(&spec.source).map_err(|e| {
            RenderError::Config(format!(
                "cannot read template {}: {e}",
                spec.source.display()
            ))
        })?;
        Ok(Slot {
            name: spec.source.display().to_string(),
            spec: spec.clone(),
            source,
            dirty_since: Some(Instant::now()),
            last_change: Instant::now(),
            listed: None,
        })
    }

    /// When this template is due, if it has unrendered changes.
    fn due(&self) -> Option<Instant> {
        let since = self.dirty_since?;
        let quiet = self.last_change + self.spec.wait_min;
        Some(if self.spec.wait_max.is_zero() {
            quiet
        } else {
            quiet.min(since + self.spec.wait_max)
        })
    }
}

fn load_all(config: &Config) -> Result<Vec<Slot>, RenderError> {
    if config.templates.is_empty() {
        return Err(RenderError::Config(
            "no templates: add a `templates:` list to the config file (see README \"Rendering configs\")".into(),
        ));
    }
    config.templates.iter().map(Slot::load).collect()
}

/// What one cycle did.
#[derive(Default)]
struct Cycle {
    /// Check, reload or write failures.
    failed: Vec<String>,
    /// Template errors.
    broken: Vec<String>,
}

/// Runs `render` until `cancel` (or once).
pub async fn run(
    config: Config,
    etcd: &Etcd,
    options: Options,
    cancel: &CancellationToken,
    reloads: Option<Reloads>,
    metrics: &RenderMetrics,
) -> Result<(), RenderError> {
    let mut slots = load_all(&config)?;
    // The first complete read: nothing is rendered before it.
    let deadline = if options.once {
        Instant::now() + options.timeout
    } else {
        Instant::now() + Duration::from_secs(3600 * 24 * 365 * 100)
    };
    let prefix = config.prefix.clone();
    let scope = format!("{prefix}/");
    let start = tokio::select! {
        _ = cancel.cancelled() => return Ok(()),
        r = crate::etcd::retry_until(deadline, || Follower::start(etcd, &prefix, &scope)) => r,
    };
    let (mut follower, bad) = start?;
    for m in bad {
        tracing::debug!(key = m.key, why = m.why, "skipping a malformed key");
    }
    let mut ready_sent = false;
    // WATCHDOG=1 from the render loop itself: a loop stuck in a render or
    // a command past the unit's WatchdogSec is restarted.
    let mut watchdog = tokio::time::interval(Duration::from_secs(10));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (notify, load) = match reloads {
        Some(r) => (Some(r.notify), Some(r.load)),
        None => (None, None),
    };
    loop {
        // Render what is due.
        let now = Instant::now();
        let due: Vec<usize> = (0..slots.len())
            .filter(|i| slots[*i].due().is_some_and(|at| at <= now))
            .collect();
        if !due.is_empty() {
            let view = View {
                prefix: prefix.clone(),
                revision: follower.revision,
                registry: Arc::new(follower.registry.clone()),
            };
            let cycle = render_cycle(&mut slots, &due, &view, options, metrics).await;
            metrics.rendered_revision.set(follower.revision);
            if options.once || options.dry_run {
                if let Some(e) = cycle.broken.first() {
                    return Err(RenderError::Config(e.clone()));
                }
                if !cycle.failed.is_empty() {
                    return Err(RenderError::Failed(cycle.failed.join("; ")));
                }
                return Ok(());
            }
            if !ready_sent && slots.iter().all(|s| s.listed.is_some()) {
                ready_sent = true;
                metrics.set_ready();
                crate::telemetry::notify_ready(&format!(
                    "rendered {} templates at revision {}",
                    slots.len(),
                    follower.revision
                ));
            }
        }
        let next_due = slots.iter().filter_map(Slot::due).min();
        let timer = async {
            match next_due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let reloaded = reload::sighup(notify.as_deref());
        let mut report = |m: crate::registry::Malformed| {
            tracing::debug!(key = m.key, why = m.why, "skipping a malformed key");
        };
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = watchdog.tick() => {
                if ready_sent {
                    crate::telemetry::notify_watchdog();
                }
            }
            _ = timer => {}
            _ = reloaded => {
                let Some(load) = &load else { continue };
                // load_all refuses an empty template list, as at start.
                match load() {
                    Err(e) => tracing::error!("reload refused, the old configuration stays in force: {e}"),
                    Ok(new) => match load_all(&new) {
                        Err(e) => tracing::error!("reload refused, the old templates stay in force: {e}"),
                        Ok(new_slots) => {
                            tracing::info!(templates = new_slots.len(), "configuration and templates reloaded");
                            slots = new_slots;
                        }
                    },
                }
            }
            batch = follower.next(&mut report) => {
                batch?;
                metrics.registry_revision.set(follower.revision);
                let now = Instant::now();
                for slot in &mut slots {
                    slot.dirty_since.get_or_insert(now);
                    slot.last_change = now;
                }
            }
        }
    }
}

/// Renders the due templates at one view, writes what changed, and runs
/// each distinct reload once.
async fn render_cycle(
    slots: &mut [Slot],
    due: &[usize],
    view: &View,
    options: Options,
    metrics: &RenderMetrics,
) -> Cycle {
    let mut cycle = Cycle::default();
    // reload argv → the templates written in this cycle that use it.
    let mut reloads: BTreeMap<Vec<String>, Vec<(usize, write::Previous)>> = BTreeMap::new();
    for &i in due {
        let slot = &mut slots[i];
        slot.dirty_since = None;
        metrics.renders.inc();
        let (text, listed) = match template::render(&slot.name, &slot.source, view) {
            Ok(r) => r,
            Err(e) => {
                metrics.template_errors.inc();
                let why = format!(
                    "template {} does not render; the previous {} stays: {}",
                    slot.name,
                    slot.spec.destination.display(),
                    template::describe(&e)
                );
                tracing::error!("{why}");
                cycle.broken.push(why);
                continue;
            }
        };
        if let Some(min) = slot.spec.min_hosts
            && listed.len() < min
        {
            let why = format!(
                "{} would list {} hosts, fewer than min_hosts {min}; keeping the previous file",
                slot.spec.destination.display(),
                listed.len()
            );
            tracing::warn!(revision = view.revision, "{why}");
            metrics.min_hosts_refusals.inc();
            cycle.failed.push(why);
            continue;
        }
        if options.dry_run {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
            continue;
        }
        if !write::differs(&slot.spec, text.as_bytes()) {
            slot.listed = Some(listed);
            continue;
        }
        match write::commit(&slot.spec, text.as_bytes()).await {
            Ok(previous) => {
                metrics.writes.inc();
                tracing::info!(
                    revision = view.revision,
                    "wrote {}: {}",
                    slot.spec.destination.display(),
                    summary(slot.listed.as_ref(), &listed)
                );
                slot.listed = Some(listed);
                if let Some(reload) = &slot.spec.reload {
                    reloads
                        .entry(reload.clone())
                        .or_default()
                        .push((i, previous));
                }
            }
            Err(e) => {
                if matches!(e, write::WriteError::CheckFailed { .. }) {
                    metrics.check_failures.inc();
                }
                tracing::error!("{e}; the previous file stays");
                cycle.failed.push(e.to_string());
            }
        }
    }
    // Each distinct reload once; never two at a time.
    for (argv, written) in reloads {
        let timeout = written
            .iter()
            .map(|(i, _)| slots[*i].spec.command_timeout)
            .max()
            .unwrap_or(Duration::from_secs(30));
        let outcome = write::run_command(&argv, None, timeout).await;
        if outcome.ok {
            continue;
        }
        metrics.reload_failures.inc();
        let why = format!("reload {argv:?} failed: {}", outcome.text.trim());
        tracing::error!("{why}; restoring the previous files and reloading again");
        for (i, previous) in &written {
            if let Err(e) = write::restore(previous) {
                tracing::error!("{e}");
            }
            slots[*i].listed = None;
            // Try again at the next change.
        }
        let again = write::run_command(&argv, None, timeout).await;
        if again.ok {
            tracing::warn!("restored the previous files; reload {argv:?} succeeded with them");
        } else {
            tracing::error!(
                "reload {argv:?} failed with the previous files too: {}",
                again.text.trim()
            );
        }
        cycle.failed.push(why);
    }
    cycle
}

/// "+2 hosts (a, b), -1 host (c)" between two renders' host lists.
fn summary(before: Option<&BTreeSet<String>>, after: &BTreeSet<String>) -> String {
    let Some(before) = before else {
        return format!("{} hosts", after.len());
    };
    let added: Vec<&String> = after.difference(before).collect();
    let removed: Vec<&String> = before.difference(after).collect();
    let part = |sign: char, v: &[&String]| {
        let list: Vec<&str> = v.iter().take(5).map(|s| s.as_str()).collect();
        let more = if v.len() > 5 { ", ..." } else { "" };
        format!(
            "{sign}{} host{} ({}{more})",
            v.len(),
            if v.len() == 1 { "" } else { "s" },
            list.join(", ")
        )
    };
    match (added.is_empty(), removed.is_empty()) {
        (true, true) => format!("{} hosts, same set; other content changed", after.len()),
        (false, true) => part('+', &added),
        (true, false) => part('-', &removed),
        (false, false) => format!("{}, {}", part('+', &added), part('-', &removed)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_name_what_changed() {
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(summary(None, &set(&["a", "b"])), "2 hosts");
        assert_eq!(
            summary(Some(&set(&["a"])), &set(&["a", "b", "c"])),
            "+2 hosts (b, c)"
        );
        assert_eq!(
            summary(Some(&set(&["a", "b"])), &set(&["b", "c"])),
            "+1 host (c), -1 host (a)"
        );
        assert_eq!(
            summary(Some(&set(&["a", "b"])), &set(&["a"])),
            "-1 host (b)"
        );
    }
}
