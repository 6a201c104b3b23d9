//! tcp checks: a connect within the timeout is passing, otherwise critical.

use std::time::Duration;

use super::{Outcome, Status};

pub async fn run(addr: &str, timeout: Duration) -> Outcome {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Outcome::new(Status::Passing, format!("connected to {addr}")),
        Ok(Err(e)) => Outcome::new(Status::Critical, format!("connect to {addr}: {e}")),
        Err(_) => Outcome::new(
            Status::Critical,
            format!(
                "connect to {addr}: no answer within {}",
                humantime::format_duration(timeout)
            ),
        ),
    }
}
