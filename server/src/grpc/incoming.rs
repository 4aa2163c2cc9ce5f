//! Accepted connections, bounded: at most `max_connections` are open at once;
//! beyond that the relay stops accepting until one closes (the kernel's backlog
//! holds the rest). Peer addresses are dropped at accept and never stored.
//!
//! A connection that has not made its first request within the handshake
//! timeout is closed (review F4): a silent socket, a TLS handshake that never
//! finishes, or an HTTP/2 preface with nothing after it would otherwise hold its
//! permit forever. The deadline is enforced here, on the socket's reads, so it
//! covers TLS (which tonic runs on top of this stream) and HTTP/2 alike; the
//! edge layer tells the connection when its first request arrived.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Extensions;
use tonic::transport::server::{Connected, TlsConnectInfo};

use crate::relay::{Bucket, Rate};

/// Bounds on each accepted connection.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// How long a connection may take to make its first request.
    pub handshake_timeout: Duration,
    /// Most authenticated `Receive` streams on one connection.
    pub streams_per_connection: usize,
    /// Most `Receive` streams on one connection still waiting for `open`.
    pub opening_per_connection: usize,
}

/// What a call learns about its connection: never who is at the other end,
/// only the connection's own stream budgets.
#[derive(Clone)]
pub struct ConnectionState(Arc<Shared>);

struct Shared {
    /// Set by the first request; until then the handshake deadline runs.
    requested: AtomicBool,
    /// Authenticated `Receive` streams of this connection.
    streams: Arc<Semaphore>,
    /// `Receive` streams of this connection that have not authenticated yet.
    opening: Arc<Semaphore>,
    /// This connection's `ClaimBundles` token bucket, full until first used
    /// (review F7). std Mutex: never held across an await.
    claims: Mutex<Option<Bucket>>,
}

impl ConnectionState {
    fn new(limits: &ConnectionLimits) -> Self {
        Self(Arc::new(Shared {
            requested: AtomicBool::new(false),
            streams: Arc::new(Semaphore::new(limits.streams_per_connection)),
            opening: Arc::new(Semaphore::new(limits.opening_per_connection)),
            claims: Mutex::new(None),
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

    /// The connection made a request: its handshake deadline no longer applies.
    pub fn requested(&self) {
        self.0.requested.store(true, Ordering::Relaxed);
    }

    /// The connection's authenticated stream budget.
    pub fn streams(&self) -> &Arc<Semaphore> {
        &self.0.streams
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
}

/// A client connection holding one of the connection permits.
pub struct LimitedConnection {
    stream: TcpStream,
    state: ConnectionState,
    /// Until the first request: when the connection is closed without one.
    handshake_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    _permit: OwnedSemaphorePermit,
}

/// The stream of accepted connections for tonic.
pub fn limited(
    listener: TcpListener,
    limits: ConnectionLimits,
) -> impl Stream<Item = Result<LimitedConnection, io::Error>> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    futures::stream::unfold((listener, permits), move |(listener, permits)| async move {
        let permit = Arc::clone(&permits).acquire_owned().await.ok()?;
        loop {
            match listener.accept().await {
                Ok((stream, _peer_address_deliberately_dropped)) => {
                    // Small frames (acks, wake-ups) must not wait for Nagle.
                    if let Err(error) = stream.set_nodelay(true) {
                        tracing::debug!(%error, "could not set TCP_NODELAY");
                    }
                    let connection = LimitedConnection {
                        stream,
                        state: ConnectionState::new(&limits),
                        handshake_deadline: Some(Box::pin(tokio::time::sleep(
                            limits.handshake_timeout,
                        ))),
                        _permit: permit,
                    };
                    return Some((Ok(connection), (listener, permits)));
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

impl AsyncRead for LimitedConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.state.0.requested.load(Ordering::Relaxed) {
            self.handshake_deadline = None;
        } else if let Some(deadline) = self.handshake_deadline.as_mut() {
            // Registers the timer with this task, so a connection that goes
            // quiet is woken, and closed, when the deadline passes.
            if deadline.as_mut().poll(cx).is_ready() {
                tracing::debug!("connection made no request in time; closing it");
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request within the handshake timeout",
                )));
            }
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
