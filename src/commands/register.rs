//! `registrar register`: one-shot registration for cloud-init. The lease is
//! left to expire after the TTL; nothing keeps it alive.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Failure, exit, one_shot_desired, prepare, register_failure};
use crate::config::Config;
use crate::etcd::retry_until;
use crate::lease::{self, LeaseId};
use crate::registration::{self, RegisterError};

pub async fn run(
    config: &Config,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<(), Failure> {
    let p = prepare(config)?;
    let desired = one_shot_desired(config, &p.identity);
    let deadline = Instant::now() + timeout;
    let work = async {
        // One id for every try, so a retried grant finds its own lease.
        let id = LeaseId::random();
        let lease = retry_until(deadline, || lease::grant(&p.etcd, config.ttl, id))
            .await
            .map_err(RegisterError::Etcd)?;
        let written = retry_until(deadline, || async {
            registration::write(&p.etcd, &desired, lease.id).await
        })
        .await;
        match written {
            Ok(revision) => Ok((lease, revision)),
            Err(e) => {
                // Leave no unused lease behind.
                if let Err(revoke) = lease::revoke(&p.etcd, lease.id).await {
                    tracing::debug!(error = %revoke, "could not revoke the unused lease");
                }
                Err(e)
            }
        }
    };
    let (lease, revision) = tokio::select! {
        r = work => r.map_err(|e| register_failure(e, &p.etcd))?,
        _ = cancel.cancelled() => {
            return Err(Failure::new(exit::RUNTIME, anyhow::anyhow!("interrupted before registration finished")));
        }
    };
    tracing::info!(
        host = desired.host(),
        lease = %lease.id,
        ttl = %humantime::format_duration(lease.ttl),
        revision = revision.map_or(0, |r| r.get()),
        keys = desired.kvs.len(),
        "registered; the keys expire with the lease unless it is kept alive"
    );
    Ok(())
}
