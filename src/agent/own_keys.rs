//! The watch on this host's own keys: one long-lived task per lease, so
//! that damage done from outside is repaired at once instead of at the next
//! keep-alive (or never).
//!
//! A lease revoked from outside shows up here as DELETE events within one
//! round trip, where the keep-alive would only notice at its next tick (up
//! to TTL/3 later). Keys deleted by hand (`etcdctl del --prefix`) while the
//! lease lives would never be noticed by keep-alives at all. The watch costs
//! one idle stream and no raft writes.
//!
//! The writer feeds the task every registration it writes over a watch
//! channel ([`Written`]). A change of values (a health change) only changes
//! what the task judges events against; the stream stays open. Only a
//! change of directories (a role added or removed by reload) re-opens it.
//!
//! The task does not repair anything itself: it reports a suspicion to the
//! writer, which reads the keys back before it writes (events of the
//! writer's own update can arrive before the update's answer does), and
//! answers by sending a `Written` again, after which the watch resumes.
//!
//! A paused member keeps a watch stream open and silent, and a quiet watch
//! cannot tell that from "nothing happened". So the watch follows the lease
//! session's keep-alive stream, which does notice (its answers have
//! deadlines): the session says where its stream runs, and when that
//! changes, the watch moves there too.
//!
//! A re-opened watch does not replay history from the registration: on a
//! host that has been quiet for days that is days of the whole registry's
//! changes for etcd to scan, for every host that moves at once when a member
//! fails. It reads this host's keys instead (one read-only transaction) and
//! watches from the revision of that read.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::backoff::Policy;
use crate::etcd::{Etcd, EtcdError, Revision, Rotation, bounded};
use crate::lease::{LeaseId, State};
use crate::registration::{Desired, Verified, verify};

/// A registration as written, and the revision it was written (or last
/// read back) at, if known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub desired: Desired,
    pub at: Option<Revision>,
}

/// Watches the keys of `lease` until `cancel`, reporting each suspicion
/// on `suspect` and then waiting for the next [`Written`].
pub async fn run(
    etcd: Arc<Etcd>,
    lease: LeaseId,
    mut written: watch::Receiver<Written>,
    mut session: watch::Receiver<State>,
    suspect: mpsc::Sender<String>,
    cancel: CancellationToken,
) {
    let mut current = written.borrow_and_update().clone();
    let mut rotation = etcd.rotation(keep_alive_endpoint(&session.borrow()), Policy::STANDARD);
    // The first opening starts after the write; a later one reads the keys
    // first and starts after that read.
    let mut from = current.at;
    let mut session_open = true;
    loop {
        let start = match from.take() {
            Some(revision) => revision,
            None => {
                let read = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = verify(&etcd, &current.desired, lease) => r,
                };
                match read {
                    Ok(Verified::Intact { at: Some(at) }) => at,
                    Ok(Verified::Intact { at: None }) => {
                        tracing::debug!("etcd answered without a revision; reading again");
                        if !rotation.pause(&cancel).await {
                            return;
                        }
                        continue;
                    }
                    Ok(Verified::Changed) => {
                        let why = "this host's keys changed while its watch was re-opening";
                        match report(why, &suspect, &mut written, &cancel).await {
                            Some(next) => {
                                from = next.at;
                                current = next;
                                continue;
                            }
                            None => return,
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot read this host's keys; retrying");
                        rotation.failed(&etcd);
                        if !rotation.pause(&cancel).await {
                            return;
                        }
                        continue;
                    }
                }
            }
        };
        let opened = tokio::select! {
            _ = cancel.cancelled() => return,
            r = open(&etcd, &rotation, &current.desired, start) => r,
        };
        let mut stream = match opened {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "cannot open the watch on this host's keys");
                rotation.failed(&etcd);
                if !rotation.pause(&cancel).await {
                    return;
                }
                continue;
            }
        };
        rotation.opened();
        let leave = loop {
            let msg = tokio::select! {
                _ = cancel.cancelled() => return,
                changed = written.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let next = written.borrow_and_update().clone();
                    let reopen = next.desired.dirs != current.desired.dirs;
                    if reopen {
                        from = next.at;
                    }
                    current = next;
                    if reopen {
                        tracing::debug!("this host's directories changed; re-opening its watch");
                        break Leave::Reopen;
                    }
                    continue;
                }
                changed = session.changed(), if session_open => {
                    if changed.is_err() {
                        session_open = false;
                        continue;
                    }
                    let to = keep_alive_endpoint(&session.borrow_and_update());
                    match to {
                        Some(to) if to != rotation.endpoint() => {
                            tracing::debug!(
                                from = etcd.endpoint(rotation.endpoint()),
                                to = etcd.endpoint(to),
                                "the keep-alive moved; moving the watch on this host's keys with it"
                            );
                            rotation.move_to(to);
                            break Leave::Reopen;
                        }
                        _ => continue,
                    }
                }
                m = stream.message() => m,
            };
            let resp = match msg {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    tracing::debug!("watch stream closed by etcd; reopening");
                    rotation.failed(&etcd);
                    break Leave::Failed;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "watch stream failed; reopening");
                    rotation.failed(&etcd);
                    break Leave::Failed;
                }
            };
            if resp.compact_revision() > 0 {
                break Leave::Suspect(format!(
                    "the history this watch needs was compacted (at revision {})",
                    resp.compact_revision()
                ));
            }
            if resp.canceled() {
                tracing::debug!(
                    reason = resp.cancel_reason(),
                    "watch canceled by etcd; reopening"
                );
                break Leave::Failed;
            }
            if let Some(why) = damage(&resp, &current.desired, lease) {
                break Leave::Suspect(why);
            }
        };
        match leave {
            Leave::Suspect(why) => match report(&why, &suspect, &mut written, &cancel).await {
                Some(next) => {
                    from = next.at;
                    current = next;
                }
                None => return,
            },
            Leave::Failed => {
                if !rotation.pause(&cancel).await {
                    return;
                }
            }
            Leave::Reopen => {}
        }
    }
}

