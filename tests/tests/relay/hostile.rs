//! The SDK against a hostile relay and hostile peers: what an attacker who can
//! post to any mailbox (the relay itself, or anyone who saw an id or a link
//! code) builds with the protocol crate, and what the SDK must refuse.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use haven_e2e::{random_id, random_key, send_request};
use haven_proto::v1::MailboxKind;
use haven_protocol::{IdentityKeyPair, KEM_PUBLIC_LEN, PrekeyBundle, PublicPrekey, Session, seal};
use tonic::Code;

use super::sdk::{open, register_supporter, relay_with_association};

/// What a device link code (`haven:device:2:`) shows, parsed as an attacker
/// who saw it would.
struct LinkCode {
    bundle: PrekeyBundle,
    sync_sender_id: Vec<u8>,
    secret: [u8; 32],
}

fn parse_link_code(code: &str) -> LinkCode {
    let bytes = URL_SAFE_NO_PAD
        .decode(code.strip_prefix(haven_sdk::LINK_CODE_PREFIX).unwrap())
        .unwrap();
    let mut at = 0;
    let mut take = |len: usize| {
        let part = bytes[at..at + len].to_vec();
        at += len;
        part
    };
    let identity = take(128);
    let _intake = take(16);
    let sync_sender_id = take(16);
    let _sender_key = take(32);
    let secret: [u8; 32] = take(32).try_into().unwrap();
    let number = |b: Vec<u8>| u32::from_be_bytes(b.try_into().unwrap());
    let signed = PublicPrekey {
        id: number(take(4)),
        one_time: false,
        public_key: take(32),
        signature: take(64).try_into().unwrap(),
    };
    let kem = PublicPrekey {
        id: number(take(4)),
        one_time: false,
        public_key: take(KEM_PUBLIC_LEN),
        signature: take(64).try_into().unwrap(),
    };
    LinkCode {
        bundle: PrekeyBundle::from_parts(&identity, &signed, None, &kem).unwrap(),
        sync_sender_id,
        secret,
    }
}

/// A `SyncHello` app message as the SDK encodes it (version 1, kind 5): the
/// mailbox to send sync copies to, the sender key to secure with, the link
/// secret and the supporter key.
fn sync_hello(
    reply_to: &[u8],
    sender_key: [u8; 32],
    secret: [u8; 32],
    supporter: [u8; 32],
) -> Vec<u8> {
    [&[1u8, 5][..], reply_to, &sender_key, &secret, &supporter].concat()
}

/// An initial message under the attacker's own identity, sealed to the device
/// of `code`: a genuine handshake, as the relay could build from what it stores.
fn rogue_initial(attacker: &IdentityKeyPair, code: &LinkCode, plaintext: &[u8]) -> Vec<u8> {
    let mut session = Session::initiate(attacker, &code.bundle, &mut rand::rng()).unwrap();
    let encrypted = session.encrypt(plaintext).unwrap();
    seal(
        attacker,
        code.bundle.identity(),
        &encrypted,
        &mut rand::rng(),
    )
    .unwrap()
}

#[tokio::test]
async fn a_rogue_sibling_is_refused_and_receives_nothing_of_later_replies() {
    let (relay, association) = relay_with_association().await;
    let dirs = tempfile::tempdir().unwrap();
    let phone = open(&relay, &association, &dirs.path().join("phone"), 1).unwrap();
    let supporter_key = register_supporter(relay.address, &association, &phone, 5).await;
    let laptop = open(&relay, &association, &dirs.path().join("laptop"), 2).unwrap();
    let code_text = laptop.device_link_code().await.unwrap();
    let code = parse_link_code(&code_text);

    // The attacker saw the code (or is the relay, which knows the mailbox and
    // the keys anyway) and has a mailbox of its own to receive sync copies on.
    let attacker = IdentityKeyPair::generate(&mut rand::rng());
    let wire = relay.client().await.unwrap();
    let inbox = wire.create(MailboxKind::Private).await.unwrap();
    let attacker_sender = random_key().verifying_key().to_bytes();
    let self_made_supporter = random_key().verifying_key().to_bytes();
    let mut wrong_secret = code.secret;
    wrong_secret[0] ^= 1;
    for (secret, supporter) in [
        // The right secret, the real supporter: but the attacker is not in its device list.
        (code.secret, supporter_key),
        // The right secret under a supporter key of its own: no association entry.
        (code.secret, self_made_supporter),
        // A guessed secret.
        (wrong_secret, supporter_key),
    ] {
        let hello = sync_hello(&inbox.sender_id, attacker_sender, secret, supporter);
        let sealed = rogue_initial(&attacker, &code, &hello);
        wire.send(send_request(&code.sync_sender_id, &random_id(), &sealed))
            .await
            .unwrap();
    }
    // The phone approves only now, so the rogue hellos come first.
    phone.approve_device(&code_text).await.unwrap();
    let events = laptop.sync_once().await.unwrap();
    let reasons: Vec<&str> = events
        .iter()
        .map(|event| match event {
            haven_sdk::Event::EnvelopeRefused {
                conversation: None,
                reason,
            } => reason.as_str(),
            other => panic!("expected each rogue hello refused, got {other:?}"),
        })
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons[0].contains("not this supporter's"), "{reasons:?}");
    assert!(
        reasons[1].contains("refused what the other side sent"),
        "{reasons:?}"
    );
    assert!(reasons[2].contains("not this supporter's"), "{reasons:?}");
    assert_eq!(laptop.linked_supporter_key().unwrap(), Some(supporter_key));

    // Once linked, the laptop's sync mailbox takes posts from the phone only.
    let late = rogue_initial(
        &attacker,
        &code,
        &sync_hello(
            &inbox.sender_id,
            attacker_sender,
            code.secret,
            supporter_key,
        ),
    );
    let refused = wire
        .send(send_request(&code.sync_sender_id, &random_id(), &late))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // A conversation: the laptop replies, sets a retention and ends it; the phone
    // sees each as from its other device, the attacker gets nothing at all.
    let seeker = open(&relay, &association, &dirs.path().join("seeker"), 3).unwrap();
    let kari = seeker.supporter(&supporter_key).await.unwrap();
    assert_eq!(kari.devices.len(), 2);
    seeker
        .start_conversation(&kari, "Is anyone there?")
        .await
        .unwrap();
    phone.sync_once().await.unwrap();
    let events = laptop.sync_once().await.unwrap();
    let Some(haven_sdk::Event::ConversationStarted { conversation, .. }) = events.first() else {
        panic!("expected the first contact on the laptop, got {events:?}");
    };
    laptop.send(conversation, "I am here.").await.unwrap();
    laptop.set_retention(conversation, 3600).await.unwrap();
    let events = phone.sync_once().await.unwrap();
    assert!(
        events
            .iter()
            .any(|event| matches!(event, haven_sdk::Event::SentFromOtherDevice { text, .. } if text == "I am here.")),
        "{events:?}"
    );
    laptop.end_conversation(conversation).await.unwrap();
    assert!(
        wire.stored(&inbox).await.is_empty(),
        "the attacker received sync traffic"
    );
}
