//! Push wake-ups: when an envelope arrives for a mailbox that no `Receive`
//! stream watches, tell the device to fetch, without telling anyone anything.
//!
//! The wake-up is `POST <endpoint>` with `{"token":"<base64url>"}`: only the
//! opaque token the device registered, never a mailbox id, envelope id, size or
//! time beyond the request's own. Per mailbox at most one wake-up goes out per
//! `push.interval_seconds` while the mailbox is not read (a Fetch or a stream
//! resets it). The decision and the request run on a task of their own: a slow
//! or dead endpoint never delays or fails a `Send`. At most
//! `push.max_in_flight` requests are out at once, and at most
//! `push.max_in_flight_per_host` to one endpoint host, so a host that never
//! answers cannot take every slot (review M3) — `push.max_in_flight_per_gateway`
//! to a host under `push.allowed_host_suffixes`, which carries everyone's
//! wake-ups and would otherwise be easy to crowd (review M-E); past either, new wake-ups are
//! dropped and counted (and the mailbox is not marked as woken). Only a
//! mailbox with a registration takes a slot or a place in the coalescing
//! memory (review F21). A 404 or 410 answer removes the
//! registration (the UnifiedPush and gateway convention for "gone").
//!
//! Endpoints are chosen by clients, so the relay's requests must not reach into
//! its own network (review F11). A registration's host must be a DNS name or a
//! canonical IP literal (no `0x7f000001`, `2130706433`, `127.1` or `0177.0.0.1`),
//! its port one of `push.ports` (443) and, when `push.allowed_host_suffixes` is
//! set, its host under one of them. At connect time the relay's own connector
//! ([`CheckedConnector`]) resolves the name, refuses it if *any* address is not
//! a public unicast one ([`is_forbidden`]), and connects to the addresses it
//! checked (no second lookup). Lookups run on the blocking pool, at most
//! `push.max_dns_lookups` at once and each given `push.dns_timeout_seconds`,
//! so slow DNS cannot take the threads sled's writes need (review M3). TLS session resumption is off (no tickets to
//! replay after a rebinding), idle connections are few and short-lived, and
//! open push connections are capped.
//!
//! Those lookup places are shared, and a lookup keeps its place until the
//! resolver returns, so names whose name server never answers could hold all
//! of them and fail every wake-up that needed a new connection (fresh review:
//! "eight slow DNS names"). So: names with the same last two labels hold at
//! most [`MAX_LOOKUPS_PER_PARENT`] places (names under
//! `push.allowed_host_suffixes` are the operator's choice and are not
//! capped this way); wake-ups to one name share one lookup; the checked
//! addresses of a name are reused for [`ADDRESSES_FRESH`], and for up to
//! [`ADDRESSES_STALE`] when no fresh lookup can be made (busy or timed out),
//! in a cache of at most [`ADDRESSES_MAX`] names, [`ADDRESSES_PER_PARENT`]
//! per parent. Only addresses that passed [`is_forbidden`] enter the cache,
//! and they are checked again on every use. A wake-up that failed before it
//! reached its endpoint holds the mailbox's later ones back for
//! [`FAILED_WAKE_UP_HOLD`] only, not `push.interval_seconds`.
//!
//! Nothing of a registration is logged: endpoints and tokens identify devices.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use haven_store::{MailboxId, PushRegistration, Store};
use http_body_util::Full;
use hyper::Uri;
use hyper::body::Bytes;
use hyper_rustls::ConfigBuilderExt as _;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::config::PushConfig;
use crate::relay::RelayError;

/// Longest endpoint URL accepted, bytes.
pub const MAX_ENDPOINT_LEN: usize = 1024;
/// Longest token accepted, bytes (an FCM registration token is ~160 characters).
pub const MAX_TOKEN_LEN: usize = 256;
/// Most mailboxes remembered as woken; past it the oldest is forgotten (and
/// may be woken again before its interval is over).
const RECENT_MAX: usize = 100_000;
/// Most addresses of one name the connector checks and tries.
const MAX_RESOLVED_ADDRESSES: usize = 16;
/// Most lookup places (of `push.max_dns_lookups`) that names with the same
/// last two labels hold at once, unless they are under
/// `push.allowed_host_suffixes`. The last two labels, not the name without its
/// first label: whoever controls a domain's name server controls every name
/// under it at any depth (`a.b.slow.example`), but has to register another
/// domain for another parent. Under a two-label public suffix (`co.uk`)
/// unrelated names share a parent, which can only restrict, never let more
/// through; the relay carries no public suffix list to keep up to date. Two,
/// not one, so that one lookup still stuck after its timeout does not stop
/// the next lookup of an honest name under the same parent.
pub const MAX_LOOKUPS_PER_PARENT: usize = 2;
/// How long a name's checked addresses are reused without a new lookup. The
/// system resolver reports no TTL, so this is fixed and short: about as long
/// as a push gateway's records are commonly cached anyway.
pub const ADDRESSES_FRESH: Duration = Duration::from_secs(60);
/// How long a name's checked addresses are still used when a new lookup
/// cannot be made (every place busy, or it timed out), so that gateways
/// reached within it keep working while slow names hold the places.
pub const ADDRESSES_STALE: Duration = Duration::from_secs(600);
/// Most names whose addresses are cached.
pub const ADDRESSES_MAX: usize = 1024;
/// Most cached names with the same last two labels (outside
/// `push.allowed_host_suffixes`): one domain's random labels replace each
/// other, not the gateways' entries.
pub const ADDRESSES_PER_PARENT: usize = 16;
/// How long a wake-up that failed before it reached its endpoint (lookup
/// busy, timed out or refused; connection or TLS failed) holds the mailbox's
/// next wake-ups back, counted from its start and never longer than
/// `push.interval_seconds`: the next arrival retries, at most once per this.
pub const FAILED_WAKE_UP_HOLD: Duration = Duration::from_secs(5);

type HttpsClient = Client<hyper_rustls::HttpsConnector<CheckedConnector>, Full<Bytes>>;

/// Sends push wake-ups. No `Debug`: it is plumbing around registrations.
pub struct Pusher {
    store: Arc<dyn Store>,
    config: PushConfig,
    /// Where endpoints may point; shared with the connector.
    rules: Arc<EndpointRules>,
    /// `None` when push is off, or no CA certificates could be loaded.
    client: Option<HttpsClient>,
    /// When each mailbox was last woken, while it has not been read since.
    recent: Mutex<Recent>,
    /// Bounds the wake-up requests out at once.
    in_flight: Semaphore,
    /// Wake-up requests out per endpoint host, under a salted hash of the
    /// host (absent at 0); std Mutex, never held across an await.
    hosts: Arc<Mutex<HashMap<[u8; 32], usize>>>,
    /// Per-process salt of those hashes: no host name is kept.
    salt: [u8; 32],
    /// How long a wake-up that never reached its endpoint holds the next
    /// ones back ([`FAILED_WAKE_UP_HOLD`]; a field so tests can shorten it).
    failed_hold: Duration,
}

/// The coalescing memory: mailbox -> when it was woken, and the same in the
/// order of waking, so expired entries leave from the front in O(1) each
/// (review F21: a `retain` over the whole map ran on every wake-up past 10 000).
/// Each entry also says how long it holds later wake-ups back: the interval,
/// or less for one that never reached its endpoint; never more than the
/// interval, so expiring by the interval from the front stays right.
#[derive(Default)]
struct Recent {
    at: HashMap<MailboxId, (Instant, Duration)>,
    order: VecDeque<(Instant, MailboxId)>,
}

