//! The outermost layer around every service: it tells the connection that a
//! request arrived (ending its handshake deadline, `incoming`), and refusals
//! tonic makes before a handler runs get the status codes and messages the
//! relay's own refusals would have, and are counted.
//!
//! tonic decodes a unary request before it calls the handler. A message over the
//! decode limit becomes `OUT_OF_RANGE` and a body that is not protobuf becomes
//! `INTERNAL` (`tonic::codec::decode`, `tonic_prost::codec::from_decode_error`),
//! neither of which the handler sees or the metrics count. `OUT_OF_RANGE` is
//! meant for iterating past an end and `INTERNAL` says the relay is broken; what
//! the client did is `RESOURCE_EXHAUSTED` (too large) and `INVALID_ARGUMENT`
//! (malformed). Such an error leaves tonic as a trailers-only response, so this
//! layer rewrites its `grpc-status` and `grpc-message` headers. tonic's messages
//! are matched by their opening words; `abuse::oversized_and_undecodable_requests_get_clear_statuses`
//! fails if a tonic upgrade changes them.

use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::Service;
use tonic::codegen::http::{self, HeaderValue};
use tonic::{Code, Status};

use crate::relay::RelayError;

/// What a client sent that tonic refused before any handler ran, and how the
/// relay words it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// Longer than the decode limit.
    TooLarge,
    /// Not a protobuf message of the method's request type, or bad gRPC framing.
    Undecodable,
}

impl Malformed {
    /// Recognises tonic's own refusals of a request's bytes.
    pub fn of(status: &Status) -> Option<Self> {
        let message = status.message();
        match status.code() {
            Code::OutOfRange if message.starts_with("Error, decoded message length too large") => {
                Some(Self::TooLarge)
            }
            Code::ResourceExhausted if message.starts_with("Error decompressing: size limit") => {
                Some(Self::TooLarge)
            }
            Code::Internal
                if message.starts_with("failed to decode Protobuf message")
                    || message.starts_with("protocol error:")
                    || message.starts_with("Error decompressing") =>
            {
                Some(Self::Undecodable)
            }
            _ => None,
        }
    }

    /// The refusal the client gets instead.
    pub fn error(self) -> RelayError {
        match self {
            Self::TooLarge => RelayError::ResourceExhausted(
                "request message is larger than this relay accepts for this method (see GetInfo \
                 limits)"
                    .into(),
            ),
            Self::Undecodable => RelayError::invalid(
                "request message does not decode as this method's protobuf request",
            ),
        }
    }

    /// Counts one refusal (the label is a fixed word).
    pub fn record(self) {
        let reason = match self {
            Self::TooLarge => "too_large",
            Self::Undecodable => "undecodable",
        };
        metrics::counter!("haven_malformed_requests_total", "reason" => reason).increment(1);
    }
}

/// The layer; see the module documentation.
#[derive(Clone, Copy, Debug, Default)]
pub struct EdgeLayer;

impl<S> tower_layer::Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge { inner }
    }
}

/// [`EdgeLayer`] around one service.
#[derive(Clone, Debug)]
pub struct Edge<S> {
    inner: S,
}

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>> for Edge<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        if let Some(connection) = super::incoming::ConnectionState::of(request.extensions()) {
            connection.requested();
        }
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            reword(&mut response);
            Ok(response)
        })
    }
}

/// Rewrites a trailers-only response carrying one of tonic's decode refusals.
fn reword<B>(response: &mut http::Response<B>) {
    let Some(malformed) = Status::from_header_map(response.headers())
        .as_ref()
        .and_then(Malformed::of)
    else {
        return;
    };
    malformed.record();
    let status = Status::from(malformed.error());
    let headers = response.headers_mut();
    headers.remove(Status::GRPC_MESSAGE);
    if status.add_header(headers).is_err() {
        // Our fixed messages are plain ASCII; should that ever fail, the
        // client at least gets the right code.
        headers.insert(Status::GRPC_STATUS, HeaderValue::from(status.code() as i32));
    }
    response.extensions_mut().insert(status);
}
