//! Conversations, first slice: a help-seeker starts one anonymously, the
//! supporter's device accepts it into a private mailbox secured to the
//! help-seeker, and both exchange messages; `sync_once` fetches, persists and
//! acknowledges. See ARCHITECTURE.md, "SDK conversations".

use ed25519_dalek::SigningKey;
use haven_proto::auth::{Method, sign_request};
use haven_proto::v1 as proto;
use haven_protocol::{IDENTITY_KEY_LEN, IdentityKey, IdentityKeyPair, Session, open, seal};
use zeroize::Zeroizing;

use crate::keyfile::Label;
use crate::message::AppMessage;
use crate::outbox::{Owner, Queued};
use crate::storage::Tree;
use crate::transport::Lane;
use crate::{Client, Error};

/// Identifies a conversation on this device (random; never sent anywhere).
pub type ConversationId = [u8; 16];

/// The key-file label of a conversation's own key: it seals the conversation's
/// record (sessions, mailboxes) and settings. History has keys of its own per
/// stretch of time (`history_label`).
pub(crate) fn record_label(id: &ConversationId) -> Label {
    history_label(id, u64::MAX)
}

/// The key-file label of the key sealing a conversation's history entries
/// stored before `until` (seconds since the Unix epoch).
pub(crate) fn history_label(id: &ConversationId, until: u64) -> Label {
    let mut label = [0; 24];
    label[..16].copy_from_slice(id);
    label[16..].copy_from_slice(&until.to_be_bytes());
    label
}

/// Something that happened, for the app to show.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A help-seeker started a conversation with this supporter device.
    ConversationStarted {
        /// The new conversation.
        conversation: ConversationId,
        /// The first message.
        text: String,
    },
    /// A message arrived in a conversation.
    MessageReceived {
        /// The conversation.
        conversation: ConversationId,
        /// The text.
        text: String,
    },
    /// Another of this supporter's devices sent a message in a conversation.
    SentFromOtherDevice {
        /// The conversation.
        conversation: ConversationId,
        /// The text that device sent.
        text: String,
    },
    /// The conversation's retention was set (by the other side, or by another
    /// of this supporter's devices): history older than `seconds` is deleted
    /// on this device from now on (unless the help-seeker keeps a transcript).
    RetentionChanged {
        /// The conversation.
        conversation: ConversationId,
        /// The new retention.
        seconds: u64,
    },
    /// A supporter device turned the help-seeker away (its capacity is used up
    /// or paused); this device has deleted the conversation. Pick another
    /// supporter.
    ConversationDeclined {
        /// The conversation, now gone.
        conversation: ConversationId,
    },
    /// This supporter device turned a first contact away because it has no room
    /// (see [`Client::set_capacity`]); the help-seeker was told. Nothing of it is kept.
    FirstContactDeclined,
    /// The other side ended the conversation; this device has deleted it.
    ConversationEnded {
        /// The conversation, now gone.
        conversation: ConversationId,
    },
    /// An envelope was refused for what it held (it did not decrypt, came from
    /// someone it should not, or asked for something the relay refused) and has
    /// been dropped; the rest of the sync went on. `conversation` is the
    /// conversation whose mailbox it came in on, `None` for the intake and sync
    /// mailboxes. Shown, if at all, as "a message could not be read".
    EnvelopeRefused {
        /// The conversation whose mailbox held it, if any.
        conversation: Option<ConversationId>,
        /// Why, in words without ids, keys or content.
        reason: String,
    },
    /// A message this device had queued (its send returned [`Error::Queued`],
    /// shown as pending) was refused for good when it was posted again — the
    /// other side's mailbox is gone, mostly because they ended the
    /// conversation or it expired — so it was not delivered. Show it as failed.
    SendFailed {
        /// The conversation it was sent in (it may be gone here too).
        conversation: ConversationId,
        /// Why, in words without ids, keys or content.
        reason: String,
    },
    /// A session with one of the other side's devices is established in both
    /// directions (a supporter device accepted a first contact, or a help-seeker
    /// got a supporter device's first answer): the safety number for it, 12
    /// groups of 5 digits to compare out of band. The same number stays
    /// available from [`Client::safety_numbers`].
    SafetyNumber {
        /// The conversation.
        conversation: ConversationId,
        /// The safety number, as shown to both sides.
        number: String,
    },
}

