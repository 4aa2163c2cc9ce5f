//! Delivery: live and offline, acknowledgement, the window, expiry, idempotency.

use std::time::Duration;

use haven_e2e::{InProcessRelay, random_id, send_request, test_config};
use haven_proto::v1::{self as proto, MailboxKind, receive_response::Kind};

use super::relay;

#[tokio::test]
async fn live_delivery_reaches_an_open_stream() {
    let (_relay, client) = relay().await;
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    let mut stream = client.receive(&mailbox, 0).await.unwrap();
    assert!(
        matches!(stream.next().await, Ok(Some(Kind::QueueEmpty(_)))),
        "empty backlog is announced"
    );
    for n in 0..3u8 {
        client
            .send(send_request(&mailbox.sender_id, &random_id(), &[n; 40]))
            .await
            .unwrap();
        let envelope = stream.next_envelope().await;
        assert_eq!(envelope.ciphertext, vec![n; 40]);
        stream.ack(vec![envelope.envelope_id]).await;
    }
}

#[tokio::test]
async fn offline_backlog_is_fetched_in_order_then_acked_away() {
    let (_relay, client) = relay().await;
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    let ids: Vec<Vec<u8>> = (0..5).map(|_| random_id()).collect();
    for (n, id) in ids.iter().enumerate() {
        client
            .send(send_request(
                &mailbox.sender_id,
                id,
                format!("m{n}").as_bytes(),
            ))
            .await
            .unwrap();
    }
    let fetched = client.fetch(&mailbox, 3).await.unwrap();
    assert!(fetched.more);
    let texts: Vec<_> = fetched
        .envelopes
        .iter()
        .map(|e| e.ciphertext.clone())
        .collect();
    assert_eq!(texts, [b"m0".to_vec(), b"m1".to_vec(), b"m2".to_vec()]);
    // Fetch does not delete: the same envelopes come again until acknowledged.
    assert_eq!(
        client.fetch(&mailbox, 3).await.unwrap().envelopes,
        fetched.envelopes
    );
    assert_eq!(client.ack(&mailbox, ids[..3].to_vec()).await.unwrap(), 3);
    let rest = client.fetch(&mailbox, 0).await.unwrap();
    assert!(!rest.more);
    assert_eq!(
        rest.envelopes
            .iter()
            .map(|e| e.envelope_id.clone())
            .collect::<Vec<_>>(),
        ids[3..].to_vec()
    );
    assert_eq!(client.ack(&mailbox, ids.clone()).await.unwrap(), 2);
    assert!(client.stored(&mailbox).await.is_empty());
}

#[tokio::test]
async fn stream_delivers_backlog_then_marker_then_live() {
    let (_relay, client) = relay().await;
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    client.send_numbered(&mailbox, 3).await;
    let mut stream = client.receive(&mailbox, 10).await.unwrap();
    for n in 0..3u8 {
        assert!(matches!(stream.next().await, Ok(Some(Kind::Envelope(e))) if e.ciphertext == [n]));
    }
    assert!(matches!(stream.next().await, Ok(Some(Kind::QueueEmpty(_)))));
    client
        .send(send_request(&mailbox.sender_id, &random_id(), b"live"))
        .await
        .unwrap();
    assert_eq!(stream.next_envelope().await.ciphertext, b"live");
}

#[tokio::test]
async fn window_bounds_unacknowledged_envelopes_in_flight() {
    let (_relay, client) = relay().await;
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    client.send_numbered(&mailbox, 5).await;
    let mut stream = client.receive(&mailbox, 2).await.unwrap();
    let first = stream.next_envelope().await;
    let second = stream.next_envelope().await;
    assert_eq!(
        (first.ciphertext.as_slice(), second.ciphertext.as_slice()),
        (&[0u8][..], &[1u8][..])
    );
    assert!(
        stream.quiet_for(Duration::from_millis(300)).await,
        "no third envelope before an ack"
    );
    stream.ack(vec![first.envelope_id]).await;
    assert_eq!(stream.next_envelope().await.ciphertext, [2]);
    assert!(
        stream.quiet_for(Duration::from_millis(300)).await,
        "window is full again"
    );
    // Acknowledged envelopes are gone from the store.
    assert_eq!(client.stored(&mailbox).await.len(), 4);
}

