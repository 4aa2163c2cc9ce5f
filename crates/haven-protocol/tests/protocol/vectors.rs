//! Known-answer tests pinning the primitives exactly as this crate calls them:
//! RFC 7748 (X25519), RFC 8439 (ChaCha20-Poly1305), RFC 5869 (HKDF-SHA256).

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use x25519_dalek::{PublicKey, StaticSecret};

/// Hex decoding for test vectors (panics on bad hex: a typo in a vector).
fn h<const N: usize>(text: &str) -> [u8; N] {
    let bytes = hex::decode(text.split_whitespace().collect::<String>()).expect("hex");
    bytes.try_into().expect("length")
}

#[test]
fn rfc7748_x25519_scalar_multiplication() {
    // Section 5.2, first vector, through StaticSecret::diffie_hellman as used here.
    let scalar = h::<32>("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4");
    let u = h::<32>("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c");
    let expected = h::<32>("c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552");
    let shared = StaticSecret::from(scalar).diffie_hellman(&PublicKey::from(u));
    assert_eq!(shared.as_bytes(), &expected);
}

#[test]
fn rfc7748_x25519_diffie_hellman() {
    // Section 6.1.
    let alice = StaticSecret::from(h::<32>(
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
    ));
    let bob = StaticSecret::from(h::<32>(
        "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
    ));
    let alice_public = PublicKey::from(&alice);
    let bob_public = PublicKey::from(&bob);
    assert_eq!(
        alice_public.as_bytes(),
        &h::<32>("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    );
    assert_eq!(
        bob_public.as_bytes(),
        &h::<32>("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    );
    let shared = h::<32>("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
    assert_eq!(alice.diffie_hellman(&bob_public).as_bytes(), &shared);
    assert_eq!(bob.diffie_hellman(&alice_public).as_bytes(), &shared);
}

#[test]
fn rfc8439_chacha20_poly1305_aead() {
    // Section 2.8.2, through the same calls the ratchet and sealing use.
    let key = h::<32>("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f");
    let nonce = h::<12>("070000004041424344454647");
    let aad = h::<12>("50515253c0c1c2c3c4c5c6c7");
    let plaintext = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
    let expected = h::<130>(
        "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6
         3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36
         92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc
         3ff4def08e4b7a9de576d26586cec64b6116
         1ae10b594f09e26a7e902ecbd0600691",
    );
    let cipher = ChaCha20Poly1305::new(&Key::from(key));
    let sealed = cipher
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .unwrap();
    assert_eq!(sealed, expected);
    let opened = cipher
        .decrypt(
            &Nonce::from(nonce),
            Payload {
                msg: &sealed,
                aad: &aad,
            },
        )
        .unwrap();
    assert_eq!(opened, plaintext);
}

#[test]
fn rfc5869_hkdf_sha256() {
    // Test case 1, with Hkdf::new(Some(salt), ikm).expand(info) as kdf.rs calls it.
    let ikm = [0x0b; 22];
    let salt = h::<13>("000102030405060708090a0b0c");
    let info = h::<10>("f0f1f2f3f4f5f6f7f8f9");
    let mut okm = [0u8; 42];
    hkdf::Hkdf::<sha2::Sha256>::new(Some(&salt), &ikm)
        .expand(&info, &mut okm)
        .unwrap();
    assert_eq!(
        okm,
        h::<42>(
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        )
    );
}
