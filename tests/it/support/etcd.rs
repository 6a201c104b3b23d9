//! Real etcd clusters (Debian's etcd-server) in temp dirs.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use etcd_client::Client;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{eventually, free_port};

/// Heartbeat and election timeout small enough that etcd's minimum lease TTL
/// (1.5 x election timeout) is 1 s, so tests can use TTLs of 2-3 s.
const HEARTBEAT_MS: &str = "50";
const ELECTION_MS: &str = "500";

pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Member {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    pub fn pid(&self) -> Option<Pid> {
        self.child.as_ref().map(|c| Pid::from_raw(c.id() as i32))
    }
}

pub struct Cluster {
    pub members: Vec<Member>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts an `n`-member cluster and waits until every member answers.
    pub async fn start(n: usize) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir for etcd");
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                data_dir: dir.path().join(format!("m{i}.etcd")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let mut cluster = Cluster { members, _dir: dir };
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster.wait_healthy().await;
        cluster
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize) {
        let initial = self.initial_cluster();
        let m = &mut self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("etcd log file");
        let child = Command::new("etcd")
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &m.endpoint()])
            .args(["--advertise-client-urls", &m.endpoint()])
            .args(["--listen-peer-urls", &m.peer_url()])
            .args(["--initial-advertise-peer-urls", &m.peer_url()])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "registrar-test"])
            .args(["--heartbeat-interval", HEARTBEAT_MS])
            .args(["--election-timeout", ELECTION_MS])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("start etcd (is etcd-server installed? ./scripts/test installs it)");
        m.child = Some(child);
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// All endpoints, comma separated, for --endpoints.
    pub fn endpoint_list(&self) -> String {
        self.endpoints().join(",")
    }

    /// A client of member `i` alone.
    pub async fn client_of(&self, i: usize) -> Client {
        Client::connect([self.members[i].endpoint()], None)
            .await
            .expect("etcd client")
    }

    /// A client of the first running member.
    pub async fn client(&self) -> Client {
        let i = self
            .members
            .iter()
            .position(|m| m.child.is_some())
            .expect("a running member");
        self.client_of(i).await
    }

    async fn wait_healthy(&self) {
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_none() {
                continue;
            }
            let ep = m.endpoint();
            eventually(
                Duration::from_secs(30),
                &format!("etcd member {i} to serve"),
                || {
                    let ep = ep.clone();
                    async move {
                        let mut c = Client::connect([ep], None)
                            .await
                            .map_err(|e| e.to_string())?;
                        tokio::time::timeout(Duration::from_secs(1), c.get("health", None))
                            .await
                            .map_err(|_| "timeout".to_string())?
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    }
                },
            )
            .await;
        }
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts member `i` on its old data dir and waits until it serves.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_healthy().await;
    }

    /// Sends a signal (SIGSTOP/SIGCONT) to member `i`.
    pub fn signal(&self, i: usize, sig: Signal) {
        if let Some(pid) = self.members[i].pid() {
            kill(pid, sig).expect("signal etcd");
        }
    }

    /// The index of the current leader, as member `via` reports it.
    pub async fn leader(&self, via: usize) -> usize {
        let mut c = self.client_of(via).await;
        let status = c.status().await.expect("status");
        let leader = status.leader();
        for (i, m) in self.members.iter().enumerate() {
            let mut c = Client::connect([m.endpoint()], None).await.expect("client");
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(1), c.status()).await
                && s.header().map(|h| h.member_id()) == Some(leader)
            {
                return i;
            }
        }
        panic!("no member is the leader {leader:x}");
    }

    fn dump_logs(&self) {
        for m in &self.members {
            let log = std::fs::read_to_string(&m.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("---- etcd {} log (last 40 lines) ----", m.name);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                // A stopped process must be continued to die promptly.
                let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGCONT);
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
