//! The outbox: what this device encrypted is persisted, together with the
//! ratchet state that produced it, before anything is posted; posting then
//! sends exactly those bytes under the same envelope id — again after a lost
//! response, a reset connection or a restarted app — until the relay confirms
//! (review 2026-12-crypto #2). So no message key ever encrypts two plaintexts,
//! and a message shown as sent is delivered once (the relay and the receiver
//! drop copies by envelope id) or its failure is reported.
//!
//! Entries of a conversation are sealed under the conversation's own key (they
//! go when it ends); entries between a supporter's devices under the storage key.

use ed25519_dalek::{Signer as _, SigningKey};
use haven_proto::auth::send_payload;
use haven_proto::v1 as proto;

use crate::conversation::{ConversationId, NOTICE_SECONDS, TTL_SECONDS, record_label};
use crate::storage::Tree;
use crate::transport::Lane;
use crate::{Client, Error, RelayRefusal};

const OUTBOX_PREFIX: &[u8] = b"outbox/";
/// One record per message of a conversation still on its way: how many
/// envelopes it went out as (one per device of the other side), and how many
/// of them the relay refused for good.
const SENDING_PREFIX: &[u8] = b"sending/";
/// Messages every envelope of which was refused for good after their send
/// returned: reported by the next sync as [`crate::Event::SendFailed`].
const FAILED_PREFIX: &[u8] = b"send-failed/";

/// Whose the queued envelopes are: a conversation's, the sync traffic between
/// this supporter's devices, notices to declined help-seekers, or the last
/// words of a conversation already deleted here (its end message, and what was
/// still queued before it), which must outlive the conversation's key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    Conversation(ConversationId),
    Siblings,
    /// Notices to help-seekers this device declined (no conversation is kept).
    Notices,
    /// A conversation ended here whose end message may not be posted yet.
    Farewell(ConversationId),
}

impl Owner {
    /// 17 bytes in the entry's key: a kind, and the conversation id (zeros for
    /// the device's own kinds).
    fn tag(self) -> [u8; 17] {
        let (kind, id) = match self {
            Owner::Conversation(id) => (0, id),
            Owner::Siblings => (1, [0; 16]),
            Owner::Notices => (2, [0; 16]),
            Owner::Farewell(id) => (3, id),
        };
        let mut tag = [0u8; 17];
        tag[0] = kind;
        tag[1..].copy_from_slice(&id);
        tag
    }

    fn from_tag(tag: &[u8]) -> Option<Self> {
        let id: ConversationId = tag.get(1..17)?.try_into().ok()?;
        Some(match tag.first()? {
            0 => Owner::Conversation(id),
            1 => Owner::Siblings,
            2 => Owner::Notices,
            3 => Owner::Farewell(id),
            _ => return None,
        })
    }

    /// The connection its envelopes are posted over.
    fn lane(self) -> Lane {
        match self {
            Owner::Conversation(id) | Owner::Farewell(id) => Lane::Conversation(id),
            Owner::Siblings | Owner::Notices => Lane::Device,
        }
    }

    /// The conversation key its entries are sealed under (`None`: the storage key).
    fn label(self) -> Option<crate::keyfile::Label> {
        match self {
            Owner::Conversation(id) => Some(record_label(&id)),
            _ => None,
        }
    }

    fn prefix(self) -> Vec<u8> {
        [OUTBOX_PREFIX, &self.tag()].concat()
    }

    /// How many entries this outbox keeps, and for how long (seconds), before
    /// the oldest are dropped. A conversation's own messages and a farewell are
    /// the person's words, written by them: they wait as long as it takes. So
    /// does sync traffic between this supporter's devices: each copy, ending
    /// or retention follows the supporter's own action, and they are ratchet
    /// messages, so dropping one would leave a gap a sibling session may not
    /// survive. The one outbox others make grow is bounded: notices, one per
    /// first contact this device declined (the attacker picks their mailbox
    /// and can keep it full), live as long as the first contact they answer
    /// would wait on a relay ([`NOTICE_SECONDS`]), at most [`MAX_NOTICES`].
    fn bounds(self) -> Option<(usize, u64)> {
        match self {
            Owner::Conversation(_) | Owner::Farewell(_) | Owner::Siblings => None,
            Owner::Notices => Some((MAX_NOTICES, NOTICE_SECONDS)),
        }
    }
}

