//! The registry as consumers see it: keys parsed back into hosts.
//!
//! Used by `ls`, `watch`, `wait` and `render`; [`follow`] keeps it in step
//! with etcd through one watch. A host is *present* only when it has
//! both `ip` and `health` (a registration is one transaction, so this is
//! never a half-written host; a host withdrawn by `deregister_after` keeps
//! only `owner` and is not present). Keys or values that do not follow the
//! layout are reported and skipped, never a panic.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Serialize;

pub mod follow;
pub mod hold;

use crate::check::Status;
use crate::etcd::Revision;
use crate::layout::{HostDir, Leaf, parse_key};
use crate::lease::LeaseId;

/// Identifies a host entry: one host in one role.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct HostId {
    pub dc: String,
    pub role: String,
    pub host: String,
}

impl std::fmt::Display for HostId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.dc, self.role, self.host)
    }
}

/// A host's `health` as read back: a check status, or `leaving`, which a
/// host announces in a graceful stop just before its lease is revoked
/// (design.md rule 4), so that consumers apply its removal at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Passing,
    Warning,
    Critical,
    Leaving,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
            Health::Leaving => "leaving",
        }
    }

    pub fn parse(s: &str) -> Option<Health> {
        match s {
            "leaving" => Some(Health::Leaving),
            _ => Status::parse(s).map(Health::from),
        }
    }
}

impl From<Status> for Health {
    fn from(s: Status) -> Health {
        match s {
            Status::Passing => Health::Passing,
            Status::Warning => Health::Warning,
            Status::Critical => Health::Critical,
        }
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The value of `checks/<name>` (design.md section 1): one check's result,
/// as the agent writes it ([`CheckView::to_json`]) and every consumer reads
/// it back ([`CheckView::from_json`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckView {
    pub status: Status,
    pub output: String,
    /// When the status last changed (RFC 3339, seconds).
    pub since: String,
}

impl CheckView {
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "status": self.status,
            "output": self.output,
            "since": self.since,
        })
        .to_string()
    }

    /// Reads a value back; the message says what is wrong with it.
    pub fn from_json(value: &str) -> Result<CheckView, String> {
        #[derive(serde::Deserialize)]
        struct Wire {
            status: String,
            #[serde(default)]
            output: String,
            #[serde(default)]
            since: String,
        }
        let wire: Wire =
            serde_json::from_str(value).map_err(|e| format!("check value is not JSON: {e}"))?;
        let status = Status::parse(&wire.status)
            .ok_or_else(|| format!("check status {:?} is unknown", wire.status))?;
        Ok(CheckView {
            status,
            output: wire.output,
            since: wire.since,
        })
    }
}

/// An id or a revision in JSON as etcd writes it, `0` for none: the
/// `ls -o json` document keeps its numbers.
pub(crate) fn wire_or_zero<T: Serialize, S: serde::Serializer>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => v.serialize(s),
        None => s.serialize_i64(0),
    }
}

/// Everything known about one host entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HostView {
    pub ip: Option<IpAddr>,
    pub health: Option<Health>,
    pub checks: BTreeMap<String, CheckView>,
    pub services: BTreeMap<String, u16>,
    pub meta: BTreeMap<String, String>,
    pub maintenance: Option<String>,
    pub owner: Option<String>,
    /// The lease of the host's keys (`0` in JSON when none).
    #[serde(serialize_with = "wire_or_zero")]
    pub lease: Option<LeaseId>,
    /// The highest mod revision among the host's keys (`None` only for a
    /// view built by hand).
    #[serde(serialize_with = "wire_or_zero")]
    pub revision: Option<Revision>,
}

impl HostView {
    /// Registered and complete: consumers may use it.
    pub fn present(&self) -> bool {
        self.ip.is_some() && self.health.is_some()
    }

    /// Passing and not in maintenance (so never `leaving`).
    pub fn healthy(&self) -> bool {
        self.present() && self.health == Some(Health::Passing) && self.maintenance.is_none()
    }

    /// It announced a graceful stop: its removal is planned.
    pub fn leaving(&self) -> bool {
        self.health == Some(Health::Leaving)
    }

