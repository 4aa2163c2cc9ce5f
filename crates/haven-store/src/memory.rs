//! The in-memory backend: for tests and for relays that must not touch a disk.
//!
//! Nothing is durable: a restart loses everything. It has no at-rest keys, since
//! nothing is at rest; it still reports each passed expiry bucket as shredded so
//! that metrics mean the same on every backend.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::directory::{
    ClaimedBundle, DeviceKey, DirectoryStore, DocumentKind, Documents, MAX_ONE_TIME_PREKEYS,
    PrekeyCount, PrekeyUpload, SupporterKey,
};
use crate::mailbox::check_quota;
use crate::wake::WakeHub;
use crate::{
    BoxFuture, EnvelopeId, MailboxId, MailboxRecord, MailboxStore, NewEnvelope, PublicKey,
    PushRegistration, PutOutcome, Quota, RequestDigest, SenderCheck, SenderId, StoreConfig,
    StoreError, StoreStats, StoredEnvelope, Subscription, SweepReport, bucket_end, record_until,
};

/// A [`MailboxStore`] in memory.
pub struct MemoryStore {
    config: StoreConfig,
    // std Mutex: every operation is a short map update, never held across an await.
    state: Mutex<State>,
    // std Mutex, separate from mailboxes: directory traffic never waits on sends.
    directory: Mutex<Directory>,
    wake: WakeHub,
}

#[derive(Default)]
struct Directory {
    devices: HashMap<DeviceKey, DevicePrekeys>,
    capacity: HashMap<SupporterKey, u32>,
    documents: BTreeMap<(DocumentKind, SupporterKey), (u64, Vec<u8>)>,
}

#[derive(Default)]
struct DevicePrekeys {
    signed_prekey: Vec<u8>,
    kem_last_resort: Vec<u8>,
    one_time: BTreeMap<u32, Vec<u8>>,
    kem_one_time: BTreeMap<u32, Vec<u8>>,
}

impl DevicePrekeys {
    fn count(&self) -> PrekeyCount {
        PrekeyCount {
            one_time: self.one_time.len() as u32,
            kem_one_time: self.kem_one_time.len() as u32,
        }
    }
}

#[derive(Default)]
struct State {
    mailboxes: HashMap<MailboxId, Mailbox>,
    senders: HashMap<SenderId, MailboxId>,
    /// (bucket end, mailbox, seq): the expiry index the sweep walks.
    expiry: BTreeSet<(u64, MailboxId, u64)>,
    /// Buckets that hold or held envelopes and have not been swept yet.
    buckets: BTreeSet<u64>,
    /// (idle expiry, mailbox) of every mailbox that expires: what the sweep
    /// walks to remove idle mailboxes.
    idle: BTreeSet<(u64, MailboxId)>,
    envelopes: u64,
    bytes: u64,
    /// Accepted signed requests -> their record's expiry ([`RequestDigest`]).
    requests: HashMap<RequestDigest, u64>,
    /// The same by expiry, for the sweep.
    request_expiry: BTreeSet<(u64, RequestDigest)>,
}

struct Mailbox {
    record: MailboxRecord,
    push: Option<PushRegistration>,
    next_seq: u64,
    envelopes: BTreeMap<u64, Stored>,
    by_id: HashMap<EnvelopeId, u64>,
    bytes: u64,
}

struct Stored {
    id: EnvelopeId,
    expires_at: u64,
    payload: Vec<u8>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new(config: StoreConfig) -> Self {
        Self {
            config,
            state: Mutex::new(State::default()),
            directory: Mutex::new(Directory::default()),
            wake: WakeHub::default(),
        }
    }

    fn directory(&self) -> MutexGuard<'_, Directory> {
        self.directory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// Records `digest` until `until` (already rounded), replacing a passed
    /// record of it.
    fn remember(&mut self, digest: RequestDigest, until: u64) {
        if let Some(stored) = self.requests.insert(digest, until) {
            self.request_expiry.remove(&(stored, digest));
        }
        self.request_expiry.insert((until, digest));
    }

