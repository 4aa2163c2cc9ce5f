//! `haven.v1.Relay`: the relay describes itself.

use std::sync::Arc;
use std::time::Instant;

use haven_proto::v1 as proto;
use tonic::{Request, Response, Status};

use crate::relay::Relay;
use crate::telemetry;

/// The `Relay` service.
pub struct InfoService {
    relay: Arc<Relay>,
}

impl InfoService {
    /// A service answering from `relay`'s configuration.
    pub fn new(relay: Arc<Relay>) -> Self {
        Self { relay }
    }
}

#[tonic::async_trait]
impl proto::relay_server::Relay for InfoService {
    #[tracing::instrument(name = "rpc", skip_all, fields(method = "GetInfo"))]
    async fn get_info(
        &self,
        _request: Request<proto::GetInfoRequest>,
    ) -> Result<Response<proto::GetInfoResponse>, Status> {
        let started = Instant::now();
        let config = self.relay.config();
        let limits = &config.limits;
        // The buckets ClaimBundles takes from, as the relay builds them.
        let supporter_claims = limits.supporter_claim_rate();
        let response = proto::GetInfoResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            limits: Some(proto::Limits {
                max_envelope_bytes: limits.max_envelope_bytes,
                default_ttl_seconds: limits.default_ttl_seconds,
                max_ttl_seconds: limits.max_ttl_seconds,
                mailbox_max_envelopes: limits.mailbox_max_envelopes,
                mailbox_max_bytes: limits.mailbox_max_bytes,
                max_receive_window: limits.max_receive_window,
                max_fetch: limits.max_fetch,
                max_batch: limits.max_batch,
                max_fetch_bytes: limits.max_fetch_bytes,
                max_intake_envelope_bytes: limits.intake_envelope_bytes(),
                response_overhead_bytes: limits.response_overhead_bytes,
                unsecured_mailbox_max_envelopes: limits.unsecured_quota().max_envelopes,
                unsecured_mailbox_max_bytes: limits.unsecured_quota().max_bytes,
                mailbox_idle_seconds: limits.mailbox_idle_seconds,
                unsecured_mailbox_seconds: limits.unsecured_mailbox_seconds,
                idle_timeout_seconds: limits.idle_timeout_seconds,
                max_connections_per_address: config.connections_per_address() as u64,
                max_streams_per_address: config.streams_per_address() as u64,
                response_stall_timeout_seconds: limits.response_stall_timeout_seconds,
                max_stream_bytes_in_flight: limits.max_stream_bytes_in_flight,
                max_request_bytes: limits.max_request_bytes,
                max_send_request_bytes: limits.send_request_limit(),
                claims_per_supporter_per_minute: supporter_claims.per_minute,
                claim_burst_per_supporter: supporter_claims.burst,
                claims_per_connection_per_minute: limits.connection_claim_rate().per_minute,
                claims_per_address_per_minute: config.claims_per_address(),
                max_connections_per_network: config.connections_per_network() as u64,
                max_streams_per_network: config.streams_per_network() as u64,
            }),
            intake_pow_difficulty: config.intake_pow_difficulty,
            retention_statement: config.retention_statement(),
            auth_skew_ms: config.auth_skew_seconds.saturating_mul(1000),
            auth_future_skew_ms: config.auth_future_skew_seconds.saturating_mul(1000),
            expiry_bucket_seconds: config.expiry_bucket_seconds,
            create_pow_required: config.create_pow_required,
            intake_stamp_window_ms: config.intake_stamp_window_seconds.saturating_mul(1000),
        };
        telemetry::record_call(
            "haven.v1.Relay",
            "GetInfo",
            "unary",
            tonic::Code::Ok,
            started,
        );
        Ok(Response::new(response))
    }
}
