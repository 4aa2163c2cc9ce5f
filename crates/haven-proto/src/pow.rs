//! The proof-of-work stamp that a `Send` to an intake mailbox must carry.
//!
//! Hashcash over SHA-256: the stamp is a `u64` nonce such that
//! `SHA-256(domain ‖ sender_id ‖ envelope_id ‖ SHA-256(ciphertext) ‖ nonce)` starts
//! with at least `difficulty` zero bits. It binds the mailbox, the envelope id and
//! the exact ciphertext, so a stamp cannot be reused for another envelope or
//! another supporter. The relay publishes its current difficulty in `GetInfo`.

use sha2::{Digest, Sha256};

/// Domain separator of stamps; a new stamp format gets a new string.
const DOMAIN: &[u8] = b"haven.v1.intake-pow";

/// The highest difficulty a relay may demand. 2^32 hashes is minutes of work on
/// a phone already; beyond that intake would be closed in practice.
pub const MAX_DIFFICULTY: u32 = 32;

fn prefix(sender_id: &[u8], envelope_id: &[u8], ciphertext: &[u8]) -> Sha256 {
    let mut hasher = Sha256::new();
    hasher.update(DOMAIN);
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

/// True when `stamp` is a valid stamp of at least `difficulty` bits for this envelope.
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
