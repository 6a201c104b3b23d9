//! `registrar render`: the registry drives config files (design.md section 6).
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
//!
//! Fail static (design.md section 8): each template has its own
//! [`Holds`]; a host that vanished without `leaving` in a way that looks
//! like an accident of the registry is shown to that template as it was
//! last seen, until it is back or `fail_static.settle` has passed.

pub mod haproxy;
pub mod link;
pub mod runtime;
pub mod template;
pub mod write;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::child::{self, Leftovers};
use crate::config::{Config, TemplateSpec};
use crate::etcd::{Etcd, EtcdError};
use crate::registry::follow::{Batch, Follower};
use crate::registry::hold::{self, Holds};
use crate::registry::{HostId, Hosts, Malformed, Registry, Shown};
use crate::reload::{self, Reloads};
use crate::telemetry::RenderMetrics;
use template::{Reads, View};

/// How `render` runs.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Render every template once and exit.
    pub once: bool,
    /// Print the output to stdout; write and run nothing.
    pub dry_run: bool,
    /// With `once` or `dry_run`: how long to try to reach etcd.
    pub timeout: Duration,
}

/// Why `render` stopped with an error (mapped to the exit codes of design.md section 4).
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
    source: template::Source,
    /// The first change not rendered yet, and the last change seen.
    dirty_since: Option<Instant>,
    last_change: Instant,
    /// The hosts the render in force listed (`None` until one is).
    listed: Option<BTreeSet<String>>,
    /// What the last render read: changes elsewhere leave it alone.
    reads: Reads,
    /// Its last render was refused by `min_hosts`.
    refused: bool,
    /// Fail static: hosts that vanished without `leaving` and are still
    /// shown to this template (design.md section 8).
    holds: Holds,
    /// haproxy's runtime API: servers removed at runtime that still have
    /// connections, and when to try deleting them again.
    draining: Vec<runtime::Draining>,
    sweep_at: Option<Instant>,
}

impl Slot {
    fn load(spec: &TemplateSpec) -> Result<Slot, RenderError> {
        let text = std::fs::read_to_string(&spec.source).map_err(|e| {
            RenderError::Config(format!(
                "cannot read template {}: {e}",
                spec.source.display()
            ))
        })?;
        let name = spec.source.display().to_string();
        let source = template::Source::parse(&name, text)
            .map_err(|e| RenderError::Config(format!("template {name} does not parse: {e}")))?;
        Ok(Slot {
            spec: spec.clone(),
            source,
            dirty_since: Some(Instant::now()),
            last_change: Instant::now(),
            listed: None,
            reads: Reads::All,
            refused: false,
            holds: Holds::new(spec.fail_static),
            draining: Vec::new(),
            sweep_at: None,
        })
    }

    /// When this template is due, if it has unrendered changes: once the
    /// registry was quiet for `wait_min`, and no later than `wait_max`
    /// after the first change (validation keeps `wait_max >= wait_min`).
    fn due(&self) -> Option<Instant> {
        let since = self.dirty_since?;
        Some((self.last_change + self.spec.wait_min).min(since + self.spec.wait_max))
    }

    /// A change of `keys` at `now`: only one the last render read makes
    /// this template due, or resets its quiet time.
    fn changed(&mut self, keys: &[String], now: Instant) {
        if keys.iter().any(|k| self.reads.covers(k)) {
            self.dirty_since.get_or_insert(now);
            self.last_change = now;
        }
    }

    /// Takes in one batch for fail static, and says what it decided.
    fn observe(
        &mut self,
        batch: &Batch,
        live: &Registry,
        prefix: &str,
        now: Instant,
        metrics: &RenderMetrics,
    ) {
        let events = self.holds.observe(
            now,
            batch
                .changes
                .iter()
                .map(|(id, b, a)| (id, b.as_ref(), a.as_ref())),
            batch.reset,
            |dc, role| {
                live.in_role(dc, role)
                    .filter(|id| live.hosts.get(*id).is_some_and(|h| h.present()))
                    .count()
            },
        );
        self.said(&events, metrics);
        // A hold may put back a host an earlier render left out.
        let keys: Vec<String> = events
            .iter()
            .flat_map(hold::Event::hosts)
            .map(|id| ip_key(prefix, id))
            .collect();
        self.changed(&keys, now);
    }

