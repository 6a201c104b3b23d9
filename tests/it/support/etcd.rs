//! Real etcd clusters in temp dirs: Debian's etcd-server (3.4) by default,
//! or the binary named by `REGISTRAR_TEST_ETCD` (./scripts/test points it at
//! etcd 3.5 for the second part of its run).

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

/// The etcd binary the tests run: `$REGISTRAR_TEST_ETCD`, else `etcd` on PATH.
pub fn etcd_binary() -> PathBuf {
    std::env::var_os("REGISTRAR_TEST_ETCD")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"))
}

pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    tls: bool,
}

impl Member {
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    pub fn pid(&self) -> Option<Pid> {
        self.child.as_ref().map(|c| Pid::from_raw(c.id() as i32))
    }
}

/// Certificates for a TLS cluster, written as PEM files.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that signed nothing here: verifying etcd with it must fail.
    pub other_ca: PathBuf,
}

impl Pki {
    /// registrar's flags for a client of this PKI: `--cacert`, `--cert`,
    /// `--key`.
    pub fn client_args(&self) -> Vec<String> {
        [
            ("--cacert", &self.ca),
            ("--cert", &self.client_cert),
            ("--key", &self.client_key),
        ]
        .into_iter()
        .flat_map(|(flag, path)| [flag.to_string(), path.to_string_lossy().into_owned()])
        .collect()
    }

    pub fn generate(dir: &std::path::Path) -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        };
        let write = |name: &str, text: String| {
            let p = dir.join(name);
            std::fs::write(&p, text).expect("write pem");
            p
        };
        let ca = |name: &str| {
            let key = KeyPair::generate().expect("ca key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let cert = params.self_signed(&key).expect("self-sign ca");
            (cert, Issuer::new(params, key))
        };
        let (ca_cert, issuer) = ca("registrar test CA");
        let (other_cert, _) = ca("unrelated CA");
        let leaf = |sans: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().expect("leaf key");
            let mut params = CertificateParams::new(sans).expect("leaf params");
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).expect("sign leaf");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) = leaf(
            vec!["registrar".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        Pki {
            ca: write("ca.pem", ca_cert.pem()),
            server_cert: write("server.pem", server_cert),
            server_key: write("server-key.pem", server_key),
            client_cert: write("client.pem", client_cert),
            client_key: write("client-key.pem", client_key),
            other_ca: write("other-ca.pem", other_cert.pem()),
        }
    }

    /// etcd-client TLS options with the client certificate.
    pub fn client_tls(&self) -> etcd_client::TlsOptions {
        let read = |p: &PathBuf| std::fs::read(p).expect("read pem");
        etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&self.ca)))
            .identity(etcd_client::Identity::from_pem(
                read(&self.client_cert),
                read(&self.client_key),
            ))
    }
}

/// How to start a cluster.
#[derive(Default)]
pub struct Options {
    /// Serve clients over mutual TLS.
    pub tls: bool,
    /// Extra etcd flags, e.g. `--auth-token-ttl`.
    pub extra_args: Vec<String>,
}

pub struct Cluster {
    pub members: Vec<Member>,
    pub pki: Option<Pki>,
    extra_args: Vec<String>,
    /// Credentials the harness uses once auth is enabled.
    root: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts an `n`-member cluster and waits until every member answers.
    pub async fn start(n: usize) -> Cluster {
        Self::start_with(n, Options::default()).await
    }

