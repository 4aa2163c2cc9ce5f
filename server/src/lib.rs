//! `haven-relay`: the Haven relay. It forwards sealed envelopes it cannot read
//! between mailboxes and keeps them only until they are acknowledged or expire.
//!
//! Shaped after tokio's mini-redis: [`run`] takes a validated [`Config`], bound
//! listeners and a shutdown future; `main.rs` only parses configuration, sets up
//! logging, binds and calls it. Tests call [`run`] on port 0.
//!
//! What it deliberately does not do: it never decrypts (it does not link the
//! end-to-end crypto core), never records who talks to whom, never logs an id,
//! key or address.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! let mut config = haven_server::Config::default();
//! config.store = haven_server::StoreKind::Memory;
//! let listeners = haven_server::Listeners {
//!     grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
//!     metrics: None,
//! };
//! haven_server::run(config, listeners, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

pub mod cli;
pub mod config;
pub mod grpc;
pub mod health;
pub mod push;
pub mod relay;
pub mod sweeper;
pub mod telemetry;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use haven_store::{
    MailboxStore, MemoryStore, RedisConfig, RedisStore, SledConfig, SledStore, Store, StoreConfig,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Config, StoreKind};

use crate::relay::Relay;

/// The sockets the relay serves on, bound by the caller.
pub struct Listeners {
    /// gRPC.
    pub grpc: TcpListener,
    /// Prometheus metrics; `None` for none.
    pub metrics: Option<TcpListener>,
}

/// Opens the configured store.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let store_config = StoreConfig {
        bucket_seconds: config.expiry_bucket_seconds,
    };
    Ok(match config.store {
        StoreKind::Memory => Arc::new(MemoryStore::new(store_config)),
        StoreKind::Redis => {
            let mut redis = RedisConfig::new(config.redis.nodes.clone());
            redis.namespace.clone_from(&config.redis.namespace);
            redis.replicas = config.redis.replicas;
            redis.wait_timeout = Duration::from_millis(config.redis.wait_timeout_ms);
            redis.store = store_config;
            Arc::new(
                RedisStore::connect(redis)
                    .await
                    .context("cannot use the Redis Cluster (redis.nodes)")?,
            )
        }
        StoreKind::Sled => {
            let mut sled = SledConfig::new(&config.data_dir);
            sled.store = store_config;
            Arc::new(SledStore::open(sled).with_context(|| {
                format!(
                    "cannot open the sled store in {}",
                    config.data_dir.display()
                )
            })?)
        }
    })
}

/// Runs the relay until `shutdown` completes, then drains: health turns
/// NOT_SERVING (and the relay keeps serving for `drain_delay_seconds` so load
/// balancers move away first), no new connections are accepted, open streams end with
/// UNAVAILABLE, calls in flight get up to `shutdown_grace_seconds` to finish, and
/// the store is flushed.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    let store = open_store(&config).await?;
    let config = Arc::new(config);
    let relay = Arc::new(Relay::new(Arc::clone(&store), Arc::clone(&config)));
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();

    // Before anything records a metric, or the first records go nowhere.
    let handle = telemetry::install();
    let mailboxes: Arc<dyn MailboxStore> = store.clone();
    tasks.spawn(sweeper::run(
        Arc::clone(&mailboxes),
        Duration::from_secs(config.sweep_interval_seconds),
        stop.clone(),
    ));
    if let (Some(listener), Some(handle)) = (listeners.metrics, handle) {
        tracing::info!(address = %listener.local_addr()?, "metrics endpoint at /metrics");
        tasks.spawn(telemetry::serve_metrics(
            listener,
            handle,
            Arc::clone(&mailboxes),
            stop.clone(),
        ));
    }

    let (router, health) = grpc::router(&config, &relay, &stop, &tasks).await?;

    let local = listeners.grpc.local_addr()?;
    if config.tls.is_some() {
        tracing::info!(address = %local, "serving gRPC over TLS");
    } else if local.ip().is_loopback() {
        tracing::info!(address = %local, "serving plaintext gRPC on loopback");
    } else {
        tracing::warn!(
            address = %local,
            "serving plaintext gRPC on a non-loopback address (allow_plaintext): only behind a \
             TLS-terminating proxy"
        );
    }
    if config.behind_proxy() && config.connections_per_address() == 0 {
        tracing::info!(
            "per-address caps are off: clients are taken to come through a proxy (plaintext, \
             or behind_proxy = true); set behind_proxy = false if they connect directly"
        );
    }
    let limits = &config.limits;
    let incoming = grpc::incoming::limited(
        listeners.grpc,
        grpc::incoming::ConnectionLimits {
            max_connections: limits.max_connections,
            connections_per_address: config.connections_per_address(),
            handshake_timeout: Duration::from_secs(limits.handshake_timeout_seconds),
            idle_timeout: Duration::from_secs(limits.idle_timeout_seconds),
            stall_timeout: Duration::from_secs(limits.response_stall_timeout_seconds),
            response_kib_per_connection: grpc::response::kib(
                limits.max_response_bytes_per_connection,
            ) as usize,
            streams_per_connection: limits.max_streams_per_connection,
            opening_per_connection: limits.max_opening_streams_per_connection,
        },
    );
    // Cancelled when the store fails for good (review F17).
    let store_failed = CancellationToken::new();
    tasks.spawn(health::watch(
        Arc::clone(&mailboxes),
        health.clone(),
        store_failed.clone(),
        stop.clone(),
    ));
    let drain_delay = Duration::from_secs(config.drain_delay_seconds);
    let failure_exit = Duration::from_secs(config.store_failure_exit_seconds);
    let draining = {
        let stop = stop.clone();
        let health = health.clone();
        let store_failed = store_failed.clone();
        async move {
            tokio::select! {
                () = shutdown => tracing::info!("shutting down: draining"),
                () = async {
                    store_failed.cancelled().await;
                    tokio::time::sleep(failure_exit).await;
                } => tracing::error!("the store failed: stopping so that the relay is restarted"),
            }
            grpc::set_not_serving(&health).await;
            // Keep serving while load balancers notice NOT_SERVING.
            tokio::time::sleep(drain_delay).await;
            stop.cancel();
        }
    };
    let server = router.serve_with_incoming_shutdown(incoming, draining);
    let grace = Duration::from_secs(config.shutdown_grace_seconds);
    tokio::select! {
        result = server => result.context("gRPC server failed")?,
        () = async { stop.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!("calls still open after the shutdown grace period; closing them");
        }
    }
    stop.cancel();
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!("background tasks did not stop within the grace period");
    }
    if let Some(error) = store.fatal_error() {
        anyhow::bail!("the store failed and took no more writes: {error}");
    }
    store.flush().await.context("final store flush failed")?;
    drop(relay);
    // The last references: dropping them stops the store's writer cleanly.
    drop(mailboxes);
    drop(store);
    tracing::info!("stopped");
    Ok(())
}