/// The most notices to declined help-seekers kept queued (the oldest go first).
pub(crate) const MAX_NOTICES: usize = 64;
/// The most envelopes queued for one sibling device. Beyond it the device is
/// lost or long offline (a relay keeps nothing for more than 14 days); the
/// oldest go, its session may not survive the gap, and it is linked again.
pub(crate) const MAX_QUEUED_PER_SIBLING: usize = 10_000;

/// What posting an outbox did with the entries it found.
#[derive(Default)]
pub(crate) struct Posted {
    /// Keys of entries still queued (their mailbox did not take them yet).
    pub(crate) queued: Vec<Vec<u8>>,
    /// Keys of entries the relay refused for good (dropped), with the refusal.
    pub(crate) refused: Vec<(Vec<u8>, Error)>,
}

/// One envelope ready to post: every byte of the request except the proof of
/// work, which is solved at each post (so a stamp bound to time stays fresh).
pub(crate) struct Queued {
    /// When it was queued (seconds since the Unix epoch), for the bounds.
    pub(crate) queued_at: u64,
    /// The message it belongs to (random, set when a conversation's outbox
    /// takes it; 0: none): one message goes out as one envelope per device.
    pub(crate) message: u64,
    pub(crate) to: [u8; 16],
    pub(crate) envelope_id: [u8; 16],
    pub(crate) ttl_seconds: u64,
    pub(crate) signature: [u8; 64],
    /// An intake mailbox: post with a proof of work.
    pub(crate) stamped: bool,
    pub(crate) sealed: Vec<u8>,
}

/// version, queued at, message, to, envelope id, TTL, signature, stamped.
const HEADER_LEN: usize = 1 + 8 + 8 + 16 + 16 + 8 + 64 + 1;

fn sending_key(id: &ConversationId, message: u64) -> Vec<u8> {
    [SENDING_PREFIX, &id[..], &message.to_be_bytes()].concat()
}

impl Queued {
    /// The same envelope (same id, same bytes).
    pub(crate) fn copy(&self) -> Self {
        Self {
            queued_at: self.queued_at,
            message: self.message,
            to: self.to,
            envelope_id: self.envelope_id,
            ttl_seconds: self.ttl_seconds,
            signature: self.signature,
            stamped: self.stamped,
            sealed: self.sealed.clone(),
        }
    }

    /// An envelope of `sealed` bytes for the mailbox `to`, under a fresh id,
    /// signed with `sender_key` (checked by the relay when the mailbox is secured).
    pub(crate) fn new(to: [u8; 16], sealed: Vec<u8>, sender_key: &[u8; 32], stamped: bool) -> Self {
        let envelope_id: [u8; 16] = rand::random();
        let signature = SigningKey::from_bytes(sender_key)
            .sign(&send_payload(&to, &envelope_id, TTL_SECONDS, &sealed))
            .to_bytes();
        Self {
            queued_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            message: 0,
            to,
            envelope_id,
            ttl_seconds: TTL_SECONDS,
            signature,
            stamped,
            sealed,
        }
    }

