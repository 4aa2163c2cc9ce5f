//! `haven-ffi`: the SDK for Kotlin, Swift and Python, through UniFFI proc-macros.
//!
//! Thin wrappers only: every call converts its arguments, runs the
//! [`haven_sdk::Client`] method on the client's own tokio runtime, and converts
//! the result back. Logic that grows here belongs in `haven-sdk`.
//!
//! Conventions for the generated APIs:
//! - async methods are Kotlin `suspend` functions, Swift `async` and Python
//!   coroutines; they run on the client's runtime whatever the app's executor;
//! - conversation ids and supporter keys are lowercase hex strings (hashable,
//!   printable without leaking anything: they are random and local, or public);
//! - the storage key and the association key are bytes;
//! - every failure is one [`HavenError`], a flat enum whose message says what
//!   was wrong and never carries a key, id or message text;
//! - events arrive through an [`EventListener`] the app implements
//!   ([`HavenClient::watch`]), or from [`HavenClient::sync_once`] when the app is
//!   woken in the background.

use std::future::Future;
use std::sync::{Arc, Mutex};

use zeroize::{Zeroize as _, Zeroizing};

uniffi::setup_scaffolding!();

/// Why a call failed. Each variant's message is meant to be shown or logged; none
/// carries a key, an id or message text.
#[derive(Debug, thiserror::Error, uniffi::Error)]
#[uniffi(flat_error)]
#[non_exhaustive]
pub enum HavenError {
    /// An argument is malformed (a key of the wrong length, an id that is not hex).
    #[error("{0}")]
    InvalidArgument(String),
    /// The relay refused the request; the message says why.
    #[error("{0}")]
    Relay(String),
    /// The relay could not be reached (offline, DNS, TLS); retry later.
    #[error("{0}")]
    Unreachable(String),
    /// The relay address is not valid, or is plaintext to a non-loopback host.
    #[error("{0}")]
    BadRelayAddress(String),
    /// A directory document was refused (bad signature, expired, revoked, rolled back).
    #[error("{0}")]
    Directory(String),
    /// The storage key does not open this data directory.
    #[error("{0}")]
    WrongStorageKey(String),
    /// The data directory holds older state than this device last wrote (restored
    /// from a copy or tampered with); it is refused so no ratchet is rewound.
    #[error("{0}")]
    RolledBack(String),
    /// On-device storage failed.
    #[error("{0}")]
    Storage(String),
    /// This device has no supporter identity yet.
    #[error("{0}")]
    NoSupporterIdentity(String),
    /// The supporter is not taking new conversations; choose another or try later.
    #[error("{0}")]
    NotTakingConversations(String),
    /// The relay handed out keys the supporter did not sign (refused before anything was sent).
    #[error("{0}")]
    KeysRefused(String),
    /// No conversation with this id on this device.
    #[error("{0}")]
    UnknownConversation(String),
    /// Only the help-seeker of a conversation may do this.
    #[error("{0}")]
    OnlyHelpSeeker(String),
    /// A protocol step failed (a message that does not decrypt, a bad handshake).
    #[error("{0}")]
    Protocol(String),
    /// Saved on this device, not yet accepted by the relay: it is posted again by
    /// the next send or sync. Show the message as pending, not as failed.
    #[error("{0}")]
    Queued(String),
    /// Something inside the library failed; report it.
    #[error("{0}")]
    Internal(String),
}

impl From<haven_sdk::Error> for HavenError {
    fn from(error: haven_sdk::Error) -> Self {
        use haven_sdk::Error as E;
        let message = error.to_string();
        match error {
            E::Relay { .. } => HavenError::Relay(message),
            E::Unreachable(_) => HavenError::Unreachable(message),
            E::BadRelayAddress(_) | E::InsecureRelay => HavenError::BadRelayAddress(message),
            E::Directory(_) | E::BadDeviceIdentity => HavenError::Directory(message),
            E::WrongStorageKey => HavenError::WrongStorageKey(message),
            E::RolledBack => HavenError::RolledBack(message),
            E::Storage(_) => HavenError::Storage(message),
            E::NoSupporterIdentity => HavenError::NoSupporterIdentity(message),
            E::NotTakingConversations => HavenError::NotTakingConversations(message),
            E::BundleMismatch | E::Bundle(_) => HavenError::KeysRefused(message),
            E::UnknownConversation => HavenError::UnknownConversation(message),
            E::OnlyHelpSeeker => HavenError::OnlyHelpSeeker(message),
            E::Protocol(_) => HavenError::Protocol(message),
            E::InvalidArgument(_) => HavenError::InvalidArgument(message),
            E::Queued(_) => HavenError::Queued(message),
            _ => HavenError::Internal(message),
        }
    }
}

