//! The answers `registrar dns` serves (design.md section 7), kept in step
//! with the registry mirror. Pure: no I/O, and a lookup is one hash lookup,
//! so a question costs no etcd request.
//!
//! Names under the domain:
//! - `<host>.<role>.<dc>` → the host's address, whatever its health;
//! - `<role>.<dc>` → the addresses of the role's usable hosts, shuffled;
//! - `_<service>._tcp.<role>.<dc>` → SRV, one per usable host publishing
//!   the service, with the targets' addresses as additional records,
//!   withheld until `srv_min` hosts publish it;
//! - every name above them (`<dc>`, `_tcp.<role>.<dc>`, the parents of a
//!   dotted host name) exists without records: NODATA, so a resolver
//!   caches no NXDOMAIN for a whole subtree (RFC 8020);
//! - zone transfers (AXFR, IXFR) are refused.
//!
//! A host has no name of its own (and so no SRV record; it is still in its
//! role's answers, and the log says why, once) when its name is not a DNS
//! name, has a label starting with `_` (that is where SRV names live), or
//! differs only in case from another host's in the role: names are
//! case-insensitive (RFC 4343), so the first in the registry's order keeps
//! the name and the other is reported, never merged into one answer.
//! Roles and DCs are names too: two spellings of `<role>.<dc>` that differ
//! only in case (`web.dc1` and `Web.DC1`) are one name, so the first
//! spelling in the registry's order keeps it and the other is served under
//! no name at all (its hosts included), said once.
//!
//! A change costs the hosts it touched (and their case siblings) and their
//! roles, not the registry: each host's records are built once and kept; a
//! role's names are put together again from them. Every name records who
//! put its records there (a host, or a role), so a name two entries happen
//! to share holds both and each loses only its own part.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use hickory_server::proto::op::Query;
use hickory_server::proto::rr::rdata::{A, AAAA, NS, SOA, SRV};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::proto::serialize::binary::{
    BinDecodable, BinDecoder, BinEncodable, BinEncoder,
};
use rand::seq::SliceRandom;

use crate::etcd::Revision;
use crate::registry::Health;
#[cfg(test)]
use crate::registry::Registry;
use crate::registry::{HostId, HostView, Hosts};

/// What shapes the answers, apart from the registry.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The zone's apex, e.g. `registry.internal.`.
    pub domain: Name,
    /// TTL of every answer and of negative caching (the SOA's minimum).
    pub ttl: u32,
    /// Role and SRV answers include hosts whose health is `warning`.
    pub allow_warning: bool,
    /// `<role>.<dc>` (lower case) → usable hosts needed before that role's
    /// SRV records are served.
    pub srv_min: BTreeMap<String, usize>,
    /// The name server the apex's NS and the SOA name.
    pub ns: Name,
    /// Its addresses, answered at `ns` when it is under the domain.
    pub ns_addrs: Vec<IpAddr>,
}

/// A role of a DC, as the registry spells it.
type RoleKey = (String, String);

/// The DNS name `<role>.<dc>` of a role, the same for every spelling that
/// differs only in case.
fn role_name_key((dc, role): &RoleKey) -> String {
    format!("{role}.{dc}").to_ascii_lowercase()
}

/// A role has a host the zone can answer (present, with an address).
fn has_addressed_host(registry: &dyn Hosts, (dc, role): &RoleKey) -> bool {
    registry.in_role(dc, role).any(|id| {
        registry
            .host(id)
            .is_some_and(|h| h.present() && h.ip.is_some())
    })
}

/// Who put records at a name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owner {
    Apex,
    /// A host entry, by the number [`Zone::refresh_host`] gave it (two
    /// hosts can share a name: host `a` of role `b.c` and host `a.b` of
    /// role `c`).
    Host(u64),
    Role(RoleKey),
}

/// A record in wire form, encoded after a question for its name (at
/// offset 12, where every answer has its question): any compression
/// pointer in it points into that question, so these bytes are right in any
/// answer to that name, in any order. The server puts answers together from
/// them without encoding anything. They are the only form the zone keeps
/// its records in: a hickory `Record` is 272 bytes before its names, a
/// host's address here 16; [`Zone::lookup`] reads records back from them
/// for the answers it encodes.
pub type Chunk = Arc<[u8]>;

/// 12 bytes where a header goes, the question `name`/`qtype`, and then
/// `record` if there is one, in wire form; and where the question ends.
/// One encoder writes both, so the record's names are compressed against
/// the question's.
fn after_question(
    name: &Name,
    qtype: RecordType,
    record: Option<&Record>,
) -> Option<(Vec<u8>, usize)> {
    let mut buf = Vec::with_capacity(96);
    let mut encoder = BinEncoder::new(&mut buf);
    encoder.emit_vec(&[0; 12]).ok()?;
    Query::query(name.clone(), qtype).emit(&mut encoder).ok()?;
    let start = encoder.offset();
    if let Some(record) = record {
        record.emit(&mut encoder).ok()?;
    }
    Some((buf, start))
}

/// `record` in wire form after the question `name`/`qtype` (None when it
/// cannot be encoded, and so could not be in any answer either; names are
/// checked for length before records are made of them).
fn chunk(name: &Name, qtype: RecordType, record: &Record) -> Option<Chunk> {
    let (buf, start) = after_question(name, qtype, Some(record))?;
    Some(Arc::from(&buf[start..]))
}

/// The record in `chunk`, read back after the question `name`/`qtype` it
/// was encoded after (its case as the zone spells the name).
fn unchunk(name: &Name, qtype: RecordType, chunk: &[u8]) -> Option<Record> {
    let (mut buf, start) = after_question(name, qtype, None)?;
    buf.extend_from_slice(chunk);
    Record::read(&mut BinDecoder::new(&buf).clone(u16::try_from(start).ok()?)).ok()
}

/// A name as the zone keys it: its wire form (length-prefixed labels and
/// the root's 0), in ASCII lower case. The server looks a question's name
/// up as it arrived, lowercased, without decoding it; and a key is a fifth
/// of a hickory `LowerName`'s size.
pub type Key = Box<[u8]>;

