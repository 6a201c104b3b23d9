//! What registrar tells the outside world: systemd notifications and
//! Prometheus metrics. The agent's are fed from one [`Telemetry`]
//! observer; `render` and `dns` have their own metrics sets
//! ([`RenderMetrics`], [`DnsMetrics`]) and notify through
//! [`notify_ready`], [`notify_status`] and [`notify_watchdog`]. One HTTP
//! server ([`serve`]) serves any of them.
//!
//! The agent's systemd notifications: READY=1 only after the first registration (which happens after
//! the first check results), STATUS= kept current, WATCHDOG=1 only from the
//! keep-alive path while keep-alives succeed (so an agent that cannot keep
//! its lease is eventually restarted), STOPPING=1 on shutdown. Without
//! `NOTIFY_SOCKET` every notification is a no-op.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sd_notify::NotifyState;
use tokio::time::Instant;

use crate::check::Status;
use crate::etcd::Class;
use crate::lease::{Lease, LeaseId};
use crate::registration::Desired;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    pub check: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaseLabels {
    /// The lease id as etcdctl prints it (hex).
    pub lease_id: String,
}

/// Every class of etcd error, as the `kind` label spells it.
const ERROR_KINDS: [(Class, &str); 5] = [
    (Class::Retry, "retry"),
    (Class::Auth, "auth"),
    (Class::Tls, "tls"),
    (Class::Fatal, "fatal"),
    (Class::LeaseGone, "lease_gone"),
];

#[derive(Debug, Default)]
struct LeaseState {
    ttl: Duration,
    last_ok: Option<Instant>,
    registered: bool,
    /// Registered at least once since the start: before that the keep-alive
    /// age is NaN (a lease kept alive for a registration that conflicts is
    /// no registration).
    ever_registered: bool,
}

