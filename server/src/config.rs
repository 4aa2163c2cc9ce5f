//! The relay's configuration: defaults, a TOML file, `HAVEN_*` environment
//! variables and flags, in that order of precedence, validated once at start.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// Seconds in a day.
const DAY: u64 = 24 * 60 * 60;
/// The longest TTL any relay may be configured to allow: two weeks.
pub const HARD_MAX_TTL_SECONDS: u64 = 14 * DAY;
/// The most a Fetch may be configured to carry: clients must buffer a whole response.
const MAX_FETCH_BYTES: u64 = 16 * 1024 * 1024;
/// The most a client is ever asked to decode in one message
/// (`max_fetch_bytes + response_overhead_bytes`): the SDK's hard cap
/// (`client-sdk/src/sync.rs`, `MAX_DECODE_LIMIT`), which it never raises
/// whatever a relay publishes.
pub const MAX_CLIENT_DECODE_BYTES: u64 = 16 * 1024 * 1024;
/// The most framing a relay may tell clients to allow for.
const MAX_RESPONSE_OVERHEAD_BYTES: u64 = 1024 * 1024;
/// The most protobuf framing one envelope adds to a response: the repeated
/// field's tag and length (6), the 16-byte envelope id with tag and length (18),
/// the ciphertext's tag and length (6), the expiry's tag and varint (11): 41
/// bytes, rounded up. `grpc::tests` checks it against prost.
pub const ENVELOPE_FRAMING_BYTES: u64 = 64;
/// Framing of a response around its envelopes (`more`, a oneof tag and length).
pub const RESPONSE_FRAMING_BYTES: u64 = 64;
/// The smallest replay memory a relay may run with (review M2).
const MIN_REPLAY_ENTRIES: usize = 1024;
/// The smallest memory for keys the relay does not know yet.
const MIN_REPLAY_NEW_KEY_ENTRIES: usize = 256;
/// The lowest proof-of-work difficulty a relay may ask (review F24): 2^8
/// hashes, the tests' setting; production runs 18.
const MIN_POW_DIFFICULTY: u32 = 8;
/// The largest request a relay may be configured to decode (review F24).
const MAX_DECODE_BYTES: u64 = 64 * 1024 * 1024;

/// Everything the relay needs to start. Every field has a safe default, so an
/// empty file (or no file) runs a loopback relay on sled in `./haven-data`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Prometheus `/metrics` listen address; `None` (`"off"` in a file) turns the
    /// endpoint off.
    #[serde(deserialize_with = "address_or_off")]
    pub metrics_listen: Option<SocketAddr>,
    /// Which store backend to use.
    pub store: StoreKind,
    /// Data directory of the sled store.
    pub data_dir: PathBuf,
    /// TLS certificate and key; without them the relay speaks plaintext gRPC.
    pub tls: Option<TlsConfig>,
    /// Permits plaintext on a non-loopback address (for a TLS-terminating proxy).
    pub allow_plaintext: bool,
    /// Whether clients reach the relay through a proxy, so that every
    /// connection comes from the proxy's address and the per-address caps
    /// (connections, streams, claims, response share) would put every user
    /// under one: they are then off unless set. Unset: whenever the relay
    /// speaks plaintext (a TLS-terminating proxy in front, on this host or
    /// another; or a test on loopback). Before, only plaintext on a
    /// non-loopback address counted, so the documented nginx-on-the-same-host
    /// set-up, forwarding to 127.0.0.1, capped all users together: one client
    /// took the whole network's 10 claims a minute or 500 streams (fresh edge
    /// review H1). Set `false` when clients connect directly in plaintext.
    pub behind_proxy: Option<bool>,
    /// The association's Ed25519 public key, 64 hex digits. Directory documents
    /// are checked against it on publish; without it the directory refuses them.
    pub association_key: Option<String>,
    /// Logging.
    pub log: LogConfig,
    /// Limits enforced on clients.
    pub limits: Limits,
    /// Leading zero bits a proof-of-work stamp needs for an intake mailbox
    /// (and for `Create`, when `create_pow_required`).
    pub intake_pow_difficulty: u32,
    /// Whether `Create` must carry a stamp (its signed nonce, see
    /// `haven_proto::pow::create_stamp_ok`) at `intake_pow_difficulty`.
    /// `haven_create_stamps_total` shows how many clients send one. On by
    /// default (review H2).
    pub create_pow_required: bool,
    /// How far in the past a signed request's timestamp may be from the relay
    /// clock, seconds.
    pub auth_skew_seconds: u64,
    /// How far in the future a signed request's timestamp may be, seconds. Small:
    /// a signature is remembered until its timestamp leaves the past window, so a
    /// timestamp far ahead would hold its replay-memory entry for longer.
    pub auth_future_skew_seconds: u64,
    /// How far behind the relay clock an intake stamp's time may be, seconds
    /// (GetInfo `intake_stamp_window_ms`). Each first contact accepted is
    /// remembered for this long, so a replay of it stores nothing even after
    /// the supporter acknowledged it (second fresh review H-1: stamps carried
    /// no time and one saved request refilled an intake forever). An hour:
    /// a phone that stamps and then loses its network for a while still gets
    /// its first contact through; the memory it costs is one small record per
    /// first contact, each paid for with a stamp.
    pub intake_stamp_window_seconds: u64,
    /// Width of an expiry bucket, seconds: the granularity of stored expiry times
    /// and of at-rest keys.
    pub expiry_bucket_seconds: u64,
    /// How often the sweeper deletes expired envelopes and destroys keys, seconds.
    pub sweep_interval_seconds: u64,
    /// How long shutdown waits for open calls to finish before closing them, seconds.
    pub shutdown_grace_seconds: u64,
    /// How long the relay keeps serving after a shutdown signal while reporting
    /// NOT_SERVING, so load balancers stop sending it new calls first, seconds.
    pub drain_delay_seconds: u64,
    /// After the store failed for good (every write fails), how long the relay
    /// keeps running NOT_SERVING before it exits with an error so that its
    /// supervisor restarts it, seconds.
    pub store_failure_exit_seconds: u64,
    /// Push wake-ups for mailboxes no stream watches.
    pub push: PushConfig,
    /// The Redis Cluster, when `store = "redis"`.
    pub redis: RedisSettings,
}

/// Where the Redis Cluster is and how durable a send must be on it.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// Seed nodes, `redis://host:port`; any reachable subset of the cluster.
    pub nodes: Vec<String>,
    /// Key prefix, so relays of different deployments can share a cluster.
    pub namespace: String,
    /// Replicas that must confirm each write before a Send is acknowledged
    /// (`WAIT`); 0 acknowledges on the primary alone (a failover may lose it).
    pub replicas: usize,
    /// How long a write may wait for its replicas before the call fails with
    /// UNAVAILABLE (retryable), milliseconds.
    pub wait_timeout_ms: u64,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            nodes: Vec::new(),
            namespace: "haven".into(),
            replicas: 1,
            wait_timeout_ms: 1000,
        }
    }
}

/// Push wake-up settings (see `push`).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    /// Whether the relay accepts push registrations and sends wake-ups.
    pub enabled: bool,
    /// At most one wake-up per mailbox per this many seconds while it is not read.
    pub interval_seconds: u64,
    /// A random delay of up to this many milliseconds before each wake-up, so
    /// its timing says less about when a message was sent (0: none).
    pub jitter_ms: u64,
    /// How long one wake-up request may take, seconds.
    pub timeout_seconds: u64,
    /// Most wake-up requests in flight; beyond it new ones are dropped (counted).
    pub max_in_flight: usize,
    /// Tests only: also accept `http://` endpoints, loopback addresses
    /// (127.0.0.0/8, `::1`, never private or other ranges) and any port. Off
    /// by default, so that clients cannot make the relay call into its own host.
    pub allow_local_endpoints: bool,
    /// Ports a push endpoint may use (443: every push gateway and UnifiedPush
    /// distributor serves HTTPS there), so that wake-ups cannot probe other
    /// services' ports.
    pub ports: Vec<u16>,
    /// When not empty, endpoint hosts must be one of these names or under one
    /// (`"push.example.org"` allows it and `eu.push.example.org`); IP literals
    /// are then refused. Empty: any public host.
    pub allowed_host_suffixes: Vec<String>,
    /// Most push connections open at once, idle ones in the pool included;
    /// at least `max_in_flight`.
    pub max_connections: usize,
    /// Most idle connections kept per endpoint host for reuse.
    pub max_idle_per_host: usize,
    /// How long an idle push connection is kept, seconds.
    pub idle_timeout_seconds: u64,
    /// Most wake-up requests in flight to one endpoint host, so that a host
    /// that never answers holds this many of `max_in_flight`, not all (review
    /// M3); at most `max_in_flight`.
    pub max_in_flight_per_host: usize,
    /// Most wake-up requests in flight to one host under
    /// `allowed_host_suffixes`: a gateway the operator chose (FCM, APNs, a
    /// UnifiedPush distributor) carries everyone's wake-ups, and at
    /// `max_in_flight_per_host` anyone could crowd it with their own (review
    /// M-E); half of `max_in_flight` still leaves room beside one gateway that
    /// stops answering. At least `max_in_flight_per_host`; `max_in_flight`
    /// bounds it anyway.
    pub max_in_flight_per_gateway: usize,
    /// Most name lookups for push endpoints at once. Each runs on tokio's
    /// blocking pool (the system resolver), which sled's writes share, and
    /// holds its place until the resolver returns, even after
    /// `dns_timeout_seconds` gave up on it; beyond it a wake-up fails at once.
    pub max_dns_lookups: usize,
    /// How long a wake-up waits for its endpoint's name to resolve, seconds.
    pub dns_timeout_seconds: u64,
    /// Tests only, not settable from a file: names resolved from this table
    /// instead of DNS, so a test can make a name point at any address.
    #[serde(skip)]
    pub resolve_for_tests: Vec<(String, Vec<std::net::IpAddr>)>,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_seconds: 60,
            jitter_ms: 0,
            timeout_seconds: 10,
            max_in_flight: 256,
            allow_local_endpoints: false,
            ports: vec![443],
            allowed_host_suffixes: Vec::new(),
            max_connections: 512,
            max_idle_per_host: 1,
            idle_timeout_seconds: 15,
            max_in_flight_per_host: 16,
            max_in_flight_per_gateway: 128,
            max_dns_lookups: 8,
            dns_timeout_seconds: 2,
            resolve_for_tests: Vec::new(),
        }
    }
}

