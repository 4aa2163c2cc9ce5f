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