/// The agent's metrics. Cheap to clone; every clone shares the values.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    lease_info: Family<LeaseLabels, Gauge>,
    lease_ttl: Gauge,
    keepalive_age: Gauge<f64, AtomicU64>,
    registrations: Counter,
    reregistrations: Counter,
    check_status: Family<CheckLabels, Gauge>,
    check_duration: Family<CheckLabels, Gauge<f64, AtomicU64>>,
    etcd_errors: Family<ErrorLabels, Counter>,
    conflict: Gauge,
    maintenance: Gauge,
    maintenance_until: Gauge<f64, AtomicU64>,
    state: Arc<Mutex<LeaseState>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("registrar");
        let m = Metrics {
            registry: Arc::new(Registry::default()),
            lease_info: Family::default(),
            lease_ttl: Gauge::default(),
            keepalive_age: Gauge::default(),
            registrations: Counter::default(),
            reregistrations: Counter::default(),
            check_status: Family::default(),
            check_duration: Family::default(),
            etcd_errors: Family::default(),
            conflict: Gauge::default(),
            maintenance: Gauge::default(),
            maintenance_until: Gauge::default(),
            state: Arc::default(),
        };
        // NaN until known: an alert on `> N` or `< time()` stays quiet.
        m.keepalive_age.set(f64::NAN);
        m.maintenance_until.set(f64::NAN);
        for (_, kind) in ERROR_KINDS {
            let _ = m
                .etcd_errors
                .get_or_create(&ErrorLabels { kind: kind.into() });
        }
        registry.register(
            "lease_info",
            "1 for the lease holding this host's keys, its id (hex, as etcdctl prints it) as a label; no series while there is none",
            m.lease_info.clone(),
        );
        registry.register(
            "lease_ttl_seconds",
            "The TTL etcd granted for the lease",
            m.lease_ttl.clone(),
        );
        registry.register(
            "keepalive_age_seconds",
            "Seconds since the last successful lease keep-alive (NaN before the first registration)",
            m.keepalive_age.clone(),
        );
        registry.register(
            "registrations",
            "First registrations of this host",
            m.registrations.clone(),
        );
        registry.register(
            "reregistrations",
            "Re-registrations after the lease was lost",
            m.reregistrations.clone(),
        );
        registry.register(
            "check_status",
            "Reported status per check: 0 passing, 1 warning, 2 critical",
            m.check_status.clone(),
        );
        registry.register(
            "check_duration_seconds",
            "How long the last run of each check took",
            m.check_duration.clone(),
        );
        registry.register(
            "etcd_errors",
            "etcd errors by kind (retry, auth, tls, fatal, lease_gone)",
            m.etcd_errors.clone(),
        );
        registry.register(
            "conflict",
            "1 while another machine's live lease holds this host name (this agent writes nothing and retries)",
            m.conflict.clone(),
        );
        registry.register(
            "maintenance",
            "1 while this host publishes a maintenance key",
            m.maintenance.clone(),
        );
        registry.register(
            "maintenance_until_timestamp_seconds",
            "When the published maintenance ends by itself, as a Unix time (NaN: none, or until turned off)",
            m.maintenance_until.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            ..m
        }
    }

    /// A check run finished.
    pub fn check_ran(&self, check: &str, status: Status, took: Duration) {
        let labels = CheckLabels {
            check: check.to_string(),
        };
        let code = match status {
            Status::Passing => 0,
            Status::Warning => 1,
            Status::Critical => 2,
        };
        self.check_status.get_or_create(&labels).set(code);
        self.check_duration
            .get_or_create(&labels)
            .set(took.as_secs_f64());
    }

    /// Forgets a check removed by a reload.
    pub fn check_removed(&self, check: &str) {
        let labels = CheckLabels {
            check: check.to_string(),
        };
        self.check_status.remove(&labels);
        self.check_duration.remove(&labels);
    }

    pub fn etcd_error(&self, class: Class) {
        let kind = ERROR_KINDS
            .iter()
            .find(|(c, _)| *c == class)
            .map_or("fatal", |(_, k)| k);
        self.etcd_errors
            .get_or_create(&ErrorLabels { kind: kind.into() })
            .inc();
    }

    /// The lease now holding this host's keys (None: no lease).
    pub fn lease(&self, lease: Option<LeaseId>) {
        self.lease_info.clear();
        if let Some(id) = lease {
            self.lease_info
                .get_or_create(&LeaseLabels {
                    lease_id: id.to_string(),
                })
                .set(1);
        }
    }

    /// Whether another machine holds this host name.
    pub fn set_conflict(&self, on: bool) {
        self.conflict.set(i64::from(on));
    }

    /// The maintenance this host publishes: none, or on until a time (None:
    /// until turned off).
    pub fn set_maintenance(&self, on: bool, until: Option<std::time::SystemTime>) {
        self.maintenance.set(i64::from(on));
        let until = until
            .filter(|_| on)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(f64::NAN, |d| d.as_secs_f64());
        self.maintenance_until.set(until);
    }

    /// Whether the lease is alive: registered and confirmed within its TTL.
    pub fn lease_alive(&self) -> bool {
        let Ok(s) = self.state.lock() else {
            return false;
        };
        s.registered && s.last_ok.is_some_and(|t| t.elapsed() < s.ttl)
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        if let Ok(s) = self.state.lock() {
            let age = s
                .last_ok
                .filter(|_| s.ever_registered)
                .map_or(f64::NAN, |t| t.elapsed().as_secs_f64());
            self.keepalive_age.set(age);
        }
        encode(&self.registry)
    }
}

/// Sends one notification to `$NOTIFY_SOCKET` (a no-op without it), as
/// sd-notify formats it, on a non-blocking socket. sd-notify's own `notify`
/// sends on a blocking socket: when the receiver's queue is full (a service
/// manager slow to read), the send blocks the agent's one thread, and with
/// it every keep-alive. Here such a notification is dropped instead.
fn send(states: &[NotifyState<'_>]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let msg: String = states.iter().map(|s| format!("{s}\n")).collect();
    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    let sent = match path.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(msg.as_bytes(), &addr)?
        }
        None => sock.send_to(msg.as_bytes(), &path)?,
    };
    if sent == msg.len() {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            "incomplete notification",
        ))
    }
}

