//! The embedded on-disk backend: sled as the index, a write-ahead log of our
//! own for durability with group commit, and envelopes sealed under per-bucket
//! at-rest keys.
//!
//! Every mutation runs on the caller's thread under one mutex (the writer lock):
//! it checks and prepares its changes and appends them, as one batch, to the
//! log's buffer and to the memtable (the logged writes not yet in the tree,
//! through which mutations read), all before the lock is released, so quota
//! checks and per-mailbox sequence numbers are race-free. Then it waits for the
//! syncer thread, which writes and `fdatasync`s every batch logged since its
//! last round in one go (group commit), then applies them to the tree and only
//! then answers their callers. Nothing is answered, and nothing reaches the
//! tree, before it is on disk; after a crash the log is replayed onto the tree
//! (see [`crate::wal`]). Reads outside mutations go straight to the tree, so
//! they see only what is durable.
//!
//! Why this shape, measured with `haven-bench throughput` (BENCHMARKS.md): a
//! writer thread that takes commands costs one or two thread wake-ups per
//! command; sled's `flush` hands each write to sled's IO threads and back; and
//! every sled batch makes sled seal and write an IO buffer. Together they cost
//! several times the writes themselves. Here a mutation crosses threads only to
//! wait for the sync, the syncer does one `write` and one `fdatasync` per
//! group itself, and the tree gets plain inserts, which sled writes out in
//! large buffers.
//!
//! The at-rest key file is `fdatasync`ed before any envelope under a new key is
//! answered.
//!
//! Layout, all in one sled tree so that one batch covers one operation:
//!
//! | key | value |
//! | --- | --- |
//! | `m` ‖ recipient id | mailbox record (see [`Record`]) |
//! | `s` ‖ sender id | recipient id |
//! | `e` ‖ recipient id ‖ seq (u64 BE) | envelope: header ‖ sealed payload |
//! | `i` ‖ recipient id ‖ envelope id | seq (u64 BE) |
//! | `x` ‖ bucket end (u64 BE) ‖ recipient id ‖ seq | empty: the expiry index |
//! | `d` ‖ device index (SHA-256 of the device key) | device record: one-time counts, signed and last-resort prekeys |
//! | `o` / `k` ‖ device key ‖ prekey id (u32 BE) | one-time X25519 / ML-KEM prekey |
//! | `c` ‖ supporter key | remaining capacity (u32 BE) |
//! | `D` ‖ document kind ‖ supporter key | version (u64 BE) ‖ signed document |
//! | `q` ‖ request digest | record expiry (u64 BE): an accepted signed request, or a first contact's stamp ([`crate::SpentStamp`]) |
//! | `r` ‖ record expiry (u64 BE) ‖ request digest | empty: the records' expiry index |

use std::cmp::Ordering as KeyOrder;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{JoinHandle, Thread};

use sled::IVec;
use tokio::sync::watch;

use crate::directory::{
    ClaimedBundle, DeviceKey, DirectoryStore, DocumentKind, Documents, MAX_ONE_TIME_PREKEYS,
    PrekeyCount, PrekeyUpload, SupporterKey,
};
use crate::epoch::{KeyFile, KeyRing, envelope_aad};
use crate::mailbox::check_quota;
use crate::wake::WakeHub;
use crate::wal::{self, META_KEY, Op, Wal};
use crate::{
    BoxFuture, EnvelopeId, MailboxId, MailboxKind, MailboxRecord, MailboxStore, NewEnvelope,
    PublicKey, PushRegistration, PutOutcome, Quota, RequestDigest, SenderCheck, SenderId,
    StoreConfig, StoreError, StoreStats, StoredEnvelope, Subscription, SweepReport, bucket_end,
    record_until,
};

/// Most expired envelopes removed per writer command, so that a large sweep does
/// not hold up sends for long; the sweep repeats until nothing is left.
const SWEEP_CHUNK: usize = 4096;
/// Version 2 added the idle expiry; a version 1 record reads as never expiring.
const RECORD_VERSION: u8 = 2;
const RECORD_V1_LEN: usize = 1 + 16 + 32 + 1 + 1 + 32 + 8 + 8 + 8;
const RECORD_LEN: usize = RECORD_V1_LEN + 8;
/// Most idle mailboxes removed per writer command (each takes its envelopes).
const IDLE_SWEEP_CHUNK: usize = 256;
const ENVELOPE_VERSION: u8 = 1;
/// version ‖ envelope id ‖ bucket end ‖ payload length.
const ENVELOPE_HEADER_LEN: usize = 1 + 16 + 8 + 4;
const KEY_FILE: &str = "epoch-keys";
const SLED_DIR: &str = "sled";

/// Settings of the sled backend.
#[derive(Clone, Debug)]
pub struct SledConfig {
    /// The data directory; created if missing.
    pub path: PathBuf,
    /// Settings shared by every backend.
    pub store: StoreConfig,
    /// Share one log sync between concurrent writes (the default). `false` syncs
    /// after every single write; it exists to measure what group commit buys.
    pub group_commit: bool,
    /// sled's page cache size in bytes.
    pub cache_capacity_bytes: u64,
}

impl SledConfig {
    /// Defaults for a data directory.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            store: StoreConfig::default(),
            group_commit: true,
            cache_capacity_bytes: 256 * 1024 * 1024,
        }
    }
}

/// A [`MailboxStore`] on sled. See the module documentation for durability and
/// at-rest protection.
pub struct SledStore {
    shared: Arc<Shared>,
    /// The syncer thread, to wake it (unparking a thread that is not parked
    /// costs one atomic operation) and, on drop, to join it.
    syncer: Thread,
    /// `None` only during drop.
    syncer_handle: Option<JoinHandle<()>>,
}

struct Shared {
    config: StoreConfig,
    tree: sled::Tree,
    db: sled::Db,
    ring: KeyRing,
    wake: WakeHub,
    mailboxes: AtomicU64,
    envelopes: AtomicU64,
    bytes: AtomicU64,
    /// Envelopes listings skipped because they did not open.
    unreadable: AtomicU64,
    /// The writer lock: held while a mutation checks, prepares and logs its
    /// batch, and by the syncer to take the log and to prune the memtable;
    /// never across an await.
    writer: Mutex<Writer>,
    /// `false`: every mutation syncs the log by itself (to measure what group
    /// commit buys).
    group_commit: bool,
    /// The log files. Taken before the writer lock, never after it.
    wal: Mutex<Wal>,
    /// sled's directory, whose files are synced before the log moves on.
    sled_dir: PathBuf,
    /// What is on disk; mutations wait on it.
    durable: watch::Sender<Durable>,
    /// Set on drop: the syncer writes what is left, flushes sled and exits.
    stop: AtomicBool,
}

/// What the writer lock guards.
struct Writer {
    /// The at-rest key file; only mutations touch it.
    key_file: KeyFile,
    /// Writes logged but not yet in the tree: the newest value per key (`None`
    /// for a removal), with the sequence number of its batch.
    memtable: BTreeMap<Vec<u8>, (u64, Option<IVec>)>,
    /// Encoded log records not yet handed to the syncer, in sequence order.
    log: Vec<u8>,
    /// The same batches, for the syncer to apply to the tree once on disk.
    batches: Vec<Vec<Op>>,
    /// Sequence number of the last batch logged.
    seq: u64,
}

/// How far the syncer got.
#[derive(Clone, Default)]
struct Durable {
    /// Every batch up to this sequence number is on disk.
    through: u64,
    /// The first failed write or sync. Sticky, as sled's own IO errors are:
    /// after it nothing is reported durable, and the relay has to be restarted.
    error: Option<StoreError>,
}

/// The per-mailbox record: routing data plus counters.
#[derive(Clone)]
struct Record {
    sender_id: SenderId,
    recipient_key: PublicKey,
    kind: MailboxKind,
    sender_key: Option<PublicKey>,
    next_seq: u64,
    count: u64,
    bytes: u64,
    idle_expires_at: u64,
}