/// What a client needs to start.
#[derive(uniffi::Record)]
pub struct ClientConfig {
    /// `https://host:port`, or `http://` to a loopback address.
    pub relay_url: String,
    /// A PEM certificate to trust for the relay's TLS (a private CA), if any.
    #[uniffi(default = None)]
    pub ca_certificate: Option<Vec<u8>>,
    /// The association's Ed25519 public key (32 bytes), pinned in the app.
    pub association_key: Vec<u8>,
    /// The app's private directory for Haven's state; exclude it from backups.
    pub data_dir: String,
    /// 32 bytes from the platform keystore (Android Keystore, iOS Keychain).
    /// The library wipes its copy; the app should wipe its own.
    pub storage_key: Vec<u8>,
    /// A SOCKS5 proxy for Tor or a VPN app, `socks5h://host:port` (Orbot:
    /// `socks5h://127.0.0.1:9050`); each conversation gets its own circuit.
    #[uniffi(default = None)]
    pub proxy: Option<String>,
}

/// Filters for [`HavenClient::list_supporters`]; empty fields match everything.
#[derive(Debug, Clone, Default, uniffi::Record)]
pub struct DirectoryFilter {
    /// Only this specialty.
    #[uniffi(default = None)]
    pub specialty: Option<String>,
    /// Only this county.
    #[uniffi(default = None)]
    pub county: Option<String>,
    /// Only supporters who speak this language.
    #[uniffi(default = None)]
    pub language: Option<String>,
    /// Only supporters taking new conversations.
    #[uniffi(default = false)]
    pub taking_new_conversations_only: bool,
}

/// A supporter as the directory shows them, every signature checked against
/// the pinned association key.
#[derive(Clone, uniffi::Record)]
pub struct SupporterProfile {
    /// The supporter's key, hex: what [`HavenClient::start_conversation`] takes.
    pub key: String,
    /// Name shown to the help-seeker.
    pub display_name: String,
    /// Medical specialty.
    pub specialty: String,
    /// County.
    pub county: String,
    /// Town.
    pub town: String,
    /// Languages they talk in.
    pub languages: Vec<String>,
    /// Whether they take new conversations now.
    pub taking_new_conversations: bool,
    /// How many devices they have registered (0: not reachable yet).
    pub devices: u32,
}

impl From<haven_sdk::Supporter> for SupporterProfile {
    fn from(supporter: haven_sdk::Supporter) -> Self {
        Self {
            key: hex::encode(supporter.key()),
            display_name: supporter.display_name().to_owned(),
            specialty: supporter.specialty().to_owned(),
            county: supporter.county().to_owned(),
            town: supporter.town().to_owned(),
            languages: supporter.languages().to_vec(),
            taking_new_conversations: supporter.taking_new_conversations(),
            devices: u32::try_from(supporter.devices().len()).unwrap_or(u32::MAX),
        }
    }
}

/// Who wrote a history entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum Author {
    /// This device.
    Me,
    /// The other side.
    Them,
    /// Another device of this supporter.
    MyOtherDevice,
}

/// One message of a conversation's history.
#[derive(Clone, uniffi::Record)]
pub struct HistoryEntry {
    /// Who wrote it.
    pub author: Author,
    /// When this device stored it (seconds since the Unix epoch).
    pub at: u64,
    /// The text.
    pub text: String,
}

/// How a conversation's history is kept on this device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Record)]
pub struct Retention {
    /// History older than this many seconds is deleted.
    pub seconds: u64,
    /// The help-seeker keeps their transcript regardless.
    pub keep_transcript: bool,
}

