//! The relay's storage of mailboxes and envelopes.
//!
//! One trait, [`MailboxStore`], with an in-memory backend ([`MemoryStore`], for
//! tests and ephemeral relays), an embedded on-disk backend ([`SledStore`], the
//! relay's default) and a Redis Cluster backend ([`RedisStore`], for several
//! relays sharing one store), all held to one [`conformance`] suite.
//!
//! What a store keeps, and nothing else: a mailbox's two ids, its recipient key,
//! its kind and optional sender key, a per-mailbox arrival counter and its usage
//! totals; envelopes with their client-chosen id and an expiry rounded up to a
//! coarse bucket; and, for about two minutes, a hash of each signed request
//! the relay accepted ([`RequestDigest`], so replays are refused on every
//! node and after a restart). No sender, no client address, no time finer
//! than the bucket (10 s for request records).
//!
//! Beside mailboxes, [`DirectoryStore`] keeps prekeys, each supporter's capacity
//! and the signed directory documents: public material and one counter.
//!
//! What it deliberately does not do: verify signatures or proof-of-work (the
//! relay's job), know anything of the end-to-end format inside an envelope.
//!
//! The sled and Redis backends seal every envelope under the key of its expiry
//! bucket and destroy that key once the bucket has passed, so bytes left behind
//! in sled's log, a copy of the data directory or a Redis replica become
//! unreadable (crypto-shredding; see [`SledStore`] and [`RedisStore`]).
//!
//! ```
//! use haven_store::*;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let store = MemoryStore::new(StoreConfig::default());
//! let mailbox = MailboxRecord::new(MailboxId::from_bytes([1; 16]), SenderId::from_bytes([2; 16]),
//!     PublicKey::from_bytes([3; 32]), MailboxKind::Private);
//! store.create_mailbox(mailbox.clone()).await.unwrap();
//! let now = 1_000;
//! let envelope = NewEnvelope { id: EnvelopeId::from_bytes([4; 16]), expires_at: now + 60,
//!     payload: b"opaque".to_vec(), spent: None };
//! store.put(&mailbox.recipient_id, envelope, Quota::default(), now).await.unwrap();
//! let stored = store.list(&mailbox.recipient_id, None, 10, now).await.unwrap();
//! assert_eq!(stored[0].payload, b"opaque");
//! # });
//! ```

mod directory;
mod envelope;
mod epoch;
mod mailbox;
mod memory;
mod redis_store;
mod replay;
mod sled_store;
mod wake;
mod wal;

pub mod conformance;
#[cfg(feature = "test-cluster")]
pub mod test_cluster;

use std::future::Future;
use std::pin::Pin;

pub use directory::{
    ClaimedBundle, DeviceKey, DirectoryStore, DocumentKind, Documents, MAX_ONE_TIME_PREKEYS,
    PrekeyCount, PrekeyUpload, SupporterKey,
};
pub use envelope::{EnvelopeId, NewEnvelope, StoredEnvelope, bucket_end};
pub use mailbox::{
    MailboxId, MailboxKind, MailboxRecord, PublicKey, PushRegistration, Quota, SenderId,
};
pub use memory::MemoryStore;
pub use redis_store::{RedisConfig, RedisStore};
pub use replay::{RECORD_SECONDS, RequestDigest, SpentStamp, record_until};
pub use sled_store::{SledConfig, SledStore};
pub use wake::Subscription;

/// Everything a relay stores: mailboxes and the directory. Every backend
/// implements both halves and passes the whole [`conformance`] suite.
pub trait Store: MailboxStore + DirectoryStore {}

impl<T: MailboxStore + DirectoryStore> Store for T {}

/// A boxed future, so that [`MailboxStore`] can be used as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Settings every backend shares.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Width of an expiry bucket in seconds. Expiry times are rounded up to a
    /// multiple of it (the store keeps nothing finer), and the on-disk backend
    /// keeps one at-rest key per bucket. Default: one hour.
    pub bucket_seconds: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            bucket_seconds: 3600,
        }
    }
}

/// Whether a `put` stored a new envelope or found the same id already stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// The envelope is new and now durable.
    Stored,
    /// An unexpired envelope with this id was already stored; nothing changed.
    Duplicate,
}

/// What a `put` requires of the mailbox's sender key, checked in the same
/// atomic step as the write. The relay authorizes a send against the record it
/// read (signed by the sender key, or unsigned while there is none); if
/// `Secure` ran in between, the write must not land (review F19).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SenderCheck {
    /// Store whatever the sender key is.
    Any,
    /// Store only if the mailbox's sender key is still exactly this one
    /// (`None`: the mailbox is still unsecured); otherwise
    /// [`StoreError::SenderKeyChanged`].
    Expect(Option<PublicKey>),
}

impl SenderCheck {
    /// Whether a record carrying `current` passes the check.
    pub fn allows(self, current: Option<PublicKey>) -> bool {
        match self {
            Self::Any => true,
            Self::Expect(expected) => expected == current,
        }
    }
}

