//! The directory and prekeys on a real relay: publishing and verifying signed
//! documents, capacity, anonymous PoW-stamped claims, and a handshake with a
//! real device built from a claimed bundle.

use ed25519_dalek::SigningKey;
use haven_e2e::{InProcessRelay, TestClient, random_key, sign, test_config};
use haven_proto::auth::Method;
use haven_proto::directory::{DocumentKind, sign as sign_document};
use haven_proto::v1::{self as proto, MailboxKind};
use haven_protocol::{Device, IdentityKeyPair, PrekeyBundle, PublicPrekey, Session};
use prost::Message as _;
use tonic::Code;

const DAY: u64 = 24 * 3600;

fn now() -> u64 {
    haven_e2e::now_ms() / 1000
}

/// A relay with an association key and clients for it (also used by `abuse`).
pub(super) struct Directory {
    pub(super) association: SigningKey,
    /// Keeps the relay running for the test.
    _relay: InProcessRelay,
    pub(super) client: TestClient,
    pub(super) keys: proto::keys_client::KeysClient<tonic::transport::Channel>,
    pub(super) directory: proto::directory_client::DirectoryClient<tonic::transport::Channel>,
}

impl Directory {
    /// The relay's address, for another connection.
    pub(super) fn address(&self) -> std::net::SocketAddr {
        self._relay.address
    }
}

async fn directory() -> Directory {
    directory_with(test_config()).await
}

/// [`directory`] with `config` (its association key is replaced).
pub(super) async fn directory_with(mut config: haven_server::Config) -> Directory {
    let association = random_key();
    config.association_key = Some(hex::encode(association.verifying_key().to_bytes()));
    let relay = InProcessRelay::start(config).await.unwrap();
    let channel = haven_e2e::connect(relay.address).await.unwrap();
    Directory {
        association,
        client: TestClient::new(channel.clone()),
        keys: proto::keys_client::KeysClient::new(channel.clone()),
        directory: proto::directory_client::DirectoryClient::new(channel),
        _relay: relay,
    }
}

pub(super) fn entry(
    supporter: &SigningKey,
    name: &str,
    specialty: &str,
    county: &str,
    languages: &[&str],
) -> proto::SupporterEntry {
    proto::SupporterEntry {
        supporter_key: supporter.verifying_key().to_bytes().to_vec(),
        display_name: name.into(),
        specialty: specialty.into(),
        county: county.into(),
        town: String::new(),
        languages: languages.iter().map(|l| l.to_string()).collect(),
        valid_until: now() + 365 * DAY,
    }
}

pub(super) fn publish(document: proto::SignedDocument) -> proto::PublishDocumentRequest {
    proto::PublishDocumentRequest {
        document: Some(document),
    }
}

pub(super) fn device_list(
    supporter: &SigningKey,
    version: u64,
    devices: Vec<proto::DeviceEntry>,
) -> proto::SignedDocument {
    let list = proto::DeviceList {
        supporter_key: supporter.verifying_key().to_bytes().to_vec(),
        version,
        devices,
        valid_until: now() + 30 * DAY,
    };
    sign_document(DocumentKind::DeviceList, list.encode_to_vec(), supporter)
}

pub(super) fn capacity(supporter: &SigningKey, capacity: u32) -> proto::SetCapacityRequest {
    let key = supporter.verifying_key().to_bytes();
    proto::SetCapacityRequest {
        supporter_key: key.to_vec(),
        capacity,
        auth: Some(sign(
            supporter,
            Method::SetCapacity,
            &key,
            &[&capacity.to_be_bytes()],
        )),
    }
}

fn prekey(prekey: &PublicPrekey) -> proto::SignedPrekey {
    proto::SignedPrekey {
        id: prekey.id,
        public_key: prekey.public_key.clone(),
        signature: prekey.signature.to_vec(),
    }
}

fn kem(prekey: &PublicPrekey) -> proto::KemPrekey {
    proto::KemPrekey {
        id: prekey.id,
        one_time: prekey.one_time,
        public_key: prekey.public_key.clone(),
        signature: prekey.signature.to_vec(),
    }
}

