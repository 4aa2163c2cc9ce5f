//! The SDK against a real relay: sealed on-device state, supporter identity and
//! device registration, capacity, and a verified directory seen by a help-seeker.

use ed25519_dalek::SigningKey;
use haven_e2e::{InProcessRelay, random_key, test_config};
use haven_proto::directory::{DirectoryError, DocumentKind, sign as sign_document, supporter_link};
use haven_proto::v1 as proto;
use haven_sdk::{Client, Config, DirectoryFilter, Error, RelayRefusal};
use prost::Message as _;

const DAY: u64 = 24 * 3600;

pub(super) fn now() -> u64 {
    haven_e2e::now_ms() / 1000
}

pub(super) fn open(
    relay: &InProcessRelay,
    association: &SigningKey,
    dir: &std::path::Path,
    storage_key: u8,
) -> Result<Client, Error> {
    open_at(relay.address, association, dir, storage_key)
}

/// A client of whatever listens at `address` (a relay, or a proxy in front of one).
pub(super) fn open_at(
    address: std::net::SocketAddr,
    association: &SigningKey,
    dir: &std::path::Path,
    storage_key: u8,
) -> Result<Client, Error> {
    Client::open(Config {
        relay_url: format!("http://{address}"),
        ca_certificate: None,
        association_key: association.verifying_key().to_bytes(),
        data_dir: dir.to_path_buf(),
        storage_key: zeroize::Zeroizing::new([storage_key; 32]),
        proxy: None,
    })
}

pub(super) fn entry_document(
    association: &SigningKey,
    supporter: [u8; 32],
    county: &str,
    valid_until: u64,
) -> proto::SignedDocument {
    let entry = proto::SupporterEntry {
        supporter_key: supporter.to_vec(),
        display_name: "Kari Nordmann".into(),
        specialty: "general practice".into(),
        county: county.into(),
        town: "Bergen".into(),
        languages: vec!["nb".into(), "en".into()],
        valid_until,
    };
    sign_document(
        DocumentKind::SupporterEntry,
        entry.encode_to_vec(),
        association,
    )
}

#[tokio::test]
async fn a_supporter_registers_a_device_and_a_help_seeker_finds_them_verified() {
    let (relay, association) = relay_with_association().await;
    let channel = haven_e2e::connect(relay.address).await.unwrap();
    let mut directory = proto::directory_client::DirectoryClient::new(channel);

    // The supporter's device creates the supporter identity; the association signs it.
    let supporter_dir = tempfile::tempdir().unwrap();
    let supporter = open(&relay, &association, supporter_dir.path(), 1).unwrap();
    assert!(matches!(
        supporter.register_supporter_device().await,
        Err(Error::NoSupporterIdentity)
    ));
    let supporter_key = supporter.create_supporter_identity().unwrap();
    assert_eq!(
        supporter.create_supporter_identity().unwrap(),
        supporter_key,
        "created once"
    );
    let entry = entry_document(&association, supporter_key, "Vestland", now() + 365 * DAY);
    // Registering before the association's entry is published is refused clearly.
    let early = supporter.register_supporter_device().await.unwrap_err();
    assert!(
        matches!(
            early,
            Error::Relay {
                kind: RelayRefusal::NotFound,
                ..
            }
        ),
        "{early}"
    );
    directory
        .publish_entry(proto::PublishDocumentRequest {
            document: Some(entry.clone()),
        })
        .await
        .unwrap();
    supporter.register_supporter_device().await.unwrap();
    supporter.register_supporter_device().await.unwrap(); // idempotent: a new list version
    supporter.set_capacity(2).await.unwrap();
    assert_eq!(
        supporter.replenish_prekeys().await.unwrap(),
        haven_sdk::PREKEY_BATCH as u32
    );

    // A help-seeker sees the supporter, verified, with the one device.
    let seeker_dir = tempfile::tempdir().unwrap();
    let seeker = open(&relay, &association, seeker_dir.path(), 2).unwrap();
    let filter = DirectoryFilter {
        county: Some("vestland".into()),
        taking_new_conversations_only: true,
        ..DirectoryFilter::default()
    };
    let found = seeker.list_supporters(&filter).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].key(), supporter_key);
    assert_eq!(found[0].display_name(), "Kari Nordmann");
    assert!(found[0].taking_new_conversations());
    assert_eq!(
        found[0].devices().len(),
        1,
        "re-registering replaced, not duplicated, the device"
    );
    let elsewhere = DirectoryFilter {
        county: Some("Oslo".into()),
        ..DirectoryFilter::default()
    };
    assert!(seeker.list_supporters(&elsewhere).await.unwrap().is_empty());
    assert_eq!(seeker.supporter(&supporter_key).await.unwrap(), found[0]);

    // A shared link opens offline, verified; links the association did not sign,
    // or that expired, are refused with distinct errors.
    let from_link = seeker.supporter_from_link(&supporter_link(&entry)).unwrap();
    assert_eq!(from_link.key(), supporter_key);
    let forged = entry_document(&random_key(), supporter_key, "Vestland", now() + DAY);
    assert!(matches!(
        seeker.supporter_from_link(&supporter_link(&forged)),
        Err(Error::Directory(DirectoryError::BadSignature))
    ));
    let expired = entry_document(&association, supporter_key, "Vestland", now() - 1);
    assert!(matches!(
        seeker.supporter_from_link(&supporter_link(&expired)),
        Err(Error::Directory(DirectoryError::Expired { .. }))
    ));
    assert!(matches!(
        seeker.supporter_from_link("https://example.org"),
        Err(Error::Directory(DirectoryError::BadLink))
    ));

    // Revoked: gone from the directory for the help-seeker too.
    let revocation = proto::Revocation {
        supporter_key: supporter_key.to_vec(),
        revoked_at: now(),
    };
    let revocation = sign_document(
        DocumentKind::Revocation,
        revocation.encode_to_vec(),
        &association,
    );
    directory
        .publish_revocation(proto::PublishDocumentRequest {
            document: Some(revocation),
        })
        .await
        .unwrap();
    assert!(
        seeker
            .list_supporters(&DirectoryFilter::default())
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        seeker.supporter(&supporter_key).await,
        Err(Error::Relay {
            kind: RelayRefusal::NotFound,
            ..
        })
    ));

    // On-device state survives a restart, and opens only with its storage key.
    drop(supporter);
    assert!(matches!(
        open(&relay, &association, supporter_dir.path(), 9),
        Err(Error::WrongStorageKey)
    ));
    let reopened = open(&relay, &association, supporter_dir.path(), 1).unwrap();
    assert_eq!(reopened.supporter_key().unwrap(), Some(supporter_key));
}

