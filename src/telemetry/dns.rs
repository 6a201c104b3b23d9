//! `registrar dns`'s metrics.

use super::*;

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
        use prometheus_client::metrics::histogram::Histogram;
        let mut registry = Registry::with_prefix("registrar_dns");
        let m = DnsMetrics {
            registry: Arc::new(Registry::default()),
            queries: Family::default(),
            // 10 µs to about 0.3 s, doubling. Not prometheus-client's
            // `exponential_buckets`: its `powf` is the binary's one call
            // into libm, and linking libm costs every process, the idle
            // agent included, about 300 KiB of resident pages.
            answer_seconds: Histogram::new(
                std::iter::successors(Some(0.00001), |b| Some(b * 2.0)).take(16),
            ),
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
