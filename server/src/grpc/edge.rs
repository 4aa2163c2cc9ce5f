//! The outermost layer around every service. It tells the connection when a
//! call starts, when its response head comes, how its response body
//! progresses and when it ends (`incoming`'s handshake, idle and stall
//! deadlines), and hands the handler the call's
//! [`CallHandle`](super::incoming::CallHandle); it refuses every call on a
//! connection over its address's cap; it holds each request message to its method's
//! decode limit (review F5: tonic has one limit per service, so a 70 KiB `Send`
//! and a 64-byte `Fetch` could each carry 4 MiB); it hands response bytes on in
//! slices of at most [`SLICE_BYTES`], so what waits for a client's HTTP/2
//! window is held here, where its stall is seen, rather than in h2's send
//! buffer; and refusals tonic makes before a handler runs get the status codes
//! and messages the relay's own refusals would have, and are counted.
//!
//! The bytes of large request messages (over the small limit: only
//! `SendBatch`, `PublishPrekeys` and the largest `Send`s may carry them)
//! count, as they arrive, against a relay-wide request budget and their
//! network's share of it, until the message's last byte has passed (fresh
//! edge review M4: 128 calls per connection that each sent most of a 4 MiB
//! message and stopped held up to half a gigabyte per connection for the
//! request timeout). Beyond the budget such a message is
//! `RESOURCE_EXHAUSTED`; small messages never count. What arrives is
//! counted, not what a prefix declares: tonic reserves the declared length
//! at once, but as untouched virtual memory, and charging declarations let
//! anyone hold the budget with 5-byte prefixes (second fresh review M1).
//!
//! tonic decodes a unary request before it calls the handler. A message over the
//! decode limit becomes `OUT_OF_RANGE`, and a body that is not protobuf, ends
//! inside a message or holds no message at all becomes `INTERNAL`
//! (`tonic::codec::decode`, `tonic_prost::codec::from_decode_error`,
//! `tonic::server::grpc`), none of which the handler sees or the metrics count. `OUT_OF_RANGE` is
//! meant for iterating past an end and `INTERNAL` says the relay is broken; what
//! the client did is `RESOURCE_EXHAUSTED` (too large) and `INVALID_ARGUMENT`
//! (malformed). Such an error leaves tonic as a trailers-only response, so this
//! layer rewrites its `grpc-status` and `grpc-message` headers. tonic's messages
//! are matched by their opening words; `abuse::oversized_and_undecodable_requests_get_clear_statuses`
//! fails if a tonic upgrade changes them.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::body::{Body, Bytes, Frame, SizeHint};
use prost::bytes::BytesMut;
use tonic::codegen::Service;
use tonic::codegen::http::{self, HeaderValue};
use tonic::{Code, Status};

use super::address::AddressKey;
use super::incoming::{CallGuard, ConnectionState};
use super::response::{HeldBytes, ResponseBudget};
use crate::relay::RelayError;

/// The most response bytes handed to hyper at once: one HTTP/2 frame at the
/// default frame size. hyper passes a whole chunk to h2, which buffers it all
/// however small the client's window, so larger chunks would wait there, out
/// of sight of the stall deadline.
pub const SLICE_BYTES: usize = 16 * 1024;

/// The opening words of the refusal of a message over its method's limit.
const TOO_LARGE: &str = "request message is larger than this relay accepts for this method";

