//! The answers `registrar dns` serves (contract section 7), built from the
//! registry mirror at one revision. Pure: no I/O, and a lookup is one hash
//! lookup, so a query costs no etcd request.
//!
//! Names under the domain:
//! - `<host>.<role>.<dc>` → the host's address, whatever its health;
//! - `<role>.<dc>` → the addresses of the role's usable hosts, shuffled;
//! - `_<service>._tcp.<role>.<dc>` → SRV, one per usable host publishing
//!   the service, with the targets' addresses as additional records,
//!   withheld until `srv_min` hosts publish it;
//! - every name above them (`<dc>`, `_tcp.<role>.<dc>`) exists without
//!   records, so a resolver caches no NXDOMAIN for a whole subtree
//!   (RFC 8020).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use hickory_server::proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use rand::seq::SliceRandom;

use crate::check::Status;
use crate::registry::{HostId, HostView, Registry};

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
}

/// One name and its records.
#[derive(Debug, Default)]
struct Node {
    a: Vec<Record>,
    aaaa: Vec<Record>,
    srv: Vec<Record>,
    /// The A/AAAA records of the SRV targets (the additional section).
    targets: Vec<Record>,
    /// A role or SRV name: its answers are shuffled per query.
    shuffled: bool,
}

/// The answer to one question.
#[derive(Debug)]
pub enum Answer<'z> {
    /// Outside the domain: not ours to answer.
    Refused,
    /// No such name under the domain (the SOA goes in the authority section).
    NxDomain,
    /// The name exists but has no records of that type (SOA in authority).
    NoData,
    Found {
        answers: Vec<&'z Record>,
        additionals: Vec<&'z Record>,
    },
}

/// An SRV name whose answers the quorum gate withholds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Withheld {
    pub name: String,
    pub have: usize,
    pub need: usize,
}

/// Every answer at one registry revision.
#[derive(Debug)]
pub struct Zone {
    domain: LowerName,
    soa: Record,
    nodes: HashMap<LowerName, Node>,
    /// The registry revision the zone was built at.
    pub revision: i64,
    /// Host entries whose names are not valid DNS names (a label over 63
    /// bytes, a name over 255): served under no name.
    pub unnamed: Vec<HostId>,
    /// SRV names the quorum gate withholds.
    pub withheld: Vec<Withheld>,
}

/// `labels` followed by the domain, as a DNS name (None when it is not one).
fn name_under(labels: &[&str], domain: &Name) -> Option<Name> {
    let mut text = labels.join(".");
    text.push('.');
    Name::from_ascii(&text).ok()?.append_domain(domain).ok()
}

fn address(owner: &Name, ip: IpAddr, ttl: u32) -> Record {
    match ip {
        IpAddr::V4(v4) => Record::from_rdata(owner.clone(), ttl, RData::A(A(v4))),
        IpAddr::V6(v6) => Record::from_rdata(owner.clone(), ttl, RData::AAAA(AAAA(v6))),
    }
}

impl Node {
    fn push_address(&mut self, record: Record) {
        match record.record_type() {
            RecordType::AAAA => self.aaaa.push(record),
            _ => self.a.push(record),
        }
    }
}

impl Zone {
    /// A zone with no hosts: every name under the domain but the apex is
    /// NXDOMAIN.
    pub fn empty(settings: &Settings) -> Zone {
        Zone::build(&Registry::default(), 0, settings)
    }

    /// Builds every answer from the registry at `revision`.
    pub fn build(registry: &Registry, revision: i64, settings: &Settings) -> Zone {
        let domain = &settings.domain;
        let ttl = settings.ttl;
        let mut nodes: HashMap<LowerName, Node> = HashMap::new();
        let mut unnamed = Vec::new();
        // SRV name → (gate key, candidates (SRV record, target address)).
        let mut srv: BTreeMap<Name, (String, Vec<(Record, Record)>)> = BTreeMap::new();
        let usable = |h: &HostView| {
            h.healthy()
                || (settings.allow_warning
                    && h.health == Some(Status::Warning)
                    && h.maintenance.is_none())
        };
        for (id, host) in registry.present() {
            let Some(ip) = host.ip else { continue };
            let (Some(host_name), Some(role_name), Some(tcp_name), Some(dc_name)) = (
                name_under(&[&id.host, &id.role, &id.dc], domain),
                name_under(&[&id.role, &id.dc], domain),
                name_under(&["_tcp", &id.role, &id.dc], domain),
                name_under(&[&id.dc], domain),
            ) else {
                unnamed.push(id.clone());
                continue;
            };
            let host_record = address(&host_name, ip, ttl);
            nodes
                .entry(LowerName::from(&host_name))
                .or_default()
                .push_address(host_record.clone());
            nodes.entry(LowerName::from(&dc_name)).or_default();
            nodes.entry(LowerName::from(&tcp_name)).or_default();
            let role = nodes.entry(LowerName::from(&role_name)).or_default();
            role.shuffled = true;
            let usable = usable(host);
            if usable {
                role.push_address(address(&role_name, ip, ttl));
            }
            let gate = format!("{}.{}", id.role, id.dc).to_ascii_lowercase();
            for (service, port) in &host.services {
                let Some(srv_name) = name_under(&[&format!("_{service}"), "_tcp"], &role_name)
                else {
                    continue;
                };
                let entry = srv
                    .entry(srv_name.clone())
                    .or_insert_with(|| (gate.clone(), Vec::new()));
                if usable {
                    let record = Record::from_rdata(
                        srv_name,
                        ttl,
                        RData::SRV(SRV::new(10, 10, *port, host_name.clone())),
                    );
                    entry.1.push((record, host_record.clone()));
                }
            }
        }
        let mut withheld = Vec::new();
        for (name, (gate, candidates)) in srv {
            let node = nodes.entry(LowerName::from(&name)).or_default();
            node.shuffled = true;
            let need = settings.srv_min.get(&gate).copied().unwrap_or(0);
            if candidates.len() < need {
                withheld.push(Withheld {
                    name: name.to_string(),
                    have: candidates.len(),
                    need,
                });
                continue;
            }
            for (record, target) in candidates {
                node.srv.push(record);
                node.targets.push(target);
            }
        }
        nodes.entry(LowerName::from(domain)).or_default();
        let soa = Record::from_rdata(
            domain.clone(),
            ttl,
            RData::SOA(SOA::new(
                name_under(&["ns"], domain).unwrap_or_else(|| domain.clone()),
                name_under(&["hostmaster"], domain).unwrap_or_else(|| domain.clone()),
                // The serial follows the registry; RFC 1982 arithmetic
                // wraps it.
                revision as u32,
                3600,
                600,
                86400,
                ttl,
            )),
        );
        Zone {
            domain: LowerName::from(domain),
            soa,
            nodes,
            revision,
            unnamed,
            withheld,
        }
    }

