//! Watching our own keys, so that damage done from outside is repaired at
//! once instead of at the next keep-alive (or never).
//!
//! A lease revoked from outside shows up here as DELETE events within one
//! round trip, where the keep-alive loop would only notice at its next tick
//! (up to TTL/3 later). Keys deleted by hand (`etcdctl del --prefix`) while the
//! lease lives would never be noticed by keep-alives at all. The watch costs
//! one idle stream and no raft writes.
//!
//! A paused member keeps a watch stream open and silent, and a quiet watch
//! cannot tell that from "nothing happened". So the watch follows the
//! keep-alive stream, which does notice (its answers have deadlines): when
//! the keep-alive has moved to another endpoint, the watch moves there too.
//! That costs a local check per keep-alive period and no messages.
//!
//! A re-opened watch does not replay history from the registration: on a
//! host that has been quiet for days that is days of the whole registry's
//! changes for etcd to scan, for every host that moves at once when a member
//! fails. It reads this host's keys instead (one read-only transaction) and
//! watches from the revision of that read.

use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchStream};
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::etcd::{Etcd, EtcdError, bounded};
use crate::registration::{Desired, verify};

/// Why watching stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEnd {
    Cancelled,
    /// One of our keys was deleted or overwritten; the text says which.
    Damaged(String),
    /// The history we asked for was compacted: state must be re-verified.
    Compacted,
}

/// Watches every directory of `desired` from `after_revision + 1` and
/// returns on the first event that removes or replaces one of our keys.
/// Every `follow_every` it checks whether the keep-alive moved to another
/// endpoint, and if so moves the watch there. Before re-opening, it checks
/// that the keys are still as written and watches from that read.
pub async fn watch(
    etcd: &Etcd,
    desired: &Desired,
    lease: i64,
    after_revision: i64,
    follow_every: Duration,
    cancel: &CancellationToken,
) -> WatchEnd {
    let mut idx = etcd.preferred();
    let mut backoff = Backoff::standard();
    let mut follow = tokio::time::interval(follow_every);
    follow.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first opening starts after `after_revision`; any later one reads
    // the keys first and starts after that read.
    let mut from = Some(after_revision);
    loop {
        let start = match from.take() {
            Some(revision) => Some(revision),
            None => {
                let read = tokio::select! {
                    _ = cancel.cancelled() => return WatchEnd::Cancelled,
                    r = verify(etcd, desired, lease) => r,
                };
                match read {
                    Ok(Some(revision)) if revision > 0 => Some(revision),
                    Ok(Some(_)) => {
                        tracing::debug!("etcd answered without a revision; reading again");
                        None
                    }
                    Ok(None) => {
                        return WatchEnd::Damaged(
                            "this host's keys changed while its watch was re-opening".into(),
                        );
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot read this host's keys; retrying");
                        None
                    }
                }
            }
        };
        let opened = match start {
            Some(revision) => tokio::select! {
                _ = cancel.cancelled() => return WatchEnd::Cancelled,
                r = open(etcd, idx, desired, revision + 1) => r,
            },
            None => {
                tokio::select! {
                    _ = cancel.cancelled() => return WatchEnd::Cancelled,
                    _ = sleep(backoff.next_delay()) => {}
                }
                continue;
            }
        };
        match opened {
            Ok(mut stream) => {
                backoff.reset();
                follow.reset();
                let moved = loop {
                    let msg = tokio::select! {
                        _ = cancel.cancelled() => return WatchEnd::Cancelled,
                        m = stream.message() => m,
                        _ = follow.tick() => {
                            let preferred = etcd.preferred();
                            if preferred != idx {
                                break Some(preferred);
                            }
                            continue;
                        }
                    };
                    let resp = match msg {
                        Ok(Some(resp)) => resp,
                        Ok(None) => {
                            tracing::debug!("watch stream closed by etcd; reopening");
                            break None;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "watch stream failed; reopening");
                            break None;
                        }
                    };
                    if resp.compact_revision() > 0 {
                        return WatchEnd::Compacted;
                    }
                    if resp.canceled() {
                        tracing::debug!(
                            reason = resp.cancel_reason(),
                            "watch canceled by etcd; reopening"
                        );
                        break None;
                    }
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let key = String::from_utf8_lossy(kv.key());
                        if !desired.kvs.contains_key(key.as_ref()) {
                            continue;
                        }
                        match ev.event_type() {
                            EventType::Delete => {
                                return WatchEnd::Damaged(format!("{key} was deleted"));
                            }
                            EventType::Put if kv.lease() != lease => {
                                return WatchEnd::Damaged(format!(
                                    "{key} was overwritten outside this agent (lease {:x})",
                                    kv.lease()
                                ));
                            }
                            EventType::Put => {}
                        }
                    }
                };
                if let Some(to) = moved {
                    tracing::debug!(
                        from = etcd.endpoint(idx),
                        to = etcd.endpoint(to),
                        "the keep-alive moved; moving the watch on this host's keys with it"
                    );
                    idx = to;
                    continue;
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot open the watch on this host's keys"),
        }
        etcd.forget(idx);
        idx = etcd.next(idx);
        tokio::select! {
            _ = cancel.cancelled() => return WatchEnd::Cancelled,
            _ = sleep(backoff.next_delay()) => {}
        }
    }
}

async fn open(
    etcd: &Etcd,
    idx: usize,
    desired: &Desired,
    from: i64,
) -> Result<WatchStream, EtcdError> {
    let endpoint = etcd.endpoint(idx).to_string();
    let mut client = etcd.client_at(idx).await?;
    let within = etcd.request_timeout().max(Duration::from_secs(1));
    let opts = || Some(WatchOptions::new().with_prefix().with_start_revision(from));
    let mut dirs = desired.dirs.iter().map(|d| d.dir());
    let first = dirs.next().unwrap_or_default();
    let call = async {
        let mut stream = client.watch(first, opts()).await?;
        for dir in dirs {
            stream.watch(dir, opts()).await?;
        }
        Ok::<_, etcd_client::Error>(stream)
    };
    bounded(&endpoint, "watch", within, call).await
}