/// Where the session's keep-alive stream runs, if it holds a lease.
fn keep_alive_endpoint(state: &State) -> Option<usize> {
    match state {
        State::Held { endpoint, .. } => Some(*endpoint),
        State::Granting => None,
    }
}

/// Why the watch left its stream.
enum Leave {
    /// Something happened to our keys: tell the writer.
    Suspect(String),
    /// The stream broke: re-open on the next endpoint after a backoff.
    Failed,
    /// The keep-alive moved, or our directories changed: re-open now.
    Reopen,
}

/// The first event of `resp` that removes or replaces one of our keys.
fn damage(resp: &etcd_client::WatchResponse, desired: &Desired, lease: LeaseId) -> Option<String> {
    for ev in resp.events() {
        let Some(kv) = ev.kv() else { continue };
        let key = String::from_utf8_lossy(kv.key());
        if !desired.kvs.contains_key(key.as_ref()) {
            continue;
        }
        match ev.event_type() {
            EventType::Delete => return Some(format!("{key} was deleted")),
            EventType::Put if LeaseId::of(kv.lease()) != Some(lease) => {
                return Some(format!(
                    "{key} was overwritten outside this agent (lease {:x})",
                    kv.lease()
                ));
            }
            EventType::Put => {}
        }
    }
    None
}

/// Reports a suspicion and waits for the writer's answer.
async fn report(
    why: &str,
    suspect: &mpsc::Sender<String>,
    written: &mut watch::Receiver<Written>,
    cancel: &CancellationToken,
) -> Option<Written> {
    tokio::select! {
        _ = cancel.cancelled() => return None,
        sent = suspect.send(why.to_string()) => sent.ok()?,
    }
    tokio::select! {
        _ = cancel.cancelled() => None,
        changed = written.changed() => {
            changed.ok()?;
            Some(written.borrow_and_update().clone())
        }
    }
}

async fn open(
    etcd: &Etcd,
    rotation: &Rotation,
    desired: &Desired,
    after: Revision,
) -> Result<WatchStream, EtcdError> {
    let endpoint = etcd.endpoint(rotation.endpoint()).to_string();
    let mut client = rotation.client(etcd).await?;
    let within = etcd.request_timeout().max(Duration::from_secs(1));
    let opts = || {
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(after.next()),
        )
    };
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
