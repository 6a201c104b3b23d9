//! Whether a rendered haproxy config can reach haproxy through its runtime
//! API instead of a reload (design.md section 6.9), as a pure decision over
//! the old and the new file's text.
//!
//! [`plan`] reads both files into sections and the `server` lines of their
//! backends. When the files differ only in servers of backends that exist
//! in both (added, removed, address, port, weight, `disabled`), it returns
//! the [`Change`]s that make haproxy run the new file without a reload.
//! Anything else is a [`Reload`] with the reason: a section added, removed
//! or edited, a server option other than those, an address that is not an
//! IP, servers reordered (ids and hashing follow the order), an addition
//! to a backend with a `default-server` (a server added at runtime does not
//! inherit it, so it would not be the server a reload makes), or to one
//! whose balance algorithm is static (haproxy refuses `add server` there).
//!
//! The parser is deliberately small: it knows section keywords and `server`
//! lines. A line it cannot read with certainty (quotes, backslashes) is
//! compared as text, and a server line it cannot read makes any change to
//! that server a reload. It never has to understand a file to be safe:
//! whatever it does not understand goes through `reload`.

use std::collections::BTreeMap;
use std::net::IpAddr;

/// Section keywords of haproxy 2.6's configuration.
const SECTIONS: &[&str] = &[
    "global",
    "defaults",
    "frontend",
    "backend",
    "listen",
    "resolvers",
    "peers",
    "userlist",
    "mailers",
    "program",
    "http-errors",
    "ring",
    "cache",
    "fcgi-app",
    "log-forward",
];

/// Keywords `add server` takes in haproxy 2.6 (management.txt, "add
/// server") that are followed by a value; [`FLAGS`] are the ones that
/// stand alone. A new server with another keyword cannot be added at
/// runtime.
const VALUED: &[&str] = &[
    "agent-addr",
    "agent-inter",
    "agent-port",
    "agent-send",
    "alpn",
    "addr",
    "ca-file",
    "check-alpn",
    "check-proto",
    "check-sni",
    "ciphers",
    "ciphersuites",
    "crl-file",
    "crt",
    "downinter",
    "error-limit",
    "fall",
    "fastinter",
    "id",
    "inter",
    "maxconn",
    "maxqueue",
    "minconn",
    "npn",
    "observe",
    "on-error",
    "on-marked-down",
    "on-marked-up",
    "pool-low-conn",
    "pool-max-conn",
    "pool-purge-delay",
    "port",
    "proto",
    "proxy-v2-options",
    "rise",
    "slowstart",
    "sni",
    "source",
    "ssl-max-ver",
    "ssl-min-ver",
    "track",
    "usesrc",
    "verify",
    "verifyhost",
    "weight",
    "ws",
];

/// The keywords `add server` takes in haproxy 2.6 that stand alone.
const FLAGS: &[&str] = &[
    "agent-check",
    "allow-0rtt",
    "backup",
    "check",
    "check-send-proxy",
    "check-ssl",
    "check-via-socks4",
    "disabled",
    "enabled",
    "force-sslv3",
    "force-tlsv10",
    "force-tlsv11",
    "force-tlsv12",
    "force-tlsv13",
    "no-ssl-reuse",
    "no-sslv3",
    "no-tlsv10",
    "no-tlsv11",
    "no-tlsv12",
    "no-tlsv13",
    "no-tls-tickets",
    "send-proxy",
    "send-proxy-v2",
    "send-proxy-v2-ssl",
    "send-proxy-v2-ssl-cn",
    "ssl",
    "tfo",
    "tls-tickets",
];

/// Balance algorithms that let `add server` add to a backend without
/// `hash-type consistent` (haproxy needs a dynamic algorithm).
const DYNAMIC_BALANCE: &[&str] = &["roundrobin", "leastconn", "first", "random"];

/// One `server` line of a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub name: String,
    /// The address as written (`10.0.0.1:80`, `[::1]:80`).
    pub addr: String,
    /// The address as an IP and port, when it is one.
    pub ip: Option<(IpAddr, Option<u16>)>,
    /// `weight N`, as written; `None` is haproxy's default of 1.
    pub weight: Option<u32>,
    /// `disabled`: the server starts in maintenance.
    pub disabled: bool,
    /// Every other option, in order.
    pub options: Vec<String>,
    /// Whether the line could be read with certainty (no quotes or
    /// escapes, a valid weight).
    pub plain: bool,
}