/// The upload a device of `supporter` makes, signed by `signing_key`.
fn upload(
    device: &Device,
    supporter: &SigningKey,
    signing_key: &SigningKey,
) -> proto::PublishPrekeysRequest {
    let published = device.published_prekeys();
    let mut request = proto::PublishPrekeysRequest {
        identity_key: published.identity.to_vec(),
        signed_prekey: Some(prekey(&published.signed_prekey)),
        kem_last_resort: Some(kem(&published.kem_last_resort)),
        one_time_prekeys: published
            .one_time
            .iter()
            .map(|p| proto::OneTimePrekey {
                id: p.id,
                public_key: p.public_key.clone(),
                signature: p.signature.to_vec(),
            })
            .collect(),
        kem_one_time_prekeys: published.kem_one_time.iter().map(kem).collect(),
        auth: None,
        supporter_key: supporter.verifying_key().to_bytes().to_vec(),
    };
    let digest = haven_proto::keys::upload_digest(&request);
    request.auth = Some(sign(
        signing_key,
        Method::PublishPrekeys,
        &published.identity[..32],
        &[&digest],
    ));
    request
}

pub(super) fn claim(supporter: &SigningKey, difficulty: u32) -> proto::ClaimBundlesRequest {
    claim_for(&supporter.verifying_key().to_bytes(), difficulty)
}

/// A stamped claim for the supporter with public key `supporter_key`, as anyone may send.
pub(super) fn claim_for(supporter_key: &[u8; 32], difficulty: u32) -> proto::ClaimBundlesRequest {
    claim_at(supporter_key, difficulty, haven_e2e::now_ms())
}

/// A stamped claim for the supporter with public key `supporter_key`, made at
/// `timestamp_ms`.
pub(super) fn claim_at(
    supporter_key: &[u8; 32],
    difficulty: u32,
    timestamp_ms: u64,
) -> proto::ClaimBundlesRequest {
    let supporter_key = supporter_key.to_vec();
    let claim_nonce = haven_e2e::random_id();
    let pow_stamp = haven_proto::pow::solve(
        &supporter_key,
        &claim_nonce,
        &haven_proto::keys::claim_stamp_input(timestamp_ms),
        difficulty,
        u64::MAX,
    )
    .unwrap();
    proto::ClaimBundlesRequest {
        supporter_key,
        claim_nonce,
        timestamp_ms,
        pow_stamp,
    }
}

pub(super) fn protocol_bundle(
    bundle: &proto::PrekeyBundle,
) -> Result<PrekeyBundle, haven_protocol::VerifyError> {
    let public = |id: u32, one_time: bool, key: &[u8], signature: &[u8]| PublicPrekey {
        id,
        one_time,
        public_key: key.to_vec(),
        signature: signature.try_into().unwrap_or([0; 64]),
    };
    let signed = bundle.signed_prekey.as_ref().unwrap();
    let kem = bundle.kem_prekey.as_ref().unwrap();
    let one_time = bundle
        .one_time_prekey
        .as_ref()
        .map(|p| public(p.id, false, &p.public_key, &p.signature));
    PrekeyBundle::from_parts(
        &bundle.identity_key,
        &public(signed.id, false, &signed.public_key, &signed.signature),
        one_time.as_ref(),
        &public(kem.id, kem.one_time, &kem.public_key, &kem.signature),
    )
}

fn list_request(specialty: &str, county: &str, language: &str, taking: bool) -> proto::ListRequest {
    proto::ListRequest {
        specialty: specialty.into(),
        county: county.into(),
        language: language.into(),
        taking_new_conversations_only: taking,
    }
}

/// How many supporters the directory lists for these filters.
async fn listed(
    relay: &mut Directory,
    specialty: &str,
    county: &str,
    language: &str,
    taking: bool,
) -> usize {
    let request = list_request(specialty, county, language, taking);
    relay
        .directory
        .list(request)
        .await
        .unwrap()
        .into_inner()
        .supporters
        .len()
}

