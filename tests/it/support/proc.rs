//! The real registrar binary, run with a scrubbed environment.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// A `registrar` command with an empty environment but PATH and a log filter.
/// The registrar binary: the one cargo built for this test or bench, or,
/// for the benchmark, `REGISTRAR_BENCH_BIN`: `cargo bench` builds the
/// binary with the dev-dependencies' features (tokio's test-util, and more
/// through reqwest and rcgen), so scripts/bench measures the one
/// `cargo build --release` makes, the one that ships.
pub fn binary() -> std::path::PathBuf {
    std::env::var_os("REGISTRAR_BENCH_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_registrar").into())
}

pub fn registrar() -> Command {
    let mut c = Command::new(binary());
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("REGISTRAR_LOG", "info,registrar=debug")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

/// Flags for a fake host on loopback.
pub fn host_args(
    endpoints: &str,
    dc: &str,
    role: &str,
    host: &str,
    machine_id: &str,
    ttl: &str,
) -> Vec<String> {
    [
        "--endpoints",
        endpoints,
        "--dc",
        dc,
        "--role",
        role,
        "--host",
        host,
        "--machine-id",
        machine_id,
        "--ttl",
        ttl,
        "--ip",
        "127.0.0.1",
        "--allow-loopback",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `registrar <command> <args>` as one argument list.
pub fn cmd(command: &str, args: Vec<String>) -> Vec<String> {
    std::iter::once(command.to_string()).chain(args).collect()
}

/// What a one-shot command did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a one-shot command to completion (at most 60 s).
pub async fn run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    run_with(registrar().args(args)).await
}

/// Runs a prepared command to completion (at most 60 s).
pub async fn run_with(cmd: &mut Command) -> Run {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("registrar did not finish within 60 s")
        .expect("run registrar");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A running `registrar agent` (or `register --keep-alive`), killed on drop.
pub struct Agent {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
    pub name: String,
}

impl Agent {
    /// Starts `registrar <args>` with stderr captured to a file.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(name: &str, args: &[S]) -> Agent {
        let mut cmd = registrar();
        cmd.args(args);
        Self::spawn_command(name, cmd)
    }

    /// Starts a prepared `registrar` command with stderr captured to a file.
    pub fn spawn_command(name: &str, mut cmd: Command) -> Agent {
        let dir = tempfile::tempdir().expect("temp dir for the agent log");
        let log = dir.path().join("agent.log");
        let file = std::fs::File::create(&log).expect("agent log");
        let child = cmd
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start registrar");
        Agent {
            child,
            log,
            _dir: dir,
            name: name.to_string(),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `text`, or fails the test with the log.
    pub async fn wait_log(&self, text: &str, within: Duration) {
        super::eventually(
            within,
            &format!("{} to log {text:?}", self.name),
            || async {
                let log = self.log();
                if log.contains(text) { Ok(()) } else { Err(log) }
            },
        )
        .await;
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id().expect("agent still running") as i32)
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).expect("signal the agent");
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, within: Duration) -> i32 {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} did not exit within {within:?}; log:\n{}",
                    self.name,
                    self.log()
                )
            })
            .expect("wait for the agent");
        status.code().unwrap_or(-1)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- {} log ----\n{}", self.name, self.log());
        }
        if let Some(id) = self.child.id() {
            let _ = kill(Pid::from_raw(id as i32), Signal::SIGCONT);
        }
        let _ = self.child.start_kill();
    }
}