    /// Ends the holds whose settle passed: their removal is a change.
    fn expire(&mut self, prefix: &str, now: Instant, metrics: &RenderMetrics) {
        let (ended, events) = self.holds.expire(now);
        self.said(&events, metrics);
        let keys: Vec<String> = ended.iter().map(|id| ip_key(prefix, id)).collect();
        self.changed(&keys, now);
    }

    fn said(&self, events: &[hold::Event], metrics: &RenderMetrics) {
        if !events.is_empty() {
            hold::log(
                events,
                &format!("render of {}", self.spec.destination.display()),
            );
            metrics.holds.count(events);
        }
    }

    /// The registry this template is shown: the live one, or, while it
    /// holds hosts, the live one with them put back.
    fn view(&self, live: &View) -> View {
        if self.holds.held().is_empty() {
            return live.clone();
        }
        let shown = Shown {
            live: &live.registry,
            held: self.holds.held(),
        };
        View {
            registry: Arc::new(shown.to_registry(&live.prefix)),
            ..live.clone()
        }
    }

    /// Deletes the servers that finished draining; comes back in a second
    /// while any still drain.
    async fn sweep(&mut self) {
        if let Some(h) = &self.spec.haproxy {
            let socket = runtime::Socket::new(&h.socket);
            runtime::sweep(&socket, &mut self.draining, Some(h.drain)).await;
        } else {
            self.draining.clear();
        }
        self.sweep_at = (!self.draining.is_empty()).then(|| Instant::now() + SWEEP_EVERY);
    }

    /// The file `previous` held was just replaced by `new`: haproxy takes
    /// the difference through its runtime API when it can. `Err`: the
    /// reload must run, and why.
    async fn apply_at_runtime(
        &mut self,
        previous: &write::Previous,
        new: &[u8],
    ) -> Result<runtime::Applied, haproxy::Reload> {
        let Some(h) = &self.spec.haproxy else {
            return Err(haproxy::Reload {
                reason: "none",
                detail: String::new(),
            });
        };
        let Some(old) = &previous.file else {
            return Err(haproxy::Reload {
                reason: "first",
                detail: "there was no file before, so haproxy runs something else".into(),
            });
        };
        let old = haproxy::Parsed::parse(&String::from_utf8_lossy(&old.bytes));
        let new = haproxy::Parsed::parse(&String::from_utf8_lossy(new));
        let changes = haproxy::plan(&old, &new)?;
        let socket = runtime::Socket::new(&h.socket);
        let applied = runtime::apply(&socket, &old, &changes, &mut self.draining).await;
        self.sweep_at = (!self.draining.is_empty()).then(|| Instant::now() + SWEEP_EVERY);
        applied
    }

    /// The last render was written, found unchanged, or held by
    /// `min_hosts`: a state render can stand by (READY=1 waits for it).
    fn settled(&self) -> bool {
        self.listed.is_some() || self.refused
    }
}

/// How often servers removed at runtime are tried for deletion.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// What render says when there is nothing to render: which file to edit.
fn no_templates(config: &Config) -> String {
    match &config.source {
        Some(file) => format!(
            "no templates in {}: add a `templates:` list there, or uncomment the example in it (see README \"Rendering configs\")",
            file.display()
        ),
        None => "no templates: give render a config file (--config) with a `templates:` list (see README \"Rendering configs\")".into(),
    }
}

/// The `ip` key of a host: a key under everything a template that reads
/// the host looked at.
fn ip_key(prefix: &str, id: &HostId) -> String {
    format!("{prefix}/{}/{}/{}/ip", id.dc, id.role, id.host)
}