/// Something that happened, for the app to show.
#[derive(Clone, uniffi::Enum)]
pub enum HavenEvent {
    /// A help-seeker started a conversation with this supporter device.
    ConversationStarted {
        /// The new conversation (hex).
        conversation: String,
        /// The first message.
        text: String,
    },
    /// A message arrived.
    MessageReceived {
        /// The conversation (hex).
        conversation: String,
        /// The text.
        text: String,
    },
    /// Another of this supporter's devices sent a message.
    SentFromOtherDevice {
        /// The conversation (hex).
        conversation: String,
        /// The text that device sent.
        text: String,
    },
    /// The conversation's retention was set elsewhere; it applies here now.
    RetentionChanged {
        /// The conversation (hex).
        conversation: String,
        /// The new retention in seconds.
        seconds: u64,
    },
    /// The other side ended the conversation; this device has deleted it.
    ConversationEnded {
        /// The conversation (hex), now gone.
        conversation: String,
    },
    /// A supporter device turned this help-seeker away (no room now); the
    /// conversation is deleted here. Pick another supporter.
    ConversationDeclined {
        /// The conversation (hex), now gone.
        conversation: String,
    },
    /// This supporter device turned a first contact away (no room); the
    /// help-seeker was told. Nothing of it is kept.
    FirstContactDeclined,
    /// An envelope was refused for what it held and dropped; the sync went on.
    EnvelopeRefused {
        /// The conversation whose mailbox held it (hex), or `None` for the
        /// intake and sync mailboxes.
        conversation: Option<String>,
        /// Why, in words without ids, keys or content.
        reason: String,
    },
    /// A message shown as pending was refused for good when posted again (the
    /// other side's mailbox is gone): it was not delivered; show it as failed.
    SendFailed {
        /// The conversation (hex).
        conversation: String,
        /// Why, in words without ids, keys or content.
        reason: String,
    },
    /// The safety number of a session, once it is established both ways.
    SafetyNumber {
        /// The conversation (hex).
        conversation: String,
        /// 12 groups of 5 digits, to compare out of band.
        number: String,
    },
}

impl HavenEvent {
    /// The event for the app; `None` for a kind a newer SDK added that these
    /// bindings do not know yet.
    fn from_sdk(event: haven_sdk::Event) -> Option<Self> {
        use haven_sdk::Event as E;
        Some(match event {
            E::ConversationStarted { conversation, text } => HavenEvent::ConversationStarted {
                conversation: hex::encode(conversation),
                text,
            },
            E::MessageReceived { conversation, text } => HavenEvent::MessageReceived {
                conversation: hex::encode(conversation),
                text,
            },
            E::SentFromOtherDevice { conversation, text } => HavenEvent::SentFromOtherDevice {
                conversation: hex::encode(conversation),
                text,
            },
            E::RetentionChanged {
                conversation,
                seconds,
            } => HavenEvent::RetentionChanged {
                conversation: hex::encode(conversation),
                seconds,
            },
            E::SafetyNumber {
                conversation,
                number,
            } => HavenEvent::SafetyNumber {
                conversation: hex::encode(conversation),
                number,
            },
            E::ConversationEnded { conversation } => HavenEvent::ConversationEnded {
                conversation: hex::encode(conversation),
            },
            E::ConversationDeclined { conversation } => HavenEvent::ConversationDeclined {
                conversation: hex::encode(conversation),
            },
            E::FirstContactDeclined => HavenEvent::FirstContactDeclined,
            E::SendFailed {
                conversation,
                reason,
            } => HavenEvent::SendFailed {
                conversation: hex::encode(conversation),
                reason,
            },
            E::EnvelopeRefused {
                conversation,
                reason,
            } => HavenEvent::EnvelopeRefused {
                conversation: conversation.map(hex::encode),
                reason,
            },
            _ => return None,
        })
    }
}

/// What the app implements to receive events from [`HavenClient::watch`].
/// Called from a library thread: hand the event to the UI thread yourself.
#[uniffi::export(with_foreign)]
pub trait EventListener: Send + Sync {
    /// An event happened.
    fn on_event(&self, event: HavenEvent);
    /// Watching hit an error (the relay unreachable, say); it keeps retrying
    /// with backoff. The message is safe to log.
    fn on_error(&self, message: String);
}

fn bytes<const N: usize>(value: &[u8], what: &str) -> Result<[u8; N], HavenError> {
    value
        .try_into()
        .map_err(|_| HavenError::InvalidArgument(format!("{what} must be {N} bytes")))
}

fn hex_bytes<const N: usize>(value: &str, what: &str) -> Result<[u8; N], HavenError> {
    let decoded = hex::decode(value.trim())
        .map_err(|_| HavenError::InvalidArgument(format!("{what} is not hex")))?;
    bytes(&decoded, what)
}

fn conversation_id(value: &str) -> Result<haven_sdk::ConversationId, HavenError> {
    hex_bytes(value, "a conversation id")
}

