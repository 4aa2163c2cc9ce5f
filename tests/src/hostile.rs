//! A hostile relay for the SDK's tests: a real relay behind an HTTP/2 proxy that
//! forwards every gRPC call and, when told to, lies about some of them — the
//! call reaches the relay and takes effect, then the client is told it failed
//! (`UNAVAILABLE`), or its stream is reset, or the call never reaches the relay.
//! It speaks h2c on loopback only and holds no state beyond its fault queue.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// What the proxy does to one call.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Forward it, let the relay answer, then tell the client `UNAVAILABLE`
    /// (what a relay that stored an envelope and then lies would do, and what a
    /// lost response looks like to a client).
    AnswerUnavailableAfterForwarding,
    /// Forward it, let the relay answer, then reset the client's stream.
    ResetAfterForwarding,
    /// Reset the client's stream without forwarding.
    ResetBeforeForwarding,
    /// Forward it and hand the client the relay's answer rewritten: the one
    /// protobuf message of a unary response goes through the function (the
    /// relay serving something else than it stored).
    RewriteResponse(fn(&[u8]) -> Vec<u8>),
}

type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// The proxy's fault queue: faults to apply, in order, to the next calls of a method.
#[derive(Default)]
struct Faults {
    /// (gRPC path such as `/haven.v1.Mailbox/Send`, fault), applied first come first.
    queue: VecDeque<(String, Fault)>,
    /// How many faults were applied.
    applied: usize,
}

/// A running hostile proxy in front of `upstream`.
pub struct HostileRelay {
    /// Where clients connect.
    pub address: SocketAddr,
    faults: Arc<Mutex<Faults>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HostileRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn unavailable() -> Response<Body> {
    // A trailers-only gRPC response, as tonic sends for an error.
    Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .header("grpc-status", "14")
        .header("grpc-message", "the relay is unavailable")
        .body(
            Full::new(Bytes::new())
                .map_err(|never: Infallible| match never {})
                .boxed_unsync(),
        )
        .unwrap()
}

impl HostileRelay {
    /// A proxy on a loopback port, forwarding to the relay at `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let faults = Arc::new(Mutex::new(Faults::default()));
        let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        let shared = Arc::clone(&faults);
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let client = client.clone();
                let faults = Arc::clone(&shared);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let client = client.clone();
                        let faults = Arc::clone(&faults);
                        async move { forward(request, client, faults, upstream).await }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        Ok(Self {
            address,
            faults,
            task,
        })
    }

    /// Applies `fault` to the next call of `path` (e.g. `/haven.v1.Mailbox/Send`),
    /// after any faults queued before it.
    pub fn fault_next(&self, path: &str, fault: Fault) {
        self.faults
            .lock()
            .unwrap()
            .queue
            .push_back((path.to_owned(), fault));
    }

    /// How many faults were applied so far.
    pub fn applied(&self) -> usize {
        self.faults.lock().unwrap().applied
    }

    /// Drops the faults still waiting for their call.
    pub fn clear_faults(&self) {
        self.faults.lock().unwrap().queue.clear();
    }

    /// Faults still waiting for their call.
    pub fn pending(&self) -> usize {
        self.faults.lock().unwrap().queue.len()
    }
}

/// An error from the service function makes hyper reset the stream.
#[derive(Debug)]
struct Reset;

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reset by the hostile proxy")
    }
}

impl std::error::Error for Reset {}

