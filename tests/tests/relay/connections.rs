//! Connection and stream abuse (the adversarial review after the December 2026
//! one, findings H1, H4 and M1): what one client can hold by opening
//! connections, leaving them idle, never reading responses, or opening streams
//! on free mailboxes. Each test floods with a bounded number of connections or
//! calls against a small test configuration, checks that the relay closes or
//! refuses what the attacker holds, and that a legitimate client, from another
//! loopback address, is served throughout.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{BufMut as _, Bytes, BytesMut};
use haven_e2e::{
    InProcessRelay, OwnedMailbox, TestClient, random_id, random_key, send_request, sign_send,
    test_config,
};
use haven_proto::v1::{self as proto, MailboxKind};
use hyper_util::rt::TokioIo;
use prost::Message as _;
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::codegen::http;
use tonic::transport::{Endpoint, Uri};

/// The attacker's loopback address.
const ATTACKER: [u8; 4] = [127, 0, 0, 1];
/// The legitimate client's: another address, so per-address caps tell them apart.
const LEGITIMATE: [u8; 4] = [127, 0, 0, 2];

/// A TCP connection to `relay` from `source`.
async fn connect_from(relay: SocketAddr, source: IpAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(relay).await
}

/// Connects tonic channels from one source address.
#[derive(Clone)]
struct FromSource {
    relay: SocketAddr,
    source: IpAddr,
}

impl tonic::codegen::Service<Uri> for FromSource {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (relay, source) = (self.relay, self.source);
        Box::pin(async move { Ok(TokioIo::new(connect_from(relay, source).await?)) })
    }
}

/// A client of the relay whose connections come from `source`.
async fn client_from(relay: SocketAddr, source: [u8; 4]) -> TestClient {
    let connector = FromSource {
        relay,
        source: IpAddr::from(source),
    };
    let channel = Endpoint::from_shared(format!("http://{relay}"))
        .unwrap()
        .connect_with_connector(connector)
        .await
        .expect("the legitimate client connects");
    TestClient::new(channel)
}

/// A raw HTTP/2 connection of the attacker's, and the task driving it, which
/// ends when the relay closes the connection.
struct RawConnection {
    send: h2::client::SendRequest<Bytes>,
    closed: JoinHandle<()>,
}

impl RawConnection {
    /// Connects from `source`; `window` is the HTTP/2 receive window it
    /// grants each stream (none: h2's default).
    async fn open(relay: SocketAddr, source: [u8; 4], window: Option<u32>) -> Self {
        let stream = connect_from(relay, IpAddr::from(source)).await.unwrap();
        let mut builder = h2::client::Builder::new();
        if let Some(window) = window {
            builder.initial_window_size(window);
        }
        let (send, connection) = builder.handshake(stream).await.unwrap();
        let closed = tokio::spawn(async move {
            let _ = connection.await;
        });
        Self { send, closed }
    }

    /// Starts a unary call and returns its response head, never reading the
    /// body.
    async fn call(
        &mut self,
        path: &str,
        message: &impl prost::Message,
    ) -> Result<http::Response<h2::RecvStream>, h2::Error> {
        unary_head(self.send.clone(), path, grpc_message(message)).await
    }

    /// Starts a Fetch of `mailbox` on a task of its own, which ends with the
    /// response head (the body never read).
    fn spawn_fetch(
        &self,
        mailbox: &OwnedMailbox,
    ) -> JoinHandle<Result<http::Response<h2::RecvStream>, h2::Error>> {
        let (send, message) = (self.send.clone(), grpc_message(&fetch_request(mailbox)));
        tokio::spawn(async move { unary_head(send, "/haven.v1.Mailbox/Fetch", message).await })
    }

    /// Starts a streaming call and sends `message` if there is one, ending
    /// the request side after it if `end` (a server stream's single request)
    /// or keeping it open (a bidirectional stream): the response head comes
    /// when the relay answers.
    async fn stream(
        &mut self,
        path: &str,
        message: Option<&[u8]>,
        end: bool,
    ) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("http://relay{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let mut send = self.send.clone().ready().await.unwrap();
        let (response, mut body) = send.send_request(request, false).unwrap();
        if let Some(message) = message {
            body.send_data(grpc_frame(message), end).unwrap();
        }
        (response, body)
    }

    /// A whole `GetInfo` call, read to its end.
    async fn get_info(&mut self) {
        self.unary_ok("/haven.v1.Relay/GetInfo", &proto::GetInfoRequest {})
            .await;
    }

    /// A whole unary call, read to its end, which must succeed.
    async fn unary_ok(&mut self, path: &str, message: &impl prost::Message) {
        let response = self.call(path, message).await.unwrap();
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let trailers = body.trailers().await.unwrap().unwrap_or_default();
        assert_eq!(
            trailers.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"0"[..])
        );
    }

    /// Whether the relay closed this connection within `within`.
    async fn closed_within(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, &mut self.closed).await.is_ok()
    }
}

/// Starts a unary call on `send` and returns its response head.
async fn unary_head(
    send: h2::client::SendRequest<Bytes>,
    path: &str,
    message: Bytes,
) -> Result<http::Response<h2::RecvStream>, h2::Error> {
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://relay{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut send = send.ready().await?;
    let (response, mut body) = send.send_request(request, false)?;
    body.send_data(message, true)?;
    response.await
}

/// `message` as one gRPC length-prefixed message.
fn grpc_message(message: &impl prost::Message) -> Bytes {
    grpc_frame(&message.encode_to_vec())
}

/// `encoded` as one gRPC length-prefixed message.
fn grpc_frame(encoded: &[u8]) -> Bytes {
    let mut framed = BytesMut::with_capacity(encoded.len() + 5);
    framed.put_u8(0);
    framed.put_u32(encoded.len() as u32);
    framed.put_slice(encoded);
    framed.freeze()
}

