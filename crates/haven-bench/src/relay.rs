//! Scenario 1: S senders → R recipients holding `Receive` streams, durable
//! sends of `size` bytes, acks as a real client sends them; delivered
//! envelopes per second and send → deliver latency.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use ed25519_dalek::Signer as _;
use ed25519_dalek::SigningKey;
use haven_proto::auth::{Method, send_payload, sign_request};
use haven_proto::v1 as proto;
use haven_proto::v1::mailbox_client::MailboxClient;
use std::sync::{Mutex, PoisonError};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// The shape of one run.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub senders: usize,
    pub recipients: usize,
    pub messages: usize,
    pub size: usize,
    /// Offered load in envelopes per second across all senders; 0 sends as fast
    /// as acknowledgements allow (closed loop).
    pub rate: u64,
}

/// What one run measured.
pub struct Outcome {
    pub delivered_per_second: f64,
    /// Send-to-deliver latencies in microseconds, sorted.
    pub latencies_us: Vec<u64>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn auth(key: &SigningKey, method: Method, id: &[u8], fields: &[&[u8]]) -> proto::Auth {
    sign_request(key, method, id, fields, now_ms(), rand::random())
}

async fn connect(address: SocketAddr) -> anyhow::Result<MailboxClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
        .connect()
        .await?;
    Ok(MailboxClient::new(channel).max_decoding_message_size(8 * 1024 * 1024))
}

#[derive(Clone)]
pub(crate) struct Mailbox {
    pub(crate) recipient_id: Vec<u8>,
    pub(crate) sender_id: Vec<u8>,
    pub(crate) key: SigningKey,
}

/// The difficulty of the stamp the relay at `address` wants on `Create`, if it
/// wants one (`GetInfo`), so that the benchmark creates mailboxes as the SDK does.
pub(crate) async fn create_difficulty(address: SocketAddr) -> anyhow::Result<Option<u32>> {
    let info = proto::relay_client::RelayClient::connect(format!("http://{address}"))
        .await?
        .get_info(proto::GetInfoRequest {})
        .await?
        .into_inner();
    Ok(info
        .create_pow_required
        .then_some(info.intake_pow_difficulty))
}

/// Creates a private mailbox; with `difficulty`, its signed nonce is a stamp.
pub(crate) async fn create_mailbox(
    client: &mut MailboxClient<Channel>,
    difficulty: Option<u32>,
) -> anyhow::Result<Mailbox> {
    let key = SigningKey::from_bytes(&rand::random());
    let kind = proto::MailboxKind::Private as i32;
    let timestamp_ms = now_ms();
    let nonce = match difficulty {
        Some(difficulty) => {
            let public = key.verifying_key().to_bytes();
            tokio::task::spawn_blocking(move || {
                haven_proto::pow::solve_create_nonce(
                    &public,
                    timestamp_ms,
                    rand::random(),
                    difficulty,
                    u64::MAX,
                )
            })
            .await?
            .context("no create stamp found")?
        }
        None => rand::random(),
    };
    let response = client
        .create(proto::CreateRequest {
            recipient_key: key.verifying_key().to_bytes().to_vec(),
            kind,
            auth: Some(sign_request(
                &key,
                Method::Create,
                &[],
                &[&[kind as u8]],
                timestamp_ms,
                nonce,
            )),
        })
        .await?
        .into_inner();
    Ok(Mailbox {
        recipient_id: response.recipient_id,
        sender_id: response.sender_id,
        key,
    })
}

