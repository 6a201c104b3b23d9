//! The test harness: real etcd clusters on ports picked at run time, the real
//! registrar binary with a scrubbed environment, an independent watcher, and
//! polling with deadlines instead of sleeps.
//!
//! Every process started here is killed when its handle is dropped, also
//! when a test panics; etcd's log is printed when a test fails.

#![allow(dead_code)]

pub mod dns;
pub mod etcd;
pub mod proc;
pub mod proxy;
pub mod watcher;

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

pub use etcd::{Cluster, Options};
pub use proc::Agent;
pub use watcher::Watcher;

/// Polls `probe` every 20 ms until it returns `Some`, or panics after
/// `within` naming `what` and the last observation.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {within:?} waiting for {what}; last observation: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A free TCP port on 127.0.0.1, picked by the kernel, and never one this
/// test process handed out before: the kernel may offer a just-released
/// port again, and a cluster once got the same peer port for two members.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = l.local_addr().expect("local addr").port();
        let fresh = HANDED_OUT
            .lock()
            .map(|mut seen| seen.insert(port))
            .unwrap_or(true);
        if fresh {
            return port;
        }
    }
}
