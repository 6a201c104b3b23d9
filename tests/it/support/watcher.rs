//! An independent watcher on the registry: records every event so tests can
//! assert what a consumer saw (e.g. no DELETE during a fault).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, EventType, WatchOptions};
use tokio::task::JoinHandle;
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct Seen {
    pub put: bool,
    pub key: String,
    pub value: String,
    pub revision: i64,
    pub lease: i64,
    pub at: Instant,
    /// How many times the history was reset (a replaced or restored
    /// cluster) before this event: revisions start again in each epoch.
    pub epoch: u32,
}

pub struct Watcher {
    events: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Watcher {
    /// Watches `prefix` through the given endpoints (re-connecting through
    /// any of them), from the current revision on.
    pub async fn start(endpoints: Vec<String>, prefix: &str) -> Watcher {
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let prefix = prefix.to_string();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut next_rev = 0i64;
            let mut epoch = 0u32;
            let mut i = 0usize;
            loop {
                let ep = endpoints[i % endpoints.len()].clone();
                i += 1;
                let attempt = async {
                    let mut c = Client::connect([ep], None).await?;
                    let mut opts = WatchOptions::new().with_prefix();
                    if next_rev > 0 {
                        opts = opts.with_start_revision(next_rev);
                    }
                    let mut stream = c.watch(prefix.as_str(), Some(opts)).await?;
                    while let Some(resp) = stream.message().await? {
                        if resp.created()
                            && let Some(tx) = ready.take()
                        {
                            if let Some(h) = resp.header() {
                                next_rev = h.revision() + 1;
                            }
                            let _ = tx.send(());
                        } else if resp.created()
                            && let Some(h) = resp.header()
                            && h.revision() + 1 < next_rev
                        {
                            // The cluster was replaced or restored: its
                            // history starts again. Watch from its present.
                            epoch += 1;
                            next_rev = h.revision() + 1;
                            break;
                        }
                        for ev in resp.events() {
                            if let Some(kv) = ev.kv() {
                                next_rev = next_rev.max(kv.mod_revision() + 1);
                                sink.lock().expect("events").push(Seen {
                                    put: ev.event_type() == EventType::Put,
                                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                                    value: String::from_utf8_lossy(kv.value()).into_owned(),
                                    revision: kv.mod_revision(),
                                    lease: kv.lease(),
                                    at: Instant::now(),
                                    epoch,
                                });
                            }
                        }
                    }
                    Ok::<(), etcd_client::Error>(())
                };
                let _ = tokio::time::timeout(Duration::from_secs(3600), attempt).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("watcher did not start within 10 s")
            .expect("watcher start");
        Watcher { events, task }
    }

    pub fn events(&self) -> Vec<Seen> {
        self.events.lock().expect("events").clone()
    }

    pub fn deletes(&self) -> Vec<Seen> {
        self.events().into_iter().filter(|e| !e.put).collect()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}
