//! A supporter's own devices: linking a new one (it shows a code, a device that
//! holds the supporter key approves it — the association never takes part) and
//! the sync sessions between them, which carry copies of what each device
//! sends so that every device shows the same conversation.
//!
//! Who may become a sibling (review 2026-12-crypto #1): the relay can post to
//! any unsecured mailbox and anyone who saw a link code knows its sync mailbox,
//! so a sibling session is accepted only
//! - on a device waiting to be linked, from the first `SyncHello` that carries
//!   the single-use secret of its link code, whose sender and this device are
//!   both in the supporter's device list verified against that supporter's
//!   association-signed entry; the supporter key is pinned from then on;
//! - nowhere else: every other initial message on a sync mailbox is refused.
//!
//! Each pair of devices talks over two mailboxes of their own, each secured to
//! the other device's sender key (the new device's is in its link code, the
//! approver's in the `SyncHello`), so after linking nobody else can post there.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use haven_proto::v1 as proto;
use haven_protocol::{
    IDENTITY_KEY_LEN, IdentityKey, MessageKind, PrekeyBundle, PublicPrekey, Session, open, seal,
};
use subtle::ConstantTimeEq as _;
use zeroize::Zeroizing;

use crate::conversation::{Conversation, Event, Inbox, Link};
use crate::message::AppMessage;
use crate::outbox::{Owner, Queued};
use crate::storage::Tree;
use crate::transport::Lane;
use crate::{Client, Error};

/// The prefix of a device link code. Version 2 carries the new device's sender
/// key and a single-use link secret.
pub const LINK_CODE_PREFIX: &str = "haven:device:2:";
const SYNC_MAILBOX: &[u8] = b"sync-mailbox";
const SIBLINGS: &[u8] = b"siblings";
/// On a device waiting to be linked: the link code's secret, the secret of the
/// sender key it showed, and the supporter key the person said they are
/// joining (32 + 32 + 32 bytes). Removed once a `SyncHello` with the secret was
/// accepted, so the code works once.
const PENDING_LINK: &[u8] = b"pending-link";
/// Sync messages for conversations this device does not have yet, under a
/// hash of the peer's identity (the store's keys are not sealed).
const PENDING_SYNC: &[u8] = b"pending-sync/";
/// Most such messages kept; a flood beyond it is refused envelope by envelope.
const MAX_PENDING_SYNC: usize = 1000;

fn pending_sync_prefix(peer: &[u8; IDENTITY_KEY_LEN]) -> Vec<u8> {
    use sha2::{Digest as _, Sha256};
    let digest = Sha256::new()
        .chain_update(b"haven-sdk/pending-sync/v1")
        .chain_update(peer)
        .finalize();
    [PENDING_SYNC, &digest[..16]].concat()
}

fn malformed_pending() -> Error {
    Error::Storage("a kept sync copy is malformed".into())
}

/// The key-file key sealing the copies kept under `prefix` (one per peer), so
/// they are unreadable once applied or pruned, whatever sled's log keeps
/// (review of the SDK fixes #3).
fn pending_sync_label(prefix: &[u8]) -> Option<crate::keyfile::Label> {
    let name: [u8; 16] = prefix
        .get(PENDING_SYNC.len()..PENDING_SYNC.len() + 16)?
        .try_into()
        .ok()?;
    Some(crate::storage::pending_label(&name))
}

/// On a linked device: the supporter key it was linked to (pinned).
const LINKED_SUPPORTER: &[u8] = b"linked-supporter";
const KEM_LEN: usize = haven_protocol::KEM_PUBLIC_LEN;
const CODE_LEN: usize = IDENTITY_KEY_LEN + 16 + 16 + 32 + 32 + 4 + 32 + 64 + 4 + KEM_LEN + 64;

/// What a device waiting to be linked remembers of its link code.
struct PendingLink {
    secret: Zeroizing<[u8; 32]>,
    sender_key: Zeroizing<[u8; 32]>,
    supporter_key: [u8; 32],
}

fn refused_sibling() -> Error {
    Error::Protocol("a sync session from a device that is not this supporter's".into())
}

fn bad_code() -> Error {
    Error::Protocol("this is not a valid device link code".into())
}

