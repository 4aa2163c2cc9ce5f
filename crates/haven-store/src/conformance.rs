//! The one behaviour every [`MailboxStore`] backend must show, as a test suite.
//!
//! A backend's test file runs it with [`conformance_suite!`](crate::conformance_suite),
//! giving an async expression that makes a fresh store configured with
//! [`config`] (and anything that must live as long as it, such as a temporary
//! directory):
//!
//! ```text
//! haven_store::conformance_suite!(async {
//!     let store: Arc<dyn Store> = Arc::new(MemoryStore::new(conformance::config()));
//!     (store, ())
//! });
//! ```
//!
//! Each scenario is a public async function that panics (through `assert!`) on
//! a deviation, so each becomes one named test per backend.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)] // reason: a test suite; a failed unwrap is a failed test.

use std::sync::Arc;
use std::time::Duration;

use crate::{
    ClaimedBundle, DeviceKey, DirectoryStore, DocumentKind, MAX_ONE_TIME_PREKEYS, PrekeyCount,
    PrekeyUpload, Store, SupporterKey,
};
use crate::{
    EnvelopeId, MailboxId, MailboxKind, MailboxRecord, MailboxStore, NewEnvelope, PublicKey,
    PushRegistration, PutOutcome, Quota, RECORD_SECONDS, RequestDigest, SenderCheck, SenderId,
    SpentStamp, StoreConfig, StoreError, bucket_end, record_until,
};

/// The bucket width every store under test must be configured with.
pub const BUCKET_SECONDS: u64 = 60;
/// The suite's "now": an arbitrary point in time, on a bucket boundary.
pub const NOW: u64 = 1_800_000_000;

/// The store settings the suite expects.
pub fn config() -> StoreConfig {
    StoreConfig {
        bucket_seconds: BUCKET_SECONDS,
    }
}

/// Runs every scenario as its own `#[tokio::test]`.
#[macro_export]
macro_rules! conformance_suite {
    ($make:expr) => {
        $crate::conformance_suite!(@tests $make;
            create_and_lookup, put_and_list_in_arrival_order, idempotent_put, ack_deletes,
            quotas_are_enforced, expiry_is_lazy_then_swept, expired_duplicate_is_replaced,
            sweep_only_takes_passed_buckets, secure_registers_one_key,
            an_unsigned_send_checked_before_secure_is_refused_after_it, delete_leaves_nothing,
            subscribers_are_woken, concurrent_puts_get_unique_sequence_numbers,
            concurrent_puts_respect_the_quota, mailboxes_are_isolated,
            prekeys_are_published_counted_and_replaced, claims_hand_out_each_one_time_prekey_once,
            removed_prekeys_are_gone_and_other_devices_keep_theirs,
            capacity_bounds_claims, concurrent_claims_never_share_a_prekey,
            documents_are_stored_per_supporter_and_entries_and_device_lists_never_go_back,
            push_registrations_are_replaced_removed_and_deleted_with_the_mailbox,
            watched_follows_subscriptions,
            idle_mailboxes_are_swept_with_everything_in_them_and_kept_ones_stay,
            a_request_is_remembered_once_until_its_record_passes,
            a_first_contact_stays_a_duplicate_after_its_ack_until_its_stamp_record_passes);
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => { $(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let (store, _guard) = $make.await;
            $crate::conformance::$name(store).await;
        }
    )* };
}

fn mailbox(n: u8) -> MailboxRecord {
    MailboxRecord::new(
        MailboxId::from_bytes([n; 16]),
        SenderId::from_bytes([n.wrapping_add(100); 16]),
        PublicKey::from_bytes([n; 32]),
        MailboxKind::Private,
    )
}

fn envelope(n: u16, expires_at: u64) -> NewEnvelope {
    let mut id = [0u8; 16];
    id[..2].copy_from_slice(&n.to_be_bytes());
    NewEnvelope {
        id: EnvelopeId::from_bytes(id),
        expires_at,
        payload: format!("payload {n}").into_bytes(),
        spent: None,
    }
}

fn ttl(seconds: u64) -> u64 {
    NOW + seconds
}

async fn created(store: &dyn MailboxStore, n: u8) -> MailboxRecord {
    let record = mailbox(n);
    store.create_mailbox(record.clone()).await.unwrap();
    record
}

pub async fn create_and_lookup(store: Arc<dyn Store>) {
    let record = created(&*store, 1).await;
    assert_eq!(
        store.mailbox(&record.recipient_id).await.unwrap(),
        Some(record.clone())
    );
    assert_eq!(
        store.mailbox_by_sender(&record.sender_id).await.unwrap(),
        Some(record.clone())
    );
    assert_eq!(
        store
            .mailbox(&MailboxId::from_bytes([9; 16]))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .mailbox_by_sender(&SenderId::from_bytes([9; 16]))
            .await
            .unwrap(),
        None
    );
    // Either id colliding is refused.
    let mut same_recipient = mailbox(2);
    same_recipient.recipient_id = record.recipient_id;
    assert!(matches!(
        store.create_mailbox(same_recipient).await,
        Err(StoreError::IdInUse)
    ));
    let mut same_sender = mailbox(3);
    same_sender.sender_id = record.sender_id;
    assert!(matches!(
        store.create_mailbox(same_sender).await,
        Err(StoreError::IdInUse)
    ));
    assert_eq!(store.stats().mailboxes, 1);
}