/// The store backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Embedded sled database in `data_dir` (the default).
    #[default]
    Sled,
    /// In memory: nothing survives a restart.
    Memory,
    /// A Redis Cluster (`[redis]`): several relays share it.
    Redis,
}

/// TLS key material, PEM files.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, PEM.
    pub cert: PathBuf,
    /// Private key, PEM.
    pub key: PathBuf,
}

/// Log output settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// Level for the relay's own crates: `error`, `warn`, `info`, `debug` or `trace`.
    /// Third-party crates stay at `warn`: their verbose output has not been
    /// audited to be free of addresses and ids.
    pub level: String,
}

/// Log line formats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Limits enforced on clients.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest envelope ciphertext accepted, bytes.
    pub max_envelope_bytes: u64,
    /// TTL applied when a Send asks for none, seconds.
    pub default_ttl_seconds: u64,
    /// Largest TTL a Send may ask for, seconds (at most 14 days).
    pub max_ttl_seconds: u64,
    /// Most envelopes one mailbox holds at once.
    pub mailbox_max_envelopes: u64,
    /// Most ciphertext bytes one mailbox holds at once.
    pub mailbox_max_bytes: u64,
    /// Most envelopes a private mailbox holds before its owner `Secure`s it.
    /// Until then anyone who knows its sender id may post unsigned and for
    /// free, so it stays small (review F1). Capped at `mailbox_max_envelopes`
    /// (see [`Limits::unsecured_quota`]).
    pub unsecured_mailbox_max_envelopes: u64,
    /// Most ciphertext bytes a private mailbox holds before it is secured;
    /// capped at `mailbox_max_bytes`.
    pub unsecured_mailbox_max_bytes: u64,
    /// Most unacknowledged envelopes in flight on one Receive stream.
    pub max_receive_window: u32,
    /// Most envelopes one Fetch returns.
    pub max_fetch: u32,
    /// Most items in one SendBatch. One Ack may name as many ids as the largest
    /// of `max_fetch`, `max_batch` and `max_receive_window`.
    pub max_batch: u32,
    /// Most client connections open at once; further ones wait to be accepted.
    pub max_connections: usize,
    /// Most Receive streams open at once.
    pub max_streams: usize,
    /// Most concurrent calls on one connection.
    pub max_calls_per_connection: usize,
    /// Most envelope ciphertext bytes the whole relay stores; beyond it new
    /// envelopes, mailboxes and prekeys are refused ("the relay is full") while
    /// reads, acknowledgements, deletions and sweeps go on. On Redis keep it
    /// well below `maxmemory`.
    pub max_stored_bytes: u64,
    /// Most mailboxes the whole relay stores; beyond it `Create` is refused.
    pub max_mailboxes: u64,
    /// The share of `max_stored_bytes` and `max_mailboxes` (on Redis: of the
    /// fullest primary's memory budget) open to writes anyone can make for
    /// the price of a stamp: past it `Create` and sends to unsecured private
    /// mailboxes are refused, and the rest is kept for secured mailboxes,
    /// first contacts to intakes and prekeys (review H2), percent.
    pub open_budget_percent: u64,
    /// A secured or intake mailbox nobody has read, fetched from, streamed or
    /// sent to for this long is removed with everything in it by the sweep,
    /// seconds (review F1). Every such use moves the deadline (rounded up to
    /// an expiry bucket).
    pub mailbox_idle_seconds: u64,
    /// A private mailbox never secured is removed this long after its
    /// creation, whatever happens to it meanwhile, seconds (review H2).
    pub unsecured_mailbox_seconds: u64,
    /// sled only: new writes are refused while the data directory's filesystem
    /// has less free space than this (measured with `statvfs`), so that
    /// deletions and sweeps, which must log before they free anything, always
    /// have room.
    pub min_free_disk_bytes: u64,
    /// Most ciphertext bytes one Fetch response carries (at least
    /// `max_envelope_bytes`, so one envelope always fits).
    pub max_fetch_bytes: u64,
    /// Largest ciphertext an intake mailbox accepts: a first contact. Above
    /// `max_envelope_bytes` it has no effect (see [`Limits::intake_envelope_bytes`]).
    pub max_intake_envelope_bytes: u64,
    /// Bytes of protobuf framing a client allows beyond `max_fetch_bytes` (or
    /// beyond `max_envelope_bytes` for one streamed envelope).
    pub response_overhead_bytes: u64,
    /// Most request signatures the replay memory holds; when full it evicts the
    /// oldest (see `relay::auth`), it never refuses everyone.
    pub replay_memory_entries: usize,
    /// Most signatures remembered for one key within the window; beyond it only
    /// that key's requests are refused (RESOURCE_EXHAUSTED).
    pub replay_entries_per_key: usize,
    /// Most signatures and stamps remembered at once for keys the relay does
    /// not know yet (`Create`'s new key, its stamp, a first `PublishPrekeys`)
    /// and `ClaimBundles`' claim nonces (paid for with a stamp, not signed by
    /// a known key): a memory of their own, so a flood of them never evicts
    /// the entries of established keys (review M2; fresh review M-1).
    pub replay_memory_new_key_entries: usize,
    /// Most Receive streams on one mailbox at once.
    pub max_streams_per_mailbox: usize,
    /// Most authenticated Receive streams on one connection at once.
    pub max_streams_per_connection: usize,
    /// Most Receive streams on one connection waiting for their `open` at once;
    /// further ones wait their turn within `stream_open_timeout_seconds`.
    pub max_opening_streams_per_connection: usize,
    /// HTTP/2 streams (calls of any kind) one connection may have open, as
    /// advertised in SETTINGS_MAX_CONCURRENT_STREAMS.
    pub max_h2_streams_per_connection: u32,
    /// How long a new Receive stream may take to send and authenticate `open`, seconds.
    pub stream_open_timeout_seconds: u64,
    /// How long a connection may take from accept to its first request (TLS
    /// handshake and HTTP/2 preface included), seconds.
    pub handshake_timeout_seconds: u64,
    /// How long a unary call may take, seconds (streams are not cut by it).
    pub request_timeout_seconds: u64,
    /// After this long a connection is asked to go away (HTTP/2 GOAWAY), seconds;
    /// clients reconnect.
    pub max_connection_age_seconds: u64,
    /// How long calls on an aged connection may go on before it is closed, seconds.
    pub max_connection_age_grace_seconds: u64,
    /// `ClaimBundles` for one supporter key allowed per minute, after the burst
    /// (review F7: a claim takes capacity and one-time prekeys).
    pub claims_per_supporter_per_minute: u32,
    /// `ClaimBundles` for one supporter key allowed at once.
    pub claim_burst_per_supporter: u32,
    /// `ClaimBundles` allowed on one connection per minute (and at once).
    pub claims_per_connection_per_minute: u32,
    /// Most supporters whose claim rate is tracked; past it the one touched
    /// longest ago is forgotten.
    pub max_claim_supporters_tracked: usize,
    /// `ClaimBundles` from one source address (IPv6: one /64) allowed per
    /// minute (and at once), counted in memory under the per-boot salted
    /// address hash; 0 turns it off. Unset: 10, or off behind a proxy, as
    /// `max_connections_per_address`; see [`Config::claims_per_address`].
    pub claims_per_address_per_minute: Option<u32>,
    /// A connection with no call busy (an authenticated Receive stream, a call
    /// waiting for its answer, or a response with bytes to send) for this long
    /// is closed, seconds (review H1: after one request a connection used to
    /// stay until `max_connection_age_seconds`). Clients reconnect when they
    /// next call.
    pub idle_timeout_seconds: u64,
    /// Most connections from one source address (IPv6: one /64), counted in
    /// memory under a per-boot salted hash; 0 turns the cap off. Unset: 256,
    /// except behind a proxy ([`Config::behind_proxy`]: unset, whenever the
    /// relay speaks plaintext), where every connection comes from the proxy and
    /// the cap is off (cap per client in the proxy); see
    /// [`Config::connections_per_address`]. One network (IPv6: one /48) holds
    /// at most [`Config::connections_per_network`] of them together.
    pub max_connections_per_address: Option<usize>,
    /// Most authenticated Receive streams from one source address; 0: no cap.
    /// Unset: 500, or off behind a proxy, as above.
    pub max_streams_per_address: Option<usize>,
    /// Most authenticated Receive streams from one network (IPv6: one /48;
    /// IPv4: the address alone, so the per-address cap binds first), beside
    /// the per-address cap: 20 /64s of one /48 took all of `max_streams`
    /// (fresh adversarial review). 0: no cap; else at least
    /// `max_streams_per_address` (which must then be on) and at most
    /// `max_streams`. Unset: a tenth of `max_streams` (at least the
    /// per-address cap), or off where the per-address cap is; see
    /// [`Config::streams_per_network`]. Connections have such a cap too,
    /// derived from `max_connections` ([`Config::connections_per_network`]).
    pub max_streams_per_network: Option<usize>,
    /// A connection where a pending response, or the socket, took no bytes
    /// for this long is closed, seconds.
    pub response_stall_timeout_seconds: u64,
    /// Most response bytes the whole relay holds in memory for clients that
    /// have not read them yet (Fetch responses, queued stream envelopes).
    pub max_response_bytes: u64,
    /// Most response bytes one connection's Fetch responses hold in memory;
    /// beyond it a Fetch is refused until the client reads what it asked for.
    pub max_response_bytes_per_connection: u64,
    /// Most response bytes the calls from one source address (IPv6: one /64)
    /// hold in memory, Fetch responses and queued stream envelopes together,
    /// counted under the per-boot salted hash of the connection cap; beyond
    /// it a Fetch is refused and a stream waits (fresh review H-D). 0: no
    /// cap. Unset: an eighth of `max_response_bytes` (at least
    /// `max_response_bytes_per_connection`), or off behind a proxy; see
    /// [`Config::response_bytes_per_address`].
    pub max_response_bytes_per_address: Option<u64>,
    /// The share of `max_response_bytes` only Receive streams may use,
    /// percent: Fetch responses together hold at most the rest, so that
    /// Fetches, from however many addresses, never stop streams delivering
    /// (fresh review H-D).
    pub response_stream_reserve_percent: u64,
    /// Most envelope bytes a Receive stream has in flight (sent, not
    /// acknowledged), beside the window's count; one envelope always fits.
    pub max_stream_bytes_in_flight: u64,
    /// Largest request message of any Mailbox, Keys, Relay or health call
    /// other than `Send`, `SendBatch` and `PublishPrekeys` (and of any Receive
    /// stream message).
    pub max_request_bytes: u64,
}

