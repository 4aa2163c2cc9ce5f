//! Padding plaintexts to size buckets before encryption, so the relay learns
//! little from lengths.
//!
//! Buckets are powers of two from 256 bytes to 32 KiB. A chat message almost
//! always fits the first bucket, so most envelopes look alike; the few long ones
//! reveal only their power of two. Padmé would waste less on large messages but
//! leak more distinct sizes for the short ones that dominate here. The padding is
//! ISO/IEC 7816-4: a 0x80 byte, then zeros, removable without a length field.

use crate::MessageError;

/// The smallest bucket.
pub const MIN_BUCKET: usize = 256;
/// The largest bucket. An envelope must stay under the relay's 64 KiB limit with
/// the ratchet, handshake and sealing overhead (about 1.5 KiB at most).
pub const MAX_BUCKET: usize = 32 * 1024;
/// The largest plaintext that can be sent (one byte goes to the padding marker).
pub const MAX_PLAINTEXT: usize = MAX_BUCKET - 1;

/// The bucket a plaintext of `len` bytes is padded to.
pub fn bucket_for(len: usize) -> Option<usize> {
    let needed = len.checked_add(1)?;
    let bucket = needed.max(MIN_BUCKET).checked_next_power_of_two()?;
    (bucket <= MAX_BUCKET).then_some(bucket)
}

/// Pads `plaintext` to its bucket.
pub fn pad(plaintext: &[u8]) -> Result<Vec<u8>, MessageError> {
    let bucket = bucket_for(plaintext.len()).ok_or(MessageError::TooLarge {
        len: plaintext.len(),
        max: MAX_PLAINTEXT,
    })?;
    let mut out = Vec::with_capacity(bucket);
    out.extend_from_slice(plaintext);
    out.push(0x80);
    out.resize(bucket, 0);
    Ok(out)
}

/// Removes the padding.
pub fn unpad(padded: &[u8]) -> Result<&[u8], MessageError> {
    let end = padded
        .iter()
        .rposition(|byte| *byte != 0)
        .ok_or(MessageError::Padding)?;
    if padded[end] != 0x80 {
        return Err(MessageError::Padding);
    }
    Ok(&padded[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two_from_256() {
        assert_eq!(bucket_for(0), Some(256));
        assert_eq!(bucket_for(255), Some(256));
        assert_eq!(bucket_for(256), Some(512));
        assert_eq!(bucket_for(1000), Some(1024));
        assert_eq!(bucket_for(MAX_PLAINTEXT), Some(MAX_BUCKET));
        assert_eq!(bucket_for(MAX_BUCKET), None);
        assert_eq!(bucket_for(usize::MAX), None);
    }

    #[test]
    fn pad_roundtrips_including_trailing_zeros_and_markers() {
        for plaintext in [&b""[..], b"hello", &[0u8; 10], &[0x80; 300], &[0x80, 0, 0]] {
            let padded = pad(plaintext).unwrap_or_default();
            assert_eq!(
                padded.len(),
                bucket_for(plaintext.len()).unwrap_or_default()
            );
            assert_eq!(unpad(&padded), Ok(plaintext));
        }
        assert!(matches!(
            pad(&vec![1; MAX_BUCKET]),
            Err(MessageError::TooLarge { .. })
        ));
        assert_eq!(unpad(&[0; 256]), Err(MessageError::Padding));
        assert_eq!(unpad(&[1, 2, 0]), Err(MessageError::Padding));
    }

    proptest::proptest! {
        #[test]
        fn unpad_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = unpad(&bytes);
        }

        #[test]
        fn pad_unpad_roundtrip(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..3000)) {
            let padded = pad(&bytes).map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            proptest::prop_assert_eq!(unpad(&padded), Ok(&bytes[..]));
        }
    }
}
