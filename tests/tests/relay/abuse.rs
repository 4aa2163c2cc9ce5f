//! Relay abuse: what one anonymous client can make the relay do to everyone
//! else, after the December 2026 review (`../shared/reviews/2026-12-relay.md`).
//! Each test states the finding it holds, floods with a bounded number of
//! requests against a small test configuration, and then checks that a
//! legitimate client is still served.

use haven_e2e::{
    InProcessRelay, now_ms, random_id, random_key, send_request, sign, sign_at, sign_send,
    stamp_send, test_config,
};
use haven_proto::auth::Method;
use haven_proto::v1::{self as proto, MailboxKind};
use prost::Message as _;
use prost::bytes::{Buf as _, BufMut as _};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;

use super::directory::{self, Directory};
use super::relay;

/// Review F2: a mailbox holding many of the largest envelopes made every
/// `Fetch` fail, because the response outgrew the encode limit (and the
/// client's 4 MiB decode limit). Now a Fetch stops at `max_fetch_bytes`.
#[tokio::test]
async fn a_mailbox_full_of_the_largest_envelopes_still_fetches_page_by_page() {
    let (_relay, client) = relay().await;
    let limits = client.get_info().await.unwrap().limits.unwrap();
    assert_eq!(limits.max_fetch_bytes, 1024 * 1024);
    assert_eq!(limits.max_intake_envelope_bytes, 40 * 1024);
    assert_eq!(limits.response_overhead_bytes, 64 * 1024);
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    // Secured, so that it takes the full quota (an unsecured one holds 256 KiB).
    let sender_key = random_key();
    client
        .secure(&mailbox, sender_key.verifying_key().as_bytes())
        .await
        .unwrap();
    // 70 × 64 KiB = 4.4 MiB: more than one response could carry before.
    let largest = limits.max_envelope_bytes as usize;
    for n in 0..70u8 {
        let mut request = send_request(&mailbox.sender_id, &random_id(), &vec![n; largest]);
        sign_send(&mut request, &sender_key);
        client.send(request).await.unwrap();
    }
    let first = client.fetch(&mailbox, 0).await.unwrap();
    let carried: u64 = first
        .envelopes
        .iter()
        .map(|envelope| envelope.ciphertext.len() as u64)
        .sum();
    assert!(first.more, "the rest is announced");
    assert_eq!(
        first.envelopes.len(),
        16,
        "1 MiB holds 16 envelopes of 64 KiB"
    );
    assert!(carried <= limits.max_fetch_bytes);
    assert!(
        first.encoded_len() as u64 <= limits.max_fetch_bytes + limits.response_overhead_bytes,
        "a client decoding max_fetch_bytes + response_overhead_bytes can read it"
    );
    // Page by page, everything arrives in order.
    let drained = client.drain(&mailbox).await.unwrap();
    let order: Vec<u8> = drained
        .iter()
        .map(|envelope| envelope.ciphertext[0])
        .collect();
    assert_eq!(order, (0..70).collect::<Vec<u8>>());
}

/// Review F2: an intake only ever needs first contacts; 64 KiB envelopes there
/// were the cheapest way to crowd out what its owner fetches.
#[tokio::test]
async fn an_intake_refuses_envelopes_larger_than_a_first_contact() {
    let (_relay, client) = relay().await;
    let intake = client.create(MailboxKind::Intake).await.unwrap();
    let limit = 40 * 1024;
    let mut too_large = send_request(&intake.sender_id, &random_id(), &vec![7; limit + 1]);
    stamp_send(&mut too_large, 8);
    let refused = client.send(too_large).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused
            .message()
            .contains("intake mailboxes accept first contacts of at most 40960 bytes"),
        "{}",
        refused.message()
    );
    let mut fits = send_request(&intake.sender_id, &random_id(), &vec![7; limit]);
    stamp_send(&mut fits, 8);
    client.send(fits).await.unwrap();
    // A private mailbox still takes the general envelope limit.
    let private = client.create(MailboxKind::Private).await.unwrap();
    client
        .send(send_request(
            &private.sender_id,
            &random_id(),
            &vec![7; 64 * 1024],
        ))
        .await
        .unwrap();
}

/// Bytes as they are, for requests no generated client would send.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Sends `body` as the request of the unary `path`.
async fn raw_unary(
    relay: &haven_e2e::InProcessRelay,
    path: &'static str,
    body: Vec<u8>,
) -> tonic::Status {
    let channel = haven_e2e::connect(relay.address).await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(body),
        PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .unwrap_err()
}

/// Sends `body` as it is, gRPC framing included, as the request body of the
/// unary `path`, and returns the status of the trailers-only answer.
async fn raw_body(
    relay: &haven_e2e::InProcessRelay,
    path: &'static str,
    body: Vec<u8>,
) -> tonic::Status {
    use tonic::codegen::Service as _;

    let mut channel = haven_e2e::connect(relay.address).await.unwrap();
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .unwrap();
    let request = tonic::codegen::http::Request::post(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(http_body_util::Full::new(
            prost::bytes::Bytes::from(body),
        )))
        .unwrap();
    let response = channel.call(request).await.unwrap();
    tonic::Status::from_header_map(response.headers())
        .expect("a refusal before the handler is a trailers-only answer")
}