/// Keeps the holds of templates whose destination and `fail_static` a
/// reload left as they were, and the servers draining in the same haproxy:
/// a SIGHUP must not drop a hold or forget a server it still has to delete.
fn carry_holds(old: &mut [Slot], new: &mut [Slot]) {
    for n in new.iter_mut() {
        if let Some(o) = old.iter_mut().find(|o| {
            o.spec.destination == n.spec.destination && o.spec.fail_static == n.spec.fail_static
        }) {
            n.holds = std::mem::take(&mut o.holds);
        }
        // Servers still draining in the same haproxy.
        if let Some(o) = old.iter_mut().find(|o| {
            o.spec.destination == n.spec.destination
                && o.spec.haproxy.as_ref().map(|h| &h.socket)
                    == n.spec.haproxy.as_ref().map(|h| &h.socket)
        }) {
            n.draining = std::mem::take(&mut o.draining);
            n.sweep_at = o.sweep_at;
        }
    }
}

/// Fail static's figures over every template.
fn show_holds(slots: &[Slot], metrics: &RenderMetrics, now: Instant) {
    let hosts: BTreeSet<&HostId> = slots.iter().flat_map(|s| s.holds.held().keys()).collect();
    let holding_for = slots.iter().filter_map(|s| s.holds.holding_for(now)).max();
    let settle = slots
        .iter()
        .map(|s| s.holds.settings().settle)
        .max()
        .unwrap_or_default();
    metrics.holds.show(hosts.len(), holding_for, settle);
    metrics
        .holds
        .units
        .set(slots.iter().filter(|s| !s.holds.held().is_empty()).count() as i64);
}

/// Every template of `config`, loaded and parsed: all of them, or the
/// first problem.
fn load_all(config: &Config) -> Result<Vec<Slot>, RenderError> {
    if config.templates.is_empty() {
        return Err(RenderError::Config(no_templates(config)));
    }
    config.templates.iter().map(Slot::load).collect()
}

/// Why the templates of `config` would not load, for `check-config`:
/// none at all, or each one that cannot be read or does not parse.
pub fn check_templates(config: &Config) -> Vec<String> {
    if config.templates.is_empty() {
        return vec![no_templates(config)];
    }
    config
        .templates
        .iter()
        .filter_map(|spec| Slot::load(spec).err().map(|e| e.to_string()))
        .collect()
}

/// What one cycle did.
#[derive(Default)]
struct Cycle {
    /// Check, reload or write failures.
    failed: Vec<String>,
    /// Template errors.
    broken: Vec<String>,
}

/// Malformed keys, each reported once at WARN while render runs.
#[derive(Default)]
struct Reported {
    keys: BTreeSet<String>,
}

impl Reported {
    /// Logs `m` unless its key was reported already. Past 1,000 distinct
    /// keys the rest go to debug, so a registry full of junk cannot flood
    /// the log.
    fn report(&mut self, m: Malformed) {
        if self.keys.contains(&m.key) {
            return;
        }
        if self.keys.len() < 1000 {
            tracing::warn!(key = %m.key.escape_debug(), why = m.why, "malformed key: left out of every template");
            self.keys.insert(m.key);
        } else {
            tracing::debug!(key = %m.key.escape_debug(), why = m.why, "malformed key: left out of every template");
        }
    }
}

/// How one run of the loop ended.
enum Exit {
    /// Cancelled, or `--once`/`--dry-run` done.
    Done,
    /// SIGHUP brought a new etcd connection or prefix, already proved to
    /// work: follow the registry through it from now on.
    Switch(Box<(Config, Etcd, Vec<Slot>)>),
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
    for slot in &slots {
        let n = write::sweep(&slot.spec.destination);
        if n > 0 {
            tracing::warn!(
                "removed {n} staged file(s) of {} left by an earlier render that did not finish",
                slot.spec.destination.display()
            );
        }
    }
    let mut config = config;
    let mut switched: Option<Etcd> = None;
    let mut ready = false;
    loop {
        let current = switched.as_ref().unwrap_or(etcd);
        let exit = follow(
            &config,
            current,
            &mut slots,
            &mut ready,
            options,
            cancel,
            reloads.as_ref(),
            metrics,
        )
        .await?;
        match exit {
            Exit::Done => return Ok(()),
            Exit::Switch(new) => {
                let (new_config, new_etcd, mut new_slots) = *new;
                config = new_config;
                carry_holds(&mut slots, &mut new_slots);
                slots = new_slots;
                switched = Some(new_etcd);
            }
        }
    }
}