impl SledStore {
    /// Opens (or creates) the store in `config.path`, replays its write-ahead log
    /// if the last run did not end cleanly, and starts its syncer thread.
    pub fn open(config: SledConfig) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&config.path).map_err(backend)?;
        let db = sled::Config::new()
            .path(config.path.join(SLED_DIR))
            .cache_capacity(config.cache_capacity_bytes)
            // Durability comes from the writer's explicit flushes; a timer flush
            // would only compete with them.
            .flush_every_ms(None)
            .open()
            .map_err(backend)?;
        let tree = db.open_tree("haven").map_err(backend)?;
        let sled_dir = config.path.join(SLED_DIR);
        let (wal, seq) = recover(&config.path, &sled_dir, &db, &tree)?;
        let ring = KeyRing::default();
        let key_file = KeyFile::open(&config.path.join(KEY_FILE), &ring).map_err(backend)?;
        let writer = Writer {
            key_file,
            memtable: BTreeMap::new(),
            log: Vec::new(),
            batches: Vec::new(),
            seq,
        };
        let shared = Arc::new(Shared {
            config: config.store.clone(),
            tree,
            db,
            ring,
            wake: WakeHub::default(),
            mailboxes: AtomicU64::new(0),
            envelopes: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            unreadable: AtomicU64::new(0),
            writer: Mutex::new(writer),
            group_commit: config.group_commit,
            wal: Mutex::new(wal),
            sled_dir,
            durable: watch::Sender::new(Durable {
                through: seq,
                error: None,
            }),
            stop: AtomicBool::new(false),
        });
        shared.recount()?;
        let syncer_shared = Arc::clone(&shared);
        let syncer_handle = std::thread::Builder::new()
            .name("haven-store-syncer".into())
            .spawn(move || syncer_loop(&syncer_shared))
            .map_err(backend)?;
        Ok(Self {
            shared,
            syncer: syncer_handle.thread().clone(),
            syncer_handle: Some(syncer_handle),
        })
    }

    /// The data directory's sled files and key file, for tests that scan them.
    pub fn data_path(config: &SledConfig) -> &Path {
        &config.path
    }

    /// A copy of the live at-rest key of a bucket. For the shredding test only:
    /// it lets the test look for the key's bytes on disk after destruction.
    #[doc(hidden)]
    pub fn bucket_key_for_test(&self, bucket: u64) -> Option<[u8; 32]> {
        self.shared.ring.key_bytes(bucket).map(|key| *key)
    }

    /// Runs one mutation: `op` checks and prepares its writes into the group,
    /// which is logged as one batch under the writer lock; then waits until
    /// the batch is on disk and in the tree. A refused mutation returns at once.
    async fn mutate<T>(
        &self,
        op: impl FnOnce(&Shared, &mut Group<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.answer(self.shared.apply(op)).await
    }

    /// [`SledStore::mutate`] for work too long for an async worker thread (a
    /// chunk of the sweep, which rewrites thousands of keys).
    async fn mutate_blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Shared, &mut Group<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let shared = Arc::clone(&self.shared);
        let applied = tokio::task::spawn_blocking(move || shared.apply(op))
            .await
            .map_err(|_| StoreError::Closed)?;
        self.answer(applied).await
    }

    /// Wakes the syncer for a logged mutation and answers once its batch is
    /// durable; a refused mutation is answered at once.
    async fn answer<T>(
        &self,
        (result, seq): (Result<T, StoreError>, u64),
    ) -> Result<T, StoreError> {
        self.syncer.unpark();
        let value = result?;
        self.durable(seq).await?;
        Ok(value)
    }

    /// Waits until every batch up to `seq` is on disk and in the tree.
    async fn durable(&self, seq: u64) -> Result<(), StoreError> {
        let mut durable = self.shared.durable.subscribe();
        let reached = durable
            .wait_for(|durable| durable.error.is_some() || durable.through >= seq)
            .await
            .map(|durable| durable.error.clone());
        match reached {
            Ok(None) => Ok(()),
            Ok(Some(error)) => Err(error),
            Err(_) => Err(StoreError::Closed),
        }
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        // The syncer writes whatever is logged, flushes sled, then exits.
        self.shared.stop.store(true, Ordering::SeqCst);
        self.syncer.unpark();
        if let Some(syncer) = self.syncer_handle.take()
            && syncer.join().is_err()
        {
            tracing::error!("store syncer thread panicked");
        }
    }
}

fn backend(error: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(error.to_string())
}

fn key(prefix: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + parts.iter().map(|p| p.len()).sum::<usize>());
    out.push(prefix);
    for part in parts {
        out.extend_from_slice(part);
    }
    out
}

fn mailbox_key(id: &MailboxId) -> Vec<u8> {
    key(b'm', &[id.as_bytes()])
}
fn push_key(id: &MailboxId) -> Vec<u8> {
    key(b'p', &[id.as_bytes()])
}
fn sender_key(id: &SenderId) -> Vec<u8> {
    key(b's', &[id.as_bytes()])
}
fn envelope_key(id: &MailboxId, seq: u64) -> Vec<u8> {
    key(b'e', &[id.as_bytes(), &seq.to_be_bytes()])
}
fn id_key(id: &MailboxId, envelope: &EnvelopeId) -> Vec<u8> {
    key(b'i', &[id.as_bytes(), envelope.as_bytes()])
}
fn expiry_key(bucket: u64, id: &MailboxId, seq: u64) -> Vec<u8> {
    key(
        b'x',
        &[&bucket.to_be_bytes(), id.as_bytes(), &seq.to_be_bytes()],
    )
}

/// `y‖idle expiry‖recipient id`: the index the sweep walks to remove idle mailboxes.
fn idle_key(at: u64, id: &MailboxId) -> Vec<u8> {
    key(b'y', &[&at.to_be_bytes(), id.as_bytes()])
}

/// `q‖request digest → record expiry`: an accepted signed request (`replay`).
fn request_key(digest: &RequestDigest) -> Vec<u8> {
    key(b'q', &[digest.as_bytes()])
}

/// `r‖record expiry‖request digest`: the index the sweep walks to drop them.
fn request_expiry_key(until: u64, digest: &RequestDigest) -> Vec<u8> {
    key(b'r', &[&until.to_be_bytes(), digest.as_bytes()])
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Backend(format!("corrupt {what} in store"))
}

impl Record {
    fn new(record: &MailboxRecord) -> Self {
        Self {
            sender_id: record.sender_id,
            recipient_key: record.recipient_key,
            kind: record.kind,
            sender_key: record.sender_key,
            next_seq: 1,
            count: 0,
            bytes: 0,
            idle_expires_at: record.idle_expires_at,
        }
    }

