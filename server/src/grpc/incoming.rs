//! Accepted connections, bounded: at most `max_connections` are open at once;
//! beyond that the relay stops accepting until one closes (the kernel's backlog
//! holds the rest), at most `max_connections_per_address` come from one
//! source address (IPv6: one /64), and at most
//! [`crate::config::Config::connections_per_network`] from one network (IPv6:
//! one /48; fresh adversarial review: 40 /64s of one /48 held every slot).
//! Both are counted under a per-boot salted hash (`address`); the address
//! itself is dropped at accept and never stored.
//!
//! Every connection is closed by the relay when it stops being useful, enforced
//! here, on the socket itself, so it covers TLS (which tonic runs on top of
//! this stream) and HTTP/2 alike:
//! - before its first request, after the handshake timeout (review F4): a
//!   silent socket, a TLS handshake that never finishes, or an HTTP/2 preface
//!   with nothing after it;
//! - after the idle timeout with no call busy (review H1: one health check
//!   used to keep a connection, and its slot, for `max_connection_age`). A
//!   call is busy while it waits for its response head (which the request
//!   timeout and, for `Receive`, the stream open timeout bound), while its
//!   response has bytes to send, and, if it is an authenticated `Receive`
//!   stream, for as long as it lasts (fresh review H-C: any open call used to
//!   count, and `Health/Watch` or a reflection stream never end, so one kept
//!   a connection for free). Other streams live on while the connection does;
//! - when one of its responses has had bytes waiting to be sent, and taken
//!   none, for the stall timeout (review H4): a client that never opens its
//!   HTTP/2 receive window would otherwise keep every response it asked for in
//!   the relay's memory. Closing the connection is the one way to free what
//!   hyper and h2 hold for it;
//! - when the socket has refused bytes written to it, and taken none since,
//!   for the stall timeout (fresh review H-E): a client that stops reading
//!   TCP. h2 reads nothing while a frame it owes (a PONG, a SETTINGS ack,
//!   hyper's keep-alive PING or GOAWAY) waits for the full socket, so these
//!   deadlines are looked at on writes as well as on reads.
//!
//! The edge layer (`edge`) tells the connection when a call starts, when its
//! response head comes and its body makes progress, and when it ends; the
//! `Receive` handler tells it, through the [`CallHandle`] in the request's
//! extensions, that its stream authenticated.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::Extensions;
use tonic::transport::server::{Connected, TlsConnectInfo};

use super::address::{AddressKey, AddressSalt, Crowded, PerSource, SourceSlot};
use crate::relay::{Bucket, Rate};

/// Connections over their address's or network's cap that are answered with a clear
/// RESOURCE_EXHAUSTED at once; beyond this many at a time they are just closed.
/// They take no connection permit, so they cannot fill the relay either.
const MAX_REFUSING: usize = 64;

/// How long a refused connection stays open after its last answer, so that the
/// answer is flushed before the socket closes.
const REFUSED_LINGER: Duration = Duration::from_secs(1);

/// Bounds on each accepted connection.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Most connections from one source address (IPv6: one /64); 0: no cap.
    /// One network (IPv6: one /48) holds at most
    /// [`ConnectionLimits::connections_per_network`] together.
    pub connections_per_address: usize,
    /// How long a connection may take to make its first request.
    pub handshake_timeout: Duration,
    /// How long a connection may stay open with no call busy.
    pub idle_timeout: Duration,
    /// How long a pending response, or the socket, may take no bytes.
    pub stall_timeout: Duration,
    /// Most authenticated `Receive` streams on one connection.
    pub streams_per_connection: usize,
    /// Most `Receive` streams on one connection still waiting for `open`.
    pub opening_per_connection: usize,
    /// Most response bytes (in KiB) one connection's calls may hold in memory.
    pub response_kib_per_connection: usize,
}

impl ConnectionLimits {
    /// Most connections from one network (IPv6: one /48; 0: no cap), derived
    /// from the relay-wide and per-address caps as the configuration derives
    /// what GetInfo publishes.
    pub fn connections_per_network(&self) -> usize {
        crate::config::connections_per_network(self.max_connections, self.connections_per_address)
    }

    /// The per-address and per-network counts of accepted connections.
    /// The network cap binds once half of `max_connections` is open.
    fn counts(&self) -> PerSource {
        PerSource::new(self.connections_per_address, self.connections_per_network())
            .with_network_cap_from(self.max_connections / 2)
    }
}