    /// The stored form, as part of `message` (the outbox sets it when it
    /// takes the envelope, without copying the sealed bytes first).
    fn encode(&self, message: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.sealed.len());
        out.push(3);
        out.extend_from_slice(&self.queued_at.to_be_bytes());
        out.extend_from_slice(&message.to_be_bytes());
        out.extend_from_slice(&self.to);
        out.extend_from_slice(&self.envelope_id);
        out.extend_from_slice(&self.ttl_seconds.to_be_bytes());
        out.extend_from_slice(&self.signature);
        out.push(u8::from(self.stamped));
        out.extend_from_slice(&self.sealed);
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let malformed = || Error::Storage("a queued envelope is malformed".into());
        // Version 2 had no message field: read it as version 3 with message 0.
        let upgraded;
        let bytes = match bytes.first() {
            Some(3) if bytes.len() >= HEADER_LEN => bytes,
            Some(2) if bytes.len() >= HEADER_LEN - 8 => {
                upgraded = [&bytes[..9], &[0u8; 8][..], &bytes[9..]].concat();
                upgraded.as_slice()
            }
            _ => return Err(malformed()),
        };
        let field = |at: usize, len: usize| &bytes[at..at + len];
        Ok(Self {
            queued_at: u64::from_be_bytes(field(1, 8).try_into().map_err(|_| malformed())?),
            message: u64::from_be_bytes(field(9, 8).try_into().map_err(|_| malformed())?),
            to: field(17, 16).try_into().map_err(|_| malformed())?,
            envelope_id: field(33, 16).try_into().map_err(|_| malformed())?,
            ttl_seconds: u64::from_be_bytes(field(49, 8).try_into().map_err(|_| malformed())?),
            signature: field(57, 64).try_into().map_err(|_| malformed())?,
            stamped: bytes[121] == 1,
            sealed: bytes[122..].to_vec(),
        })
    }
}

impl Posted {
    /// What a call that queued the entries `ours` tells its caller: a refusal
    /// when every one of them was refused for good, [`Error::Queued`] when any
    /// of them still waits, and success otherwise — so an earlier envelope's
    /// fate, or one device's gone mailbox while the others got it, is never
    /// reported as this call's.
    pub(crate) fn outcome(self, ours: &[Vec<u8>]) -> Result<(), Error> {
        let mut refused: Vec<Error> = self
            .refused
            .into_iter()
            .filter(|(key, _)| ours.contains(key))
            .map(|(_, error)| error)
            .collect();
        if !ours.is_empty() && refused.len() == ours.len() {
            return Err(refused.swap_remove(0));
        }
        if self.queued.iter().any(|key| ours.contains(key)) {
            return Err(Error::Queued("the relay has not taken it yet".into()));
        }
        Ok(())
    }
}

/// Whether a failed post may succeed later (the relay unreachable, busy, the
/// mailbox full for now) rather than never (the mailbox is gone, the request
/// was refused as such).
fn retryable(error: &Error) -> bool {
    matches!(
        error,
        Error::Unreachable(_)
            | Error::Relay {
                kind: RelayRefusal::Unavailable
                    | RelayRefusal::ResourceExhausted
                    | RelayRefusal::Other,
                ..
            }
    )
}

fn entry_key(owner: Owner, sequence: u64) -> Vec<u8> {
    [owner.prefix(), sequence.to_be_bytes().to_vec()].concat()
}