/// Review F5 (point 9): tonic refused an oversized message with OUT_OF_RANGE and
/// a body that is not protobuf with INTERNAL, before any handler ran, so the
/// client was told the relay was broken and the metrics counted nothing.
#[tokio::test]
async fn oversized_and_undecodable_requests_get_clear_statuses() {
    let (relay, client) = relay().await;
    let too_large = raw_unary(&relay, "/haven.v1.Mailbox/Send", vec![0; 5 * 1024 * 1024]).await;
    assert_eq!(too_large.code(), Code::ResourceExhausted, "{too_large:?}");
    assert!(
        too_large
            .message()
            .contains("larger than this relay accepts")
    );
    // Field 1 with wire type 7, which does not exist.
    let garbage = raw_unary(&relay, "/haven.v1.Mailbox/Send", vec![0x0f, 0xff, 0xff]).await;
    assert_eq!(garbage.code(), Code::InvalidArgument, "{garbage:?}");
    assert!(garbage.message().contains("does not decode"));
    let garbage = raw_unary(&relay, "/haven.v1.Keys/PrekeyCount", vec![0x0f]).await;
    assert_eq!(garbage.code(), Code::InvalidArgument, "{garbage:?}");
    // A body with no message at all, and a message whose length prefix
    // declares 100 bytes and is followed by 10: tonic refused both with
    // INTERNAL (fresh review).
    let empty = raw_body(&relay, "/haven.v1.Mailbox/Fetch", Vec::new()).await;
    assert_eq!(empty.code(), Code::InvalidArgument, "{empty:?}");
    assert!(empty.message().contains("does not decode"), "{empty:?}");
    let mut truncated = vec![0, 0, 0, 0, 100];
    truncated.extend([0; 10]);
    let truncated = raw_body(&relay, "/haven.v1.Mailbox/Send", truncated).await;
    assert_eq!(truncated.code(), Code::InvalidArgument, "{truncated:?}");
    assert!(
        truncated.message().contains("does not decode"),
        "{truncated:?}"
    );

    // The same on a stream: an opening message that is not protobuf.
    let channel = haven_e2e::connect(relay.address).await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let opened = grpc
        .streaming(
            tonic::Request::new(futures::stream::iter([vec![0x0f, 0xff]])),
            PathAndQuery::from_static("/haven.v1.Mailbox/Receive"),
            RawCodec,
        )
        .await;
    let refused = match opened {
        Err(status) => status,
        Ok(response) => response.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    // Well-formed requests are unaffected.
    client.create(MailboxKind::Private).await.unwrap();
}

/// Review F3: the replay memory refused every signed request once it held a
/// million entries, and `PrekeyCount` under made-up keys filled it for free.
/// Now unknown keys are answered before anything is remembered, and a full
/// memory evicts its oldest entries instead of refusing everyone.
#[tokio::test]
async fn a_flood_of_signed_requests_under_random_keys_locks_nobody_out() {
    let mut config = test_config();
    config.limits.replay_memory_entries = 1024;
    config.limits.replay_memory_new_key_entries = 256;
    config.limits.replay_entries_per_key = 16;
    let relay = InProcessRelay::start(config).await.unwrap();
    let client = relay.client().await.unwrap();
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    let mut keys =
        proto::keys_client::KeysClient::new(haven_e2e::connect(relay.address).await.unwrap());
    for _ in 0..100 {
        let device = random_key();
        let device_key = device.verifying_key().to_bytes().to_vec();
        let request = proto::PrekeyCountRequest {
            auth: Some(sign(&device, Method::PrekeyCount, &device_key, &[])),
            device_key,
            supporter_key: vec![7; 32],
        };
        let status = keys.prekey_count(request).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
    }
    // Each Create is signed by a fresh key and remembered with its stamp:
    // more than the memory of new keys holds. Whatever the relay answers, the
    // flood goes on.
    for _ in 0..200 {
        let _ = client.create(MailboxKind::Private).await;
    }
    client.create(MailboxKind::Private).await.unwrap();
    client
        .send(send_request(
            &mailbox.sender_id,
            &random_id(),
            b"still here",
        ))
        .await
        .unwrap();
    assert_eq!(client.fetch(&mailbox, 0).await.unwrap().envelopes.len(), 1);
    let mut stream = client.receive(&mailbox, 0).await.unwrap();
    stream.next_envelope().await;
}

/// Review F3: a timestamp two minutes ahead kept its replay-memory entry for
/// four minutes. The future skew is now 5 s; the past skew stays 120 s.
#[tokio::test]
async fn a_timestamp_ahead_of_the_future_skew_is_refused_one_as_far_behind_passes() {
    let (_relay, client) = relay().await;
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    let info = client.get_info().await.unwrap();
    assert_eq!(info.auth_future_skew_ms, 5_000);
    let fetch_at = |timestamp_ms| proto::FetchRequest {
        recipient_id: mailbox.recipient_id.clone(),
        limit: 1,
        auth: Some(sign_at(
            &mailbox.key,
            Method::Fetch,
            &mailbox.recipient_id,
            &[&1u32.to_be_bytes()],
            timestamp_ms,
        )),
    };
    let ahead = client
        .mailbox
        .clone()
        .fetch(fetch_at(now_ms() + 30_000))
        .await
        .unwrap_err();
    assert_eq!(ahead.code(), Code::Unauthenticated);
    assert!(
        ahead.message().contains("ahead of the relay clock"),
        "{}",
        ahead.message()
    );
    client
        .mailbox
        .clone()
        .fetch(fetch_at(now_ms() + 2_000))
        .await
        .unwrap();
    client
        .mailbox
        .clone()
        .fetch(fetch_at(now_ms() - 60_000))
        .await
        .unwrap();
}

/// Review F6: a `Receive` took its relay-wide permit before `open` arrived, so
/// bare opens that never authenticate took every stream. Now they wait on
/// their own connection's few opening permits, and time out.
#[tokio::test]
async fn receive_opens_that_never_authenticate_leave_the_streams_to_others() {
    let mut config = test_config();
    config.limits.max_streams = 2;
    let relay = InProcessRelay::start(config).await.unwrap();
    let attacker = relay.client().await.unwrap();
    let mut held = Vec::new();
    for _ in 0..8 {
        let (silence, outgoing) = tokio::sync::mpsc::channel::<proto::ReceiveRequest>(1);
        let mut mailbox = attacker.mailbox.clone();
        held.push((
            silence,
            tokio::spawn(async move {
                mailbox
                    .receive(tokio_stream::wrappers::ReceiverStream::new(outgoing))
                    .await
            }),
        ));
    }
    // The bare opens must reach the relay first; nothing observable marks that
    // (a stream is answered only once it authenticated).
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let client = relay.client().await.unwrap();
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    let mut stream = client.receive(&mailbox, 0).await.unwrap();
    assert!(stream.next().await.is_ok(), "a legitimate stream opens");
    for (_, task) in held {
        task.abort();
    }
}

/// Review F5/F6: nothing bounded the streams on one mailbox or one connection
/// below the relay-wide 10 000.
#[tokio::test]
async fn streams_per_mailbox_and_per_connection_are_capped() {
    let mut config = test_config();
    config.limits.max_streams_per_connection = 3;
    let relay = InProcessRelay::start(config).await.unwrap();
    let first = relay.client().await.unwrap();
    let mut mailboxes = Vec::new();
    for _ in 0..4 {
        mailboxes.push(first.create(MailboxKind::Private).await.unwrap());
    }
    let opened = |client: &haven_e2e::TestClient, index: usize| {
        let client = client.clone();
        let mailbox = &mailboxes[index];
        async move {
            match client.receive(mailbox, 0).await {
                Ok(mut stream) => stream.next().await.map(|_| stream),
                Err(status) => Err(status),
            }
        }
    };
    let mut streams = Vec::new();
    for index in 0..3 {
        streams.push(opened(&first, index).await.unwrap());
    }
    let refused = opened(&first, 3).await.err().unwrap();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused
            .message()
            .contains("this connection has too many open streams")
    );
    // Other connections are not affected; mailbox 0 takes 4 streams in all.
    for _ in 0..3 {
        let other = relay.client().await.unwrap();
        streams.push(opened(&other, 0).await.unwrap());
    }
    let other = relay.client().await.unwrap();
    let refused = opened(&other, 0).await.err().unwrap();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused
            .message()
            .contains("this mailbox has too many open streams")
    );
    streams.push(opened(&other, 3).await.unwrap());
}

/// Review F4: the connection permit was taken at accept and held for as long
/// as the socket stayed open, with no deadline before the first request, so
/// silent sockets (or ones that sent only the HTTP/2 preface) stopped the
/// relay accepting anyone.
#[tokio::test]
async fn silent_and_preface_only_sockets_are_closed_after_the_handshake_timeout() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut config = test_config();
    config.limits.max_connections = 4;
    config.limits.handshake_timeout_seconds = 1;
    let relay = InProcessRelay::start(config).await.unwrap();
    let mut sockets = Vec::new();
    for index in 0..4 {
        let mut socket = tokio::net::TcpStream::connect(relay.address).await.unwrap();
        if index % 2 == 1 {
            // The client preface and an empty SETTINGS frame, then nothing.
            socket
                .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                .await
                .unwrap();
            socket
                .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
                .await
                .unwrap();
        }
        sockets.push(socket);
    }
    // A legitimate client waits in the backlog until the deadline frees a slot.
    let served = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let client = relay.client().await.unwrap();
        client.create(MailboxKind::Private).await.map(|_| ())
    })
    .await;
    assert!(matches!(served, Ok(Ok(()))), "not served: {served:?}");
    // Every idle socket was closed by the relay (after its SETTINGS, if any).
    for mut socket in sockets {
        let mut buffer = [0u8; 256];
        let closed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                match socket.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "an idle socket stayed open");
    }
}

