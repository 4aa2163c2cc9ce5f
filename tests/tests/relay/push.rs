//! Push wake-ups, against a local HTTP receiver standing in for a push gateway
//! or UnifiedPush distributor: content-free, only when no stream watches,
//! coalesced, removed on 410, never in the way of a Send.

use std::time::Duration;

use base64::Engine as _;
use haven_e2e::{InProcessRelay, PushReceiver, TestClient, random_id, send_request, test_config};
use haven_proto::v1::{MailboxKind, receive_response::Kind};

async fn relay_with_push(interval_seconds: u64) -> (InProcessRelay, TestClient) {
    let mut config = test_config();
    config.push.allow_local_endpoints = true;
    config.push.interval_seconds = interval_seconds;
    config.push.timeout_seconds = 60;
    let relay = InProcessRelay::start(config).await.unwrap();
    let client = relay.client().await.unwrap();
    (relay, client)
}

#[tokio::test]
async fn an_offline_mailbox_gets_one_wake_up_that_carries_only_the_token() {
    let (_relay, client) = relay_with_push(60).await;
    let receiver = PushReceiver::start().await.unwrap();
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    let token = b"opaque-token-of-this-registration";
    client
        .register_push(&mailbox, &receiver.url, token)
        .await
        .unwrap();
    let envelope_id = random_id();
    client
        .send(send_request(&mailbox.sender_id, &envelope_id, &[7; 300]))
        .await
        .unwrap();
    let requests = receiver.wait_for(1).await;
    let [push] = requests.as_slice() else {
        panic!("expected one wake-up, got {requests:?}");
    };
    assert!(
        push.head.starts_with("POST /push/endpoint-1 HTTP/1.1"),
        "{}",
        push.head
    );
    assert!(
        push.head
            .to_ascii_lowercase()
            .contains("content-type: application/json")
    );
    let expected = format!(
        "{{\"token\":\"{}\"}}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token)
    );
    assert_eq!(String::from_utf8_lossy(&push.body), expected);
    // Nothing that names the mailbox or the envelope, in any encoding.
    let everything = [push.head.as_bytes(), &push.body].concat();
    for secret in [&mailbox.recipient_id, &mailbox.sender_id, &envelope_id] {
        for form in [
            secret.clone(),
            hex::encode(secret).into_bytes(),
            base64::engine::general_purpose::STANDARD
                .encode(secret)
                .into_bytes(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(secret)
                .into_bytes(),
        ] {
            assert!(
                !everything.windows(form.len()).any(|w| w == form.as_slice()),
                "a wake-up names the mailbox or the envelope"
            );
        }
    }

    // More arrivals while it is unread: coalesced into that one wake-up.
    for _ in 0..4 {
        client
            .send(send_request(&mailbox.sender_id, &random_id(), b"more"))
            .await
            .unwrap();
    }
    // Once read, the next arrival wakes it again (and only then).
    client.fetch(&mailbox, 0).await.unwrap();
    client
        .send(send_request(
            &mailbox.sender_id,
            &random_id(),
            b"after reading",
        ))
        .await
        .unwrap();
    let requests = receiver.wait_for(2).await;
    assert_eq!(requests.len(), 2, "one per unread stretch: {requests:?}");
}

#[tokio::test]
async fn no_wake_up_while_a_stream_watches() {
    let (_relay, client) = relay_with_push(1).await;
    let receiver = PushReceiver::start().await.unwrap();
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    client
        .register_push(&mailbox, &receiver.url, b"t")
        .await
        .unwrap();
    let mut stream = client.receive(&mailbox, 0).await.unwrap();
    assert!(matches!(stream.next().await, Ok(Some(Kind::QueueEmpty(_)))));
    for n in 0..3u8 {
        client
            .send(send_request(&mailbox.sender_id, &random_id(), &[n]))
            .await
            .unwrap();
        let envelope = stream.next_envelope().await;
        stream.ack(vec![envelope.envelope_id]).await;
    }
    // A wake-up, had one been sent, would have come within milliseconds.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(receiver.requests().is_empty(), "woken while streaming");
    drop(stream);
    // The stream is gone: the next arrival wakes the device, and it is the
    // first wake-up the receiver ever saw.
    let mut sent = 0;
    let requests = loop {
        // The relay notices the closed stream asynchronously; send until a
        // wake-up comes (bounded).
        client
            .send(send_request(&mailbox.sender_id, &random_id(), b"offline"))
            .await
            .unwrap();
        sent += 1;
        let requests = receiver.wait_for(1).await;
        if !requests.is_empty() || sent == 5 {
            break requests;
        }
    };
    assert_eq!(requests.len(), 1, "{requests:?}");
}

#[tokio::test]
async fn a_gone_endpoint_loses_its_registration_and_a_dead_one_never_slows_send() {
    let (_relay, client) = relay_with_push(1).await;
    let receiver = PushReceiver::start().await.unwrap();
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    client
        .register_push(&mailbox, &receiver.url, b"t")
        .await
        .unwrap();
    receiver.status(410);
    client
        .send(send_request(&mailbox.sender_id, &random_id(), b"one"))
        .await
        .unwrap();
    assert_eq!(receiver.wait_for(1).await.len(), 1);
    // Give the relay time to act on the 410 (bounded), then read and send
    // again past the interval: no registration, no wake-up.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    receiver.status(200);
    client.fetch(&mailbox, 0).await.unwrap();
    client
        .send(send_request(&mailbox.sender_id, &random_id(), b"two"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        receiver.requests().len(),
        1,
        "the 410 removed the registration"
    );

    // A dead endpoint (accepts, never answers; the relay waits up to 60 s):
    // sends to twenty mailboxes registered there all complete regardless.
    let dead = PushReceiver::start().await.unwrap();
    dead.status(0);
    let mut mailboxes = Vec::new();
    for _ in 0..20 {
        let mailbox = client.create(MailboxKind::Private).await.unwrap();
        client
            .register_push(&mailbox, &dead.url, b"t")
            .await
            .unwrap();
        mailboxes.push(mailbox);
    }
    let sends = async {
        for mailbox in &mailboxes {
            client
                .send(send_request(&mailbox.sender_id, &random_id(), b"x"))
                .await
                .unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(20), sends)
        .await
        .expect("sends completed while every wake-up hung");
    assert_eq!(dead.wait_for(20).await.len(), 20, "each mailbox was woken");
}

#[tokio::test]
async fn registrations_are_checked() {
    let (_relay, client) = relay().await;
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    for (endpoint, token, why) in [
        ("http://push.example.org/x", &b"t"[..], "https"),
        ("https://127.0.0.1/x", b"t", "local or private"),
        ("https://[::1]/x", b"t", "local or private"),
        ("https://10.0.0.7/x", b"t", "local or private"),
        ("not a url", b"t", "not a URL"),
        ("", b"t", "a token without an endpoint"),
        ("https://push.example.org/x", &[0u8; 257][..], "at most 256"),
    ] {
        let status = client
            .register_push(&mailbox, endpoint, token)
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{endpoint}");
        assert!(status.message().contains(why), "{}", status.message());
        assert!(
            !status.message().contains("push.example.org"),
            "errors do not echo endpoints"
        );
    }
    // A public https endpoint is accepted, and an empty one removes it.
    client
        .register_push(&mailbox, "https://push.example.org/up?token=abc", b"t")
        .await
        .unwrap();
    client.register_push(&mailbox, "", b"").await.unwrap();
    // Only the mailbox's key may register.
    let mut stranger = client.create(MailboxKind::Private).await.unwrap();
    stranger.recipient_id = mailbox.recipient_id.clone();
    let status = client
        .register_push(&stranger, "https://push.example.org/x", b"t")
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    client.delete(&mailbox).await.unwrap();
    let status = client
        .register_push(&mailbox, "https://push.example.org/x", b"t")
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
}

use super::relay;
