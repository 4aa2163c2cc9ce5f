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

use crate::conversation::{ConversationId, TTL_SECONDS, record_label};
use crate::storage::Tree;
use crate::transport::Lane;
use crate::{Client, Error, RelayRefusal};

const OUTBOX_PREFIX: &[u8] = b"outbox/";

/// Whose the queued envelopes are: a conversation's, or the sync traffic
/// between this supporter's devices.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    Conversation(ConversationId),
    Siblings,
    /// Notices to help-seekers this device declined (no conversation is kept).
    Notices,
}

impl Owner {
    /// 16 bytes in the entry's key. Conversation ids are random and local, so
    /// one equal to the siblings' all-ones tag is not a concern.
    fn tag(self) -> [u8; 16] {
        match self {
            Owner::Conversation(id) => id,
            Owner::Siblings => [0xff; 16],
            Owner::Notices => [0xfe; 16],
        }
    }

    /// The connection its envelopes are posted over.
    fn lane(self) -> Lane {
        match self {
            Owner::Conversation(id) => Lane::Conversation(id),
            Owner::Siblings | Owner::Notices => Lane::Device,
        }
    }

    fn from_tag(tag: [u8; 16]) -> Self {
        match tag {
            [0xff, ..] if tag == [0xff; 16] => Owner::Siblings,
            [0xfe, ..] if tag == [0xfe; 16] => Owner::Notices,
            _ => Owner::Conversation(tag),
        }
    }
}

/// One envelope ready to post: every byte of the request except the proof of
/// work, which is solved at each post (so a stamp bound to time stays fresh).
pub(crate) struct Queued {
    pub(crate) to: [u8; 16],
    pub(crate) envelope_id: [u8; 16],
    pub(crate) ttl_seconds: u64,
    pub(crate) signature: [u8; 64],
    /// An intake mailbox: post with a proof of work.
    pub(crate) stamped: bool,
    pub(crate) sealed: Vec<u8>,
}

impl Queued {
    /// An envelope of `sealed` bytes for the mailbox `to`, under a fresh id,
    /// signed with `sender_key` (checked by the relay when the mailbox is secured).
    pub(crate) fn new(to: [u8; 16], sealed: Vec<u8>, sender_key: &[u8; 32], stamped: bool) -> Self {
        let envelope_id: [u8; 16] = rand::random();
        let signature = SigningKey::from_bytes(sender_key)
            .sign(&send_payload(&to, &envelope_id, TTL_SECONDS, &sealed))
            .to_bytes();
        Self {
            to,
            envelope_id,
            ttl_seconds: TTL_SECONDS,
            signature,
            stamped,
            sealed,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 16 + 16 + 8 + 64 + 1 + self.sealed.len());
        out.push(1);
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
        if bytes.len() < 1 + 16 + 16 + 8 + 64 + 1 || bytes[0] != 1 {
            return Err(malformed());
        }
        let field = |at: usize, len: usize| &bytes[at..at + len];
        Ok(Self {
            to: field(1, 16).try_into().map_err(|_| malformed())?,
            envelope_id: field(17, 16).try_into().map_err(|_| malformed())?,
            ttl_seconds: u64::from_be_bytes(field(33, 8).try_into().map_err(|_| malformed())?),
            signature: field(41, 64).try_into().map_err(|_| malformed())?,
            stamped: bytes[105] == 1,
            sealed: bytes[106..].to_vec(),
        })
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
    [OUTBOX_PREFIX, &owner.tag(), &sequence.to_be_bytes()].concat()
}

impl Client {
    /// Adds envelopes to `owner`'s outbox, after any already there. Not
    /// flushed: the caller flushes them together with the state they came from.
    pub(crate) fn enqueue(&self, owner: Owner, envelopes: &[Queued]) -> Result<(), Error> {
        let prefix = [OUTBOX_PREFIX, &owner.tag()].concat();
        let mut next = match self.store.last_key(Tree::State, &prefix)? {
            Some(key) => key[prefix.len()..]
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| Error::Storage("an outbox key is malformed".into()))?
                .saturating_add(1),
            None => 0,
        };
        for envelope in envelopes {
            let key = entry_key(owner, next);
            match owner {
                Owner::Conversation(id) => {
                    self.store.put_under(
                        &record_label(&id),
                        Tree::State,
                        &key,
                        &envelope.encode(),
                    )?;
                }
                Owner::Siblings | Owner::Notices => {
                    self.store.put(Tree::State, &key, &envelope.encode())?
                }
            }
            next = next.saturating_add(1);
        }
        Ok(())
    }

