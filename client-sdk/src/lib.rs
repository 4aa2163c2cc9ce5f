//! `haven-sdk`: what an app builds on. It talks to the relay, keeps all state
//! on the device sealed under the app's storage key, and never hands key
//! material to the app.
//!
//! It covers the directory (every document verified against the pinned
//! association key; shared links), the supporter's side (identity, device
//! registration, linking a second device, capacity, prekeys), and
//! conversations: anonymous first contact under a fresh pseudonymous identity,
//! private mailboxes secured to each side's sender key, fan-out to every
//! supporter device with sync copies between them, `sync_once` for an app woken
//! in the background, safety numbers, history with a retention, and ending a
//! conversation so that nothing of it is left on either device or the relay.
//!
//! ```no_run
//! # async fn example() -> Result<(), haven_sdk::Error> {
//! use haven_sdk::{Client, Config, DirectoryFilter};
//!
//! let client = Client::open(Config {
//!     relay_url: "http://127.0.0.1:50051".into(),
//!     ca_certificate: None,
//!     association_key: [0; 32], // pinned in the app
//!     data_dir: "./haven-app".into(),
//!     storage_key: zeroize::Zeroizing::new([0; 32]), // from the platform keystore
//!     proxy: None,
//! })?;
//! let nearby = client
//!     .list_supporters(&DirectoryFilter { county: Some("Vestland".into()), ..DirectoryFilter::default() })
//!     .await?;
//! # let _ = nearby;
//! # Ok(())
//! # }
//! ```

mod conversation;
mod directory;
mod error;
mod events;
mod first_contact;
mod history;
mod keyfile;
mod linking;
mod message;
mod outbox;
mod push;
mod storage;
mod supporter;
mod sync;
mod transport;

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use zeroize::Zeroizing;

pub use conversation::{ConversationId, Event};
pub use directory::{DirectoryFilter, Supporter, SupporterDevice};
pub use error::{Error, RelayRefusal};
pub use events::EventStream;
pub use first_contact::DEFAULT_CAPACITY;
pub use haven_protocol::IDENTITY_KEY_LEN;
pub use history::{Author, DEFAULT_RETENTION_SECONDS, HistoryEntry, Retention};
pub use linking::LINK_CODE_PREFIX;
pub use supporter::{CAPACITY_REFRESH_SECONDS, PREKEY_BATCH};

use crate::storage::SealedStore;
use crate::transport::Transport;

/// What a client needs to start. No `Debug`: it holds the storage key.
pub struct Config {
    /// The relay: `https://host:port`, or `http://` to a loopback address.
    pub relay_url: String,
    /// A PEM certificate to trust for the relay's TLS (e.g. a private CA).
    pub ca_certificate: Option<Vec<u8>>,
    /// The association's Ed25519 public key, pinned in the app.
    pub association_key: [u8; 32],
    /// Where the device's state lives (exclude it from cloud backups).
    pub data_dir: PathBuf,
    /// 32 bytes from the platform keystore; every stored value is sealed with it.
    pub storage_key: Zeroizing<[u8; 32]>,
    /// A SOCKS5 proxy to reach the relay through, `socks5h://host:port` (Tor's
    /// is `socks5h://127.0.0.1:9050`; Orbot's the same on Android). Each
    /// conversation's connection authenticates to it under a name of its own,
    /// so Tor gives it a circuit of its own. `None`: connect directly.
    pub proxy: Option<String>,
}

/// Settings kept after opening.
struct Settings {
    association_key: [u8; 32],
}

/// A Haven client: one device's view of the relay and the directory.
pub struct Client {
    config: Settings,
    store: SealedStore,
    transport: Transport,
    /// Serializes everything that changes conversation or session state (sync,
    /// send, start, end, linking): the event stream and the app run concurrently,
    /// and two updates of one ratchet state must never race.
    state_lock: tokio::sync::Mutex<()>,
    /// Serializes writing and pruning history (both synchronous), which reading
    /// history does without the state lock.
    history_lock: std::sync::Mutex<()>,
    /// How long (milliseconds) one sync spreads its conversations' fetches
    /// over (see [`Client::set_sync_spread`]).
    sync_spread_ms: std::sync::atomic::AtomicU64,
    /// When remembered envelope ids were last pruned (seconds; 0: never).
    last_prune: std::sync::atomic::AtomicU64,
    /// When this device last told the relay its room for new conversations
    /// (seconds; 0: not since it was opened).
    last_capacity_refresh: std::sync::atomic::AtomicU64,
}