pub async fn put_and_list_in_arrival_order(store: Arc<dyn Store>) {
    let id = created(&*store, 1).await.recipient_id;
    for n in [5u16, 3, 9, 1, 7] {
        let outcome = store
            .put(&id, envelope(n, ttl(600)), Quota::default(), NOW)
            .await
            .unwrap();
        assert_eq!(outcome, PutOutcome::Stored);
    }
    let all = store.list(&id, None, 100, NOW).await.unwrap();
    let payloads: Vec<_> = all
        .iter()
        .map(|e| String::from_utf8_lossy(&e.payload).into_owned())
        .collect();
    assert_eq!(
        payloads,
        [
            "payload 5",
            "payload 3",
            "payload 9",
            "payload 1",
            "payload 7"
        ]
    );
    assert!(
        all.windows(2).all(|w| w[0].seq < w[1].seq),
        "sequence numbers increase"
    );
    assert!(
        all.iter()
            .all(|e| e.expires_at == bucket_end(ttl(600), BUCKET_SECONDS))
    );
    let page = store.list(&id, Some(all[1].seq), 2, NOW).await.unwrap();
    assert_eq!(page, all[2..4].to_vec());
    assert!(
        store
            .list(&id, Some(all[4].seq), 10, NOW)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        store
            .list(&MailboxId::from_bytes([9; 16]), None, 10, NOW)
            .await,
        Err(StoreError::MailboxNotFound)
    ));
    let stats = store.stats();
    assert_eq!((stats.envelopes, stats.bytes), (5, 5 * 9));
}

pub async fn idempotent_put(store: Arc<dyn Store>) {
    let id = created(&*store, 1).await.recipient_id;
    assert_eq!(
        store
            .put(&id, envelope(1, ttl(60)), Quota::default(), NOW)
            .await
            .unwrap(),
        PutOutcome::Stored
    );
    let mut retry = envelope(1, ttl(6000));
    retry.payload = b"different".to_vec();
    assert_eq!(
        store.put(&id, retry, Quota::default(), NOW).await.unwrap(),
        PutOutcome::Duplicate
    );
    let all = store.list(&id, None, 10, NOW).await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].payload, b"payload 1", "the first copy wins");
    assert_eq!(store.stats().envelopes, 1);
}

pub async fn ack_deletes(store: Arc<dyn Store>) {
    let id = created(&*store, 1).await.recipient_id;
    for n in 1..=3 {
        store
            .put(&id, envelope(n, ttl(60)), Quota::default(), NOW)
            .await
            .unwrap();
    }
    let ids = [
        envelope(1, 0).id,
        envelope(3, 0).id,
        envelope(3, 0).id,
        envelope(42, 0).id,
    ];
    assert_eq!(store.ack(&id, &ids).await.unwrap(), 2);
    let left = store.list(&id, None, 10, NOW).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, envelope(2, 0).id);
    assert_eq!(
        store.ack(&id, &ids).await.unwrap(),
        0,
        "acking again deletes nothing"
    );
    assert_eq!((store.stats().envelopes, store.stats().bytes), (1, 9));
    // An acked id may be sent again (the relay keeps no tombstones).
    assert_eq!(
        store
            .put(&id, envelope(1, ttl(60)), Quota::default(), NOW)
            .await
            .unwrap(),
        PutOutcome::Stored
    );
}

pub async fn quotas_are_enforced(store: Arc<dyn Store>) {
    let id = created(&*store, 1).await.recipient_id;
    let quota = Quota {
        max_envelopes: 2,
        max_bytes: 20,
    };
    store
        .put(&id, envelope(1, ttl(60)), quota, NOW)
        .await
        .unwrap();
    store
        .put(&id, envelope(2, ttl(60)), quota, NOW)
        .await
        .unwrap();
    let refused = store.put(&id, envelope(3, ttl(60)), quota, NOW).await;
    assert!(
        matches!(
            refused,
            Err(StoreError::CountQuota {
                stored: 2,
                limit: 2
            })
        ),
        "{refused:?}"
    );
    store.ack(&id, &[envelope(1, 0).id]).await.unwrap();
    let roomy = Quota {
        max_envelopes: 10,
        max_bytes: 20,
    };
    let refused = store
        .put(
            &id,
            envelope(3, ttl(60)),
            Quota {
                max_envelopes: 10,
                max_bytes: 17,
            },
            NOW,
        )
        .await;
    assert!(
        matches!(
            refused,
            Err(StoreError::ByteQuota {
                stored: 9,
                adding: 9,
                limit: 17
            })
        ),
        "{refused:?}"
    );
    assert_eq!(
        store
            .put(&id, envelope(3, ttl(60)), roomy, NOW)
            .await
            .unwrap(),
        PutOutcome::Stored
    );
    assert_eq!(store.list(&id, None, 10, NOW).await.unwrap().len(), 2);
}