    /// The keys and values of this host, as the agent writes them: what a
    /// consumer that shows a host held by fail static gives confd-style
    /// template functions.
    pub fn raw(&self, prefix: &str, id: &HostId) -> Vec<(String, String)> {
        let dir = format!("{prefix}/{}/{}/{}/", id.dc, id.role, id.host);
        let mut out = Vec::new();
        let mut put = |leaf: String, value: String| out.push((format!("{dir}{leaf}"), value));
        if let Some(ip) = self.ip {
            put("ip".into(), ip.to_string());
        }
        if let Some(h) = self.health {
            put("health".into(), h.to_string());
        }
        if let Some(o) = &self.owner {
            put("owner".into(), o.clone());
        }
        if let Some(m) = &self.maintenance {
            put("maintenance".into(), m.clone());
        }
        for (name, port) in &self.services {
            put(format!("services/{name}"), port.to_string());
        }
        for (k, v) in &self.meta {
            put(format!("meta/{k}"), v.clone());
        }
        for (name, c) in &self.checks {
            let json =
                serde_json::json!({"status": c.status, "output": c.output, "since": c.since});
            put(format!("checks/{name}"), json.to_string());
        }
        out
    }

    /// "2/3 passing" style summary of the checks.
    pub fn checks_summary(&self) -> String {
        if self.checks.is_empty() {
            return "-".into();
        }
        let passing = self
            .checks
            .values()
            .filter(|c| c.status == Status::Passing)
            .count();
        format!("{passing}/{} passing", self.checks.len())
    }
}

impl HostView {
    /// Sets the field of `leaf` from its value, or says why it cannot.
    fn set(&mut self, leaf: &Leaf, value: &str) -> Result<(), String> {
        match leaf {
            Leaf::Ip => {
                self.ip = Some(
                    value
                        .trim()
                        .parse()
                        .map_err(|_| format!("ip {value:?} is not an address"))?,
                )
            }
            Leaf::Health => {
                self.health = Some(Health::parse(value.trim()).ok_or_else(|| {
                    format!("health {value:?} is not passing|warning|critical|leaving")
                })?)
            }
            Leaf::Owner => self.owner = Some(value.to_string()),
            Leaf::Maintenance => self.maintenance = Some(value.to_string()),
            Leaf::Service(name) => {
                let text = value.trim();
                let port = text.parse().map_err(|_| {
                    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
                        format!("port {value:?} is out of range; a port is 1 to 65535")
                    } else {
                        format!("port {value:?} is not a number")
                    }
                })?;
                self.services.insert(name.clone(), port);
            }
            Leaf::Meta(name) => {
                self.meta.insert(name.clone(), value.to_string());
            }
            Leaf::Check(name) => {
                self.checks
                    .insert(name.clone(), CheckView::from_json(value)?);
            }
        }
        Ok(())
    }

    /// Clears the field of `leaf`.
    fn clear(&mut self, leaf: &Leaf) {
        match leaf {
            Leaf::Ip => self.ip = None,
            Leaf::Health => self.health = None,
            Leaf::Owner => self.owner = None,
            Leaf::Maintenance => self.maintenance = None,
            Leaf::Service(n) => {
                self.services.remove(n);
            }
            Leaf::Meta(n) => {
                self.meta.remove(n);
            }
            Leaf::Check(n) => {
                self.checks.remove(n);
            }
        }
    }
}

/// Why `key` has a segment below `prefix` that breaks the layout's rules
/// (design.md section 1), if it has one.
fn bad_segment(prefix: &str, key: &str) -> Option<String> {
    let Some(rest) = key.strip_prefix(prefix).and_then(|r| r.strip_prefix('/')) else {
        return Some(format!("is not under the prefix {prefix}"));
    };
    rest.split('/').find_map(|seg| {
        crate::layout::validate_segment(seg)
            .err()
            .map(|e| format!("segment {seg:?} {e}"))
    })
}

/// A key or value that does not follow the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    pub key: String,
    pub why: String,
}

