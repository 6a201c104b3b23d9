//! Fail static (design.md section 8): which vanished hosts a consumer keeps
//! in its output, and until when. A pure state machine over the follower's
//! batches and the clock; `render` and `dns` put its held hosts back into
//! what they show.
//!
//! A host that leaves on purpose says so first (`health: leaving`, rule 4),
//! so its removal is applied at once. A host that vanishes without saying
//! so is applied at once too, unless the way it vanished looks like an
//! accident of the registry rather than of the host:
//! - **reset**: the follower had to re-read the registry (a restore, a
//!   replaced or wiped cluster, a compaction): every host the re-read lost;
//! - **mass**: one revision removed two or more machines (an `etcdctl del
//!   --prefix`; one machine's roles vanish together with its lease);
//! - **drop**: more than `max_drop` of a role's hosts vanished within
//!   `settle`. The hosts of that window that were already applied are put
//!   back too: the first of them may have been the start of the same
//!   accident.
//!
//! A held host is shown as it was last seen (a host that was critical
//! stays critical, so `healthy` lists still leave it out). It is released
//! when it is present again (the registry re-grew) or `settle` after it
//! was held; then the live registry is what is shown. `settle: 0` turns
//! holding off; `max_drop: 100%` turns off the mass and drop guards and
//! keeps the reset guard.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use super::{HostId, HostView};

/// The knobs of fail static.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FailStatic {
    /// How long a vanished host is held at most.
    pub settle: Duration,
    /// The share of a role's hosts (0 to 1) that may vanish within
    /// `settle` without being held.
    pub max_drop: f64,
}

impl Default for FailStatic {
    fn default() -> Self {
        FailStatic {
            settle: Duration::from_secs(60),
            max_drop: 0.5,
        }
    }
}

impl Eq for FailStatic {}

/// Why hosts are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    Reset,
    Mass,
    Drop,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Reset => "reset",
            Reason::Mass => "mass",
            Reason::Drop => "drop",
        }
    }
}

/// What a consumer says about holds: one line when one starts, one when
/// it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Started {
        reason: Reason,
        /// Why, in words.
        why: String,
        hosts: Vec<HostId>,
        /// When it ends at the latest.
        settle: Duration,
    },
    Released {
        reason: Reason,
        /// Present again.
        returned: Vec<HostId>,
        /// Removed after `settle`.
        applied: Vec<HostId>,
    },
}

/// A host held in the output.
#[derive(Debug, Clone)]
pub struct Held {
    /// As it was last seen.
    pub view: HostView,
    pub since: Instant,
    pub until: Instant,
    episode: u64,
}

/// One hold: the hosts one decision held.
#[derive(Debug)]
struct Episode {
    reason: Reason,
    /// The role of a drop hold: later hosts of it join this hold.
    role: Option<(String, String)>,
    waiting: usize,
    returned: Vec<HostId>,
    applied: Vec<HostId>,
}

/// A host that vanished without `leaving`, remembered for `settle`.
#[derive(Debug, Clone)]
struct Vanished {
    at: Instant,
    id: HostId,
    view: HostView,
}

/// The holds of one consumer (or of render templates sharing settings).
#[derive(Debug, Default)]
pub struct Holds {
    settings: FailStatic,
    held: BTreeMap<HostId, Held>,
    /// Per (dc, role): hosts that vanished without `leaving` within
    /// `settle`, applied or held.
    window: BTreeMap<(String, String), Vec<Vanished>>,
    episodes: BTreeMap<u64, Episode>,
    next_episode: u64,
    /// Since when some host has been held without a break.
    holding_since: Option<Instant>,
}

/// One host's change in a batch: its state before and after.
pub type Change<'a> = (&'a HostId, Option<&'a HostView>, Option<&'a HostView>);

impl Event {
    /// The hosts whose shown state this event changes: a hold puts back
    /// hosts that may have been applied already, a release removes them.
    pub fn hosts(&self) -> impl Iterator<Item = &HostId> {
        let (a, b): (&[HostId], &[HostId]) = match self {
            Event::Started { hosts, .. } => (hosts, &[]),
            Event::Released {
                returned, applied, ..
            } => (returned, applied),
        };
        a.iter().chain(b)
    }
}

