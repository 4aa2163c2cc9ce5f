//! Mailbox ids, keys and the stored mailbox record.

macro_rules! opaque_bytes {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; $len]);

        impl $name {
            /// Length in bytes.
            pub const LEN: usize = $len;

            /// Wraps raw bytes.
            pub const fn from_bytes(bytes: [u8; $len]) -> Self {
                Self(bytes)
            }

            /// Parses a slice of exactly [`Self::LEN`] bytes.
            pub fn from_slice(bytes: &[u8]) -> Option<Self> {
                bytes.try_into().ok().map(Self)
            }

            /// The raw bytes.
            pub const fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }
        }

        /// Redacted: ids and keys never reach logs or error messages.
        impl ::std::fmt::Debug for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(concat!(stringify!($name), "(..)"))
            }
        }
    };
}
pub(crate) use opaque_bytes;

opaque_bytes!(
    /// A mailbox's recipient id: 16 random bytes that, with the recipient key, read it.
    MailboxId,
    16
);
opaque_bytes!(
    /// A mailbox's sender id: 16 random bytes, unrelated to the recipient id, to post with.
    SenderId,
    16
);
opaque_bytes!(
    /// An Ed25519 public key, stored as given; the relay verifies signatures with it.
    PublicKey,
    32
);

/// Where the relay sends a content-free wake-up when an envelope arrives for a
/// mailbox that no `Receive` stream watches. No `Debug` of its fields: the
/// endpoint and token identify a device's push channel.
#[derive(Clone, PartialEq, Eq)]
pub struct PushRegistration {
    /// The URL to POST to (a UnifiedPush endpoint or an app vendor's gateway).
    pub endpoint: String,
    /// Opaque bytes the wake-up carries, and nothing else.
    pub token: Vec<u8>,
}

impl std::fmt::Debug for PushRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PushRegistration(..)")
    }
}

impl PushRegistration {
    /// `endpoint length (u16) ‖ endpoint ‖ token`.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let endpoint = self.endpoint.as_bytes();
        let len = u16::try_from(endpoint.len()).unwrap_or(u16::MAX);
        let mut out = Vec::with_capacity(2 + endpoint.len() + self.token.len());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&endpoint[..usize::from(len)]);
        out.extend_from_slice(&self.token);
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let len = usize::from(u16::from_be_bytes(bytes.get(..2)?.try_into().ok()?));
        let endpoint = String::from_utf8(bytes.get(2..2 + len)?.to_vec()).ok()?;
        Some(Self {
            endpoint,
            token: bytes.get(2 + len..)?.to_vec(),
        })
    }
}

/// What a mailbox is for; the relay applies different admission rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MailboxKind {
    /// A conversation mailbox, which may be secured to one sender key.
    Private,
    /// A first-contact mailbox; sends need a proof-of-work stamp.
    Intake,
}

impl MailboxKind {
    pub(crate) fn to_byte(self) -> u8 {
        match self {
            MailboxKind::Private => 1,
            MailboxKind::Intake => 2,
        }
    }

    pub(crate) fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(MailboxKind::Private),
            2 => Some(MailboxKind::Intake),
            _ => None,
        }
    }
}

/// A stored mailbox: routing data only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MailboxRecord {
    /// The id to read with.
    pub recipient_id: MailboxId,
    /// The id to post with.
    pub sender_id: SenderId,
    /// The key that authenticates reads.
    pub recipient_key: PublicKey,
    /// Private or intake.
    pub kind: MailboxKind,
    /// When secured: the only key whose signed sends are accepted.
    pub sender_key: Option<PublicKey>,
    /// Seconds since the Unix epoch, rounded up to an expiry bucket's end by
    /// the store: the first sweep at or after it removes the mailbox with
    /// everything in it, unless [`MailboxStore::keep_until`](crate::MailboxStore::keep_until)
    /// moved it later (idle expiry, review F1). 0: the mailbox never expires
    /// by itself.
    pub idle_expires_at: u64,
}

impl MailboxRecord {
    /// A new, unsecured mailbox.
    pub fn new(
        recipient_id: MailboxId,
        sender_id: SenderId,
        recipient_key: PublicKey,
        kind: MailboxKind,
    ) -> Self {
        Self {
            recipient_id,
            sender_id,
            recipient_key,
            kind,
            sender_key: None,
            idle_expires_at: 0,
        }
    }

    /// The same record, removed by the first sweep after `at` if nobody keeps it.
    #[must_use]
    pub fn expiring_at(mut self, at: u64) -> Self {
        self.idle_expires_at = at;
        self
    }
}

/// Per-mailbox limits, checked atomically with each `put`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    /// Most envelopes stored at once.
    pub max_envelopes: u64,
    /// Most payload bytes stored at once.
    pub max_bytes: u64,
}

impl Default for Quota {
    fn default() -> Self {
        Self {
            max_envelopes: 10_000,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Checks a put against a quota, given the mailbox's current usage.
pub(crate) fn check_quota(
    quota: Quota,
    stored_envelopes: u64,
    stored_bytes: u64,
    adding: u64,
) -> Result<(), crate::StoreError> {
    if stored_envelopes >= quota.max_envelopes {
        return Err(crate::StoreError::CountQuota {
            stored: stored_envelopes,
            limit: quota.max_envelopes,
        });
    }
    if stored_bytes.saturating_add(adding) > quota.max_bytes {
        return Err(crate::StoreError::ByteQuota {
            stored: stored_bytes,
            adding,
            limit: quota.max_bytes,
        });
    }
    Ok(())
}
