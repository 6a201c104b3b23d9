//! Fail static's metrics, the same for `render` and `dns`.

use super::*;

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
    pub(super) fn register(&self, registry: &mut Registry, units: &str) {
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
    pub(super) fn said(&self) -> String {
        match self.hosts.get() {
            0 => String::new(),
            n => format!("; holding {n} hosts that vanished without leaving (fail static)"),
        }
    }
}