/// What one sweep removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Envelopes deleted because their expiry had passed.
    pub expired_envelopes: u64,
    /// Expiry buckets whose at-rest key was destroyed.
    pub shredded_buckets: u64,
    /// Mailboxes removed, with everything in them, because their idle expiry
    /// passed ([`MailboxRecord::idle_expires_at`]).
    pub expired_mailboxes: u64,
}

/// Totals over the whole store, for metrics and the relay's storage budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Mailboxes stored (on Redis: in the whole cluster, as last counted).
    pub mailboxes: u64,
    /// Envelopes stored (including expired ones not yet swept). On Redis: the
    /// changes made through this node since it started (metrics only).
    pub envelopes: u64,
    /// Envelope payload bytes stored. On Redis: as `envelopes`; the budget
    /// uses `memory` there instead.
    pub bytes: u64,
    /// For backends whose limit is their servers' memory (Redis): the fullest
    /// server's use, as last measured.
    pub memory: Option<MemoryUse>,
    /// Envelopes a listing skipped since start because they did not open
    /// (corruption, or on Redis a bucket key lost in a failover): each is
    /// left out of its mailbox's listings instead of failing them all.
    pub unreadable_envelopes: u64,
}

/// One server's memory, as it reports it (Redis `INFO memory`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryUse {
    /// Bytes in use (`used_memory`).
    pub used: u64,
    /// Its configured limit (`maxmemory`); 0 when it has none.
    pub limit: u64,
}

/// Why a store operation failed. Messages carry no ids, keys or contents.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No mailbox has this id.
    #[error("mailbox not found")]
    MailboxNotFound,
    /// A mailbox with this recipient or sender id already exists (a random-id
    /// collision; the caller draws new ids).
    #[error("mailbox id already in use")]
    IdInUse,
    /// The mailbox is already secured to a different sender key.
    #[error("mailbox is already secured to another sender key")]
    AlreadySecured,
    /// The mailbox's sender key is not the one the write was authorized
    /// against: it was secured meanwhile.
    #[error("the mailbox's sender key changed while the envelope was being checked")]
    SenderKeyChanged,
    /// Storing the envelope would exceed the mailbox's envelope count quota.
    #[error("mailbox is full: it holds {stored} envelopes, the limit is {limit}")]
    CountQuota {
        /// Envelopes stored now.
        stored: u64,
        /// The quota.
        limit: u64,
    },
    /// Storing the envelope would exceed the mailbox's byte quota.
    #[error(
        "mailbox is full: it holds {stored} bytes, adding {adding} would pass the limit of {limit}"
    )]
    ByteQuota {
        /// Bytes stored now.
        stored: u64,
        /// Bytes of the refused envelope.
        adding: u64,
        /// The quota.
        limit: u64,
    },
    /// The envelope's expiry is not in the future.
    #[error("envelope expiry is not in the future")]
    AlreadyExpired,
    /// The storage engine failed (disk, corruption); details are in the log.
    #[error("storage failure: {0}")]
    Backend(String),
    /// The backend would keep data on disk that Haven promises is not kept
    /// (a Redis node with snapshots, an append-only file or disk-based
    /// replication), or cannot be checked; the relay refuses to use it.
    #[error("the store would keep a record on disk: {0}")]
    Persists(String),
    /// The backend is unreachable or could not confirm a write in time (a Redis
    /// failover in progress, replicas behind); the operation may be retried.
    #[error("storage temporarily unavailable: {0}")]
    Unavailable(String),
    /// The store is closed (the relay is shutting down).
    #[error("store is closed")]
    Closed,
    /// The supporter's capacity for new conversations is used up.
    #[error("not taking new conversations")]
    CapacityExhausted,
    /// A device in the supporter's list has not published prekeys (yet).
    #[error("a device of this supporter has not published prekeys yet")]
    NoPrekeys,
    /// A device would hold more one-time prekeys than allowed.
    #[error("a device may hold at most {limit} one-time prekeys of each kind")]
    TooManyPrekeys {
        /// The bound.
        limit: usize,
    },
    /// A versioned document (a supporter entry or a device list) older than
    /// the one stored.
    #[error("document version {found} is older than the stored version {stored}")]
    StaleDocument {
        /// The stored version.
        stored: u64,
        /// The offered version.
        found: u64,
    },
    /// A versioned document with the stored version but other bytes: two
    /// documents may not share a version (a signer's fork, or a replay of one
    /// that was replaced).
    #[error("a different document with version {version} is stored")]
    ConflictingDocument {
        /// The version both carry.
        version: u64,
    },
}