impl Holds {
    pub fn new(settings: FailStatic) -> Holds {
        Holds {
            settings,
            ..Holds::default()
        }
    }

    pub fn settings(&self) -> FailStatic {
        self.settings
    }

    /// The hosts held now, as they were last seen.
    pub fn held(&self) -> &BTreeMap<HostId, Held> {
        &self.held
    }

    /// How long hosts have been held without a break, if they are.
    pub fn holding_for(&self, now: Instant) -> Option<Duration> {
        self.holding_since.map(|s| now.saturating_duration_since(s))
    }

    /// When the next hold ends, if one runs.
    pub fn next_release(&self) -> Option<Instant> {
        self.held.values().map(|h| h.until).min()
    }

    /// Takes in one batch of the follower: `changes` of one revision (or of
    /// a re-read, `reset`), and `present_in_role`, the hosts of a role
    /// present after it. Returns what to say.
    pub fn observe<'a>(
        &mut self,
        now: Instant,
        changes: impl IntoIterator<Item = Change<'a>>,
        reset: bool,
        present_in_role: impl Fn(&str, &str) -> usize,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        let mut vanished: Vec<(HostId, HostView)> = Vec::new();
        for (id, before, after) in changes {
            let was = before.filter(|h| h.present());
            let is = after.filter(|h| h.present());
            if is.is_some() {
                // Back (or new): the live state is shown again.
                self.forget(id);
                if let Some(held) = self.held.remove(id) {
                    self.end(held.episode, id, true, &mut events);
                }
                continue;
            }
            match was {
                Some(h) if h.leaving() => self.forget(id),
                Some(h) => vanished.push((id.clone(), h.clone())),
                None => {}
            }
        }
        if vanished.is_empty() || self.settings.settle.is_zero() {
            self.touch(now);
            return events;
        }
        let guard_on = self.settings.max_drop < 1.0;
        let machines: BTreeSet<(&str, &str)> = vanished
            .iter()
            .map(|(id, _)| (id.dc.as_str(), id.host.as_str()))
            .collect();
        if reset {
            let why = "the registry's history was reset (a restore, a replaced or wiped cluster, or a compaction) and the re-read lacks them".to_string();
            self.hold(now, Reason::Reset, why, vanished, &mut events);
        } else if guard_on && machines.len() >= 2 {
            let why = format!(
                "one revision removed {} machines without `leaving` (a deleted prefix?)",
                machines.len()
            );
            self.hold(now, Reason::Mass, why, vanished, &mut events);
        } else if guard_on {
            self.prune(now);
            for (id, view) in vanished {
                let role = (id.dc.clone(), id.role.clone());
                let window = self.window.entry(role.clone()).or_default();
                window.push(Vanished { at: now, id, view });
                let gone = window.len();
                let seen: Vec<(HostId, HostView)> = window
                    .iter()
                    .map(|v| (v.id.clone(), v.view.clone()))
                    .collect();
                let size = present_in_role(&role.0, &role.1) + gone;
                if gone as f64 > self.settings.max_drop * size as f64 {
                    let hosts: Vec<(HostId, HostView)> = seen
                        .into_iter()
                        .filter(|(id, _)| !self.held.contains_key(id))
                        .collect();
                    // The role is already held: these join that hold
                    // quietly (one WARN per hold, not per host).
                    if let Some((&episode, _)) = self
                        .episodes
                        .iter()
                        .find(|(_, e)| e.role.as_ref() == Some(&role))
                    {
                        self.join(now, episode, hosts);
                        continue;
                    }
                    let why = format!(
                        "{gone} of {size} hosts of {}/{} vanished within {} without `leaving`, more than max_drop {}%",
                        role.0,
                        role.1,
                        humantime::format_duration(self.settings.settle),
                        (self.settings.max_drop * 100.0).round()
                    );
                    if let Some(episode) = self.hold(now, Reason::Drop, why, hosts, &mut events)
                        && let Some(e) = self.episodes.get_mut(&episode)
                    {
                        e.role = Some(role);
                    }
                }
            }
        }
        self.touch(now);
        events
    }

    /// Ends the holds whose `settle` has passed. Returns the hosts whose
    /// removal now applies, and what to say.
    pub fn expire(&mut self, now: Instant) -> (Vec<HostId>, Vec<Event>) {
        let ended: Vec<HostId> = self
            .held
            .iter()
            .filter(|(_, h)| h.until <= now)
            .map(|(id, _)| id.clone())
            .collect();
        let mut events = Vec::new();
        for id in &ended {
            if let Some(held) = self.held.remove(id) {
                self.end(held.episode, id, false, &mut events);
            }
        }
        self.prune(now);
        self.touch(now);
        (ended, events)
    }

    fn hold(
        &mut self,
        now: Instant,
        reason: Reason,
        why: String,
        hosts: Vec<(HostId, HostView)>,
        events: &mut Vec<Event>,
    ) -> Option<u64> {
        if hosts.is_empty() {
            return None;
        }
        let episode = self.next_episode;
        self.next_episode += 1;
        let ids: Vec<HostId> = hosts.iter().map(|(id, _)| id.clone()).collect();
        self.episodes.insert(
            episode,
            Episode {
                reason,
                role: None,
                waiting: 0,
                returned: Vec::new(),
                applied: Vec::new(),
            },
        );
        self.join(now, episode, hosts);
        events.push(Event::Started {
            reason,
            why,
            hosts: ids,
            settle: self.settings.settle,
        });
        Some(episode)
    }

    /// Holds `hosts` as part of `episode`, each until `settle` from now.
    fn join(&mut self, now: Instant, episode: u64, hosts: Vec<(HostId, HostView)>) {
        let until = now + self.settings.settle;
        if let Some(e) = self.episodes.get_mut(&episode) {
            e.waiting += hosts.len();
        }
        for (id, view) in hosts {
            self.held.insert(
                id,
                Held {
                    view,
                    since: now,
                    until,
                    episode,
                },
            );
        }
    }

    /// One host of `episode` is no longer held.
    fn end(&mut self, episode: u64, id: &HostId, returned: bool, events: &mut Vec<Event>) {
        let Some(e) = self.episodes.get_mut(&episode) else {
            return;
        };
        if returned {
            e.returned.push(id.clone());
        } else {
            e.applied.push(id.clone());
        }
        e.waiting = e.waiting.saturating_sub(1);
        if e.waiting == 0
            && let Some(e) = self.episodes.remove(&episode)
        {
            events.push(Event::Released {
                reason: e.reason,
                returned: e.returned,
                applied: e.applied,
            });
        }
    }

    /// A host is back or left on purpose: it no longer counts as vanished.
    fn forget(&mut self, id: &HostId) {
        let role = (id.dc.clone(), id.role.clone());
        if let Some(w) = self.window.get_mut(&role) {
            w.retain(|v| v.id != *id);
            if w.is_empty() {
                self.window.remove(&role);
            }
        }
    }

    /// Drops what vanished more than `settle` ago from the windows.
    fn prune(&mut self, now: Instant) {
        let settle = self.settings.settle;
        self.window.retain(|_, w| {
            w.retain(|v| now.saturating_duration_since(v.at) < settle);
            !w.is_empty()
        });
    }

    fn touch(&mut self, now: Instant) {
        if self.held.is_empty() {
            self.holding_since = None;
        } else {
            self.holding_since.get_or_insert(now);
        }
    }
}