/// Request bytes that large messages may hold relay-wide while they arrive:
/// 16 prekey uploads or batches of the largest size at once (each at most the
/// decode limit, about 4.3 MB), far more than honest traffic has in flight —
/// a device uploads its prekeys once per refresh, and the SDK sends no
/// batches — while bounding what a client that declares and never sends can
/// make the relay reserve.
pub const LARGE_REQUEST_BUDGET_BYTES: u64 = 64 * 1024 * 1024;
/// One network's share of [`LARGE_REQUEST_BUDGET_BYTES`] (an eighth, as for
/// responses), so that one network cannot hold all of it.
pub const LARGE_REQUEST_SHARE_BYTES: u64 = LARGE_REQUEST_BUDGET_BYTES / 8;

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
            Code::ResourceExhausted
                if message.starts_with("Error decompressing: size limit")
                    || message.starts_with(TOO_LARGE) =>
            {
                Some(Self::TooLarge)
            }
            // A body that ends inside a message ("Unexpected EOF decoding
            // stream.", `tonic::codec::decode`) and a unary body with no
            // message at all ("Missing request message.", `tonic::server::grpc`)
            // are the client's framing too (fresh review).
            Code::Internal
                if message.starts_with("failed to decode Protobuf message")
                    || message.starts_with("protocol error:")
                    || message.starts_with("Error decompressing")
                    || message.starts_with("Unexpected EOF decoding stream")
                    || message.starts_with("Missing request message") =>
            {
                Some(Self::Undecodable)
            }
            _ => None,
        }
    }

    /// The refusal the client gets instead.
    pub fn error(self) -> RelayError {
        match self {
            Self::TooLarge => {
                RelayError::ResourceExhausted(format!("{TOO_LARGE} (see GetInfo limits)"))
            }
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

/// Decode limits per method, beyond the service-wide ones tonic enforces.
#[derive(Clone, Copy, Debug)]
pub struct RequestLimits {
    /// A `Send` request: one envelope and its ids, signature and stamp.
    pub send: u32,
    /// Every other request and stream message of every service (Mailbox,
    /// Keys, Relay, Directory, health, reflection, and any path at all),
    /// except `SendBatch` and `PublishPrekeys` (`large`). Messages above it
    /// take the large-request budget, so only those two unary calls (and the
    /// largest `Send`s) can, and the request timeout
    /// bounds how long they hold it (second fresh review M1: reflection's
    /// streams kept tonic's 4 MiB limit and, being streams, outlived the
    /// request timeout, so a declared 4 MiB held its budget for hours).
    pub small: u32,
    /// `SendBatch` and `PublishPrekeys`: the service-wide decode limit,
    /// checked here at the prefix too, since a large message reaches tonic
    /// only once complete (fourth fresh review M-1: tonic's own check came
    /// after the whole message had been received and charged).
    pub large: u32,
}

impl RequestLimits {
    /// The limit of one message of a call to `path`.
    fn of(&self, path: &str) -> u32 {
        let method = path.strip_prefix('/').and_then(|path| path.split_once('/'));
        match method {
            Some(("haven.v1.Mailbox", "SendBatch") | ("haven.v1.Keys", "PublishPrekeys")) => {
                self.large
            }
            Some(("haven.v1.Mailbox", "Send")) => self.send,
            _ => self.small,
        }
    }
}

/// The layer; see the module documentation.
#[derive(Clone)]
pub struct EdgeLayer {
    limits: Arc<RequestLimits>,
    /// What large request messages hold while they arrive (module docs).
    large: ResponseBudget,
}

impl EdgeLayer {
    /// The layer with a large-request budget of `bytes`, `share` of it per
    /// network (0: no share kept).
    pub fn with_large_budget(limits: RequestLimits, bytes: u64, share: u64) -> Self {
        let kib = |bytes: u64| usize::try_from(bytes / 1024).unwrap_or(usize::MAX);
        Self {
            limits: Arc::new(limits),
            large: ResponseBudget::new(kib(bytes), std::time::Duration::ZERO)
                .with_shares(kib(bytes), kib(share)),
        }
    }
}

impl<S> tower_layer::Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner,
            limits: Arc::clone(&self.limits),
            large: self.large.clone(),
        }
    }
}

/// [`EdgeLayer`] around one service.
#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    limits: Arc<RequestLimits>,
    large: ResponseBudget,
}

impl<S> Service<http::Request<tonic::body::Body>> for Edge<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<EdgeBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        let connection = ConnectionState::of(request.extensions()).cloned();
        let call = connection.as_ref().map(ConnectionState::call_started);
        if let Some(call) = &call {
            // For a handler to say that its call is worth the connection.
            request.extensions_mut().insert(call.handle());
        }
        if let Some(refusal) = connection.as_ref().and_then(ConnectionState::refusal) {
            let status = Status::from(RelayError::ResourceExhausted(refusal.into()));
            let response = status.into_http::<tonic::body::Body>();
            return Box::pin(
                async move { Ok(response.map(|body| EdgeBody::new(body, call, None))) },
            );
        }
        // Every method's messages are followed: those above the small limit
        // take the large-request budget; tonic enforces the service-wide limit.
        let limit = self.limits.of(request.uri().path());
        let large = Large {
            budget: self.large.clone(),
            network: connection.as_ref().map(ConnectionState::network),
            above: self.limits.small,
        };
        let request =
            request.map(|body| tonic::body::Body::new(LimitedRequest::new(body, limit, large)));
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            reword(&mut response);
            let held = response.extensions_mut().remove::<HeldBytes>();
            Ok(response.map(|body| EdgeBody::new(body, call, held)))
        })
    }
}