impl Recent {
    fn woken_within(&self, id: &MailboxId, interval: Duration) -> bool {
        self.at
            .get(id)
            .is_some_and(|(at, hold)| at.elapsed() < interval.min(*hold))
    }

    /// Marks `id` woken now, for `interval`; returns the mark, for [`Self::shorten`].
    fn insert(&mut self, id: MailboxId, interval: Duration) -> Instant {
        while let Some(&(at, oldest)) = self.order.front() {
            if at.elapsed() < interval && self.order.len() < RECENT_MAX {
                break;
            }
            self.order.pop_front();
            // Only if it was not woken again (or read and woken) since.
            if self.at.get(&oldest).map(|(at, _)| at) == Some(&at) {
                self.at.remove(&oldest);
            }
        }
        let now = Instant::now();
        self.at.insert(id, (now, interval));
        self.order.push_back((now, id));
        now
    }

    /// The wake-up marked at `at` holds later ones back for `hold` only,
    /// unless the mailbox was read (or woken again) since.
    fn shorten(&mut self, id: &MailboxId, at: Instant, hold: Duration) {
        if let Some(entry) = self.at.get_mut(id)
            && entry.0 == at
        {
            entry.1 = entry.1.min(hold);
        }
    }

    fn remove(&mut self, id: &MailboxId) {
        // Its entry in `order` goes when it reaches the front.
        self.at.remove(id);
    }
}

/// One place among those counted under a salted key: a wake-up's among
/// those to its host, or a name lookup's among those under its parent name.
struct HostSlot {
    hosts: Arc<Mutex<HashMap<[u8; 32], usize>>>,
    key: [u8; 32],
}

impl Drop for HostSlot {
    fn drop(&mut self) {
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = hosts.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                hosts.remove(&self.key);
            }
        }
    }
}

/// A per-process salted hash of `kind` and `value`, so that counts and caches
/// keyed by host names keep no name.
fn salted_key(salt: &[u8; 32], kind: &str, value: &str) -> [u8; 32] {
    Sha256::new()
        .chain_update(salt)
        .chain_update(kind.as_bytes())
        .chain_update(b":")
        .chain_update(value.as_bytes())
        .finalize()
        .into()
}

/// Takes one of `limit` places under `key` in `counts`, or `None` when all are taken.
fn take_place(
    counts: &Arc<Mutex<HashMap<[u8; 32], usize>>>,
    key: [u8; 32],
    limit: usize,
) -> Option<HostSlot> {
    let mut held = counts.lock().unwrap_or_else(PoisonError::into_inner);
    let count = held.entry(key).or_default();
    if *count >= limit {
        if *count == 0 {
            held.remove(&key);
        }
        return None;
    }
    *count += 1;
    Some(HostSlot {
        hosts: Arc::clone(counts),
        key,
    })
}

/// How a wake-up request ended, for the metric and the coalescing memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Sent,
    Gone,
    Refused,
    /// Failed after the connection was made.
    Failed,
    /// Failed before reaching the endpoint: lookup busy, timed out or
    /// refused, or the TCP or TLS connection failed. Holds later wake-ups
    /// back for [`FAILED_WAKE_UP_HOLD`] only.
    Unreachable,
    Timeout,
    Off,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Gone => "gone",
            Self::Refused => "refused",
            Self::Failed => "failed",
            Self::Unreachable => "unreachable",
            Self::Timeout => "timeout",
            Self::Off => "off",
        }
    }
}