/// The unary timeout ends calls, not streams: its clock stops at a stream's
/// response head.
#[tokio::test]
async fn the_request_timeout_does_not_cut_a_receive_stream() {
    let mut config = test_config();
    config.limits.request_timeout_seconds = 1;
    let relay = InProcessRelay::start(config).await.unwrap();
    let client = relay.client().await.unwrap();
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    let mut stream = client.receive(&mailbox, 0).await.unwrap();
    assert!(stream.next().await.is_ok());
    assert!(
        stream
            .quiet_for(std::time::Duration::from_millis(1500))
            .await
    );
    client
        .send(send_request(&mailbox.sender_id, &random_id(), b"later"))
        .await
        .unwrap();
    assert_eq!(stream.next_envelope().await.ciphertext, b"later");
}

/// Review F1: an unsecured private mailbox took unsigned sends from anyone, for
/// free, up to the full 10 000 envelopes / 64 MiB quota, and mailboxes cost
/// nothing to create: the cheapest way to fill the relay's disk. Until its
/// owner secures it, a private mailbox now holds 16 envelopes and 256 KiB.
#[tokio::test]
async fn an_unsecured_mailbox_holds_little_until_it_is_secured() {
    let (_relay, client) = relay().await;
    let limits = client.get_info().await.unwrap().limits.unwrap();
    assert_eq!(
        (
            limits.unsecured_mailbox_max_envelopes,
            limits.unsecured_mailbox_max_bytes
        ),
        (16, 256 * 1024)
    );
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    // The attacker's loop: unsigned sends until the relay says no (bounded).
    let mut stored = 0;
    let refused = loop {
        let sent = client
            .send(send_request(&mailbox.sender_id, &random_id(), &[1; 1024]))
            .await;
        match sent {
            Ok(_) => stored += 1,
            Err(status) => break status,
        }
        assert!(stored <= 1000, "an unsecured mailbox took 1000 envelopes");
    };
    assert_eq!(stored, 16);
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused
            .message()
            .contains("an unsecured mailbox holds at most 16 envelopes and 262144 bytes"),
        "{}",
        refused.message()
    );
    // The byte bound: four of the largest envelopes fill a fresh one.
    let large = client.create(MailboxKind::Private).await.unwrap();
    for _ in 0..4 {
        client
            .send(send_request(
                &large.sender_id,
                &random_id(),
                &vec![2; 64 * 1024],
            ))
            .await
            .unwrap();
    }
    let refused = client
        .send(send_request(&large.sender_id, &random_id(), &[2]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    // Its owner secures it: signed sends get the full quota.
    let sender_key = random_key();
    client
        .secure(&mailbox, sender_key.verifying_key().as_bytes())
        .await
        .unwrap();
    for _ in 0..20 {
        let mut request = send_request(&mailbox.sender_id, &random_id(), &[3; 1024]);
        sign_send(&mut request, &sender_key);
        client.send(request).await.unwrap();
    }
    assert_eq!(client.drain(&mailbox).await.unwrap().len(), 36);
}

/// A `Create` request for `key`, signed with `nonce` at `timestamp_ms`.
fn create_request(
    key: &ed25519_dalek::SigningKey,
    timestamp_ms: u64,
    nonce: [u8; 16],
) -> proto::CreateRequest {
    let kind = MailboxKind::Private as i32;
    proto::CreateRequest {
        recipient_key: key.verifying_key().to_bytes().to_vec(),
        kind,
        auth: Some(haven_proto::auth::sign_request(
            key,
            Method::Create,
            &[],
            &[&[kind as u8]],
            timestamp_ms,
            nonce,
        )),
    }
}

/// Review F1 (e), H2: `Create` cost one signature by a key the caller just
/// made, so mailboxes could be made by the million. With `create_pow_required`,
/// now the default (the SDK, haven-bench and these tests' client stamp every
/// Create), the signed nonce must be a stamp at the intake difficulty.
#[tokio::test]
async fn creating_a_mailbox_costs_a_stamp_when_the_relay_requires_one() {
    assert!(haven_server::Config::default().create_pow_required);
    let relay = InProcessRelay::start(test_config()).await.unwrap();
    let client = relay.client().await.unwrap();
    let info = client.get_info().await.unwrap();
    assert!(info.create_pow_required);
    let difficulty = info.intake_pow_difficulty;
    // The attacker's loop: fresh keys, random nonces. Each needs a stamp; at
    // 8 bits a random nonce passes one time in 256, so 64 tries get at most a few.
    let mut created = 0;
    for _ in 0..64 {
        let request = create_request(&random_key(), now_ms(), rand::random());
        match client.mailbox.clone().create(request).await {
            Ok(_) => created += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::PermissionDenied);
                assert!(
                    status
                        .message()
                        .contains("creating a mailbox needs a proof-of-work stamp of 8 bits"),
                    "{}",
                    status.message()
                );
            }
        }
    }
    assert!(created <= 8, "{created} unstamped creates got through");
    // A stamp for another key or another timestamp is no stamp.
    let key = random_key();
    let timestamp_ms = now_ms();
    let public = key.verifying_key().to_bytes();
    let nonce = haven_proto::pow::solve_create_nonce(
        &public,
        timestamp_ms,
        rand::random(),
        difficulty,
        u64::MAX,
    )
    .unwrap();
    let moved = create_request(&key, timestamp_ms + 1, nonce);
    let refused = client.mailbox.clone().create(moved).await.unwrap_err();
    if haven_proto::pow::create_stamp_ok(&public, timestamp_ms + 1, &nonce, difficulty) {
        // One time in 256 the nonce is a stamp for the next millisecond too.
        assert_eq!(refused.code(), Code::Unauthenticated);
    } else {
        assert_eq!(refused.code(), Code::PermissionDenied);
    }
    // A legitimate client grinds its nonce and is served; the same request
    // again (a retry) answers the same mailbox and makes no other (F18).
    let request = create_request(&key, timestamp_ms, nonce);
    let first = client
        .mailbox
        .clone()
        .create(request.clone())
        .await
        .unwrap()
        .into_inner();
    let again = client
        .mailbox
        .clone()
        .create(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.recipient_id, first.recipient_id);
}