    fn to_mailbox(&self, recipient_id: MailboxId) -> MailboxRecord {
        MailboxRecord {
            recipient_id,
            sender_id: self.sender_id,
            recipient_key: self.recipient_key,
            kind: self.kind,
            sender_key: self.sender_key,
            idle_expires_at: self.idle_expires_at,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RECORD_LEN);
        out.push(RECORD_VERSION);
        out.extend_from_slice(self.sender_id.as_bytes());
        out.extend_from_slice(self.recipient_key.as_bytes());
        out.push(self.kind.to_byte());
        out.push(u8::from(self.sender_key.is_some()));
        out.extend_from_slice(
            self.sender_key
                .as_ref()
                .map_or(&[0u8; 32], |k| k.as_bytes()),
        );
        out.extend_from_slice(&self.next_seq.to_be_bytes());
        out.extend_from_slice(&self.count.to_be_bytes());
        out.extend_from_slice(&self.bytes.to_be_bytes());
        out.extend_from_slice(&self.idle_expires_at.to_be_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let current = bytes.len() == RECORD_LEN && bytes[0] == RECORD_VERSION;
        let first_version = bytes.len() == RECORD_V1_LEN && bytes[0] == 1;
        if !(current || first_version) {
            return Err(corrupt("mailbox record"));
        }
        let field = |from: usize, to: usize| &bytes[from..to];
        let sender_id =
            SenderId::from_slice(field(1, 17)).ok_or_else(|| corrupt("mailbox record"))?;
        let recipient_key =
            PublicKey::from_slice(field(17, 49)).ok_or_else(|| corrupt("mailbox record"))?;
        let kind = MailboxKind::from_byte(bytes[49]).ok_or_else(|| corrupt("mailbox record"))?;
        let sender_key = match bytes[50] {
            0 => None,
            _ => Some(
                PublicKey::from_slice(field(51, 83)).ok_or_else(|| corrupt("mailbox record"))?,
            ),
        };
        let number =
            |from: usize| be_u64(field(from, from + 8)).ok_or_else(|| corrupt("mailbox record"));
        Ok(Self {
            sender_id,
            recipient_key,
            kind,
            sender_key,
            next_seq: number(83)?,
            count: number(91)?,
            bytes: number(99)?,
            idle_expires_at: if current { number(107)? } else { 0 },
        })
    }
}

/// The fixed header in front of a stored envelope's sealed payload.
struct EnvelopeHeader {
    id: EnvelopeId,
    bucket: u64,
    len: u64,
}

impl EnvelopeHeader {
    fn decode(value: &[u8]) -> Result<(Self, &[u8]), StoreError> {
        if value.len() < ENVELOPE_HEADER_LEN || value[0] != ENVELOPE_VERSION {
            return Err(corrupt("envelope"));
        }
        let id = EnvelopeId::from_slice(&value[1..17]).ok_or_else(|| corrupt("envelope"))?;
        let bucket = be_u64(&value[17..25]).ok_or_else(|| corrupt("envelope"))?;
        let len = u32::from_be_bytes(value[25..29].try_into().map_err(|_| corrupt("envelope"))?);
        Ok((
            Self {
                id,
                bucket,
                len: u64::from(len),
            },
            &value[ENVELOPE_HEADER_LEN..],
        ))
    }
}

/// The writes of one command. They join the group only if the command
/// succeeds, so a refused command leaves nothing half-written.
#[derive(Default)]
struct Writes {
    ops: Vec<(Vec<u8>, Option<IVec>)>,
    mailboxes: i64,
    envelopes: i64,
    bytes: i64,
}

impl Writes {
    fn insert(&mut self, key: Vec<u8>, value: impl Into<IVec>) {
        self.ops.push((key, Some(value.into())));
    }

    fn remove(&mut self, key: Vec<u8>) {
        self.ops.push((key, None));
    }

    /// Removes a stored envelope and its index entries, and adjusts `record`.
    fn remove_envelope(
        &mut self,
        record: &mut Record,
        id: &MailboxId,
        seq: u64,
        header: &EnvelopeHeader,
    ) {
        self.remove(envelope_key(id, seq));
        self.remove(id_key(id, &header.id));
        self.remove(expiry_key(header.bucket, id, seq));
        record.count = record.count.saturating_sub(1);
        record.bytes = record.bytes.saturating_sub(header.len);
        self.envelopes -= 1;
        self.bytes -= i64::try_from(header.len).unwrap_or(i64::MAX);
    }
}

/// The writes of one mutation, logged as one batch when it ends. Each write
/// goes into the memtable as it is committed (with the sequence number its
/// batch will get), so the rest of the mutation reads and scans it there.
struct Group<'w> {
    ops: Vec<Op>,
    writer: &'w mut Writer,
}

impl<'w> Group<'w> {
    fn new(writer: &'w mut Writer) -> Self {
        Self {
            ops: Vec::new(),
            writer,
        }
    }

    fn commit(&mut self, shared: &Shared, writes: Writes) {
        let seq = self.writer.seq + 1;
        for (key, value) in writes.ops {
            self.writer
                .memtable
                .insert(key.clone(), (seq, value.clone()));
            self.ops.push((key, value));
        }
        add(&shared.mailboxes, writes.mailboxes);
        add(&shared.envelopes, writes.envelopes);
        add(&shared.bytes, writes.bytes);
    }

    /// Logs the mutation's writes as one batch (not yet synced).
    fn log(self) {
        if self.ops.is_empty() {
            return;
        }
        let writer = self.writer;
        let seq = writer.seq + 1;
        wal::encode(seq, &self.ops, &mut writer.log);
        writer.batches.push(self.ops);
        writer.seq = seq;
    }
}

/// Writes batches into the tree, key by key, and then the sequence number of
/// the last of them (see [`crate::wal`]).
fn apply_to_tree<'a>(
    tree: &sled::Tree,
    batches: impl IntoIterator<Item = &'a Vec<Op>>,
    seq: u64,
) -> sled::Result<()> {
    for (key, value) in batches.into_iter().flatten() {
        match value {
            Some(value) => {
                tree.insert(key, value.clone())?;
            }
            None => {
                tree.remove(key)?;
            }
        }
    }
    tree.insert(META_KEY, &seq.to_be_bytes())?;
    Ok(())
}

/// Replays the log onto the tree after a crash (the batches after the last one
/// the tree holds), makes the tree durable, and returns the log to write on
/// with the last sequence number.
fn recover(
    dir: &Path,
    sled_dir: &Path,
    db: &sled::Db,
    tree: &sled::Tree,
) -> Result<(Wal, u64), StoreError> {
    let (wal, records) = Wal::open(dir).map_err(backend)?;
    let mut seq = match tree.get(META_KEY).map_err(backend)? {
        Some(bytes) => be_u64(&bytes).ok_or_else(|| corrupt("log sequence number"))?,
        None => 0,
    };
    let mut replayed = 0;
    for record in records {
        if record.seq <= seq {
            continue;
        }
        if seq.checked_add(1) != Some(record.seq) {
            return Err(StoreError::Backend(
                "the write-ahead log is missing records; refusing to open a store that may have lost acknowledged writes".into(),
            ));
        }
        apply_to_tree(tree, [&record.ops], record.seq).map_err(backend)?;
        seq = record.seq;
        replayed += 1;
    }
    if replayed > 0 {
        tracing::info!(batches = replayed, "replayed the write-ahead log");
    }
    // Everything logged is now sled's own: the log files may be reused.
    make_tree_durable(db, sled_dir)?;
    Ok((wal, seq))
}

/// Flushes sled and then `fsync`s its files. sled's own flush ends with
/// `sync_file_range`, which survives a killed process but not a power cut (no
/// metadata, no device cache flush); the log's records may only be overwritten
/// once what they describe would survive both.
fn make_tree_durable(db: &sled::Db, sled_dir: &Path) -> Result<(), StoreError> {
    db.flush().map_err(backend)?;
    let mut dirs = vec![sled_dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).map_err(backend)? {
            let path = entry.map_err(backend)?.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                std::fs::File::open(&path)
                    .and_then(|file| file.sync_all())
                    .map_err(backend)?;
            }
        }
        std::fs::File::open(&dir)
            .and_then(|file| file.sync_all())
            .map_err(backend)?;
    }
    Ok(())
}

fn add(counter: &AtomicU64, delta: i64) {
    if delta >= 0 {
        counter.fetch_add(delta.unsigned_abs(), Ordering::Relaxed);
    } else {
        counter.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
    }
}

impl Shared {
    /// Reads a key as a mutation sees it: the memtable (its own writes and
    /// those logged but not yet in the tree) over the tree.
    fn get(&self, group: &Group<'_>, key: &[u8]) -> Result<Option<IVec>, StoreError> {
        if let Some((_, value)) = group.writer.memtable.get(key) {
            return Ok(value.clone());
        }
        self.tree.get(key).map_err(backend)
    }

