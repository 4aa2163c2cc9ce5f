//! Known-answer vectors for every wire rule in `docs/wire.md`, recomputed with the
//! crate's real functions and compared with `proto/testvectors/*.json`.
//!
//! The JSON files are what a third-party client checks itself against (the Python
//! client in `tests/wire-client` does). This test builds each file's contents from
//! fixed inputs (keys from fixed seeds, fixed nonces and timestamps) and asserts the
//! file on disk says exactly that, so neither the files nor the functions can change
//! without the other. After a deliberate change of a wire rule, regenerate them with
//! `HAVEN_REGENERATE_VECTORS=1 cargo test -p haven-proto --test vectors` and update
//! `docs/wire.md` in the same commit.
//!
//! Where a function hides its input (the proof-of-work preimages, the prekey-upload
//! digest's preimage), the test also builds that input by hand as `docs/wire.md`
//! describes it and checks it against the real function, so the documented bytes are
//! the ones the relay hashes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // reason: a test; a failure is a failed test.

use std::path::PathBuf;

use ed25519_dalek::SigningKey;
use haven_proto::auth::{self, Method};
use haven_proto::directory::{self, DocumentKind};
use haven_proto::v1::{
    DeviceEntry, DeviceList, KemPrekey, OneTimePrekey, PublishPrekeysRequest, Revocation,
    SignedPrekey, SupporterEntry,
};
use haven_proto::{keys, pow};
use prost::Message as _;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Every domain string the wire uses, as `docs/wire.md` lists them.
const DOMAINS: &[&str] = &[
    "haven.v1.request-auth",
    "haven.v1.send-auth",
    "haven.v1.intake-pow",
    "haven.v1.create-pow",
    "haven.v1.bundle-claim",
    "haven.v1.prekey-upload",
    "haven.v1.directory.supporter-entry",
    "haven.v1.directory.device-list",
    "haven.v1.directory.revocation",
    "haven.v1.intake-stamp",
];

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A signing key from a seed of 32 equal bytes, as the vectors name them.
fn key(seed_byte: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed_byte; 32])
}

fn public(key: &SigningKey) -> [u8; 32] {
    key.verifying_key().to_bytes()
}

fn key_json(key: &SigningKey) -> Value {
    json!({
        "seed_hex": hex::encode(key.to_bytes()),
        "public_key_hex": hex::encode(public(key)),
    })
}

/// Bytes `start, start+1, …` (wrapping), `len` of them: distinct, easy to read in hex.
fn counting(start: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| start.wrapping_add(i as u8)).collect()
}

fn leading_zero_bits(digest: &[u8]) -> u32 {
    let mut bits = 0;
    for byte in digest {
        if *byte != 0 {
            return bits + byte.leading_zeros();
        }
        bits += 8;
    }
    bits
}

/// Compares `value` with `proto/testvectors/<name>.json`, or writes it there when
/// `HAVEN_REGENERATE_VECTORS` is set.
fn check_file(name: &str, value: &Value) {
    let path = repo_root()
        .join("proto/testvectors")
        .join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(value).unwrap() + "\n";
    if std::env::var_os("HAVEN_REGENERATE_VECTORS").is_some() {
        std::fs::write(&path, text).unwrap();
        return;
    }
    let on_disk = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    let on_disk: Value = serde_json::from_str(&on_disk).unwrap();
    assert!(
        on_disk == *value,
        "{} differs from what the functions compute; if the wire rule changed on purpose, \
         regenerate with HAVEN_REGENERATE_VECTORS=1 cargo test -p haven-proto --test vectors \
         and update docs/wire.md",
        path.display()
    );
}

const TIMESTAMP_MS: u64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
const NONCE: [u8; 16] = [
    0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf,
];

fn recipient_id() -> Vec<u8> {
    counting(0x10, 16)
}

fn sender_id() -> Vec<u8> {
    counting(0x20, 16)
}

fn envelope_id(n: u8) -> Vec<u8> {
    counting(0x30 + 0x10 * n, 16)
}