async fn forward(
    mut request: Request<Incoming>,
    client: Client<HttpConnector, Incoming>,
    faults: Arc<Mutex<Faults>>,
    upstream: SocketAddr,
) -> Result<Response<Body>, Reset> {
    let fault = {
        let mut faults = faults.lock().unwrap();
        let path = request.uri().path().to_owned();
        let position = faults.queue.iter().position(|(p, _)| *p == path);
        let fault = position
            .and_then(|at| faults.queue.remove(at))
            .map(|(_, f)| f);
        if fault.is_some() {
            faults.applied += 1;
        }
        fault
    };
    if matches!(fault, Some(Fault::ResetBeforeForwarding)) {
        return Err(Reset);
    }
    let uri = format!(
        "http://{upstream}{}",
        request
            .uri()
            .path_and_query()
            .map_or("/", |path| path.as_str())
    );
    *request.uri_mut() = uri.parse().map_err(|_| Reset)?;
    let response = client.request(request).await.map_err(|_| Reset)?;
    match fault {
        None => Ok(response.map(|body| body.boxed_unsync())),
        Some(Fault::RewriteResponse(rewrite)) => {
            let (parts, body) = response.into_parts();
            let collected = body.collect().await.map_err(|_| Reset)?;
            let trailers = collected.trailers().cloned();
            let bytes = collected.to_bytes();
            // One gRPC message: a compression flag, a 4-byte length, the bytes.
            if bytes.len() < 5 || bytes[0] != 0 {
                return Err(Reset);
            }
            let message = rewrite(&bytes[5..]);
            let mut framed = Vec::with_capacity(5 + message.len());
            framed.push(0);
            framed.extend_from_slice(
                &u32::try_from(message.len())
                    .map_err(|_| Reset)?
                    .to_be_bytes(),
            );
            framed.extend_from_slice(&message);
            let mut frames = vec![Ok::<_, hyper::Error>(hyper::body::Frame::data(
                Bytes::from(framed),
            ))];
            if let Some(trailers) = trailers {
                frames.push(Ok(hyper::body::Frame::trailers(trailers)));
            }
            let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
            let mut parts = parts;
            parts.headers.remove("content-length");
            Ok(Response::from_parts(parts, body.boxed_unsync()))
        }
        Some(after) => {
            // Let the relay finish the call (trailers included), then lie.
            let _ = response.into_body().collect().await;
            match after {
                Fault::AnswerUnavailableAfterForwarding => Ok(unavailable()),
                _ => Err(Reset),
            }
        }
    }
}

/// A SOCKS5 proxy on loopback (RFC 1928 with RFC 1929 user names), standing in
/// for Tor: it forwards to loopback targets only and records the user name of
/// every connection, so a test sees which lanes a client opened.
pub struct SocksProxy {
    /// Where clients connect (`socks5h://{address}`).
    pub address: SocketAddr,
    names: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SocksProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SocksProxy {
    /// A proxy on a loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let names = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&names);
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let recorded = Arc::clone(&recorded);
                tokio::spawn(async move {
                    let _ = socks_session(socket, recorded).await;
                });
            }
        });
        Ok(Self {
            address,
            names,
            task,
        })
    }

    /// The user name of every connection made so far, in order (empty for none).
    pub fn names(&self) -> Vec<String> {
        self.names.lock().unwrap().clone()
    }
}

async fn socks_session(
    mut socket: tokio::net::TcpStream,
    names: Arc<Mutex<Vec<String>>>,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut head = [0u8; 2];
    socket.read_exact(&mut head).await?;
    anyhow::ensure!(head[0] == 5, "not SOCKS5");
    let mut methods = vec![0u8; usize::from(head[1])];
    socket.read_exact(&mut methods).await?;
    let mut name = String::new();
    if methods.contains(&2) {
        socket.write_all(&[5, 2]).await?;
        let mut version_and_length = [0u8; 2];
        socket.read_exact(&mut version_and_length).await?;
        let mut user = vec![0u8; usize::from(version_and_length[1])];
        socket.read_exact(&mut user).await?;
        let password_length = socket.read_u8().await?;
        let mut password = vec![0u8; usize::from(password_length)];
        socket.read_exact(&mut password).await?;
        socket.write_all(&[1, 0]).await?;
        name = String::from_utf8(user)?;
    } else {
        socket.write_all(&[5, 0]).await?;
    }
    let mut request = [0u8; 4];
    socket.read_exact(&mut request).await?;
    anyhow::ensure!(request[..3] == [5, 1, 0], "only CONNECT");
    let host = match request[3] {
        3 => {
            let length = socket.read_u8().await?;
            let mut host = vec![0u8; usize::from(length)];
            socket.read_exact(&mut host).await?;
            String::from_utf8(host)?
        }
        other => anyhow::bail!("address type {other}: the client must send a name"),
    };
    let port = socket.read_u16().await?;
    let target: std::net::IpAddr = host.parse()?;
    anyhow::ensure!(target.is_loopback(), "loopback targets only");
    let mut upstream = tokio::net::TcpStream::connect((target, port)).await?;
    names.lock().unwrap().push(name);
    socket.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
    tokio::io::copy_bidirectional(&mut socket, &mut upstream).await?;
    Ok(())
}