/// The counting half of an accept: the salted hashes `peer` counts under
/// (the address goes no further), and its place in their counts, or which
/// cap refused it.
fn admit(
    salt: &AddressSalt,
    counts: &PerSource,
    peer: SocketAddr,
) -> ((AddressKey, AddressKey), Result<SourceSlot, Crowded>) {
    let address = salt.key(peer.ip());
    let network = salt.network_key(peer.ip());
    ((address, network), counts.take(address, network))
}

/// What a call learns about its connection: never who is at the other end,
/// only the connection's own budgets and, for per-address caps, the salted
/// hash its address counts under.
#[derive(Clone)]
pub struct ConnectionState(Arc<Shared>);

struct Shared {
    /// Calls and response progress; std Mutex: never held across an await.
    activity: Mutex<Activity>,
    /// Authenticated `Receive` streams of this connection.
    streams: Arc<Semaphore>,
    /// `Receive` streams of this connection that have not authenticated yet.
    opening: Arc<Semaphore>,
    /// Response bytes (KiB) this connection's calls hold (review H4).
    responses: Arc<Semaphore>,
    /// This connection's `ClaimBundles` token bucket, full until first used
    /// (review F7). std Mutex: never held across an await.
    claims: Mutex<Option<Bucket>>,
    /// The salted hash the peer's address counts under.
    address: AddressKey,
    /// The salted hash the peer's network (IPv6 /48) counts under.
    network: AddressKey,
    /// Over its address's or its network's connection cap: every call is
    /// refused.
    refused: Option<Crowded>,
}

/// What the connection's deadlines depend on.
struct Activity {
    /// Set by the first request; until then the handshake deadline runs.
    requested: bool,
    /// Calls started and not yet finished (their response body dropped), by id.
    calls: HashMap<u64, Call>,
    /// The next call id.
    next_call: u64,
    /// How many of `calls` are busy (see [`Call::busy`]).
    busy: usize,
    /// When the last busy call stopped being busy.
    idle_since: Instant,
}

/// What one open call does now.
#[derive(Clone, Copy, Default)]
struct Call {
    /// Its response head has come: from then on only an authenticated stream
    /// or bytes to send keep it busy.
    answered: bool,
    /// An authenticated `Receive` stream: busy for as long as it lasts.
    lasting: bool,
    /// Its response may have bytes waiting, and made progress last then.
    waiting: Option<Instant>,
}

impl Call {
    /// Whether this call keeps its connection from being idle.
    fn busy(&self) -> bool {
        !self.answered || self.lasting || self.waiting.is_some()
    }
}

impl Activity {
    /// Changes call `id`, if it is still open, keeping `busy` and
    /// `idle_since` true to it.
    fn change(&mut self, id: u64, change: impl FnOnce(&mut Call)) {
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        let before = call.busy();
        change(call);
        let after = call.busy();
        self.account(before, after);
    }

    fn account(&mut self, before: bool, after: bool) {
        match (before, after) {
            (false, true) => self.busy += 1,
            (true, false) => {
                self.busy = self.busy.saturating_sub(1);
                if self.busy == 0 {
                    self.idle_since = Instant::now();
                }
            }
            _ => {}
        }
    }
}

/// Why the relay closes a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Closing {
    Handshake,
    Idle,
    Stalled,
}

impl Closing {
    fn label(self) -> &'static str {
        match self {
            Self::Handshake => "handshake",
            Self::Idle => "idle",
            Self::Stalled => "stalled",
        }
    }

    /// Logs and counts the close.
    fn record(self) {
        tracing::debug!(reason = self.label(), "closing a connection");
        metrics::counter!("haven_connections_closed_total", "reason" => self.label()).increment(1);
    }

    /// The error that ends the connection's IO.
    fn error(self) -> io::Error {
        match self {
            Self::Handshake => io::Error::new(
                io::ErrorKind::TimedOut,
                "no request within the handshake timeout",
            ),
            Self::Idle => io::Error::new(
                io::ErrorKind::TimedOut,
                "no call busy within the idle timeout",
            ),
            Self::Stalled => io::Error::new(
                io::ErrorKind::TimedOut,
                "a response or the socket took no bytes within the stall timeout",
            ),
        }
    }
}