/// The `PublishPrekeysRequest` of the upload vectors: realistic lengths (a 128-byte
/// identity whose first 32 bytes are the device's Ed25519 key, 32-byte X25519 keys,
/// 1184-byte ML-KEM keys, 64-byte signatures), contents that are merely distinct.
fn upload_request(device: &SigningKey) -> PublishPrekeysRequest {
    let identity_key = [public(device).to_vec(), counting(0x40, 96)].concat();
    PublishPrekeysRequest {
        identity_key,
        signed_prekey: Some(SignedPrekey {
            id: 1,
            public_key: counting(0x50, 32),
            signature: counting(0x60, 64),
        }),
        kem_last_resort: Some(KemPrekey {
            id: 2,
            one_time: false,
            public_key: counting(0x70, 1184),
            signature: counting(0x80, 64),
        }),
        one_time_prekeys: vec![
            OneTimePrekey {
                id: 3,
                public_key: counting(0x90, 32),
                signature: counting(0xa0, 64),
            },
            OneTimePrekey {
                id: 4,
                public_key: counting(0xb0, 32),
                signature: counting(0xc0, 64),
            },
        ],
        kem_one_time_prekeys: vec![KemPrekey {
            id: 5,
            one_time: true,
            public_key: counting(0xd0, 1184),
            signature: counting(0xe0, 64),
        }],
        auth: None,
        // Not covered by the digest (it only names the list to look in).
        supporter_key: counting(0xf0, 32),
    }
}

/// The upload digest's preimage, built as `docs/wire.md` says.
fn upload_preimage(request: &PublishPrekeysRequest) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    fn kem(out: &mut Vec<u8>, prekey: &KemPrekey) {
        out.push(1);
        out.extend_from_slice(&prekey.id.to_be_bytes());
        out.push(u8::from(prekey.one_time));
        field(out, &prekey.public_key);
        field(out, &prekey.signature);
    }
    let mut out = b"haven.v1.prekey-upload".to_vec();
    field(&mut out, &request.identity_key);
    match &request.signed_prekey {
        Some(prekey) => {
            out.push(1);
            out.extend_from_slice(&prekey.id.to_be_bytes());
            field(&mut out, &prekey.public_key);
            field(&mut out, &prekey.signature);
        }
        None => out.push(0),
    }
    match &request.kem_last_resort {
        Some(prekey) => kem(&mut out, prekey),
        None => out.push(0),
    }
    out.extend_from_slice(&(request.one_time_prekeys.len() as u64).to_be_bytes());
    for prekey in &request.one_time_prekeys {
        out.extend_from_slice(&prekey.id.to_be_bytes());
        field(&mut out, &prekey.public_key);
        field(&mut out, &prekey.signature);
    }
    out.extend_from_slice(&(request.kem_one_time_prekeys.len() as u64).to_be_bytes());
    for prekey in &request.kem_one_time_prekeys {
        kem(&mut out, prekey);
    }
    out
}

fn upload_json(request: &PublishPrekeysRequest) -> Value {
    let signed = |p: &SignedPrekey| json!({"id": p.id, "public_key_hex": hex::encode(&p.public_key), "signature_hex": hex::encode(&p.signature)});
    let one_time = |p: &OneTimePrekey| json!({"id": p.id, "public_key_hex": hex::encode(&p.public_key), "signature_hex": hex::encode(&p.signature)});
    let kem = |p: &KemPrekey| json!({"id": p.id, "one_time": p.one_time, "public_key_hex": hex::encode(&p.public_key), "signature_hex": hex::encode(&p.signature)});
    let preimage = upload_preimage(request);
    let digest = keys::upload_digest(request);
    assert_eq!(
        Sha256::digest(&preimage).as_slice(),
        digest,
        "docs/wire.md's upload preimage"
    );
    json!({
        "identity_key_hex": hex::encode(&request.identity_key),
        "signed_prekey": request.signed_prekey.as_ref().map(signed),
        "kem_last_resort": request.kem_last_resort.as_ref().map(kem),
        "one_time_prekeys": request.one_time_prekeys.iter().map(one_time).collect::<Vec<_>>(),
        "kem_one_time_prekeys": request.kem_one_time_prekeys.iter().map(kem).collect::<Vec<_>>(),
        "preimage_hex": hex::encode(&preimage),
        "digest_hex": hex::encode(digest),
    })
}