#[tokio::test]
async fn acknowledgements_sent_just_before_the_client_closes_are_stored() {
    // On sled, where each deletion waits for a sync, so that acknowledgements
    // queue up behind the one being written.
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.store = haven_server::config::StoreKind::Sled;
    config.data_dir = dir.path().join("data");
    // 64 unsigned sends: more than an unsecured mailbox holds by default.
    config.limits.unsecured_mailbox_max_envelopes = 64;
    let relay = InProcessRelay::start(config).await.unwrap();
    let client = relay.client().await.unwrap();
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    client.send_numbered(&mailbox, 64).await;
    let mut stream = client.receive(&mailbox, 64).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..64 {
        ids.push(stream.next_envelope().await.envelope_id);
    }
    // One message per envelope, as fast as the client can, then it closes its
    // side without waiting: the relay writes deletions in the background, and
    // must finish them before the stream ends.
    for id in ids {
        stream.ack(vec![id]).await;
    }
    let haven_e2e::ReceiveStream { acks, mut inbound } = stream;
    drop(acks);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
            Ok(Ok(Some(message))) => {
                assert!(
                    matches!(message.kind, Some(Kind::QueueEmpty(_))),
                    "{message:?}"
                );
            }
            Ok(Ok(None)) => break,
            other => panic!("stream did not end cleanly: {other:?}"),
        }
    }
    assert!(
        client.stored(&mailbox).await.is_empty(),
        "every acknowledged envelope is deleted once the stream has ended"
    );
}

#[tokio::test]
async fn idempotent_resend_is_stored_once() {
    let (_relay, client) = relay().await;
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    let id = random_id();
    let first = client
        .send(send_request(&mailbox.sender_id, &id, b"once"))
        .await
        .unwrap();
    let again = client
        .send(send_request(&mailbox.sender_id, &id, b"once"))
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!(client.fetch(&mailbox, 0).await.unwrap().envelopes.len(), 1);
}

