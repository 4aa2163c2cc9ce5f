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
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
}

/// The coalescing memory: mailbox -> when it was woken, and the same in the
/// order of waking, so expired entries leave from the front in O(1) each
/// (review F21: a `retain` over the whole map ran on every wake-up past 10 000).
#[derive(Default)]
struct Recent {
    at: HashMap<MailboxId, Instant>,
    order: VecDeque<(Instant, MailboxId)>,
}

impl Recent {
    fn woken_within(&self, id: &MailboxId, interval: Duration) -> bool {
        self.at.get(id).is_some_and(|at| at.elapsed() < interval)
    }

    fn insert(&mut self, id: MailboxId, interval: Duration) {
        while let Some(&(at, oldest)) = self.order.front() {
            if at.elapsed() < interval && self.order.len() < RECENT_MAX {
                break;
            }
            self.order.pop_front();
            // Only if it was not woken again (or read and woken) since.
            if self.at.get(&oldest) == Some(&at) {
                self.at.remove(&oldest);
            }
        }
        let now = Instant::now();
        self.at.insert(id, now);
        self.order.push_back((now, id));
    }

    fn remove(&mut self, id: &MailboxId) {
        // Its entry in `order` goes when it reaches the front.
        self.at.remove(id);
    }
}

/// One wake-up's place among those to its host.
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
        let (limit, counted) = match self.rules.allowed_suffix(&host) {
            Some(suffix) => (
                self.config.max_in_flight_per_gateway,
                format!("suffix:{suffix}"),
            ),
            None => (self.config.max_in_flight_per_host, format!("host:{host}")),
        };
        let key: [u8; 32] = Sha256::new()
            .chain_update(self.salt)
            .chain_update(counted.as_bytes())
            .finalize()
            .into();
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        let count = hosts.entry(key).or_default();
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(HostSlot {
            hosts: Arc::clone(&self.hosts),
            key,
        })
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
        {
            let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
            // Another arrival's wake-up got here first.
            if recent.woken_within(id, interval) {
                return Some("coalesced");
            }
            recent.insert(*id, interval);
        }
        Some(self.deliver(id, registration).await)
    }

    /// The mailbox was read: the next arrival wakes the device again at once.
    pub fn read(&self, id: &MailboxId) {
        self.recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    /// Sends one wake-up; returns the outcome for the metric.
    async fn deliver(&self, id: &MailboxId, registration: PushRegistration) -> &'static str {
        let Some(client) = &self.client else {
            return "off";
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
            return "failed";
        };
        let timeout = Duration::from_secs(self.config.timeout_seconds);
        match tokio::time::timeout(timeout, client.request(request)).await {
            Ok(Ok(response)) if response.status().is_success() => "sent",
            Ok(Ok(response)) if matches!(response.status().as_u16(), 404 | 410) => {
                self.forget(id, &registration).await;
                "gone"
            }
            Ok(Ok(_)) => "refused",
            // Neither the endpoint nor the error text is logged: both can name the device's push service.
            Ok(Err(_)) => "failed",
            Err(_) => "timeout",
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

/// Where wake-ups may go: checked at registration and again on every connection.
#[derive(Debug)]
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
        }
    }

    /// Resolves `name` on the blocking pool: refused at once when
    /// `max_dns_lookups` are running, given up after the DNS timeout. The
    /// lookup keeps its place until the resolver returns, so however slow
    /// DNS is, push holds at most that many blocking threads.
    async fn lookup(&self, name: &str, port: u16) -> Result<Vec<IpAddr>, Refusal> {
        let place = Arc::clone(&self.lookups)
            .try_acquire_owned()
            .map_err(|_| Refusal::Busy)?;
        let (resolver, name) = (self.resolver, name.to_owned());
        let lookup = tokio::task::spawn_blocking(move || {
            let _place = place;
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
                None => self.lookup(name, port).await?,
            },
        };
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