impl Client {
    /// This device's sync mailbox, created on first use.
    async fn sync_inbox(&self) -> Result<Inbox, Error> {
        self.recorded_inbox(SYNC_MAILBOX, proto::MailboxKind::Private)
            .await
    }

    /// This device's sync mailbox, if it has one.
    pub(crate) fn sync_inbox_stored(&self) -> Result<Option<Inbox>, Error> {
        self.stored_inbox(SYNC_MAILBOX)
    }

    fn siblings(&self) -> Result<Conversation, Error> {
        match self
            .store
            .get_versioned(crate::storage::Owner::Device, Tree::State, SIBLINGS)?
        {
            Some(bytes) => Conversation::decode(&bytes),
            None => Ok(Conversation {
                id: [0; 16],
                identity: Zeroizing::new([0; 64]),
                help_seeker: false,
                links: Vec::new(),
            }),
        }
    }

    fn save_siblings(&self, siblings: &Conversation) -> Result<(), Error> {
        self.store.put_versioned(
            crate::storage::Owner::Device,
            Tree::State,
            SIBLINGS,
            &siblings.encode(),
        )
    }

    /// On a new device: prepares its keys, intake and sync mailboxes, and returns
    /// the code (text or QR) that a device holding the supporter key approves
    /// with [`Client::approve_device`]. `supporter_key` is the supporter identity
    /// the person is joining (from their directory entry or shared link): only
    /// a device of that supporter can complete the link, so someone else who
    /// saw the code — even another supporter — cannot.
    pub async fn device_link_code(&self, supporter_key: &[u8; 32]) -> Result<String, Error> {
        let _state = self.state_lock.lock().await;
        if self.supporter_signing_key()?.is_some() || !self.siblings()?.links.is_empty() {
            return Err(Error::InvalidArgument(
                "this device is already a supporter device; only a new device shows a link code"
                    .into(),
            ));
        }
        let device = self.prepared_device()?;
        let intake = self.intake_sender_id().await?;
        let sync = self.sync_inbox().await?;
        // A fresh secret and sender key each time a code is shown: only the
        // newest code links.
        let pending = PendingLink {
            secret: Zeroizing::new(rand::random()),
            sender_key: Zeroizing::new(rand::random()),
            supporter_key: *supporter_key,
        };
        let mut record = Zeroizing::new(Vec::with_capacity(96));
        record.extend_from_slice(&pending.secret[..]);
        record.extend_from_slice(&pending.sender_key[..]);
        record.extend_from_slice(&pending.supporter_key);
        self.store.put_versioned(
            crate::storage::Owner::Device,
            Tree::State,
            PENDING_LINK,
            &record,
        )?;
        self.store.flush()?;
        let sender_public = ed25519_dalek::SigningKey::from_bytes(&pending.sender_key)
            .verifying_key()
            .to_bytes();
        let published = device.published_prekeys();
        let mut code = Zeroizing::new(Vec::with_capacity(CODE_LEN));
        code.extend_from_slice(&published.identity);
        code.extend_from_slice(&intake);
        code.extend_from_slice(&sync.sender_id);
        code.extend_from_slice(&sender_public);
        code.extend_from_slice(&pending.secret[..]);
        code.extend_from_slice(&published.signed_prekey.id.to_be_bytes());
        code.extend_from_slice(&published.signed_prekey.public_key);
        code.extend_from_slice(&published.signed_prekey.signature);
        code.extend_from_slice(&published.kem_last_resort.id.to_be_bytes());
        code.extend_from_slice(&published.kem_last_resort.public_key);
        code.extend_from_slice(&published.kem_last_resort.signature);
        Ok(format!(
            "{LINK_CODE_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(&code[..])
        ))
    }

    fn pending_link(&self) -> Result<Option<PendingLink>, Error> {
        let Some(bytes) =
            self.store
                .get_versioned(crate::storage::Owner::Device, Tree::State, PENDING_LINK)?
        else {
            return Ok(None);
        };
        let malformed = || Error::Storage("the pending device link is malformed".into());
        if bytes.len() != 96 {
            return Err(malformed());
        }
        Ok(Some(PendingLink {
            secret: Zeroizing::new(bytes[..32].try_into().map_err(|_| malformed())?),
            sender_key: Zeroizing::new(bytes[32..64].try_into().map_err(|_| malformed())?),
            supporter_key: bytes[64..].try_into().map_err(|_| malformed())?,
        }))
    }

