//! Scenario 3: many idle `Receive` streams. Opens `streams` authenticated
//! streams (each on its own mailbox), `per_connection` of them multiplexed on
//! each HTTP/2 connection, connections spread over 127.0.0.x source addresses;
//! holds them idle and reads the relay's resident memory; then delivers one
//! envelope to each of `sample` random streams while all stay connected.
//!
//! One stream per connection is what phones do; multiplexing exists because a
//! process here may hold at most 20 000 file descriptors (`ulimit -Hn`), and
//! both the load generator and the relay need one per connection.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ed25519_dalek::SigningKey;
use haven_proto::auth::Method;
use haven_proto::v1 as proto;
use haven_proto::v1::mailbox_client::MailboxClient;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::relay::{auth, create_mailbox};

/// What the idle scenario measured.
pub struct IdleOutcome {
    /// Streams opened and held.
    pub streams: usize,
    /// Connections they were spread over.
    pub connections: usize,
    /// Seconds to open them all.
    pub open_seconds: f64,
    /// Relay resident memory before any client connected, KiB.
    pub rss_start_kib: u64,
    /// Relay resident memory with connections and mailboxes, before streams, KiB.
    pub rss_before_kib: u64,
    /// Relay resident memory with every stream open and idle, KiB.
    pub rss_after_kib: u64,
    /// Send → deliver latencies of the sample, microseconds, sorted.
    pub latencies_us: Vec<u64>,
    /// Seconds from the first sample send to the last delivery.
    pub sample_seconds: f64,
}

async fn connect(address: SocketAddr, source: u8) -> anyhow::Result<MailboxClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
        .local_address(Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, source))))
        .connect()
        .await?;
    Ok(MailboxClient::new(channel))
}

/// An open stream: the sender keeps the request side open; the response side
/// is read only for the sampled streams.
struct Held {
    _requests: mpsc::Sender<proto::ReceiveRequest>,
    responses: Option<tonic::Streaming<proto::ReceiveResponse>>,
    sender_id: Vec<u8>,
}