#[tokio::test]
async fn the_directory_lists_filters_and_revokes_only_association_signed_supporters() {
    let mut relay = directory().await;
    let kari = random_key();
    let ola = random_key();
    let signed = |entry: proto::SupporterEntry, key: &SigningKey| {
        sign_document(DocumentKind::SupporterEntry, entry.encode_to_vec(), key)
    };
    let kari_entry = signed(
        entry(&kari, "Kari", "general practice", "Vestland", &["nb", "en"]),
        &relay.association,
    );
    let ola_entry = signed(
        entry(&ola, "Ola", "psychiatry", "Oslo", &["en"]),
        &relay.association,
    );
    relay
        .directory
        .publish_entry(publish(kari_entry.clone()))
        .await
        .unwrap();
    relay
        .directory
        .publish_entry(publish(ola_entry))
        .await
        .unwrap();

    // The relay refuses an entry the association did not sign.
    let impostor = random_key();
    let forged = signed(
        entry(&impostor, "Impostor", "surgery", "Oslo", &["en"]),
        &impostor,
    );
    let refused = relay
        .directory
        .publish_entry(publish(forged))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    assert_eq!(listed(&mut relay, "", "", "", false).await, 2);
    assert_eq!(listed(&mut relay, "", "vestland", "", false).await, 1);
    assert_eq!(listed(&mut relay, "", "", "EN", false).await, 2);
    assert_eq!(listed(&mut relay, "Psychiatry", "", "nb", false).await, 0);
    assert_eq!(listed(&mut relay, "", "", "", true).await, 0);
    relay.keys.set_capacity(capacity(&kari, 3)).await.unwrap();
    let taking = relay
        .directory
        .list(list_request("", "", "", true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(taking.supporters.len(), 1);
    assert_eq!(taking.supporters[0].entry.as_ref(), Some(&kari_entry));
    // Capacity is set by the supporter only.
    let mut stolen = capacity(&kari, 0);
    stolen.auth = capacity(&ola, 0).auth;
    assert_eq!(
        relay.keys.set_capacity(stolen).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    // Device lists: signed by the supporter, never rolled back.
    let device = proto::DeviceEntry {
        identity_key: vec![1; 128],
        intake_sender_id: vec![2; 16],
    };
    relay
        .directory
        .publish_device_list(publish(device_list(&kari, 2, vec![device.clone()])))
        .await
        .unwrap();
    let rollback = relay
        .directory
        .publish_device_list(publish(device_list(&kari, 1, vec![device.clone()])))
        .await;
    assert_eq!(rollback.unwrap_err().code(), Code::FailedPrecondition);
    let mut by_other = device_list(&kari, 3, vec![device.clone()]);
    by_other.signature = device_list(&ola, 3, vec![device]).signature;
    assert_eq!(
        relay
            .directory
            .publish_device_list(publish(by_other))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    // Revocation: the supporter disappears from the directory and cannot come back.
    let revocation = proto::Revocation {
        supporter_key: kari.verifying_key().to_bytes().to_vec(),
        revoked_at: now(),
    };
    let revocation = sign_document(
        DocumentKind::Revocation,
        revocation.encode_to_vec(),
        &relay.association,
    );
    relay
        .directory
        .publish_revocation(publish(revocation))
        .await
        .unwrap();
    let after = relay
        .directory
        .list(list_request("", "", "", false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((after.supporters.len(), after.revocations.len()), (1, 1));
    let get = proto::GetRequest {
        supporter_key: kari.verifying_key().to_bytes().to_vec(),
    };
    assert_eq!(
        relay.directory.get(get).await.unwrap_err().code(),
        Code::NotFound
    );
    let again = relay
        .directory
        .publish_entry(publish(kari_entry))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn an_older_association_signed_entry_republished_is_refused_and_the_newer_stays() {
    let mut relay = directory().await;
    let kari = random_key();
    let signed = |entry: &proto::SupporterEntry, association: &SigningKey| {
        sign_document(
            DocumentKind::SupporterEntry,
            entry.encode_to_vec(),
            association,
        )
    };
    // Last year's entry: another county, valid for a while yet.
    let base = now();
    let mut old = entry(&kari, "Kari", "general practice", "Oslo", &["nb"]);
    old.valid_until = base + 100 * DAY;
    let old = signed(&old, &relay.association);
    let mut renewed = entry(&kari, "Kari", "general practice", "Vestland", &["nb"]);
    renewed.valid_until = base + 200 * DAY;
    let renewed = signed(&renewed, &relay.association);
    relay
        .directory
        .publish_entry(publish(old.clone()))
        .await
        .unwrap();
    relay
        .directory
        .publish_entry(publish(renewed.clone()))
        .await
        .unwrap();
    // Anyone can hold on to the old, public, still-valid entry and re-publish it.
    let rollback = relay
        .directory
        .publish_entry(publish(old))
        .await
        .unwrap_err();
    assert_eq!(rollback.code(), Code::FailedPrecondition);
    assert!(
        rollback.message().contains("older"),
        "{}",
        rollback.message()
    );
    // The same entry again is fine; another with the same valid_until is not.
    relay
        .directory
        .publish_entry(publish(renewed.clone()))
        .await
        .unwrap();
    let mut fork = entry(&kari, "Kari", "psychiatry", "Vestland", &["nb"]);
    fork.valid_until = base + 200 * DAY;
    let fork = relay
        .directory
        .publish_entry(publish(signed(&fork, &relay.association)))
        .await
        .unwrap_err();
    assert_eq!(fork.code(), Code::FailedPrecondition);
    let get = proto::GetRequest {
        supporter_key: kari.verifying_key().to_bytes().to_vec(),
    };
    let served = relay.directory.get(get).await.unwrap().into_inner();
    assert_eq!(served.entry, Some(renewed.clone()));
    let listed = relay
        .directory
        .list(list_request("", "", "", false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.supporters.len(), 1);
    assert_eq!(listed.supporters[0].entry, Some(renewed));
    assert_eq!(listed_in(&mut relay, "oslo").await, 0);
    assert_eq!(listed_in(&mut relay, "vestland").await, 1);

    // Device lists: the same version again only with the same bytes.
    let device = |n: u8| proto::DeviceEntry {
        identity_key: vec![n; 128],
        intake_sender_id: vec![n; 16],
    };
    let first = device_list(&kari, 4, vec![device(1)]);
    relay
        .directory
        .publish_device_list(publish(first.clone()))
        .await
        .unwrap();
    relay
        .directory
        .publish_device_list(publish(first.clone()))
        .await
        .unwrap();
    let same_version = relay
        .directory
        .publish_device_list(publish(device_list(&kari, 4, vec![device(1), device(9)])))
        .await
        .unwrap_err();
    assert_eq!(same_version.code(), Code::FailedPrecondition);
    assert!(
        same_version.message().contains("same version")
            || same_version.message().contains("with this version"),
        "{}",
        same_version.message()
    );
    let get = proto::GetRequest {
        supporter_key: kari.verifying_key().to_bytes().to_vec(),
    };
    let served = relay.directory.get(get).await.unwrap().into_inner();
    assert_eq!(served.device_list, Some(first));
}

async fn listed_in(relay: &mut Directory, county: &str) -> usize {
    listed(relay, "", county, "", false).await
}

#[tokio::test]
async fn a_relay_without_an_association_key_refuses_directory_documents() {
    let relay = InProcessRelay::start(test_config()).await.unwrap();
    let channel = haven_e2e::connect(relay.address).await.unwrap();
    let mut directory = proto::directory_client::DirectoryClient::new(channel);
    let key = random_key();
    let document = sign_document(
        DocumentKind::SupporterEntry,
        entry(&key, "A", "", "", &[]).encode_to_vec(),
        &key,
    );
    let refused = directory
        .publish_entry(publish(document))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("no association key"));
}

/// Signs a `Keys` request with a device's identity, as the SDK will.
fn device_auth(device: &Device, method: Method, fields: &[&[u8]]) -> proto::Auth {
    let key = &device.identity_key().to_bytes()[..32];
    let timestamp_ms = haven_e2e::now_ms();
    let nonce: [u8; 16] = rand::random();
    let payload = haven_proto::auth::request_payload(method, key, timestamp_ms, &nonce, fields);
    let signature = device
        .identity()
        .sign_relay_request(&payload)
        .expect("a relay payload");
    proto::Auth {
        timestamp_ms,
        nonce: nonce.to_vec(),
        signature: signature.to_vec(),
    }
}

/// Publishes an association-signed entry for `supporter` (general practice, Vestland).
pub(super) async fn publish_supporter_entry(
    relay: &mut Directory,
    supporter: &SigningKey,
    name: &str,
) {
    let document = sign_document(
        DocumentKind::SupporterEntry,
        entry(supporter, name, "general practice", "Vestland", &["nb"]).encode_to_vec(),
        &relay.association,
    );
    relay
        .directory
        .publish_entry(publish(document))
        .await
        .unwrap();
}

/// A supporter device with `one_time` one-time prekeys, and its entry for a
/// device list with a fresh intake mailbox.
pub(super) async fn device_with_intake(
    relay: &mut Directory,
    one_time: usize,
) -> (Device, proto::DeviceEntry) {
    let mut rng = rand::rng();
    let mut device = Device::generate(now(), &mut rng);
    device.generate_one_time_prekeys(one_time, &mut rng);
    let intake = relay.client.create(MailboxKind::Intake).await.unwrap();
    let listed = proto::DeviceEntry {
        identity_key: device.identity_key().to_bytes().to_vec(),
        intake_sender_id: intake.sender_id.clone(),
    };
    (device, listed)
}

/// Asserts that the relay holds no prekeys of `device` for `supporter` and
/// refuses its upload.
async fn assert_holds_no_prekeys(relay: &mut Directory, device: &Device, supporter: &SigningKey) {
    let count = proto::PrekeyCountRequest {
        device_key: device.identity_key().to_bytes()[..32].to_vec(),
        auth: Some(device_auth(device, Method::PrekeyCount, &[])),
        supporter_key: supporter.verifying_key().to_bytes().to_vec(),
    };
    let counted = relay.keys.prekey_count(count).await.unwrap_err();
    assert_eq!(counted.code(), Code::NotFound);
    let upload = relay
        .keys
        .publish_prekeys(device_upload(device, supporter))
        .await
        .unwrap_err();
    assert_eq!(
        upload.code(),
        Code::FailedPrecondition,
        "{}",
        upload.message()
    );
}

/// The upload a device of `supporter` makes, signed by its identity.
pub(super) fn device_upload(
    device: &Device,
    supporter: &SigningKey,
) -> proto::PublishPrekeysRequest {
    let mut request = upload(device, supporter, &random_key());
    let digest = haven_proto::keys::upload_digest(&request);
    request.auth = Some(device_auth(device, Method::PublishPrekeys, &[&digest]));
    request
}

#[tokio::test]
async fn claimed_bundles_start_real_sessions_and_capacity_bounds_new_conversations() {
    let mut relay = directory().await;
    let supporter = random_key();
    publish_supporter_entry(&mut relay, &supporter, "Kari").await;

    // A supporter device with prekeys and an intake mailbox, in the device list.
    let mut rng = rand::rng();
    let mut device = Device::generate(now(), &mut rng);
    device.generate_one_time_prekeys(2, &mut rng);
    let intake = relay.client.create(MailboxKind::Intake).await.unwrap();
    let identity = device.identity_key().to_bytes().to_vec();
    let listed = proto::DeviceEntry {
        identity_key: identity.clone(),
        intake_sender_id: intake.sender_id.clone(),
    };
    relay
        .directory
        .publish_device_list(publish(device_list(&supporter, 1, vec![listed])))
        .await
        .unwrap();

    // Uploads must be signed by the device itself.
    let forged = upload(&device, &supporter, &random_key());
    assert_eq!(
        relay.keys.publish_prekeys(forged).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let counts = relay
        .keys
        .publish_prekeys(device_upload(&device, &supporter))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (counts.one_time_prekeys, counts.kem_one_time_prekeys),
        (2, 2)
    );

    // Not taking conversations until the supporter says so.
    let difficulty = 8;
    let closed = relay
        .keys
        .claim_bundles(claim(&supporter, difficulty))
        .await
        .unwrap_err();
    assert_eq!(closed.code(), Code::ResourceExhausted);
    assert_eq!(closed.message(), "not taking new conversations");
    relay
        .keys
        .set_capacity(capacity(&supporter, 3))
        .await
        .unwrap();

    // Claims need the proof of work, and a nonce used once.
    let mut weak = claim(&supporter, difficulty);
    let input = haven_proto::keys::claim_stamp_input(weak.timestamp_ms);
    weak.pow_stamp = (0..u64::MAX)
        .find(|nonce| {
            !haven_proto::pow::verify(
                &weak.supporter_key,
                &weak.claim_nonce,
                &input,
                *nonce,
                difficulty,
            )
        })
        .unwrap();
    let refused = relay.keys.claim_bundles(weak).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let first_claim = claim(&supporter, difficulty);
    let first = relay
        .keys
        .claim_bundles(first_claim.clone())
        .await
        .unwrap()
        .into_inner();
    // The same claim again (a retry) gets the same answer and takes nothing
    // more (review F18).
    assert_eq!(
        relay
            .keys
            .claim_bundles(first_claim)
            .await
            .unwrap()
            .into_inner(),
        first
    );
    let second = relay
        .keys
        .claim_bundles(claim(&supporter, difficulty))
        .await
        .unwrap()
        .into_inner();
    let third = relay
        .keys
        .claim_bundles(claim(&supporter, difficulty))
        .await
        .unwrap()
        .into_inner();
    let exhausted = relay
        .keys
        .claim_bundles(claim(&supporter, difficulty))
        .await
        .unwrap_err();
    assert_eq!(exhausted.code(), Code::ResourceExhausted);

    // Each one-time prekey went to one claim only; the third fell back to the last resort.
    let one_time: Vec<_> = [&first, &second, &third]
        .iter()
        .map(|c| c.bundles[0].one_time_prekey.as_ref().map(|p| p.id))
        .collect();
    assert!(
        one_time[0].is_some()
            && one_time[1].is_some()
            && one_time[0] != one_time[1]
            && one_time[2].is_none()
    );
    assert!(
        third.bundles[0]
            .kem_prekey
            .as_ref()
            .is_some_and(|k| !k.one_time)
    );
    assert_eq!(first.bundles[0].intake_sender_id, intake.sender_id);
    let count_request = proto::PrekeyCountRequest {
        device_key: identity[..32].to_vec(),
        auth: Some(device_auth(&device, Method::PrekeyCount, &[])),
        supporter_key: supporter.verifying_key().to_bytes().to_vec(),
    };
    let left = relay
        .keys
        .prekey_count(count_request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!((left.one_time_prekeys, left.kem_one_time_prekeys), (0, 0));

    // Every claimed bundle verifies and starts a session the device accepts.
    for claimed in [&first, &second, &third] {
        let bundle = protocol_bundle(&claimed.bundles[0]).unwrap();
        let help_seeker = IdentityKeyPair::generate(&mut rng);
        let mut session = Session::initiate(&help_seeker, &bundle, &mut rng).unwrap();
        let message = session.encrypt(b"hello", &mut rng).unwrap();
        let (_, plaintext) = device.accept(&message, &mut rng).unwrap();
        assert_eq!(&plaintext[..], b"hello");
    }

    // A relay that swaps a prekey in a bundle is caught by the client.
    let mut swapped = first.bundles[0].clone();
    if let (Some(a), Some(b)) = (
        swapped.one_time_prekey.as_mut(),
        second.bundles[0].one_time_prekey.as_ref(),
    ) {
        a.public_key = b.public_key.clone();
    }
    assert!(protocol_bundle(&swapped).is_err());
}

/// A relay that swaps a prekey in a bundle (simulated by storing a signed
/// prekey that its signature does not cover) is refused by the SDK, with an
/// error that says which signature failed.
#[tokio::test]
async fn the_sdk_refuses_a_bundle_with_a_swapped_prekey() {
    let mut relay = directory().await;
    let supporter = random_key();
    let document = sign_document(
        DocumentKind::SupporterEntry,
        entry(&supporter, "Kari", "general practice", "Vestland", &["nb"]).encode_to_vec(),
        &relay.association,
    );
    relay
        .directory
        .publish_entry(publish(document))
        .await
        .unwrap();
    // A one-time prekey, so the SDK gets as far as verifying the bundle.
    let (device, listed) = device_with_intake(&mut relay, 1).await;
    relay
        .directory
        .publish_device_list(publish(device_list(&supporter, 1, vec![listed])))
        .await
        .unwrap();
    let mut swapped = device_upload(&device, &supporter);
    if let Some(signed) = swapped.signed_prekey.as_mut() {
        signed.public_key = vec![9; 32];
    }
    let digest = haven_proto::keys::upload_digest(&swapped);
    swapped.auth = Some(device_auth(&device, Method::PublishPrekeys, &[&digest]));
    relay.keys.publish_prekeys(swapped).await.unwrap();
    relay
        .keys
        .set_capacity(capacity(&supporter, 1))
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let seeker = haven_sdk::Client::open(haven_sdk::Config {
        relay_url: format!("http://{}", relay._relay.address),
        ca_certificate: None,
        association_key: relay.association.verifying_key().to_bytes(),
        data_dir: dir.path().to_path_buf(),
        storage_key: zeroize::Zeroizing::new([5; 32]),
        proxy: None,
    })
    .unwrap();
    let listed = seeker
        .supporter(&supporter.verifying_key().to_bytes())
        .await
        .unwrap();
    let refused = seeker
        .start_conversation(&listed, "Hello")
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused,
            haven_sdk::Error::Bundle(haven_protocol::VerifyError::SignedPrekeySignature)
        ),
        "{refused}"
    );
    assert!(
        seeker.conversations().unwrap().is_empty(),
        "nothing was started"
    );
}

/// Relay review F1 (b) and H-B: anyone can make up device keys, so the relay
/// keeps prekeys only for a device in its supporter's signed device list.
/// Made-up devices (unlisted, or naming a supporter with no list) store
/// nothing; a device taken off the list, or of a revoked supporter, loses its
/// prekeys; and a claim while a listed device has none takes nothing.
#[tokio::test]
async fn prekeys_are_kept_only_for_listed_devices_and_go_when_delisted_or_revoked() {
    let mut relay = directory().await;
    let supporter = random_key();
    publish_supporter_entry(&mut relay, &supporter, "Kari").await;
    let mut rng = rand::rng();
    let mut listed = Device::generate(now(), &mut rng);
    listed.generate_one_time_prekeys(2, &mut rng);
    let intake = relay.client.create(MailboxKind::Intake).await.unwrap();
    let entry_of = |device: &Device| proto::DeviceEntry {
        identity_key: device.identity_key().to_bytes().to_vec(),
        intake_sender_id: intake.sender_id.clone(),
    };
    relay
        .directory
        .publish_device_list(publish(device_list(&supporter, 1, vec![entry_of(&listed)])))
        .await
        .unwrap();
    let count = |device: &Device| proto::PrekeyCountRequest {
        device_key: device.identity_key().to_bytes()[..32].to_vec(),
        auth: Some(device_auth(device, Method::PrekeyCount, &[])),
        supporter_key: supporter.verifying_key().to_bytes().to_vec(),
    };
    let claim_refusal = |status: tonic::Status| {
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{}",
            status.message()
        );
        assert!(
            status.message().contains("not published prekeys"),
            "{}",
            status.message()
        );
    };
    // Listed, but no prekeys yet: a claim is refused and takes no capacity.
    relay
        .keys
        .set_capacity(capacity(&supporter, 1))
        .await
        .unwrap();
    claim_refusal(
        relay
            .keys
            .claim_bundles(claim(&supporter, 8))
            .await
            .unwrap_err(),
    );

    // The attack, bounded: made-up devices with full batches, naming the
    // listed supporter or a supporter with no list. None is kept.
    let nobody = random_key();
    for n in 0..16 {
        let mut stranger = Device::generate(now(), &mut rng);
        stranger.generate_one_time_prekeys(20, &mut rng);
        let named = if n % 2 == 0 { &supporter } else { &nobody };
        let refused = relay
            .keys
            .publish_prekeys(device_upload(&stranger, named))
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            Code::FailedPrecondition,
            "{}",
            refused.message()
        );
        assert!(
            refused
                .message()
                .contains("not in the supporter's published device list"),
            "{}",
            refused.message()
        );
        assert_eq!(
            relay
                .keys
                .prekey_count(count(&stranger))
                .await
                .unwrap_err()
                .code(),
            Code::NotFound,
            "nothing was stored for a made-up device"
        );
    }
    // The listed device publishes, and the claim that was refused goes through:
    // the refusal took no capacity.
    relay
        .keys
        .publish_prekeys(device_upload(&listed, &supporter))
        .await
        .unwrap();
    let claimed = relay
        .keys
        .claim_bundles(claim(&supporter, 8))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(claimed.bundles.len(), 1);

    // A second device is listed but has not uploaded: claims take nothing,
    // not even the first device's one-time prekeys.
    let mut second = Device::generate(now(), &mut rng);
    second.generate_one_time_prekeys(2, &mut rng);
    relay
        .directory
        .publish_device_list(publish(device_list(
            &supporter,
            2,
            vec![entry_of(&listed), entry_of(&second)],
        )))
        .await
        .unwrap();
    relay
        .keys
        .set_capacity(capacity(&supporter, 5))
        .await
        .unwrap();
    claim_refusal(
        relay
            .keys
            .claim_bundles(claim(&supporter, 8))
            .await
            .unwrap_err(),
    );
    let left = relay
        .keys
        .prekey_count(count(&listed))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        left.one_time_prekeys, 1,
        "the refused claim took no one-time prekey"
    );
    relay
        .keys
        .publish_prekeys(device_upload(&second, &supporter))
        .await
        .unwrap();
    assert_eq!(
        relay
            .keys
            .claim_bundles(claim(&supporter, 8))
            .await
            .unwrap()
            .into_inner()
            .bundles
            .len(),
        2
    );

    // Taken off the list: its prekeys go, and it cannot upload again.
    relay
        .directory
        .publish_device_list(publish(device_list(&supporter, 3, vec![entry_of(&listed)])))
        .await
        .unwrap();
    assert_holds_no_prekeys(&mut relay, &second, &supporter).await;
    relay.keys.prekey_count(count(&listed)).await.unwrap();

    // Revoked: every listed device's prekeys go, and none come back.
    let revocation = proto::Revocation {
        supporter_key: supporter.verifying_key().to_bytes().to_vec(),
        revoked_at: now(),
    };
    relay
        .directory
        .publish_revocation(publish(sign_document(
            DocumentKind::Revocation,
            revocation.encode_to_vec(),
            &relay.association,
        )))
        .await
        .unwrap();
    assert_holds_no_prekeys(&mut relay, &listed, &supporter).await;
}

/// Fresh review of H-B: a device list is signed by its supporter alone, so one
/// supporter could list another supporter's devices. With prekeys indexed by
/// the device key alone, dropping them from its list again removed the other
/// supporter's prekeys (every claim for that supporter then refused), and
/// claims for the borrowing supporter took them. Now the index is the
/// supporter and the device: a borrowed device reaches nothing.
#[tokio::test]
async fn a_supporter_listing_another_supporters_device_reaches_none_of_its_prekeys() {
    let mut relay = directory().await;
    let (kari, mallory) = (random_key(), random_key());
    for (key, name) in [(&kari, "Kari"), (&mallory, "Mallory")] {
        publish_supporter_entry(&mut relay, key, name).await;
    }
    let (device, listed) = device_with_intake(&mut relay, 3).await;
    relay
        .directory
        .publish_device_list(publish(device_list(&kari, 1, vec![listed.clone()])))
        .await
        .unwrap();
    relay
        .keys
        .publish_prekeys(device_upload(&device, &kari))
        .await
        .unwrap();
    for key in [&kari, &mallory] {
        relay.keys.set_capacity(capacity(key, 10)).await.unwrap();
    }
    // Mallory lists Kari's device: claims for Mallory take nothing of it.
    relay
        .directory
        .publish_device_list(publish(device_list(&mallory, 1, vec![listed.clone()])))
        .await
        .unwrap();
    for _ in 0..3 {
        let refused = relay
            .keys
            .claim_bundles(claim(&mallory, 8))
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            Code::FailedPrecondition,
            "{}",
            refused.message()
        );
    }
    // ...and dropping it again removes nothing of Kari's.
    let (_, own) = device_with_intake(&mut relay, 0).await;
    relay
        .directory
        .publish_device_list(publish(device_list(&mallory, 2, vec![own])))
        .await
        .unwrap();
    let count = relay
        .keys
        .prekey_count(proto::PrekeyCountRequest {
            device_key: device.identity_key().to_bytes()[..32].to_vec(),
            auth: Some(device_auth(&device, Method::PrekeyCount, &[])),
            supporter_key: kari.verifying_key().to_bytes().to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        count.one_time_prekeys, 3,
        "Kari's one-time prekeys are all there"
    );
    // Kari is still reached, with a one-time prekey.
    let claimed = relay
        .keys
        .claim_bundles(claim(&kari, 8))
        .await
        .unwrap()
        .into_inner();
    assert!(claimed.bundles[0].one_time_prekey.is_some());
}
