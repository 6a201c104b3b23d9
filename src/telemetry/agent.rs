//! The agent's metrics ([`Metrics`]) and the observer that keeps them
//! and systemd current ([`Telemetry`]): READY=1 only after the first
//! registration (which follows the first check results), STATUS= kept
//! current, WATCHDOG=1 only from the keep-alive path while keep-alives
//! succeed (so an agent that cannot keep its lease is restarted in the
//! end), STOPPING=1 on shutdown.

use super::*;

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
        if let Err(e) = super::notify::send(states) {
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

impl crate::check::CheckMetrics for Metrics {
    /// A check run finished.
    fn check_ran(&self, check: &str, status: Status, took: Duration) {
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
}