/// Review F1 (d): nothing bounded what the whole relay stores, so a flood
/// filled the disk (or Redis's memory) and then every write failed, sweeps
/// included. Now new writes are refused with "the relay is full" at a budget,
/// while reads, acknowledgements and sweeps go on and free it again. The
/// attacker here secures its own mailbox, so its sends count as a
/// conversation's and reach the whole budget (the open tier is the next test).
#[tokio::test]
async fn a_full_relay_refuses_new_writes_and_recovers_as_data_expires() {
    let mut config = test_config();
    config.limits.mailbox_max_bytes = 1024 * 1024;
    config.limits.max_stored_bytes = 1024 * 1024;
    let relay = InProcessRelay::start(config).await.unwrap();
    let client = relay.client().await.unwrap();
    let owner = client.create(MailboxKind::Private).await.unwrap();
    // 64 KiB, so that the flood's 64 KiB envelopes fill the budget exactly.
    client
        .send(send_request(
            &owner.sender_id,
            &random_id(),
            &[1; 64 * 1024],
        ))
        .await
        .unwrap();
    // The attacker's loop: one mailbox secured to its own key, filled with
    // short-lived envelopes of the largest size until the relay says no
    // (bounded by the mailbox's own 1 MiB quota).
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    let attacker_key = random_key();
    client
        .secure(&mailbox, attacker_key.verifying_key().as_bytes())
        .await
        .unwrap();
    let mut stored = 0u64;
    let refused = loop {
        let mut request = send_request(&mailbox.sender_id, &random_id(), &vec![9; 64 * 1024]);
        request.ttl_seconds = 2;
        sign_send(&mut request, &attacker_key);
        match client.send(request).await {
            Ok(_) => stored += 64 * 1024,
            Err(status) => break status,
        }
        assert!(stored <= 1024 * 1024, "the budget did not hold");
    };
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().starts_with("the relay is full"),
        "{}",
        refused.message()
    );
    assert_eq!(
        stored,
        15 * 64 * 1024,
        "with the owner's envelope, exactly 1 MiB"
    );
    let create = client.create(MailboxKind::Private).await.err().unwrap();
    assert!(create.message().starts_with("the relay is full"));
    // Reads and acknowledgements are not writes the budget refuses.
    let page = client.fetch(&owner, 0).await.unwrap();
    assert_eq!(page.envelopes[0].ciphertext, [1; 64 * 1024]);
    client
        .ack(&owner, vec![page.envelopes[0].envelope_id.clone()])
        .await
        .unwrap();
    // The flood expires and the sweep frees the budget: the owner is served again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let sent = client
            .send(send_request(&owner.sender_id, &random_id(), b"after"))
            .await;
        match sent {
            Ok(_) => break,
            Err(status) if std::time::Instant::now() < deadline => {
                assert!(status.message().starts_with("the relay is"), "{status:?}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(status) => panic!("still full after the flood expired: {status:?}"),
        }
    }
}

/// Review H2: the budget was one pool, so free mailboxes and unsigned sends to
/// them (anyone's, for a stamp) filled it, and then every conversation's sends
/// were refused too. Now such writes stop at `open_budget_percent` (60 %),
/// and the rest stays for secured mailboxes: a conversation that exists goes
/// on through the flood.
#[tokio::test]
async fn a_flood_of_free_mailboxes_fills_only_the_open_tier_and_conversations_go_on() {
    let mut config = test_config();
    config.limits.mailbox_max_bytes = 1024 * 1024;
    config.limits.max_stored_bytes = 1024 * 1024;
    let relay = InProcessRelay::start(config).await.unwrap();
    let client = relay.client().await.unwrap();
    // A conversation that started before the flood.
    let conversation = client.create(MailboxKind::Private).await.unwrap();
    let sender = random_key();
    client
        .secure(&conversation, sender.verifying_key().as_bytes())
        .await
        .unwrap();
    // The attacker's loop: fresh mailboxes, each filled with unsigned
    // envelopes of the largest size, until the relay says no (at most 64
    // mailboxes and 20 s).
    let started = std::time::Instant::now();
    let mut stored = 0u64;
    let refused = 'flood: {
        for _ in 0..64 {
            let mailbox = match client.create(MailboxKind::Private).await {
                Ok(mailbox) => mailbox,
                Err(status) => break 'flood status,
            };
            for _ in 0..4 {
                let request = send_request(&mailbox.sender_id, &random_id(), &vec![9; 64 * 1024]);
                match client.send(request).await {
                    Ok(_) => stored += 64 * 1024,
                    Err(status) => break 'flood status,
                }
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(20));
        }
        panic!("64 mailboxes of 256 KiB were taken by a 1 MiB relay");
    };
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().starts_with("the relay is nearly full"),
        "{}",
        refused.message()
    );
    assert!(
        stored <= 1024 * 1024 * 60 / 100,
        "the flood took {stored} bytes, more than the open tier"
    );
    // Whatever else it tries in the open tier is refused the same way: a
    // mailbox (once the tier is used up) or the largest envelope into one.
    let refused_again = match client.create(MailboxKind::Private).await {
        Err(status) => status,
        Ok(mailbox) => client
            .send(send_request(
                &mailbox.sender_id,
                &random_id(),
                &vec![9; 64 * 1024],
            ))
            .await
            .unwrap_err(),
    };
    assert_eq!(refused_again.code(), Code::ResourceExhausted);
    assert!(
        refused_again
            .message()
            .starts_with("the relay is nearly full")
    );
    // The conversation is served: six of the largest envelopes fit the 40 %
    // kept for it, and they arrive by Fetch and by Receive.
    let mut sent = Vec::new();
    for n in 0..6u8 {
        let mut request = send_request(&conversation.sender_id, &random_id(), &vec![n; 64 * 1024]);
        sign_send(&mut request, &sender);
        sent.push(request.envelope_id.clone());
        client.send(request).await.unwrap();
    }
    let fetched = client.fetch(&conversation, 0).await.unwrap();
    assert_eq!(fetched.envelopes.len(), 6);
    let mut stream = client.receive(&conversation, 0).await.unwrap();
    assert_eq!(stream.next_envelope().await.envelope_id, sent[0]);
}