/// One signed request: its payload from `request_payload`, its `Auth` from
/// `sign_request`, checked to verify.
fn request_json(
    what: &str,
    method: Method,
    signer: &SigningKey,
    recipient_id: &[u8],
    fields: &[&[u8]],
    timestamp_ms: u64,
    nonce: [u8; 16],
) -> Value {
    let payload = auth::request_payload(method, recipient_id, timestamp_ms, &nonce, fields);
    let signed = auth::sign_request(signer, method, recipient_id, fields, timestamp_ms, nonce);
    assert_eq!(signed.timestamp_ms, timestamp_ms);
    assert_eq!(signed.nonce, nonce);
    assert_eq!(
        auth::verify(&public(signer), &payload, &signed.signature),
        Ok(())
    );
    json!({
        "what": what,
        "method": method.name(),
        "signer": key_json(signer),
        "recipient_id_hex": hex::encode(recipient_id),
        "timestamp_ms": timestamp_ms,
        "nonce_hex": hex::encode(nonce),
        "fields_hex": fields.iter().map(hex::encode).collect::<Vec<_>>(),
        "payload_hex": hex::encode(&payload),
        "signature_hex": hex::encode(&signed.signature),
    })
}

fn auth_vectors() -> Value {
    let recipient = key(0x01);
    let sender = key(0x02);
    let device = key(0x03);
    let supporter = key(0x04);
    let id = recipient_id();
    let upload_digest = keys::upload_digest(&upload_request(&device));
    let ids = [envelope_id(0), envelope_id(1)];
    let endpoint = "https://push.example/up/abc";
    let token = [0x70u8, 0x71, 0x72];
    let requests = vec![
        request_json(
            "Mailbox/Create, kind PRIVATE; no recipient id yet",
            Method::Create,
            &recipient,
            &[],
            &[&[1]],
            TIMESTAMP_MS,
            NONCE,
        ),
        request_json(
            "Mailbox/Create, kind INTAKE; no recipient id yet",
            Method::Create,
            &recipient,
            &[],
            &[&[2]],
            TIMESTAMP_MS,
            NONCE,
        ),
        request_json(
            "Mailbox/Secure with the sender key of seed 02",
            Method::Secure,
            &recipient,
            &id,
            &[&public(&sender)],
            TIMESTAMP_MS,
            NONCE,
        ),
        request_json(
            "Mailbox/Receive, ReceiveOpen.window = 64",
            Method::Receive,
            &recipient,
            &id,
            &[&64u32.to_be_bytes()],
            TIMESTAMP_MS,
            NONCE,
        ),
        request_json(
            "Mailbox/Fetch, limit = 0 (the relay's maximum)",
            Method::Fetch,
            &recipient,
            &id,
            &[&0u32.to_be_bytes()],
            TIMESTAMP_MS,
            NONCE,
        ),
        request_json(
            "Mailbox/Fetch, limit = 7",
            Method::Fetch,
            &recipient,
            &id,
            &[&7u32.to_be_bytes()],
            TIMESTAMP_MS + 1,
            NONCE,
        ),
        request_json(
            "Mailbox/Ack of two envelope ids, in request order",
            Method::Ack,
            &recipient,
            &id,
            &[&ids[0], &ids[1]],
            TIMESTAMP_MS,
            NONCE,
        ),
        request_json(
            "Mailbox/Delete; no fields",
            Method::Delete,
            &recipient,
            &id,
            &[],
            TIMESTAMP_MS,
            NONCE,
        ),
        request_json(
            "Mailbox/RegisterPush: endpoint as UTF-8, then token",
            Method::RegisterPush,
            &recipient,
            &id,
            &[endpoint.as_bytes(), &token],
            TIMESTAMP_MS,
            NONCE,
        ),
        request_json(
            "Mailbox/RegisterPush removing the registration: still two fields, both empty",
            Method::RegisterPush,
            &recipient,
            &id,
            &[b"", b""],
            TIMESTAMP_MS,
            NONCE,
        ),
        request_json(
            "Keys/PublishPrekeys: recipient id is the 32-byte device key; the field is \
             keys.json's upload digest",
            Method::PublishPrekeys,
            &device,
            &public(&device),
            &[&upload_digest],
            TIMESTAMP_MS,
            NONCE,
        ),
        request_json(
            "Keys/PrekeyCount: recipient id is the device key; no fields",
            Method::PrekeyCount,
            &device,
            &public(&device),
            &[],
            TIMESTAMP_MS,
            NONCE,
        ),
        request_json(
            "Keys/SetCapacity, capacity = 3: recipient id is the supporter key",
            Method::SetCapacity,
            &supporter,
            &public(&supporter),
            &[&3u32.to_be_bytes()],
            TIMESTAMP_MS,
            NONCE,
        ),
    ];
    let sends: Vec<Value> = [(0u64, b"sealed bytes".to_vec()), (3600, vec![0u8; 300])]
        .into_iter()
        .map(|(ttl_seconds, ciphertext)| {
            let payload =
                auth::send_payload(&sender_id(), &envelope_id(0), ttl_seconds, &ciphertext);
            let signature = ed25519_dalek::Signer::sign(&sender, &payload).to_bytes();
            assert_eq!(auth::verify(&public(&sender), &payload, &signature), Ok(()));
            json!({
                "signer": key_json(&sender),
                "sender_id_hex": hex::encode(sender_id()),
                "envelope_id_hex": hex::encode(envelope_id(0)),
                "ttl_seconds": ttl_seconds,
                "ciphertext_hex": hex::encode(&ciphertext),
                "ciphertext_sha256_hex": hex::encode(Sha256::digest(&ciphertext)),
                "payload_hex": hex::encode(&payload),
                "signature_hex": hex::encode(signature),
            })
        })
        .collect();
    json!({
        "about": "Signed requests (Auth) and sender signatures; see docs/wire.md sections 3 and 4. \
                  Keys are Ed25519 from the 32-byte seed shown (RFC 8032); signatures are \
                  deterministic, so every byte is reproducible.",
        "requests": requests,
        "sends": sends,
    })
}

