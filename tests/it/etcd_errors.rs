//! The answers of the etcd under test that registrar's decisions rest on:
//! each error text or code that `etcd::classify` matches, and the `Ok`
//! answers that mean "lease gone". Run on etcd 3.4 and 3.5 by ./scripts/test,
//! so a version that words an error differently fails here, by name, rather
//! than as a mystery in a fault test.

use etcd_client::{Client, ConnectOptions, LeaseGrantOptions, Permission, PutOptions};
use registrar::etcd::{Class, classify};

use crate::support::Cluster;

/// An id no lease has: ids are positive, and the harness grants none this high.
const UNKNOWN: i64 = 0x7eed_0000_0000_0001;

fn class_of<T>(what: &str, r: Result<T, etcd_client::Error>) -> (Class, String) {
    match r {
        Ok(_) => panic!("{what}: expected an error, etcd accepted it"),
        Err(e) => (classify(&e), e.to_string()),
    }
}

#[tokio::test]
async fn lease_answers_mean_what_the_agent_assumes() {
    let cluster = Cluster::start(1).await;
    let mut c = cluster.client().await;

    // A put or a revoke naming a lease etcd does not know: "lease gone".
    let (class, text) = class_of(
        "put with an unknown lease",
        c.put("/k", "v", Some(PutOptions::new().with_lease(UNKNOWN)))
            .await,
    );
    assert_eq!(class, Class::LeaseGone, "{text}");
    let (class, text) = class_of("revoke an unknown lease", c.lease_revoke(UNKNOWN).await);
    assert_eq!(class, Class::LeaseGone, "{text}");

    // time-to-live of an unknown lease is an Ok answer with TTL -1.
    let ttl = c.lease_time_to_live(UNKNOWN, None).await.unwrap();
    assert!(ttl.ttl() <= 0, "time-to-live of an unknown lease: {ttl:?}");

    // A keep-alive for a revoked lease is an Ok answer with TTL 0 on a
    // healthy stream: the first trap in lease.rs.
    let lease = c
        .lease_grant(30, Some(LeaseGrantOptions::new().with_id(0x1ea5e)))
        .await
        .unwrap();
    let (mut keeper, mut stream) = c.lease_keep_alive(lease.id()).await.unwrap();
    c.lease_revoke(lease.id()).await.unwrap();
    keeper.keep_alive().await.unwrap();
    let answer = stream.message().await;
    match answer {
        Ok(Some(resp)) => assert_eq!(resp.ttl(), 0, "keep-alive of a revoked lease: {resp:?}"),
        Ok(None) => panic!("keep-alive of a revoked lease: stream closed"),
        Err(e) => assert_eq!(classify(&e), Class::LeaseGone, "{e}"),
    }

    // A grant under an id in use: the text grant() recognises to adopt a
    // lease whose first grant answer was lost.
    let again = c
        .lease_grant(30, Some(LeaseGrantOptions::new().with_id(0x2ea5e)))
        .await
        .unwrap();
    let (_, text) = class_of(
        "a second grant of the same id",
        c.lease_grant(30, Some(LeaseGrantOptions::new().with_id(again.id())))
            .await,
    );
    assert!(text.contains("lease already exists"), "{text}");
}

#[tokio::test]
async fn auth_answers_are_classified_as_auth() {
    let mut cluster = Cluster::start(1).await;
    let endpoints = cluster.endpoints();

    // Credentials sent to a cluster without auth.
    let (class, text) = class_of(
        "credentials without auth enabled",
        Client::connect(
            endpoints.clone(),
            Some(ConnectOptions::new().with_user("nobody", "pw")),
        )
        .await,
    );
    assert_eq!(class, Class::Auth, "{text}");

    let mut root = cluster.client().await;
    root.role_add("reader").await.unwrap();
    root.role_grant_permission("reader", Permission::read("/infrastructure/").with_prefix())
        .await
        .unwrap();
    root.user_add("reader", "pw", None).await.unwrap();
    root.user_grant_role("reader", "reader").await.unwrap();
    cluster.enable_auth("rootpw").await;

    // A wrong password.
    let (class, text) = class_of(
        "a wrong password",
        Client::connect(
            endpoints.clone(),
            Some(ConnectOptions::new().with_user("reader", "wrong")),
        )
        .await,
    );
    assert_eq!(class, Class::Auth, "{text}");

    // An unknown user.
    let (class, text) = class_of(
        "an unknown user",
        Client::connect(
            endpoints.clone(),
            Some(ConnectOptions::new().with_user("ghost", "pw")),
        )
        .await,
    );
    assert_eq!(class, Class::Auth, "{text}");

    // A write outside the user's permissions.
    let mut reader = Client::connect(
        endpoints.clone(),
        Some(ConnectOptions::new().with_user("reader", "pw")),
    )
    .await
    .unwrap();
    let (class, text) = class_of(
        "a write the role does not allow",
        reader.put("/infrastructure/x", "v", None).await,
    );
    assert_eq!(class, Class::Auth, "{text}");

    // No credentials at all once auth is on.
    let mut anonymous = Client::connect(endpoints, None).await.unwrap();
    let (class, text) = class_of(
        "a write without credentials",
        anonymous.put("/infrastructure/x", "v", None).await,
    );
    assert_eq!(class, Class::Auth, "{text}");
}