impl Limits {
    /// The token bucket of claims per supporter.
    pub fn supporter_claim_rate(&self) -> crate::relay::Rate {
        crate::relay::Rate {
            per_minute: self.claims_per_supporter_per_minute,
            burst: self.claim_burst_per_supporter,
        }
    }

    /// The token bucket of claims per connection.
    pub fn connection_claim_rate(&self) -> crate::relay::Rate {
        crate::relay::Rate {
            per_minute: self.claims_per_connection_per_minute,
            burst: self.claims_per_connection_per_minute,
        }
    }

    /// The largest ciphertext an intake takes: `max_intake_envelope_bytes`,
    /// but never more than any mailbox takes, so lowering `max_envelope_bytes`
    /// alone lowers both.
    pub fn intake_envelope_bytes(&self) -> u64 {
        self.max_intake_envelope_bytes.min(self.max_envelope_bytes)
    }

    /// The quota of a private mailbox until it is secured: the configured one,
    /// but never more than any mailbox takes, so lowering the general quota
    /// alone lowers both.
    pub fn unsecured_quota(&self) -> haven_store::Quota {
        haven_store::Quota {
            max_envelopes: self
                .unsecured_mailbox_max_envelopes
                .min(self.mailbox_max_envelopes),
            max_bytes: self.unsecured_mailbox_max_bytes.min(self.mailbox_max_bytes),
        }
    }

    /// The most framing a Fetch response of `max_fetch` envelopes carries.
    pub fn response_framing(&self) -> u64 {
        u64::from(self.max_fetch) * ENVELOPE_FRAMING_BYTES + RESPONSE_FRAMING_BYTES
    }

    /// The largest message the relay encodes: a full Fetch, with room for one
    /// more envelope beyond the budget (an envelope stored under an earlier,
    /// larger `max_envelope_bytes`). Validation caps every term, so it fits.
    pub fn encode_limit(&self) -> usize {
        let bytes = self
            .max_fetch_bytes
            .saturating_add(self.max_envelope_bytes)
            .saturating_add(self.response_overhead_bytes);
        usize::try_from(bytes).unwrap_or(usize::MAX)
    }

    /// The largest `Send` request: one envelope, plus its ids, TTL, signature
    /// and stamp in under 4 KiB.
    pub fn send_request_limit(&self) -> u64 {
        self.max_envelope_bytes.saturating_add(4096)
    }

    /// What Fetch responses may hold among them: `max_response_bytes` less
    /// the reserve for streams.
    pub fn fetch_response_bytes(&self) -> u64 {
        let percent = 100u64.saturating_sub(self.response_stream_reserve_percent);
        self.max_response_bytes / 100 * percent + self.max_response_bytes % 100 * percent / 100
    }

    /// The most one Fetch response holds: its byte budget, one envelope past
    /// it, and framing.
    pub fn largest_fetch_response(&self) -> u64 {
        self.max_fetch_bytes
            .saturating_add(self.max_envelope_bytes)
            .saturating_add(self.response_framing())
    }

    /// The largest request the Mailbox and Keys services decode: a full
    /// `SendBatch` (an item frames ids, TTL, signature and stamp in under 256
    /// bytes) and 64 KiB to spare.
    pub fn decode_limit(&self) -> usize {
        let bytes = self
            .max_envelope_bytes
            .saturating_add(256)
            .saturating_mul(u64::from(self.max_batch))
            .saturating_add(64 * 1024);
        usize::try_from(bytes).unwrap_or(usize::MAX)
    }
}

/// One network's connections: a sixteenth of `max_connections`.
const CONNECTION_NETWORKS: usize = 16;

/// One network's streams: a tenth of `max_streams`.
const STREAM_NETWORKS: usize = 10;

/// The cap per network of something the relay holds `max` of and one address
/// `per_address` of: `max / networks`, but never below `per_address` (nor,
/// as `per_address <= max`, above `max`); 0 when `per_address` is, since a
/// tier per network is only ever beside one per address.
fn network_cap(max: usize, per_address: usize, networks: usize) -> usize {
    if per_address == 0 {
        return 0;
    }
    (max / networks).max(per_address).min(max)
}