pub async fn expiry_is_lazy_then_swept(store: Arc<dyn Store>) {
    let id = created(&*store, 1).await.recipient_id;
    store
        .put(&id, envelope(1, ttl(10)), Quota::default(), NOW)
        .await
        .unwrap();
    store
        .put(
            &id,
            envelope(2, ttl(10 * BUCKET_SECONDS)),
            Quota::default(),
            NOW,
        )
        .await
        .unwrap();
    let first_bucket = bucket_end(ttl(10), BUCKET_SECONDS);
    // Rounded up: still there after its own TTL, until its bucket ends.
    assert_eq!(store.list(&id, None, 10, ttl(11)).await.unwrap().len(), 2);
    assert_eq!(
        store.list(&id, None, 10, first_bucket).await.unwrap().len(),
        1,
        "filtered on read"
    );
    assert_eq!(store.stats().envelopes, 2, "not yet swept");
    let report = store.sweep(first_bucket).await.unwrap();
    assert_eq!(report.expired_envelopes, 1);
    assert!(report.shredded_buckets >= 1);
    assert_eq!(store.stats().envelopes, 1);
    assert_eq!(
        store.sweep(first_bucket).await.unwrap().expired_envelopes,
        0,
        "sweep is idempotent"
    );
    let refused = store
        .put(&id, envelope(3, NOW), Quota::default(), NOW)
        .await;
    assert!(matches!(refused, Err(StoreError::AlreadyExpired)));
}

pub async fn expired_duplicate_is_replaced(store: Arc<dyn Store>) {
    let id = created(&*store, 1).await.recipient_id;
    store
        .put(&id, envelope(1, ttl(10)), Quota::default(), NOW)
        .await
        .unwrap();
    let later = ttl(2 * BUCKET_SECONDS);
    let outcome = store
        .put(&id, envelope(1, later + 10), Quota::default(), later)
        .await
        .unwrap();
    assert_eq!(outcome, PutOutcome::Stored);
    assert_eq!(store.list(&id, None, 10, later).await.unwrap().len(), 1);
    assert_eq!(store.stats().envelopes, 1);
}

pub async fn sweep_only_takes_passed_buckets(store: Arc<dyn Store>) {
    let a = created(&*store, 1).await.recipient_id;
    let b = created(&*store, 2).await.recipient_id;
    for n in 0..10u16 {
        let expires = ttl(u64::from(n % 3 + 1) * BUCKET_SECONDS);
        store
            .put(&a, envelope(n, expires), Quota::default(), NOW)
            .await
            .unwrap();
        store
            .put(&b, envelope(n, expires), Quota::default(), NOW)
            .await
            .unwrap();
    }
    // Buckets: n%3==0 -> +1 bucket (4 each), ==1 -> +2 (3 each), ==2 -> +3 (3 each).
    let report = store.sweep(ttl(BUCKET_SECONDS)).await.unwrap();
    assert_eq!(report.expired_envelopes, 8);
    assert_eq!(report.shredded_buckets, 1);
    assert_eq!(store.list(&a, None, 100, NOW).await.unwrap().len(), 6);
    let report = store.sweep(ttl(3 * BUCKET_SECONDS)).await.unwrap();
    assert_eq!((report.expired_envelopes, report.shredded_buckets), (12, 2));
    assert_eq!(store.stats().envelopes, 0);
    assert_eq!(store.stats().bytes, 0);
}

pub async fn secure_registers_one_key(store: Arc<dyn Store>) {
    let record = created(&*store, 1).await;
    let key_a = PublicKey::from_bytes([7; 32]);
    store.secure(&record.recipient_id, key_a).await.unwrap();
    store.secure(&record.recipient_id, key_a).await.unwrap();
    let refused = store
        .secure(&record.recipient_id, PublicKey::from_bytes([8; 32]))
        .await;
    assert!(matches!(refused, Err(StoreError::AlreadySecured)));
    let stored = store
        .mailbox_by_sender(&record.sender_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.sender_key, Some(key_a));
    let missing = store.secure(&MailboxId::from_bytes([9; 16]), key_a).await;
    assert!(matches!(missing, Err(StoreError::MailboxNotFound)));
}

/// Review F19: the relay reads the record, finds no sender key and accepts an
/// unsigned send; if `Secure` lands before the write, the write must be refused.
pub async fn an_unsigned_send_checked_before_secure_is_refused_after_it(store: Arc<dyn Store>) {
    let record = created(&*store, 1).await;
    let read = store
        .mailbox_by_sender(&record.sender_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read.sender_key, None);
    let key = PublicKey::from_bytes([7; 32]);
    store.secure(&record.recipient_id, key).await.unwrap();
    let unsigned = store
        .put_checked(
            &record.recipient_id,
            envelope(1, ttl(60)),
            Quota::default(),
            NOW,
            SenderCheck::Expect(read.sender_key),
        )
        .await;
    assert!(
        matches!(unsigned, Err(StoreError::SenderKeyChanged)),
        "{unsigned:?}"
    );
    assert!(
        store
            .list(&record.recipient_id, None, 10, NOW)
            .await
            .unwrap()
            .is_empty()
    );
    // A send authorized against the new key, and an unchecked put, are stored.
    let signed = store
        .put_checked(
            &record.recipient_id,
            envelope(2, ttl(60)),
            Quota::default(),
            NOW,
            SenderCheck::Expect(Some(key)),
        )
        .await;
    assert_eq!(signed.unwrap(), PutOutcome::Stored);
    let unchecked = store
        .put(
            &record.recipient_id,
            envelope(3, ttl(60)),
            Quota::default(),
            NOW,
        )
        .await;
    assert_eq!(unchecked.unwrap(), PutOutcome::Stored);
    // Checked against another key (secured to someone else meanwhile): refused.
    let other = store
        .put_checked(
            &record.recipient_id,
            envelope(4, ttl(60)),
            Quota::default(),
            NOW,
            SenderCheck::Expect(Some(PublicKey::from_bytes([8; 32]))),
        )
        .await;
    assert!(
        matches!(other, Err(StoreError::SenderKeyChanged)),
        "{other:?}"
    );
    assert_eq!(
        store
            .list(&record.recipient_id, None, 10, NOW)
            .await
            .unwrap()
            .len(),
        2
    );
}

