//! The proof-of-work stamps: of a `Send` to an intake mailbox, of a bundle
//! claim and of a `Create`.
//!
//! Hashcash over SHA-256. An intake stamp ([`intake_stamp_ok`]) is a `u64`
//! nonce such that `SHA-256("haven.v1.intake-stamp" ‖ sender_id ‖ envelope_id ‖
//! SHA-256(ciphertext) ‖ timestamp_ms ‖ nonce)` starts with at least
//! `difficulty` zero bits. It binds the mailbox, the envelope id, the exact
//! ciphertext and the time it was made (`SendRequest.pow_timestamp_ms`), so a
//! stamp cannot be reused for another envelope or another supporter, and the
//! relay accepts it only within its stamp window and remembers it for that
//! window: a replayed first contact is a duplicate even after it was
//! acknowledged, and an old one is refused (review 2026-12 second fresh
//! review H-1: without the time, one saved request refilled an intake
//! forever). The relay publishes its current difficulty and window in
//! `GetInfo`.
//!
//! A claim stamp ([`verify`]) is the same hashcash under its own domain
//! (`"haven.v1.intake-pow"`, kept from the first format) over (supporter key,
//! claim nonce, [`crate::keys::claim_stamp_input`]), which binds the time.
//!
//! `Create` can cost a stamp too ([`create_stamp_ok`]): there the stamp is the
//! request's signed 16-byte `Auth.nonce`, ground until
//! `SHA-256("haven.v1.create-pow" ‖ len‖recipient key ‖ timestamp ‖ nonce)`
//! has the intake difficulty, so it needs no new wire field, is covered by the
//! signature, and is spent with it (the relay refuses a signature twice).

use sha2::{Digest, Sha256};

/// Domain separator of claim stamps; a new stamp format gets a new string.
const DOMAIN: &[u8] = b"haven.v1.intake-pow";
/// Domain separator of intake stamps (the second format: bound to a time).
const INTAKE_DOMAIN: &[u8] = b"haven.v1.intake-stamp";

/// The highest difficulty a relay may demand. 2^32 hashes is minutes of work on
/// a phone already; beyond that intake would be closed in practice.
pub const MAX_DIFFICULTY: u32 = 32;

fn prefix(sender_id: &[u8], envelope_id: &[u8], ciphertext: &[u8]) -> Sha256 {
    prefix_in(DOMAIN, sender_id, envelope_id, ciphertext)
}

fn prefix_in(domain: &[u8], sender_id: &[u8], envelope_id: &[u8], ciphertext: &[u8]) -> Sha256 {
    let mut hasher = Sha256::new();
    hasher.update(domain);
    hasher.update((sender_id.len() as u64).to_be_bytes());
    hasher.update(sender_id);
    hasher.update((envelope_id.len() as u64).to_be_bytes());
    hasher.update(envelope_id);
    hasher.update(Sha256::digest(ciphertext));
    hasher
}

fn leading_zero_bits(digest: &[u8]) -> u32 {
    let mut bits = 0;
    for byte in digest {
        if *byte == 0 {
            bits += 8;
        } else {
            return bits + byte.leading_zeros();
        }
    }
    bits
}

/// Domain separator of `Create` stamps.
const CREATE_DOMAIN: &[u8] = b"haven.v1.create-pow";

fn create_prefix(recipient_key: &[u8], timestamp_ms: u64) -> Sha256 {
    let mut hasher = Sha256::new();
    hasher.update(CREATE_DOMAIN);
    hasher.update((recipient_key.len() as u64).to_be_bytes());
    hasher.update(recipient_key);
    hasher.update(timestamp_ms.to_be_bytes());
    hasher
}

/// True when the `Create` request's `Auth.nonce` is a stamp of at least
/// `difficulty` bits: `SHA-256("haven.v1.create-pow" ‖ u64 BE length of
/// recipient_key ‖ recipient_key ‖ timestamp_ms as u64 BE ‖ nonce)` starts with
/// `difficulty` zero bits. `timestamp_ms` is the request's signed `Auth.timestamp_ms`.
pub fn create_stamp_ok(
    recipient_key: &[u8],
    timestamp_ms: u64,
    nonce: &[u8; 16],
    difficulty: u32,
) -> bool {
    let mut hasher = create_prefix(recipient_key, timestamp_ms);
    hasher.update(nonce);
    leading_zero_bits(&hasher.finalize()) >= difficulty
}