    /// The supporter key this device was linked to by a code, once the link
    /// completed (pinned: no other supporter's device can become its sibling).
    /// An app shows that supporter's directory entry, so the person can check
    /// the device joined their own supporter identity.
    pub fn linked_supporter_key(&self) -> Result<Option<[u8; 32]>, Error> {
        Ok(self
            .store
            .get_versioned(crate::storage::Owner::Device, Tree::State, LINKED_SUPPORTER)?
            .and_then(|bytes| bytes.as_slice().try_into().ok()))
    }

    /// On a device holding the supporter key: adds the device behind `code` to
    /// the supporter's signed device list and opens a sync session with it.
    pub async fn approve_device(&self, code: &str) -> Result<(), Error> {
        let _state = self.state_lock.lock().await;
        let supporter = self.supporter_signing_key_required()?;
        let start = code.trim().rfind(LINK_CODE_PREFIX).ok_or_else(bad_code)?;
        let bytes = URL_SAFE_NO_PAD
            .decode(&code.trim()[start + LINK_CODE_PREFIX.len()..])
            .map_err(|_| bad_code())?;
        if bytes.len() != CODE_LEN {
            return Err(bad_code());
        }
        let mut at = 0;
        let mut take = |len: usize| {
            let part = &bytes[at..at + len];
            at += len;
            part
        };
        let identity = take(IDENTITY_KEY_LEN).to_vec();
        let intake: [u8; 16] = take(16).try_into().map_err(|_| bad_code())?;
        let sync_sender: [u8; 16] = take(16).try_into().map_err(|_| bad_code())?;
        let new_device_sender: [u8; 32] = take(32).try_into().map_err(|_| bad_code())?;
        let link_secret: [u8; 32] = take(32).try_into().map_err(|_| bad_code())?;
        haven_proto::auth::public_key(&new_device_sender).map_err(|_| bad_code())?;
        let number = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let signed = PublicPrekey {
            id: number(take(4)),
            one_time: false,
            public_key: take(32).to_vec(),
            signature: take(64).try_into().map_err(|_| bad_code())?,
        };
        let kem = PublicPrekey {
            id: number(take(4)),
            one_time: false,
            public_key: take(KEM_LEN).to_vec(),
            signature: take(64).try_into().map_err(|_| bad_code())?,
        };
        let bundle =
            PrekeyBundle::from_parts(&identity, &signed, None, &kem).map_err(Error::Bundle)?;
        // Approving again while the first approval is still queued (its post
        // failed) delivers that one: a second session would not match the one
        // the new device accepts.
        let already = self
            .siblings()?
            .links
            .iter()
            .any(|link| link.remote_identity[..] == identity[..]);
        if already && self.queued_to(Owner::Siblings, &sync_sender)? {
            let posted = self.post_queued(Owner::Siblings).await?;
            return match posted.queued.is_empty() {
                true => Ok(()),
                false => Err(Error::Queued("the relay has not taken it yet".into())),
            };
        }
        if already {
            // A second session would not match the one the device accepted and
            // would break the link both ways (the device takes one hello only).
            return Err(Error::InvalidArgument(
                "this device is linked already; remove it first to link it again".into(),
            ));
        }
        // The device joins the directory...
        let entry = proto::DeviceEntry {
            identity_key: identity.clone(),
            intake_sender_id: intake.to_vec(),
        };
        self.publish_device_list_with(&supporter, entry).await?;
        // ...and a sync session with it starts, over a mailbox of this pair
        // only, secured to the sender key the new device showed.
        let device = self.prepared_device()?;
        let own_sync = self
            .create_mailbox(proto::MailboxKind::Private, Lane::Device)
            .await?;
        self.push_for_new(&own_sync).await?;
        self.secure(&own_sync, &new_device_sender).await?;
        let mut session = Session::initiate(device.identity(), &bundle, &mut rand::rng())
            .map_err(|e| Error::Protocol(e.to_string()))?;
        let sender_key = Zeroizing::new(rand::random::<[u8; 32]>());
        let hello = AppMessage::SyncHello {
            sync_sender_id: own_sync.sender_id,
            sender_key: ed25519_dalek::SigningKey::from_bytes(&sender_key)
                .verifying_key()
                .to_bytes(),
            link_secret,
            supporter_key: supporter.verifying_key().to_bytes(),
        };
        let encrypted = session
            .encrypt(&hello.encode(), &mut rand::rng())
            .map_err(|e| Error::Protocol(e.to_string()))?;
        let sealed = seal(
            device.identity(),
            bundle.identity(),
            &encrypted,
            &mut rand::rng(),
        )
        .map_err(|e| Error::Protocol(e.to_string()))?;
        let mut siblings = self.siblings()?;
        // Approving the same device again replaces the earlier pair of mailboxes.
        let (replaced, kept): (Vec<Link>, Vec<Link>) = std::mem::take(&mut siblings.links)
            .into_iter()
            .partition(|link| link.remote_identity[..] == identity[..]);
        siblings.links = kept;
        for link in &replaced {
            self.delete_mailbox(&link.inbox).await?;
        }
        let hello = Queued::new(sync_sender, sealed, &sender_key, false);
        siblings.links.push(Link {
            remote_identity: bundle.identity().to_bytes(),
            session: session.to_snapshot(),
            inbox: own_sync,
            sender_key,
            remote_sender_id: sync_sender,
            remote_is_intake: false,
            announced: true,
        });
        // The session and its first message are on disk before anything is
        // posted; the supporter's capacity follows the hello, so the new device
        // holds the same line as the others from its first first contact on
        // (a pause included) instead of its default.
        self.save_siblings(&siblings)?;
        let ours = self.enqueue(Owner::Siblings, &[hello])?;
        self.queue_sync_capacity(self.capacity()?)?;
        self.store.flush()?;
        self.post_queued(Owner::Siblings).await?.outcome(&ours)
    }

