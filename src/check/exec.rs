//! exec and shell checks: exit 0 passing, 1 warning, anything else critical
//! (a timeout, a signal, or a program that cannot be started included).
//!
//! The program runs through [`crate::child`], the runner render's commands
//! use too: its own process group, no shell unless asked, no
//! `NOTIFY_SOCKET`, output capped at a character boundary. When a run ends,
//! normally or by timeout, nothing of it is left ([`Leftovers::End`]):
//! whatever remains of its process group gets SIGTERM, a short grace, then
//! SIGKILL.

use std::time::Duration;

use super::{Outcome, Status};
use crate::child::{self, Ended, Leftovers};

pub async fn run(argv: &[String], timeout: Duration) -> Outcome {
    let run = child::run(argv, timeout, Leftovers::End).await;
    let status = match run.code() {
        Some(0) => Status::Passing,
        Some(1) => Status::Warning,
        _ => Status::Critical,
    };
    let text = match &run.ended {
        // A plain exit: the output as the program wrote it.
        Ended::Exited(s) if s.code().is_some() => run.output,
        _ => run.describe(),
    };
    Outcome::new(status, text)
}
