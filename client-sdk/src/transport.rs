//! The connections to the relay: one per lane (a help-seeker's conversation,
//! the directory and claims, the device's own mailboxes), each connected
//! lazily, loopback-only plaintext, optionally through a SOCKS5 proxy (Tor,
//! a VPN app's proxy), and the generated clients. Generated types stop here and
//! in the modules that convert them.
//!
//! Why lanes (review 2026-12-crypto #7): over one connection the relay sees one
//! TLS session fetch and stream every mailbox together, which links all of a
//! help-seeker's pseudonymous conversations to each other. Separate connections
//! take that away; through a proxy each lane also authenticates to the proxy
//! with a name of its own, which Tor takes as "use another circuit" (its
//! `IsolateSOCKSAuth`, on by default), so the relay also sees different
//! addresses. Timing can still link them (see docs/mobile.md).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Uri};

use crate::Error;
use crate::conversation::ConversationId;
use crate::sync::FetchLimits;

/// How long connecting (TCP, TLS, through a proxy) may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
/// How long a call may take until its response starts (Tor can be slow).
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// HTTP/2 ping interval on a busy connection, and how long a ping may wait.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Most connections kept at once; past it the least recently opened
/// conversation lane is closed (it reconnects when used again).
const MAX_LANES: usize = 32;

/// Which connection a call goes over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Lane {
    /// Directory reads, bundle claims, relay info: nothing of a conversation.
    Directory,
    /// This device's own mailboxes and keys (a supporter's intake, sync,
    /// prekeys, capacity, device list).
    Device,
    /// Everything of one conversation: its mailboxes, posts, streams, push.
    Conversation(ConversationId),
}

impl Lane {
    /// The lane of a stored conversation record's mailboxes (the siblings'
    /// record, id zero, is the device's own).
    pub(crate) fn of_record(id: &ConversationId) -> Self {
        if *id == [0; 16] {
            Lane::Device
        } else {
            Lane::Conversation(*id)
        }
    }

    /// The name this lane gives a SOCKS5 proxy: random per process and lane,
    /// so it says nothing, and differs between lanes (circuit isolation).
    fn proxy_name(self, salt: &[u8; 16]) -> String {
        use sha2::{Digest as _, Sha256};
        let tag: Vec<u8> = match self {
            Lane::Directory => b"directory".to_vec(),
            Lane::Device => b"device".to_vec(),
            Lane::Conversation(id) => [&b"conversation"[..], &id].concat(),
        };
        let digest = Sha256::new()
            .chain_update(b"haven-sdk/proxy-lane/v1")
            .chain_update(salt)
            .chain_update(&tag)
            .finalize();
        hex::encode(&digest[..12])
    }
}

/// The relay's clients, one lazily connected channel per lane.
#[derive(Clone)]
pub(crate) struct Transport {
    endpoint: Endpoint,
    proxy: Option<Proxy>,
    /// Channels by lane, with the order they were opened (for closing the
    /// oldest past [`MAX_LANES`]). A std mutex: never held across an await.
    lanes: Arc<Mutex<Lanes>>,
    /// The fetch limits learned from the relay's `GetInfo`, once asked. A
    /// std mutex: never held across an await.
    fetch_limits: Arc<Mutex<Option<FetchLimits>>>,
}

#[derive(Default)]
struct Lanes {
    channels: HashMap<Lane, Channel>,
    opened: Vec<Lane>,
}