/// Runs one measured load against a relay at `address`.
pub async fn run(address: SocketAddr, load: Load) -> anyhow::Result<Outcome> {
    let epoch = Instant::now();
    let mut setup = connect(address).await?;
    let difficulty = create_difficulty(address).await?;
    let mut mailboxes = Vec::with_capacity(load.recipients);
    let mut sender_keys = Vec::with_capacity(load.recipients);
    for _ in 0..load.recipients {
        let mailbox = create_mailbox(&mut setup, difficulty).await?;
        // Secured to a sender key, as every conversation mailbox is: the relay
        // holds an unsecured mailbox to a small quota (review F1), and a real
        // client's sends are signed.
        let sender = SigningKey::from_bytes(&rand::random());
        let sender_key = sender.verifying_key().to_bytes();
        setup
            .secure(proto::SecureRequest {
                recipient_id: mailbox.recipient_id.clone(),
                sender_key: sender_key.to_vec(),
                auth: Some(auth(
                    &mailbox.key,
                    Method::Secure,
                    &mailbox.recipient_id,
                    &[&sender_key],
                )),
            })
            .await?;
        mailboxes.push(mailbox);
        sender_keys.push(sender);
    }
    let delivered = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(load.messages)));
    let (ready_sender, mut ready) = mpsc::channel(load.recipients);
    let mut receivers = Vec::new();
    for mailbox in &mailboxes {
        let mut client = connect(address).await?;
        let (acks, outgoing) = mpsc::channel(64);
        let window = 64u32;
        acks.send(proto::ReceiveRequest {
            kind: Some(proto::receive_request::Kind::Open(proto::ReceiveOpen {
                recipient_id: mailbox.recipient_id.clone(),
                window,
                auth: Some(auth(
                    &mailbox.key,
                    Method::Receive,
                    &mailbox.recipient_id,
                    &[&window.to_be_bytes()],
                )),
            })),
        })
        .await?;
        let mut inbound = client
            .receive(ReceiverStream::new(outgoing))
            .await?
            .into_inner();
        let delivered = Arc::clone(&delivered);
        let latencies = Arc::clone(&latencies);
        let ready = ready_sender.clone();
        receivers.push(tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                match message.kind {
                    Some(proto::receive_response::Kind::QueueEmpty(_)) => {
                        let _ = ready.send(()).await;
                    }
                    Some(proto::receive_response::Kind::Envelope(envelope)) => {
                        let sent_at = envelope
                            .ciphertext
                            .get(..8)
                            .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap_or_default()));
                        let latency = (epoch.elapsed().as_micros() as u64).saturating_sub(sent_at);
                        latencies
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(latency);
                        delivered.fetch_add(1, Ordering::Relaxed);
                        let ack = proto::ReceiveRequest {
                            kind: Some(proto::receive_request::Kind::Ack(proto::ReceiveAck {
                                envelope_ids: vec![envelope.envelope_id],
                            })),
                        };
                        if acks.send(ack).await.is_err() {
                            break;
                        }
                    }
                    None => {}
                }
            }
        }));
    }
    for _ in 0..load.recipients {
        tokio::time::timeout(Duration::from_secs(30), ready.recv())
            .await
            .context("streams did not open")?;
    }

    let started = Instant::now();
    let per_sender = load.messages / load.senders;
    let targets: Arc<Vec<(Vec<u8>, SigningKey)>> = Arc::new(
        mailboxes
            .iter()
            .zip(&sender_keys)
            .map(|(m, key)| (m.sender_id.clone(), key.clone()))
            .collect(),
    );
    let mut senders = Vec::with_capacity(load.senders);
    for sender in 0..load.senders {
        let mut client = connect(address).await?;
        let targets = Arc::clone(&targets);
        let size = load.size.max(8);
        let rate = load.rate;
        let sender_count = load.senders as u64;
        senders.push(tokio::spawn(async move {
            // Open loop at a fixed rate: each sender ticks at rate / senders.
            let mut ticker = (rate > 0).then(|| {
                let period = Duration::from_secs_f64(sender_count as f64 / rate as f64);
                let mut ticker = tokio::time::interval(period);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                ticker
            });
            for n in 0..per_sender {
                if let Some(ticker) = ticker.as_mut() {
                    ticker.tick().await;
                }
                let mut ciphertext = vec![0x5a; size];
                ciphertext[..8]
                    .copy_from_slice(&(epoch.elapsed().as_micros() as u64).to_be_bytes());
                let (target, key) = &targets[(sender + n * 7) % targets.len()];
                let envelope_id = rand::random::<[u8; 16]>();
                let signature = key
                    .sign(&send_payload(target, &envelope_id, 3600, &ciphertext))
                    .to_bytes()
                    .to_vec();
                client
                    .send(proto::SendRequest {
                        sender_id: target.clone(),
                        envelope_id: envelope_id.to_vec(),
                        ttl_seconds: 3600,
                        ciphertext,
                        sender_signature: signature,
                        pow_stamp: None,
                        pow_timestamp_ms: 0,
                    })
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for sender in senders {
        sender.await??;
    }
    let expected = (per_sender * load.senders) as u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while delivered.load(Ordering::Relaxed) < expected {
        if Instant::now() > deadline {
            bail!(
                "only {} of {expected} envelopes delivered",
                delivered.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    for receiver in &receivers {
        receiver.abort();
    }
    for receiver in receivers {
        let _ = receiver.await;
    }
    let mut latencies_us =
        std::mem::take(&mut *latencies.lock().unwrap_or_else(PoisonError::into_inner));
    latencies_us.sort_unstable();
    Ok(Outcome {
        delivered_per_second: expected as f64 / seconds,
        latencies_us,
    })
}

/// The `q`-quantile of sorted values (0 when empty).
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}