/// The claim stamp's preimage at `stamp`, built as `docs/wire.md` says.
fn claim_preimage(sender_id: &[u8], envelope_id: &[u8], ciphertext: &[u8], stamp: u64) -> Vec<u8> {
    [
        &b"haven.v1.intake-pow"[..],
        &(sender_id.len() as u64).to_be_bytes(),
        sender_id,
        &(envelope_id.len() as u64).to_be_bytes(),
        envelope_id,
        &Sha256::digest(ciphertext),
        &stamp.to_be_bytes(),
    ]
    .concat()
}

/// The intake stamp's preimage at `stamp`, built as `docs/wire.md` says.
fn intake_preimage(
    sender_id: &[u8],
    envelope_id: &[u8],
    ciphertext: &[u8],
    timestamp_ms: u64,
    stamp: u64,
) -> Vec<u8> {
    [
        &b"haven.v1.intake-stamp"[..],
        &(sender_id.len() as u64).to_be_bytes(),
        sender_id,
        &(envelope_id.len() as u64).to_be_bytes(),
        envelope_id,
        &Sha256::digest(ciphertext),
        &timestamp_ms.to_be_bytes(),
        &stamp.to_be_bytes(),
    ]
    .concat()
}

/// An intake stamp made at [`TIMESTAMP_MS`]: the smallest solution from 0, its
/// preimage and digest, checked against `pow::intake_stamp_ok` at exactly the
/// digest's leading zero bits.
fn intake_stamp_json(
    sender_id: &[u8],
    envelope_id: &[u8],
    ciphertext: &[u8],
    difficulty: u32,
) -> Value {
    let at = TIMESTAMP_MS;
    let stamp =
        pow::solve_intake(sender_id, envelope_id, ciphertext, at, difficulty, u64::MAX).unwrap();
    let preimage = intake_preimage(sender_id, envelope_id, ciphertext, at, stamp);
    let digest = Sha256::digest(&preimage);
    let bits = leading_zero_bits(&digest);
    assert!(bits >= difficulty);
    assert!(pow::intake_stamp_ok(
        sender_id,
        envelope_id,
        ciphertext,
        at,
        stamp,
        bits
    ));
    assert!(!pow::intake_stamp_ok(
        sender_id,
        envelope_id,
        ciphertext,
        at,
        stamp,
        bits + 1
    ));
    if stamp > 0 {
        // The smallest: nothing below it passes.
        assert!(!pow::intake_stamp_ok(
            sender_id,
            envelope_id,
            ciphertext,
            at,
            stamp - 1,
            difficulty
        ));
    }
    json!({
        "timestamp_ms": at,
        "difficulty": difficulty,
        "stamp": stamp,
        "preimage_hex": hex::encode(&preimage),
        "digest_hex": hex::encode(digest),
        "leading_zero_bits": bits,
    })
}