#[tokio::test]
async fn plaintext_to_a_remote_relay_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let refused = Client::open(Config {
        relay_url: "http://relay.example.org:50051".into(),
        ca_certificate: None,
        association_key: [1; 32],
        data_dir: dir.path().to_path_buf(),
        storage_key: zeroize::Zeroizing::new([1; 32]),
        proxy: None,
    });
    assert!(matches!(refused, Err(Error::InsecureRelay)));
}

#[tokio::test]
async fn a_help_seeker_and_a_supporter_talk_anonymously_through_the_relay() {
    let (relay, association) = relay_with_association().await;

    let supporter_dir = tempfile::tempdir().unwrap();
    let supporter = open(&relay, &association, supporter_dir.path(), 1).unwrap();
    let supporter_key = register_supporter(relay.address, &association, &supporter, 2).await;

    // The help-seeker picks the supporter and writes first, anonymously.
    let seeker_dir = tempfile::tempdir().unwrap();
    let seeker = open(&relay, &association, seeker_dir.path(), 2).unwrap();
    let kari = seeker.supporter(&supporter_key).await.unwrap();
    let conversation = seeker
        .start_conversation(&kari, "I'm a GP and I can't sleep. Can we talk?")
        .await
        .unwrap();

    let events = supporter.sync_once().await.unwrap();
    let [
        haven_sdk::Event::ConversationStarted {
            conversation: theirs,
            text,
        },
        haven_sdk::Event::SafetyNumber {
            conversation: numbered,
            number: supporter_number,
        },
    ] = events.as_slice()
    else {
        panic!("expected one new conversation and its safety number, got {events:?}");
    };
    assert_eq!(text, "I'm a GP and I can't sleep. Can we talk?");
    assert_eq!(numbered, theirs);
    assert!(
        supporter.sync_once().await.unwrap().is_empty(),
        "acknowledged envelopes do not come back"
    );

    supporter
        .send(theirs, "Of course. I'm here.")
        .await
        .unwrap();
    let events = seeker.sync_once().await.unwrap();
    let [
        haven_sdk::Event::MessageReceived { text, .. },
        haven_sdk::Event::SafetyNumber {
            conversation: numbered,
            number: seeker_number,
        },
    ] = events.as_slice()
    else {
        panic!("expected the answer and the safety number, got {events:?}");
    };
    assert_eq!(text, "Of course. I'm here.");
    assert_eq!(*numbered, conversation);
    // Both sides are shown the same number, and it is the one the API returns.
    assert_eq!(seeker_number, supporter_number);
    assert_eq!(
        seeker.safety_numbers(&conversation).unwrap(),
        std::slice::from_ref(seeker_number)
    );
    assert_eq!(
        supporter.safety_numbers(theirs).unwrap(),
        std::slice::from_ref(supporter_number)
    );
    assert_eq!(seeker_number.split(' ').count(), 12);

    // After the supporter's answer the help-seeker writes to the private,
    // secured conversation mailbox, and both sides survive a restart.
    drop(seeker);
    let seeker = open(&relay, &association, seeker_dir.path(), 2).unwrap();
    seeker.send(&conversation, "Thank you.").await.unwrap();
    drop(supporter);
    let supporter = open(&relay, &association, supporter_dir.path(), 1).unwrap();
    let events = supporter.sync_once().await.unwrap();
    assert!(
        matches!(events.as_slice(), [haven_sdk::Event::MessageReceived { text, .. }] if text == "Thank you.")
    );
    supporter
        .send(theirs, "Tell me about your week.")
        .await
        .unwrap();
    let events = seeker.sync_once().await.unwrap();
    assert!(
        matches!(events.as_slice(), [haven_sdk::Event::MessageReceived { text, .. }] if text == "Tell me about your week.")
    );

    // Both devices keep the history, for the conversation's retention only.
    let authors = |client: &Client, id| {
        client
            .history(id)
            .unwrap()
            .into_iter()
            .map(|e| (e.author, e.text))
            .collect::<Vec<_>>()
    };
    use haven_sdk::Author::{Me, Them};
    assert_eq!(
        authors(&seeker, &conversation),
        [
            (Me, "I'm a GP and I can't sleep. Can we talk?".to_owned()),
            (Them, "Of course. I'm here.".to_owned()),
            (Me, "Thank you.".to_owned()),
            (Them, "Tell me about your week.".to_owned()),
        ]
    );
    assert_eq!(authors(&supporter, theirs).len(), 4);

    // The retention is the conversation's: the supporter sets it and it applies
    // on both sides, except that the help-seeker may keep their own transcript.
    // A disk image of the supporter's device taken before it holds the history.
    let image = tempfile::tempdir().unwrap();
    copy_dir(supporter_dir.path(), image.path());
    assert!(matches!(
        supporter.keep_transcript(theirs, true),
        Err(Error::OnlyHelpSeeker)
    ));
    seeker.keep_transcript(&conversation, true).unwrap();
    supporter.set_retention(theirs, 1).await.unwrap();
    let events = seeker.sync_once().await.unwrap();
    assert!(
        matches!(events.as_slice(), [haven_sdk::Event::RetentionChanged { conversation: c, seconds: 1 }] if *c == conversation),
        "{events:?}"
    );
    assert_eq!(
        seeker.retention(&conversation).unwrap(),
        haven_sdk::Retention {
            seconds: 1,
            keep_transcript: true
        }
    );
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    assert!(
        supporter.history(theirs).unwrap().is_empty(),
        "history past its retention is deleted"
    );
    assert_eq!(
        authors(&seeker, &conversation).len(),
        4,
        "the help-seeker keeps their transcript"
    );
    seeker.keep_transcript(&conversation, false).unwrap();
    assert!(
        seeker.history(&conversation).unwrap().is_empty(),
        "and lets it go when they stop keeping it"
    );
    // Expired history is shredded: the old image, with the key file as it is
    // now, opens none of it (with its own old key file it still does).
    {
        let old = open(&relay, &association, image.path(), 1).unwrap();
        assert_eq!(
            authors(&old, theirs).len(),
            4,
            "the image holds the history"
        );
    }
    // With the key file as it is now, the image is older state than the key
    // file's: the SDK refuses it as rolled back (review 2026-12-crypto #11), so
    // nothing of it is used, and its expired stretches' keys are gone anyway.
    std::fs::copy(supporter_dir.path().join("keys"), image.path().join("keys")).unwrap();
    assert!(
        matches!(
            open(&relay, &association, image.path(), 1),
            Err(Error::RolledBack)
        ),
        "an old image under the current key file is refused"
    );

    // Capacity: one more conversation fits, the third is refused clearly.
    let other_dir = tempfile::tempdir().unwrap();
    let other = open(&relay, &association, other_dir.path(), 3).unwrap();
    other.start_conversation(&kari, "Hello").await.unwrap();
    let refused = other
        .start_conversation(&kari, "Hello again")
        .await
        .unwrap_err();
    assert!(
        matches!(refused, Error::NotTakingConversations),
        "{refused}"
    );
}