/// The spread of a sync's fetches when a proxy is configured (see
/// [`Client::set_sync_spread`]).
pub const DEFAULT_SYNC_SPREAD: std::time::Duration = std::time::Duration::from_secs(3);
/// The longest spread [`Client::set_sync_spread`] takes.
pub const MAX_SYNC_SPREAD: std::time::Duration = std::time::Duration::from_secs(60);

impl Client {
    /// Opens the device's state (creating it on first use) and prepares the
    /// relay connection, which is made when first needed. Blocks on disk IO; if
    /// another client holds the data directory it waits up to 10 s for it to be
    /// let go, then fails with [`Error::Storage`].
    pub fn open(config: Config) -> Result<Self, Error> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| Error::Storage(e.to_string()))?;
        let store = SealedStore::open(&config.data_dir, &config.storage_key)?;
        let transport = Transport::new(
            &config.relay_url,
            config.ca_certificate.as_deref(),
            config.proxy.as_deref(),
        )?;
        let client = Self {
            config: Settings {
                association_key: config.association_key,
            },
            store,
            transport,
            state_lock: tokio::sync::Mutex::new(()),
            history_lock: std::sync::Mutex::new(()),
            // Spreading fetches only helps when the connections do not share an
            // address anyway, i.e. behind a proxy such as Tor.
            last_prune: std::sync::atomic::AtomicU64::new(0),
            last_capacity_refresh: std::sync::atomic::AtomicU64::new(0),
            sync_spread_ms: std::sync::atomic::AtomicU64::new(if config.proxy.is_some() {
                DEFAULT_SYNC_SPREAD.as_millis() as u64
            } else {
                0
            }),
        };
        // Finish what a crash may have interrupted: ending a conversation, or
        // creating one's key without its record.
        // A data directory put back from an older copy was refused by
        // `SealedStore::open` already (its generation), before this runs.
        client.reconcile_conversations()?;
        Ok(client)
    }

    /// Spreads each sync's fetches of its conversations' mailboxes over
    /// `spread`, in a random order with a random pause before each, so the
    /// relay does not see one device's conversations fetched back to back in
    /// the same order every time (review 2026-12-crypto #7). It helps only when
    /// the connections do not share an address (over Tor, [`Config::proxy`]),
    /// so it is [`DEFAULT_SYNC_SPREAD`] with a proxy and zero without; at most
    /// [`MAX_SYNC_SPREAD`]. A sync takes up to `spread` longer.
    pub fn set_sync_spread(&self, spread: std::time::Duration) -> Result<(), Error> {
        if spread > MAX_SYNC_SPREAD {
            return Err(Error::InvalidArgument(format!(
                "a sync spread is at most {} s",
                MAX_SYNC_SPREAD.as_secs()
            )));
        }
        self.sync_spread_ms.store(
            spread.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(())
    }

    /// The spread set by [`Client::set_sync_spread`].
    pub fn sync_spread(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.sync_spread_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn now(&self) -> u64 {
        self.now_ms() / 1000
    }
}

/// A client of a relay that is never there (port 9 on loopback), for tests of
/// what the device does on its own; `proxy` set when given.
#[cfg(test)]
pub(crate) fn offline_client(dir: &std::path::Path, proxy: Option<&str>) -> Result<Client, Error> {
    Client::open(Config {
        relay_url: "http://127.0.0.1:9".into(),
        ca_certificate: None,
        association_key: [1; 32],
        data_dir: dir.to_path_buf(),
        storage_key: Zeroizing::new([2; 32]),
        proxy: proxy.map(str::to_owned),
    })
}