/// The large-request budget as one request sees it.
struct Large {
    budget: ResponseBudget,
    network: Option<AddressKey>,
    /// Messages longer than this take the budget.
    above: u32,
}

/// A request body that refuses a gRPC message longer than its method's limit
/// as soon as the message's length prefix arrives, before its bytes do, and
/// holds a large message back until all of it has arrived, its bytes counted
/// against the large-request budget as they come.
///
/// Why held back: tonic reserves a message's whole declared length when it
/// sees the prefix, so every `SendBatch` that sent 5 bytes declaring 4 MiB
/// made it reserve 4 MiB, unbounded (third fresh review M-2); here tonic sees
/// a large message only once it is complete, and until then the relay holds
/// only what arrived, counted.
struct LimitedRequest {
    inner: tonic::body::Body,
    limit: u32,
    large: Large,
    /// Bytes ready for tonic.
    out: BytesMut,
    /// The large message being received, prefix included, not yet handed on.
    held_back: Option<BytesMut>,
    /// KiB of the large-request budget the held-back message holds.
    charged: Vec<HeldBytes>,
    charged_kib: u64,
    /// The length prefix being read: compression flag and 4-byte length.
    prefix: [u8; 5],
    /// Bytes of `prefix` read so far.
    have: usize,
    /// Bytes of the current message still to pass.
    skip: u64,
    /// The inner body has ended (or failed): only `out` is left.
    done: bool,
}

impl LimitedRequest {
    fn new(inner: tonic::body::Body, limit: u32, large: Large) -> Self {
        Self {
            inner,
            limit,
            large,
            out: BytesMut::new(),
            held_back: None,
            charged: Vec::new(),
            charged_kib: 0,
            prefix: [0; 5],
            have: 0,
            skip: 0,
            done: false,
        }
    }

    /// Counts what the held-back message holds now against the budget and
    /// its network's share, by whole KiB (so tiny frames cost no more than
    /// their bytes: third fresh review M-1), or refuses the message.
    fn charge(&mut self) -> Result<(), Status> {
        let held = self.held_back.as_ref().map_or(0, BytesMut::len) as u64;
        let kib = held.div_ceil(1024);
        if kib <= self.charged_kib {
            return Ok(());
        }
        let more = self
            .large
            .budget
            .try_for_stream(self.large.network, (kib - self.charged_kib) * 1024)
            .ok_or_else(|| {
                metrics::counter!("haven_large_requests_refused_total").increment(1);
                Status::from(RelayError::ResourceExhausted(
                    "the relay is receiving too many large requests at once (from this network, \
                     or from all); send it again in a moment"
                        .into(),
                ))
            })?;
        self.charged.push(more);
        self.charged_kib = kib;
        Ok(())
    }

    /// The framing state after `data` when `data` is whole small messages
    /// (or the rest of one, and ends at a message boundary or inside a
    /// small message) and nothing is held back: then it can go to tonic as
    /// it is, uncopied. `None` when it needs [`Self::take`].
    fn passes_whole(&self, data: &[u8]) -> Option<u64> {
        if self.held_back.is_some() || self.have != 0 {
            return None;
        }
        let (mut skip, mut at) = (self.skip, 0usize);
        loop {
            let left = (data.len() - at) as u64;
            if skip >= left {
                return Some(skip - left);
            }
            at += usize::try_from(skip).ok()?;
            let prefix = data.get(at..at + 5)?;
            let length = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
            if length > self.limit || length > self.large.above {
                return None;
            }
            at += 5;
            skip = u64::from(length);
        }
    }

