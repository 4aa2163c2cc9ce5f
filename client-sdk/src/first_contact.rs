//! First contact: a help-seeker starts a conversation anonymously (claims one
//! bundle per supporter device, a fresh identity, a reply mailbox per device),
//! and a supporter device accepts it — only with one of its one-time prekeys and
//! only while it has room (review 2026-12-crypto #5); a help-seeker turned away
//! is told so inside the encrypted channel.

use ed25519_dalek::SigningKey;
use haven_proto::v1 as proto;
use haven_protocol::{
    IdentityKey, IdentityKeyPair, InitialInfo, MessageKind, PrekeyBundle, PublicPrekey, Session,
    open, seal,
};
use zeroize::Zeroizing;

use crate::conversation::{Conversation, ConversationId, Event, Link};
use crate::message::AppMessage;
use crate::outbox::{Owner, Queued};
use crate::storage::Tree;
use crate::transport::Lane;
use crate::{Client, Error, Supporter};

/// How many conversations a supporter device holds open at most, until the
/// supporter sets its own number: the scheme Haven models offers up to three.
pub const DEFAULT_CAPACITY: u32 = 3;
/// Where this device keeps the capacity its supporter set (a count, 4 bytes).
const CAPACITY: &[u8] = b"capacity";

fn public(prekey: &proto::SignedPrekey) -> PublicPrekey {
    PublicPrekey {
        id: prekey.id,
        one_time: false,
        public_key: prekey.public_key.clone(),
        signature: prekey.signature.as_slice().try_into().unwrap_or([0; 64]),
    }
}

