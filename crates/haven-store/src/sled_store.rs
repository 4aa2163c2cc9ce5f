//! The embedded on-disk backend: sled, one writer thread with group commit, and
//! envelopes sealed under per-bucket at-rest keys.
//!
//! Every mutation goes through one writer thread. It takes whatever commands are
//! queued (up to [`MAX_GROUP`]), checks and prepares each in turn, writes all of
//! the group's changes as one atomic sled batch, then calls `flush` once and only
//! then answers the callers: concurrent `put`s share one batch and one flush, and
//! none returns before its envelope is on disk. A crash loses a group whole or
//! not at all, and no group is answered before its flush. The
//! single writer also makes quota checks and per-mailbox sequence numbers
//! race-free without locks. Reads go straight to sled from the caller's thread.
//!
//! Durability: sled's `flush` writes its log and on Linux syncs it with
//! `sync_file_range`, which survives a killed relay process (the data is in the
//! kernel's page cache and reaches the disk), but is not a full `fsync` of file
//! metadata, so a power cut at the wrong moment can lose the most recent group.
//! The at-rest key file is `fdatasync`ed before any envelope under a new key is
//! acknowledged.
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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use sled::IVec;
use tokio::sync::{mpsc, oneshot};

use crate::directory::{
    ClaimedBundle, DeviceKey, DirectoryStore, DocumentKind, Documents, MAX_ONE_TIME_PREKEYS,
    PrekeyCount, PrekeyUpload, SupporterKey,
};
use crate::epoch::{KeyFile, KeyRing, envelope_aad};
use crate::mailbox::check_quota;
use crate::wake::WakeHub;
use crate::{
    BoxFuture, EnvelopeId, MailboxId, MailboxKind, MailboxRecord, MailboxStore, NewEnvelope,
    PublicKey, PushRegistration, PutOutcome, Quota, SenderId, StoreConfig, StoreError, StoreStats,
    StoredEnvelope, Subscription, SweepReport, bucket_end,
};

/// Most commands applied under one flush. Bounds the latency of the first
/// command in a group while still amortising the flush over many.
const MAX_GROUP: usize = 512;
/// Most expired envelopes removed per writer command, so that a large sweep does
/// not hold up sends for long; the sweep repeats until nothing is left.
const SWEEP_CHUNK: usize = 4096;
/// Commands queued for the writer before callers wait (async backpressure).
const QUEUE_DEPTH: usize = 4096;
const RECORD_VERSION: u8 = 1;
const RECORD_LEN: usize = 1 + 16 + 32 + 1 + 1 + 32 + 8 + 8 + 8;
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
    /// Share one flush between concurrent writes (the default). `false` flushes
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
    /// `None` only during drop, to close the channel before joining the writer.
    commands: Option<mpsc::Sender<Command>>,
    writer: Option<JoinHandle<()>>,
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
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Command {
    Create(MailboxRecord, Reply<()>),
    Secure(MailboxId, PublicKey, Reply<()>),
    Put(MailboxId, NewEnvelope, Quota, u64, Reply<PutOutcome>),
    Ack(MailboxId, Vec<EnvelopeId>, Reply<u64>),
    Delete(MailboxId, Reply<bool>),
    Sweep(u64, Reply<(SweepReport, bool)>),
    Flush(Reply<()>),
    /// A directory operation: prepares its writes against the group and
    /// returns the answer to send once the group is flushed.
    Run(Job),
}

type Job = Box<dyn FnOnce(&Shared, &mut Group) -> Pending + Send>;

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
}

