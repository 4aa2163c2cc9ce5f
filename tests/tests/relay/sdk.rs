//! The SDK against a real relay: sealed on-device state, supporter identity and
//! device registration, capacity, and a verified directory seen by a help-seeker.

use ed25519_dalek::SigningKey;
use haven_e2e::{InProcessRelay, random_key, test_config};
use haven_proto::directory::{DirectoryError, DocumentKind, sign as sign_document, supporter_link};
use haven_proto::v1 as proto;
use haven_sdk::{Client, Config, DirectoryFilter, Error, RelayRefusal};
use prost::Message as _;

const DAY: u64 = 24 * 3600;

fn now() -> u64 {
    haven_e2e::now_ms() / 1000
}

fn open(
    relay: &InProcessRelay,
    association: &SigningKey,
    dir: &std::path::Path,
    storage_key: u8,
) -> Result<Client, Error> {
    Client::open(Config {
        relay_url: format!("http://{}", relay.address),
        ca_certificate: None,
        association_key: association.verifying_key().to_bytes(),
        data_dir: dir.to_path_buf(),
        storage_key: zeroize::Zeroizing::new([storage_key; 32]),
    })
}

fn entry_document(
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
    let association = random_key();
    let mut config = test_config();
    config.association_key = Some(hex::encode(association.verifying_key().to_bytes()));
    let relay = InProcessRelay::start(config).await.unwrap();
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
    assert_eq!(found[0].key, supporter_key);
    assert_eq!(found[0].display_name, "Kari Nordmann");
    assert!(found[0].taking_new_conversations);
    assert_eq!(
        found[0].devices.len(),
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
    assert_eq!(from_link.key, supporter_key);
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
    });
    assert!(matches!(refused, Err(Error::InsecureRelay)));
}