    /// Up to `limit` entries whose keys start with `prefix` (and sort before
    /// `below`, if given), in key order, as a mutation sees them: the memtable
    /// over the tree.
    fn scan(
        &self,
        group: &Group<'_>,
        prefix: &[u8],
        below: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, IVec)>, StoreError> {
        let within = |key: &[u8]| key.starts_with(prefix) && below.is_none_or(|end| key < end);
        let mut tree = self
            .tree
            .scan_prefix(prefix)
            .map(|entry| entry.map_err(backend))
            .take_while(|entry| entry.as_ref().map_or(true, |(key, _)| within(key)))
            .peekable();
        let mut memtable = group
            .writer
            .memtable
            .range(prefix.to_vec()..)
            .take_while(|(key, _)| within(key))
            .peekable();
        let mut out = Vec::new();
        while out.len() < limit {
            let order = match (tree.peek(), memtable.peek()) {
                (Some(Err(_)), _) => {
                    return Err(match tree.next() {
                        Some(Err(error)) => error,
                        _ => corrupt("tree"),
                    });
                }
                (None, None) => break,
                (Some(Ok((tree_key, _))), Some((memtable_key, _))) => {
                    memtable_key.as_slice().cmp(tree_key.as_ref())
                }
                (Some(Ok(_)), None) => KeyOrder::Greater,
                (None, Some(_)) => KeyOrder::Less,
            };
            if order == KeyOrder::Greater {
                if let Some(Ok((key, value))) = tree.next() {
                    out.push((key.to_vec(), value));
                }
                continue;
            }
            if order == KeyOrder::Equal {
                // The memtable's write is newer than the tree's value.
                tree.next();
            }
            if let Some((key, (_, Some(value)))) = memtable.next() {
                out.push((key.clone(), value.clone()));
            }
        }
        Ok(out)
    }

    fn record_in(&self, group: &Group<'_>, id: &MailboxId) -> Result<Option<Record>, StoreError> {
        match self.get(group, &mailbox_key(id))? {
            Some(bytes) => Record::decode(&bytes).map(Some),
            None => Ok(None),
        }
    }

