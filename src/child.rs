//! The one way registrar runs a program: a check's `exec`/`shell`, and
//! render's `check` and `reload` (design.md sections 3 and 6.10).
//!
//! Every run gets an explicit argv (a shell only when the argv names one),
//! its own process group, no standard input, and none of systemd's
//! notification variables (a child must never talk to systemd for us). Its
//! output is read while it runs, so it can never block on a full pipe, but
//! only the first [`MAX_OUTPUT`] bytes are kept, and the text is cut at a
//! character boundary: a program cannot grow our memory, and no output can
//! make us panic.
//!
//! A run is over when the program itself exits. What it started in the
//! background may still hold the output pipes: that is read for a short
//! grace and then left. Whether such leftovers are then ended is the
//! caller's choice ([`Leftovers`]): a check leaves nothing running, while a
//! reload that starts a daemon must not have it killed. A run that times out
//! is killed with its whole process group, whatever the choice.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

/// Output kept of one run (stdout, then stderr), and of a check's result.
pub const MAX_OUTPUT: usize = 4096;

/// How long to keep reading output after the program exited, in case a
/// child it left behind still holds the pipe.
const DRAIN_GRACE: Duration = Duration::from_millis(100);

/// How long what is left of a run's process group gets between SIGTERM
/// and SIGKILL.
const TERM_GRACE: Duration = Duration::from_millis(500);

/// What happens to processes a run left behind in its group once the
/// program itself exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leftovers {
    /// SIGTERM, a short grace, then SIGKILL (checks: a check that leaves a
    /// child per run would leave hundreds of orphans an hour).
    End,
    /// Leave them alone (render's commands: a reload may start a daemon).
    Leave,
}

/// How a run ended.
#[derive(Debug)]
pub enum Ended {
    /// The program exited, or was killed by a signal not of ours.
    Exited(ExitStatus),
    /// It did not finish within the timeout; its group was killed.
    TimedOut(Duration),
    /// It could not be started (no such program, not executable, ...).
    NotStarted(String),
}

/// A finished run: how it ended, and its output (stdout then stderr, at
/// most [`MAX_OUTPUT`] bytes, whole characters only).
#[derive(Debug)]
pub struct Finished {
    pub ended: Ended,
    pub output: String,
}

impl Finished {
    /// Exited with status 0.
    pub fn success(&self) -> bool {
        matches!(&self.ended, Ended::Exited(s) if s.success())
    }

    /// The exit code, when the program exited by itself.
    pub fn code(&self) -> Option<i32> {
        match &self.ended {
            Ended::Exited(s) => s.code(),
            _ => None,
        }
    }

    /// The output followed by how the run ended, when that was not a plain
    /// success: what a log line or a check's output shows.
    pub fn describe(&self) -> String {
        let out = self.output.trim();
        let how = match &self.ended {
            Ended::Exited(s) if s.success() => return out.to_string(),
            Ended::Exited(s) if s.code().is_none() => format!("killed by a signal: {s}"),
            Ended::Exited(s) => s.to_string(),
            Ended::TimedOut(t) => format!("timed out after {}", humantime::format_duration(*t)),
            Ended::NotStarted(why) => return why.clone(),
        };
        if out.is_empty() {
            format!("({how})")
        } else {
            format!("{out}\n({how})")
        }
    }
}

/// Runs `argv` bounded by `timeout`; see the module doc.
pub async fn run(argv: &[String], timeout: Duration, leftovers: Leftovers) -> Finished {
    let Some((program, args)) = argv.split_first() else {
        return Finished {
            ended: Ended::NotStarted("empty command".into()),
            output: String::new(),
        };
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
        Err(e) => {
            return Finished {
                ended: Ended::NotStarted(format!("cannot start {program:?}: {e}")),
                output: String::new(),
            };
        }
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
    if result.is_err() {
        // Timed out: the program and everything it started, at once.
        if let Some(pgid) = group {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        let _ = child.kill().await;
    } else if leftovers == Leftovers::End
        && let Some(pgid) = group
    {
        end_group(pgid).await;
    }
    let mut output = decode(&out);
    output.push_str(&decode(&err));
    let output = cap_text(output, MAX_OUTPUT);
    let ended = match result {
        Ok(Ok(status)) => Ended::Exited(status),
        Ok(Err(e)) => Ended::NotStarted(format!("cannot wait for {program:?}: {e}")),
        Err(_) => Ended::TimedOut(timeout),
    };
    Finished { ended, output }
}

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

/// Bytes as text: invalid UTF-8 becomes U+FFFD, and a character cut off at
/// the end (by the [`MAX_OUTPUT`] bound) is dropped rather than shown as one.
fn decode(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(e) if e.error_len().is_none() => {
            String::from_utf8_lossy(&bytes[..e.valid_up_to()]).into_owned()
        }
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
pub fn cap_text(s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_cut_on_character_boundaries() {
        for (s, max) in [
            ("x".to_string() + &"é".repeat(3000), 4096),
            ("ab€".into(), 4),
        ] {
            let capped = cap_text(s.clone(), max);
            assert!(capped.len() <= max);
            assert!(s.starts_with(&capped));
            assert!(capped.len() + 3 > max, "cut too short: {}", capped.len());
        }
        assert_eq!(cap_text("short".into(), 10), "short");
        // A character cut off by the byte bound is dropped, not mangled.
        assert_eq!(decode("aé".as_bytes().split_at(2).0), "a");
        assert_eq!(decode(b"a\xffb"), "a\u{fffd}b");
    }

    #[tokio::test]
    async fn a_flood_of_multibyte_output_is_capped_without_a_panic() {
        let argv: Vec<String> = [
            "sh",
            "-c",
            "printf x; i=0; while [ $i -lt 3000 ]; do printf 'é'; i=$((i+1)); done; exit 3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let f = run(&argv, Duration::from_secs(10), Leftovers::End).await;
        assert_eq!(f.code(), Some(3));
        assert!(f.output.len() <= MAX_OUTPUT && f.output.len() > MAX_OUTPUT - 4);
        assert!(f.output.starts_with("xé"));
        assert!(!f.output.contains('\u{fffd}'));
    }

    #[tokio::test]
    async fn a_program_that_cannot_start_says_why() {
        let f = run(
            &["/nonexistent/program".to_string()],
            Duration::from_secs(1),
            Leftovers::End,
        )
        .await;
        assert!(!f.success());
        assert!(
            f.describe().contains("/nonexistent/program"),
            "{}",
            f.describe()
        );
        let f = run(&[], Duration::from_secs(1), Leftovers::End).await;
        assert!(f.describe().contains("empty command"));
    }
}