    fn remove_envelope(&mut self, id: &MailboxId, seq: u64) -> bool {
        let Some(mailbox) = self.mailboxes.get_mut(id) else {
            return false;
        };
        let Some(stored) = mailbox.envelopes.remove(&seq) else {
            return false;
        };
        mailbox.by_id.remove(&stored.id);
        let len = stored.payload.len() as u64;
        mailbox.bytes -= len;
        self.bytes -= len;
        self.envelopes -= 1;
        self.expiry.remove(&(stored.expires_at, *id, seq));
        true
    }

    /// Removes the mailbox with everything in it; whether it existed.
    fn remove_mailbox(&mut self, id: &MailboxId) -> bool {
        let Some(mailbox) = self.mailboxes.get(id) else {
            return false;
        };
        let seqs: Vec<u64> = mailbox.envelopes.keys().copied().collect();
        for seq in seqs {
            self.remove_envelope(id, seq);
        }
        if let Some(mailbox) = self.mailboxes.remove(id) {
            self.senders.remove(&mailbox.record.sender_id);
            self.idle.remove(&(mailbox.record.idle_expires_at, *id));
        }
        true
    }
}

impl MailboxStore for MemoryStore {
    fn create_mailbox(&self, mut record: MailboxRecord) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let mut state = self.state();
            if state.mailboxes.contains_key(&record.recipient_id)
                || state.senders.contains_key(&record.sender_id)
            {
                return Err(StoreError::IdInUse);
            }
            if record.idle_expires_at != 0 {
                record.idle_expires_at =
                    bucket_end(record.idle_expires_at, self.config.bucket_seconds);
                state
                    .idle
                    .insert((record.idle_expires_at, record.recipient_id));
            }
            state.senders.insert(record.sender_id, record.recipient_id);
            state.mailboxes.insert(
                record.recipient_id,
                Mailbox {
                    record,
                    push: None,
                    next_seq: 1,
                    envelopes: BTreeMap::new(),
                    by_id: HashMap::new(),
                    bytes: 0,
                },
            );
            Ok(())
        })
    }

    fn mailbox<'a>(
        &'a self,
        id: &'a MailboxId,
    ) -> BoxFuture<'a, Result<Option<MailboxRecord>, StoreError>> {
        Box::pin(async move { Ok(self.state().mailboxes.get(id).map(|m| m.record.clone())) })
    }

    fn mailbox_by_sender<'a>(
        &'a self,
        id: &'a SenderId,
    ) -> BoxFuture<'a, Result<Option<MailboxRecord>, StoreError>> {
        Box::pin(async move {
            let state = self.state();
            Ok(state
                .senders
                .get(id)
                .and_then(|r| state.mailboxes.get(r))
                .map(|m| m.record.clone()))
        })
    }

    fn secure<'a>(
        &'a self,
        id: &'a MailboxId,
        sender_key: PublicKey,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut state = self.state();
            let mailbox = state
                .mailboxes
                .get_mut(id)
                .ok_or(StoreError::MailboxNotFound)?;
            match mailbox.record.sender_key {
                Some(existing) if existing != sender_key => Err(StoreError::AlreadySecured),
                _ => {
                    mailbox.record.sender_key = Some(sender_key);
                    Ok(())
                }
            }
        })
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
            let expires_at = bucket_end(envelope.expires_at, self.config.bucket_seconds);
            if envelope.expires_at <= now {
                return Err(StoreError::AlreadyExpired);
            }
            {
                let mut state = self.state();
                let mailbox = state.mailboxes.get(id).ok_or(StoreError::MailboxNotFound)?;
                if !sender.allows(mailbox.record.sender_key) {
                    return Err(StoreError::SenderKeyChanged);
                }
                if let Some(&seq) = mailbox.by_id.get(&envelope.id) {
                    let expired = mailbox
                        .envelopes
                        .get(&seq)
                        .is_none_or(|s| s.expires_at <= now);
                    if !expired {
                        return Ok(PutOutcome::Duplicate);
                    }
                    state.remove_envelope(id, seq);
                }
                // A first contact accepted once already, since acknowledged.
                if let Some(spent) = envelope.spent
                    && state
                        .requests
                        .get(&spent.digest)
                        .is_some_and(|&until| until > now)
                {
                    return Ok(PutOutcome::Duplicate);
                }
                let len = envelope.payload.len() as u64;
                let mailbox = state
                    .mailboxes
                    .get_mut(id)
                    .ok_or(StoreError::MailboxNotFound)?;
                check_quota(quota, mailbox.envelopes.len() as u64, mailbox.bytes, len)?;
                let seq = mailbox.next_seq;
                mailbox.next_seq += 1;
                mailbox.by_id.insert(envelope.id, seq);
                mailbox.bytes += len;
                mailbox.envelopes.insert(
                    seq,
                    Stored {
                        id: envelope.id,
                        expires_at,
                        payload: envelope.payload,
                    },
                );
                state.expiry.insert((expires_at, *id, seq));
                state.buckets.insert(expires_at);
                state.envelopes += 1;
                state.bytes += len;
                if let Some(spent) = envelope.spent {
                    state.remember(spent.digest, record_until(spent.until));
                }
            }
            self.wake.notify(id);
            Ok(PutOutcome::Stored)
        })
    }

    fn list<'a>(
        &'a self,
        id: &'a MailboxId,
        after: Option<u64>,
        limit: usize,
        now: u64,
    ) -> BoxFuture<'a, Result<Vec<StoredEnvelope>, StoreError>> {
        Box::pin(async move {
            let state = self.state();
            let mailbox = state.mailboxes.get(id).ok_or(StoreError::MailboxNotFound)?;
            let start = after.map_or(0, |seq| seq.saturating_add(1));
            Ok(mailbox
                .envelopes
                .range(start..)
                .filter(|(_, stored)| stored.expires_at > now)
                .take(limit)
                .map(|(&seq, stored)| StoredEnvelope {
                    seq,
                    id: stored.id,
                    expires_at: stored.expires_at,
                    payload: stored.payload.clone(),
                })
                .collect())
        })
    }

    fn ack<'a>(
        &'a self,
        id: &'a MailboxId,
        envelope_ids: &'a [EnvelopeId],
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let mut state = self.state();
            let mailbox = state.mailboxes.get(id).ok_or(StoreError::MailboxNotFound)?;
            let seqs: Vec<u64> = envelope_ids
                .iter()
                .filter_map(|e| mailbox.by_id.get(e).copied())
                .collect();
            let mut deleted = 0;
            for seq in seqs {
                if state.remove_envelope(id, seq) {
                    deleted += 1;
                }
            }
            Ok(deleted)
        })
    }

    fn delete_mailbox<'a>(&'a self, id: &'a MailboxId) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let existed = self.state().remove_mailbox(id);
            if existed {
                // Wake open streams so they notice the mailbox is gone.
                self.wake.notify(id);
            }
            Ok(existed)
        })
    }

    fn keep_until<'a>(
        &'a self,
        id: &'a MailboxId,
        until: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let until = bucket_end(until, self.config.bucket_seconds);
            let mut state = self.state();
            let mailbox = state
                .mailboxes
                .get_mut(id)
                .ok_or(StoreError::MailboxNotFound)?;
            let stored = mailbox.record.idle_expires_at;
            if stored != 0 && until > stored {
                mailbox.record.idle_expires_at = until;
                state.idle.remove(&(stored, *id));
                state.idle.insert((until, *id));
            }
            Ok(())
        })
    }

    fn sweep(&self, now: u64) -> BoxFuture<'_, Result<SweepReport, StoreError>> {
        Box::pin(async move {
            let mut state = self.state();
            let mut report = SweepReport::default();
            while let Some(&(bucket, id, seq)) = state.expiry.first() {
                if bucket > now {
                    break;
                }
                if state.remove_envelope(&id, seq) {
                    report.expired_envelopes += 1;
                } else {
                    state.expiry.remove(&(bucket, id, seq));
                }
            }
            let passed: Vec<u64> = state.buckets.range(..=now).copied().collect();
            for bucket in passed {
                state.buckets.remove(&bucket);
                report.shredded_buckets += 1;
            }
            let mut removed = Vec::new();
            while let Some(&(at, id)) = state.idle.first() {
                if at > now {
                    break;
                }
                state.idle.remove(&(at, id));
                if state.remove_mailbox(&id) {
                    removed.push(id);
                }
            }
            while let Some(&(until, digest)) = state.request_expiry.first() {
                if until > now {
                    break;
                }
                state.request_expiry.remove(&(until, digest));
                if state.requests.get(&digest) == Some(&until) {
                    state.requests.remove(&digest);
                }
            }
            drop(state);
            report.expired_mailboxes = removed.len() as u64;
            for id in &removed {
                self.wake.notify(id);
            }
            Ok(report)
        })
    }

    fn stats(&self) -> StoreStats {
        let state = self.state();
        StoreStats {
            mailboxes: state.mailboxes.len() as u64,
            envelopes: state.envelopes,
            bytes: state.bytes,
            memory: None,
            unreadable_envelopes: 0,
        }
    }

    fn subscribe(&self, id: &MailboxId) -> Subscription {
        self.wake.subscribe(id)
    }

    fn watched<'a>(&'a self, id: &'a MailboxId) -> BoxFuture<'a, bool> {
        Box::pin(async move { self.wake.watched(id) })
    }

    fn set_push<'a>(
        &'a self,
        id: &'a MailboxId,
        push: Option<PushRegistration>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut state = self.state();
            let mailbox = state
                .mailboxes
                .get_mut(id)
                .ok_or(StoreError::MailboxNotFound)?;
            mailbox.push = push;
            Ok(())
        })
    }

    fn push<'a>(
        &'a self,
        id: &'a MailboxId,
    ) -> BoxFuture<'a, Result<Option<PushRegistration>, StoreError>> {
        Box::pin(async move {
            Ok(self
                .state()
                .mailboxes
                .get(id)
                .and_then(|mailbox| mailbox.push.clone()))
        })
    }

    fn remember_request<'a>(
        &'a self,
        digest: &'a RequestDigest,
        until: u64,
        now: u64,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let until = record_until(until);
            let mut state = self.state();
            if state
                .requests
                .get(digest)
                .is_some_and(|&stored| stored > now)
            {
                return Ok(false);
            }
            state.remember(*digest, until);
            Ok(true)
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }
}

