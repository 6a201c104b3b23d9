//! Templates: minijinja, strict, over one consistent view of the registry
//! (design.md section 6).
//!
//! The data a template sees:
//! - `hosts(scope="", healthy=false)`: the present hosts under
//!   `DC[/ROLE[/HOST]]`, sorted by dc, role, host;
//! - `revision`: the etcd revision rendered;
//! - confd's `ls(key)`, `lsdir(key)`, `getv(key[, default])`,
//!   `exists(key)` over the raw keys, with absolute keys.
//!
//! Undefined variables and attributes are errors: a typo must not render an
//! empty backend list into a load balancer's config. Only keys whose every
//! segment is valid (design.md section 1) reach a template; the registry
//! leaves the others out (see [`crate::registry`]).
//!
//! A render also records, for the loop around it:
//! - which hosts it *listed*: those whose address (`ip`, or a `getv` of an
//!   `ip` key) it read. `min_hosts` counts these, so a host that a template
//!   looks at but does not write (a role's host without the service) does
//!   not count;
//! - what it *read*: the key prefixes its function calls looked at. A
//!   change outside them cannot change the output, so it neither renders
//!   the template again nor resets its quiet timer. A template that uses
//!   `revision` reads everything.
//!
//! A render stops as soon as its output passes `max_output`, and runs on a
//! fuel budget, so neither a huge output nor an endless loop can take the
//! process's memory or time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use minijinja::value::{Enumerator, Kwargs, Object, Value};
use minijinja::{Environment, Error, ErrorKind, UndefinedBehavior};

use crate::etcd::Revision;
use crate::layout::{Leaf, parse_key};
use crate::registry::{HostId, HostView, Registry};

/// Instructions one render may run: a 10,000-host haproxy config takes
/// about a million; a loop that never ends runs out in seconds.
const FUEL: u64 = 500_000_000;

/// A view of the registry at one revision, shared by every render of it.
#[derive(Debug, Clone)]
pub struct View {
    pub prefix: String,
    pub revision: Revision,
    pub registry: Arc<Registry>,
}

/// A template as loaded: its text, parsed once to refuse syntax errors at
/// load time.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub text: String,
    /// It reads `revision`, so any change anywhere changes its output.
    uses_revision: bool,
}

/// The keys a render looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reads {
    /// Everything: not rendered yet, or it uses `revision`.
    All,
    /// Exact keys and key prefixes (ending in `/`).
    Keys(BTreeSet<String>),
}

impl Reads {
    /// Whether a change of `key` may change the output.
    pub fn covers(&self, key: &str) -> bool {
        let Reads::Keys(keys) = self else { return true };
        keys.contains(key)
            || key
                .match_indices('/')
                .any(|(i, _)| keys.contains(&key[..=i]))
    }
}

/// What one render produced.
#[derive(Debug)]
pub struct Rendered {
    pub text: Vec<u8>,
    /// The hosts (`dc/role/host`) whose address it read.
    pub listed: BTreeSet<String>,
    pub reads: Reads,
}

/// Why a render produced nothing.
#[derive(Debug, thiserror::Error)]
pub enum RenderFailure {
    #[error("{}", describe(.0, .1))]
    Template(Error, String),
    #[error("the output passed max_output ({limit} bytes); nothing was written")]
    TooLarge { limit: usize },
}

/// What the functions of one render note down.
#[derive(Debug, Default)]
struct Track {
    listed: BTreeSet<String>,
    reads: BTreeSet<String>,
}

type Tracker = Arc<Mutex<Track>>;

fn note(track: &Tracker, f: impl FnOnce(&mut Track)) {
    if let Ok(mut t) = track.lock() {
        f(&mut t);
    }
}

/// One host as templates see it: a map whose `ip` marks it listed.
#[derive(Debug)]
struct HostValue {
    id: String,
    fields: BTreeMap<&'static str, Value>,
    track: Tracker,
}

const HOST_FIELDS: &[&str] = &[
    "checks",
    "dc",
    "health",
    "host",
    "ip",
    "maintenance",
    "meta",
    "owner",
    "role",
    "services",
];

impl HostValue {
    fn new(id: &HostId, h: &HostView, track: Tracker) -> HostValue {
        let text = |s: Option<String>| s.map_or(Value::from(()), Value::from);
        let fields = BTreeMap::from([
            ("dc", Value::from(id.dc.as_str())),
            ("role", Value::from(id.role.as_str())),
            ("host", Value::from(id.host.as_str())),
            (
                "ip",
                Value::from(h.ip.map(|i| i.to_string()).unwrap_or_default()),
            ),
            (
                "health",
                Value::from(h.health.map(|s| s.to_string()).unwrap_or_default()),
            ),
            ("services", Value::from_serialize(&h.services)),
            ("meta", Value::from_serialize(&h.meta)),
            ("maintenance", text(h.maintenance.clone())),
            ("checks", Value::from_serialize(&h.checks)),
            ("owner", text(h.owner.clone())),
        ]);
        HostValue {
            id: id.to_string(),
            fields,
            track,
        }
    }
}