/// The gRPC status a response head carries, if it is trailers-only.
fn head_status(response: &http::Response<h2::RecvStream>) -> Option<(i32, String)> {
    let code = response
        .headers()
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    let message = response
        .headers()
        .get("grpc-message")
        .map(|m| percent_decoded(m.as_bytes()))
        .unwrap_or_default();
    Some((code, message))
}

/// A `grpc-message` header's text (percent-encoded on the wire).
fn percent_decoded(encoded: &[u8]) -> String {
    let mut bytes = Vec::with_capacity(encoded.len());
    let mut index = 0;
    while index < encoded.len() {
        let hex = encoded
            .get(index + 1..index + 3)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (encoded[index], hex) {
            (b'%', Some(byte)) => {
                bytes.push(byte);
                index += 3;
            }
            (byte, _) => {
                bytes.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The legitimate client's whole round within a bound: Create, Receive (its
/// `queue_empty`), Send, the envelope on the stream, and Fetch.
async fn served(client: &TestClient) {
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        let mailbox = client.create(MailboxKind::Private).await?;
        let mut stream = client.receive(&mailbox, 8).await?;
        anyhow::ensure!(
            matches!(
                stream.next().await?,
                Some(proto::receive_response::Kind::QueueEmpty(_))
            ),
            "the stream did not open with queue_empty"
        );
        let id = random_id();
        client
            .send(send_request(&mailbox.sender_id, &id, b"still served"))
            .await?;
        let streamed = stream.next_envelope().await;
        anyhow::ensure!(streamed.envelope_id == id, "another envelope came");
        let fetched = client.fetch(&mailbox, 0).await?;
        anyhow::ensure!(
            fetched
                .envelopes
                .iter()
                .any(|envelope| envelope.envelope_id == id),
            "Fetch did not return the envelope"
        );
        Ok(())
    })
    .await;
    assert!(
        matches!(outcome, Ok(Ok(()))),
        "the legitimate client was not served: {outcome:?}"
    );
}

/// Review H1: the handshake deadline ended at the first request, so after one
/// health check a connection kept its slot until `max_connection_age` (6 h):
/// connections that made one request each and then went quiet locked everyone
/// out. Now a connection with no call open is closed after the idle timeout.
#[tokio::test]
async fn connections_idle_after_one_request_are_closed_after_the_idle_timeout() {
    let mut config = test_config();
    config.limits.max_connections = 8;
    config.limits.max_connections_per_address = Some(0);
    config.limits.idle_timeout_seconds = 2;
    let relay = InProcessRelay::start(config).await.unwrap();
    // wait_serving's own connection must be gone before the attack takes the slots.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..8 {
        let mut connection = RawConnection::open(relay.address, ATTACKER, None).await;
        connection.get_info().await;
        idle.push(connection);
    }
    // Every slot is taken; the legitimate client waits in the backlog until
    // the idle timeout frees one, and is then served.
    let client = tokio::time::timeout(
        Duration::from_secs(10),
        client_from(relay.address, LEGITIMATE),
    )
    .await
    .expect("the legitimate client is accepted once idle connections are closed");
    served(&client).await;
    for connection in &mut idle {
        assert!(
            connection.closed_within(Duration::from_secs(5)).await,
            "an idle connection was still open {:?} after the attack began",
            started.elapsed()
        );
    }
    // The legitimate client's own connection is busy, so it stays; once quiet
    // it would go too, and its channel reconnects for the next call.
    served(&client).await;
}

/// Review H1: one machine could open every connection slot. Now one address
/// (here the attacker's loopback address) holds at most
/// `max_connections_per_address`; beyond it each call on a new connection is
/// refused with RESOURCE_EXHAUSTED, and the refused connections take no slot.
#[tokio::test]
async fn connections_beyond_the_per_address_cap_are_refused_and_take_no_slot() {
    let mut config = test_config();
    config.limits.max_connections = 8;
    config.limits.max_connections_per_address = Some(3);
    let relay = InProcessRelay::start(config).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..24 {
        let mut connection = RawConnection::open(relay.address, ATTACKER, None).await;
        let response = tokio::time::timeout(
            Duration::from_secs(5),
            connection.call("/haven.v1.Relay/GetInfo", &proto::GetInfoRequest {}),
        )
        .await
        .expect("every attacker connection is answered")
        .unwrap();
        match head_status(&response) {
            Some((code, message)) => {
                assert_eq!(code, Code::ResourceExhausted as i32, "{message}");
                assert!(
                    message.contains("too many connections from this address"),
                    "{message}"
                );
                refused += 1;
            }
            None => held.push((connection, response)),
        }
    }
    assert_eq!(
        held.len(),
        3,
        "the attacker's address kept more than its cap"
    );
    assert_eq!(refused, 21);
    served(&client_from(relay.address, LEGITIMATE).await).await;
    // Closing a connection gives its place back.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut again = RawConnection::open(relay.address, ATTACKER, None).await;
    again.get_info().await;
}

/// Review H4: a response waits in the relay's memory until the client's
/// HTTP/2 window lets it out, and nothing bounded that: about 1 MiB per unread
/// Fetch of a full mailbox, 256 calls per connection, for as long as the
/// connection lived. Now a connection holds at most its response budget (more
/// Fetches are refused), the relay at most its own, and a connection whose
/// window stays shut past the stall timeout is closed, which frees it all.
#[tokio::test]
async fn fetches_whose_responses_are_never_read_stop_nobody() {
    let mut config = test_config();
    config.limits.max_connections_per_address = Some(0);
    config.limits.max_response_bytes_per_connection = 3 * 512 * 1024;
    // Fetches may hold 6 MiB of it, the rest is kept for streams.
    config.limits.max_response_bytes = 8 * 1024 * 1024;
    // The attacker plays many clients from one address here; the address's
    // share has a test of its own.
    config.limits.max_response_bytes_per_address = Some(0);
    config.limits.response_stall_timeout_seconds = 2;
    let relay = InProcessRelay::start(config).await.unwrap();
    let owner = relay.client().await.unwrap();
    // A secured mailbox full of large envelopes: every Fetch of it is about a
    // whole `max_fetch_bytes` (1 MiB: 16 envelopes of 60 KiB).
    let full = full_mailbox(&owner, 20, 60 * 1024).await;
    let started = Instant::now();
    let mut attackers = Vec::new();
    let (mut held, mut refused) = (0, 0);
    for _ in 0..4 {
        // A receive window of zero: the relay can send no byte of any body.
        let mut connection = RawConnection::open(relay.address, ATTACKER, Some(0)).await;
        let mut heads = Vec::new();
        for _ in 0..20 {
            let response = tokio::time::timeout(
                Duration::from_secs(5),
                connection.call("/haven.v1.Mailbox/Fetch", &fetch_request(&full)),
            )
            .await
            .expect("every Fetch is answered with a head")
            .unwrap();
            match head_status(&response) {
                Some((code, message)) => {
                    assert_eq!(code, Code::ResourceExhausted as i32, "{message}");
                    assert!(message.contains("has not read"), "{message}");
                    refused += 1;
                }
                None => {
                    held += 1;
                    heads.push(response);
                }
            }
        }
        attackers.push((connection, heads));
    }
    // One response of about 1 MiB fits each connection's 1.5 MiB budget, not two.
    assert_eq!(held, 4, "unread responses held beyond the budget");
    assert_eq!(refused, 76);
    // Meanwhile a legitimate client fetches a full mailbox of its own.
    let client = client_from(relay.address, LEGITIMATE).await;
    served(&client).await;
    let page = tokio::time::timeout(Duration::from_secs(5), owner.fetch(&full, 0))
        .await
        .expect("a legitimate Fetch of the full mailbox answers")
        .unwrap();
    assert!(page.more && !page.envelopes.is_empty());
    for (connection, _heads) in &mut attackers {
        assert!(
            connection.closed_within(Duration::from_secs(5)).await,
            "a connection that never read was still open {:?} after it asked",
            started.elapsed()
        );
    }
    served(&client).await;
}

fn fetch_request(mailbox: &OwnedMailbox) -> proto::FetchRequest {
    let auth = haven_e2e::sign(
        &mailbox.key,
        haven_proto::auth::Method::Fetch,
        &mailbox.recipient_id,
        &[&0u32.to_be_bytes()],
    );
    proto::FetchRequest {
        recipient_id: mailbox.recipient_id.clone(),
        limit: 0,
        auth: Some(auth),
    }
}

/// Review M1: the authenticated streams were capped per mailbox and per
/// connection, not per client, so free mailboxes over many connections took
/// all of `max_streams`. Now one address holds at most
/// `max_streams_per_address`.
#[tokio::test]
async fn receive_streams_from_one_address_are_capped_and_others_still_stream() {
    let mut config = test_config();
    config.limits.max_connections_per_address = Some(0);
    config.limits.max_streams = 5;
    config.limits.max_streams_per_address = Some(3);
    let relay = InProcessRelay::start(config).await.unwrap();
    let mut streams = Vec::new();
    let mut refusals = Vec::new();
    for _ in 0..8 {
        // Each stream on a connection and a mailbox of its own, so that only
        // the per-address cap can refuse it.
        let attacker = client_from(relay.address, ATTACKER).await;
        let mailbox = attacker.create(MailboxKind::Private).await.unwrap();
        let opened = tokio::time::timeout(Duration::from_secs(5), async {
            let mut stream = attacker.receive(&mailbox, 8).await?;
            stream.next().await.map(|_| stream)
        })
        .await
        .expect("every open is answered");
        match opened {
            Ok(stream) => streams.push((attacker, stream)),
            Err(status) => refusals.push(status),
        }
    }
    assert_eq!(
        streams.len(),
        3,
        "one address held more streams than its cap"
    );
    for status in &refusals {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status
                .message()
                .contains("too many open streams from this address"),
            "{status:?}"
        );
    }
    let client = client_from(relay.address, LEGITIMATE).await;
    served(&client).await;
    // The cap is per address, not per relay: a second legitimate stream opens too.
    served(&client).await;
}

