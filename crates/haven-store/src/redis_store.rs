//! The scale-out backend: a Redis Cluster (Valkey, or Redis up to 7.2).
//!
//! Layout: every key of one mailbox carries the hash tag `{m<hex id>}`, so they
//! share a slot and each operation is one Lua script on one primary (atomic
//! there; see `scripts` for the keys). Sender ids map to recipient ids under
//! `{s<hex>}`; the directory lives in the one slot `{dir}` (small, and claims
//! must be atomic across a supporter's devices). Envelopes are sealed under a
//! key per expiry bucket kept under `{k}` with a native expiry at the bucket's
//! end, like the envelopes themselves: once the bucket ends both are gone from
//! every node without anyone running a sweep; the sweep still removes the
//! index entries and counts what expired.
//!
//! Durability: a `put` is acknowledged only after `WAIT` confirms that
//! `replicas` replicas have it (`wait_timeout`), so a primary failover loses
//! no acknowledged envelope; otherwise it fails with
//! [`StoreError::Unavailable`] (retryable: resending the same envelope id is
//! idempotent).
//!
//! Several relay nodes share the cluster. A put publishes on the mailbox's
//! sharded pub/sub channel (`SPUBLISH`, inside the put script); every node
//! subscribes (`SSUBSCRIBE`, over RESP3) to the channels of the mailboxes its
//! own `Receive` streams watch, and wakes them. Each node also records, under
//! the mailbox, that it holds a stream (`P:w`, refreshed every
//! [`PRESENCE_REFRESH`], valid for [`PRESENCE_TTL`]), so the node that accepts
//! an envelope knows whether any node streams it or a push wake-up is due: the
//! push is sent once, by that node.
//!
//! Idle expiry: every mailbox is indexed in one of [`IDLE_SHARDS`] sorted sets
//! (`<ns>:{y<shard>}`, member the recipient id, score its idle expiry or
//! `+inf`), which the sweep walks; the record's `idle` field is the truth and
//! the index only a hint (an entry found early is put back at the record's
//! time, one for a mailbox that is gone is dropped).
//!
//! The storage budget's figures are the cluster's, not this node's (review
//! H3): a task refreshes them every [`USAGE_REFRESH`]: the mailbox count is
//! the sum of the idle index's sizes, and the memory is `INFO memory` of every
//! primary (the fullest one counts, since it refuses writes first). What is
//! per node: the envelope and byte counts in [`MailboxStore::stats`] (the
//! changes made through this node since it started), for metrics only.

mod scripts;

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use std::time::{SystemTime, UNIX_EPOCH};

use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
};
use redis::{
    AsyncConnectionConfig, Cmd, ErrorKind, IntoConnectionInfo as _, PushInfo, PushKind, RedisError,
    Value,
};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use crate::directory::{
    ClaimedBundle, DeviceKey, DirectoryStore, DocumentKind, Documents, MAX_ONE_TIME_PREKEYS,
    PrekeyCount, PrekeyUpload, SupporterKey,
};
use crate::epoch::{KeyRing, envelope_aad};
use crate::wake::WakeHub;
use crate::{
    BoxFuture, EnvelopeId, MailboxId, MailboxKind, MailboxRecord, MailboxStore, MemoryUse,
    NewEnvelope, PublicKey, PushRegistration, PutOutcome, Quota, RequestDigest, SenderCheck,
    SenderId, StoreConfig, StoreError, StoreStats, StoredEnvelope, Subscription, SweepReport,
    bucket_end, record_until,
};

/// How the Redis backend connects and how durable a `put` must be.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// Seed nodes, `redis://host:port` (any reachable subset of the cluster).
    pub nodes: Vec<String>,
    /// Key prefix, so several relays (or tests) can share a cluster.
    pub namespace: String,
    /// Replicas that must confirm each `put` before it is acknowledged (`WAIT`).
    /// 0 acknowledges once the primary has it (a failover may then lose it).
    pub replicas: usize,
    /// How long `WAIT` may take before the `put` fails as unavailable.
    pub wait_timeout: Duration,
    /// Bucket width and the other shared settings.
    pub store: StoreConfig,
    /// How often every node is asked again whether it writes data to disk
    /// (see [`NO_DISK`]); one that does makes the store fail for good.
    pub disk_check_interval: Duration,
}

impl RedisConfig {
    /// Defaults: namespace `haven`, one replica, 1 s to confirm, the disk
    /// check every minute.
    pub fn new(nodes: Vec<String>) -> Self {
        Self {
            nodes,
            namespace: "haven".into(),
            replicas: 1,
            wait_timeout: Duration::from_secs(1),
            store: StoreConfig::default(),
            disk_check_interval: Duration::from_secs(60),
        }
    }
}

/// The settings under which a Redis node writes none of its data to disk,
/// and the values each may have (issue "no record at rest", review F9): no
/// snapshots (`save ""`), no append-only file, a primary that streams a full
/// sync to its replicas instead of writing `dump.rdb` first
/// (`repl-diskless-sync yes`), and replicas that load it from the socket
/// instead of writing it to disk (`repl-diskless-load` `on-empty-db` or
/// `swapdb`; the default, `disabled`, leaves a `dump.rdb` with every
/// envelope, record, push token and bucket key on the replica's disk after
/// each full sync, redis/redis#6386).
pub const NO_DISK: [(&str, &[&str]); 4] = [
    ("save", &[""]),
    ("appendonly", &["no"]),
    ("repl-diskless-sync", &["yes"]),
    ("repl-diskless-load", &["on-empty-db", "swapdb"]),
];

/// Asks every node of the cluster (primaries and replicas, as `CLUSTER NODES`
/// lists them; the cluster client's slot map may not know the replicas) for
/// the settings of [`NO_DISK`], over a connection of its own to each, made
/// like the seed's (`seed`: its credentials and TLS). `None` when none writes
/// data to disk, else why the store must not be used, in a sentence for the
/// operator (which setting, how many nodes; no address). A node that cannot
/// be asked, or whose answer does not parse, refuses the cluster when
/// `strict` (at start); later it is passed over, so that one unreachable
/// node does not stop the others being checked.
async fn disk_refusal(
    connection: &mut ClusterConnection,
    seed: &redis::ConnectionInfo,
    strict: bool,
) -> Result<Option<String>, StoreError> {
    let cannot = |what: &str, kind: Option<ErrorKind>| {
        StoreError::Persists(format!(
            "cannot ask the Redis nodes whether they write to disk ({what}{}); Haven refuses a \
             cluster it cannot check",
            kind.map(|kind| format!(": {kind:?}")).unwrap_or_default()
        ))
    };
    let listing = connection
        .route_command(
            redis::cmd("CLUSTER").arg("NODES").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        )
        .await
        .map_err(|error| cannot("CLUSTER NODES", Some(error.kind())))?;
    let listing = match listing {
        Value::BulkString(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Value::VerbatimString { text, .. } | Value::SimpleString(text) => text,
        _ => return Err(corrupt("CLUSTER NODES reply")),
    };
    let tls = matches!(seed.addr(), redis::ConnectionAddr::TcpTls { .. });
    let nodes: Vec<(String, u16)> = listing
        .lines()
        .filter_map(|line| node_address(line, tls, !strict))
        .collect();
    if nodes.is_empty() {
        return Err(cannot("no node listed", None));
    }
    let settings = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)));
    // Per setting: how many nodes have a value Haven does not take, and which.
    let mut wrong: Vec<(usize, Vec<String>)> = vec![(0, Vec::new()); NO_DISK.len()];
    for (host, port) in &nodes {
        let address = match seed.addr() {
            redis::ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => redis::ConnectionAddr::TcpTls {
                host: host.clone(),
                port: *port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => redis::ConnectionAddr::Tcp(host.clone(), *port),
        };
        let client = redis::Client::open(seed.clone().set_addr(address))
            .map_err(|error| cannot("a node's address", Some(error.kind())))?;
        let mut node = match client
            .get_multiplexed_async_connection_with_config(&settings)
            .await
        {
            Ok(node) => node,
            Err(error) if strict => {
                return Err(cannot("connecting to a node", Some(error.kind())));
            }
            Err(_) => continue,
        };
        for ((name, allowed), (count, values)) in NO_DISK.iter().zip(&mut wrong) {
            let answer: Result<Value, _> = redis::cmd("CONFIG")
                .arg("GET")
                .arg(*name)
                .query_async(&mut node)
                .await;
            // An answer that does not parse is no answer: never the empty
            // value `save` must have (third fresh review).
            let value = match answer.as_ref().ok().and_then(config_value) {
                Some(value) => value,
                None if strict => {
                    return Err(cannot(
                        &format!("CONFIG GET {name}"),
                        answer.err().map(|error| error.kind()),
                    ));
                }
                None => break,
            };
            if !allowed.contains(&value.as_str()) {
                *count += 1;
                if !values.contains(&value) {
                    values.push(value);
                }
            }
        }
    }
    Ok(NO_DISK
        .iter()
        .zip(&wrong)
        .find(|(_, (count, _))| *count > 0)
        .map(|((name, allowed), (count, values))| {
            format!(
                "{count} of {} Redis nodes would write data to disk: {name} is {values:?}, \
                 Haven needs {allowed:?} (save \"\", appendonly no, repl-diskless-sync yes and \
                 repl-diskless-load on-empty-db on every node: docs/operations.md)",
                nodes.len()
            )
        }))
}