impl Server {
    /// The arguments of `add server B/NAME ...`: the line after its name.
    pub fn add_args(&self) -> String {
        let mut args = vec![self.addr.clone()];
        args.extend(self.options.iter().cloned());
        if let Some(w) = self.weight {
            args.push(format!("weight {w}"));
        }
        if self.disabled {
            args.push("disabled".into());
        }
        args.join(" ")
    }

    /// Whether the line has `check` (health checks to enable after an
    /// `add server`).
    pub fn checks(&self) -> bool {
        self.options.iter().any(|o| o == "check")
    }

    /// Whether the line has `agent-check`.
    pub fn agent_checks(&self) -> bool {
        self.options.iter().any(|o| o == "agent-check")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Section {
    /// The header line's words: `backend web`.
    header: Vec<String>,
    /// Every line but the servers, trimmed, comments and blank lines left
    /// out.
    lines: Vec<String>,
    /// The `server` lines of a backend or listen section, in order.
    servers: Vec<Server>,
}

impl Section {
    fn kind(&self) -> &str {
        self.header.first().map_or("", String::as_str)
    }

    fn name(&self) -> &str {
        self.header.get(1).map_or("", String::as_str)
    }

    fn has_servers(&self) -> bool {
        matches!(self.kind(), "backend" | "listen")
    }

    /// The first word of each line, for "does it say X".
    fn says(&self, keyword: &str) -> Option<&str> {
        self.lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(keyword))
            .map(String::as_str)
    }
}

/// A haproxy configuration as [`plan`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    sections: Vec<Section>,
}

impl Parsed {
    pub fn parse(text: &str) -> Parsed {
        let mut sections: Vec<Section> = vec![Section {
            header: Vec::new(),
            lines: Vec::new(),
            servers: Vec::new(),
        }];
        for raw in text.lines() {
            let line = strip_comment(raw).trim();
            if line.is_empty() {
                continue;
            }
            let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
            if SECTIONS.contains(&words[0].as_str()) {
                sections.push(Section {
                    header: words,
                    lines: Vec::new(),
                    servers: Vec::new(),
                });
                continue;
            }
            let Some(section) = sections.last_mut() else {
                continue;
            };
            if section.has_servers() && words[0] == "server" {
                section.servers.push(parse_server(line, &words));
            } else {
                section.lines.push(words.join(" "));
            }
        }
        Parsed { sections }
    }

    /// The servers of each backend and listen section: name → servers.
    pub fn backends(&self) -> BTreeMap<&str, &[Server]> {
        self.sections
            .iter()
            .filter(|s| s.has_servers())
            .map(|s| (s.name(), s.servers.as_slice()))
            .collect()
    }
}

/// Everything from an unquoted, unescaped `#` on.
fn strip_comment(line: &str) -> &str {
    let mut quoted: Option<char> = None;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' | '\'' if quoted == Some(c) => quoted = None,
            '"' | '\'' if quoted.is_none() => quoted = Some(c),
            '#' if quoted.is_none() => return &line[..i],
            _ => {}
        }
    }
    line
}

fn parse_server(line: &str, words: &[String]) -> Server {
    let mut plain = !line.contains(['"', '\'', '\\']) && words.len() >= 3;
    let name = words.get(1).cloned().unwrap_or_default();
    let addr = words.get(2).cloned().unwrap_or_default();
    let mut weight = None;
    let mut disabled = false;
    let mut options = Vec::new();
    let mut rest = words.iter().skip(3);
    while let Some(w) = rest.next() {
        match w.as_str() {
            "weight" => match rest.next().map(|n| n.parse::<u32>()) {
                Some(Ok(n)) => weight = Some(n),
                Some(Err(_)) | None => plain = false,
            },
            "disabled" => disabled = true,
            // `enabled` is haproxy's default; a line saying it is the same
            // server as one that does not.
            "enabled" => disabled = false,
            _ => options.push(w.clone()),
        }
    }
    Server {
        ip: ip_port(&addr),
        name,
        addr,
        weight,
        disabled,
        options,
        plain,
    }
}

/// `10.0.0.1:80`, `10.0.0.1`, `[::1]:80` or `[::1]` as an IP and port.
fn ip_port(addr: &str) -> Option<(IpAddr, Option<u16>)> {
    let port = |p: &str| -> Option<Option<u16>> {
        if p.is_empty() {
            return Some(None);
        }
        if !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        p.parse::<u16>().ok().map(Some)
    };
    if let Some(rest) = addr.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        let p = match after {
            "" => None,
            _ => port(after.strip_prefix(':')?)?,
        };
        return Some((ip.parse().ok()?, p));
    }
    match addr.split_once(':') {
        Some((ip, p)) if !p.contains(':') => {
            Some((ip.parse::<std::net::Ipv4Addr>().ok()?.into(), port(p)?))
        }
        Some(_) => None,
        None => Some((addr.parse::<std::net::Ipv4Addr>().ok()?.into(), None)),
    }
}