/// A SOCKS5 proxy (RFC 1928, user/password per RFC 1929) the relay is reached through.
#[derive(Clone)]
struct Proxy {
    address: String,
    salt: [u8; 16],
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Transport {
    /// Channels to `url` that connect on first use (so the app works offline
    /// until it needs the relay). `https` uses `ca_certificate` when given;
    /// `http` is allowed only to loopback addresses. With `proxy`
    /// (`socks5h://host:port`), every connection goes through that proxy, which
    /// also resolves the relay's name.
    pub(crate) fn new(
        url: &str,
        ca_certificate: Option<&[u8]>,
        proxy: Option<&str>,
    ) -> Result<Self, Error> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| Error::BadRelayAddress(e.to_string()))?;
        let uri = endpoint.uri();
        let host = uri
            .host()
            .ok_or_else(|| Error::BadRelayAddress("no host".into()))?;
        let endpoint = match uri.scheme_str() {
            Some("https") => {
                let mut tls = ClientTlsConfig::new().domain_name(host.to_owned());
                if let Some(pem) = ca_certificate {
                    tls = tls.ca_certificate(Certificate::from_pem(pem));
                }
                endpoint
                    .tls_config(tls)
                    .map_err(|e| Error::BadRelayAddress(e.to_string()))?
            }
            Some("http") if is_loopback(host) => endpoint,
            Some("http") => return Err(Error::InsecureRelay),
            _ => {
                return Err(Error::BadRelayAddress(
                    "use an http:// (loopback) or https:// address".into(),
                ));
            }
        };
        let proxy = proxy.map(parse_proxy).transpose()?;
        Ok(Self {
            // A relay (or a stalled mobile connection) that never answers must not
            // hang the app: every call has a deadline (a stream's until its
            // response starts), connecting has one, and HTTP/2 pings find a dead
            // connection.
            endpoint: endpoint
                .tcp_nodelay(true)
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(CALL_TIMEOUT)
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(false),
            proxy,
            lanes: Arc::new(Mutex::new(Lanes::default())),
            fetch_limits: Arc::new(Mutex::new(None)),
        })
    }

    /// The channel of `lane`, connected lazily.
    fn channel(&self, lane: Lane) -> Channel {
        let mut lanes = self
            .lanes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(channel) = lanes.channels.get(&lane) {
            return channel.clone();
        }
        let channel = match &self.proxy {
            Some(proxy) => self.endpoint.connect_with_connector_lazy(Socks5 {
                proxy: proxy.address.clone(),
                user: lane.proxy_name(&proxy.salt),
            }),
            None => self.endpoint.connect_lazy(),
        };
        if lanes.channels.len() >= MAX_LANES
            && let Some(at) = lanes
                .opened
                .iter()
                .position(|open| matches!(open, Lane::Conversation(_)))
        {
            let oldest = lanes.opened.remove(at);
            lanes.channels.remove(&oldest);
        }
        lanes.channels.insert(lane, channel.clone());
        lanes.opened.push(lane);
        channel
    }

    /// The fetch limits, if the relay's were learned already.
    pub(crate) fn fetch_limits(&self) -> Option<FetchLimits> {
        *self
            .fetch_limits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn set_fetch_limits(&self, limits: FetchLimits) {
        *self
            .fetch_limits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(limits);
    }

    /// The mailbox client of `lane`, decoding responses up to the fetch limit
    /// learned from the relay (tonic's default until then).
    pub(crate) fn mailbox(
        &self,
        lane: Lane,
    ) -> haven_proto::v1::mailbox_client::MailboxClient<Channel> {
        let client = haven_proto::v1::mailbox_client::MailboxClient::new(self.channel(lane));
        match self.fetch_limits() {
            Some(limits) => client.max_decoding_message_size(limits.decode_limit),
            None => client,
        }
    }

    pub(crate) fn relay(&self, lane: Lane) -> haven_proto::v1::relay_client::RelayClient<Channel> {
        haven_proto::v1::relay_client::RelayClient::new(self.channel(lane))
    }

    pub(crate) fn keys(&self, lane: Lane) -> haven_proto::v1::keys_client::KeysClient<Channel> {
        haven_proto::v1::keys_client::KeysClient::new(self.channel(lane))
    }

    pub(crate) fn directory(
        &self,
        lane: Lane,
    ) -> haven_proto::v1::directory_client::DirectoryClient<Channel> {
        haven_proto::v1::directory_client::DirectoryClient::new(self.channel(lane))
    }
}