    /// Queues, for every sibling device, a copy of `text` sent to `peer`.
    /// Like every `queue_*`, it is not flushed: the caller flushes it with the
    /// state it belongs to, then posts with `post_queued(Owner::Siblings)`.
    pub(crate) fn queue_sync_copy(
        &self,
        peer: &[u8; IDENTITY_KEY_LEN],
        text: &str,
    ) -> Result<(), Error> {
        self.queue_to_siblings(&AppMessage::SyncCopy {
            peer: *peer,
            text: text.to_owned(),
        })
    }

    /// Queues, for every sibling device, the capacity the supporter set.
    pub(crate) fn queue_sync_capacity(&self, capacity: u32) -> Result<(), Error> {
        self.queue_to_siblings(&AppMessage::SyncCapacity { capacity })
    }

    /// Queues, for every sibling device, that this device ended the conversation with `peer`.
    pub(crate) fn queue_sync_end(&self, peer: &[u8; IDENTITY_KEY_LEN]) -> Result<(), Error> {
        self.queue_to_siblings(&AppMessage::SyncEnd { peer: *peer })
    }

    /// Queues, for every sibling device, the retention this device set for the
    /// conversation with `peer`.
    pub(crate) fn queue_sync_retention(
        &self,
        peer: &[u8; IDENTITY_KEY_LEN],
        seconds: u64,
    ) -> Result<(), Error> {
        self.queue_to_siblings(&AppMessage::SyncRetention {
            peer: *peer,
            seconds,
        })
    }

    fn queue_to_siblings(&self, message: &AppMessage) -> Result<(), Error> {
        self.queue_to_siblings_except(message, &[0; IDENTITY_KEY_LEN])
    }

