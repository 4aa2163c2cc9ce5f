//! Plaintext history on the device, kept only for the conversation's retention
//! (disappearing messages): older entries are deleted on every sync and read.
//! Ending a conversation deletes all of it.
//!
//! The retention belongs to the conversation, not to one device: either side
//! sets it with [`Client::set_retention`], which tells the other side (and a
//! supporter's other devices), and every device applies it. Only the
//! help-seeker may choose to keep their own transcript regardless
//! ([`Client::keep_transcript`]).
//!
//! Deleting an entry from sled does not erase it from sled's log, so entries
//! are sealed under keys of the key file, one per stretch of time
//! (`history_label`): a stretch's key is destroyed as soon as none of its
//! entries is kept any more, and from then on they cannot be opened even from
//! a disk image with the storage key. A stretch is a sixteenth of the
//! retention when written (at least a second, at most a day), so a
//! conversation holds few keys and history is unreadable at most that long
//! after it expired.

use crate::conversation::{ConversationId, history_label, record_label};
use crate::storage::Tree;
use crate::{Client, Error};

/// How long history is kept when a conversation sets nothing: two weeks, the
/// longest the relay may hold an envelope.
pub const DEFAULT_RETENTION_SECONDS: u64 = 14 * 24 * 3600;
const MAX_STRETCH_SECONDS: u64 = 24 * 3600;

/// Who wrote a history entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Author {
    /// This device.
    Me,
    /// The other side of the conversation.
    Them,
    /// Another device of this supporter.
    MyOtherDevice,
}

/// One message in a conversation's history.
#[derive(Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// Who wrote it.
    pub author: Author,
    /// When this device stored it (seconds since the Unix epoch).
    pub at: u64,
    /// The text.
    pub text: String,
}

/// History is message text: keep it out of logs.
impl std::fmt::Debug for HistoryEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HistoryEntry")
            .field("author", &self.author)
            .field("at", &self.at)
            .finish_non_exhaustive()
    }
}

/// How a conversation's history is kept on this device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// The conversation's retention: history older than this is deleted.
    pub seconds: u64,
    /// The help-seeker chose to keep their own transcript on this device
    /// regardless of the retention (always `false` on a supporter device).
    pub keep_transcript: bool,
}

fn retention_key(id: &ConversationId) -> Vec<u8> {
    [&b"retention/"[..], id].concat()
}

/// The length of the stretches of time whose history shares one key.
fn stretch(retention: u64) -> u64 {
    (retention / 16).clamp(1, MAX_STRETCH_SECONDS)
}

/// The end of the stretch a history key belongs to (the key's last 8 bytes).
fn stretch_end(key: &[u8]) -> Option<u64> {
    key.get(24..32)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
}

fn malformed() -> Error {
    Error::Storage("a history entry is malformed".into())
}

impl Client {
    /// Stores one history entry under the key of the current stretch.
    pub(crate) fn record(
        &self,
        id: &ConversationId,
        author: Author,
        text: &str,
    ) -> Result<(), Error> {
        // Pruning must not destroy the key of the stretch this entry goes into
        // between taking the key and storing the entry.
        let _history = self.history_lock()?;
        let next = match self.store.last_key(Tree::History, id)? {
            Some(key) => {
                u64::from_be_bytes(
                    key.get(16..24)
                        .and_then(|b| b.try_into().ok())
                        .unwrap_or([0; 8]),
                ) + 1
            }
            None => 0,
        };
        let now = self.now();
        let length = stretch(self.stored_retention(id)?.seconds);
        let until = (now / length).saturating_add(1).saturating_mul(length);
        let key = [&id[..], &next.to_be_bytes(), &until.to_be_bytes()].concat();
        let author = match author {
            Author::Me => 0u8,
            Author::Them => 1,
            Author::MyOtherDevice => 2,
        };
        let value = [&[author][..], &now.to_be_bytes(), text.as_bytes()].concat();
        self.store
            .put_under(&history_label(id, until), Tree::History, &key, &value)
    }

    /// Deletes a conversation's history and settings from the store (its keys
    /// are destroyed by the caller, once this is flushed).
    pub(crate) fn forget_history(&self, id: &ConversationId) -> Result<(), Error> {
        self.store.remove_prefix(Tree::History, id)?;
        self.store.remove(Tree::State, &retention_key(id))
    }

    /// How this device keeps the conversation's history.
    pub fn retention(&self, id: &ConversationId) -> Result<Retention, Error> {
        self.conversation(id)?;
        self.stored_retention(id)
    }

