//! Who this host is: its host name segment, the address it publishes and the
//! machine id that proves ownership of the host name (design.md rule 5).

use std::net::IpAddr;
use std::path::Path;

use crate::config::{AddressChoice, Config};
use crate::layout::{validate_machine_id, validate_segment};

/// The resolved identity of this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub host: String,
    pub ip: IpAddr,
    pub machine_id: String,
}

/// Why the identity could not be resolved. All of these are configuration
/// problems on this host (exit 78).
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("host name {0:?} from gethostname is not a valid segment ({1}); set --host")]
    BadHostname(String, crate::layout::SegmentError),
    #[error("{0}")]
    Address(String),
    #[error("machine id: {0}")]
    MachineId(String),
}

impl Identity {
    /// Resolves host name, address and machine id from a validated config.
    pub fn resolve(config: &Config) -> Result<Identity, IdentityError> {
        let host = match &config.host {
            Some(h) => h.clone(),
            None => short_hostname()?,
        };
        let ip = select_address(&config.address, config.ipv6, config.allow_loopback)?;
        let machine_id = match &config.machine_id {
            Some(id) => id.clone(),
            None => machine_id_from_system(Path::new("/etc/machine-id"), &config.state_dir)?,
        };
        Ok(Identity {
            host,
            ip,
            machine_id,
        })
    }
}

/// The host name up to its first dot.
pub fn short_hostname() -> Result<String, IdentityError> {
    let full = gethostname::gethostname().to_string_lossy().into_owned();
    let short = full.split('.').next().unwrap_or("").to_string();
    validate_segment(&short).map_err(|e| IdentityError::BadHostname(short.clone(), e))?;
    Ok(short)
}

/// `/etc/machine-id` when it holds one, else a random id persisted in the
/// state dir (created on first use, written atomically).
pub fn machine_id_from_system(etc: &Path, state_dir: &Path) -> Result<String, IdentityError> {
    if let Ok(text) = std::fs::read_to_string(etc) {
        let id = text.trim();
        if validate_machine_id(id).is_ok() {
            return Ok(id.to_string());
        }
    }
    let path = state_dir.join("machine-id");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let id = text.trim();
        validate_machine_id(id)
            .map_err(|e| IdentityError::MachineId(format!("{}: {e}", path.display())))?;
        return Ok(id.to_string());
    }
    let id: String = (0..16)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let err = |e: std::io::Error| {
        IdentityError::MachineId(format!(
            "no /etc/machine-id and cannot persist one in {}: {e}; set --machine-id or --state-dir",
            state_dir.display()
        ))
    };
    std::fs::create_dir_all(state_dir).map_err(err)?;
    let tmp = state_dir.join(".machine-id.tmp");
    std::fs::write(&tmp, format!("{id}\n")).map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)?;
    Ok(id)
}

fn family_ok(ip: &IpAddr, ipv6: bool) -> bool {
    ip.is_ipv6() == ipv6
}

/// Picks the address to publish.
pub fn select_address(
    choice: &AddressChoice,
    ipv6: bool,
    allow_loopback: bool,
) -> Result<IpAddr, IdentityError> {
    let usable = |ip: &IpAddr| allow_loopback || !(ip.is_loopback() || ip.is_unspecified());
    let ifaces = || {
        if_addrs::get_if_addrs()
            .map_err(|e| IdentityError::Address(format!("cannot list network interfaces: {e}")))
    };
    match choice {
        AddressChoice::Explicit(ip) => Ok(*ip),
        AddressChoice::Interface(name) => {
            let all = ifaces()?;
            if !all.iter().any(|i| &i.name == name) {
                let names: std::collections::BTreeSet<_> =
                    all.iter().map(|i| i.name.as_str()).collect();
                return Err(IdentityError::Address(format!(
                    "interface {name:?} does not exist; this host has {names:?}"
                )));
            }
            all.iter()
                .filter(|i| &i.name == name)
                .map(|i| i.ip())
                .find(|ip| family_ok(ip, ipv6) && usable(ip))
                .ok_or_else(|| {
                    IdentityError::Address(format!(
                        "interface {name:?} has no usable {} address",
                        if ipv6 { "IPv6" } else { "IPv4" }
                    ))
                })
        }
        AddressChoice::Cidr(net) => ifaces()?
            .iter()
            .map(|i| i.ip())
            .find(|ip| net.contains(ip) && usable(ip))
            .ok_or_else(|| IdentityError::Address(format!("no local address is inside {net}"))),
        AddressChoice::DefaultRoute => {
            let iface = default_route_interface(ipv6).ok_or_else(|| {
                IdentityError::Address(
                    "this host has no default route; set ip, interface or cidr".to_string(),
                )
            })?;
            ifaces()?
                .iter()
                .filter(|i| i.name == iface)
                .map(|i| i.ip())
                .find(|ip| family_ok(ip, ipv6) && usable(ip) && !is_link_local(ip))
                .ok_or_else(|| {
                    IdentityError::Address(format!(
                        "default-route interface {iface:?} has no usable address; set ip, interface or cidr"
                    ))
                })
        }
    }
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// The interface of the default route, read from /proc/net/route (IPv4) or
/// /proc/net/ipv6_route (IPv6).
pub fn default_route_interface(ipv6: bool) -> Option<String> {
    if ipv6 {
        let text = std::fs::read_to_string("/proc/net/ipv6_route").ok()?;
        parse_ipv6_route(&text)
    } else {
        let text = std::fs::read_to_string("/proc/net/route").ok()?;
        parse_ipv4_route(&text)
    }
}

fn parse_ipv4_route(text: &str) -> Option<String> {
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
    })
}

fn parse_ipv6_route(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // dest dest_len src src_len next_hop metric refcnt use flags iface
        (f.len() >= 10 && f[0].chars().all(|c| c == '0') && f[1] == "00" && f[9] != "lo")
            .then(|| f[9].to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_default_routes() {
        let v4 = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
                  eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                  eth1\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(parse_ipv4_route(v4).as_deref(), Some("eth1"));
        let v6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     ens3\n";
        assert_eq!(parse_ipv6_route(v6).as_deref(), Some("ens3"));
        assert_eq!(parse_ipv4_route("Iface\n"), None);
    }

    #[test]
    fn machine_id_is_persisted_when_the_system_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-machine-id");
        let state = dir.path().join("state");
        let first = machine_id_from_system(&missing, &state).unwrap();
        let second = machine_id_from_system(&missing, &state).unwrap();
        assert_eq!(first, second);
        assert_eq!(first.len(), 32);
        let etc = dir.path().join("machine-id");
        std::fs::write(&etc, "abc123\n").unwrap();
        assert_eq!(machine_id_from_system(&etc, &state).unwrap(), "abc123");
    }

    #[test]
    fn loopback_is_only_chosen_when_allowed() {
        let lo = AddressChoice::Interface("lo".into());
        assert!(select_address(&lo, false, false).is_err());
        assert_eq!(
            select_address(&lo, false, true).unwrap(),
            "127.0.0.1".parse::<IpAddr>().unwrap()
        );
        let err =
            select_address(&AddressChoice::Interface("nope0".into()), false, false).unwrap_err();
        assert!(err.to_string().contains("\"nope0\" does not exist"));
    }
}
