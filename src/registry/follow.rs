//! Following the registry for every consumer (`watch`, `wait`, `render`,
//! `dns`): a snapshot at one revision, then batches of host changes, one
//! batch per etcd revision, each naming the keys it touched.
//!
//! After a broken stream it resumes from the last revision it applied + 1,
//! through whichever endpoint answers, so no revision is missed or
//! repeated. When that history is gone (compacted, restored, a replaced
//! cluster) it re-reads a snapshot and reports one batch: the difference
//! between the old registry and the new. The states in between are lost,
//! but the registry a consumer holds is again exactly etcd's.
//!
//! Every key, in the snapshot and in the stream, goes through
//! [`Registry::put`]/[`Registry::delete`], so a long-running consumer holds
//! exactly what a fresh read of the same revision would build.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use etcd_client::{EventType, GetOptions, WatchOptions, WatchStream};

use super::{HostId, HostView, Malformed, Registry};
use crate::backoff::{Outage, Policy};
use crate::etcd::{Etcd, EtcdError, Revision, Rotation, bounded};

/// The changes of one revision: each touched host with its state before
/// and after that revision, and every key that changed.
#[derive(Debug)]
pub struct Batch {
    pub revision: Revision,
    pub changes: Vec<(HostId, Option<HostView>, Option<HostView>)>,
    /// The keys put or deleted (after a re-read: the keys whose value
    /// differs from the registry before it), malformed ones included.
    pub keys: Vec<String>,
    /// The history was lost and the registry re-read: the changes are the
    /// difference, not events (fail static treats what vanished in it as
    /// an accident of the registry; see [`super::hold`]).
    pub reset: bool,
}

pub struct Follower<'a> {
    etcd: &'a Etcd,
    prefix: String,
    /// The key prefix watched (the prefix narrowed by DC/ROLE).
    scope: String,
    pub registry: Registry,
    /// Every event up to this revision has been applied.
    pub revision: Revision,
    /// The cluster the snapshot was read from (0 until known).
    cluster_id: u64,
    stream: Option<WatchStream>,
    rotation: Rotation,
    outage: Outage,
    pending: VecDeque<Batch>,
    /// When the stream last said anything, and whether a progress request
    /// is waiting for its answer (see [`Follower::next`]).
    heard: Instant,
    probing: bool,
}

impl<'a> Follower<'a> {
    /// Reads the snapshot. Malformed keys are returned for reporting.
    pub async fn start(
        etcd: &'a Etcd,
        prefix: &str,
        scope: &str,
    ) -> Result<(Follower<'a>, Vec<Malformed>), EtcdError> {
        Follower::start_with(etcd, prefix, scope, Registry::default()).await
    }

    /// [`Follower::start`], for a consumer that reads hosts alone: the
    /// mirror keeps no `raw` keys ([`Registry::hosts_only`]).
    pub async fn start_hosts_only(
        etcd: &'a Etcd,
        prefix: &str,
        scope: &str,
    ) -> Result<(Follower<'a>, Vec<Malformed>), EtcdError> {
        Follower::start_with(etcd, prefix, scope, Registry::hosts_only()).await
    }

    async fn start_with(
        etcd: &'a Etcd,
        prefix: &str,
        scope: &str,
        empty: Registry,
    ) -> Result<(Follower<'a>, Vec<Malformed>), EtcdError> {
        let mut f = Follower {
            etcd,
            prefix: prefix.to_string(),
            scope: scope.to_string(),
            registry: empty,
            revision: Revision::FIRST,
            cluster_id: 0,
            stream: None,
            rotation: etcd.rotation(None, Policy::STANDARD),
            outage: Outage::new("cannot watch the registry"),
            pending: VecDeque::new(),
            heard: Instant::now(),
            probing: false,
        };
        let bad = f.resnapshot().await?;
        Ok((f, bad))
    }