#[tokio::test]
async fn envelopes_expire_after_their_bucket() {
    // Test configuration: 1-second buckets and a sweep every second.
    let (_relay, client) = relay().await;
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    let mut short = send_request(&mailbox.sender_id, &random_id(), b"short");
    short.ttl_seconds = 1;
    let mut long = send_request(&mailbox.sender_id, &random_id(), b"long");
    long.ttl_seconds = 3600;
    client.send(short).await.unwrap();
    client.send(long).await.unwrap();
    let deadline = std::time::Instant::now() + haven_e2e::WAIT;
    loop {
        let stored = client.fetch(&mailbox, 0).await.unwrap().envelopes;
        if stored.len() == 1 {
            assert_eq!(stored[0].ciphertext, b"long");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "short envelope never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn send_batch_fans_out_with_a_result_per_item() {
    let (_relay, client) = relay().await;
    let devices: Vec<_> =
        futures::future::join_all((0..3).map(|_| client.create(MailboxKind::Private)))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    let mut items: Vec<proto::SendRequest> = devices
        .iter()
        .map(|d| send_request(&d.sender_id, &random_id(), b"to every device"))
        .collect();
    items.push(send_request(&random_id(), &random_id(), b"to nobody"));
    items.push(send_request(&devices[0].sender_id, &[1, 2, 3], b"bad id"));
    let results = client
        .mailbox
        .clone()
        .send_batch(proto::SendBatchRequest {
            items: items.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let codes: Vec<i32> = results.iter().map(|r| r.code).collect();
    assert_eq!(
        codes,
        [
            0,
            0,
            0,
            tonic::Code::NotFound as i32,
            tonic::Code::InvalidArgument as i32
        ]
    );
    assert_eq!(results[4].message, "envelope_id must be 16 bytes, got 3");
    assert!(
        results
            .iter()
            .zip(&items)
            .all(|(r, i)| r.envelope_id == i.envelope_id)
    );
    for device in &devices {
        assert_eq!(
            client.fetch(device, 0).await.unwrap().envelopes[0].ciphertext,
            b"to every device"
        );
    }
    let empty = client
        .mailbox
        .clone()
        .send_batch(proto::SendBatchRequest { items: vec![] })
        .await;
    assert_eq!(empty.unwrap_err().code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn deleting_a_mailbox_ends_its_stream() {
    let (_relay, client) = relay().await;
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    let mut stream = client.receive(&mailbox, 0).await.unwrap();
    assert!(matches!(stream.next().await, Ok(Some(Kind::QueueEmpty(_)))));
    client.delete(&mailbox).await.unwrap();
    let ended = stream.next().await.unwrap_err();
    assert_eq!(ended.code(), tonic::Code::NotFound);
}

/// Issue 13, point 9: `queue_empty` follows once everything stored at open has
/// been sent, even while the window is full. Before, a listing that filled
/// the window exactly could not tell whether more was stored, so with 10
/// stored, window 3 and one ack at a time, `queue_empty` came only after
/// another ack.
#[tokio::test]
async fn queue_empty_follows_the_last_stored_envelope_even_with_a_full_window() {
    let (_relay, client) = relay().await;
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    client.send_numbered(&mailbox, 10).await;
    let mut stream = client.receive(&mailbox, 3).await.unwrap();
    let mut unacked = std::collections::VecDeque::new();
    for n in 0..10u8 {
        match stream.next().await {
            Ok(Some(Kind::Envelope(envelope))) => {
                assert_eq!(envelope.ciphertext, [n]);
                unacked.push_back(envelope.envelope_id);
            }
            other => panic!("expected envelope {n}, got {other:?}"),
        }
        // One ack per envelope once the window is full, never ahead of it.
        if unacked.len() == 3 && n < 9 {
            stream.ack(vec![unacked.pop_front().unwrap()]).await;
        }
    }
    // The window is full (8, 9 and 10 unacknowledged) and nothing more is stored.
    let next = tokio::time::timeout(Duration::from_secs(2), stream.next()).await;
    assert!(
        matches!(next, Ok(Ok(Some(Kind::QueueEmpty(_))))),
        "no queue_empty while the window is full: {next:?}"
    );
    // The same with a backlog that exactly fills the window at open.
    let exact = client.create(MailboxKind::Private).await.unwrap();
    client.send_numbered(&exact, 3).await;
    let mut stream = client.receive(&exact, 3).await.unwrap();
    for _ in 0..3 {
        assert!(matches!(stream.next().await, Ok(Some(Kind::Envelope(_)))));
    }
    let next = tokio::time::timeout(Duration::from_secs(2), stream.next()).await;
    assert!(
        matches!(next, Ok(Ok(Some(Kind::QueueEmpty(_))))),
        "{next:?}"
    );
}

/// Issue 13, point 9: deleting a mailbox ends its open streams at once with
/// NOT_FOUND, also a stream whose window is full. Before, a full window kept
/// the stream from looking at the mailbox again until an ack.
#[tokio::test]
async fn deleting_a_mailbox_ends_its_stream_at_once_even_with_a_full_window() {
    let (_relay, client) = relay().await;
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    client.send_numbered(&mailbox, 3).await;
    let mut stream = client.receive(&mailbox, 2).await.unwrap();
    stream.next_envelope().await;
    stream.next_envelope().await;
    assert!(stream.quiet_for(Duration::from_millis(200)).await);
    client.delete(&mailbox).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(2), stream.next()).await;
    match ended {
        Ok(Err(status)) => assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}"),
        other => panic!("the stream did not end with NOT_FOUND at once: {other:?}"),
    }
}

#[tokio::test]
async fn graceful_shutdown_ends_streams_with_unavailable() {
    let relay = InProcessRelay::start(test_config()).await.unwrap();
    let client = relay.client().await.unwrap();
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    let mut stream = client.receive(&mailbox, 0).await.unwrap();
    assert!(matches!(stream.next().await, Ok(Some(Kind::QueueEmpty(_)))));
    let stopping = tokio::spawn(relay.stop());
    let ended = stream.next().await.unwrap_err();
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    stopping.await.unwrap().unwrap();
}

#[tokio::test]
async fn get_info_reports_limits_and_retention() {
    let (_relay, client) = relay().await;
    let info = client.get_info().await.unwrap();
    let limits = info.limits.unwrap();
    assert_eq!(limits.max_ttl_seconds, 7 * 24 * 3600);
    assert_eq!(limits.max_envelope_bytes, 64 * 1024);
    assert_eq!(info.intake_pow_difficulty, 8);
    assert!(info.retention_statement.contains("no client addresses"));
    assert!(
        info.retention_statement
            .contains("public prekeys until they are claimed")
    );
    assert!(!info.version.is_empty());
}

/// GetInfo left out the ClaimBundles rates, so a client could not tell how
/// many claims a relay takes before RESOURCE_EXHAUSTED. It reports the rates
/// the relay enforces: the configured ones, and per address the effective
/// one, 0 where it is off (set so, or unset behind a TLS-terminating proxy).
#[tokio::test]
async fn get_info_reports_the_claim_rates_the_relay_enforces() {
    /// The four claim fields of a relay started with `config`, in proto order.
    async fn claim_rates(config: haven_server::config::Config) -> [u32; 4] {
        let relay = InProcessRelay::start(config).await.unwrap();
        let limits = relay.info().await.unwrap().limits.unwrap();
        relay.stop().await.unwrap();
        [
            limits.claims_per_supporter_per_minute,
            limits.claim_burst_per_supporter,
            limits.claims_per_connection_per_minute,
            limits.claims_per_address_per_minute,
        ]
    }
    // Rates no default or test_config has, each different, so a field left
    // unset or filled from its neighbour fails.
    let mut config = test_config();
    config.limits.claims_per_supporter_per_minute = 7;
    config.limits.claim_burst_per_supporter = 3;
    config.limits.claims_per_connection_per_minute = 4;
    config.limits.claims_per_address_per_minute = Some(2);
    assert_eq!(claim_rates(config.clone()).await, [7, 3, 4, 2]);

    // Unset on loopback: the default of 10.
    config.limits.claims_per_address_per_minute = None;
    assert_eq!(claim_rates(config.clone()).await, [7, 3, 4, 10]);

    // Turned off.
    config.limits.claims_per_address_per_minute = Some(0);
    assert_eq!(claim_rates(config.clone()).await, [7, 3, 4, 0]);

    // Unset behind a TLS-terminating proxy (plaintext on a non-loopback
    // address): every connection would share the proxy's address, so off.
    // The test listener is still on loopback; only the configuration says
    // where the relay sits.
    config.limits.claims_per_address_per_minute = None;
    config.listen = "0.0.0.0:0".parse().unwrap();
    config.allow_plaintext = true;
    config.behind_proxy = None;
    assert!(config.behind_proxy());
    assert_eq!(claim_rates(config.clone()).await, [7, 3, 4, 0]);

    // And a proxy on the same host forwarding to loopback, which is what
    // operations.md describes: plaintext on 127.0.0.1 is taken to be behind
    // a proxy too (fresh edge review H1: before, every user shared one
    // address's 10 claims a minute there). Said otherwise, the caps apply.
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.allow_plaintext = false;
    assert_eq!(claim_rates(config.clone()).await, [7, 3, 4, 0]);
    config.behind_proxy = Some(false);
    assert_eq!(claim_rates(config).await, [7, 3, 4, 10]);
}

#[tokio::test]
async fn health_turns_not_serving_while_draining() {
    let mut config = test_config();
    config.drain_delay_seconds = 3;
    let relay = InProcessRelay::start(config).await.unwrap();
    let address = relay.address;
    let channel = haven_e2e::connect(address).await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let check = || tonic_health::pb::HealthCheckRequest {
        service: "haven.v1.Mailbox".into(),
    };
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    assert_eq!(
        health.check(check()).await.unwrap().into_inner().status,
        serving
    );
    let stopping = tokio::spawn(relay.stop());
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    // Polls within the drain delay; after it the relay stops and checks fail.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let mut seen = false;
    while std::time::Instant::now() < deadline {
        if health
            .check(check())
            .await
            .is_ok_and(|r| r.into_inner().status == not_serving)
        {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        seen,
        "health never reported NOT_SERVING during the drain delay"
    );
    stopping.await.unwrap().unwrap();
}
