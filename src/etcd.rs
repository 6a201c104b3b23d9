//! Connecting to etcd and surviving its faults: one client per endpoint,
//! explicit fail-over, per-request timeouts, and the one error classifier.
//!
//! etcd-client balances over its endpoints at random and never fails over: a
//! call to a dead endpoint fails, and one to a hung (e.g. SIGSTOPped) member
//! hangs. So registrar keeps one client per endpoint, tries them in turn from
//! the last one that worked, bounds every call with a timeout, and drops a
//! client whose connection failed so the next use reconnects.

use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use tokio::time::{Instant, timeout};

use crate::backoff::{Backoff, Policy};
use crate::config::EtcdConfig;
use crate::error::chain_text;

/// HTTP/2 keep-alive ping interval; etcd's default enforcement minimum is 5 s.
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// An etcd revision. etcd's revisions start at 1, and a header without one
/// says 0, so "unknown" is `Option<Revision>`, never a 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Revision(i64);

impl Revision {
    /// A revision as etcd reports it; `None` for 0 (not reported).
    pub fn of(raw: i64) -> Option<Revision> {
        (raw > 0).then_some(Revision(raw))
    }

    /// etcd's first revision: that of a cluster nothing was ever written to.
    pub const FIRST: Revision = Revision(1);

    /// The revision of a response's header, if it has one.
    pub fn of_header(header: Option<&etcd_client::ResponseHeader>) -> Option<Revision> {
        header.and_then(|h| Revision::of(h.revision()))
    }

    /// The revision on the wire.
    pub fn get(self) -> i64 {
        self.0
    }

    /// The revision after this one, where a watch that has seen this one
    /// starts.
    pub fn next(self) -> i64 {
        self.0.saturating_add(1)
    }
}

impl std::fmt::Display for Revision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Transient: another endpoint or a later attempt may succeed.
    Retry,
    /// The lease no longer exists: grant a new one and re-register.
    LeaseGone,
    /// Authentication or permission denied by etcd: retrying will not help
    /// (exit 77).
    Auth,
    /// TLS could not be set up with this endpoint (a handshake failure, an
    /// untrusted certificate, an endpoint that does not speak TLS). Another
    /// endpoint may work, so calls fail over as for `Retry`; when it is
    /// what finally failed, a one-shot command exits 77 with a TLS hint.
    Tls,
    /// A bug or a bad request: retrying will not help (exit 1).
    Fatal,
}

impl Class {
    /// Whether another endpoint, or a later try, may succeed.
    pub fn fails_over(self) -> bool {
        matches!(self, Class::Retry | Class::Tls)
    }
}