    async fn resnapshot(&mut self) -> Result<Vec<Malformed>, EtcdError> {
        let scope = self.scope.clone();
        let resp = self
            .etcd
            .call("read the registry", |mut c| {
                let scope = scope.clone();
                async move { c.get(scope, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let mut registry = Registry {
            hosts_only: self.registry.hosts_only,
            ..Registry::default()
        };
        let bad = registry.fill(&self.prefix, resp.kvs());
        self.registry = registry;
        // etcd always says its revision; were it not to, the newest key
        // read is the best known lower bound (the watch then resumes a
        // little early, which repeats nothing the mirror does not hold).
        self.revision = Revision::of_header(resp.header())
            .or_else(|| {
                resp.kvs()
                    .iter()
                    .filter_map(|kv| Revision::of(kv.mod_revision()))
                    .max()
            })
            .unwrap_or(Revision::FIRST);
        self.cluster_id = resp.header().map(|h| h.cluster_id()).unwrap_or(0);
        Ok(bad)
    }

    async fn open(&mut self) -> Result<WatchStream, EtcdError> {
        let endpoint = self.etcd.endpoint(self.rotation.endpoint()).to_string();
        let mut client = self.rotation.client(self.etcd).await?;
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(self.revision.next())
            .with_progress_notify();
        let within = self.etcd.request_timeout().max(Duration::from_secs(1));
        bounded(
            &endpoint,
            "watch",
            within,
            client.watch(self.scope.clone(), Some(opts)),
        )
        .await
    }

    /// How long the stream may be silent before it is asked for progress,
    /// and how long the answer may take: a paused or partitioned member
    /// keeps a watch stream open and silent, with no error, so silence is
    /// all there is to notice it by.
    fn silence(&self) -> (Duration, Duration) {
        let answer = self.etcd.request_timeout().max(Duration::from_millis(500));
        (answer * 2, answer)
    }

    /// Waits for the next revision that touched a host. Malformed keys met
    /// on the way are passed to `report`. Never gives up on an unreachable
    /// etcd (it retries with backoff); returns only fatal errors.
    ///
    /// A stream silent for twice the request timeout is asked for progress
    /// (a cheap request that needs no raft write); one that does not answer
    /// within the request timeout is given up, and the watch resumes from
    /// the last applied revision on the next endpoint.
    pub async fn next(&mut self, report: &mut dyn FnMut(Malformed)) -> Result<Batch, EtcdError> {
        loop {
            if let Some(b) = self.pending.pop_front() {
                return Ok(b);
            }
            if self.stream.is_none() && !self.reopen().await? {
                continue;
            }
            let Some(resp) = self.receive().await else {
                continue;
            };
            if self.history_reset(&resp) {
                if let Some(b) = self.reread(resp.compact_revision(), report).await? {
                    return Ok(b);
                }
                continue;
            }
            if resp.canceled() {
                self.stream = None;
                continue;
            }
            self.apply(&resp, report);
        }
    }

    /// Opens the watch again. `Ok(false)`: this attempt failed over to
    /// the next endpoint after a pause; try again.
    async fn reopen(&mut self) -> Result<bool, EtcdError> {
        match self.open().await {
            Ok(s) => {
                self.rotation.opened();
                if let Some(ended) = self.outage.recovered() {
                    tracing::info!("watching the registry again {}", ended.describe());
                }
                self.stream = Some(s);
                self.heard = Instant::now();
                self.probing = false;
                Ok(true)
            }
            Err(e) if e.class().fails_over() => {
                self.outage.failed(&e);
                self.rotation.failed(self.etcd);
                tokio::time::sleep(self.rotation.next_delay()).await;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// The watch's next response, or `None` when the stream was lost or
    /// its member went silent (it is then dropped, to be opened again on
    /// the next endpoint) or a progress probe was sent.
    ///
    /// The stream stays in `self` while this waits, so dropping this
    /// future (render and dns poll it inside select!) keeps the watch;
    /// tonic's `message()` keeps its state in the stream.
    async fn receive(&mut self) -> Option<etcd_client::WatchResponse> {
        let (quiet, answer) = self.silence();
        let deadline = self.heard + if self.probing { quiet + answer } else { quiet };
        let stream = self.stream.as_mut()?;
        let msg = tokio::select! {
            m = stream.message() => m,
            _ = tokio::time::sleep_until(deadline) => {
                if !self.probing {
                    self.probing = true;
                    let asked = tokio::time::timeout(answer, stream.request_progress()).await;
                    if matches!(asked, Ok(Ok(()))) {
                        return None;
                    }
                }
                tracing::warn!(
                    endpoint = self.etcd.endpoint(self.rotation.endpoint()),
                    "the watch's member stopped answering (a paused or partitioned member); resuming on another endpoint"
                );
                self.stream = None;
                self.rotation.failed(self.etcd);
                return None;
            }
        };
        self.heard = Instant::now();
        self.probing = false;
        match msg {
            Ok(Some(r)) => Some(r),
            Ok(None) | Err(_) => {
                tracing::warn!(
                    endpoint = self.etcd.endpoint(self.rotation.endpoint()),
                    "watch stream lost; resuming"
                );
                self.stream = None;
                self.rotation.failed(self.etcd);
                None
            }
        }
    }

    /// Whether the mirror's history is gone: a compaction, or history that
    /// went backwards (a restore, a wiped or replaced cluster). The latter
    /// looks like a healthy stream that never says anything again (etcd
    /// waits for revisions it will not reach for a long time), so it is
    /// noticed by the header.
    fn history_reset(&self, resp: &etcd_client::WatchResponse) -> bool {
        let behind = resp.header().is_some_and(|h| {
            (self.cluster_id != 0 && h.cluster_id() != 0 && h.cluster_id() != self.cluster_id)
                || Revision::of(h.revision()).is_some_and(|r| r < self.revision)
        });
        behind || resp.compact_revision() > 0
    }

    /// Reads the registry afresh and diffs it against the mirror: the
    /// difference as one batch marked `reset`, or `None` when nothing
    /// changed.
    async fn reread(
        &mut self,
        compacted: i64,
        report: &mut dyn FnMut(Malformed),
    ) -> Result<Option<Batch>, EtcdError> {
        // The stream goes first, so that a re-read dropped half way starts
        // over from a new watch rather than waiting on this one.
        self.stream = None;
        let (old_revision, old_cluster) = (self.revision, self.cluster_id);
        // A clone, not a take: this future may be dropped during the
        // re-read (render and watch poll it in a select!), and the mirror
        // must then still be the last complete registry, never an empty one
        // a render would write out.
        let old = self.registry.clone();
        let bad = self.resnapshot().await?;
        bad.into_iter().for_each(&mut *report);
        if self.cluster_id != old_cluster && old_cluster != 0 {
            tracing::warn!(
                "the etcd cluster changed (id {:x}, was {:x}); re-read the registry and reporting the difference",
                self.cluster_id,
                old_cluster
            );
        } else if self.revision < old_revision {
            tracing::warn!(
                "the registry's history went backwards (revision {} after {}: a restore or a wiped cluster); re-read it and reporting the difference",
                self.revision,
                old_revision
            );
        } else if compacted > 0 {
            tracing::info!(
                compacted,
                "the watch's history was compacted; re-read the registry and reporting the difference"
            );
        } else {
            // A member a little behind the one the snapshot came from.
            tracing::debug!("the watch's member was behind the last read; re-read the registry");
        }
        Ok(reset_batch(&old, &self.registry, self.revision))
    }

    /// Applies a response's events to the mirror, one batch per revision
    /// (one transaction each), every touched host diffed per revision.
    fn apply(&mut self, resp: &etcd_client::WatchResponse, report: &mut dyn FnMut(Malformed)) {
        let events = resp.events();
        let mut i = 0;
        while i < events.len() {
            let raw = events[i].kv().map(|kv| kv.mod_revision()).unwrap_or(0);
            let rev = Revision::of(raw).unwrap_or(self.revision);
            let mut before: BTreeMap<HostId, Option<HostView>> = BTreeMap::new();
            let mut keys = Vec::new();
            while i < events.len() && events[i].kv().map(|kv| kv.mod_revision()).unwrap_or(0) == raw
            {
                let ev = &events[i];
                i += 1;
                let Some(kv) = ev.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                // Every key goes through the registry, so that its raw
                // keys are what a fresh read would find.
                if let Some((dir, _)) = crate::layout::parse_key(&self.prefix, &key) {
                    let id = HostId {
                        dc: dir.dc,
                        role: dir.role,
                        host: dir.host,
                    };
                    before
                        .entry(id.clone())
                        .or_insert_with(|| self.registry.hosts.get(&id).cloned());
                }
                match ev.event_type() {
                    EventType::Put => {
                        if let Err(m) =
                            self.registry
                                .put(&self.prefix, kv.key(), kv.value(), kv.lease(), raw)
                        {
                            report(m);
                        }
                    }
                    EventType::Delete => {
                        self.registry.delete(&self.prefix, kv.key(), raw);
                    }
                }
                keys.push(key);
            }
            self.revision = self.revision.max(rev);
            let changes = before
                .into_iter()
                .map(|(id, b)| {
                    let after = self.registry.hosts.get(&id).cloned();
                    (id, b, after)
                })
                .collect();
            self.pending.push_back(Batch {
                revision: rev,
                changes,
                keys,
                reset: false,
            });
        }
        if events.is_empty()
            && !resp.created()
            && let Some(h) = resp.header()
        {
            // A progress notification: nothing is pending below it.
            self.revision = self
                .revision
                .max(Revision::of(h.revision()).unwrap_or(self.revision));
        }
    }
}

/// What a re-read changed, as one batch marked `reset`: every host whose
/// state differs and every key whose value does, or `None` when the two
/// registries are the same.
fn reset_batch(old: &Registry, new: &Registry, revision: Revision) -> Option<Batch> {
    let mut changes = Vec::new();
    let ids: std::collections::BTreeSet<&HostId> =
        old.hosts.keys().chain(new.hosts.keys()).collect();
    for id in ids {
        let (before, after) = (old.hosts.get(id), new.hosts.get(id));
        if before != after {
            changes.push((id.clone(), before.cloned(), after.cloned()));
        }
    }
    let keys = changed_keys(&old.raw, &new.raw);
    if changes.is_empty() && keys.is_empty() {
        return None;
    }
    Some(Batch {
        revision,
        changes,
        keys,
        reset: true,
    })
}

/// The keys whose value differs between two raw registries.
fn changed_keys(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) -> Vec<String> {
    let mut keys: Vec<String> = old
        .iter()
        .filter(|(k, v)| new.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect();
    keys.extend(new.keys().filter(|k| !old.contains_key(*k)).cloned());
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/infrastructure";

    fn rev(n: i64) -> Revision {
        Revision::of(n).expect("a revision above 0")
    }

    fn put(r: &mut Registry, key: &str, value: &str, rev: i64) {
        r.put(P, format!("{P}/{key}").as_bytes(), value.as_bytes(), 1, rev)
            .unwrap();
    }

    fn host(r: &mut Registry, dir: &str, ip: &str, rev: i64) {
        put(r, &format!("{dir}/ip"), ip, rev);
        put(r, &format!("{dir}/health"), "passing", rev);
    }

    #[test]
    fn a_reread_reports_every_host_and_key_that_differs_once() {
        let mut old = Registry::default();
        host(&mut old, "dc1/web/a", "10.0.0.1", 2);
        host(&mut old, "dc1/web/b", "10.0.0.2", 3);
        put(&mut old, "dc1/web/b/meta/rack", "r1", 3);
        // A restore to an older snapshot: a gone, b's meta changed, c new.
        let mut new = Registry::default();
        host(&mut new, "dc1/web/b", "10.0.0.2", 2);
        put(&mut new, "dc1/web/b/meta/rack", "r2", 2);
        host(&mut new, "dc1/web/c", "10.0.0.3", 2);
        let b = reset_batch(&old, &new, rev(2)).unwrap();
        assert!(b.reset);
        assert_eq!(b.revision, rev(2));
        let hosts: Vec<(String, bool, bool)> = b
            .changes
            .iter()
            .map(|(id, before, after)| (id.host.clone(), before.is_some(), after.is_some()))
            .collect();
        assert_eq!(
            hosts,
            [
                ("a".to_string(), true, false),
                ("b".to_string(), true, true),
                ("c".to_string(), false, true)
            ]
        );
        let keys: std::collections::BTreeSet<&str> = b.keys.iter().map(String::as_str).collect();
        for k in [
            "/infrastructure/dc1/web/a/ip",
            "/infrastructure/dc1/web/b/meta/rack",
            "/infrastructure/dc1/web/c/ip",
        ] {
            assert!(keys.contains(k), "{k} not in {keys:?}");
        }
        assert!(!keys.contains("/infrastructure/dc1/web/b/ip"), "{keys:?}");
        // The same registry read again: nothing to report.
        assert!(reset_batch(&new, &new, rev(3)).is_none());
    }
}