impl DirectoryStore for MemoryStore {
    fn publish_prekeys<'a>(
        &'a self,
        device: &'a DeviceKey,
        upload: PrekeyUpload,
    ) -> BoxFuture<'a, Result<PrekeyCount, StoreError>> {
        Box::pin(async move {
            let mut directory = self.directory();
            let stored = directory.devices.get(device);
            let fits = |existing: Option<&BTreeMap<u32, Vec<u8>>>, new: &[(u32, Vec<u8>)]| {
                let mut ids: std::collections::BTreeSet<u32> = existing
                    .map(|map| map.keys().copied().collect())
                    .unwrap_or_default();
                ids.extend(new.iter().map(|(id, _)| *id));
                ids.len() <= MAX_ONE_TIME_PREKEYS
            };
            if !fits(stored.map(|d| &d.one_time), &upload.one_time)
                || !fits(stored.map(|d| &d.kem_one_time), &upload.kem_one_time)
            {
                return Err(StoreError::TooManyPrekeys {
                    limit: MAX_ONE_TIME_PREKEYS,
                });
            }
            let entry = directory.devices.entry(*device).or_default();
            entry.signed_prekey = upload.signed_prekey;
            entry.kem_last_resort = upload.kem_last_resort;
            entry.one_time.extend(upload.one_time);
            entry.kem_one_time.extend(upload.kem_one_time);
            Ok(entry.count())
        })
    }

    fn prekey_count<'a>(
        &'a self,
        device: &'a DeviceKey,
    ) -> BoxFuture<'a, Result<Option<PrekeyCount>, StoreError>> {
        Box::pin(async move {
            Ok(self
                .directory()
                .devices
                .get(device)
                .map(DevicePrekeys::count))
        })
    }

    fn remove_prekeys<'a>(
        &'a self,
        device: &'a DeviceKey,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.directory().devices.remove(device);
            Ok(())
        })
    }

    fn set_capacity<'a>(
        &'a self,
        supporter: &'a SupporterKey,
        capacity: u32,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.directory().capacity.insert(*supporter, capacity);
            Ok(())
        })
    }

    fn capacity<'a>(
        &'a self,
        supporter: &'a SupporterKey,
    ) -> BoxFuture<'a, Result<u32, StoreError>> {
        Box::pin(async move {
            Ok(self
                .directory()
                .capacity
                .get(supporter)
                .copied()
                .unwrap_or(0))
        })
    }

    fn claim_bundles<'a>(
        &'a self,
        supporter: &'a SupporterKey,
        devices: &'a [DeviceKey],
    ) -> BoxFuture<'a, Result<Vec<ClaimedBundle>, StoreError>> {
        Box::pin(async move {
            let mut directory = self.directory();
            let capacity = directory.capacity.get(supporter).copied().unwrap_or(0);
            if capacity == 0 {
                return Err(StoreError::CapacityExhausted);
            }
            if !devices
                .iter()
                .all(|device| directory.devices.contains_key(device))
            {
                return Err(StoreError::NoPrekeys);
            }
            let mut bundles = Vec::new();
            for device in devices {
                let Some(prekeys) = directory.devices.get_mut(device) else {
                    return Err(StoreError::NoPrekeys);
                };
                let one_time = prekeys.one_time.pop_first().map(|(_, blob)| blob);
                let kem = prekeys
                    .kem_one_time
                    .pop_first()
                    .map_or_else(|| prekeys.kem_last_resort.clone(), |(_, blob)| blob);
                bundles.push(ClaimedBundle {
                    device: *device,
                    signed_prekey: prekeys.signed_prekey.clone(),
                    one_time,
                    kem,
                });
            }
            directory.capacity.insert(*supporter, capacity - 1);
            Ok(bundles)
        })
    }

    fn put_document<'a>(
        &'a self,
        kind: DocumentKind,
        supporter: &'a SupporterKey,
        document: Vec<u8>,
        version: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut directory = self.directory();
            if let Some((stored, stored_document)) = directory.documents.get(&(kind, *supporter))
                && kind.is_versioned()
            {
                if version < *stored {
                    return Err(StoreError::StaleDocument {
                        stored: *stored,
                        found: version,
                    });
                }
                if version == *stored && document != *stored_document {
                    return Err(StoreError::ConflictingDocument { version });
                }
            }
            directory
                .documents
                .insert((kind, *supporter), (version, document));
            Ok(())
        })
    }

    fn document<'a>(
        &'a self,
        kind: DocumentKind,
        supporter: &'a SupporterKey,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
        Box::pin(async move {
            Ok(self
                .directory()
                .documents
                .get(&(kind, *supporter))
                .map(|(_, d)| d.clone()))
        })
    }

    fn documents(&self, kind: DocumentKind) -> BoxFuture<'_, Result<Documents, StoreError>> {
        Box::pin(async move {
            Ok(self
                .directory()
                .documents
                .iter()
                .filter(|((stored_kind, _), _)| *stored_kind == kind)
                .map(|((_, supporter), (_, document))| (*supporter, document.clone()))
                .collect())
        })
    }
}