/// One step that moves haproxy from the old file to the new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `add server`, then `enable health`/`enable agent` and, unless the
    /// line says `disabled`, `set server ... state ready`.
    Add { backend: String, server: Server },
    /// `set server ... state maint`, then `del server` once it has no
    /// connections.
    Remove { backend: String, server: String },
    /// `set server ... addr IP [port P]`.
    Addr {
        backend: String,
        server: String,
        ip: IpAddr,
        port: Option<u16>,
    },
    /// `set server ... weight N`.
    Weight {
        backend: String,
        server: String,
        weight: u32,
    },
    /// `set server ... state maint` (`disabled`) or `ready`.
    State {
        backend: String,
        server: String,
        disabled: bool,
    },
}

impl Change {
    pub fn backend(&self) -> &str {
        match self {
            Change::Add { backend, .. }
            | Change::Remove { backend, .. }
            | Change::Addr { backend, .. }
            | Change::Weight { backend, .. }
            | Change::State { backend, .. } => backend,
        }
    }

    pub fn server(&self) -> &str {
        match self {
            Change::Add { server, .. } => &server.name,
            Change::Remove { server, .. }
            | Change::Addr { server, .. }
            | Change::Weight { server, .. }
            | Change::State { server, .. } => server,
        }
    }
}

/// Why a difference needs a reload; says what, for the log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reload {
    /// A short label, for the fallbacks metric.
    pub reason: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Reload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

fn reload(reason: &'static str, detail: String) -> Reload {
    Reload { reason, detail }
}

/// The changes that make haproxy, running `old`, run `new`; or why that
/// takes a reload. An empty list: the two run the same servers.
pub fn plan(old: &Parsed, new: &Parsed) -> Result<Vec<Change>, Reload> {
    let headers = |p: &Parsed| {
        p.sections
            .iter()
            .map(|s| s.header.join(" "))
            .collect::<Vec<_>>()
    };
    if headers(old) != headers(new) {
        return Err(reload(
            "sections",
            "the sections differ (a backend, frontend or other section was added, removed or renamed)".into(),
        ));
    }
    let defaults_default_server = new
        .sections
        .iter()
        .any(|s| s.kind() == "defaults" && s.says("default-server").is_some());
    let mut changes = Vec::new();
    // The last `defaults` section read so far: what a backend inherits.
    let mut defaults: Option<&Section> = None;
    for (o, n) in old.sections.iter().zip(&new.sections) {
        if n.kind() == "defaults" {
            defaults = Some(n);
        }
        if o.lines != n.lines {
            let what = if n.header.is_empty() {
                "the lines before the first section".to_string()
            } else {
                format!("section '{}'", n.header.join(" "))
            };
            return Err(reload(
                "settings",
                format!("{what} changed other than in its servers"),
            ));
        }
        if o.servers == n.servers {
            continue;
        }
        let backend = n.name().to_string();
        let olds: BTreeMap<&str, &Server> =
            o.servers.iter().map(|s| (s.name.as_str(), s)).collect();
        let news: BTreeMap<&str, &Server> =
            n.servers.iter().map(|s| (s.name.as_str(), s)).collect();
        if olds.len() != o.servers.len() || news.len() != n.servers.len() {
            return Err(reload(
                "server",
                format!("backend '{backend}' names a server twice"),
            ));
        }
        // The servers in both files must keep their order: haproxy numbers
        // servers by it, and hashing and `balance first` follow the numbers.
        let kept_old: Vec<&str> = o
            .servers
            .iter()
            .map(|s| s.name.as_str())
            .filter(|s| news.contains_key(s))
            .collect();
        let kept_new: Vec<&str> = n
            .servers
            .iter()
            .map(|s| s.name.as_str())
            .filter(|s| olds.contains_key(s))
            .collect();
        if kept_old != kept_new {
            return Err(reload(
                "order",
                format!("backend '{backend}' lists its servers in another order"),
            ));
        }
        for s in &o.servers {
            if !news.contains_key(s.name.as_str()) {
                changes.push(Change::Remove {
                    backend: backend.clone(),
                    server: s.name.clone(),
                });
            }
        }
        for s in &n.servers {
            match olds.get(s.name.as_str()) {
                None => {
                    addable(&backend, s, n, defaults, defaults_default_server)?;
                    changes.push(Change::Add {
                        backend: backend.clone(),
                        server: s.clone(),
                    });
                }
                Some(was) => changes.extend(update(&backend, was, s)?),
            }
        }
    }
    Ok(changes)
}

