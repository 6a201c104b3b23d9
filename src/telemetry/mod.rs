//! What registrar tells the outside world: systemd notifications and
//! Prometheus metrics, one module for each thing served:
//! - [`agent`]: the agent's [`Metrics`], fed by one [`Telemetry`] observer,
//!   which also keeps systemd current;
//! - [`render`] and [`dns`]: their own metrics sets ([`RenderMetrics`],
//!   [`DnsMetrics`]), with fail static's [`HoldMetrics`] ([`hold`]) in both;
//! - [`notify`]: sd_notify, for render and dns ([`notify_ready`],
//!   [`notify_status`], [`notify_watchdog`]) and the agent's observer;
//! - here: one HTTP server ([`serve`]) for any of them ([`Exposed`]).

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

pub mod agent;
pub mod dns;
pub mod hold;
pub mod notify;
pub mod render;

pub use agent::{CheckLabels, ErrorLabels, LeaseLabels, Metrics, Telemetry};
pub use dns::{DnsMetrics, QueryLabels};
pub use hold::{HoldMetrics, ReasonLabels};
pub use notify::{notify_ready, notify_status, notify_watchdog};
pub use render::RenderMetrics;

/// What the metrics server serves: `/metrics`, and `/health`'s answer.
pub trait Exposed: Clone + Send + Sync + 'static {
    /// The metrics in Prometheus/OpenMetrics text.
    fn render(&self) -> String;
    /// `/health`: 200 with the first text, or 503 with the second.
    fn health(&self) -> Result<String, String>;
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
