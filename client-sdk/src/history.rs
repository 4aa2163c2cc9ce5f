//! Plaintext history on the device, sealed like everything else, kept only for
//! the conversation's retention (disappearing messages): older entries are
//! deleted on every sync and read. Ending a conversation deletes all of it.

use crate::conversation::ConversationId;
use crate::storage::Tree;
use crate::{Client, Error};

/// How long history is kept when a conversation sets nothing: two weeks, the
/// longest the relay may hold an envelope. A conversation may set less (or more,
/// for a help-seeker who chooses to keep their own transcript).
pub const DEFAULT_RETENTION_SECONDS: u64 = 14 * 24 * 3600;

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

fn retention_key(id: &ConversationId) -> Vec<u8> {
    [&b"retention/"[..], id].concat()
}

impl Client {
    pub(crate) fn record(
        &self,
        id: &ConversationId,
        author: Author,
        text: &str,
    ) -> Result<(), Error> {
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
        let key = [&id[..], &next.to_be_bytes()].concat();
        let author = match author {
            Author::Me => 0u8,
            Author::Them => 1,
            Author::MyOtherDevice => 2,
        };
        let value = [&[author][..], &self.now().to_be_bytes(), text.as_bytes()].concat();
        self.store.put(Tree::History, &key, &value)
    }

    pub(crate) fn forget_history(&self, id: &ConversationId) -> Result<(), Error> {
        self.store.remove_prefix(Tree::History, id)?;
        self.store.remove(Tree::State, &retention_key(id))
    }

    /// Sets how long this device keeps the conversation's plaintext history.
    pub fn set_retention(&self, id: &ConversationId, seconds: u64) -> Result<(), Error> {
        self.conversation(id)?;
        self.store
            .put(Tree::State, &retention_key(id), &seconds.to_be_bytes())?;
        self.prune(id)?;
        self.store.flush()
    }

    fn retention(&self, id: &ConversationId) -> Result<u64, Error> {
        Ok(self
            .store
            .get(Tree::State, &retention_key(id))?
            .and_then(|bytes| bytes.as_slice().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(DEFAULT_RETENTION_SECONDS))
    }

    /// Deletes history older than the conversation's retention.
    pub(crate) fn prune(&self, id: &ConversationId) -> Result<(), Error> {
        let oldest_kept = self.now().saturating_sub(self.retention(id)?);
        for (key, value) in self.store.scan_prefix(Tree::History, id)? {
            let at = value
                .get(1..9)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_be_bytes);
            if at < oldest_kept {
                self.store.remove(Tree::History, &key)?;
            }
        }
        Ok(())
    }

    /// The conversation's history on this device, oldest first, within its retention.
    pub fn history(&self, id: &ConversationId) -> Result<Vec<HistoryEntry>, Error> {
        self.conversation(id)?;
        self.prune(id)?;
        let mut entries = Vec::new();
        for (_, value) in self.store.scan_prefix(Tree::History, id)? {
            let author = match value.first() {
                Some(0) => Author::Me,
                Some(1) => Author::Them,
                Some(2) => Author::MyOtherDevice,
                _ => return Err(Error::Storage("a history entry is malformed".into())),
            };
            let at = value
                .get(1..9)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_be_bytes);
            let text = String::from_utf8(value.get(9..).unwrap_or_default().to_vec())
                .map_err(|_| Error::Storage("a history entry is malformed".into()))?;
            entries.push(HistoryEntry { author, at, text });
        }
        Ok(entries)
    }
}
