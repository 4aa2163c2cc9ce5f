//! Test harness for Haven's end-to-end tests: starts real relay processes (or a
//! relay in-process on port 0) on loopback, and a small signing client.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)] // reason: test support; a failed unwrap is a failed test.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use ed25519_dalek::{Signer, SigningKey};
use haven_proto::auth::{Method, send_payload};
use haven_proto::v1 as proto;
use haven_proto::v1::mailbox_client::MailboxClient;
use haven_server::{Config, Listeners, StoreKind};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

pub mod hostile;

/// Generous bound for anything a test waits on; a hang fails instead of blocking CI.
pub const WAIT: Duration = Duration::from_secs(30);

/// A free loopback port (bound and released; the race with other processes is
/// harmless on a test machine).
pub fn free_port() -> u16 {
    let listener = StdListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A fresh random Ed25519 key.
pub fn random_key() -> SigningKey {
    let mut seed = [0u8; 32];
    rand::fill(&mut seed);
    SigningKey::from_bytes(&seed)
}

/// 16 random bytes.
pub fn random_id() -> Vec<u8> {
    let mut id = [0u8; 16];
    rand::fill(&mut id);
    id.to_vec()
}

/// Connects to a relay on loopback, retrying until it accepts.
pub async fn connect(address: SocketAddr) -> anyhow::Result<Channel> {
    let deadline = Instant::now() + WAIT;
    loop {
        match Channel::from_shared(format!("http://{address}"))?
            .connect()
            .await
        {
            Ok(channel) => return Ok(channel),
            Err(error) if Instant::now() > deadline => return Err(error.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Whether the relay's health service says SERVING now.
pub async fn serving(address: SocketAddr) -> anyhow::Result<bool> {
    let Ok(channel) = Channel::from_shared(format!("http://{address}"))?
        .connect()
        .await
    else {
        return Ok(false);
    };
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    };
    Ok(health.check(request).await.is_ok_and(|response| {
        response.into_inner().status
            == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    }))
}

/// Waits until the relay's health service says SERVING.
pub async fn wait_serving(address: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        if serving(address).await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("relay at {address} did not become healthy within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A configuration for tests: memory store, loopback, fast expiry, low
/// proof-of-work difficulty.
pub fn test_config() -> Config {
    Config {
        store: StoreKind::Memory,
        metrics_listen: None,
        intake_pow_difficulty: 8,
        expiry_bucket_seconds: 1,
        sweep_interval_seconds: 1,
        shutdown_grace_seconds: 5,
        // Clients connect directly (from 127.0.0.x), so per-address caps apply
        // as they would with TLS; plaintext alone would mean "behind a proxy".
        behind_proxy: Some(false),
        // Tests claim many bundles for one supporter quickly; `abuse` tests the defaults.
        limits: haven_server::config::Limits {
            claims_per_supporter_per_minute: 100_000,
            claim_burst_per_supporter: 1_000,
            claims_per_connection_per_minute: 100_000,
            // Every test client comes from 127.0.0.1; `abuse` tests the default.
            claims_per_address_per_minute: Some(100_000),
            ..Default::default()
        },
        ..Config::default()
    }
}

/// A relay running inside the test process, on an ephemeral loopback port.
pub struct InProcessRelay {
    pub address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl InProcessRelay {
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = grpc.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(haven_server::run(
            config,
            Listeners {
                grpc,
                metrics: None,
            },
            async {
                let _ = stopped.await;
            },
        ));
        wait_serving(address).await?;
        Ok(Self {
            address,
            stop: Some(stop),
            task: Some(task),
        })
    }

    pub async fn client(&self) -> anyhow::Result<TestClient> {
        Ok(TestClient::new(connect(self.address).await?))
    }

    /// What the relay's `GetInfo` answers, over a connection of its own.
    pub async fn info(&self) -> anyhow::Result<proto::GetInfoResponse> {
        Ok(self.client().await?.get_info().await?)
    }

    /// Shuts down gracefully and returns the relay's result.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => tokio::time::timeout(WAIT, task)
                .await
                .context("relay did not stop")??,
            None => Ok(()),
        }
    }
}

impl Drop for InProcessRelay {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A relay process started from the binary under test.
pub struct RelayProcess {
    pub address: SocketAddr,
    pub metrics: SocketAddr,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    child: Child,
}

impl RelayProcess {
    /// Starts `binary` on fresh ports with the given data directory and extra
    /// arguments (`--flag value` pairs), logging to `log_path`, and waits until
    /// it serves.
    pub async fn start(
        binary: &str,
        data_dir: &Path,
        log_path: &Path,
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        // A port found free can be taken by another socket (any outgoing
        // connection of a parallel test) before the relay binds it; the relay
        // then exits at once, and a few fresh ports are tried.
        const ATTEMPTS: usize = 5;
        // Earlier lifetimes of a restarted relay share the log; a failed
        // attempt's lines are cut off again.
        let logged_before = std::fs::metadata(log_path).map_or(0, |meta| meta.len());
        for attempt in 1..=ATTEMPTS {
            let mut relay = Self::spawn(binary, data_dir, log_path, extra_args)?;
            let deadline = Instant::now() + WAIT;
            loop {
                if serving(relay.address).await? {
                    return Ok(relay);
                }
                let exited = relay.child.try_wait()?.is_some();
                let log = || std::fs::read_to_string(log_path).unwrap_or_default();
                if exited && attempt < ATTEMPTS && log().contains("Address already in use") {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(log_path)?
                        .set_len(logged_before)?;
                    break;
                }
                if exited || Instant::now() > deadline {
                    relay.kill();
                    bail!(
                        "relay at {} did not become healthy (exited: {exited})\nrelay log:\n{}",
                        relay.address,
                        log()
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        bail!("no free ports for the relay after {ATTEMPTS} attempts")
    }

    fn spawn(
        binary: &str,
        data_dir: &Path,
        log_path: &Path,
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)?;
        let child = Command::new(binary)
            .arg("--listen")
            .arg(address.to_string())
            .arg("--metrics-listen")
            .arg(metrics.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--intake-pow-difficulty", "8"])
            // Clients connect directly, as with TLS (see `test_config`).
            .args(["--behind-proxy", "false"])
            .args(extra_args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {binary}"))?;
        Ok(Self {
            address,
            metrics,
            data_dir: data_dir.into(),
            log_path: log_path.into(),
            child,
        })
    }

    pub async fn client(&self) -> anyhow::Result<TestClient> {
        Ok(TestClient::new(connect(self.address).await?))
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit status.
    pub async fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.kill();
                bail!("relay did not exit within {WAIT:?} of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits for the relay to exit by itself, up to `within`.
    pub async fn wait_exit(
        &mut self,
        within: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("relay did not exit within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A mailbox this client owns.
pub struct OwnedMailbox {
    pub recipient_id: Vec<u8>,
    pub sender_id: Vec<u8>,
    pub key: SigningKey,
}

/// A client that signs requests the way the SDK will.
#[derive(Clone)]
pub struct TestClient {
    pub mailbox: MailboxClient<Channel>,
    pub info: proto::relay_client::RelayClient<Channel>,
    /// The relay's proof-of-work difficulty, asked once: every `create` stamps.
    difficulty: std::sync::Arc<tokio::sync::OnceCell<u32>>,
}

/// A `Create` request for a new mailbox of `kind` owned by `key`, its signed
/// nonce a stamp of `difficulty` bits, as the SDK makes it.
pub fn stamped_create(
    key: &SigningKey,
    kind: proto::MailboxKind,
    difficulty: u32,
) -> proto::CreateRequest {
    let kind_number = kind as i32;
    let public = key.verifying_key().to_bytes();
    let timestamp_ms = now_ms();
    let nonce = haven_proto::pow::solve_create_nonce(
        &public,
        timestamp_ms,
        rand::random(),
        difficulty,
        u64::MAX,
    )
    .expect("a stamp within the attempts");
    proto::CreateRequest {
        recipient_key: public.to_vec(),
        kind: kind_number,
        auth: Some(haven_proto::auth::sign_request(
            key,
            Method::Create,
            &[],
            &[&[kind_number as u8]],
            timestamp_ms,
            nonce,
        )),
    }
}

pub fn sign(
    key: &SigningKey,
    method: Method,
    recipient_id: &[u8],
    fields: &[&[u8]],
) -> proto::Auth {
    sign_at(key, method, recipient_id, fields, now_ms())
}

pub fn sign_at(
    key: &SigningKey,
    method: Method,
    recipient_id: &[u8],
    fields: &[&[u8]],
    timestamp_ms: u64,
) -> proto::Auth {
    haven_proto::auth::sign_request(
        key,
        method,
        recipient_id,
        fields,
        timestamp_ms,
        rand::random(),
    )
}

/// A plain send request (no signature, no stamp).
pub fn send_request(sender_id: &[u8], envelope_id: &[u8], ciphertext: &[u8]) -> proto::SendRequest {
    proto::SendRequest {
        sender_id: sender_id.to_vec(),
        envelope_id: envelope_id.to_vec(),
        ttl_seconds: 0,
        ciphertext: ciphertext.to_vec(),
        sender_signature: Vec::new(),
        pow_stamp: None,
        pow_timestamp_ms: 0,
    }
}

/// Signs a send request with a secured mailbox's sender key.
pub fn sign_send(request: &mut proto::SendRequest, sender_key: &SigningKey) {
    let payload = send_payload(
        &request.sender_id,
        &request.envelope_id,
        request.ttl_seconds,
        &request.ciphertext,
    );
    request.sender_signature = sender_key.sign(&payload).to_bytes().to_vec();
}

/// Adds a proof-of-work stamp of `difficulty` bits, made now.
pub fn stamp_send(request: &mut proto::SendRequest, difficulty: u32) {
    stamp_send_at(request, difficulty, now_ms());
}

/// Adds a proof-of-work stamp of `difficulty` bits made at `made_ms`.
pub fn stamp_send_at(request: &mut proto::SendRequest, difficulty: u32, made_ms: u64) {
    request.pow_timestamp_ms = made_ms;
    request.pow_stamp = haven_proto::pow::solve_intake(
        &request.sender_id,
        &request.envelope_id,
        &request.ciphertext,
        made_ms,
        difficulty,
        u64::MAX,
    );
}

/// An open Receive stream.
pub struct ReceiveStream {
    pub acks: mpsc::Sender<proto::ReceiveRequest>,
    pub inbound: tonic::Streaming<proto::ReceiveResponse>,
}

impl ReceiveStream {
    /// The next message, or the status the stream ended with.
    pub async fn next(&mut self) -> Result<Option<proto::receive_response::Kind>, tonic::Status> {
        match tokio::time::timeout(WAIT, self.inbound.message()).await {
            Ok(Ok(Some(message))) => Ok(message.kind),
            Ok(Ok(None)) => Ok(None),
            Ok(Err(status)) => Err(status),
            Err(_) => Err(tonic::Status::deadline_exceeded("test waited too long")),
        }
    }

    /// The next envelope, skipping a queue-empty marker; panics on anything else.
    pub async fn next_envelope(&mut self) -> proto::Envelope {
        loop {
            match self.next().await {
                Ok(Some(proto::receive_response::Kind::Envelope(envelope))) => return envelope,
                Ok(Some(proto::receive_response::Kind::QueueEmpty(_))) => continue,
                other => panic!("expected an envelope, got {other:?}"),
            }
        }
    }

    /// Whether a message arrives within `wait`.
    pub async fn quiet_for(&mut self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.inbound.message())
            .await
            .is_err()
    }

    pub async fn ack(&self, ids: Vec<Vec<u8>>) {
        let ack = proto::ReceiveRequest {
            kind: Some(proto::receive_request::Kind::Ack(proto::ReceiveAck {
                envelope_ids: ids,
            })),
        };
        self.acks.send(ack).await.expect("stream open");
    }
}

impl TestClient {
    pub fn new(channel: Channel) -> Self {
        Self {
            mailbox: MailboxClient::new(channel.clone()),
            info: proto::relay_client::RelayClient::new(channel),
            difficulty: Default::default(),
        }
    }

    pub async fn create(&self, kind: proto::MailboxKind) -> Result<OwnedMailbox, tonic::Status> {
        let key = random_key();
        let difficulty = *self
            .difficulty
            .get_or_try_init(|| async {
                Ok::<_, tonic::Status>(self.get_info().await?.intake_pow_difficulty)
            })
            .await?;
        let response = self
            .mailbox
            .clone()
            .create(stamped_create(&key, kind, difficulty))
            .await?
            .into_inner();
        Ok(OwnedMailbox {
            recipient_id: response.recipient_id,
            sender_id: response.sender_id,
            key,
        })
    }

    pub async fn get_info(&self) -> Result<proto::GetInfoResponse, tonic::Status> {
        Ok(self
            .info
            .clone()
            .get_info(proto::GetInfoRequest {})
            .await?
            .into_inner())
    }

    pub async fn send(
        &self,
        request: proto::SendRequest,
    ) -> Result<proto::SendResponse, tonic::Status> {
        Ok(self.mailbox.clone().send(request).await?.into_inner())
    }

    /// Sends `count` envelopes to `mailbox`, the n-th (from 0) with the one-byte
    /// ciphertext `[n]`, each under a fresh envelope id.
    pub async fn send_numbered(&self, mailbox: &OwnedMailbox, count: u8) {
        for n in 0..count {
            self.send(send_request(&mailbox.sender_id, &random_id(), &[n]))
                .await
                .expect("send");
        }
    }

    /// The envelopes a Fetch from the start returns (its first page).
    pub async fn stored(&self, mailbox: &OwnedMailbox) -> Vec<proto::Envelope> {
        self.fetch(mailbox, 0).await.expect("fetch").envelopes
    }

    pub async fn fetch(
        &self,
        mailbox: &OwnedMailbox,
        limit: u32,
    ) -> Result<proto::FetchResponse, tonic::Status> {
        let auth = sign(
            &mailbox.key,
            Method::Fetch,
            &mailbox.recipient_id,
            &[&limit.to_be_bytes()],
        );
        let request = proto::FetchRequest {
            recipient_id: mailbox.recipient_id.clone(),
            limit,
            auth: Some(auth),
        };
        Ok(self.mailbox.clone().fetch(request).await?.into_inner())
    }

    pub async fn ack(
        &self,
        mailbox: &OwnedMailbox,
        ids: Vec<Vec<u8>>,
    ) -> Result<u32, tonic::Status> {
        let fields: Vec<&[u8]> = ids.iter().map(Vec::as_slice).collect();
        let auth = sign(&mailbox.key, Method::Ack, &mailbox.recipient_id, &fields);
        let request = proto::AckRequest {
            recipient_id: mailbox.recipient_id.clone(),
            envelope_ids: ids,
            auth: Some(auth),
        };
        Ok(self
            .mailbox
            .clone()
            .ack(request)
            .await?
            .into_inner()
            .deleted)
    }

    pub async fn secure(
        &self,
        mailbox: &OwnedMailbox,
        sender_key: &[u8],
    ) -> Result<(), tonic::Status> {
        let auth = sign(
            &mailbox.key,
            Method::Secure,
            &mailbox.recipient_id,
            &[sender_key],
        );
        let request = proto::SecureRequest {
            recipient_id: mailbox.recipient_id.clone(),
            sender_key: sender_key.to_vec(),
            auth: Some(auth),
        };
        self.mailbox.clone().secure(request).await?;
        Ok(())
    }

    pub async fn register_push(
        &self,
        mailbox: &OwnedMailbox,
        endpoint: &str,
        token: &[u8],
    ) -> Result<(), tonic::Status> {
        let auth = sign(
            &mailbox.key,
            Method::RegisterPush,
            &mailbox.recipient_id,
            &[endpoint.as_bytes(), token],
        );
        let request = proto::RegisterPushRequest {
            recipient_id: mailbox.recipient_id.clone(),
            endpoint: endpoint.to_owned(),
            token: token.to_vec(),
            auth: Some(auth),
        };
        self.mailbox.clone().register_push(request).await?;
        Ok(())
    }

    pub async fn delete(&self, mailbox: &OwnedMailbox) -> Result<(), tonic::Status> {
        let auth = sign(&mailbox.key, Method::Delete, &mailbox.recipient_id, &[]);
        let request = proto::DeleteRequest {
            recipient_id: mailbox.recipient_id.clone(),
            auth: Some(auth),
        };
        self.mailbox.clone().delete(request).await?;
        Ok(())
    }

    pub async fn receive(
        &self,
        mailbox: &OwnedMailbox,
        window: u32,
    ) -> Result<ReceiveStream, tonic::Status> {
        let auth = sign(
            &mailbox.key,
            Method::Receive,
            &mailbox.recipient_id,
            &[&window.to_be_bytes()],
        );
        let open = proto::ReceiveRequest {
            kind: Some(proto::receive_request::Kind::Open(proto::ReceiveOpen {
                recipient_id: mailbox.recipient_id.clone(),
                window,
                auth: Some(auth),
            })),
        };
        self.receive_raw(open).await
    }

    /// Opens a stream whose first message is `first`, as given.
    pub async fn receive_raw(
        &self,
        first: proto::ReceiveRequest,
    ) -> Result<ReceiveStream, tonic::Status> {
        let (acks, outgoing) = mpsc::channel(16);
        acks.send(first).await.expect("channel open");
        let inbound = self
            .mailbox
            .clone()
            .receive(ReceiverStream::new(outgoing))
            .await?
            .into_inner();
        Ok(ReceiveStream { acks, inbound })
    }

    /// Every envelope currently stored, by repeated Fetch + Ack.
    pub async fn drain(&self, mailbox: &OwnedMailbox) -> anyhow::Result<Vec<proto::Envelope>> {
        let mut all = Vec::new();
        loop {
            let batch = self.fetch(mailbox, 0).await?;
            if batch.envelopes.is_empty() {
                return Ok(all);
            }
            let ids = batch
                .envelopes
                .iter()
                .map(|e| e.envelope_id.clone())
                .collect();
            self.ack(mailbox, ids).await?;
            all.extend(batch.envelopes);
        }
    }
}

/// One request a [`PushReceiver`] got.
#[derive(Clone, Debug)]
pub struct ReceivedPush {
    /// Request line and headers, as sent.
    pub head: String,
    /// The body.
    pub body: Vec<u8>,
}

/// A stand-in for a push gateway or UnifiedPush distributor: an HTTP/1.1
/// server on a loopback port that records every request and answers with a
/// settable status, or not at all (a dead endpoint).
pub struct PushReceiver {
    pub url: String,
    requests: std::sync::Arc<std::sync::Mutex<Vec<ReceivedPush>>>,
    status: std::sync::Arc<std::sync::atomic::AtomicU16>,
    task: tokio::task::JoinHandle<()>,
}

impl PushReceiver {
    /// Starts answering 200; `status(0)` makes it never answer.
    pub async fn start() -> anyhow::Result<Self> {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/push/endpoint-1", listener.local_addr()?);
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let status = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(200));
        let (seen, answer) = (requests.clone(), status.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let seen = seen.clone();
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // One request per connection is all the relay sends at a time.
                    loop {
                        let Ok(read) = socket.read(&mut chunk).await else {
                            return;
                        };
                        if read == 0 {
                            return;
                        }
                        buffer.extend_from_slice(&chunk[..read]);
                        let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buffer[..end]).to_string();
                        let length = head
                            .lines()
                            .find_map(|line| {
                                let (name, value) = line.split_once(':')?;
                                name.eq_ignore_ascii_case("content-length")
                                    .then(|| value.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if buffer.len() < end + 4 + length {
                            continue;
                        }
                        let body = buffer[end + 4..end + 4 + length].to_vec();
                        buffer.drain(..end + 4 + length);
                        seen.lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(ReceivedPush { head, body });
                        let code = answer.load(Ordering::SeqCst);
                        if code == 0 {
                            // A dead endpoint: hold the connection, never answer.
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            return;
                        }
                        let response = format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\n\r\n");
                        if socket.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(Self {
            url,
            requests,
            status,
            task,
        })
    }

    /// Sets the status of later answers (0: never answer).
    pub fn status(&self, code: u16) {
        self.status.store(code, std::sync::atomic::Ordering::SeqCst);
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<ReceivedPush> {
        self.requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Waits (at most 10 s) until at least `count` requests came; returns them all.
    pub async fn wait_for(&self, count: usize) -> Vec<ReceivedPush> {
        for _ in 0..200 {
            if self.requests().len() >= count {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.requests()
    }
}

impl Drop for PushReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