impl Pusher {
    /// A pusher for `store`'s registrations.
    pub fn new(store: Arc<dyn Store>, config: PushConfig) -> Self {
        let rules = Arc::new(EndpointRules::new(&config));
        let client = if config.enabled {
            match tls_config() {
                Ok(tls) => {
                    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls);
                    let builder = if config.allow_local_endpoints {
                        builder.https_or_http()
                    } else {
                        builder.https_only()
                    };
                    let connector = builder.enable_http1().wrap_connector(CheckedConnector {
                        rules: Arc::clone(&rules),
                        connections: Arc::new(Semaphore::new(config.max_connections)),
                    });
                    Some(
                        Client::builder(TokioExecutor::new())
                            .pool_max_idle_per_host(config.max_idle_per_host)
                            .pool_idle_timeout(Duration::from_secs(config.idle_timeout_seconds))
                            .pool_timer(TokioTimer::new())
                            .timer(TokioTimer::new())
                            .build(connector),
                    )
                }
                Err(error) => {
                    tracing::warn!(%error, "push wake-ups are off: no CA certificates could be loaded");
                    None
                }
            }
        } else {
            None
        };
        Self {
            store,
            in_flight: Semaphore::new(config.max_in_flight),
            config,
            rules,
            client,
            recent: Mutex::new(Recent::default()),
            hosts: Arc::default(),
            salt: rand::random(),
            failed_hold: FAILED_WAKE_UP_HOLD,
        }
    }

    /// A place among the wake-ups out to `endpoint`'s host, or `None` when
    /// `push.max_in_flight_per_host` are out (`push.max_in_flight_per_gateway`
    /// for a host under `push.allowed_host_suffixes`).
    fn host_slot(&self, endpoint: &str) -> Option<HostSlot> {
        let uri = endpoint.parse::<Uri>().unwrap_or_default();
        let host = uri.host().map(str::to_ascii_lowercase).unwrap_or_default();
        // A gateway is counted by the allowed suffix it is under, not by host:
        // names under one suffix (a distributor's per-user subdomains) share
        // one gateway's places (fresh review of M-E).
        let (limit, key) = match self.rules.allowed_suffix(&host) {
            Some(suffix) => (
                self.config.max_in_flight_per_gateway,
                salted_key(&self.salt, "suffix", suffix),
            ),
            None => (
                self.config.max_in_flight_per_host,
                salted_key(&self.salt, "host", &host),
            ),
        };
        take_place(&self.hosts, key, limit)
    }

    /// Checks a registration from a client: an https URL (http only with
    /// `push.allow_local_endpoints`, for tests) whose host is a name or a
    /// canonical public IP literal, on an allowed port and under an allowed
    /// suffix; bounded sizes. What the name resolves to is checked at connect
    /// time, on every connection.
    pub fn validate(&self, endpoint: &str, token: &[u8]) -> Result<(), RelayError> {
        if endpoint.len() > MAX_ENDPOINT_LEN {
            return Err(RelayError::invalid(format!(
                "endpoint is {} bytes; at most {MAX_ENDPOINT_LEN}",
                endpoint.len()
            )));
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(RelayError::invalid(format!(
                "token is {} bytes; at most {MAX_TOKEN_LEN}",
                token.len()
            )));
        }
        let uri: Uri = endpoint
            .parse()
            .map_err(|_| RelayError::invalid("endpoint is not a URL"))?;
        if uri.host().is_none() {
            return Err(RelayError::invalid("endpoint has no host"));
        }
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") if self.config.allow_local_endpoints => {}
            _ => {
                return Err(RelayError::invalid(
                    "endpoint must be an https URL (a UnifiedPush endpoint or a push gateway)",
                ));
            }
        }
        self.rules
            .destination(&uri)
            .map_err(|refusal| RelayError::invalid(refusal.message()))?;
        if !self.config.enabled {
            return Err(RelayError::FailedPrecondition(
                "this relay does not send push wake-ups (push.enabled = false)".into(),
            ));
        }
        Ok(())
    }

    /// An envelope was stored for `id`. Everything after this (is any stream
    /// attached, on any node? was the device woken lately? the request) runs
    /// on a task of its own, so the `Send` that stored it never waits for it.
    pub fn arrived(self: &Arc<Self>, id: &MailboxId) {
        if self.client.is_none() {
            return;
        }
        let this = Arc::clone(self);
        let id = *id;
        tokio::spawn(async move {
            if let Some(result) = this.wake(&id).await {
                metrics::counter!("haven_push_wakeups_total", "result" => result).increment(1);
            }
        });
    }

    /// Wakes the device behind `id` unless a stream watches it, it was woken
    /// within the interval, or too many requests are out; `None` when a stream
    /// watches (nothing to count).
    async fn wake(&self, id: &MailboxId) -> Option<&'static str> {
        // The store knows about streams on every relay node (Redis asks the cluster).
        if self.store.watched(id).await {
            return None;
        }
        let interval = Duration::from_secs(self.config.interval_seconds);
        let woken = |recent: &Mutex<Recent>| {
            recent
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .woken_within(id, interval)
        };
        if woken(&self.recent) {
            return Some("coalesced");
        }
        // Only a registered mailbox takes a slot or a place in `recent`.
        let registration = match self.store.push(id).await {
            Ok(Some(registration)) => registration,
            Ok(None) => return Some("unregistered"),
            Err(error) => {
                tracing::warn!(%error, "push registration could not be read");
                return Some("failed");
            }
        };
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return Some("dropped");
        };
        let Some(_host) = self.host_slot(&registration.endpoint) else {
            return Some("dropped");
        };
        let marked = {
            let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
            // Another arrival's wake-up got here first.
            if recent.woken_within(id, interval) {
                return Some("coalesced");
            }
            recent.insert(*id, interval)
        };
        let outcome = self.deliver(id, registration).await;
        if outcome == Outcome::Unreachable {
            // Nothing reached the device: the next arrival tries again, but
            // not sooner than `failed_hold` after this one started, so a
            // failing endpoint costs at most one attempt per hold.
            self.recent
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .shorten(id, marked, self.failed_hold);
        }
        Some(outcome.label())
    }

    /// The mailbox was read: the next arrival wakes the device again at once.
    pub fn read(&self, id: &MailboxId) {
        self.recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    /// Sends one wake-up; returns the outcome for the metric.
    async fn deliver(&self, id: &MailboxId, registration: PushRegistration) -> Outcome {
        let Some(client) = &self.client else {
            return Outcome::Off;
        };
        if self.config.jitter_ms > 0 {
            let jitter = rand::random_range(0..=self.config.jitter_ms);
            tokio::time::sleep(Duration::from_millis(jitter)).await;
        }
        let body = format!(
            "{{\"token\":\"{}\"}}",
            URL_SAFE_NO_PAD.encode(&registration.token)
        );
        let Ok(request) = hyper::Request::post(registration.endpoint.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            // UnifiedPush / Web Push: a wake-up is worth nothing after a day.
            .header("TTL", "86400")
            .header("Urgency", "high")
            .body(Full::new(Bytes::from(body)))
        else {
            return Outcome::Failed;
        };
        let timeout = Duration::from_secs(self.config.timeout_seconds);
        match tokio::time::timeout(timeout, client.request(request)).await {
            Ok(Ok(response)) if response.status().is_success() => Outcome::Sent,
            Ok(Ok(response)) if matches!(response.status().as_u16(), 404 | 410) => {
                self.forget(id, &registration).await;
                Outcome::Gone
            }
            Ok(Ok(_)) => Outcome::Refused,
            // Neither the endpoint nor the error text is logged: both can name the device's push service.
            Ok(Err(error)) if error.is_connect() => Outcome::Unreachable,
            Ok(Err(_)) => Outcome::Failed,
            Err(_) => Outcome::Timeout,
        }
    }

    /// Removes a registration the endpoint called gone, unless the device has
    /// registered another one meanwhile.
    async fn forget(&self, id: &MailboxId, gone: &PushRegistration) {
        match self.store.push(id).await {
            Ok(Some(current)) if current == *gone => {
                if let Err(error) = self.store.set_push(id, None).await {
                    tracing::warn!(%error, "a gone push registration could not be removed");
                }
            }
            _ => {}
        }
    }
}

/// The TLS client settings for wake-ups: the system's roots, and no session
/// resumption, so that no ticket an endpoint's server issued is presented
/// again to whatever the name resolves to next ("TLS poison", review F11).
fn tls_config() -> std::io::Result<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder()
        .with_native_roots()?
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// Why an endpoint's destination is refused. The messages name the rule,
/// never the host, port or address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The host is neither a DNS name nor a canonical IP literal.
    Spelling,
    /// The host names loopback, a private or otherwise non-public address.
    Local,
    /// The port is not one of `push.ports`.
    Port,
    /// The host is not under one of `push.allowed_host_suffixes`.
    Suffix,
    /// The name did not resolve.
    Unresolved,
    /// Every push connection (or name lookup) the relay allows is open.
    Busy,
    /// The name did not resolve within `push.dns_timeout_seconds`.
    DnsTimeout,
}

impl Refusal {
    /// A sentence for the client (registration) or the metric (connect).
    pub fn message(self) -> &'static str {
        match self {
            Self::Spelling => {
                "endpoint host must be a DNS name or an IP address in standard form (four decimal \
                 parts, or IPv6 in brackets); numeric hosts in other spellings are refused"
            }
            Self::Local => {
                "endpoint points at a local or private address; this relay only sends wake-ups \
                 to public hosts"
            }
            Self::Port => "endpoint port is not one this relay sends wake-ups to (push.ports)",
            Self::Suffix => {
                "endpoint host is not one of the push gateways this relay sends wake-ups to \
                 (push.allowed_host_suffixes)"
            }
            Self::Unresolved => "endpoint host does not resolve",
            Self::Busy => "too many push connections or name lookups are open",
            Self::DnsTimeout => "endpoint host did not resolve in time",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.message())
    }
}

impl std::error::Error for Refusal {}

/// An endpoint's host, parsed once.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Host {
    /// A canonical IP literal.
    Ip(IpAddr),
    /// A DNS name, lowercase.
    Name(String),
}