/// Fresh relay review M-D: a help-seeker's reply mailbox stays unsecured until
/// its owner reads the supporter's first answer; its fixed deadline deleted an
/// answer that came late, before the answer's TTL. Now an envelope keeps its
/// unsecured mailbox for as long as it lives, and no longer.
#[tokio::test]
async fn a_late_first_answer_outlives_its_unsecured_mailboxs_deadline() {
    let mut config = test_config();
    config.limits.unsecured_mailbox_seconds = 1;
    let relay = InProcessRelay::start(config).await.unwrap();
    let client = relay.client().await.unwrap();
    let reply = client.create(MailboxKind::Private).await.unwrap();
    let started = std::time::Instant::now();
    // The answer comes with a TTL past the mailbox's own deadline.
    let answer = random_id();
    let mut request = send_request(&reply.sender_id, &answer, b"I am here.");
    request.ttl_seconds = 4;
    client.send(request).await.unwrap();
    // Past the deadline (1 s, rounded to the 1 s bucket, and a 1 s sweep),
    // the owner comes back and finds it.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let page = client.fetch(&reply, 0).await.unwrap();
    assert_eq!(
        page.envelopes.len(),
        1,
        "the answer was deleted with its mailbox"
    );
    assert_eq!(page.envelopes[0].envelope_id, answer);
    // Left unread and unsecured, the mailbox goes when the answer expires
    // (bounded: 8 s from the send at most).
    loop {
        match client.fetch(&reply, 0).await {
            Ok(_) => {}
            Err(status) => {
                assert_eq!(status.code(), Code::NotFound, "{status:?}");
                break;
            }
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(8),
            "an unsecured mailbox outlived its last envelope"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// Review F1 (c), H2: nothing expired mailboxes, so whatever a flood created
/// stayed for good. Now a mailbox never secured is deleted
/// `unsecured_mailbox_seconds` after its Create, used or not, and a secured
/// one once nobody has used it for `mailbox_idle_seconds`; both are in
/// GetInfo. A conversation in use stays.
#[tokio::test]
async fn idle_and_never_secured_mailboxes_expire_and_a_used_conversation_stays() {
    let mut config = test_config();
    config.limits.mailbox_idle_seconds = 3;
    config.limits.unsecured_mailbox_seconds = 2;
    let relay = InProcessRelay::start(config).await.unwrap();
    let client = relay.client().await.unwrap();
    let limits = client.get_info().await.unwrap().limits.unwrap();
    assert_eq!(
        (
            limits.mailbox_idle_seconds,
            limits.unsecured_mailbox_seconds
        ),
        (3, 2)
    );
    let defaults = haven_server::config::Limits::default();
    assert_eq!(
        (
            defaults.mailbox_idle_seconds,
            defaults.unsecured_mailbox_seconds
        ),
        (30 * 24 * 3600, 8 * 24 * 3600)
    );
    // The attacker's mailboxes: never secured, but kept busy by their owner
    // (an envelope keeps an unsecured mailbox only as long as it lives: 1 s).
    let mut flood = Vec::new();
    for _ in 0..8 {
        let mailbox = client.create(MailboxKind::Private).await.unwrap();
        let mut request = send_request(&mailbox.sender_id, &random_id(), &[1; 1024]);
        request.ttl_seconds = 1;
        client.send(request).await.unwrap();
        flood.push(mailbox);
    }
    // A conversation nobody uses any more, and one in use.
    let abandoned = client.create(MailboxKind::Private).await.unwrap();
    let in_use = client.create(MailboxKind::Private).await.unwrap();
    let sender = random_key();
    for mailbox in [&abandoned, &in_use] {
        client
            .secure(mailbox, sender.verifying_key().as_bytes())
            .await
            .unwrap();
    }
    let started = std::time::Instant::now();
    let mut round = 0u8;
    // Bounded: 12 s at most; every half second the flood's owner and the
    // conversation's both read, and someone writes to the conversation.
    while started.elapsed() < std::time::Duration::from_secs(12) {
        round += 1;
        let mut gone = 0;
        for mailbox in &flood {
            match client.fetch(mailbox, 0).await {
                Ok(_) => {}
                Err(status) => {
                    assert_eq!(status.code(), Code::NotFound, "{status:?}");
                    gone += 1;
                }
            }
        }
        let mut request = send_request(&in_use.sender_id, &random_id(), &[round]);
        sign_send(&mut request, &sender);
        client.send(request).await.unwrap();
        client.fetch(&in_use, 0).await.unwrap();
        // Looked at by an unsigned send, which a secured mailbox refuses
        // without counting it as a use (a Fetch would be one).
        let abandoned_gone = client
            .send(send_request(&abandoned.sender_id, &random_id(), b"x"))
            .await
            .unwrap_err()
            .code()
            == Code::NotFound;
        if gone == flood.len() && abandoned_gone && started.elapsed().as_secs() >= 5 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    for mailbox in &flood {
        let status = client.fetch(mailbox, 0).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        let send = client
            .send(send_request(&mailbox.sender_id, &random_id(), b"x"))
            .await
            .unwrap_err();
        assert_eq!(send.code(), Code::NotFound);
    }
    assert_eq!(
        client.fetch(&abandoned, 0).await.unwrap_err().code(),
        Code::NotFound
    );
    // Used throughout, well past both deadlines: everything it got is there.
    assert!(started.elapsed() >= std::time::Duration::from_secs(5));
    let kept = client.drain(&in_use).await.unwrap();
    assert!(!kept.is_empty());
}

/// Review M2: `Create` remembers the signature of a key made for it (and its
/// stamp), so a flood of Creates filled the one replay memory and its
/// eviction floor then refused everyone whose clock lagged. Now keys nobody
/// knows yet have a memory of their own.
#[tokio::test]
async fn a_flood_of_creates_never_pushes_out_a_client_whose_clock_lags() {
    let mut config = test_config();
    config.limits.replay_memory_entries = 1024;
    config.limits.replay_memory_new_key_entries = 256;
    let relay = InProcessRelay::start(config).await.unwrap();
    let client = relay.client().await.unwrap();
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    // 600 stamped Creates: 1 200 remembered entries, more than both memories
    // hold (bounded in count and, below, in time).
    let started = std::time::Instant::now();
    for _ in 0..600 {
        client.create(MailboxKind::Private).await.unwrap();
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    // A phone whose clock is 100 s behind (the window is 120 s) is served.
    client
        .mailbox
        .clone()
        .fetch(lagging_fetch(&mailbox))
        .await
        .unwrap();
    client
        .send(send_request(
            &mailbox.sender_id,
            &random_id(),
            b"still here",
        ))
        .await
        .unwrap();
    assert_eq!(client.fetch(&mailbox, 0).await.unwrap().envelopes.len(), 1);
}

/// Fresh review (claims in the replay memory): `ClaimBundles` remembered its
/// claim nonce in the memory of established keys before it looked the
/// supporter up, so claims for made-up supporter keys, answered NOT_FOUND,
/// filled that memory for the price of a stamp, and its eviction floor then
/// refused a client whose clock lagged. Now a claim for a supporter who is not
/// listed is answered with nothing remembered, and claims for a listed one
/// (those the rates refuse too) are remembered in the memory of new keys,
/// with Create's.
#[tokio::test]
async fn a_flood_of_claims_never_pushes_out_a_client_whose_clock_lags() {
    let mut config = test_config();
    config.limits.replay_memory_entries = 1024;
    config.limits.replay_memory_new_key_entries = 256;
    // The default rates: the attacker opens a new connection every 20 claims,
    // and its claims for the listed supporter are mostly refused.
    config.limits.claims_per_connection_per_minute = 20;
    config.limits.claims_per_supporter_per_minute = 10;
    config.limits.claim_burst_per_supporter = 5;
    config.limits.claims_per_address_per_minute = None;
    let difficulty = config.intake_pow_difficulty;
    let mut relay = directory::directory_with(config).await;
    let listed = listed_supporter(&mut relay, 100, 0).await;
    let listed = listed.verifying_key().to_bytes();
    let mailbox = relay.client.create(MailboxKind::Private).await.unwrap();
    // 1 100 claims for made-up supporters, then 1 100 for the listed one:
    // each more than the memory of established keys holds (bounded in count
    // and, below, in time). Their timestamps are 4 s ahead, as far as the
    // future skew lets them raise a floor.
    let started = std::time::Instant::now();
    for made_up in [true, false] {
        let connect = || async {
            let channel = haven_e2e::connect(relay.address()).await.unwrap();
            proto::keys_client::KeysClient::new(channel)
        };
        let mut keys = connect().await;
        for n in 1..=1_100 {
            if n % 20 == 0 {
                keys = connect().await;
            }
            let supporter_key = if made_up { rand::random() } else { listed };
            let answer = keys
                .claim_bundles(directory::claim_at(
                    &supporter_key,
                    difficulty,
                    now_ms() + 4_000,
                ))
                .await;
            match answer {
                Err(status) if made_up => assert_eq!(status.code(), Code::NotFound, "{status:?}"),
                Err(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}"),
                Ok(_) => assert!(!made_up, "a made-up supporter's claim was answered"),
            }
        }
        // A phone whose clock is 100 s behind (the window is 120 s) is served.
        let fetched = relay
            .client
            .mailbox
            .clone()
            .fetch(lagging_fetch(&mailbox))
            .await;
        let flood = if made_up {
            "made-up supporters"
        } else {
            "a listed supporter"
        };
        assert!(fetched.is_ok(), "after claims for {flood}: {fetched:?}");
        if made_up {
            // And a help-seeker whose clock lags as much claims the listed
            // supporter: the made-up claims took nothing of the memory of new
            // keys, nor of this address's claims.
            let lagging = directory::claim_at(&listed, difficulty, now_ms() - 100_000);
            let claimed = connect().await.claim_bundles(lagging).await;
            assert!(claimed.is_ok(), "after claims for {flood}: {claimed:?}");
        }
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(90));
    still_served(&relay.client, &mailbox).await;
}

/// Review F1 (d), sled: new writes stop while the data directory's disk has
/// less free space than `min_free_disk_bytes` (here more than any disk has).
#[tokio::test]
async fn a_sled_relay_refuses_new_writes_when_its_disk_is_nearly_full() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.store = haven_server::config::StoreKind::Sled;
    config.data_dir = dir.path().join("data");
    config.limits.min_free_disk_bytes = 1 << 50;
    let relay = InProcessRelay::start(config).await.unwrap();
    let client = relay.client().await.unwrap();
    let refused = client.create(MailboxKind::Private).await.err().unwrap();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().starts_with("the relay is full"));
    client.get_info().await.unwrap();
}

/// A supporter listed by the association, with one device holding
/// `one_time` one-time prekeys, taking `capacity` new conversations.
async fn listed_supporter(
    relay: &mut Directory,
    capacity: u32,
    one_time: usize,
) -> ed25519_dalek::SigningKey {
    let supporter = random_key();
    directory::publish_supporter_entry(relay, &supporter, "Kari").await;
    let (device, listed) = directory::device_with_intake(relay, one_time).await;
    relay
        .directory
        .publish_device_list(directory::publish(directory::device_list(
            &supporter,
            1,
            vec![listed],
        )))
        .await
        .unwrap();
    relay
        .keys
        .publish_prekeys(directory::device_upload(&device, &supporter))
        .await
        .unwrap();
    relay
        .keys
        .set_capacity(directory::capacity(&supporter, capacity))
        .await
        .unwrap();
    supporter
}

/// Review F7: supporter keys are public and a claim cost only its stamp, so
/// anyone drained a supporter's capacity and one-time prekeys in seconds. Now
/// claims per supporter are a token bucket (default burst 5, then 10 a
/// minute); the refused claims take nothing, and other supporters and other
/// calls are unaffected.
#[tokio::test]
async fn claims_for_one_supporter_are_refused_after_the_burst_and_others_are_served() {
    let mut config = test_config();
    // The defaults (test_config raises them for tests that claim a lot).
    config.limits.claims_per_supporter_per_minute = 10;
    config.limits.claim_burst_per_supporter = 5;
    config.limits.claims_per_connection_per_minute = 20;
    let difficulty = config.intake_pow_difficulty;
    let mut relay = directory::directory_with(config).await;
    let target = listed_supporter(&mut relay, 100, 20).await;
    let other = listed_supporter(&mut relay, 100, 20).await;

    let mut refused = None;
    for attempt in 0..20 {
        match relay
            .keys
            .claim_bundles(directory::claim(&target, difficulty))
            .await
        {
            Ok(response) => assert_eq!(response.into_inner().bundles.len(), 1),
            Err(status) => {
                refused = Some((attempt, status));
                break;
            }
        }
    }
    let (attempt, status) = refused.expect("claims for one supporter are refused after the burst");
    assert_eq!(attempt, 5, "the burst is 5");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        status.message(),
        "too many claims for this supporter right now; try again in a minute"
    );
    // The refused claims took nothing: 20 - 5 one-time prekeys are left.
    let again = relay
        .keys
        .claim_bundles(directory::claim(&target, difficulty))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::ResourceExhausted);

    // Another supporter's claims go on, on the same connection.
    for _ in 0..5 {
        let bundles = relay
            .keys
            .claim_bundles(directory::claim(&other, difficulty))
            .await
            .unwrap()
            .into_inner()
            .bundles;
        assert!(bundles[0].one_time_prekey.is_some());
    }
    // And a legitimate client's mailbox is served.
    let mailbox = relay.client.create(MailboxKind::Private).await.unwrap();
    still_served(&relay.client, &mailbox).await;
}

/// Review F7: one connection claiming for many supporters is limited too
/// (default 20 a minute), whichever supporter it names; a new connection
/// starts with its own allowance.
#[tokio::test]
async fn claims_on_one_connection_are_refused_beyond_its_rate() {
    let mut config = test_config();
    config.limits.claims_per_connection_per_minute = 3;
    let difficulty = config.intake_pow_difficulty;
    let mut relay = directory::directory_with(config).await;
    let first = listed_supporter(&mut relay, 100, 0).await;
    let second = listed_supporter(&mut relay, 100, 0).await;
    for supporter in [&first, &second, &first] {
        relay
            .keys
            .claim_bundles(directory::claim(supporter, difficulty))
            .await
            .unwrap();
    }
    let refused = relay
        .keys
        .claim_bundles(directory::claim(&second, difficulty))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(
        refused.message(),
        "too many claims on this connection right now; try again in a minute"
    );
    let mut fresh =
        proto::keys_client::KeysClient::new(haven_e2e::connect(relay.address()).await.unwrap());
    fresh
        .claim_bundles(directory::claim(&second, difficulty))
        .await
        .unwrap();
}

/// Review F7, per address: one machine opening a new connection for every
/// claim and naming a new supporter each time passed both the per-supporter
/// and the per-connection buckets, and drained every supporter's capacity in
/// seconds. Claims from one source address are a bucket of their own
/// (default 10 a minute, and at once), kept under the per-boot salted address
/// hash; another address is served.
#[tokio::test]
async fn claims_from_one_address_are_refused_beyond_its_rate_and_another_address_is_served() {
    let mut config = test_config();
    config.limits.claims_per_address_per_minute = None;
    let difficulty = config.intake_pow_difficulty;
    let mut relay = directory::directory_with(config).await;
    let mut supporters = Vec::new();
    for _ in 0..12 {
        supporters.push(listed_supporter(&mut relay, 3, 0).await);
    }
    // The attacker, bounded: a fresh connection per claim, from 127.0.0.1.
    let mut refused = None;
    for (attempt, supporter) in supporters.iter().enumerate() {
        let mut keys =
            proto::keys_client::KeysClient::new(haven_e2e::connect(relay.address()).await.unwrap());
        match keys
            .claim_bundles(directory::claim(supporter, difficulty))
            .await
        {
            Ok(_) => {}
            Err(status) => {
                refused = Some((attempt, status));
                break;
            }
        }
    }
    let (attempt, status) = refused.expect("claims from one address are refused after 10");
    assert_eq!(attempt, 10, "the default allows 10 at once");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        status.message(),
        "too many claims from this network address right now; try again in a minute"
    );
    // A help-seeker on another address claims the supporter the attacker did not reach.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", relay.address()))
        .unwrap()
        .local_address(Some(std::net::IpAddr::from([127, 0, 0, 2])))
        .connect()
        .await
        .unwrap();
    let mut keys = proto::keys_client::KeysClient::new(channel);
    let bundles = keys
        .claim_bundles(directory::claim(&supporters[10], difficulty))
        .await
        .unwrap()
        .into_inner()
        .bundles;
    assert_eq!(bundles.len(), 1);
}