    /// The zone's SOA, for the authority section of negative answers.
    pub fn soa(&self) -> &Record {
        &self.soa
    }

    /// Answers one question. Role and SRV answers come in a random order.
    pub fn lookup(&self, name: &LowerName, qtype: RecordType) -> Answer<'_> {
        if !self.domain.zone_of(name) {
            return Answer::Refused;
        }
        let Some(node) = self.nodes.get(name) else {
            return Answer::NxDomain;
        };
        let apex = *name == self.domain;
        let mut answers: Vec<&Record> = Vec::new();
        let mut additionals: Vec<&Record> = Vec::new();
        match qtype {
            RecordType::A => answers.extend(&node.a),
            RecordType::AAAA => answers.extend(&node.aaaa),
            RecordType::SRV => {
                answers.extend(&node.srv);
                additionals.extend(&node.targets);
            }
            RecordType::SOA if apex => answers.push(&self.soa),
            RecordType::ANY => {
                answers.extend(node.a.iter().chain(&node.aaaa).chain(&node.srv));
                if apex {
                    answers.push(&self.soa);
                }
                additionals.extend(&node.targets);
            }
            _ => {}
        }
        if answers.is_empty() {
            return Answer::NoData;
        }
        if node.shuffled && answers.len() > 1 {
            answers.shuffle(&mut rand::rng());
        }
        Answer::Found {
            answers,
            additionals,
        }
    }

    /// How many names the zone holds (for the log line after a change).
    pub fn names(&self) -> usize {
        self.nodes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/infrastructure";

    fn settings() -> Settings {
        Settings {
            domain: Name::from_ascii("registry.internal.").unwrap(),
            ttl: 5,
            allow_warning: false,
            srv_min: BTreeMap::new(),
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

    fn q<'z>(zone: &'z Zone, name: &str, t: RecordType) -> Answer<'z> {
        zone.lookup(&LowerName::from(Name::from_ascii(name).unwrap()), t)
    }

    fn rdata(a: &Answer<'_>) -> Vec<String> {
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
        let z = Zone::build(&registry(), 7, &settings());
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
        let z = Zone::build(&registry(), 7, &settings());
        assert_eq!(
            rdata(&q(&z, "etcd.dc1.registry.internal.", RecordType::A)),
            ["10.0.0.1"]
        );
        let warn = Settings {
            allow_warning: true,
            ..settings()
        };
        let z = Zone::build(&registry(), 7, &warn);
        assert_eq!(
            rdata(&q(&z, "etcd.dc1.registry.internal.", RecordType::A)),
            ["10.0.0.1", "10.0.0.2"]
        );
    }

    #[test]
    fn srv_lists_usable_publishers_with_their_addresses() {
        let z = Zone::build(&registry(), 7, &settings());
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
        let z = Zone::build(&r, 7, &gated);
        assert!(matches!(
            q(
                &z,
                "_etcd-server._tcp.etcd.dc1.registry.internal.",
                RecordType::SRV
            ),
            Answer::NoData
        ));
        assert_eq!(z.withheld.len(), 1);
        assert_eq!((z.withheld[0].have, z.withheld[0].need), (1, 2));
        host(
            &mut r,
            "dc1/etcd/e4",
            "10.0.0.4",
            "passing",
            &[("etcd-server", 2380)],
        );
        let z = Zone::build(&r, 8, &gated);
        assert_eq!(
            rdata(&q(
                &z,
                "_etcd-server._tcp.etcd.dc1.registry.internal.",
                RecordType::SRV
            ))
            .len(),
            2
        );
        assert!(z.withheld.is_empty());
    }

    #[test]
    fn unknown_names_outside_names_and_empty_non_terminals() {
        let z = Zone::build(&registry(), 7, &settings());
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
    fn names_that_dns_cannot_carry_are_listed_not_served() {
        let mut r = Registry::default();
        let long = "h".repeat(64);
        host(
            &mut r,
            &format!("dc1/web/{long}"),
            "10.0.0.9",
            "passing",
            &[],
        );
        let z = Zone::build(&r, 1, &settings());
        assert_eq!(z.unnamed.len(), 1);
        assert!(matches!(
            q(&z, "web.dc1.registry.internal.", RecordType::A),
            Answer::NxDomain
        ));
    }
}