/// Where wake-ups may go: checked at registration and again on every
/// connection. No `Debug`: it caches endpoints' addresses.
struct EndpointRules {
    /// Tests only: loopback addresses and any port (see `PushConfig::allow_local_endpoints`).
    allow_loopback: bool,
    /// Ports endpoints may use.
    ports: Vec<u16>,
    /// When not empty, hosts must equal or end in `.` + one of these (lowercase).
    host_suffixes: Vec<String>,
    /// Tests only: names resolved from this table instead of DNS.
    resolve: HashMap<String, Vec<IpAddr>>,
    /// Places for lookups on the blocking pool (`push.max_dns_lookups`).
    lookups: Arc<Semaphore>,
    /// How long a lookup is waited for (`push.dns_timeout_seconds`).
    dns_timeout: Duration,
    /// The system resolver (a stand-in in unit tests).
    resolver: Resolver,
    /// Lookup places held per parent name ([`MAX_LOOKUPS_PER_PARENT`]), under
    /// a salted hash of it; std Mutex, never held across an await.
    parents: Arc<Mutex<HashMap<[u8; 32], usize>>>,
    /// Lookups under way, by salted hash of the name: a wake-up to a name
    /// being looked up waits for that lookup instead of starting another. At
    /// most one entry per connection attempt under way (so bounded by
    /// `push.max_in_flight`), removed when its lookup ends or is dropped.
    /// std Mutex, never held across an await.
    pending: Mutex<HashMap<[u8; 32], watch::Receiver<Option<Resolution>>>>,
    /// Checked addresses of names looked up lately; std Mutex, never held
    /// across an await.
    cache: Mutex<AddressCache>,
    /// Per-process salt of the keys above: no name is kept.
    salt: [u8; 32],
}

/// A name's checked addresses, or why there are none.
type Resolution = Result<Vec<IpAddr>, Refusal>;

/// Addresses that passed the checks, per salted name hash, for
/// [`ADDRESSES_STALE`] at most; [`ADDRESSES_MAX`] names, and
/// [`ADDRESSES_PER_PARENT`] per parent outside the allowed suffixes.
#[derive(Default)]
struct AddressCache {
    entries: HashMap<[u8; 32], CachedAddresses>,
}

struct CachedAddresses {
    /// Every one passed [`is_forbidden`] when it was stored.
    addresses: Vec<IpAddr>,
    resolved: Instant,
    /// The salted parent name, when entries under it are capped.
    parent: Option<[u8; 32]>,
}

impl AddressCache {
    /// The addresses of `key` if they were resolved less than `age` ago.
    fn get(&self, key: &[u8; 32], age: Duration) -> Option<Vec<IpAddr>> {
        self.entries
            .get(key)
            .filter(|entry| entry.resolved.elapsed() < age)
            .map(|entry| entry.addresses.clone())
    }

    /// Remembers checked `addresses` for `key`. A parent at its share loses
    /// its own oldest entry; a cache full of live entries stores nothing (the
    /// addresses are still used for this connection).
    fn insert(&mut self, key: [u8; 32], parent: Option<[u8; 32]>, addresses: Vec<IpAddr>) {
        self.entries.remove(&key);
        if self.entries.len() >= ADDRESSES_MAX {
            self.entries
                .retain(|_, entry| entry.resolved.elapsed() < ADDRESSES_STALE);
        }
        if let Some(parent) = parent {
            loop {
                let siblings = self
                    .entries
                    .iter()
                    .filter(|(_, entry)| entry.parent == Some(parent));
                let (count, oldest) = siblings.fold((0, None), |(count, oldest), (key, entry)| {
                    let older = match oldest {
                        Some((_, at)) => entry.resolved < at,
                        None => true,
                    };
                    let oldest = if older {
                        Some((*key, entry.resolved))
                    } else {
                        oldest
                    };
                    (count + 1, oldest)
                });
                match oldest {
                    Some((oldest, _)) if count >= ADDRESSES_PER_PARENT => {
                        self.entries.remove(&oldest);
                    }
                    _ => break,
                }
            }
        }
        if self.entries.len() >= ADDRESSES_MAX {
            return;
        }
        self.entries.insert(
            key,
            CachedAddresses {
                addresses,
                resolved: Instant::now(),
                parent,
            },
        );
    }
}

/// Removes a finished (or abandoned) lookup from [`EndpointRules::pending`].
struct PendingLookup<'a> {
    pending: &'a Mutex<HashMap<[u8; 32], watch::Receiver<Option<Resolution>>>>,
    key: [u8; 32],
}

impl Drop for PendingLookup<'_> {
    fn drop(&mut self) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

/// The name lookups are counted under: the last two labels of `name` (see
/// [`MAX_LOOKUPS_PER_PARENT`]), or `name` itself when it has fewer.
fn parent_name(name: &str) -> &str {
    let mut dots = name.rmatch_indices('.');
    dots.next();
    match dots.next() {
        Some((index, _)) => name.get(index + 1..).unwrap_or(name),
        None => name,
    }
}

/// Resolves a name and port on a blocking thread.
type Resolver = fn(&str, u16) -> std::io::Result<Vec<IpAddr>>;

/// The system resolver (`getaddrinfo`), as `tokio::net::lookup_host` uses it.
fn system_resolver(name: &str, port: u16) -> std::io::Result<Vec<IpAddr>> {
    use std::net::ToSocketAddrs as _;
    Ok((name, port)
        .to_socket_addrs()?
        .map(|address| address.ip())
        .take(MAX_RESOLVED_ADDRESSES)
        .collect())
}

impl EndpointRules {
    fn new(config: &PushConfig) -> Self {
        Self {
            allow_loopback: config.allow_local_endpoints,
            ports: config.ports.clone(),
            host_suffixes: config
                .allowed_host_suffixes
                .iter()
                .map(|suffix| suffix.trim_start_matches('.').to_ascii_lowercase())
                .collect(),
            resolve: config
                .resolve_for_tests
                .iter()
                .map(|(name, addresses)| (name.to_ascii_lowercase(), addresses.clone()))
                .collect(),
            lookups: Arc::new(Semaphore::new(config.max_dns_lookups)),
            dns_timeout: Duration::from_secs(config.dns_timeout_seconds),
            resolver: system_resolver,
            parents: Arc::default(),
            pending: Mutex::default(),
            cache: Mutex::default(),
            salt: rand::random(),
        }
    }

    /// The salted parent of `name` whose lookups and cache entries are
    /// capped, or `None` for a name under an allowed suffix (the operator
    /// chose those name servers).
    fn capped_parent(&self, name: &str) -> Option<[u8; 32]> {
        match self.allowed_suffix(name) {
            Some(_) => None,
            None => Some(salted_key(&self.salt, "parent", parent_name(name))),
        }
    }

    /// Resolves `name` on the blocking pool: refused at once when
    /// `max_dns_lookups` are running, or [`MAX_LOOKUPS_PER_PARENT`] under its
    /// parent name, given up after the DNS timeout. The lookup keeps both
    /// places until the resolver returns, so however slow DNS is, push holds
    /// at most that many blocking threads, and one domain's names at most
    /// [`MAX_LOOKUPS_PER_PARENT`] of them.
    async fn lookup(&self, name: &str, port: u16) -> Result<Vec<IpAddr>, Refusal> {
        let parent_place = match self.capped_parent(name) {
            Some(parent) => Some(
                take_place(&self.parents, parent, MAX_LOOKUPS_PER_PARENT).ok_or(Refusal::Busy)?,
            ),
            None => None,
        };
        let place = Arc::clone(&self.lookups)
            .try_acquire_owned()
            .map_err(|_| Refusal::Busy)?;
        let (resolver, name) = (self.resolver, name.to_owned());
        let lookup = tokio::task::spawn_blocking(move || {
            let _places = (place, parent_place);
            resolver(&name, port)
        });
        match tokio::time::timeout(self.dns_timeout, lookup).await {
            Ok(Ok(Ok(addresses))) => Ok(addresses),
            Ok(_) => Err(Refusal::Unresolved),
            Err(_) => Err(Refusal::DnsTimeout),
        }
    }

