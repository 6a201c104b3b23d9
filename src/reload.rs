//! What a running command can be asked to do from outside: stop
//! (SIGTERM/SIGINT, [`Control::cancel`]) and load its configuration again
//! (SIGHUP). The agent, `render` and `dns` all wait for a SIGHUP with
//! [`sighup`] and load with [`Reloads::load`]; what each applies is its own
//! (the agent: [`crate::agent::reload`]; render: [`crate::render`]; dns:
//! [`crate::dns`]).

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};

/// Loads the configuration again (the same flags, environment and file).
pub type Reload = Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// Where reloads come from: a notification per SIGHUP, and how to load.
pub struct Reloads {
    pub notify: Arc<Notify>,
    pub load: Reload,
}

/// The next SIGHUP, or never when there is no `notify` (a command run
/// without reloads).
pub async fn sighup(notify: Option<&Notify>) {
    match notify {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}

/// What `main` hands a command: its stop and its reloads.
pub struct Control {
    /// Fires on SIGTERM/SIGINT.
    pub cancel: CancellationToken,
    /// Notified on SIGHUP.
    pub reload: Arc<Notify>,
    /// Loads the configuration again (the same flags, environment and file).
    pub load: Option<Reload>,
}

impl Control {
    /// The reloads a long-running command follows, when it can load.
    pub fn reloads(&mut self) -> Option<Reloads> {
        self.load.take().map(|load| Reloads {
            notify: self.reload.clone(),
            load,
        })
    }
}