/// The address of a node from its `CLUSTER NODES` line (`<id> <ip:port@cport[,hostname]>
/// <flags> …`): with `tls`, its announced hostname where it has one (its
/// certificate names that); `None` for a node with no address, one that has
/// failed, or, with `skip_suspected`, one the answering node suspects
/// (`fail?`: only its own opinion, so the check at start asks it anyway).
fn node_address(line: &str, tls: bool, skip_suspected: bool) -> Option<(String, u16)> {
    let mut fields = line.split_whitespace();
    let _id = fields.next()?;
    let address = fields.next()?;
    let flags = fields.next()?;
    if flags.split(',').any(|flag| {
        matches!(flag, "noaddr" | "fail" | "handshake") || (skip_suspected && flag == "fail?")
    }) {
        return None;
    }
    let mut parts = address.split(',');
    let host_port = parts.next()?.split('@').next()?;
    let hostname = parts.next().filter(|name| !name.is_empty());
    let (host, port) = host_port.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = match hostname {
        Some(name) if tls => name,
        _ => host,
    };
    if host.is_empty() {
        return None;
    }
    Some((host.to_owned(), port.parse().ok()?))
}

/// The value of a `CONFIG GET name` reply: `[name, value]` (RESP2) or
/// `{name: value}` (RESP3).
fn config_value(answer: &Value) -> Option<String> {
    let value = match answer {
        Value::Array(items) => items.get(1)?,
        Value::Map(pairs) => &pairs.first()?.1,
        _ => return None,
    };
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

/// A compiled script: its text and SHA-1, for `EVALSHA` with an `EVAL` fallback.
struct Lua {
    code: String,
    sha: String,
}

impl Lua {
    fn new(code: &str) -> Self {
        Self {
            code: code.to_owned(),
            sha: redis::Script::new(code).get_hash().to_owned(),
        }
    }
}

struct Scripts {
    create: Lua,
    keep: Lua,
    secure: Lua,
    set_push: Lua,
    put: Lua,
    list: Lua,
    ack: Lua,
    expire: Lua,
    delete: Lua,
    publish_prekeys: Lua,
    claim: Lua,
    put_document: Lua,
    remember_request: Lua,
}

/// How often a node renews its record of the streams it holds.
pub const PRESENCE_REFRESH: Duration = Duration::from_secs(20);
/// How long such a record is believed without renewal (a node that died
/// stops counting as watching after this).
pub const PRESENCE_TTL: Duration = Duration::from_secs(60);

/// The Redis Cluster store. No `Debug`: it holds the epoch keys it has read.
pub struct RedisStore {
    connection: ClusterConnection,
    /// This node's random id in presence records.
    node: String,
    /// Mailboxes whose first local subscription just started, for the watcher task.
    watch: mpsc::UnboundedSender<MailboxId>,
    config: RedisConfig,
    scripts: Scripts,
    ring: KeyRing,
    wake: WakeHub,
    /// (bucket, mailbox) pairs this node has already put in the sweep index, so
    /// a busy mailbox costs one index write per bucket, not one per envelope.
    indexed: std::sync::Mutex<HashSet<(u64, MailboxId)>>,
    /// The cluster's figures, refreshed by [`usage_refresher`].
    usage: Arc<Usage>,
    envelopes: AtomicI64,
    bytes: AtomicI64,
    /// Envelopes listings skipped because they did not open.
    unreadable: AtomicU64,
}

/// What [`usage_refresher`] last measured of the whole cluster.
#[derive(Default)]
struct Usage {
    mailboxes: AtomicU64,
    /// Bumped by every local create and delete: a count measured while one
    /// happened may miss it, and is not stored over the local adjustment.
    changes: AtomicU64,
    /// Local creates and deletes sent and not yet counted. With `changes` and
    /// the gate, a measurement overlapping any of them is dropped, so the count
    /// is never off by one that was both measured and added.
    in_flight: AtomicU64,
    /// Held (never across an await) while a measurement is checked and
    /// stored, and while a create or delete starts or is counted.
    gate: std::sync::Mutex<()>,
    used_memory: AtomicU64,
    max_memory: AtomicU64,
    /// Set once a node was found writing data to disk: the store then fails
    /// for good ([`MailboxStore::fatal_error`]).
    persists: std::sync::Mutex<Option<String>>,
}

impl Usage {
    /// Marks a local create or delete as under way until the guard drops, so
    /// no measurement of the idle index overlapping it is stored.
    fn begin(&self) -> InFlight<'_> {
        let _gate = self
            .gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self)
    }
}

/// A local create or delete under way (see [`Usage::begin`]).
struct InFlight<'a>(&'a Usage);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let _gate = self
            .0
            .gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.0.changes.fetch_add(1, Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Shards of the idle index, so that no one set (and node) takes every create.
const IDLE_SHARDS: u8 = 16;
/// Most mailboxes one idle-sweep step takes from a shard.
const IDLE_SWEEP_CHUNK: usize = 256;
/// How often the cluster's mailbox count and memory are measured again.
pub const USAGE_REFRESH: Duration = Duration::from_secs(1);

fn idle_set(namespace: &str, shard: u8) -> String {
    format!("{namespace}:{{y{shard}}}")
}

fn idle_shard(id: &MailboxId) -> u8 {
    id.as_bytes()[0] % IDLE_SHARDS
}

/// The score of a mailbox in the idle index: its expiry, `+inf` for never.
fn idle_score(at: u64) -> String {
    if at == 0 {
        "+inf".into()
    } else {
        at.to_string()
    }
}

/// `used_memory` and `maxmemory` from an `INFO memory` reply.
fn memory_of(info: &[u8]) -> Option<MemoryUse> {
    let text = std::str::from_utf8(info).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|value| value.trim().parse::<u64>().ok())
    };
    Some(MemoryUse {
        used: field("used_memory")?,
        limit: field("maxmemory").unwrap_or(0),
    })
}

/// How full a server is, for picking the fullest: against its own limit, or
/// by bytes where none is set.
fn fullness(memory: &MemoryUse) -> f64 {
    if memory.limit > 0 {
        memory.used as f64 / memory.limit as f64
    } else {
        memory.used as f64 / u64::MAX as f64
    }
}