    /// Starts an `n`-member cluster with options.
    pub async fn start_with(n: usize, options: Options) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir for etcd");
        let pki = options.tls.then(|| Pki::generate(dir.path()));
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                data_dir: dir.path().join(format!("m{i}.etcd")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
                tls: options.tls,
            })
            .collect();
        let mut cluster = Cluster {
            members,
            pki,
            extra_args: options.extra_args,
            root: None,
            _dir: dir,
        };
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
        let mut extra = self.extra_args.clone();
        if let Some(pki) = &self.pki {
            for (flag, path) in [
                ("--cert-file", &pki.server_cert),
                ("--key-file", &pki.server_key),
                ("--trusted-ca-file", &pki.ca),
            ] {
                extra.push(flag.to_string());
                extra.push(path.to_string_lossy().into_owned());
            }
            extra.push("--client-cert-auth".into());
        }
        let m = &mut self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("etcd log file");
        let binary = etcd_binary();
        let child = Command::new(&binary)
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
            .args(&extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}); ./scripts/test installs etcd-server, \
                     and REGISTRAR_TEST_ETCD must name an etcd binary",
                    binary.display()
                )
            });
        m.child = Some(child);
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// All endpoints, comma separated, for --endpoints.
    pub fn endpoint_list(&self) -> String {
        self.endpoints().join(",")
    }

    /// Connect options for the harness's own clients (TLS, root user).
    pub fn connect_options(&self) -> etcd_client::ConnectOptions {
        let mut o = etcd_client::ConnectOptions::new();
        if let Some(pki) = &self.pki {
            o = o.with_tls(pki.client_tls());
        }
        if let Some((u, p)) = &self.root {
            o = o
                .with_user(u.clone(), p.clone())
                .with_auto_token_refresh(true);
        }
        o
    }

    /// A client of member `i` alone.
    pub async fn client_of(&self, i: usize) -> Client {
        Client::connect([self.members[i].endpoint()], Some(self.connect_options()))
            .await
            .expect("etcd client")
    }

    /// Enables auth with a root user; the harness's clients use it from now on.
    pub async fn enable_auth(&mut self, root_password: &str) {
        let mut c = self.client().await;
        c.user_add("root", root_password, None)
            .await
            .expect("add root");
        c.user_grant_role("root", "root").await.expect("grant root");
        c.auth_enable().await.expect("enable auth");
        self.root = Some(("root".into(), root_password.into()));
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
                    let opts = self.connect_options();
                    async move {
                        let mut c = Client::connect([ep], Some(opts))
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

    /// How many watch streams member `i` has started, from its metrics.
    pub async fn watch_streams(&self, i: usize) -> u64 {
        let url = format!("{}/metrics", self.members[i].endpoint());
        let text = http_get(&url).await;
        text.lines()
            .find(|l| {
                l.starts_with("grpc_server_started_total")
                    && l.contains("grpc_method=\"Watch\"")
                    && l.contains("etcdserverpb.Watch")
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no watch stream counter in etcd's metrics:\n{text}"))
    }

    /// How many unary requests of `method` (e.g. "Range") member `i` has
    /// answered, whatever their result, from its metrics.
    pub async fn requests_handled(&self, i: usize, method: &str) -> u64 {
        let url = format!("{}/metrics", self.members[i].endpoint());
        let text = http_get(&url).await;
        text.lines()
            .filter(|l| {
                l.starts_with("grpc_server_handled_total")
                    && l.contains(&format!("grpc_method=\"{method}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Kills a single-member cluster, deletes its data and starts it afresh
    /// on the same addresses: what a consumer sees of a restore to an empty
    /// snapshot or of a replaced cluster. Waits until it serves.
    pub async fn wipe_and_restart(&mut self, i: usize) {
        self.kill(i);
        std::fs::remove_dir_all(&self.members[i].data_dir).expect("remove the data dir");
        self.spawn(i);
        self.wait_healthy().await;
    }

    /// Replaces the whole cluster with a new, empty one on the same
    /// addresses (every data dir lost): its revisions start again from 1.
    pub async fn wipe_all_and_restart(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
            let _ = std::fs::remove_dir_all(&self.members[i].data_dir);
        }
        for i in 0..self.members.len() {
            self.spawn(i);
        }
        self.wait_healthy().await;
    }

    /// Saves a snapshot of the registry through member 0 (etcdctl next to
    /// the etcd binary).
    pub fn snapshot(&self, path: &std::path::Path) {
        let out = Command::new(etcd_binary().with_file_name("etcdctl"))
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &self.members[0].endpoint(),
                "snapshot",
                "save",
            ])
            .arg(path)
            .output()
            .expect("run etcdctl snapshot save");
        assert!(
            out.status.success(),
            "etcdctl snapshot save: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Restores every member from `snapshot` (as an operator does after a
    /// disaster: the cluster goes back to that revision) and waits until
    /// all serve.
    pub async fn restore_all(&mut self, snapshot: &std::path::Path) {
        let initial = self.initial_cluster();
        for i in 0..self.members.len() {
            self.kill(i);
            let m = &self.members[i];
            let _ = std::fs::remove_dir_all(&m.data_dir);
            let out = Command::new(etcd_binary().with_file_name("etcdctl"))
                .env("ETCDCTL_API", "3")
                .args(["snapshot", "restore"])
                .arg(snapshot)
                .args(["--name", &m.name])
                .arg("--data-dir")
                .arg(&m.data_dir)
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-token", "registrar-test"])
                .args(["--initial-advertise-peer-urls", &m.peer_url()])
                .output()
                .expect("run etcdctl snapshot restore");
            assert!(
                out.status.success(),
                "etcdctl snapshot restore: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for i in 0..self.members.len() {
            self.spawn(i);
        }
        self.wait_healthy().await;
    }

    /// Restarts every member at once (a whole-cluster restart) and waits
    /// until all serve again.
    pub async fn restart_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        for i in 0..self.members.len() {
            self.spawn(i);
        }
        self.wait_healthy().await;
    }

    /// Starts the given killed members again together (quorum may need
    /// more than one) and waits until every running member serves.
    pub async fn start_members(&mut self, which: &[usize]) {
        for &i in which {
            if self.members[i].child.is_none() {
                self.spawn(i);
            }
        }
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
        self.try_leader(via)
            .await
            .unwrap_or_else(|| panic!("member {via} names no reachable leader"))
    }

    /// The index of the current leader, as member `via` reports it, or
    /// `None` when `via` does not answer within a second or names no member.
    pub async fn try_leader(&self, via: usize) -> Option<usize> {
        let status = |ep: String| async move {
            let mut c = Client::connect([ep], Some(self.connect_options()))
                .await
                .ok()?;
            tokio::time::timeout(Duration::from_secs(1), c.status())
                .await
                .ok()?
                .ok()
        };
        let leader = status(self.members[via].endpoint()).await?.leader();
        for (i, m) in self.members.iter().enumerate() {
            if let Some(s) = status(m.endpoint()).await
                && s.header().map(|h| h.member_id()) == Some(leader)
            {
                return Some(i);
            }
        }
        None
    }

    /// Makes sure member `i` does not lead, moving leadership to another
    /// member if it does. Pausing a leader longer than 2/3 of a lease's TTL
    /// makes etcd 3.4.23 revoke live leases when it resumes (etcd issues
    /// 12528/15247); tests of a paused member that must see no gap use this.
    pub async fn ensure_not_leader(&self, i: usize) {
        let other = (i + 1) % self.members.len();
        if self.leader(other).await != i {
            return;
        }
        let mut target = self.client_of(other).await;
        let target_id = target
            .status()
            .await
            .expect("status of the new leader")
            .header()
            .map(|h| h.member_id())
            .expect("member id");
        let mut current = self.client_of(i).await;
        current
            .move_leader(target_id)
            .await
            .expect("move leadership");
        eprintln!("moved leadership away from member {i}");
        eventually(Duration::from_secs(10), "leadership to move", || async {
            match self.try_leader(other).await {
                Some(l) if l != i => Ok(()),
                l => Err(format!("leader is {l:?}")),
            }
        })
        .await;
    }

    /// Member `i`'s log so far.
    pub fn log_of(&self, i: usize) -> String {
        std::fs::read_to_string(&self.members[i].log).unwrap_or_default()
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

/// A plain HTTP/1.0 GET on loopback; panics when nothing answers.
pub async fn http_get(url: &str) -> String {
    try_http_get(url).await.unwrap()
}

/// A plain HTTP/1.0 GET on loopback, or why it failed (for polling a
/// server that may not listen yet).
pub async fn try_http_get(url: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.trim_start_matches("http://");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let err = |e: std::io::Error| format!("{url}: {e}");
    let mut s = tokio::net::TcpStream::connect(host).await.map_err(err)?;
    s.write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .map_err(err)?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.map_err(err)?;
    Ok(out)
}