impl ConnectionState {
    fn new(
        limits: &ConnectionLimits,
        (address, network): (AddressKey, AddressKey),
        refused: Option<Crowded>,
    ) -> Self {
        Self(Arc::new(Shared {
            activity: Mutex::new(Activity {
                requested: false,
                calls: HashMap::new(),
                next_call: 0,
                busy: 0,
                idle_since: Instant::now(),
            }),
            streams: Arc::new(Semaphore::new(limits.streams_per_connection)),
            opening: Arc::new(Semaphore::new(limits.opening_per_connection)),
            responses: Arc::new(Semaphore::new(limits.response_kib_per_connection)),
            claims: Mutex::new(None),
            address,
            network,
            refused,
        }))
    }

    /// The state of the connection a request came on, over TLS or not.
    pub fn of(extensions: &Extensions) -> Option<&Self> {
        extensions.get::<Self>().or_else(|| {
            extensions
                .get::<TlsConnectInfo<Self>>()
                .map(TlsConnectInfo::get_ref)
        })
    }

    fn activity(&self) -> std::sync::MutexGuard<'_, Activity> {
        self.0
            .activity
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A call started on this connection: its handshake deadline no longer
    /// applies, and the call is busy until its response head comes (see
    /// [`CallGuard`]); it is open until the returned guard is dropped.
    pub fn call_started(&self) -> CallGuard {
        let mut activity = self.activity();
        activity.requested = true;
        let id = activity.next_call;
        activity.next_call = activity.next_call.wrapping_add(1);
        activity.calls.insert(id, Call::default());
        activity.account(false, true);
        CallGuard {
            handle: CallHandle {
                connection: self.clone(),
                id,
            },
        }
    }

    /// Whether this connection is over its address's or its network's cap
    /// (every call refused).
    pub fn refused(&self) -> bool {
        self.0.refused.is_some()
    }

    /// What every call of a refused connection is told: which cap it is over,
    /// never who it is.
    pub fn refusal(&self) -> Option<&'static str> {
        self.0.refused.map(|crowded| match crowded {
            Crowded::Address => "too many connections from this address; close some or retry later",
            Crowded::Network => "too many connections from this network; close some or retry later",
        })
    }

    /// The salted hash of the peer's address, for per-address caps.
    pub fn address(&self) -> AddressKey {
        self.0.address
    }

    /// The salted hash of the peer's network (IPv6: its /48), for the
    /// shares of the response budget.
    pub fn network(&self) -> AddressKey {
        self.0.network
    }

    /// The connection's authenticated stream budget.
    pub fn streams(&self) -> &Arc<Semaphore> {
        &self.0.streams
    }

    /// The connection's budget of response bytes held in memory, in KiB.
    pub fn responses(&self) -> &Arc<Semaphore> {
        &self.0.responses
    }

    /// Whether this connection may make another claim now (taking its token).
    pub fn allow_claim(&self, rate: Rate, now_ms: u64) -> bool {
        let mut bucket = self
            .0
            .claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        bucket
            .get_or_insert_with(|| Bucket::full(rate, now_ms))
            .take(rate, now_ms)
    }

    /// The connection's budget of streams waiting for `open`.
    pub fn opening(&self) -> &Arc<Semaphore> {
        &self.0.opening
    }

    /// When the relay must next look at this connection, or why it closes it now.
    fn due(&self, now: Instant, timeouts: &Timeouts) -> Result<Instant, Closing> {
        // A refused connection gets its answers, and no more than the handshake
        // timeout, however busy it keeps itself.
        if self.0.refused.is_some() && now >= timeouts.accepted + timeouts.handshake {
            return Err(Closing::Idle);
        }
        let activity = self.activity();
        if !activity.requested {
            let deadline = timeouts.accepted + timeouts.handshake;
            return if now >= deadline {
                Err(Closing::Handshake)
            } else {
                Ok(deadline)
            };
        }
        if activity.busy == 0 {
            let deadline = activity.idle_since + timeouts.idle;
            return if now >= deadline {
                Err(Closing::Idle)
            } else {
                Ok(deadline)
            };
        }
        match activity
            .calls
            .values()
            .filter_map(|call| call.waiting)
            .min()
        {
            Some(oldest) if now >= oldest + timeouts.stall => Err(Closing::Stalled),
            Some(oldest) => Ok(oldest + timeouts.stall),
            // New deadlines can only arise at least this far ahead (a call
            // no longer busy starts the idle clock, a response starts the
            // stall clock, so does a write the socket refuses), so looking
            // again then never misses one.
            None => Ok(now + timeouts.heartbeat()),
        }
    }
}

