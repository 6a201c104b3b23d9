//! The conditional transactions of design.md rules 1, 5 and 7: the first
//! write, conflict detection, takeover of our own earlier incarnation, and
//! deregistration.
//!
//! Invariant: nothing here ever writes a key unconditionally. In the first
//! write (and a rewrite), a key is put only if it did not exist
//! (`create_revision == 0`) or still has exactly the `mod_revision` we read
//! and judged to be ours or stale. An update of a registered host is
//! guarded instead by the owner key of each directory it holds still being
//! on this agent's lease (and, for a directory new to it, such as a role
//! added by a reload, by its keys not existing yet): another machine that
//! took the name over holds it on its own lease, so the update fails
//! (`Mismatch`) rather than write over it. So a live
//! registration of another machine is never overwritten, even when two
//! agents race for the same host name.

use std::collections::{BTreeMap, BTreeSet};

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};

use crate::etcd::{Class, Etcd, EtcdError, Revision, Transient};
use crate::identity::Identity;
use crate::layout::{HostDir, Leaf};
use crate::lease::{LeaseId, revoke, time_to_live};

/// What the agent observes of its registration, beside its lease's
/// observations, for systemd and metrics. Every method has a no-op default.
pub trait Observer: crate::lease::LeaseObserver {
    /// The host was written with `lease`; `first` is the first time.
    fn registered(&self, _lease: crate::lease::Lease, _desired: &Desired, _first: bool) {}
    /// What the host reports changed and was written.
    fn updated(&self, _desired: &Desired) {}
    /// The host name is held by another machine; the agent retries.
    fn conflict(&self, _message: &str) {}
    /// Shutdown began.
    fn stopping(&self) {}
}

/// What this host wants the registry to say about it: every key of every
/// role, with its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub dirs: Vec<HostDir>,
    pub machine_id: String,
    pub kvs: BTreeMap<String, String>,
    /// What the checks say, typed, for STATUS= and metrics (nobody
    /// re-parses the JSON values of `kvs`).
    pub summary: Summary,
}

/// The checks behind a registration, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub checks: usize,
    pub passing: usize,
    /// Withdrawn by `deregister_after`: only the owner keys are written.
    pub withdrawn: bool,
}

impl std::fmt::Display for Summary {
    /// "checks 2/3 passing", "no checks", "withdrawn (deregister_after)".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Summary {
                withdrawn: true, ..
            } => f.write_str("withdrawn (deregister_after)"),
            Summary { checks: 0, .. } => f.write_str("no checks"),
            Summary {
                checks, passing, ..
            } => write!(f, "checks {passing}/{checks} passing"),
        }
    }
}

/// The inputs of a host's registration besides its identity.
#[derive(Debug, Clone)]
pub struct Spec<'a> {
    pub prefix: &'a str,
    pub dc: &'a str,
    pub roles: &'a [String],
    pub services: &'a BTreeMap<String, u16>,
    pub meta: &'a BTreeMap<String, String>,
    /// `passing`, `warning` or `critical`.
    pub health: &'a str,
    /// Check name → its JSON value.
    pub checks: &'a BTreeMap<String, String>,
    /// How many of those checks pass.
    pub passing: usize,
    /// The maintenance reason, while in maintenance.
    pub maintenance: Option<&'a str>,
    /// Withdrawn by `deregister_after`: only the `owner` key stays, so the
    /// host name remains held while consumers no longer see the host.
    pub withdrawn: bool,
}

impl Desired {
    pub fn build(spec: &Spec<'_>, id: &Identity) -> Desired {
        let mut kvs = BTreeMap::new();
        let mut dirs = Vec::new();
        for role in spec.roles {
            let dir = HostDir {
                prefix: spec.prefix.to_string(),
                dc: spec.dc.to_string(),
                role: role.clone(),
                host: id.host.clone(),
            };
            kvs.insert(dir.key(&Leaf::Owner), id.machine_id.clone());
            if !spec.withdrawn {
                kvs.insert(dir.key(&Leaf::Ip), id.ip.to_string());
                kvs.insert(dir.key(&Leaf::Health), spec.health.to_string());
                for (name, port) in spec.services {
                    kvs.insert(dir.key(&Leaf::Service(name.clone())), port.to_string());
                }
                for (k, v) in spec.meta {
                    kvs.insert(dir.key(&Leaf::Meta(k.clone())), v.clone());
                }
                for (name, json) in spec.checks {
                    kvs.insert(dir.key(&Leaf::Check(name.clone())), json.clone());
                }
                if let Some(reason) = spec.maintenance {
                    kvs.insert(dir.key(&Leaf::Maintenance), reason.to_string());
                }
            }
            dirs.push(dir);
        }
        Desired {
            dirs,
            machine_id: id.machine_id.clone(),
            kvs,
            summary: Summary {
                checks: spec.checks.len(),
                passing: spec.passing,
                withdrawn: spec.withdrawn,
            },
        }
    }