/// Grinds a `Create` nonce: `random` in its first 8 bytes, a counter from 0 in
/// its last 8 (big-endian), until [`create_stamp_ok`] holds; `None` after
/// `max_attempts` tries or above [`MAX_DIFFICULTY`]. Sign the request with
/// the nonce found and the same `timestamp_ms`.
pub fn solve_create_nonce(
    recipient_key: &[u8],
    timestamp_ms: u64,
    random: [u8; 8],
    difficulty: u32,
    max_attempts: u64,
) -> Option<[u8; 16]> {
    if difficulty > MAX_DIFFICULTY {
        return None;
    }
    let base = create_prefix(recipient_key, timestamp_ms);
    (0..max_attempts).find_map(|counter| {
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&random);
        nonce[8..].copy_from_slice(&counter.to_be_bytes());
        let mut hasher = base.clone();
        hasher.update(nonce);
        (leading_zero_bits(&hasher.finalize()) >= difficulty).then_some(nonce)
    })
}

fn intake_prefix(
    sender_id: &[u8],
    envelope_id: &[u8],
    ciphertext: &[u8],
    timestamp_ms: u64,
) -> Sha256 {
    let mut hasher = prefix_in(INTAKE_DOMAIN, sender_id, envelope_id, ciphertext);
    hasher.update(timestamp_ms.to_be_bytes());
    hasher
}

/// True when `stamp` is an intake stamp of at least `difficulty` bits for this
/// envelope made at `timestamp_ms`: `SHA-256("haven.v1.intake-stamp" ‖ u64 BE
/// length ‖ sender_id ‖ u64 BE length ‖ envelope_id ‖ SHA-256(ciphertext) ‖
/// timestamp_ms as u64 BE ‖ stamp as u64 BE)` starts with `difficulty` zero
/// bits. Whether the time is recent enough is the relay's to check.
pub fn intake_stamp_ok(
    sender_id: &[u8],
    envelope_id: &[u8],
    ciphertext: &[u8],
    timestamp_ms: u64,
    stamp: u64,
    difficulty: u32,
) -> bool {
    let mut hasher = intake_prefix(sender_id, envelope_id, ciphertext, timestamp_ms);
    hasher.update(stamp.to_be_bytes());
    leading_zero_bits(&hasher.finalize()) >= difficulty
}

/// Searches nonces `0..max_attempts` for an intake stamp of `difficulty` bits
/// made at `timestamp_ms` (send it as `pow_timestamp_ms`); `None` as
/// [`solve`]. Stamp every attempt afresh: the relay accepts a stamp only
/// within its window (`GetInfo`).
pub fn solve_intake(
    sender_id: &[u8],
    envelope_id: &[u8],
    ciphertext: &[u8],
    timestamp_ms: u64,
    difficulty: u32,
    max_attempts: u64,
) -> Option<u64> {
    if difficulty > MAX_DIFFICULTY {
        return None;
    }
    let base = intake_prefix(sender_id, envelope_id, ciphertext, timestamp_ms);
    (0..max_attempts).find(|nonce| {
        let mut hasher = base.clone();
        hasher.update(nonce.to_be_bytes());
        leading_zero_bits(&hasher.finalize()) >= difficulty
    })
}

/// True when `stamp` is a claim-domain stamp of at least `difficulty` bits
/// over these inputs (a bundle claim: supporter key, claim nonce,
/// [`crate::keys::claim_stamp_input`]).
pub fn verify(
    sender_id: &[u8],
    envelope_id: &[u8],
    ciphertext: &[u8],
    stamp: u64,
    difficulty: u32,
) -> bool {
    let mut hasher = prefix(sender_id, envelope_id, ciphertext);
    hasher.update(stamp.to_be_bytes());
    leading_zero_bits(&hasher.finalize()) >= difficulty
}