    /// The host and port `uri` may be sent to, or why not (before resolution).
    /// The allowed suffix `host` (lower case) is under, if any.
    fn allowed_suffix(&self, host: &str) -> Option<&str> {
        self.host_suffixes
            .iter()
            .find(|suffix| {
                host == suffix.as_str()
                    || host
                        .strip_suffix(suffix.as_str())
                        .is_some_and(|rest| rest.ends_with('.'))
            })
            .map(String::as_str)
    }

    fn destination(&self, uri: &Uri) -> Result<(Host, u16), Refusal> {
        let host = parse_host(uri.host().ok_or(Refusal::Spelling)?)?;
        let port = uri
            .port_u16()
            .unwrap_or(if uri.scheme_str() == Some("http") {
                80
            } else {
                443
            });
        match &host {
            Host::Ip(ip) if is_forbidden(*ip, self.allow_loopback) => return Err(Refusal::Local),
            Host::Name(name)
                if !self.allow_loopback
                    && (name == "localhost" || name.ends_with(".localhost")) =>
            {
                return Err(Refusal::Local);
            }
            _ => {}
        }
        if !self.allow_loopback && !self.ports.contains(&port) {
            return Err(Refusal::Port);
        }
        if !self.host_suffixes.is_empty() {
            let Host::Name(name) = &host else {
                return Err(Refusal::Suffix);
            };
            let under = |suffix: &String| {
                name == suffix
                    || name
                        .strip_suffix(suffix.as_str())
                        .is_some_and(|rest| rest.ends_with('.'))
            };
            if !self.host_suffixes.iter().any(under) {
                return Err(Refusal::Suffix);
            }
        }
        Ok((host, port))
    }

    /// Every address `host` stands for, each checked; refused if any is not public.
    async fn addresses(&self, host: &Host, port: u16) -> Result<Vec<IpAddr>, Refusal> {
        let addresses: Vec<IpAddr> = match host {
            Host::Ip(ip) => vec![*ip],
            Host::Name(name) => match self.resolve.get(name) {
                Some(addresses) => addresses.clone(),
                None => self.name_addresses(name, port).await?,
            },
        };
        self.check(addresses)
    }

    /// The checked addresses of `name`: cached if resolved within
    /// [`ADDRESSES_FRESH`]; else the lookup of it already under way, if any;
    /// else a new lookup, whose checked result is cached. When that lookup
    /// cannot be made or times out, addresses checked within
    /// [`ADDRESSES_STALE`] are used. Cached addresses are checked again
    /// before use: only ever what passed [`Self::check`] is connected to.
    async fn name_addresses(&self, name: &str, port: u16) -> Resolution {
        let key = salted_key(&self.salt, "name", name);
        let sender = {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            // Looked at under `pending`'s lock: a lookup that ends caches its
            // addresses before it leaves `pending`.
            let fresh = self
                .cache
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&key, ADDRESSES_FRESH);
            if let Some(addresses) = fresh {
                return self.check(addresses);
            }
            match pending.get(&key) {
                Some(receiver) => Err(receiver.clone()),
                None => {
                    let (sender, receiver) = watch::channel(None);
                    pending.insert(key, receiver);
                    Ok(sender)
                }
            }
        };
        let sender = match sender {
            Ok(sender) => sender,
            Err(mut receiver) => {
                let waited =
                    tokio::time::timeout(self.dns_timeout, receiver.wait_for(Option::is_some))
                        .await;
                return match waited {
                    Ok(Ok(resolution)) => resolution.clone().unwrap_or(Err(Refusal::Unresolved)),
                    // The lookup was abandoned (its wake-up went away).
                    Ok(Err(_)) => Err(Refusal::Unresolved),
                    Err(_) => Err(Refusal::DnsTimeout),
                };
            }
        };
        let _pending = PendingLookup {
            pending: &self.pending,
            key,
        };
        let resolution = match self.lookup(name, port).await {
            Ok(addresses) => self.check(addresses).inspect(|checked| {
                self.cache
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(key, self.capped_parent(name), checked.clone());
            }),
            Err(refusal @ (Refusal::Busy | Refusal::DnsTimeout)) => {
                let stale = self
                    .cache
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&key, ADDRESSES_STALE);
                match stale {
                    Some(addresses) => self.check(addresses),
                    None => Err(refusal),
                }
            }
            Err(refusal) => Err(refusal),
        };
        sender.send_replace(Some(resolution.clone()));
        resolution
    }

    /// `addresses` if there are some and every one is public; else why not.
    fn check(&self, addresses: Vec<IpAddr>) -> Resolution {
        if addresses.is_empty() {
            return Err(Refusal::Unresolved);
        }
        // One internal address among public ones refuses the name: a client
        // chose it, and which address gets tried first is not ours to trust.
        if addresses
            .iter()
            .any(|ip| is_forbidden(*ip, self.allow_loopback))
        {
            return Err(Refusal::Local);
        }
        Ok(addresses)
    }
}

/// Parses an endpoint's host. IP literals must be canonical (`Ipv4Addr`'s
/// four decimal parts without leading zeros, or IPv6 in brackets without a
/// zone); anything else must be a DNS name of letters, digits and hyphens whose
/// last label is not a number, since resolvers read `0x7f000001`, `2130706433`,
/// `127.1` and `0177.0.0.1` as 127.0.0.1 (WHATWG URL calls these "ends in a number").
fn parse_host(host: &str) -> Result<Host, Refusal> {
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or(Refusal::Spelling)?;
        return inner
            .parse::<Ipv6Addr>()
            .map(|ip| Host::Ip(IpAddr::V6(ip)))
            .map_err(|_| Refusal::Spelling);
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(Host::Ip(IpAddr::V4(ip)));
    }
    let name = host.to_ascii_lowercase();
    if name.is_empty() || name.len() > 253 {
        return Err(Refusal::Spelling);
    }
    for label in name.split('.') {
        let ldh = label
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-');
        if label.is_empty()
            || label.len() > 63
            || !ldh
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err(Refusal::Spelling);
        }
    }
    let last = name.rsplit('.').next().unwrap_or_default();
    let decimal = last.bytes().all(|byte| byte.is_ascii_digit());
    let hex = last
        .strip_prefix("0x")
        .is_some_and(|digits| digits.bytes().all(|byte| byte.is_ascii_hexdigit()));
    if decimal || hex {
        return Err(Refusal::Spelling);
    }
    Ok(Host::Name(name))
}