    /// The host name, for messages.
    pub fn host(&self) -> &str {
        self.dirs.first().map(|d| d.host.as_str()).unwrap_or("?")
    }
}

/// Why a registration did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(
        "host {host:?} is registered by another machine (owner {owner:?}, {}); \
         refusing to overwrite it. Give this host another --host, or stop the other one",
        lease.map_or("keys on no lease".to_string(), |l| format!("lease {l}"))
    )]
    Conflict {
        host: String,
        owner: String,
        lease: Option<LeaseId>,
    },
    #[error("the host's keys kept changing during registration; will retry")]
    Contended,
    #[error("the host's keys are no longer on this agent's lease")]
    Mismatch,
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

impl RegisterError {
    pub fn class(&self) -> Class {
        match self {
            RegisterError::Conflict { .. } | RegisterError::Contended | RegisterError::Mismatch => {
                Class::Retry
            }
            RegisterError::Etcd(e) => e.class(),
        }
    }
}

impl Transient for RegisterError {
    /// A conflict is not transient for one-shot commands: they exit 3.
    fn is_transient(&self) -> bool {
        match self {
            RegisterError::Conflict { .. } => false,
            RegisterError::Contended | RegisterError::Mismatch => true,
            RegisterError::Etcd(e) => e.is_transient(),
        }
    }
}

/// One key as read back from etcd.
#[derive(Debug, Clone)]
struct Seen {
    key: String,
    value: String,
    lease: Option<LeaseId>,
    mod_revision: i64,
}

/// One condition of a registration's transaction, as plain data (so the
/// transactions can be checked without etcd).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cond {
    /// The key does not exist (`create_revision == 0`: never existed, or
    /// deleted since; the only state in which a put overwrites no one).
    Absent(String),
    /// The key is exactly as read (`mod_revision` unchanged).
    Unchanged(String, i64),
    /// The key hangs on this lease.
    OnLease(String, LeaseId),
}

/// One operation of a registration's transaction, as plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    /// Put the key with the registration's lease.
    Put(String, String),
    Delete(String),
}

/// The conditional write: each desired key must either not exist or still
/// be exactly as seen; keys seen but no longer desired are deleted under
/// the same condition.
fn write_plan(desired: &Desired, seen: &BTreeMap<String, Seen>) -> (Vec<Cond>, Vec<Op>) {
    let mut conds = Vec::new();
    let mut ops = Vec::new();
    for (key, value) in &desired.kvs {
        conds.push(match seen.get(key) {
            None => Cond::Absent(key.clone()),
            Some(s) => Cond::Unchanged(key.clone(), s.mod_revision),
        });
        ops.push(Op::Put(key.clone(), value.clone()));
    }
    for (key, s) in seen {
        if !desired.kvs.contains_key(key) {
            conds.push(Cond::Unchanged(key.clone(), s.mod_revision));
            ops.push(Op::Delete(key.clone()));
        }
    }
    (conds, ops)
}

/// An update on the same lease (design.md rule 7): it holds while every
/// directory we already own still has its `owner` on our lease; the keys
/// of directories new to this registration (a role added by reload) must
/// not exist yet. Only what changed is written; what is no longer desired
/// is deleted.
fn update_plan(old: &Desired, new: &Desired, lease: LeaseId) -> (Vec<Cond>, Vec<Op>) {
    let old_dirs: BTreeSet<String> = old.dirs.iter().map(HostDir::dir).collect();
    let mut conds = Vec::new();
    for dir in &new.dirs {
        if old_dirs.contains(&dir.dir()) {
            conds.push(Cond::OnLease(dir.key(&Leaf::Owner), lease));
        }
    }
    for dir in &old.dirs {
        if !new.dirs.contains(dir) {
            conds.push(Cond::OnLease(dir.key(&Leaf::Owner), lease));
        }
    }
    let mut ops = Vec::new();
    for (key, value) in &new.kvs {
        let in_old_dir = old_dirs.iter().any(|d| key.starts_with(d.as_str()));
        if !in_old_dir {
            conds.push(Cond::Absent(key.clone()));
        }
        if old.kvs.get(key) != Some(value) {
            ops.push(Op::Put(key.clone(), value.clone()));
        }
    }
    for key in old.kvs.keys() {
        if !new.kvs.contains_key(key) {
            ops.push(Op::Delete(key.clone()));
        }
    }
    (conds, ops)
}

