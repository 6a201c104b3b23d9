//! An in-test TCP proxy in front of an etcd member that can black-hole
//! traffic: connections stay open but nothing passes, which is what a
//! network partition looks like to a client.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct Proxy {
    pub port: u16,
    blocked: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free port and forwards to `target_port` on 127.0.0.1.
    pub async fn start(target_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let blocked = Arc::new(AtomicBool::new(false));
        let flag = blocked.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let flag = flag.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pipe(cr, sw, flag.clone()), pipe(sr, cw, flag));
                });
            }
        });
        Proxy {
            port,
            blocked,
            task,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Black-holes (true) or restores (false) all traffic.
    pub fn block(&self, on: bool) {
        self.blocked.store(on, Ordering::SeqCst);
    }
}

/// Copies one direction; while blocked, data is held back (not dropped
/// connections: a partition, not a reset).
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    blocked: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while blocked.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Data read while a partition began is held until it ends.
        while blocked.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// One proxy in front of every member of `cluster`, and the comma-separated
/// endpoint list that reaches the cluster only through them.
pub async fn in_front_of(cluster: &super::Cluster) -> (Vec<Proxy>, String) {
    let mut proxies = Vec::new();
    for m in &cluster.members {
        proxies.push(Proxy::start(m.client_port).await);
    }
    let eps = endpoint_list(&proxies);
    (proxies, eps)
}

/// The proxies' endpoints, comma separated, for --endpoints.
pub fn endpoint_list(proxies: &[Proxy]) -> String {
    proxies
        .iter()
        .map(Proxy::endpoint)
        .collect::<Vec<_>>()
        .join(",")
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