    fn stored_retention(&self, id: &ConversationId) -> Result<Retention, Error> {
        let stored = self
            .store
            .get_under(&record_label(id), Tree::State, &retention_key(id))?;
        Ok(match stored.as_deref().map(Vec::as_slice) {
            Some([seconds @ .., keep]) if seconds.len() == 8 => Retention {
                seconds: seconds.try_into().map_or(0, u64::from_be_bytes),
                keep_transcript: *keep == 1,
            },
            _ => Retention {
                seconds: DEFAULT_RETENTION_SECONDS,
                keep_transcript: false,
            },
        })
    }

    pub(crate) fn save_retention(
        &self,
        id: &ConversationId,
        retention: Retention,
    ) -> Result<(), Error> {
        let value = [
            &retention.seconds.to_be_bytes()[..],
            &[u8::from(retention.keep_transcript)],
        ]
        .concat();
        self.store
            .put_under(&record_label(id), Tree::State, &retention_key(id), &value)?;
        self.prune(id)
    }

    /// Help-seeker only: keep (or stop keeping) this conversation's transcript
    /// on this device regardless of its retention. The other side is not told.
    pub fn keep_transcript(&self, id: &ConversationId, keep: bool) -> Result<(), Error> {
        if !self.conversation(id)?.help_seeker {
            return Err(Error::OnlyHelpSeeker);
        }
        let retention = self.retention(id)?;
        self.save_retention(
            id,
            Retention {
                keep_transcript: keep,
                ..retention
            },
        )?;
        self.store.flush()
    }

    fn history_lock(&self) -> Result<std::sync::MutexGuard<'_, ()>, Error> {
        self.history_lock
            .lock()
            .map_err(|_| Error::Storage("a previous history update panicked".into()))
    }

    /// Deletes history older than the conversation's retention, and destroys
    /// the keys of stretches that no longer seal any kept entry.
    pub(crate) fn prune(&self, id: &ConversationId) -> Result<(), Error> {
        let retention = self.stored_retention(id)?;
        if retention.keep_transcript {
            return Ok(());
        }
        let _history = self.history_lock()?;
        let oldest_kept = self.now().saturating_sub(retention.seconds);
        let mut kept_stretches = std::collections::HashSet::new();
        let mut removed = false;
        for key in self.store.keys_with_prefix(Tree::History, id)? {
            let expired = match stretch_end(&key) {
                None => true,
                Some(until) if until <= oldest_kept => true,
                Some(until) => {
                    match self
                        .store
                        .get_under(&history_label(id, until), Tree::History, &key)?
                    {
                        None => true,
                        Some(value) => {
                            value
                                .get(1..9)
                                .and_then(|b| b.try_into().ok())
                                .map_or(0, u64::from_be_bytes)
                                < oldest_kept
                        }
                    }
                }
            };
            if expired {
                self.store.remove(Tree::History, &key)?;
                removed = true;
            } else if let Some(until) = stretch_end(&key) {
                kept_stretches.insert(until);
            }
        }
        // The removals are durable before the keys go, so a crash in between
        // never leaves an entry behind that looks kept but cannot be opened.
        if removed {
            self.store.flush()?;
        }
        self.store.destroy_keys(|label| {
            let until = u64::from_be_bytes(label[16..].try_into().unwrap_or([0xff; 8]));
            label[..16] == id[..]
                && until < crate::storage::RESERVED_SUFFIXES
                && !kept_stretches.contains(&until)
        })?;
        Ok(())
    }

    /// The conversation's history on this device, oldest first, within its retention.
    pub fn history(&self, id: &ConversationId) -> Result<Vec<HistoryEntry>, Error> {
        self.conversation(id)?;
        self.prune(id)?;
        let mut entries = Vec::new();
        for key in self.store.keys_with_prefix(Tree::History, id)? {
            let Some(until) = stretch_end(&key) else {
                continue;
            };
            let Some(value) =
                self.store
                    .get_under(&history_label(id, until), Tree::History, &key)?
            else {
                continue;
            };
            let author = match value.first() {
                Some(0) => Author::Me,
                Some(1) => Author::Them,
                Some(2) => Author::MyOtherDevice,
                _ => return Err(malformed()),
            };
            let at = value
                .get(1..9)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_be_bytes);
            let text = String::from_utf8(value.get(9..).unwrap_or_default().to_vec())
                .map_err(|_| malformed())?;
            entries.push(HistoryEntry { author, at, text });
        }
        Ok(entries)
    }
}