    /// Whether `owner`'s outbox holds an envelope for the mailbox `to`.
    pub(crate) fn queued_to(&self, owner: Owner, to: &[u8; 16]) -> Result<bool, Error> {
        let prefix = [OUTBOX_PREFIX, &owner.tag()].concat();
        for key in self.store.keys_with_prefix(Tree::State, &prefix)? {
            let stored = match owner {
                Owner::Conversation(id) => {
                    self.store
                        .get_under(&record_label(&id), Tree::State, &key)?
                }
                Owner::Siblings | Owner::Notices => self.store.get(Tree::State, &key)?,
            };
            if let Some(bytes) = stored
                && Queued::decode(&bytes)?.to == *to
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Forgets `owner`'s outbox (the conversation ended).
    pub(crate) fn drop_outbox(&self, owner: Owner) -> Result<(), Error> {
        self.store
            .remove_prefix(Tree::State, &[OUTBOX_PREFIX, &owner.tag()].concat())
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
    /// confirmed it. Stops at the first that may succeed later, keeping it
    /// and those after it (order per mailbox is kept), and returns
    /// [`Error::Queued`]; one the relay refuses for good is dropped and its
    /// refusal returned after the rest were posted.
    pub(crate) async fn post_queued(&self, owner: Owner) -> Result<(), Error> {
        let prefix = [OUTBOX_PREFIX, &owner.tag()].concat();
        let mut refused = None;
        let mut difficulty = None;
        for key in self.store.keys_with_prefix(Tree::State, &prefix)? {
            let stored = match owner {
                Owner::Conversation(id) => {
                    self.store
                        .get_under(&record_label(&id), Tree::State, &key)?
                }
                Owner::Siblings | Owner::Notices => self.store.get(Tree::State, &key)?,
            };
            let Some(bytes) = stored else {
                // Its key is gone: the conversation is being ended.
                self.store.remove(Tree::State, &key)?;
                continue;
            };
            let envelope = Queued::decode(&bytes)?;
            if envelope.stamped && difficulty.is_none() {
                difficulty = Some(self.difficulty().await?);
            }
            match self
                .post_envelope(&envelope, difficulty, owner.lane())
                .await
            {
                Ok(()) => self.store.remove(Tree::State, &key)?,
                Err(error) if retryable(&error) => {
                    self.store.flush()?;
                    return Err(Error::Queued(error.to_string()));
                }
                Err(error) => {
                    tracing::debug!(%error, "the relay refused a queued envelope for good");
                    self.store.remove(Tree::State, &key)?;
                    refused.get_or_insert(error);
                }
            }
        }
        self.store.flush()?;
        refused.map_or(Ok(()), Err)
    }

    /// Posts every outbox (what earlier calls could not), each on its own.
    /// Returns whether all of them are empty now.
    pub(crate) async fn post_all_queued(&self) -> Result<bool, Error> {
        let mut owners: Vec<Owner> = Vec::new();
        for key in self.store.keys_with_prefix(Tree::State, OUTBOX_PREFIX)? {
            let tag: [u8; 16] = key
                .get(OUTBOX_PREFIX.len()..OUTBOX_PREFIX.len() + 16)
                .and_then(|tag| tag.try_into().ok())
                .ok_or_else(|| Error::Storage("an outbox key is malformed".into()))?;
            let owner = Owner::from_tag(tag);
            if !owners.contains(&owner) {
                owners.push(owner);
            }
        }
        let mut all = true;
        for owner in owners {
            match self.post_queued(owner).await {
                Ok(()) => {}
                Err(Error::Queued(_)) => all = false,
                // Dropped for good: nothing more to do with it.
                Err(error) => tracing::debug!(%error, "a queued envelope was refused"),
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
        let pow_stamp = match (envelope.stamped, difficulty) {
            (true, Some(bits)) => Some(
                haven_proto::pow::solve(
                    &envelope.to,
                    &envelope.envelope_id,
                    &envelope.sealed,
                    bits,
                    u64::MAX,
                )
                .ok_or_else(|| Error::Protocol(format!("no proof of work of {bits} bits found")))?,
            ),
            _ => None,
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
        let back = Queued::decode(&queued.encode()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.to, queued.to);
        assert_eq!(back.envelope_id, queued.envelope_id);
        assert_eq!(back.ttl_seconds, TTL_SECONDS);
        assert_eq!(back.signature, queued.signature);
        assert!(back.stamped);
        assert_eq!(back.sealed, queued.sealed);
        for garbage in [&[][..], &[1; 50], &[2; 200]] {
            assert!(Queued::decode(garbage).is_err());
        }
    }
}