pub async fn delete_leaves_nothing(store: Arc<dyn Store>) {
    let record = created(&*store, 1).await;
    let other = created(&*store, 2).await;
    for n in 0..5 {
        store
            .put(
                &record.recipient_id,
                envelope(n, ttl(60)),
                Quota::default(),
                NOW,
            )
            .await
            .unwrap();
    }
    store
        .put(
            &other.recipient_id,
            envelope(0, ttl(60)),
            Quota::default(),
            NOW,
        )
        .await
        .unwrap();
    assert!(store.delete_mailbox(&record.recipient_id).await.unwrap());
    assert_eq!(store.mailbox(&record.recipient_id).await.unwrap(), None);
    assert_eq!(
        store.mailbox_by_sender(&record.sender_id).await.unwrap(),
        None
    );
    assert!(matches!(
        store.list(&record.recipient_id, None, 10, NOW).await,
        Err(StoreError::MailboxNotFound)
    ));
    assert!(matches!(
        store
            .put(
                &record.recipient_id,
                envelope(9, ttl(60)),
                Quota::default(),
                NOW
            )
            .await,
        Err(StoreError::MailboxNotFound)
    ));
    assert!(matches!(
        store.ack(&record.recipient_id, &[]).await,
        Err(StoreError::MailboxNotFound)
    ));
    assert!(!store.delete_mailbox(&record.recipient_id).await.unwrap());
    let stats = store.stats();
    assert_eq!((stats.mailboxes, stats.envelopes, stats.bytes), (1, 1, 9));
    // The sweep later finds nothing of the deleted mailbox.
    assert_eq!(
        store
            .sweep(ttl(10 * BUCKET_SECONDS))
            .await
            .unwrap()
            .expired_envelopes,
        1
    );
    // The ids are free again.
    store.create_mailbox(record).await.unwrap();
}

pub async fn subscribers_are_woken(store: Arc<dyn Store>) {
    let id = created(&*store, 1).await.recipient_id;
    let mut subscription = store.subscribe(&id);
    let waiter = tokio::spawn(async move {
        subscription.changed().await;
        subscription
    });
    store
        .put(&id, envelope(1, ttl(60)), Quota::default(), NOW)
        .await
        .unwrap();
    let mut subscription = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("woken after a put")
        .unwrap();
    // A duplicate does not need to wake anyone, but deleting the mailbox does.
    store.delete_mailbox(&id).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), subscription.changed())
        .await
        .expect("woken after delete");
}

pub async fn concurrent_puts_get_unique_sequence_numbers(store: Arc<dyn Store>) {
    let id = created(&*store, 1).await.recipient_id;
    let mut tasks = Vec::new();
    for n in 0..200u16 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            store
                .put(&id, envelope(n, ttl(60)), Quota::default(), NOW)
                .await
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), PutOutcome::Stored);
    }
    let all = store.list(&id, None, 1000, NOW).await.unwrap();
    assert_eq!(all.len(), 200);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    let mut ids: Vec<_> = all.iter().map(|e| e.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 200);
}

