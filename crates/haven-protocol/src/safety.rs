//! Safety numbers: a fingerprint of two identities that both sides compute
//! identically and compare out of band (read aloud, or scan).
//!
//! Signal's numeric fingerprint, version 0: per identity, SHA-512 iterated 5200
//! times over (version ‖ key ‖ stable id), then ‖ key on each round; the first 30
//! bytes become six 5-digit groups (each 5-byte chunk mod 100 000). The two
//! 30-digit halves are ordered so that both sides show the same 60 digits.
//! The key fingerprinted is the identity's Ed25519 key, which signs its X25519
//! key; the stable id is the constant "haven", since Haven identities have no
//! phone number or account behind them.

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
    let mut hash = Sha512::new()
        .chain_update(VERSION)
        .chain_update(key)
        .chain_update(STABLE_ID)
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
