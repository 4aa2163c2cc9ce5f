//! Metrics (Prometheus, on their own listener) and log setup. Every label is a
//! fixed, low-cardinality value: a method, a status code, a kind. No identifier,
//! key or address is ever a label or a log field.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use haven_store::MailboxStore;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::grpc::status::code_name;

/// Latency buckets in seconds, from 100 µs (a cached read) to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

/// The process-wide recorder's handle. `metrics` has one global recorder per
/// process; several relays in one process (tests) share it.
static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder once per process and describes every metric.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .ok()?;
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            Some(handle)
        })
        .clone()
}

fn describe() {
    describe_counter!("grpc_server_started_total", "RPCs started on the server.");
    describe_counter!(
        "grpc_server_handled_total",
        "RPCs completed on the server, by status code."
    );
    describe_histogram!(
        "grpc_server_handling_seconds",
        Unit::Seconds,
        "Time from the start of an RPC to its status."
    );
    describe_gauge!("haven_receive_streams", "Receive streams open now.");
    describe_counter!(
        "haven_malformed_requests_total",
        "Request messages refused before any handler ran, by reason: too_large (over the \
         decode limit, RESOURCE_EXHAUSTED) or undecodable (INVALID_ARGUMENT)."
    );
    describe_counter!(
        "haven_connections_closed_total",
        "Connections the relay closed, by reason: handshake (no request within \
         handshake_timeout_seconds), idle (no call busy, that is no authenticated Receive \
         stream, no call waiting for its answer and no response with bytes to send, for \
         idle_timeout_seconds), stalled (a pending response, or the socket, took no bytes for \
         response_stall_timeout_seconds)."
    );
    describe_counter!(
        "haven_connections_refused_total",
        "Connections refused, by reason: per_address (beyond max_connections_per_address), \
         per_network (beyond max_connections_per_network: an IPv6 /48)."
    );
    describe_counter!(
        "haven_create_stamps_total",
        "Create requests by whether their nonce is a valid proof-of-work stamp (stamp: valid, \
         missing): when nearly all are valid, create_pow_required can be turned on."
    );
    describe_counter!(
        "haven_full_refusals_total",
        "Writes (Create, Send, PublishPrekeys) refused because the relay is full: the storage \
         budget (limits.max_stored_bytes, max_mailboxes, min_free_disk_bytes)."
    );
    describe_gauge!(
        "haven_store_failed",
        "1 once the store failed for good (every write fails until a restart): health is \
         NOT_SERVING and the relay exits after store_failure_exit_seconds; else 0."
    );
    describe_gauge!("haven_stored_mailboxes", "Mailboxes in the store.");
    describe_gauge!(
        "haven_stored_envelopes",
        "Envelopes in the store, including expired ones not yet swept."
    );
    describe_gauge!(
        "haven_stored_bytes",
        Unit::Bytes,
        "Envelope ciphertext bytes in the store."
    );
    describe_counter!("haven_sweeps_total", "Expiry sweeps run, by result.");
    describe_counter!(
        "haven_unreadable_envelopes_total",
        "Stored envelopes a listing left out because they did not open (disk corruption, or \
         on Redis a bucket key lost in a failover): nonzero means data was lost; the rest of \
         the mailbox is still delivered."
    );
    describe_counter!(
        "haven_push_wakeups_total",
        "Push wake-ups, by result: sent, gone (404/410: registration removed), refused, failed, \
         unreachable (never reached its endpoint: name lookup busy or failed, connection \
         refused; retried by the next arrival after 5 s), timeout, coalesced (one was sent \
         within the interval), dropped (too many in flight), unregistered."
    );
    describe_counter!(
        "haven_expired_envelopes_total",
        "Envelopes deleted because they expired."
    );
    describe_counter!(
        "haven_expired_mailboxes_total",
        "Mailboxes deleted with everything in them because nobody used them (idle expiry) \
         or they were never secured."
    );
    describe_counter!(
        "haven_shredded_buckets_total",
        "Expiry buckets whose at-rest key was destroyed."
    );
    describe_histogram!(
        "haven_sweep_seconds",
        Unit::Seconds,
        "Time one expiry sweep took."
    );
}