/// Why server `s` cannot be added to `backend` at runtime, if it cannot.
fn addable(
    backend: &str,
    s: &Server,
    section: &Section,
    defaults: Option<&Section>,
    defaults_default_server: bool,
) -> Result<(), Reload> {
    if !s.plain {
        return Err(reload(
            "server",
            format!(
                "server {backend}/{} has a line render does not read with certainty",
                s.name
            ),
        ));
    }
    if section.says("default-server").is_some() || defaults_default_server {
        return Err(reload(
            "default-server",
            format!(
                "backend '{backend}' has a default-server, which a server added at runtime does not inherit"
            ),
        ));
    }
    let balance = section
        .says("balance")
        .or_else(|| defaults.and_then(|d| d.says("balance")));
    let algorithm = balance
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("roundrobin");
    let consistent = section
        .says("hash-type")
        .or_else(|| defaults.and_then(|d| d.says("hash-type")))
        .is_some_and(|l| l.split_whitespace().nth(1) == Some("consistent"));
    if !DYNAMIC_BALANCE.contains(&algorithm) && !consistent {
        return Err(reload(
            "balance",
            format!(
                "backend '{backend}' balances by '{algorithm}', to which haproxy adds no server at runtime (use roundrobin, leastconn, first, random, or hash-type consistent)"
            ),
        ));
    }
    if let Some(k) = unaddable_keyword(&s.options) {
        return Err(reload(
            "keyword",
            format!(
                "server {backend}/{} uses '{k}', which haproxy 2.6 cannot set on a server added at runtime",
                s.name
            ),
        ));
    }
    Ok(())
}

/// The first keyword of a server's options that `add server` does not
/// take. Keywords in [`FLAGS`] stand alone; those in [`VALUED`] are
/// followed by one value.
fn unaddable_keyword(options: &[String]) -> Option<&str> {
    let mut words = options.iter();
    while let Some(w) = words.next() {
        if VALUED.contains(&w.as_str()) {
            words.next();
        } else if !FLAGS.contains(&w.as_str()) {
            return Some(w);
        }
    }
    None
}