    /// Queues `message` for every sibling device but `origin`.
    fn queue_to_siblings_except(
        &self,
        message: &AppMessage,
        origin: &[u8; IDENTITY_KEY_LEN],
    ) -> Result<(), Error> {
        let mut siblings = self.siblings()?;
        if !siblings
            .links
            .iter()
            .any(|link| link.remote_identity != *origin)
        {
            return Ok(());
        }
        let device = self.device()?.ok_or(Error::NoSupporterIdentity)?;
        let mut queued = Vec::with_capacity(siblings.links.len());
        for link in siblings
            .links
            .iter_mut()
            .filter(|link| link.remote_identity != *origin)
        {
            let mut session =
                Session::from_snapshot(&link.session).map_err(|e| Error::Storage(e.to_string()))?;
            let encrypted = session
                .encrypt(&message.encode(), &mut rand::rng())
                .map_err(|e| Error::Protocol(e.to_string()))?;
            let remote = IdentityKey::from_bytes(&link.remote_identity)
                .map_err(|_| Error::BadDeviceIdentity)?;
            let sealed = seal(device.identity(), &remote, &encrypted, &mut rand::rng())
                .map_err(|e| Error::Protocol(e.to_string()))?;
            queued.push(Queued::new(
                link.remote_sender_id,
                sealed,
                &link.sender_key,
                false,
            ));
            link.session = session.to_snapshot();
        }
        self.save_siblings(&siblings)?;
        self.enqueue(Owner::Siblings, &queued).map(|_| ())
    }

    /// Drops the sync session with the device `identity` (removed from the
    /// device list): no more sync copies go to it, and the mailbox it posted to
    /// is deleted.
    pub(crate) async fn forget_sibling(
        &self,
        identity: &[u8; IDENTITY_KEY_LEN],
    ) -> Result<(), Error> {
        let mut siblings = self.siblings()?;
        let (gone, kept): (Vec<Link>, Vec<Link>) = std::mem::take(&mut siblings.links)
            .into_iter()
            .partition(|link| link.remote_identity == *identity);
        siblings.links = kept;
        self.save_siblings(&siblings)?;
        // What was still queued for it goes too: a removed device gets nothing more.
        for link in &gone {
            self.drop_queued_to(Owner::Siblings, &link.remote_sender_id)?;
        }
        self.store.flush()?;
        for link in &gone {
            self.delete_mailbox(&link.inbox).await?;
        }
        Ok(())
    }

    /// The mailboxes sibling devices post to: one per linked device, and the
    /// link code's mailbox while this device waits to be linked.
    pub(crate) fn sibling_inboxes(&self) -> Result<Vec<Inbox>, Error> {
        let mut inboxes: Vec<Inbox> = self
            .siblings()?
            .links
            .into_iter()
            .map(|link| link.inbox)
            .collect();
        if let Some(sync) = self.sync_inbox_stored()?
            && !inboxes
                .iter()
                .any(|inbox| inbox.recipient_id == sync.recipient_id)
        {
            inboxes.push(sync);
        }
        Ok(inboxes)
    }