    /// A mailbox record as it is on disk (outside mutations).
    fn record(&self, id: &MailboxId) -> Result<Option<Record>, StoreError> {
        match self.tree.get(mailbox_key(id)).map_err(backend)? {
            Some(bytes) => Record::decode(&bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Recomputes the totals from the mailbox records (at open).
    fn recount(&self) -> Result<(), StoreError> {
        let (mut mailboxes, mut envelopes, mut bytes) = (0, 0, 0);
        for entry in self.tree.scan_prefix([b'm']) {
            let (_, value) = entry.map_err(backend)?;
            let record = Record::decode(&value)?;
            mailboxes += 1;
            envelopes += record.count;
            bytes += record.bytes;
        }
        self.mailboxes.store(mailboxes, Ordering::Relaxed);
        self.envelopes.store(envelopes, Ordering::Relaxed);
        self.bytes.store(bytes, Ordering::Relaxed);
        Ok(())
    }

    fn create(&self, group: &Group<'_>, record: &MailboxRecord) -> Result<Writes, StoreError> {
        let mailbox = mailbox_key(&record.recipient_id);
        let sender = sender_key(&record.sender_id);
        if self.get(group, &mailbox)?.is_some() || self.get(group, &sender)?.is_some() {
            return Err(StoreError::IdInUse);
        }
        let mut writes = Writes::default();
        let mut stored = Record::new(record);
        if stored.idle_expires_at != 0 {
            stored.idle_expires_at = bucket_end(stored.idle_expires_at, self.config.bucket_seconds);
            writes.insert(
                idle_key(stored.idle_expires_at, &record.recipient_id),
                Vec::new(),
            );
        }
        writes.insert(mailbox, stored.encode());
        writes.insert(sender, record.recipient_id.as_bytes().to_vec());
        writes.mailboxes = 1;
        Ok(writes)
    }

    fn keep_until(
        &self,
        group: &Group<'_>,
        id: &MailboxId,
        until: u64,
    ) -> Result<Writes, StoreError> {
        let mut record = self
            .record_in(group, id)?
            .ok_or(StoreError::MailboxNotFound)?;
        let until = bucket_end(until, self.config.bucket_seconds);
        let mut writes = Writes::default();
        if record.idle_expires_at != 0 && until > record.idle_expires_at {
            writes.remove(idle_key(record.idle_expires_at, id));
            writes.insert(idle_key(until, id), Vec::new());
            record.idle_expires_at = until;
            writes.insert(mailbox_key(id), record.encode());
        }
        Ok(writes)
    }

    /// Removes up to [`IDLE_SWEEP_CHUNK`] mailboxes whose idle expiry has
    /// passed, with everything in them. Returns how many, and whether more remain.
    fn sweep_idle(
        &self,
        group: &mut Group<'_>,
        now: u64,
    ) -> Result<(Vec<MailboxId>, bool), StoreError> {
        let end = key(b'y', &[&now.saturating_add(1).to_be_bytes()]);
        let due = self.scan(group, b"y", Some(&end), IDLE_SWEEP_CHUNK)?;
        let more = due.len() == IDLE_SWEEP_CHUNK;
        let mut removed = Vec::new();
        for (index_key, _) in due {
            let at = be_u64(index_key.get(1..9).unwrap_or_default())
                .ok_or_else(|| corrupt("idle index"))?;
            let id = MailboxId::from_slice(index_key.get(9..).unwrap_or_default())
                .ok_or_else(|| corrupt("idle index"))?;
            let current = self
                .record_in(group, &id)?
                .is_some_and(|record| record.idle_expires_at == at);
            if current {
                let (_, writes) = self.delete(group, &id)?;
                group.commit(self, writes);
                removed.push(id);
            } else {
                // Stale (the mailbox is gone or was kept longer): only the entry goes.
                let mut writes = Writes::default();
                writes.remove(index_key);
                group.commit(self, writes);
            }
        }
        Ok((removed, more))
    }

    /// Removes up to [`SWEEP_CHUNK`] request records that have passed.
    /// Returns whether more remain.
    fn sweep_requests(&self, group: &mut Group<'_>, now: u64) -> Result<bool, StoreError> {
        let end = key(b'r', &[&now.saturating_add(1).to_be_bytes()]);
        let due = self.scan(group, b"r", Some(&end), SWEEP_CHUNK)?;
        let more = due.len() == SWEEP_CHUNK;
        let mut writes = Writes::default();
        for (index_key, _) in due {
            let until = be_u64(index_key.get(1..9).unwrap_or_default())
                .ok_or_else(|| corrupt("request index"))?;
            let digest: [u8; 32] = index_key
                .get(9..)
                .and_then(|bytes| bytes.try_into().ok())
                .ok_or_else(|| corrupt("request index"))?;
            let digest = RequestDigest::from_bytes(digest);
            let record = request_key(&digest);
            if self
                .get(group, &record)?
                .is_some_and(|stored| be_u64(&stored) == Some(until))
            {
                writes.remove(record);
            }
            writes.remove(index_key);
        }
        group.commit(self, writes);
        Ok(more)
    }

    fn secure(
        &self,
        group: &Group<'_>,
        id: &MailboxId,
        key: PublicKey,
    ) -> Result<Writes, StoreError> {
        let mut record = self
            .record_in(group, id)?
            .ok_or(StoreError::MailboxNotFound)?;
        let mut writes = Writes::default();
        match record.sender_key {
            Some(existing) if existing == key => Ok(writes),
            Some(_) => Err(StoreError::AlreadySecured),
            None => {
                record.sender_key = Some(key);
                writes.insert(mailbox_key(id), record.encode());
                Ok(writes)
            }
        }
    }

    fn put(
        &self,
        group: &mut Group<'_>,
        id: &MailboxId,
        envelope: NewEnvelope,
        quota: Quota,
        now: u64,
        sender: SenderCheck,
    ) -> Result<(PutOutcome, Writes), StoreError> {
        if envelope.expires_at <= now {
            return Err(StoreError::AlreadyExpired);
        }
        let bucket = bucket_end(envelope.expires_at, self.config.bucket_seconds);
        let len = u32::try_from(envelope.payload.len())
            .map_err(|_| StoreError::Backend("envelope larger than 4 GiB".into()))?;
        let mut record = self
            .record_in(group, id)?
            .ok_or(StoreError::MailboxNotFound)?;
        // In the writer group, so no `secure` can land between this check and
        // the write (review F19).
        if !sender.allows(record.sender_key) {
            return Err(StoreError::SenderKeyChanged);
        }
        let mut writes = Writes::default();
        if let Some(seq) = self.get(group, &id_key(id, &envelope.id))? {
            let seq = be_u64(&seq).ok_or_else(|| corrupt("envelope index"))?;
            if let Some(value) = self.get(group, &envelope_key(id, seq))? {
                let (header, _) = EnvelopeHeader::decode(&value)?;
                if header.bucket > now {
                    return Ok((PutOutcome::Duplicate, writes));
                }
                // An expired twin the sweep has not reached yet: replace it.
                writes.remove_envelope(&mut record, id, seq, &header);
            }
        }
        // A first contact accepted once already, since acknowledged: its
        // stamp's record says so until the stamp's window passes.
        let mut spent_record = None;
        if let Some(spent) = envelope.spent {
            let record_key = request_key(&spent.digest);
            let stored = match self.get(group, &record_key)? {
                Some(stored) => Some(be_u64(&stored).ok_or_else(|| corrupt("request record"))?),
                None => None,
            };
            if stored.is_some_and(|until| until > now) {
                return Ok((PutOutcome::Duplicate, writes));
            }
            spent_record = Some((spent, stored));
        }
        check_quota(quota, record.count, record.bytes, u64::from(len))?;
        group
            .writer
            .key_file
            .ensure(&self.ring, bucket)
            .map_err(backend)?;
        let aad = envelope_aad(id.as_bytes(), envelope.id.as_bytes(), bucket);
        let sealed = self
            .ring
            .seal(bucket, &aad, &envelope.payload)
            .ok_or_else(|| StoreError::Backend("sealing failed".into()))?;
        let seq = record.next_seq;
        let mut value = Vec::with_capacity(ENVELOPE_HEADER_LEN + sealed.len());
        value.push(ENVELOPE_VERSION);
        value.extend_from_slice(envelope.id.as_bytes());
        value.extend_from_slice(&bucket.to_be_bytes());
        value.extend_from_slice(&len.to_be_bytes());
        value.extend_from_slice(&sealed);
        record.next_seq += 1;
        record.count += 1;
        record.bytes += u64::from(len);
        writes.insert(envelope_key(id, seq), value);
        writes.insert(id_key(id, &envelope.id), seq.to_be_bytes().to_vec());
        writes.insert(expiry_key(bucket, id, seq), Vec::new());
        writes.insert(mailbox_key(id), record.encode());
        if let Some((spent, passed)) = spent_record {
            if let Some(passed) = passed {
                writes.remove(request_expiry_key(passed, &spent.digest));
            }
            let until = record_until(spent.until);
            writes.insert(request_key(&spent.digest), until.to_be_bytes().to_vec());
            writes.insert(request_expiry_key(until, &spent.digest), Vec::new());
        }
        writes.envelopes += 1;
        writes.bytes += i64::from(len);
        Ok((PutOutcome::Stored, writes))
    }

    fn ack(
        &self,
        group: &Group<'_>,
        id: &MailboxId,
        envelope_ids: &[EnvelopeId],
    ) -> Result<(u64, Writes), StoreError> {
        let mut record = self
            .record_in(group, id)?
            .ok_or(StoreError::MailboxNotFound)?;
        let mut writes = Writes::default();
        let mut deleted = 0;
        let mut seen = std::collections::HashSet::new();
        for envelope_id in envelope_ids {
            if !seen.insert(*envelope_id) {
                continue;
            }
            let Some(seq) = self.get(group, &id_key(id, envelope_id))? else {
                continue;
            };
            let seq = be_u64(&seq).ok_or_else(|| corrupt("envelope index"))?;
            let Some(value) = self.get(group, &envelope_key(id, seq))? else {
                writes.remove(id_key(id, envelope_id));
                continue;
            };
            let (header, _) = EnvelopeHeader::decode(&value)?;
            writes.remove_envelope(&mut record, id, seq, &header);
            deleted += 1;
        }
        if deleted > 0 {
            writes.insert(mailbox_key(id), record.encode());
        }
        Ok((deleted, writes))
    }

    fn delete(&self, group: &Group<'_>, id: &MailboxId) -> Result<(bool, Writes), StoreError> {
        let mut writes = Writes::default();
        let Some(mut record) = self.record_in(group, id)? else {
            return Ok((false, writes));
        };
        for (stored_key, value) in
            self.scan(group, &key(b'e', &[id.as_bytes()]), None, usize::MAX)?
        {
            let seq = be_u64(&stored_key[17..]).ok_or_else(|| corrupt("envelope key"))?;
            let (header, _) = EnvelopeHeader::decode(&value)?;
            writes.remove_envelope(&mut record, id, seq, &header);
        }
        writes.remove(mailbox_key(id));
        writes.remove(sender_key(&record.sender_id));
        writes.remove(push_key(id));
        if record.idle_expires_at != 0 {
            writes.remove(idle_key(record.idle_expires_at, id));
        }
        writes.mailboxes = -1;
        Ok((true, writes))
    }

    /// Removes up to [`SWEEP_CHUNK`] expired envelopes. Returns whether more
    /// remain.
    fn sweep(&self, group: &Group<'_>, now: u64) -> Result<(u64, bool, Writes), StoreError> {
        let mut expired = 0;
        let mut records: HashMap<MailboxId, Option<Record>> = HashMap::new();
        let mut writes = Writes::default();
        let end = key(b'x', &[&now.saturating_add(1).to_be_bytes()]);
        let due = self.scan(group, b"x", Some(&end), SWEEP_CHUNK)?;
        let visited = due.len();
        for (index_key, _) in due {
            writes.remove(index_key.clone());
            let id = MailboxId::from_slice(index_key.get(9..25).unwrap_or_default())
                .ok_or_else(|| corrupt("expiry index"))?;
            let seq = be_u64(index_key.get(25..).unwrap_or_default())
                .ok_or_else(|| corrupt("expiry index"))?;
            let record = match records.entry(id) {
                std::collections::hash_map::Entry::Occupied(slot) => slot.into_mut(),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(self.record_in(group, &id)?)
                }
            };
            let Some(record) = record.as_mut() else {
                continue;
            };
            let Some(value) = self.get(group, &envelope_key(&id, seq))? else {
                continue;
            };
            let (header, _) = EnvelopeHeader::decode(&value)?;
            writes.remove_envelope(record, &id, seq, &header);
            expired += 1;
        }
        for (id, record) in &records {
            if let Some(record) = record {
                writes.insert(mailbox_key(id), record.encode());
            }
        }
        Ok((expired, visited == SWEEP_CHUNK, writes))
    }

    fn list(
        &self,
        id: &MailboxId,
        after: Option<u64>,
        limit: usize,
        now: u64,
    ) -> Result<Vec<StoredEnvelope>, StoreError> {
        if !self.tree.contains_key(mailbox_key(id)).map_err(backend)? {
            return Err(StoreError::MailboxNotFound);
        }
        let start = after.map_or(0, |seq| seq.saturating_add(1));
        let mut out = Vec::new();
        for entry in self
            .tree
            .range(envelope_key(id, start)..=envelope_key(id, u64::MAX))
        {
            if out.len() >= limit {
                break;
            }
            let (stored_key, value) = entry.map_err(backend)?;
            let seq = be_u64(&stored_key[17..]).ok_or_else(|| corrupt("envelope key"))?;
            let (header, sealed) = EnvelopeHeader::decode(&value)?;
            if header.bucket <= now {
                continue;
            }
            let aad = envelope_aad(id.as_bytes(), header.id.as_bytes(), header.bucket);
            let Some(payload) = self.ring.open(header.bucket, &aad, sealed) else {
                // Only disk corruption gets here: the key of an unexpired bucket is
                // synced before any envelope under it is acknowledged.
                tracing::warn!("skipping a stored envelope that does not authenticate");
                self.unreadable.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            out.push(StoredEnvelope {
                seq,
                id: header.id,
                expires_at: header.bucket,
                payload,
            });
        }
        Ok(out)
    }
}

impl Shared {
    /// Runs one mutation under the writer lock and logs its writes; returns
    /// its result with the sequence number to wait for. Writes only reach the
    /// group through [`Group::commit`] when a check passed, so a refused
    /// mutation leaves nothing half-written.
    fn apply<T>(
        &self,
        op: impl FnOnce(&Self, &mut Group<'_>) -> Result<T, StoreError>,
    ) -> (Result<T, StoreError>, u64) {
        // Without group commit the mutation syncs by itself, holding the log
        // files so that no other mutation shares its sync.
        let mut wal =
            (!self.group_commit).then(|| self.wal.lock().unwrap_or_else(PoisonError::into_inner));
        let (result, seq) = {
            let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
            let mut group = Group::new(&mut writer);
            let result = op(self, &mut group);
            group.log();
            // Every batch of this mutation is at or before it; a mutation that
            // wrote nothing waits for what it read to be durable.
            (result, writer.seq)
        };
        if let Some(wal) = wal.as_mut() {
            self.sync(wal, &mut Vec::new());
        }
        (result, seq)
    }

    /// Writes and syncs the batches logged since the last call, applies them to
    /// the tree, prunes them from the memtable, and tells the waiting callers.
    /// `spare` is an empty buffer to swap in (its capacity is reused). Returns
    /// whether there was anything to do.
    fn sync(&self, wal: &mut Wal, spare: &mut Vec<u8>) -> bool {
        let (seq, batches) = {
            let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
            if writer.log.is_empty() {
                return false;
            }
            std::mem::swap(&mut writer.log, spare);
            (writer.seq, std::mem::take(&mut writer.batches))
        };
        let done = (|| {
            if wal.full() {
                // The tree holds every batch logged before this round, so once
                // it is on disk, neither file's records are needed any more.
                make_tree_durable(&self.db, &self.sled_dir)?;
                wal.switch();
            }
            wal.append(spare).map_err(backend)?;
            apply_to_tree(&self.tree, &batches, seq).map_err(backend)?;
            Ok::<(), StoreError>(())
        })();
        spare.clear();
        if done.is_ok() {
            let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
            for (key, _) in batches.iter().flatten() {
                // A later batch may have written the key again: keep that.
                if writer
                    .memtable
                    .get(key)
                    .is_some_and(|(pending, _)| *pending <= seq)
                {
                    writer.memtable.remove(key);
                }
            }
        }
        let error = done.err().inspect(|error| {
            tracing::error!(%error, "store log write failed");
        });
        self.durable.send_modify(|durable| {
            durable.through = seq;
            if durable.error.is_none() {
                durable.error = error;
            }
        });
        true
    }
}

impl Shared {
    /// Makes everything logged so far sled's own, durably, and empties the log
    /// files, so that what they held (including records of deleted mailboxes
    /// and acknowledged envelopes) is gone from them. Mutations meanwhile wait
    /// for the syncer, which waits for the log files.
    fn checkpoint(&self) -> Result<(), StoreError> {
        let mut wal = self.wal.lock().unwrap_or_else(PoisonError::into_inner);
        let mut spare = Vec::new();
        while self.sync(&mut wal, &mut spare) {}
        if let Some(error) = self.durable.borrow().error.clone() {
            return Err(error);
        }
        make_tree_durable(&self.db, &self.sled_dir)?;
        wal.clear().map_err(backend)
    }
}

/// Syncs the log whenever something was logged since the last round, one round
/// at a time; parks when there is nothing to do. On stop, flushes sled and
/// empties the log.
fn syncer_loop(shared: &Shared) {
    let mut spare = Vec::new();
    loop {
        let mut wal = shared.wal.lock().unwrap_or_else(PoisonError::into_inner);
        if shared.sync(&mut wal, &mut spare) {
            continue;
        }
        if shared.stop.load(Ordering::SeqCst) {
            if let Err(error) = make_tree_durable(&shared.db, &shared.sled_dir) {
                tracing::error!(%error, "final store flush failed");
            } else if let Err(error) = wal.clear() {
                tracing::error!(%error, "emptying the store log failed");
            }
            return;
        }
        drop(wal);
        // A mutation that logs after the check above unparks us; an unpark
        // that came before this call makes it return at once.
        std::thread::park();
    }
}

impl MailboxStore for SledStore {
    fn create_mailbox(&self, record: MailboxRecord) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.mutate(move |shared, group| {
            let writes = shared.create(group, &record)?;
            group.commit(shared, writes);
            Ok(())
        }))
    }

    fn mailbox<'a>(
        &'a self,
        id: &'a MailboxId,
    ) -> BoxFuture<'a, Result<Option<MailboxRecord>, StoreError>> {
        Box::pin(async move { Ok(self.shared.record(id)?.map(|r| r.to_mailbox(*id))) })
    }