/// The key of `name`.
pub fn name_key(name: &Name) -> Key {
    let mut out = Vec::with_capacity(name.len() + 2);
    for label in name.iter() {
        out.push(u8::try_from(label.len()).unwrap_or(u8::MAX));
        out.extend(label.iter().map(u8::to_ascii_lowercase));
    }
    out.push(0);
    out.into_boxed_slice()
}

/// The records one owner put at one name, in wire form, section by section
/// (see [`Chunk`]).
#[derive(Debug, Default)]
struct Records {
    wire: [Vec<Chunk>; 4],
    /// A role or SRV name: its answers are shuffled per question.
    shuffled: bool,
}

/// Indexes of `Records::wire`.
const WIRE_A: usize = 0;
const WIRE_AAAA: usize = 1;
const WIRE_SRV: usize = 2;
const WIRE_TARGETS: usize = 3;

/// The question type a section's chunks were encoded after.
const SECTION_QTYPE: [RecordType; 4] = [
    RecordType::A,
    RecordType::AAAA,
    RecordType::SRV,
    RecordType::SRV,
];

impl Records {
    fn push(&mut self, section: usize, chunk: Option<&Chunk>) {
        if let Some(c) = chunk {
            self.wire[section].push(c.clone());
        }
    }

    fn push_address(&mut self, qtype: RecordType, chunk: Option<&Chunk>) {
        let section = if qtype == RecordType::AAAA {
            WIRE_AAAA
        } else {
            WIRE_A
        };
        self.push(section, chunk);
    }
}

/// One name: the records of each owner (nearly always one).
#[derive(Debug, Clone, Default)]
struct Node {
    parts: Vec<(Owner, Arc<Records>)>,
}

/// One host's records, built when the host changes.
#[derive(Debug)]
struct HostEntry {
    /// Its address is at its own name, `<host>.<role>.<dc>`; when not (see
    /// [`Zone::own_name`]) it is only in its role's answers.
    named: bool,
    /// Who put its records at its own name.
    owner: u64,
    /// A (or AAAA) for its address.
    qtype: RecordType,
    /// Its address under its role's name.
    role_addr: Option<Chunk>,
    /// Passing and not in maintenance (or warning, with allow_warning).
    usable: bool,
    srv: Vec<ServiceRecords>,
}

/// One service a host publishes.
#[derive(Debug)]
struct ServiceRecords {
    service: Box<str>,
    /// SRV at `_<service>._tcp.<role>.<dc>`, target the host.
    srv: Option<Chunk>,
    /// The host's address, for the additional section of that SRV name.
    target: Option<Chunk>,
}

/// What one role put in the zone.
#[derive(Debug, Clone, Default)]
struct RoleEntry {
    names: Vec<Key>,
    withheld: Vec<Withheld>,
}

/// The answer to one question.
#[derive(Debug)]
pub enum Answer {
    /// Outside the domain: not ours to answer.
    Refused,
    /// No such name under the domain (the SOA goes in the authority section).
    NxDomain,
    /// The name exists but has no records of that type (SOA in authority).
    NoData,
    /// Records read back from the zone's chunks (see [`Chunk`]).
    Found {
        answers: Vec<Record>,
        additionals: Vec<Record>,
    },
}

/// An answer as chunks: see [`Zone::wired`].
#[derive(Debug)]
pub struct Wired<'z> {
    pub answers: Vec<&'z [u8]>,
    pub additionals: Vec<&'z [u8]>,
}

/// An SRV name whose answers the quorum gate withholds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Withheld {
    pub name: String,
    pub have: usize,
    pub need: usize,
}

/// Every answer at one registry revision.
#[derive(Debug, Clone)]
pub struct Zone {
    settings: Arc<Settings>,
    domain: LowerName,
    /// The domain's [`Key`].
    apex: Key,
    soa: Record,
    /// The apex's NS record.
    ns: Record,
    nodes: HashMap<Key, Node>,
    hosts: HashMap<HostId, Arc<HostEntry>>,
    /// The number the last host entry made was given (see [`Owner::Host`]).
    next_owner: u64,
    roles: HashMap<RoleKey, RoleEntry>,
    /// Host entries served under no name of their own, and why (said once).
    unnamed: BTreeMap<HostId, String>,
    /// A role's DNS name ([`role_name_key`]) → the spellings of it that
    /// have addressed hosts, in the registry's order: the first is served.
    spellings: HashMap<String, BTreeSet<RoleKey>>,
    /// Roles not served because another spelling of their name is, and
    /// that spelling (said once).
    shadowed: BTreeMap<RoleKey, RoleKey>,
    /// Names with no records whose subtree has some (a dotted host name's
    /// parents): they answer NODATA, not NXDOMAIN (RFC 8020). How many
    /// names below each one holds.
    empty: HashMap<Key, usize>,
    /// The registry revision the zone was built at (`None`: no registry
    /// yet).
    pub revision: Option<Revision>,
}

/// `labels` followed by the domain, as a DNS name (None when it is not one).
fn name_under(labels: &[&str], domain: &Name) -> Option<Name> {
    let mut text = labels.join(".");
    text.push('.');
    Name::from_ascii(&text).ok()?.append_domain(domain).ok()
}

/// `<host>.<role>.<dc>` under the domain (None when it is not a DNS name).
fn host_name(id: &HostId, domain: &Name) -> Option<Name> {
    name_under(&[&id.host, &id.role, &id.dc], domain)
}

/// `_<service>._tcp` under a role's name (None when it is not a DNS name).
fn service_name(service: &str, role_name: &Name) -> Option<Name> {
    name_under(&[&format!("_{service}"), "_tcp"], role_name)
}

fn address(owner: &Name, ip: IpAddr, ttl: u32) -> Record {
    match ip {
        IpAddr::V4(v4) => Record::from_rdata(owner.clone(), ttl, RData::A(A(v4))),
        IpAddr::V6(v6) => Record::from_rdata(owner.clone(), ttl, RData::AAAA(AAAA(v6))),
    }
}

/// A (or AAAA, for an IPv6 address).
fn address_type(ip: IpAddr) -> RecordType {
    if ip.is_ipv6() {
        RecordType::AAAA
    } else {
        RecordType::A
    }
}