/// A claim stamp: the smallest solution from 0, its preimage and digest,
/// checked against `pow::verify` at exactly the digest's leading zero bits.
fn stamp_json(sender_id: &[u8], envelope_id: &[u8], ciphertext: &[u8], difficulty: u32) -> Value {
    let stamp = pow::solve(sender_id, envelope_id, ciphertext, difficulty, u64::MAX).unwrap();
    let preimage = claim_preimage(sender_id, envelope_id, ciphertext, stamp);
    let digest = Sha256::digest(&preimage);
    let bits = leading_zero_bits(&digest);
    assert!(bits >= difficulty);
    assert!(pow::verify(sender_id, envelope_id, ciphertext, stamp, bits));
    assert!(!pow::verify(
        sender_id,
        envelope_id,
        ciphertext,
        stamp,
        bits + 1
    ));
    if stamp > 0 {
        // The smallest: nothing below it passes.
        assert!(!pow::verify(
            sender_id,
            envelope_id,
            ciphertext,
            stamp - 1,
            difficulty
        ));
    }
    json!({
        "difficulty": difficulty,
        "stamp": stamp,
        "preimage_hex": hex::encode(&preimage),
        "digest_hex": hex::encode(digest),
        "leading_zero_bits": bits,
    })
}

fn pow_vectors() -> Value {
    let intake: Vec<Value> = [
        (b"sealed bytes".to_vec(), 8),
        (counting(0, 200), 12),
        (b"sealed bytes".to_vec(), 16),
    ]
    .into_iter()
    .map(|(ciphertext, difficulty)| {
        let mut vector = json!({
            "sender_id_hex": hex::encode(sender_id()),
            "envelope_id_hex": hex::encode(envelope_id(0)),
            "ciphertext_hex": hex::encode(&ciphertext),
            "ciphertext_sha256_hex": hex::encode(Sha256::digest(&ciphertext)),
        });
        let stamp = intake_stamp_json(&sender_id(), &envelope_id(0), &ciphertext, difficulty);
        vector
            .as_object_mut()
            .unwrap()
            .extend(stamp.as_object().unwrap().clone());
        vector
    })
    .collect();
    let recipient = key(0x01);
    let random = [0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7];
    let create: Vec<Value> = [8u32, 12, 16]
        .into_iter()
        .map(|difficulty| {
            let recipient_key = public(&recipient);
            let nonce =
                pow::solve_create_nonce(&recipient_key, TIMESTAMP_MS, random, difficulty, u64::MAX)
                    .unwrap();
            let preimage = [
                &b"haven.v1.create-pow"[..],
                &32u64.to_be_bytes(),
                &recipient_key,
                &TIMESTAMP_MS.to_be_bytes(),
                &nonce,
            ]
            .concat();
            let digest = Sha256::digest(&preimage);
            let bits = leading_zero_bits(&digest);
            assert!(bits >= difficulty);
            assert!(pow::create_stamp_ok(
                &recipient_key,
                TIMESTAMP_MS,
                &nonce,
                bits
            ));
            assert!(!pow::create_stamp_ok(
                &recipient_key,
                TIMESTAMP_MS,
                &nonce,
                bits + 1
            ));
            let counter = u64::from_be_bytes(nonce[8..].try_into().unwrap());
            // The auth a stamped Create then carries: signed with that nonce.
            let auth = auth::sign_request(
                &recipient,
                Method::Create,
                &[],
                &[&[2]],
                TIMESTAMP_MS,
                nonce,
            );
            json!({
                "recipient_key": key_json(&recipient),
                "timestamp_ms": TIMESTAMP_MS,
                "random_hex": hex::encode(random),
                "difficulty": difficulty,
                "counter": counter,
                "nonce_hex": hex::encode(nonce),
                "preimage_hex": hex::encode(&preimage),
                "digest_hex": hex::encode(digest),
                "leading_zero_bits": bits,
                "kind": 2,
                "signature_hex": hex::encode(&auth.signature),
            })
        })
        .collect();
    json!({
        "about": "Proof-of-work stamps; see docs/wire.md section 5. `stamp` and `counter` are \
                  the smallest solutions counting from 0, so a solver that counts the same way \
                  finds the same value.",
        "intake": intake,
        "create": create,
    })
}