/// One call of a connection, as its handler finds it in the request's
/// extensions (the edge layer puts it there).
#[derive(Clone)]
pub struct CallHandle {
    connection: ConnectionState,
    id: u64,
}

impl CallHandle {
    /// The handle of the call `extensions` belong to, if it came through
    /// the edge layer.
    pub fn of(extensions: &Extensions) -> Option<&Self> {
        extensions.get::<Self>()
    }

    /// This call is an authenticated stream, worth its connection: it keeps
    /// the connection open, however quiet, for as long as it lasts. Only
    /// `Receive` says so, once its `open` is authenticated and admitted;
    /// no stream anyone may open without a key does (fresh review H-C).
    pub fn authenticated_stream(&self) {
        self.connection
            .activity()
            .change(self.id, |call| call.lasting = true);
    }
}

/// One call of a connection, from its request until its response body is
/// dropped; see [`ConnectionState::call_started`].
pub struct CallGuard {
    handle: CallHandle,
}

impl CallGuard {
    /// The handle to put in the request's extensions.
    pub fn handle(&self) -> CallHandle {
        self.handle.clone()
    }

    fn change(&self, change: impl FnOnce(&mut Call)) {
        self.handle
            .connection
            .activity()
            .change(self.handle.id, change);
    }

    /// The response head came and the body may hold bytes to send: its stall
    /// clock starts, and the call is no longer waiting for an answer.
    pub fn responding(&mut self) {
        let now = Instant::now();
        self.change(|call| {
            call.answered = true;
            call.waiting = Some(now);
        });
    }

    /// The response handed bytes on: it may hold more, and its clock restarts.
    pub fn progressed(&self) {
        let now = Instant::now();
        self.change(|call| {
            if call.answered {
                call.waiting = Some(now);
            }
        });
    }

    /// The response has nothing to send right now (a quiet stream).
    pub fn settled(&self) {
        self.change(|call| call.waiting = None);
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let mut activity = self.handle.connection.activity();
        if let Some(call) = activity.calls.remove(&self.handle.id) {
            activity.account(call.busy(), false);
        }
    }
}

/// A connection's timeouts, from its accept.
struct Timeouts {
    accepted: Instant,
    handshake: Duration,
    idle: Duration,
    stall: Duration,
}

impl Timeouts {
    fn heartbeat(&self) -> Duration {
        self.idle.min(self.stall)
    }
}

/// A client connection holding one of the connection permits (or, refused,
/// one of the few refusal permits).
pub struct LimitedConnection {
    stream: TcpStream,
    state: ConnectionState,
    timeouts: Timeouts,
    /// The next time the connection's deadlines are looked at.
    timer: Pin<Box<Sleep>>,
    /// Since when the socket has refused the bytes written to it, if it has
    /// taken none since (fresh review H-E).
    write_refused: Option<Instant>,
    _permit: OwnedSemaphorePermit,
    /// Its place in its address's and its network's counts.
    _source: Option<SourceSlot>,
}