    /// Follows the gRPC framing through `data`, moving its bytes to `out`,
    /// or, for a large message, holding them back until it is complete.
    fn take(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.skip > 0 {
                let passed = data
                    .len()
                    .min(usize::try_from(self.skip).unwrap_or(usize::MAX));
                self.skip -= passed as u64;
                match &mut self.held_back {
                    Some(message) => {
                        message.extend_from_slice(&data[..passed]);
                        self.charge()?;
                    }
                    None => self.out.extend_from_slice(&data[..passed]),
                }
                data = &data[passed..];
                if self.skip == 0
                    && let Some(message) = self.held_back.take()
                {
                    // Complete: tonic decodes it now; what it held is given back.
                    if self.out.is_empty() {
                        self.out = message;
                    } else {
                        self.out.extend_from_slice(&message);
                    }
                    self.charged.clear();
                    self.charged_kib = 0;
                }
                continue;
            }
            self.prefix[self.have] = data[0];
            self.have += 1;
            data = &data[1..];
            if self.have == self.prefix.len() {
                self.have = 0;
                let length = u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]);
                if length > self.limit {
                    return Err(Status::from(Malformed::TooLarge.error()));
                }
                if length > self.large.above {
                    let mut message = BytesMut::with_capacity(self.prefix.len());
                    message.extend_from_slice(&self.prefix);
                    self.held_back = Some(message);
                    self.charge()?;
                } else {
                    self.out.extend_from_slice(&self.prefix);
                }
                self.skip = u64::from(length);
            }
        }
        Ok(())
    }
}