/// `owner`'s address record as a chunk after the question for it.
fn address_chunk(owner: &Name, ip: IpAddr, ttl: u32) -> Option<Chunk> {
    chunk(owner, address_type(ip), &address(owner, ip, ttl))
}

impl Zone {
    /// A zone with no hosts: every name under the domain but the apex is
    /// NXDOMAIN.
    pub fn new(settings: Settings) -> Zone {
        let domain = LowerName::from(&settings.domain);
        let apex = name_key(&settings.domain);
        let soa = soa(&settings, None);
        let ns = Record::from_rdata(
            settings.domain.clone(),
            settings.ttl,
            RData::NS(NS(settings.ns.clone())),
        );
        let mut zone = Zone {
            settings: Arc::new(settings),
            domain: domain.clone(),
            apex,
            soa,
            ns,
            nodes: HashMap::new(),
            hosts: HashMap::new(),
            next_owner: 0,
            roles: HashMap::new(),
            unnamed: BTreeMap::new(),
            spellings: HashMap::new(),
            shadowed: BTreeMap::new(),
            empty: HashMap::new(),
            revision: None,
        };
        zone.put(zone.apex.clone(), Owner::Apex, Records::default());
        // The name server's own name resolves, when it is ours to answer.
        let ns_name = zone.settings.ns.clone();
        if zone.domain.zone_of(&LowerName::from(&ns_name)) && !zone.settings.ns_addrs.is_empty() {
            let mut records = Records::default();
            for ip in zone.settings.ns_addrs.clone() {
                let wire = address_chunk(&ns_name, ip, zone.settings.ttl);
                records.push_address(address_type(ip), wire.as_ref());
            }
            zone.put(name_key(&ns_name), Owner::Apex, records);
        }
        zone
    }

    /// Every answer for the registry at `revision`.
    pub fn build(registry: &dyn Hosts, revision: Revision, settings: Settings) -> Zone {
        let mut zone = Zone::new(settings);
        let ids: Vec<&HostId> = registry.ids();
        zone.apply(registry, ids, revision);
        zone
    }