pub async fn concurrent_puts_respect_the_quota(store: Arc<dyn Store>) {
    let id = created(&*store, 1).await.recipient_id;
    let quota = Quota {
        max_envelopes: 20,
        max_bytes: u64::MAX,
    };
    let mut tasks = Vec::new();
    for n in 0..60u16 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            store.put(&id, envelope(n, ttl(60)), quota, NOW).await
        }));
    }
    let mut stored = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(PutOutcome::Stored) => stored += 1,
            Err(StoreError::CountQuota { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(stored, 20);
    assert_eq!(store.list(&id, None, 1000, NOW).await.unwrap().len(), 20);
}

pub async fn mailboxes_are_isolated(store: Arc<dyn Store>) {
    let a = created(&*store, 1).await.recipient_id;
    let b = created(&*store, 2).await.recipient_id;
    store
        .put(&a, envelope(1, ttl(60)), Quota::default(), NOW)
        .await
        .unwrap();
    // The same envelope id in another mailbox is a different envelope.
    assert_eq!(
        store
            .put(&b, envelope(1, ttl(60)), Quota::default(), NOW)
            .await
            .unwrap(),
        PutOutcome::Stored
    );
    assert_eq!(store.ack(&b, &[envelope(1, 0).id]).await.unwrap(), 1);
    assert_eq!(store.list(&a, None, 10, NOW).await.unwrap().len(), 1);
    assert!(store.list(&b, None, 10, NOW).await.unwrap().is_empty());
}

fn upload(
    device: u8,
    one_time: std::ops::Range<u32>,
    kem_one_time: std::ops::Range<u32>,
) -> PrekeyUpload {
    PrekeyUpload {
        signed_prekey: format!("signed prekey of {device}").into_bytes(),
        kem_last_resort: format!("last resort of {device}").into_bytes(),
        one_time: one_time
            .map(|id| (id, format!("one-time {id} of {device}").into_bytes()))
            .collect(),
        kem_one_time: kem_one_time
            .map(|id| (id, format!("kem {id} of {device}").into_bytes()))
            .collect(),
    }
}

pub async fn prekeys_are_published_counted_and_replaced(store: Arc<dyn Store>) {
    let device = DeviceKey::from_bytes([1; 32]);
    assert_eq!(store.prekey_count(&device).await.unwrap(), None);
    let count = store
        .publish_prekeys(&device, upload(1, 0..3, 10..12))
        .await
        .unwrap();
    assert_eq!(
        count,
        PrekeyCount {
            one_time: 3,
            kem_one_time: 2
        }
    );
    // Ids already stored are replaced, not counted twice.
    let count = store
        .publish_prekeys(&device, upload(1, 2..5, 11..12))
        .await
        .unwrap();
    assert_eq!(
        count,
        PrekeyCount {
            one_time: 5,
            kem_one_time: 2
        }
    );
    assert_eq!(store.prekey_count(&device).await.unwrap(), Some(count));
    let too_many = upload(1, 100..100 + MAX_ONE_TIME_PREKEYS as u32, 0..0);
    assert!(matches!(
        store.publish_prekeys(&device, too_many).await,
        Err(StoreError::TooManyPrekeys { .. })
    ));
    assert_eq!(
        store.prekey_count(&device).await.unwrap(),
        Some(count),
        "a refused upload changes nothing"
    );
}

pub async fn claims_hand_out_each_one_time_prekey_once(store: Arc<dyn Store>) {
    let supporter = SupporterKey::from_bytes([9; 32]);
    let devices = [
        DeviceKey::from_bytes([1; 32]),
        DeviceKey::from_bytes([2; 32]),
        DeviceKey::from_bytes([3; 32]),
    ];
    store
        .publish_prekeys(&devices[0], upload(1, 0..2, 10..11))
        .await
        .unwrap();
    store
        .publish_prekeys(&devices[1], upload(2, 0..1, 0..0))
        .await
        .unwrap();
    store.set_capacity(&supporter, 10).await.unwrap();
    // A listed device without prekeys: refused, and nothing taken.
    assert!(matches!(
        store.claim_bundles(&supporter, &devices).await,
        Err(StoreError::NoPrekeys)
    ));
    assert_eq!(store.capacity(&supporter).await.unwrap(), 10);
    let devices = &devices[..2];
    let mut claimed: Vec<Vec<ClaimedBundle>> = Vec::new();
    for _ in 0..3 {
        claimed.push(store.claim_bundles(&supporter, devices).await.unwrap());
    }
    // One bundle per device, in list order.
    assert!(
        claimed
            .iter()
            .all(|bundles| bundles.len() == 2 && bundles[0].device == devices[0])
    );
    let first: Vec<_> = claimed.iter().map(|b| b[0].one_time.clone()).collect();
    assert_eq!(
        first,
        [
            Some(b"one-time 0 of 1".to_vec()),
            Some(b"one-time 1 of 1".to_vec()),
            None
        ]
    );
    let kem: Vec<_> = claimed.iter().map(|b| b[0].kem.clone()).collect();
    assert_eq!(
        kem,
        [
            b"kem 10 of 1".to_vec(),
            b"last resort of 1".to_vec(),
            b"last resort of 1".to_vec()
        ]
    );
    assert_eq!(claimed[0][1].one_time, Some(b"one-time 0 of 2".to_vec()));
    assert_eq!(claimed[1][1].one_time, None);
    assert_eq!(claimed[0][0].signed_prekey, b"signed prekey of 1");
    assert_eq!(store.capacity(&supporter).await.unwrap(), 7);
    assert_eq!(
        store.prekey_count(&devices[0]).await.unwrap(),
        Some(PrekeyCount::default())
    );
}

pub async fn removed_prekeys_are_gone_and_other_devices_keep_theirs(store: Arc<dyn Store>) {
    let supporter = SupporterKey::from_bytes([9; 32]);
    let (gone, kept) = (
        DeviceKey::from_bytes([1; 32]),
        DeviceKey::from_bytes([2; 32]),
    );
    for (n, device) in [(1, &gone), (2, &kept)] {
        store
            .publish_prekeys(device, upload(n, 0..3, 0..3))
            .await
            .unwrap();
    }
    store.remove_prekeys(&gone).await.unwrap();
    assert_eq!(store.prekey_count(&gone).await.unwrap(), None);
    store.set_capacity(&supporter, 5).await.unwrap();
    assert!(matches!(
        store.claim_bundles(&supporter, &[gone]).await,
        Err(StoreError::NoPrekeys)
    ));
    // Published again, it starts from nothing: the removed one-time prekeys
    // are not handed out.
    store
        .publish_prekeys(&gone, upload(1, 10..11, 0..0))
        .await
        .unwrap();
    assert_eq!(
        store.prekey_count(&gone).await.unwrap(),
        Some(PrekeyCount {
            one_time: 1,
            kem_one_time: 0
        })
    );
    let claimed = store
        .claim_bundles(&supporter, &[gone, kept])
        .await
        .unwrap();
    assert_eq!(claimed[0].one_time, Some(b"one-time 10 of 1".to_vec()));
    assert_eq!(claimed[0].kem, b"last resort of 1".to_vec());
    assert_eq!(
        store.prekey_count(&kept).await.unwrap(),
        Some(PrekeyCount {
            one_time: 2,
            kem_one_time: 2
        })
    );
    // Removing what is not there is not an error.
    store.remove_prekeys(&gone).await.unwrap();
    store.remove_prekeys(&gone).await.unwrap();
}

pub async fn capacity_bounds_claims(store: Arc<dyn Store>) {
    let supporter = SupporterKey::from_bytes([9; 32]);
    let device = [DeviceKey::from_bytes([1; 32])];
    assert_eq!(
        store.capacity(&supporter).await.unwrap(),
        0,
        "not taking conversations until set"
    );
    // No prekeys: refused without using capacity.
    store.set_capacity(&supporter, 1).await.unwrap();
    assert!(matches!(
        store.claim_bundles(&supporter, &device).await,
        Err(StoreError::NoPrekeys)
    ));
    assert_eq!(store.capacity(&supporter).await.unwrap(), 1);
    store
        .publish_prekeys(&device[0], upload(1, 0..5, 0..5))
        .await
        .unwrap();
    store.claim_bundles(&supporter, &device).await.unwrap();
    assert!(matches!(
        store.claim_bundles(&supporter, &device).await,
        Err(StoreError::CapacityExhausted)
    ));
    assert_eq!(
        store.prekey_count(&device[0]).await.unwrap(),
        Some(PrekeyCount {
            one_time: 4,
            kem_one_time: 4
        })
    );
    store.set_capacity(&supporter, 1).await.unwrap();
    store.claim_bundles(&supporter, &device).await.unwrap();
}

pub async fn concurrent_claims_never_share_a_prekey(store: Arc<dyn Store>) {
    let supporter = SupporterKey::from_bytes([9; 32]);
    let device = DeviceKey::from_bytes([1; 32]);
    store
        .publish_prekeys(&device, upload(1, 0..40, 0..40))
        .await
        .unwrap();
    store.set_capacity(&supporter, 50).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..60 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            store.claim_bundles(&supporter, &[device]).await
        }));
    }
    let mut one_time = Vec::new();
    let (mut granted, mut refused) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(bundles) => {
                granted += 1;
                one_time.extend(bundles.into_iter().filter_map(|b| b.one_time));
            }
            Err(StoreError::CapacityExhausted) => refused += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((granted, refused), (50, 10));
    let handed_out = one_time.len();
    one_time.sort();
    one_time.dedup();
    assert_eq!(
        (handed_out, one_time.len()),
        (40, 40),
        "each one-time prekey exactly once"
    );
}