/// Review F12: a `SendBatch` of 64 one-byte items with garbage signatures, to
/// the attacker's own secured mailbox, cost 64 Ed25519 verifications for a few
/// kilobytes. Now the cheap checks run first and, once one item's signature
/// is refused, the batch's later items are refused unverified: one
/// verification per batch. Good batches are untouched.
#[tokio::test]
async fn a_batch_of_bad_signatures_costs_one_verification_and_good_batches_pass() {
    let (_relay, client) = relay().await;
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    let sender = random_key();
    client
        .secure(&mailbox, sender.verifying_key().as_bytes())
        .await
        .unwrap();
    // The attacker's loop: 10 batches of 64 (bounded).
    for _ in 0..10 {
        let items: Vec<proto::SendRequest> = (0..64)
            .map(|_| {
                let mut request = send_request(&mailbox.sender_id, &random_id(), b"x");
                request.sender_signature = vec![7; 64];
                request
            })
            .collect();
        let results = client
            .mailbox
            .clone()
            .send_batch(proto::SendBatchRequest { items })
            .await
            .unwrap()
            .into_inner()
            .results;
        let refused = results
            .iter()
            .filter(|result| result.code == Code::Unauthenticated as i32)
            .count();
        let unchecked = results
            .iter()
            .filter(|result| {
                result.code == Code::ResourceExhausted as i32
                    && result.message.starts_with("not checked")
            })
            .count();
        assert_eq!((refused, unchecked), (1, 63), "{results:?}");
    }
    // A legitimate batch is served whole.
    let items: Vec<proto::SendRequest> = (0..64u8)
        .map(|n| {
            let mut request = send_request(&mailbox.sender_id, &random_id(), &[n]);
            sign_send(&mut request, &sender);
            request
        })
        .collect();
    let results = client
        .mailbox
        .clone()
        .send_batch(proto::SendBatchRequest { items })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(results.iter().all(|result| result.code == Code::Ok as i32));
    assert_eq!(client.drain(&mailbox).await.unwrap().len(), 64);
}