/// Measures the cluster's mailbox count (the idle index's sizes) and its
/// fullest primary's memory every [`USAGE_REFRESH`], until the store is
/// dropped. A failed measurement keeps the last figures.
///
/// Every `disk_check` it also asks every node whether it writes data to disk
/// ([`NO_DISK`]); one that does (a node restarted with other settings, a
/// replica added without them, a `CONFIG SET`) makes the store fail for good,
/// so the relay turns NOT_SERVING and exits. A check that cannot reach a node
/// (a failover under way) changes nothing.
async fn usage_refresher(
    mut connection: ClusterConnection,
    seed: redis::ConnectionInfo,
    namespace: String,
    usage: Weak<Usage>,
    disk_check: Duration,
) {
    let mut tick = tokio::time::interval(USAGE_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checked = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let Some(usage) = usage.upgrade() else { return };
        if checked.elapsed() >= disk_check {
            checked = tokio::time::Instant::now();
            if let Ok(Some(reason)) = disk_refusal(&mut connection, &seed, false).await {
                *usage
                    .persists
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(reason);
            }
        }
        let changes = {
            let _gate = usage
                .gate
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            (usage.in_flight.load(Ordering::SeqCst) == 0)
                .then(|| usage.changes.load(Ordering::SeqCst))
        };
        let mut count = Some(0u64);
        for shard in 0..IDLE_SHARDS {
            let size: Result<u64, _> = redis::cmd("ZCARD")
                .arg(idle_set(&namespace, shard))
                .query_async(&mut connection)
                .await;
            count = count.zip(size.ok()).map(|(sum, size)| sum + size);
        }
        if let (Some(count), Some(changes)) = (count, changes) {
            let _gate = usage
                .gate
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if usage.in_flight.load(Ordering::SeqCst) == 0
                && usage.changes.load(Ordering::SeqCst) == changes
            {
                usage.mailboxes.store(count, Ordering::SeqCst);
            }
        }
        let info = connection
            .route_command(
                redis::cmd("INFO").arg("memory").clone(),
                RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
            )
            .await;
        if let Ok(Value::Map(nodes)) = info {
            let fullest = nodes
                .iter()
                .filter_map(|(_, reply)| match reply {
                    Value::BulkString(bytes) => memory_of(bytes),
                    Value::VerbatimString { text, .. } => memory_of(text.as_bytes()),
                    _ => None,
                })
                .max_by(|a, b| fullness(a).total_cmp(&fullness(b)));
            if let Some(fullest) = fullest {
                usage.used_memory.store(fullest.used, Ordering::Relaxed);
                usage.max_memory.store(fullest.limit, Ordering::Relaxed);
            }
        }
    }
}

/// Sweep shards per bucket: the set of mailboxes with envelopes in a bucket is
/// split so that no single set (and node) takes every put of an hour.
const SWEEP_SHARDS: u8 = 16;

fn backend(error: RedisError) -> StoreError {
    use redis::ServerErrorKind as Server;
    // Redis errors can quote keys (MOVED/ASK carry addresses): keep only the kind.
    // What a failover or resharding causes is transient: the caller may retry
    // (redirections still pending after the client's own retries included).
    if error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || matches!(
            error.kind(),
            ErrorKind::Io | ErrorKind::ClusterConnectionNotFound
        )
        || matches!(
            error.kind(),
            ErrorKind::Server(
                Server::Moved
                    | Server::Ask
                    | Server::TryAgain
                    | Server::ClusterDown
                    | Server::MasterDown
                    | Server::ReadOnly
                    | Server::BusyLoading
            )
        )
    {
        StoreError::Unavailable(format!(
            "redis cluster not reachable or failing over ({:?})",
            error.kind()
        ))
    } else {
        StoreError::Backend(format!("redis: {:?}", error.kind()))
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Backend(format!("redis: malformed {what}"))
}

fn bytes_of(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.as_bytes()),
        _ => None,
    }
}

fn int_of(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        Value::SimpleString(text) => text.parse().ok(),
        _ => None,
    }
}

fn u64_of(value: &Value) -> Option<u64> {
    int_of(value).and_then(|n| u64::try_from(n).ok())
}

