//! Scenario `attack`: the throughput load of scenario 1 beside each abuse the
//! relay must hold against (issue 13, point 11), bounded in count and time, on
//! a fresh relay per run. For each attack the legitimate clients' delivered/s
//! and p99 are measured without and with it, same binary, back to back, so the
//! ratio is what the attack costs them on this machine.
//!
//! Every attacker talks to the loopback relay only, stops by itself (a count
//! and the end of the measured load), and shares the machine's cores with the
//! relay and the load: on a 2-core machine the figures are what one laptop
//! attacking a small relay looks like, not a data-centre figure.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use haven_proto::v1 as proto;
use haven_proto::v1::mailbox_client::MailboxClient;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::process::{Served, free_address};
use crate::relay::{Load, quantile};

/// One abuse, run beside the load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Attack {
    /// TCP connections that never send a byte (reopened as the relay closes them).
    SilentSockets,
    /// Connections that send the HTTP/2 preface and then nothing.
    PrefaceOnly,
    /// `Receive` streams opened and never authenticated.
    UnauthenticatedReceive,
    /// A flood of 4 MiB `Send` requests.
    Oversized,
    /// Signed requests under fresh keys (`Create` of throwaway mailboxes, each
    /// with the stamp the relay asks for), to fill the replay memory and the
    /// mailbox budget.
    ThrowawayKeys,
    /// Connections that make one request and then stay idle.
    IdleAfterOneRequest,
}

impl Attack {
    pub const ALL: [Attack; 6] = [
        Attack::SilentSockets,
        Attack::PrefaceOnly,
        Attack::UnauthenticatedReceive,
        Attack::Oversized,
        Attack::ThrowawayKeys,
        Attack::IdleAfterOneRequest,
    ];

    fn name(self) -> &'static str {
        match self {
            Attack::SilentSockets => "silent-sockets",
            Attack::PrefaceOnly => "preface-only",
            Attack::UnauthenticatedReceive => "unauthenticated-receive",
            Attack::Oversized => "oversized",
            Attack::ThrowawayKeys => "throwaway-keys",
            Attack::IdleAfterOneRequest => "idle-after-one-request",
        }
    }
}

/// The attacker's bounds: at most this many attempts in all, this many held
/// open at once.
const MAX_ATTEMPTS: u64 = 50_000;
const HELD_AT_ONCE: usize = 2_000;

/// What the attacker did.
#[derive(Default)]
struct Tally {
    attempts: AtomicU64,
    refused: AtomicU64,
}

/// One attack's figures.
pub struct Measured {
    attack: Attack,
    clean_per_second: f64,
    clean_p99_us: u64,
    clean_cpu_ms_per_1000: f64,
    attacked_per_second: f64,
    attacked_p99_us: u64,
    attacked_cpu_ms_per_1000: f64,
    attempts: u64,
    refused: u64,
}

async fn start_relay(relay_bin: &Path, data: &Path) -> anyhow::Result<(Served, SocketAddr)> {
    let address = free_address()?;
    let args: Vec<String> = vec![
        "--listen".into(),
        address.to_string(),
        "--metrics-listen".into(),
        "off".into(),
        "--data-dir".into(),
        data.join("haven-data").display().to_string(),
        "--log-level".into(),
        "error".into(),
    ];
    Ok((Served::start(relay_bin, address, &args).await?, address))
}