/// Review F18: a `Create` sent again after UNAVAILABLE (or a lost answer) was
/// refused as a replay, so the client signed a new one and the first mailbox,
/// if it had been made, stayed behind unknown to anyone. Now the ids follow
/// from the signed request: the same request answers the same mailbox, on any
/// node, and makes no other.
#[tokio::test]
async fn a_create_sent_again_answers_the_same_mailbox_and_makes_no_other() {
    let (_relay, client) = relay().await;
    let difficulty = client.get_info().await.unwrap().intake_pow_difficulty;
    let key = random_key();
    let request = haven_e2e::stamped_create(&key, MailboxKind::Private, difficulty);
    let first = client
        .mailbox
        .clone()
        .create(request.clone())
        .await
        .unwrap()
        .into_inner();
    // The retry loop of a client that never saw an answer (bounded).
    for _ in 0..3 {
        let again = client
            .mailbox
            .clone()
            .create(request.clone())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (&again.recipient_id, &again.sender_id),
            (&first.recipient_id, &first.sender_id)
        );
    }
    // A new request by the same key is a new mailbox.
    let other = client
        .mailbox
        .clone()
        .create(haven_e2e::stamped_create(
            &key,
            MailboxKind::Private,
            difficulty,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(other.recipient_id, first.recipient_id);
    assert_ne!(other.sender_id, first.sender_id);
    // The mailbox is the creator's and works.
    let mailbox = haven_e2e::OwnedMailbox {
        recipient_id: first.recipient_id,
        sender_id: first.sender_id,
        key,
    };
    client
        .send(send_request(&mailbox.sender_id, &random_id(), b"hello"))
        .await
        .unwrap();
    assert_eq!(client.drain(&mailbox).await.unwrap().len(), 1);
}

/// Review F18: a `ClaimBundles` sent again after its answer was lost had to
/// use a new claim nonce (the old one is refused as a replay), so every retry
/// took one more unit of the supporter's capacity and more one-time prekeys.
/// Now the same claim again gets the same bundles and takes nothing more.
#[tokio::test]
async fn a_claim_sent_again_gets_the_same_bundles_and_takes_nothing_more() {
    let config = test_config();
    let difficulty = config.intake_pow_difficulty;
    let mut relay = directory::directory_with(config).await;
    let supporter = listed_supporter(&mut relay, 2, 2).await;
    let request = directory::claim(&supporter, difficulty);
    let first = relay
        .keys
        .claim_bundles(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(first.bundles[0].one_time_prekey.is_some());
    for _ in 0..3 {
        let again = relay
            .keys
            .claim_bundles(request.clone())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(again, first);
    }
    // One unit of the capacity of 2 and one of the 2 one-time prekeys are
    // left: a new claim gets the other prekey, and then the capacity is gone.
    let second = relay
        .keys
        .claim_bundles(directory::claim(&supporter, difficulty))
        .await
        .unwrap()
        .into_inner();
    assert!(second.bundles[0].one_time_prekey.is_some());
    assert_ne!(
        second.bundles[0].one_time_prekey,
        first.bundles[0].one_time_prekey
    );
    let exhausted = relay
        .keys
        .claim_bundles(directory::claim(&supporter, difficulty))
        .await
        .unwrap_err();
    assert_eq!(exhausted.code(), Code::ResourceExhausted);
}

/// Review L2: the budget check is not one atomic step with the write, so
/// concurrent writes could overshoot it. On memory and sled nothing yields
/// between `check_room` and the store counting the write (`put_checked`
/// counts it under its writer lock on first poll), so the overshoot is at
/// most one write per worker thread running a check at that instant: here 2
/// threads × 64 KiB. 64 sends at once, each one envelope past the budget's
/// reach, show no more than that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_overshoot_the_budget_by_at_most_one_envelope_per_thread() {
    const ENVELOPE: u64 = 64 * 1024;
    let mut config = test_config();
    config.limits.mailbox_max_bytes = 1024 * 1024;
    config.limits.max_stored_bytes = 1024 * 1024;
    let relay = InProcessRelay::start(config).await.unwrap();
    let client = relay.client().await.unwrap();
    let sender_key = random_key();
    let mut mailboxes = Vec::new();
    for _ in 0..4 {
        let mailbox = client.create(MailboxKind::Private).await.unwrap();
        client
            .secure(&mailbox, sender_key.verifying_key().as_bytes())
            .await
            .unwrap();
        mailboxes.push(mailbox);
    }
    // Each of 8 connections sends 8 at once: 64 × 64 KiB = 4 MiB against 1 MiB.
    let mut senders = Vec::new();
    for connection in 0..8 {
        let client = relay.client().await.unwrap();
        let sender_id = mailboxes[connection % 4].sender_id.clone();
        let sender_key = sender_key.clone();
        senders.push(tokio::spawn(async move {
            let sends = (0..8).map(|_| {
                let mut request =
                    send_request(&sender_id, &random_id(), &vec![7; ENVELOPE as usize]);
                sign_send(&mut request, &sender_key);
                let client = client.clone();
                async move { client.send(request).await.is_ok() }
            });
            futures::future::join_all(sends)
                .await
                .into_iter()
                .filter(|stored| *stored)
                .count() as u64
        }));
    }
    let mut stored = 0;
    for sender in senders {
        stored += sender.await.unwrap();
    }
    assert!(
        stored * ENVELOPE <= 1024 * 1024 + 2 * ENVELOPE,
        "{stored} envelopes of 64 KiB stored against a 1 MiB budget"
    );
    assert!(stored >= 15, "the budget was used: {stored}");
}

/// Fresh relay review H-A: a Create refused because the relay is nearly full,
/// sent again byte for byte, made the mailbox anyway (its signature was
/// remembered, so it counted as a repeat and skipped the budget). A repeat
/// only ever answers the mailbox the first attempt made.
#[tokio::test]
async fn a_create_refused_for_a_full_relay_makes_nothing_when_sent_again() {
    let mut config = test_config();
    config.limits.max_mailboxes = 100;
    let relay = InProcessRelay::start(config).await.unwrap();
    let client = relay.client().await.unwrap();
    let difficulty = client.get_info().await.unwrap().intake_pow_difficulty;
    // Fill the open tier of the mailbox budget (at most 100 Creates).
    let refused = 'fill: {
        for _ in 0..100 {
            let request =
                haven_e2e::stamped_create(&random_key(), MailboxKind::Private, difficulty);
            if client
                .mailbox
                .clone()
                .create(request.clone())
                .await
                .is_err()
            {
                break 'fill request;
            }
        }
        panic!("100 mailboxes were taken by a relay of 100");
    };
    for _ in 0..3 {
        let again = client.mailbox.clone().create(refused.clone()).await;
        assert!(again.is_err(), "a refused Create sent again made a mailbox");
    }
}

