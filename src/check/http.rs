//! http checks: 2xx passing, 429 warning, anything else (or no answer) critical.

use std::time::Duration;

use super::{MAX_OUTPUT, Outcome, Status};

pub async fn run(client: &reqwest::Client, url: &str, timeout: Duration) -> Outcome {
    let fetch = async {
        let mut resp = client.get(url).send().await?;
        let code = resp.status();
        let mut text = format!("HTTP {code}\n");
        while text.len() < MAX_OUTPUT {
            match resp.chunk().await? {
                Some(bytes) => text.push_str(&String::from_utf8_lossy(&bytes)),
                None => break,
            }
        }
        Ok::<_, reqwest::Error>((code, text))
    };
    match tokio::time::timeout(timeout, fetch).await {
        Ok(Ok((code, text))) => {
            let status = if code.is_success() {
                Status::Passing
            } else if code.as_u16() == 429 {
                Status::Warning
            } else {
                Status::Critical
            };
            Outcome::new(status, text)
        }
        Ok(Err(e)) => Outcome::new(
            Status::Critical,
            format!("GET {url}: {}", crate::etcd::chain_text(&e)),
        ),
        Err(_) => Outcome::new(
            Status::Critical,
            format!(
                "GET {url}: no answer within {}",
                humantime::format_duration(timeout)
            ),
        ),
    }
}
