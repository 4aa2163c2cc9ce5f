//! Snapshot tests of every wire and state format: a seeded run produces the same
//! bytes every time, and their digests are pinned here, so a silent change of
//! any format (or of how randomness is drawn) fails a test. A deliberate change
//! bumps the format's version byte and updates these digests.

use haven_protocol::{Device, IdentityKeyPair, Session, seal};
use sha2::{Digest, Sha256};

use super::{NOW, rng};

struct Formats {
    bundle: Vec<u8>,
    initial: Vec<u8>,
    ratchet: Vec<u8>,
    sealed: Vec<u8>,
    device: Vec<u8>,
    session: Vec<u8>,
}

fn produce() -> Formats {
    let mut rng = rng(42);
    let mut device = Device::generate(NOW, &mut rng);
    device.generate_one_time_prekeys(2, &mut rng);
    let bundle = device
        .bundle(
            Some(device.one_time_prekey_ids()[0]),
            Some(device.kem_one_time_prekey_ids()[0]),
        )
        .unwrap();
    let alice = IdentityKeyPair::generate(&mut rng);
    let mut outbound = Session::initiate(&alice, &bundle, &mut rng).unwrap();
    let initial = outbound.encrypt(b"format test", &mut rng).unwrap();
    let (mut inbound, _) = device.accept(&initial, &mut rng).unwrap();
    let ratchet = inbound.encrypt(b"reply", &mut rng).unwrap();
    let sealed = seal(
        device.identity(),
        &alice.public().clone(),
        &ratchet,
        &mut rng,
    )
    .unwrap();
    outbound.decrypt(&ratchet, &mut rng).unwrap();
    Formats {
        bundle: bundle.to_bytes(),
        initial,
        ratchet,
        sealed,
        device: device.to_snapshot().to_vec(),
        session: outbound.to_snapshot().to_vec(),
    }
}

fn digest(bytes: &[u8]) -> String {
    format!(
        "{}:{}",
        bytes.len(),
        &hex::encode(Sha256::digest(bytes))[..16]
    )
}

#[test]
fn formats_are_deterministic_and_pinned() {
    let first = produce();
    let again = produce();
    for (name, a, b) in [
        ("bundle", &first.bundle, &again.bundle),
        ("initial", &first.initial, &again.initial),
        ("ratchet", &first.ratchet, &again.ratchet),
        ("sealed", &first.sealed, &again.sealed),
        ("device", &first.device, &again.device),
        ("session", &first.session, &again.session),
    ] {
        assert_eq!(a, b, "{name} is not deterministic under a seeded RNG");
    }
    let found = [
        ("bundle", digest(&first.bundle)),
        ("initial", digest(&first.initial)),
        ("ratchet", digest(&first.ratchet)),
        ("sealed", digest(&first.sealed)),
        ("device", digest(&first.device)),
        ("session", digest(&first.session)),
    ];
    let pinned = [
        ("bundle", "1584:709dfdb75f7156b5"),
        ("initial", "1597:3741205edb705f7f"),
        ("ratchet", "330:e803a97d3c5ddaab"),
        ("sealed", "524:b786446b0ce6aaa3"),
        ("device", "344:3a65d16c9e6ddd0b"),
        ("session", "507:5ed229f91cc1051b"),
    ];
    let found: Vec<(&str, &str)> = found
        .iter()
        .map(|(name, digest)| (*name, digest.as_str()))
        .collect();
    assert_eq!(
        found, pinned,
        "a format changed: length and digest prefix per format"
    );
}

#[test]
fn every_format_leads_with_its_tag_and_version() {
    let formats = produce();
    // Version 2 of the initial message binds the handshake transcript in its key
    // derivation; of the ratchet message, a per-message salt; of the device, the
    // rotating last-resort KEM prekey and the published-prekey mark.
    for (bytes, tag, version) in [
        (&formats.bundle, 0x10, 1),
        (&formats.initial, 0x20, 2),
        (&formats.ratchet, 0x21, 2),
        (&formats.sealed, 0x30, 1),
        (&formats.device, 0x40, 2),
        (&formats.session, 0x41, 1),
    ] {
        assert_eq!(&bytes[..2], &[tag, version]);
    }
    // Sizes the relay sees: a short message pads to the first bucket. The
    // header is tag, version, ratchet key, two counters and the 16-byte salt.
    assert_eq!(formats.ratchet.len(), 58 + 256 + 16);
    assert_eq!(
        formats.sealed.len(),
        2 + 32 + 128 + 16 + formats.ratchet.len() + 16
    );
}

#[test]
fn snapshots_restore_exactly() {
    let formats = produce();
    let device = Device::from_snapshot(&formats.device).unwrap();
    assert_eq!(&device.to_snapshot()[..], &formats.device[..]);
    let session = Session::from_snapshot(&formats.session).unwrap();
    assert_eq!(&session.to_snapshot()[..], &formats.session[..]);
}
