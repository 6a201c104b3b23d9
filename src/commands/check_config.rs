//! `registrar check-config`: validate, resolve the identity, and print the
//! effective configuration without secrets.

use super::Failure;
use crate::config::{Config, ConfigError};
use crate::identity::Identity;

pub fn run(config: &Config) -> Result<(), Failure> {
    let mut problems = Vec::new();
    if let Err(e) = config.require_registration_fields() {
        problems.extend(e.problems);
    }
    let identity = Identity::resolve(config);
    if let Err(e) = &identity {
        problems.push(e.to_string());
    }
    if !problems.is_empty() {
        return Err(ConfigError { problems }.into());
    }
    print!("{}", config.to_display_yaml());
    if let Ok(id) = identity {
        println!("# resolved identity");
        println!("resolved_host: {}", id.host);
        println!("resolved_ip: {}", id.ip);
        println!("resolved_machine_id: {}", id.machine_id);
    }
    Ok(())
}