/// Events carry message text: keep them out of logs.
impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Event::ConversationStarted { .. } => "ConversationStarted(..)",
            Event::MessageReceived { .. } => "MessageReceived(..)",
            Event::ConversationEnded { .. } => "ConversationEnded(..)",
            Event::SentFromOtherDevice { .. } => "SentFromOtherDevice(..)",
            Event::SafetyNumber { .. } => "SafetyNumber(..)",
            Event::RetentionChanged { .. } => "RetentionChanged(..)",
            Event::EnvelopeRefused { .. } => "EnvelopeRefused(..)",
            Event::SendFailed { .. } => "SendFailed(..)",
            Event::ConversationDeclined { .. } => "ConversationDeclined(..)",
            Event::FirstContactDeclined => "FirstContactDeclined",
        })
    }
}

/// The most proof-of-work bits this app solves (the relay's default is 18;
/// each bit doubles the work).
pub(crate) const MAX_DIFFICULTY: u32 = 24;

/// Every envelope asks the relay for its default time to live (`ttl_seconds`
/// 0: `GetInfo.limits.default_ttl_seconds`, 7 days by default, at most 14 on
/// any relay), so a reply waits as long as the operator keeps anything for
/// someone who does not open the app for days (review of the SDK fixes #2).
/// Devices remember envelope ids for 15 days, longer than any relay keeps one.
pub(crate) const TTL_SECONDS: u64 = 0;
/// How long a notice to a declined help-seeker is worth sending: as long as
/// the first contact it answers waits on a relay by default.
pub(crate) const NOTICE_SECONDS: u64 = 7 * 24 * 3600;
const RECORD_VERSION: u8 = 1;

/// What `send_to_all` sends.
#[derive(Clone, Copy)]
enum Outgoing<'a> {
    Text(&'a str),
    Retention(u64),
    End,
}

/// A mailbox this device reads.
pub(crate) struct Inbox {
    pub(crate) recipient_id: [u8; 16],
    pub(crate) sender_id: [u8; 16],
    pub(crate) key: Zeroizing<[u8; 32]>,
    /// The connection its calls go over (not stored: it follows from whose
    /// mailbox it is).
    pub(crate) lane: Lane,
}

impl Inbox {
    /// Recipient id, sender id and key: the record of a mailbox kept on its own
    /// (the intake and sync mailboxes).
    fn encode(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new([&self.recipient_id[..], &self.sender_id, &self.key[..]].concat())
    }

    fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let mut cursor = Cursor(bytes);
        let mut parse = || -> Result<Self, Error> {
            Ok(Self {
                recipient_id: cursor.array()?,
                sender_id: cursor.array()?,
                key: Zeroizing::new(cursor.array()?),
                lane: Lane::Device,
            })
        };
        match parse() {
            Ok(inbox) if cursor.0.is_empty() => Ok(inbox),
            _ => Err(Error::Storage(
                "a stored mailbox record is malformed".into(),
            )),
        }
    }
}

/// This device's side of talking with one remote device.
pub(crate) struct Link {
    pub(crate) remote_identity: [u8; IDENTITY_KEY_LEN],
    pub(crate) session: Zeroizing<Vec<u8>>,
    pub(crate) inbox: Inbox,
    /// Signs what this device posts to the remote's mailbox (secured to it).
    pub(crate) sender_key: Zeroizing<[u8; 32]>,
    /// Where this device posts.
    pub(crate) remote_sender_id: [u8; 16],
    /// Help-seeker: still posting to the intake mailbox (no Hello yet).
    pub(crate) remote_is_intake: bool,
    /// Supporter: the Hello has been sent.
    pub(crate) announced: bool,
}

/// A stored conversation.
pub(crate) struct Conversation {
    pub(crate) id: ConversationId,
    /// The help-seeker's pseudonymous identity for this conversation (zeros on a supporter device).
    pub(crate) identity: Zeroizing<[u8; 64]>,
    pub(crate) help_seeker: bool,
    pub(crate) links: Vec<Link>,
}