impl Object for HostValue {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let key = key.as_str()?;
        let value = self.fields.get(key).cloned()?;
        if key == "ip" {
            note(&self.track, |t| {
                t.listed.insert(self.id.clone());
            });
        }
        Some(value)
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(HOST_FIELDS)
    }
}

impl View {
    /// The present hosts under `scope` (`DC[/ROLE[/HOST]]`), sorted.
    fn hosts(&self, scope: &str, healthy: bool, track: &Tracker) -> Result<Vec<Value>, Error> {
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
        let mut read = format!("{}/", self.prefix);
        for p in &parts {
            read.push_str(p);
            read.push('/');
        }
        note(track, |t| {
            t.reads.insert(read);
        });
        let wanted = |i: usize, v: &str| parts.get(i).is_none_or(|p| *p == v);
        Ok(self
            .registry
            .present()
            .filter(|(id, h)| {
                wanted(0, &id.dc)
                    && wanted(1, &id.role)
                    && wanted(2, &id.host)
                    && (!healthy || h.healthy())
            })
            .map(|(id, h)| Value::from_object(HostValue::new(id, h, track.clone())))
            .collect())
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

    /// Notes that `key` was read, as a key and as a directory.
    fn read_key(&self, track: &Tracker, key: &str) {
        note(track, |t| {
            t.reads.insert(key.to_string());
            t.reads.insert(format!("{}/", key.trim_end_matches('/')));
        });
    }
}

/// A fresh environment with registrar's settings (strict, fuel, trailing
/// newline kept).
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    env.set_fuel(Some(FUEL));
    env
}

impl Source {
    /// Parses `text`; a syntax error is refused here, at load time.
    pub fn parse(name: &str, text: String) -> Result<Source, RenderFailure> {
        let env = environment();
        let uses_revision = {
            let t = env
                .template_from_named_str(name, &text)
                .map_err(|e| RenderFailure::Template(e, text.clone()))?;
            t.undeclared_variables(false).contains("revision")
        };
        Ok(Source {
            name: name.to_string(),
            text,
            uses_revision,
        })
    }
}

