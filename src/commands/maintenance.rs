//! `registrar maintenance on|off`: drain this host without stopping its
//! agent. Only the state file is written; the running agent picks it up.

use super::{Failure, exit};
use crate::cli::MaintenanceAction;
use crate::config::Config;
use crate::maintenance;

pub fn run(config: &Config, action: &MaintenanceAction) -> Result<(), Failure> {
    let dir = &config.state_dir;
    match action {
        MaintenanceAction::On { reason, r#for, .. } => {
            let state = maintenance::set(dir, reason, *r#for)
                .map_err(|e| Failure::new(exit::RUNTIME, e))?;
            match &state.until {
                Some(until) => println!("maintenance on until {until}: {}", state.reason),
                None => println!("maintenance on until turned off: {}", state.reason),
            }
            say_who_applies_it(dir);
        }
        MaintenanceAction::Off { .. } => {
            if maintenance::clear(dir).map_err(|e| Failure::new(exit::RUNTIME, e))? {
                println!("maintenance off");
                say_who_applies_it(dir);
            } else {
                println!("maintenance was not on");
            }
        }
    }
    Ok(())
}

/// The state file only takes effect through an agent on the same state
/// dir: say so when none runs there.
fn say_who_applies_it(dir: &std::path::Path) {
    match crate::agent::presence::agent_running(dir) {
        Some(true) => println!("the running agent applies it within a second"),
        _ => eprintln!(
            "registrar: no agent runs with state dir {}: the registry changes when one starts \
             (pass --state-dir if the agent uses another)",
            dir.display()
        ),
    }
}