/// Fresh adversarial review: connections and streams were capped per /64
/// only, so one IPv6 /48 (40 of its /64s) held every connection slot, 20 of
/// them all of `max_streams`. Each network (IPv6: one /48) now has caps of
/// its own, and GetInfo publishes the ones the relay enforces: a sixteenth of
/// `max_connections` and a tenth of `max_streams`, at least the per-address
/// caps, off where they are off. Tests connect over IPv4 only, where a
/// network is one address and the per-address cap binds first (the /48
/// accounting is unit-tested in `grpc::incoming` and `grpc::mailbox`).
#[tokio::test]
async fn get_info_reports_the_network_caps_the_relay_enforces() {
    /// The per-address and per-network caps of a relay started with `config`.
    async fn caps(config: haven_server::config::Config) -> [u64; 4] {
        let relay = InProcessRelay::start(config).await.unwrap();
        let limits = relay.info().await.unwrap().limits.unwrap();
        relay.stop().await.unwrap();
        [
            limits.max_connections_per_address,
            limits.max_connections_per_network,
            limits.max_streams_per_address,
            limits.max_streams_per_network,
        ]
    }
    let mut config = test_config();
    assert_eq!(caps(config.clone()).await, [256, 625, 500, 1000]);
    // Never below the per-address caps.
    config.limits.max_connections = 1000;
    config.limits.max_streams_per_network = Some(700);
    assert_eq!(caps(config.clone()).await, [256, 256, 500, 700]);
    // Behind a proxy every connection shares the proxy's address: off.
    config.limits.max_streams_per_network = None;
    config.behind_proxy = Some(true);
    assert_eq!(caps(config).await, [0, 0, 0, 0]);
}

