//! What only the on-disk backend promises: restarts keep data, and expired data
#![allow(clippy::expect_used, clippy::unwrap_used)] // reason: test helpers; a failed expect is a failed test.
//! is unreadable on disk (crypto-shredding).

use std::path::Path;

use haven_store::{
    EnvelopeId, MailboxId, MailboxKind, MailboxRecord, MailboxStore, NewEnvelope, PublicKey,
    PutOutcome, Quota, SenderId, SledConfig, SledStore, StoreConfig, bucket_end,
};

const NOW: u64 = 1_800_000_000;
const BUCKET: u64 = 60;

fn config(path: &Path) -> SledConfig {
    let mut config = SledConfig::new(path);
    config.store = StoreConfig {
        bucket_seconds: BUCKET,
    };
    config
}

fn record() -> MailboxRecord {
    MailboxRecord::new(
        MailboxId::from_bytes([1; 16]),
        SenderId::from_bytes([2; 16]),
        PublicKey::from_bytes([3; 32]),
        MailboxKind::Intake,
    )
}

fn envelope(n: u8, expires_at: u64, payload: Vec<u8>) -> NewEnvelope {
    NewEnvelope {
        id: EnvelopeId::from_bytes([n; 16]),
        expires_at,
        payload,
        spent: None,
    }
}

/// Puts envelope `n` (100 bytes of `n`, ten buckets to live) into `mailbox`.
async fn put_one(store: &SledStore, mailbox: &MailboxRecord, n: u8) -> anyhow::Result<PutOutcome> {
    Ok(store
        .put(
            &mailbox.recipient_id,
            envelope(n, NOW + 10 * BUCKET, vec![n; 100]),
            Quota::default(),
            NOW,
        )
        .await?)
}

/// Every file under `dir`, read raw.
fn all_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        for entry in std::fs::read_dir(&path).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((
                    path.display().to_string(),
                    std::fs::read(&path).expect("read file"),
                ));
            }
        }
    }
    out
}

fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    all_files(dir)
        .into_iter()
        .filter(|(_, bytes)| bytes.windows(needle.len()).any(|w| w == needle))
        .map(|(name, _)| name)
        .collect()
}

#[tokio::test]
async fn reopen_keeps_unexpired_envelopes_and_counters() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mailbox = record();
    {
        let store = SledStore::open(config(dir.path()))?;
        store.create_mailbox(mailbox.clone()).await?;
        store
            .secure(&mailbox.recipient_id, PublicKey::from_bytes([4; 32]))
            .await?;
        for n in 0..5 {
            let expires = if n < 2 { NOW + 10 } else { NOW + 10 * BUCKET };
            store
                .put(
                    &mailbox.recipient_id,
                    envelope(n, expires, vec![n; 100]),
                    Quota::default(),
                    NOW,
                )
                .await?;
        }
        store
            .ack(&mailbox.recipient_id, &[EnvelopeId::from_bytes([4; 16])])
            .await?;
    }
    let store = SledStore::open(config(dir.path()))?;
    let stored = store
        .mailbox_by_sender(&mailbox.sender_id)
        .await?
        .expect("mailbox survives");
    assert_eq!(stored.sender_key, Some(PublicKey::from_bytes([4; 32])));
    let listed = store.list(&mailbox.recipient_id, None, 10, NOW).await?;
    assert_eq!(
        listed.iter().map(|e| e.payload[0]).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    let stats = store.stats();
    assert_eq!((stats.mailboxes, stats.envelopes, stats.bytes), (1, 4, 400));
    // Sequence numbers continue after a restart instead of reusing old ones.
    store
        .put(
            &mailbox.recipient_id,
            envelope(9, NOW + 5 * BUCKET, vec![9]),
            Quota::default(),
            NOW,
        )
        .await?;
    let listed = store.list(&mailbox.recipient_id, None, 10, NOW).await?;
    assert_eq!(listed.last().map(|e| e.payload.clone()), Some(vec![9]));
    assert!(listed.windows(2).all(|w| w[0].seq < w[1].seq));
    // Expired ones are gone after the bucket passes, also across restarts.
    assert_eq!(
        store
            .sweep(bucket_end(NOW + 10, BUCKET))
            .await?
            .expired_envelopes,
        2
    );
    drop(store);
    let store = SledStore::open(config(dir.path()))?;
    assert_eq!(store.stats().envelopes, 3);
    Ok(())
}

