//! Maintenance mode: drain a host without stopping its agent.
//!
//! The state is a small JSON file in the state dir, written atomically by
//! `registrar maintenance on|off`. It survives agent restarts and lease
//! loss because it lives on disk, not in etcd. The running agent checks the
//! file's modification time and size every 500 ms (a `stat`, no read unless
//! it changed), so a change is picked up within a second without a signal
//! or a restart; expiry (`--for`) is evaluated on the same tick.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// How often the agent looks at the file.
pub const POLL: Duration = Duration::from_millis(500);

const FILE: &str = "maintenance.json";

/// The file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub reason: String,
    /// RFC 3339; absent means until turned off.
    pub until: Option<String>,
    /// RFC 3339 time it was turned on.
    pub since: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    #[error("cannot write {path}: {source}; check --state-dir and permissions")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot remove {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--reason must not be empty")]
    EmptyReason,
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// Turns maintenance on, optionally for a limited time.
pub fn set(
    state_dir: &Path,
    reason: &str,
    for_: Option<Duration>,
) -> Result<State, MaintenanceError> {
    if reason.trim().is_empty() {
        return Err(MaintenanceError::EmptyReason);
    }
    let now = SystemTime::now();
    let state = State {
        reason: reason.to_string(),
        until: for_.map(|d| humantime::format_rfc3339_millis(now + d).to_string()),
        since: humantime::format_rfc3339_seconds(now).to_string(),
    };
    let file = path(state_dir);
    let err = |source| MaintenanceError::Write {
        path: file.clone(),
        source,
    };
    std::fs::create_dir_all(state_dir).map_err(err)?;
    let tmp = state_dir.join(format!(".{FILE}.tmp"));
    let text = serde_json::to_string_pretty(&state).unwrap_or_default();
    std::fs::write(&tmp, text + "\n").map_err(err)?;
    std::fs::rename(&tmp, &file).map_err(err)?;
    Ok(state)
}

/// Turns maintenance off. Returns whether it was on.
pub fn clear(state_dir: &Path) -> Result<bool, MaintenanceError> {
    let file = path(state_dir);
    match std::fs::remove_file(&file) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(MaintenanceError::Remove { path: file, source }),
    }
}

/// The active maintenance reason at `now`, if any. A missing, unreadable,
/// malformed or expired file means no maintenance (a malformed one is
/// logged by the caller through the returned warning).
pub fn active(state_dir: &Path, now: SystemTime) -> (Option<String>, Option<String>) {
    let file = path(state_dir);
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (None, None),
        Err(e) => return (None, Some(format!("cannot read {}: {e}", file.display()))),
    };
    let state: State = match serde_json::from_str(&text) {
        Ok(s) => s,
        Err(e) => {
            return (
                None,
                Some(format!(
                    "{} is malformed ({e}); ignoring it",
                    file.display()
                )),
            );
        }
    };
    if let Some(until) = &state.until {
        match humantime::parse_rfc3339(until) {
            Ok(t) if t <= now => return (None, None),
            Ok(_) => {}
            Err(e) => {
                return (
                    None,
                    Some(format!(
                        "{}: bad until {until:?} ({e}); ignoring it",
                        file.display()
                    )),
                );
            }
        }
    }
    (Some(state.reason), None)
}

/// When the maintenance in the file ends by itself (None: no file, no
/// end, or an end that does not parse).
fn planned_end(state_dir: &Path) -> Option<SystemTime> {
    let text = std::fs::read_to_string(path(state_dir)).ok()?;
    let state: State = serde_json::from_str(&text).ok()?;
    humantime::parse_rfc3339(state.until.as_deref()?).ok()
}

/// Watches the maintenance file by polling its metadata.
pub struct Watcher {
    state_dir: PathBuf,
    stamp: Option<(SystemTime, u64)>,
    current: Option<String>,
    until: Option<SystemTime>,
    warned: Option<String>,
}

impl Watcher {
    pub fn new(state_dir: &Path) -> Watcher {
        let mut w = Watcher {
            state_dir: state_dir.to_path_buf(),
            stamp: None,
            current: None,
            until: None,
            warned: None,
        };
        w.refresh(true);
        w
    }

    /// The active reason.
    pub fn current(&self) -> Option<&str> {
        self.current.as_deref()
    }

    /// When the active maintenance ends by itself (None: until turned off).
    pub fn until(&self) -> Option<SystemTime> {
        self.until
    }

    /// Re-evaluates the file; returns true when the active reason changed.
    pub fn poll(&mut self) -> bool {
        self.refresh(false)
    }

    fn refresh(&mut self, force: bool) -> bool {
        let stamp = std::fs::metadata(path(&self.state_dir))
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        // Expiry needs a look even when the file did not change.
        let timed = self.current.is_some();
        if !force && stamp == self.stamp && !timed {
            return false;
        }
        self.stamp = stamp;
        let (reason, warning) = active(&self.state_dir, SystemTime::now());
        if warning.is_some() && warning != self.warned {
            tracing::warn!("maintenance: {}", warning.as_deref().unwrap_or_default());
        }
        self.warned = warning;
        self.until = reason.as_ref().and_then(|_| planned_end(&self.state_dir));
        if reason != self.current {
            match &reason {
                Some(r) => tracing::info!(reason = %r, "maintenance on"),
                None => tracing::info!("maintenance off"),
            }
            self.current = reason;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_off_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(active(dir.path(), SystemTime::now()), (None, None));
        set(dir.path(), "kernel upgrade", Some(Duration::from_secs(60))).unwrap();
        let now = SystemTime::now();
        assert_eq!(active(dir.path(), now).0.as_deref(), Some("kernel upgrade"));
        assert_eq!(
            active(dir.path(), now + Duration::from_secs(61)).0,
            None,
            "expired"
        );
        assert!(clear(dir.path()).unwrap());
        assert!(!clear(dir.path()).unwrap());
        assert!(matches!(
            set(dir.path(), " ", None),
            Err(MaintenanceError::EmptyReason)
        ));
        std::fs::write(path(dir.path()), "{not json").unwrap();
        let (reason, warning) = active(dir.path(), now);
        assert!(reason.is_none() && warning.unwrap().contains("malformed"));
    }
}
