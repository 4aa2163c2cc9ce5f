//! The shared record of accepted signed requests, so that a replay is refused
//! after a restart and on every relay sharing the store (review F13).
//!
//! What it keeps, and why that reveals nothing: one [`RequestDigest`] per
//! accepted request, a SHA-256 under its own label of the request's Ed25519
//! signature, with an expiry rounded up to [`RECORD_SECONDS`] and at most the
//! relay's auth window ahead (about two minutes). No mailbox id, key, method,
//! address or time finer than the rounding. The signature it is computed from
//! is unpredictable to anyone but the signer (its `R` half comes from the
//! signer's secret and the message, which holds a random nonce), so the digest
//! can be matched only by someone who already holds the signature, that is who
//! saw the request itself; and without the signed message an Ed25519 signature
//! cannot even be tied to a public key. What remains is how many signed
//! requests were accepted in each 10 s over the last two minutes, which anyone
//! watching the live relay sees anyway. A key for the hash would add nothing:
//! every relay node must share it, so it would sit next to the records.
//!
//! On sled the records go through the log like every other write, so they
//! are on disk before the request is answered and survive a crash; their
//! bytes may linger in sled's files after the sweep removes them (as every
//! deleted value does, spacejam/sled#1512), which shows the counts above and
//! nothing more. On Redis they are `SET NX EXAT` keys that expire by
//! themselves; a failover that loses a record not yet replicated lets that
//! one request be replayed once more within its window.

use sha2::{Digest, Sha256};

use crate::{EnvelopeId, SenderId};

/// Record expiries are rounded up to a multiple of this many seconds, so the
/// store keeps no finer time.
pub const RECORD_SECONDS: u64 = 10;

/// What the store keeps of an accepted signed request: a hash of its
/// signature (see the module documentation for why it reveals nothing).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestDigest([u8; 32]);

impl RequestDigest {
    /// The digest of a request carrying this Ed25519 signature.
    pub fn of_signature(signature: &[u8; 64]) -> Self {
        Self(
            Sha256::new()
                .chain_update(b"haven.v1.replay-record")
                .chain_update(signature)
                .finalize()
                .into(),
        )
    }

    /// The digest of a first contact: the intake's sender id and the
    /// envelope id its stamp binds, under a label of its own. Like a
    /// signature, an envelope id is random and seen only by its sender, the
    /// relay and the recipient, so the digest can be matched only by someone
    /// who already holds the envelope.
    pub fn of_first_contact(sender_id: &SenderId, envelope_id: &EnvelopeId) -> Self {
        Self(
            Sha256::new()
                .chain_update(b"haven.v1.first-contact-record")
                .chain_update(sender_id.as_bytes())
                .chain_update(envelope_id.as_bytes())
                .finalize()
                .into(),
        )
    }

    /// A digest from its bytes (for stores reading their own records).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for RequestDigest {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("RequestDigest(..)")
    }
}

/// What the store remembers of a first contact's stamp (see
/// [`crate::NewEnvelope::spent`]): its digest, until a time (seconds since the
/// Unix epoch, rounded up as [`record_until`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpentStamp {
    /// [`RequestDigest::of_first_contact`].
    pub digest: RequestDigest,
    /// Remembered while `until` is after now.
    pub until: u64,
}

/// `until` rounded up to a multiple of [`RECORD_SECONDS`]: what a store keeps
/// as a record's expiry.
pub fn record_until(until: u64) -> u64 {
    until
        .div_ceil(RECORD_SECONDS)
        .saturating_mul(RECORD_SECONDS)
}
