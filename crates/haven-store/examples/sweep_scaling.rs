//! Shows that an expiry sweep costs time in proportion to what expired, not to
//! what is stored: with N envelopes stored, sweeps 1%, 10% and 50% of them and
//! reports the time per swept envelope (flat when the index does its job).
//!
//! ```text
//! cargo run --release -p haven-store --example sweep_scaling -- [stored] [mailboxes]
//! ```

use std::sync::Arc;
use std::time::Instant;

use haven_store::{
    EnvelopeId, MailboxId, MailboxKind, MailboxRecord, MailboxStore, NewEnvelope, PublicKey, Quota,
    SenderId, SledConfig, SledStore, StoreConfig,
};

const NOW: u64 = 1_800_000_000;
const BUCKET: u64 = 60;

fn argument(index: usize, default: usize) -> usize {
    std::env::args()
        .nth(index)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let stored = argument(1, 200_000);
    let mailboxes = argument(2, 1_000).max(1);
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
        assert_eq!(report.expired_envelopes as usize, expiring);
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
