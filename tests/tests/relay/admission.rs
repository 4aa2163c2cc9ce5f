//! Who may do what: signatures, stamps, replays, sizes and quotas, with clear errors.

use haven_e2e::{
    InProcessRelay, now_ms, random_id, random_key, send_request, sign, sign_at, sign_send,
    stamp_send, stamp_send_at, test_config,
};
use haven_proto::auth::Method;
use haven_proto::v1::{self as proto, MailboxKind};
use tonic::Code;

use super::relay;

#[tokio::test]
async fn secured_mailbox_refuses_unsigned_and_wrongly_signed_sends() {
    let (_relay, client) = relay().await;
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    let sender = random_key();
    client
        .secure(&mailbox, &sender.verifying_key().to_bytes())
        .await
        .unwrap();

    let unsigned = client
        .send(send_request(&mailbox.sender_id, &random_id(), b"x"))
        .await
        .unwrap_err();
    assert_eq!(unsigned.code(), Code::Unauthenticated);
    assert!(
        unsigned.message().contains("must be signed"),
        "{}",
        unsigned.message()
    );

    let mut forged = send_request(&mailbox.sender_id, &random_id(), b"x");
    sign_send(&mut forged, &random_key());
    let refused = client.send(forged).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().contains("sender signature refused"));

    // A signature for other bytes does not carry over.
    let mut tampered = send_request(&mailbox.sender_id, &random_id(), b"x");
    sign_send(&mut tampered, &sender);
    tampered.ciphertext = b"y".to_vec();
    assert_eq!(
        client.send(tampered).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    let mut signed = send_request(&mailbox.sender_id, &random_id(), b"x");
    sign_send(&mut signed, &sender);
    client.send(signed).await.unwrap();
    assert_eq!(client.fetch(&mailbox, 0).await.unwrap().envelopes.len(), 1);

    // Securing again with the same key is fine; with another key it is refused.
    client
        .secure(&mailbox, &sender.verifying_key().to_bytes())
        .await
        .unwrap();
    let other = client
        .secure(&mailbox, &random_key().verifying_key().to_bytes())
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn intake_mailbox_refuses_a_missing_or_too_weak_stamp() {
    let (_relay, client) = relay().await;
    let intake = client.create(MailboxKind::Intake).await.unwrap();
    let missing = client
        .send(send_request(&intake.sender_id, &random_id(), b"hi"))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::PermissionDenied);
    assert!(
        missing.message().contains("proof-of-work stamp of 8 bits"),
        "{}",
        missing.message()
    );

    // Find a stamp that meets 0 bits but not 8: too weak for the relay.
    let mut weak = send_request(&intake.sender_id, &random_id(), b"hi");
    weak.pow_timestamp_ms = now_ms();
    weak.pow_stamp = (0..u64::MAX).find(|nonce| {
        !haven_proto::pow::intake_stamp_ok(
            &weak.sender_id,
            &weak.envelope_id,
            &weak.ciphertext,
            weak.pow_timestamp_ms,
            *nonce,
            8,
        )
    });
    let refused = client.send(weak).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("not valid"));

    // A stamp for another envelope does not transfer.
    let mut stamped = send_request(&intake.sender_id, &random_id(), b"hi");
    stamp_send(&mut stamped, 8);
    let mut reused = stamped.clone();
    reused.envelope_id = random_id();
    assert_eq!(
        client.send(reused).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    client.send(stamped).await.unwrap();
    assert_eq!(client.fetch(&intake, 0).await.unwrap().envelopes.len(), 1);

    let secure = client
        .secure(&intake, &random_key().verifying_key().to_bytes())
        .await
        .unwrap_err();
    assert_eq!(secure.code(), Code::FailedPrecondition);
}

