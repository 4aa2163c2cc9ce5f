//! Security properties as tests: tampering, replays, forward secrecy,
//! post-compromise recovery, swapped bundle keys, bounds.

use haven_protocol::{
    Device, HandshakeError, IdentityKeyPair, MAX_SKIP, MessageError, PrekeyBundle, SealError,
    Session, VerifyError, open, seal,
};

use super::{NOW, device_with_bundle, established, rng};

/// Flips one bit of every byte in turn and hands each copy to `check`.
fn every_tampered_copy(bytes: &[u8], mut check: impl FnMut(usize, &[u8])) {
    for index in 0..bytes.len() {
        let mut copy = bytes.to_vec();
        copy[index] ^= 0x01;
        check(index, &copy);
    }
}

#[test]
fn tampering_with_any_byte_of_a_bundle_fails_verification() {
    let mut rng = rng(10);
    let (_, bundle) = device_with_bundle(&mut rng);
    let bytes = bundle.to_bytes();
    assert_eq!(PrekeyBundle::from_bytes(&bytes).as_ref(), Ok(&bundle));
    every_tampered_copy(&bytes, |index, copy| {
        assert!(
            PrekeyBundle::from_bytes(copy).is_err(),
            "byte {index} of the bundle"
        );
    });
    assert!(PrekeyBundle::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    assert!(PrekeyBundle::from_bytes(&[bytes.clone(), vec![0]].concat()).is_err());
}

#[test]
fn tampering_with_any_byte_of_an_initial_message_fails_the_handshake() {
    let mut rng = rng(11);
    let (mut device, bundle) = device_with_bundle(&mut rng);
    let alice = IdentityKeyPair::generate(&mut rng);
    let mut session = Session::initiate(&alice, &bundle, &mut rng).unwrap();
    let initial = session.encrypt(b"first", &mut rng).unwrap();
    every_tampered_copy(&initial, |index, copy| {
        assert!(
            device.accept(copy, &mut rng).is_err(),
            "byte {index} of the initial message"
        );
    });
    // Nothing was consumed by the failures: the genuine message still works, once.
    let (_, plaintext) = device.accept(&initial, &mut rng).unwrap();
    assert_eq!(&plaintext[..], b"first");
    assert_eq!(
        device.accept(&initial, &mut rng).err(),
        Some(HandshakeError::Replay)
    );
}

#[test]
fn tampering_with_any_byte_of_a_ratchet_message_fails_decryption() {
    let (mut rng, _, mut alice, _, mut bob) = established(12);
    let message = alice.encrypt(b"ratchet", &mut rng).unwrap();
    every_tampered_copy(&message, |index, copy| {
        assert!(
            bob.decrypt(copy, &mut rng).is_err(),
            "byte {index} of the ratchet message"
        );
    });
    assert_eq!(&bob.decrypt(&message, &mut rng).unwrap()[..], b"ratchet");
}

#[test]
fn tampering_with_any_byte_of_a_sealed_envelope_fails_to_open() {
    let mut rng = rng(13);
    let sender = IdentityKeyPair::generate(&mut rng);
    let recipient = IdentityKeyPair::generate(&mut rng);
    let sealed = seal(&sender, recipient.public(), b"content", &mut rng).unwrap();
    every_tampered_copy(&sealed, |index, copy| {
        assert!(
            open(&recipient, copy).is_err(),
            "byte {index} of the sealed envelope"
        );
    });
    let (from, content) = open(&recipient, &sealed).unwrap();
    assert_eq!(&from, sender.public());
    assert_eq!(&content[..], b"content");
    // Only the addressed device can open it.
    let stranger = IdentityKeyPair::generate(&mut rng);
    assert_eq!(
        open(&stranger, &sealed).err(),
        Some(SealError::Authentication)
    );
}

#[test]
fn replayed_messages_are_refused() {
    let (mut rng, _, mut alice, _, mut bob) = established(14);
    let message = alice.encrypt(b"once", &mut rng).unwrap();
    bob.decrypt(&message, &mut rng).unwrap();
    assert_eq!(
        bob.decrypt(&message, &mut rng).err(),
        Some(MessageError::Duplicate)
    );
    // Also after the chain has moved on, and across a DH ratchet step.
    let later = alice.encrypt(b"later", &mut rng).unwrap();
    bob.decrypt(&later, &mut rng).unwrap();
    let answer = bob.encrypt(b"answer", &mut rng).unwrap();
    alice.decrypt(&answer, &mut rng).unwrap();
    let next = alice.encrypt(b"next chain", &mut rng).unwrap();
    bob.decrypt(&next, &mut rng).unwrap();
    assert_eq!(
        bob.decrypt(&message, &mut rng).err(),
        Some(MessageError::Duplicate)
    );
    assert_eq!(
        bob.decrypt(&later, &mut rng).err(),
        Some(MessageError::Duplicate)
    );
}

#[test]
fn an_initial_message_without_a_one_time_prekey_cannot_be_replayed() {
    let mut rng = rng(15);
    let mut device = Device::generate(NOW, &mut rng);
    let bundle = device.bundle(None, None).unwrap();
    assert!(!bundle.has_one_time_prekey());
    let alice = IdentityKeyPair::generate(&mut rng);
    let initial = Session::initiate(&alice, &bundle, &mut rng)
        .unwrap()
        .encrypt(b"hi", &mut rng)
        .unwrap();
    device.accept(&initial, &mut rng).unwrap();
    assert_eq!(
        device.accept(&initial, &mut rng).err(),
        Some(HandshakeError::Replay)
    );
    // Also after a restart from a snapshot.
    let mut restored = Device::from_snapshot(&device.to_snapshot()).unwrap();
    assert_eq!(
        restored.accept(&initial, &mut rng).err(),
        Some(HandshakeError::Replay)
    );
}

#[test]
fn a_one_time_prekey_is_used_once() {
    let mut rng = rng(16);
    let (mut device, bundle) = device_with_bundle(&mut rng);
    let first = Session::initiate(&IdentityKeyPair::generate(&mut rng), &bundle, &mut rng)
        .unwrap()
        .encrypt(b"a", &mut rng)
        .unwrap();
    let second = Session::initiate(&IdentityKeyPair::generate(&mut rng), &bundle, &mut rng)
        .unwrap()
        .encrypt(b"b", &mut rng)
        .unwrap();
    device.accept(&first, &mut rng).unwrap();
    assert_eq!(
        device.accept(&second, &mut rng).err(),
        Some(HandshakeError::UnknownOneTimePrekey)
    );
}

#[test]
fn forward_secrecy_a_snapshot_cannot_decrypt_what_was_already_received() {
    let (mut rng, _, mut alice, _, mut bob) = established(17);
    let old = alice.encrypt(b"said before the seizure", &mut rng).unwrap();
    assert!(bob.decrypt(&old, &mut rng).is_ok());
    // An attacker takes Bob's whole state now.
    let seized = bob.to_snapshot();
    let mut attacker = Session::from_snapshot(&seized).unwrap();
    assert_eq!(
        attacker.decrypt(&old, &mut rng).err(),
        Some(MessageError::Duplicate)
    );
    // Nor the handshake message from before: its keys are gone too.
    assert!(
        !seized
            .windows(b"said before".len())
            .any(|w| w == b"said before")
    );
}

#[test]
fn post_compromise_recovery_after_a_dh_ratchet_step() {
    let (mut rng, _, mut alice, _, mut bob) = established(18);
    // The attacker copies Alice's whole state and sees all traffic from now on.
    let mut attacker = Session::from_snapshot(&alice.to_snapshot()).unwrap();
    let mut attacker_rng = super::rng(999);
    // Alice's current sending key is compromised: Bob's answer to it is readable.
    let one = alice.encrypt(b"one", &mut rng).unwrap();
    bob.decrypt(&one, &mut rng).unwrap();
    let two = bob.encrypt(b"two", &mut rng).unwrap();
    assert_eq!(&alice.decrypt(&two, &mut rng).unwrap()[..], b"two");
    assert_eq!(
        &attacker.decrypt(&two, &mut attacker_rng).unwrap()[..],
        b"two"
    );
    // Receiving "two" made Alice draw a fresh ratchet key the attacker lacks...
    let three = alice.encrypt(b"three", &mut rng).unwrap();
    bob.decrypt(&three, &mut rng).unwrap();
    // ...so Bob's next chain is out of the attacker's reach: the session healed.
    let four = bob.encrypt(b"four", &mut rng).unwrap();
    assert_eq!(&alice.decrypt(&four, &mut rng).unwrap()[..], b"four");
    assert_eq!(
        attacker.decrypt(&four, &mut attacker_rng).err(),
        Some(MessageError::Authentication)
    );
}

#[test]
fn a_bundle_with_a_swapped_key_or_identity_is_refused() {
    let mut rng = rng(19);
    let (device, bundle) = device_with_bundle(&mut rng);
    let (other, other_bundle) = device_with_bundle(&mut rng);
    let bytes = bundle.to_bytes();
    let theirs = other_bundle.to_bytes();
    // Layout: tag, version, identity (128), signed prekey id (4), key (32), signature (64), ...
    let splice = |range: std::ops::Range<usize>| {
        let mut copy = bytes.clone();
        copy[range.clone()].copy_from_slice(&theirs[range]);
        PrekeyBundle::from_bytes(&copy)
    };
    let identity = 2..130;
    let signed_prekey = 134..166;
    let signed_prekey_and_signature = 134..230;
    let one_time_prekey = 235..267;
    assert_eq!(
        splice(identity).err(),
        Some(VerifyError::SignedPrekeySignature)
    );
    assert_eq!(
        splice(signed_prekey).err(),
        Some(VerifyError::SignedPrekeySignature)
    );
    // A validly signed prekey of another device, under this device's identity.
    assert_eq!(
        splice(signed_prekey_and_signature).err(),
        Some(VerifyError::SignedPrekeySignature)
    );
    assert_eq!(
        splice(one_time_prekey).err(),
        Some(VerifyError::OneTimePrekeySignature)
    );
    // The post-quantum prekey: the last 1184 + 64 bytes.
    let kem = bytes.len() - 64 - 1184..bytes.len() - 64;
    assert_eq!(splice(kem).err(), Some(VerifyError::KemPrekeySignature));
    let _ = (device, other);
}

#[test]
fn messages_too_far_ahead_are_refused_and_skipped_keys_are_bounded() {
    let (mut rng, _, mut alice, _, mut bob) = established(20);
    let mut messages: Vec<Vec<u8>> = (0..=MAX_SKIP + 1)
        .map(|n| alice.encrypt(format!("{n}").as_bytes(), &mut rng).unwrap())
        .collect();
    let too_far = messages.pop().unwrap();
    assert_eq!(
        bob.decrypt(&too_far, &mut rng).err(),
        Some(MessageError::TooFarAhead { max: MAX_SKIP })
    );
    // Exactly at the bound works, and every skipped one still decrypts afterwards.
    let last = messages.pop().unwrap();
    assert_eq!(
        &bob.decrypt(&last, &mut rng).unwrap()[..],
        format!("{MAX_SKIP}").as_bytes()
    );
    for (n, message) in messages.iter().enumerate().rev() {
        assert_eq!(
            &bob.decrypt(message, &mut rng).unwrap()[..],
            format!("{n}").as_bytes()
        );
    }
    assert_eq!(
        bob.decrypt(&too_far, &mut rng).unwrap()[..],
        *format!("{}", MAX_SKIP + 1).as_bytes()
    );
}

#[test]
fn garbage_never_panics_and_is_refused() {
    let (mut rng, alice_identity, mut alice, mut device, _) = established(21);
    for len in [0usize, 1, 2, 3, 10, 41, 42, 58, 100, 2000] {
        let garbage: Vec<u8> = (0..len).map(|n| (n * 37 % 251) as u8).collect();
        for tag in [0x10u8, 0x20, 0x21, 0x30, 0x40, 0x41] {
            let mut bytes = garbage.clone();
            if len >= 2 {
                bytes[0] = tag;
                bytes[1] = 1;
            }
            assert!(alice.decrypt(&bytes, &mut rng).is_err());
            assert!(device.accept(&bytes, &mut rng).is_err());
            assert!(open(&alice_identity, &bytes).is_err());
            assert!(PrekeyBundle::from_bytes(&bytes).is_err());
            assert!(Session::from_snapshot(&bytes).is_err());
            assert!(Device::from_snapshot(&bytes).is_err());
        }
    }
}

#[test]
fn safety_numbers_agree_on_both_sides_and_differ_between_conversations() {
    let (mut rng, _, alice, _, bob) = established(22);
    let number = alice.safety_number();
    assert_eq!(number, bob.safety_number());
    assert_eq!(number.digits().len(), 60);
    assert!(number.digits().chars().all(|c| c.is_ascii_digit()));
    assert_eq!(number.display().split(' ').count(), 12);
    // Another help-seeker talking to the same device sees a different number.
    let (_, bundle) = device_with_bundle(&mut rng);
    let other = Session::initiate(&IdentityKeyPair::generate(&mut rng), &bundle, &mut rng).unwrap();
    assert_ne!(other.safety_number(), number);
    assert_eq!(format!("{number:?}"), "SafetyNumber(..)");
}

#[test]
fn signed_prekey_rotation_keeps_the_previous_key_for_late_handshakes() {
    let mut rng = rng(23);
    let mut device = Device::generate(NOW, &mut rng);
    let old_bundle = device.bundle(None, None).unwrap();
    assert!(
        !device.rotate_prekeys_if_due(NOW + 60, &mut rng),
        "not due yet"
    );
    let week = haven_protocol::SIGNED_PREKEY_ROTATION_SECONDS;
    assert!(device.rotate_prekeys_if_due(NOW + week, &mut rng));
    let new_bundle = device.bundle(None, None).unwrap();
    assert_ne!(old_bundle.to_bytes(), new_bundle.to_bytes());
    let late = Session::initiate(&IdentityKeyPair::generate(&mut rng), &old_bundle, &mut rng)
        .unwrap()
        .encrypt(b"late", &mut rng)
        .unwrap();
    assert_eq!(&device.accept(&late, &mut rng).unwrap().1[..], b"late");
    // Two rotations later the old key is gone for good.
    assert!(device.rotate_prekeys_if_due(NOW + 2 * week, &mut rng));
    let too_late = Session::initiate(&IdentityKeyPair::generate(&mut rng), &old_bundle, &mut rng)
        .unwrap()
        .encrypt(b"x", &mut rng)
        .unwrap();
    assert_eq!(
        device.accept(&too_late, &mut rng).err(),
        Some(HandshakeError::UnknownSignedPrekey)
    );
}

#[test]
fn the_last_resort_kem_prekey_rotates_too_and_is_destroyed_after_one_more_week() {
    let mut rng = rng(24);
    let week = haven_protocol::SIGNED_PREKEY_ROTATION_SECONDS;
    let mut device = Device::generate(NOW, &mut rng);
    let first = device.published_prekeys();
    assert!(device.rotate_prekeys_if_due(NOW + week, &mut rng));
    let second = device.published_prekeys();
    assert_ne!(first.kem_last_resort.id, second.kem_last_resort.id);
    assert_ne!(
        first.kem_last_resort.public_key,
        second.kem_last_resort.public_key
    );
    // A first contact made with last week's KEM key (and this week's signed
    // prekey) still completes...
    let with_kem = |kem: &haven_protocol::PublicPrekey, rng: &mut rand_chacha::ChaCha20Rng| {
        let bundle =
            PrekeyBundle::from_parts(&second.identity, &device_signed(&second), None, kem).unwrap();
        Session::initiate(&IdentityKeyPair::generate(rng), &bundle, rng)
            .unwrap()
            .encrypt(b"first contact", rng)
            .unwrap()
    };
    let late = with_kem(&first.kem_last_resort, &mut rng);
    let refused_later = with_kem(&first.kem_last_resort, &mut rng);
    assert_eq!(
        &device.accept(&late, &mut rng).unwrap().1[..],
        b"first contact"
    );
    // ...one made to the key before it, after the next rotation, is refused.
    assert!(device.rotate_prekeys_if_due(NOW + 2 * week, &mut rng));
    let mut restored = Device::from_snapshot(&device.to_snapshot()).unwrap();
    assert_eq!(
        restored.accept(&refused_later, &mut rng).err(),
        Some(HandshakeError::UnknownKemPrekey),
        "its signed prekey is still kept, its KEM key is gone"
    );
    let third = restored.published_prekeys();
    let bundle = PrekeyBundle::from_parts(
        &third.identity,
        &device_signed(&third),
        None,
        &first.kem_last_resort,
    )
    .unwrap();
    let stale_kem = Session::initiate(&IdentityKeyPair::generate(&mut rng), &bundle, &mut rng)
        .unwrap()
        .encrypt(b"x", &mut rng)
        .unwrap();
    assert_eq!(
        restored.accept(&stale_kem, &mut rng).err(),
        Some(HandshakeError::UnknownKemPrekey)
    );
}

fn device_signed(published: &haven_protocol::PublishedPrekeys) -> haven_protocol::PublicPrekey {
    published.signed_prekey.clone()
}

#[test]
fn only_one_time_prekeys_never_published_are_uploaded_again() {
    let mut rng = rng(25);
    let mut device = Device::generate(NOW, &mut rng);
    device.generate_one_time_prekeys(3, &mut rng);
    assert_eq!(device.prekeys_to_publish().one_time.len(), 3);
    device.mark_published();
    let upload = device.prekeys_to_publish();
    assert!(upload.one_time.is_empty() && upload.kem_one_time.is_empty());
    device.generate_one_time_prekeys(2, &mut rng);
    let upload = device.prekeys_to_publish();
    assert_eq!((upload.one_time.len(), upload.kem_one_time.len()), (2, 2));
    let restored = Device::from_snapshot(&device.to_snapshot()).unwrap();
    assert_eq!(
        restored.prekeys_to_publish().one_time.len(),
        2,
        "the mark is kept"
    );
    assert_eq!(restored.published_prekeys().one_time.len(), 5);
}

#[test]
fn a_bundle_assembled_from_published_parts_equals_the_devices_own() {
    let mut rng = rng(24);
    let (device, bundle) = device_with_bundle(&mut rng);
    let published = device.published_prekeys();
    let assembled = PrekeyBundle::from_parts(
        &published.identity,
        &published.signed_prekey,
        published.one_time.first(),
        published.kem_one_time.first().unwrap(),
    )
    .unwrap();
    assert_eq!(assembled, bundle);
    // A part swapped in transit is refused, as in the encoded form.
    let mut forged = published.one_time[1].clone();
    forged.id = published.one_time[0].id;
    let refused = PrekeyBundle::from_parts(
        &published.identity,
        &published.signed_prekey,
        Some(&forged),
        &published.kem_last_resort,
    );
    assert_eq!(refused.err(), Some(VerifyError::OneTimePrekeySignature));
    let short = PrekeyBundle::from_parts(
        &published.identity[..127],
        &published.signed_prekey,
        None,
        &published.kem_last_resort,
    );
    assert!(short.is_err());
}

#[test]
fn a_rolled_back_session_never_reuses_a_keystream() {
    // Review 2026-12-crypto #2: restoring an older snapshot makes the chain
    // derive the same message key again. The per-message salt still gives the
    // second message its own ChaCha20 key and nonce.
    let (mut rng, _, alice, _, _) = established(26);
    let snapshot = alice.to_snapshot();
    let mut first = Session::from_snapshot(&snapshot).unwrap();
    let mut rolled_back = Session::from_snapshot(&snapshot).unwrap();
    let one = first.encrypt(&[0x11; 200], &mut rng).unwrap();
    let two = rolled_back.encrypt(&[0x22; 200], &mut rng).unwrap();
    assert_eq!(one.len(), two.len());
    let header = 58;
    let xor: Vec<u8> = one[header..]
        .iter()
        .zip(&two[header..])
        .map(|(a, b)| a ^ b)
        .collect();
    // Under one keystream, the XOR of the ciphertexts would be 0x11 ^ 0x22 = 0x33
    // over the whole text.
    assert!(
        xor[..200].iter().filter(|&&byte| byte == 0x33).count() < 20,
        "two plaintexts under one keystream"
    );
}

#[test]
fn a_device_at_its_one_time_prekey_cap_makes_room_by_dropping_the_oldest() {
    // Claims that never turn into a first contact leave one-time prekeys behind
    // on the device; at the cap, new ones must still be made (review follow-up).
    let mut rng = rng(27);
    let mut device = Device::generate(NOW, &mut rng);
    let cap = haven_protocol::MAX_ONE_TIME_PREKEYS;
    assert_eq!(device.generate_one_time_prekeys(cap, &mut rng), cap);
    let oldest = device.one_time_prekey_ids()[..20].to_vec();
    assert_eq!(device.generate_one_time_prekeys(20, &mut rng), 20);
    let ids = device.one_time_prekey_ids();
    assert_eq!(ids.len(), cap);
    assert_eq!(device.kem_one_time_prekey_ids().len(), cap);
    assert!(oldest.iter().all(|id| !ids.contains(id)), "the oldest went");
    assert_eq!(
        device.prekeys_to_publish().one_time.len(),
        cap,
        "none published yet"
    );
}

#[test]
fn the_safety_number_construction_is_pinned() {
    // Haven's own construction (see `safety`): a change of it changes what
    // people compare, so it is pinned by a known answer.
    let mut rng = rng(28);
    let a = IdentityKeyPair::generate(&mut rng);
    let b = IdentityKeyPair::generate(&mut rng);
    let number = haven_protocol::SafetyNumber::new(a.public(), b.public());
    assert_eq!(
        number,
        haven_protocol::SafetyNumber::new(b.public(), a.public())
    );
    assert_eq!(
        number.digits(),
        "021896637376132665654717766788550559287874219079956956783496"
    );
}