    fn mailbox_by_sender<'a>(
        &'a self,
        id: &'a SenderId,
    ) -> BoxFuture<'a, Result<Option<MailboxRecord>, StoreError>> {
        Box::pin(async move {
            let Some(recipient) = self.shared.tree.get(sender_key(id)).map_err(backend)? else {
                return Ok(None);
            };
            let recipient =
                MailboxId::from_slice(&recipient).ok_or_else(|| corrupt("sender index"))?;
            Ok(self
                .shared
                .record(&recipient)?
                .map(|r| r.to_mailbox(recipient)))
        })
    }

    fn secure<'a>(
        &'a self,
        id: &'a MailboxId,
        sender_key: PublicKey,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.mutate(move |shared, group| {
            let writes = shared.secure(group, id, sender_key)?;
            group.commit(shared, writes);
            Ok(())
        }))
    }

    fn put_checked<'a>(
        &'a self,
        id: &'a MailboxId,
        envelope: NewEnvelope,
        quota: Quota,
        now: u64,
        sender: SenderCheck,
    ) -> BoxFuture<'a, Result<PutOutcome, StoreError>> {
        Box::pin(async move {
            let outcome = self
                .mutate(move |shared, group| {
                    let (outcome, writes) = shared.put(group, id, envelope, quota, now, sender)?;
                    group.commit(shared, writes);
                    Ok(outcome)
                })
                .await?;
            if outcome == PutOutcome::Stored {
                self.shared.wake.notify(id);
            }
            Ok(outcome)
        })
    }

    fn list<'a>(
        &'a self,
        id: &'a MailboxId,
        after: Option<u64>,
        limit: usize,
        now: u64,
    ) -> BoxFuture<'a, Result<Vec<StoredEnvelope>, StoreError>> {
        Box::pin(async move { self.shared.list(id, after, limit, now) })
    }

    fn ack<'a>(
        &'a self,
        id: &'a MailboxId,
        envelope_ids: &'a [EnvelopeId],
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(self.mutate(move |shared, group| {
            let (deleted, writes) = shared.ack(group, id, envelope_ids)?;
            group.commit(shared, writes);
            Ok(deleted)
        }))
    }

    fn keep_until<'a>(
        &'a self,
        id: &'a MailboxId,
        until: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.mutate(move |shared, group| {
            let writes = shared.keep_until(group, id, until)?;
            group.commit(shared, writes);
            Ok(())
        }))
    }

    fn delete_mailbox<'a>(&'a self, id: &'a MailboxId) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let existed = self
                .mutate(move |shared, group| {
                    let (existed, writes) = shared.delete(group, id)?;
                    group.commit(shared, writes);
                    Ok(existed)
                })
                .await;
            // Streams of a deleted mailbox wake up to find it gone.
            self.shared.wake.notify(id);
            existed
        })
    }

    fn sweep(&self, now: u64) -> BoxFuture<'_, Result<SweepReport, StoreError>> {
        Box::pin(async move {
            let mut total = SweepReport::default();
            loop {
                let (expired, more) = self
                    .mutate_blocking(move |shared, group| {
                        let (expired, more, writes) = shared.sweep(group, now)?;
                        group.commit(shared, writes);
                        Ok((expired, more))
                    })
                    .await?;
                total.expired_envelopes += expired;
                if !more {
                    break;
                }
            }
            loop {
                let (removed, more) = self
                    .mutate_blocking(move |shared, group| shared.sweep_idle(group, now))
                    .await?;
                total.expired_mailboxes += removed.len() as u64;
                for id in &removed {
                    // Streams of a removed mailbox wake up to find it gone.
                    self.shared.wake.notify(id);
                }
                if !more {
                    break;
                }
            }
            while self
                .mutate_blocking(move |shared, group| shared.sweep_requests(group, now))
                .await?
            {}
            // Every removal is on disk now, so no envelope can come back
            // after a crash to find its key gone: the passed buckets' keys go.
            total.shredded_buckets = self
                .mutate_blocking(move |shared, group| {
                    group
                        .writer
                        .key_file
                        .destroy_through(&shared.ring, now)
                        .map_err(backend)
                })
                .await?;
            let shared = Arc::clone(&self.shared);
            tokio::task::spawn_blocking(move || shared.checkpoint())
                .await
                .map_err(|_| StoreError::Closed)??;
            Ok(total)
        })
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            mailboxes: self.shared.mailboxes.load(Ordering::Relaxed),
            envelopes: self.shared.envelopes.load(Ordering::Relaxed),
            bytes: self.shared.bytes.load(Ordering::Relaxed),
            memory: None,
            unreadable_envelopes: self.shared.unreadable.load(Ordering::Relaxed),
        }
    }

    fn subscribe(&self, id: &MailboxId) -> Subscription {
        self.shared.wake.subscribe(id)
    }

    fn watched<'a>(&'a self, id: &'a MailboxId) -> BoxFuture<'a, bool> {
        Box::pin(async move { self.shared.wake.watched(id) })
    }

    fn set_push<'a>(
        &'a self,
        id: &'a MailboxId,
        push: Option<PushRegistration>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let id = *id;
        Box::pin(self.mutate(move |shared, group| {
            if shared.record_in(group, &id)?.is_none() {
                return Err(StoreError::MailboxNotFound);
            }
            let mut writes = Writes::default();
            match push {
                Some(push) => writes.insert(push_key(&id), push.encode()),
                None => writes.remove(push_key(&id)),
            }
            group.commit(shared, writes);
            Ok(())
        }))
    }

    fn push<'a>(
        &'a self,
        id: &'a MailboxId,
    ) -> BoxFuture<'a, Result<Option<PushRegistration>, StoreError>> {
        Box::pin(async move {
            match self.shared.tree.get(push_key(id)).map_err(backend)? {
                Some(bytes) => PushRegistration::decode(&bytes)
                    .map(Some)
                    .ok_or_else(|| corrupt("push registration")),
                None => Ok(None),
            }
        })
    }

    fn remember_request<'a>(
        &'a self,
        digest: &'a RequestDigest,
        until: u64,
        now: u64,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        // Logged like every write, so on disk before the request is answered.
        Box::pin(self.mutate(move |shared, group| {
            let until = record_until(until);
            let record = request_key(digest);
            let mut writes = Writes::default();
            if let Some(stored) = shared.get(group, &record)? {
                let stored = be_u64(&stored).ok_or_else(|| corrupt("request record"))?;
                if stored > now {
                    return Ok(false);
                }
                writes.remove(request_expiry_key(stored, digest));
            }
            writes.insert(record, until.to_be_bytes().to_vec());
            writes.insert(request_expiry_key(until, digest), Vec::new());
            group.commit(shared, writes);
            Ok(true)
        }))
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        // A mutation that writes nothing waits for everything logged before it.
        Box::pin(self.mutate(|_, _| Ok(())))
    }

    fn fatal_error(&self) -> Option<StoreError> {
        self.shared.durable.borrow().error.clone()
    }
}