/// Starts a unary call on `channel` whose body is a gRPC length prefix
/// declaring `declared` bytes and `sent` of them, then nothing more while the
/// returned sender lives; the task answers the call's status, if any.
async fn declared_and_withheld(
    channel: &mut tonic::transport::Channel,
    path: &'static str,
    declared: u32,
    sent: usize,
) -> (
    tokio::sync::mpsc::Sender<
        Result<hyper::body::Frame<prost::bytes::Bytes>, std::convert::Infallible>,
    >,
    tokio::task::JoinHandle<Option<tonic::Status>>,
) {
    use tonic::codegen::Service as _;
    let (frames, receiver) = tokio::sync::mpsc::channel(4);
    let mut start = vec![0u8];
    start.extend(declared.to_be_bytes());
    start.extend(vec![0xffu8; sent]);
    frames
        .send(Ok(hyper::body::Frame::data(start.into())))
        .await
        .unwrap();
    let body =
        http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(receiver));
    let request = tonic::codegen::http::Request::post(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(body))
        .unwrap();
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .unwrap();
    let response = channel.call(request);
    let answer = tokio::spawn(async move {
        let response = response.await.ok()?;
        tonic::Status::from_header_map(response.headers())
    });
    (frames, answer)
}

/// Fresh edge review M4: `SendBatch` and `PublishPrekeys` may carry about
/// 4 MB, and 128 such calls per connection that each sent most of a message
/// and stopped held up to half a gigabyte per connection until the request
/// timeout. Now what large messages have sent counts against a relay-wide
/// budget and their network's share (8 MiB): beyond the share they are
/// refused, small calls go on, another network still sends large ones, and
/// the share comes back when the withheld calls end.
#[tokio::test]
async fn large_requests_that_are_never_finished_hold_only_their_networks_share() {
    let (relay, client) = relay().await;
    let (declared, sent) = (4_000_000u32, 3_000_000usize);
    let mut channel = haven_e2e::connect(relay.address).await.unwrap();
    // A message over the service-wide limit is refused at its prefix, not
    // received, charged and then refused (fourth fresh review M-1).
    let (_frames, over) =
        declared_and_withheld(&mut channel, "/haven.v1.Mailbox/SendBatch", 5_000_000, 0).await;
    let over = tokio::time::timeout(std::time::Duration::from_secs(5), over)
        .await
        .expect("refused at once")
        .unwrap()
        .expect("a refusal before the handler");
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");
    assert!(
        over.message().contains("larger than this relay accepts"),
        "{over:?}"
    );
    // The attacker, bounded: 6 calls on one connection, each 3 MB into a 4 MB
    // message, then silence.
    let mut calls = Vec::new();
    for _ in 0..6 {
        calls.push(
            declared_and_withheld(&mut channel, "/haven.v1.Mailbox/SendBatch", declared, sent)
                .await,
        );
    }
    let (mut refused, mut waiting) = (0, 0);
    // Refusals come within moments; one deadline for all, so the calls left
    // waiting cost it only once.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    for (_, answer) in &mut calls {
        match tokio::time::timeout_at(deadline, &mut *answer).await {
            Ok(status) => {
                let status = status.unwrap().expect("a refusal before the handler");
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    status.message().contains("too many large requests"),
                    "{status:?}"
                );
                refused += 1;
            }
            Err(_) => waiting += 1,
        }
    }
    // The share holds two such messages at most (8 MiB / 2.9 MiB).
    let share = haven_server::grpc::edge::LARGE_REQUEST_SHARE_BYTES;
    assert!(
        waiting * sent as u64 <= share && waiting >= 1,
        "{waiting} held"
    );
    assert_eq!(refused, 6 - waiting);
    // Through all of it a legitimate client on the same network is served.
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    client.send_numbered(&mailbox, 1).await;
    assert_eq!(client.stored(&mailbox).await.len(), 1);
    // Another network sends a large message: it is taken (and, garbage,
    // refused as undecodable rather than for the budget).
    let mut other = tonic::transport::Endpoint::from_shared(format!("http://{}", relay.address))
        .unwrap()
        .local_address(Some(std::net::IpAddr::from([127, 0, 0, 2])))
        .connect()
        .await
        .unwrap();
    let (frames, answer) = declared_and_withheld(
        &mut other,
        "/haven.v1.Mailbox/SendBatch",
        1_000_000,
        1_000_000,
    )
    .await;
    drop(frames);
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), answer)
        .await
        .expect("answered")
        .unwrap()
        .expect("a refusal before the handler");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // The withheld calls end (their client goes away): the share comes back.
    drop(calls);
    drop(channel);
    let mut channel = haven_e2e::connect(relay.address).await.unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut pair = Vec::new();
        for _ in 0..2 {
            pair.push(
                declared_and_withheld(&mut channel, "/haven.v1.Mailbox/SendBatch", declared, sent)
                    .await,
            );
        }
        let mut taken = true;
        for (_, answer) in &mut pair {
            taken &= tokio::time::timeout(std::time::Duration::from_millis(500), &mut *answer)
                .await
                .is_err();
        }
        drop(pair);
        if taken {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the share did not come back after the withheld calls ended"
        );
    }
}

/// A legitimate client's mailbox still takes a send and gives it back.
async fn still_served(client: &haven_e2e::TestClient, mailbox: &haven_e2e::OwnedMailbox) {
    client
        .send(send_request(
            &mailbox.sender_id,
            &random_id(),
            b"still here",
        ))
        .await
        .unwrap();
    assert_eq!(client.fetch(mailbox, 0).await.unwrap().envelopes.len(), 1);
}

/// A Fetch of all of `mailbox` signed by a phone whose clock is 100 s behind
/// (the past window is 120 s).
fn lagging_fetch(mailbox: &haven_e2e::OwnedMailbox) -> proto::FetchRequest {
    let limit = 0u32;
    proto::FetchRequest {
        recipient_id: mailbox.recipient_id.clone(),
        limit,
        auth: Some(sign_at(
            &mailbox.key,
            Method::Fetch,
            &mailbox.recipient_id,
            &[&limit.to_be_bytes()],
            now_ms() - 100_000,
        )),
    }
}