/// An etcd failure, with the endpoint it happened on.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    // The cause is part of the message (logs print only Display), so it is
    // deliberately not also exposed as `source()`, which would repeat it.
    // Display says it briefly; `detail()` has the whole chain.
    #[error("{endpoint}: {what}: {}", brief(cause))]
    Call {
        endpoint: String,
        what: &'static str,
        class: Class,
        cause: etcd_client::Error,
    },
    #[error("{endpoint}: {what}: no answer within {}", humantime::format_duration(*.after))]
    Timeout {
        endpoint: String,
        what: &'static str,
        after: Duration,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// What went wrong, without the transport's debug chain: etcd's message,
/// or the innermost cause ("Connection refused (os error 111)").
pub fn brief(e: &etcd_client::Error) -> String {
    use etcd_client::Error as E;
    let innermost = |e: &(dyn std::error::Error + 'static)| {
        let mut cur = e;
        while let Some(next) = cur.source() {
            cur = next;
        }
        cur.to_string()
    };
    match e {
        E::GRpcStatus(status) => {
            let msg = status
                .message()
                .trim_start_matches("etcdserver: ")
                .to_string();
            let root = std::error::Error::source(status).map(innermost);
            match root {
                Some(root) if !msg.is_empty() && !root.contains(&msg) && !msg.contains(&root) => {
                    format!("{msg}: {root}")
                }
                Some(root) if msg.is_empty() => root,
                _ if !msg.is_empty() => msg,
                _ => e.to_string(),
            }
        }
        E::TransportError(t) => innermost(t),
        other => other.to_string(),
    }
}

impl EtcdError {
    /// The full error chain, for debug logs.
    pub fn detail(&self) -> String {
        match self {
            EtcdError::Call { cause, .. } => format!("{self} ({cause:?})"),
            other => other.to_string(),
        }
    }

    pub fn class(&self) -> Class {
        match self {
            EtcdError::Call { class, .. } => *class,
            EtcdError::Timeout { .. } => Class::Retry,
            EtcdError::Tls(_) => Class::Auth,
        }
    }

    /// etcd refused a grant because a lease with the asked-for id exists
    /// (maybe an earlier try of the same grant, which took effect).
    pub fn lease_exists(&self) -> bool {
        matches!(self, EtcdError::Call { cause: etcd_client::Error::GRpcStatus(s), .. }
            if s.message().contains("lease already exists"))
    }
}

/// Sorts an etcd-client error into retry / lease-gone / auth / fatal.
pub fn classify(e: &etcd_client::Error) -> Class {
    use etcd_client::Error as E;
    use tonic::Code;
    match e {
        E::GRpcStatus(status) => {
            let msg = status.message();
            match status.code() {
                _ if msg.contains("requested lease not found") => Class::LeaseGone,
                // etcd 3.4 and 3.5 report bad credentials, and none where
                // auth is on ("user name is empty"), as InvalidArgument.
                _ if msg.contains("authentication failed")
                    || msg.contains("permission denied")
                    || msg.contains("user name not found")
                    || msg.contains("user name is empty")
                    || msg.contains("authentication is not enabled") =>
                {
                    Class::Auth
                }
                Code::Unauthenticated if msg.contains("invalid auth token") => Class::Retry,
                Code::Unauthenticated | Code::PermissionDenied => Class::Auth,
                Code::InvalidArgument
                | Code::FailedPrecondition
                | Code::Unimplemented
                | Code::OutOfRange
                | Code::AlreadyExists => Class::Fatal,
                // Unavailable (no leader, leader changed, connection refused),
                // DeadlineExceeded, Unknown, Internal, Aborted, Cancelled, ...
                _ if is_tls_failure(&chain_text(status)) => Class::Tls,
                _ => Class::Retry,
            }
        }
        E::LeaseKeepAliveError(msg) if msg.contains("lease not found") => Class::LeaseGone,
        E::TransportError(t) if is_tls_failure(&chain_text(t)) => Class::Tls,
        E::InvalidArgs(_) | E::InvalidUri(_) | E::InvalidMetadataValue(_) | E::Utf8Error(_) => {
            Class::Fatal
        }
        _ => Class::Retry,
    }
}

/// [`classify`], knowing the endpoint: a connection to an `https://`
/// endpoint that is reset before anything is answered is a TLS handshake
/// refused (a plain-http etcd resets a ClientHello as often as it closes
/// it), so it is a TLS failure, not an unreachable etcd.
pub fn classify_at(endpoint: &str, e: &etcd_client::Error) -> Class {
    match classify(e) {
        Class::Retry
            if endpoint.starts_with("https://")
                && brief(e).contains("Connection reset by peer") =>
        {
            Class::Tls
        }
        class => class,
    }
}

fn is_tls_failure(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    ["certificate", "handshake", "unknownissuer", "tls", "x509"]
        .iter()
        .any(|w| t.contains(w))
}

/// Runs one etcd-client call on `endpoint` with a deadline, turning both
/// failure modes into an [`EtcdError`].
pub async fn bounded<T>(
    endpoint: &str,
    what: &'static str,
    within: Duration,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    match timeout(within, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(cause)) => Err(EtcdError::Call {
            endpoint: endpoint.to_string(),
            what,
            class: classify_at(endpoint, &cause),
            cause,
        }),
        Err(_) => Err(EtcdError::Timeout {
            endpoint: endpoint.to_string(),
            what,
            after: within,
        }),
    }
}