/// The stream of accepted connections for tonic.
pub fn limited(
    listener: TcpListener,
    limits: ConnectionLimits,
) -> impl Stream<Item = Result<LimitedConnection, io::Error>> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let per_source = limits.counts();
    let salt = AddressSalt::random();
    let state = (listener, permits, refusing, per_source, salt);
    futures::stream::unfold(state, move |state| async move {
        let (listener, permits, refusing, per_source, salt) = state;
        let permit = Arc::clone(&permits).acquire_owned().await.ok()?;
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    // The address becomes its salted hashes here; nothing keeps it.
                    let ((address, network), admitted) = admit(&salt, &per_source, peer);
                    // Small frames (acks, wake-ups) must not wait for Nagle.
                    if let Err(error) = stream.set_nodelay(true) {
                        tracing::debug!(%error, "could not set TCP_NODELAY");
                    }
                    let (refused, held, slot) = match admitted {
                        Ok(slot) => (None, permit, Some(slot)),
                        Err(crowded) => {
                            metrics::counter!(
                                "haven_connections_refused_total",
                                "reason" => match crowded {
                                    Crowded::Address => "per_address",
                                    Crowded::Network => "per_network",
                                }
                            )
                            .increment(1);
                            // Answered with a status on one of the few refusal
                            // permits, so that it takes no connection permit.
                            match Arc::clone(&refusing).try_acquire_owned() {
                                Ok(refusal) => (Some(crowded), refusal, None),
                                Err(_) => {
                                    drop(stream);
                                    continue;
                                }
                            }
                        }
                    };
                    let accepted = Instant::now();
                    let timeouts = Timeouts {
                        accepted,
                        handshake: limits.handshake_timeout,
                        idle: if refused.is_some() {
                            REFUSED_LINGER
                        } else {
                            limits.idle_timeout
                        },
                        stall: limits.stall_timeout,
                    };
                    let connection = LimitedConnection {
                        stream,
                        state: ConnectionState::new(&limits, (address, network), refused),
                        timer: Box::pin(tokio::time::sleep_until(
                            accepted + limits.handshake_timeout,
                        )),
                        timeouts,
                        write_refused: None,
                        _permit: held,
                        _source: slot,
                    };
                    return Some((
                        Ok(connection),
                        (listener, permits, refusing, per_source, salt),
                    ));
                }
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of
                    // spinning, and keep serving the connections already open.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

impl Connected for LimitedConnection {
    /// The connection's budgets only: the relay does not look at who connects.
    type ConnectInfo = ConnectionState;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.state.clone()
    }
}

impl LimitedConnection {
    /// Looks at the connection's deadlines: why it closes now, if one has
    /// passed; otherwise the timer is set to the next and registered with
    /// this task, so that a connection that goes quiet, or whose socket stays
    /// full, is woken, and looked at again, when it passes. Called on reads
    /// and on refused writes alike: h2 does not read while it waits to write.
    fn look(&mut self, cx: &mut Context<'_>) -> Result<(), Closing> {
        loop {
            let now = Instant::now();
            let mut deadline = self.state.due(now, &self.timeouts)?;
            if let Some(since) = self.write_refused {
                let stalled = since + self.timeouts.stall;
                if now >= stalled {
                    return Err(Closing::Stalled);
                }
                deadline = deadline.min(stalled);
            }
            if self.timer.deadline() != deadline {
                self.timer.as_mut().reset(deadline);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Ok(());
            }
        }
    }

    /// The socket refused a write (or flush): its stall clock starts, if it
    /// has not already, and the deadlines are looked at; the error to end
    /// the connection with if one has passed.
    fn refused<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        self.write_refused.get_or_insert_with(Instant::now);
        match self.look(cx) {
            Ok(()) => Poll::Pending,
            Err(closing) => {
                closing.record();
                Poll::Ready(Err(closing.error()))
            }
        }
    }

    /// A write's outcome: one the socket took bytes of stops its stall clock.
    fn written(
        &mut self,
        cx: &mut Context<'_>,
        outcome: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match outcome {
            Poll::Pending => self.refused(cx),
            Poll::Ready(Ok(written)) if written > 0 => {
                self.write_refused = None;
                Poll::Ready(Ok(written))
            }
            ready => ready,
        }
    }
}

impl AsyncRead for LimitedConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.look(cx) {
            Ok(()) => Pin::new(&mut self.stream).poll_read(cx, buf),
            Err(closing) => {
                closing.record();
                Poll::Ready(match closing {
                    // End of stream: HTTP/2 sees the peer go and ends cleanly.
                    Closing::Idle => Ok(()),
                    Closing::Handshake | Closing::Stalled => Err(closing.error()),
                })
            }
        }
    }
}

