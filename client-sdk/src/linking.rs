//! A supporter's own devices: linking a new one (it shows a code, a device that
//! holds the supporter key approves it — the association never takes part) and
//! the sync sessions between them, which carry copies of what each device
//! sends so that every device shows the same conversation.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use haven_proto::v1 as proto;
use haven_protocol::{
    IDENTITY_KEY_LEN, IdentityKey, MessageKind, PrekeyBundle, PublicPrekey, Session, open, seal,
};
use zeroize::Zeroizing;

use crate::conversation::{Conversation, Event, Inbox, Link};
use crate::message::AppMessage;
use crate::storage::Tree;
use crate::{Client, Error};

/// The prefix of a device link code.
pub const LINK_CODE_PREFIX: &str = "haven:device:1:";
const SYNC_MAILBOX: &[u8] = b"sync-mailbox";
const SIBLINGS: &[u8] = b"siblings";
const KEM_LEN: usize = haven_protocol::KEM_PUBLIC_LEN;
const CODE_LEN: usize = IDENTITY_KEY_LEN + 16 + 16 + 4 + 32 + 64 + 4 + KEM_LEN + 64;

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
        match self.store.get(Tree::State, SIBLINGS)? {
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
        self.store.put(Tree::State, SIBLINGS, &siblings.encode())
    }

    /// On a new device: prepares its keys, intake and sync mailboxes, and returns
    /// the code (text or QR) that a device holding the supporter key approves
    /// with [`Client::approve_device`].
    pub async fn device_link_code(&self) -> Result<String, Error> {
        let device = self.prepared_device().await?;
        let intake = self.intake_sender_id().await?;
        let sync = self.sync_inbox().await?;
        let published = device.published_prekeys();
        let mut code = Vec::with_capacity(CODE_LEN);
        code.extend_from_slice(&published.identity);
        code.extend_from_slice(&intake);
        code.extend_from_slice(&sync.sender_id);
        code.extend_from_slice(&published.signed_prekey.id.to_be_bytes());
        code.extend_from_slice(&published.signed_prekey.public_key);
        code.extend_from_slice(&published.signed_prekey.signature);
        code.extend_from_slice(&published.kem_last_resort.id.to_be_bytes());
        code.extend_from_slice(&published.kem_last_resort.public_key);
        code.extend_from_slice(&published.kem_last_resort.signature);
        Ok(format!(
            "{LINK_CODE_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(code)
        ))
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
        // The device joins the directory...
        let entry = proto::DeviceEntry {
            identity_key: identity.clone(),
            intake_sender_id: intake.to_vec(),
        };
        self.publish_device_list_with(&supporter, entry).await?;
        // ...and a sync session with it starts.
        let device = self.prepared_device().await?;
        let own_sync = self.sync_inbox().await?;
        let mut session = Session::initiate(device.identity(), &bundle, &mut rand::rng())
            .map_err(|e| Error::Protocol(e.to_string()))?;
        let hello = AppMessage::SyncHello {
            sync_sender_id: own_sync.sender_id,
        };
        let encrypted = session
            .encrypt(&hello.encode())
            .map_err(|e| Error::Protocol(e.to_string()))?;
        let sealed = seal(
            device.identity(),
            bundle.identity(),
            &encrypted,
            &mut rand::rng(),
        )
        .map_err(|e| Error::Protocol(e.to_string()))?;
        let sender_key = Zeroizing::new(rand::random::<[u8; 32]>());
        self.post(&sync_sender, sealed, &sender_key, None).await?;
        let mut siblings = self.siblings()?;
        siblings
            .links
            .retain(|link| link.remote_identity[..] != identity[..]);
        siblings.links.push(Link {
            remote_identity: bundle.identity().to_bytes(),
            session: session.to_snapshot(),
            inbox: own_sync,
            sender_key,
            remote_sender_id: sync_sender,
            remote_is_intake: false,
            announced: true,
        });
        self.save_siblings(&siblings)?;
        self.store.flush()
    }

    /// Sends a copy of `text`, sent to `peer`, to every sibling device.
    pub(crate) async fn sync_copy(
        &self,
        peer: &[u8; IDENTITY_KEY_LEN],
        text: &str,
    ) -> Result<(), Error> {
        self.to_siblings(&AppMessage::SyncCopy {
            peer: *peer,
            text: text.to_owned(),
        })
        .await
    }

    /// Tells every sibling device that this device ended the conversation with `peer`.
    pub(crate) async fn sync_end(&self, peer: &[u8; IDENTITY_KEY_LEN]) -> Result<(), Error> {
        self.to_siblings(&AppMessage::SyncEnd { peer: *peer }).await
    }

    /// Tells every sibling device the retention this device set for the
    /// conversation with `peer`.
    pub(crate) async fn sync_retention(
        &self,
        peer: &[u8; IDENTITY_KEY_LEN],
        seconds: u64,
    ) -> Result<(), Error> {
        self.to_siblings(&AppMessage::SyncRetention {
            peer: *peer,
            seconds,
        })
        .await
    }

    async fn to_siblings(&self, message: &AppMessage) -> Result<(), Error> {
        let mut siblings = self.siblings()?;
        if siblings.links.is_empty() {
            return Ok(());
        }
        let device = self.device()?.ok_or(Error::NoSupporterIdentity)?;
        for link in &mut siblings.links {
            let mut session =
                Session::from_snapshot(&link.session).map_err(|e| Error::Storage(e.to_string()))?;
            let encrypted = session
                .encrypt(&message.encode())
                .map_err(|e| Error::Protocol(e.to_string()))?;
            let remote = IdentityKey::from_bytes(&link.remote_identity)
                .map_err(|_| Error::BadDeviceIdentity)?;
            let sealed = seal(device.identity(), &remote, &encrypted, &mut rand::rng())
                .map_err(|e| Error::Protocol(e.to_string()))?;
            self.post(&link.remote_sender_id, sealed, &link.sender_key, None)
                .await?;
            link.session = session.to_snapshot();
        }
        self.save_siblings(&siblings)?;
        self.store.flush()
    }

    /// Processes this device's sync mailbox: new sibling sessions, and copies of
    /// what sibling devices sent.
    pub(crate) async fn sync_siblings(&self, events: &mut Vec<Event>) -> Result<(), Error> {
        let Some(inbox) = self.stored_inbox(SYNC_MAILBOX)? else {
            return Ok(());
        };
        let envelopes = self.fetch(&inbox).await?;
        let mut done = Vec::new();
        for envelope in envelopes {
            if self.already_seen(&inbox, &envelope.envelope_id)? {
                done.push(envelope.envelope_id);
                continue;
            }
            match self
                .sibling_message(&inbox, &envelope.ciphertext, events)
                .await
            {
                Ok(()) => {}
                Err(error) if error.condemns_envelope() => {
                    tracing::debug!(%error, "a sync envelope was refused");
                }
                Err(error) => {
                    self.settle(&inbox, done).await?;
                    return Err(error);
                }
            }
            done.push(envelope.envelope_id);
        }
        self.settle(&inbox, done).await
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

    async fn sibling_message(
        &self,
        inbox: &Inbox,
        sealed: &[u8],
        events: &mut Vec<Event>,
    ) -> Result<(), Error> {
        let mut device = self.device()?.ok_or(Error::NoSupporterIdentity)?;
        let (sender, content) =
            open(device.identity(), sealed).map_err(|e| Error::Protocol(e.to_string()))?;
        let mut siblings = self.siblings()?;
        let known = siblings
            .links
            .iter()
            .position(|link| link.remote_identity == sender.to_bytes());
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
                let (session, plaintext) = device
                    .accept(&content, &mut rand::rng())
                    .map_err(|e| Error::Protocol(e.to_string()))?;
                self.save_device(&device)?;
                let AppMessage::SyncHello { sync_sender_id } = AppMessage::decode(&plaintext)?
                else {
                    return Err(Error::Protocol(
                        "a sync session must open with its mailbox".into(),
                    ));
                };
                siblings.links.push(Link {
                    remote_identity: sender.to_bytes(),
                    session: session.to_snapshot(),
                    inbox: Inbox {
                        recipient_id: inbox.recipient_id,
                        sender_id: inbox.sender_id,
                        key: inbox.key.clone(),
                    },
                    sender_key: Zeroizing::new(rand::random()),
                    remote_sender_id: sync_sender_id,
                    remote_is_intake: false,
                    announced: true,
                });
                plaintext
            }
            (None, MessageKind::Ratchet) => {
                return Err(Error::Protocol(
                    "a sync message from a device that is not linked".into(),
                ));
            }
        };
        self.save_siblings(&siblings)?;
        match AppMessage::decode(&plaintext)? {
            AppMessage::SyncHello { .. } => Ok(()),
            AppMessage::SyncCopy { peer, text } => {
                if let Some(id) = self.conversation_with(&peer)? {
                    self.record(&id, crate::Author::MyOtherDevice, &text)?;
                    events.push(Event::SentFromOtherDevice {
                        conversation: id,
                        text,
                    });
                }
                Ok(())
            }
            AppMessage::SyncRetention { peer, seconds } => {
                if let Some(id) = self.conversation_with(&peer)? {
                    events.push(self.adopt_retention(&id, seconds)?);
                }
                Ok(())
            }
            AppMessage::SyncEnd { peer } => {
                if let Some(id) = self.conversation_with(&peer)? {
                    self.delete_conversation(&id).await?;
                    events.push(Event::ConversationEnded { conversation: id });
                }
                Ok(())
            }
            _ => Err(Error::Protocol("unexpected message between devices".into())),
        }
    }
}