const DEVICE_RECORD_VERSION: u8 = 2;
/// Bound on a stored prekey blob (an ML-KEM prekey message is about 1.3 KiB).
const MAX_BLOB: usize = 8 * 1024;

fn parse_capacity(stored: Option<IVec>) -> Result<u32, StoreError> {
    match stored {
        Some(bytes) => Ok(u32::from_be_bytes(
            bytes.as_ref().try_into().map_err(|_| corrupt("capacity"))?,
        )),
        None => Ok(0),
    }
}

fn device_key(device: &DeviceKey) -> Vec<u8> {
    key(b'd', &[device.as_bytes()])
}
fn one_time_key(prefix: u8, device: &DeviceKey, id: u32) -> Vec<u8> {
    key(prefix, &[device.as_bytes(), &id.to_be_bytes()])
}
fn capacity_key(supporter: &SupporterKey) -> Vec<u8> {
    key(b'c', &[supporter.as_bytes()])
}
fn document_key(kind: DocumentKind, supporter: &SupporterKey) -> Vec<u8> {
    key(b'D', &[&[kind.to_byte()], supporter.as_bytes()])
}

/// A device's stored prekeys apart from the one-time ones.
struct DeviceRecord {
    count: PrekeyCount,
    signed_prekey: Vec<u8>,
    kem_last_resort: Vec<u8>,
}

impl DeviceRecord {
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![DEVICE_RECORD_VERSION];
        out.extend_from_slice(&self.count.one_time.to_be_bytes());
        out.extend_from_slice(&self.count.kem_one_time.to_be_bytes());
        for blob in [&self.signed_prekey, &self.kem_last_resort] {
            out.extend_from_slice(&(blob.len() as u32).to_be_bytes());
            out.extend_from_slice(blob);
        }
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let bad = || corrupt("device record");
        let (&version, mut rest) = bytes.split_first().ok_or_else(bad)?;
        if version != DEVICE_RECORD_VERSION || rest.len() < 8 {
            return Err(bad());
        }
        let number = |bytes: &[u8]| u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let count = PrekeyCount {
            one_time: number(&rest[..4]),
            kem_one_time: number(&rest[4..8]),
        };
        rest = &rest[8..];
        let mut blobs = Vec::with_capacity(3);
        for _ in 0..2 {
            if rest.len() < 4 {
                return Err(bad());
            }
            let len = number(&rest[..4]) as usize;
            let blob = rest.get(4..4 + len).ok_or_else(bad)?;
            blobs.push(blob.to_vec());
            rest = &rest[4 + len..];
        }
        let kem_last_resort = blobs.pop().ok_or_else(bad)?;
        let signed_prekey = blobs.pop().ok_or_else(bad)?;
        Ok(Self {
            count,
            signed_prekey,
            kem_last_resort,
        })
    }
}

impl Shared {
    fn device_record(
        &self,
        group: &Group<'_>,
        device: &DeviceKey,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        self.get(group, &device_key(device))?
            .map(|bytes| DeviceRecord::decode(&bytes))
            .transpose()
    }

