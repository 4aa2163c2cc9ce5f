//! The relay-wide storage budget (review F1): new writes are refused with
//! RESOURCE_EXHAUSTED "the relay is full" well before the store runs out, so
//! that deletions, acknowledgements and expiry sweeps always have room to run.
//!
//! Three bounds, checked before a mailbox is created, an envelope stored or
//! prekeys published: the ciphertext bytes and the mailboxes the store counts
//! (on Redis the cluster's mailbox count and the fullest primary's memory,
//! which its store measures: review H3), and, on sled, the free space of the
//! data directory's filesystem.
//!
//! Two tiers (review H2): writes anyone can make for the price of a stamp
//! (`Create`, a send to an unsecured private mailbox) stop at
//! `open_budget_percent` of the bytes and mailboxes; writes for conversations
//! that exist (sends to secured mailboxes), first contacts to intakes and
//! prekeys (kept only for devices in a supporter's signed list) go on to the
//! whole budget. So a flood of free mailboxes fills at
//! most the open tier, and existing conversations keep the rest. The last is measured with
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
    /// Percent of both open to anyone's writes.
    open_percent: u64,
    /// The sled data directory and the free space to keep there; `None` on
    /// backends that do not write a local disk.
    disk: Option<(PathBuf, u64)>,
    // std Mutex: a copy in and out, never held across an await.
    last_reading: Mutex<Option<(Instant, u64)>>,
}

/// What a refused write is, for the message.
#[derive(Clone, Copy)]
pub enum Write {
    /// A new mailbox (open tier).
    Mailbox,
    /// An envelope of this many bytes to a secured mailbox or an intake.
    Envelope(u64),
    /// An envelope of this many bytes to an unsecured private mailbox (open tier).
    OpenEnvelope(u64),
    /// A prekey upload by a device in its supporter's signed list: bounded by
    /// the association-signed directory, so it goes on to the whole budget.
    Prekeys,
}

impl StorageBudget {
    /// The budget `config` sets.
    pub fn new(config: &Config) -> Self {
        let limits = &config.limits;
        Self {
            max_stored_bytes: limits.max_stored_bytes,
            max_mailboxes: limits.max_mailboxes,
            open_percent: limits.open_budget_percent,
            disk: (config.store == StoreKind::Sled)
                .then(|| (config.data_dir.clone(), limits.min_free_disk_bytes)),
            last_reading: Mutex::new(None),
        }
    }

    /// Refuses `write` if it would take the store past the budget.
    pub fn check(&self, store: &dyn MailboxStore, write: Write) -> Result<(), RelayError> {
        let stats = store.stats();
        // What is stored against what may be. On Redis the limit that matters
        // is the memory of the primary that fills first, and the store's byte
        // count would be this node's only.
        let (stored, limit) = match stats.memory {
            Some(memory) if memory.limit > 0 => {
                (memory.used, memory.limit.min(self.max_stored_bytes))
            }
            Some(memory) => (memory.used, self.max_stored_bytes),
            None => (stats.bytes, self.max_stored_bytes),
        };
        let open =
            |total: u64| total / 100 * self.open_percent + total % 100 * self.open_percent / 100;
        let full = stored >= limit || self.disk_is_full();
        let (over, open_tier) = match write {
            Write::Mailbox => (
                full || stats.mailboxes >= open(self.max_mailboxes) || stored >= open(limit),
                true,
            ),
            Write::OpenEnvelope(bytes) => {
                (full || stored.saturating_add(bytes) > open(limit), true)
            }
            Write::Envelope(bytes) => (full || stored.saturating_add(bytes) > limit, false),
            Write::Prekeys => (full, false),
        };
        if !over {
            return Ok(());
        }
        crate::telemetry::record_full_refusal();
        Err(RelayError::ResourceExhausted(if open_tier && !full {
            "the relay is nearly full: it takes no new mailboxes and \
             no sends to unsecured mailboxes until stored data is read or expires (secured \
             conversations go on); retry later"
                .into()
        } else {
            "the relay is full; it takes no new mailboxes, envelopes or prekeys until \
             stored data is read or expires; retry later"
                .into()
        }))
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