/// Hosts by id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    pub hosts: BTreeMap<HostId, HostView>,
    /// Every key under the prefix with its value (lossy UTF-8): what
    /// confd-style template functions read. Keys outside the layout and
    /// malformed values are included; keys with a malformed segment are not.
    /// Empty in a [`Registry::hosts_only`] one.
    pub raw: BTreeMap<String, String>,
    /// `raw` is not kept: for a consumer that reads hosts alone (dns), to
    /// whom it would be a third of its memory.
    pub hosts_only: bool,
}

fn id_of(dir: &HostDir) -> HostId {
    HostId {
        dc: dir.dc.clone(),
        role: dir.role.clone(),
        host: dir.host.clone(),
    }
}

impl Registry {
    /// An empty registry that keeps hosts and not `raw`.
    pub fn hosts_only() -> Registry {
        Registry {
            hosts_only: true,
            ..Registry::default()
        }
    }

    /// Applies a put of `key` = `value`, on `lease` at `revision` as etcd
    /// reports them (0: none). Returns the host it touched, or why the key
    /// or value was skipped.
    ///
    /// A key with a segment that breaks the layout's rules (a newline, a
    /// space, an empty segment) is left out of `raw` too, so it never
    /// reaches a template. A value that does not parse clears the field it
    /// would have set: a host whose `ip` was overwritten with garbage is no
    /// longer present, exactly as a fresh read of the same keys finds it.
    pub fn put(
        &mut self,
        prefix: &str,
        key: &[u8],
        value: &[u8],
        lease: i64,
        revision: i64,
    ) -> Result<HostId, Malformed> {
        let key_text = String::from_utf8_lossy(key).into_owned();
        let bad = |why: String| Malformed {
            key: key_text.clone(),
            why,
        };
        if let Some(why) = bad_segment(prefix, &key_text) {
            return Err(bad(why));
        }
        if !self.hosts_only {
            self.raw.insert(
                key_text.clone(),
                String::from_utf8_lossy(value).into_owned(),
            );
        }
        let (dir, leaf) =
            parse_key(prefix, &key_text).ok_or_else(|| bad("not a registry key".into()))?;
        let id = id_of(&dir);
        let host = self.hosts.entry(id.clone()).or_default();
        host.lease = LeaseId::of(lease);
        host.revision = host.revision.max(Revision::of(revision));
        let applied = match std::str::from_utf8(value) {
            Ok(value) => host.set(&leaf, value),
            Err(_) => Err("value is not UTF-8".into()),
        };
        match applied {
            Ok(()) => Ok(id),
            Err(why) => {
                host.clear(&leaf);
                Err(bad(why))
            }
        }
    }

    /// Applies a delete of `key`. Returns the host it touched, if any.
    pub fn delete(&mut self, prefix: &str, key: &[u8], revision: i64) -> Option<HostId> {
        let key_text = String::from_utf8_lossy(key);
        self.raw.remove(key_text.as_ref());
        let (dir, leaf) = parse_key(prefix, &key_text)?;
        let id = id_of(&dir);
        let host = self.hosts.get_mut(&id)?;
        host.clear(&leaf);
        host.revision = host.revision.max(Revision::of(revision));
        if *host
            == (HostView {
                revision: host.revision,
                lease: host.lease,
                ..HostView::default()
            })
        {
            self.hosts.remove(&id);
        }
        Some(id)
    }

    /// Builds the registry from a range read; malformed keys are returned
    /// for reporting.
    pub fn from_kvs(prefix: &str, kvs: &[etcd_client::KeyValue]) -> (Registry, Vec<Malformed>) {
        let mut r = Registry::default();
        let bad = r.fill(prefix, kvs);
        (r, bad)
    }

    /// Applies a range read to this (empty) registry; malformed keys are
    /// returned for reporting.
    pub fn fill(&mut self, prefix: &str, kvs: &[etcd_client::KeyValue]) -> Vec<Malformed> {
        let mut bad = Vec::new();
        for kv in kvs {
            if let Err(m) = self.put(prefix, kv.key(), kv.value(), kv.lease(), kv.mod_revision()) {
                bad.push(m);
            }
        }
        bad
    }

    /// The hosts consumers may use.
    pub fn present(&self) -> impl Iterator<Item = (&HostId, &HostView)> {
        self.hosts.iter().filter(|(_, h)| h.present())
    }
}