pub async fn documents_are_stored_per_supporter_and_entries_and_device_lists_never_go_back(
    store: Arc<dyn Store>,
) {
    let a = SupporterKey::from_bytes([1; 32]);
    let b = SupporterKey::from_bytes([2; 32]);
    store
        .put_document(DocumentKind::Entry, &b, b"entry b".to_vec(), 100)
        .await
        .unwrap();
    store
        .put_document(DocumentKind::Entry, &a, b"entry a".to_vec(), 100)
        .await
        .unwrap();
    store
        .put_document(DocumentKind::Entry, &a, b"entry a, renewed".to_vec(), 200)
        .await
        .unwrap();
    // Entries never go back either (review F16): an older one, re-published
    // by anyone, is refused and the newer one stays.
    let stale = store
        .put_document(DocumentKind::Entry, &a, b"entry a".to_vec(), 100)
        .await;
    assert!(
        matches!(
            stale,
            Err(StoreError::StaleDocument {
                stored: 200,
                found: 100
            })
        ),
        "{stale:?}"
    );
    let forked = store
        .put_document(DocumentKind::Entry, &a, b"entry a, forked".to_vec(), 200)
        .await;
    assert!(
        matches!(
            forked,
            Err(StoreError::ConflictingDocument { version: 200 })
        ),
        "{forked:?}"
    );
    let entries = store.documents(DocumentKind::Entry).await.unwrap();
    assert_eq!(
        entries,
        [(a, b"entry a, renewed".to_vec()), (b, b"entry b".to_vec())]
    );
    store
        .put_document(DocumentKind::DeviceList, &a, b"v2".to_vec(), 2)
        .await
        .unwrap();
    // The same version again: accepted with the same bytes, refused with others.
    store
        .put_document(DocumentKind::DeviceList, &a, b"v2".to_vec(), 2)
        .await
        .unwrap();
    let forked = store
        .put_document(DocumentKind::DeviceList, &a, b"v2 again".to_vec(), 2)
        .await;
    assert!(
        matches!(forked, Err(StoreError::ConflictingDocument { version: 2 })),
        "{forked:?}"
    );
    assert_eq!(
        store.document(DocumentKind::DeviceList, &a).await.unwrap(),
        Some(b"v2".to_vec())
    );
    let stale = store
        .put_document(DocumentKind::DeviceList, &a, b"v1".to_vec(), 1)
        .await;
    assert!(matches!(
        stale,
        Err(StoreError::StaleDocument {
            stored: 2,
            found: 1
        })
    ));
    // Versions beyond 2^53 (where a double loses precision) still compare exactly.
    store
        .put_document(DocumentKind::DeviceList, &b, b"big".to_vec(), u64::MAX - 1)
        .await
        .unwrap();
    let stale = store
        .put_document(
            DocumentKind::DeviceList,
            &b,
            b"bigger?".to_vec(),
            u64::MAX - 2,
        )
        .await;
    assert!(
        matches!(stale, Err(StoreError::StaleDocument { .. })),
        "{stale:?}"
    );
    store
        .put_document(DocumentKind::DeviceList, &b, b"biggest".to_vec(), u64::MAX)
        .await
        .unwrap();
    store
        .put_document(DocumentKind::DeviceList, &a, b"v3".to_vec(), 3)
        .await
        .unwrap();
    assert_eq!(
        store.document(DocumentKind::DeviceList, &a).await.unwrap(),
        Some(b"v3".to_vec())
    );
    assert!(
        store
            .documents(DocumentKind::Revocation)
            .await
            .unwrap()
            .is_empty()
    );
    let _: &dyn DirectoryStore = &*store;
}

