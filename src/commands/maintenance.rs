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
        }
        MaintenanceAction::Off { .. } => {
            if maintenance::clear(dir).map_err(|e| Failure::new(exit::RUNTIME, e))? {
                println!("maintenance off");
            } else {
                println!("maintenance was not on");
            }
        }
    }
    Ok(())
}