/// What a consumer reads hosts from: the registry, or the registry with
/// the hosts fail static holds put back ([`Shown`]).
pub trait Hosts {
    /// A host's state.
    fn host(&self, id: &HostId) -> Option<&HostView>;
    /// The ids of one role of one DC, in order.
    fn in_role<'a>(
        &'a self,
        dc: &'a str,
        role: &'a str,
    ) -> Box<dyn Iterator<Item = &'a HostId> + 'a>;
    /// Every id.
    fn ids(&self) -> Vec<&HostId>;
}

/// The first id of a role in the order of [`HostId`].
fn role_start(dc: &str, role: &str) -> HostId {
    HostId {
        dc: dc.to_string(),
        role: role.to_string(),
        host: String::new(),
    }
}

impl Hosts for Registry {
    fn host(&self, id: &HostId) -> Option<&HostView> {
        self.hosts.get(id)
    }
    fn in_role<'a>(
        &'a self,
        dc: &'a str,
        role: &'a str,
    ) -> Box<dyn Iterator<Item = &'a HostId> + 'a> {
        Box::new(
            self.hosts
                .range(role_start(dc, role)..)
                .map(|(id, _)| id)
                .take_while(move |id| id.dc == dc && id.role == role),
        )
    }
    fn ids(&self) -> Vec<&HostId> {
        self.hosts.keys().collect()
    }
}

/// The live registry with the hosts that fail static holds put back, as
/// they were last seen (see [`hold`]). A host present in the registry is
/// shown as it is there.
pub struct Shown<'a> {
    pub live: &'a Registry,
    pub held: &'a BTreeMap<HostId, hold::Held>,
}

impl Shown<'_> {
    fn live_present(&self, id: &HostId) -> bool {
        self.live.hosts.get(id).is_some_and(HostView::present)
    }
}

impl Hosts for Shown<'_> {
    fn host(&self, id: &HostId) -> Option<&HostView> {
        match self.live.hosts.get(id) {
            Some(h) if h.present() => Some(h),
            live => self.held.get(id).map(|h| &h.view).or(live),
        }
    }
    fn in_role<'a>(
        &'a self,
        dc: &'a str,
        role: &'a str,
    ) -> Box<dyn Iterator<Item = &'a HostId> + 'a> {
        let held = self
            .held
            .range(role_start(dc, role)..)
            .map(|(id, _)| id)
            .take_while(move |id| id.dc == dc && id.role == role)
            .filter(move |id| !self.live.hosts.contains_key(*id));
        Box::new(self.live.in_role(dc, role).chain(held))
    }
    fn ids(&self) -> Vec<&HostId> {
        let mut ids = self.live.ids();
        ids.extend(
            self.held
                .keys()
                .filter(|id| !self.live.hosts.contains_key(*id)),
        );
        ids
    }
}

impl Shown<'_> {
    /// The registry as shown: the live one with the held hosts (and their
    /// keys, for confd-style template functions) put back.
    pub fn to_registry(&self, prefix: &str) -> Registry {
        let mut r = self.live.clone();
        for (id, held) in self.held {
            if self.live_present(id) {
                continue;
            }
            r.hosts.insert(id.clone(), held.view.clone());
            r.raw.extend(held.view.raw(prefix, id));
        }
        r
    }
}

/// A change of one host between two states, as `watch` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Up,
    Down,
    Health { from: Health, to: Health },
    MaintenanceOn(String),
    MaintenanceOff,
    Changed,
}