impl AsyncWrite for LimitedConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let outcome = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.written(cx, outcome)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let outcome = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.written(cx, outcome)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A flush that completes says nothing of the writes refused before it.
        match Pin::new(&mut self.stream).poll_flush(cx) {
            Poll::Pending => self.refused(cx),
            ready => ready,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection_limits(
        max_connections: usize,
        connections_per_address: usize,
    ) -> ConnectionLimits {
        ConnectionLimits {
            max_connections,
            connections_per_address,
            handshake_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            stall_timeout: Duration::from_secs(1),
            streams_per_connection: 1,
            opening_per_connection: 1,
            response_kib_per_connection: 1,
        }
    }

    fn peer(text: &str) -> SocketAddr {
        text.parse().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Fresh adversarial review: accepted connections counted per /64 only,
    /// so 40 /64s of one /48 at 250 connections each held all 10 000 slots.
    /// Here 3 /64s of one /48 (64 slots, 2 per address: 4 per network) get
    /// 4 connections together, and another /48 is still accepted.
    #[test]
    fn connections_from_the_64s_of_one_48_are_capped_together() {
        let limits = connection_limits(64, 2);
        assert_eq!(limits.connections_per_network(), 4);
        let salt = AddressSalt::random();
        let counts = limits.counts();
        // While the relay has room (under half of its 64 slots open), a /48
        // is held only to its /64s' caps: a carrier's /48 shared by many
        // subscribers is not one client (second fresh review M2).
        let roomy: Vec<_> = [
            "[2001:db8:5:1::1]:1",
            "[2001:db8:5:2::1]:1",
            "[2001:db8:5:3::1]:1",
        ]
        .into_iter()
        .flat_map(|source| [source, source])
        .map(|source| admit(&salt, &counts, peer(source)).1)
        .collect();
        assert!(
            roomy.iter().all(Result::is_ok),
            "six from one /48 while there is room"
        );
        drop(roomy);
        // Past half, every network takes at most its share.
        let fillers: Vec<_> = (0..28u8)
            .map(|n| admit(&salt, &counts, peer(&format!("198.51.100.{n}:1"))).1)
            .collect();
        assert!(fillers.iter().all(Result::is_ok));
        let mut held = Vec::new();
        for source in ["[2001:db8:5:1::1]:1000", "[2001:db8:5:2::9]:2000"] {
            for _ in 0..2 {
                held.push(admit(&salt, &counts, peer(source)).1);
            }
        }
        assert!(held.iter().all(Result::is_ok));
        let (_, fifth) = admit(&salt, &counts, peer("[2001:db8:5:3::1]:3000"));
        assert_eq!(fifth.err(), Some(Crowded::Network));
        let (_, elsewhere) = admit(&salt, &counts, peer("[2001:db8:6:3::1]:3000"));
        assert!(elsewhere.is_ok(), "another /48 is accepted");
        let (_, same_64) = admit(&salt, &counts, peer("[2001:db8:6:3::2]:3001"));
        assert!(same_64.is_ok());
        let (_, third) = admit(&salt, &counts, peer("[2001:db8:6:3::3]:3002"));
        assert_eq!(
            third.err(),
            Some(Crowded::Address),
            "the /64 cap still holds"
        );
        // IPv4: the address is its own network, and its cap binds.
        for _ in 0..2 {
            held.push(admit(&salt, &counts, peer("192.0.2.1:1000")).1);
        }
        let (_, over) = admit(&salt, &counts, peer("192.0.2.1:1001"));
        assert_eq!(over.err(), Some(Crowded::Address));
        // Without a per-address cap (behind a proxy) there is no network cap
        // either, and nothing is counted.
        let proxied = connection_limits(64, 0);
        assert_eq!(proxied.connections_per_network(), 0);
        let open = proxied.counts();
        let all: Vec<_> = (0..10)
            .map(|_| admit(&salt, &open, peer("[2001:db8:5:1::1]:1")).1)
            .collect();
        assert!(all.iter().all(Result::is_ok));
        assert_eq!(open.sources(), (0, 0));
    }

    /// A refused connection says which cap it is over, and nothing else.
    #[test]
    fn a_refused_connection_names_the_cap_it_is_over() {
        let salt = AddressSalt::random();
        let keys = (
            salt.key(peer("[2001:db8::1]:1").ip()),
            salt.network_key(peer("[2001:db8::1]:1").ip()),
        );
        let limits = connection_limits(64, 2);
        let network = ConnectionState::new(&limits, keys, Some(Crowded::Network));
        assert!(network.refused());
        assert_eq!(
            network.refusal(),
            Some("too many connections from this network; close some or retry later")
        );
        let address = ConnectionState::new(&limits, keys, Some(Crowded::Address));
        assert!(
            address
                .refusal()
                .is_some_and(|message| message.contains("this address"))
        );
        let served = ConnectionState::new(&limits, keys, None);
        assert!(!served.refused() && served.refusal().is_none());
    }
}
