//! Wake-ups for open `Receive` streams: one watch channel per subscribed mailbox.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use crate::MailboxId;

/// Per-mailbox wake-up channels. Entries exist only while someone listens.
#[derive(Clone, Default)]
pub(crate) struct WakeHub {
    // std Mutex: held only for map operations, never across an await.
    channels: Arc<Mutex<HashMap<MailboxId, watch::Sender<u64>>>>,
}

impl WakeHub {
    pub(crate) fn subscribe(&self, id: &MailboxId) -> Subscription {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        let receiver = channels
            .entry(*id)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        Subscription {
            receiver,
            id: *id,
            hub: self.clone(),
        }
    }

    /// Whether anyone holds a subscription for the mailbox.
    pub(crate) fn watched(&self, id: &MailboxId) -> bool {
        let channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        channels
            .get(id)
            .is_some_and(|sender| sender.receiver_count() > 0)
    }

    /// Wakes every stream of the mailbox.
    pub(crate) fn notify(&self, id: &MailboxId) {
        let channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sender) = channels.get(id) {
            sender.send_modify(|version| *version = version.wrapping_add(1));
        }
    }
}

/// A wake-up handle for one mailbox; see [`crate::MailboxStore::subscribe`].
pub struct Subscription {
    receiver: watch::Receiver<u64>,
    id: MailboxId,
    hub: WakeHub,
}

impl Subscription {
    /// Waits until an envelope is stored in the mailbox after the last call (or
    /// after the subscription was made). Returns at once if one already was.
    pub async fn changed(&mut self) {
        // The sender lives in the hub for as long as this receiver exists, so an
        // error cannot happen; if it somehow did, wait forever rather than spin.
        if self.receiver.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut channels = self
            .hub
            .channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // This receiver is still counted until the end of drop.
        if channels
            .get(&self.id)
            .is_some_and(|sender| sender.receiver_count() <= 1)
        {
            channels.remove(&self.id);
        }
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Subscription(..)")
    }
}