/// Runs the scenario against a relay at `address`; `rss` reads its memory.
pub async fn run(
    address: SocketAddr,
    streams: usize,
    per_connection: usize,
    sample: usize,
    rss: impl Fn() -> Option<u64>,
) -> anyhow::Result<IdleOutcome> {
    let connections = streams.div_ceil(per_connection);
    let rss_start_kib = rss().unwrap_or(0);
    let mut clients = Vec::with_capacity(connections);
    for index in 0..connections {
        // 127.0.0.1 ..= 127.0.0.250: each source address has its own ports.
        clients.push(connect(address, (index % 250) as u8 + 1).await?);
    }
    // Mailboxes first, so the memory read after opening is the streams'.
    let difficulty = crate::relay::create_difficulty(address).await?;
    let limit = Arc::new(Semaphore::new(64));
    let mut creating = tokio::task::JoinSet::new();
    for index in 0..streams {
        let mut client = clients[index % connections].clone();
        let permit = Arc::clone(&limit).acquire_owned().await?;
        creating.spawn(async move {
            let mailbox = create_mailbox(&mut client, difficulty).await;
            drop(permit);
            mailbox.map(|m| (index, m))
        });
    }
    let mut mailboxes = vec![None; streams];
    while let Some(created) = creating.join_next().await {
        let (index, mailbox) = created??;
        mailboxes[index] = Some(mailbox);
    }
    let mailboxes: Vec<_> = mailboxes.into_iter().flatten().collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before_kib = rss().unwrap_or(0);

    let started = Instant::now();
    let mut opening = tokio::task::JoinSet::new();
    for (index, mailbox) in mailboxes.iter().enumerate() {
        let mut client = clients[index % (connections)].clone();
        let permit = Arc::clone(&limit).acquire_owned().await?;
        let (recipient_id, sender_id, key): (Vec<u8>, Vec<u8>, SigningKey) = (
            mailbox.recipient_id.clone(),
            mailbox.sender_id.clone(),
            mailbox.key.clone(),
        );
        opening.spawn(async move {
            let (requests, outgoing) = mpsc::channel(4);
            let window = 4u32;
            requests
                .send(proto::ReceiveRequest {
                    kind: Some(proto::receive_request::Kind::Open(proto::ReceiveOpen {
                        recipient_id: recipient_id.clone(),
                        window,
                        auth: Some(auth(
                            &key,
                            Method::Receive,
                            &recipient_id,
                            &[&window.to_be_bytes()],
                        )),
                    })),
                })
                .await?;
            let mut responses = client
                .receive(ReceiverStream::new(outgoing))
                .await?
                .into_inner();
            // The relay announces the (empty) backlog once the stream is live.
            let first = responses.message().await?;
            anyhow::ensure!(
                matches!(
                    first.and_then(|m| m.kind),
                    Some(proto::receive_response::Kind::QueueEmpty(_))
                ),
                "a stream did not open"
            );
            drop(permit);
            anyhow::Ok((
                index,
                Held {
                    _requests: requests,
                    responses: Some(responses),
                    sender_id,
                },
            ))
        });
    }
    let mut held: Vec<Option<Held>> = (0..streams).map(|_| None).collect();
    while let Some(opened) = opening.join_next().await {
        let (index, stream) = opened?.context("opening a stream")?;
        held[index] = Some(stream);
    }
    let open_seconds = started.elapsed().as_secs_f64();
    let mut held: Vec<Held> = held.into_iter().flatten().collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after_kib = rss().unwrap_or(0);

    // One envelope to each of `sample` random streams, all others still open.
    let epoch = Instant::now();
    let (delivered, mut arrivals) = mpsc::unbounded_channel();
    let mut picked = Vec::with_capacity(sample);
    while picked.len() < sample.min(held.len()) {
        let index = rand::random_range(0..held.len());
        if let Some(mut responses) = held[index].responses.take() {
            let delivered = delivered.clone();
            tokio::spawn(async move {
                if let Ok(Some(message)) = responses.message().await
                    && let Some(proto::receive_response::Kind::Envelope(envelope)) = message.kind
                {
                    let sent = envelope
                        .ciphertext
                        .get(..8)
                        .and_then(|b| b.try_into().ok())
                        .map_or(0, u64::from_be_bytes);
                    let now = epoch.elapsed().as_micros() as u64;
                    let _ = delivered.send(now.saturating_sub(sent));
                }
                // Keep the stream open until the run ends.
                std::future::pending::<()>().await;
            });
            picked.push(held[index].sender_id.clone());
        }
    }
    let sending = Instant::now();
    let mut sender = clients[0].clone();
    for sender_id in &picked {
        let mut ciphertext = vec![0x5a; 256];
        ciphertext[..8].copy_from_slice(&(epoch.elapsed().as_micros() as u64).to_be_bytes());
        sender
            .send(proto::SendRequest {
                sender_id: sender_id.clone(),
                envelope_id: rand::random::<[u8; 16]>().to_vec(),
                ttl_seconds: 3600,
                ciphertext,
                sender_signature: Vec::new(),
                pow_stamp: None,
                pow_timestamp_ms: 0,
            })
            .await?;
    }
    let mut latencies_us = Vec::with_capacity(picked.len());
    while latencies_us.len() < picked.len() {
        let latency = tokio::time::timeout(Duration::from_secs(60), arrivals.recv())
            .await
            .context("a sampled stream received nothing within 60 s")?
            .context("sample readers stopped")?;
        latencies_us.push(latency);
    }
    let sample_seconds = sending.elapsed().as_secs_f64();
    latencies_us.sort_unstable();
    drop(held);
    Ok(IdleOutcome {
        streams,
        connections,
        open_seconds,
        rss_start_kib,
        rss_before_kib,
        rss_after_kib,
        latencies_us,
        sample_seconds,
    })
}