/// The metrics of a relay process, as text.
fn metrics(relay: &haven_e2e::RelayProcess) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(relay.metrics).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

fn all_files(dir: &std::path::Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        for entry in std::fs::read_dir(&path).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(std::fs::read(&path).unwrap_or_default());
            }
        }
    }
    out
}

fn occurrences(files: &[Vec<u8>], needle: &[u8]) -> usize {
    files
        .iter()
        .map(|bytes| bytes.windows(needle.len()).filter(|w| *w == needle).count())
        .sum()
}

/// A copy of the directory tree `from` in `to`: a disk image of a device.
pub(super) fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// How many files under `dir` hold `needle` somewhere.
fn files_containing(dir: &std::path::Path, needle: &[u8]) -> usize {
    all_files(dir)
        .iter()
        .filter(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
        .count()
}

#[tokio::test]
async fn ending_a_conversation_leaves_nothing_on_either_device_or_the_relay() {
    let association = random_key();
    let work = tempfile::tempdir().unwrap();
    let key_arg = hex::encode(association.verifying_key().to_bytes());
    let relay = haven_e2e::RelayProcess::start(
        env!("CARGO_BIN_EXE_haven-relay-e2e"),
        &work.path().join("relay"),
        &work.path().join("relay.log"),
        &["--association-key", &key_arg],
    )
    .await
    .unwrap();
    let sdk = |dir: &std::path::Path, storage_key: u8| {
        Client::open(Config {
            relay_url: format!("http://{}", relay.address),
            ca_certificate: None,
            association_key: association.verifying_key().to_bytes(),
            data_dir: dir.to_path_buf(),
            storage_key: zeroize::Zeroizing::new([storage_key; 32]),
            proxy: None,
        })
        .unwrap()
    };
    let supporter = sdk(&work.path().join("supporter"), 1);
    let supporter_key = register_supporter(relay.address, &association, &supporter, 1).await;
    let seeker = sdk(&work.path().join("seeker"), 2);
    let kari = seeker.supporter(&supporter_key).await.unwrap();

    let secret = "SECRET-MARKER I think I made a mistake with a patient";
    let conversation = seeker.start_conversation(&kari, secret).await.unwrap();
    let events = supporter.sync_once().await.unwrap();
    let [
        haven_sdk::Event::ConversationStarted {
            conversation: theirs,
            ..
        },
        haven_sdk::Event::SafetyNumber { .. },
    ] = events.as_slice()
    else {
        panic!("expected one new conversation, got {events:?}");
    };
    supporter
        .send(theirs, "REPLY-MARKER we can talk about it")
        .await
        .unwrap();
    seeker.sync_once().await.unwrap();
    assert!(
        metrics(&relay).contains("haven_stored_mailboxes 3"),
        "intake, conversation and reply mailboxes"
    );

    // Nothing readable of the conversation on the relay's disk, or on the devices'.
    for marker in ["SECRET-MARKER", "REPLY-MARKER"] {
        for place in ["relay", "supporter", "seeker"] {
            assert_eq!(
                files_containing(&work.path().join(place), marker.as_bytes()),
                0,
                "{marker} in {place}"
            );
        }
    }

    // The help-seeker's pseudonymous identity never reaches the relay's disk in
    // the clear, in whole or in part (signing key, agreement key).
    let relay_files = all_files(&work.path().join("relay"));
    let [help_seeker] = supporter.peer_identities(theirs).unwrap()[..] else {
        panic!("one peer")
    };
    for part in [&help_seeker[..], &help_seeker[..32], &help_seeker[32..64]] {
        assert_eq!(
            occurrences(&relay_files, part),
            0,
            "help-seeker identity on the relay"
        );
    }
    // The supporter device's identity is on the relay's disk only inside the
    // signed device list (as a DeviceEntry field: tag 0x0a, length 128), never
    // in the relay's own records; that the scan finds it there shows it can
    // find keys at all.
    let [supporter_device] = seeker.peer_identities(&conversation).unwrap()[..] else {
        panic!("one device")
    };
    let anywhere = occurrences(&relay_files, &supporter_device[..32]);
    let in_documents = occurrences(
        &relay_files,
        &[&[0x0a, 0x80, 0x01][..], &supporter_device[..]].concat(),
    );
    assert!(anywhere > 0, "the scan finds the device list");
    assert_eq!(
        anywhere, in_documents,
        "a device identity outside the signed device list"
    );

    // The help-seeker ends it: both devices delete it, both mailboxes go.
    assert_eq!(seeker.history(&conversation).unwrap().len(), 2);
    let image = tempfile::tempdir().unwrap();
    copy_dir(&work.path().join("seeker"), image.path());
    seeker.end_conversation(&conversation).await.unwrap();
    assert!(seeker.conversations().unwrap().is_empty());
    assert!(matches!(
        seeker.history(&conversation),
        Err(Error::UnknownConversation)
    ));
    assert!(matches!(
        seeker.send(&conversation, "still there?").await,
        Err(Error::UnknownConversation)
    ));
    let events = supporter.sync_once().await.unwrap();
    assert!(
        matches!(events.as_slice(), [haven_sdk::Event::ConversationEnded { conversation }] if conversation == theirs)
    );
    assert!(supporter.conversations().unwrap().is_empty());
    assert!(
        metrics(&relay).contains("haven_stored_mailboxes 1"),
        "only the supporter's intake mailbox is left"
    );

    // Its keys are destroyed: a disk image of the help-seeker's device taken
    // before the end, with the storage key and the key file as it is now,
    // opens nothing of it (with its own old key file it still does).
    {
        let old = sdk(image.path(), 2);
        assert_eq!(
            old.history(&conversation).unwrap().len(),
            2,
            "the image holds it"
        );
    }
    // With the key file as it is now the image is older state than the key
    // file's, and is refused whole (review 2026-12-crypto #11); the
    // conversation's own keys are gone from that key file as well.
    std::fs::copy(work.path().join("seeker/keys"), image.path().join("keys")).unwrap();
    assert!(matches!(
        Client::open(Config {
            relay_url: format!("http://{}", relay.address),
            ca_certificate: None,
            association_key: association.verifying_key().to_bytes(),
            data_dir: image.path().to_path_buf(),
            storage_key: zeroize::Zeroizing::new([2; 32]),
            proxy: None,
        }),
        Err(Error::RolledBack)
    ));
}

#[tokio::test]
async fn a_supporter_with_two_devices_sees_one_conversation_on_both() {
    let (relay, association) = relay_with_association().await;

    // The phone holds the supporter key; the laptop is linked by a code, no association needed.
    let phone_dir = tempfile::tempdir().unwrap();
    let phone = open(&relay, &association, phone_dir.path(), 1).unwrap();
    let supporter_key = register_supporter(relay.address, &association, &phone, 5).await;
    let laptop_dir = tempfile::tempdir().unwrap();
    let laptop = open(&relay, &association, laptop_dir.path(), 2).unwrap();
    let code = laptop.device_link_code(&supporter_key).await.unwrap();
    assert!(code.starts_with(haven_sdk::LINK_CODE_PREFIX));
    assert!(
        phone
            .approve_device("haven:device:1:garbage")
            .await
            .is_err()
    );
    phone.approve_device(&code).await.unwrap();
    assert!(
        laptop.sync_once().await.unwrap().is_empty(),
        "the sync session opens silently"
    );

    // The help-seeker sees two devices; the first message reaches both.
    let seeker_dir = tempfile::tempdir().unwrap();
    let seeker = open(&relay, &association, seeker_dir.path(), 3).unwrap();
    let kari = seeker.supporter(&supporter_key).await.unwrap();
    assert_eq!(kari.devices().len(), 2);
    let conversation = seeker
        .start_conversation(&kari, "Are you there?")
        .await
        .unwrap();
    let started = |events: Vec<haven_sdk::Event>| match events.as_slice() {
        [
            haven_sdk::Event::ConversationStarted { conversation, text },
            haven_sdk::Event::SafetyNumber {
                conversation: numbered,
                ..
            },
        ] if text == "Are you there?" && numbered == conversation => *conversation,
        other => panic!("expected the first message, got {other:?}"),
    };
    let on_phone = started(phone.sync_once().await.unwrap());
    let on_laptop = started(laptop.sync_once().await.unwrap());

    // A reply from the phone reaches the help-seeker and shows on the laptop...
    phone.send(&on_phone, "Yes, from my phone.").await.unwrap();
    let events = seeker.sync_once().await.unwrap();
    let [
        haven_sdk::Event::MessageReceived { text, .. },
        haven_sdk::Event::SafetyNumber {
            number: phone_number,
            ..
        },
    ] = events.as_slice()
    else {
        panic!("expected the phone's answer and its safety number, got {events:?}");
    };
    assert_eq!(text, "Yes, from my phone.");
    let phone_number = phone_number.clone();
    let events = laptop.sync_once().await.unwrap();
    assert!(
        matches!(events.as_slice(), [haven_sdk::Event::SentFromOtherDevice { conversation, text }]
        if *conversation == on_laptop && text == "Yes, from my phone."),
        "{events:?}"
    );

    // ...and one from the laptop on the phone; the help-seeker's next message reaches both.
    laptop
        .send(&on_laptop, "And from my laptop.")
        .await
        .unwrap();
    let events = phone.sync_once().await.unwrap();
    assert!(
        matches!(events.as_slice(), [haven_sdk::Event::SentFromOtherDevice { conversation, text }]
        if *conversation == on_phone && text == "And from my laptop."),
        "{events:?}"
    );
    let events = seeker.sync_once().await.unwrap();
    let [
        haven_sdk::Event::MessageReceived { text, .. },
        haven_sdk::Event::SafetyNumber {
            number: laptop_number,
            ..
        },
    ] = events.as_slice()
    else {
        panic!("expected the laptop's answer and its safety number, got {events:?}");
    };
    assert_eq!(text, "And from my laptop.");
    // Each device's safety number matches the help-seeker's for that device.
    let seeker_numbers = seeker.safety_numbers(&conversation).unwrap();
    assert_eq!(seeker_numbers.len(), 2);
    for (device, id, announced) in [
        (&phone, &on_phone, &phone_number),
        (&laptop, &on_laptop, laptop_number),
    ] {
        let numbers = device.safety_numbers(id).unwrap();
        assert_eq!(numbers.len(), 1);
        assert!(seeker_numbers.contains(&numbers[0]));
        assert_eq!(
            &numbers[0], announced,
            "the event shows the device's number"
        );
    }
    assert_ne!(seeker_numbers[0], seeker_numbers[1]);
    seeker.send(&conversation, "Thank you both.").await.unwrap();
    for device in [&phone, &laptop] {
        let events = device.sync_once().await.unwrap();
        assert!(
            matches!(events.as_slice(), [haven_sdk::Event::MessageReceived { text, .. }] if text == "Thank you both."),
            "{events:?}"
        );
    }

    // Ending it on the phone ends it everywhere: the help-seeker and the laptop.
    phone.end_conversation(&on_phone).await.unwrap();
    let events = seeker.sync_once().await.unwrap();
    assert!(
        matches!(
            events.as_slice(),
            [haven_sdk::Event::ConversationEnded { .. }]
        ),
        "{events:?}"
    );
    let events = laptop.sync_once().await.unwrap();
    assert!(
        matches!(events.as_slice(), [haven_sdk::Event::ConversationEnded { conversation }] if *conversation == on_laptop),
        "{events:?}"
    );
    for client in [&phone, &laptop, &seeker] {
        assert!(client.conversations().unwrap().is_empty());
    }
}

async fn next_event(stream: &mut haven_sdk::EventStream) -> haven_sdk::Event {
    tokio::time::timeout(haven_e2e::WAIT, stream.next())
        .await
        .expect("an event in time")
        .expect("the stream is open")
        .expect("no error")
}

#[tokio::test]
async fn the_event_stream_delivers_without_polling() {
    let (relay, association) = relay_with_association().await;
    let supporter_dir = tempfile::tempdir().unwrap();
    let supporter =
        std::sync::Arc::new(open(&relay, &association, supporter_dir.path(), 1).unwrap());
    let supporter_key = register_supporter(relay.address, &association, &supporter, 1).await;
    let mut events = supporter.events();

    let seeker_dir = tempfile::tempdir().unwrap();
    let seeker = std::sync::Arc::new(open(&relay, &association, seeker_dir.path(), 2).unwrap());
    let kari = seeker.supporter(&supporter_key).await.unwrap();
    let conversation = seeker
        .start_conversation(&kari, "Anyone there?")
        .await
        .unwrap();
    let haven_sdk::Event::ConversationStarted {
        conversation: theirs,
        text,
    } = next_event(&mut events).await
    else {
        panic!("expected the first contact");
    };
    assert_eq!(text, "Anyone there?");
    assert!(matches!(
        next_event(&mut events).await,
        haven_sdk::Event::SafetyNumber { conversation, .. } if conversation == theirs
    ));

    // The help-seeker watches too; replies and answers flow both ways live,
    // while the app sends concurrently with the stream's syncs.
    let mut seeker_events = seeker.events();
    supporter.send(&theirs, "Yes.").await.unwrap();
    assert!(
        matches!(next_event(&mut seeker_events).await, haven_sdk::Event::MessageReceived { text, .. } if text == "Yes.")
    );
    for n in 0..3 {
        seeker
            .send(&conversation, &format!("message {n}"))
            .await
            .unwrap();
    }
    for n in 0..3 {
        let event = next_event(&mut events).await;
        assert!(
            matches!(event, haven_sdk::Event::MessageReceived { ref text, .. } if *text == format!("message {n}")),
            "{event:?}"
        );
    }
    assert_eq!(seeker.history(&conversation).unwrap().len(), 5);
}

#[tokio::test]
async fn a_supporter_device_tops_up_its_prekeys_after_new_conversations() {
    let (relay, association) = relay_with_association().await;
    let supporter_dir = tempfile::tempdir().unwrap();
    let supporter = open(&relay, &association, supporter_dir.path(), 1).unwrap();
    let batch = haven_sdk::PREKEY_BATCH as u32;
    let supporter_key = register_supporter(relay.address, &association, &supporter, batch).await;
    // More than half a batch of help-seekers use up one-time prekeys...
    let contacts = batch / 2 + 1;
    let seeker_dir = tempfile::tempdir().unwrap();
    let seeker = open(&relay, &association, seeker_dir.path(), 2).unwrap();
    let kari = seeker.supporter(&supporter_key).await.unwrap();
    for n in 0..contacts {
        seeker
            .start_conversation(&kari, &format!("hello {n}"))
            .await
            .unwrap();
    }
    // ...and the supporter's next sync publishes a new batch by itself.
    let started = supporter
        .sync_once()
        .await
        .unwrap()
        .into_iter()
        .filter(|event| matches!(event, haven_sdk::Event::ConversationStarted { .. }))
        .count();
    assert_eq!(started, contacts as usize);
    assert_eq!(
        supporter.replenish_prekeys().await.unwrap(),
        batch - contacts + batch
    );
}

/// An in-process relay that trusts a fresh association key.
pub(super) async fn relay_with_association() -> (InProcessRelay, SigningKey) {
    let association = random_key();
    let mut config = test_config();
    config.association_key = Some(hex::encode(association.verifying_key().to_bytes()));
    // Push receivers in tests are plain HTTP on loopback.
    config.push.allow_local_endpoints = true;
    (InProcessRelay::start(config).await.unwrap(), association)
}

/// Makes `supporter` a supporter with an association-signed directory entry,
/// registers its device and sets its capacity; returns the supporter key.
pub(super) async fn register_supporter(
    relay: std::net::SocketAddr,
    association: &SigningKey,
    supporter: &Client,
    capacity: u32,
) -> [u8; 32] {
    let channel = haven_e2e::connect(relay).await.unwrap();
    let mut directory = proto::directory_client::DirectoryClient::new(channel);
    let supporter_key = supporter.create_supporter_identity().unwrap();
    let entry = entry_document(association, supporter_key, "Vestland", now() + 365 * DAY);
    directory
        .publish_entry(proto::PublishDocumentRequest {
            document: Some(entry),
        })
        .await
        .unwrap();
    supporter.register_supporter_device().await.unwrap();
    supporter.set_capacity(capacity).await.unwrap();
    supporter_key
}

/// A relay with a directory, a registered supporter device with capacity, and a help-seeker.
pub(super) async fn supporter_and_seeker(
    capacity: u32,
) -> (
    InProcessRelay,
    SigningKey,
    tempfile::TempDir,
    Client,
    Client,
    [u8; 32],
) {
    let (relay, association) = relay_with_association().await;
    let dirs = tempfile::tempdir().unwrap();
    let supporter = open(&relay, &association, &dirs.path().join("supporter"), 1).unwrap();
    let supporter_key = register_supporter(relay.address, &association, &supporter, capacity).await;
    let seeker = open(&relay, &association, &dirs.path().join("seeker"), 2).unwrap();
    (relay, association, dirs, supporter, seeker, supporter_key)
}

/// Regression: a second message before the supporter's first answer repeats the
/// handshake on the intake mailbox, and was dropped as a replay.
#[tokio::test]
async fn a_help_seeker_may_write_again_before_the_first_answer() {
    let (_relay, _association, _dirs, supporter, seeker, supporter_key) =
        supporter_and_seeker(1).await;
    let kari = seeker.supporter(&supporter_key).await.unwrap();
    let conversation = seeker.start_conversation(&kari, "Hello?").await.unwrap();
    seeker
        .send(&conversation, "Sorry, it is urgent.")
        .await
        .unwrap();
    let events = supporter.sync_once().await.unwrap();
    let texts: Vec<_> = events
        .iter()
        .filter_map(|event| match event {
            haven_sdk::Event::ConversationStarted { text, .. }
            | haven_sdk::Event::MessageReceived { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(texts, ["Hello?", "Sorry, it is urgent."]);
}

#[tokio::test]
async fn bundles_for_devices_the_help_seeker_was_not_shown_are_refused() {
    let (relay, association, dirs, supporter, seeker, supporter_key) =
        supporter_and_seeker(5).await;
    // The help-seeker looked at the directory while the supporter had one device...
    let kari = seeker.supporter(&supporter_key).await.unwrap();
    // ...and the relay now hands out a bundle for a device not in that list.
    let laptop = open(&relay, &association, &dirs.path().join("laptop"), 3).unwrap();
    supporter
        .approve_device(&laptop.device_link_code(&supporter_key).await.unwrap())
        .await
        .unwrap();
    // The laptop completes the link and, listed now, publishes its prekeys.
    laptop.sync_once().await.unwrap();
    let refused = seeker.start_conversation(&kari, "Hello").await.unwrap_err();
    assert!(matches!(refused, Error::BundleMismatch), "{refused}");
    // With the current, verified list it works.
    let kari = seeker.supporter(&supporter_key).await.unwrap();
    seeker.start_conversation(&kari, "Hello").await.unwrap();
}

#[tokio::test]
async fn push_wakes_both_sides_for_every_mailbox_and_sync_once_brings_the_message() {
    let (_relay, _association, _dirs, supporter, seeker, supporter_key) =
        supporter_and_seeker(2).await;
    let supporter_phone = haven_e2e::PushReceiver::start().await.unwrap();
    let seeker_phone = haven_e2e::PushReceiver::start().await.unwrap();
    // The supporter registers before anyone writes: their intake mailbox wakes them.
    supporter
        .register_push(&supporter_phone.url, b"supporter-gateway-token")
        .await
        .unwrap();
    let kari = seeker.supporter(&supporter_key).await.unwrap();
    let conversation = seeker.start_conversation(&kari, "Hello?").await.unwrap();
    let wakes = supporter_phone.wait_for(1).await;
    assert_eq!(wakes.len(), 1, "the intake mailbox woke the supporter");
    assert!(String::from_utf8_lossy(&wakes[0].body).contains("c3VwcG9ydGVyLWdhdGV3YXktdG9rZW4"));
    let events = supporter.sync_once().await.unwrap();
    let Some(haven_sdk::Event::ConversationStarted {
        conversation: theirs,
        ..
    }) = events.first()
    else {
        panic!("expected the first contact, got {events:?}");
    };
    // A device-wide registration never covers a help-seeker's conversations
    // (it would let the relay link them): the answer wakes nobody...
    let shared = haven_e2e::PushReceiver::start().await.unwrap();
    seeker.register_push(&shared.url, b"shared").await.unwrap();
    supporter.send(theirs, "Are you there?").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        shared.requests().is_empty(),
        "a help-seeker conversation on a shared registration"
    );
    seeker.sync_once().await.unwrap();
    // ...until the conversation gets a registration of its own. The supporter's
    // conversation mailbox (created since) inherited the supporter's.
    seeker
        .register_conversation_push(&conversation, &seeker_phone.url, b"seeker-token")
        .await
        .unwrap();
    supporter.send(theirs, "I'm here.").await.unwrap();
    assert_eq!(
        seeker_phone.wait_for(1).await.len(),
        1,
        "the reply woke the help-seeker"
    );
    let events = seeker.sync_once().await.unwrap();
    assert!(
        matches!(events.first(), Some(haven_sdk::Event::MessageReceived { text, .. }) if text == "I'm here.")
    );
    seeker.send(&conversation, "Thank you.").await.unwrap();
    assert_eq!(
        supporter_phone.wait_for(2).await.len(),
        2,
        "the new conversation mailbox woke the supporter"
    );
    // Unregistered: no more wake-ups (the next arrival is past any coalescing:
    // the mailbox was read by the sync).
    supporter.sync_once().await.unwrap();
    supporter.unregister_push().await.unwrap();
    seeker.send(&conversation, "Still there?").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        supporter_phone.requests().len(),
        2,
        "woken after unregistering"
    );
    assert!(matches!(
        seeker.register_push("", b"x").await,
        Err(Error::InvalidArgument(_))
    ));
}

/// Claims `claims` bundles for a supporter with `capacity` and never writes
/// (the attacker); a help-seeker is then refused as "not taking new
/// conversations", and reaches the supporter once the supporter's app has
/// started again and synced (its refresh, as every `CAPACITY_REFRESH_SECONDS`).
async fn claims_nobody_follows_up_are_undone_by_the_refresh(capacity: u32, claims: usize) {
    let (relay, association, dirs, supporter, seeker, supporter_key) =
        supporter_and_seeker(capacity).await;
    let mut keys =
        proto::keys_client::KeysClient::new(haven_e2e::connect(relay.address).await.unwrap());
    for _ in 0..claims {
        keys.claim_bundles(super::directory::claim_for(&supporter_key, 8))
            .await
            .unwrap();
    }
    let kari = seeker.supporter(&supporter_key).await.unwrap();
    let refused = seeker.start_conversation(&kari, "Hello").await.unwrap_err();
    assert!(
        matches!(refused, Error::NotTakingConversations),
        "{refused}"
    );
    drop(supporter);
    let supporter = open(&relay, &association, &dirs.path().join("supporter"), 1).unwrap();
    supporter.sync_once().await.unwrap();
    seeker.start_conversation(&kari, "Hello").await.unwrap();
    let events = supporter.sync_once().await.unwrap();
    assert!(
        matches!(
            events.as_slice(),
            [haven_sdk::Event::ConversationStarted { .. }, ..]
        ),
        "{events:?}"
    );
    assert_eq!(haven_sdk::CAPACITY_REFRESH_SECONDS, 300);
}

/// Review F7: a claim takes a unit of the supporter's capacity on the relay,
/// and one nobody follows with a first contact gave nothing back, so whoever
/// claimed as many bundles as there was room kept the supporter "not taking
/// new conversations" for good (the device told the relay its room only after
/// a conversation started or ended, which then could not happen). The device
/// holding the supporter key tells the relay its room again on its first sync
/// after opening and every `CAPACITY_REFRESH_SECONDS`.
#[tokio::test]
async fn claims_nobody_follows_up_are_given_back_by_the_supporters_next_refresh() {
    claims_nobody_follows_up_are_undone_by_the_refresh(2, 2).await;
}

/// Review F7, one-time prekeys: claims nobody follows up take one-time
/// prekeys too, and a help-seeker's SDK refuses a bundle without one, so no
/// first contact arrived to make the device top them up: the supporter was
/// "not taking new conversations" until someone noticed. The refresh that
/// gives back capacity tops them up as well.
#[tokio::test]
async fn one_time_prekeys_claims_took_are_topped_up_by_the_supporters_next_refresh() {
    // Every one-time prekey, and one more claim (bounded: one batch and one).
    claims_nobody_follows_up_are_undone_by_the_refresh(100, haven_sdk::PREKEY_BATCH + 1).await;
}