/// The connection to the etcd cluster.
pub struct Etcd {
    endpoints: Vec<String>,
    clients: Mutex<Vec<Option<Client>>>,
    preferred: AtomicUsize,
    options: ConnectOptions,
    request_timeout: Duration,
    connect_timeout: Duration,
    /// TLS is on but no client certificate is configured.
    tls_without_identity: bool,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

impl Etcd {
    /// Prepares clients for every endpoint. Nothing is connected yet.
    pub fn new(config: &EtcdConfig) -> Result<Etcd, EtcdError> {
        let mut options = ConnectOptions::new()
            .with_timeout(config.request_timeout)
            .with_connect_timeout(config.connect_timeout)
            .with_keep_alive(PING_INTERVAL, PING_TIMEOUT)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let Some(user) = &config.user {
            options = options
                .with_user(user.name.clone(), user.password.clone())
                .with_auto_token_refresh(true);
        }
        if let Some(tls) = &config.tls {
            let read = |p: &std::path::Path| {
                std::fs::read(p)
                    .map_err(|e| EtcdError::Tls(format!("cannot read {}: {e}", p.display())))
            };
            let mut t = TlsOptions::new();
            if let Some(ca) = &tls.cacert {
                t = t.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                t = t.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(t);
        }
        let tls_without_identity = config.tls.as_ref().is_some_and(|t| t.cert.is_none())
            || (config.tls.is_none() && config.endpoints.iter().any(|e| e.starts_with("https://")));
        Ok(Etcd {
            tls_without_identity,
            clients: Mutex::new(vec![None; config.endpoints.len()]),
            endpoints: config.endpoints.clone(),
            // A fleet shares one endpoint list: starting everywhere at the
            // first endpoint would put every host on one member.
            preferred: AtomicUsize::new(rand::random_range(0..config.endpoints.len().max(1))),
            options,
            request_timeout: config.request_timeout,
            connect_timeout: config.connect_timeout,
        })
    }

    /// Whether an error that persisted until a deadline looks like etcd
    /// refusing a TLS client without a certificate: with TLS 1.3 that shows
    /// up only as the connection being closed after the handshake.
    pub fn looks_like_missing_client_cert(&self, e: &EtcdError) -> bool {
        // The whole chain: the brief message may show only its last link.
        let text = e.detail();
        self.tls_without_identity
            && ["connection closed", "operation was canceled", "broken pipe"]
                .iter()
                .any(|w| text.contains(w))
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// The endpoint that answered last.
    pub fn preferred(&self) -> usize {
        self.preferred.load(Ordering::Relaxed) % self.endpoints.len().max(1)
    }

    /// Remembers the endpoint that just answered.
    pub fn set_preferred(&self, idx: usize) {
        self.preferred.store(idx, Ordering::Relaxed);
    }

    /// The endpoint after `idx`, round robin.
    fn next(&self, idx: usize) -> usize {
        (idx + 1) % self.endpoints.len().max(1)
    }

    pub fn endpoint(&self, idx: usize) -> &str {
        self.endpoints.get(idx).map(String::as_str).unwrap_or("?")
    }

    /// Drops the cached client of an endpoint whose connection failed or
    /// hung, so the next use opens a fresh connection.
    fn forget(&self, idx: usize) {
        if let Ok(mut clients) = self.clients.lock()
            && let Some(slot) = clients.get_mut(idx)
        {
            *slot = None;
        }
    }

    /// The client for one endpoint, connecting (and authenticating) on first use.
    pub async fn client_at(&self, idx: usize) -> Result<Client, EtcdError> {
        let cached = self
            .clients
            .lock()
            .ok()
            .and_then(|c| c.get(idx).cloned().flatten());
        if let Some(c) = cached {
            return Ok(c);
        }
        let endpoint = self.endpoint(idx).to_string();
        let budget = self.connect_timeout + self.request_timeout;
        let connect = Client::connect([endpoint.clone()], Some(self.options.clone()));
        let client = bounded(&endpoint, "connect", budget, connect).await?;
        if let Ok(mut clients) = self.clients.lock()
            && let Some(slot) = clients.get_mut(idx)
        {
            *slot = Some(client.clone());
        }
        Ok(client)
    }

    /// Runs one unary call, trying each endpoint once starting with the
    /// preferred one. Returns the first success, the first non-retryable
    /// error, or the last error when every endpoint failed.
    pub async fn call<T, F, Fut>(&self, what: &'static str, mut op: F) -> Result<T, EtcdError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let start = self.preferred();
        let mut last = None;
        for i in 0..self.endpoints.len() {
            let idx = (start + i) % self.endpoints.len();
            let endpoint = self.endpoint(idx).to_string();
            let client = match self.client_at(idx).await {
                Ok(c) => c,
                Err(e) if e.class().fails_over() => {
                    tracing::debug!(%endpoint, error = %e, "etcd endpoint unusable, trying the next");
                    last = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            match bounded(&endpoint, what, self.request_timeout, op(client)).await {
                Ok(v) => {
                    self.set_preferred(idx);
                    return Ok(v);
                }
                Err(e) if !e.class().fails_over() => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e.detail(), "etcd call failed, trying the next endpoint");
                    self.forget(idx);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(EtcdError::Timeout {
            endpoint: "(no endpoints)".into(),
            what,
            after: Duration::ZERO,
        }))
    }
}

/// Where one long-lived stream (a keep-alive, a watch) runs among the
/// endpoints, and how long to wait before its next re-open.
///
/// A stream that fails or goes silent moves to the next endpoint; the move
/// is returned to the caller, who says it to whoever follows that stream.
/// Nothing here reads or changes the endpoint unary calls prefer.
#[derive(Debug)]
pub struct Rotation {
    idx: usize,
    backoff: Backoff,
}

impl Rotation {
    /// The endpoint the stream is on.
    pub fn endpoint(&self) -> usize {
        self.idx
    }

    /// The client for the stream's endpoint.
    pub async fn client(&self, etcd: &Etcd) -> Result<Client, EtcdError> {
        etcd.client_at(self.idx).await
    }

    /// The stream is open and answering: the next failure waits little.
    pub fn opened(&mut self) {
        self.backoff.reset();
    }

    /// The stream failed on its endpoint: drop that connection and move to
    /// the next endpoint, which is returned.
    pub fn failed(&mut self, etcd: &Etcd) -> usize {
        etcd.forget(self.idx);
        self.idx = etcd.next(self.idx);
        self.idx
    }

    /// Moves the stream to `idx` (to follow another stream).
    pub fn move_to(&mut self, idx: usize) {
        self.idx = idx;
    }

    /// How long to wait before the next re-open, for a caller that waits
    /// in its own select.
    pub fn next_delay(&mut self) -> Duration {
        self.backoff.next_delay()
    }

    /// Waits before the next re-open; `false` when `cancel` fired first.
    pub async fn pause(&mut self, cancel: &tokio_util::sync::CancellationToken) -> bool {
        self.backoff.pause(cancel).await
    }
}

impl Etcd {
    /// A stream's place among the endpoints, starting at `start` (default:
    /// the endpoint unary calls prefer now), retrying under `policy`.
    pub fn rotation(&self, start: Option<usize>, policy: Policy) -> Rotation {
        Rotation {
            idx: start.unwrap_or_else(|| self.preferred()) % self.endpoints.len().max(1),
            backoff: policy.start(),
        }
    }
}

/// Errors that a later attempt may not see.
pub trait Transient: std::fmt::Display {
    fn is_transient(&self) -> bool;
}

impl Transient for EtcdError {
    fn is_transient(&self) -> bool {
        self.class().fails_over()
    }
}

/// Retries `op` on transient errors with the standard backoff until
/// `deadline`, for the one-shot commands.
pub async fn retry_until<T, E, F, Fut>(deadline: Instant, mut op: F) -> Result<T, E>
where
    E: Transient,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::standard();
    // A one-shot command (a deadline within the hour) says nothing while it
    // retries: its caller reports the last error once, at the deadline. A
    // long-running one says the outage once, and its end.
    let long_running = deadline.saturating_duration_since(Instant::now()) > LONG_RUNNING;
    let mut failures = 0u32;
    loop {
        match op().await {
            Ok(v) => {
                if long_running && failures > 0 {
                    tracing::info!("etcd answers again, after {failures} failed attempts");
                }
                return Ok(v);
            }
            Err(e) if e.is_transient() => {
                let delay = backoff.next_delay();
                if Instant::now() + delay >= deadline {
                    return Err(e);
                }
                failures += 1;
                if long_running && failures == 1 {
                    tracing::warn!(error = %e, "etcd unavailable; retrying quietly until it answers");
                } else {
                    tracing::debug!(error = %e, retry_in = ?delay, "etcd unavailable, retrying");
                }
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The deadline of "retry until it answers", for long-running commands:
/// far enough never to come, near enough for the timer.
pub fn never() -> Instant {
    Instant::now() + Duration::from_secs(3600 * 24 * 365 * 30)
}

/// A [`retry_until`] deadline further off than this is a long-running
/// process's ("until it answers"), not a one-shot command's `--timeout`.
const LONG_RUNNING: Duration = Duration::from_secs(3600);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_start_at_a_random_endpoint() {
        let config = EtcdConfig {
            endpoints: ["http://a:2379", "http://b:2379", "http://c:2379"]
                .map(String::from)
                .to_vec(),
            tls: None,
            user: None,
            request_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
        };
        let mut seen = [0; 3];
        for _ in 0..300 {
            let etcd = Etcd::new(&config).expect("no TLS files to read");
            seen[etcd.preferred()] += 1;
        }
        // Each endpoint is expected 100 times; missing one by chance has a
        // probability of about 3 * (2/3)^300.
        assert!(seen.iter().all(|n| *n > 0), "{seen:?}");
    }
}