/// A raw unary call with an arbitrary message body, through tonic.
async fn raw_unary(
    relay: &InProcessRelay,
    path: &'static str,
    message: Vec<u8>,
) -> Result<(), tonic::Status> {
    let channel = haven_e2e::connect(relay.address).await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(message),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(|_| ())
}

/// Passes bytes through as a message.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf as _;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Review F5: every Mailbox and Keys call could carry a 4 MiB message, since
/// tonic's decode limit is per service and SendBatch needs that much. Now each
/// method has its own: a Send fits one envelope, SendBatch keeps the large
/// one, and everything else (stream messages included) `max_request_bytes`.
#[tokio::test]
async fn requests_over_their_methods_limit_are_refused_before_they_are_read() {
    let mut config = test_config();
    config.limits.max_request_bytes = 32 * 1024;
    let relay = InProcessRelay::start(config).await.unwrap();
    let client = relay.client().await.unwrap();
    let info = client.get_info().await.unwrap().limits.unwrap();
    assert_eq!(info.max_request_bytes, 32 * 1024);
    assert_eq!(info.max_send_request_bytes, 64 * 1024 + 4096);
    let too_large = |status: tonic::Status| {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status
                .message()
                .contains("larger than this relay accepts for this method"),
            "{status:?}"
        );
    };
    // A Fetch whose recipient id is 40 KiB of padding.
    let fetch = proto::FetchRequest {
        recipient_id: vec![1; 40 * 1024],
        limit: 0,
        auth: None,
    };
    too_large(
        raw_unary(&relay, "/haven.v1.Mailbox/Fetch", fetch.encode_to_vec())
            .await
            .unwrap_err(),
    );
    // GetInfo takes nothing, but 40 KiB of an unknown field used to be read and skipped.
    let mut padded_info = vec![122, 0x80, 0xc0, 0x02];
    padded_info.extend(vec![0; 40 * 1024]);
    too_large(
        raw_unary(&relay, "/haven.v1.Relay/GetInfo", padded_info)
            .await
            .unwrap_err(),
    );
    // A Send of 200 KiB was decoded whole and only then refused.
    let send = send_request(&random_id(), &random_id(), &[0; 200 * 1024]);
    too_large(
        raw_unary(&relay, "/haven.v1.Mailbox/Send", send.encode_to_vec())
            .await
            .unwrap_err(),
    );
    // The largest envelope still goes through.
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    let sender = random_key();
    client
        .secure(&mailbox, &sender.verifying_key().to_bytes())
        .await
        .unwrap();
    let mut request = send_request(&mailbox.sender_id, &random_id(), &[9; 64 * 1024]);
    sign_send(&mut request, &sender);
    client.send(request).await.unwrap();
    // A stream message over the limit ends the stream with the same refusal.
    let mut stream = client.receive(&mailbox, 8).await.unwrap();
    assert_eq!(stream.next_envelope().await.ciphertext.len(), 64 * 1024);
    stream
        .acks
        .send(proto::ReceiveRequest {
            kind: Some(proto::receive_request::Kind::Ack(proto::ReceiveAck {
                envelope_ids: vec![vec![0; 16]; 3000],
            })),
        })
        .await
        .unwrap();
    loop {
        match stream.next().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => {
                too_large(status);
                break;
            }
        }
    }
    served(&client).await;
}

/// Review F5: a Receive stream's window counted envelopes only, so one stream
/// could hold 64 of the largest (4 MiB) in flight. Now it also holds at most
/// `max_stream_bytes_in_flight` unacknowledged bytes (one envelope always goes).
#[tokio::test]
async fn a_receive_stream_keeps_at_most_its_byte_budget_in_flight() {
    let mut config = test_config();
    config.limits.max_stream_bytes_in_flight = 128 * 1024;
    let relay = InProcessRelay::start(config).await.unwrap();
    let client = relay.client().await.unwrap();
    let info = client.get_info().await.unwrap().limits.unwrap();
    assert_eq!(info.max_stream_bytes_in_flight, 128 * 1024);
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    let sender = random_key();
    client
        .secure(&mailbox, &sender.verifying_key().to_bytes())
        .await
        .unwrap();
    for _ in 0..5 {
        let mut request = send_request(&mailbox.sender_id, &random_id(), &[3; 60 * 1024]);
        sign_send(&mut request, &sender);
        client.send(request).await.unwrap();
    }
    let mut stream = client.receive(&mailbox, 16).await.unwrap();
    let first = stream.next_envelope().await;
    let second = stream.next_envelope().await;
    assert!(
        stream.quiet_for(Duration::from_millis(500)).await,
        "a third 60 KiB envelope went past the 128 KiB budget"
    );
    stream
        .ack(vec![first.envelope_id, second.envelope_id])
        .await;
    let mut rest = Vec::new();
    for _ in 0..2 {
        rest.push(stream.next_envelope().await.envelope_id);
    }
    assert!(stream.quiet_for(Duration::from_millis(300)).await);
    stream.ack(rest).await;
    stream.next_envelope().await;
    assert!(matches!(
        stream.next().await,
        Ok(Some(proto::receive_response::Kind::QueueEmpty(_)))
    ));
}