/// Runs `load` once against a fresh relay, with `attack` beside it if given:
/// delivered/s, p99 in µs, and the relay's CPU milliseconds per 1000 delivered
/// (what the attack costs the relay itself, apart from the cores the attacker
/// takes on a shared machine).
async fn measure(
    relay_bin: &Path,
    load: Load,
    attack: Option<Attack>,
    tally: &Arc<Tally>,
) -> anyhow::Result<(f64, u64, f64)> {
    let data = tempfile::tempdir()?;
    let (relay, address) = start_relay(relay_bin, data.path()).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let attacker = attack.map(|attack| {
        let (stop, tally) = (Arc::clone(&stop), Arc::clone(tally));
        tokio::spawn(async move { run_attack(attack, address, &stop, &tally).await })
    });
    if attacker.is_some() {
        // Let the attack take hold before the load starts.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let cpu_before = relay.cpu_seconds().unwrap_or(0.0);
    let outcome = crate::relay::run(address, load).await;
    let cpu = relay.cpu_seconds().unwrap_or(0.0) - cpu_before;
    stop.store(true, Ordering::Relaxed);
    if let Some(attacker) = attacker {
        attacker.abort();
        let _ = attacker.await;
    }
    drop(relay);
    let outcome = outcome.context("the legitimate load failed")?;
    let delivered = (load.messages / load.senders * load.senders).max(1) as f64;
    Ok((
        outcome.delivered_per_second,
        quantile(&outcome.latencies_us, 0.99),
        cpu * 1000.0 / delivered * 1000.0,
    ))
}

async fn run_attack(attack: Attack, address: SocketAddr, stop: &AtomicBool, tally: &Tally) {
    let more =
        || !stop.load(Ordering::Relaxed) && tally.attempts.load(Ordering::Relaxed) < MAX_ATTEMPTS;
    match attack {
        Attack::SilentSockets | Attack::PrefaceOnly => {
            let preface = attack == Attack::PrefaceOnly;
            let mut held = Vec::with_capacity(HELD_AT_ONCE);
            while more() {
                // A socket the relay closed reads 0 bytes; an open one would block
                // (or holds the relay's SETTINGS frame).
                held.retain(|socket: &tokio::net::TcpStream| {
                    let mut probe = [0u8; 256];
                    match socket.try_read(&mut probe) {
                        Ok(0) => false,
                        Ok(_) => true,
                        Err(error) => error.kind() == std::io::ErrorKind::WouldBlock,
                    }
                });
                while held.len() < HELD_AT_ONCE && more() {
                    tally.attempts.fetch_add(1, Ordering::Relaxed);
                    match raw_connect(address).await {
                        Ok(mut socket) => {
                            if preface {
                                let _ = socket.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
                            }
                            held.push(socket);
                        }
                        Err(_) => {
                            tally.refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Attack::UnauthenticatedReceive => {
            // Streams on a few connections, each sending nothing after opening.
            let mut held = Vec::new();
            'outer: for _ in 0..20 {
                let Ok(channel) = connect(address).await else {
                    tally.refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                for _ in 0..HELD_AT_ONCE / 20 {
                    if !more() {
                        break 'outer;
                    }
                    tally.attempts.fetch_add(1, Ordering::Relaxed);
                    let (sender, outgoing) = mpsc::channel::<proto::ReceiveRequest>(1);
                    let mut client = MailboxClient::new(channel.clone());
                    held.push(sender);
                    let tally_refused = client.receive(ReceiverStream::new(outgoing));
                    if tokio::time::timeout(Duration::from_millis(50), tally_refused)
                        .await
                        .is_ok_and(|answer| answer.is_err())
                    {
                        tally.refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            while more() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            drop(held);
        }
        Attack::Oversized => {
            let flood = || async {
                let Ok(channel) = connect(address).await else {
                    return;
                };
                let mut client = MailboxClient::new(channel);
                let junk = vec![0x42u8; 4 * 1024 * 1024];
                while more() {
                    tally.attempts.fetch_add(1, Ordering::Relaxed);
                    let answer = client
                        .send(proto::SendRequest {
                            sender_id: rand::random::<[u8; 16]>().to_vec(),
                            envelope_id: rand::random::<[u8; 16]>().to_vec(),
                            ttl_seconds: 3600,
                            ciphertext: junk.clone(),
                            sender_signature: vec![0; 64],
                            pow_stamp: None,
                            pow_timestamp_ms: 0,
                        })
                        .await;
                    if answer.is_err() {
                        tally.refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            };
            // Four connections' worth, concurrently.
            tokio::join!(flood(), flood(), flood(), flood());
        }
        Attack::ThrowawayKeys => {
            let Ok(channel) = connect(address).await else {
                return;
            };
            // The stamp the relay asks for (Create stamps are on by default):
            // what a throwaway key costs the attacker.
            let difficulty = crate::relay::create_difficulty(address)
                .await
                .ok()
                .flatten();
            let mut client = MailboxClient::new(channel);
            while more() {
                tally.attempts.fetch_add(1, Ordering::Relaxed);
                if crate::relay::create_mailbox(&mut client, difficulty)
                    .await
                    .is_err()
                {
                    tally.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Attack::IdleAfterOneRequest => {
            let mut held = Vec::with_capacity(HELD_AT_ONCE);
            while more() {
                if held.len() >= HELD_AT_ONCE {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                tally.attempts.fetch_add(1, Ordering::Relaxed);
                match connect(address).await {
                    Ok(channel) => {
                        let mut client = proto::relay_client::RelayClient::new(channel);
                        if client.get_info(proto::GetInfoRequest {}).await.is_err() {
                            tally.refused.fetch_add(1, Ordering::Relaxed);
                        }
                        held.push(client);
                    }
                    Err(_) => {
                        tally.refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }
    }
}

/// The attacker's own loopback address: limits per source address must hit
/// it, not the legitimate clients on 127.0.0.1.
const ATTACKER: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

async fn connect(address: SocketAddr) -> anyhow::Result<tonic::transport::Channel> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
            .connect_timeout(Duration::from_secs(5))
            .local_address(Some(ATTACKER))
            .connect()
            .await?,
    )
}

async fn raw_connect(address: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(ATTACKER, 0))?;
    tokio::time::timeout(Duration::from_secs(5), socket.connect(address))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// Runs every attack in `attacks` beside `load`; with `baseline_bin`, also the
/// load without attack on that relay binary (today's relay), for the
/// throughput-cost comparison.
pub async fn run(
    load: Load,
    attacks: &[Attack],
    relay_bin: &Path,
    baseline_bin: Option<&Path>,
) -> anyhow::Result<()> {
    let mut rows = Vec::with_capacity(attacks.len());
    for &attack in attacks {
        let tally = Arc::new(Tally::default());
        let (clean_per_second, clean_p99_us, clean_cpu_ms_per_1000) =
            measure(relay_bin, load, None, &tally).await?;
        let (attacked_per_second, attacked_p99_us, attacked_cpu_ms_per_1000) =
            measure(relay_bin, load, Some(attack), &tally)
                .await
                .with_context(|| format!("under {}", attack.name()))?;
        let row = Measured {
            attack,
            clean_per_second,
            clean_p99_us,
            clean_cpu_ms_per_1000,
            attacked_per_second,
            attacked_p99_us,
            attacked_cpu_ms_per_1000,
            attempts: tally.attempts.load(Ordering::Relaxed),
            refused: tally.refused.load(Ordering::Relaxed),
        };
        println!(
            "{}: {:.0} delivered/s (p99 {} µs) without, {:.0}/s (p99 {} µs) with the attack: ratio {:.2}; attacker {} attempts, {} refused",
            row.attack.name(),
            row.clean_per_second,
            row.clean_p99_us,
            row.attacked_per_second,
            row.attacked_p99_us,
            row.attacked_per_second / row.clean_per_second,
            row.attempts,
            row.refused
        );
        rows.push(row);
    }
    println!(
        "\n| attack | delivered/s without | p99 without | delivered/s with | p99 with | with / without | relay CPU ms per 1000 delivered, without → with | attacker attempts (refused) |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for row in &rows {
        println!(
            "| {} | {:.0} | {:.1} ms | {:.0} | {:.1} ms | {:.2} | {:.0} → {:.0} | {} ({}) |",
            row.attack.name(),
            row.clean_per_second,
            row.clean_p99_us as f64 / 1000.0,
            row.attacked_per_second,
            row.attacked_p99_us as f64 / 1000.0,
            row.attacked_per_second / row.clean_per_second,
            row.clean_cpu_ms_per_1000,
            row.attacked_cpu_ms_per_1000,
            row.attempts,
            row.refused
        );
    }
    if let Some(baseline) = baseline_bin {
        // Interleaved, so the machine's drift hits both alike.
        let tally = Arc::new(Tally::default());
        let mut this = Vec::new();
        let mut that = Vec::new();
        for _ in 0..3 {
            this.push(measure(relay_bin, load, None, &tally).await?.0);
            that.push(measure(baseline, load, None, &tally).await?.0);
        }
        this.sort_by(f64::total_cmp);
        that.sort_by(f64::total_cmp);
        println!(
            "\nwithout attack, median of 3 interleaved: this relay {:.0} delivered/s, {} {:.0}/s: ratio {:.2}",
            this[1],
            baseline.display(),
            that[1],
            this[1] / that[1]
        );
    }
    Ok(())
}
