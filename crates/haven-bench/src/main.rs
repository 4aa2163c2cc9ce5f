//! `haven-bench`: measures the relay against the raw limit of this machine in
//! the same run, interleaved (relay, raw, relay, raw, …) so that the ratio
//! survives the machine's drift. See BENCHMARKS.md.
//!
//! ```text
//! cargo build --release -p haven-server -p haven-bench
//! target/release/haven-bench throughput --messages 20000 --rounds 3
//! ```

mod attack;
mod client;
mod idle;
mod process;
mod raw;
mod relay;
mod storage;

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::process::{Served, free_address};
use crate::relay::{Load, quantile};

#[derive(Parser)]
#[command(
    name = "haven-bench",
    about = "Measures the Haven relay against the raw limits of this machine."
)]
struct Args {
    #[command(subcommand)]
    command: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Throughput and latency of durable 1 KiB delivery, against raw tonic echo.
    Throughput {
        /// Concurrent senders, each on its own connection.
        #[arg(long, default_value_t = 16)]
        senders: usize,
        /// Recipients holding Receive streams.
        #[arg(long, default_value_t = 16)]
        recipients: usize,
        /// Envelopes per round.
        #[arg(long, default_value_t = 20_000)]
        messages: usize,
        /// Envelope size in bytes.
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// Offered load in envelopes/s (0: as fast as possible). Latency is only
        /// meaningful below the maximum, e.g. at half of it.
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Relay/raw pairs to run, interleaved.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// The relay binary; by default `haven-relay` beside this one.
        #[arg(long)]
        relay_bin: Option<PathBuf>,
        /// Measure a relay already running at this address instead of starting
        /// one (its CPU and memory are then not reported).
        #[arg(long)]
        relay_address: Option<std::net::SocketAddr>,
        /// Start the relay on this Redis Cluster (comma-separated redis://
        /// seed nodes) instead of sled; each round uses a fresh key namespace.
        #[arg(long)]
        redis_nodes: Option<String>,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Idle Receive streams: relay memory per stream, and delivery to a random
    /// sample of them while all stay connected.
    Idle {
        /// Streams to open (each on its own mailbox).
        #[arg(long, default_value_t = 10_000)]
        streams: usize,
        /// Streams multiplexed per HTTP/2 connection (1 is what phones do).
        #[arg(long, default_value_t = 1)]
        per_connection: usize,
        /// Streams that get one envelope each while all are connected.
        #[arg(long, default_value_t = 1000)]
        sample: usize,
        /// The relay binary; by default `haven-relay` beside this one.
        #[arg(long)]
        relay_bin: Option<PathBuf>,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The store: put throughput with group commit vs one sync per put vs raw
    /// sled (same run), and expiry sweeps with 1 %, 10 % and 50 % expired.
    Storage {
        /// Puts with group commit (the sync-per-put variants use a quarter).
        #[arg(long, default_value_t = 20_000)]
        puts: usize,
        /// Concurrent writers.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Payload bytes per put.
        #[arg(long, default_value_t = 1024)]
        bytes: usize,
        /// Envelopes stored for the sweep measurement.
        #[arg(long, default_value_t = 200_000)]
        stored: usize,
        /// Mailboxes they are spread over.
        #[arg(long, default_value_t = 1_000)]
        mailboxes: usize,
    },
    /// The client side: Haven's protocol next to vodozemac, from the last
    /// `cargo bench -p haven-protocol --bench protocol` run.
    Client {
        /// Where criterion wrote its results.
        #[arg(long, default_value = "target/criterion")]
        criterion_dir: PathBuf,
    },
    /// The throughput load beside each abuse the relay must hold against
    /// (bounded), on a fresh relay each: delivered/s and p99 without and with.
    Attack {
        /// Concurrent senders, each on its own connection.
        #[arg(long, default_value_t = 8)]
        senders: usize,
        /// Recipients holding Receive streams.
        #[arg(long, default_value_t = 8)]
        recipients: usize,
        /// Envelopes per measured run.
        #[arg(long, default_value_t = 5_000)]
        messages: usize,
        /// Envelope size in bytes.
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// Which attacks (all by default).
        #[arg(long, value_enum, value_delimiter = ',')]
        attacks: Vec<attack::Attack>,
        /// The relay binary; by default `haven-relay` beside this one.
        #[arg(long)]
        relay_bin: Option<PathBuf>,
        /// Another relay binary (today's) to compare throughput without attack
        /// with, interleaved, median of 3.
        #[arg(long)]
        baseline_relay_bin: Option<PathBuf>,
    },
    /// Internal: serve the raw echo baseline on an address.
    RawServer {
        /// Where to listen.
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
}

struct Round {
    delivered_per_second: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    relay_cpu_seconds: f64,
    relay_peak_rss_mib: f64,
    raw_per_second: f64,
    raw_push_per_second: f64,
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    Ok(me.with_file_name(name))
}

/// Which relay to measure.
enum Target {
    /// Start a fresh relay process per round from this binary (default: beside this one).
    Start(Option<PathBuf>),
    /// A relay someone else runs.
    Running(std::net::SocketAddr),
}

async fn throughput(
    load: Load,
    rounds: usize,
    target: Target,
    redis_nodes: Option<String>,
    json: Option<PathBuf>,
) -> anyhow::Result<()> {
    let store = if redis_nodes.is_some() {
        "redis"
    } else {
        "sled"
    };
    let relay_bin = match &target {
        Target::Start(Some(path)) => path.clone(),
        Target::Start(None) | Target::Running(_) => sibling("haven-relay")?,
    };
    anyhow::ensure!(
        matches!(target, Target::Running(_)) || relay_bin.exists(),
        "{} not found; build it with `cargo build --release -p haven-server` or pass --relay-bin",
        relay_bin.display()
    );
    let me = std::env::current_exe()?;
    let mut results = Vec::with_capacity(rounds);
    for round in 0..rounds {
        // A: the relay, fresh process and data directory each round.
        let data = tempfile::tempdir()?;
        let (relay, address) = match &target {
            Target::Running(address) => (None, *address),
            Target::Start(_) => {
                let address = free_address()?;
                let mut args: Vec<String> = vec![
                    "--listen".into(),
                    address.to_string(),
                    "--metrics-listen".into(),
                    "off".into(),
                    "--data-dir".into(),
                    data.path().join("haven-data").display().to_string(),
                    "--log-level".into(),
                    "warn".into(),
                ];
                if let Some(nodes) = &redis_nodes {
                    args.extend([
                        "--store".into(),
                        "redis".into(),
                        "--redis-nodes".into(),
                        nodes.clone(),
                        "--redis-namespace".into(),
                        format!("bench{}-{round}", std::process::id()),
                    ]);
                }
                (
                    Some(Served::start(&relay_bin, address, &args).await?),
                    address,
                )
            }
        };
        let cpu_before = relay.as_ref().and_then(Served::cpu_seconds).unwrap_or(0.0);
        let outcome = relay::run(address, load).await.context("relay round")?;
        let relay_cpu_seconds =
            relay.as_ref().and_then(Served::cpu_seconds).unwrap_or(0.0) - cpu_before;
        let relay_peak_rss_mib =
            relay.as_ref().and_then(Served::peak_rss_kib).unwrap_or(0) as f64 / 1024.0;
        drop(relay);
        // B: the raw echo baseline, same message count and concurrency.
        let address = free_address()?;
        let raw_args = vec!["raw-server".into(), "--listen".into(), address.to_string()];
        let raw_server = Served::start(&me, address, &raw_args).await?;
        let raw_per_second = raw::load(address, load.senders, load.messages, load.size).await?;
        let raw_push_per_second = raw::forward(
            address,
            load.senders,
            load.recipients,
            load.messages,
            load.size,
        )
        .await?;
        drop(raw_server);
        let round_result = Round {
            delivered_per_second: outcome.delivered_per_second,
            p50_us: quantile(&outcome.latencies_us, 0.5),
            p99_us: quantile(&outcome.latencies_us, 0.99),
            p999_us: quantile(&outcome.latencies_us, 0.999),
            relay_cpu_seconds,
            relay_peak_rss_mib,
            raw_per_second,
            raw_push_per_second,
        };
        println!(
            "round {}: relay {:.0} delivered/s (p50 {} µs, p99 {} µs, p999 {} µs, {:.2} CPU s, {:.0} MiB peak) | raw echo {:.0}/s, raw send->stream {:.0}/s | ratio to echo {:.2}, to send->stream {:.2}",
            round + 1,
            round_result.delivered_per_second,
            round_result.p50_us,
            round_result.p99_us,
            round_result.p999_us,
            round_result.relay_cpu_seconds,
            round_result.relay_peak_rss_mib,
            round_result.raw_per_second,
            round_result.raw_push_per_second,
            round_result.delivered_per_second / round_result.raw_per_second,
            round_result.delivered_per_second / round_result.raw_push_per_second
        );
        results.push(round_result);
    }
    let mut ratios: Vec<f64> = results
        .iter()
        .map(|r| r.delivered_per_second / r.raw_per_second)
        .collect();
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    let offered = if load.rate == 0 {
        "as fast as possible".to_owned()
    } else {
        format!("offered {}/s", load.rate)
    };
    println!(
        "\n{} senders -> {} recipients, {} envelopes of {} B per round, {offered}, {} rounds ({store}, durable sends, acked)",
        load.senders, load.recipients, load.messages, load.size, rounds
    );
    let mut push_ratios: Vec<f64> = results
        .iter()
        .map(|r| r.delivered_per_second / r.raw_push_per_second)
        .collect();
    push_ratios.sort_by(f64::total_cmp);
    let median_push = push_ratios[push_ratios.len() / 2];
    println!("median relay / raw unary echo ratio: {median:.2}");
    println!("median relay / raw send -> server-stream forward ratio: {median_push:.2}");
    if let Some(path) = json {
        let mut out = String::from("{\"scenario\":\"throughput\",\"rounds\":[");
        for (index, r) in results.iter().enumerate() {
            if index > 0 {
                out.push(',');
            }
            write!(
                out,
                "{{\"delivered_per_second\":{:.1},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"relay_cpu_seconds\":{:.3},\"relay_peak_rss_mib\":{:.1},\"raw_echo_per_second\":{:.1},\"raw_push_per_second\":{:.1}}}",
                r.delivered_per_second,
                r.p50_us,
                r.p99_us,
                r.p999_us,
                r.relay_cpu_seconds,
                r.relay_peak_rss_mib,
                r.raw_per_second,
                r.raw_push_per_second
            )?;
        }
        write!(
            out,
            "],\"store\":\"{store}\",\"median_ratio\":{median:.3},\"median_push_ratio\":{median_push:.3}}}"
        )?;
        std::fs::write(&path, out).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

async fn idle_streams(
    streams: usize,
    per_connection: usize,
    sample: usize,
    relay_bin: Option<PathBuf>,
    json: Option<PathBuf>,
) -> anyhow::Result<()> {
    let relay_bin = match relay_bin {
        Some(path) => path,
        None => sibling("haven-relay")?,
    };
    let connections = streams.div_ceil(per_connection);
    let data = tempfile::tempdir()?;
    let address = free_address()?;
    // Limits sized to the run; everything else is the relay's default, but
    // Create stamps: this measures stream memory, and tens of thousands of
    // 18-bit stamps would be minutes of set-up (the throughput run stamps).
    let config = data.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{address}\"\nmetrics_listen = \"off\"\ndata_dir = \"{}\"\n\
             create_pow_required = false\n\n[log]\nlevel = \"warn\"\n\n\
             [limits]\nmax_streams = {}\nmax_connections = {}\nmax_calls_per_connection = {}\n",
            data.path().join("haven-data").display(),
            streams + 100,
            connections + 100,
            per_connection + 16,
        ),
    )?;
    let relay = Served::start(
        &relay_bin,
        address,
        &["--config".into(), config.display().to_string()],
    )
    .await?;
    let outcome = idle::run(address, streams, per_connection, sample, || relay.rss_kib()).await?;
    let per_stream = (outcome.rss_after_kib.saturating_sub(outcome.rss_before_kib)) as f64 * 1024.0
        / outcome.streams as f64;
    println!(
        "{} idle streams over {} connections (127.0.0.1-250 sources), opened in {:.1} s",
        outcome.streams, outcome.connections, outcome.open_seconds
    );
    let per_client = (outcome.rss_after_kib.saturating_sub(outcome.rss_start_kib)) as f64 * 1024.0
        / outcome.streams as f64;
    println!(
        "relay RSS: {:.0} MiB idle, {:.0} MiB with connections and mailboxes, {:.0} MiB with every stream open",
        outcome.rss_start_kib as f64 / 1024.0,
        outcome.rss_before_kib as f64 / 1024.0,
        outcome.rss_after_kib as f64 / 1024.0,
    );
    println!(
        "per stream: {:.1} KiB for the stream alone, {:.1} KiB with its share of connection and mailbox",
        per_stream / 1024.0,
        per_client / 1024.0
    );
    println!(
        "{} envelopes to random streams while all were connected: all delivered in {:.2} s; send -> deliver p50 {} µs, p99 {} µs",
        outcome.latencies_us.len(),
        outcome.sample_seconds,
        quantile(&outcome.latencies_us, 0.5),
        quantile(&outcome.latencies_us, 0.99),
    );
    if let Some(path) = json {
        let out = format!(
            "{{\"scenario\":\"idle\",\"streams\":{},\"connections\":{},\"open_seconds\":{:.2},\"rss_start_kib\":{},\"rss_before_kib\":{},\"rss_after_kib\":{},\"bytes_per_stream\":{:.0},\"bytes_per_client\":{:.0},\"sample\":{},\"sample_seconds\":{:.3},\"p50_us\":{},\"p99_us\":{}}}",
            outcome.streams,
            outcome.connections,
            outcome.open_seconds,
            outcome.rss_start_kib,
            outcome.rss_before_kib,
            outcome.rss_after_kib,
            per_stream,
            per_client,
            outcome.latencies_us.len(),
            outcome.sample_seconds,
            quantile(&outcome.latencies_us, 0.5),
            quantile(&outcome.latencies_us, 0.99),
        );
        std::fs::write(&path, out).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Scenario::Throughput {
            senders,
            recipients,
            messages,
            size,
            rate,
            rounds,
            relay_bin,
            relay_address,
            redis_nodes,
            json,
        } => {
            anyhow::ensure!(
                senders > 0 && recipients > 0 && messages >= senders && rounds > 0,
                "every count must be positive, and messages at least senders"
            );
            throughput(
                Load {
                    senders,
                    recipients,
                    messages,
                    size,
                    rate,
                },
                rounds,
                match relay_address {
                    Some(address) => Target::Running(address),
                    None => Target::Start(relay_bin),
                },
                redis_nodes,
                json,
            )
            .await
        }
        Scenario::Idle {
            streams,
            per_connection,
            sample,
            relay_bin,
            json,
        } => {
            anyhow::ensure!(
                streams > 0 && per_connection > 0 && sample <= streams,
                "streams and per-connection must be positive, and the sample at most the streams"
            );
            idle_streams(streams, per_connection, sample, relay_bin, json).await
        }
        Scenario::Storage {
            puts,
            concurrency,
            bytes,
            stored,
            mailboxes,
        } => {
            anyhow::ensure!(
                puts > 0 && concurrency > 0 && mailboxes > 0 && stored > 0,
                "every count must be positive"
            );
            storage::puts(puts, concurrency, bytes).await?;
            println!();
            storage::sweeps(stored, mailboxes).await
        }
        Scenario::Client { criterion_dir } => client::summary(&criterion_dir),
        Scenario::Attack {
            senders,
            recipients,
            messages,
            size,
            attacks,
            relay_bin,
            baseline_relay_bin,
        } => {
            let relay_bin = match relay_bin {
                Some(path) => path,
                None => sibling("haven-relay")?,
            };
            let attacks = if attacks.is_empty() {
                attack::Attack::ALL.to_vec()
            } else {
                attacks
            };
            let load = Load {
                senders,
                recipients,
                messages,
                size,
                rate: 0,
            };
            attack::run(load, &attacks, &relay_bin, baseline_relay_bin.as_deref()).await
        }
        Scenario::RawServer { listen } => raw::serve(listen).await,
    }
}