/// Fresh review: an envelope id a Receive stream listed again (acknowledged by
/// a unary `Ack` while in flight on the stream, then sent anew) counted its
/// bytes in flight twice, and its acknowledgement gave back only one of them,
/// so a hostile sender shrank the stream's byte budget until it delivered one
/// envelope at a time. Now an id listed again replaces its own entry.
#[tokio::test]
async fn an_envelope_listed_again_counts_once_in_a_streams_byte_budget() {
    let mut config = test_config();
    config.limits.max_stream_bytes_in_flight = 128 * 1024;
    let relay = InProcessRelay::start(config).await.unwrap();
    let client = relay.client().await.unwrap();
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    let sender = random_key();
    client
        .secure(&mailbox, &sender.verifying_key().to_bytes())
        .await
        .unwrap();
    let send = |envelope_id: Vec<u8>| {
        let mut request = send_request(&mailbox.sender_id, &envelope_id, &[3; 60 * 1024]);
        sign_send(&mut request, &sender);
        client.send(request)
    };
    let again = random_id();
    send(again.clone()).await.unwrap();
    let mut stream = client.receive(&mailbox, 16).await.unwrap();
    assert_eq!(stream.next_envelope().await.envelope_id, again);
    // Acknowledged another way while it is in flight on the stream, and sent
    // again under the same id: the stream lists it again.
    assert_eq!(client.ack(&mailbox, vec![again.clone()]).await.unwrap(), 1);
    send(again.clone()).await.unwrap();
    assert_eq!(stream.next_envelope().await.envelope_id, again);
    stream.ack(vec![again]).await;
    // Nothing is in flight: two 60 KiB envelopes fit the 128 KiB budget.
    send(random_id()).await.unwrap();
    send(random_id()).await.unwrap();
    for n in 0..2 {
        let next = tokio::time::timeout(Duration::from_secs(5), stream.next_envelope()).await;
        assert!(
            next.is_ok(),
            "envelope {n} of 2 did not come: the stream's budget lost bytes"
        );
    }
}

/// Fresh relay review H-C: any open call kept its connection from counting as
/// idle, and some calls never end on their own. `Health/Watch` sends one
/// status and then nothing, server reflection waits for a next request, so an
/// anonymous client held a connection slot per such stream, for free, until
/// `max_connection_age` (6 h): the idle close of review H1 did not apply. Now
/// only a call waiting for its response, a response with bytes to send, or an
/// authenticated `Receive` stream keeps a connection open; and a `Receive`
/// that never authenticates is refused after the stream open timeout.
#[tokio::test]
async fn endless_unauthenticated_streams_do_not_keep_connections_open() {
    use tonic_reflection::pb::{v1, v1alpha};

    let mut config = test_config();
    config.limits.max_connections = 6;
    config.limits.max_connections_per_address = Some(0);
    config.limits.idle_timeout_seconds = 2;
    config.limits.stream_open_timeout_seconds = 1;
    let relay = InProcessRelay::start(config).await.unwrap();
    // wait_serving's own connection must be gone before the slots are counted.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A legitimate client's authenticated stream takes one slot and stays
    // quiet throughout: it is what a connection is kept open for.
    let listener = client_from(relay.address, LEGITIMATE).await;
    let mailbox = listener.create(MailboxKind::Private).await.unwrap();
    let mut quiet = listener.receive(&mailbox, 8).await.unwrap();
    assert!(matches!(
        quiet.next().await,
        Ok(Some(proto::receive_response::Kind::QueueEmpty(_)))
    ));
    let started = Instant::now();
    let watch = tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    }
    .encode_to_vec();
    let list = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    }
    .encode_to_vec();
    let list_alpha = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    }
    .encode_to_vec();
    // The attacker takes every other slot with streams that never end.
    let mut attackers = Vec::new();
    for (path, message, end) in [
        ("/grpc.health.v1.Health/Watch", &watch, true),
        ("/grpc.health.v1.Health/Watch", &watch, true),
        (
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            &list,
            false,
        ),
        (
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            &list_alpha,
            false,
        ),
    ] {
        let mut connection = RawConnection::open(relay.address, ATTACKER, None).await;
        let (response, request) = connection.stream(path, Some(message), end).await;
        let response = tokio::time::timeout(Duration::from_secs(5), response)
            .await
            .unwrap_or_else(|_| panic!("{path} is answered"))
            .unwrap();
        assert_eq!(head_status(&response), None, "{path} was refused");
        let mut body = response.into_body();
        // One message comes, and then nothing, for as long as the stream lasts.
        let first = tokio::time::timeout(Duration::from_secs(5), body.data())
            .await
            .expect("the stream's first message comes")
            .expect("the stream sends a message")
            .unwrap();
        let _ = body.flow_control().release_capacity(first.len());
        attackers.push((connection, request, body));
    }
    // And a Receive stream that never sends its `open`.
    let mut opening = RawConnection::open(relay.address, ATTACKER, None).await;
    let (response, _request) = opening
        .stream("/haven.v1.Mailbox/Receive", None, false)
        .await;
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("an unauthenticated Receive is answered within the stream open timeout")
        .unwrap();
    let (code, message) = head_status(&response).expect("the Receive stream is refused");
    assert_eq!(code, Code::InvalidArgument as i32, "{message}");
    assert!(
        message.contains("no authenticated opening message"),
        "{message}"
    );
    // Every slot is taken; a second legitimate client waits in the backlog
    // until the idle timeout frees one, and is then served.
    let client = tokio::time::timeout(
        Duration::from_secs(8),
        client_from(relay.address, LEGITIMATE),
    )
    .await
    .expect("the legitimate client is accepted once the attacker's connections are closed");
    for (connection, _request, _body) in &mut attackers {
        assert!(
            connection.closed_within(Duration::from_secs(4)).await,
            "a connection with only an endless stream open was still open {:?} after it opened",
            started.elapsed()
        );
    }
    assert!(opening.closed_within(Duration::from_secs(4)).await);
    served(&client).await;
    // Health checks still work.
    let mut checker = RawConnection::open(relay.address, LEGITIMATE, None).await;
    checker
        .unary_ok(
            "/grpc.health.v1.Health/Check",
            &tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            },
        )
        .await;
    // The quiet authenticated stream outlived the idle timeout and still delivers.
    assert!(started.elapsed() > Duration::from_secs(2));
    let id = random_id();
    client
        .send(send_request(&mailbox.sender_id, &id, b"still listening"))
        .await
        .unwrap();
    assert_eq!(quiet.next_envelope().await.envelope_id, id);
}