pub async fn push_registrations_are_replaced_removed_and_deleted_with_the_mailbox(
    store: Arc<dyn Store>,
) {
    let record = created(&*store, 1).await;
    let other = created(&*store, 2).await;
    let id = record.recipient_id;
    assert_eq!(store.push(&id).await.unwrap(), None);
    let first = PushRegistration {
        endpoint: "https://push.example/first".into(),
        token: vec![1, 2, 3],
    };
    let second = PushRegistration {
        endpoint: "https://gateway.example/notify".into(),
        token: b"opaque device token".to_vec(),
    };
    store.set_push(&id, Some(first.clone())).await.unwrap();
    store
        .set_push(&other.recipient_id, Some(first.clone()))
        .await
        .unwrap();
    assert_eq!(store.push(&id).await.unwrap(), Some(first.clone()));
    store.set_push(&id, Some(second.clone())).await.unwrap();
    assert_eq!(store.push(&id).await.unwrap(), Some(second), "replaced");
    store.set_push(&id, None).await.unwrap();
    assert_eq!(store.push(&id).await.unwrap(), None, "removed");
    store.set_push(&id, Some(first.clone())).await.unwrap();
    assert!(store.delete_mailbox(&id).await.unwrap());
    assert_eq!(
        store.push(&id).await.unwrap(),
        None,
        "deleted with the mailbox"
    );
    assert_eq!(
        store.push(&other.recipient_id).await.unwrap(),
        Some(first.clone()),
        "other mailboxes keep theirs"
    );
    assert!(matches!(
        store.set_push(&id, Some(first)).await,
        Err(StoreError::MailboxNotFound)
    ));
}

pub async fn watched_follows_subscriptions(store: Arc<dyn Store>) {
    let record = created(&*store, 1).await;
    let id = record.recipient_id;
    assert!(!store.watched(&id).await);
    let first = store.subscribe(&id);
    let second = store.subscribe(&id);
    assert!(store.watched(&id).await);
    drop(first);
    assert!(store.watched(&id).await, "one stream still watches");
    drop(second);
    assert!(!store.watched(&id).await);
}

/// Review F1 (c), H2: mailboxes nobody uses expire. The store rounds the
/// deadline up to a bucket's end, only ever moves it later, and the sweep
/// removes a passed mailbox as `delete_mailbox` does: record, sender id, push
/// registration and envelopes.
pub async fn idle_mailboxes_are_swept_with_everything_in_them_and_kept_ones_stay(
    store: Arc<dyn Store>,
) {
    let idle = mailbox(1).expiring_at(NOW + 30);
    let kept = mailbox(2).expiring_at(NOW + 30);
    let forever = mailbox(3);
    for record in [&idle, &kept, &forever] {
        store.create_mailbox(record.clone()).await.unwrap();
    }
    assert_eq!(
        store
            .mailbox(&idle.recipient_id)
            .await
            .unwrap()
            .unwrap()
            .idle_expires_at,
        NOW + BUCKET_SECONDS,
        "rounded up to the bucket's end"
    );
    for n in 0..3 {
        store
            .put(
                &idle.recipient_id,
                envelope(n, ttl(10 * BUCKET_SECONDS)),
                Quota::default(),
                NOW,
            )
            .await
            .unwrap();
    }
    store
        .set_push(
            &idle.recipient_id,
            Some(PushRegistration {
                endpoint: "https://push.example/idle".into(),
                token: vec![7],
            }),
        )
        .await
        .unwrap();
    store
        .keep_until(&kept.recipient_id, NOW + 5 * BUCKET_SECONDS + 1)
        .await
        .unwrap();
    // Never earlier, and never for a mailbox that does not expire.
    store
        .keep_until(&kept.recipient_id, NOW + 10)
        .await
        .unwrap();
    store
        .keep_until(&forever.recipient_id, NOW + 10)
        .await
        .unwrap();
    assert_eq!(
        store
            .mailbox(&kept.recipient_id)
            .await
            .unwrap()
            .unwrap()
            .idle_expires_at,
        NOW + 6 * BUCKET_SECONDS
    );
    assert_eq!(
        store
            .mailbox(&forever.recipient_id)
            .await
            .unwrap()
            .unwrap()
            .idle_expires_at,
        0
    );
    assert!(matches!(
        store
            .keep_until(&MailboxId::from_bytes([99; 16]), NOW)
            .await,
        Err(StoreError::MailboxNotFound)
    ));
    // Before the deadline nothing goes.
    let early = store.sweep(NOW + BUCKET_SECONDS - 1).await.unwrap();
    assert_eq!(early.expired_mailboxes, 0);
    assert!(store.mailbox(&idle.recipient_id).await.unwrap().is_some());
    // At it, the idle mailbox goes with everything in it.
    let due = store.sweep(NOW + BUCKET_SECONDS).await.unwrap();
    assert_eq!(due.expired_mailboxes, 1);
    assert_eq!(store.mailbox(&idle.recipient_id).await.unwrap(), None);
    assert_eq!(
        store.mailbox_by_sender(&idle.sender_id).await.unwrap(),
        None
    );
    assert_eq!(store.push(&idle.recipient_id).await.unwrap(), None);
    assert!(matches!(
        store.list(&idle.recipient_id, None, 10, NOW).await,
        Err(StoreError::MailboxNotFound)
    ));
    let stats = store.stats();
    assert_eq!((stats.envelopes, stats.bytes), (0, 0));
    assert!(store.mailbox(&kept.recipient_id).await.unwrap().is_some());
    // The kept one at its own, later deadline; the other never.
    let later = store.sweep(NOW + 6 * BUCKET_SECONDS).await.unwrap();
    assert_eq!(later.expired_mailboxes, 1);
    assert_eq!(store.mailbox(&kept.recipient_id).await.unwrap(), None);
    let much_later = store.sweep(NOW + 1000 * BUCKET_SECONDS).await.unwrap();
    assert_eq!(much_later.expired_mailboxes, 0);
    assert!(
        store
            .mailbox(&forever.recipient_id)
            .await
            .unwrap()
            .is_some()
    );
    // The ids are free again.
    store.create_mailbox(idle).await.unwrap();
}

