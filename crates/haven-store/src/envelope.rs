//! Envelopes as the store sees them: an id, a coarse expiry and opaque bytes.

use crate::mailbox::opaque_bytes;
use crate::replay::SpentStamp;

opaque_bytes!(
    /// A client-chosen 16-byte envelope id; duplicates are detected by it.
    EnvelopeId,
    16
);

/// An envelope to store.
#[derive(Clone)]
pub struct NewEnvelope {
    /// The sender's id for it.
    pub id: EnvelopeId,
    /// When it may be deleted, seconds since the Unix epoch. The store rounds it
    /// up to the end of its expiry bucket and keeps only that.
    pub expires_at: u64,
    /// The sealed bytes, opaque to the relay.
    pub payload: Vec<u8>,
    /// For a first contact: its stamp, remembered in the same atomic step as
    /// the put until the stamp's window passes. While it is remembered, a put
    /// of the same digest answers [`crate::PutOutcome::Duplicate`] and stores
    /// nothing, even after the envelope was acknowledged or expired (second
    /// fresh review H-1). `None` for every other envelope: a resend after an
    /// ack is stored again.
    pub spent: Option<SpentStamp>,
}

/// Redacted: neither the id nor the payload reach logs.
impl std::fmt::Debug for NewEnvelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewEnvelope")
            .field("len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

/// A stored envelope, as listed.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredEnvelope {
    /// Position in the mailbox's arrival order (per mailbox, starts at 1).
    pub seq: u64,
    /// The sender's id for it.
    pub id: EnvelopeId,
    /// End of its expiry bucket, seconds since the Unix epoch.
    pub expires_at: u64,
    /// The bytes as sent.
    pub payload: Vec<u8>,
}

/// Redacted: neither the id nor the payload reach logs.
impl std::fmt::Debug for StoredEnvelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredEnvelope")
            .field("seq", &self.seq)
            .field("len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

/// The end of the expiry bucket holding `expires_at`: the smallest multiple of
/// `bucket_seconds` that is not before it. Rounding up means an envelope is never
/// deleted before the expiry its sender asked for; it may be kept up to one bucket
/// longer, which the relay's retention statement says.
pub fn bucket_end(expires_at: u64, bucket_seconds: u64) -> u64 {
    let width = bucket_seconds.max(1);
    expires_at.div_ceil(width).saturating_mul(width)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_end_rounds_up_to_the_boundary() {
        assert_eq!(bucket_end(3600, 3600), 3600);
        assert_eq!(bucket_end(3601, 3600), 7200);
        assert_eq!(bucket_end(1, 3600), 3600);
        assert_eq!(bucket_end(17, 1), 17);
        assert_eq!(bucket_end(17, 0), 17);
        assert_eq!(
            bucket_end(u64::MAX, 3600),
            u64::MAX,
            "saturates instead of wrapping"
        );
    }
}
