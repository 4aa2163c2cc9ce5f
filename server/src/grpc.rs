//! The tonic edge: services, the connection stream, and the one mapping of
//! errors to statuses. Generated types are used here and nowhere else in the relay.

pub mod address;
pub mod convert;
pub mod directory;
pub mod edge;
pub mod incoming;
pub mod info;
pub mod keys;
pub mod mailbox;
pub mod response;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use haven_proto::v1::directory_server::DirectoryServer;
use haven_proto::v1::keys_server::KeysServer;
use haven_proto::v1::mailbox_server::MailboxServer;
use haven_proto::v1::relay_server::RelayServer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Router;
use tonic::transport::{Identity as TlsIdentity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower_layer::{Identity, Stack};

use crate::config::{self, Config};
use crate::relay::Relay;
use directory::DirectoryService;
use info::InfoService;
use keys::KeysService;
use mailbox::MailboxService;

/// How long a Fetch waits for the relay-wide response budget before it is
/// refused: long enough for responses being read to drain, short against the
/// request timeout.
const RESPONSE_BUDGET_WAIT_SECONDS: u64 = 5;

fn tls(config: &config::TlsConfig, handshake_timeout: Duration) -> anyhow::Result<ServerTlsConfig> {
    let cert = std::fs::read(&config.cert)
        .with_context(|| format!("cannot read TLS certificate {}", config.cert.display()))?;
    let key = std::fs::read(&config.key)
        .with_context(|| format!("cannot read TLS key {}", config.key.display()))?;
    // incoming.rs closes a connection that made no request within the handshake
    // timeout anyway; tonic's own TLS timeout also ends the handshake task.
    Ok(ServerTlsConfig::new()
        .identity(TlsIdentity::from_pem(cert, key))
        .timeout(handshake_timeout))
}

/// Every service the relay serves, configured from `config`, with health
/// reporting SERVING; and the reporter, to turn it NOT_SERVING at shutdown.
pub async fn router(
    config: &Config,
    relay: &Arc<Relay>,
    stop: &CancellationToken,
    tasks: &TaskTracker,
) -> anyhow::Result<(Router<Stack<edge::EdgeLayer, Identity>>, HealthReporter)> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<MailboxServer<MailboxService>>().await;
    health.set_serving::<RelayServer<InfoService>>().await;
    health.set_serving::<KeysServer<KeysService>>().await;
    health
        .set_serving::<DirectoryServer<DirectoryService>>()
        .await;
    health.set_service_status("", ServingStatus::Serving).await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(haven_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // grpcurl 1.8 only speaks the v1alpha reflection protocol.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(haven_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let limits = &config.limits;
    // Validation checked that the largest Fetch response and Receive message fit.
    let max_request = limits.decode_limit();
    let max_response = limits.encode_limit();
    let responses = response::ResponseBudget::new(
        response::kib(limits.max_response_bytes) as usize,
        Duration::from_secs(RESPONSE_BUDGET_WAIT_SECONDS),
    );
    let mailbox = MailboxServer::new(MailboxService::new(
        Arc::clone(relay),
        responses,
        stop.clone(),
        tasks.clone(),
    ))
    .max_decoding_message_size(max_request)
    .max_encoding_message_size(max_response);
    let mut builder = Server::builder()
        .layer(edge::EdgeLayer::with_large_budget(
            edge::RequestLimits {
                send: u32::try_from(limits.send_request_limit()).unwrap_or(u32::MAX),
                small: u32::try_from(limits.max_request_bytes).unwrap_or(u32::MAX),
                large: u32::try_from(max_request).unwrap_or(u32::MAX),
            },
            edge::LARGE_REQUEST_BUDGET_BYTES,
            // Behind a proxy every client has the proxy's address: one share
            // would be everyone's.
            if config.behind_proxy() {
                0
            } else {
                edge::LARGE_REQUEST_SHARE_BYTES
            },
        ))
        .concurrency_limit_per_connection(limits.max_calls_per_connection)
        // tonic's default advertises no limit at all (review F5).
        .max_concurrent_streams(limits.max_h2_streams_per_connection)
        // Until a call's response head: a unary call's whole run, a stream's
        // authentication; streams themselves are not cut.
        .timeout(Duration::from_secs(limits.request_timeout_seconds))
        .max_connection_age(Duration::from_secs(limits.max_connection_age_seconds))
        .max_connection_age_grace(Duration::from_secs(limits.max_connection_age_grace_seconds))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_nodelay(true);
    if let Some(tls_config) = &config.tls {
        let handshake_timeout = Duration::from_secs(limits.handshake_timeout_seconds);
        builder = builder.tls_config(tls(tls_config, handshake_timeout)?)?;
    }
    let router = builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(mailbox)
        .add_service(RelayServer::new(InfoService::new(Arc::clone(relay))))
        .add_service(
            KeysServer::new(KeysService::new(Arc::clone(relay)))
                .max_decoding_message_size(max_request),
        )
        .add_service(DirectoryServer::new(DirectoryService::new(Arc::clone(
            relay,
        ))));
    Ok((router, health))
}

/// Turns every service NOT_SERVING, so load balancers stop sending new calls.
pub async fn set_not_serving(health: &HealthReporter) {
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_not_serving::<MailboxServer<MailboxService>>()
        .await;
    health.set_not_serving::<RelayServer<InfoService>>().await;
    health.set_not_serving::<KeysServer<KeysService>>().await;
    health
        .set_not_serving::<DirectoryServer<DirectoryService>>()
        .await;
}

#[cfg(test)]
mod tests {
    use haven_proto::v1 as proto;
    use prost::Message as _;

    use crate::config::{ENVELOPE_FRAMING_BYTES, RESPONSE_FRAMING_BYTES};

    /// The framing the limits promise clients is what prost actually writes,
    /// for the smallest and the largest envelopes a relay can be configured to take.
    #[test]
    fn envelope_framing_is_within_what_the_limits_promise() {
        for length in [1, 16 * 1024, 4 * 1024 * 1024] {
            let envelope = proto::Envelope {
                envelope_id: vec![0xff; 16],
                ciphertext: vec![0xff; length],
                expires_at: u64::MAX,
            };
            let fetch = proto::FetchResponse {
                envelopes: vec![envelope.clone(); 3],
                more: true,
            };
            let framing = (fetch.encoded_len() - 3 * length) as u64;
            assert!(framing <= 3 * ENVELOPE_FRAMING_BYTES + RESPONSE_FRAMING_BYTES);
            let streamed = proto::ReceiveResponse {
                kind: Some(proto::receive_response::Kind::Envelope(envelope)),
            };
            let framing = (streamed.encoded_len() - length) as u64;
            assert!(framing <= ENVELOPE_FRAMING_BYTES + RESPONSE_FRAMING_BYTES);
        }
    }
}