/// A plan as an etcd transaction, its puts on `lease`.
fn txn_of(conds: &[Cond], ops: &[Op], lease: LeaseId) -> Txn {
    let compares: Vec<Compare> = conds
        .iter()
        .map(|c| match c {
            Cond::Absent(k) => Compare::create_revision(k.as_str(), CompareOp::Equal, 0),
            Cond::Unchanged(k, rev) => Compare::mod_revision(k.as_str(), CompareOp::Equal, *rev),
            Cond::OnLease(k, l) => Compare::lease(k.as_str(), CompareOp::Equal, l.get()),
        })
        .collect();
    let ops: Vec<TxnOp> = ops
        .iter()
        .map(|o| match o {
            Op::Put(k, v) => TxnOp::put(
                k.as_str(),
                v.as_str(),
                Some(PutOptions::new().with_lease(lease.get())),
            ),
            Op::Delete(k) => TxnOp::delete(k.as_str(), None),
        })
        .collect();
    Txn::new().when(compares).and_then(ops)
}

/// The conditional write ([`write_plan`]); on failure the host's
/// directories are read back.
fn write_txn(desired: &Desired, lease: LeaseId, seen: &BTreeMap<String, Seen>) -> Txn {
    let (conds, ops) = write_plan(desired, seen);
    txn_of(&conds, &ops, lease).or_else(dir_reads(desired))
}

fn collect_seen(resp: &etcd_client::TxnResponse) -> BTreeMap<String, Seen> {
    let mut seen = BTreeMap::new();
    for op in resp.op_responses() {
        if let TxnOpResponse::Get(get) = op {
            for kv in get.kvs() {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                seen.insert(
                    key.clone(),
                    Seen {
                        key,
                        value: String::from_utf8_lossy(kv.value()).into_owned(),
                        lease: LeaseId::of(kv.lease()),
                        mod_revision: kv.mod_revision(),
                    },
                );
            }
        }
    }
    seen
}

/// Runs one transaction through the fail-over path.
async fn run_txn(
    etcd: &Etcd,
    what: &'static str,
    txn: Txn,
) -> Result<etcd_client::TxnResponse, EtcdError> {
    etcd.call(what, |mut c| {
        let txn = txn.clone();
        async move { c.txn(txn).await }
    })
    .await
}

fn dir_reads(desired: &Desired) -> Vec<TxnOp> {
    desired
        .dirs
        .iter()
        .map(|d| TxnOp::get(d.dir(), Some(GetOptions::new().with_prefix())))
        .collect()
}

/// Every key in the host's directories, read at one revision, and that
/// revision (if etcd said).
async fn read_dirs(
    etcd: &Etcd,
    desired: &Desired,
    what: &'static str,
) -> Result<(BTreeMap<String, Seen>, Option<Revision>), EtcdError> {
    let resp = run_txn(etcd, what, Txn::new().and_then(dir_reads(desired))).await?;
    let revision = Revision::of_header(resp.header());
    Ok((collect_seen(&resp), revision))
}

/// The owner recorded next to the keys of one lease.
fn owner_of(seen: &BTreeMap<String, Seen>, lease: Option<LeaseId>) -> Option<String> {
    seen.values()
        .find(|s| s.lease == lease && s.key.ends_with("/owner"))
        .map(|s| s.value.clone())
}

