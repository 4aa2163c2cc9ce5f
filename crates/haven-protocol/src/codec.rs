//! The byte format shared by every wire and state encoding of this crate: a
//! leading format tag and version, fixed-width big-endian integers, and
//! length-prefixed byte strings with an upper bound. Parsed once, at the boundary.

use crate::DecodeError;

/// Builds an encoding.
///
/// Snapshots hold secrets, so the buffer never reallocates in place: when it
/// must grow it moves to a buffer twice the size and the old one is zeroed
/// before it is freed (review 2026-12-crypto #15), and snapshot writers start
/// with room for what they write.
#[derive(Default)]
pub(crate) struct Writer {
    bytes: Vec<u8>,
}

impl Writer {
    pub(crate) fn new(tag: u8, version: u8) -> Self {
        Self::with_capacity(tag, version, 64)
    }

    /// A writer with room for `capacity` bytes before it must grow.
    pub(crate) fn with_capacity(tag: u8, version: u8, capacity: usize) -> Self {
        let mut bytes = Vec::with_capacity(capacity.max(2));
        bytes.extend_from_slice(&[tag, version]);
        Self { bytes }
    }

    fn extend(&mut self, value: &[u8]) {
        let needed = self.bytes.len().saturating_add(value.len());
        if needed > self.bytes.capacity() {
            let mut grown = Vec::with_capacity(needed.max(self.bytes.capacity().saturating_mul(2)));
            grown.extend_from_slice(&self.bytes);
            zeroize::Zeroize::zeroize(&mut self.bytes);
            self.bytes = grown;
        }
        self.bytes.extend_from_slice(value);
    }

    pub(crate) fn u8(&mut self, value: u8) -> &mut Self {
        self.extend(&[value]);
        self
    }

    pub(crate) fn u32(&mut self, value: u32) -> &mut Self {
        self.extend(&value.to_be_bytes());
        self
    }

    pub(crate) fn u64(&mut self, value: u64) -> &mut Self {
        self.extend(&value.to_be_bytes());
        self
    }

    /// Fixed-size bytes whose length the reader knows.
    pub(crate) fn fixed(&mut self, value: &[u8]) -> &mut Self {
        self.extend(value);
        self
    }

    /// Variable-size bytes, prefixed with their length as u32.
    pub(crate) fn var(&mut self, value: &[u8]) -> &mut Self {
        self.u32(u32::try_from(value.len()).unwrap_or(u32::MAX));
        self.extend(value);
        self
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.bytes
    }
}

/// Parses an encoding, refusing anything truncated, oversized or trailing.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Checks the leading tag and version.
    pub(crate) fn new(bytes: &'a [u8], tag: u8, version: u8) -> Result<Self, DecodeError> {
        let mut reader = Self { bytes };
        let found_tag = reader.u8()?;
        if found_tag != tag {
            return Err(DecodeError::WrongFormat {
                expected: tag,
                found: found_tag,
            });
        }
        let found_version = reader.u8()?;
        if found_version != version {
            return Err(DecodeError::UnsupportedVersion {
                found: found_version,
            });
        }
        Ok(reader)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(crate) fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < len {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.bytes.split_at(len);
        self.bytes = tail;
        Ok(head)
    }

    /// Length-prefixed bytes of at most `max` bytes.
    pub(crate) fn var(&mut self, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(DecodeError::TooLong { max });
        }
        self.take(len)
    }

    /// A count of items that follow, each at least `min_item` bytes, checked
    /// against what is left so that a forged count cannot make us allocate.
    pub(crate) fn count(&mut self, min_item: usize, max: usize) -> Result<usize, DecodeError> {
        let count = self.u32()? as usize;
        if count > max || count.saturating_mul(min_item) > self.bytes.len() {
            return Err(DecodeError::TooLong { max });
        }
        Ok(count)
    }

    /// Whatever is left.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes)
        }
    }
}