fn malformed() -> Error {
    Error::Storage("a stored conversation is malformed".into())
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], Error> {
        if self.0.len() < len {
            return Err(malformed());
        }
        let (head, tail) = self.0.split_at(len);
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        self.take(N)?.try_into().map_err(|_| malformed())
    }

    fn var(&mut self) -> Result<&'a [u8], Error> {
        let len = u32::from_be_bytes(self.array()?) as usize;
        self.take(len)
    }
}

impl Conversation {
    pub(crate) fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(vec![RECORD_VERSION]);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.identity[..]);
        out.push(u8::from(self.help_seeker));
        out.extend_from_slice(&(self.links.len() as u32).to_be_bytes());
        for link in &self.links {
            out.extend_from_slice(&link.remote_identity);
            out.extend_from_slice(&(link.session.len() as u32).to_be_bytes());
            out.extend_from_slice(&link.session);
            out.extend_from_slice(&link.inbox.recipient_id);
            out.extend_from_slice(&link.inbox.sender_id);
            out.extend_from_slice(&link.inbox.key[..]);
            out.extend_from_slice(&link.sender_key[..]);
            out.extend_from_slice(&link.remote_sender_id);
            out.push(u8::from(link.remote_is_intake) | (u8::from(link.announced) << 1));
        }
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let mut cursor = Cursor(bytes);
        if cursor.take(1)? != [RECORD_VERSION] {
            return Err(malformed());
        }
        let id = cursor.array()?;
        let identity = Zeroizing::new(cursor.array::<64>()?);
        let help_seeker = cursor.take(1)?[0] == 1;
        let count = u32::from_be_bytes(cursor.array()?) as usize;
        let mut links = Vec::with_capacity(count.min(16));
        for _ in 0..count {
            let remote_identity = cursor.array()?;
            let session = Zeroizing::new(cursor.var()?.to_vec());
            let inbox = Inbox {
                recipient_id: cursor.array()?,
                sender_id: cursor.array()?,
                key: Zeroizing::new(cursor.array()?),
                lane: Lane::of_record(&id),
            };
            let sender_key = Zeroizing::new(cursor.array()?);
            let remote_sender_id = cursor.array()?;
            let flags = cursor.take(1)?[0];
            links.push(Link {
                remote_identity,
                session,
                inbox,
                sender_key,
                remote_sender_id,
                remote_is_intake: flags & 1 != 0,
                announced: flags & 2 != 0,
            });
        }
        if !cursor.0.is_empty() {
            return Err(malformed());
        }
        Ok(Self {
            id,
            identity,
            help_seeker,
            links,
        })
    }
}

impl Client {
    pub(crate) fn conversation(&self, id: &ConversationId) -> Result<Conversation, Error> {
        let bytes = self
            .store
            .get_versioned(
                crate::storage::Owner::Conversation(id),
                Tree::Conversations,
                id,
            )?
            .ok_or(Error::UnknownConversation)?;
        Conversation::decode(&bytes)
    }

    pub(crate) fn save_conversation(&self, conversation: &Conversation) -> Result<(), Error> {
        self.store.put_versioned(
            crate::storage::Owner::Conversation(&conversation.id),
            Tree::Conversations,
            &conversation.id,
            &conversation.encode(),
        )
    }

    /// Makes the store and the key file agree, after a crash between the two:
    /// a conversation whose key is gone was being ended (its records go too);
    /// keys of a conversation without a record were never used, or belong to one
    /// that was ended (they are destroyed).
    pub(crate) fn reconcile_conversations(&self) -> Result<(), Error> {
        let labels = self.store.key_labels()?;
        let ids = self.conversation_ids()?;
        let mut changed = false;
        for id in &ids {
            let has_record_key = labels.iter().any(|label| {
                label[..16] == id[..]
                    && u64::from_be_bytes(label[16..].try_into().unwrap_or([0; 8]))
                        >= crate::storage::RESERVED_SUFFIXES
            });
            if !has_record_key {
                self.store.remove(Tree::Conversations, id)?;
                self.forget_history(id)?;
                changed = true;
            }
        }
        if changed {
            self.store.flush()?;
        }
        let ids = self.conversation_ids()?;
        self.store
            .destroy_keys(|label| !ids.iter().any(|id| label[..16] == id[..]))?;
        Ok(())
    }