fn array(value: Value) -> Result<Vec<Value>, StoreError> {
    match value {
        Value::Array(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        _ => Err(corrupt("script reply")),
    }
}

fn tag(value: Option<&Value>) -> &[u8] {
    value.and_then(bytes_of).unwrap_or_default()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn mailbox_prefix(namespace: &str, id: &MailboxId) -> String {
    format!("{namespace}:{{m{}}}", hex::encode(id.as_bytes()))
}

/// The mailbox whose wake channel `channel` is (`<ns>:{m<hex>}:wake`).
fn mailbox_of_channel(namespace: &str, channel: &[u8]) -> Option<MailboxId> {
    let text = std::str::from_utf8(channel).ok()?;
    let hex_id = text
        .strip_prefix(namespace)?
        .strip_prefix(":{m")?
        .strip_suffix("}:wake")?;
    let mut id = [0u8; 16];
    hex::decode_to_slice(hex_id, &mut id).ok()?;
    Some(MailboxId::from_bytes(id))
}

/// A hash reply as pairs (RESP2 arrays and RESP3 maps alike).
fn pairs(value: Value) -> Vec<(Value, Value)> {
    match value {
        Value::Map(pairs) => pairs,
        Value::Array(items) => {
            let mut items = items.into_iter();
            let mut pairs = Vec::new();
            while let (Some(k), Some(v)) = (items.next(), items.next()) {
                pairs.push((k, v));
            }
            pairs
        }
        _ => Vec::new(),
    }
}

/// Records that `node` holds a stream of the mailbox whose presence key is
/// `key`, for [`PRESENCE_TTL`] ([`scripts::PRESENCE`]). A failure is left to
/// the next refresh: the record is a hint for push.
async fn record_presence(connection: &mut ClusterConnection, key: &str, node: &str) {
    let now = unix_now();
    let _: Result<Value, _> = redis::cmd("EVAL")
        .arg(scripts::PRESENCE)
        .arg(1)
        .arg(key)
        .arg(node)
        .arg(now + PRESENCE_TTL.as_secs())
        .arg(now)
        .arg(PRESENCE_TTL.as_secs())
        .query_async(connection)
        .await;
}

/// Keeps this node's sharded subscriptions and presence records in step with
/// the mailboxes its streams watch: subscribes when the first local stream of a
/// mailbox opens, renews presence every [`PRESENCE_REFRESH`], and unsubscribes
/// (and removes the record) once no local stream watches any more. Ends when
/// the store is dropped.
async fn watcher(
    mut opened: mpsc::UnboundedReceiver<MailboxId>,
    mut subscriber: ClusterConnection,
    mut connection: ClusterConnection,
    wake: WakeHub,
    namespace: String,
    node: String,
) {
    let mut subscribed: HashSet<MailboxId> = HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut last_refresh = std::time::Instant::now();
    let presence = |id: &MailboxId| format!("{}:w", mailbox_prefix(&namespace, id));
    let channel = |id: &MailboxId| format!("{}:wake", mailbox_prefix(&namespace, id));
    loop {
        tokio::select! {
            next = opened.recv() => {
                let Some(id) = next else { break };
                let subscribed_ok = subscriber.ssubscribe(channel(&id)).await.is_ok();
                record_presence(&mut connection, &presence(&id), &node).await;
                if subscribed_ok {
                    subscribed.insert(id);
                }
                // Anything stored before the subscription took effect: look now.
                wake.notify(&id);
            }
            _ = tick.tick() => {
                let gone: Vec<MailboxId> =
                    subscribed.iter().filter(|id| !wake.watched(id)).copied().collect();
                for id in gone {
                    let _ = subscriber.sunsubscribe(channel(&id)).await;
                    let _: Result<Value, _> = redis::cmd("HDEL")
                        .arg(presence(&id))
                        .arg(&node)
                        .query_async(&mut connection)
                        .await;
                    subscribed.remove(&id);
                }
                if last_refresh.elapsed() >= PRESENCE_REFRESH {
                    last_refresh = std::time::Instant::now();
                    for id in &subscribed {
                        record_presence(&mut connection, &presence(id), &node).await;
                    }
                }
            }
        }
    }
}

impl RedisStore {
    /// Connects to the cluster and loads the scripts.
    pub async fn connect(config: RedisConfig) -> Result<Self, StoreError> {
        let client = ClusterClientBuilder::new(config.nodes.clone())
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(5))
            // During a failover: retry MOVED/TRYAGAIN/refused a few times,
            // quickly, then let the caller see UNAVAILABLE and retry itself.
            .retries(6)
            .min_retry_wait(20)
            .max_retry_wait(400)
            .build()
            .map_err(backend)?;
        let connection = client.get_async_connection().await.map_err(backend)?;
        let seed = config
            .nodes
            .first()
            .ok_or_else(|| StoreError::Backend("no Redis seed node configured".into()))?
            .as_str()
            .into_connection_info()
            .map_err(backend)?;
        // Before anything is written: a cluster that would keep what Haven
        // promises not to keep is refused with the reason.
        if let Some(reason) = disk_refusal(&mut connection.clone(), &seed, true).await? {
            return Err(StoreError::Persists(reason));
        }
        let wake = WakeHub::default();
        let namespace = config.namespace.clone();
        let hub = wake.clone();
        // Sharded pub/sub messages arrive here, on the client's reader task: wake
        // the local streams of that mailbox (the channel names it).
        let on_message = move |push: PushInfo| -> Result<(), std::convert::Infallible> {
            if push.kind == PushKind::SMessage
                && let Some(id) = push
                    .data
                    .first()
                    .and_then(bytes_of)
                    .and_then(|channel| mailbox_of_channel(&namespace, channel))
            {
                hub.notify(&id);
            }
            Ok(())
        };
        let subscriber = ClusterClientBuilder::new(config.nodes.clone())
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(5))
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(on_message)
            .build()
            .map_err(backend)?
            .get_async_connection()
            .await
            .map_err(backend)?;
        let node = hex::encode(rand::random::<[u8; 8]>());
        let usage = Arc::new(Usage::default());
        tokio::spawn(usage_refresher(
            connection.clone(),
            seed,
            config.namespace.clone(),
            Arc::downgrade(&usage),
            config.disk_check_interval,
        ));
        let (watch, watched) = mpsc::unbounded_channel();
        tokio::spawn(watcher(
            watched,
            subscriber,
            connection.clone(),
            wake.clone(),
            config.namespace.clone(),
            node.clone(),
        ));
        Ok(Self {
            connection,
            node,
            watch,
            scripts: Scripts {
                create: Lua::new(scripts::CREATE),
                keep: Lua::new(scripts::KEEP),
                secure: Lua::new(scripts::SECURE),
                set_push: Lua::new(scripts::SET_PUSH),
                put: Lua::new(&scripts::put()),
                list: Lua::new(scripts::LIST),
                ack: Lua::new(&scripts::ack()),
                expire: Lua::new(&scripts::expire()),
                delete: Lua::new(scripts::DELETE),
                publish_prekeys: Lua::new(scripts::PUBLISH_PREKEYS),
                claim: Lua::new(scripts::CLAIM),
                put_document: Lua::new(scripts::PUT_DOCUMENT),
                remember_request: Lua::new(scripts::REMEMBER_REQUEST),
            },
            config,
            ring: KeyRing::default(),
            wake,
            indexed: std::sync::Mutex::new(HashSet::new()),
            usage,
            envelopes: AtomicI64::new(0),
            bytes: AtomicI64::new(0),
            unreadable: AtomicU64::new(0),
        })
    }

    fn mailbox_prefix(&self, id: &MailboxId) -> String {
        mailbox_prefix(&self.config.namespace, id)
    }

    fn idle_set(&self, id: &MailboxId) -> String {
        idle_set(&self.config.namespace, idle_shard(id))
    }

    /// Puts the mailbox into the idle index at `at` (0: never).
    async fn index_idle(&self, id: &MailboxId, at: u64) -> Result<(), StoreError> {
        self.query(
            redis::cmd("ZADD")
                .arg(self.idle_set(id))
                .arg(idle_score(at))
                .arg(&id.as_bytes()[..])
                .clone(),
        )
        .await
        .map(drop)
    }

    async fn unindex_idle(&self, id: &MailboxId) -> Result<(), StoreError> {
        self.query(
            redis::cmd("ZREM")
                .arg(self.idle_set(id))
                .arg(&id.as_bytes()[..])
                .clone(),
        )
        .await
        .map(drop)
    }

    /// Removes, from one shard of the idle index, up to [`IDLE_SWEEP_CHUNK`]
    /// mailboxes whose idle expiry has passed. Returns how many, and whether
    /// more may be due.
    async fn sweep_idle(&self, shard: u8, now: u64) -> Result<(u64, bool), StoreError> {
        let set = idle_set(&self.config.namespace, shard);
        let due = array(
            self.query(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(&set)
                    .arg("-inf")
                    .arg(now)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(IDLE_SWEEP_CHUNK)
                    .clone(),
            )
            .await?,
        )?;
        let mut removed = 0;
        for member in &due {
            let Some(id) = bytes_of(member).and_then(MailboxId::from_slice) else {
                continue;
            };
            let _in_flight = self.usage.begin();
            let prefix = self.mailbox_prefix(&id);
            let reply = array(
                self.run(
                    &self.scripts.delete,
                    &format!("{prefix}:rec"),
                    &[prefix.as_bytes(), now.to_string().as_bytes()],
                    true,
                )
                .await?,
            )?;
            match reply.as_slice() {
                [] => self.unindex_idle(&id).await?,
                [later, at] if bytes_of(later) == Some(b"later") => {
                    self.index_idle(&id, u64_of(at).unwrap_or(0)).await?;
                }
                [sid, n, b] => {
                    self.unindex_idle(&id).await?;
                    self.deleted(&id, sid, n, b).await?;
                    removed += 1;
                }
                _ => return Err(corrupt("delete reply")),
            }
        }
        Ok((removed, due.len() == IDLE_SWEEP_CHUNK))
    }

    /// What follows a delete script that removed a mailbox: its sender id
    /// goes, the counters follow, and its streams wake to find it gone.
    async fn deleted(
        &self,
        id: &MailboxId,
        sid: &Value,
        n: &Value,
        b: &Value,
    ) -> Result<(), StoreError> {
        if let Some(sender) = bytes_of(sid).and_then(SenderId::from_slice) {
            self.query(redis::cmd("DEL").arg(self.sender_key(&sender)).clone())
                .await?;
        }
        self.usage.changes.fetch_add(1, Ordering::SeqCst);
        self.usage
            .mailboxes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_sub(1))
            })
            .ok();
        self.adjust(-int_of(n).unwrap_or(0), -int_of(b).unwrap_or(0));
        self.wake.notify(id);
        Ok(())
    }

    fn sender_key(&self, id: &SenderId) -> String {
        format!(
            "{}:{{s{}}}",
            self.config.namespace,
            hex::encode(id.as_bytes())
        )
    }

    fn directory_prefix(&self) -> String {
        format!("{}:{{dir}}", self.config.namespace)
    }

    fn epoch_key(&self, bucket: u64) -> String {
        format!("{}:{{k}}:{bucket}", self.config.namespace)
    }

    fn buckets_key(&self) -> String {
        format!("{}:{{k}}:buckets", self.config.namespace)
    }

    fn sweep_set(&self, bucket: u64, shard: u8) -> String {
        format!("{}:{{x{bucket}:{shard}}}", self.config.namespace)
    }

    async fn query(&self, cmd: Cmd) -> Result<Value, StoreError> {
        let mut connection = self.connection.clone();
        cmd.query_async(&mut connection).await.map_err(backend)
    }

    /// Runs `lua` with one declared key; with `wait`, follows it with `WAIT` on
    /// the same primary and fails unless enough replicas confirmed.
    async fn run(
        &self,
        lua: &Lua,
        key: &str,
        args: &[&[u8]],
        wait: bool,
    ) -> Result<Value, StoreError> {
        match self.run_once(lua, key, args, wait, true).await {
            Err(error) if error.code() == Some("NOSCRIPT") => {
                // A fresh primary (after a failover) has no script cache: EVAL loads it.
                self.run_once(lua, key, args, wait, false).await
            }
            other => other,
        }
        .map_err(backend)
        .and_then(|mut replies| {
            if wait && self.config.replicas > 0 {
                let confirmed = replies.pop().as_ref().and_then(int_of).unwrap_or(0);
                if confirmed < self.config.replicas as i64 {
                    return Err(StoreError::Unavailable(format!(
                        "the write reached {confirmed} of {} replicas in time",
                        self.config.replicas
                    )));
                }
            }
            replies
                .into_iter()
                .next()
                .ok_or_else(|| corrupt("script reply"))
        })
    }

    async fn run_once(
        &self,
        lua: &Lua,
        key: &str,
        args: &[&[u8]],
        wait: bool,
        by_hash: bool,
    ) -> Result<Vec<Value>, RedisError> {
        let mut eval = if by_hash {
            redis::cmd("EVALSHA").arg(&lua.sha).clone()
        } else {
            redis::cmd("EVAL").arg(&lua.code).clone()
        };
        eval.arg(1).arg(key);
        for arg in args {
            eval.arg(*arg);
        }
        let mut connection = self.connection.clone();
        // Routed by its key (following MOVED/ASK during a failover).
        let value: Value = eval.query_async(&mut connection).await?;
        if !(wait && self.config.replicas > 0) {
            return Ok(vec![value]);
        }
        // WAIT counts the replicas that have every earlier write of this
        // client's connection to that primary, so it goes to the same node.
        let timeout_ms = u64::try_from(self.config.wait_timeout.as_millis()).unwrap_or(u64::MAX);
        let confirmed = connection
            .route_command(
                redis::cmd("WAIT")
                    .arg(self.config.replicas)
                    .arg(timeout_ms)
                    .clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::with_key(
                    key,
                    SlotAddr::Master,
                ))),
            )
            .await?;
        Ok(vec![value, confirmed])
    }

    /// The key of `bucket`, read from Redis (or created there) and cached.
    async fn bucket_key(&self, bucket: u64, create: bool) -> Result<bool, StoreError> {
        if self.ring.contains(bucket) {
            return Ok(true);
        }
        let key = self.epoch_key(bucket);
        if create {
            let mut fresh = Zeroizing::new([0u8; 32]);
            rand::fill(&mut fresh[..]);
            // The first node to create it wins; everyone then reads the same key.
            self.query(
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&fresh[..])
                    .arg("NX")
                    .arg("EXAT")
                    .arg(bucket)
                    .clone(),
            )
            .await?;
            self.query(
                redis::cmd("ZADD")
                    .arg(self.buckets_key())
                    .arg(bucket)
                    .arg(bucket)
                    .clone(),
            )
            .await?;
        }
        match self.query(redis::cmd("GET").arg(&key).clone()).await? {
            Value::BulkString(bytes) if bytes.len() == 32 => {
                let mut stored = Zeroizing::new([0u8; 32]);
                stored.copy_from_slice(&bytes);
                self.ring.insert(bucket, stored);
                let mut bytes = bytes;
                zeroize::Zeroize::zeroize(&mut bytes);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn adjust(&self, envelopes: i64, bytes: i64) {
        self.envelopes.fetch_add(envelopes, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts what a script reported as expired (`n`, `bytes` at `at`, `at + 1`).
    fn expired(&self, reply: &[Value], at: usize) {
        let n = reply.get(at).and_then(int_of).unwrap_or(0);
        let b = reply.get(at + 1).and_then(int_of).unwrap_or(0);
        self.adjust(-n, -b);
    }

    fn record_from(
        &self,
        id: &MailboxId,
        fields: &[Value],
    ) -> Result<Option<MailboxRecord>, StoreError> {
        let [sid, rkey, kind, skey, idle] = fields else {
            return Err(corrupt("mailbox record"));
        };
        if matches!(sid, Value::Nil) {
            return Ok(None);
        }
        let sender_id = bytes_of(sid)
            .and_then(SenderId::from_slice)
            .ok_or_else(|| corrupt("mailbox record"))?;
        let recipient_key = bytes_of(rkey)
            .and_then(PublicKey::from_slice)
            .ok_or_else(|| corrupt("mailbox record"))?;
        let kind = bytes_of(kind)
            .and_then(|k| k.first().copied())
            .and_then(MailboxKind::from_byte)
            .ok_or_else(|| corrupt("mailbox record"))?;
        let sender_key = match skey {
            Value::Nil => None,
            other => Some(
                bytes_of(other)
                    .and_then(PublicKey::from_slice)
                    .ok_or_else(|| corrupt("mailbox record"))?,
            ),
        };
        Ok(Some(MailboxRecord {
            recipient_id: *id,
            sender_id,
            recipient_key,
            kind,
            sender_key,
            idle_expires_at: if matches!(idle, Value::Nil) {
                0
            } else {
                u64_of(idle).ok_or_else(|| corrupt("mailbox record"))?
            },
        }))
    }

    async fn load(&self, id: &MailboxId) -> Result<Option<MailboxRecord>, StoreError> {
        let rec = format!("{}:rec", self.mailbox_prefix(id));
        let fields = array(
            self.query(
                redis::cmd("HMGET")
                    .arg(rec)
                    .arg("sid")
                    .arg("rkey")
                    .arg("kind")
                    .arg("skey")
                    .arg("idle")
                    .clone(),
            )
            .await?,
        )?;
        self.record_from(id, &fields)
    }
}

impl MailboxStore for RedisStore {
    fn create_mailbox(&self, mut record: MailboxRecord) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            if record.idle_expires_at != 0 {
                record.idle_expires_at =
                    bucket_end(record.idle_expires_at, self.config.store.bucket_seconds);
            }
            let sender = self.sender_key(&record.sender_id);
            let claimed = self
                .query(
                    redis::cmd("SET")
                        .arg(&sender)
                        .arg(&record.recipient_id.as_bytes()[..])
                        .arg("NX")
                        .clone(),
                )
                .await?;
            if matches!(claimed, Value::Nil) {
                return Err(StoreError::IdInUse);
            }
            let prefix = self.mailbox_prefix(&record.recipient_id);
            // Indexed before it exists, so that no mailbox escapes the idle
            // sweep; an entry without a mailbox is dropped by the sweep.
            let _in_flight = self.usage.begin();
            if let Err(error) = self
                .index_idle(&record.recipient_id, record.idle_expires_at)
                .await
            {
                let _ = self.query(redis::cmd("DEL").arg(&sender).clone()).await;
                return Err(error);
            }
            let created = self
                .run(
                    &self.scripts.create,
                    &format!("{prefix}:rec"),
                    &[
                        prefix.as_bytes(),
                        record.sender_id.as_bytes(),
                        record.recipient_key.as_bytes(),
                        &[record.kind.to_byte()],
                        record.idle_expires_at.to_string().as_bytes(),
                    ],
                    true,
                )
                .await;
            match created {
                Ok(value) if int_of(&value) == Some(1) => {
                    self.usage.changes.fetch_add(1, Ordering::SeqCst);
                    self.usage.mailboxes.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
                Ok(_) => {
                    // The recipient id is taken (and indexed by its own mailbox):
                    // give the sender id back.
                    self.query(redis::cmd("DEL").arg(&sender).clone()).await?;
                    Err(StoreError::IdInUse)
                }
                Err(error) => {
                    // Created but not confirmed by a replica (or unknown): undo both
                    // halves, best effort; the caller sees the error and may retry.
                    let _ = self
                        .query(redis::cmd("DEL").arg(format!("{prefix}:rec")).clone())
                        .await;
                    let _ = self.query(redis::cmd("DEL").arg(&sender).clone()).await;
                    Err(error)
                }
            }
        })
    }

    fn mailbox<'a>(
        &'a self,
        id: &'a MailboxId,
    ) -> BoxFuture<'a, Result<Option<MailboxRecord>, StoreError>> {
        Box::pin(self.load(id))
    }

    fn mailbox_by_sender<'a>(
        &'a self,
        id: &'a SenderId,
    ) -> BoxFuture<'a, Result<Option<MailboxRecord>, StoreError>> {
        Box::pin(async move {
            let value = self
                .query(redis::cmd("GET").arg(self.sender_key(id)).clone())
                .await?;
            let Some(recipient) = bytes_of(&value).and_then(MailboxId::from_slice) else {
                return Ok(None);
            };
            // A sender entry whose mailbox is gone (a delete cut short) is no mailbox.
            Ok(self
                .load(&recipient)
                .await?
                .filter(|record| record.sender_id == *id))
        })
    }

    fn secure<'a>(
        &'a self,
        id: &'a MailboxId,
        sender_key: PublicKey,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let prefix = self.mailbox_prefix(id);
            let reply = self
                .run(
                    &self.scripts.secure,
                    &format!("{prefix}:rec"),
                    &[prefix.as_bytes(), sender_key.as_bytes()],
                    true,
                )
                .await?;
            match bytes_of(&reply) {
                Some(b"ok") => Ok(()),
                Some(b"secured") => Err(StoreError::AlreadySecured),
                _ => Err(StoreError::MailboxNotFound),
            }
        })
    }

    fn put_checked<'a>(
        &'a self,
        id: &'a MailboxId,
        envelope: NewEnvelope,
        quota: Quota,
        now: u64,
        sender: SenderCheck,
    ) -> BoxFuture<'a, Result<PutOutcome, StoreError>> {
        Box::pin(async move {
            if envelope.expires_at <= now {
                return Err(StoreError::AlreadyExpired);
            }
            let bucket = bucket_end(envelope.expires_at, self.config.store.bucket_seconds);
            self.bucket_key(bucket, true).await?;
            let sealed = self
                .ring
                .seal(
                    bucket,
                    &envelope_aad(id.as_bytes(), envelope.id.as_bytes(), bucket),
                    &envelope.payload,
                )
                .ok_or_else(|| StoreError::Backend("sealing failed".into()))?;
            // Indexed for the sweep first: a put whose index entry is missing
            // would linger until its mailbox is next written. Once per bucket
            // and mailbox on this node is enough (the set is only read after
            // the bucket has passed).
            let fresh = !self
                .indexed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(&(bucket, *id));
            if fresh {
                let shard = id.as_bytes()[0] % SWEEP_SHARDS;
                self.query(
                    redis::cmd("SADD")
                        .arg(self.sweep_set(bucket, shard))
                        .arg(&id.as_bytes()[..])
                        .clone(),
                )
                .await?;
                self.indexed
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert((bucket, *id));
            }
            let prefix = self.mailbox_prefix(id);
            let len = envelope.payload.len() as u64;
            let (check, expected): (&[u8], &[u8]) = match &sender {
                SenderCheck::Any => (b"0", b""),
                SenderCheck::Expect(None) => (b"1", b""),
                SenderCheck::Expect(Some(key)) => (b"1", key.as_bytes()),
            };
            let (spent, spent_until) = envelope.spent.map_or((String::new(), 0), |spent| {
                (
                    hex::encode(spent.digest.as_bytes()),
                    record_until(spent.until),
                )
            });
            let reply = array(
                self.run(
                    &self.scripts.put,
                    &format!("{prefix}:rec"),
                    &[
                        prefix.as_bytes(),
                        envelope.id.as_bytes(),
                        bucket.to_string().as_bytes(),
                        now.to_string().as_bytes(),
                        &sealed,
                        len.to_string().as_bytes(),
                        quota.max_envelopes.to_string().as_bytes(),
                        quota.max_bytes.to_string().as_bytes(),
                        check,
                        expected,
                        spent.as_bytes(),
                        spent_until.to_string().as_bytes(),
                    ],
                    true,
                )
                .await?,
            )?;
            if !matches!(tag(reply.first()), b"missing" | b"sender") {
                self.expired(&reply, 2);
            }
            let number = reply.get(1).and_then(u64_of).unwrap_or(0);
            match tag(reply.first()) {
                b"stored" => {
                    self.adjust(1, len as i64);
                    self.wake.notify(id);
                    Ok(PutOutcome::Stored)
                }
                b"dup" => Ok(PutOutcome::Duplicate),
                b"count" => Err(StoreError::CountQuota {
                    stored: number,
                    limit: quota.max_envelopes,
                }),
                b"bytes" => Err(StoreError::ByteQuota {
                    stored: number,
                    adding: len,
                    limit: quota.max_bytes,
                }),
                b"sender" => Err(StoreError::SenderKeyChanged),
                _ => Err(StoreError::MailboxNotFound),
            }
        })
    }

    fn list<'a>(
        &'a self,
        id: &'a MailboxId,
        after: Option<u64>,
        limit: usize,
        now: u64,
    ) -> BoxFuture<'a, Result<Vec<StoredEnvelope>, StoreError>> {
        Box::pin(async move {
            let prefix = self.mailbox_prefix(id);
            let reply = array(
                self.run(
                    &self.scripts.list,
                    &format!("{prefix}:rec"),
                    &[
                        prefix.as_bytes(),
                        after.unwrap_or(0).to_string().as_bytes(),
                        limit.to_string().as_bytes(),
                        now.to_string().as_bytes(),
                    ],
                    false,
                )
                .await?,
            )?;
            if tag(reply.first()) == b"missing" {
                return Err(StoreError::MailboxNotFound);
            }
            let mut out = Vec::with_capacity(reply.len() / 4);
            for item in reply.chunks(4) {
                let [seq, expires_at, envelope_id, sealed] = item else {
                    return Err(corrupt("envelope list"));
                };
                let (Some(seq), Some(expires_at), Some(envelope_id), Some(sealed)) = (
                    u64_of(seq),
                    u64_of(expires_at),
                    bytes_of(envelope_id).and_then(EnvelopeId::from_slice),
                    bytes_of(sealed),
                ) else {
                    return Err(corrupt("envelope"));
                };
                // Its bucket key gone means the envelope expired everywhere.
                if !self.bucket_key(expires_at, false).await? {
                    continue;
                }
                // One that does not open (corrupted, or sealed under a bucket key
                // a failover lost, review F10) is left out and counted, not made
                // the whole mailbox's failure.
                let Some(payload) = self.ring.open(
                    expires_at,
                    &envelope_aad(id.as_bytes(), envelope_id.as_bytes(), expires_at),
                    sealed,
                ) else {
                    tracing::warn!("skipping a stored envelope that does not open");
                    self.unreadable.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                out.push(StoredEnvelope {
                    seq,
                    id: envelope_id,
                    expires_at,
                    payload,
                });
            }
            Ok(out)
        })
    }

    fn ack<'a>(
        &'a self,
        id: &'a MailboxId,
        envelope_ids: &'a [EnvelopeId],
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let prefix = self.mailbox_prefix(id);
            let unique: HashSet<&EnvelopeId> = envelope_ids.iter().collect();
            let mut args: Vec<&[u8]> = vec![prefix.as_bytes()];
            args.extend(unique.iter().map(|e| &e.as_bytes()[..]));
            let reply = array(
                self.run(&self.scripts.ack, &format!("{prefix}:rec"), &args, true)
                    .await?,
            )?;
            if tag(reply.first()) == b"missing" {
                return Err(StoreError::MailboxNotFound);
            }
            let deleted = reply.first().and_then(int_of).unwrap_or(0);
            let bytes = reply.get(1).and_then(int_of).unwrap_or(0);
            self.adjust(-deleted, -bytes);
            Ok(u64::try_from(deleted).unwrap_or(0))
        })
    }

    fn delete_mailbox<'a>(&'a self, id: &'a MailboxId) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let _in_flight = self.usage.begin();
            let prefix = self.mailbox_prefix(id);
            let reply = array(
                self.run(
                    &self.scripts.delete,
                    &format!("{prefix}:rec"),
                    &[prefix.as_bytes()],
                    true,
                )
                .await?,
            )?;
            let [sid, n, b] = reply.as_slice() else {
                return Ok(false);
            };
            self.unindex_idle(id).await?;
            self.deleted(id, sid, n, b).await?;
            Ok(true)
        })
    }

    fn keep_until<'a>(
        &'a self,
        id: &'a MailboxId,
        until: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let until = bucket_end(until, self.config.store.bucket_seconds);
            let prefix = self.mailbox_prefix(id);
            let reply = array(
                self.run(
                    &self.scripts.keep,
                    &format!("{prefix}:rec"),
                    &[prefix.as_bytes(), until.to_string().as_bytes()],
                    false,
                )
                .await?,
            )?;
            match tag(reply.first()) {
                // Record first, index after: an index entry left early by a
                // failure here is put back by the sweep, never acted on.
                b"kept" => self.index_idle(id, until).await,
                b"same" => Ok(()),
                _ => Err(StoreError::MailboxNotFound),
            }
        })
    }

    fn sweep(&self, now: u64) -> BoxFuture<'_, Result<SweepReport, StoreError>> {
        Box::pin(async move {
            let mut report = SweepReport::default();
            let buckets = array(
                self.query(
                    redis::cmd("ZRANGEBYSCORE")
                        .arg(self.buckets_key())
                        .arg("-inf")
                        .arg(now)
                        .clone(),
                )
                .await?,
            )?;
            for bucket in buckets.iter().filter_map(u64_of) {
                for shard in 0..SWEEP_SHARDS {
                    let set = self.sweep_set(bucket, shard);
                    let members =
                        array(self.query(redis::cmd("SMEMBERS").arg(&set).clone()).await?)?;
                    for member in &members {
                        let Some(id) = bytes_of(member).and_then(MailboxId::from_slice) else {
                            continue;
                        };
                        let prefix = self.mailbox_prefix(&id);
                        let reply = array(
                            self.run(
                                &self.scripts.expire,
                                &format!("{prefix}:rec"),
                                &[prefix.as_bytes(), now.to_string().as_bytes()],
                                false,
                            )
                            .await?,
                        )?;
                        let n = reply.first().and_then(int_of).unwrap_or(0);
                        report.expired_envelopes += u64::try_from(n).unwrap_or(0);
                        self.expired(&reply, 0);
                    }
                    self.query(redis::cmd("DEL").arg(&set).clone()).await?;
                }
                // Envelopes first, then the key: nobody finds one it cannot open.
                self.query(redis::cmd("DEL").arg(self.epoch_key(bucket)).clone())
                    .await?;
                self.query(
                    redis::cmd("ZREM")
                        .arg(self.buckets_key())
                        .arg(bucket)
                        .clone(),
                )
                .await?;
                report.shredded_buckets += 1;
            }
            for shard in 0..IDLE_SHARDS {
                loop {
                    let (removed, more) = self.sweep_idle(shard, now).await?;
                    report.expired_mailboxes += removed;
                    if !more {
                        break;
                    }
                }
            }
            self.ring.forget_through(now);
            self.indexed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .retain(|(bucket, _)| *bucket > now);
            Ok(report)
        })
    }

    fn stats(&self) -> StoreStats {
        let get = |counter: &AtomicI64| u64::try_from(counter.load(Ordering::Relaxed)).unwrap_or(0);
        StoreStats {
            mailboxes: self.usage.mailboxes.load(Ordering::SeqCst),
            envelopes: get(&self.envelopes),
            bytes: get(&self.bytes),
            memory: Some(MemoryUse {
                used: self.usage.used_memory.load(Ordering::Relaxed),
                limit: self.usage.max_memory.load(Ordering::Relaxed),
            }),
            unreadable_envelopes: self.unreadable.load(Ordering::Relaxed),
        }
    }

    fn subscribe(&self, id: &MailboxId) -> Subscription {
        let first = !self.wake.watched(id);
        let subscription = self.wake.subscribe(id);
        if first {
            // The watcher subscribes to the channel, records the presence, and
            // then wakes the stream once, so an envelope stored in between is
            // not missed. A closed watcher (shutdown) leaves local wake-ups only.
            let _ = self.watch.send(*id);
        }
        subscription
    }

    fn watched<'a>(&'a self, id: &'a MailboxId) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            if self.wake.watched(id) {
                return true;
            }
            // Another node's stream counts while its record is fresh; this node's
            // own (possibly stale) record does not: the hub above is the truth here.
            let key = format!("{}:w", self.mailbox_prefix(id));
            let Ok(value) = self.query(redis::cmd("HGETALL").arg(key).clone()).await else {
                // Unknown: a push is a harmless extra wake-up.
                return false;
            };
            let now = unix_now();
            pairs(value).iter().any(|(node, until)| {
                bytes_of(node) != Some(self.node.as_bytes())
                    && u64_of(until).is_some_and(|until| until > now)
            })
        })
    }

    fn set_push<'a>(
        &'a self,
        id: &'a MailboxId,
        push: Option<PushRegistration>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let prefix = self.mailbox_prefix(id);
            let (endpoint, token) = push
                .map(|p| (p.endpoint.into_bytes(), p.token))
                .unwrap_or_default();
            let reply = self
                .run(
                    &self.scripts.set_push,
                    &format!("{prefix}:rec"),
                    &[prefix.as_bytes(), &endpoint, &token],
                    false,
                )
                .await?;
            match bytes_of(&reply) {
                Some(b"ok") => Ok(()),
                _ => Err(StoreError::MailboxNotFound),
            }
        })
    }

    fn push<'a>(
        &'a self,
        id: &'a MailboxId,
    ) -> BoxFuture<'a, Result<Option<PushRegistration>, StoreError>> {
        Box::pin(async move {
            let rec = format!("{}:rec", self.mailbox_prefix(id));
            let fields = array(
                self.query(redis::cmd("HMGET").arg(rec).arg("pe").arg("pt").clone())
                    .await?,
            )?;
            match fields.as_slice() {
                [endpoint, token] if !matches!(endpoint, Value::Nil) => {
                    Ok(Some(PushRegistration {
                        endpoint: String::from_utf8(
                            bytes_of(endpoint).unwrap_or_default().to_vec(),
                        )
                        .map_err(|_| corrupt("push registration"))?,
                        token: bytes_of(token).unwrap_or_default().to_vec(),
                    }))
                }
                _ => Ok(None),
            }
        })
    }

    fn remember_request<'a>(
        &'a self,
        digest: &'a RequestDigest,
        until: u64,
        now: u64,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let until = record_until(until);
            // Its own slot per digest, so a flood of them spreads over the
            // cluster. Compared with the caller's `now` like every backend;
            // Redis drops it by itself at `until` (or a second from now, for
            // a caller whose clock is behind Redis's).
            let key = format!(
                "{}:{{q{}}}",
                self.config.namespace,
                hex::encode(digest.as_bytes())
            );
            let expire_at = until.max(unix_now().saturating_add(1));
            let reply = self
                .run(
                    &self.scripts.remember_request,
                    &key,
                    &[
                        until.to_string().as_bytes(),
                        now.to_string().as_bytes(),
                        expire_at.to_string().as_bytes(),
                    ],
                    true,
                )
                .await?;
            Ok(int_of(&reply) == Some(1))
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        // Every acknowledged write already waited for its replicas.
        Box::pin(async { Ok(()) })
    }

    fn fatal_error(&self) -> Option<StoreError> {
        self.usage
            .persists
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .map(StoreError::Persists)
    }
}

