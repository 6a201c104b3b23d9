//! Integration tests of registrar against real etcd processes. One test
//! binary; the harness lives in `support/`.

mod support;

mod agent;
mod checks;
mod consumers;
mod deploy;
mod dns;
mod etcd_errors;
mod fail_static;
mod faults;
mod haproxy_runtime;
mod lease_session;
mod one_shot;
mod prometheus;
mod render;
mod render_safety;
mod security;
mod soak;

use std::collections::BTreeSet;

use etcd_client::{Client, GetOptions, KeyValue};

/// Every key under `prefix`, with the revision of the read. Retries for
/// up to 10 s across elections ("leader changed").
pub async fn read_prefix(c: &mut Client, prefix: &str) -> (Vec<KeyValue>, i64) {
    support::eventually(
        std::time::Duration::from_secs(10),
        "a read of the registry",
        || {
            let mut c = c.clone();
            async move {
                let resp = c
                    .get(prefix, Some(GetOptions::new().with_prefix()))
                    .await
                    .map_err(|e| e.to_string())?;
                let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                Ok((resp.kvs().to_vec(), rev))
            }
        },
    )
    .await
}

/// The keys under `prefix` as strings.
pub fn keys(kvs: &[KeyValue]) -> BTreeSet<String> {
    kvs.iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}

/// The value of one key, if present.
pub async fn value(c: &mut Client, key: &str) -> Option<(String, i64)> {
    let resp = c.get(key, None).await.ok()?;
    resp.kvs()
        .first()
        .map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.lease()))
}

/// A host's full registration (owner, ip, health) is present: returns its lease.
pub async fn registered(c: &mut Client, dir: &str) -> Result<i64, String> {
    let (kvs, _) = read_prefix(c, dir).await;
    let k = keys(&kvs);
    for leaf in ["owner", "ip", "health"] {
        if !k.contains(&format!("{dir}{leaf}")) {
            return Err(format!("{dir}{leaf} missing; have {k:?}"));
        }
    }
    let leases: BTreeSet<i64> = kvs.iter().map(|kv| kv.lease()).collect();
    match leases.into_iter().collect::<Vec<_>>().as_slice() {
        [l] if *l != 0 => Ok(*l),
        other => Err(format!("keys of {dir} have leases {other:?}")),
    }
}
