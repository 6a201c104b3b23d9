//! Whether an agent runs on this state dir: the agent holds an advisory
//! lock on `<state_dir>/agent.lock` for as long as it runs, so that
//! `maintenance` and `deregister` can say what their command will (or will
//! not) lead to. The lock is only a hint for messages: an agent that cannot
//! take it (a read-only state dir, a second agent on the same dir) runs all
//! the same.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

const FILE: &str = "agent.lock";

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// Held for as long as the agent runs.
pub struct Presence {
    _file: File,
}

/// Takes the lock, if this agent can.
pub fn announce(state_dir: &Path) -> Option<Presence> {
    let taken = std::fs::create_dir_all(state_dir).and_then(|()| {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path(state_dir))?;
        file.try_lock().map_err(std::io::Error::other)?;
        Ok(file)
    });
    match taken {
        Ok(file) => Some(Presence { _file: file }),
        Err(e) => {
            tracing::debug!(state_dir = %state_dir.display(), error = %e, "not announcing this agent in its state dir");
            None
        }
    }
}

/// Whether an agent holds the lock of `state_dir` now. `None` when that
/// cannot be told (no lock file: no agent has run there yet, or the dir is
/// unreadable).
pub fn agent_running(state_dir: &Path) -> Option<bool> {
    let file = OpenOptions::new().write(true).open(path(state_dir)).ok()?;
    match file.try_lock() {
        Ok(()) => Some(false),
        Err(std::fs::TryLockError::WouldBlock) => Some(true),
        Err(std::fs::TryLockError::Error(_)) => None,
    }
}