/// The changes from server `was` to server `now` of `backend`.
fn update(backend: &str, was: &Server, now: &Server) -> Result<Vec<Change>, Reload> {
    if was == now {
        return Ok(Vec::new());
    }
    let name = &now.name;
    if !was.plain || !now.plain {
        return Err(reload(
            "server",
            format!("server {backend}/{name} has a line render does not read with certainty"),
        ));
    }
    if was.options != now.options {
        return Err(reload(
            "server",
            format!(
                "server {backend}/{name} changed options other than its address, port, weight or disabled"
            ),
        ));
    }
    let mut out = Vec::new();
    if was.addr != now.addr {
        let Some((ip, port)) = now.ip else {
            return Err(reload(
                "address",
                format!(
                    "server {backend}/{name}'s new address '{}' is not an IP address and port",
                    now.addr
                ),
            ));
        };
        // Dropping the port (or adding one where there was none) switches
        // haproxy's port mapping, which the runtime API does not do here.
        if was.ip.map(|(_, p)| p.is_some()) != Some(port.is_some()) {
            return Err(reload(
                "address",
                format!("server {backend}/{name} gains or loses its port"),
            ));
        }
        out.push(Change::Addr {
            backend: backend.into(),
            server: name.clone(),
            ip,
            port,
        });
    }
    match (was.weight, now.weight) {
        (_, Some(w)) if was.weight != Some(w) => out.push(Change::Weight {
            backend: backend.into(),
            server: name.clone(),
            weight: w,
        }),
        // Without `weight` the server takes its default-server's, which
        // this parser does not follow: a reload sets it.
        (Some(_), None) => {
            return Err(reload(
                "server",
                format!("server {backend}/{name} drops its weight"),
            ));
        }
        _ => {}
    }
    if was.disabled != now.disabled {
        out.push(Change::State {
            backend: backend.into(),
            server: name.clone(),
            disabled: now.disabled,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "global\n    maxconn 100\n\ndefaults\n    mode http\n    timeout connect 1s\n\nfrontend www\n    bind *:80\n    use_backend web if { path_beg /web/ }\n\nbackend web\n    balance roundrobin\n    server a 10.0.0.1:80 check inter 1s\n    server b 10.0.0.2:80 check inter 1s\n";

    fn planned(old: &str, new: &str) -> Result<Vec<Change>, Reload> {
        plan(&Parsed::parse(old), &Parsed::parse(new))
    }

    #[test]
    fn the_same_file_and_comments_or_spacing_need_nothing() {
        assert_eq!(planned(BASE, BASE), Ok(vec![]));
        let spaced = BASE.replace(
            "    server a 10.0.0.1:80 check inter 1s",
            "  server   a 10.0.0.1:80   check\tinter 1s # first\n# a note",
        );
        assert_eq!(planned(BASE, &spaced), Ok(vec![]));
    }

    #[test]
    fn servers_added_removed_moved_reweighted_and_disabled_are_changes() {
        let new = BASE
            .replace(
                "server a 10.0.0.1:80 check inter 1s",
                "server a 10.0.0.9:8080 check inter 1s weight 5",
            )
            .replace(
                "    server b 10.0.0.2:80 check inter 1s\n",
                "    server c 10.0.0.3:80 check inter 1s disabled\n",
            );
        let got = planned(BASE, &new).unwrap();
        let server_c = Parsed::parse(&new).backends()["web"][1].clone();
        assert_eq!(
            got,
            vec![
                Change::Remove {
                    backend: "web".into(),
                    server: "b".into()
                },
                Change::Addr {
                    backend: "web".into(),
                    server: "a".into(),
                    ip: "10.0.0.9".parse().unwrap(),
                    port: Some(8080)
                },
                Change::Weight {
                    backend: "web".into(),
                    server: "a".into(),
                    weight: 5
                },
                Change::Add {
                    backend: "web".into(),
                    server: server_c.clone()
                },
            ]
        );
        assert_eq!(server_c.add_args(), "10.0.0.3:80 check inter 1s disabled");
        assert!(server_c.checks() && server_c.disabled);
        let off = BASE.replace(
            "server b 10.0.0.2:80 check inter 1s",
            "server b 10.0.0.2:80 check inter 1s disabled",
        );
        assert_eq!(
            planned(BASE, &off),
            Ok(vec![Change::State {
                backend: "web".into(),
                server: "b".into(),
                disabled: true
            }])
        );
        assert_eq!(
            planned(&off, BASE),
            Ok(vec![Change::State {
                backend: "web".into(),
                server: "b".into(),
                disabled: false
            }])
        );
        // A weight set is a change; a weight dropped is a reload (the
        // default may come from a default-server, which is not followed).
        let one = BASE.replace(
            "server b 10.0.0.2:80 check inter 1s",
            "server b 10.0.0.2:80 check inter 1s weight 1",
        );
        assert_eq!(planned(BASE, &one).map(|c| c.len()), Ok(1));
        assert_eq!(planned(&one, BASE).unwrap_err().reason, "server");
    }

    #[test]
    fn ipv6_addresses_are_read_with_and_without_a_port() {
        assert_eq!(
            ip_port("[::1]:80"),
            Some(("::1".parse().unwrap(), Some(80)))
        );
        assert_eq!(
            ip_port("[fd00::5]"),
            Some(("fd00::5".parse().unwrap(), None))
        );
        assert_eq!(
            ip_port("10.0.0.1"),
            Some(("10.0.0.1".parse().unwrap(), None))
        );
        assert_eq!(ip_port("10.0.0.1:+80"), None);
        assert_eq!(ip_port("10.0.0.1:80-90"), None);
        assert_eq!(ip_port("db.example:80"), None);
        assert_eq!(ip_port("::1:80"), None);
        assert_eq!(ip_port("10.0.0.1:99999"), None);
        let v6 = BASE.replace("10.0.0.1:80", "[fd00::1]:80");
        assert_eq!(
            planned(BASE, &v6),
            Ok(vec![Change::Addr {
                backend: "web".into(),
                server: "a".into(),
                ip: "fd00::1".parse().unwrap(),
                port: Some(80)
            }])
        );
    }

    #[test]
    fn anything_but_servers_of_existing_backends_is_a_reload() {
        let cases = [
            (BASE.replace("maxconn 100", "maxconn 200"), "settings"),
            (BASE.replace("bind *:80", "bind *:81"), "settings"),
            (BASE.replace("balance roundrobin", "balance leastconn"), "settings"),
            (format!("{BASE}\nbackend db\n    server d 10.0.0.4:5432\n"), "sections"),
            (BASE.replace("backend web", "backend www"), "sections"),
            (BASE.replace("check inter 1s\n    server b", "check inter 2s\n    server b"), "server"),
            (BASE.replace("10.0.0.2:80", "db.example:80"), "address"),
            (BASE.replace("10.0.0.2:80", "10.0.0.2"), "address"),
            (
                BASE.replace("    server a 10.0.0.1:80 check inter 1s\n    server b 10.0.0.2:80 check inter 1s\n", "    server b 10.0.0.2:80 check inter 1s\n    server a 10.0.0.1:80 check inter 1s\n"),
                "order",
            ),
            (BASE.replace("server b 10.0.0.2:80", "server a 10.0.0.2:80"), "server"),
            (BASE.replace("10.0.0.2:80 check", "10.0.0.2:80 \"check\""), "server"),
        ];
        for (new, reason) in cases {
            let got = planned(BASE, &new);
            assert!(
                matches!(&got, Err(r) if r.reason == reason),
                "{reason}: {got:?} for\n{new}"
            );
        }
    }

    #[test]
    fn additions_that_haproxy_would_not_make_the_same_are_a_reload() {
        let add = |base: &str| format!("{base}    server c 10.0.0.3:80 check inter 1s\n");
        let with = |line: &str| {
            BASE.replace(
                "balance roundrobin",
                &format!("balance roundrobin\n    {line}"),
            )
        };
        // A default-server, in the backend or in defaults.
        let b = with("default-server inter 3s");
        assert_eq!(planned(&b, &add(&b)).unwrap_err().reason, "default-server");
        let d = BASE.replace("mode http", "mode http\n    default-server inter 3s");
        assert_eq!(planned(&d, &add(&d)).unwrap_err().reason, "default-server");
        // A static balance algorithm, in the backend or inherited.
        let s = BASE.replace("balance roundrobin", "balance source");
        assert_eq!(planned(&s, &add(&s)).unwrap_err().reason, "balance");
        let i = BASE
            .replace("    balance roundrobin\n", "")
            .replace("mode http", "mode http\n    balance uri");
        assert_eq!(planned(&i, &add(&i)).unwrap_err().reason, "balance");
        // ... unless hashing is consistent; no balance line is roundrobin.
        let c = BASE.replace(
            "balance roundrobin",
            "balance source\n    hash-type consistent",
        );
        assert!(planned(&c, &add(&c)).is_ok());
        let none = BASE.replace("    balance roundrobin\n", "");
        assert!(planned(&none, &add(&none)).is_ok());
        // A keyword `add server` does not take.
        let cookie = format!("{BASE}    server c 10.0.0.3:80 check cookie c1\n");
        assert_eq!(planned(BASE, &cookie).unwrap_err().reason, "keyword");
        // Keywords with values that look like keywords are read by pairs.
        let values = format!(
            "{BASE}    server c 10.0.0.3:80 check on-error mark-down observe layer7 inter 2s backup\n"
        );
        assert!(planned(BASE, &values).is_ok());
        // Removing from such backends is fine.
        let gone = |base: &str| base.replace("    server b 10.0.0.2:80 check inter 1s\n", "");
        assert_eq!(planned(&s, &gone(&s)).map(|c| c.len()), Ok(1));
        assert_eq!(planned(&b, &gone(&b)).map(|c| c.len()), Ok(1));
    }

    #[test]
    fn servers_outside_backends_and_listen_sections_are_plain_lines() {
        let peers = format!("{BASE}\npeers p\n    server a 10.0.0.1:10000\n");
        let moved = peers.replace("10.0.0.1:10000", "10.0.0.2:10000");
        assert_eq!(planned(&peers, &moved).unwrap_err().reason, "settings");
        let listen = "listen l\n    bind *:80\n    server a 10.0.0.1:80\n";
        let more = format!("{listen}    server b 10.0.0.2:80\n");
        assert!(matches!(
            planned(listen, &more).as_deref(),
            Ok([Change::Add { .. }])
        ));
    }

    #[test]
    fn comments_end_at_an_unquoted_hash() {
        assert_eq!(
            strip_comment("server a 1.2.3.4:80 # x"),
            "server a 1.2.3.4:80 "
        );
        assert_eq!(
            strip_comment("http-request set-header X \"a#b\""),
            "http-request set-header X \"a#b\""
        );
        assert_eq!(strip_comment("acl x path \\#y # z"), "acl x path \\#y ");
    }
}
