//! The relay-wide storage budget (review F1): new writes are refused with
//! RESOURCE_EXHAUSTED "the relay is full" well before the store runs out, so
//! that deletions, acknowledgements and expiry sweeps always have room to run.
//!
//! Three bounds, checked before a mailbox is created, an envelope stored or
//! prekeys published: the ciphertext bytes and the mailboxes the store counts
//! (every backend keeps these totals for its metrics), and, on sled, the free
//! space of the data directory's filesystem. The last is measured with
//! `statvfs` rather than counted: sled keeps old versions of values in its log
//! until it compacts, the write-ahead log and key file live beside it, and
//! other files may share the disk, so what the store holds says little about
//! when the disk fills. One `statvfs` is a few microseconds; it is cached for a
//! second.

use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use haven_store::MailboxStore;

use super::RelayError;
use crate::config::{Config, StoreKind};

/// How long a free-space reading is reused.
const DISK_READING_TTL: Duration = Duration::from_secs(1);

/// The budget and what it last read from the disk.
pub struct StorageBudget {
    max_stored_bytes: u64,
    max_mailboxes: u64,
    /// The sled data directory and the free space to keep there; `None` on
    /// backends that do not write a local disk.
    disk: Option<(PathBuf, u64)>,
    // std Mutex: a copy in and out, never held across an await.
    last_reading: Mutex<Option<(Instant, u64)>>,
}

/// What a refused write is, for the message.
#[derive(Clone, Copy)]
pub enum Write {
    /// A new mailbox.
    Mailbox,
    /// An envelope of this many bytes.
    Envelope(u64),
    /// A prekey upload.
    Prekeys,
}

impl StorageBudget {
    /// The budget `config` sets.
    pub fn new(config: &Config) -> Self {
        let limits = &config.limits;
        Self {
            max_stored_bytes: limits.max_stored_bytes,
            max_mailboxes: limits.max_mailboxes,
            disk: (config.store == StoreKind::Sled)
                .then(|| (config.data_dir.clone(), limits.min_free_disk_bytes)),
            last_reading: Mutex::new(None),
        }
    }

    /// Refuses `write` if it would take the store past the budget.
    pub fn check(&self, store: &dyn MailboxStore, write: Write) -> Result<(), RelayError> {
        let stats = store.stats();
        let full = stats.bytes >= self.max_stored_bytes || self.disk_is_full();
        let over = full
            || match write {
                Write::Mailbox => stats.mailboxes >= self.max_mailboxes,
                Write::Envelope(bytes) => stats.bytes.saturating_add(bytes) > self.max_stored_bytes,
                Write::Prekeys => false,
            };
        if over {
            crate::telemetry::record_full_refusal();
            return Err(RelayError::ResourceExhausted(
                "the relay is full; it takes no new mailboxes, envelopes or prekeys until \
                 stored data is read or expires; retry later"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Whether the data directory's filesystem has less than the free space
    /// to keep. A failed reading counts as full: writing blind onto a disk
    /// that cannot be measured is how the sled store gets its sticky error.
    fn disk_is_full(&self) -> bool {
        let Some((path, keep_free)) = &self.disk else {
            return false;
        };
        let now = Instant::now();
        let cached = *self
            .last_reading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let free = match cached {
            Some((at, free)) if now.duration_since(at) < DISK_READING_TTL => free,
            _ => {
                let free = match fs2::available_space(path) {
                    Ok(free) => free,
                    Err(error) => {
                        tracing::warn!(%error, "cannot read the free space of the data directory");
                        0
                    }
                };
                *self
                    .last_reading
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some((now, free));
                free
            }
        };
        free < *keep_free
    }
}