/// One device's Haven client. Create one per app process with
/// [`HavenClient::open`]; it is safe to use from several threads.
#[derive(uniffi::Object)]
pub struct HavenClient {
    client: Arc<haven_sdk::Client>,
    runtime: tokio::runtime::Runtime,
    watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl HavenClient {
    /// Runs an SDK call on the client's runtime; the returned future needs no
    /// particular executor, so asyncio, coroutines and Swift tasks can await it.
    fn run<T: Send + 'static>(
        &self,
        call: impl Future<Output = Result<T, haven_sdk::Error>> + Send + 'static,
    ) -> impl Future<Output = Result<T, HavenError>> + Send + 'static {
        let task = self.runtime.spawn(call);
        async move {
            task.await
                .map_err(|_| HavenError::Internal("a library task stopped unexpectedly".into()))?
                .map_err(HavenError::from)
        }
    }
}

impl Drop for HavenClient {
    fn drop(&mut self) {
        self.stop_watching();
    }
}

#[uniffi::export]
impl HavenClient {
    /// Opens the device's state (created on first use) and prepares the relay
    /// connection, made when first needed.
    #[uniffi::constructor]
    pub fn open(config: ClientConfig) -> Result<Arc<Self>, HavenError> {
        let ClientConfig {
            relay_url,
            ca_certificate,
            association_key,
            data_dir,
            mut storage_key,
            proxy,
        } = config;
        let storage = bytes::<32>(&storage_key, "the storage key").map(Zeroizing::new);
        storage_key.zeroize();
        let storage_key = storage?;
        let association_key = bytes::<32>(&association_key, "the association key")?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("haven")
            .enable_all()
            .build()
            .map_err(|e| HavenError::Internal(format!("cannot start the library runtime: {e}")))?;
        let client = {
            let _context = runtime.enter();
            haven_sdk::Client::open(haven_sdk::Config {
                relay_url,
                ca_certificate,
                association_key,
                data_dir: data_dir.into(),
                storage_key,
                proxy,
            })?
        };
        Ok(Arc::new(Self {
            client: Arc::new(client),
            runtime,
            watcher: Mutex::new(None),
        }))
    }

    // ----- directory -----

    /// Supporters in the directory matching `filter`, verified.
    pub async fn list_supporters(
        &self,
        filter: DirectoryFilter,
    ) -> Result<Vec<SupporterProfile>, HavenError> {
        let client = Arc::clone(&self.client);
        let filter = haven_sdk::DirectoryFilter {
            specialty: filter.specialty,
            county: filter.county,
            language: filter.language,
            taking_new_conversations_only: filter.taking_new_conversations_only,
        };
        let found = self
            .run(async move { client.list_supporters(&filter).await })
            .await?;
        Ok(found.into_iter().map(SupporterProfile::from).collect())
    }

    /// One supporter by key (hex), verified, with their devices and availability.
    pub async fn supporter(&self, key: String) -> Result<SupporterProfile, HavenError> {
        let key = hex_bytes::<32>(&key, "a supporter key")?;
        let client = Arc::clone(&self.client);
        let found = self
            .run(async move { client.supporter(&key).await })
            .await?;
        Ok(found.into())
    }

    /// The supporter behind a link or QR payload a colleague shared, verified
    /// offline. Call [`HavenClient::supporter`] with its key for availability.
    pub fn supporter_from_link(&self, link: String) -> Result<SupporterProfile, HavenError> {
        Ok(self.client.supporter_from_link(&link)?.into())
    }

    // ----- conversations -----

    /// Starts an anonymous conversation with the supporter `key` (hex): a fresh
    /// pseudonymous identity, the first message to each of their devices.
    /// Returns the conversation id.
    pub async fn start_conversation(
        &self,
        supporter_key: String,
        text: String,
    ) -> Result<String, HavenError> {
        let key = hex_bytes::<32>(&supporter_key, "a supporter key")?;
        let client = Arc::clone(&self.client);
        let id = self
            .run(async move {
                let supporter = client.supporter(&key).await?;
                client.start_conversation(&supporter, &text).await
            })
            .await?;
        Ok(hex::encode(id))
    }

    /// Sends `text` in a conversation.
    pub async fn send(&self, conversation: String, text: String) -> Result<(), HavenError> {
        let id = conversation_id(&conversation)?;
        let client = Arc::clone(&self.client);
        self.run(async move { client.send(&id, &text).await }).await
    }

    /// Sets the conversation's retention for both sides (disappearing messages).
    pub async fn set_retention(
        &self,
        conversation: String,
        seconds: u64,
    ) -> Result<(), HavenError> {
        let id = conversation_id(&conversation)?;
        let client = Arc::clone(&self.client);
        self.run(async move { client.set_retention(&id, seconds).await })
            .await
    }