/// Writes every desired key with `lease` in one transaction.
///
/// Existing keys are judged before anything is written:
/// - attached to `lease` itself (a repair after someone deleted keys): ours;
/// - attached to another live lease whose owner is this machine id (our own
///   earlier incarnation): that lease is revoked, then we write;
/// - attached to another live lease of another owner: [`RegisterError::Conflict`];
/// - attached to no lease (left by hand): taken over if their owner is us or
///   absent, a conflict otherwise.
///
/// Returns the revision of the write. Every key appears at that one revision.
pub async fn write(
    etcd: &Etcd,
    desired: &Desired,
    lease: LeaseId,
) -> Result<Option<Revision>, RegisterError> {
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    // Leases of this machine's earlier incarnation whose keys the write
    // moves to `lease`; revoked once they hold nothing.
    let mut taken_over: BTreeSet<LeaseId> = BTreeSet::new();
    for _attempt in 0..8 {
        let resp = run_txn(etcd, "register", write_txn(desired, lease, &seen)).await?;
        if resp.succeeded() {
            for old in &taken_over {
                // The keys moved in the transaction; what the old lease may
                // still hold (a role no longer configured) goes with it.
                if let Err(e) = revoke(etcd, *old).await {
                    tracing::warn!(old_lease = %old, error = %e, "could not revoke this machine's earlier lease; its leftover keys expire with it");
                }
            }
            return Ok(Revision::of_header(resp.header()));
        }
        seen = collect_seen(&resp);
        let leases: BTreeSet<LeaseId> = seen
            .values()
            .filter_map(|s| s.lease)
            .filter(|l| *l != lease)
            .collect();
        for other in leases {
            let owner = owner_of(&seen, Some(other));
            if owner.as_deref() == Some(desired.machine_id.as_str()) {
                // Our own earlier incarnation: its keys are overwritten in
                // the next transaction (compared by mod_revision, put with
                // our lease), so consumers see one change, never a gap.
                if taken_over.insert(other) {
                    tracing::info!(
                        host = desired.host(),
                        old_lease = %other,
                        "taking over this machine's earlier registration"
                    );
                }
                continue;
            }
            if time_to_live(etcd, other).await?.is_some() {
                return Err(RegisterError::Conflict {
                    host: desired.host().to_string(),
                    owner: owner.unwrap_or_else(|| "(no owner key)".into()),
                    lease: Some(other),
                });
            }
            // Expired: its keys are gone, so forget them.
            seen.retain(|_, s| s.lease != Some(other));
        }
        if let Some(owner) = seen
            .values()
            .find(|s| s.lease.is_none() && s.key.ends_with("/owner"))
            .filter(|s| s.value != desired.machine_id)
        {
            return Err(RegisterError::Conflict {
                host: desired.host().to_string(),
                owner: owner.value.clone(),
                lease: None,
            });
        }
    }
    Err(RegisterError::Contended)
}

/// Applies a change of what the host reports, in one transaction that
/// holds only while every directory we already own still has its `owner`
/// key on our lease (design.md rule 7: updates compare `lease == own lease`).
/// Keys of directories new to this registration (a role added by reload)
/// must not exist yet. Returns the revision of the write, or
/// [`RegisterError::Mismatch`] when the registry no longer looks like ours.
pub async fn update(
    etcd: &Etcd,
    old: &Desired,
    new: &Desired,
    lease: LeaseId,
) -> Result<Option<Revision>, RegisterError> {
    let (conds, ops) = update_plan(old, new, lease);
    let resp = run_txn(etcd, "update", txn_of(&conds, &ops, lease)).await?;
    if resp.succeeded() {
        Ok(Revision::of_header(resp.header()))
    } else {
        Err(RegisterError::Mismatch)
    }
}

/// The value of `health` in a graceful stop (design.md rule 4).
pub const LEAVING: &str = "leaving";

/// Announces a graceful stop: `health` becomes `leaving` on every role of
/// `desired` that has a `health` key, in one transaction that holds only
/// while each of those directories' `owner` is still on `lease`. Consumers
/// then know that the revoke which follows is planned, and apply it at
/// once instead of holding the host (design.md section 8). Returns whether
/// it was written.
pub async fn announce_leaving(
    etcd: &Etcd,
    desired: &Desired,
    lease: LeaseId,
) -> Result<bool, RegisterError> {
    let dirs: Vec<&HostDir> = desired
        .dirs
        .iter()
        .filter(|d| desired.kvs.contains_key(&d.key(&Leaf::Health)))
        .collect();
    if dirs.is_empty() {
        return Ok(false);
    }
    let compares: Vec<Compare> = dirs
        .iter()
        .map(|d| Compare::lease(d.key(&Leaf::Owner), CompareOp::Equal, lease.get()))
        .collect();
    let ops: Vec<TxnOp> = dirs
        .iter()
        .map(|d| {
            TxnOp::put(
                d.key(&Leaf::Health),
                LEAVING,
                Some(PutOptions::new().with_lease(lease.get())),
            )
        })
        .collect();
    let resp = run_txn(
        etcd,
        "announce leaving",
        Txn::new().when(compares).and_then(ops),
    )
    .await?;
    Ok(resp.succeeded())
}

