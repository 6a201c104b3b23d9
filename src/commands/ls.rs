//! `registrar ls [DC[/ROLE[/HOST]]] [--healthy] [-o table|json|ip]`: one
//! range read at one revision, so a host is never shown half-written.

use std::io::Write;

use serde::Serialize;
use tokio::time::Instant;

use super::{Failure, etcd_failure, exit, report_malformed, scope};
use crate::cli::{LsArgs, LsFormat};
use crate::config::Config;
use crate::etcd::{Etcd, Revision, retry_until};
use crate::registry::{HostId, HostView, Registry};

/// The `-o json` document. Stable: fields are only ever added.
#[derive(Serialize)]
pub struct Listing<'a> {
    /// The etcd revision the listing was read at (`0`: etcd did not say).
    #[serde(serialize_with = "crate::registry::wire_or_zero")]
    pub revision: Option<Revision>,
    pub hosts: Vec<JsonHost<'a>>,
}

#[derive(Serialize)]
pub struct JsonHost<'a> {
    pub dc: &'a str,
    pub role: &'a str,
    pub host: &'a str,
    #[serde(flatten)]
    pub view: &'a HostView,
    /// The lease in etcdctl's hex form.
    pub lease_hex: String,
}

pub async fn run(config: &Config, args: &LsArgs) -> Result<(), Failure> {
    let scope = scope(config, args.path.as_deref(), &args.one_shot.common, 3)?;
    let key_scope = scope.key.clone();
    let etcd = Etcd::new(&config.etcd).map_err(|e| Failure::new(exit::DENIED, e))?;
    let deadline = Instant::now() + args.one_shot.timeout;
    let resp = retry_until(deadline, || {
        let key_scope = key_scope.clone();
        etcd.call("read the registry", move |mut c| {
            let key_scope = key_scope.clone();
            async move {
                c.get(
                    key_scope,
                    Some(etcd_client::GetOptions::new().with_prefix()),
                )
                .await
            }
        })
    })
    .await
    .map_err(|e| etcd_failure(e, &etcd))?;
    let (registry, bad) = Registry::from_kvs(&config.prefix, resp.kvs());
    bad.into_iter().for_each(report_malformed);
    let revision = Revision::of_header(resp.header());
    let hosts: Vec<(&HostId, &HostView)> = registry
        .present()
        .filter(|(id, h)| scope.includes(id) && (!args.healthy || h.healthy()))
        .collect();
    let text = render(&hosts, args.output, revision);
    let mut out = std::io::stdout().lock();
    // A closed pipe (`| head`) is not an error.
    let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
    Ok(())
}

/// Renders a listing. An empty listing is no lines as a table or as
/// addresses, and still one document as JSON (`{"revision":N,"hosts":[]}`),
/// so that `jq '.hosts|length'` says 0.
pub fn render(
    hosts: &[(&HostId, &HostView)],
    format: LsFormat,
    revision: Option<Revision>,
) -> String {
    if hosts.is_empty() && format != LsFormat::Json {
        return String::new();
    }
    match format {
        LsFormat::Ip => {
            let mut seen = std::collections::BTreeSet::new();
            hosts
                .iter()
                .filter_map(|(_, h)| h.ip)
                .filter(|ip| seen.insert(*ip))
                .map(|ip| format!("{ip}\n"))
                .collect()
        }
        LsFormat::Json => {
            let listing = Listing {
                revision,
                hosts: hosts
                    .iter()
                    .map(|(id, view)| JsonHost {
                        dc: &id.dc,
                        role: &id.role,
                        host: &id.host,
                        view,
                        lease_hex: view.lease.map_or("0".into(), |l| l.to_string()),
                    })
                    .collect(),
            };
            serde_json::to_string_pretty(&listing)
                .map(|s| s + "\n")
                .unwrap_or_default()
        }
        LsFormat::Table => {
            let header = [
                "DC", "ROLE", "HOST", "IP", "HEALTH", "CHECKS", "SERVICES", "MAINT",
            ]
            .map(String::from);
            let rows: Vec<[String; 8]> = hosts
                .iter()
                .map(|(id, h)| {
                    let services = if h.services.is_empty() {
                        "-".to_string()
                    } else {
                        h.services
                            .iter()
                            .map(|(n, p)| format!("{n}:{p}"))
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    [
                        id.dc.clone(),
                        id.role.clone(),
                        id.host.clone(),
                        h.ip.map(|i| i.to_string()).unwrap_or_default(),
                        h.health.map(|s| s.to_string()).unwrap_or_default(),
                        h.checks_summary(),
                        services,
                        h.maintenance.clone().unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            let mut widths = header.clone().map(|h| h.len());
            for row in &rows {
                for (w, cell) in widths.iter_mut().zip(row) {
                    *w = (*w).max(cell.chars().count());
                }
            }
            let line = |cells: &[String; 8]| {
                let mut s = String::new();
                for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                    if i == 7 {
                        s.push_str(cell);
                    } else {
                        s.push_str(&format!("{cell:<w$}  "));
                    }
                }
                s.trim_end().to_string() + "\n"
            };
            std::iter::once(&header)
                .chain(rows.iter())
                .map(line)
                .collect()
        }
    }
}