    /// The conversation this device has with the remote device `peer`, if any.
    fn conversation_with(
        &self,
        peer: &[u8; IDENTITY_KEY_LEN],
    ) -> Result<Option<crate::ConversationId>, Error> {
        for id in self.conversation_ids()? {
            if self
                .conversation(&id)?
                .links
                .iter()
                .any(|link| link.remote_identity == *peer)
            {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }

    pub(crate) async fn sibling_message(
        &self,
        inbox: &Inbox,
        sealed: &[u8],
        events: &mut Vec<Event>,
    ) -> Result<(), Error> {
        let device = self.device()?.ok_or(Error::NoSupporterIdentity)?;
        let (sender, content) =
            open(device.identity(), sealed).map_err(|e| Error::Protocol(e.to_string()))?;
        let mut siblings = self.siblings()?;
        // A linked device writes only on the mailbox of its own pair.
        let known = siblings.links.iter().position(|link| {
            link.remote_identity == sender.to_bytes()
                && link.inbox.recipient_id == inbox.recipient_id
        });
        let kind = MessageKind::of(&content).map_err(|e| Error::Protocol(e.to_string()))?;
        let plaintext = match (known, kind) {
            (Some(index), _) => {
                let link = &mut siblings.links[index];
                let mut session = Session::from_snapshot(&link.session)
                    .map_err(|e| Error::Storage(e.to_string()))?;
                let plaintext = session
                    .decrypt(&content, &mut rand::rng())
                    .map_err(|e| Error::Protocol(e.to_string()))?;
                link.session = session.to_snapshot();
                plaintext
            }
            (None, MessageKind::Initial) => {
                return self
                    .accept_sibling(device, inbox, &sender, &content, siblings)
                    .await;
            }
            (None, MessageKind::Ratchet) => return Err(refused_sibling()),
        };
        self.save_siblings(&siblings)?;
        let message = AppMessage::decode(&plaintext)?;
        let peer = match &message {
            AppMessage::SyncCopy { peer, .. }
            | AppMessage::SyncRetention { peer, .. }
            | AppMessage::SyncEnd { peer } => Some(*peer),
            AppMessage::SyncCapacity { .. } => None,
            _ => return Err(Error::Protocol("unexpected message between devices".into())),
        };
        // Mailboxes of a conversation ended here, deleted on the relay only
        // once everything of this message is done on the device.
        let mut doomed = Vec::new();
        let applied = match (peer, &message) {
            (None, AppMessage::SyncCapacity { capacity }) => self.save_capacity(*capacity),
            (Some(peer), _) => match self.conversation_with(&peer)? {
                Some(id) => self.apply_sync(&id, message.clone(), events, &mut doomed),
                // The other device got the first contact before this one did
                // (or this one's is still on its way): keep it until the
                // conversation starts here, so no copy is lost.
                None => self.keep_pending_sync(&peer, &message),
            },
            _ => Ok(()),
        };
        // What was refused here for what it held (the envelope is dropped, not
        // tried again) is still passed on: the other devices may have the
        // conversation. What failed for another reason comes again and is
        // passed on then, once.
        let settled = match &applied {
            Ok(()) => true,
            Err(error) => error.condemns_envelope(),
        };
        if settled && self.supporter_key()?.is_some() {
            // Only the device holding the supporter key links devices, so each
            // other device has a session with it alone: once it applied what
            // one of them sent, it passes it on to the others, and every
            // device sees every device's copies, endings and retention.
            // (Being the only hub, it never receives back what it passed on.)
            self.queue_to_siblings_except(&message, &sender.to_bytes())?;
        }
        if applied.is_ok() {
            self.store.flush()?;
        }
        self.delete_mailboxes(&doomed).await;
        applied
    }

    /// Applies a copy, retention or end from another device to conversation `id`.
    fn apply_sync(
        &self,
        id: &crate::ConversationId,
        message: AppMessage,
        events: &mut Vec<Event>,
        doomed: &mut Vec<crate::conversation::Inbox>,
    ) -> Result<(), Error> {
        match message {
            AppMessage::SyncCopy { text, .. } => {
                self.record(id, crate::Author::MyOtherDevice, &text)?;
                events.push(Event::SentFromOtherDevice {
                    conversation: *id,
                    text,
                });
            }
            AppMessage::SyncRetention { seconds, .. } => {
                events.push(self.adopt_retention(id, seconds)?);
            }
            AppMessage::SyncEnd { .. } => {
                doomed.extend(self.forget_conversation(id)?);
                events.push(Event::ConversationEnded { conversation: *id });
            }
            _ => {}
        }
        Ok(())
    }

    /// Keeps a sync message for a conversation this device does not have yet.
    fn keep_pending_sync(
        &self,
        peer: &[u8; IDENTITY_KEY_LEN],
        message: &AppMessage,
    ) -> Result<(), Error> {
        // Full (copies for conversations that never start here, such as those
        // begun before this device was linked): the oldest make room, so the
        // newest, most likely to be wanted, are kept.
        let held = self.store.keys_with_prefix(Tree::State, PENDING_SYNC)?;
        if held.len() >= MAX_PENDING_SYNC {
            let mut oldest: Vec<(u64, Vec<u8>)> = Vec::with_capacity(held.len());
            for key in held {
                oldest.push((self.kept_at(&key), key));
            }
            oldest.sort();
            let over = oldest.len() + 1 - MAX_PENDING_SYNC;
            for (_, key) in oldest.into_iter().take(over) {
                self.store.remove(Tree::State, &key)?;
            }
        }
        let prefix = pending_sync_prefix(peer);
        let next = self
            .store
            .last_key(Tree::State, &prefix)?
            .and_then(|key| key.get(prefix.len()..).and_then(|n| n.try_into().ok()))
            .map_or(0, |n: [u8; 8]| u64::from_be_bytes(n).saturating_add(1));
        let value = Zeroizing::new([&self.now().to_be_bytes()[..], &message.encode()].concat());
        let label = pending_sync_label(&prefix).ok_or_else(malformed_pending)?;
        self.store.put_under(
            &label,
            Tree::State,
            &[&prefix[..], &next.to_be_bytes()].concat(),
            &value,
        )
    }

    /// When the copy kept under `key` arrived; 0 for one that does not open
    /// (its key went), which is as good as gone.
    fn kept_at(&self, key: &[u8]) -> u64 {
        pending_sync_label(key)
            .and_then(|label| {
                self.store
                    .get_under(&label, Tree::State, key)
                    .ok()
                    .flatten()
            })
            .as_ref()
            .and_then(|value| value.get(..8))
            .and_then(|bytes| bytes.try_into().ok())
            .map_or(0, u64::from_be_bytes)
    }

    /// Applies what other devices sent for the conversation with `peer`
    /// before it started here (called when it starts).
    pub(crate) async fn apply_pending_sync(
        &self,
        peer: &[u8; IDENTITY_KEY_LEN],
        id: &crate::ConversationId,
        events: &mut Vec<Event>,
    ) -> Result<(), Error> {
        let prefix = pending_sync_prefix(peer);
        let label = pending_sync_label(&prefix).ok_or_else(malformed_pending)?;
        let pending = self.store.scan_prefix_under(&label, Tree::State, &prefix)?;
        self.store.remove_prefix(Tree::State, &prefix)?;
        self.store.retire_key(&label)?;
        for (_, value) in pending {
            let Some(encoded) = value.get(8..) else {
                continue;
            };
            if let Ok(message) = AppMessage::decode(encoded) {
                let mut doomed = Vec::new();
                let applied = self.apply_sync(id, message, events, &mut doomed);
                self.delete_mailboxes(&doomed).await;
                applied?;
                if self.conversation(id).is_err() {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Forgets pending sync messages older than any conversation could start.
    pub(crate) fn prune_pending_sync(&self, oldest: u64) -> Result<(), Error> {
        let mut emptied = Vec::new();
        for key in self.store.keys_with_prefix(Tree::State, PENDING_SYNC)? {
            let label = pending_sync_label(&key).ok_or_else(malformed_pending)?;
            if self.kept_at(&key) < oldest {
                self.store.remove(Tree::State, &key)?;
                if !emptied.contains(&label) {
                    emptied.push(label);
                }
            }
        }
        for label in emptied {
            let prefix = [PENDING_SYNC, &label[..16]].concat();
            if self
                .store
                .keys_with_prefix(Tree::State, &prefix)?
                .is_empty()
            {
                self.store.retire_key(&label)?;
            }
        }
        Ok(())
    }

    /// The first message of a sibling session, on a device waiting to be
    /// linked: accepted only with the link code's secret, from a device that is,
    /// with this one, in the device list of a supporter the association signed.
    /// Nothing is stored until every check passed and the sync mailbox is
    /// secured, so a failure on the way (the relay unreachable) leaves the
    /// envelope to be tried again.
    async fn accept_sibling(
        &self,
        mut device: haven_protocol::Device,
        inbox: &Inbox,
        sender: &IdentityKey,
        content: &[u8],
        mut siblings: Conversation,
    ) -> Result<(), Error> {
        let Some(pending) = self.pending_link()? else {
            return Err(refused_sibling());
        };
        let own_sync = self.sync_inbox_stored()?.ok_or_else(refused_sibling)?;
        if own_sync.recipient_id != inbox.recipient_id {
            return Err(refused_sibling());
        }
        let (session, plaintext) = device
            .accept(content, &mut rand::rng())
            .map_err(|e| Error::Protocol(e.to_string()))?;
        let AppMessage::SyncHello {
            sync_sender_id,
            sender_key,
            link_secret,
            supporter_key,
        } = AppMessage::decode(&plaintext)?
        else {
            return Err(Error::Protocol(
                "a sync session must open with its mailbox".into(),
            ));
        };
        if !bool::from(link_secret.ct_eq(&pending.secret[..]))
            || supporter_key != pending.supporter_key
        {
            return Err(refused_sibling());
        }
        let supporter = self
            .supporter(&supporter_key)
            .await
            .map_err(Error::caused_by_peer)?;
        let listed = |identity: &[u8; IDENTITY_KEY_LEN]| {
            supporter
                .devices
                .iter()
                .any(|listed| listed.identity.to_bytes() == *identity)
        };
        if !listed(&sender.to_bytes()) || !listed(&device.identity_key().to_bytes()) {
            return Err(refused_sibling());
        }
        // From now on only the approving device may post here.
        self.secure(&own_sync, &sender_key)
            .await
            .map_err(Error::caused_by_peer)?;
        siblings.links.push(Link {
            remote_identity: sender.to_bytes(),
            session: session.to_snapshot(),
            inbox: own_sync,
            sender_key: pending.sender_key,
            remote_sender_id: sync_sender_id,
            remote_is_intake: false,
            announced: true,
        });
        self.save_device(&device)?;
        self.save_siblings(&siblings)?;
        self.store.put_versioned(
            crate::storage::Owner::Device,
            Tree::State,
            LINKED_SUPPORTER,
            &supporter_key,
        )?;
        self.store
            .remove_versioned(crate::storage::Owner::Device, Tree::State, PENDING_LINK)?;
        // Listed now: the prekeys go up with this sync (sync_once looks after
        // the sibling mailboxes), and until they are, with every next one.
        self.store
            .put(Tree::State, crate::supporter::PREKEYS_UNPUBLISHED, &[1])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review of the SDK fixes #3: a copy kept for a conversation this device
    /// does not have yet is sealed under a key of its own, destroyed once the
    /// copy is gone, so sled's log does not keep it readable.
    #[tokio::test]
    async fn kept_sync_copies_are_sealed_under_a_key_that_goes_with_them() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(|e| Error::Storage(e.to_string()))?;
        let client = crate::offline_client(dir.path(), None)?;
        let peer = [7u8; IDENTITY_KEY_LEN];
        let before = client.store.all_key_labels()?.len();
        let copy = AppMessage::SyncCopy {
            peer,
            text: "a reply from the other device".into(),
        };
        client.keep_pending_sync(&peer, &copy)?;
        client.keep_pending_sync(&peer, &copy)?;
        client.store.flush()?;
        let prefix = pending_sync_prefix(&peer);
        let label = pending_sync_label(&prefix).ok_or_else(malformed_pending)?;
        assert_eq!(client.store.all_key_labels()?.len(), before + 1);
        assert!(
            client.store.key_labels()?.iter().all(|l| *l != label),
            "not a conversation's"
        );
        assert_eq!(
            client
                .store
                .scan_prefix_under(&label, Tree::State, &prefix)?
                .len(),
            2
        );
        // Sealed under that key, not the storage key.
        assert!(client.store.scan_prefix(Tree::State, &prefix).is_err());
        client.prune_pending_sync(client.now() + 1)?;
        client.store.flush()?;
        assert_eq!(
            client.store.all_key_labels()?.len(),
            before,
            "its key is destroyed"
        );

        // A key retired by a prune and used again before the flush stays.
        client.keep_pending_sync(&peer, &copy)?;
        client.store.flush()?;
        client.prune_pending_sync(client.now() + 1)?;
        client.keep_pending_sync(&peer, &copy)?;
        client.store.flush()?;
        assert_eq!(
            client
                .store
                .scan_prefix_under(&label, Tree::State, &prefix)?
                .len(),
            1
        );

        // Full: the oldest make room for the newest.
        for n in 0..MAX_PENDING_SYNC {
            let mut other = [0u8; IDENTITY_KEY_LEN];
            other[..8].copy_from_slice(&(n as u64).to_be_bytes());
            other[8] = 1;
            client.keep_pending_sync(&other, &copy)?;
        }
        assert_eq!(
            client
                .store
                .keys_with_prefix(Tree::State, PENDING_SYNC)?
                .len(),
            MAX_PENDING_SYNC
        );
        Ok(())
    }
}