/// One HTTP/2 frame: its 9-byte header and `payload`.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(9 + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    frame.push(kind);
    frame.push(flags);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A request's header block in HPACK, every field a literal without
/// indexing (no table, no Huffman), so that it needs no encoder state.
fn hpack_literals(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        block.push(0);
        for text in [name, value] {
            block.push(u8::try_from(text.len()).unwrap());
            block.extend_from_slice(text.as_bytes());
        }
    }
    block
}

/// Fresh relay review H-E: the connection's deadlines were looked at only
/// when hyper read from the socket, and h2 stops reading while it has a
/// control frame to send that the socket will not take. A client that asks
/// for large responses, stops reading TCP, and sends a PING once its socket
/// is full, so that h2 owes a PONG it cannot write, was never looked at again:
/// its stalled responses stayed in memory, and its slot taken, for good (even
/// hyper's keep-alive only queues a GOAWAY behind the same full socket). Now
/// a connection whose socket has taken none of the bytes waiting for it for
/// the stall timeout is closed, whichever way hyper is polling it.
#[tokio::test]
async fn a_client_that_stops_reading_tcp_is_closed_after_the_stall_timeout() {
    use tokio::io::AsyncWriteExt as _;

    let mut config = test_config();
    // One slot, which the attacker takes: a legitimate client is served
    // only once the relay has closed the attacker's connection.
    config.limits.max_connections = 1;
    config.limits.max_connections_per_address = Some(0);
    config.limits.response_stall_timeout_seconds = 1;
    let relay = InProcessRelay::start(config).await.unwrap();
    let owner = relay.client().await.unwrap();
    // A mailbox of the attacker's own, full: each Fetch of it is about 1 MiB.
    let full = full_mailbox(&owner, 20, 60 * 1024).await;
    drop(owner);
    // The owner's connection must be gone before the attacker takes the slot.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Raw HTTP/2 over a socket that is never read (a small receive buffer
    // fills at once), with every HTTP/2 window wide open, so that what holds
    // the responses back is TCP alone.
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(IpAddr::from(ATTACKER), 0))
        .unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(relay.address).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS_INITIAL_WINDOW_SIZE (4) at its largest, and the connection's too.
    out.extend(h2_frame(0x4, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]));
    out.extend(h2_frame(
        0x8,
        0,
        0,
        &(0x7fff_ffff_u32 - 65_535).to_be_bytes(),
    ));
    let authority = relay.address.to_string();
    let headers = hpack_literals(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", &authority),
        (":path", "/haven.v1.Mailbox/Fetch"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]);
    // Ten Fetches (each signed afresh: the relay refuses a replayed
    // signature), more than the socket buffers on both ends take.
    for index in 0..10u32 {
        let id = 2 * index + 1;
        out.extend(h2_frame(0x1, 0x4, id, &headers));
        out.extend(h2_frame(0x0, 0x1, id, &grpc_message(&fetch_request(&full))));
    }
    stream.write_all(&out).await.unwrap();
    let started = Instant::now();
    // A PING now and then: once the relay's socket is full, one arrives that
    // it owes a PONG for and cannot write.
    for ping in 0..10u64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        stream
            .write_all(&h2_frame(0x6, 0, 0, &ping.to_be_bytes()))
            .await
            .unwrap();
    }
    // The attacker goes on reading nothing. A legitimate client waits in the
    // backlog until the relay closes the attacker's connection, and is then
    // served. (Reading to see the connection closed would not do: it would
    // let the relay write, and read, again.)
    let answered = tokio::time::timeout(Duration::from_secs(6), async {
        let client = client_from(relay.address, LEGITIMATE).await;
        client.get_info().await.map(|_| client)
    })
    .await;
    let client = match answered {
        Ok(Ok(client)) => client,
        other => panic!(
            "a connection that stopped reading TCP still held the only slot {:?} after it \
             asked: {:?}",
            started.elapsed(),
            other.map(|answer| answer.map(|_| ()))
        ),
    };
    served(&client).await;
    drop(stream);
}

/// A secured mailbox of `owner`'s holding `count` envelopes of `size` bytes.
async fn full_mailbox(owner: &TestClient, count: usize, size: usize) -> OwnedMailbox {
    let mailbox = owner.create(MailboxKind::Private).await.unwrap();
    let sender = random_key();
    owner
        .secure(&mailbox, &sender.verifying_key().to_bytes())
        .await
        .unwrap();
    for _ in 0..count {
        let mut request = send_request(&mailbox.sender_id, &random_id(), &vec![7; size]);
        sign_send(&mut request, &sender);
        owner.send(request).await.unwrap();
    }
    mailbox
}

/// The response budgets of the two H-D tests: pages of at most 256 KiB, so
/// that a full one (four 60 KiB envelopes) holds 241 KiB and a Fetch takes
/// 327 KiB (the largest page: 256 KiB, one 64 KiB envelope past it and the
/// framing of 100) before it reads; 2 MiB for the whole relay; and a stall
/// timeout the test never reaches, which is what a client that reads one
/// 16 KiB slice per stall period gets (nothing it holds counts as stalled).
fn small_response_budgets() -> haven_server::config::Config {
    let mut config = test_config();
    config.limits.max_fetch_bytes = 256 * 1024;
    config.limits.max_response_bytes = 2 * 1024 * 1024;
    config.limits.max_response_bytes_per_connection = 400 * 1024;
    config.limits.response_stall_timeout_seconds = 60;
    config
}