/// The relay's storage. All methods are safe to call concurrently; every
/// mutation is atomic, and `put` returns only once the envelope is durable (as
/// durable as the backend can make it: see each backend's documentation).
///
/// `now` arguments are seconds since the Unix epoch, from the caller's clock.
pub trait MailboxStore: Send + Sync + 'static {
    /// Stores a new mailbox. Fails with [`StoreError::IdInUse`] if either id exists.
    fn create_mailbox(&self, record: MailboxRecord) -> BoxFuture<'_, Result<(), StoreError>>;

    /// The mailbox with this recipient id, if any.
    fn mailbox<'a>(
        &'a self,
        id: &'a MailboxId,
    ) -> BoxFuture<'a, Result<Option<MailboxRecord>, StoreError>>;

    /// The mailbox with this sender id, if any.
    fn mailbox_by_sender<'a>(
        &'a self,
        id: &'a SenderId,
    ) -> BoxFuture<'a, Result<Option<MailboxRecord>, StoreError>>;

    /// Registers the mailbox's one sender key. Idempotent for the same key;
    /// [`StoreError::AlreadySecured`] for another.
    fn secure<'a>(
        &'a self,
        id: &'a MailboxId,
        sender_key: PublicKey,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Appends an envelope to the mailbox, after the quota check, unless an
    /// unexpired envelope with the same id is stored. Returns once durable.
    /// Whatever the sender key: [`MailboxStore::put_checked`] with
    /// [`SenderCheck::Any`].
    fn put<'a>(
        &'a self,
        id: &'a MailboxId,
        envelope: NewEnvelope,
        quota: Quota,
        now: u64,
    ) -> BoxFuture<'a, Result<PutOutcome, StoreError>> {
        self.put_checked(id, envelope, quota, now, SenderCheck::Any)
    }

    /// [`MailboxStore::put`], refused with [`StoreError::SenderKeyChanged`]
    /// unless the mailbox's sender key passes `sender`, checked atomically with
    /// the write (before the duplicate and quota checks).
    fn put_checked<'a>(
        &'a self,
        id: &'a MailboxId,
        envelope: NewEnvelope,
        quota: Quota,
        now: u64,
        sender: SenderCheck,
    ) -> BoxFuture<'a, Result<PutOutcome, StoreError>>;

    /// Up to `limit` unexpired envelopes in arrival order, starting after the
    /// envelope with sequence number `after` (from the start when `None`).
    fn list<'a>(
        &'a self,
        id: &'a MailboxId,
        after: Option<u64>,
        limit: usize,
        now: u64,
    ) -> BoxFuture<'a, Result<Vec<StoredEnvelope>, StoreError>>;

    /// Deletes the envelopes with these ids; unknown ids are ignored. Returns
    /// how many were deleted.
    fn ack<'a>(
        &'a self,
        id: &'a MailboxId,
        envelope_ids: &'a [EnvelopeId],
    ) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// Deletes the mailbox, its sender id and every envelope in it, atomically.
    /// Returns whether it existed.
    fn delete_mailbox<'a>(&'a self, id: &'a MailboxId) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Moves the mailbox's idle expiry to `until` (rounded up to its bucket's
    /// end) if that is later than the stored one; never earlier, and never
    /// for a mailbox that does not expire (`idle_expires_at == 0`).
    /// [`StoreError::MailboxNotFound`] without the mailbox.
    fn keep_until<'a>(
        &'a self,
        id: &'a MailboxId,
        until: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Deletes every envelope whose expiry bucket has passed, destroys the
    /// at-rest keys of those buckets, and deletes every mailbox whose idle
    /// expiry has passed, with its sender id, push registration and
    /// envelopes, as [`MailboxStore::delete_mailbox`] does. Costs time in
    /// proportion to what expired.
    fn sweep(&self, now: u64) -> BoxFuture<'_, Result<SweepReport, StoreError>>;

    /// Totals for metrics.
    fn stats(&self) -> StoreStats;

    /// A wake-up handle that changes whenever an envelope is stored in the mailbox.
    fn subscribe(&self, id: &MailboxId) -> Subscription;

    /// Whether some relay holds a [`Subscription`] for the mailbox (an attached
    /// `Receive` stream): then no push wake-up is needed. In-process backends
    /// know only this node; the Redis backend asks the cluster.
    fn watched<'a>(&'a self, id: &'a MailboxId) -> BoxFuture<'a, bool>;

    /// Sets the mailbox's push registration (replacing any), or removes it with
    /// `None`. [`StoreError::MailboxNotFound`] without the mailbox. The
    /// registration is deleted with the mailbox.
    fn set_push<'a>(
        &'a self,
        id: &'a MailboxId,
        push: Option<PushRegistration>,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// The mailbox's push registration, if any.
    fn push<'a>(
        &'a self,
        id: &'a MailboxId,
    ) -> BoxFuture<'a, Result<Option<PushRegistration>, StoreError>>;

    /// Records that the signed request with this digest was accepted, until
    /// `until` (seconds, rounded up by [`record_until`]). Returns `false`,
    /// changing nothing, if an unexpired record of it exists: a replay. The
    /// record is durable before this returns, kept across a restart (sled)
    /// and seen by every relay sharing the store (Redis); the sweep removes
    /// it once passed. What it reveals: [`RequestDigest`].
    fn remember_request<'a>(
        &'a self,
        digest: &'a RequestDigest,
        until: u64,
        now: u64,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Makes everything written so far durable (used at shutdown).
    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// The failure that stopped the store for good, if one did: after it no
    /// write can succeed until the process restarts (the sled backend's
    /// failed log write or sync, kept as sled keeps its own IO errors).
    /// Backends whose failures pass by themselves (Redis: `Unavailable`)
    /// never report one. The relay turns NOT_SERVING on it.
    fn fatal_error(&self) -> Option<StoreError> {
        None
    }
}