/// `socks5h://host:port` (the proxy resolves names) or `socks5://host:port`
/// (taken the same way: resolving the relay's name here would leak it to the
/// local resolver).
fn parse_proxy(url: &str) -> Result<Proxy, Error> {
    let bad = || Error::BadRelayAddress("the proxy must be socks5h://host:port".into());
    let rest = url
        .strip_prefix("socks5h://")
        .or_else(|| url.strip_prefix("socks5://"))
        .ok_or_else(bad)?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(Proxy {
        address: rest.to_owned(),
        salt: rand::random(),
    })
}

/// Connects through a SOCKS5 proxy: greeting (no authentication, or a user
/// name and password), then CONNECT to the relay's host name and port.
#[derive(Clone)]
struct Socks5 {
    proxy: String,
    user: String,
}

fn socks_error(what: &str) -> std::io::Error {
    std::io::Error::other(format!("the proxy refused: {what}"))
}

impl tower_service::Service<Uri> for Socks5 {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let proxy = self.proxy.clone();
        let user = self.user.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| socks_error("no relay host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                Some("https") => 443,
                _ => 80,
            });
            let mut stream = TcpStream::connect(&proxy).await?;
            stream.set_nodelay(true)?;
            // Greeting: version 5, two methods: none (0) and user/password (2).
            stream.write_all(&[5, 2, 0, 2]).await?;
            let mut choice = [0u8; 2];
            stream.read_exact(&mut choice).await?;
            match choice {
                [5, 0] => {}
                [5, 2] => {
                    let name = user.as_bytes();
                    let mut login = vec![1, u8::try_from(name.len()).unwrap_or(u8::MAX)];
                    login.extend_from_slice(name);
                    login.extend_from_slice(&[1, b'x']);
                    stream.write_all(&login).await?;
                    let mut status = [0u8; 2];
                    stream.read_exact(&mut status).await?;
                    if status[1] != 0 {
                        return Err(socks_error("login"));
                    }
                }
                _ => return Err(socks_error("no acceptable method")),
            }
            // CONNECT to a domain name (type 3): the proxy resolves it.
            let name = host.as_bytes();
            let length = u8::try_from(name.len()).map_err(|_| socks_error("host name too long"))?;
            let mut request = vec![5, 1, 0, 3, length];
            request.extend_from_slice(name);
            request.extend_from_slice(&port.to_be_bytes());
            stream.write_all(&request).await?;
            let mut reply = [0u8; 4];
            stream.read_exact(&mut reply).await?;
            if reply[0] != 5 || reply[1] != 0 {
                return Err(socks_error("connect"));
            }
            // The bound address, which nobody needs: skip it.
            let skip = match reply[3] {
                1 => 4,
                4 => 16,
                3 => usize::from(stream.read_u8().await?),
                _ => return Err(socks_error("reply address")),
            };
            let mut rest = vec![0u8; skip + 2];
            stream.read_exact(&mut rest).await?;
            Ok(TokioIo::new(stream))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn plaintext_only_to_loopback() {
        assert!(Transport::new("http://127.0.0.1:50051", None, None).is_ok());
        assert!(Transport::new("http://[::1]:50051", None, None).is_ok());
        assert!(Transport::new("http://localhost:50051", None, None).is_ok());
        assert!(matches!(
            Transport::new("http://relay.example.org:50051", None, None),
            Err(Error::InsecureRelay)
        ));
        assert!(matches!(
            Transport::new("ftp://x", None, None),
            Err(Error::BadRelayAddress(_))
        ));
        assert!(matches!(
            Transport::new("not a url", None, None),
            Err(Error::BadRelayAddress(_))
        ));
    }

    #[tokio::test]
    async fn proxies_are_socks5_host_and_port() {
        let relay = "https://relay.example.org";
        assert!(Transport::new(relay, None, Some("socks5h://127.0.0.1:9050")).is_ok());
        assert!(Transport::new(relay, None, Some("socks5://localhost:9050/")).is_ok());
        for bad in [
            "http://127.0.0.1:8080",
            "socks5h://127.0.0.1",
            "socks5h://:9050",
            "x",
        ] {
            assert!(matches!(
                Transport::new(relay, None, Some(bad)),
                Err(Error::BadRelayAddress(_))
            ));
        }
    }
}
