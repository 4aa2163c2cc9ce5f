//! Relay abuse: what one anonymous client can make the relay do to everyone
//! else, after the December 2026 review (`../shared/reviews/2026-12-relay.md`).
//! Each test states the finding it holds, floods with a bounded number of
//! requests against a small test configuration, and then checks that a
//! legitimate client is still served.

use haven_e2e::{random_id, send_request, stamp_send};
use haven_proto::v1::MailboxKind;
use prost::Message as _;
use tonic::Code;

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
    // 70 × 64 KiB = 4.4 MiB: more than one response could carry before.
    let largest = limits.max_envelope_bytes as usize;
    for n in 0..70u8 {
        client
            .send(send_request(
                &mailbox.sender_id,
                &random_id(),
                &vec![n; largest],
            ))
            .await
            .unwrap();
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