#[tokio::test]
async fn expired_envelopes_are_unreadable_on_disk_after_their_key_is_destroyed()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mailbox = record();
    let marker = b"HAVEN-SHRED-MARKER-7f3a9c".to_vec();
    let expires = NOW + 30;
    let bucket = bucket_end(expires, BUCKET);
    let store = SledStore::open(config(dir.path()))?;
    store.create_mailbox(mailbox.clone()).await?;
    let mut payloads = Vec::new();
    for n in 0..50u8 {
        let mut payload = marker.clone();
        payload.extend_from_slice(format!(" envelope {n} ").as_bytes());
        payload.extend(std::iter::repeat_n(n, 200));
        let outcome = store
            .put(
                &mailbox.recipient_id,
                envelope(n, expires, payload.clone()),
                Quota::default(),
                NOW,
            )
            .await?;
        assert_eq!(outcome, PutOutcome::Stored);
        payloads.push(payload);
    }
    store.flush().await?;
    let key = store
        .bucket_key_for_test(bucket)
        .expect("a key for the live bucket");

    // Sealed at rest from the start: the plaintext never reaches the files...
    assert_eq!(files_containing(dir.path(), &marker), Vec::<String>::new());
    // ...while the scan does find what is there: the live key in the key file.
    assert_eq!(
        files_containing(dir.path(), &key).len(),
        1,
        "the scanner can find bytes"
    );

    let report = store.sweep(bucket).await?;
    assert_eq!((report.expired_envelopes, report.shredded_buckets), (50, 1));
    assert_eq!(store.bucket_key_for_test(bucket), None);
    drop(store);

    assert_eq!(files_containing(dir.path(), &marker), Vec::<String>::new());
    assert_eq!(
        files_containing(dir.path(), &key),
        Vec::<String>::new(),
        "key bytes destroyed"
    );
    for payload in &payloads {
        assert_eq!(
            files_containing(dir.path(), &payload[marker.len()..]),
            Vec::<String>::new()
        );
    }
    // A reopened store has no key for the bucket and lists nothing.
    let store = SledStore::open(config(dir.path()))?;
    assert_eq!(store.bucket_key_for_test(bucket), None);
    assert!(
        store
            .list(&mailbox.recipient_id, None, 100, NOW)
            .await?
            .is_empty()
    );
    Ok(())
}

/// The bytes in both write-ahead log files of a data directory.
fn log_bytes(dir: &Path) -> u64 {
    ["wal-0", "wal-1"]
        .iter()
        .map(|name| std::fs::metadata(dir.join(name)).map_or(0, |m| m.len()))
        .sum()
}

/// Copies every file under `from` to `to`, as a crash would leave them: what
/// the running process has written so far, nothing it still holds in memory.
fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("read dir").flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            std::fs::create_dir_all(&target).expect("create dir");
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