/// Whether the relay must not connect to `ip`: anything but public unicast.
/// `allow_loopback` (tests only) lets 127.0.0.0/8 and `::1` through, nothing else.
pub fn is_forbidden(ip: IpAddr, allow_loopback: bool) -> bool {
    match ip {
        IpAddr::V4(ip) => {
            if ip.is_loopback() {
                return !allow_loopback;
            }
            let [a, b, c, _] = ip.octets();
            a == 0 // 0.0.0.0/8: "this network"
                || ip.is_private() // 10/8, 172.16/12, 192.168/16
                || ip.is_link_local() // 169.254/16
                || (a == 100 && (b & 0xc0) == 64) // 100.64/10: CGNAT
                || (a == 192 && b == 0 && c == 0) // 192.0.0.0/24: IETF protocol assignments
                || (a == 192 && b == 0 && c == 2) // documentation
                || (a == 198 && (b & 0xfe) == 18) // 198.18/15: benchmarking
                || (a == 198 && b == 51 && c == 100) // documentation
                || (a == 203 && b == 0 && c == 113) // documentation
                || a >= 224 // 224/4 multicast, 240/4 reserved, broadcast
        }
        IpAddr::V6(ip) => {
            if ip.is_loopback() {
                return !allow_loopback;
            }
            let segments = ip.segments();
            ip.is_unspecified()
                // ::/96 (IPv4-compatible) and ::ffff:0:0/96 (IPv4-mapped): an IPv4
                // address in disguise, never a push gateway's.
                || segments[..5] == [0; 5] && (segments[5] == 0 || segments[5] == 0xffff)
                || segments[..3] == [0x64, 0xff9b, 0] // 64:ff9b::/96 NAT64 (and the rest of /48 local-use)
                || segments[..2] == [0x64, 0xff9b] // 64:ff9b::/32 covers 64:ff9b:1::/48
                || segments[0] == 0x2002 // 6to4
                || segments[..2] == [0x2001, 0] // Teredo 2001::/32: embeds IPv4
                || segments[..2] == [0x2001, 0xdb8] // documentation
                || segments[..4] == [0x100, 0, 0, 0] // 100::/64 discard
                || (segments[0] & 0xfe00) == 0xfc00 // fc00::/7 unique local
                || (segments[0] & 0xffc0) == 0xfe80 // fe80::/10 link-local
                || (segments[0] & 0xffc0) == 0xfec0 // fec0::/10 site-local (deprecated)
                || (segments[0] & 0xff00) == 0xff00 // ff00::/8 multicast
        }
    }
}

/// The TCP connector under TLS for wake-ups: resolves an endpoint's name
/// itself, checks every address ([`EndpointRules::addresses`]) and connects
/// only to those, so what was checked is what is used. Each connection holds
/// a permit of `push.max_connections` for its life, idle in the pool or not.
#[derive(Clone)]
pub struct CheckedConnector {
    rules: Arc<EndpointRules>,
    connections: Arc<Semaphore>,
}

impl tower_service::Service<Uri> for CheckedConnector {
    type Response = CheckedStream;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<CheckedStream, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let rules = Arc::clone(&self.rules);
        let connections = Arc::clone(&self.connections);
        Box::pin(async move {
            let (host, port) = rules.destination(&uri).map_err(std::io::Error::other)?;
            let addresses = rules
                .addresses(&host, port)
                .await
                .map_err(std::io::Error::other)?;
            let permit = connections
                .try_acquire_owned()
                .map_err(|_| std::io::Error::other(Refusal::Busy))?;
            let mut last_error = std::io::Error::other(Refusal::Unresolved);
            for ip in addresses {
                match TcpStream::connect(SocketAddr::new(ip, port)).await {
                    Ok(stream) => {
                        let _ = stream.set_nodelay(true);
                        return Ok(CheckedStream {
                            io: TokioIo::new(stream),
                            _permit: permit,
                        });
                    }
                    Err(error) => last_error = error,
                }
            }
            Err(last_error)
        })
    }
}

/// A push connection and its permit.
pub struct CheckedStream {
    io: TokioIo<TcpStream>,
    /// Released when the connection closes.
    _permit: OwnedSemaphorePermit,
}

impl Connection for CheckedStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for CheckedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(context, buffer)
    }
}

