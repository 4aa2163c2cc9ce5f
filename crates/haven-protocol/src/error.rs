//! Typed errors. None carries key material, plaintext or identifiers.

/// Why bytes could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Fewer bytes than the format needs.
    #[error("input is truncated")]
    Truncated,
    /// Bytes left over after a complete value.
    #[error("input has trailing bytes")]
    TrailingBytes,
    /// A different kind of value (e.g. a session where a device was expected).
    #[error("expected format tag {expected}, found {found}")]
    WrongFormat {
        /// The tag this parser reads.
        expected: u8,
        /// The tag found.
        found: u8,
    },
    /// A format version this build does not read.
    #[error("unsupported format version {found}")]
    UnsupportedVersion {
        /// The version found.
        found: u8,
    },
    /// A length or count above the format's bound.
    #[error("a field is longer than the allowed {max}")]
    TooLong {
        /// The bound.
        max: usize,
    },
    /// A field that does not hold a valid value (a key that is not a point, an
    /// unknown enum value).
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// Why a prekey bundle or an identity was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The bytes do not parse.
    #[error("malformed: {0}")]
    Malformed(#[from] DecodeError),
    /// The identity's signature over its own X25519 key does not verify.
    #[error("identity key signature does not verify")]
    IdentitySignature,
    /// The signed prekey's signature does not verify.
    #[error("signed prekey signature does not verify")]
    SignedPrekeySignature,
    /// The one-time X25519 prekey's signature does not verify.
    #[error("one-time prekey signature does not verify")]
    OneTimePrekeySignature,
    /// The ML-KEM prekey's signature does not verify.
    #[error("post-quantum prekey signature does not verify")]
    KemPrekeySignature,
}

/// Why establishing a session failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The bytes do not parse.
    #[error("malformed: {0}")]
    Malformed(#[from] DecodeError),
    /// The initiator's identity does not verify.
    #[error("initiator identity does not verify")]
    BadIdentity,
    /// The message names a signed prekey this device does not have (rotated out
    /// long ago, or never ours).
    #[error("unknown signed prekey")]
    UnknownSignedPrekey,
    /// The message names a one-time prekey that is gone: already used (a replay)
    /// or never ours.
    #[error("one-time prekey unknown or already used")]
    UnknownOneTimePrekey,
    /// The message names an ML-KEM prekey this device does not have.
    #[error("unknown post-quantum prekey")]
    UnknownKemPrekey,
    /// This initial message was already accepted (a replay).
    #[error("initial message was already accepted")]
    Replay,
    /// A Diffie-Hellman output was all zeros (a small-order point).
    #[error("key agreement produced a non-contributory result")]
    NonContributory,
    /// The first ratchet message inside does not decrypt.
    #[error("first message does not decrypt: {0}")]
    Message(#[from] MessageError),
}

/// Why a message could not be encrypted or decrypted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// The bytes do not parse.
    #[error("malformed: {0}")]
    Malformed(#[from] DecodeError),
    /// Authentication failed: tampered, wrong session, or wrong key.
    #[error("message does not authenticate")]
    Authentication,
    /// A message with this number in this chain was already decrypted (a
    /// duplicate or replay), or its key was evicted.
    #[error("message already received or its key is gone")]
    Duplicate,
    /// The message is further ahead than the skip bound allows.
    #[error("message is more than {max} messages ahead of its chain")]
    TooFarAhead {
        /// The bound on skipped messages per chain.
        max: u32,
    },
    /// The plaintext is larger than the largest padding bucket.
    #[error("plaintext of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Plaintext length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The padding inside an authenticated message is malformed (a bug in the
    /// sender, since the ciphertext authenticated).
    #[error("padding is malformed")]
    Padding,
    /// A Diffie-Hellman output was all zeros (a small-order point).
    #[error("key agreement produced a non-contributory result")]
    NonContributory,
    /// The sending chain is not set up (never happens on a valid session).
    #[error("session has no sending chain")]
    NoSendingChain,
}

/// Why a sealed envelope could not be opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The bytes do not parse.
    #[error("malformed: {0}")]
    Malformed(#[from] DecodeError),
    /// The envelope is not for this device, or was tampered with.
    #[error("sealed envelope does not authenticate")]
    Authentication,
    /// The sender's identity inside does not verify.
    #[error("sender identity does not verify")]
    BadSender,
    /// A Diffie-Hellman output was all zeros (a small-order point).
    #[error("key agreement produced a non-contributory result")]
    NonContributory,
}