/// READY=1 with a STATUS= line, for a service other than the agent
/// (`render`, `dns`). A no-op without `NOTIFY_SOCKET`.
pub fn notify_ready(status: &str) {
    if let Err(e) = send(&[NotifyState::Ready, NotifyState::Status(status)]) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// STATUS= alone, for a service other than the agent (`render`).
pub fn notify_status(status: &str) {
    if let Err(e) = send(&[NotifyState::Status(status)]) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// WATCHDOG=1, for a service other than the agent (`render`, `dns`).
pub fn notify_watchdog() {
    if let Err(e) = send(&[NotifyState::Watchdog]) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Observes the agent: keeps systemd and the metrics current.
pub struct Telemetry {
    pub metrics: Metrics,
    state: Mutex<Shown>,
    /// The last STATUS= sent: a retry loop failing the same way again and
    /// again sends it once.
    last_status: Mutex<String>,
}

/// What the STATUS line is built from.
#[derive(Default)]
struct Shown {
    ready_sent: bool,
    lease: Option<Lease>,
    checks: String,
}

impl Telemetry {
    pub fn new(metrics: Metrics) -> Telemetry {
        Telemetry {
            metrics,
            state: Mutex::new(Shown::default()),
            last_status: Mutex::new(String::new()),
        }
    }

    fn notify(&self, states: &[NotifyState<'_>]) {
        if let Err(e) = send(states) {
            tracing::debug!(error = %e, "sd_notify failed");
        }
    }

    fn status(&self, text: &str) {
        if let Ok(mut last) = self.last_status.lock() {
            if *last == text {
                return;
            }
            text.clone_into(&mut last);
        }
        self.notify(&[NotifyState::Status(text)]);
    }

    fn registered_status(shown: &Shown) -> String {
        match &shown.lease {
            Some(l) => format!(
                "registered lease={} ttl={} {}",
                l.id,
                humantime::format_duration(l.ttl),
                shown.checks
            ),
            None => "not registered".into(),
        }
    }
}

impl crate::lease::LeaseObserver for Telemetry {
    fn alive(&self, ttl: Duration) {
        let _ = ttl;
        if let Ok(mut s) = self.metrics.state.lock() {
            s.last_ok = Some(Instant::now());
        }
        // Only here: the watchdog proves that keep-alives succeed.
        self.notify(&[NotifyState::Watchdog]);
    }

    fn recovered(&self, _lease: Lease, _outage: &crate::backoff::Ended) {
        // etcd answers again and the lease lived through it: say so
        // instead of the last error.
        if let Ok(shown) = self.state.lock() {
            self.status(&Self::registered_status(&shown));
        }
    }

    fn unconfirmed(&self) {
        self.status("no keep-alive succeeded for a whole TTL; this host may be unregistered");
    }

    fn failed(&self, error: &str, class: Class) {
        self.metrics.etcd_error(class);
        let text = match class {
            Class::Retry => format!("etcd unreachable, retrying: {error}"),
            Class::Auth => format!("etcd denied access: {error}"),
            Class::Tls => format!("cannot set up TLS with etcd, retrying: {error}"),
            _ => format!("registration failed, retrying: {error}"),
        };
        self.status(&text);
    }

    fn lost(&self, why: &str) {
        self.metrics.lease(None);
        if let Ok(mut s) = self.metrics.state.lock() {
            s.registered = false;
        }
        if let Ok(mut shown) = self.state.lock() {
            shown.lease = None;
        }
        self.status(&format!("lease lost, re-registering: {why}"));
    }
}

impl crate::registration::Observer for Telemetry {
    fn registered(&self, lease: Lease, desired: &Desired, first: bool) {
        if first {
            self.metrics.registrations.inc();
        } else {
            self.metrics.reregistrations.inc();
        }
        self.metrics.lease(Some(lease.id));
        self.metrics.set_conflict(false);
        self.metrics
            .lease_ttl
            .set(i64::try_from(lease.ttl.as_secs()).unwrap_or(i64::MAX));
        if let Ok(mut s) = self.metrics.state.lock() {
            s.registered = true;
            s.ever_registered = true;
            s.ttl = lease.ttl;
            s.last_ok = Some(Instant::now());
        }
        let Ok(mut shown) = self.state.lock() else {
            return;
        };
        shown.lease = Some(lease);
        shown.checks = desired.summary.to_string();
        let status = Self::registered_status(&shown);
        if shown.ready_sent {
            self.status(&status);
        } else {
            shown.ready_sent = true;
            self.notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
        }
    }

    fn updated(&self, desired: &Desired) {
        let Ok(mut shown) = self.state.lock() else {
            return;
        };
        shown.checks = desired.summary.to_string();
        self.status(&Self::registered_status(&shown));
    }

    fn conflict(&self, message: &str) {
        self.metrics.set_conflict(true);
        self.status(&format!("conflict, retrying: {message}"));
    }

    fn stopping(&self) {
        if let Ok(mut s) = self.metrics.state.lock() {
            s.registered = false;
        }
        self.notify(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping: revoking the lease"),
        ]);
    }
}

/// What the metrics server serves: `/metrics`, and `/health`'s answer.
pub trait Exposed: Clone + Send + Sync + 'static {
    /// The metrics in Prometheus/OpenMetrics text.
    fn render(&self) -> String;
    /// `/health`: 200 with the first text, or 503 with the second.
    fn health(&self) -> Result<String, String>;
}

impl Exposed for Metrics {
    fn render(&self) -> String {
        Metrics::render(self)
    }
    fn health(&self) -> Result<String, String> {
        if self.lease_alive() {
            Ok("lease alive\n".into())
        } else {
            Err("lease not alive\n".into())
        }
    }
}

/// `registrar render`'s metrics. Cheap to clone; clones share the values.
#[derive(Clone)]
pub struct RenderMetrics {
    registry: Arc<Registry>,
    pub renders: Counter,
    pub writes: Counter,
    pub check_failures: Counter,
    pub reload_failures: Counter,
    pub template_errors: Counter,
    pub min_hosts_refusals: Counter,
    pub rendered_revision: Gauge,
    pub registry_revision: Gauge,
    /// Templates whose last render was refused by min_hosts (their
    /// previous file stays).
    pub refusing: Gauge,
    /// Fail static: hosts held in the templates' output.
    pub holds: HoldMetrics,
    /// Reload commands run.
    pub reloads: Counter,
    /// Server changes applied through haproxy's runtime API.
    pub runtime_changes: Counter,
    /// Written files haproxy took through its runtime API, without a reload.
    pub reloads_avoided: Counter,
    /// Written files of a template with `haproxy:` that needed a reload,
    /// by reason.
    pub runtime_fallbacks: Family<ReasonLabels, Counter>,
    ready: Arc<std::sync::atomic::AtomicBool>,
}

impl Default for RenderMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl RenderMetrics {
    pub fn new() -> RenderMetrics {
        let mut registry = Registry::with_prefix("registrar_render");
        let m = RenderMetrics {
            registry: Arc::new(Registry::default()),
            renders: Counter::default(),
            writes: Counter::default(),
            check_failures: Counter::default(),
            reload_failures: Counter::default(),
            template_errors: Counter::default(),
            min_hosts_refusals: Counter::default(),
            rendered_revision: Gauge::default(),
            registry_revision: Gauge::default(),
            refusing: Gauge::default(),
            holds: HoldMetrics::default(),
            reloads: Counter::default(),
            runtime_changes: Counter::default(),
            reloads_avoided: Counter::default(),
            runtime_fallbacks: Family::default(),
            ready: Arc::default(),
        };
        for (name, help, c) in [
            ("renders", "Templates rendered", &m.renders),
            ("reloads", "Reload commands run", &m.reloads),
            (
                "runtime_changes",
                "Server changes applied through haproxy's runtime API",
                &m.runtime_changes,
            ),
            (
                "reloads_avoided",
                "Written files haproxy took through its runtime API instead of a reload",
                &m.reloads_avoided,
            ),
            (
                "writes",
                "Files written (their content, mode or owner changed)",
                &m.writes,
            ),
            (
                "check_failures",
                "Renders refused by their check command",
                &m.check_failures,
            ),
            (
                "reload_failures",
                "Reload commands that failed (the previous files were restored)",
                &m.reload_failures,
            ),
            (
                "template_errors",
                "Renders that failed in the template",
                &m.template_errors,
            ),
            (
                "min_hosts_refusals",
                "Renders refused for listing fewer hosts than min_hosts",
                &m.min_hosts_refusals,
            ),
        ] {
            registry.register(name, help, c.clone());
        }
        registry.register(
            "rendered_revision",
            "The registry revision of the last render",
            m.rendered_revision.clone(),
        );
        registry.register(
            "registry_revision",
            "The newest registry revision the watch has applied; minus rendered_revision, the lag",
            m.registry_revision.clone(),
        );
        registry.register(
            "min_hosts_refusing_templates",
            "Templates whose last render was refused by min_hosts; their previous file stays",
            m.refusing.clone(),
        );
        registry.register(
            "runtime_fallbacks",
            "Written files of a template with haproxy: that needed a reload, by reason",
            m.runtime_fallbacks.clone(),
        );
        m.holds.register(&mut registry, "templates");
        RenderMetrics {
            registry: Arc::new(registry),
            ..m
        }
    }

    /// Every template has rendered once (or is held by min_hosts).
    pub fn set_ready(&self) {
        self.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Exposed for RenderMetrics {
    fn render(&self) -> String {
        encode(&self.registry)
    }
    fn health(&self) -> Result<String, String> {
        if !self.ready.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("not rendered yet\n".into());
        }
        let mut text = "rendered".to_string();
        if self.refusing.get() > 0 {
            text.push_str("; a template is held by min_hosts and its previous file stays");
        }
        text.push_str(&self.holds.said());
        text.push('\n');
        Ok(text)
    }
}

/// Why hosts were held, as a label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Fail static's figures, the same for `render` and `dns` (design.md
/// section 8). Cheap to clone; clones share the values.
#[derive(Clone, Default)]
pub struct HoldMetrics {
    /// Hosts held in the output now.
    pub hosts: Gauge,
    /// Templates (render) or roles (dns) whose output holds a host now.
    pub units: Gauge,
    /// Holds started, by reason.
    pub started: Family<ReasonLabels, Counter>,
    /// How long hosts have been held without a break (0: none are).
    pub holding_seconds: Gauge<f64, AtomicU64>,
    /// The longest `settle` in force.
    pub settle_seconds: Gauge<f64, AtomicU64>,
}

impl HoldMetrics {
    fn register(&self, registry: &mut Registry, units: &str) {
        registry.register(
            "holding_hosts",
            "Hosts that vanished without leaving, still shown (fail static)",
            self.hosts.clone(),
        );
        registry.register(
            format!("holding_{units}"),
            format!("{units} whose output shows a held host"),
            self.units.clone(),
        );
        registry.register(
            "holds",
            "Holds started, by reason: reset (history lost), mass (one revision removed several machines), drop (more than max_drop of a role within settle)",
            self.started.clone(),
        );
        for reason in ["reset", "mass", "drop"] {
            let _ = self.started.get_or_create(&ReasonLabels { reason });
        }
        registry.register(
            "holding_seconds",
            "How long hosts have been held without a break; above settle_seconds, holds keep coming",
            self.holding_seconds.clone(),
        );
        registry.register(
            "settle_seconds",
            "The longest fail_static settle in force",
            self.settle_seconds.clone(),
        );
    }

    /// Counts the holds that `events` started.
    pub fn count(&self, events: &[crate::registry::hold::Event]) {
        for e in events {
            if let crate::registry::hold::Event::Started { reason, .. } = e {
                self.started
                    .get_or_create(&ReasonLabels {
                        reason: reason.as_str(),
                    })
                    .inc();
            }
        }
    }

    /// Shows how many hosts are held, for how long without a break, and
    /// the longest `settle` in force.
    pub fn show(&self, hosts: usize, holding_for: Option<Duration>, settle: Duration) {
        self.hosts.set(hosts as i64);
        self.holding_seconds
            .set(holding_for.map_or(0.0, |d| d.as_secs_f64()));
        self.settle_seconds.set(settle.as_secs_f64());
    }

    /// [`count`](Self::count) and [`show`](Self::show) for one [`Holds`](crate::registry::hold::Holds).
    pub fn record(
        &self,
        holds: &crate::registry::hold::Holds,
        events: &[crate::registry::hold::Event],
        now: tokio::time::Instant,
    ) {
        self.count(events);
        self.show(
            holds.held().len(),
            holds.holding_for(now),
            holds.settings().settle,
        );
    }

    /// What /health adds: nothing, or how many hosts are held.
    fn said(&self) -> String {
        match self.hosts.get() {
            0 => String::new(),
            n => format!("; holding {n} hosts that vanished without leaving (fail static)"),
        }
    }
}

/// The labels of a DNS query count: its type and the answer's rcode.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabels {
    pub qtype: &'static str,
    pub rcode: &'static str,
}

/// `registrar dns`'s metrics. Cheap to clone; clones share the values.
#[derive(Clone)]
pub struct DnsMetrics {
    registry: Arc<Registry>,
    pub queries: Family<QueryLabels, Counter>,
    pub answer_seconds: prometheus_client::metrics::histogram::Histogram,
    /// The registry revision the answers are built from.
    pub answer_revision: Gauge,
    /// SRV names the quorum gate withholds.
    pub withheld: Gauge,
    /// Host entries whose names are not valid DNS names.
    pub unnamed: Gauge,
    /// Fail static: hosts held in the answers.
    pub holds: HoldMetrics,
    ready: Arc<std::sync::atomic::AtomicBool>,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl DnsMetrics {
    pub fn new() -> DnsMetrics {
        use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
        let mut registry = Registry::with_prefix("registrar_dns");
        let m = DnsMetrics {
            registry: Arc::new(Registry::default()),
            queries: Family::default(),
            // 10 µs to about 0.3 s.
            answer_seconds: Histogram::new(exponential_buckets(0.00001, 2.0, 16)),
            answer_revision: Gauge::default(),
            withheld: Gauge::default(),
            unnamed: Gauge::default(),
            holds: HoldMetrics::default(),
            ready: Arc::default(),
        };
        registry.register(
            "queries",
            "Questions answered, by query type and response code",
            m.queries.clone(),
        );
        registry.register(
            "answer_seconds",
            "Time from a decoded question to its answer handed to the socket",
            m.answer_seconds.clone(),
        );
        registry.register(
            "answer_revision",
            "The registry revision the answers are built from",
            m.answer_revision.clone(),
        );
        registry.register(
            "srv_withheld",
            "SRV names whose answers the srv_min quorum gate withholds",
            m.withheld.clone(),
        );
        registry.register(
            "unnamed_hosts",
            "Host entries served under no name: their names are not valid DNS names",
            m.unnamed.clone(),
        );
        m.holds.register(&mut registry, "roles");
        DnsMetrics {
            registry: Arc::new(registry),
            ..m
        }
    }

    /// The first complete read of the registry is being served.
    pub fn set_ready(&self) {
        self.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Exposed for DnsMetrics {
    fn render(&self) -> String {
        encode(&self.registry)
    }
    fn health(&self) -> Result<String, String> {
        if self.ready.load(std::sync::atomic::Ordering::Relaxed) {
            Ok(format!("serving{}\n", self.holds.said()))
        } else {
            Err("the registry has not been read yet\n".into())
        }
    }
}

/// A registry as OpenMetrics text.
fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
        text = "# encoding failed\n".into();
    }
    text
}

/// Serves `/metrics` and `/health` until `cancel`: HTTP/1.1 on hyper, one
/// task per connection.
pub async fn serve<M: Exposed>(
    listener: tokio::net::TcpListener,
    metrics: M,
    cancel: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    loop {
        let (sock, _) = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of file descriptors and the like: the next accept may
                // work, and a scrape failing is no reason to stop the agent.
                Err(e) => {
                    tracing::warn!(error = %e, "metrics server: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let openmetrics = req
                    .headers()
                    .get(hyper::header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("application/openmetrics-text"));
                let answer = answer(&metrics, req.method(), req.uri().path(), openmetrics);
                async move { Ok::<_, std::convert::Infallible>(answer) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(sock), service);
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = conn => {}
            }
        });
    }
}

/// OpenMetrics text as the classic Prometheus text format (0.0.4), for
/// clients that do not ask for OpenMetrics (curl, `promtool check
/// metrics`, older scrapers): a counter's HELP and TYPE name its `_total`
/// sample, and there is no `# EOF`. Prometheus asks for OpenMetrics.
pub fn classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(l.trim_end()),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The answer to one request of the metrics server.
fn answer<M: Exposed>(
    metrics: &M,
    method: &hyper::Method,
    path: &str,
    openmetrics: bool,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use hyper::{StatusCode, header};
    let (status, content_type, body) = match (path, method == hyper::Method::GET) {
        ("/metrics", true) if openmetrics => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        ("/metrics", true) => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            classic_text(&metrics.render()),
        ),
        ("/health", true) => match metrics.health() {
            Ok(text) => (StatusCode::OK, "text/plain", text),
            Err(text) => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", text),
        },
        ("/metrics" | "/health", false) => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".into(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: this server has /metrics and /health\n".into(),
        ),
    };
    let mut resp = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}
