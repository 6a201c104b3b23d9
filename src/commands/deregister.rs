//! `registrar deregister`: revoke this host's lease so that all its keys
//! vanish at once. Exits 0 also when nothing was registered.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Failure, exit, one_shot_desired, prepare, register_failure};
use crate::config::Config;
use crate::etcd::retry_until;
use crate::registration::{self, Deregistered};

pub async fn run(
    config: &Config,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<(), Failure> {
    let p = prepare(config)?;
    let desired = one_shot_desired(config, &p.identity);
    let deadline = Instant::now() + timeout;
    let outcome = tokio::select! {
        r = retry_until(deadline, || registration::deregister(&p.etcd, &desired)) => {
            r.map_err(|e| register_failure(e, &p.etcd))?
        }
        _ = cancel.cancelled() => {
            return Err(Failure::new(exit::RUNTIME, anyhow::anyhow!("interrupted before deregistration finished")));
        }
    };
    if crate::agent::presence::agent_running(&config.state_dir) == Some(true) {
        tracing::warn!(
            host = desired.host(),
            "an agent runs on this machine (state dir {}); it will register the host again within a moment. \
             Stop it instead (systemctl stop registrar) to keep the host out of the registry",
            config.state_dir.display()
        );
    }
    match outcome {
        Deregistered::Removed => tracing::info!(host = desired.host(), "deregistered"),
        Deregistered::NothingRegistered => {
            tracing::info!(host = desired.host(), "nothing was registered")
        }
    }
    Ok(())
}