/// Second fresh review H-1: an intake stamp carried no time and the relay
/// forgot a first contact at its ack, so one saved request, sent again after
/// every ack, kept a supporter's intake full forever at no new cost. Now a
/// stamp is taken only within its window of the time it carries, and each
/// first contact is remembered for that window: the replay stores nothing.
#[tokio::test]
async fn an_intake_stamp_is_spent_once_and_taken_only_within_its_window() {
    let (_relay, client) = relay().await;
    let window_ms = client.get_info().await.unwrap().intake_stamp_window_ms;
    assert_eq!(window_ms, 3_600_000, "GetInfo publishes the window");
    let intake = client.create(MailboxKind::Intake).await.unwrap();
    let mut saved = send_request(&intake.sender_id, &random_id(), b"first contact");
    stamp_send(&mut saved, 8);
    assert!(!client.send(saved.clone()).await.unwrap().duplicate);
    // The attacker's loop, bounded: the owner takes what came, the saved
    // request comes again.
    for _ in 0..20 {
        let ids: Vec<_> = client
            .fetch(&intake, 10)
            .await
            .unwrap()
            .envelopes
            .into_iter()
            .map(|envelope| envelope.envelope_id)
            .collect();
        if !ids.is_empty() {
            client.ack(&intake, ids).await.unwrap();
        }
        let again = client.send(saved.clone()).await.unwrap();
        assert!(again.duplicate, "a replay after the ack stores nothing");
    }
    assert!(
        client
            .fetch(&intake, 10)
            .await
            .unwrap()
            .envelopes
            .is_empty()
    );

    let refused = |made_ms: u64| {
        let client = client.clone();
        let sender_id = intake.sender_id.clone();
        async move {
            let mut request = send_request(&sender_id, &random_id(), b"first contact");
            stamp_send_at(&mut request, 8, made_ms);
            let status = client.send(request).await.unwrap_err();
            assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
            status.message().to_owned()
        }
    };
    let stale = refused(now_ms() - window_ms - 10_000).await;
    assert!(
        stale.contains("older than this relay's stamp window"),
        "{stale}"
    );
    let ahead = refused(now_ms() + 60_000).await;
    assert!(ahead.contains("ahead of the relay's clock"), "{ahead}");
    let undated = refused(0).await;
    assert!(undated.contains("pow_timestamp_ms"), "{undated}");
    // A stamp of the first format (no time) is not valid for a time.
    let mut old_format = send_request(&intake.sender_id, &random_id(), b"first contact");
    old_format.pow_timestamp_ms = now_ms();
    old_format.pow_stamp = (0..u64::MAX).find(|nonce| {
        haven_proto::pow::verify(
            &old_format.sender_id,
            &old_format.envelope_id,
            &old_format.ciphertext,
            *nonce,
            8,
        ) && !haven_proto::pow::intake_stamp_ok(
            &old_format.sender_id,
            &old_format.envelope_id,
            &old_format.ciphertext,
            old_format.pow_timestamp_ms,
            *nonce,
            8,
        )
    });
    assert_eq!(
        client.send(old_format).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // A new first contact, stamped now or a little earlier, is served.
    let mut fresh = send_request(&intake.sender_id, &random_id(), b"another first contact");
    stamp_send_at(&mut fresh, 8, now_ms() - window_ms / 2);
    assert!(!client.send(fresh).await.unwrap().duplicate);
    assert_eq!(client.fetch(&intake, 10).await.unwrap().envelopes.len(), 1);
}

#[tokio::test]
async fn replayed_stale_and_misdirected_authentication_is_refused() {
    let (_relay, client) = relay().await;
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    let fetch = |auth| proto::FetchRequest {
        recipient_id: mailbox.recipient_id.clone(),
        limit: 5,
        auth,
    };
    let auth = sign(
        &mailbox.key,
        Method::Fetch,
        &mailbox.recipient_id,
        &[&5u32.to_be_bytes()],
    );
    client
        .mailbox
        .clone()
        .fetch(fetch(Some(auth.clone())))
        .await
        .unwrap();
    let replay = client
        .mailbox
        .clone()
        .fetch(fetch(Some(auth)))
        .await
        .unwrap_err();
    assert_eq!(replay.code(), Code::Unauthenticated);
    assert!(replay.message().contains("already used"));

    let stale_time = haven_e2e::now_ms() - 10 * 60 * 1000;
    let stale = sign_at(
        &mailbox.key,
        Method::Fetch,
        &mailbox.recipient_id,
        &[&5u32.to_be_bytes()],
        stale_time,
    );
    let refused = client
        .mailbox
        .clone()
        .fetch(fetch(Some(stale)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        refused.message().contains("device clock"),
        "{}",
        refused.message()
    );

    let missing = client.mailbox.clone().fetch(fetch(None)).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);

    // A valid signature by another key, or for another method, is refused.
    let stranger = sign(
        &random_key(),
        Method::Fetch,
        &mailbox.recipient_id,
        &[&5u32.to_be_bytes()],
    );
    assert_eq!(
        client
            .mailbox
            .clone()
            .fetch(fetch(Some(stranger)))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let wrong_method = sign(&mailbox.key, Method::Delete, &mailbox.recipient_id, &[]);
    let delete = proto::DeleteRequest {
        recipient_id: mailbox.recipient_id.clone(),
        auth: Some(wrong_method.clone()),
    };
    client.mailbox.clone().delete(delete).await.unwrap();
    // ...and after the delete the mailbox is gone for everyone.
    assert_eq!(
        client.fetch(&mailbox, 1).await.unwrap_err().code(),
        Code::NotFound
    );

    // Streams authenticate the same way.
    let other = client.create(MailboxKind::Private).await.unwrap();
    let bad_open = proto::ReceiveRequest {
        kind: Some(proto::receive_request::Kind::Open(proto::ReceiveOpen {
            recipient_id: other.recipient_id.clone(),
            window: 1,
            auth: Some(sign(
                &random_key(),
                Method::Receive,
                &other.recipient_id,
                &[&1u32.to_be_bytes()],
            )),
        })),
    };
    let refused = match client.receive_raw(bad_open).await {
        Err(status) => status,
        Ok(mut stream) => stream.next().await.unwrap_err(),
    };
    assert_eq!(refused.code(), Code::Unauthenticated);
    let ack_first = proto::ReceiveRequest {
        kind: Some(proto::receive_request::Kind::Ack(proto::ReceiveAck {
            envelope_ids: vec![],
        })),
    };
    let refused = match client.receive_raw(ack_first).await {
        Err(status) => status,
        Ok(mut stream) => stream.next().await.unwrap_err(),
    };
    assert_eq!(refused.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn oversized_envelopes_long_ttls_and_full_mailboxes_are_refused() {
    let mut config = test_config();
    config.limits.max_envelope_bytes = 1024;
    config.limits.mailbox_max_bytes = 4096;
    config.limits.mailbox_max_envelopes = 3;
    let relay = InProcessRelay::start(config).await.unwrap();
    let client = relay.client().await.unwrap();
    let mailbox = client.create(MailboxKind::Private).await.unwrap();

    let big = client
        .send(send_request(&mailbox.sender_id, &random_id(), &[0; 1025]))
        .await
        .unwrap_err();
    assert_eq!(big.code(), Code::InvalidArgument);
    assert_eq!(
        big.message(),
        "ciphertext is 1025 bytes; this relay accepts at most 1024 bytes per envelope"
    );
    let empty = client
        .send(send_request(&mailbox.sender_id, &random_id(), &[]))
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);

    let mut long = send_request(&mailbox.sender_id, &random_id(), b"x");
    long.ttl_seconds = 15 * 24 * 3600;
    let refused = client.send(long).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("at most 604800 seconds"));

    for _ in 0..3 {
        client
            .send(send_request(&mailbox.sender_id, &random_id(), &[1; 1000]))
            .await
            .unwrap();
    }
    let full = client
        .send(send_request(&mailbox.sender_id, &random_id(), b"x"))
        .await
        .unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted);
    // Unsecured: the smaller of its own quota and the general one (3, 4096 B).
    assert_eq!(
        full.message(),
        "an unsecured mailbox holds at most 3 envelopes and 4096 bytes until its owner secures it"
    );

    let other = client.create(MailboxKind::Private).await.unwrap();
    for _ in 0..4 {
        client
            .send(send_request(&other.sender_id, &random_id(), &[1; 1000]))
            .await
            .ok();
    }
    let bytes = client
        .send(send_request(&other.sender_id, &random_id(), &[1; 200]))
        .await
        .unwrap_err();
    assert_eq!(bytes.code(), Code::ResourceExhausted);

    // A secured mailbox's quota refusal names the quota only, never how much
    // the mailbox holds (review F15: a sender kept a mailbox nearly full and
    // read its owner's acks off the figure).
    let secured = client.create(MailboxKind::Private).await.unwrap();
    let sender = random_key();
    client
        .secure(&secured, &sender.verifying_key().to_bytes())
        .await
        .unwrap();
    let signed = |size: usize| {
        let mut request = send_request(&secured.sender_id, &random_id(), &vec![1; size]);
        sign_send(&mut request, &sender);
        request
    };
    for _ in 0..3 {
        client.send(signed(10)).await.unwrap();
    }
    let by_count = client.send(signed(10)).await.unwrap_err();
    assert_eq!(by_count.code(), Code::ResourceExhausted);
    assert_eq!(
        by_count.message(),
        "mailbox is full: it holds at most 3 envelopes until its owner takes some"
    );
}

#[tokio::test]
async fn malformed_requests_get_invalid_argument_with_the_field_named() {
    let (_relay, client) = relay().await;
    let key = random_key();
    let bad_kind = client
        .mailbox
        .clone()
        .create(proto::CreateRequest {
            recipient_key: key.verifying_key().to_bytes().to_vec(),
            kind: 0,
            auth: Some(sign(&key, Method::Create, &[], &[&[0]])),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_kind.code(), Code::InvalidArgument);
    assert!(bad_kind.message().contains("kind must be"));

    let short_key = client
        .mailbox
        .clone()
        .create(proto::CreateRequest {
            recipient_key: vec![1; 31],
            kind: 1,
            auth: None,
        })
        .await
        .unwrap_err();
    assert_eq!(
        short_key.message(),
        "recipient_key must be 32 bytes, got 31"
    );

    // A Create signed for the other kind is refused (the kind is signed), its
    // stamp good (the stamp does not cover the kind).
    let mut signed_for_private = haven_e2e::stamped_create(&key, proto::MailboxKind::Private, 8);
    signed_for_private.kind = 2;
    let wrong_kind = client
        .mailbox
        .clone()
        .create(signed_for_private)
        .await
        .unwrap_err();
    assert_eq!(wrong_kind.code(), Code::Unauthenticated);

    let short_id = client
        .send(send_request(&[1; 15], &random_id(), b"x"))
        .await
        .unwrap_err();
    assert_eq!(short_id.message(), "sender_id must be 16 bytes, got 15");
    let unknown = client
        .send(send_request(&random_id(), &random_id(), b"x"))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let fetch = client
        .mailbox
        .clone()
        .fetch(proto::FetchRequest {
            recipient_id: vec![],
            limit: 0,
            auth: None,
        })
        .await
        .unwrap_err();
    assert_eq!(fetch.message(), "recipient_id must be 16 bytes, got 0");
    let bad_signature = client
        .mailbox
        .clone()
        .fetch(proto::FetchRequest {
            recipient_id: random_id(),
            limit: 0,
            auth: Some(proto::Auth {
                timestamp_ms: 1,
                nonce: vec![0; 16],
                signature: vec![0; 10],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(
        bad_signature.message(),
        "auth.signature must be 64 bytes, got 10"
    );
}

#[tokio::test]
async fn delete_leaves_nothing_behind() {
    let (_relay, client) = relay().await;
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    for _ in 0..3 {
        client
            .send(send_request(&mailbox.sender_id, &random_id(), b"gone soon"))
            .await
            .unwrap();
    }
    client.delete(&mailbox).await.unwrap();
    assert_eq!(
        client.fetch(&mailbox, 0).await.unwrap_err().code(),
        Code::NotFound
    );
    let send = client
        .send(send_request(&mailbox.sender_id, &random_id(), b"x"))
        .await
        .unwrap_err();
    assert_eq!(send.code(), Code::NotFound);
    assert_eq!(
        client.delete(&mailbox).await.unwrap_err().code(),
        Code::NotFound
    );
}

/// Regression: two identical Fetches in the same millisecond signed identically
/// (Ed25519 is deterministic) and the second was refused as a replay.
#[tokio::test]
async fn identical_requests_in_the_same_millisecond_are_not_replays() {
    let (_relay, client) = relay().await;
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    let now = haven_e2e::now_ms();
    for _ in 0..3 {
        let auth = sign_at(
            &mailbox.key,
            Method::Fetch,
            &mailbox.recipient_id,
            &[&5u32.to_be_bytes()],
            now,
        );
        let request = proto::FetchRequest {
            recipient_id: mailbox.recipient_id.clone(),
            limit: 5,
            auth: Some(auth),
        };
        client.mailbox.clone().fetch(request).await.unwrap();
    }
}

#[tokio::test]
async fn streams_beyond_the_limit_are_refused_until_one_closes() {
    let mut config = test_config();
    config.limits.max_streams = 1;
    let relay = InProcessRelay::start(config).await.unwrap();
    let client = relay.client().await.unwrap();
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    let mut first = client.receive(&mailbox, 0).await.unwrap();
    assert!(first.next().await.is_ok());
    let refused = match client.receive(&mailbox, 0).await {
        Err(status) => status,
        Ok(mut stream) => stream.next().await.unwrap_err(),
    };
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().contains("too many open streams"));
    drop(first);
    // The permit returns once the relay notices the first stream is gone.
    let deadline = std::time::Instant::now() + haven_e2e::WAIT;
    loop {
        let opened = match client.receive(&mailbox, 0).await {
            Ok(mut stream) => stream.next().await.is_ok(),
            Err(_) => false,
        };
        if opened {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no stream after the first closed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
