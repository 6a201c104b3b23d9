//! Faults on a 3-member cluster: the agent follows every endpoint and must
//! not lose its registration.

use std::time::Duration;

use crate::agent::wait_keepalives;
use crate::support::proc::{cmd, host_args};
use crate::support::{Agent, Cluster, Watcher, eventually};
use crate::{read_prefix, registered};

const DIR: &str = "/infrastructure/dc1/web/h1/";

#[tokio::test]
async fn killing_the_leader_causes_no_gap() {
    let mut cluster = Cluster::start(3).await;
    let watcher = Watcher::start(cluster.endpoints(), "/infrastructure/").await;
    let args = cmd(
        "agent",
        host_args(&cluster.endpoint_list(), "dc1", "web", "h1", "m1", "6s"),
    );
    let _agent = Agent::spawn("agent", &args);
    let c0 = cluster.client_of(0).await;
    let lease = eventually(Duration::from_secs(10), "registration", || {
        let mut c = c0.clone();
        async move { registered(&mut c, DIR).await }
    })
    .await;

    let leader = cluster.leader(0).await;
    cluster.kill(leader);
    let survivor = (leader + 1) % 3;
    let c = cluster.client_of(survivor).await;
    // The lease must keep being renewed through the surviving members.
    wait_keepalives(&c, lease, 3, Duration::from_secs(15)).await;

    let mut c = c.clone();
    assert_eq!(
        registered(&mut c, DIR).await,
        Ok(lease),
        "registration changed"
    );
    let deletes = watcher.deletes();
    assert!(
        deletes.is_empty(),
        "a watcher saw the host disappear: {deletes:?}"
    );
}

#[tokio::test]
async fn first_endpoint_dead_from_the_start_does_not_matter() {
    let mut cluster = Cluster::start(3).await;
    cluster.kill(0);
    // The dead member stays first in the list.
    let args = cmd(
        "agent",
        host_args(&cluster.endpoint_list(), "dc1", "web", "h1", "m1", "6s"),
    );
    let _agent = Agent::spawn("agent", &args);
    let c = cluster.client_of(1).await;
    let lease = eventually(Duration::from_secs(10), "registration", || {
        let mut c = c.clone();
        async move { registered(&mut c, DIR).await }
    })
    .await;
    wait_keepalives(&c, lease, 3, Duration::from_secs(10)).await;
    let (kvs, _) = read_prefix(&mut c.clone(), DIR).await;
    assert!(kvs.iter().all(|kv| kv.lease() == lease));
}

/// The port of the endpoint the agent's keep-alive stream is on, from its
/// debug log.
fn stream_port(log: &str) -> Option<u16> {
    log.lines()
        .rev()
        .find(|l| l.contains("keep-alive stream open"))
        .and_then(|l| l.split("endpoint=http://127.0.0.1:").nth(1))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
}

#[tokio::test]
async fn paused_member_under_the_keepalive_stream_is_left_for_another() {
    let cluster = Cluster::start(3).await;
    let args = cmd(
        "agent",
        host_args(&cluster.endpoint_list(), "dc1", "web", "h1", "m1", "6s"),
    );
    let agent = Agent::spawn("agent", &args);
    let c0 = cluster.client_of(0).await;
    let lease = eventually(Duration::from_secs(10), "registration", || {
        let mut c = c0.clone();
        async move { registered(&mut c, DIR).await }
    })
    .await;
    let port = eventually(
        Duration::from_secs(5),
        "the keep-alive stream's endpoint in the log",
        || {
            let log = agent.log();
            async move { stream_port(&log).ok_or(log) }
        },
    )
    .await;
    let paused = cluster
        .members
        .iter()
        .position(|m| m.client_port == port)
        .expect("the stream is on a cluster member");
    let other = (paused + 1) % 3;
    let watcher = Watcher::start(vec![cluster.members[other].endpoint()], "/infrastructure/").await;

    // SIGSTOP: the member keeps its connections open and answers nothing.
    cluster.signal(paused, nix::sys::signal::Signal::SIGSTOP);
    let c = cluster.client_of(other).await;
    // Keep-alives must continue through another member, well within the TTL.
    wait_keepalives(&c, lease, 3, Duration::from_secs(20)).await;
    let moved = stream_port(&agent.log()).expect("stream endpoint");
    assert_ne!(
        moved, port,
        "the keep-alive stream never left the paused member"
    );
    cluster.signal(paused, nix::sys::signal::Signal::SIGCONT);

    let mut c = c.clone();
    assert_eq!(
        registered(&mut c, DIR).await,
        Ok(lease),
        "registration changed"
    );
    assert!(
        watcher.deletes().is_empty(),
        "a watcher saw the host disappear: {:?}",
        watcher.deletes()
    );
    assert!(
        agent.log().contains("silent for"),
        "the silence was not reported"
    );
}
