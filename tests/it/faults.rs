//! Faults on a 3-member cluster, with the agent given all three endpoints.
//! Each test watches the registry independently and asserts what a
//! consumer saw (no DELETE unless the fault outlasted the TTL), the final
//! state, and prints the recovery time.

use std::time::Duration;

use etcd_client::Client;
use nix::sys::signal::Signal;
use tokio::time::Instant;

use crate::agent::wait_keepalives;
use crate::registered;
use crate::support::proc::{cmd, host_args};
use crate::support::{Agent, Cluster, Watcher, eventually};

const DIR: &str = "/infrastructure/dc1/web/h1/";

fn agent(endpoints: &str, ttl: &str) -> Agent {
    let mut args = cmd("agent", host_args(endpoints, "dc1", "web", "h1", "m1", ttl));
    args.extend(["--request-timeout", "1s", "--connect-timeout", "500ms"].map(String::from));
    Agent::spawn("agent", &args)
}

async fn wait_registered(c: &Client, within: Duration) -> i64 {
    eventually(within, "registration", || {
        let mut c = c.clone();
        async move { registered(&mut c, DIR).await }
    })
    .await
}

/// Waits for a complete registration on a lease other than `old`.
async fn wait_reregistered(c: &Client, old: i64, within: Duration) -> i64 {
    eventually(within, "re-registration on a new lease", || {
        let mut c = c.clone();
        async move {
            match registered(&mut c, DIR).await {
                Ok(l) if l != old => Ok(l),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await
}

/// How long after `since` the agent logged a line containing `needle`
/// (log lines start with an RFC 3339 timestamp).
pub(crate) fn logged_after(
    log: &str,
    needle: &str,
    since: std::time::SystemTime,
) -> Option<Duration> {
    log.lines().filter(|l| l.contains(needle)).find_map(|l| {
        let stamp = l.split_whitespace().next()?;
        let at = humantime::parse_rfc3339_weak(stamp.trim_end_matches('Z')).ok()?;
        at.duration_since(since).ok()
    })
}

/// Asserts that `lease` stays alive for `period` (longer than its TTL, so
/// keep-alives must be landing).
async fn stays_alive(c: &Client, lease: i64, period: Duration) {
    let mut c = c.clone();
    let until = Instant::now() + period;
    while Instant::now() < until {
        if let Ok(r) = c.lease_time_to_live(lease, None).await {
            assert!(r.ttl() > 0, "lease {lease:x} expired");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The port of the endpoint the agent's keep-alive stream is on, from its
/// debug log.
pub(crate) fn stream_port(log: &str) -> Option<u16> {
    log.lines()
        .rev()
        .find(|l| l.contains("keep-alive stream open"))
        .and_then(|l| l.split("endpoint=http://127.0.0.1:").nth(1))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
}

/// The member serving the agent's keep-alive stream.
async fn stream_member(cluster: &Cluster, agent: &Agent) -> usize {
    let port = eventually(
        Duration::from_secs(5),
        "the keep-alive stream's endpoint in the log",
        || {
            let log = agent.log();
            async move { stream_port(&log).ok_or(log) }
        },
    )
    .await;
    cluster
        .members
        .iter()
        .position(|m| m.client_port == port)
        .expect("the stream is on a cluster member")
}

/// A 3-member cluster with the agent (TTL 6 s) registered; returns its
/// lease, the member under its keep-alive stream, and another member. The
/// stream's member is made a follower: a leader paused past 2/3 of the TTL
/// revokes live leases when it resumes (an etcd 3.4.23 bug, see README),
/// which no client can prevent.
async fn registered_with_stream_member() -> (Cluster, Agent, i64, usize, usize) {
    let cluster = Cluster::start(3).await;
    let agent = agent(&cluster.endpoint_list(), "6s");
    let c0 = cluster.client_of(0).await;
    let lease = wait_registered(&c0, Duration::from_secs(10)).await;
    let paused = stream_member(&cluster, &agent).await;
    cluster.ensure_not_leader(paused).await;
    (cluster, agent, lease, paused, (paused + 1) % 3)
}

/// Waits up to 10 s until the watcher has seen a DELETE (`what` names the
/// expectation in the failure message).
async fn first_delete(watcher: &Watcher, what: &str) {
    eventually(Duration::from_secs(10), what, || {
        let n = watcher.deletes().len();
        async move {
            if n > 0 {
                Ok(())
            } else {
                Err("no DELETE yet".to_string())
            }
        }
    })
    .await;
}

/// The host's deletes seen by the independent watcher.
fn gaps(watcher: &Watcher) -> Vec<String> {
    watcher.deletes().into_iter().map(|e| e.key).collect()
}

#[tokio::test]
async fn killing_the_leader_causes_no_gap() {
    let mut cluster = Cluster::start(3).await;
    let watcher = Watcher::start(cluster.endpoints(), "/infrastructure/").await;
    let _agent = agent(&cluster.endpoint_list(), "6s");
    let c0 = cluster.client_of(0).await;
    let lease = wait_registered(&c0, Duration::from_secs(10)).await;
    // (How fast the stream moves is printed by the kill -9 and pause tests.)
    let leader = cluster.leader(0).await;
    cluster.kill(leader);
    let c = cluster.client_of((leader + 1) % 3).await;
    wait_keepalives(&c, lease, 2, Duration::from_secs(15)).await;
    assert_eq!(
        registered(&mut c.clone(), DIR).await,
        Ok(lease),
        "registration changed"
    );
    assert!(
        gaps(&watcher).is_empty(),
        "a watcher saw the host disappear: {:?}",
        gaps(&watcher)
    );
}

#[tokio::test]
async fn kill_9_of_the_member_under_the_keepalive_stream_causes_no_gap() {
    let mut cluster = Cluster::start(3).await;
    let agent = agent(&cluster.endpoint_list(), "6s");
    let c0 = cluster.client_of(0).await;
    let lease = wait_registered(&c0, Duration::from_secs(10)).await;
    let victim = stream_member(&cluster, &agent).await;
    let other = (victim + 1) % 3;
    let watcher = Watcher::start(vec![cluster.members[other].endpoint()], "/infrastructure/").await;
    let killed = std::time::SystemTime::now();
    cluster.kill(victim);
    let c = cluster.client_of(other).await;
    wait_keepalives(&c, lease, 2, Duration::from_secs(15)).await;
    eprintln!(
        "kill -9 of the stream's member: stream reopened {:?} after the kill",
        logged_after(&agent.log(), "keep-alive stream open", killed)
    );
    assert_ne!(
        stream_member(&cluster, &agent).await,
        victim,
        "the stream did not move"
    );
    assert_eq!(registered(&mut c.clone(), DIR).await, Ok(lease));
    assert!(gaps(&watcher).is_empty(), "{:?}", gaps(&watcher));
}

#[tokio::test]
async fn first_endpoint_dead_from_the_start_does_not_matter() {
    let mut cluster = Cluster::start(3).await;
    cluster.kill(0);
    // The dead member stays first in the list.
    let _agent = agent(&cluster.endpoint_list(), "6s");
    let c = cluster.client_of(1).await;
    let lease = wait_registered(&c, Duration::from_secs(10)).await;
    wait_keepalives(&c, lease, 3, Duration::from_secs(12)).await;
}

#[tokio::test]
async fn paused_member_under_the_keepalive_stream_is_left_for_another() {
    let (cluster, agent, lease, paused, other) = registered_with_stream_member().await;
    let watcher = Watcher::start(vec![cluster.members[other].endpoint()], "/infrastructure/").await;

    // SIGSTOP: the member keeps its connections open and answers nothing.
    let stopped = std::time::SystemTime::now();
    cluster.signal(paused, Signal::SIGSTOP);
    let c = cluster.client_of(other).await;
    // Keep-alives must continue through another member, well within the TTL.
    wait_keepalives(&c, lease, 2, Duration::from_secs(20)).await;
    let moved = logged_after(&agent.log(), "keep-alive stream open", stopped);
    eprintln!("paused the stream's member: stream reopened elsewhere {moved:?} after SIGSTOP");
    assert!(
        moved.is_some_and(|d| d < Duration::from_secs(6)),
        "not moved within the TTL: {moved:?}"
    );
    assert_ne!(
        stream_member(&cluster, &agent).await,
        paused,
        "the stream never left the paused member"
    );
    cluster.signal(paused, Signal::SIGCONT);
    assert_eq!(
        registered(&mut c.clone(), DIR).await,
        Ok(lease),
        "registration changed"
    );
    assert!(
        gaps(&watcher).is_empty(),
        "a watcher saw the host disappear: {:?}",
        gaps(&watcher)
    );
    assert!(
        agent.log().contains("silent for"),
        "the silence was not reported"
    );
}

#[tokio::test]
async fn whole_cluster_restart_keeps_the_registration() {
    let mut cluster = Cluster::start(3).await;
    let agent = agent(&cluster.endpoint_list(), "6s");
    let c0 = cluster.client_of(0).await;
    let lease = wait_registered(&c0, Duration::from_secs(10)).await;
    let watcher = Watcher::start(cluster.endpoints(), "/infrastructure/").await;
    let restarted = std::time::SystemTime::now();
    cluster.restart_all().await;
    let c = cluster.client_of(0).await;
    wait_keepalives(&c, lease, 2, Duration::from_secs(15)).await;
    eprintln!(
        "whole-cluster restart: keep-alive stream back {:?} after the restart began",
        logged_after(&agent.log(), "keep-alive stream open", restarted)
    );
    assert_eq!(
        registered(&mut c.clone(), DIR).await,
        Ok(lease),
        "the lease did not survive the restart"
    );
    assert!(gaps(&watcher).is_empty(), "{:?}", gaps(&watcher));
}

#[tokio::test]
async fn quorum_loss_for_two_ttls_then_recovery() {
    let mut cluster = Cluster::start(3).await;
    let _agent = agent(&cluster.endpoint_list(), "3s");
    let c0 = cluster.client_of(0).await;
    wait_registered(&c0, Duration::from_secs(10)).await;
    cluster.kill(1);
    cluster.kill(2);
    // The fault itself: no quorum for two TTLs.
    tokio::time::sleep(Duration::from_secs(6)).await;
    cluster.start_members(&[1, 2]).await;
    let restored = Instant::now();
    let c = cluster.client_of(0).await;
    let lease = wait_registered(&c, Duration::from_secs(10)).await;
    eprintln!(
        "quorum restored: registered again after {:?}",
        restored.elapsed()
    );
    stays_alive(&c, lease, Duration::from_secs(4)).await;
    assert!(registered(&mut c.clone(), DIR).await.is_ok());
}

#[tokio::test]
async fn partition_shorter_than_the_ttl_causes_no_gap() {
    let cluster = Cluster::start(3).await;
    let (proxies, eps) = crate::support::proxy::in_front_of(&cluster).await;
    let watcher = Watcher::start(cluster.endpoints(), "/infrastructure/").await;
    let agent = agent(&eps, "6s");
    let c = cluster.client_of(0).await;
    let lease = wait_registered(&c, Duration::from_secs(10)).await;
    wait_keepalives(&c, lease, 1, Duration::from_secs(10)).await;
    proxies.iter().for_each(|p| p.block(true));
    // The fault: half a TTL of silence.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let healed = std::time::SystemTime::now();
    proxies.iter().for_each(|p| p.block(false));
    wait_keepalives(&c, lease, 2, Duration::from_secs(10)).await;
    eprintln!(
        "partition of 3s (TTL 6s): keep-alive stream back {:?} after healing",
        logged_after(&agent.log(), "keep-alive stream open", healed)
    );
    assert_eq!(registered(&mut c.clone(), DIR).await, Ok(lease));
    assert!(
        gaps(&watcher).is_empty(),
        "a short partition caused a gap: {:?}",
        gaps(&watcher)
    );
}

#[tokio::test]
async fn partition_longer_than_the_ttl_recovers_within_two_seconds_of_healing() {
    let cluster = Cluster::start(3).await;
    let (proxies, eps) = crate::support::proxy::in_front_of(&cluster).await;
    let watcher = Watcher::start(cluster.endpoints(), "/infrastructure/").await;
    let agent = agent(&eps, "3s");
    let c = cluster.client_of(0).await;
    let lease = wait_registered(&c, Duration::from_secs(10)).await;
    proxies.iter().for_each(|p| p.block(true));
    // The lease expires while the agent cannot reach etcd: a gap.
    first_delete(&watcher, "the lease to expire during the partition").await;
    proxies.iter().for_each(|p| p.block(false));
    let healed = Instant::now();
    let new = wait_reregistered(&c, lease, Duration::from_secs(10)).await;
    let took = healed.elapsed();
    eprintln!("partition longer than the TTL: re-registered {took:?} after healing");
    assert!(
        took <= Duration::from_millis(2500),
        "recovery took {took:?}; log:\n{}",
        agent.log()
    );
    stays_alive(&c, new, Duration::from_secs(4)).await;
}

#[tokio::test]
async fn agent_paused_longer_than_the_ttl_re_registers_when_continued() {
    let cluster = Cluster::start(3).await;
    let watcher = Watcher::start(cluster.endpoints(), "/infrastructure/").await;
    let agent = agent(&cluster.endpoint_list(), "3s");
    let c = cluster.client_of(0).await;
    let lease = wait_registered(&c, Duration::from_secs(10)).await;
    agent.signal(Signal::SIGSTOP);
    first_delete(&watcher, "the lease to expire while the agent is stopped").await;
    agent.signal(Signal::SIGCONT);
    let continued = Instant::now();
    let new = wait_reregistered(&c, lease, Duration::from_secs(10)).await;
    eprintln!(
        "agent paused past its TTL: re-registered {:?} after SIGCONT",
        continued.elapsed()
    );
    stays_alive(&c, new, Duration::from_secs(4)).await;
}

/// etcd 3.4.23 lets a leader paused longer than about 2/3 of a TTL revoke
/// live leases when it resumes (etcd issues 12528/15247; see README). The
/// agent cannot prevent that; it must put the host back at once. Whether
/// etcd revokes at all varies from run to run, so the test asserts the
/// outcome either way: every gap closes within 2 s, and the host ends up
/// registered by its own machine.
#[tokio::test]
async fn leader_paused_past_the_ttl_may_revoke_and_the_agent_puts_the_host_back() {
    let cluster = Cluster::start(3).await;
    let watcher = Watcher::start(cluster.endpoints(), "/infrastructure/").await;
    let _agent = agent(&cluster.endpoint_list(), "3s");
    let c0 = cluster.client_of(0).await;
    wait_registered(&c0, Duration::from_secs(10)).await;
    let leader = cluster.leader(0).await;
    let other = (leader + 1) % 3;

    cluster.signal(leader, Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(6)).await;
    cluster.signal(leader, Signal::SIGCONT);
    // The revokes land right after the resume or up to a request timeout
    // (5 s + 2 x 500 ms) later: watch that whole window.
    tokio::time::sleep(Duration::from_secs(8)).await;

    let c = cluster.client_of(other).await;
    wait_registered(&c, Duration::from_secs(5)).await;
    let events = watcher.events();
    let owner = format!("{DIR}owner");
    let mut gaps = Vec::new();
    let mut open: Option<Instant> = None;
    for e in events.iter().filter(|e| e.key == owner) {
        assert_eq!(
            e.value,
            if e.put { "m1" } else { "" },
            "owner written by another"
        );
        match (e.put, open) {
            (false, _) => open = Some(e.at),
            (true, Some(at)) => {
                gaps.push(e.at - at);
                open = None;
            }
            (true, None) => {}
        }
    }
    assert!(open.is_none(), "the host was left unregistered");
    eprintln!(
        "leader paused 6 s with TTL 3 s: etcd revoked {} time(s); gaps {gaps:?}",
        gaps.len()
    );
    for g in &gaps {
        assert!(*g < Duration::from_secs(2), "a gap lasted {g:?}: {gaps:?}");
    }
}

/// A paused member keeps the own-key watch silent too. The watch follows
/// the keep-alive to another member, so keys deleted from outside during
/// the pause are still put back within a keep-alive period or so.
#[tokio::test]
async fn keys_deleted_while_the_watched_member_is_paused_are_still_repaired() {
    let (cluster, agent, lease, paused, other) = registered_with_stream_member().await;
    let stopped = std::time::SystemTime::now();
    cluster.signal(paused, Signal::SIGSTOP);
    eventually(Duration::from_secs(6), "the keep-alive to move", || {
        let log = agent.log();
        async move {
            logged_after(&log, "keep-alive stream open", stopped)
                .map(|_| ())
                .ok_or_else(|| "not yet".to_string())
        }
    })
    .await;

    let mut c = cluster.client_of(other).await;
    let deleted = Instant::now();
    c.delete(DIR, Some(etcd_client::DeleteOptions::new().with_prefix()))
        .await
        .expect("delete the host's keys from outside");
    // The keep-alive period is 2 s: the watch notices the move within one
    // period, then sees the delete, then rewrites on the same lease.
    let back = eventually(Duration::from_secs(5), "the keys to be put back", || {
        let mut c = c.clone();
        async move { registered(&mut c, DIR).await }
    })
    .await;
    eprintln!(
        "keys deleted while the watched member was paused: back after {:?}",
        deleted.elapsed()
    );
    assert_eq!(back, lease, "repaired on the same lease");
    cluster.signal(paused, Signal::SIGCONT);
}