/// The cap on connections per network (IPv6: one /48) of a relay with
/// `max_connections` slots and `per_address` per address (0: none); see
/// [`Config::connections_per_network`]. A function of the two, so that the
/// accept loop, told only those, enforces what GetInfo publishes.
pub fn connections_per_network(max_connections: usize, per_address: usize) -> usize {
    network_cap(max_connections, per_address, CONNECTION_NETWORKS)
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_envelope_bytes: 64 * 1024,
            default_ttl_seconds: 7 * DAY,
            max_ttl_seconds: 7 * DAY,
            mailbox_max_envelopes: 10_000,
            mailbox_max_bytes: 64 * 1024 * 1024,
            // Before Secure a conversation mailbox only takes the other side's
            // answer (a Hello per supporter device, a few texts written before
            // it arrived): 16 envelopes and 256 KiB, four of the largest.
            unsecured_mailbox_max_envelopes: 16,
            unsecured_mailbox_max_bytes: 256 * 1024,
            max_receive_window: 64,
            max_fetch: 100,
            max_batch: 64,
            max_connections: 10_000,
            max_streams: 10_000,
            max_calls_per_connection: 128,
            // A relay for a peer-support network holds far less; 8 GiB is a
            // ceiling for a small machine's disk or a Redis shard's memory.
            max_stored_bytes: 8 * 1024 * 1024 * 1024,
            // A conversation is two mailboxes per device; a million is room for
            // tens of thousands of people, and bounds records an attacker makes.
            max_mailboxes: 1_000_000,
            // Past 60 % only secured conversations, first contacts and prekeys
            // may write: 40 % (3.2 GiB, 400 000 mailboxes by default) stays for
            // the conversations that already exist, whatever a flood of free
            // mailboxes did before.
            open_budget_percent: 60,
            // Every sync of an app reads its mailboxes, so only abandoned ones
            // go: a supporter's month of holiday, a help-seeker returning to a
            // conversation after weeks, are within it. Longer keeps what a
            // flood left behind for longer.
            mailbox_idle_seconds: 30 * DAY,
            // A help-seeker's reply mailbox stays unsecured until the supporter
            // answers, and the first contact waits in the intake for up to
            // max_ttl_seconds (7 days): shorter would lose a late answer
            // silently. A day more for clocks and buckets.
            unsecured_mailbox_seconds: 8 * DAY,
            // Room for both write-ahead log files (2 × 32 MiB), sled's own
            // compaction and a sweep's deletions, with a wide margin.
            min_free_disk_bytes: 1024 * 1024 * 1024,
            // A quarter of the 4 MiB clients decode by default; 16 envelopes of the
            // largest size, thousands of padded chat messages.
            max_fetch_bytes: 1024 * 1024,
            // A first contact is a sealed-sender envelope around a PQXDH initial
            // message around one padded ratchet message. Padding caps the plaintext
            // at 32 KiB (32 768 B, plus the 16-byte AEAD tag); the initial message
            // adds the 1 088-byte ML-KEM-768 ciphertext, the initiator's 128-byte
            // identity, base key and prekey ids (about 1.3 KiB with its ratchet
            // header); sealed sender adds an ephemeral key, the sender's sealed
            // 128-byte identity and two tags (about 0.2 KiB). That is under
            // 35 KiB; 40 KiB leaves room for format versions without letting an
            // intake hold the 64 KiB envelopes private mailboxes may carry.
            max_intake_envelope_bytes: 40 * 1024,
            // Per envelope a Fetch response frames at most ENVELOPE_FRAMING_BYTES
            // (ids, lengths, expiry); 64 KiB covers max_fetch = 1000 of them.
            response_overhead_bytes: 64 * 1024,
            // About 150 bytes each: at most ~150 MB. Eviction only shrinks the
            // window once a flood passes this many verified requests within it.
            replay_memory_entries: 1_000_000,
            // Draining a full mailbox (10 000 envelopes) is 200 Fetch and Ack calls.
            replay_entries_per_key: 1_000,
            // A quarter of the memory: at the ~2 000 stamped Creates a second
            // a core manages at 18 bits... far more than any honest load.
            replay_memory_new_key_entries: 250_000,
            // One stream per mailbox per device is what the SDK opens; 4 leaves
            // room for a reconnect racing the old stream's end, and for a few
            // devices sharing a mailbox, while 10 000 streams on one mailbox
            // (review F5) are out.
            max_streams_per_mailbox: 4,
            // The SDK multiplexes one stream per mailbox over one connection; a
            // supporter with many conversations has many mailboxes.
            max_streams_per_connection: 200,
            // Opens authenticate in one round trip; more at once only wait.
            max_opening_streams_per_connection: 16,
            // Above max_streams_per_connection, so unary calls still fit beside
            // a full set of streams; hyper's own default is 200.
            max_h2_streams_per_connection: 256,
            stream_open_timeout_seconds: 5,
            handshake_timeout_seconds: 10,
            request_timeout_seconds: 30,
            max_connection_age_seconds: 6 * 3600,
            max_connection_age_grace_seconds: 60,
            // A help-seeker claims once per supporter per conversation; a few
            // retries fit in the burst. Draining 1 000 one-time prekeys now
            // takes about 100 minutes instead of seconds (review F7).
            claims_per_supporter_per_minute: 10,
            claim_burst_per_supporter: 5,
            claims_per_connection_per_minute: 20,
            // About 100 bytes each: ~10 MB.
            max_claim_supporters_tracked: 100_000,
            // Unset: see Config::claims_per_address.
            claims_per_address_per_minute: None,
            // An app keeps its connection while it works and calls at least
            // every sync (30 s), or holds a Receive stream open; a minute
            // closes what one request and then silence left behind, so idle
            // sockets cost a slot for a minute, not six hours (review H1).
            idle_timeout_seconds: 60,
            // Unset: see Config::connections_per_address and streams_per_address.
            max_connections_per_address: None,
            max_streams_per_address: None,
            // Unset: see Config::streams_per_network.
            max_streams_per_network: None,
            // A phone on a slow link still takes a 16 KiB slice in far less;
            // a client whose window stays shut this long is not reading.
            response_stall_timeout_seconds: 20,
            // 256 full Fetches or 4 000 queued 64 KiB envelopes: a bound a
            // small machine holds, reached only by many addresses at once.
            max_response_bytes: 256 * 1024 * 1024,
            // Eight full Fetches in flight on one connection.
            max_response_bytes_per_connection: 8 * 1024 * 1024,
            // Unset: see Config::response_bytes_per_address.
            max_response_bytes_per_address: None,
            // 64 MiB of the default 256: a thousand queued envelopes of the
            // largest size, always there for streams.
            response_stream_reserve_percent: 25,
            // A Fetch's worth (max_fetch_bytes): 16 of the largest envelopes,
            // thousands of padded chat messages.
            max_stream_bytes_in_flight: 1024 * 1024,
            // An Ack of 1 000 ids is 18 KiB; everything else but sends and
            // prekey uploads is under 2 KiB.
            max_request_bytes: 64 * 1024,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            store: StoreKind::Sled,
            data_dir: PathBuf::from("./haven-data"),
            tls: None,
            allow_plaintext: false,
            behind_proxy: None,
            association_key: None,
            log: LogConfig::default(),
            limits: Limits::default(),
            // 2^18 SHA-256 evaluations: well under a second on a phone, and a cost
            // per first message that makes flooding a supporter expensive.
            intake_pow_difficulty: 18,
            // Every client stamps its Create (the SDK, haven-bench, the e2e
            // helpers); a relay that must serve older clients turns it off.
            create_pow_required: true,
            auth_skew_seconds: 120,
            auth_future_skew_seconds: 5,
            intake_stamp_window_seconds: 3600,
            expiry_bucket_seconds: 3600,
            sweep_interval_seconds: 60,
            shutdown_grace_seconds: 10,
            drain_delay_seconds: 0,
            // Long enough for load balancers to see NOT_SERVING and for the
            // metric to be scraped; short, because nothing can be written.
            store_failure_exit_seconds: 30,
            push: PushConfig::default(),
            redis: RedisSettings::default(),
        }
    }
}

/// Parses `"off"` as `None` and anything else as a socket address.
pub fn parse_address_or_off(text: &str) -> Result<Option<SocketAddr>, String> {
    match text {
        "off" => Ok(None),
        address => address.parse().map(Some).map_err(|_| {
            format!("{address:?} is neither an address like 127.0.0.1:9464 nor `off`")
        }),
    }
}

fn address_or_off<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_address_or_off(&text).map_err(serde::de::Error::custom)
}

