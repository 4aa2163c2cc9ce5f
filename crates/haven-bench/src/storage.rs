//! Scenario 4: the store. Durable `put` throughput of the sled store with
//! group commit, with one log sync per put, and raw sled `insert` + `flush` as the
//! reference, interleaved in one run; and the expiry sweep with 1 %, 10 % and
//! 50 % of the stored envelopes expired, which must cost time in proportion to
//! what expired, not to what is stored.

use std::sync::Arc;
use std::time::Instant;

use haven_store::{
    EnvelopeId, MailboxId, MailboxKind, MailboxRecord, MailboxStore, NewEnvelope, PublicKey, Quota,
    SenderId, SledConfig, SledStore, StoreConfig,
};

const NOW: u64 = 1_800_000_000;
const BUCKET: u64 = 60;

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
                    spent: None,
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

/// Puts: group commit vs one sync per put vs raw sled, twice each, interleaved.
pub async fn puts(puts: usize, concurrency: usize, bytes: usize) -> anyhow::Result<()> {
    // Interleave the three, twice, so drift affects them alike.
    let mut rows: Vec<(&str, Vec<f64>)> = vec![
        ("store, group commit", vec![]),
        ("store, sync per put", vec![]),
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
        "{puts} puts of {bytes} B from {concurrency} concurrent writers (sync-per-put runs use a quarter as many)"
    );
    println!("{:<24} {:>12}", "variant", "puts/s (best of 2)");
    let best: Vec<f64> = rows
        .iter()
        .map(|(_, v)| v.iter().copied().fold(0.0, f64::max))
        .collect();
    for ((name, _), best) in rows.iter().zip(&best) {
        println!("{name:<24} {best:>12.0}");
    }
    println!("group commit / sync per put: {:.1}x", best[0] / best[1]);
    println!(
        "group commit / raw sled insert+flush: {:.1}x",
        best[0] / best[2]
    );
    Ok(())
}

/// Fills a fresh store with `stored` envelopes over `mailboxes` mailboxes, of
/// which `expiring` sit in the first bucket and the rest far later.
async fn filled(
    stored: usize,
    mailboxes: usize,
    expiring: usize,
) -> anyhow::Result<(tempfile::TempDir, Arc<SledStore>)> {
    let dir = tempfile::tempdir()?;
    let mut config = SledConfig::new(dir.path());
    config.store = StoreConfig {
        bucket_seconds: BUCKET,
    };
    let store = Arc::new(SledStore::open(config)?);
    let ids: Vec<MailboxId> = (0..mailboxes as u32)
        .map(|n| {
            let mut id = [7u8; 16];
            id[..4].copy_from_slice(&n.to_be_bytes());
            MailboxId::from_bytes(id)
        })
        .collect();
    for (n, id) in ids.iter().enumerate() {
        let mut sender = [9u8; 16];
        sender[..8].copy_from_slice(&(n as u64).to_be_bytes());
        let record = MailboxRecord::new(
            *id,
            SenderId::from_bytes(sender),
            PublicKey::from_bytes([3; 32]),
            MailboxKind::Private,
        );
        store.create_mailbox(record).await?;
    }
    let quota = Quota {
        max_envelopes: u64::MAX,
        max_bytes: u64::MAX,
    };
    let writers = 64.min(stored.max(1));
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let store = Arc::clone(&store);
        let ids = ids.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = writer;
            while n < stored {
                let mut envelope_id = [0u8; 16];
                envelope_id[..8].copy_from_slice(&(n as u64).to_be_bytes());
                let expires_at = if n < expiring {
                    NOW + 1
                } else {
                    NOW + 100 * BUCKET
                };
                let envelope = NewEnvelope {
                    id: EnvelopeId::from_bytes(envelope_id),
                    expires_at,
                    payload: vec![1; 256],
                    spent: None,
                };
                store.put(&ids[n % ids.len()], envelope, quota, NOW).await?;
                n += writers;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok((dir, store))
}

/// Sweeps of 1 %, 10 % and 50 % expired out of `stored`.
pub async fn sweeps(stored: usize, mailboxes: usize) -> anyhow::Result<()> {
    println!("{stored} envelopes of 256 B in {mailboxes} mailboxes (sled, group commit)");
    println!(
        "{:>8} {:>10} {:>12} {:>16}",
        "expired", "swept", "sweep ms", "µs per envelope"
    );
    for percent in [1usize, 10, 50] {
        let expiring = stored * percent / 100;
        let (_dir, store) = filled(stored, mailboxes, expiring).await?;
        let started = Instant::now();
        let report = store.sweep(NOW + BUCKET).await?;
        let elapsed = started.elapsed();
        anyhow::ensure!(
            report.expired_envelopes as usize == expiring,
            "the sweep removed {} of {expiring} expired envelopes",
            report.expired_envelopes
        );
        println!(
            "{:>7}% {:>10} {:>12.1} {:>16.2}",
            percent,
            report.expired_envelopes,
            elapsed.as_secs_f64() * 1e3,
            elapsed.as_secs_f64() * 1e6 / report.expired_envelopes.max(1) as f64
        );
    }
    Ok(())
}