    /// Help-seeker only: keep this conversation's transcript on this device
    /// regardless of its retention.
    pub fn keep_transcript(&self, conversation: String, keep: bool) -> Result<(), HavenError> {
        Ok(self
            .client
            .keep_transcript(&conversation_id(&conversation)?, keep)?)
    }

    /// How this device keeps the conversation's history.
    pub fn retention(&self, conversation: String) -> Result<Retention, HavenError> {
        let retention = self.client.retention(&conversation_id(&conversation)?)?;
        Ok(Retention {
            seconds: retention.seconds,
            keep_transcript: retention.keep_transcript,
        })
    }

    /// Ends a conversation: both sides delete it, the relay mailboxes go.
    pub async fn end_conversation(&self, conversation: String) -> Result<(), HavenError> {
        let id = conversation_id(&conversation)?;
        let client = Arc::clone(&self.client);
        self.run(async move { client.end_conversation(&id).await })
            .await
    }

    /// How many envelopes wait on this device to be posted (sends the relay did
    /// not take yet): the app shows them as pending.
    pub fn queued_envelopes(&self) -> Result<u64, HavenError> {
        Ok(self.client.queued_envelopes()? as u64)
    }

    /// Spreads each sync's fetches of its conversations over `millis`, in a
    /// random order with random pauses (at most 60 000; 3 000 by default with
    /// a proxy, 0 without): it only helps over Tor, where the connections do
    /// not share an address.
    pub fn set_sync_spread_ms(&self, millis: u64) -> Result<(), HavenError> {
        Ok(self
            .client
            .set_sync_spread(std::time::Duration::from_millis(millis))?)
    }

    /// The conversations on this device (hex ids).
    pub fn conversations(&self) -> Result<Vec<String>, HavenError> {
        Ok(self
            .client
            .conversations()?
            .iter()
            .map(hex::encode)
            .collect())
    }

    /// The conversation's history on this device, oldest first.
    pub fn history(&self, conversation: String) -> Result<Vec<HistoryEntry>, HavenError> {
        Ok(self
            .client
            .history(&conversation_id(&conversation)?)?
            .into_iter()
            .map(|entry| HistoryEntry {
                author: match entry.author {
                    haven_sdk::Author::Me => Author::Me,
                    haven_sdk::Author::Them => Author::Them,
                    haven_sdk::Author::MyOtherDevice => Author::MyOtherDevice,
                },
                at: entry.at,
                text: entry.text,
            })
            .collect())
    }

    /// The safety numbers of a conversation, one per remote device: show them,
    /// and let the user compare them out of band.
    pub fn safety_numbers(&self, conversation: String) -> Result<Vec<String>, HavenError> {
        Ok(self
            .client
            .safety_numbers(&conversation_id(&conversation)?)?)
    }

    /// Fetches, decrypts, stores and then acknowledges everything waiting: what
    /// an app calls when a push wakes it in the background.
    pub async fn sync_once(&self) -> Result<Vec<HavenEvent>, HavenError> {
        let client = Arc::clone(&self.client);
        let events = self.run(async move { client.sync_once().await }).await?;
        Ok(events
            .into_iter()
            .filter_map(HavenEvent::from_sdk)
            .collect())
    }

    /// Watches every mailbox of this device while the app is in the foreground
    /// and hands events to `listener` (replacing an earlier listener). Stops with
    /// [`HavenClient::stop_watching`] or when the client is dropped.
    pub fn watch(&self, listener: Arc<dyn EventListener>) {
        let client = Arc::clone(&self.client);
        let task = self.runtime.spawn(async move {
            let mut events = client.events();
            while let Some(item) = events.next().await {
                match item {
                    Ok(event) => {
                        if let Some(event) = HavenEvent::from_sdk(event) {
                            listener.on_event(event);
                        }
                    }
                    Err(error) => listener.on_error(error.to_string()),
                }
            }
        });
        if let Ok(mut watcher) = self.watcher.lock()
            && let Some(previous) = watcher.replace(task)
        {
            previous.abort();
        }
    }

    /// Stops watching (see [`HavenClient::watch`]).
    pub fn stop_watching(&self) {
        if let Ok(mut watcher) = self.watcher.lock()
            && let Some(task) = watcher.take()
        {
            task.abort();
        }
    }

    // ----- supporter -----