    /// The mailbox recorded under `name`, if this device has one.
    pub(crate) fn stored_inbox(&self, name: &[u8]) -> Result<Option<Inbox>, Error> {
        self.store
            .get(Tree::State, name)?
            .map(|bytes| Inbox::decode(&bytes))
            .transpose()
    }

    /// The mailbox recorded under `name`, created (and recorded) on first use.
    pub(crate) async fn recorded_inbox(
        &self,
        name: &[u8],
        kind: proto::MailboxKind,
    ) -> Result<Inbox, Error> {
        if let Some(inbox) = self.stored_inbox(name)? {
            return Ok(inbox);
        }
        let inbox = self.create_mailbox(kind, Lane::Device).await?;
        self.push_for_new(&inbox).await?;
        self.store.put(Tree::State, name, &inbox.encode())?;
        self.store.flush()?;
        Ok(inbox)
    }

    /// A new mailbox, created over `lane` (the connection of whatever it is for).
    pub(crate) async fn create_mailbox(
        &self,
        kind: proto::MailboxKind,
        lane: Lane,
    ) -> Result<Inbox, Error> {
        let difficulty = self.difficulty().await?;
        self.create_mailbox_at(kind, lane, difficulty).await
    }

    /// [`Client::create_mailbox`] with the relay's difficulty already known
    /// (one `GetInfo` for a whole first contact, not one per mailbox).
    pub(crate) async fn create_mailbox_at(
        &self,
        kind: proto::MailboxKind,
        lane: Lane,
        difficulty: u32,
    ) -> Result<Inbox, Error> {
        let key = Zeroizing::new(rand::random::<[u8; 32]>());
        let signing = SigningKey::from_bytes(&key);
        let recipient_key = signing.verifying_key().to_bytes();
        let kind = kind as i32;
        // Creating a mailbox costs a proof of work in the signed nonce (the
        // relay may require it: relay review F1), at the intake difficulty.
        let timestamp_ms = self.now_ms();
        let random: [u8; 8] = rand::random();
        let nonce = tokio::task::spawn_blocking(move || {
            haven_proto::pow::solve_create_nonce(
                &recipient_key,
                timestamp_ms,
                random,
                difficulty,
                u64::MAX,
            )
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| Error::Protocol(format!("no proof of work of {difficulty} bits found")))?;
        let auth = sign_request(
            &signing,
            Method::Create,
            &[],
            &[&[kind as u8]],
            timestamp_ms,
            nonce,
        );
        let created = self
            .transport
            .mailbox(lane)
            .create(proto::CreateRequest {
                recipient_key: recipient_key.to_vec(),
                kind,
                auth: Some(auth),
            })
            .await?
            .into_inner();
        let id = |bytes: Vec<u8>| -> Result<[u8; 16], Error> {
            bytes
                .try_into()
                .map_err(|_| Error::Protocol("relay returned a malformed mailbox id".into()))
        };
        Ok(Inbox {
            recipient_id: id(created.recipient_id)?,
            sender_id: id(created.sender_id)?,
            key,
            lane,
        })
    }

    pub(crate) async fn secure(&self, inbox: &Inbox, sender_key: &[u8; 32]) -> Result<(), Error> {
        let signing = SigningKey::from_bytes(&inbox.key);
        let auth = sign_request(
            &signing,
            Method::Secure,
            &inbox.recipient_id,
            &[sender_key],
            self.now_ms(),
            rand::random(),
        );
        self.transport
            .mailbox(inbox.lane)
            .secure(proto::SecureRequest {
                recipient_id: inbox.recipient_id.to_vec(),
                sender_key: sender_key.to_vec(),
                auth: Some(auth),
            })
            .await?;
        Ok(())
    }

    /// The relay's current proof-of-work difficulty, refused (as a refusal to
    /// retry later) above what this app will spend: a relay asking for 32 bits
    /// would pin a core for minutes per message.
    pub(crate) async fn difficulty(&self) -> Result<u32, Error> {
        let difficulty = self
            .transport
            .relay(Lane::Directory)
            .get_info(proto::GetInfoRequest {})
            .await?
            .into_inner()
            .intake_pow_difficulty;
        if difficulty > MAX_DIFFICULTY {
            return Err(Error::Relay {
                kind: crate::RelayRefusal::Unavailable,
                message: "the relay asks for more proof of work than this app spends".into(),
            });
        }
        Ok(difficulty)
    }

    /// Sends `text` in a conversation: to every device of the supporter, or to
    /// the help-seeker.
    pub async fn send(&self, id: &ConversationId, text: &str) -> Result<(), Error> {
        let _state = self.state_lock.lock().await;
        self.send_to_all(id, Outgoing::Text(text)).await
    }

    /// Sets the conversation's retention: history older than `seconds` is
    /// deleted here, on the other side's devices once they sync, and on this
    /// supporter's other devices (a help-seeker who chose to keep their
    /// transcript keeps it).
    pub async fn set_retention(&self, id: &ConversationId, seconds: u64) -> Result<(), Error> {
        let _state = self.state_lock.lock().await;
        self.send_to_all(id, Outgoing::Retention(seconds)).await
    }

    /// Adopts a retention set elsewhere in the conversation.
    pub(crate) fn adopt_retention(
        &self,
        id: &ConversationId,
        seconds: u64,
    ) -> Result<Event, Error> {
        let retention = self.retention(id)?;
        self.save_retention(
            id,
            crate::Retention {
                seconds,
                ..retention
            },
        )?;
        Ok(Event::RetentionChanged {
            conversation: *id,
            seconds,
        })
    }

    /// Ends a conversation: tells the other side, deletes this side's mailboxes
    /// on the relay and every trace of the conversation on this device.
    ///
    /// The conversation is gone from this device when this returns, whatever
    /// the relay does: the end message (and what was still queued before it)
    /// waits in an outbox of its own, under the storage key, and goes out now
    /// or with a later sync; a mailbox the relay could not delete now expires
    /// there unread.
    pub async fn end_conversation(&self, id: &ConversationId) -> Result<(), Error> {
        let _state = self.state_lock.lock().await;
        let supporter_side = !self.conversation(id)?.help_seeker;
        self.send_to_all(id, Outgoing::End).await?;
        self.delete_conversation(id).await?;
        if let Err(error) = self.post_queued(Owner::Farewell(*id)).await {
            tracing::debug!(%error, "an end message was not posted yet");
        }
        if supporter_side {
            if let Err(error) = self.post_queued(Owner::Siblings).await {
                tracing::debug!(%error, "the other devices were not told yet");
            }
            // A place opened up (best effort: the next sync tells the relay too).
            if let Err(error) = self.refresh_relay_capacity().await {
                tracing::debug!(%error, "the relay's capacity was not updated");
            }
        }
        Ok(())
    }

    /// Deletes a conversation's mailboxes on the relay and everything of it here.
    pub(crate) async fn delete_conversation(&self, id: &ConversationId) -> Result<(), Error> {
        let inboxes = self.forget_conversation(id)?;
        self.delete_mailboxes(&inboxes).await;
        Ok(())
    }

    /// Deletes the conversation on this device at once — record, history,
    /// outbox, keys — and returns its mailboxes for the relay, so that a relay
    /// slow to delete them never holds up (or, with the app killed meanwhile,
    /// undoes) what happened here.
    pub(crate) fn forget_conversation(&self, id: &ConversationId) -> Result<Vec<Inbox>, Error> {
        let conversation = self.conversation(id)?;
        self.store.remove(Tree::Conversations, id)?;
        self.forget_history(id)?;
        self.drop_outbox(Owner::Conversation(*id))?;
        self.store.flush()?;
        // What sled's log still holds of it can no longer be opened.
        self.store.destroy_keys(|label| label[..16] == id[..])?;
        Ok(conversation
            .links
            .into_iter()
            .map(|link| link.inbox)
            .collect())
    }

    /// Deletes mailboxes on the relay, best effort: a relay that cannot (or
    /// will not) delete one must not keep anything here; unread, it expires
    /// there.
    pub(crate) async fn delete_mailboxes(&self, inboxes: &[Inbox]) {
        for inbox in inboxes {
            if let Err(error) = self.delete_mailbox(inbox).await {
                tracing::debug!(%error, "a conversation mailbox was not deleted on the relay");
            }
        }
    }

    pub(crate) async fn delete_mailbox(&self, inbox: &Inbox) -> Result<(), Error> {
        let signing = SigningKey::from_bytes(&inbox.key);
        let auth = sign_request(
            &signing,
            Method::Delete,
            &inbox.recipient_id,
            &[],
            self.now_ms(),
            rand::random(),
        );
        match self
            .transport
            .mailbox(inbox.lane)
            .delete(proto::DeleteRequest {
                recipient_id: inbox.recipient_id.to_vec(),
                auth: Some(auth),
            })
            .await
        {
            Ok(_) => Ok(()),
            // Already gone is what we wanted.
            Err(status) if status.code() == tonic::Code::NotFound => Ok(()),
            Err(status) => Err(status.into()),
        }
    }

    /// Whether the conversation still has the link whose mailbox is `recipient_id`.
    pub(crate) fn has_link(&self, id: &ConversationId, recipient_id: &[u8; 16]) -> bool {
        self.conversation(id).is_ok_and(|conversation| {
            conversation
                .links
                .iter()
                .any(|link| link.inbox.recipient_id == *recipient_id)
        })
    }

    /// Who this device is in a conversation: the help-seeker's pseudonym for
    /// it, or the supporter device's identity.
    fn own_identity(&self, conversation: &Conversation) -> Result<IdentityKeyPair, Error> {
        if conversation.help_seeker {
            return Ok(IdentityKeyPair::from_secret_bytes(&conversation.identity));
        }
        let device = self.device()?.ok_or(Error::NoSupporterIdentity)?;
        Ok(IdentityKeyPair::from_secret_bytes(
            &device.identity().secret_bytes(),
        ))
    }

    /// Sends text, a retention or the end of the conversation to every peer.
    ///
    /// Encrypt, persist, post (see `outbox`): every envelope, the advanced
    /// sessions, the history line and the copies for this supporter's other
    /// devices are on disk in one flush before anything is posted, so a lost
    /// response or a crash never makes a message key encrypt a second text. What
    /// earlier sends left queued is posted first, so the order holds. Returns
    /// [`Error::Queued`] when the relay did not take it yet (it stays queued).
    /// The caller holds the state lock.
    async fn send_to_all(&self, id: &ConversationId, outgoing: Outgoing<'_>) -> Result<(), Error> {
        let owner = Owner::Conversation(*id);
        // What earlier sends left goes first (order per mailbox); its fate is
        // not this send's (a refusal of it was logged when it happened).
        if let Err(error) = self.post_queued(owner).await {
            tracing::debug!(%error, "earlier queued envelopes were not posted");
        }
        let mut conversation = self.conversation(id)?;
        let identity = &self.own_identity(&conversation)?;
        let mut queued = Vec::with_capacity(conversation.links.len());
        for link in &mut conversation.links {
            let mut session =
                Session::from_snapshot(&link.session).map_err(|e| Error::Storage(e.to_string()))?;
            let message = match outgoing {
                Outgoing::End => AppMessage::End,
                Outgoing::Retention(seconds) => AppMessage::Retention { seconds },
                Outgoing::Text(text) if !conversation.help_seeker && !link.announced => {
                    AppMessage::Hello {
                        conversation_sender_id: link.inbox.sender_id,
                        sender_key: SigningKey::from_bytes(&link.sender_key)
                            .verifying_key()
                            .to_bytes(),
                        text: text.to_owned(),
                    }
                }
                Outgoing::Text(text) => AppMessage::Text {
                    text: text.to_owned(),
                },
            };
            let encrypted = session
                .encrypt(&message.encode(), &mut rand::rng())
                .map_err(|e| Error::Protocol(e.to_string()))?;
            let remote = IdentityKey::from_bytes(&link.remote_identity)
                .map_err(|_| Error::BadDeviceIdentity)?;
            let sealed = seal(identity, &remote, &encrypted, &mut rand::rng())
                .map_err(|e| Error::Protocol(e.to_string()))?;
            queued.push(Queued::new(
                link.remote_sender_id,
                sealed,
                &link.sender_key,
                link.remote_is_intake,
            ));
            link.session = session.to_snapshot();
            link.announced |= matches!(message, AppMessage::Hello { .. });
        }
        self.save_conversation(&conversation)?;
        let ours = match outgoing {
            // The end message outlives the conversation here (see `end_conversation`).
            Outgoing::End => {
                self.queue_farewell(id, &queued)?;
                Vec::new()
            }
            _ => self.enqueue(owner, &queued)?,
        };
        match outgoing {
            Outgoing::Text(text) => self.record(id, crate::Author::Me, text)?,
            Outgoing::Retention(seconds) => {
                self.adopt_retention(id, seconds)?;
            }
            Outgoing::End => {}
        }
        // A supporter's other devices get a copy, so all show the same conversation.
        if !conversation.help_seeker {
            for link in &conversation.links {
                let peer = link.remote_identity;
                match outgoing {
                    Outgoing::Text(text) => self.queue_sync_copy(&peer, text)?,
                    Outgoing::Retention(seconds) => self.queue_sync_retention(&peer, seconds)?,
                    Outgoing::End => self.queue_sync_end(&peer)?,
                }
            }
        }
        self.store.flush()?;
        if matches!(outgoing, Outgoing::End) {
            return Ok(());
        }
        let posted = self.post_queued_for(owner, &ours).await?;
        if !conversation.help_seeker {
            // Copies for the other devices go now or with a later sync; a
            // broken sibling never fails this send.
            if let Err(error) = self.post_queued(Owner::Siblings).await {
                tracing::debug!(%error, "sync copies were not posted");
            }
        }
        posted.outcome(&ours)
    }

    /// The safety numbers of a conversation, one per remote device, as 12
    /// groups of 5 digits to compare out of band (read aloud, or scan).
    pub fn safety_numbers(&self, id: &ConversationId) -> Result<Vec<String>, Error> {
        let conversation = self.conversation(id)?;
        conversation
            .links
            .iter()
            .map(|link| {
                let session = Session::from_snapshot(&link.session)
                    .map_err(|e| Error::Storage(e.to_string()))?;
                Ok(session.safety_number().display())
            })
            .collect()
    }

    /// Every mailbox this device reads: intake, sync, and each conversation's.
    pub(crate) fn inboxes(&self) -> Result<Vec<Inbox>, Error> {
        self.inboxes_of(|_| true)
    }

    /// The intake and sync mailboxes, and those of the conversations `pick` keeps.
    pub(crate) fn inboxes_of(
        &self,
        pick: impl Fn(&Conversation) -> bool,
    ) -> Result<Vec<Inbox>, Error> {
        let mut inboxes = Vec::new();
        inboxes.extend(self.intake_inbox()?);
        inboxes.extend(self.sibling_inboxes()?);
        for id in self.conversation_ids()? {
            let Ok(conversation) = self.conversation(&id) else {
                continue;
            };
            if pick(&conversation) {
                inboxes.extend(conversation.links.into_iter().map(|link| link.inbox));
            }
        }
        Ok(inboxes)
    }

    /// The identities of the other side's devices in a conversation (public
    /// keys, 128 bytes each): for an app that offers a scannable key check in
    /// addition to safety numbers.
    pub fn peer_identities(
        &self,
        id: &ConversationId,
    ) -> Result<Vec<[u8; IDENTITY_KEY_LEN]>, Error> {
        Ok(self
            .conversation(id)?
            .links
            .iter()
            .map(|link| link.remote_identity)
            .collect())
    }

    /// The conversations on this device.
    pub fn conversations(&self) -> Result<Vec<ConversationId>, Error> {
        self.conversation_ids()
    }

    pub(crate) fn conversation_ids(&self) -> Result<Vec<ConversationId>, Error> {
        self.store
            .keys(Tree::Conversations)?
            .into_iter()
            .map(|key| key.try_into().map_err(|_| malformed()))
            .collect()
    }

    /// A message in a conversation, from the remote device of link `index`.
    pub(crate) async fn receive(
        &self,
        id: &ConversationId,
        recipient_id: &[u8; 16],
        sealed: &[u8],
    ) -> Result<Vec<Event>, Error> {
        let mut conversation = self.conversation(id)?;
        let identity = &self.own_identity(&conversation)?;
        let (sender, content) =
            open(identity, sealed).map_err(|e| Error::Protocol(e.to_string()))?;
        let index = conversation
            .links
            .iter()
            .position(|link| link.inbox.recipient_id == *recipient_id)
            .ok_or_else(malformed)?;
        let link = &mut conversation.links[index];
        if sender.to_bytes() != link.remote_identity {
            return Err(Error::Protocol(
                "a message from someone else than this conversation's peer".into(),
            ));
        }
        let mut session =
            Session::from_snapshot(&link.session).map_err(|e| Error::Storage(e.to_string()))?;
        let plaintext = session
            .decrypt(&content, &mut rand::rng())
            .map_err(|e| Error::Protocol(e.to_string()))?;
        let mut answered = false;
        let text = match AppMessage::decode(&plaintext)? {
            AppMessage::Hello {
                conversation_sender_id,
                sender_key,
                text,
            } if conversation.help_seeker => {
                // From now on: post to the device's conversation mailbox, and only
                // that device may post to our reply mailbox.
                self.secure(&link.inbox, &sender_key)
                    .await
                    .map_err(Error::caused_by_peer)?;
                link.remote_sender_id = conversation_sender_id;
                link.remote_is_intake = false;
                answered = true;
                text
            }
            AppMessage::Text { text } => text,
            AppMessage::Retention { seconds } => {
                link.session = session.to_snapshot();
                self.save_conversation(&conversation)?;
                return Ok(vec![self.adopt_retention(id, seconds)?]);
            }
            AppMessage::End => {
                // The other side ended it: delete every trace here too.
                self.delete_conversation(id).await?;
                return Ok(vec![Event::ConversationEnded { conversation: *id }]);
            }
            AppMessage::Declined if conversation.help_seeker => {
                // That device has no room; the supporter's others may still
                // answer. Only when none is left is the conversation declined.
                let gone = conversation.links.remove(index);
                if conversation.links.is_empty() {
                    self.delete_conversation(id).await?;
                    return Ok(vec![Event::ConversationDeclined { conversation: *id }]);
                }
                self.save_conversation(&conversation)?;
                self.store.flush()?;
                if let Err(error) = self.delete_mailbox(&gone.inbox).await {
                    tracing::debug!(%error, "a declined device's reply mailbox was not deleted");
                }
                return Ok(Vec::new());
            }
            _ => {
                return Err(Error::Protocol(
                    "unexpected message in a conversation".into(),
                ));
            }
        };
        link.session = session.to_snapshot();
        self.save_conversation(&conversation)?;
        self.record(id, crate::Author::Them, &text)?;
        self.prune(id)?;
        let mut events = vec![Event::MessageReceived {
            conversation: *id,
            text,
        }];
        if answered {
            events.push(Event::SafetyNumber {
                conversation: *id,
                number: session.safety_number().display(),
            });
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offline_client(dir: &std::path::Path) -> Result<Client, Error> {
        crate::offline_client(dir, None)
    }

    #[tokio::test]
    async fn opening_finishes_what_a_crash_between_store_and_key_file_left() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(|e| Error::Storage(e.to_string()))?;
        let (kept, cut_short, orphan) = ([1u8; 16], [2u8; 16], [3u8; 16]);
        {
            let client = offline_client(dir.path())?;
            for id in [kept, cut_short] {
                client.save_conversation(&Conversation {
                    id,
                    identity: Zeroizing::new([0; 64]),
                    help_seeker: true,
                    links: Vec::new(),
                })?;
                client.record(&id, crate::Author::Me, "a line of history")?;
            }
            // An ending cut short after its keys were destroyed but before the
            // records went; and a key created for a conversation never saved.
            client
                .store
                .destroy_keys(|label| label[..16] == cut_short[..])?;
            client
                .store
                .put_under(&record_label(&orphan), Tree::State, b"never-saved", b"x")?;
            client.store.flush()?;
        }
        let client = offline_client(dir.path())?;
        assert_eq!(
            client.conversations()?,
            [kept],
            "the half-ended one is gone"
        );
        assert_eq!(client.history(&kept)?.len(), 1);
        assert!(
            client
                .store
                .keys_with_prefix(Tree::History, &cut_short)?
                .is_empty(),
            "its history records went with it"
        );
        let labels = client.store.key_labels()?;
        assert!(
            labels.iter().all(|label| label[..16] == kept[..]),
            "keys without a conversation are destroyed"
        );
        Ok(())
    }
}
