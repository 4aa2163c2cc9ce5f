//! Safety numbers: a fingerprint of two identities that both sides compute
//! identically and compare out of band (read aloud, or scan).
//!
//! Haven's own safety number, built the way libsignal's numeric fingerprint
//! (version 0, `NumericFingerprintGenerator`) is: per identity, start from
//! `version ‖ key ‖ stable id` and apply `hash = SHA-512(hash ‖ key)` 5200
//! times; the first 30 bytes of the result become six 5-digit groups (each
//! 5-byte chunk, big-endian, mod 100 000). The two 30-digit halves are ordered
//! so that both sides show the same 60 digits.
//!
//! It is *not* interoperable with Signal's, and does not claim to be (review
//! 2026-12-crypto #13): the key fingerprinted is the identity's 32-byte Ed25519
//! key (which signs its X25519 key), with no key-type byte, and the stable id
//! is the constant "haven", since Haven identities have no phone number or
//! account behind them. A known-answer vector is pinned in the tests
//! (`security::the_safety_number_construction_is_pinned`).

use sha2::{Digest, Sha512};

use crate::IdentityKey;

const VERSION: [u8; 2] = [0, 0];
const ITERATIONS: usize = 5200;
const STABLE_ID: &[u8] = b"haven";

/// Sixty digits both sides of a conversation see alike.
#[derive(Clone, PartialEq, Eq)]
pub struct SafetyNumber {
    digits: String,
}

impl SafetyNumber {
    /// The safety number of a conversation between `local` and `remote`.
    pub fn new(local: &IdentityKey, remote: &IdentityKey) -> Self {
        let mut halves = [half(local), half(remote)];
        halves.sort();
        Self {
            digits: halves.concat(),
        }
    }

    /// The 60 digits without spaces.
    pub fn digits(&self) -> &str {
        &self.digits
    }

    /// Twelve groups of five digits, as shown to a user.
    pub fn display(&self) -> String {
        let groups: Vec<&str> = (0..12)
            .filter_map(|group| self.digits.get(group * 5..group * 5 + 5))
            .collect();
        groups.join(" ")
    }
}

/// Not secret, but comparing numbers in logs would defeat their purpose.
impl std::fmt::Debug for SafetyNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SafetyNumber(..)")
    }
}

fn half(identity: &IdentityKey) -> String {
    let key = identity.signing_key().as_bytes();
    // The first round hashes the starting bytes, as libsignal's does.
    let mut hash = Sha512::new()
        .chain_update(VERSION)
        .chain_update(key)
        .chain_update(STABLE_ID)
        .chain_update(key)
        .finalize();
    for _ in 1..ITERATIONS {
        hash = Sha512::new()
            .chain_update(hash)
            .chain_update(key)
            .finalize();
    }
    (0..6)
        .map(|chunk| {
            let bytes = &hash[chunk * 5..chunk * 5 + 5];
            let value = bytes
                .iter()
                .fold(0u64, |acc, byte| (acc << 8) | u64::from(*byte));
            format!("{:05}", value % 100_000)
        })
        .collect()
}
