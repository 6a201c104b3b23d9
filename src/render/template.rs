//! Templates: minijinja, strict, over one consistent view of the registry
//! (contract section 6).
//!
//! The data a template sees:
//! - `hosts(scope="", healthy=false)`: the present hosts under
//!   `DC[/ROLE[/HOST]]`, sorted by dc, role, host;
//! - `revision`: the etcd revision rendered;
//! - confd's `ls(key)`, `lsdir(key)`, `getv(key[, default])`,
//!   `exists(key)` over the raw keys, with absolute keys.
//!
//! Undefined variables and attributes are errors: a typo must not render an
//! empty backend list into a load balancer's config.

use std::collections::BTreeMap;
use std::sync::Arc;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind, UndefinedBehavior};
use serde::Serialize;

use crate::registry::{CheckView, Registry};

/// A view of the registry at one revision, shared by every render of it.
#[derive(Debug, Clone)]
pub struct View {
    pub prefix: String,
    pub revision: i64,
    pub registry: Arc<Registry>,
}

/// One host as templates see it.
#[derive(Debug, Serialize)]
struct TemplateHost<'a> {
    dc: &'a str,
    role: &'a str,
    host: &'a str,
    ip: String,
    health: String,
    services: &'a BTreeMap<String, u16>,
    meta: &'a BTreeMap<String, String>,
    maintenance: Option<&'a str>,
    checks: &'a BTreeMap<String, CheckView>,
    owner: Option<&'a str>,
}

impl View {
    /// The present hosts under `scope` (`DC[/ROLE[/HOST]]`), sorted.
    pub fn hosts(&self, scope: &str, healthy: bool) -> Result<(Vec<Value>, Vec<String>), Error> {
        let parts: Vec<&str> = scope
            .trim_matches('/')
            .split('/')
            .filter(|p| !p.is_empty())
            .collect();
        if parts.len() > 3 {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("hosts(): scope {scope:?} has more than DC/ROLE/HOST"),
            ));
        }
        let wanted = |i: usize, v: &str| parts.get(i).is_none_or(|p| *p == v);
        let chosen: Vec<_> = self
            .registry
            .present()
            .filter(|(id, h)| {
                wanted(0, &id.dc)
                    && wanted(1, &id.role)
                    && wanted(2, &id.host)
                    && (!healthy || h.healthy())
            })
            .collect();
        let names = chosen.iter().map(|(id, _)| id.to_string()).collect();
        let values = chosen
            .into_iter()
            .map(|(id, h)| {
                Value::from_serialize(TemplateHost {
                    dc: &id.dc,
                    role: &id.role,
                    host: &id.host,
                    ip: h.ip.map(|i| i.to_string()).unwrap_or_default(),
                    health: h.health.map(|s| s.to_string()).unwrap_or_default(),
                    services: &h.services,
                    meta: &h.meta,
                    maintenance: h.maintenance.as_deref(),
                    checks: &h.checks,
                    owner: h.owner.as_deref(),
                })
            })
            .collect();
        Ok((values, names))
    }

    /// The direct children of `key` (confd's `ls`: leaf names under it).
    fn children(&self, key: &str, dirs: bool) -> Vec<String> {
        let base = format!("{}/", key.trim_end_matches('/'));
        let mut out: Vec<String> = Vec::new();
        for k in self.registry.raw.range(base.clone()..) {
            let Some(rest) = k.0.strip_prefix(&base) else {
                break;
            };
            let (name, deeper) = match rest.split_once('/') {
                Some((n, _)) => (n, true),
                None => (rest, false),
            };
            if deeper == dirs && !name.is_empty() && out.last().map(String::as_str) != Some(name) {
                out.push(name.to_string());
            }
        }
        out.dedup();
        out
    }
}

/// A template environment for one view. `name` is the template's file name
/// (for error messages) and `source` its text.
pub fn render(
    name: &str,
    source: &str,
    view: &View,
) -> Result<(String, std::collections::BTreeSet<String>), Error> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    // The hosts the template listed, for min_hosts and the change summary.
    let listed = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    {
        let (v, listed) = (view.clone(), listed.clone());
        env.add_function(
            "hosts",
            move |scope: Option<String>, kwargs: Kwargs| -> Result<Value, Error> {
                let healthy: Option<bool> = kwargs.get("healthy")?;
                let scope_kw: Option<String> = kwargs.get("scope")?;
                kwargs.assert_all_used()?;
                let scope = scope.or(scope_kw).unwrap_or_default();
                let (hosts, names) = v.hosts(&scope, healthy.unwrap_or(false))?;
                if let Ok(mut seen) = listed.lock() {
                    seen.extend(names);
                }
                Ok(Value::from(hosts))
            },
        );
    }
    {
        let v = view.clone();
        env.add_function("ls", move |key: String| {
            Value::from(v.children(&key, false))
        });
    }
    {
        let v = view.clone();
        env.add_function("lsdir", move |key: String| {
            Value::from(v.children(&key, true))
        });
    }
    {
        let v = view.clone();
        env.add_function(
            "getv",
            move |key: String, default: Option<String>| -> Result<String, Error> {
                match (v.registry.raw.get(&key), default) {
                    (Some(value), _) => Ok(value.clone()),
                    (None, Some(d)) => Ok(d),
                    (None, None) => Err(Error::new(
                        ErrorKind::InvalidOperation,
                        format!("getv({key:?}): no such key (give a default: getv(key, \"\"))"),
                    )),
                }
            },
        );
    }
    {
        let v = view.clone();
        env.add_function("exists", move |key: String| {
            v.registry.raw.contains_key(&key)
                || !v.children(&key, false).is_empty()
                || !v.children(&key, true).is_empty()
        });
    }
    env.add_global("revision", view.revision);
    env.add_global("prefix", view.prefix.clone());
    let text = env.template_from_named_str(name, source)?.render(())?;
    let names = listed.lock().map(|s| s.clone()).unwrap_or_default();
    Ok((text, names))
}

/// A template error as an operator reads it: the template, the line, a
/// snippet, and the cause.
pub fn describe(e: &Error) -> String {
    let mut text = e.to_string();
    let detail = e.display_debug_info().to_string();
    if !detail.trim().is_empty() {
        text.push('\n');
        text.push_str(detail.trim_end());
    }
    text
}