/// Outcome of a deregistration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deregistered {
    Removed,
    NothingRegistered,
}

/// Removes this host's registration: revokes every lease of ours found in
/// its directories and deletes keys left without a lease. Refuses to touch a
/// live registration of another machine.
pub async fn deregister(etcd: &Etcd, desired: &Desired) -> Result<Deregistered, RegisterError> {
    let (seen, _) = read_dirs(etcd, desired, "read registration").await?;
    if seen.is_empty() {
        return Ok(Deregistered::NothingRegistered);
    }
    let leases: BTreeSet<Option<LeaseId>> = seen.values().map(|s| s.lease).collect();
    for lease in &leases {
        let owner = owner_of(&seen, *lease);
        if owner.as_deref() == Some(desired.machine_id.as_str()) {
            continue;
        }
        // Not ours: a live lease (with or without an owner key) belongs to
        // someone else; loose keys are only ours to delete without an owner.
        let foreign = match lease {
            None => owner.is_some(),
            Some(id) => time_to_live(etcd, *id).await?.is_some(),
        };
        if foreign {
            return Err(RegisterError::Conflict {
                host: desired.host().to_string(),
                owner: owner.unwrap_or_else(|| "(no owner key)".into()),
                lease: *lease,
            });
        }
    }
    for lease in leases.iter().flatten() {
        // Say it is planned: each `health` key on this lease, unchanged
        // since the read, becomes `leaving` (rule 4); then the revoke.
        let healths: Vec<&Seen> = seen
            .values()
            .filter(|s| s.lease == Some(*lease) && s.key.ends_with("/health"))
            .collect();
        if !healths.is_empty() {
            let compares: Vec<Compare> = healths
                .iter()
                .map(|s| Compare::mod_revision(s.key.as_str(), CompareOp::Equal, s.mod_revision))
                .collect();
            let ops: Vec<TxnOp> = healths
                .iter()
                .map(|s| {
                    TxnOp::put(
                        s.key.as_str(),
                        LEAVING,
                        Some(PutOptions::new().with_lease(lease.get())),
                    )
                })
                .collect();
            run_txn(
                etcd,
                "announce leaving",
                Txn::new().when(compares).and_then(ops),
            )
            .await?;
        }
        revoke(etcd, *lease).await?;
    }
    let loose: Vec<&Seen> = seen.values().filter(|s| s.lease.is_none()).collect();
    if !loose.is_empty() {
        let compares: Vec<Compare> = loose
            .iter()
            .map(|s| Compare::mod_revision(s.key.as_str(), CompareOp::Equal, s.mod_revision))
            .collect();
        let deletes: Vec<TxnOp> = loose
            .iter()
            .map(|s| TxnOp::delete(s.key.as_str(), None))
            .collect();
        let resp = run_txn(
            etcd,
            "delete leftover keys",
            Txn::new().when(compares).and_then(deletes),
        )
        .await?;
        if !resp.succeeded() {
            return Err(RegisterError::Contended);
        }
    }
    Ok(Deregistered::Removed)
}

/// What [`verify`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// Every desired key is there with its value and our lease, as read at
    /// `at`: a watch started after it misses nothing.
    Intact { at: Option<Revision> },
    /// A key is missing, has another value, or is on another lease.
    Changed,
}

/// Whether every desired key is in etcd with its value and `lease`. A read
/// only: a read-only transaction is no raft proposal.
pub async fn verify(etcd: &Etcd, desired: &Desired, lease: LeaseId) -> Result<Verified, EtcdError> {
    let (seen, at) = read_dirs(etcd, desired, "verify registration").await?;
    let intact = desired.kvs.iter().all(|(k, v)| {
        seen.get(k)
            .is_some_and(|s| s.lease == Some(lease) && &s.value == v)
    });
    Ok(if intact {
        Verified::Intact { at }
    } else {
        Verified::Changed
    })
}