impl hyper::rt::Write for CheckedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(context, buffer)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(context)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(context)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(context, buffers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Review F21: the coalescing memory was pruned by a `retain` over all of
    /// it on every wake-up past 10 000 entries, and not bounded otherwise.
    #[test]
    fn the_coalescing_memory_is_bounded_and_forgets_from_the_front() {
        let mut recent = Recent::default();
        let hour = Duration::from_secs(3600);
        let id = |n: u32| {
            let mut bytes = [0u8; 16];
            bytes[..4].copy_from_slice(&n.to_be_bytes());
            MailboxId::from_bytes(bytes)
        };
        for n in 0..(RECENT_MAX as u32 + 10) {
            recent.insert(id(n), hour);
        }
        assert_eq!(recent.at.len(), RECENT_MAX);
        assert!(recent.order.len() <= RECENT_MAX + 1);
        assert!(!recent.woken_within(&id(0), hour), "the oldest went first");
        assert!(recent.woken_within(&id(RECENT_MAX as u32 + 9), hour));
        // Past the interval, everything before leaves at the next insert.
        recent.insert(id(u32::MAX), Duration::ZERO);
        assert_eq!(recent.at.len(), 1);
        // A read mailbox is forgotten at once, its queue entry later.
        recent.remove(&id(u32::MAX));
        assert!(!recent.woken_within(&id(u32::MAX), hour));
    }

    /// Lookups of the slow resolver running now, and the most at once.
    static RUNNING: AtomicUsize = AtomicUsize::new(0);
    static MOST: AtomicUsize = AtomicUsize::new(0);

    /// A resolver as slow as a name server that never answers (the system
    /// resolver gives up after some 5 s per attempt).
    fn slow_resolver(_: &str, _: u16) -> std::io::Result<Vec<IpAddr>> {
        let running = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
        MOST.fetch_max(running, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(1500));
        RUNNING.fetch_sub(1, Ordering::SeqCst);
        Ok(vec![IpAddr::V4(Ipv4Addr::new(93, 184, 215, 14))])
    }

    /// Review M3: lookups ran on tokio's blocking pool without a bound or a
    /// timeout, so slow DNS for client-chosen names could take every blocking
    /// thread (sled's writes among them) and hold each wake-up for as long as
    /// the resolver took.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_name_lookups_hold_few_blocking_threads_and_time_out() {
        let config = PushConfig {
            max_dns_lookups: 2,
            dns_timeout_seconds: 1,
            ..PushConfig::default()
        };
        let mut rules = EndpointRules::new(&config);
        rules.resolver = slow_resolver;
        let rules = Arc::new(rules);
        let started = Instant::now();
        let lookups: Vec<_> = (0..20)
            .map(|n| {
                let rules = Arc::clone(&rules);
                tokio::spawn(async move {
                    let name = Host::Name(format!("slow{n}.example.org"));
                    rules.addresses(&name, 443).await
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for lookup in lookups {
            outcomes.push(lookup.await.expect("the lookup task ends"));
        }
        assert!(
            started.elapsed() < Duration::from_millis(1400),
            "every wake-up gave up within the DNS timeout: {:?}",
            started.elapsed()
        );
        assert!(outcomes.iter().all(Result::is_err));
        assert_eq!(
            outcomes
                .iter()
                .filter(|outcome| **outcome == Err(Refusal::DnsTimeout))
                .count(),
            2
        );
        // The stuck lookups finish by themselves; never more than two ran at once.
        let deadline = Instant::now() + Duration::from_secs(5);
        while RUNNING.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(RUNNING.load(Ordering::SeqCst), 0);
        assert_eq!(MOST.load(Ordering::SeqCst), 2);
    }

    /// Lookups of names under `slow.example` running now.
    static SLOW_RUNNING: AtomicUsize = AtomicUsize::new(0);
    /// Lookups of `cached.test`, `internal.test` and `shared.test` made.
    static CACHED_LOOKUPS: AtomicUsize = AtomicUsize::new(0);
    static INTERNAL_LOOKUPS: AtomicUsize = AtomicUsize::new(0);
    static SHARED_LOOKUPS: AtomicUsize = AtomicUsize::new(0);

    /// A name server that never answers for `slow.example`, and answers at
    /// once for the names the tests below connect to.
    fn stand_in_resolver(name: &str, _: u16) -> std::io::Result<Vec<IpAddr>> {
        let loopback = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
        if name.ends_with(".slow.example") {
            SLOW_RUNNING.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(2500));
            SLOW_RUNNING.fetch_sub(1, Ordering::SeqCst);
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        match name {
            "gateway.test" => Ok(loopback),
            "cached.test" => {
                CACHED_LOOKUPS.fetch_add(1, Ordering::SeqCst);
                Ok(loopback)
            }
            "internal.test" => {
                INTERNAL_LOOKUPS.fetch_add(1, Ordering::SeqCst);
                Ok(vec![IpAddr::V4(Ipv4Addr::LOCALHOST), ip("10.0.0.1")])
            }
            "shared.test" => {
                SHARED_LOOKUPS.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(300));
                Ok(loopback)
            }
            _ => Err(std::io::ErrorKind::NotFound.into()),
        }
    }

    /// Rules and a connector that use [`stand_in_resolver`], loopback allowed.
    fn stand_in_connector(max_dns_lookups: usize) -> (Arc<EndpointRules>, CheckedConnector) {
        let config = PushConfig {
            allow_local_endpoints: true,
            max_dns_lookups,
            dns_timeout_seconds: 1,
            ..PushConfig::default()
        };
        let mut rules = EndpointRules::new(&config);
        rules.resolver = stand_in_resolver;
        let rules = Arc::new(rules);
        let connector = CheckedConnector {
            rules: Arc::clone(&rules),
            connections: Arc::new(Semaphore::new(64)),
        };
        (rules, connector)
    }

    /// A loopback listener that accepts connections (and drops them).
    async fn loopback_listener() -> (u16, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                drop(socket);
            }
        });
        (port, task)
    }

    async fn connect(connector: &CheckedConnector, name: &str, port: u16) -> std::io::Result<()> {
        let uri: Uri = format!("http://{name}:{port}/").parse().unwrap_or_default();
        let mut connector = connector.clone();
        let call = tower_service::Service::call(&mut connector, uri);
        match tokio::time::timeout(Duration::from_secs(5), call).await {
            Ok(result) => result.map(drop),
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }

    /// Fresh review ("eight slow DNS names"): lookups of random names under
    /// one domain whose name server never answers held every lookup place
    /// until the resolver gave up, so every wake-up that needed a new
    /// connection (to FCM, APNs, ntfy) failed at once as busy.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_names_under_one_domain_leave_lookup_places_for_a_gateway() {
        let (port, listener) = loopback_listener().await;
        let (rules, connector) = stand_in_connector(8);
        let slow: Vec<_> = (0..10)
            .map(|n| {
                let rules = Arc::clone(&rules);
                tokio::spawn(async move {
                    let name = Host::Name(format!("r{n}.slow.example"));
                    rules.addresses(&name, 443).await
                })
            })
            .collect();
        // Wait (bounded) until the slow domain holds every place it may.
        for _ in 0..200 {
            if SLOW_RUNNING.load(Ordering::SeqCst) >= MAX_LOOKUPS_PER_PARENT {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // While those lookups hang, the gateway's name resolves and connects.
        let gateway = connect(&connector, "gateway.test", port).await;
        let running = SLOW_RUNNING.load(Ordering::SeqCst);
        assert!(gateway.is_ok(), "the gateway was not connected to");
        assert_eq!(
            running, MAX_LOOKUPS_PER_PARENT,
            "the slow lookups still ran"
        );
        let mut outcomes = Vec::new();
        for lookup in slow {
            outcomes.push(lookup.await.expect("the lookup task ends"));
        }
        let busy = outcomes
            .iter()
            .filter(|outcome| **outcome == Err(Refusal::Busy))
            .count();
        assert_eq!(busy, 10 - MAX_LOOKUPS_PER_PARENT, "{outcomes:?}");
        // The stuck lookups end by themselves (bounded wait).
        for _ in 0..500 {
            if SLOW_RUNNING.load(Ordering::SeqCst) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(SLOW_RUNNING.load(Ordering::SeqCst), 0);
        listener.abort();
    }

    /// Fresh review ("eight slow DNS names"): every new connection to a
    /// gateway needed a lookup, so while slow names held the places, even a
    /// gateway reached a moment ago could not be reached again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_gateway_reached_lately_needs_no_new_lookup() {
        let (port, listener) = loopback_listener().await;
        let (rules, connector) = stand_in_connector(2);
        for _ in 0..3 {
            assert!(connect(&connector, "cached.test", port).await.is_ok());
        }
        assert_eq!(CACHED_LOOKUPS.load(Ordering::SeqCst), 1, "looked up once");
        // Past the fresh time with every place taken: the checked addresses
        // are used again, for a while.
        {
            let mut cache = rules.cache.lock().unwrap_or_else(PoisonError::into_inner);
            for entry in cache.entries.values_mut() {
                entry.resolved = Instant::now()
                    .checked_sub(ADDRESSES_FRESH + Duration::from_secs(1))
                    .unwrap_or(entry.resolved);
            }
        }
        let places = Arc::clone(&rules.lookups)
            .try_acquire_many_owned(2)
            .expect("the test takes every place");
        assert!(connect(&connector, "cached.test", port).await.is_ok());
        assert_eq!(CACHED_LOOKUPS.load(Ordering::SeqCst), 1, "stale, no lookup");
        // A name never reached fails at once while the places are taken.
        let other = connect(&connector, "gateway.test", port).await;
        assert!(other.is_err());
        drop(places);
        // With places free again, a stale entry is looked up afresh.
        assert!(connect(&connector, "cached.test", port).await.is_ok());
        assert_eq!(CACHED_LOOKUPS.load(Ordering::SeqCst), 2, "looked up again");

        // An answer with any forbidden address is never cached: each
        // connection looks it up and refuses it again.
        for _ in 0..3 {
            let refused = rules
                .addresses(&Host::Name("internal.test".into()), port)
                .await;
            assert_eq!(refused, Err(Refusal::Local));
        }
        assert_eq!(INTERNAL_LOOKUPS.load(Ordering::SeqCst), 3);

        // Wake-ups to one name at once share one lookup, even past the
        // per-parent share of places.
        let shared: Vec<_> = (0..6)
            .map(|_| {
                let connector = connector.clone();
                tokio::spawn(async move { connect(&connector, "shared.test", port).await })
            })
            .collect();
        for connection in shared {
            let connected = connection.await.expect("the connect task ends");
            assert!(connected.is_ok(), "{connected:?}");
        }
        assert_eq!(SHARED_LOOKUPS.load(Ordering::SeqCst), 1);
        listener.abort();
    }

    /// The cache keeps to its bounds: one parent's names replace each other.
    #[test]
    fn the_address_cache_is_bounded_per_parent_and_in_all() {
        let mut cache = AddressCache::default();
        let address = vec![IpAddr::V4(Ipv4Addr::new(93, 184, 215, 14))];
        let key = |kind: &str, n: usize| salted_key(&[7; 32], kind, &n.to_string());
        let parent = Some(key("parent", 0));
        for n in 0..(ADDRESSES_PER_PARENT * 3) {
            cache.insert(key("name", n), parent, address.clone());
        }
        assert_eq!(cache.entries.len(), ADDRESSES_PER_PARENT);
        assert!(cache.get(&key("name", 0), ADDRESSES_FRESH).is_none());
        assert!(
            cache
                .get(&key("name", ADDRESSES_PER_PARENT * 3 - 1), ADDRESSES_FRESH)
                .is_some()
        );
        for n in 0..(ADDRESSES_MAX * 2) {
            cache.insert(key("other", n), None, address.clone());
        }
        assert_eq!(cache.entries.len(), ADDRESSES_MAX);
    }

    /// A minimal push gateway on loopback: answers every request 200.
    async fn answering_gateway() -> (u16, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let counted = Arc::clone(&counted);
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buffer = [0u8; 1024];
                    // The body is `{"token":"…"}`: read until it ends.
                    while !request.ends_with(b"}") && request.len() < 8192 {
                        match socket.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(read) => request.extend_from_slice(&buffer[..read]),
                        }
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    let _ = socket.write_all(answer).await;
                });
            }
        });
        (port, requests, task)
    }

    /// Fresh review ("eight slow DNS names"): a mailbox was marked woken
    /// before its wake-up went out, so one that failed before reaching its
    /// endpoint (lookup busy or timed out) held back every later arrival's
    /// wake-up for `push.interval_seconds`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wake_up_that_never_reached_its_endpoint_does_not_hold_back_the_next() {
        let (port, requests, gateway) = answering_gateway().await;
        let store: Arc<dyn Store> = Arc::new(haven_store::MemoryStore::new(
            haven_store::StoreConfig::default(),
        ));
        let id = MailboxId::from_bytes([3; 16]);
        store
            .create_mailbox(haven_store::MailboxRecord::new(
                id,
                haven_store::SenderId::from_bytes([4; 16]),
                haven_store::PublicKey::from_bytes([5; 32]),
                haven_store::MailboxKind::Private,
            ))
            .await
            .expect("the mailbox is created");
        let loopback = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
        let config = PushConfig {
            allow_local_endpoints: true,
            interval_seconds: 60,
            timeout_seconds: 5,
            resolve_for_tests: vec![
                ("gateway.test".into(), loopback),
                ("internal.test".into(), vec![ip("10.0.0.1")]),
            ],
            ..PushConfig::default()
        };
        let mut pusher = Pusher::new(Arc::clone(&store), config);
        let hold = Duration::from_millis(300);
        pusher.failed_hold = hold;
        assert!(pusher.client.is_some(), "push is on");
        let register = |host: &str| {
            let store = Arc::clone(&store);
            let endpoint = format!("http://{host}:{port}/push");
            async move {
                let registration = PushRegistration {
                    endpoint,
                    token: b"t".to_vec(),
                };
                store
                    .set_push(&id, Some(registration))
                    .await
                    .expect("registered");
            }
        };
        // Refused at connect time: nothing reached any endpoint.
        register("internal.test").await;
        let failed_at = Instant::now();
        assert_eq!(pusher.wake(&id).await, Some("unreachable"));
        // The device moved to a reachable endpoint; within the hold, the next
        // arrival still waits (one attempt per hold, however many arrive) ...
        register("gateway.test").await;
        if failed_at.elapsed() < hold {
            assert_eq!(pusher.wake(&id).await, Some("coalesced"));
        }
        // ... and after it (well before the interval), it is woken.
        tokio::time::sleep(hold.saturating_sub(failed_at.elapsed())).await;
        assert_eq!(pusher.wake(&id).await, Some("sent"));
        assert_eq!(requests.load(Ordering::SeqCst), 1);
        // A wake-up that went out holds the next for the whole interval.
        tokio::time::sleep(hold).await;
        assert_eq!(pusher.wake(&id).await, Some("coalesced"));
        gateway.abort();
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }

    #[test]
    fn non_public_addresses_are_forbidden() {
        for address in [
            "127.0.0.1",
            "127.9.9.9",
            "10.1.2.3",
            "192.168.0.1",
            "172.16.5.4",
            "169.254.1.1",
            "100.64.0.1",
            "100.127.255.254",
            "0.0.0.0",
            "0.1.2.3",
            "192.0.0.8",
            "198.18.0.1",
            "198.19.255.1",
            "224.0.0.1",
            "239.1.1.1",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::127.0.0.1",
            "::8.8.8.8",
            "::ffff:127.0.0.1",
            "::ffff:8.8.8.8",
            "64:ff9b::7f00:1",
            "64:ff9b:1::1",
            "2002:7f00:1::",
            "2001:0:4136:e378::1",
            "fc00::1",
            "fd00::1",
            "fe80::1",
            "ff02::1",
        ] {
            assert!(is_forbidden(ip(address), false), "{address}");
        }
        for address in ["8.8.8.8", "1.1.1.1", "2001:4860::8888", "2a00:1450::1"] {
            assert!(!is_forbidden(ip(address), false), "{address}");
        }
        // The test allowance lets loopback through, and nothing else.
        assert!(!is_forbidden(ip("127.0.0.1"), true));
        assert!(!is_forbidden(ip("::1"), true));
        for address in ["::ffff:127.0.0.1", "10.0.0.1", "0.0.0.0", "fd00::1"] {
            assert!(is_forbidden(ip(address), true), "{address}");
        }
    }

    #[test]
    fn numeric_hosts_in_odd_spellings_are_refused() {
        for host in [
            "0x7f000001",
            "2130706433",
            "127.1",
            "0177.0.0.1",
            "127.0.0.01",
            "0x7f.0.0.1",
            "a.0x7f",
            "1.2.3.4.5",
            "[::1%25eth0]",
            "push..example.org",
            "-push.example.org",
            "push_gw.example.org",
            "push.example.org.",
        ] {
            assert_eq!(parse_host(host), Err(Refusal::Spelling), "{host}");
        }
        assert_eq!(
            parse_host("Push.Example.org"),
            Ok(Host::Name("push.example.org".into()))
        );
        assert_eq!(parse_host("8.8.8.8"), Ok(Host::Ip(ip("8.8.8.8"))));
        assert_eq!(parse_host("[2001:db8::1]"), Ok(Host::Ip(ip("2001:db8::1"))));
        assert_eq!(
            parse_host("0x7f.example"),
            Ok(Host::Name("0x7f.example".into()))
        );
    }

    #[test]
    fn ports_and_suffixes_are_enforced() {
        let config = PushConfig {
            allowed_host_suffixes: vec!["push.example.org".into(), ".up.example".into()],
            ..PushConfig::default()
        };
        let rules = EndpointRules::new(&config);
        let check = |url: &str| rules.destination(&url.parse::<Uri>().unwrap_or_default());
        assert!(check("https://push.example.org/x").is_ok());
        assert!(check("https://eu.push.example.org:443/x").is_ok());
        assert!(check("https://ntfy.up.example/x").is_ok());
        assert_eq!(check("https://push.example.org:8443/x"), Err(Refusal::Port));
        assert_eq!(
            check("https://evilpush.example.org/x"),
            Err(Refusal::Suffix)
        );
        assert_eq!(check("https://8.8.8.8/x"), Err(Refusal::Suffix));
        assert_eq!(check("https://localhost/x"), Err(Refusal::Local));
    }
}