impl DirectoryStore for RedisStore {
    fn publish_prekeys<'a>(
        &'a self,
        device: &'a DeviceKey,
        upload: PrekeyUpload,
    ) -> BoxFuture<'a, Result<PrekeyCount, StoreError>> {
        Box::pin(async move {
            let prefix = self.directory_prefix();
            let device_hex = hex::encode(device.as_bytes());
            let mut args: Vec<Vec<u8>> = vec![
                prefix.clone().into_bytes(),
                device_hex.into_bytes(),
                upload.signed_prekey,
                upload.kem_last_resort,
            ];
            for list in [upload.one_time, upload.kem_one_time] {
                args.push(list.len().to_string().into_bytes());
                for (id, blob) in list {
                    args.push(id.to_string().into_bytes());
                    args.push(blob);
                }
            }
            args.push(MAX_ONE_TIME_PREKEYS.to_string().into_bytes());
            let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            let reply = array(
                self.run(
                    &self.scripts.publish_prekeys,
                    &format!("{prefix}:cap"),
                    &refs,
                    true,
                )
                .await?,
            )?;
            match tag(reply.first()) {
                b"ok" => Ok(PrekeyCount {
                    one_time: reply.get(1).and_then(u64_of).unwrap_or(0) as u32,
                    kem_one_time: reply.get(2).and_then(u64_of).unwrap_or(0) as u32,
                }),
                _ => Err(StoreError::TooManyPrekeys {
                    limit: MAX_ONE_TIME_PREKEYS,
                }),
            }
        })
    }

    fn prekey_count<'a>(
        &'a self,
        device: &'a DeviceKey,
    ) -> BoxFuture<'a, Result<Option<PrekeyCount>, StoreError>> {
        Box::pin(async move {
            let prefix = self.directory_prefix();
            let device_hex = hex::encode(device.as_bytes());
            let mut pipeline = redis::pipe();
            pipeline
                .cmd("EXISTS")
                .arg(format!("{prefix}:dev:{device_hex}"))
                .cmd("HLEN")
                .arg(format!("{prefix}:ot:{device_hex}"))
                .cmd("HLEN")
                .arg(format!("{prefix}:kot:{device_hex}"));
            let mut connection = self.connection.clone();
            let replies: Vec<Value> = pipeline
                .query_async(&mut connection)
                .await
                .map_err(backend)?;
            if replies.first().and_then(int_of) != Some(1) {
                return Ok(None);
            }
            Ok(Some(PrekeyCount {
                one_time: replies.get(1).and_then(u64_of).unwrap_or(0) as u32,
                kem_one_time: replies.get(2).and_then(u64_of).unwrap_or(0) as u32,
            }))
        })
    }

    fn remove_prekeys<'a>(
        &'a self,
        device: &'a DeviceKey,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let prefix = self.directory_prefix();
            let device_hex = hex::encode(device.as_bytes());
            // One slot ({dir}): one DEL removes them together.
            let mut command = redis::cmd("DEL");
            for kind in ["dev", "ot", "otz", "kot", "kotz"] {
                command.arg(format!("{prefix}:{kind}:{device_hex}"));
            }
            self.query(command).await?;
            Ok(())
        })
    }

    fn set_capacity<'a>(
        &'a self,
        supporter: &'a SupporterKey,
        capacity: u32,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.query(
                redis::cmd("HSET")
                    .arg(format!("{}:cap", self.directory_prefix()))
                    .arg(&supporter.as_bytes()[..])
                    .arg(capacity)
                    .clone(),
            )
            .await?;
            Ok(())
        })
    }

    fn capacity<'a>(
        &'a self,
        supporter: &'a SupporterKey,
    ) -> BoxFuture<'a, Result<u32, StoreError>> {
        Box::pin(async move {
            let value = self
                .query(
                    redis::cmd("HGET")
                        .arg(format!("{}:cap", self.directory_prefix()))
                        .arg(&supporter.as_bytes()[..])
                        .clone(),
                )
                .await?;
            Ok(u64_of(&value).unwrap_or(0) as u32)
        })
    }

    fn claim_bundles<'a>(
        &'a self,
        supporter: &'a SupporterKey,
        devices: &'a [DeviceKey],
    ) -> BoxFuture<'a, Result<Vec<ClaimedBundle>, StoreError>> {
        Box::pin(async move {
            let prefix = self.directory_prefix();
            let hexes: Vec<String> = devices.iter().map(|d| hex::encode(d.as_bytes())).collect();
            let mut args: Vec<&[u8]> = vec![prefix.as_bytes(), supporter.as_bytes()];
            args.extend(hexes.iter().map(String::as_bytes));
            let reply = array(
                self.run(&self.scripts.claim, &format!("{prefix}:cap"), &args, true)
                    .await?,
            )?;
            match tag(reply.first()) {
                b"ok" => {}
                b"exhausted" => return Err(StoreError::CapacityExhausted),
                _ => return Err(StoreError::NoPrekeys),
            }
            let mut bundles = Vec::new();
            for item in reply[1..].chunks(4) {
                let [device, signed, one_time, kem] = item else {
                    return Err(corrupt("claimed bundle"));
                };
                let device = devices
                    .iter()
                    .zip(&hexes)
                    .find(|(_, h)| h.as_bytes() == tag(Some(device)))
                    .map(|(d, _)| *d)
                    .ok_or_else(|| corrupt("claimed bundle"))?;
                let one_time = bytes_of(one_time).unwrap_or_default();
                bundles.push(ClaimedBundle {
                    device,
                    signed_prekey: bytes_of(signed).unwrap_or_default().to_vec(),
                    one_time: (!one_time.is_empty()).then(|| one_time.to_vec()),
                    kem: bytes_of(kem).unwrap_or_default().to_vec(),
                });
            }
            Ok(bundles)
        })
    }

    fn put_document<'a>(
        &'a self,
        kind: DocumentKind,
        supporter: &'a SupporterKey,
        document: Vec<u8>,
        version: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let prefix = self.directory_prefix();
            let versioned = if kind.is_versioned() { b"1" } else { b"0" };
            let kind_name = kind.to_byte().to_string();
            let reply = array(
                self.run(
                    &self.scripts.put_document,
                    &format!("{prefix}:cap"),
                    &[
                        prefix.as_bytes(),
                        kind_name.as_bytes(),
                        supporter.as_bytes(),
                        &document,
                        version.to_string().as_bytes(),
                        versioned,
                    ],
                    true,
                )
                .await?,
            )?;
            match tag(reply.first()) {
                b"ok" => Ok(()),
                b"conflict" => Err(StoreError::ConflictingDocument { version }),
                _ => Err(StoreError::StaleDocument {
                    stored: reply.get(1).and_then(u64_of).unwrap_or(0),
                    found: version,
                }),
            }
        })
    }

    fn document<'a>(
        &'a self,
        kind: DocumentKind,
        supporter: &'a SupporterKey,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
        Box::pin(async move {
            let key = format!("{}:doc:{}", self.directory_prefix(), kind.to_byte());
            let value = self
                .query(
                    redis::cmd("HGET")
                        .arg(key)
                        .arg(&supporter.as_bytes()[..])
                        .clone(),
                )
                .await?;
            Ok(bytes_of(&value).map(<[u8]>::to_vec))
        })
    }

    fn documents(&self, kind: DocumentKind) -> BoxFuture<'_, Result<Documents, StoreError>> {
        Box::pin(async move {
            let key = format!("{}:doc:{}", self.directory_prefix(), kind.to_byte());
            let value = self.query(redis::cmd("HGETALL").arg(key).clone()).await?;
            let mut out: Documents = pairs(value)
                .iter()
                .filter_map(|(k, v)| {
                    Some((
                        bytes_of(k).and_then(SupporterKey::from_slice)?,
                        bytes_of(v)?.to_vec(),
                    ))
                })
                .collect();
            out.sort_by_key(|(supporter, _)| *supporter);
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nodes the disk check asks, from `CLUSTER NODES` lines as Redis
    /// 7 writes them (third fresh review: IPv6, announced hostnames under
    /// TLS, nodes that may have failed).
    #[test]
    fn the_disk_check_finds_every_live_node_in_cluster_nodes() {
        let line = |address: &str, flags: &str| {
            format!("07c37dfeb235213a872192d90877d0cd55635b91 {address} {flags} - 0 0 1 connected")
        };
        let cases = [
            (
                line("127.0.0.1:30004@31004", "slave"),
                false,
                Some(("127.0.0.1", 30004)),
            ),
            (
                line("[::1]:7000@17000", "myself,master"),
                false,
                Some(("::1", 7000)),
            ),
            (line("::1:7000@17000", "master"), false, Some(("::1", 7000))),
            (
                line("10.0.0.5:6379@16379,redis-3.example", "master"),
                true,
                Some(("redis-3.example", 6379)),
            ),
            (
                line("10.0.0.5:6379@16379,redis-3.example", "master"),
                false,
                Some(("10.0.0.5", 6379)),
            ),
            (line(":0@0", "master,noaddr"), false, None),
            (line("10.0.0.6:6379@16379", "slave,fail?"), false, None),
            (
                line("10.0.0.6:6379@16379", "slave,fail?"),
                true,
                Some(("10.0.0.6", 6379)),
            ),
            (line("10.0.0.6:6379@16379", "slave,fail"), false, None),
            ("garbage".to_owned(), false, None),
        ];
        for (text, tls, expected) in cases {
            // The TLS cases are also the ones that ask suspected nodes.
            let found = node_address(&text, tls, !tls);
            assert_eq!(
                found.as_ref().map(|(host, port)| (host.as_str(), *port)),
                expected,
                "{text}"
            );
        }
    }

    #[test]
    fn a_config_answer_that_does_not_parse_is_no_value() {
        assert_eq!(config_value(&Value::Nil), None);
        assert_eq!(config_value(&Value::Array(vec![])), None);
        assert_eq!(
            config_value(&Value::Array(vec![
                Value::BulkString(b"save".to_vec()),
                Value::BulkString(Vec::new()),
            ])),
            Some(String::new())
        );
    }
}