impl Client {
    /// Starts an anonymous conversation with `supporter`: a fresh pseudonymous
    /// identity, one claimed and verified bundle per device, one reply mailbox
    /// per device, and the first message to every device's intake mailbox.
    pub async fn start_conversation(
        &self,
        supporter: &Supporter,
        text: &str,
    ) -> Result<ConversationId, Error> {
        let _state = self.state_lock.lock().await;
        let difficulty = self.difficulty().await?;
        let claim_nonce: [u8; 16] = rand::random();
        let timestamp_ms = self.now_ms();
        let supporter_key = supporter.key;
        let pow_stamp = tokio::task::spawn_blocking(move || {
            haven_proto::pow::solve(
                &supporter_key,
                &claim_nonce,
                &haven_proto::keys::claim_stamp_input(timestamp_ms),
                difficulty,
                u64::MAX,
            )
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| Error::Protocol("no proof of work found".into()))?;
        let claimed = self
            .transport
            .keys(Lane::Directory)
            .claim_bundles(proto::ClaimBundlesRequest {
                supporter_key: supporter.key.to_vec(),
                claim_nonce: claim_nonce.to_vec(),
                timestamp_ms,
                pow_stamp,
            })
            .await
            .map_err(|status| match status.code() {
                tonic::Code::ResourceExhausted => Error::NotTakingConversations,
                _ => status.into(),
            })?
            .into_inner();
        let identity = IdentityKeyPair::generate(&mut rand::rng());
        let mut conversation = Conversation {
            id: rand::random(),
            identity: identity.secret_bytes(),
            help_seeker: true,
            links: Vec::new(),
        };
        // Exactly one bundle per listed device (review 2026-12-crypto #16): a relay
        // that leaves a device out steers the conversation away from it, one
        // that repeats a device would have it accept the same message twice.
        if claimed.bundles.len() != supporter.devices.len() {
            return Err(Error::BundleMismatch);
        }
        let mut verified_bundles = Vec::with_capacity(claimed.bundles.len());
        for bundle in &claimed.bundles {
            if verified_bundles
                .iter()
                .any(|(_, verified): &(_, PrekeyBundle)| {
                    verified.identity().to_bytes()[..] == bundle.identity_key[..]
                })
            {
                return Err(Error::BundleMismatch);
            }
            // The bundle must belong to a device in the supporter's signed list.
            let device = supporter
                .devices
                .iter()
                .find(|device| device.identity.to_bytes()[..] == bundle.identity_key[..])
                .ok_or(Error::BundleMismatch)?;
            let signed = bundle.signed_prekey.as_ref().ok_or(Error::BundleMismatch)?;
            let kem = bundle.kem_prekey.as_ref().ok_or(Error::BundleMismatch)?;
            let one_time = bundle.one_time_prekey.as_ref().map(|p| PublicPrekey {
                id: p.id,
                one_time: false,
                public_key: p.public_key.clone(),
                signature: p.signature.as_slice().try_into().unwrap_or([0; 64]),
            });
            let kem = PublicPrekey {
                id: kem.id,
                one_time: kem.one_time,
                public_key: kem.public_key.clone(),
                signature: kem.signature.as_slice().try_into().unwrap_or([0; 64]),
            };
            // A supporter device accepts only first contacts that use one of its
            // one-time prekeys: without one the message would be dropped, so
            // the help-seeker is told now instead.
            if one_time.is_none() {
                return Err(Error::NotTakingConversations);
            }
            let verified = PrekeyBundle::from_parts(
                &bundle.identity_key,
                &public(signed),
                one_time.as_ref(),
                &kem,
            )
            .map_err(Error::Bundle)?;
            verified_bundles.push((device, verified));
        }
        // Only once every bundle verified does anything leave this device, so a
        // bad bundle never leaves a half-started conversation behind.
        let mut queued = Vec::with_capacity(verified_bundles.len());
        for (device, verified) in verified_bundles {
            let mut session = Session::initiate(&identity, &verified, &mut rand::rng())
                .map_err(|e| Error::Protocol(e.to_string()))?;
            let inbox = self
                .create_mailbox_at(
                    proto::MailboxKind::Private,
                    Lane::Conversation(conversation.id),
                    difficulty,
                )
                .await?;
            let sender_key = Zeroizing::new(rand::random::<[u8; 32]>());
            let first = AppMessage::FirstContact {
                reply_sender_id: inbox.sender_id,
                sender_key: SigningKey::from_bytes(&sender_key)
                    .verifying_key()
                    .to_bytes(),
                text: text.to_owned(),
            };
            let encrypted = session
                .encrypt(&first.encode(), &mut rand::rng())
                .map_err(|e| Error::Protocol(e.to_string()))?;
            let sealed = seal(&identity, &device.identity, &encrypted, &mut rand::rng())
                .map_err(|e| Error::Protocol(e.to_string()))?;
            queued.push(Queued::new(
                device.intake_sender_id,
                sealed,
                &sender_key,
                true,
            ));
            conversation.links.push(Link {
                remote_identity: device.identity.to_bytes(),
                session: session.to_snapshot(),
                inbox,
                sender_key,
                remote_sender_id: device.intake_sender_id,
                remote_is_intake: true,
                announced: false,
            });
        }
        if conversation.links.is_empty() {
            return Err(Error::NotTakingConversations);
        }
        // The sessions and their first messages are on disk before anything is
        // posted (see `outbox`).
        self.save_conversation(&conversation)?;
        let ours = self.enqueue(Owner::Conversation(conversation.id), &queued)?;
        self.record(&conversation.id, crate::Author::Me, text)?;
        self.store.flush()?;
        // Saved is started: what the relay did not take yet goes out with the
        // next send or sync (queued_envelopes says so), and the app has the id.
        let posted = self
            .post_queued_for(Owner::Conversation(conversation.id), &ours)
            .await?;
        match posted.outcome(&ours) {
            Ok(()) | Err(Error::Queued(_)) => Ok(conversation.id),
            Err(error) => {
                // Every device refused it for good: nothing was started.
                self.delete_conversation(&conversation.id).await?;
                Err(error)
            }
        }
    }

    /// A first message on this supporter device's intake mailbox.
    pub(crate) async fn accept_first_contact(&self, sealed: &[u8]) -> Result<Vec<Event>, Error> {
        let mut device = self.device()?.ok_or(Error::NoSupporterIdentity)?;
        let (sender, content) =
            open(device.identity(), sealed).map_err(|e| Error::Protocol(e.to_string()))?;
        if MessageKind::of(&content).map_err(|e| Error::Protocol(e.to_string()))?
            != MessageKind::Initial
        {
            return Err(Error::Protocol(
                "only first messages belong on an intake mailbox".into(),
            ));
        }
        let info = InitialInfo::of(&content).map_err(|e| Error::Protocol(e.to_string()))?;
        if info.initiator != sender {
            return Err(Error::Protocol(
                "sealed sender and handshake identity differ".into(),
            ));
        }
        // A further message of a handshake this device already accepted (the
        // help-seeker wrote again before the first answer): it belongs to that
        // conversation's session.
        if let Some(event) = self
            .continue_handshake(&sender, &info.base_key, &content)
            .await?
        {
            return Ok(vec![event]);
        }
        // Every first contact costs a one-time prekey that the relay handed out
        // (once each, rate-limited by capacity): without that, one claimed bundle
        // would open any number of conversations.
        if !info.uses_one_time_prekey {
            return Err(Error::Protocol(
                "a first contact must use one of this device's one-time prekeys".into(),
            ));
        }
        let (mut session, plaintext) = device
            .accept(&content, &mut rand::rng())
            .map_err(|e| Error::Protocol(e.to_string()))?;
        let AppMessage::FirstContact {
            reply_sender_id,
            sender_key,
            text,
        } = AppMessage::decode(&plaintext)?
        else {
            return Err(Error::Protocol(
                "a conversation must open with a first contact".into(),
            ));
        };
        if self.open_conversations()? >= self.capacity()? {
            // Full or paused: the help-seeker hears it from this device, inside
            // the channel, and can pick another supporter. Nothing of theirs is kept.
            let declined = session
                .encrypt(&AppMessage::Declined.encode(), &mut rand::rng())
                .map_err(|e| Error::Protocol(e.to_string()))?;
            let sealed = seal(device.identity(), &sender, &declined, &mut rand::rng())
                .map_err(|e| Error::Protocol(e.to_string()))?;
            let sender_key = Zeroizing::new(rand::random::<[u8; 32]>());
            self.save_device(&device)?;
            let _queued = self.enqueue(
                Owner::Notices,
                &[Queued::new(reply_sender_id, sealed, &sender_key, false)],
            )?;
            return Ok(vec![Event::FirstContactDeclined]);
        }
        let id: ConversationId = rand::random();
        let inbox = self
            .create_mailbox(proto::MailboxKind::Private, Lane::Conversation(id))
            .await?;
        self.push_for_new(&inbox).await?;
        self.secure(&inbox, &sender_key)
            .await
            .map_err(Error::caused_by_peer)?;
        let conversation = Conversation {
            id,
            identity: Zeroizing::new([0; 64]),
            help_seeker: false,
            links: vec![Link {
                remote_identity: sender.to_bytes(),
                session: session.to_snapshot(),
                inbox,
                sender_key: Zeroizing::new(rand::random()),
                remote_sender_id: reply_sender_id,
                remote_is_intake: false,
                announced: false,
            }],
        };
        // The device's one-time prekeys were consumed: persist it with the conversation.
        self.save_device(&device)?;
        self.save_conversation(&conversation)?;
        self.record(&conversation.id, crate::Author::Them, &text)?;
        let mut events = vec![
            Event::ConversationStarted {
                conversation: conversation.id,
                text,
            },
            Event::SafetyNumber {
                conversation: conversation.id,
                number: session.safety_number().display(),
            },
        ];
        // What this supporter's other devices already sent in it.
        self.apply_pending_sync(&sender.to_bytes(), &conversation.id, &mut events)
            .await?;
        Ok(events)
    }

    /// The most conversations this device holds open.
    pub(crate) fn capacity(&self) -> Result<u32, Error> {
        Ok(self
            .store
            .get(Tree::State, CAPACITY)?
            .and_then(|bytes| bytes.as_slice().try_into().ok())
            .map_or(DEFAULT_CAPACITY, u32::from_be_bytes))
    }

    /// Remembers the capacity (set here or by a sibling device); not flushed.
    pub(crate) fn save_capacity(&self, capacity: u32) -> Result<(), Error> {
        self.store
            .put(Tree::State, CAPACITY, &capacity.to_be_bytes())
    }

    /// The conversations this device answers as a supporter.
    pub(crate) fn open_conversations(&self) -> Result<u32, Error> {
        let mut open = 0u32;
        for id in self.conversation_ids()? {
            if let Ok(conversation) = self.conversation(&id)
                && !conversation.help_seeker
            {
                open = open.saturating_add(1);
            }
        }
        Ok(open)
    }

    /// Decrypts an initial-kind message with the session of the conversation
    /// whose handshake it repeats, if there is one.
    async fn continue_handshake(
        &self,
        sender: &IdentityKey,
        base_key: &[u8; 32],
        content: &[u8],
    ) -> Result<Option<Event>, Error> {
        for id in self.conversation_ids()? {
            let mut conversation = self.conversation(&id)?;
            let Some(link) = conversation
                .links
                .iter_mut()
                .find(|link| link.remote_identity == sender.to_bytes())
            else {
                continue;
            };
            let mut session =
                Session::from_snapshot(&link.session).map_err(|e| Error::Storage(e.to_string()))?;
            if session.base_key() != base_key {
                continue;
            }
            let plaintext = session
                .decrypt(content, &mut rand::rng())
                .map_err(|e| Error::Protocol(e.to_string()))?;
            let message = AppMessage::decode(&plaintext)?;
            if !matches!(
                message,
                AppMessage::Text { .. } | AppMessage::Retention { .. } | AppMessage::End
            ) {
                return Err(Error::Protocol(
                    "unexpected message in a conversation".into(),
                ));
            }
            link.session = session.to_snapshot();
            self.save_conversation(&conversation)?;
            return match message {
                AppMessage::Retention { seconds } => self.adopt_retention(&id, seconds).map(Some),
                AppMessage::Text { text } => {
                    self.record(&id, crate::Author::Them, &text)?;
                    Ok(Some(Event::MessageReceived {
                        conversation: id,
                        text,
                    }))
                }
                AppMessage::End => {
                    // Ended before this device first answered.
                    self.delete_conversation(&id).await?;
                    Ok(Some(Event::ConversationEnded { conversation: id }))
                }
                _ => Ok(None),
            };
        }
        Ok(None)
    }
}