/// Follows the registry through one connection, rendering what is due.
#[allow(clippy::too_many_arguments)]
async fn follow(
    config: &Config,
    etcd: &Etcd,
    slots: &mut Vec<Slot>,
    ready: &mut bool,
    options: Options,
    cancel: &CancellationToken,
    reloads: Option<&Reloads>,
    metrics: &RenderMetrics,
) -> Result<Exit, RenderError> {
    // The first complete read: nothing is rendered before it.
    let deadline = if options.once || options.dry_run {
        Instant::now() + options.timeout
    } else {
        crate::etcd::never()
    };
    let prefix = config.prefix.clone();
    let scope = format!("{prefix}/");
    let start = tokio::select! {
        _ = cancel.cancelled() => return Ok(Exit::Done),
        _ = tokio::time::sleep_until(deadline) => {
            return Err(RenderError::Etcd(EtcdError::Timeout {
                endpoint: etcd.endpoints().join(","),
                what: "read the registry",
                after: options.timeout,
            }));
        }
        r = crate::etcd::retry_until(deadline, || Follower::start(etcd, &prefix, &scope)) => r,
    };
    let (mut follower, bad) = start?;
    let mut reported = Reported::default();
    bad.into_iter().for_each(|m| reported.report(m));
    // WATCHDOG=1 from the render loop itself: a loop stuck in a render or
    // a command past the unit's WatchdogSec is restarted.
    let mut watchdog = tokio::time::interval(Duration::from_secs(10));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Render what is due.
        let now = Instant::now();
        let due: Vec<usize> = (0..slots.len())
            .filter(|i| slots[*i].due().is_some_and(|at| at <= now))
            .collect();
        if !due.is_empty() {
            let live = View {
                prefix: prefix.clone(),
                revision: follower.revision,
                registry: Arc::new(follower.registry.clone()),
            };
            let views: BTreeMap<usize, View> =
                due.iter().map(|&i| (i, slots[i].view(&live))).collect();
            let cycle = render_cycle(slots, &views, options, metrics).await;
            metrics.rendered_revision.set(follower.revision.get());
            let held: Vec<String> = slots
                .iter()
                .filter(|s| s.refused)
                .map(|s| s.spec.destination.display().to_string())
                .collect();
            metrics.refusing.set(held.len() as i64);
            if options.once || options.dry_run {
                if let Some(e) = cycle.broken.first() {
                    return Err(RenderError::Config(e.clone()));
                }
                if !cycle.failed.is_empty() {
                    return Err(RenderError::Failed(cycle.failed.join("; ")));
                }
                return Ok(Exit::Done);
            }
            let status = if held.is_empty() {
                format!(
                    "rendered {} templates at revision {}",
                    slots.len(),
                    follower.revision
                )
            } else {
                format!(
                    "rendered {} templates at revision {}; held by min_hosts (previous file kept): {}",
                    slots.len(),
                    follower.revision,
                    held.join(", ")
                )
            };
            if !*ready && slots.iter().all(Slot::settled) {
                *ready = true;
                metrics.set_ready();
                crate::telemetry::notify_ready(&status);
            } else if *ready {
                crate::telemetry::notify_status(&status);
            }
        }
        let next_due = slots
            .iter()
            .filter_map(Slot::due)
            .chain(slots.iter().filter_map(|s| s.holds.next_release()))
            .chain(slots.iter().filter_map(|s| s.sweep_at))
            .min();
        let timer = async {
            match next_due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let reloaded = reload::sighup(reloads.map(|r| r.notify.as_ref()));
        let mut report = |m: Malformed| reported.report(m);
        tokio::select! {
            _ = cancel.cancelled() => return Ok(Exit::Done),
            _ = watchdog.tick() => {
                show_holds(slots, metrics, Instant::now());
                if *ready {
                    crate::telemetry::notify_watchdog();
                }
            }
            _ = timer => {
                let now = Instant::now();
                for slot in slots.iter_mut() {
                    if slot.holds.next_release().is_some_and(|at| at <= now) {
                        slot.expire(&prefix, now, metrics);
                    }
                    if slot.sweep_at.is_some_and(|at| at <= now) {
                        slot.sweep().await;
                    }
                }
                show_holds(slots, metrics, now);
            }
            _ = reloaded => {
                let Some(reloads) = reloads else { continue };
                if let Some(switch) = reload_config(config, etcd, slots, &reloads.load).await {
                    return Ok(switch);
                }
            }
            batch = follower.next(&mut report) => {
                let batch = batch?;
                metrics.registry_revision.set(follower.revision.get());
                let now = Instant::now();
                for slot in slots.iter_mut() {
                    slot.observe(&batch, &follower.registry, &prefix, now, metrics);
                    slot.changed(&batch.keys, now);
                }
                show_holds(slots, metrics, now);
            }
        }
    }
}