/// Searches nonces `0..max_attempts` for a stamp of `difficulty` bits; `None` when
/// none was found in that many attempts (or the difficulty exceeds
/// [`MAX_DIFFICULTY`]). Expected work is `2^difficulty` hashes.
pub fn solve(
    sender_id: &[u8],
    envelope_id: &[u8],
    ciphertext: &[u8],
    difficulty: u32,
    max_attempts: u64,
) -> Option<u64> {
    if difficulty > MAX_DIFFICULTY {
        return None;
    }
    let base = prefix(sender_id, envelope_id, ciphertext);
    (0..max_attempts).find(|nonce| {
        let mut hasher = base.clone();
        hasher.update(nonce.to_be_bytes());
        leading_zero_bits(&hasher.finalize()) >= difficulty
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solved_stamp_verifies_and_is_bound_to_its_envelope() {
        let stamp = solve(
            b"sender-id-16byte",
            b"envelope-id-16by",
            b"ct",
            12,
            u64::MAX,
        );
        let stamp = stamp.unwrap_or_default();
        assert!(verify(
            b"sender-id-16byte",
            b"envelope-id-16by",
            b"ct",
            stamp,
            12
        ));
        assert!(!verify(
            b"sender-id-16byte",
            b"envelope-id-16by",
            b"cu",
            stamp,
            12
        ));
        assert!(!verify(
            b"sender-id-16byte",
            b"envelope-id-16bz",
            b"ct",
            stamp,
            12
        ));
        assert!(!verify(
            b"sender-id-16bytf",
            b"envelope-id-16by",
            b"ct",
            stamp,
            12
        ));
    }

    #[test]
    fn a_create_nonce_is_bound_to_its_key_and_timestamp() {
        let key = [7u8; 32];
        let nonce = solve_create_nonce(&key, 1_000, [1; 8], 12, u64::MAX).unwrap_or_default();
        assert!(create_stamp_ok(&key, 1_000, &nonce, 12));
        assert!(!create_stamp_ok(&key, 1_001, &nonce, 12));
        assert!(!create_stamp_ok(&[8u8; 32], 1_000, &nonce, 12));
        assert_eq!(&nonce[..8], &[1; 8]);
        assert_eq!(
            solve_create_nonce(&key, 1, [0; 8], MAX_DIFFICULTY + 1, 10),
            None
        );
    }

    /// The format the SDK implements: pinned, so that a change is deliberate.
    #[test]
    fn create_stamp_input_is_pinned() {
        let mut hasher = Sha256::new();
        hasher.update(b"haven.v1.create-pow");
        hasher.update(32u64.to_be_bytes());
        hasher.update([7u8; 32]);
        hasher.update(1_000u64.to_be_bytes());
        hasher.update([3u8; 16]);
        let expected = leading_zero_bits(&hasher.finalize());
        assert!(create_stamp_ok(&[7; 32], 1_000, &[3; 16], expected));
        assert!(!create_stamp_ok(&[7; 32], 1_000, &[3; 16], expected + 1));
    }

    #[test]
    fn an_intake_stamp_is_bound_to_its_time_and_not_to_the_claim_domain() {
        let (sender, id, ct) = (b"sender-id-16byte", b"envelope-id-16by", b"ct");
        let stamp = solve_intake(sender, id, ct, 5_000, 12, u64::MAX).unwrap_or_default();
        assert!(intake_stamp_ok(sender, id, ct, 5_000, stamp, 12));
        assert!(!intake_stamp_ok(sender, id, ct, 5_001, stamp, 12));
        assert!(!intake_stamp_ok(sender, id, b"cu", 5_000, stamp, 12));
        let mut hasher = Sha256::new();
        hasher.update(b"haven.v1.intake-stamp");
        hasher.update(16u64.to_be_bytes());
        hasher.update(sender);
        hasher.update(16u64.to_be_bytes());
        hasher.update(id);
        hasher.update(Sha256::digest(ct));
        hasher.update(5_000u64.to_be_bytes());
        hasher.update(stamp.to_be_bytes());
        assert!(
            leading_zero_bits(&hasher.finalize()) >= 12,
            "the pinned preimage"
        );
        let claim = solve(sender, id, ct, 12, u64::MAX).unwrap_or_default();
        assert!(verify(sender, id, ct, claim, 12));
        assert_eq!(
            solve_intake(sender, id, ct, 1, MAX_DIFFICULTY + 1, 10),
            None
        );
    }

    #[test]
    fn zero_difficulty_accepts_anything() {
        assert!(verify(b"a", b"b", b"c", 12345, 0));
    }

    #[test]
    fn leading_zero_bits_counts_across_bytes() {
        assert_eq!(leading_zero_bits(&[0, 0, 0x10, 0xff]), 19);
        assert_eq!(leading_zero_bits(&[0x80]), 0);
        assert_eq!(leading_zero_bits(&[0, 0]), 16);
    }

    #[test]
    fn impossible_difficulty_is_refused_not_looped() {
        assert_eq!(solve(b"a", b"b", b"c", MAX_DIFFICULTY + 1, u64::MAX), None);
        assert_eq!(solve(b"a", b"b", b"c", 30, 10).filter(|_| false), None);
    }
}
