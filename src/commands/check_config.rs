//! `registrar check-config`: validate the configuration for the command it
//! is meant for (the agent, render or dns), and print the effective
//! configuration without secrets.

use super::Failure;
use crate::cli::{CheckConfigArgs, Purpose};
use crate::config::{Config, ConfigError};
use crate::identity::Identity;

/// The command a config is for, when `--for` does not say: render's has
/// templates, dns's has `srv_min`, anything else is an agent's.
fn purpose(config: &Config, args: &CheckConfigArgs) -> Purpose {
    args.purpose.unwrap_or(if !config.templates.is_empty() {
        Purpose::Render
    } else if !config.srv_min.is_empty() {
        Purpose::Dns
    } else {
        Purpose::Agent
    })
}

pub fn run(config: &Config, args: &CheckConfigArgs) -> Result<(), Failure> {
    let purpose = purpose(config, args);
    let mut problems = Vec::new();
    let mut identity = None;
    match purpose {
        Purpose::Agent => {
            if let Err(e) = config.require_registration_fields() {
                problems.extend(e.problems);
            }
            match Identity::resolve(config) {
                Ok(id) => identity = Some(id),
                Err(e) => problems.push(e.to_string()),
            }
        }
        Purpose::Render => problems.extend(crate::render::check_templates(config)),
        Purpose::Dns => {}
    }
    if !problems.is_empty() {
        return Err(ConfigError { problems }.into());
    }
    print!("{}", config.to_display_yaml());
    let name = match purpose {
        Purpose::Agent => "agent",
        Purpose::Render => "render",
        Purpose::Dns => "dns",
    };
    println!("# checked for: registrar {name} (--for agent|render|dns chooses)");
    if let Some(id) = identity {
        println!("# resolved identity");
        println!("resolved_host: {}", id.host);
        println!("resolved_ip: {}", id.ip);
        println!("resolved_machine_id: {}", id.machine_id);
    }
    Ok(())
}