/// "dc1/web/a, dc1/web/b, ... (12)": at most five names.
fn list(ids: &[HostId]) -> String {
    let mut names: Vec<String> = ids.iter().take(5).map(HostId::to_string).collect();
    if ids.len() > 5 {
        names.push(format!("... ({} in all)", ids.len()));
    }
    names.join(", ")
}

/// Logs what `consumer` (e.g. "dns", "render of /etc/haproxy/haproxy.cfg")
/// decided: one WARN when a hold starts, one INFO when it ends.
pub fn log(events: &[Event], consumer: &str) {
    for e in events {
        match e {
            Event::Started {
                reason,
                why,
                hosts,
                settle,
            } => tracing::warn!(
                reason = reason.as_str(),
                hosts = hosts.len(),
                "{consumer}: holding {} host(s) that vanished without `leaving` ({}): {why}; they stay in the output until they are back, {} at most (fail_static.settle)",
                hosts.len(),
                list(hosts),
                humantime::format_duration(*settle),
            ),
            Event::Released {
                reason,
                returned,
                applied,
            } => tracing::info!(
                reason = reason.as_str(),
                returned = returned.len(),
                applied = applied.len(),
                "{consumer}: hold released: {} host(s) back{}{}",
                returned.len(),
                if returned.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", list(returned))
                },
                if applied.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; {} not back after settle, their removal applies now: {}",
                        applied.len(),
                        list(applied)
                    )
                },
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Health;

    fn id(role: &str, host: &str) -> HostId {
        HostId {
            dc: "dc1".into(),
            role: role.into(),
            host: host.into(),
        }
    }

    fn view(health: Health) -> HostView {
        HostView {
            ip: Some("10.0.0.1".parse().unwrap()),
            health: Some(health),
            ..HostView::default()
        }
    }

    const S: Duration = Duration::from_secs(60);

    fn holds(max_drop: f64) -> Holds {
        Holds::new(FailStatic {
            settle: S,
            max_drop,
        })
    }

    /// Removes `ids` (seen with `health`) in one batch; `left` hosts stay.
    fn remove(
        h: &mut Holds,
        now: Instant,
        ids: &[HostId],
        health: Health,
        left: usize,
        reset: bool,
    ) -> Vec<Event> {
        let v = view(health);
        let changes: Vec<Change<'_>> = ids.iter().map(|id| (id, Some(&v), None)).collect();
        h.observe(now, changes, reset, |_, _| left)
    }

    fn back(h: &mut Holds, now: Instant, id: &HostId) -> Vec<Event> {
        let v = view(Health::Passing);
        h.observe(now, [(id, None, Some(&v))], false, |_, _| 3)
    }

    #[test]
    fn a_planned_removal_is_never_held_however_many_leave() {
        let now = Instant::now();
        let mut h = holds(0.5);
        let ids = [id("web", "a"), id("web", "b"), id("web", "c")];
        assert!(remove(&mut h, now, &ids, Health::Leaving, 0, false).is_empty());
        assert!(h.held().is_empty());
        // Even after a reset.
        assert!(remove(&mut h, now, &ids, Health::Leaving, 0, true).is_empty());
        assert!(h.held().is_empty());
    }

    #[test]
    fn a_reset_holds_every_lost_host_until_it_returns() {
        let now = Instant::now();
        let mut h = holds(1.0);
        let ids = [id("web", "a"), id("web", "b")];
        let ev = remove(&mut h, now, &ids, Health::Passing, 0, true);
        assert!(
            matches!(&ev[..], [Event::Started { reason: Reason::Reset, hosts, .. }] if hosts.len() == 2)
        );
        assert_eq!(h.held().len(), 2);
        assert!(back(&mut h, now, &ids[0]).is_empty());
        let ev = back(&mut h, now, &ids[1]);
        assert_eq!(
            ev,
            vec![Event::Released {
                reason: Reason::Reset,
                returned: ids.to_vec(),
                applied: vec![]
            }]
        );
        assert!(h.held().is_empty() && h.holding_for(now).is_none());
    }

    #[test]
    fn one_revision_removing_two_machines_is_held_one_machine_with_two_roles_is_not() {
        let now = Instant::now();
        let mut h = holds(0.5);
        // One machine, two roles: its lease expired.
        let ev = remove(
            &mut h,
            now,
            &[id("web", "a"), id("db", "a")],
            Health::Passing,
            10,
            false,
        );
        assert!(ev.is_empty(), "{ev:?}");
        let ev = remove(
            &mut h,
            now,
            &[id("web", "b"), id("web", "c")],
            Health::Passing,
            10,
            false,
        );
        assert!(matches!(
            &ev[..],
            [Event::Started {
                reason: Reason::Mass,
                ..
            }]
        ));
        // max_drop 100% turns the guard off.
        let mut off = holds(1.0);
        assert!(
            remove(
                &mut off,
                now,
                &[id("web", "b"), id("web", "c")],
                Health::Passing,
                0,
                false
            )
            .is_empty()
        );
    }

    #[test]
    fn more_than_max_drop_within_settle_holds_the_window_including_applied_hosts() {
        let t0 = Instant::now();
        let mut h = holds(0.5);
        // 1 of 3 vanishes: 33%, applied.
        assert!(remove(&mut h, t0, &[id("web", "a")], Health::Passing, 2, false).is_empty());
        assert!(h.held().is_empty());
        // A second within settle: 2 of 3, held, and the first is put back.
        let t1 = t0 + Duration::from_secs(5);
        let ev = remove(&mut h, t1, &[id("web", "b")], Health::Critical, 1, false);
        assert!(
            matches!(&ev[..], [Event::Started { reason: Reason::Drop, hosts, .. }] if hosts.len() == 2),
            "{ev:?}"
        );
        assert_eq!(h.held().len(), 2);
        // Shown as last seen: b was critical.
        assert_eq!(
            h.held()[&id("web", "b")].view.health,
            Some(Health::Critical)
        );
        // Released at settle: both removals apply.
        assert_eq!(h.next_release(), Some(t1 + S));
        let (ended, ev) = h.expire(t1 + S - Duration::from_millis(1));
        assert!(ended.is_empty() && ev.is_empty());
        let (ended, ev) = h.expire(t1 + S);
        assert_eq!(ended.len(), 2);
        assert!(
            matches!(&ev[..], [Event::Released { applied, returned, .. }] if applied.len() == 2 && returned.is_empty())
        );
        assert!(h.held().is_empty());
    }

    #[test]
    fn later_hosts_of_a_held_role_join_its_hold_without_a_new_warning() {
        let t0 = Instant::now();
        let mut h = holds(0.5);
        let ids: Vec<HostId> = (0..6).map(|i| id("web", &format!("h{i}"))).collect();
        let mut started = 0;
        for (i, one) in ids.iter().enumerate() {
            let ev = remove(
                &mut h,
                t0,
                std::slice::from_ref(one),
                Health::Passing,
                5 - i,
                false,
            );
            started += ev
                .iter()
                .filter(|e| matches!(e, Event::Started { .. }))
                .count();
        }
        assert_eq!(started, 1, "one WARN for the whole drop");
        assert_eq!(h.held().len(), 6);
        let (ended, ev) = h.expire(t0 + S);
        assert_eq!(ended.len(), 6);
        assert!(
            matches!(&ev[..], [Event::Released { applied, .. }] if applied.len() == 6),
            "{ev:?}"
        );
    }

    #[test]
    fn removals_spread_wider_than_settle_are_applied() {
        let t0 = Instant::now();
        let mut h = holds(0.5);
        assert!(remove(&mut h, t0, &[id("web", "a")], Health::Passing, 2, false).is_empty());
        let later = t0 + S + Duration::from_secs(1);
        assert!(remove(&mut h, later, &[id("web", "b")], Health::Passing, 1, false).is_empty());
        assert!(h.held().is_empty());
    }

    #[test]
    fn settle_zero_turns_holding_off() {
        let mut h = Holds::new(FailStatic {
            settle: Duration::ZERO,
            max_drop: 0.0,
        });
        let ids = [id("web", "a"), id("web", "b")];
        assert!(remove(&mut h, Instant::now(), &ids, Health::Passing, 0, true).is_empty());
        assert!(h.held().is_empty());
    }

    #[test]
    fn a_host_that_returns_and_then_leaves_is_removed_at_once() {
        let now = Instant::now();
        let mut h = holds(0.5);
        let ids = [id("web", "a"), id("web", "b")];
        remove(&mut h, now, &ids, Health::Passing, 0, true);
        back(&mut h, now, &ids[0]);
        assert!(remove(&mut h, now, &ids[..1], Health::Leaving, 0, false).is_empty());
        assert!(!h.held().contains_key(&ids[0]));
        assert!(h.held().contains_key(&ids[1]));
        assert!(h.holding_for(now + Duration::from_secs(3)).is_some());
    }
}