/// A Desired for host h1 (10.0.0.5) of dc1, for unit tests.
#[cfg(test)]
pub(crate) fn desired_for_tests(roles: &[&str], health: &str, meta: &[(&str, &str)]) -> Desired {
    let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
    let services = BTreeMap::from([("http".to_string(), 8080u16)]);
    let meta: BTreeMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let checks = BTreeMap::new();
    Desired::build(
        &Spec {
            prefix: "/infrastructure",
            dc: "dc1",
            roles: &roles,
            services: &services,
            meta: &meta,
            health,
            checks: &checks,
            passing: 0,
            maintenance: None,
            withdrawn: false,
        },
        &Identity {
            host: "h1".into(),
            ip: "10.0.0.5".parse().unwrap(),
            machine_id: "m1".into(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(roles: &[&str], health: &str, meta: &[(&str, &str)]) -> Desired {
        desired_for_tests(roles, health, meta)
    }

    fn seen(key: &str, value: &str, rev: i64) -> (String, Seen) {
        (
            key.to_string(),
            Seen {
                key: key.to_string(),
                value: value.to_string(),
                lease: None,
                mod_revision: rev,
            },
        )
    }

    const W: &str = "/infrastructure/dc1/web/h1";

    #[test]
    fn a_first_write_puts_every_key_only_where_none_exists() {
        let d = desired(&["web"], "passing", &[]);
        let (conds, ops) = write_plan(&d, &BTreeMap::new());
        let keys: Vec<&String> = d.kvs.keys().collect();
        assert_eq!(keys.len(), 4, "{keys:?}");
        assert_eq!(
            conds,
            keys.iter()
                .map(|k| Cond::Absent(k.to_string()))
                .collect::<Vec<_>>()
        );
        assert!(ops.iter().all(|o| matches!(o, Op::Put(..))));
        assert!(ops.contains(&Op::Put(format!("{W}/owner"), "m1".into())));
        assert!(ops.contains(&Op::Put(format!("{W}/ip"), "10.0.0.5".into())));
    }

    #[test]
    fn a_takeover_writes_over_exactly_what_it_read_and_deletes_leftovers() {
        let d = desired(&["web"], "passing", &[]);
        // Our earlier incarnation's keys, one of them no longer desired.
        let read: BTreeMap<String, Seen> = [
            seen(&format!("{W}/owner"), "m1", 5),
            seen(&format!("{W}/ip"), "10.0.0.4", 5),
            seen(&format!("{W}/meta/old"), "x", 6),
        ]
        .into();
        let (conds, ops) = write_plan(&d, &read);
        assert!(conds.contains(&Cond::Unchanged(format!("{W}/owner"), 5)));
        assert!(conds.contains(&Cond::Unchanged(format!("{W}/ip"), 5)));
        assert!(conds.contains(&Cond::Absent(format!("{W}/health"))));
        assert!(conds.contains(&Cond::Unchanged(format!("{W}/meta/old"), 6)));
        assert!(ops.contains(&Op::Delete(format!("{W}/meta/old"))));
        assert!(ops.contains(&Op::Put(format!("{W}/ip"), "10.0.0.5".into())));
        // No put without a condition on its key.
        for op in &ops {
            let Op::Put(k, _) = op else { continue };
            assert!(
                conds
                    .iter()
                    .any(|c| matches!(c, Cond::Absent(x) | Cond::Unchanged(x, _) if x == k)),
                "{k} is put unconditionally"
            );
        }
    }

    #[test]
    fn an_update_writes_only_what_changed_on_the_lease_it_holds() {
        let lease = LeaseId::of(7).unwrap();
        let old = desired(&["web"], "passing", &[("rack", "r1")]);
        // Health changed, meta removed, a role added.
        let new = desired(&["web", "db"], "critical", &[]);
        let (conds, ops) = update_plan(&old, &new, lease);
        // Guarded by our lease on the directory we own...
        assert!(conds.contains(&Cond::OnLease(format!("{W}/owner"), lease)));
        // ...and the new role's keys must not exist yet.
        let db = "/infrastructure/dc1/db/h1";
        assert!(conds.contains(&Cond::Absent(format!("{db}/owner"))));
        assert!(!conds.contains(&Cond::OnLease(format!("{db}/owner"), lease)));
        assert!(ops.contains(&Op::Put(format!("{W}/health"), "critical".into())));
        assert!(ops.contains(&Op::Delete(format!("{W}/meta/rack"))));
        assert!(ops.contains(&Op::Put(format!("{db}/owner"), "m1".into())));
        // Unchanged keys are not written again (no steady-state writes).
        assert!(
            !ops.iter()
                .any(|o| matches!(o, Op::Put(k, _) if k == &format!("{W}/ip")))
        );
        // Nothing changed: nothing to write.
        let (_, none) = update_plan(&old, &old, lease);
        assert!(none.is_empty(), "{none:?}");
    }
}