    /// Brings the hosts in `touched`, and their roles, in step with the
    /// registry at `revision`.
    pub fn apply<'a>(
        &mut self,
        registry: &dyn Hosts,
        touched: impl IntoIterator<Item = &'a HostId>,
        revision: Revision,
    ) {
        // A host's name may pass to another that differs only in case: its
        // siblings of that kind are refreshed with it.
        let mut hosts: BTreeSet<HostId> = BTreeSet::new();
        for id in touched {
            hosts.insert(id.clone());
            hosts.extend(
                registry
                    .in_role(&id.dc, &id.role)
                    .filter(|o| o.host.eq_ignore_ascii_case(&id.host))
                    .cloned(),
            );
        }
        let mut roles: BTreeSet<RoleKey> = hosts
            .iter()
            .map(|id| (id.dc.clone(), id.role.clone()))
            .collect();
        // Which spelling of a role's name is served may change with them:
        // when a name has (or had) more than one, all of them are
        // refreshed, with all their hosts.
        let mut respelled = BTreeSet::new();
        for key in &roles {
            let name = role_name_key(key);
            let spellings = self.spellings.entry(name.clone()).or_default();
            let had_many = spellings.len() > 1;
            if has_addressed_host(registry, key) {
                spellings.insert(key.clone());
            } else {
                spellings.remove(key);
            }
            // Only `key` came or went, so the spellings before and after
            // are those now, and `key`.
            if had_many || spellings.len() > 1 {
                respelled.extend(spellings.iter().cloned());
                respelled.insert(key.clone());
            }
            if spellings.is_empty() {
                self.spellings.remove(&name);
            }
        }
        for key in respelled {
            hosts.extend(registry.in_role(&key.0, &key.1).cloned());
            roles.insert(key);
        }
        for id in &hosts {
            self.refresh_host(registry, id);
        }
        for role in &roles {
            self.refresh_role(registry, role);
        }
        self.revision = Some(revision);
        self.soa = soa(&self.settings, Some(revision));
    }

    fn put(&mut self, name: Key, owner: Owner, records: Records) {
        if !self.nodes.contains_key(&name) {
            for parent in self.parents(&name) {
                *self.empty.entry(parent).or_default() += 1;
            }
        }
        self.nodes
            .entry(name)
            .or_default()
            .parts
            .push((owner, Arc::new(records)));
    }

    fn take(&mut self, name: &[u8], owner: &Owner) {
        if let Some(node) = self.nodes.get_mut(name) {
            node.parts.retain(|(o, _)| o != owner);
            if node.parts.is_empty() {
                self.nodes.remove(name);
                for parent in self.parents(name) {
                    if let Some(n) = self.empty.get_mut(&parent) {
                        *n -= 1;
                        if *n == 0 {
                            self.empty.remove(&parent);
                        }
                    }
                }
            }
        }
    }

    /// The names between `name` and the apex, both left out: the keys
    /// that end `name`'s, longer than the apex's.
    fn parents(&self, name: &[u8]) -> Vec<Key> {
        let apex = self.apex.len();
        let mut out = Vec::new();
        let mut at = name.first().map_or(name.len(), |l| usize::from(*l) + 1);
        while name.len().saturating_sub(at) > apex {
            out.push(name[at..].into());
            at += usize::from(name[at]) + 1;
        }
        out
    }

    /// The name a host answers under, or why it has none: a name that is
    /// not a DNS name, a label starting with `_` (service names like
    /// `_http._tcp` are SRV's), or one that differs only in case from
    /// another host's in the role (RFC 4343: they are one name; the first
    /// in the registry's order keeps it, the other is reported).
    fn own_name(&self, registry: &dyn Hosts, id: &HostId) -> Result<Name, String> {
        if id.host.split('.').any(|l| l.starts_with('_')) {
            return Err("a label of its name starts with `_`, which marks service names such as `_http._tcp`".into());
        }
        let Some(name) = host_name(id, &self.settings.domain) else {
            return Err(
                "its name is not a DNS name (a label over 63 bytes or a name over 255)".into(),
            );
        };
        let first = registry
            .in_role(&id.dc, &id.role)
            .filter(|o| o.host.eq_ignore_ascii_case(&id.host))
            .find(|o| {
                registry
                    .host(o)
                    .is_some_and(|h| h.present() && h.ip.is_some())
            });
        match first {
            Some(first) if first != id => Err(format!(
                "its name differs only in case from host {first}'s, which is one DNS name (RFC 4343) and answers {first}'s address"
            )),
            _ => Ok(name),
        }
    }

    fn usable(&self, h: &HostView) -> bool {
        h.healthy()
            || (self.settings.allow_warning
                && h.present()
                && h.health == Some(Health::Warning)
                && h.maintenance.is_none())
    }

    fn refresh_host(&mut self, registry: &dyn Hosts, id: &HostId) {
        if let Some(old) = self.hosts.remove(id)
            && old.named
            && let Some(name) = host_name(id, &self.settings.domain)
        {
            self.take(&name_key(&name), &Owner::Host(old.owner));
        }
        let Some((host, ip)) = registry
            .host(id)
            .filter(|h| h.present())
            .and_then(|h| Some((h, h.ip?)))
        else {
            self.unnamed.remove(id);
            return;
        };
        let domain = &self.settings.domain;
        let ttl = self.settings.ttl;
        let Some(role_name) = name_under(&[&id.role, &id.dc], domain) else {
            self.no_name(
                id,
                "its role's name is not a DNS name (a label over 63 bytes or a name over 255)"
                    .into(),
            );
            return;
        };
        let qtype = address_type(ip);
        let own = match self.served_spelling(&(id.dc.clone(), id.role.clone())) {
            // Its role is not served: said once for the role, not per host.
            Some(other) => {
                let why = format!(
                    "its role's name differs only in case from role {}/{}'s",
                    other.0, other.1
                );
                self.unnamed.insert(id.clone(), why);
                None
            }
            None => match self.own_name(registry, id) {
                Ok(name) => {
                    self.unnamed.remove(id);
                    Some(name)
                }
                Err(why) => {
                    self.no_name(id, why);
                    None
                }
            },
        };
        let srv = match &own {
            Some(host_name) => {
                let addr = address(host_name, ip, ttl);
                host.services
                    .iter()
                    .filter_map(|(service, port)| {
                        let name = service_name(service, &role_name)?;
                        let rdata = RData::SRV(SRV::new(10, 10, *port, host_name.clone()));
                        let record = Record::from_rdata(name.clone(), ttl, rdata);
                        Some(ServiceRecords {
                            service: service.as_str().into(),
                            srv: chunk(&name, RecordType::SRV, &record),
                            target: chunk(&name, RecordType::SRV, &addr),
                        })
                    })
                    .collect()
            }
            // No name: no SRV target either.
            None => Vec::new(),
        };
        self.next_owner += 1;
        let entry = HostEntry {
            named: own.is_some(),
            owner: self.next_owner,
            qtype,
            role_addr: address_chunk(&role_name, ip, ttl),
            usable: self.usable(host),
            srv,
        };
        if let Some(name) = own {
            let mut records = Records::default();
            records.push_address(qtype, address_chunk(&name, ip, ttl).as_ref());
            self.put(name_key(&name), Owner::Host(entry.owner), records);
        }
        self.hosts.insert(id.clone(), Arc::new(entry));
    }

    /// Records that host `id` is served under no name of its own, saying
    /// why once (and again when the reason changes).
    fn no_name(&mut self, id: &HostId, why: String) {
        if self.unnamed.get(id) != Some(&why) {
            tracing::warn!(
                host = %id,
                "this host has no DNS name of its own: {why}; it is answered only under its role's name"
            );
            self.unnamed.insert(id.clone(), why);
        }
    }

    /// The spelling of role `key`'s name that is served instead of it, when
    /// another is.
    fn served_spelling(&self, key: &RoleKey) -> Option<RoleKey> {
        let spellings = self.spellings.get(&role_name_key(key))?;
        let first = spellings.first()?;
        (first != key && spellings.contains(key)).then(|| first.clone())
    }

    fn refresh_role(&mut self, registry: &dyn Hosts, key: &RoleKey) {
        let owner = Owner::Role(key.clone());
        let old = self.roles.remove(key).unwrap_or_default();
        for name in &old.names {
            self.take(name, &owner);
        }
        let (dc, role) = key;
        if let Some(other) = self.served_spelling(key) {
            if self.shadowed.get(key) != Some(&other) {
                tracing::warn!(
                    "role {dc}/{role} is not in DNS, nor are its hosts: its name differs only in case from role {}/{}'s, which is one DNS name (RFC 4343) and is served",
                    other.0,
                    other.1
                );
                self.shadowed.insert(key.clone(), other);
            }
            return;
        }
        if self.shadowed.remove(key).is_some() && has_addressed_host(registry, key) {
            tracing::info!("role {dc}/{role} is in DNS again: no other spelling of its name is");
        }
        let members: Vec<Arc<HostEntry>> = registry
            .in_role(dc, role)
            .filter_map(|id| self.hosts.get(id).cloned())
            .collect();
        let domain = self.settings.domain.clone();
        let names = (
            name_under(&[role, dc], &domain),
            name_under(&["_tcp", role, dc], &domain),
            name_under(&[dc], &domain),
        );
        let (Some(role_name), Some(tcp_name), Some(dc_name)) = names else {
            return;
        };
        if members.is_empty() {
            return;
        }
        let mut entry = RoleEntry::default();
        let mut role_records = Records {
            shuffled: true,
            ..Records::default()
        };
        // Each service with the usable hosts' records of it.
        let mut services: BTreeMap<&str, Vec<&ServiceRecords>> = BTreeMap::new();
        for h in &members {
            if h.usable {
                role_records.push_address(h.qtype, h.role_addr.as_ref());
            }
            for s in &h.srv {
                let e = services.entry(&s.service).or_default();
                if h.usable {
                    e.push(s);
                }
            }
        }
        let gate = format!("{role}.{dc}").to_ascii_lowercase();
        let need = self.settings.srv_min.get(&gate).copied().unwrap_or(0);
        let mut srv_nodes = Vec::new();
        for (service, usable) in &services {
            // Made for every host that published it, so it is a name.
            let Some(name) = service_name(service, &role_name) else {
                continue;
            };
            let mut records = Records {
                shuffled: true,
                ..Records::default()
            };
            if usable.len() < need {
                entry.withheld.push(Withheld {
                    name: name.to_string(),
                    have: usable.len(),
                    need,
                });
            } else {
                for s in usable {
                    records.push(WIRE_SRV, s.srv.as_ref());
                    records.push(WIRE_TARGETS, s.target.as_ref());
                }
            }
            srv_nodes.push((name_key(&name), records));
        }
        self.log_gate(&old.withheld, &entry.withheld);
        let mut put = |zone: &mut Zone, name: Key, records: Records| {
            entry.names.push(name.clone());
            zone.put(name, owner.clone(), records);
        };
        put(self, name_key(&role_name), role_records);
        put(self, name_key(&tcp_name), Records::default());
        put(self, name_key(&dc_name), Records::default());
        for (name, records) in srv_nodes {
            put(self, name, records);
        }
        self.roles.insert(key.clone(), entry);
    }

    /// Logs what the quorum gate started or stopped withholding.
    fn log_gate(&self, before: &[Withheld], after: &[Withheld]) {
        for w in after.iter().filter(|w| !before.contains(w)) {
            tracing::info!(
                "withholding {} until {} hosts publish it (srv_min); {} do",
                w.name,
                w.need,
                w.have
            );
        }
        for w in before
            .iter()
            .filter(|w| !after.iter().any(|a| a.name == w.name))
        {
            tracing::info!("serving {}: srv_min {} reached", w.name, w.need);
        }
    }

    /// The zone's SOA, for the authority section of negative answers.
    pub fn soa(&self) -> &Record {
        &self.soa
    }

    /// SRV names the quorum gate withholds.
    pub fn withheld(&self) -> impl Iterator<Item = &Withheld> {
        self.roles.values().flat_map(|r| r.withheld.iter())
    }

    /// Host entries served under no name.
    pub fn unnamed(&self) -> usize {
        self.unnamed.len()
    }

    /// How many names the zone holds.
    pub fn names(&self) -> usize {
        self.nodes.len()
    }

    /// The answer to an A, AAAA or SRV question for a name (its [`Key`])
    /// with records of that type, as chunks (answers shuffled where the
    /// name's are), or None: the question is answered by encoding
    /// ([`Zone::lookup`]).
    pub fn wired(&self, name: &[u8], qtype: RecordType) -> Option<Wired<'_>> {
        let node = self.nodes.get(name)?;
        let [(_, records)] = node.parts.as_slice() else {
            return None;
        };
        let (answers, additionals) = match qtype {
            RecordType::A => (&records.wire[WIRE_A], &[][..]),
            RecordType::AAAA => (&records.wire[WIRE_AAAA], &[][..]),
            RecordType::SRV => (
                &records.wire[WIRE_SRV],
                records.wire[WIRE_TARGETS].as_slice(),
            ),
            _ => return None,
        };
        if answers.is_empty() {
            return None;
        }
        let mut answers: Vec<&[u8]> = answers.iter().map(|c| &c[..]).collect();
        if records.shuffled && answers.len() > 1 {
            answers.shuffle(&mut rand::rng());
        }
        Some(Wired {
            answers,
            additionals: additionals.iter().map(|c| &c[..]).collect(),
        })
    }

    /// Answers one question. Role and SRV answers come in a random order.
    pub fn lookup(&self, name: &LowerName, qtype: RecordType) -> Answer {
        if !self.domain.zone_of(name) {
            return Answer::Refused;
        }
        // Zone transfers are not served: the registry is read from etcd.
        if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            return Answer::Refused;
        }
        let wanted = name_key(name);
        let Some(node) = self.nodes.get(&wanted) else {
            if self.empty.contains_key(&wanted) {
                return Answer::NoData;
            }
            return Answer::NxDomain;
        };
        let apex = wanted == self.apex;
        let owner = Name::from(name);
        // The records of `sections` at this name, read back from chunks.
        let records = |sections: &[usize]| -> Vec<Record> {
            let mut out = Vec::new();
            for (_, r) in &node.parts {
                for &section in sections {
                    out.extend(
                        r.wire[section]
                            .iter()
                            .filter_map(|c| unchunk(&owner, SECTION_QTYPE[section], c)),
                    );
                }
            }
            out
        };
        let (mut answers, additionals) = match qtype {
            RecordType::A => (records(&[WIRE_A]), Vec::new()),
            RecordType::AAAA => (records(&[WIRE_AAAA]), Vec::new()),
            RecordType::SRV => (records(&[WIRE_SRV]), records(&[WIRE_TARGETS])),
            RecordType::SOA if apex => (vec![self.soa.clone()], Vec::new()),
            RecordType::NS if apex => (vec![self.ns.clone()], Vec::new()),
            RecordType::ANY => {
                let mut answers = records(&[WIRE_A, WIRE_AAAA, WIRE_SRV]);
                if apex {
                    answers.push(self.soa.clone());
                    answers.push(self.ns.clone());
                }
                (answers, records(&[WIRE_TARGETS]))
            }
            _ => (Vec::new(), Vec::new()),
        };
        if answers.is_empty() {
            return Answer::NoData;
        }
        if answers.len() > 1 && node.parts.iter().any(|(_, r)| r.shuffled) {
            answers.shuffle(&mut rand::rng());
        }
        Answer::Found {
            answers,
            additionals,
        }
    }
}