fn keys_vectors() -> Value {
    let device = key(0x03);
    let full = upload_request(&device);
    let mut bare = upload_request(&device);
    bare.signed_prekey = None;
    bare.kem_last_resort = None;
    bare.one_time_prekeys.clear();
    bare.kem_one_time_prekeys.clear();
    let supporter = key(0x04);
    let claim_nonce = counting(0xe0, 16);
    let stamp_input = keys::claim_stamp_input(TIMESTAMP_MS);
    assert_eq!(&stamp_input[..21], b"haven.v1.bundle-claim");
    let claims: Vec<Value> = [8u32, 12]
        .into_iter()
        .map(|difficulty| {
            let mut vector = json!({
                "supporter_key_hex": hex::encode(public(&supporter)),
                "claim_nonce_hex": hex::encode(&claim_nonce),
                "timestamp_ms": TIMESTAMP_MS,
                "stamp_input_hex": hex::encode(&stamp_input),
                "stamp_input_sha256_hex": hex::encode(Sha256::digest(&stamp_input)),
            });
            let stamp = stamp_json(&public(&supporter), &claim_nonce, &stamp_input, difficulty);
            vector
                .as_object_mut()
                .unwrap()
                .extend(stamp.as_object().unwrap().clone());
            vector
        })
        .collect();
    json!({
        "about": "The Keys service's rules; see docs/wire.md section 6. `uploads[0]` is the \
                  request whose digest auth.json's PublishPrekeys vector signs (device seed 03). \
                  A claim stamp is an intake stamp with the supporter key as sender id, the \
                  claim nonce as envelope id and stamp_input as ciphertext.",
        "device": key_json(&device),
        "uploads": [upload_json(&full), upload_json(&bare)],
        "claims": claims,
    })
}

fn document_json(kind: DocumentKind, body: Vec<u8>, signer: &SigningKey) -> Value {
    let payload = directory::signing_payload(kind, &body);
    let document = directory::sign(kind, body.clone(), signer);
    assert_eq!(
        auth::verify(&public(signer), &payload, &document.signature),
        Ok(())
    );
    json!({
        "signer": key_json(signer),
        "body_hex": hex::encode(&body),
        "payload_hex": hex::encode(&payload),
        "signature_hex": hex::encode(&document.signature),
        "signed_document_hex": hex::encode(document.encode_to_vec()),
    })
}