/// Records one finished RPC, after go-grpc-prometheus.
pub fn record_call(
    service: &'static str,
    method: &'static str,
    kind: &'static str,
    code: tonic::Code,
    started: Instant,
) {
    let labels = [
        ("grpc_service", service),
        ("grpc_method", method),
        ("grpc_type", kind),
    ];
    counter!("grpc_server_started_total", &labels).increment(1);
    let code = code_name(code);
    counter!("grpc_server_handled_total", "grpc_service" => service, "grpc_method" => method,
        "grpc_type" => kind, "grpc_code" => code)
    .increment(1);
    histogram!("grpc_server_handling_seconds", &labels).record(started.elapsed().as_secs_f64());
}

/// One Create request, stamped or not.
pub fn record_create_stamp(valid: bool) {
    let stamp = if valid { "valid" } else { "missing" };
    counter!("haven_create_stamps_total", "stamp" => stamp).increment(1);
}

/// A write refused because the relay is full.
pub fn record_full_refusal() {
    counter!("haven_full_refusals_total").increment(1);
}

/// Whether the store has failed for good.
pub fn store_failed(failed: bool) {
    gauge!("haven_store_failed").set(if failed { 1.0 } else { 0.0 });
}

/// A Receive stream opened.
pub fn stream_opened() {
    gauge!("haven_receive_streams").increment(1.0);
}

/// A Receive stream closed.
pub fn stream_closed() {
    gauge!("haven_receive_streams").decrement(1.0);
}

/// Records one sweep.
pub fn record_sweep(
    result: &Result<haven_store::SweepReport, haven_store::StoreError>,
    took: Duration,
) {
    match result {
        Ok(report) => {
            counter!("haven_sweeps_total", "result" => "ok").increment(1);
            counter!("haven_expired_envelopes_total").increment(report.expired_envelopes);
            counter!("haven_shredded_buckets_total").increment(report.shredded_buckets);
            counter!("haven_expired_mailboxes_total").increment(report.expired_mailboxes);
        }
        Err(_) => counter!("haven_sweeps_total", "result" => "error").increment(1),
    }
    histogram!("haven_sweep_seconds").record(took.as_secs_f64());
}

fn store_gauges(store: &dyn MailboxStore) {
    let stats = store.stats();
    gauge!("haven_stored_mailboxes").set(stats.mailboxes as f64);
    gauge!("haven_stored_envelopes").set(stats.envelopes as f64);
    gauge!("haven_stored_bytes").set(stats.bytes as f64);
    counter!("haven_unreadable_envelopes_total").absolute(stats.unreadable_envelopes);
}

/// Most metrics connections served at once; more are closed at accept. A
/// scraper needs one; the bound keeps a slowloris on this port from taking the
/// process's file descriptors (relay review F22).
pub const MAX_METRICS_CONNECTIONS: usize = 16;
/// How long a metrics client may take to send its request head.
const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one metrics connection may stay open at all.
const METRICS_CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve_metrics(
    listener: TcpListener,
    handle: PrometheusHandle,
    store: Arc<dyn MailboxStore>,
    shutdown: CancellationToken,
) {
    let connections = TaskTracker::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS));
    let mut upkeep = tokio::time::interval(Duration::from_secs(5));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = upkeep.tick() => {
                handle.run_upkeep();
                continue;
            }
            () = shutdown.cancelled() => break,
        };
        let Ok((stream, _peer_address_deliberately_dropped)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            // Full: close it at once rather than queue it.
            drop(stream);
            continue;
        };
        let handle = handle.clone();
        let store = Arc::clone(&store);
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _permit = permit;
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let response = if request.uri().path() == "/metrics" {
                        store_gauges(&*store);
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(handle.render())))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(
                                b"only /metrics is served here\n",
                            )))
                    };
                    async move { Ok::<_, Infallible>(response.unwrap_or_default()) }
                });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(METRICS_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                result = tokio::time::timeout(METRICS_CONNECTION_TIMEOUT, connection) => {
                    if let Ok(Err(error)) = result {
                        tracing::debug!(%error, "metrics connection ended with an error");
                    }
                }
                () = shutdown.cancelled() => {}
            }
        });
    }
    connections.close();
    connections.wait().await;
}
