//! Measures durable `put` throughput of the sled store with group commit, with
//! one flush per put, and raw sled `insert` + `flush` as the reference, all in
//! one run (this machine's noise between runs is large; only same-run ratios
//! mean anything).
//!
//! ```text
//! cargo run --release -p haven-store --example put_throughput -- [puts] [concurrency] [bytes]
//! ```

use std::sync::Arc;
use std::time::Instant;

use haven_store::{
    EnvelopeId, MailboxId, MailboxKind, MailboxRecord, MailboxStore, NewEnvelope, PublicKey, Quota,
    SenderId, SledConfig, SledStore,
};

const NOW: u64 = 1_800_000_000;

fn argument(index: usize, default: usize) -> usize {
    std::env::args()
        .nth(index)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

async fn store_puts(
    group_commit: bool,
    puts: usize,
    concurrency: usize,
    bytes: usize,
) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let mut config = SledConfig::new(dir.path());
    config.group_commit = group_commit;
    let store = Arc::new(SledStore::open(config)?);
    let mailboxes: Vec<MailboxId> = (0..concurrency)
        .map(|n| {
            MailboxId::from_bytes([
                (n % 256) as u8,
                (n / 256) as u8,
                1,
                1,
                1,
                1,
                1,
                1,
                1,
                1,
                1,
                1,
                1,
                1,
                1,
                1,
            ])
        })
        .collect();
    for (n, id) in mailboxes.iter().enumerate() {
        let sender = SenderId::from_bytes([
            (n % 256) as u8,
            (n / 256) as u8,
            2,
            2,
            2,
            2,
            2,
            2,
            2,
            2,
            2,
            2,
            2,
            2,
            2,
            2,
        ]);
        store
            .create_mailbox(MailboxRecord::new(
                *id,
                sender,
                PublicKey::from_bytes([3; 32]),
                MailboxKind::Private,
            ))
            .await?;
    }
    let quota = Quota {
        max_envelopes: u64::MAX,
        max_bytes: u64::MAX,
    };
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (worker, id) in mailboxes.into_iter().enumerate() {
        let store = Arc::clone(&store);
        let share = puts / concurrency;
        tasks.push(tokio::spawn(async move {
            for n in 0..share {
                let mut envelope_id = [0u8; 16];
                envelope_id[..8].copy_from_slice(&(n as u64).to_be_bytes());
                envelope_id[8..16].copy_from_slice(&(worker as u64).to_be_bytes());
                let envelope = NewEnvelope {
                    id: EnvelopeId::from_bytes(envelope_id),
                    expires_at: NOW + 3600,
                    payload: vec![7; bytes],
                };
                store.put(&id, envelope, quota, NOW).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok((puts / concurrency * concurrency) as f64 / started.elapsed().as_secs_f64())
}

fn raw_sled(puts: usize, bytes: usize) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let db = sled::Config::new()
        .path(dir.path())
        .flush_every_ms(None)
        .open()?;
    let started = Instant::now();
    for n in 0..puts {
        db.insert((n as u64).to_be_bytes(), vec![7; bytes])?;
        db.flush()?;
    }
    Ok(puts as f64 / started.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let puts = argument(1, 20_000);
    let concurrency = argument(2, 64).max(1);
    let bytes = argument(3, 1024);
    // Interleave the three, twice, so drift affects them alike.
    let mut rows: Vec<(&str, Vec<f64>)> = vec![
        ("store, group commit", vec![]),
        ("store, flush per put", vec![]),
        ("raw sled insert+flush", vec![]),
    ];
    for _ in 0..2 {
        rows[0]
            .1
            .push(store_puts(true, puts, concurrency, bytes).await?);
        rows[1]
            .1
            .push(store_puts(false, puts / 4, concurrency, bytes).await?);
        rows[2].1.push(raw_sled(puts / 4, bytes)?);
    }
    println!(
        "{puts} puts of {bytes} B from {concurrency} concurrent writers (flush-per-put runs use a quarter as many)"
    );
    println!("{:<24} {:>12}", "variant", "puts/s (best of 2)");
    let best: Vec<f64> = rows
        .iter()
        .map(|(_, v)| v.iter().copied().fold(0.0, f64::max))
        .collect();
    for ((name, _), best) in rows.iter().zip(&best) {
        println!("{name:<24} {best:>12.0}");
    }
    println!("group commit / flush per put: {:.1}x", best[0] / best[1]);
    println!(
        "group commit / raw sled insert+flush: {:.1}x",
        best[0] / best[2]
    );
    Ok(())
}
