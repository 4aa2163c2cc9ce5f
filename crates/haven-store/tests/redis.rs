//! The conformance suite against a real Redis Cluster: three primaries and
//! three replicas of Debian's redis-server on free loopback ports, one cluster
//! per test (see `haven_store::test_cluster`), every `put` confirmed by a replica.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // reason: tests.

use std::sync::Arc;

use haven_store::test_cluster::TestCluster;
use haven_store::{RedisConfig, RedisStore, Store, conformance};

haven_store::conformance_suite!(async {
    let cluster = tokio::task::spawn_blocking(TestCluster::start)
        .await
        .unwrap();
    let mut config = RedisConfig::new(cluster.urls());
    config.store = conformance::config();
    let store: Arc<dyn Store> = Arc::new(RedisStore::connect(config).await.unwrap());
    (store, cluster)
});

/// Review H3: the budget's totals were counters in each relay process that
/// started at 0, so a second node (or a restarted one) saw an empty store and
/// nodes drifted apart. Now every node reads the cluster's own figures: the
/// mailbox count from the idle index and the fullest primary's memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_sees_the_clusters_mailbox_count_and_memory() {
    use haven_store::{MailboxId, MailboxKind, MailboxRecord, MailboxStore, PublicKey, SenderId};
    let cluster = tokio::task::spawn_blocking(TestCluster::start)
        .await
        .unwrap();
    let connect = || async {
        let mut config = RedisConfig::new(cluster.urls());
        config.store = conformance::config();
        RedisStore::connect(config).await.unwrap()
    };
    let first = connect().await;
    for n in 1..=5u8 {
        first
            .create_mailbox(
                MailboxRecord::new(
                    MailboxId::from_bytes([n; 16]),
                    SenderId::from_bytes([n + 100; 16]),
                    PublicKey::from_bytes([n; 32]),
                    MailboxKind::Private,
                )
                .expiring_at(conformance::NOW),
            )
            .await
            .unwrap();
    }
    first
        .delete_mailbox(&MailboxId::from_bytes([5; 16]))
        .await
        .unwrap();
    // Another node, started after the writes, as after a restart.
    let second = connect().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let stats = second.stats();
        if stats.mailboxes == 4 && stats.memory.is_some_and(|memory| memory.used > 0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the second node saw {stats:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Swept by one node, gone for both.
    let report = second.sweep(conformance::NOW).await.unwrap();
    assert_eq!(report.expired_mailboxes, 4);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while first.stats().mailboxes != 0 {
        assert!(std::time::Instant::now() < deadline, "{:?}", first.stats());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// No record at rest on Redis (review F9): a replica's full sync with the
/// default `repl-diskless-load disabled` writes the whole dataset, bucket keys
/// beside the envelopes they seal, to its `dump.rdb`; snapshots and the
/// append-only file do the same. The store refuses a cluster in which any
/// node (replicas too) would write data to disk: at start, with the reason,
/// and later, failing for good so the relay turns NOT_SERVING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_whose_nodes_would_write_to_disk_is_refused_at_start_and_later() {
    use haven_store::{MailboxStore, StoreError};
    let cluster = tokio::task::spawn_blocking(TestCluster::start)
        .await
        .unwrap();
    let mut config = RedisConfig::new(cluster.urls());
    config.store = conformance::config();
    config.disk_check_interval = std::time::Duration::from_millis(200);
    for (name, value) in [
        ("repl-diskless-load", "disabled"),
        ("appendonly", "yes"),
        ("save", "3600 1"),
        ("repl-diskless-sync", "no"),
    ] {
        let store = RedisStore::connect(config.clone()).await.unwrap();
        assert!(store.fatal_error().is_none());
        let replica = cluster.replicas()[0];
        assert!(
            cluster
                .command(replica, &["CONFIG", "SET", name, value])
                .contains("OK")
        );
        let refused = match RedisStore::connect(config.clone()).await {
            Err(StoreError::Persists(reason)) => reason,
            Err(other) => panic!("refused for another reason: {other}"),
            Ok(_) => panic!("a cluster with {name} {value} on a replica was used"),
        };
        assert!(
            refused.contains(&format!(
                "1 of 6 Redis nodes would write data to disk: {name}"
            )),
            "{refused}"
        );
        assert!(!refused.contains("127.0.0.1"), "no node address: {refused}");
        // The store already running notices too.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while store.fatal_error().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the running store did not notice {name}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(matches!(store.fatal_error(), Some(StoreError::Persists(_))));
        let restore = match name {
            "repl-diskless-load" => "on-empty-db",
            "appendonly" => "no",
            "save" => "",
            _ => "yes",
        };
        assert!(
            cluster
                .command(replica, &["CONFIG", "SET", name, restore])
                .contains("OK")
        );
    }
    // Put right, the cluster is taken again.
    RedisStore::connect(config).await.unwrap();
}

/// Review F15: a node's presence record (`P:w`, "this node streams the
/// mailbox until …", to the second) had no expiry, so a node that died left
/// its last time there until the mailbox was deleted. Now every record drops
/// the passed ones of other nodes and sets the key to expire with the newest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_records_of_dead_nodes_are_dropped_and_the_key_expires() {
    use haven_store::MailboxStore;
    let (cluster, config, store, id) = cluster_with_mailbox(7).await;
    let key = format!("{}:{{m{}}}:w", config.namespace, hex::encode([7u8; 16]));
    let port = cluster.primaries()[0];
    let cli = |args: &[&str]| {
        let mut all = vec!["-c"];
        all.extend_from_slice(args);
        cluster.command(port, &all)
    };
    // A node that died without removing its record, a while ago.
    assert!(!cli(&["HSET", &key, "dead-node", "1000"]).is_empty());
    let _stream = store.subscribe(&id);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let fields = cli(&["HKEYS", &key]);
        if !fields.contains("dead-node") && !fields.trim().is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dead node's record stayed: {fields}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let ttl: i64 = cli(&["TTL", &key]).trim().parse().unwrap();
    assert!(
        (1..=60).contains(&ttl),
        "the presence key expires: TTL {ttl}"
    );
}

/// Review F10 (and issue 14): one envelope that did not open (corrupted, or
/// sealed under a bucket key a failover lost) failed the whole mailbox's
/// listing with INTERNAL, so its owner received nothing at all. Now it is
/// left out and counted, and the rest is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_that_does_not_open_is_skipped_and_counted() {
    use haven_store::{EnvelopeId, MailboxStore, NewEnvelope, Quota};
    let (cluster, config, store, id) = cluster_with_mailbox(5).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for n in 1..=3u8 {
        let envelope = NewEnvelope {
            id: EnvelopeId::from_bytes([n; 16]),
            expires_at: now + 3600,
            payload: vec![n; 100],
            spent: None,
        };
        store
            .put(&id, envelope, Quota::default(), now)
            .await
            .unwrap();
    }
    // The second envelope's sealed bytes, spoilt in place.
    let key = format!("{}:{{m{}}}:e:2", config.namespace, hex::encode([5u8; 16]));
    let port = cluster.primaries()[0];
    let spoilt = cluster.command(port, &["-c", "SETRANGE", &key, "20", "spoilt"]);
    assert!(!spoilt.trim().is_empty(), "{spoilt}");
    let listed = store.list(&id, None, 10, now).await.unwrap();
    let ids: Vec<_> = listed.iter().map(|envelope| envelope.id).collect();
    assert_eq!(
        ids,
        [
            EnvelopeId::from_bytes([1; 16]),
            EnvelopeId::from_bytes([3; 16])
        ]
    );
    assert_eq!(store.stats().unreadable_envelopes, 1);
}

/// A fresh cluster, a store on it, and a private mailbox with id `[n; 16]`.
async fn cluster_with_mailbox(
    n: u8,
) -> (TestCluster, RedisConfig, RedisStore, haven_store::MailboxId) {
    use haven_store::{MailboxId, MailboxKind, MailboxRecord, MailboxStore, PublicKey, SenderId};
    let cluster = tokio::task::spawn_blocking(TestCluster::start)
        .await
        .unwrap();
    let mut config = RedisConfig::new(cluster.urls());
    config.store = conformance::config();
    let store = RedisStore::connect(config.clone()).await.unwrap();
    let id = MailboxId::from_bytes([n; 16]);
    store
        .create_mailbox(MailboxRecord::new(
            id,
            SenderId::from_bytes([n.wrapping_add(1); 16]),
            PublicKey::from_bytes([n.wrapping_add(2); 32]),
            MailboxKind::Private,
        ))
        .await
        .unwrap();
    (cluster, config, store, id)
}