#[tokio::test]
async fn a_crash_image_holds_every_acknowledged_write_and_nothing_half_done() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let mailbox = record();
    let store = SledStore::open(config(dir.path()))?;
    store.create_mailbox(mailbox.clone()).await?;
    // Several at once, so that batches share syncs.
    let puts = (0..200u8).map(|n| {
        store.put(
            &mailbox.recipient_id,
            envelope(n, NOW + 10 * BUCKET, vec![n; 500]),
            Quota::default(),
            NOW,
        )
    });
    for outcome in futures::future::join_all(puts).await {
        assert_eq!(outcome?, PutOutcome::Stored);
    }
    let acked: Vec<EnvelopeId> = (0..50).map(|n| EnvelopeId::from_bytes([n; 16])).collect();
    assert_eq!(store.ack(&mailbox.recipient_id, &acked).await?, 50);

    // The image is taken while the store runs: sled has flushed nothing since
    // it opened, so only the write-ahead log holds these writes.
    let image = tempfile::tempdir()?;
    copy_dir(dir.path(), image.path());
    let log_bytes = log_bytes(image.path());
    assert!(
        log_bytes > 150 * 500,
        "the log holds the writes ({log_bytes} bytes)"
    );
    // A torn record at the end of the log, as a crash in mid-write leaves it.
    let mut torn = std::fs::OpenOptions::new()
        .append(true)
        .open(image.path().join("wal-0"))?;
    std::io::Write::write_all(&mut torn, &[200, 0, 0, 0, 1, 2, 3, 4, 5])?;
    drop(torn);

    let recovered = SledStore::open(config(image.path()))?;
    let listed = recovered
        .list(&mailbox.recipient_id, None, 1000, NOW)
        .await?;
    assert_eq!(
        listed.iter().map(|e| e.payload[0]).collect::<Vec<_>>(),
        (50..200u8).collect::<Vec<_>>(),
        "every acknowledged put and ack, in order"
    );
    let stats = recovered.stats();
    assert_eq!(
        (stats.mailboxes, stats.envelopes, stats.bytes),
        (1, 150, 150 * 500)
    );
    // The counters and indexes agree with the envelopes: a duplicate is still
    // a duplicate, an acked id can be stored again, and sequence numbers go on.
    let again = |n: u8| envelope(n, NOW + 10 * BUCKET, vec![n; 500]);
    assert_eq!(
        recovered
            .put(&mailbox.recipient_id, again(120), Quota::default(), NOW)
            .await?,
        PutOutcome::Duplicate
    );
    assert_eq!(
        recovered
            .put(&mailbox.recipient_id, again(7), Quota::default(), NOW)
            .await?,
        PutOutcome::Stored
    );
    let listed = recovered
        .list(&mailbox.recipient_id, None, 1000, NOW)
        .await?;
    assert_eq!(listed.len(), 151);
    assert_eq!(listed.last().map(|e| e.payload[0]), Some(7));
    assert!(listed.windows(2).all(|w| w[0].seq < w[1].seq));
    drop(recovered);
    drop(store);
    Ok(())
}

#[tokio::test]
async fn a_clean_shutdown_leaves_the_log_empty() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mailbox = record();
    {
        let store = SledStore::open(config(dir.path()))?;
        store.create_mailbox(mailbox.clone()).await?;
        put_one(&store, &mailbox, 1).await?;
        assert!(log_bytes(dir.path()) > 0);
    }
    assert_eq!(log_bytes(dir.path()), 0);
    let store = SledStore::open(config(dir.path()))?;
    assert_eq!(
        store
            .list(&mailbox.recipient_id, None, 10, NOW)
            .await?
            .len(),
        1
    );
    Ok(())
}

#[tokio::test]
async fn a_sweep_empties_the_log_so_it_keeps_no_record_of_deleted_mailboxes() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(config(dir.path()))?;
    let mailbox = MailboxRecord::new(
        MailboxId::from_bytes([0x5c; 16]),
        SenderId::from_bytes([0x6d; 16]),
        PublicKey::from_bytes([0x7e; 32]),
        MailboxKind::Private,
    );
    store.create_mailbox(mailbox.clone()).await?;
    put_one(&store, &mailbox, 1).await?;
    assert!(store.delete_mailbox(&mailbox.recipient_id).await?);
    assert!(
        files_containing(dir.path(), &[0x5c; 16])
            .iter()
            .any(|name| name.ends_with("wal-0") || name.ends_with("wal-1")),
        "the log records the mailbox before the sweep"
    );
    store.sweep(NOW).await?;
    assert_eq!(
        log_bytes(dir.path()),
        0,
        "the sweep's checkpoint empties the log"
    );
    // Nothing acknowledged was lost by the checkpoint.
    let kept = record();
    store.create_mailbox(kept.clone()).await?;
    put_one(&store, &kept, 2).await?;
    store.sweep(NOW).await?;
    drop(store);
    let store = SledStore::open(config(dir.path()))?;
    assert_eq!(
        store.list(&kept.recipient_id, None, 10, NOW).await?.len(),
        1
    );
    assert!(store.mailbox(&mailbox.recipient_id).await?.is_none());
    Ok(())
}