    fn publish(
        &self,
        group: &mut Group<'_>,
        device: &DeviceKey,
        upload: PrekeyUpload,
    ) -> Result<PrekeyCount, StoreError> {
        let blobs = [&upload.signed_prekey, &upload.kem_last_resort];
        if blobs.iter().any(|blob| blob.len() > MAX_BLOB)
            || upload
                .one_time
                .iter()
                .chain(&upload.kem_one_time)
                .any(|(_, blob)| blob.len() > MAX_BLOB)
        {
            return Err(StoreError::Backend(
                "prekey larger than the store accepts".into(),
            ));
        }
        let mut record = self.device_record(group, device)?.unwrap_or(DeviceRecord {
            count: PrekeyCount::default(),
            signed_prekey: Vec::new(),
            kem_last_resort: Vec::new(),
        });
        let mut writes = Writes::default();
        for (prefix, prekeys, count) in [
            (b'o', &upload.one_time, &mut record.count.one_time),
            (b'k', &upload.kem_one_time, &mut record.count.kem_one_time),
        ] {
            let mut seen = std::collections::HashSet::new();
            for (id, blob) in prekeys {
                let stored_key = one_time_key(prefix, device, *id);
                if self.get(group, &stored_key)?.is_none() && seen.insert(*id) {
                    *count += 1;
                }
                writes.insert(stored_key, blob.clone());
            }
            if *count as usize > MAX_ONE_TIME_PREKEYS {
                return Err(StoreError::TooManyPrekeys {
                    limit: MAX_ONE_TIME_PREKEYS,
                });
            }
        }
        record.signed_prekey = upload.signed_prekey;
        record.kem_last_resort = upload.kem_last_resort;
        writes.insert(device_key(device), record.encode());
        group.commit(self, writes);
        Ok(record.count)
    }

    /// Removes the device's record and every one-time prekey of it.
    fn remove_device(&self, group: &mut Group<'_>, device: &DeviceKey) -> Result<(), StoreError> {
        let mut writes = Writes::default();
        if self.device_record(group, device)?.is_none() {
            return Ok(());
        }
        for prefix in [b'o', b'k'] {
            for (stored_key, _) in self.scan(
                group,
                &key(prefix, &[device.as_bytes()]),
                None,
                MAX_ONE_TIME_PREKEYS,
            )? {
                writes.remove(stored_key);
            }
        }
        writes.remove(device_key(device));
        group.commit(self, writes);
        Ok(())
    }

    fn capacity_in(&self, group: &Group<'_>, supporter: &SupporterKey) -> Result<u32, StoreError> {
        parse_capacity(self.get(group, &capacity_key(supporter))?)
    }

    /// Hands out each device's oldest one-time prekeys.
    fn claim(
        &self,
        group: &mut Group<'_>,
        supporter: &SupporterKey,
        devices: &[DeviceKey],
    ) -> Result<Vec<ClaimedBundle>, StoreError> {
        let capacity = self.capacity_in(group, supporter)?;
        if capacity == 0 {
            return Err(StoreError::CapacityExhausted);
        }
        let mut writes = Writes::default();
        let mut bundles = Vec::new();
        for device in devices {
            let Some(mut record) = self.device_record(group, device)? else {
                return Err(StoreError::NoPrekeys);
            };
            let mut take = |prefix: u8, count: &mut u32| -> Result<Option<Vec<u8>>, StoreError> {
                match self
                    .scan(group, &key(prefix, &[device.as_bytes()]), None, 1)?
                    .pop()
                {
                    Some((stored_key, blob)) => {
                        writes.remove(stored_key);
                        *count = count.saturating_sub(1);
                        Ok(Some(blob.to_vec()))
                    }
                    None => Ok(None),
                }
            };
            let one_time = take(b'o', &mut record.count.one_time)?;
            let kem = take(b'k', &mut record.count.kem_one_time)?
                .unwrap_or_else(|| record.kem_last_resort.clone());
            writes.insert(device_key(device), record.encode());
            bundles.push(ClaimedBundle {
                device: *device,
                signed_prekey: record.signed_prekey,
                one_time,
                kem,
            });
        }
        if bundles.is_empty() {
            return Err(StoreError::NoPrekeys);
        }
        writes.insert(
            capacity_key(supporter),
            (capacity - 1).to_be_bytes().to_vec(),
        );
        group.commit(self, writes);
        Ok(bundles)
    }

    fn put_document_in(
        &self,
        group: &mut Group<'_>,
        kind: DocumentKind,
        supporter: &SupporterKey,
        document: Vec<u8>,
        version: u64,
    ) -> Result<(), StoreError> {
        let stored_key = document_key(kind, supporter);
        if kind.is_versioned()
            && let Some(existing) = self.get(group, &stored_key)?
        {
            let stored =
                be_u64(existing.get(..8).unwrap_or_default()).ok_or_else(|| corrupt("document"))?;
            if version < stored {
                return Err(StoreError::StaleDocument {
                    stored,
                    found: version,
                });
            }
            if version == stored && existing.get(8..) != Some(document.as_slice()) {
                return Err(StoreError::ConflictingDocument { version });
            }
        }
        let mut writes = Writes::default();
        writes.insert(stored_key, [&version.to_be_bytes()[..], &document].concat());
        group.commit(self, writes);
        Ok(())
    }
}

impl DirectoryStore for SledStore {
    fn publish_prekeys<'a>(
        &'a self,
        device: &'a DeviceKey,
        upload: PrekeyUpload,
    ) -> BoxFuture<'a, Result<PrekeyCount, StoreError>> {
        let device = *device;
        Box::pin(self.mutate(move |shared, group| shared.publish(group, &device, upload)))
    }

    fn prekey_count<'a>(
        &'a self,
        device: &'a DeviceKey,
    ) -> BoxFuture<'a, Result<Option<PrekeyCount>, StoreError>> {
        Box::pin(async move {
            Ok(self
                .shared
                .tree
                .get(device_key(device))
                .map_err(backend)?
                .map(|bytes| DeviceRecord::decode(&bytes))
                .transpose()?
                .map(|record| record.count))
        })
    }

    fn remove_prekeys<'a>(
        &'a self,
        device: &'a DeviceKey,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let device = *device;
        Box::pin(self.mutate(move |shared, group| shared.remove_device(group, &device)))
    }

    fn set_capacity<'a>(
        &'a self,
        supporter: &'a SupporterKey,
        capacity: u32,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let supporter = *supporter;
        Box::pin(self.mutate(move |shared, group| {
            let mut writes = Writes::default();
            writes.insert(capacity_key(&supporter), capacity.to_be_bytes().to_vec());
            group.commit(shared, writes);
            Ok(())
        }))
    }

    fn capacity<'a>(
        &'a self,
        supporter: &'a SupporterKey,
    ) -> BoxFuture<'a, Result<u32, StoreError>> {
        Box::pin(async move {
            let stored = self
                .shared
                .tree
                .get(capacity_key(supporter))
                .map_err(backend)?;
            parse_capacity(stored)
        })
    }

    fn claim_bundles<'a>(
        &'a self,
        supporter: &'a SupporterKey,
        devices: &'a [DeviceKey],
    ) -> BoxFuture<'a, Result<Vec<ClaimedBundle>, StoreError>> {
        let supporter = *supporter;
        let devices = devices.to_vec();
        Box::pin(self.mutate(move |shared, group| shared.claim(group, &supporter, &devices)))
    }

    fn put_document<'a>(
        &'a self,
        kind: DocumentKind,
        supporter: &'a SupporterKey,
        document: Vec<u8>,
        version: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let supporter = *supporter;
        Box::pin(self.mutate(move |shared, group| {
            shared.put_document_in(group, kind, &supporter, document, version)
        }))
    }

    fn document<'a>(
        &'a self,
        kind: DocumentKind,
        supporter: &'a SupporterKey,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
        Box::pin(async move {
            let stored = self
                .shared
                .tree
                .get(document_key(kind, supporter))
                .map_err(backend)?;
            Ok(stored.map(|bytes| bytes.get(8..).unwrap_or_default().to_vec()))
        })
    }

    fn documents(&self, kind: DocumentKind) -> BoxFuture<'_, Result<Documents, StoreError>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for entry in self
                .shared
                .tree
                .scan_prefix(key(b'D', &[&[kind.to_byte()]]))
            {
                let (stored_key, bytes) = entry.map_err(backend)?;
                let supporter = SupporterKey::from_slice(stored_key.get(2..).unwrap_or_default())
                    .ok_or_else(|| corrupt("document key"))?;
                out.push((supporter, bytes.get(8..).unwrap_or_default().to_vec()));
            }
            Ok(out)
        })
    }
}
