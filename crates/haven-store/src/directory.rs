//! Prekeys, capacity and directory documents: what the relay keeps so that
//! help-seekers can find supporters and start sessions with their devices.
//!
//! Everything here is public material (signed documents, public prekeys) plus
//! one counter per supporter. Blobs are stored as the relay received them; the
//! store never parses them.

use crate::mailbox::opaque_bytes;
use crate::{BoxFuture, StoreError};

opaque_bytes!(
    /// The index of a device's prekeys: SHA-256 of its Ed25519 identity key.
    /// The relay never stores a device's identity outside the signed device
    /// list; it learns the key from each signed request and hashes it.
    DeviceKey,
    32
);
opaque_bytes!(
    /// A supporter's 32-byte Ed25519 key, from its association-signed entry.
    SupporterKey,
    32
);

/// Most one-time prekeys of each kind a device may have stored.
pub const MAX_ONE_TIME_PREKEYS: usize = 1000;

/// A device's prekey upload. Blobs are encoded prekey messages, opaque here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrekeyUpload {
    /// The signed prekey (replaces the stored one).
    pub signed_prekey: Vec<u8>,
    /// The last-resort KEM prekey (replaces the stored one).
    pub kem_last_resort: Vec<u8>,
    /// One-time X25519 prekeys to add, by id.
    pub one_time: Vec<(u32, Vec<u8>)>,
    /// One-time KEM prekeys to add, by id.
    pub kem_one_time: Vec<(u32, Vec<u8>)>,
}

/// How many one-time prekeys a device has left.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrekeyCount {
    /// One-time X25519 prekeys.
    pub one_time: u32,
    /// One-time KEM prekeys.
    pub kem_one_time: u32,
}

/// One device's bundle, as claimed: each one-time prekey in it is handed out once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimedBundle {
    /// The device.
    pub device: DeviceKey,
    /// Its signed prekey.
    pub signed_prekey: Vec<u8>,
    /// A one-time X25519 prekey, if one was left.
    pub one_time: Option<Vec<u8>>,
    /// A one-time KEM prekey if one was left, else the last-resort one.
    pub kem: Vec<u8>,
}

/// Documents of one kind with their supporters, ordered by supporter key.
pub type Documents = Vec<(SupporterKey, Vec<u8>)>;

/// The kinds of directory document the store keeps, one of each per supporter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DocumentKind {
    /// The association-signed supporter entry.
    Entry,
    /// The supporter-signed device list (versioned).
    DeviceList,
    /// The association-signed revocation.
    Revocation,
}

impl DocumentKind {
    /// Whether documents of this kind carry a version that may not go back:
    /// entries (their `valid_until`) and device lists (their `version`).
    pub fn is_versioned(self) -> bool {
        matches!(self, DocumentKind::Entry | DocumentKind::DeviceList)
    }

    pub(crate) fn to_byte(self) -> u8 {
        match self {
            DocumentKind::Entry => 1,
            DocumentKind::DeviceList => 2,
            DocumentKind::Revocation => 3,
        }
    }
}

/// The relay's storage of prekeys, capacity and directory documents. Every
/// method is atomic; writes are durable when they return.
pub trait DirectoryStore: Send + Sync + 'static {
    /// Replaces the device's signed and last-resort prekeys and adds one-time
    /// prekeys (an id already stored is replaced, not counted twice). Refuses
    /// with [`StoreError::TooManyPrekeys`] past [`MAX_ONE_TIME_PREKEYS`].
    fn publish_prekeys<'a>(
        &'a self,
        device: &'a DeviceKey,
        upload: PrekeyUpload,
    ) -> BoxFuture<'a, Result<PrekeyCount, StoreError>>;

    /// The device's one-time prekey counts; `None` if it never published.
    fn prekey_count<'a>(
        &'a self,
        device: &'a DeviceKey,
    ) -> BoxFuture<'a, Result<Option<PrekeyCount>, StoreError>>;

    /// Sets a supporter's remaining capacity for new conversations.
    fn set_capacity<'a>(
        &'a self,
        supporter: &'a SupporterKey,
        capacity: u32,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// A supporter's remaining capacity (0 when never set).
    fn capacity<'a>(
        &'a self,
        supporter: &'a SupporterKey,
    ) -> BoxFuture<'a, Result<u32, StoreError>>;

    /// Removes everything stored for the device's prekeys (a device taken off
    /// its supporter's list, or of a revoked supporter). Nothing if none.
    fn remove_prekeys<'a>(&'a self, device: &'a DeviceKey)
    -> BoxFuture<'a, Result<(), StoreError>>;

    /// Atomically takes one unit of the supporter's capacity and one bundle per
    /// listed device, removing the one-time prekeys handed out.
    /// [`StoreError::CapacityExhausted`] when the capacity is 0;
    /// [`StoreError::NoPrekeys`] (and nothing taken) when a listed device has
    /// not published prekeys: a help-seeker's client needs one bundle per
    /// listed device (review 2026-12-crypto #16), so a partial answer would
    /// spend the capacity and the other devices' one-time prekeys for nothing.
    fn claim_bundles<'a>(
        &'a self,
        supporter: &'a SupporterKey,
        devices: &'a [DeviceKey],
    ) -> BoxFuture<'a, Result<Vec<ClaimedBundle>, StoreError>>;

    /// Stores a supporter's document of `kind`, replacing the previous one.
    /// Entries and device lists are versioned ([`DocumentKind::is_versioned`]):
    /// `version` must not be lower than the stored one
    /// ([`StoreError::StaleDocument`]), and an equal version is accepted only
    /// with identical bytes ([`StoreError::ConflictingDocument`]). The check and
    /// the write are one atomic step (review F16).
    fn put_document<'a>(
        &'a self,
        kind: DocumentKind,
        supporter: &'a SupporterKey,
        document: Vec<u8>,
        version: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// A supporter's document of `kind`.
    fn document<'a>(
        &'a self,
        kind: DocumentKind,
        supporter: &'a SupporterKey,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>>;

    /// Every document of `kind`, ordered by supporter key.
    fn documents(&self, kind: DocumentKind) -> BoxFuture<'_, Result<Documents, StoreError>>;
}