/// A request's record refuses it until the record's (rounded) expiry, for
/// every digest on its own, and the sweep drops passed records (review F13).
pub async fn a_request_is_remembered_once_until_its_record_passes(store: Arc<dyn Store>) {
    let first = RequestDigest::of_signature(&[1; 64]);
    let second = RequestDigest::of_signature(&[2; 64]);
    assert_ne!(first, second);
    let until = NOW + 125;
    assert!(store.remember_request(&first, until, NOW).await.unwrap());
    assert!(!store.remember_request(&first, until, NOW).await.unwrap());
    assert!(
        !store
            .remember_request(&first, until, NOW + 100)
            .await
            .unwrap()
    );
    assert!(store.remember_request(&second, until, NOW).await.unwrap());
    // Kept up to the rounded expiry, never less.
    let rounded = until.div_ceil(RECORD_SECONDS) * RECORD_SECONDS;
    assert!(
        !store
            .remember_request(&first, until, rounded - 1)
            .await
            .unwrap()
    );
    // Passed: the same digest is a new request (its timestamp is out of the
    // window by then, so the relay refuses it anyway).
    assert!(
        store
            .remember_request(&first, until + 200, rounded)
            .await
            .unwrap()
    );
    assert!(
        !store
            .remember_request(&first, until + 200, rounded)
            .await
            .unwrap()
    );
    // A sweep after `second` passed drops it; `first`'s newer record stays.
    store.sweep(rounded).await.unwrap();
    assert!(
        store
            .remember_request(&second, rounded + 125, rounded)
            .await
            .unwrap()
    );
    assert!(
        !store
            .remember_request(&first, until + 200, rounded)
            .await
            .unwrap()
    );
    // Concurrent attempts: exactly one wins.
    let third = RequestDigest::of_signature(&[3; 64]);
    let attempts: Vec<_> = (0..8)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.remember_request(&third, until, NOW).await.unwrap() })
        })
        .collect();
    let mut wins = 0;
    for attempt in attempts {
        wins += usize::from(attempt.await.unwrap());
    }
    assert_eq!(wins, 1);
}

/// A first contact's stamp is remembered with its put: the same envelope
/// again is a duplicate while it is stored, after its ack and after a sweep,
/// until the record passes; then it is stored anew (second fresh review H-1).
pub async fn a_first_contact_stays_a_duplicate_after_its_ack_until_its_stamp_record_passes(
    store: Arc<dyn Store>,
) {
    let record = created(&*store, 1).await;
    let id = record.recipient_id;
    let until = NOW + 3601;
    let first_contact = |n: u16| {
        let plain = envelope(n, ttl(7200));
        NewEnvelope {
            spent: Some(SpentStamp {
                digest: RequestDigest::of_first_contact(&record.sender_id, &plain.id),
                until,
            }),
            ..plain
        }
    };
    let put = |envelope: NewEnvelope, now: u64| {
        let store = Arc::clone(&store);
        async move {
            store
                .put(&id, envelope, Quota::default(), now)
                .await
                .unwrap()
        }
    };
    assert_eq!(put(first_contact(1), NOW).await, PutOutcome::Stored);
    assert_eq!(put(first_contact(1), NOW).await, PutOutcome::Duplicate);
    assert_eq!(store.ack(&id, &[first_contact(1).id]).await.unwrap(), 1);
    assert_eq!(put(first_contact(1), NOW + 60).await, PutOutcome::Duplicate);
    store.sweep(NOW + 120).await.unwrap();
    assert_eq!(
        put(first_contact(1), NOW + 120).await,
        PutOutcome::Duplicate
    );
    assert!(
        store
            .list(&id, None, 10, NOW + 120)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.stats().envelopes, 0, "a replay stores nothing");
    // Another first contact is its own.
    assert_eq!(put(first_contact(2), NOW + 120).await, PutOutcome::Stored);
    // Kept to the rounded expiry, never less; then the envelope is new again.
    let rounded = record_until(until);
    assert_eq!(
        put(first_contact(1), rounded - 1).await,
        PutOutcome::Duplicate
    );
    store.sweep(rounded).await.unwrap();
    assert_eq!(put(first_contact(1), rounded).await, PutOutcome::Stored);
    // Concurrent first puts of one first contact: exactly one is stored.
    let attempts: Vec<_> = (0..8)
        .map(|_| tokio::spawn(put(first_contact(3), NOW + 200)))
        .collect();
    let mut stored = 0;
    for attempt in attempts {
        stored += usize::from(attempt.await.unwrap() == PutOutcome::Stored);
    }
    assert_eq!(stored, 1);
}