fn directory_vectors() -> Value {
    let association = key(0x05);
    let supporter = key(0x04);
    let entry = SupporterEntry {
        supporter_key: public(&supporter).to_vec(),
        display_name: "Kari Nordmann".into(),
        specialty: "general practice".into(),
        county: "Vestland".into(),
        town: "Bergen".into(),
        languages: vec!["nb".into(), "en".into()],
        valid_until: 1_798_761_600, // 2027-01-01T00:00:00Z
    };
    let list = DeviceList {
        supporter_key: public(&supporter).to_vec(),
        version: 1,
        devices: vec![DeviceEntry {
            identity_key: upload_request(&key(0x03)).identity_key,
            intake_sender_id: sender_id(),
        }],
        valid_until: 1_798_761_600,
    };
    let revocation = Revocation {
        supporter_key: public(&supporter).to_vec(),
        revoked_at: 1_767_225_600,
    };
    let mut entry_vector = document_json(
        DocumentKind::SupporterEntry,
        entry.encode_to_vec(),
        &association,
    );
    let entry_document = directory::sign(
        DocumentKind::SupporterEntry,
        entry.encode_to_vec(),
        &association,
    );
    let link = directory::supporter_link(&entry_document);
    assert_eq!(
        directory::parse_supporter_link(&link),
        Ok(entry_document.clone())
    );
    assert!(
        directory::verify_supporter_entry(
            &entry_document,
            &public(&association),
            1_767_225_600,
            &[]
        )
        .is_ok()
    );
    let fields = entry_vector.as_object_mut().unwrap();
    fields.insert(
        "entry".into(),
        json!({
            "supporter_key_hex": hex::encode(&entry.supporter_key),
            "display_name": entry.display_name,
            "specialty": entry.specialty,
            "county": entry.county,
            "town": entry.town,
            "languages": entry.languages,
            "valid_until": entry.valid_until,
        }),
    );
    fields.insert("link".into(), json!(link));
    let mut list_vector = document_json(DocumentKind::DeviceList, list.encode_to_vec(), &supporter);
    list_vector.as_object_mut().unwrap().insert(
        "device_list".into(),
        json!({
            "supporter_key_hex": hex::encode(&list.supporter_key),
            "version": list.version,
            "devices": list.devices.iter().map(|d| json!({
                "identity_key_hex": hex::encode(&d.identity_key),
                "intake_sender_id_hex": hex::encode(&d.intake_sender_id),
            })).collect::<Vec<_>>(),
            "valid_until": list.valid_until,
        }),
    );
    let mut revocation_vector = document_json(
        DocumentKind::Revocation,
        revocation.encode_to_vec(),
        &association,
    );
    revocation_vector.as_object_mut().unwrap().insert(
        "revocation".into(),
        json!({
            "supporter_key_hex": hex::encode(&revocation.supporter_key),
            "revoked_at": revocation.revoked_at,
        }),
    );
    json!({
        "about": "Directory documents; see docs/wire.md section 7. The association key is seed \
                  05, the supporter key seed 04. A signature covers the domain then the body \
                  exactly as it travels; `signed_document_hex` is the encoded SignedDocument.",
        "supporter_entry": entry_vector,
        "device_list": list_vector,
        "revocation": revocation_vector,
    })
}

#[test]
fn auth_vectors_match_the_file() {
    check_file("auth", &auth_vectors());
}

#[test]
fn pow_vectors_match_the_file() {
    check_file("pow", &pow_vectors());
}

#[test]
fn keys_vectors_match_the_file() {
    check_file("keys", &keys_vectors());
}

#[test]
fn directory_vectors_match_the_file() {
    check_file("directory", &directory_vectors());
}

/// The domains this test names are the ones the functions use.
#[test]
fn the_listed_domains_are_the_real_ones() {
    let request = auth::request_payload(Method::Delete, &[], 0, &[0; 16], &[]);
    assert_eq!(&request[..4], &21u32.to_be_bytes());
    assert_eq!(&request[4..25], DOMAINS[0].as_bytes());
    let send = auth::send_payload(&[], &[], 0, &[]);
    assert_eq!(&send[..4], &18u32.to_be_bytes());
    assert_eq!(&send[4..22], DOMAINS[1].as_bytes());
    // intake-pow, create-pow, intake-stamp and prekey-upload are checked through their preimages
    // in the vectors above.
    assert_eq!(&keys::claim_stamp_input(0)[..21], DOMAINS[4].as_bytes());
    for (kind, domain) in [
        (DocumentKind::SupporterEntry, DOMAINS[6]),
        (DocumentKind::DeviceList, DOMAINS[7]),
        (DocumentKind::Revocation, DOMAINS[8]),
    ] {
        assert_eq!(directory::signing_payload(kind, &[]), domain.as_bytes());
    }
}

/// `docs/wire.md` lists every domain in ASCII and hex, and every method name.
#[test]
fn the_document_names_every_domain_and_method() {
    let doc = std::fs::read_to_string(repo_root().join("docs/wire.md")).unwrap();
    for domain in DOMAINS {
        assert!(doc.contains(domain), "docs/wire.md does not name {domain}");
        assert!(
            doc.contains(&hex::encode(domain)),
            "docs/wire.md does not give {domain} in hex"
        );
    }
    for method in [
        Method::Create,
        Method::Secure,
        Method::Receive,
        Method::Fetch,
        Method::Ack,
        Method::Delete,
        Method::RegisterPush,
        Method::PublishPrekeys,
        Method::PrekeyCount,
        Method::SetCapacity,
    ] {
        let name = method.name();
        assert!(
            doc.contains(&format!("`{name}`")) && doc.contains(&hex::encode(name)),
            "docs/wire.md does not give method {name} (as `{name}` and in hex)"
        );
    }
}
