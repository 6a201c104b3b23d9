//! What `check-config` prints: every effective value, never a password.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::{AddressChoice, Config, TlsFiles};
use crate::cli::LogFormat;

impl Config {
    /// The configuration as check-config prints it: every effective value,
    /// never a password.
    pub fn to_display_yaml(&self) -> String {
        #[derive(Serialize)]
        struct Shown<'a> {
            endpoints: &'a [String],
            prefix: &'a str,
            dc: &'a Option<String>,
            roles: &'a [String],
            host: &'a Option<String>,
            address: String,
            allow_loopback: bool,
            ttl: String,
            machine_id: &'a Option<String>,
            tls: &'a Option<TlsFiles>,
            user: Option<String>,
            state_dir: &'a Path,
            log_format: LogFormat,
            request_timeout: String,
            connect_timeout: String,
            services: &'a BTreeMap<String, u16>,
            meta: &'a BTreeMap<String, String>,
            output_refresh: String,
            checks: Vec<BTreeMap<&'static str, String>>,
            metrics_listen: Option<String>,
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            srv_min: &'a BTreeMap<String, usize>,
            fail_static: String,
            #[serde(skip_serializing_if = "Vec::is_empty")]
            templates: Vec<BTreeMap<&'static str, String>>,
        }
        let address = match &self.address {
            AddressChoice::Explicit(ip) => format!("ip {ip}"),
            AddressChoice::Interface(i) => {
                format!("first {} address of interface {i}", self.family())
            }
            AddressChoice::Cidr(n) => format!("first local address in {n}"),
            AddressChoice::DefaultRoute => {
                format!(
                    "first {} address of the default-route interface",
                    self.family()
                )
            }
        };
        let shown = Shown {
            endpoints: &self.etcd.endpoints,
            prefix: &self.prefix,
            dc: &self.dc,
            roles: &self.roles,
            host: &self.host,
            address,
            allow_loopback: self.allow_loopback,
            ttl: humantime::format_duration(self.ttl).to_string(),
            machine_id: &self.machine_id,
            tls: &self.etcd.tls,
            user: self
                .etcd
                .user
                .as_ref()
                .map(|u| format!("{} (password hidden)", u.name)),
            state_dir: &self.state_dir,
            log_format: self.log_format,
            request_timeout: humantime::format_duration(self.etcd.request_timeout).to_string(),
            connect_timeout: humantime::format_duration(self.etcd.connect_timeout).to_string(),
            services: &self.services,
            meta: &self.meta,
            output_refresh: humantime::format_duration(self.output_refresh).to_string(),
            checks: self.checks.iter().map(check_display).collect(),
            metrics_listen: self.metrics_listen.map(|a| a.to_string()),
            srv_min: &self.srv_min,
            fail_static: fail_static_display(self.fail_static),
            templates: self.templates.iter().map(template_display).collect(),
        };
        serde_yaml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    fn family(&self) -> &'static str {
        if self.ipv6 { "IPv6" } else { "IPv4" }
    }
}

fn fail_static_display(f: crate::registry::hold::FailStatic) -> String {
    if f.settle.is_zero() {
        return "off (settle 0s)".into();
    }
    format!(
        "settle {}, max_drop {}%",
        humantime::format_duration(f.settle),
        (f.max_drop * 100.0).round()
    )
}

/// A template as `check-config` shows it, every default filled in.
fn template_display(t: &super::TemplateSpec) -> BTreeMap<&'static str, String> {
    let argv = |a: &Option<Vec<String>>| a.as_ref().map_or("none".into(), |v| format!("{v:?}"));
    let mut m = BTreeMap::new();
    m.insert("source", t.source.display().to_string());
    m.insert("destination", t.destination.display().to_string());
    m.insert("check", argv(&t.check));
    m.insert("reload", argv(&t.reload));
    m.insert(
        "wait",
        format!(
            "min {}, max {}",
            humantime::format_duration(t.wait_min),
            humantime::format_duration(t.wait_max)
        ),
    );
    m.insert(
        "min_hosts",
        t.min_hosts.map_or("none".into(), |n| n.to_string()),
    );
    m.insert(
        "mode",
        t.mode.map_or("the existing file's, else 0644".into(), |m| {
            format!("{m:04o}")
        }),
    );
    m.insert(
        "command_timeout",
        humantime::format_duration(t.command_timeout).to_string(),
    );
    m.insert("max_output", format!("{} bytes", t.max_output));
    m.insert("fail_static", fail_static_display(t.fail_static));
    m.insert(
        "haproxy",
        t.haproxy
            .as_ref()
            .map_or("none (every change reloads)".into(), |h| {
                format!(
                    "socket {}, drain {}",
                    h.socket.display(),
                    humantime::format_duration(h.drain)
                )
            }),
    );
    m
}

fn check_display(c: &crate::check::Spec) -> BTreeMap<&'static str, String> {
    use crate::check::Kind;
    let d = |d: Duration| humantime::format_duration(d).to_string();
    let mut m = BTreeMap::new();
    m.insert("name", c.name.clone());
    match &c.kind {
        Kind::Exec(argv) => m.insert("exec", format!("{argv:?}")),
        Kind::Shell(line) => m.insert("shell", line.clone()),
        Kind::Http(url) => m.insert("http", url.clone()),
        Kind::Tcp(addr) => m.insert("tcp", addr.clone()),
    };
    m.insert("interval", d(c.interval));
    m.insert("timeout", d(c.timeout));
    m.insert(
        "thresholds",
        format!(
            "success_before_passing {}, failures_before_warning {}, failures_before_critical {}",
            c.thresholds.success_before_passing,
            c.thresholds.failures_before_warning,
            c.thresholds.failures_before_critical
        ),
    );
    if let Some(after) = c.deregister_after {
        m.insert("deregister_after", d(after));
    }
    m
}