impl SledStore {
    /// Opens (or creates) the store in `config.path` and starts its writer thread.
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
        let ring = KeyRing::default();
        let key_file = KeyFile::open(&config.path.join(KEY_FILE), &ring).map_err(backend)?;
        let shared = Arc::new(Shared {
            config: config.store.clone(),
            tree,
            db,
            ring,
            wake: WakeHub::default(),
            mailboxes: AtomicU64::new(0),
            envelopes: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        });
        shared.recount()?;
        let (sender, receiver) = mpsc::channel(QUEUE_DEPTH);
        let writer_shared = Arc::clone(&shared);
        let group_commit = config.group_commit;
        let writer = std::thread::Builder::new()
            .name("haven-store-writer".into())
            .spawn(move || writer_loop(&writer_shared, key_file, receiver, group_commit))
            .map_err(backend)?;
        Ok(Self {
            shared,
            commands: Some(sender),
            writer: Some(writer),
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

    /// Runs `job` on the writer thread, inside the current group.
    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&Shared, &mut Group) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.call(|reply| {
            Command::Run(Box::new(move |shared, group| {
                pending(reply, job(shared, group))
            }))
        })
        .await
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        let commands = self.commands.as_ref().ok_or(StoreError::Closed)?;
        let (reply, answer) = oneshot::channel();
        commands
            .send(make(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish what is queued, flush and exit.
        self.commands.take();
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!("store writer thread panicked");
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
        }
    }

    fn to_mailbox(&self, recipient_id: MailboxId) -> MailboxRecord {
        MailboxRecord {
            recipient_id,
            sender_id: self.sender_id,
            recipient_key: self.recipient_key,
            kind: self.kind,
            sender_key: self.sender_key,
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
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        if bytes.len() != RECORD_LEN || bytes[0] != RECORD_VERSION {
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

/// The writes of every command in a group: one sled batch, applied atomically
/// before the group's flush, plus an overlay through which later commands of the
/// group read what earlier ones wrote. One batch per group instead of one per
/// command is what makes group commit pay off on sled: each batch costs sled a
/// fixed price in its log that dwarfs the inserts themselves.
#[derive(Default)]
struct Group {
    batch: sled::Batch,
    overlay: HashMap<Vec<u8>, Option<IVec>>,
}

impl Group {
    fn commit(&mut self, shared: &Shared, writes: Writes) {
        for (key, value) in writes.ops {
            match &value {
                Some(value) => self.batch.insert(key.clone(), value.clone()),
                None => self.batch.remove(key.clone()),
            }
            self.overlay.insert(key, value);
        }
        add(&shared.mailboxes, writes.mailboxes);
        add(&shared.envelopes, writes.envelopes);
        add(&shared.bytes, writes.bytes);
    }

    /// Writes the group's batch to the tree (not yet flushed).
    fn apply(&mut self, tree: &sled::Tree) -> Result<(), StoreError> {
        self.overlay.clear();
        tree.apply_batch(std::mem::take(&mut self.batch))
            .map_err(backend)
    }
}

fn add(counter: &AtomicU64, delta: i64) {
    if delta >= 0 {
        counter.fetch_add(delta.unsigned_abs(), Ordering::Relaxed);
    } else {
        counter.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
    }
}

impl Shared {
    /// Reads a key as the group sees it: its own pending writes first.
    fn get(&self, group: &Group, key: &[u8]) -> Result<Option<IVec>, StoreError> {
        match group.overlay.get(key) {
            Some(value) => Ok(value.clone()),
            None => self.tree.get(key).map_err(backend),
        }
    }

    fn record_in(&self, group: &Group, id: &MailboxId) -> Result<Option<Record>, StoreError> {
        match self.get(group, &mailbox_key(id))? {
            Some(bytes) => Record::decode(&bytes).map(Some),
            None => Ok(None),
        }
    }

    fn record(&self, id: &MailboxId) -> Result<Option<Record>, StoreError> {
        self.record_in(&Group::default(), id)
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

    fn create(&self, group: &Group, record: &MailboxRecord) -> Result<Writes, StoreError> {
        let mailbox = mailbox_key(&record.recipient_id);
        let sender = sender_key(&record.sender_id);
        if self.get(group, &mailbox)?.is_some() || self.get(group, &sender)?.is_some() {
            return Err(StoreError::IdInUse);
        }
        let mut writes = Writes::default();
        writes.insert(mailbox, Record::new(record).encode());
        writes.insert(sender, record.recipient_id.as_bytes().to_vec());
        writes.mailboxes = 1;
        Ok(writes)
    }

    fn secure(&self, group: &Group, id: &MailboxId, key: PublicKey) -> Result<Writes, StoreError> {
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
        group: &Group,
        key_file: &mut KeyFile,
        id: &MailboxId,
        envelope: NewEnvelope,
        quota: Quota,
        now: u64,
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
        check_quota(quota, record.count, record.bytes, u64::from(len))?;
        key_file.ensure(&self.ring, bucket).map_err(backend)?;
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
        writes.envelopes += 1;
        writes.bytes += i64::from(len);
        Ok((PutOutcome::Stored, writes))
    }

    fn ack(
        &self,
        group: &Group,
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

    /// Needs the group applied first: it scans the tree.
    fn delete(&self, id: &MailboxId) -> Result<(bool, Writes), StoreError> {
        let mut writes = Writes::default();
        let Some(mut record) = self.record(id)? else {
            return Ok((false, writes));
        };
        for entry in self.tree.scan_prefix(key(b'e', &[id.as_bytes()])) {
            let (stored_key, value) = entry.map_err(backend)?;
            let seq = be_u64(&stored_key[17..]).ok_or_else(|| corrupt("envelope key"))?;
            let (header, _) = EnvelopeHeader::decode(&value)?;
            writes.remove_envelope(&mut record, id, seq, &header);
        }
        writes.remove(mailbox_key(id));
        writes.remove(sender_key(&record.sender_id));
        writes.remove(push_key(id));
        writes.mailboxes = -1;
        Ok((true, writes))
    }

    /// Removes up to [`SWEEP_CHUNK`] expired envelopes. Needs the group applied
    /// first: it scans the tree. Returns whether more remain.
    fn sweep(&self, now: u64) -> Result<(u64, bool, Writes), StoreError> {
        let mut expired = 0;
        let mut records: HashMap<MailboxId, Option<Record>> = HashMap::new();
        let mut writes = Writes::default();
        let end = key(b'x', &[&now.saturating_add(1).to_be_bytes()]);
        let mut visited = 0;
        for entry in self.tree.range(vec![b'x']..end) {
            if visited == SWEEP_CHUNK {
                break;
            }
            visited += 1;
            let (index_key, _) = entry.map_err(backend)?;
            writes.remove(index_key.to_vec());
            let id = MailboxId::from_slice(index_key.get(9..25).unwrap_or_default())
                .ok_or_else(|| corrupt("expiry index"))?;
            let seq = be_u64(index_key.get(25..).unwrap_or_default())
                .ok_or_else(|| corrupt("expiry index"))?;
            let record = match records.entry(id) {
                std::collections::hash_map::Entry::Occupied(slot) => slot.into_mut(),
                std::collections::hash_map::Entry::Vacant(slot) => slot.insert(self.record(&id)?),
            };
            let Some(record) = record.as_mut() else {
                continue;
            };
            let Some(value) = self.tree.get(envelope_key(&id, seq)).map_err(backend)? else {
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

/// A command applied but not yet answered: answers once the group's flush is known.
type Pending = Box<dyn FnOnce(Option<&StoreError>) + Send>;

fn pending<T: Send + 'static>(reply: Reply<T>, result: Result<T, StoreError>) -> Pending {
    Box::new(move |flush_error| {
        let result = match (flush_error, result) {
            (Some(error), Ok(_)) => Err(error.clone()),
            (_, result) => result,
        };
        // The caller may have given up waiting; nothing to do then.
        let _ = reply.send(result);
    })
}

fn writer_loop(
    shared: &Shared,
    mut key_file: KeyFile,
    mut commands: mpsc::Receiver<Command>,
    group_commit: bool,
) {
    let mut commands_in_group = Vec::with_capacity(MAX_GROUP);
    let mut woken = Vec::new();
    while let Some(first) = commands.blocking_recv() {
        commands_in_group.push(first);
        while group_commit && commands_in_group.len() < MAX_GROUP {
            match commands.try_recv() {
                Ok(command) => commands_in_group.push(command),
                Err(_) => break,
            }
        }
        let mut group = Group::default();
        let mut answers: Vec<Pending> = Vec::with_capacity(commands_in_group.len());
        let mut failed: Option<StoreError> = None;
        for command in commands_in_group.drain(..) {
            answers.push(match command {
                Command::Create(record, reply) => {
                    let result = shared
                        .create(&group, &record)
                        .map(|w| group.commit(shared, w));
                    pending(reply, result)
                }
                Command::Secure(id, key, reply) => {
                    let result = shared
                        .secure(&group, &id, key)
                        .map(|w| group.commit(shared, w));
                    pending(reply, result)
                }
                Command::Put(id, envelope, quota, now, reply) => {
                    let result = shared.put(&group, &mut key_file, &id, envelope, quota, now);
                    let result = result.map(|(outcome, writes)| {
                        group.commit(shared, writes);
                        if outcome == PutOutcome::Stored {
                            woken.push(id);
                        }
                        outcome
                    });
                    pending(reply, result)
                }
                Command::Ack(id, ids, reply) => {
                    let result = shared.ack(&group, &id, &ids).map(|(deleted, writes)| {
                        group.commit(shared, writes);
                        deleted
                    });
                    pending(reply, result)
                }
                Command::Delete(id, reply) => {
                    woken.push(id);
                    let result = group.apply(&shared.tree).and_then(|()| shared.delete(&id));
                    let result = result.map(|(existed, writes)| {
                        group.commit(shared, writes);
                        existed
                    });
                    pending(reply, result)
                }
                Command::Sweep(now, reply) => {
                    let result = group.apply(&shared.tree).and_then(|()| shared.sweep(now));
                    let result = result.and_then(|(expired, more, writes)| {
                        group.commit(shared, writes);
                        // The envelopes' removal must reach the tree before their
                        // bucket keys go, or a reader could find an envelope it
                        // cannot open.
                        group.apply(&shared.tree)?;
                        let shredded = if more {
                            0
                        } else {
                            key_file
                                .destroy_through(&shared.ring, now)
                                .map_err(backend)?
                        };
                        Ok((
                            SweepReport {
                                expired_envelopes: expired,
                                shredded_buckets: shredded,
                            },
                            more,
                        ))
                    });
                    pending(reply, result)
                }
                Command::Flush(reply) => pending(reply, Ok(())),
                Command::Run(job) => job(shared, &mut group),
            });
        }
        if let Err(error) = group.apply(&shared.tree) {
            tracing::error!(%error, "store batch failed");
            failed = Some(error);
        }
        if failed.is_none()
            && let Err(error) = shared.db.flush()
        {
            tracing::error!(%error, "store flush failed");
            failed = Some(backend(error));
        }
        for answer in answers.drain(..) {
            answer(failed.as_ref());
        }
        for id in woken.drain(..) {
            shared.wake.notify(&id);
        }
    }
    if let Err(error) = shared.db.flush() {
        tracing::error!(%error, "final store flush failed");
    }
}

impl MailboxStore for SledStore {
    fn create_mailbox(&self, record: MailboxRecord) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.call(|reply| Command::Create(record, reply)))
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
        Box::pin(self.call(move |reply| Command::Secure(*id, sender_key, reply)))
    }

    fn put<'a>(
        &'a self,
        id: &'a MailboxId,
        envelope: NewEnvelope,
        quota: Quota,
        now: u64,
    ) -> BoxFuture<'a, Result<PutOutcome, StoreError>> {
        Box::pin(self.call(move |reply| Command::Put(*id, envelope, quota, now, reply)))
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
        Box::pin(self.call(move |reply| Command::Ack(*id, envelope_ids.to_vec(), reply)))
    }

    fn delete_mailbox<'a>(&'a self, id: &'a MailboxId) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.call(move |reply| Command::Delete(*id, reply)))
    }

    fn sweep(&self, now: u64) -> BoxFuture<'_, Result<SweepReport, StoreError>> {
        Box::pin(async move {
            let mut total = SweepReport::default();
            loop {
                let (report, more) = self.call(|reply| Command::Sweep(now, reply)).await?;
                total.expired_envelopes += report.expired_envelopes;
                total.shredded_buckets += report.shredded_buckets;
                if !more {
                    return Ok(total);
                }
            }
        })
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            mailboxes: self.shared.mailboxes.load(Ordering::Relaxed),
            envelopes: self.shared.envelopes.load(Ordering::Relaxed),
            bytes: self.shared.bytes.load(Ordering::Relaxed),
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
        Box::pin(self.run(move |shared, group| {
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
            match self.shared.get(&Group::default(), &push_key(id))? {
                Some(bytes) => PushRegistration::decode(&bytes)
                    .map(Some)
                    .ok_or_else(|| corrupt("push registration")),
                None => Ok(None),
            }
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.call(Command::Flush))
    }
}

const DEVICE_RECORD_VERSION: u8 = 2;
/// Bound on a stored prekey blob (an ML-KEM prekey message is about 1.3 KiB).
const MAX_BLOB: usize = 8 * 1024;

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
        group: &Group,
        device: &DeviceKey,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        self.get(group, &device_key(device))?
            .map(|bytes| DeviceRecord::decode(&bytes))
            .transpose()
    }

    fn publish(
        &self,
        group: &mut Group,
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

    fn capacity_in(&self, group: &Group, supporter: &SupporterKey) -> Result<u32, StoreError> {
        match self.get(group, &capacity_key(supporter))? {
            Some(bytes) => Ok(u32::from_be_bytes(
                bytes.as_ref().try_into().map_err(|_| corrupt("capacity"))?,
            )),
            None => Ok(0),
        }
    }

    /// Needs the group applied first: it scans for the oldest one-time prekeys.
    fn claim(
        &self,
        group: &mut Group,
        supporter: &SupporterKey,
        devices: &[DeviceKey],
    ) -> Result<Vec<ClaimedBundle>, StoreError> {
        group.apply(&self.tree)?;
        let capacity = self.capacity_in(group, supporter)?;
        if capacity == 0 {
            return Err(StoreError::CapacityExhausted);
        }
        let mut writes = Writes::default();
        let mut bundles = Vec::new();
        for device in devices {
            let Some(mut record) = self.device_record(group, device)? else {
                continue;
            };
            let mut take = |prefix: u8, count: &mut u32| -> Result<Option<Vec<u8>>, StoreError> {
                match self
                    .tree
                    .scan_prefix(key(prefix, &[device.as_bytes()]))
                    .next()
                {
                    Some(entry) => {
                        let (stored_key, blob) = entry.map_err(backend)?;
                        writes.remove(stored_key.to_vec());
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
        // Two claims in one group must not see the same prekeys.
        group.apply(&self.tree)?;
        Ok(bundles)
    }

    fn put_document_in(
        &self,
        group: &mut Group,
        kind: DocumentKind,
        supporter: &SupporterKey,
        document: Vec<u8>,
        version: u64,
    ) -> Result<(), StoreError> {
        let stored_key = document_key(kind, supporter);
        if kind == DocumentKind::DeviceList
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
        Box::pin(self.run(move |shared, group| shared.publish(group, &device, upload)))
    }

    fn prekey_count<'a>(
        &'a self,
        device: &'a DeviceKey,
    ) -> BoxFuture<'a, Result<Option<PrekeyCount>, StoreError>> {
        Box::pin(async move {
            Ok(self
                .shared
                .device_record(&Group::default(), device)?
                .map(|record| record.count))
        })
    }

    fn set_capacity<'a>(
        &'a self,
        supporter: &'a SupporterKey,
        capacity: u32,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let supporter = *supporter;
        Box::pin(self.run(move |shared, group| {
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
        Box::pin(async move { self.shared.capacity_in(&Group::default(), supporter) })
    }

    fn claim_bundles<'a>(
        &'a self,
        supporter: &'a SupporterKey,
        devices: &'a [DeviceKey],
    ) -> BoxFuture<'a, Result<Vec<ClaimedBundle>, StoreError>> {
        let supporter = *supporter;
        let devices = devices.to_vec();
        Box::pin(self.run(move |shared, group| shared.claim(group, &supporter, &devices)))
    }

    fn put_document<'a>(
        &'a self,
        kind: DocumentKind,
        supporter: &'a SupporterKey,
        document: Vec<u8>,
        version: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let supporter = *supporter;
        Box::pin(self.run(move |shared, group| {
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