/// An `io::Write` that refuses to grow past a limit.
struct Capped {
    buf: Vec<u8>,
    limit: usize,
    over: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.limit {
            self.over = true;
            return Err(std::io::Error::other("max_output reached"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Renders `source` over `view`, refusing output over `max_output` bytes.
pub fn render(source: &Source, view: &View, max_output: usize) -> Result<Rendered, RenderFailure> {
    let mut env = environment();
    let track: Tracker = Arc::default();
    {
        let (v, track) = (view.clone(), track.clone());
        env.add_function(
            "hosts",
            move |scope: Option<String>, kwargs: Kwargs| -> Result<Value, Error> {
                let healthy: Option<bool> = kwargs.get("healthy")?;
                let scope_kw: Option<String> = kwargs.get("scope")?;
                kwargs.assert_all_used()?;
                let scope = scope.or(scope_kw).unwrap_or_default();
                Ok(Value::from(v.hosts(
                    &scope,
                    healthy.unwrap_or(false),
                    &track,
                )?))
            },
        );
    }
    for (name, dirs) in [("ls", false), ("lsdir", true)] {
        let (v, track) = (view.clone(), track.clone());
        env.add_function(name, move |key: String| {
            note(&track, |t| {
                t.reads.insert(format!("{}/", key.trim_end_matches('/')));
            });
            Value::from(v.children(&key, dirs))
        });
    }
    {
        let (v, track) = (view.clone(), track.clone());
        env.add_function(
            "getv",
            move |key: String, default: Option<String>| -> Result<String, Error> {
                v.read_key(&track, &key);
                // An address read through getv lists its host, as `h.ip` does.
                if let Some((dir, Leaf::Ip)) = parse_key(&v.prefix, &key) {
                    let id = HostId {
                        dc: dir.dc,
                        role: dir.role,
                        host: dir.host,
                    };
                    if v.registry.hosts.get(&id).is_some_and(HostView::present) {
                        note(&track, |t| {
                            t.listed.insert(id.to_string());
                        });
                    }
                }
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
        let (v, track) = (view.clone(), track.clone());
        env.add_function("exists", move |key: String| {
            v.read_key(&track, &key);
            v.registry.raw.contains_key(&key)
                || !v.children(&key, false).is_empty()
                || !v.children(&key, true).is_empty()
        });
    }
    env.add_global("revision", view.revision.get());
    env.add_global("prefix", view.prefix.clone());
    let failed = |e: Error| RenderFailure::Template(e, source.text.clone());
    let template = env
        .template_from_named_str(&source.name, &source.text)
        .map_err(failed)?;
    let mut out = Capped {
        buf: Vec::new(),
        limit: max_output,
        over: false,
    };
    if let Err(e) = template.render_captured_to((), &mut out) {
        return Err(if out.over {
            RenderFailure::TooLarge { limit: max_output }
        } else {
            failed(e)
        });
    }
    let track = std::mem::take(&mut *track.lock().map_err(|_| {
        failed(Error::new(
            ErrorKind::InvalidOperation,
            "a template function panicked",
        ))
    })?);
    let reads = if source.uses_revision {
        Reads::All
    } else {
        Reads::Keys(track.reads)
    };
    Ok(Rendered {
        text: out.buf,
        listed: track.listed,
        reads,
    })
}

/// A template error as an operator reads it: the template and line, what
/// was undefined (the expression itself, as written), a snippet, and the
/// cause.
pub fn describe(e: &Error, source: &str) -> String {
    let mut text = e.to_string();
    if e.kind() == ErrorKind::UndefinedError
        && let Some(what) = e.range().and_then(|r| source.get(r))
    {
        let what = what.trim();
        if !what.is_empty() {
            text = format!("`{what}` is undefined: {text}");
        }
    }
    let detail = e.display_debug_info().to_string();
    if !detail.trim().is_empty() {
        text.push('\n');
        text.push_str(detail.trim_end());
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> View {
        let mut r = Registry::default();
        let p = "/infrastructure";
        for (k, v) in [
            ("dc1/web/w1/ip", "10.0.0.1"),
            ("dc1/web/w1/health", "passing"),
            ("dc1/web/w1/services/http", "80"),
            ("dc1/db/d1/ip", "10.0.1.1"),
            ("dc1/db/d1/health", "passing"),
            ("dc2/web/x1/ip", "10.2.0.1"),
            ("dc2/web/x1/health", "passing"),
        ] {
            r.put(p, format!("{p}/{k}").as_bytes(), v.as_bytes(), 1, 1)
                .unwrap();
        }
        View {
            prefix: p.into(),
            revision: Revision::of(7).expect("a revision"),
            registry: Arc::new(r),
        }
    }

    fn run(text: &str) -> Result<Rendered, RenderFailure> {
        render(&Source::parse("t.j2", text.into())?, &view(), 1 << 20)
    }

    #[test]
    fn hosts_count_as_listed_only_when_their_address_is_read() {
        let r = run("{% for h in hosts('dc1') %}{{ h.role }}{% endfor %}").unwrap();
        assert!(r.listed.is_empty(), "{:?}", r.listed);
        let r = run("{% for h in hosts('dc1') if 'http' in h.services %}{{ h.ip }}{% endfor %}")
            .unwrap();
        assert_eq!(r.listed, BTreeSet::from(["dc1/web/w1".to_string()]));
        let r =
            run("{{ getv('/infrastructure/dc1/db/d1/ip') }}{{ hosts('dc2') | tojson }}").unwrap();
        assert_eq!(
            r.listed,
            BTreeSet::from(["dc1/db/d1".to_string(), "dc2/web/x1".to_string()])
        );
    }

    #[test]
    fn reads_cover_only_what_the_template_looked_at() {
        let r = run("{{ hosts('dc1/web') | length }}{{ getv('/infrastructure/dc2/web/x1/ip') }}")
            .unwrap();
        assert!(r.reads.covers("/infrastructure/dc1/web/w9/ip"));
        assert!(r.reads.covers("/infrastructure/dc2/web/x1/ip"));
        assert!(!r.reads.covers("/infrastructure/dc1/webx/w1/ip"));
        assert!(!r.reads.covers("/infrastructure/dc2/web/x1/meta/a"));
        assert!(!r.reads.covers("/infrastructure/dc3/web/h/ip"));
        let r = run("{{ lsdir('/infrastructure') | join(',') }}").unwrap();
        assert_eq!(String::from_utf8(r.text).unwrap(), "dc1,dc2");
        assert!(r.reads.covers("/infrastructure/dc9/web/h/ip"));
        let r = run("{{ revision }}").unwrap();
        assert_eq!(r.reads, Reads::All);
    }

    #[test]
    fn output_over_max_output_is_refused_while_rendering() {
        let s = Source::parse(
            "t.j2",
            "{% for i in range(10000) %}0123456789{% endfor %}".into(),
        )
        .unwrap();
        assert!(matches!(
            render(&s, &view(), 50_000),
            Err(RenderFailure::TooLarge { limit: 50_000 })
        ));
        assert_eq!(render(&s, &view(), 100_000).unwrap().text.len(), 100_000);
    }

    #[test]
    fn syntax_errors_are_refused_at_load_and_undefined_names_are_named() {
        assert!(Source::parse("t.j2", "{% for %}".into()).is_err());
        let e = run("ok\n{% for h in hosts() %}{{ h.hostname }}{% endfor %}\n").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("`h.hostname` is undefined"), "{text}");
        assert!(text.contains("t.j2:2"), "{text}");
    }
}
