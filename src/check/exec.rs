//! exec and shell checks: exit 0 passing, 1 warning, anything else critical.
//!
//! The program runs in its own process group, without a shell unless asked,
//! without `NOTIFY_SOCKET` (a check must never talk to systemd for us), and
//! with its output drained but only the first 4 KiB kept, so a flooding
//! check can neither block on a full pipe nor grow our memory. When a run
//! ends, normally or by timeout, nothing of it is left: whatever remains of
//! its process group (a child it left behind, one that ignores SIGTERM) gets
//! SIGTERM, a short grace, then SIGKILL. Left alone, a check that leaves a
//! child per run would leave hundreds of orphans an hour.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use super::{MAX_OUTPUT, Outcome, Status};

/// How long to keep reading output after the program exited, in case a
/// child it left behind still holds the pipe.
const DRAIN_GRACE: Duration = Duration::from_millis(100);

/// How long what is left of a run's process group gets between SIGTERM
/// and SIGKILL.
const TERM_GRACE: Duration = Duration::from_millis(500);

/// Ends whatever is left of a run's process group: SIGTERM, up to
/// [`TERM_GRACE`] for it to go, then SIGKILL. The group leader is already
/// reaped, but the group id stays taken while any member lives, so it
/// cannot name another group meanwhile.
async fn end_group(pgid: Pid) {
    if killpg(pgid, Signal::SIGTERM).is_err() {
        // ESRCH: nothing is left.
        return;
    }
    let deadline = tokio::time::Instant::now() + TERM_GRACE;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if killpg(pgid, None).is_err() {
            return;
        }
    }
    let _ = killpg(pgid, Signal::SIGKILL);
}

pub async fn run(argv: &[String], timeout: Duration) -> Outcome {
    let Some((program, args)) = argv.split_first() else {
        return Outcome::new(Status::Critical, "empty command");
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::new(Status::Critical, format!("cannot start {program:?}: {e}")),
    };
    let group = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let mut out = Vec::new();
    let mut err = Vec::new();
    let work = async {
        // Read and wait at once: a program blocked on a full pipe never exits.
        let reading = async {
            tokio::join!(drain(stdout, &mut out), drain(stderr, &mut err));
        };
        tokio::pin!(reading);
        let mut read_all = false;
        let status = tokio::select! {
            s = child.wait() => s,
            _ = &mut reading => {
                read_all = true;
                child.wait().await
            }
        };
        if !read_all {
            // A child it left behind may hold the pipe open: collect what is
            // there, briefly, and stop reading.
            let _ = tokio::time::timeout(DRAIN_GRACE, &mut reading).await;
        }
        status
    };
    let result = tokio::time::timeout(timeout, work).await;
    if result.is_err()
        && let Some(pgid) = group
    {
        // Timed out: the program itself too, at once.
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = child.kill().await;
    }
    if let Some(pgid) = group {
        end_group(pgid).await;
    }
    let mut text = String::from_utf8_lossy(&out).into_owned();
    text.push_str(&String::from_utf8_lossy(&err));
    match result {
        Ok(Ok(status)) => {
            let outcome = match status.code() {
                Some(0) => Status::Passing,
                Some(1) => Status::Warning,
                _ => Status::Critical,
            };
            if outcome == Status::Critical && status.code().is_none() {
                text.push_str(&format!("\n(killed by a signal: {status})"));
            }
            Outcome::new(outcome, text)
        }
        Ok(Err(e)) => Outcome::new(
            Status::Critical,
            format!("cannot wait for {program:?}: {e}"),
        ),
        Err(_) => {
            text.push_str(&format!(
                "\n(timed out after {})",
                humantime::format_duration(timeout)
            ));
            Outcome::new(Status::Critical, text.trim_start().to_string())
        }
    }
}

/// Reads a pipe to its end, keeping at most [`MAX_OUTPUT`] bytes.
async fn drain<R: AsyncRead + Unpin>(pipe: Option<R>, keep: &mut Vec<u8>) {
    let Some(mut pipe) = pipe else { return };
    let mut buf = [0u8; 8192];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let room = MAX_OUTPUT.saturating_sub(keep.len());
                keep.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}