fn soa(settings: &Settings, revision: Option<Revision>) -> Record {
    let domain = &settings.domain;
    Record::from_rdata(
        domain.clone(),
        settings.ttl,
        RData::SOA(SOA::new(
            settings.ns.clone(),
            name_under(&["hostmaster"], domain).unwrap_or_else(|| domain.clone()),
            // The serial follows the registry; RFC 1982 arithmetic wraps it.
            revision.map_or(0, Revision::get) as u32,
            3600,
            600,
            86400,
            settings.ttl,
        )),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/infrastructure";

    fn rev(n: i64) -> Revision {
        Revision::of(n).expect("a revision above 0")
    }

    fn settings() -> Settings {
        Settings {
            domain: Name::from_ascii("registry.internal.").unwrap(),
            ttl: 5,
            allow_warning: false,
            srv_min: BTreeMap::new(),
            ns: Name::from_ascii("ns.registry.internal.").unwrap(),
            ns_addrs: vec!["127.0.0.53".parse().unwrap()],
        }
    }

    fn host(r: &mut Registry, path: &str, ip: &str, health: &str, services: &[(&str, u16)]) {
        let put = |r: &mut Registry, leaf: &str, v: &str| {
            r.put(
                P,
                format!("{P}/{path}/{leaf}").as_bytes(),
                v.as_bytes(),
                1,
                1,
            )
            .unwrap();
        };
        put(r, "ip", ip);
        put(r, "health", health);
        for (s, port) in services {
            put(r, &format!("services/{s}"), &port.to_string());
        }
    }

    fn q(zone: &Zone, name: &str, t: RecordType) -> Answer {
        zone.lookup(&LowerName::from(Name::from_ascii(name).unwrap()), t)
    }

    fn rdata(a: &Answer) -> Vec<String> {
        match a {
            Answer::Found { answers, .. } => {
                let mut v: Vec<String> = answers.iter().map(|r| r.data.to_string()).collect();
                v.sort();
                v
            }
            other => vec![format!("{other:?}")],
        }
    }

    fn registry() -> Registry {
        let mut r = Registry::default();
        host(
            &mut r,
            "dc1/etcd/e1",
            "10.0.0.1",
            "passing",
            &[("etcd-server", 2380)],
        );
        host(
            &mut r,
            "dc1/etcd/e2",
            "10.0.0.2",
            "warning",
            &[("etcd-server", 2380)],
        );
        host(
            &mut r,
            "dc1/etcd/e3",
            "fd00::3",
            "critical",
            &[("etcd-server", 2380)],
        );
        r
    }

    #[test]
    fn host_names_answer_whatever_the_health() {
        let z = Zone::build(&registry(), rev(7), settings());
        assert_eq!(
            rdata(&q(&z, "e3.etcd.dc1.registry.internal.", RecordType::AAAA)),
            ["fd00::3"]
        );
        assert!(matches!(
            q(&z, "e3.etcd.dc1.registry.internal.", RecordType::A),
            Answer::NoData
        ));
        assert_eq!(
            rdata(&q(&z, "E1.Etcd.DC1.registry.internal.", RecordType::A)),
            ["10.0.0.1"]
        );
    }

    #[test]
    fn role_names_answer_usable_hosts_only() {
        let z = Zone::build(&registry(), rev(7), settings());
        assert_eq!(
            rdata(&q(&z, "etcd.dc1.registry.internal.", RecordType::A)),
            ["10.0.0.1"]
        );
        let warn = Settings {
            allow_warning: true,
            ..settings()
        };
        let z = Zone::build(&registry(), rev(7), warn);
        assert_eq!(
            rdata(&q(&z, "etcd.dc1.registry.internal.", RecordType::A)),
            ["10.0.0.1", "10.0.0.2"]
        );
    }

    #[test]
    fn srv_lists_usable_publishers_with_their_addresses() {
        let z = Zone::build(&registry(), rev(7), settings());
        let a = q(
            &z,
            "_etcd-server._tcp.etcd.dc1.registry.internal.",
            RecordType::SRV,
        );
        assert_eq!(rdata(&a), ["10 10 2380 e1.etcd.dc1.registry.internal."]);
        let Answer::Found { additionals, .. } = a else {
            panic!("no SRV answer")
        };
        assert_eq!(additionals.len(), 1);
        assert_eq!(additionals[0].data.to_string(), "10.0.0.1");
    }

    #[test]
    fn the_quorum_gate_withholds_srv_until_enough_hosts() {
        let gated = Settings {
            srv_min: [("etcd.dc1".to_string(), 2)].into(),
            ..settings()
        };
        let mut r = registry();
        let z = Zone::build(&r, rev(7), gated.clone());
        assert!(matches!(
            q(
                &z,
                "_etcd-server._tcp.etcd.dc1.registry.internal.",
                RecordType::SRV
            ),
            Answer::NoData
        ));
        let w: Vec<&Withheld> = z.withheld().collect();
        assert_eq!(w.len(), 1);
        assert_eq!((w[0].have, w[0].need), (1, 2));
        host(
            &mut r,
            "dc1/etcd/e4",
            "10.0.0.4",
            "passing",
            &[("etcd-server", 2380)],
        );
        let z = Zone::build(&r, rev(8), gated);
        assert_eq!(
            rdata(&q(
                &z,
                "_etcd-server._tcp.etcd.dc1.registry.internal.",
                RecordType::SRV
            ))
            .len(),
            2
        );
        assert_eq!(z.withheld().count(), 0);
    }

    #[test]
    fn unknown_names_outside_names_and_empty_non_terminals() {
        let z = Zone::build(&registry(), rev(7), settings());
        assert!(matches!(
            q(&z, "nope.dc1.registry.internal.", RecordType::A),
            Answer::NxDomain
        ));
        assert!(matches!(
            q(&z, "example.com.", RecordType::A),
            Answer::Refused
        ));
        assert!(matches!(q(&z, "internal.", RecordType::A), Answer::Refused));
        for ent in [
            "dc1.registry.internal.",
            "_tcp.etcd.dc1.registry.internal.",
            "registry.internal.",
        ] {
            assert!(matches!(q(&z, ent, RecordType::A), Answer::NoData), "{ent}");
        }
        assert_eq!(
            rdata(&q(&z, "registry.internal.", RecordType::SOA)).len(),
            1
        );
        let Answer::Found { answers, .. } = q(&z, "registry.internal.", RecordType::SOA) else {
            panic!()
        };
        let RData::SOA(soa) = &answers[0].data else {
            panic!()
        };
        assert_eq!((soa.serial, soa.minimum), (7, 5));
    }

    #[test]
    fn the_apex_names_a_name_server_that_resolves() {
        let z = Zone::build(&Registry::default(), rev(1), settings());
        assert_eq!(
            rdata(&q(&z, "registry.internal.", RecordType::NS)),
            ["ns.registry.internal."]
        );
        assert_eq!(
            rdata(&q(&z, "ns.registry.internal.", RecordType::A)),
            ["127.0.0.53"]
        );
        let Answer::Found { answers, .. } = q(&z, "registry.internal.", RecordType::SOA) else {
            panic!()
        };
        let RData::SOA(soa) = &answers[0].data else {
            panic!()
        };
        assert_eq!(soa.mname.to_string(), "ns.registry.internal.");
        // A name server elsewhere: named, not answered here.
        let elsewhere = Settings {
            ns: Name::from_ascii("dns1.example.net.").unwrap(),
            ns_addrs: Vec::new(),
            ..settings()
        };
        let z = Zone::build(&Registry::default(), rev(1), elsewhere);
        assert_eq!(
            rdata(&q(&z, "registry.internal.", RecordType::NS)),
            ["dns1.example.net."]
        );
        assert!(matches!(
            q(&z, "ns.registry.internal.", RecordType::A),
            Answer::NxDomain
        ));
    }

    #[test]
    fn hosts_without_a_name_of_their_own_still_answer_under_their_role() {
        let mut r = Registry::default();
        let long = "h".repeat(64);
        host(
            &mut r,
            &format!("dc1/web/{long}"),
            "10.0.0.9",
            "passing",
            &[("http", 80)],
        );
        // A host named like a service name gets no A on the SRV name.
        host(
            &mut r,
            "dc1/web/_http._tcp",
            "10.0.0.8",
            "passing",
            &[("http", 80)],
        );
        host(&mut r, "dc1/web/w1", "10.0.0.7", "passing", &[("http", 80)]);
        let z = Zone::build(&r, rev(1), settings());
        assert_eq!(z.unnamed(), 2);
        assert_eq!(
            rdata(&q(&z, "web.dc1.registry.internal.", RecordType::A)),
            ["10.0.0.7", "10.0.0.8", "10.0.0.9"]
        );
        assert!(matches!(
            q(&z, "_http._tcp.web.dc1.registry.internal.", RecordType::A),
            Answer::NoData
        ));
        // No name, so no SRV target: only w1.
        assert_eq!(
            rdata(&q(
                &z,
                "_http._tcp.web.dc1.registry.internal.",
                RecordType::SRV
            )),
            ["10 10 80 w1.web.dc1.registry.internal."]
        );
    }

    #[test]
    fn names_that_differ_only_in_case_are_one_name_never_merged() {
        let mut r = Registry::default();
        host(
            &mut r,
            "dc1/web/upper",
            "10.0.0.2",
            "passing",
            &[("http", 80)],
        );
        host(
            &mut r,
            "dc1/web/UPPER",
            "10.0.0.1",
            "passing",
            &[("http", 80)],
        );
        let mut z = Zone::build(&r, rev(1), settings());
        // The first in the registry's order (UPPER) keeps the name.
        assert_eq!(
            rdata(&q(&z, "upper.web.dc1.registry.internal.", RecordType::A)),
            ["10.0.0.1"]
        );
        assert_eq!(z.unnamed(), 1);
        assert_eq!(
            rdata(&q(
                &z,
                "_http._tcp.web.dc1.registry.internal.",
                RecordType::SRV
            )),
            ["10 10 80 UPPER.web.dc1.registry.internal."]
        );
        // Both are hosts of the role.
        assert_eq!(
            rdata(&q(&z, "web.dc1.registry.internal.", RecordType::A)),
            ["10.0.0.1", "10.0.0.2"]
        );
        // When UPPER goes, upper takes the name.
        let gone = HostId {
            dc: "dc1".into(),
            role: "web".into(),
            host: "UPPER".into(),
        };
        r.hosts.remove(&gone);
        z.apply(&r, [&gone], rev(2));
        assert_eq!(
            rdata(&q(&z, "upper.web.dc1.registry.internal.", RecordType::A)),
            ["10.0.0.2"]
        );
        assert_eq!(z.unnamed(), 0);
    }

    #[test]
    fn roles_and_dcs_that_differ_only_in_case_are_one_name_never_merged() {
        let mut r = Registry::default();
        host(&mut r, "dc1/web/w1", "10.0.0.1", "passing", &[("http", 80)]);
        host(&mut r, "DC1/Web/w1", "10.0.0.9", "passing", &[("http", 81)]);
        host(&mut r, "DC1/Web/w2", "10.0.0.8", "passing", &[]);
        let mut z = Zone::build(&r, rev(1), settings());
        // DC1/Web comes first in the registry's order: its addresses, its
        // hosts' names and its SRV records are served, and dc1/web's are
        // not merged in.
        assert_eq!(
            rdata(&q(&z, "web.dc1.registry.internal.", RecordType::A)),
            ["10.0.0.8", "10.0.0.9"]
        );
        assert_eq!(
            rdata(&q(&z, "w1.web.dc1.registry.internal.", RecordType::A)),
            ["10.0.0.9"]
        );
        assert_eq!(
            rdata(&q(
                &z,
                "_http._tcp.web.dc1.registry.internal.",
                RecordType::SRV
            )),
            ["10 10 81 w1.Web.DC1.registry.internal."]
        );
        assert_eq!(z.unnamed(), 1);
        // When DC1/Web's hosts go, dc1/web is served, as a fresh build
        // would serve it.
        let gone: Vec<HostId> = ["w1", "w2"]
            .into_iter()
            .map(|h| HostId {
                dc: "DC1".into(),
                role: "Web".into(),
                host: h.into(),
            })
            .collect();
        for id in &gone {
            r.hosts.remove(id);
        }
        z.apply(&r, &gone, rev(2));
        assert_eq!(
            rdata(&q(&z, "web.dc1.registry.internal.", RecordType::A)),
            ["10.0.0.1"]
        );
        assert_eq!(
            rdata(&q(
                &z,
                "_http._tcp.web.dc1.registry.internal.",
                RecordType::SRV
            )),
            ["10 10 80 w1.web.dc1.registry.internal."]
        );
        assert_eq!(z.unnamed(), 0);
        let fresh = Zone::build(&r, rev(2), settings());
        assert_eq!(all_answers(&z, &r), all_answers(&fresh, &r));
        assert_eq!(z.names(), fresh.names());
        // And back: DC1/Web returns and takes the name again.
        host(&mut r, "DC1/Web/w2", "10.0.0.8", "passing", &[]);
        z.apply(&r, [&gone[1]], rev(3));
        assert_eq!(
            rdata(&q(&z, "web.dc1.registry.internal.", RecordType::A)),
            ["10.0.0.8"]
        );
        assert!(matches!(
            q(&z, "_http._tcp.web.dc1.registry.internal.", RecordType::SRV),
            Answer::NoData | Answer::NxDomain
        ));
        let fresh = Zone::build(&r, rev(3), settings());
        assert_eq!(all_answers(&z, &r), all_answers(&fresh, &r));
        assert_eq!(z.names(), fresh.names());
    }

    #[test]
    fn names_that_exist_below_answer_nodata_and_transfers_are_refused() {
        let mut r = Registry::default();
        host(&mut r, "dc1/web/a.b", "10.0.0.3", "passing", &[]);
        let mut z = Zone::build(&r, rev(1), settings());
        assert_eq!(
            rdata(&q(&z, "a.b.web.dc1.registry.internal.", RecordType::A)),
            ["10.0.0.3"]
        );
        // b.web.dc1 has no records but a name below it: NODATA (RFC 8020).
        assert!(matches!(
            q(&z, "b.web.dc1.registry.internal.", RecordType::A),
            Answer::NoData
        ));
        assert!(matches!(
            q(&z, "c.web.dc1.registry.internal.", RecordType::A),
            Answer::NxDomain
        ));
        for t in [RecordType::AXFR, RecordType::IXFR] {
            assert!(matches!(q(&z, "registry.internal.", t), Answer::Refused));
        }
        // Gone with the host.
        let id = HostId {
            dc: "dc1".into(),
            role: "web".into(),
            host: "a.b".into(),
        };
        r.hosts.remove(&id);
        z.apply(&r, [&id], rev(2));
        assert!(matches!(
            q(&z, "b.web.dc1.registry.internal.", RecordType::A),
            Answer::NxDomain
        ));
    }

    /// Every name the zone could answer for the registry, with sorted data.
    fn all_answers(z: &Zone, r: &Registry) -> Vec<String> {
        let mut names: BTreeSet<String> = BTreeSet::new();
        for (id, h) in &r.hosts {
            names.insert(format!(
                "{}.{}.{}.registry.internal.",
                id.host, id.role, id.dc
            ));
            names.insert(format!("{}.{}.registry.internal.", id.role, id.dc));
            names.insert(format!("_tcp.{}.{}.registry.internal.", id.role, id.dc));
            names.insert(format!("{}.registry.internal.", id.dc));
            for s in h.services.keys() {
                names.insert(format!(
                    "_{s}._tcp.{}.{}.registry.internal.",
                    id.role, id.dc
                ));
            }
        }
        let mut out = Vec::new();
        for n in names {
            for t in [RecordType::A, RecordType::AAAA, RecordType::SRV] {
                let a = q(z, &n, t);
                let mut extra = match &a {
                    Answer::Found { additionals, .. } => {
                        additionals.iter().map(|r| r.data.to_string()).collect()
                    }
                    _ => vec![],
                };
                extra.sort();
                out.push(format!("{n} {t} {:?} {extra:?}", rdata(&a)));
            }
        }
        out
    }

    #[test]
    fn changes_applied_one_by_one_answer_as_a_fresh_build() {
        let gated = Settings {
            srv_min: [("etcd.dc1".to_string(), 2)].into(),
            ..settings()
        };
        let mut r = registry();
        let mut z = Zone::build(&r, rev(1), gated.clone());
        let id = |path: &str| {
            let p: Vec<&str> = path.split('/').collect();
            HostId {
                dc: p[0].into(),
                role: p[1].into(),
                host: p[2].into(),
            }
        };
        type Change = Box<dyn Fn(&mut Registry)>;
        let steps: Vec<(&str, Change)> = vec![
            (
                "dc1/etcd/e2",
                Box::new(|r| {
                    host(
                        r,
                        "dc1/etcd/e2",
                        "10.0.0.2",
                        "passing",
                        &[("etcd-server", 2380)],
                    )
                }),
            ),
            (
                "dc1/etcd/e1",
                Box::new(|r| {
                    r.put(P, b"/infrastructure/dc1/etcd/e1/maintenance", b"x", 1, 3)
                        .unwrap();
                }),
            ),
            (
                "dc1/web/w1",
                Box::new(|r| host(r, "dc1/web/w1", "10.1.0.1", "passing", &[("http", 80)])),
            ),
            (
                "dc1/WEB/w1",
                Box::new(|r| host(r, "dc1/WEB/w1", "10.1.0.2", "passing", &[("http", 81)])),
            ),
            (
                "dc1/etcd/e1",
                Box::new(|r| {
                    r.delete(P, b"/infrastructure/dc1/etcd/e1/maintenance", 5);
                }),
            ),
            (
                "dc1/web/w1",
                Box::new(|r| {
                    r.delete(P, b"/infrastructure/dc1/web/w1/ip", 6);
                }),
            ),
            (
                "dc2/etcd/e9",
                Box::new(|r| {
                    host(
                        r,
                        "dc2/etcd/e9",
                        "fd00::9",
                        "passing",
                        &[("etcd-server", 2380)],
                    )
                }),
            ),
            (
                "dc1/etcd/e3",
                Box::new(|r| {
                    r.delete(P, b"/infrastructure/dc1/etcd/e3/health", 8);
                }),
            ),
        ];
        for (i, (path, change)) in steps.iter().enumerate() {
            change(&mut r);
            let at = rev(i as i64 + 2);
            z.apply(&r, [&id(path)], at);
            let fresh = Zone::build(&r, at, gated.clone());
            assert_eq!(all_answers(&z, &r), all_answers(&fresh, &r), "after {path}");
            assert_eq!(z.names(), fresh.names(), "after {path}");
            assert_eq!(
                z.withheld().count(),
                fresh.withheld().count(),
                "after {path}"
            );
        }
        // Both spellings of the role answer at the one lower-case name.
        assert_eq!(
            rdata(&q(&z, "web.dc1.registry.internal.", RecordType::A)),
            ["10.1.0.2"]
        );
    }
}