/// What happened to a host between `before` and `after` (`None` = absent).
pub fn diff(before: Option<&HostView>, after: Option<&HostView>) -> Vec<Change> {
    let before = before.filter(|h| h.present());
    let after = after.filter(|h| h.present());
    match (before, after) {
        (None, None) => vec![],
        (None, Some(_)) => vec![Change::Up],
        (Some(_), None) => vec![Change::Down],
        (Some(b), Some(a)) => {
            let mut out = Vec::new();
            if let (Some(from), Some(to)) = (b.health, a.health)
                && from != to
            {
                out.push(Change::Health { from, to });
            }
            match (&b.maintenance, &a.maintenance) {
                (None, Some(r)) => out.push(Change::MaintenanceOn(r.clone())),
                (Some(_), None) => out.push(Change::MaintenanceOff),
                _ => {}
            }
            let strip = |h: &HostView| HostView {
                health: None,
                maintenance: None,
                revision: None,
                checks: h
                    .checks
                    .iter()
                    .map(|(n, c)| {
                        (
                            n.clone(),
                            CheckView {
                                output: String::new(),
                                since: String::new(),
                                ..c.clone()
                            },
                        )
                    })
                    .collect(),
                ..h.clone()
            };
            if out.is_empty() && strip(a) != strip(b) {
                out.push(Change::Changed);
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/infrastructure";

    fn put(r: &mut Registry, leaf: &str, v: &str) -> Result<HostId, Malformed> {
        r.put(
            P,
            format!("{P}/dc1/web/h1/{leaf}").as_bytes(),
            v.as_bytes(),
            7,
            1,
        )
    }

    #[test]
    fn a_host_is_present_only_with_ip_and_health() {
        let mut r = Registry::default();
        put(&mut r, "owner", "m1").unwrap();
        assert_eq!(r.present().count(), 0);
        put(&mut r, "ip", "10.0.0.5").unwrap();
        assert_eq!(r.present().count(), 0);
        put(&mut r, "health", "passing").unwrap();
        put(
            &mut r,
            "checks/disk",
            r#"{"status":"warning","output":"85%","since":"x"}"#,
        )
        .unwrap();
        put(&mut r, "services/http", "8080").unwrap();
        let (_, h) = r.present().next().unwrap();
        assert!(h.healthy());
        assert_eq!(h.checks_summary(), "0/1 passing");
        assert_eq!(h.services["http"], 8080);
        put(&mut r, "maintenance", "upgrade").unwrap();
        assert!(!r.present().next().unwrap().1.healthy());
    }

    #[test]
    fn malformed_keys_and_values_are_reported_not_fatal() {
        let mut r = Registry::default();
        for (leaf, v) in [
            ("ip", "not-an-ip"),
            ("health", "great"),
            ("services/http", "eighty"),
            ("checks/x", "{"),
            ("checks/y", r#"{"status":"meh"}"#),
            ("unknown", "x"),
        ] {
            assert!(put(&mut r, leaf, v).is_err(), "{leaf}={v} accepted");
        }
        let e = r
            .put(P, b"/infrastructure/dc1/web/h1/ip", b"\xff\xfe", 0, 1)
            .unwrap_err();
        assert!(e.why.contains("UTF-8"));
        // A port that is a number, only too big, is told apart.
        let e = put(&mut r, "services/http", "70000").unwrap_err();
        assert!(
            e.why.contains("out of range; a port is 1 to 65535"),
            "{}",
            e.why
        );
        let e = put(&mut r, "services/http", "eighty").unwrap_err();
        assert!(e.why.contains("is not a number"), "{}", e.why);
        assert_eq!(r.present().count(), 0);
    }

    #[test]
    fn diff_names_host_events() {
        let mut a = HostView {
            ip: Some("10.0.0.5".parse().unwrap()),
            health: Some(Health::Passing),
            ..HostView::default()
        };
        assert_eq!(diff(None, Some(&a)), vec![Change::Up]);
        assert_eq!(diff(Some(&a), None), vec![Change::Down]);
        let mut b = a.clone();
        b.health = Some(Health::Critical);
        assert_eq!(
            diff(Some(&a), Some(&b)),
            vec![Change::Health {
                from: Health::Passing,
                to: Health::Critical
            }]
        );
        b = a.clone();
        b.maintenance = Some("x".into());
        assert_eq!(
            diff(Some(&a), Some(&b)),
            vec![Change::MaintenanceOn("x".into())]
        );
        b = a.clone();
        b.services.insert("http".into(), 80);
        assert_eq!(diff(Some(&a), Some(&b)), vec![Change::Changed]);
        a.revision = Revision::of(9);
        assert_eq!(diff(Some(&a), Some(&a.clone())), vec![]);
    }
}