/// SIGHUP: the config and every template loaded again. Anything that does
/// not load, validate or parse is refused, and the old configuration and
/// templates stay in force. A new etcd connection or prefix is applied
/// only once a read through it succeeded; then the loop is restarted on
/// it ([`Exit::Switch`]). Otherwise the new templates replace the old ones
/// in place and all render again.
async fn reload_config(
    old: &Config,
    etcd: &Etcd,
    slots: &mut Vec<Slot>,
    load: &reload::Reload,
) -> Option<Exit> {
    let new = match load() {
        Ok(new) => new,
        Err(e) => {
            tracing::error!("reload refused, the old configuration stays in force: {e}");
            return None;
        }
    };
    let new_slots = match load_all(&new) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(
                "reload refused, the old configuration and templates stay in force: {e}"
            );
            return None;
        }
    };
    if new.etcd == old.etcd && new.prefix == old.prefix {
        tracing::info!(
            templates = new_slots.len(),
            "configuration and templates reloaded"
        );
        let mut new_slots = new_slots;
        carry_holds(slots, &mut new_slots);
        *slots = new_slots;
        return None;
    }
    let new_etcd = match Etcd::new(&new.etcd) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(
                "reload refused, the old configuration stays in force: the new etcd connection cannot be set up: {e}"
            );
            return None;
        }
    };
    // Prove the new connection with one read before leaving the old one.
    let scope = format!("{}/", new.prefix);
    let within = new.etcd.request_timeout.max(Duration::from_secs(1)) * 2;
    match tokio::time::timeout(within, Follower::start(&new_etcd, &new.prefix, &scope)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::error!(
                "reload refused, the old configuration stays in force: cannot read the registry at {} under {}: {e}",
                new_etcd.endpoints().join(","),
                new.prefix
            );
            return None;
        }
        Err(_) => {
            tracing::error!(
                "reload refused, the old configuration stays in force: no answer from {} within {}",
                new_etcd.endpoints().join(","),
                humantime::format_duration(within)
            );
            return None;
        }
    }
    tracing::info!(
        endpoints = new_etcd.endpoints().join(","),
        prefix = new.prefix,
        was = etcd.endpoints().join(","),
        templates = new_slots.len(),
        "configuration reloaded: following the registry through the new connection"
    );
    Some(Exit::Switch(Box::new((new, new_etcd, new_slots))))
}