/// What became of spawned Fetches: (response heads with a body held, refusals'
/// messages, still waiting).
async fn outcomes(
    fetches: Vec<JoinHandle<Result<http::Response<h2::RecvStream>, h2::Error>>>,
) -> (Vec<http::Response<h2::RecvStream>>, Vec<String>, usize) {
    let (mut held, mut refused, mut waiting) = (Vec::new(), Vec::new(), 0);
    for fetch in fetches {
        if !fetch.is_finished() {
            waiting += 1;
            fetch.abort();
            continue;
        }
        let response = fetch.await.unwrap().unwrap();
        match head_status(&response) {
            Some((code, message)) => {
                assert_eq!(code, Code::ResourceExhausted as i32, "{message}");
                refused.push(message);
            }
            None => held.push(response),
        }
    }
    (held, refused, waiting)
}

/// Fresh relay review H-D: 256 connections × an 8 MiB budget each let one
/// address hold the whole relay-wide response budget (Fetches of its own
/// mailbox it reads a slice of now and then), so that every other client's
/// Fetch waited and was refused, and streams stopped delivering. Now one
/// address holds at most `max_response_bytes_per_address`; beyond it its
/// Fetches are refused at once, and everyone else is served.
#[tokio::test]
async fn one_address_holds_at_most_its_share_of_the_response_budget() {
    let mut config = small_response_budgets();
    // One full page fits the share; a second Fetch's 327 KiB do not.
    config.limits.max_response_bytes_per_address = Some(400 * 1024);
    let relay = InProcessRelay::start(config).await.unwrap();
    let owner = client_from(relay.address, ATTACKER).await;
    let full = full_mailbox(&owner, 8, 60 * 1024).await;
    // Eight connections, each with one page on it no byte of which is read:
    // without the share they took the 1.5 MiB open to Fetches (six pages).
    let mut connections = Vec::new();
    let mut fetches = Vec::new();
    for _ in 0..8 {
        let connection = RawConnection::open(relay.address, ATTACKER, Some(0)).await;
        fetches.push(connection.spawn_fetch(&full));
        connections.push(connection);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A client from another address is served in full: Receive, Send, Fetch.
    served(&client_from(relay.address, LEGITIMATE).await).await;
    let (held, refused, waiting) = outcomes(fetches).await;
    assert_eq!(
        (held.len(), refused.len(), waiting),
        (1, 7, 0),
        "the address held more than its share, or waited for it"
    );
    for message in &refused {
        assert!(
            message.contains("this address holds too many responses"),
            "{message}"
        );
    }
    drop(connections);
}

/// Fresh relay review H-D, the other half: Fetches and streams drew on one
/// budget, and a stream waits for room as long as it takes, so Fetches that
/// hold the budget (from as many addresses as the attacker has, or from one
/// here, with no share per address) stopped every stream delivering. Now
/// Fetches hold at most the budget less `response_stream_reserve_percent`,
/// which is left to streams.
#[tokio::test]
async fn fetches_leave_streams_their_reserve_of_the_response_budget() {
    let mut config = small_response_budgets();
    config.limits.max_response_bytes_per_address = Some(0);
    config.limits.response_stream_reserve_percent = 50;
    config.limits.max_stream_bytes_in_flight = 256 * 1024;
    let relay = InProcessRelay::start(config).await.unwrap();
    let owner = client_from(relay.address, ATTACKER).await;
    let full = full_mailbox(&owner, 8, 60 * 1024).await;
    // Ten unread pages asked for: without the reserve eight fit (all but
    // 120 KiB of the relay's 2 MiB); with it three (the 1 MiB open to Fetches).
    let mut connections = Vec::new();
    let mut fetches = Vec::new();
    for _ in 0..10 {
        let connection = RawConnection::open(relay.address, ATTACKER, Some(0)).await;
        fetches.push(connection.spawn_fetch(&full));
        connections.push(connection);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // And a stream of the attacker's own, never read, takes what is left.
    let streamed = full_mailbox(&owner, 8, 60 * 1024).await;
    let mut listener = RawConnection::open(relay.address, ATTACKER, Some(0)).await;
    let auth = haven_e2e::sign(
        &streamed.key,
        haven_proto::auth::Method::Receive,
        &streamed.recipient_id,
        &[&16u32.to_be_bytes()],
    );
    let open = proto::ReceiveRequest {
        kind: Some(proto::receive_request::Kind::Open(proto::ReceiveOpen {
            recipient_id: streamed.recipient_id.clone(),
            window: 16,
            auth: Some(auth),
        })),
    };
    let (head, _request) = listener
        .stream(
            "/haven.v1.Mailbox/Receive",
            Some(&open.encode_to_vec()),
            false,
        )
        .await;
    let head = tokio::time::timeout(Duration::from_secs(5), head)
        .await
        .expect("the attacker's stream is answered")
        .unwrap();
    assert_eq!(
        head_status(&head),
        None,
        "the attacker's stream was refused"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A legitimate client's stream still delivers, the largest envelope too.
    let client = client_from(relay.address, LEGITIMATE).await;
    let delivered = tokio::time::timeout(Duration::from_secs(4), async {
        let mailbox = client.create(MailboxKind::Private).await?;
        let mut stream = client.receive(&mailbox, 8).await?;
        anyhow::ensure!(
            matches!(
                stream.next().await?,
                Some(proto::receive_response::Kind::QueueEmpty(_))
            ),
            "the stream did not open with queue_empty"
        );
        for size in [64 * 1024, 100] {
            let id = random_id();
            client
                .send(send_request(&mailbox.sender_id, &id, &vec![1; size]))
                .await?;
            anyhow::ensure!(stream.next_envelope().await.envelope_id == id);
        }
        Ok(())
    })
    .await;
    assert!(
        matches!(delivered, Ok(Ok(()))),
        "a legitimate stream did not deliver while Fetches held their part of the budget: \
         {delivered:?}"
    );
    let (held, _refused, waiting) = outcomes(fetches).await;
    assert_eq!(
        (held.len(), waiting),
        (3, 7),
        "Fetches held more than their part"
    );
    drop((connections, listener, head));
}

/// The peak resident memory of this process, and its resident memory now,
/// in KiB (Linux).
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/self/status"))
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// The memory tests' relay: 4 MiB of response budget, no share per address
/// or cap on connections from one, and a stall timeout the tests never reach.
fn four_mib_of_responses() -> haven_server::config::Config {
    let mut config = test_config();
    config.limits.max_connections_per_address = Some(0);
    config.limits.max_response_bytes = 4 * 1024 * 1024;
    config.limits.max_response_bytes_per_connection = 3 * 512 * 1024;
    config.limits.max_response_bytes_per_address = Some(0);
    config.limits.response_stall_timeout_seconds = 60;
    config
}

/// Fresh relay review M-A: a Fetch read (and on sled and Redis decrypted) its
/// page, up to `max_fetch_bytes` and one envelope, before it took the
/// relay-wide response budget, and held it while it waited up to 5 s for
/// room; so concurrent Fetches held any number of pages beyond the budget
/// meant to bound them. Now a Fetch takes the largest page's worth of the
/// budget before it reads, and gives back what its page did not use: 64
/// Fetches of about 1 MiB against a 4 MiB budget hold 2 pages, not 64.
#[tokio::test]
async fn fetches_waiting_for_the_response_budget_hold_no_pages() {
    let relay = InProcessRelay::start(four_mib_of_responses())
        .await
        .unwrap();
    let owner = relay.client().await.unwrap();
    // Each Fetch of it reads 17 envelopes of 60 KiB: 1020 KiB of its 1 MiB,
    // and takes 1096 KiB (the largest page) of the 3 MiB open to Fetches.
    let full = full_mailbox(&owner, 20, 60 * 1024).await;
    let mut connections = Vec::new();
    for _ in 0..64 {
        connections.push(RawConnection::open(relay.address, ATTACKER, Some(0)).await);
    }
    // From here on, only what the Fetches hold can raise the peak.
    std::fs::write("/proc/self/clear_refs", "5").expect("the peak resets (Linux)");
    let (_, before) = memory_kib();
    let fetches: Vec<_> = connections
        .iter()
        .map(|connection| connection.spawn_fetch(&full))
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (peak, _) = memory_kib();
    let grown = peak.saturating_sub(before);
    eprintln!("64 Fetches of 1020 KiB against a 4 MiB budget: peak memory grew by {grown} KiB");
    assert!(
        grown < 24 * 1024,
        "Fetches waiting for the response budget held {grown} KiB: pages read before the budget"
    );
    let (held, _refused, waiting) = outcomes(fetches).await;
    assert_eq!((held.len(), waiting), (2, 62));
    drop(connections);
}

/// Fresh review of H-D: a Receive stream listed up to its window and one
/// (65 envelopes, 4 MiB at 64 KiB each) and held that listing while its first
/// envelope waited for the response budget, outside the budget meant to bound
/// it: 500 streams of one address held 2 GB. Now a stream that finds the
/// budget full lets the rest of its listing go and waits holding one
/// envelope; it lists again once that one is queued.
#[tokio::test]
async fn streams_waiting_for_the_response_budget_hold_one_envelope_each() {
    let mut config = four_mib_of_responses();
    config.limits.max_streams_per_mailbox = 32;
    let relay = InProcessRelay::start(config).await.unwrap();
    let owner = relay.client().await.unwrap();
    let full = full_mailbox(&owner, 70, 60 * 1024).await;
    let mut connections = Vec::new();
    for _ in 0..4 {
        connections.push(RawConnection::open(relay.address, ATTACKER, Some(0)).await);
    }
    std::fs::write("/proc/self/clear_refs", "5").expect("the peak resets (Linux)");
    let (_, before) = memory_kib();
    let mut streams = Vec::new();
    // Bounded: 32 streams, each asking for the largest window, none read.
    for n in 0..32 {
        let auth = haven_e2e::sign(
            &full.key,
            haven_proto::auth::Method::Receive,
            &full.recipient_id,
            &[&64u32.to_be_bytes()],
        );
        let open = proto::ReceiveRequest {
            kind: Some(proto::receive_request::Kind::Open(proto::ReceiveOpen {
                recipient_id: full.recipient_id.clone(),
                window: 64,
                auth: Some(auth),
            })),
        };
        streams.push(
            connections[n % 4]
                .stream(
                    "/haven.v1.Mailbox/Receive",
                    Some(&open.encode_to_vec()),
                    false,
                )
                .await,
        );
    }
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let (peak, _) = memory_kib();
    let grown = peak.saturating_sub(before);
    eprintln!(
        "32 unread streams of 70 × 60 KiB against a 4 MiB budget: peak memory grew by {grown} KiB"
    );
    assert!(
        grown < 32 * 1024,
        "streams waiting for the response budget held {grown} KiB: listings held outside it"
    );
    // The relay still answers.
    let mut fresh = RawConnection::open(relay.address, ATTACKER, None).await;
    fresh.get_info().await;
    drop(streams);
    drop(connections);
}