impl Client {
    /// Adds envelopes to `owner`'s outbox, after any already there, and
    /// returns their keys. Not flushed: the caller flushes them together with
    /// the state they came from.
    pub(crate) fn enqueue(
        &self,
        owner: Owner,
        envelopes: &[Queued],
    ) -> Result<Vec<Vec<u8>>, Error> {
        let prefix = owner.prefix();
        let mut next = match self.store.last_key(Tree::State, &prefix)? {
            Some(key) => key[prefix.len()..]
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| Error::Storage("an outbox key is malformed".into()))?
                .saturating_add(1),
            None => 0,
        };
        let mut keys = Vec::with_capacity(envelopes.len());
        // A conversation's envelopes of one call are one message, sent once per
        // device: it failed only when every one of them was refused.
        let message = match owner {
            Owner::Conversation(id) if !envelopes.is_empty() => {
                let message = rand::random::<u64>().max(1);
                let record = [(envelopes.len() as u32).to_be_bytes(), 0u32.to_be_bytes()].concat();
                self.store
                    .put(Tree::State, &sending_key(&id, message), &record)?;
                message
            }
            _ => 0,
        };
        for envelope in envelopes {
            let key = entry_key(owner, next);
            let message = if message != 0 {
                message
            } else {
                envelope.message
            };
            self.put_entry(owner, &key, &envelope.encode(message))?;
            keys.push(key);
            next = next.saturating_add(1);
        }
        if owner == Owner::Siblings {
            self.bound_sibling_queues(&prefix)?;
        }
        if let Some((most, _)) = owner.bounds() {
            let held = self.store.keys_with_prefix(Tree::State, &prefix)?;
            let over = held.len().saturating_sub(most);
            if over > 0 {
                tracing::debug!(over, "an outbox is full: its oldest envelopes are dropped");
            }
            for key in held.iter().take(over) {
                self.store.remove(Tree::State, key)?;
            }
            keys.retain(|key| !held[..over].contains(key));
        }
        Ok(keys)
    }

    fn put_entry(&self, owner: Owner, key: &[u8], value: &[u8]) -> Result<(), Error> {
        match owner.label() {
            Some(label) => self.store.put_under(&label, Tree::State, key, value),
            None => self.store.put(Tree::State, key, value),
        }
    }

    fn get_entry(&self, owner: Owner, key: &[u8]) -> Result<Option<Queued>, Error> {
        let stored = match owner.label() {
            Some(label) => self.store.get_under(&label, Tree::State, key)?,
            None => self.store.get(Tree::State, key)?,
        };
        stored.map(|bytes| Queued::decode(&bytes)).transpose()
    }

    /// Whether `owner`'s outbox holds an envelope for the mailbox `to`.
    pub(crate) fn queued_to(&self, owner: Owner, to: &[u8; 16]) -> Result<bool, Error> {
        for key in self.store.keys_with_prefix(Tree::State, &owner.prefix())? {
            if self
                .get_entry(owner, &key)?
                .is_some_and(|entry| entry.to == *to)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Keeps the sibling outbox within [`MAX_QUEUED_PER_SIBLING`] per device:
    /// only when it holds more than that in all are entries read.
    fn bound_sibling_queues(&self, prefix: &[u8]) -> Result<(), Error> {
        let keys = self.store.keys_with_prefix(Tree::State, prefix)?;
        if keys.len() <= MAX_QUEUED_PER_SIBLING {
            return Ok(());
        }
        let mut per_device: std::collections::HashMap<[u8; 16], Vec<Vec<u8>>> =
            std::collections::HashMap::new();
        for key in keys {
            if let Some(entry) = self.get_entry(Owner::Siblings, &key)? {
                per_device.entry(entry.to).or_default().push(key);
            }
        }
        for (_, keys) in per_device {
            let over = keys.len().saturating_sub(MAX_QUEUED_PER_SIBLING);
            if over > 0 {
                tracing::warn!(
                    over,
                    "a sibling device's queue is full: its oldest envelopes are dropped"
                );
            }
            for key in keys.iter().take(over) {
                self.store.remove(Tree::State, key)?;
            }
        }
        Ok(())
    }

    /// Forgets what `owner`'s outbox holds for the mailbox `to`.
    pub(crate) fn drop_queued_to(&self, owner: Owner, to: &[u8; 16]) -> Result<(), Error> {
        for key in self.store.keys_with_prefix(Tree::State, &owner.prefix())? {
            if self
                .get_entry(owner, &key)?
                .is_none_or(|entry| entry.to == *to)
            {
                self.store.remove(Tree::State, &key)?;
            }
        }
        Ok(())
    }

    /// Forgets `owner`'s outbox.
    pub(crate) fn drop_outbox(&self, owner: Owner) -> Result<(), Error> {
        if let Owner::Conversation(id) = owner {
            self.store
                .remove_prefix(Tree::State, &[SENDING_PREFIX, &id[..]].concat())?;
        }
        self.store.remove_prefix(Tree::State, &owner.prefix())
    }

    /// What became of one envelope of a conversation's message: delivered
    /// (the message reached a device), or refused for good (when every
    /// envelope of the message was, and it is not one the caller reports
    /// itself, it is kept as failed for the next sync to report).
    fn settle_message(
        &self,
        id: &ConversationId,
        message: u64,
        delivered: bool,
        reported: &[u64],
    ) -> Result<(), Error> {
        if message == 0 {
            return Ok(());
        }
        let key = sending_key(id, message);
        let Some(record) = self.store.get(Tree::State, &key)? else {
            return Ok(());
        };
        if delivered {
            return self.store.remove(Tree::State, &key);
        }
        let count = |at: usize| {
            record
                .get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u32::from_be_bytes)
        };
        let (total, refused) = (count(0), count(4).saturating_add(1));
        if refused < total {
            let record = [total.to_be_bytes(), refused.to_be_bytes()].concat();
            return self.store.put(Tree::State, &key, &record);
        }
        self.store.remove(Tree::State, &key)?;
        if !reported.contains(&message) {
            self.store.put(
                Tree::State,
                &[FAILED_PREFIX, &id[..], &message.to_be_bytes()].concat(),
                &id[..],
            )?;
        }
        Ok(())
    }

    /// The messages that failed after their send returned, as events, each
    /// reported once.
    pub(crate) fn take_failed_sends(&self) -> Result<Vec<crate::Event>, Error> {
        let mut events = Vec::new();
        for (key, value) in self.store.scan_prefix(Tree::State, FAILED_PREFIX)? {
            if let Ok(conversation) = ConversationId::try_from(value.as_slice()) {
                events.push(crate::Event::SendFailed {
                    conversation,
                    reason: "the relay refused it for good (the other side's mailbox is gone)"
                        .into(),
                });
            }
            self.store.remove(Tree::State, &key)?;
        }
        Ok(events)
    }

    /// Moves what a conversation still has queued, then `last`, into its
    /// farewell outbox (sealed under the storage key), so the conversation can
    /// be deleted here at once and its last words still go out. Not flushed.
    pub(crate) fn queue_farewell(&self, id: &ConversationId, last: &[Queued]) -> Result<(), Error> {
        let conversation = Owner::Conversation(*id);
        let mut pending = Vec::new();
        for key in self
            .store
            .keys_with_prefix(Tree::State, &conversation.prefix())?
        {
            if let Some(entry) = self.get_entry(conversation, &key)? {
                pending.push(entry);
            }
        }
        self.drop_outbox(conversation)?;
        pending.extend(last.iter().map(Queued::copy));
        self.enqueue(Owner::Farewell(*id), &pending)?;
        Ok(())
    }

    /// How many envelopes wait to be posted, for every conversation and the
    /// sync between this supporter's devices together.
    pub fn queued_envelopes(&self) -> Result<usize, Error> {
        Ok(self
            .store
            .keys_with_prefix(Tree::State, OUTBOX_PREFIX)?
            .len())
    }

    /// Posts `owner`'s queued envelopes in order, each removed once the relay
    /// confirmed it. One that may succeed later (the relay unreachable, its
    /// mailbox full) stays, and so does everything after it *for the same
    /// mailbox* (order per mailbox holds), while envelopes for other mailboxes
    /// go on: one full mailbox never holds back the others. One the relay
    /// refuses for good (the mailbox is gone, the request refused as such) is
    /// dropped. Says which entries stayed and which were refused.
    pub(crate) async fn post_queued(&self, owner: Owner) -> Result<Posted, Error> {
        self.post_queued_for(owner, &[]).await
    }

    /// [`post_queued`](Self::post_queued) for a call that reports the fate of
    /// the entries `ours` itself (a send's own message): every other message
    /// of a conversation that fails here is kept for the next sync to report
    /// as [`crate::Event::SendFailed`].
    pub(crate) async fn post_queued_for(
        &self,
        owner: Owner,
        ours: &[Vec<u8>],
    ) -> Result<Posted, Error> {
        let mut posted = Posted::default();
        let mut reported = Vec::new();
        let mut blocked: Vec<[u8; 16]> = Vec::new();
        let mut difficulty = None;
        for key in self.store.keys_with_prefix(Tree::State, &owner.prefix())? {
            let Some(envelope) = self.get_entry(owner, &key)? else {
                // Its key is gone: the conversation is being ended.
                self.store.remove(Tree::State, &key)?;
                continue;
            };
            if let Some((_, longest)) = owner.bounds()
                && self.now().saturating_sub(envelope.queued_at) > longest
            {
                tracing::debug!("a queued envelope outlived its outbox's bound: dropped");
                self.store.remove(Tree::State, &key)?;
                continue;
            }
            if ours.contains(&key) && !reported.contains(&envelope.message) {
                reported.push(envelope.message);
            }
            if blocked.contains(&envelope.to) {
                posted.queued.push(key);
                continue;
            }
            if envelope.stamped && difficulty.is_none() {
                match self.difficulty().await {
                    Ok(bits) => difficulty = Some(bits),
                    Err(error) if retryable(&error) => {
                        blocked.push(envelope.to);
                        posted.queued.push(key);
                        continue;
                    }
                    Err(error) => return Err(error),
                }
            }
            match self
                .post_envelope(&envelope, difficulty, owner.lane())
                .await
            {
                Ok(()) => {
                    self.store.remove(Tree::State, &key)?;
                    if let Owner::Conversation(id) = owner {
                        self.settle_message(&id, envelope.message, true, &reported)?;
                    }
                }
                Err(error) if retryable(&error) => {
                    blocked.push(envelope.to);
                    posted.queued.push(key);
                }
                Err(error) => {
                    tracing::debug!(%error, "the relay refused a queued envelope for good");
                    // Counted before the entry goes, so no flush in between can
                    // lose the failure.
                    if let Owner::Conversation(id) = owner {
                        self.settle_message(&id, envelope.message, false, &reported)?;
                    }
                    self.store.remove(Tree::State, &key)?;
                    posted.refused.push((key, error));
                }
            }
        }
        self.store.flush()?;
        Ok(posted)
    }

    /// Posts every outbox (what earlier calls could not), each on its own.
    /// Returns whether all of them are empty now; a conversation's message
    /// that failed is kept for [`take_failed_sends`](Self::take_failed_sends).
    pub(crate) async fn post_all_queued(&self) -> Result<bool, Error> {
        let mut owners: Vec<Owner> = Vec::new();
        for key in self.store.keys_with_prefix(Tree::State, OUTBOX_PREFIX)? {
            let owner = key
                .get(OUTBOX_PREFIX.len()..)
                .and_then(Owner::from_tag)
                .ok_or_else(|| Error::Storage("an outbox key is malformed".into()))?;
            if !owners.contains(&owner) {
                owners.push(owner);
            }
        }
        let mut all = true;
        for owner in owners {
            let posted = self.post_queued(owner).await?;
            all &= posted.queued.is_empty();
            for (_, error) in posted.refused {
                // Dropped for good (a deleted mailbox, mostly): nothing to retry.
                tracing::debug!(%error, "a queued envelope was refused");
            }
        }
        Ok(all)
    }

    async fn post_envelope(
        &self,
        envelope: &Queued,
        difficulty: Option<u32>,
        lane: Lane,
    ) -> Result<(), Error> {
        // Stamped afresh for every attempt: the relay takes a stamp only within
        // its window (an hour by default) of the time it carries.
        let (pow_stamp, pow_timestamp_ms) = match (envelope.stamped, difficulty) {
            (true, Some(bits)) => {
                // Off the async threads: seconds of hashing at a high difficulty.
                let (to, id, sealed) = (envelope.to, envelope.envelope_id, envelope.sealed.clone());
                let made_ms = self.now_ms();
                let stamp = tokio::task::spawn_blocking(move || {
                    haven_proto::pow::solve_intake(&to, &id, &sealed, made_ms, bits, u64::MAX)
                })
                .await
                .ok()
                .flatten()
                .ok_or_else(|| Error::Protocol(format!("no proof of work of {bits} bits found")))?;
                (Some(stamp), made_ms)
            }
            _ => (None, 0),
        };
        self.transport
            .mailbox(lane)
            .send(proto::SendRequest {
                sender_id: envelope.to.to_vec(),
                envelope_id: envelope.envelope_id.to_vec(),
                ttl_seconds: envelope.ttl_seconds,
                ciphertext: envelope.sealed.clone(),
                sender_signature: envelope.signature.to_vec(),
                pow_stamp,
                pow_timestamp_ms,
            })
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queued_envelope_survives_its_encoding_and_garbage_is_refused() {
        let queued = Queued::new([1; 16], vec![7; 300], &[2; 32], true);
        let back = Queued::decode(&queued.encode(queued.message)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.to, queued.to);
        assert_eq!(back.envelope_id, queued.envelope_id);
        assert_eq!(back.ttl_seconds, TTL_SECONDS);
        assert_eq!(back.signature, queued.signature);
        assert!(back.stamped);
        assert_eq!(back.sealed, queued.sealed);
        for garbage in [&[][..], &[3; 50], &[2; 50], &[4; 200]] {
            assert!(Queued::decode(garbage).is_err());
        }
    }

    fn offline_client(dir: &std::path::Path) -> Result<Client, Error> {
        crate::offline_client(dir, None)
    }

    #[test]
    fn a_sync_spread_is_on_behind_a_proxy_and_bounded() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(|e| Error::Storage(e.to_string()))?;
        let direct = offline_client(&dir.path().join("direct"))?;
        assert!(direct.sync_spread().is_zero(), "no spread without a proxy");
        let proxied =
            crate::offline_client(&dir.path().join("proxied"), Some("socks5h://127.0.0.1:9"))?;
        assert_eq!(proxied.sync_spread(), crate::DEFAULT_SYNC_SPREAD);
        assert!(matches!(
            proxied.set_sync_spread(crate::MAX_SYNC_SPREAD + std::time::Duration::from_millis(1)),
            Err(Error::InvalidArgument(_))
        ));
        proxied.set_sync_spread(std::time::Duration::ZERO)?;
        assert!(proxied.sync_spread().is_zero());
        Ok(())
    }

    /// What is queued for one sibling device stays bounded, and a removed
    /// device's queue goes with it.
    #[test]
    fn sibling_queues_are_bounded_per_device_and_dropped_with_the_device() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(|e| Error::Storage(e.to_string()))?;
        let client = offline_client(dir.path())?;
        let lost: Vec<Queued> = (0..MAX_QUEUED_PER_SIBLING + 5)
            .map(|_| Queued::new([1; 16], vec![1; 8], &[2; 32], false))
            .collect();
        client.enqueue(Owner::Siblings, &lost)?;
        client.enqueue(
            Owner::Siblings,
            &[Queued::new([2; 16], vec![1; 8], &[2; 32], false)],
        )?;
        assert_eq!(client.queued_envelopes()?, MAX_QUEUED_PER_SIBLING + 1);
        client.drop_queued_to(Owner::Siblings, &[1; 16])?;
        assert_eq!(client.queued_envelopes()?, 1);
        assert!(client.queued_to(Owner::Siblings, &[2; 16])?);
        Ok(())
    }

    /// A message goes out as one envelope per device of the other side: it
    /// failed only when every one was refused, and is reported once, unless
    /// the send that made it reports it itself.
    #[test]
    fn a_message_fails_only_when_every_device_refused_it() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(|e| Error::Storage(e.to_string()))?;
        let client = offline_client(dir.path())?;
        let id = [4u8; 16];
        let two = |client: &Client| -> Result<u64, Error> {
            let keys = client.enqueue(
                Owner::Conversation(id),
                &[
                    Queued::new([1; 16], vec![1; 10], &[2; 32], false),
                    Queued::new([2; 16], vec![1; 10], &[2; 32], false),
                ],
            )?;
            let entry = client.get_entry(Owner::Conversation(id), &keys[0])?;
            Ok(entry.map_or(0, |entry| entry.message))
        };
        // One device took it, the other's mailbox is gone: delivered.
        let message = two(&client)?;
        client.settle_message(&id, message, false, &[])?;
        client.settle_message(&id, message, true, &[])?;
        assert!(client.take_failed_sends()?.is_empty());
        let message = two(&client)?;
        client.settle_message(&id, message, true, &[])?;
        client.settle_message(&id, message, false, &[])?;
        assert!(client.take_failed_sends()?.is_empty());
        // Both refused: failed, reported once.
        let message = two(&client)?;
        client.settle_message(&id, message, false, &[])?;
        client.settle_message(&id, message, false, &[])?;
        assert_eq!(client.take_failed_sends()?.len(), 1);
        assert!(client.take_failed_sends()?.is_empty());
        // Both refused while the send that made it reports it: not again.
        let message = two(&client)?;
        client.settle_message(&id, message, false, &[message])?;
        client.settle_message(&id, message, false, &[message])?;
        assert!(client.take_failed_sends()?.is_empty());
        Ok(())
    }

    /// The notices a flood of declined first contacts leaves queued (each to a
    /// mailbox the attacker keeps full) stay bounded in count and in time; a
    /// conversation's own messages are never dropped.
    #[tokio::test]
    async fn outboxes_others_can_fill_keep_their_bounds() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(|e| Error::Storage(e.to_string()))?;
        let client = offline_client(dir.path())?;
        let notices: Vec<Queued> = (0..MAX_NOTICES + 36)
            .map(|n| Queued::new([n as u8; 16], vec![1; 100], &[2; 32], true))
            .collect();
        for notice in &notices {
            client.enqueue(Owner::Notices, std::slice::from_ref(notice))?;
        }
        let held = client
            .store
            .keys_with_prefix(Tree::State, &Owner::Notices.prefix())?;
        assert_eq!(held.len(), MAX_NOTICES, "the oldest notices went");
        let first = client.get_entry(Owner::Notices, &held[0])?;
        assert_eq!(first.map(|q| q.to), Some([36; 16]));
        // A week and more later, what is still queued is dropped, not posted.
        let mut stale = Queued::new([9; 16], vec![1; 100], &[2; 32], true);
        stale.queued_at = client.now() - NOTICE_SECONDS - 1;
        client.drop_outbox(Owner::Notices)?;
        client.enqueue(Owner::Notices, &[stale.copy()])?;
        let id = [5; 16];
        let mut old_message = stale.copy();
        old_message.stamped = false;
        client.enqueue(Owner::Conversation(id), &[old_message])?;
        // Sealed under the conversation's key, which exists once it was used.
        let posted = client.post_queued(Owner::Notices).await?;
        assert!(posted.queued.is_empty() && posted.refused.is_empty());
        assert_eq!(
            client.queued_envelopes()?,
            1,
            "only the conversation's message waits"
        );
        let posted = client.post_queued(Owner::Conversation(id)).await?;
        assert_eq!(
            posted.queued.len(),
            1,
            "a person's own words wait, however old"
        );
        Ok(())
    }
}