impl Body for LimitedRequest {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        loop {
            if !self.out.is_empty() {
                let ready = self.out.split().freeze();
                return Poll::Ready(Some(Ok(Frame::data(ready))));
            }
            if self.done {
                return Poll::Ready(None);
            }
            match std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    // The usual case (a Send, a Fetch): no copy.
                    Ok(data) if self.out.is_empty() => match self.passes_whole(&data) {
                        Some(skip) => {
                            self.skip = skip;
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        None => self.take(&data)?,
                    },
                    Ok(data) => self.take(&data)?,
                    // Trailers: whatever is held back never completed, and
                    // tonic, not having seen it, says the body ended early.
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => {
                    self.done = true;
                    self.held_back = None;
                    self.charged.clear();
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.out.is_empty() && (self.done || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// A response body: hands bytes on in slices, tells its connection how it
/// progresses, and holds its call open (and its response bytes counted)
/// until dropped.
pub struct EdgeBody {
    inner: tonic::body::Body,
    /// What is left of the last chunk taken from `inner`.
    rest: Bytes,
    call: Option<CallGuard>,
    /// The bytes this response holds against the response budgets.
    _held: Option<HeldBytes>,
}

impl EdgeBody {
    fn new(inner: tonic::body::Body, mut call: Option<CallGuard>, held: Option<HeldBytes>) -> Self {
        if let Some(call) = &mut call {
            call.responding();
        }
        Self {
            inner,
            rest: Bytes::new(),
            call,
            _held: held,
        }
    }

    fn slice(&mut self) -> Bytes {
        let length = self.rest.len().min(SLICE_BYTES);
        if let Some(call) = &self.call {
            call.progressed();
        }
        self.rest.split_to(length)
    }
}

impl Body for EdgeBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if !self.rest.is_empty() {
            let slice = self.slice();
            return Poll::Ready(Some(Ok(Frame::data(slice))));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Pending => {
                // Nothing to send: a quiet stream is not stalled.
                if let Some(call) = &self.call {
                    call.settled();
                }
                Poll::Pending
            }
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    self.rest = data;
                    let slice = self.slice();
                    Poll::Ready(Some(Ok(Frame::data(slice))))
                }
                Err(frame) => {
                    if let Some(call) = &self.call {
                        call.progressed();
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
            },
            Poll::Ready(None) => {
                if let Some(call) = &self.call {
                    call.settled();
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(status))) => Poll::Ready(Some(Err(status))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.rest.is_empty() {
            self.inner.size_hint()
        } else {
            SizeHint::default()
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt as _;
    use http_body_util::BodyExt as _;

    /// A request body of `frames`, then one that never comes (a client that
    /// stopped), with a large-request budget of `budget_kib`.
    fn withheld(frames: Vec<Vec<u8>>, budget_kib: usize) -> LimitedRequest {
        let frames = frames
            .into_iter()
            .map(|frame| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(frame))));
        let stream = futures::stream::iter(frames).chain(futures::stream::pending());
        let large = Large {
            budget: ResponseBudget::new(budget_kib, std::time::Duration::ZERO)
                .with_shares(budget_kib, 0),
            network: None,
            above: 1024,
        };
        LimitedRequest::new(
            tonic::body::Body::new(http_body_util::StreamBody::new(stream)),
            u32::MAX,
            large,
        )
    }

    fn prefix(length: u32) -> Vec<u8> {
        let mut prefix = vec![0];
        prefix.extend(length.to_be_bytes());
        prefix
    }

    /// Third fresh review M-2: tonic reserves a message's declared length as
    /// soon as it sees the prefix, so a 5-byte prefix declaring 4 MiB made
    /// it reserve 4 MiB, on every call. A large message is now handed on
    /// only once complete: a prefix alone gives tonic nothing at all.
    #[tokio::test]
    async fn a_large_message_reaches_tonic_only_once_complete() {
        let mut body = withheld(vec![prefix(4 << 20), vec![7; 100]], 64);
        let nothing =
            tokio::time::timeout(std::time::Duration::from_millis(100), body.frame()).await;
        assert!(nothing.is_err(), "a prefix and 100 bytes reached tonic");
        // Complete, it comes in one piece; small messages pass at once.
        let mut message = prefix(2000);
        message.extend(vec![1; 2000]);
        let mut small = prefix(3);
        small.extend([1, 2, 3]);
        let mut body = withheld(
            vec![message[..700].to_vec(), message[700..].to_vec(), small],
            64,
        );
        let first = body
            .frame()
            .await
            .and_then(Result::ok)
            .and_then(|f| f.into_data().ok());
        assert_eq!(first.as_deref(), Some(&message[..]));
        let second = body
            .frame()
            .await
            .and_then(Result::ok)
            .and_then(|f| f.into_data().ok());
        assert_eq!(second.as_deref(), Some(&[0, 0, 0, 0, 3, 1, 2, 3][..]));
    }

    /// Whole small messages go to tonic uncopied; anything else (a partial
    /// prefix, a large message) takes the slow path.
    #[test]
    fn whole_small_messages_pass_uncopied_and_the_rest_does_not() {
        let body = withheld(Vec::new(), 64);
        let mut two = prefix(3);
        two.extend([1, 2, 3]);
        two.extend(prefix(0));
        assert_eq!(body.passes_whole(&two), Some(0));
        let mut started = prefix(10);
        started.extend([1, 2]);
        assert_eq!(body.passes_whole(&started), Some(8));
        assert_eq!(body.passes_whole(&prefix(3)[..3]), None);
        assert_eq!(body.passes_whole(&prefix(2000)), None);
    }

    /// Third fresh review M-1: every DATA frame was counted as at least a
    /// KiB, so 1-byte frames held the budget for a thousandth of its bytes.
    /// Now what a message holds is counted in whole KiB of what arrived.
    #[tokio::test]
    async fn tiny_frames_count_their_bytes_not_a_kib_each() {
        let mut frames = vec![prefix(1 << 20)];
        frames.extend((0..3000).map(|_| vec![9]));
        // 3 000 bytes: 3 KiB of a 4 KiB budget, not 3 000 KiB.
        let mut body = withheld(frames, 4);
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(200), body.frame()).await;
        assert!(waiting.is_err(), "refused or handed on: {:?}", waiting.ok());
        assert_eq!(body.charged_kib, 3);
        // Past the budget the message is refused.
        let mut frames = vec![prefix(1 << 20)];
        frames.extend((0..5).map(|_| vec![9; 1024]));
        let mut body = withheld(frames, 4);
        let refused = body.frame().await.and_then(Result::err);
        assert_eq!(
            refused.map(|status| status.code()),
            Some(Code::ResourceExhausted)
        );
    }

    /// Only `SendBatch`, `PublishPrekeys` (and `Send`, to its own limit) may
    /// carry messages above the small limit, so only those unary calls,
    /// bounded by the request timeout, can take the large-request budget:
    /// reflection's streams kept tonic's 4 MiB and held it for hours (second
    /// fresh review M1).
    #[test]
    fn only_the_large_unary_calls_may_declare_large_messages() {
        let limits = RequestLimits {
            send: 70_000,
            small: 64 * 1024,
            large: 4 << 20,
        };
        for large in [
            "/haven.v1.Mailbox/SendBatch",
            "/haven.v1.Keys/PublishPrekeys",
        ] {
            assert_eq!(limits.of(large), 4 << 20, "{large}");
        }
        assert_eq!(limits.of("/haven.v1.Mailbox/Send"), 70_000);
        for small in [
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            "/haven.v1.Directory/PublishEntry",
            "/haven.v1.Mailbox/Receive",
            "/grpc.health.v1.Health/Watch",
            "/no.such.Service/Method",
            "not a path",
        ] {
            assert_eq!(limits.of(small), 64 * 1024, "{small}");
        }
    }
}