/// A configuration that cannot run, with what is wrong in words.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Parses a TOML document; missing fields keep their defaults.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|error| ConfigError(error.to_string()))
    }

    /// Checks every rule that a relay needs to run safely.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let limits = &self.limits;
        let fail = |message: String| Err(ConfigError(message));
        if limits.max_ttl_seconds == 0 || limits.max_ttl_seconds > HARD_MAX_TTL_SECONDS {
            return fail(format!(
                "limits.max_ttl_seconds is {}; it must be between 1 and {HARD_MAX_TTL_SECONDS} (14 days)",
                limits.max_ttl_seconds
            ));
        }
        if limits.default_ttl_seconds == 0 || limits.default_ttl_seconds > limits.max_ttl_seconds {
            return fail(format!(
                "limits.default_ttl_seconds is {}; it must be between 1 and limits.max_ttl_seconds ({})",
                limits.default_ttl_seconds, limits.max_ttl_seconds
            ));
        }
        if limits.max_envelope_bytes == 0 || limits.max_envelope_bytes > 4 * 1024 * 1024 {
            return fail(format!(
                "limits.max_envelope_bytes is {}; it must be between 1 and 4194304",
                limits.max_envelope_bytes
            ));
        }
        if limits.mailbox_max_bytes < limits.max_envelope_bytes {
            return fail(
                "limits.mailbox_max_bytes must be at least limits.max_envelope_bytes".into(),
            );
        }
        for (name, value) in [
            ("limits.mailbox_max_envelopes", limits.mailbox_max_envelopes),
            (
                "limits.unsecured_mailbox_max_envelopes",
                limits.unsecured_mailbox_max_envelopes,
            ),
            (
                "limits.unsecured_mailbox_max_bytes",
                limits.unsecured_mailbox_max_bytes,
            ),
            (
                "limits.max_receive_window",
                u64::from(limits.max_receive_window),
            ),
            ("limits.max_fetch", u64::from(limits.max_fetch)),
            ("limits.max_batch", u64::from(limits.max_batch)),
            ("limits.max_connections", limits.max_connections as u64),
            ("limits.max_streams", limits.max_streams as u64),
            (
                "limits.max_calls_per_connection",
                limits.max_calls_per_connection as u64,
            ),
            ("sweep_interval_seconds", self.sweep_interval_seconds),
            ("auth_skew_seconds", self.auth_skew_seconds),
        ] {
            if value == 0 {
                return fail(format!("{name} must be greater than 0"));
            }
        }
        for (name, value, low, high) in [
            (
                "limits.max_streams_per_mailbox",
                limits.max_streams_per_mailbox as u64,
                1,
                1000,
            ),
            (
                "limits.max_streams_per_connection",
                limits.max_streams_per_connection as u64,
                1,
                10_000,
            ),
            (
                "limits.max_opening_streams_per_connection",
                limits.max_opening_streams_per_connection as u64,
                1,
                1000,
            ),
            (
                "limits.max_h2_streams_per_connection",
                u64::from(limits.max_h2_streams_per_connection),
                1,
                10_000,
            ),
            (
                "limits.stream_open_timeout_seconds",
                limits.stream_open_timeout_seconds,
                1,
                60,
            ),
            (
                "limits.handshake_timeout_seconds",
                limits.handshake_timeout_seconds,
                1,
                120,
            ),
            (
                "limits.request_timeout_seconds",
                limits.request_timeout_seconds,
                1,
                600,
            ),
            (
                "limits.max_connection_age_seconds",
                limits.max_connection_age_seconds,
                60,
                7 * DAY,
            ),
            (
                "limits.max_connection_age_grace_seconds",
                limits.max_connection_age_grace_seconds,
                1,
                3600,
            ),
            (
                "limits.max_stored_bytes",
                limits.max_stored_bytes,
                limits.mailbox_max_bytes,
                1 << 50,
            ),
            ("limits.max_mailboxes", limits.max_mailboxes, 1, 100_000_000),
            (
                "limits.claims_per_supporter_per_minute",
                u64::from(limits.claims_per_supporter_per_minute),
                1,
                100_000,
            ),
            (
                "limits.claim_burst_per_supporter",
                u64::from(limits.claim_burst_per_supporter),
                1,
                100_000,
            ),
            (
                "limits.claims_per_connection_per_minute",
                u64::from(limits.claims_per_connection_per_minute),
                1,
                100_000,
            ),
            (
                "limits.max_claim_supporters_tracked",
                limits.max_claim_supporters_tracked as u64,
                1,
                10_000_000,
            ),
            (
                "limits.claims_per_address_per_minute",
                u64::from(limits.claims_per_address_per_minute.unwrap_or(10)),
                0,
                100_000,
            ),
            (
                "limits.min_free_disk_bytes",
                limits.min_free_disk_bytes,
                0,
                1 << 50,
            ),
            (
                "limits.idle_timeout_seconds",
                limits.idle_timeout_seconds,
                1,
                3600,
            ),
            (
                "limits.max_connections_per_address",
                self.connections_per_address() as u64,
                0,
                limits.max_connections as u64,
            ),
            (
                "limits.max_streams_per_address",
                self.streams_per_address() as u64,
                0,
                limits.max_streams as u64,
            ),
            (
                "limits.max_streams_per_network",
                self.streams_per_network() as u64,
                0,
                limits.max_streams as u64,
            ),
            (
                "limits.response_stall_timeout_seconds",
                limits.response_stall_timeout_seconds,
                1,
                300,
            ),
            (
                "limits.max_stream_bytes_in_flight",
                limits.max_stream_bytes_in_flight,
                limits.max_envelope_bytes,
                64 * 1024 * 1024,
            ),
            (
                "limits.max_request_bytes",
                limits.max_request_bytes,
                32 * 1024,
                4 * 1024 * 1024,
            ),
            // Semaphore::new panics above usize::MAX >> 3; these bounds keep far away.
            (
                "limits.max_connections",
                limits.max_connections as u64,
                1,
                1_000_000,
            ),
            (
                "limits.max_streams",
                limits.max_streams as u64,
                1,
                1_000_000,
            ),
        ] {
            if value < low || value > high {
                return fail(format!(
                    "{name} is {value}; it must be between {low} and {high}"
                ));
            }
        }
        if limits.max_fetch > 1000 {
            return fail(format!(
                "limits.max_fetch is {}; at most 1000",
                limits.max_fetch
            ));
        }
        if limits.max_fetch_bytes < limits.max_envelope_bytes
            || limits.max_fetch_bytes > MAX_FETCH_BYTES
        {
            return fail(format!(
                "limits.max_fetch_bytes is {}; it must be between limits.max_envelope_bytes ({}) \
                 and {MAX_FETCH_BYTES}, so that one envelope always fits a Fetch",
                limits.max_fetch_bytes, limits.max_envelope_bytes
            ));
        }
        if limits.max_intake_envelope_bytes == 0 {
            return fail("limits.max_intake_envelope_bytes must be greater than 0".into());
        }
        let framing = limits.response_framing();
        if limits.response_overhead_bytes < framing
            || limits.response_overhead_bytes > MAX_RESPONSE_OVERHEAD_BYTES
        {
            return fail(format!(
                "limits.response_overhead_bytes is {}; it must be between {framing} (the framing \
                 of limits.max_fetch envelopes) and {MAX_RESPONSE_OVERHEAD_BYTES}",
                limits.response_overhead_bytes
            ));
        }
        // What GetInfo tells clients to decode, max_fetch_bytes plus the
        // overhead, must be what they can: at most the SDK's hard cap (review
        // L3; each bound alone allowed 17 MiB).
        let client_decode = limits
            .max_fetch_bytes
            .saturating_add(limits.response_overhead_bytes);
        if client_decode > MAX_CLIENT_DECODE_BYTES {
            return fail(format!(
                "limits.max_fetch_bytes + limits.response_overhead_bytes is {client_decode}; \
                 clients decode at most {MAX_CLIENT_DECODE_BYTES} bytes in one message"
            ));
        }
        // What clients are told to decode must hold the largest response the relay
        // can send, and the relay's own encode limit must hold it too.
        let largest_fetch = limits.max_fetch_bytes.saturating_add(framing);
        let largest_stream_message = limits
            .max_envelope_bytes
            .saturating_add(ENVELOPE_FRAMING_BYTES + RESPONSE_FRAMING_BYTES);
        let encode_limit = limits.encode_limit() as u64;
        if largest_fetch > encode_limit || largest_stream_message > encode_limit {
            return fail(
                "the largest Fetch response or Receive message would not fit the encode limit"
                    .into(),
            );
        }
        // One Fetch response must always fit a connection's budget, and that
        // the relay's; KiB permits keep the relay's semaphore small.
        let largest_fetch_response = limits.largest_fetch_response();
        if limits.max_response_bytes_per_connection < largest_fetch_response
            || limits.max_response_bytes_per_connection > limits.max_response_bytes
        {
            return fail(format!(
                "limits.max_response_bytes_per_connection is {}; it must be between {} (the \
                 largest Fetch response) and limits.max_response_bytes ({})",
                limits.max_response_bytes_per_connection,
                largest_fetch_response,
                limits.max_response_bytes
            ));
        }
        // A network holds its addresses: its cap, when on, is never below
        // theirs (nor above the relay's, checked above). Without a cap per
        // address a cap per network would be one per IPv4 address under
        // another name.
        let (per_address, per_network) = (self.streams_per_address(), self.streams_per_network());
        if per_network != 0 && (per_address == 0 || per_network < per_address) {
            return fail(format!(
                "limits.max_streams_per_network is {per_network}; it must be 0 (no cap) or at \
                 least limits.max_streams_per_address ({per_address}), which must then be on"
            ));
        }
        // One Fetch response must always fit an address's share (which holds
        // every stream envelope too), and the Fetches' part of the budget.
        let per_address = self.response_bytes_per_address();
        if per_address != 0
            && (per_address < largest_fetch_response || per_address > limits.max_response_bytes)
        {
            return fail(format!(
                "limits.max_response_bytes_per_address is {per_address}; it must be 0 (no cap) \
                 or between {largest_fetch_response} (the largest Fetch response) and \
                 limits.max_response_bytes ({})",
                limits.max_response_bytes
            ));
        }
        if limits.response_stream_reserve_percent > 90
            || limits.fetch_response_bytes() < largest_fetch_response
        {
            return fail(format!(
                "limits.response_stream_reserve_percent is {}; it must be at most 90, and leave \
                 Fetches at least {largest_fetch_response} bytes (the largest Fetch response) of \
                 limits.max_response_bytes ({})",
                limits.response_stream_reserve_percent, limits.max_response_bytes
            ));
        }
        if limits.max_response_bytes > 64 * 1024 * 1024 * 1024 {
            return fail(format!(
                "limits.max_response_bytes is {}; at most 68719476736 (64 GiB)",
                limits.max_response_bytes
            ));
        }
        if limits.max_batch > 1000 {
            return fail(format!(
                "limits.max_batch is {}; at most 1000",
                limits.max_batch
            ));
        }
        if self.expiry_bucket_seconds == 0 || self.expiry_bucket_seconds > DAY {
            return fail(format!(
                "expiry_bucket_seconds is {}; it must be between 1 and {DAY}",
                self.expiry_bucket_seconds
            ));
        }
        if self.intake_pow_difficulty > haven_proto::pow::MAX_DIFFICULTY {
            return fail(format!(
                "intake_pow_difficulty is {}; at most {}",
                self.intake_pow_difficulty,
                haven_proto::pow::MAX_DIFFICULTY
            ));
        }
        if self.store_failure_exit_seconds == 0 || self.store_failure_exit_seconds > 3600 {
            return fail(format!(
                "store_failure_exit_seconds is {}; it must be between 1 and 3600",
                self.store_failure_exit_seconds
            ));
        }
        if self.drain_delay_seconds > 300 || self.shutdown_grace_seconds > 300 {
            return fail("drain_delay_seconds and shutdown_grace_seconds are at most 300".into());
        }
        if self.store == StoreKind::Redis {
            if self.redis.nodes.is_empty() {
                return fail(
                    "store is redis but redis.nodes is empty; give seed nodes like \
                     redis://10.0.0.5:7000"
                        .into(),
                );
            }
            if let Some(bad) = self.redis.nodes.iter().find(|n| !n.starts_with("redis://")) {
                return fail(format!(
                    "redis.nodes entry {bad:?} is not a redis:// URL (TLS to Redis, rediss://, \
                     is not built in yet: keep the cluster on a private network)"
                ));
            }
            if self.redis.wait_timeout_ms == 0 || self.redis.wait_timeout_ms > 60_000 {
                return fail(format!(
                    "redis.wait_timeout_ms is {}; it must be between 1 and 60000",
                    self.redis.wait_timeout_ms
                ));
            }
        }
        let push = &self.push;
        if push.interval_seconds == 0 || push.interval_seconds > 3600 {
            return fail(format!(
                "push.interval_seconds is {}; it must be between 1 and 3600",
                push.interval_seconds
            ));
        }
        if push.timeout_seconds == 0 || push.timeout_seconds > 60 {
            return fail(format!(
                "push.timeout_seconds is {}; it must be between 1 and 60",
                push.timeout_seconds
            ));
        }
        if push.jitter_ms > 60_000 {
            return fail(format!(
                "push.jitter_ms is {}; at most 60000",
                push.jitter_ms
            ));
        }
        if push.max_in_flight == 0 || push.max_in_flight > 10_000 {
            return fail(format!(
                "push.max_in_flight is {}; it must be between 1 and 10000",
                push.max_in_flight
            ));
        }
        if push.max_connections < push.max_in_flight || push.max_connections > 100_000 {
            return fail(format!(
                "push.max_connections is {}; it must be between push.max_in_flight ({}) and \
                 100000",
                push.max_connections, push.max_in_flight
            ));
        }
        if push.max_idle_per_host > 16 {
            return fail(format!(
                "push.max_idle_per_host is {}; at most 16",
                push.max_idle_per_host
            ));
        }
        if push.idle_timeout_seconds == 0 || push.idle_timeout_seconds > 90 {
            return fail(format!(
                "push.idle_timeout_seconds is {}; it must be between 1 and 90",
                push.idle_timeout_seconds
            ));
        }
        if push.max_in_flight_per_host == 0 || push.max_in_flight_per_host > push.max_in_flight {
            return fail(format!(
                "push.max_in_flight_per_host is {}; it must be between 1 and push.max_in_flight ({})",
                push.max_in_flight_per_host, push.max_in_flight
            ));
        }
        if push.max_in_flight_per_gateway < push.max_in_flight_per_host {
            return fail(format!(
                "push.max_in_flight_per_gateway is {}; it must be at least \
                 push.max_in_flight_per_host ({})",
                push.max_in_flight_per_gateway, push.max_in_flight_per_host
            ));
        }
        if push.max_dns_lookups == 0 || push.max_dns_lookups > 64 {
            return fail(format!(
                "push.max_dns_lookups is {}; it must be between 1 and 64",
                push.max_dns_lookups
            ));
        }
        if push.dns_timeout_seconds == 0 || push.dns_timeout_seconds > 10 {
            return fail(format!(
                "push.dns_timeout_seconds is {}; it must be between 1 and 10",
                push.dns_timeout_seconds
            ));
        }
        if push.enabled && push.ports.is_empty() {
            return fail(
                "push.ports is empty; give the ports endpoints may use, like [443]".into(),
            );
        }
        if push.ports.contains(&0) {
            return fail("push.ports contains 0, which is not a port".into());
        }
        if let Some(bad) = push.allowed_host_suffixes.iter().find(|suffix| {
            let suffix = suffix.trim_start_matches('.');
            suffix.is_empty()
                || !suffix
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'.')
        }) {
            return fail(format!(
                "push.allowed_host_suffixes entry {bad:?} is not a DNS name like push.example.org"
            ));
        }
        if !(60..=86_400).contains(&self.intake_stamp_window_seconds) {
            return fail(format!(
                "intake_stamp_window_seconds is {}; it must be between 60 and 86400",
                self.intake_stamp_window_seconds
            ));
        }
        if self.auth_future_skew_seconds == 0 || self.auth_future_skew_seconds > 60 {
            return fail(format!(
                "auth_future_skew_seconds is {}; it must be between 1 and 60",
                self.auth_future_skew_seconds
            ));
        }
        // Below ~1 000 entries honest traffic alone keeps the memory evicting,
        // and the eviction floor then refuses clients whose clocks lag (M2).
        if limits.replay_memory_entries < MIN_REPLAY_ENTRIES
            || limits.replay_memory_entries > 10_000_000
        {
            return fail(format!(
                "limits.replay_memory_entries is {}; it must be between {MIN_REPLAY_ENTRIES} \
                 and 10000000",
                limits.replay_memory_entries
            ));
        }
        if limits.replay_memory_new_key_entries < MIN_REPLAY_NEW_KEY_ENTRIES
            || limits.replay_memory_new_key_entries > 10_000_000
        {
            return fail(format!(
                "limits.replay_memory_new_key_entries is {}; it must be between \
                 {MIN_REPLAY_NEW_KEY_ENTRIES} and 10000000",
                limits.replay_memory_new_key_entries
            ));
        }
        // A client draining a mailbox signs a Fetch and an Ack per page.
        if limits.replay_entries_per_key < 16
            || limits.replay_entries_per_key > limits.replay_memory_entries
        {
            return fail(format!(
                "limits.replay_entries_per_key is {}; it must be between 16 and \
                 limits.replay_memory_entries",
                limits.replay_entries_per_key
            ));
        }
        // Phones drift by minutes, not hours; the window is how long a captured
        // request can be replayed on another node and how much the memory holds.
        if self.auth_skew_seconds > 600 {
            return fail(format!(
                "auth_skew_seconds is {}; at most 600",
                self.auth_skew_seconds
            ));
        }
        if limits.open_budget_percent < 10 || limits.open_budget_percent > 90 {
            return fail(format!(
                "limits.open_budget_percent is {}; it must be between 10 and 90, so that both \
                 anyone's writes and existing conversations' keep room",
                limits.open_budget_percent
            ));
        }
        for (name, value) in [
            ("limits.mailbox_idle_seconds", limits.mailbox_idle_seconds),
            (
                "limits.unsecured_mailbox_seconds",
                limits.unsecured_mailbox_seconds,
            ),
        ] {
            if value == 0 || value > 365 * DAY {
                return fail(format!(
                    "{name} is {value}; it must be between 1 and {} (a year)",
                    365 * DAY
                ));
            }
        }
        // An intake is published once per device and read by every sync; a
        // difficulty of 0 makes first contacts (and, with stamps, Create) free.
        if self.intake_pow_difficulty < MIN_POW_DIFFICULTY {
            return fail(format!(
                "intake_pow_difficulty is {}; at least {MIN_POW_DIFFICULTY}",
                self.intake_pow_difficulty
            ));
        }
        if limits.decode_limit() as u64 > MAX_DECODE_BYTES {
            return fail(format!(
                "limits.max_envelope_bytes × limits.max_batch gives a decode limit of {} bytes; \
                 at most {MAX_DECODE_BYTES}: every call may ask the relay to buffer that much",
                limits.decode_limit()
            ));
        }
        if !matches!(
            self.log.level.as_str(),
            "error" | "warn" | "info" | "debug" | "trace"
        ) {
            return fail(format!(
                "log.level is {:?}; use error, warn, info, debug or trace",
                self.log.level
            ));
        }
        if self.association_key.is_some() && self.association_public_key().is_none() {
            return fail(
                "association_key must be 64 hex digits of a valid Ed25519 public key".into(),
            );
        }
        if self.tls.is_none() && !self.listen.ip().is_loopback() && !self.allow_plaintext {
            return fail(format!(
                "listen address {} is not loopback and no TLS is configured; set tls.cert and \
                 tls.key, or allow_plaintext = true behind a TLS-terminating proxy",
                self.listen
            ));
        }
        Ok(())
    }

    /// Whether clients come through a proxy: `behind_proxy` when set, else
    /// whenever the relay speaks plaintext (see the field).
    pub fn behind_proxy(&self) -> bool {
        self.behind_proxy.unwrap_or(self.tls.is_none())
    }

    /// The cap on connections per source address (0: none): the configured
    /// one, else 256, or none behind a proxy, whose address every connection
    /// would share. Generous for NAT: a hospital or a carrier's CGNAT puts many
    /// doctors behind one address, and the SDK keeps a connection per lane
    /// (about 5 for a supporter with 3 conversations, at most 32), so 256 is
    /// some 50 busy devices; it keeps one machine to 256 of the 10 000 slots
    /// (never above `max_connections`).
    pub fn connections_per_address(&self) -> usize {
        self.limits
            .max_connections_per_address
            .unwrap_or(if self.behind_proxy() {
                0
            } else {
                self.limits.max_connections.min(256)
            })
    }

    /// Claims allowed per minute from one source address (0: no limit): the
    /// configured number, else 10, or none behind a proxy. A help-seeker
    /// claims once per conversation, so a hospital's or a carrier's shared
    /// address rarely needs more; one machine then needs 27 minutes, not
    /// seconds, to take a first-contact slot from every one of 90 supporters
    /// with capacity 3 (review F7; tokens are the lasting fix).
    pub fn claims_per_address(&self) -> u32 {
        self.limits
            .claims_per_address_per_minute
            .unwrap_or(if self.behind_proxy() { 0 } else { 10 })
    }

    /// The cap on authenticated Receive streams per source address (0: none):
    /// the configured one, else 500 (a NAT full of supporters, each with a
    /// stream per conversation mailbox; never above `max_streams`), or none
    /// behind a proxy.
    pub fn streams_per_address(&self) -> usize {
        self.limits
            .max_streams_per_address
            .unwrap_or(if self.behind_proxy() {
                0
            } else {
                self.limits.max_streams.min(500)
            })
    }

    /// The cap on authenticated Receive streams per network (IPv6: its /48;
    /// 0: none): the configured one, else a tenth of `max_streams` (1 000 of
    /// the default 10 000: two NATs full of supporters) but at least the
    /// per-address cap, or none where the per-address cap is off (behind a
    /// proxy). From 20 /64s of one /48, the per-address cap alone let one
    /// network hold all of `max_streams` (fresh adversarial review).
    pub fn streams_per_network(&self) -> usize {
        self.limits.max_streams_per_network.unwrap_or_else(|| {
            network_cap(
                self.limits.max_streams,
                self.streams_per_address(),
                STREAM_NETWORKS,
            )
        })
    }

    /// The cap on connections per network (IPv6: its /48; 0: none): a
    /// sixteenth of `max_connections` (625 of the default 10 000) but at
    /// least the per-address cap, or none where the per-address cap is off
    /// (behind a proxy). From 40 /64s of one /48 (a GetInfo each 50 s beats
    /// the idle timeout) the per-address cap alone let one network hold all
    /// 10 000 slots (fresh adversarial review); now sixteen networks are
    /// needed. Derived, not configured: `grpc::incoming` is told only
    /// `max_connections` and the per-address cap, and derives the same.
    pub fn connections_per_network(&self) -> usize {
        connections_per_network(self.limits.max_connections, self.connections_per_address())
    }

    /// The share of the response budget one source address may hold (0:
    /// none kept): the configured one, else an eighth of
    /// `max_response_bytes` but at least one connection's budget (32 MiB by
    /// default: 30 full Fetches unread at once, far beyond a NAT full of
    /// supporters syncing one page at a time), or none behind a proxy.
    pub fn response_bytes_per_address(&self) -> u64 {
        let limits = &self.limits;
        limits
            .max_response_bytes_per_address
            .unwrap_or(if self.behind_proxy() {
                0
            } else {
                (limits.max_response_bytes / 8).max(limits.max_response_bytes_per_connection)
            })
    }

    /// The association key as bytes, when configured and valid.
    pub fn association_public_key(&self) -> Option<[u8; 32]> {
        let text = self.association_key.as_deref()?;
        let mut key = [0u8; 32];
        if text.len() != 64 {
            return None;
        }
        for (index, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(index * 2..index * 2 + 2)?, 16).ok()?;
        }
        haven_proto::auth::public_key(&key).ok()?;
        Some(key)
    }

    /// What the relay stores and for how long, in words, for `GetInfo`.
    pub fn retention_statement(&self) -> String {
        let durability = match self.store {
            StoreKind::Sled => {
                "Envelopes are on disk before a send is acknowledged (synced to the store's \
                 write-ahead log): they survive a crash of the relay process or of the machine."
            }
            StoreKind::Memory => {
                "Envelopes are held in memory only: a restart of the relay loses them."
            }
            StoreKind::Redis => {
                "Envelopes are in a Redis Cluster, in memory on a primary and its replicas; a send \
                 is acknowledged once a replica confirmed the envelope (the bucket keys and sender \
                 mappings are not yet confirmed that way, so a failover can still lose them). The \
                 bucket keys are stored in the same cluster, so on Redis destroying them is \
                 deletion, not more; the relay refuses a cluster in which any node writes data \
                 to disk (snapshots, an append-only file, disk-based replication), checked at \
                 start and every minute."
            }
        };
        format!(
            "This relay stores, per mailbox, two random ids, the recipient's public key, the \
             mailbox kind, an optional sender public key and, if its owner registered one, a push \
             endpoint with an opaque token; and envelopes as opaque ciphertext \
             with their client-chosen id and their expiry rounded up to a {bucket}-second boundary. \
             An envelope is deleted when the recipient acknowledges it or when its expiry bucket \
             ends (a TTL of at most {max_ttl} seconds, plus up to one bucket). At rest every \
             envelope is sealed under a key per expiry bucket, destroyed when the bucket ends, so \
             envelope contents left on disk become unreadable then (an acknowledged envelope \
             stays readable to the key's holder until its bucket ends). Mailbox records, push \
             registrations, envelope ids and sizes are not yet sealed: the store's files can keep \
             them after deletion until they are rewritten. Beside mailboxes it keeps the public directory \
             (association-signed supporter entries and revocations, supporter-signed device lists), \
             devices' public prekeys until they are claimed, and for each supporter a count of new \
             conversations they will take. To refuse replayed requests on every node and after \
             a restart, it keeps a hash of each signed request it accepted (no id, key or \
             address), with an expiry rounded up to 10 seconds, for {window} seconds at most, \
             and a hash of each first contact's sender and envelope ids for {stamp_window} \
             seconds, so that a replayed first contact is not stored again. \
             A mailbox is deleted with everything in it by its \
             owner, once nobody has read it or sent to it for {idle} seconds, or, if it was never \
             secured, {unsecured} seconds after its creation or when the last envelope stored in \
             it expires, whichever is later; its record keeps that deadline, rounded up to the \
             bucket. It stores no sender identity and no client addresses, and \
             no envelope times finer than the expiry bucket; its logs and metrics carry counts and \
             durations only. \
             {durability}",
            bucket = self.expiry_bucket_seconds,
            max_ttl = self.limits.max_ttl_seconds,
            idle = self.limits.mailbox_idle_seconds,
            unsecured = self.limits.unsecured_mailbox_seconds,
            window = self.auth_skew_seconds + self.auth_future_skew_seconds + 10,
            stamp_window = self.intake_stamp_window_seconds + self.auth_future_skew_seconds + 10,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_loopback() {
        let config = Config::default();
        assert!(config.validate().is_ok());
        assert!(config.listen.ip().is_loopback());
    }

    #[test]
    fn toml_overrides_and_rejects_unknown_keys() {
        let config = Config::from_toml("listen = \"127.0.0.1:7000\"\n[limits]\nmax_fetch = 5\n");
        let config = config.map_err(|e| e.to_string());
        assert_eq!(config.as_ref().map(|c| c.limits.max_fetch), Ok(5));
        assert_eq!(config.as_ref().map(|c| c.limits.max_batch), Ok(64));
        let error = Config::from_toml("listne = \"127.0.0.1:7000\"")
            .err()
            .map(|e| e.to_string());
        assert!(error.is_some_and(|e| e.contains("unknown field")));
    }

    #[test]
    fn unsafe_settings_are_refused_with_a_reason() {
        let mut config = Config::default();
        config.limits.max_ttl_seconds = 15 * DAY;
        let message = config
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("max_ttl_seconds"), "{message}");

        let mut config = Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 50051)),
            ..Config::default()
        };
        let message = config
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("allow_plaintext"), "{message}");
        config.allow_plaintext = true;
        assert!(config.validate().is_ok());

        let mut config = Config::default();
        config.log.level = "verbose".into();
        assert!(config.validate().is_err());
    }

    /// Review M2, F24: bounds that passed validation although no relay can run
    /// safely with them (a 16-entry replay memory, a free stamp, an hour of
    /// skew, a decode limit of gigabytes), and the new budget and expiry bounds.
    #[test]
    fn replay_budget_expiry_and_pow_bounds_are_enforced() {
        type Change = fn(&mut Config);
        let cases: [(&str, Change); 12] = [
            ("limits.replay_memory_entries", |c| {
                c.limits.replay_memory_entries = 16;
            }),
            ("limits.replay_memory_new_key_entries", |c| {
                c.limits.replay_memory_new_key_entries = 16;
            }),
            ("limits.replay_entries_per_key", |c| {
                c.limits.replay_entries_per_key = 1;
            }),
            ("auth_skew_seconds", |c| c.auth_skew_seconds = 3600),
            ("intake_pow_difficulty", |c| c.intake_pow_difficulty = 0),
            ("decode limit", |c| {
                c.limits.max_envelope_bytes = 128 * 1024;
                c.limits.max_batch = 1000;
            }),
            ("limits.open_budget_percent", |c| {
                c.limits.open_budget_percent = 5;
            }),
            ("limits.open_budget_percent", |c| {
                c.limits.open_budget_percent = 95;
            }),
            ("limits.mailbox_idle_seconds", |c| {
                c.limits.mailbox_idle_seconds = 0;
            }),
            ("limits.mailbox_idle_seconds", |c| {
                c.limits.mailbox_idle_seconds = 400 * DAY;
            }),
            ("limits.unsecured_mailbox_seconds", |c| {
                c.limits.unsecured_mailbox_seconds = 0;
            }),
            ("limits.unsecured_mailbox_seconds", |c| {
                c.limits.unsecured_mailbox_seconds = 400 * DAY;
            }),
        ];
        for (name, change) in cases {
            let mut config = Config::default();
            change(&mut config);
            let message = config
                .validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(message.contains(name), "{name}: {message}");
        }
        let defaults = Config::default();
        assert!(defaults.create_pow_required);
        assert_eq!(defaults.limits.open_budget_percent, 60);
        assert_eq!(defaults.limits.mailbox_idle_seconds, 30 * DAY);
        assert_eq!(defaults.limits.unsecured_mailbox_seconds, 8 * DAY);
        assert_eq!(defaults.limits.replay_memory_new_key_entries, 250_000);
    }

    #[test]
    fn claim_rates_must_be_positive_and_bounded() {
        for (name, change) in [
            (
                "limits.claims_per_supporter_per_minute",
                (|c: &mut Config| c.limits.claims_per_supporter_per_minute = 0) as fn(&mut Config),
            ),
            ("limits.claim_burst_per_supporter", |c| {
                c.limits.claim_burst_per_supporter = 0
            }),
            ("limits.claims_per_connection_per_minute", |c| {
                c.limits.claims_per_connection_per_minute = 100_001
            }),
            ("limits.max_claim_supporters_tracked", |c| {
                c.limits.max_claim_supporters_tracked = 0
            }),
        ] {
            let message = refusal(change);
            assert!(message.contains(name), "{name}: {message}");
        }
    }

    fn refusal(change: impl FnOnce(&mut Config)) -> String {
        let mut config = Config::default();
        change(&mut config);
        config
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn per_address_caps_are_off_behind_a_proxy_unless_set_and_connection_bounds_hold() {
        let mut config = Config::default();
        assert!(config.behind_proxy());
        config.behind_proxy = Some(false);
        assert_eq!(
            (
                config.connections_per_address(),
                config.streams_per_address()
            ),
            (256, 500)
        );
        // Plaintext is taken to be behind a proxy, on loopback too (the
        // same-host nginx of the fresh edge review's H1); TLS is not.
        config.behind_proxy = None;
        assert!(config.tls.is_none() && config.listen.ip().is_loopback());
        assert!(config.behind_proxy());
        assert_eq!(config.connections_per_address(), 0);
        config.tls = Some(TlsConfig {
            cert: "cert.pem".into(),
            key: "key.pem".into(),
        });
        assert!(!config.behind_proxy());
        config.behind_proxy = Some(true);
        assert_eq!(
            config.claims_per_address(),
            0,
            "an L4 balancer in front of TLS"
        );
        config.tls = None;
        config.behind_proxy = Some(false);
        assert!(!config.behind_proxy());
        let mut proxied = Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 50051)),
            allow_plaintext: true,
            ..Config::default()
        };
        assert_eq!(
            (
                proxied.connections_per_address(),
                proxied.streams_per_address()
            ),
            (0, 0)
        );
        proxied.limits.max_connections_per_address = Some(8);
        assert_eq!(proxied.connections_per_address(), 8);
        // The response share per address (fresh review H-D): an eighth of the
        // budget, at least a connection's, none behind a proxy.
        assert_eq!(config.response_bytes_per_address(), 32 * 1024 * 1024);
        assert_eq!(proxied.response_bytes_per_address(), 0);
        config.limits.max_response_bytes = 16 * 1024 * 1024;
        assert_eq!(config.response_bytes_per_address(), 8 * 1024 * 1024);
        assert_eq!(config.limits.fetch_response_bytes(), 12 * 1024 * 1024);
        for (name, change) in [
            (
                "limits.max_connections_per_address",
                (|c: &mut Config| c.limits.max_connections_per_address = Some(10_001))
                    as fn(&mut Config),
            ),
            ("limits.idle_timeout_seconds", |c| {
                c.limits.idle_timeout_seconds = 0
            }),
            ("limits.response_stall_timeout_seconds", |c| {
                c.limits.response_stall_timeout_seconds = 301
            }),
            ("limits.max_response_bytes_per_connection", |c| {
                c.limits.max_response_bytes_per_connection = c.limits.max_fetch_bytes
            }),
            ("limits.max_response_bytes_per_address", |c| {
                c.limits.max_response_bytes_per_address = Some(c.limits.max_fetch_bytes)
            }),
            ("limits.response_stream_reserve_percent", |c| {
                c.limits.response_stream_reserve_percent = 91
            }),
            ("limits.response_stream_reserve_percent", |c| {
                c.limits.max_response_bytes = c.limits.max_response_bytes_per_connection;
                c.limits.response_stream_reserve_percent = 90;
            }),
            ("limits.max_stream_bytes_in_flight", |c| {
                c.limits.max_stream_bytes_in_flight = c.limits.max_envelope_bytes - 1
            }),
            ("limits.max_request_bytes", |c| {
                c.limits.max_request_bytes = 1024
            }),
        ] {
            let message = refusal(change);
            assert!(message.contains(name), "{name}: {message}");
        }
    }

    /// Fresh adversarial review: one IPv6 /48 (40 of its /64s) took every
    /// connection slot, 20 of them all of `max_streams`, as the caps counted
    /// per /64 only. Each network now has a cap of its own: off where the
    /// per-address cap is, never below it, never above the relay's.
    #[test]
    fn network_caps_sit_between_the_address_caps_and_the_relay_caps() {
        let mut config = Config {
            behind_proxy: Some(false),
            ..Config::default()
        };
        assert_eq!(
            (
                config.connections_per_network(),
                config.streams_per_network()
            ),
            (625, 1000)
        );
        // Never below the per-address cap, never above the relay's.
        config.limits.max_connections = 2000;
        config.limits.max_streams = 600;
        assert_eq!(
            (
                config.connections_per_network(),
                config.streams_per_network()
            ),
            (256, 500)
        );
        config.limits.max_connections = 100;
        assert_eq!(config.connections_per_network(), 100);
        config.limits.max_streams_per_network = Some(550);
        assert_eq!(config.streams_per_network(), 550);
        assert!(config.validate().is_ok());
        // Off with the per-address caps: behind a proxy, or turned off.
        config.limits.max_streams_per_network = None;
        config.limits.max_connections_per_address = Some(0);
        config.limits.max_streams_per_address = Some(0);
        assert_eq!(
            (
                config.connections_per_network(),
                config.streams_per_network()
            ),
            (0, 0)
        );
        let proxied = Config::default();
        assert!(proxied.behind_proxy());
        assert_eq!(
            (
                proxied.connections_per_network(),
                proxied.streams_per_network()
            ),
            (0, 0)
        );
        assert!(proxied.validate().is_ok());
        for change in [
            (|c: &mut Config| c.limits.max_streams_per_network = Some(499)) as fn(&mut Config),
            |c| c.limits.max_streams_per_network = Some(10_001),
            |c| {
                c.limits.max_streams_per_address = Some(0);
                c.limits.max_streams_per_network = Some(1000);
            },
        ] {
            let message = refusal(|c| {
                c.behind_proxy = Some(false);
                change(c);
            });
            assert!(
                message.contains("limits.max_streams_per_network"),
                "{message}"
            );
        }
        // Behind a proxy, a network cap without an address cap is refused too.
        let message = refusal(|c| c.limits.max_streams_per_network = Some(1000));
        assert!(
            message.contains("limits.max_streams_per_network"),
            "{message}"
        );
        assert!(refusal(|c| c.limits.max_streams_per_network = Some(0)).is_empty());
    }

    #[test]
    fn response_budgets_must_hold_an_envelope_and_its_framing() {
        // A Fetch budget below one envelope would return nothing forever.
        let message = refusal(|c| c.limits.max_fetch_bytes = c.limits.max_envelope_bytes - 1);
        assert!(message.contains("max_fetch_bytes"), "{message}");
        let message = refusal(|c| c.limits.max_intake_envelope_bytes = 0);
        assert!(message.contains("max_intake_envelope_bytes"), "{message}");
        let mut config = Config::default();
        config.limits.max_envelope_bytes = 1024;
        assert!(config.validate().is_ok());
        assert_eq!(config.limits.intake_envelope_bytes(), 1024);
        // Framing for 1000 envelopes needs more than 32 KiB.
        let message = refusal(|c| {
            c.limits.max_fetch = 1000;
            c.limits.response_overhead_bytes = 32 * 1024;
        });
        assert!(message.contains("response_overhead_bytes"), "{message}");
        let message = refusal(|c| c.limits.max_fetch = 1001);
        assert!(message.contains("max_fetch"), "{message}");
    }

    /// Review L3: `max_fetch_bytes` (up to 16 MiB) and the overhead (up to
    /// 1 MiB) were bounded apart, so a relay could tell clients to decode more
    /// than the SDK ever does, and every full Fetch failed there.
    #[test]
    fn what_clients_are_told_to_decode_fits_the_sdks_cap() {
        let message = refusal(|c| {
            c.limits.max_fetch_bytes = MAX_FETCH_BYTES;
            c.limits.max_response_bytes_per_connection = 32 * 1024 * 1024;
        });
        assert!(
            message.contains("max_fetch_bytes + limits.response_overhead_bytes"),
            "{message}"
        );
        let mut config = Config::default();
        config.limits.max_fetch_bytes =
            MAX_CLIENT_DECODE_BYTES - config.limits.response_overhead_bytes;
        config.limits.max_response_bytes_per_connection = 32 * 1024 * 1024;
        assert!(config.validate().is_ok(), "{:?}", config.validate());
        // The largest Fetch a valid relay sends fits what it tells clients.
        let limits = &config.limits;
        assert!(
            limits.max_fetch_bytes + limits.response_framing()
                <= limits.max_fetch_bytes + limits.response_overhead_bytes
        );
    }
}