/// Renders the due templates at one view, writes what changed, and runs
/// each distinct reload once.
async fn render_cycle(
    slots: &mut [Slot],
    views: &BTreeMap<usize, View>,
    options: Options,
    metrics: &RenderMetrics,
) -> Cycle {
    let mut cycle = Cycle::default();
    // reload argv → the templates written in this cycle that use it.
    let mut reloads: BTreeMap<Vec<String>, Vec<(usize, write::Previous)>> = BTreeMap::new();
    for (&i, view) in views {
        let slot = &mut slots[i];
        slot.dirty_since = None;
        metrics.renders.inc();
        let rendered = match template::render(&slot.source, view, slot.spec.max_output) {
            Ok(r) => r,
            Err(e) => {
                metrics.template_errors.inc();
                // Any change may mend it: render it again on the next one.
                slot.reads = Reads::All;
                let why = format!(
                    "template {} does not render; the previous {} stays: {e}",
                    slot.source.name,
                    slot.spec.destination.display(),
                );
                tracing::error!("{why}");
                cycle.broken.push(why);
                continue;
            }
        };
        slot.reads = rendered.reads;
        let listed = rendered.listed;
        if let Some(min) = slot.spec.min_hosts
            && listed.len() < min
        {
            let why = format!(
                "{} would list {} hosts, fewer than min_hosts {min}; keeping the previous file",
                slot.spec.destination.display(),
                listed.len()
            );
            if !slot.refused {
                tracing::warn!(revision = %view.revision, "{why}");
            }
            slot.refused = true;
            metrics.min_hosts_refusals.inc();
            cycle.failed.push(why);
            continue;
        }
        if slot.refused {
            tracing::info!(
                revision = %view.revision,
                "{} lists {} hosts again, no fewer than min_hosts; rendering it",
                slot.spec.destination.display(),
                listed.len()
            );
            slot.refused = false;
        }
        if options.dry_run {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&rendered.text).and_then(|_| out.flush());
            continue;
        }
        if !write::differs(&slot.spec, &rendered.text) {
            slot.listed = Some(listed);
            continue;
        }
        match write::commit(&slot.spec, &rendered.text).await {
            Ok(previous) => {
                metrics.writes.inc();
                tracing::info!(
                    revision = %view.revision,
                    "wrote {}: {}",
                    slot.spec.destination.display(),
                    summary(slot.listed.as_ref(), &listed)
                );
                slot.listed = Some(listed);
                if slot.spec.haproxy.is_some() {
                    match slot.apply_at_runtime(&previous, &rendered.text).await {
                        Ok(applied) => {
                            metrics.reloads_avoided.inc();
                            metrics.runtime_changes.inc_by(applied.count() as u64);
                            if applied.count() > 0 {
                                tracing::info!(
                                    revision = %view.revision,
                                    "applied through haproxy's runtime API, no reload: {applied}"
                                );
                            }
                            continue;
                        }
                        Err(why) => {
                            metrics
                                .runtime_fallbacks
                                .get_or_create(&crate::telemetry::ReasonLabels {
                                    reason: why.reason,
                                })
                                .inc();
                            tracing::info!("reloading haproxy: {why}");
                            // A reload rebuilds every server; none drains.
                            slot.draining.clear();
                            slot.sweep_at = None;
                        }
                    }
                }
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
                // Rendered again on the next change it read.
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
        metrics.reloads.inc();
        let run = child::run(&argv, timeout, Leftovers::Leave).await;
        if run.success() {
            continue;
        }
        metrics.reload_failures.inc();
        let why = format!("reload {argv:?} failed: {}", run.describe());
        tracing::error!("{why}; restoring the previous files and reloading again");
        let mut restored = 0;
        for (i, previous) in &written {
            match write::restore(previous) {
                Ok(true) => restored += 1,
                Ok(false) => tracing::error!(
                    "there was no {} before this render, so there is nothing to restore; the new file stays",
                    previous.path.display()
                ),
                Err(e) => tracing::error!("{e}"),
            }
            // Try again at the next change.
            slots[*i].listed = None;
        }
        if restored > 0 {
            let again = child::run(&argv, timeout, Leftovers::Leave).await;
            if again.success() {
                tracing::warn!("restored the previous files; reload {argv:?} succeeded with them");
            } else {
                tracing::error!(
                    "reload {argv:?} failed with the previous files too: {}",
                    again.describe()
                );
            }
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
