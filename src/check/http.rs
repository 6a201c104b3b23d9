//! http checks: 2xx passing, 429 warning, anything else (or no answer)
//! critical.
//!
//! A plain GET over HTTP/1.1 on hyper, which the etcd client links anyway,
//! following up to [`MAX_REDIRECTS`] redirects. https verifies the server
//! against the system's CA certificates, loaded once, on the first https
//! check. No proxy: a health check asks the service itself.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode, Uri, header};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OnceCell;

use super::{MAX_OUTPUT, Outcome, Status};
use crate::error::chain_text;

pub const MAX_REDIRECTS: usize = 5;

const USER_AGENT: &str = concat!("registrar/", env!("CARGO_PKG_VERSION"), " health check");

/// Shared by every http check of a check set; cheap to clone.
#[derive(Clone, Default)]
pub struct Client {
    /// The TLS configuration, or why there is none; made on first use.
    tls: Arc<OnceCell<Result<Arc<rustls::ClientConfig>, String>>>,
}

/// Parses a check URL: http:// or https:// with a host.
pub fn parse(url: &str) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|e| format!("{e}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(h)) if !h.is_empty() => Ok(uri),
        _ => Err("not an http:// or https:// URL with a host".into()),
    }
}

pub async fn run(client: &Client, url: &str, timeout: Duration) -> Outcome {
    match tokio::time::timeout(timeout, client.fetch(url)).await {
        Ok(Ok((code, text))) => {
            let status = if code.is_success() {
                Status::Passing
            } else if code == StatusCode::TOO_MANY_REQUESTS {
                Status::Warning
            } else {
                Status::Critical
            };
            Outcome::new(status, text)
        }
        Ok(Err(e)) => Outcome::new(Status::Critical, format!("GET {url}: {e}")),
        Err(_) => Outcome::new(
            Status::Critical,
            format!(
                "GET {url}: no answer within {}",
                humantime::format_duration(timeout)
            ),
        ),
    }
}

/// One response: its status, where it redirects to, and its text (the
/// status line and the head of the body).
struct Answer {
    status: StatusCode,
    location: Option<String>,
    text: String,
}

impl Client {
    /// GETs `url`, following redirects; the final status and text.
    async fn fetch(&self, url: &str) -> Result<(StatusCode, String), String> {
        let mut uri = parse(url)?;
        for _ in 0..=MAX_REDIRECTS {
            let answer = self.get(&uri).await?;
            match answer.location {
                Some(next) if answer.status.is_redirection() => uri = follow(&uri, &next)?,
                _ => return Ok((answer.status, answer.text)),
            }
        }
        Err(format!("more than {MAX_REDIRECTS} redirects"))
    }

    async fn get(&self, uri: &Uri) -> Result<Answer, String> {
        let https = uri.scheme_str() == Some("https");
        let host = uri.host().unwrap_or_default();
        // An IPv6 literal comes bracketed: [::1].
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let host_header = match uri.port_u16() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        let req = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(header::HOST, host_header)
            .header(header::USER_AGENT, USER_AGENT)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let tcp = tokio::net::TcpStream::connect((bare, port))
            .await
            .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
        // Best effort: a request this small goes out in one segment anyway.
        let _ = tcp.set_nodelay(true);
        if !https {
            return exchange(tcp, req).await;
        }
        let config = self
            .tls
            .get_or_init(|| async {
                tokio::task::spawn_blocking(tls_config)
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()))
            })
            .await
            .clone()?;
        let name = rustls::pki_types::ServerName::try_from(bare.to_string())
            .map_err(|e| format!("{bare:?} is not a TLS server name: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {host}:{port}: {e}"))?;
        exchange(tls, req).await
    }
}

/// Sends `req` on a fresh connection and reads the answer.
async fn exchange<S>(io: S, req: Request<Empty<Bytes>>) -> Result<Answer, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| chain_text(&e))?;
    let talk = async {
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let mut text = format!("HTTP {status}\n");
        let mut body = resp.into_body();
        while text.len() < MAX_OUTPUT {
            match body.frame().await {
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        text.push_str(&String::from_utf8_lossy(&data));
                    }
                }
                None => break,
            }
        }
        Ok::<_, hyper::Error>(Answer {
            status,
            location,
            text,
        })
    };
    tokio::pin!(talk);
    // The connection is driven alongside the request; it ends with the
    // response (or fails first), and is dropped, closed, once read.
    let answer = tokio::select! {
        a = &mut talk => a,
        done = conn => match done {
            Ok(()) => talk.await,
            Err(e) => Err(e),
        },
    };
    answer.map_err(|e| chain_text(&e))
}

/// The URL a redirect from `base` to `location` leads to.
fn follow(base: &Uri, location: &str) -> Result<Uri, String> {
    let joined = if location.contains("://") {
        location.to_string()
    } else {
        let origin = format!(
            "{}://{}",
            base.scheme_str().unwrap_or("http"),
            base.authority().map_or("", |a| a.as_str())
        );
        if location.starts_with('/') {
            format!("{origin}{location}")
        } else {
            let dir = base.path().rsplit_once('/').map_or("", |(d, _)| d);
            format!("{origin}{dir}/{location}")
        }
    };
    parse(&joined).map_err(|e| format!("redirected to {location:?}: {e}"))
}

/// rustls with ring and the system's CA certificates.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(match found.errors.first() {
            Some(e) => format!("no CA certificates for https: {e}"),
            None => "no CA certificates for https (install the ca-certificates package)".into(),
        });
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_only_as_http_or_https_with_a_host() {
        for good in [
            "http://127.0.0.1:8080/health",
            "https://example.com",
            "http://[::1]:9/x?y=1",
        ] {
            assert!(parse(good).is_ok(), "{good}");
        }
        for bad in [
            "not a url",
            "ftp://host/",
            "http://",
            "/health",
            "",
            "host:80",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn redirects_resolve_against_the_url_they_came_from() {
        let base = parse("http://h:8/a/b?q").unwrap();
        assert_eq!(follow(&base, "/c").unwrap(), "http://h:8/c");
        assert_eq!(follow(&base, "c").unwrap(), "http://h:8/a/c");
        assert_eq!(follow(&base, "https://o/p").unwrap(), "https://o/p");
        assert!(follow(&base, "ftp://o/p").is_err());
    }
}