    /// Creates this device's supporter identity (once) and returns the
    /// supporter key (hex) for the association to sign.
    pub fn create_supporter_identity(&self) -> Result<String, HavenError> {
        Ok(hex::encode(self.client.create_supporter_identity()?))
    }

    /// The supporter key (hex), if this device holds one.
    pub fn supporter_key(&self) -> Result<Option<String>, HavenError> {
        Ok(self.client.supporter_key()?.map(hex::encode))
    }

    /// Registers this device for the supporter: keys, intake mailbox, signed
    /// device list.
    pub async fn register_supporter_device(&self) -> Result<(), HavenError> {
        let client = Arc::clone(&self.client);
        self.run(async move { client.register_supporter_device().await })
            .await
    }

    /// On a new device: the code (text or QR) an existing device approves.
    pub async fn device_link_code(&self, supporter_key: String) -> Result<String, HavenError> {
        let supporter_key = hex_bytes::<32>(&supporter_key, "the supporter key")?;
        let client = Arc::clone(&self.client);
        self.run(async move { client.device_link_code(&supporter_key).await })
            .await
    }

    /// On a device holding the supporter key: adds the device behind `code`.
    pub async fn approve_device(&self, code: String) -> Result<(), HavenError> {
        let client = Arc::clone(&self.client);
        self.run(async move { client.approve_device(&code).await })
            .await
    }

    /// On a device holding the supporter key: removes a lost or replaced device
    /// (its identity in hex, as [`HavenClient::supporter_devices`] lists it).
    pub async fn remove_device(&self, identity_hex: String) -> Result<(), HavenError> {
        let identity = hex_bytes::<{ haven_sdk::IDENTITY_KEY_LEN }>(&identity_hex, "identity")?;
        let client = Arc::clone(&self.client);
        self.run(async move { client.remove_device(&identity).await })
            .await
    }

    /// The identities (hex) in the supporter's device list as this device last
    /// signed it; empty on a device without the supporter key.
    pub fn supporter_devices(&self) -> Result<Vec<String>, HavenError> {
        Ok(self
            .client
            .supporter_devices()?
            .iter()
            .map(hex::encode)
            .collect())
    }

    /// This device's identity (hex), once it has keys.
    pub fn device_identity(&self) -> Result<Option<String>, HavenError> {
        Ok(self.client.device_identity()?.map(hex::encode))
    }

    /// How many new conversations the supporter can take (0 closes intake).
    pub async fn set_capacity(&self, capacity: u32) -> Result<(), HavenError> {
        let client = Arc::clone(&self.client);
        self.run(async move { client.set_capacity(capacity).await })
            .await
    }

    /// Registers a push endpoint for this device's supporter mailboxes (intake,
    /// sync, the conversations it answers), now and later: a UnifiedPush
    /// endpoint, or the app vendor's gateway URL with the APNs/FCM token (as
    /// bytes) it forwards to. The relay's wake-ups carry only `token`; on a
    /// wake-up, call [`HavenClient::sync_once`]. A help-seeker's conversations
    /// are not covered: see [`HavenClient::register_conversation_push`].
    pub async fn register_push(&self, endpoint: String, token: Vec<u8>) -> Result<(), HavenError> {
        let client = Arc::clone(&self.client);
        self.run(async move { client.register_push(&endpoint, &token).await })
            .await
    }

    /// Stops the wake-ups [`HavenClient::register_push`] set up.
    pub async fn unregister_push(&self) -> Result<(), HavenError> {
        let client = Arc::clone(&self.client);
        self.run(async move { client.unregister_push().await })
            .await
    }

    /// Registers a push endpoint for one conversation only (empty endpoint and
    /// token remove it). Give each of a help-seeker's conversations its own
    /// (a UnifiedPush instance, or a gateway token, per conversation): shared
    /// ones let the relay see the conversations are on one phone.
    pub async fn register_conversation_push(
        &self,
        conversation: String,
        endpoint: String,
        token: Vec<u8>,
    ) -> Result<(), HavenError> {
        let id = conversation_id(&conversation)?;
        let client = Arc::clone(&self.client);
        self.run(async move {
            client
                .register_conversation_push(&id, &endpoint, &token)
                .await
        })
        .await
    }

    /// Tops up this device's one-time prekeys on the relay; returns how many
    /// the relay holds now. `sync_once` does this by itself when needed.
    pub async fn replenish_prekeys(&self) -> Result<u32, HavenError> {
        let client = Arc::clone(&self.client);
        self.run(async move { client.replenish_prekeys().await })
            .await
    }
}
