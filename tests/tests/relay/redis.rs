//! Scale-out: relay processes sharing a real Redis Cluster (three primaries,
//! three replicas of Debian's redis-server on loopback ports). Delivery across
//! nodes, one push per envelope, a primary failover under load that loses no
//! acknowledged envelope, and a relay node killed with -9.

use std::collections::HashSet;
use std::time::Duration;

use haven_e2e::{
    PushReceiver, RelayProcess, random_id, random_key, send_request, sign, sign_send, stamp_send,
};
use haven_proto::auth::Method;
use haven_proto::v1 as proto;
use haven_proto::v1::{MailboxKind, receive_response::Kind};
use haven_store::test_cluster::TestCluster;

const RELAY: &str = env!("CARGO_BIN_EXE_haven-relay-e2e");

async fn cluster() -> TestCluster {
    tokio::task::spawn_blocking(TestCluster::start)
        .await
        .expect("the cluster starts")
}

/// A relay node on the cluster, with its own (unused) data directory.
async fn node(cluster: &TestCluster, work: &std::path::Path, name: &str) -> RelayProcess {
    let nodes = cluster.urls().join(",");
    RelayProcess::start(
        RELAY,
        &work.join(name),
        &work.join(format!("{name}.log")),
        &[
            "--store",
            "redis",
            "--redis-nodes",
            &nodes,
            "--push-allow-local-endpoints",
            "--push-interval-seconds",
            "1",
        ],
    )
    .await
    .expect("a relay node starts on the cluster")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_deliver_to_each_other_and_push_once() {
    let cluster = cluster().await;
    let work = tempfile::tempdir().unwrap();
    let a = node(&cluster, work.path(), "a").await;
    let b = node(&cluster, work.path(), "b").await;
    let (on_a, on_b) = (a.client().await.unwrap(), b.client().await.unwrap());

    // The recipient streams from B; a sender gives A the envelopes.
    let mailbox = on_a.create(MailboxKind::Private).await.unwrap();
    let mut stream = on_b.receive(&mailbox, 0).await.unwrap();
    assert!(matches!(stream.next().await, Ok(Some(Kind::QueueEmpty(_)))));
    for n in 0..5u8 {
        on_a.send(send_request(&mailbox.sender_id, &random_id(), &[n; 64]))
            .await
            .unwrap();
        let envelope = stream.next_envelope().await;
        assert_eq!(
            envelope.ciphertext,
            vec![n; 64],
            "live across nodes, in order"
        );
        stream.ack(vec![envelope.envelope_id]).await;
    }

    // No wake-up while B streams, though A accepted the envelopes.
    let phone = PushReceiver::start().await.unwrap();
    on_b.register_push(&mailbox, &phone.url, b"t")
        .await
        .unwrap();
    on_a.send(send_request(&mailbox.sender_id, &random_id(), b"streamed"))
        .await
        .unwrap();
    let envelope = stream.next_envelope().await;
    stream.ack(vec![envelope.envelope_id]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        phone.requests().is_empty(),
        "pushed while another node streams"
    );

    // Offline: fetch and ack through either node; a send through either pushes once.
    drop(stream);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids: Vec<Vec<u8>> = (0..4).map(|_| random_id()).collect();
    for (n, id) in ids.iter().enumerate() {
        let via = if n % 2 == 0 { &on_a } else { &on_b };
        via.send(send_request(&mailbox.sender_id, id, b"offline"))
            .await
            .unwrap();
    }
    let pushes = phone.wait_for(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        (1..=2).contains(&phone.requests().len()),
        "one wake-up per accepting node at most, not one per node per envelope: {pushes:?}"
    );
    let fetched = on_b.fetch(&mailbox, 0).await.unwrap().envelopes;
    let got: Vec<Vec<u8>> = fetched.iter().map(|e| e.envelope_id.clone()).collect();
    assert_eq!(
        got, ids,
        "everything, in arrival order, through the other node"
    );
    assert_eq!(on_a.ack(&mailbox, got).await.unwrap(), 4);
    assert!(on_b.fetch(&mailbox, 0).await.unwrap().envelopes.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_failover_under_load_loses_no_acknowledged_envelope() {
    let mut cluster = cluster().await;
    let work = tempfile::tempdir().unwrap();
    let relay = node(&cluster, work.path(), "a").await;
    let client = relay.client().await.unwrap();
    let mut mailboxes = Vec::new();
    // Secured, so that they take the full quota (an unsecured mailbox holds 16).
    let sender_key = random_key();
    for _ in 0..8 {
        let mailbox = client.create(MailboxKind::Private).await.unwrap();
        client
            .secure(&mailbox, sender_key.verifying_key().as_bytes())
            .await
            .unwrap();
        mailboxes.push(mailbox);
    }
    let mailboxes = std::sync::Arc::new(mailboxes);

    // Four senders, 150 sends each, over all mailboxes; each keeps the ids the
    // relay acknowledged and every refusal's status code.
    let mut senders = Vec::new();
    for sender in 0..4usize {
        let client = client.clone();
        let mailboxes = std::sync::Arc::clone(&mailboxes);
        let sender_key = sender_key.clone();
        senders.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut refused = Vec::new();
            for n in 0..150usize {
                let mailbox = &mailboxes[(sender + n) % mailboxes.len()];
                let id = random_id();
                let mut request = send_request(&mailbox.sender_id, &id, b"under failover");
                sign_send(&mut request, &sender_key);
                match client.send(request).await {
                    Ok(_) => acknowledged.push(((sender + n) % mailboxes.len(), id)),
                    Err(status) => refused.push(status.code()),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (acknowledged, refused)
        }));
    }
    // Mid-way, kill a primary; its replica takes over within seconds. Until
    // the dead node is back (restarted 3 s later, as an orchestrator would),
    // that shard has no replica to confirm writes, and its sends are refused
    // as UNAVAILABLE rather than acknowledged unreplicated.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let primary = cluster.primaries()[0];
    cluster.kill(primary);
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.restart(primary);
    let mut acknowledged = Vec::new();
    let mut refused = Vec::new();
    for sender in senders {
        let (ok, failed) = sender.await.unwrap();
        acknowledged.extend(ok);
        refused.extend(failed);
    }
    assert!(
        refused.iter().all(|code| *code == tonic::Code::Unavailable),
        "sends during the failover fail retryably, never otherwise: {refused:?}\n{}",
        relay
            .log()
            .lines()
            .filter(|line| (line.contains("ERROR") || line.contains("WARN"))
                && !line.contains("redis::"))
            .take(10)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(acknowledged.len() > 300, "most sends went through");

    // After promotion every acknowledged envelope is there (about 75 per
    // mailbox: one Fetch of up to 100 sees them all).
    let mut stored: HashSet<(usize, Vec<u8>)> = HashSet::new();
    for (index, mailbox) in mailboxes.iter().enumerate() {
        let mut attempts = 0;
        let batch = loop {
            match client.fetch(mailbox, 0).await {
                Ok(batch) => break batch,
                Err(status) if attempts < 150 => {
                    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(status) => panic!("the cluster did not recover: {status:?}"),
            }
        };
        assert!(
            batch.envelopes.len() < 100,
            "one Fetch saw the whole mailbox"
        );
        stored.extend(batch.envelopes.into_iter().map(|e| (index, e.envelope_id)));
    }
    let lost: Vec<_> = acknowledged
        .iter()
        .filter(|entry| !stored.contains(*entry))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged envelopes lost in the failover",
        lost.len(),
        acknowledged.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_node_killed_hard_loses_nothing_its_clients_were_told_was_stored() {
    let cluster = cluster().await;
    let work = tempfile::tempdir().unwrap();
    let mut a = node(&cluster, work.path(), "a").await;
    let b = node(&cluster, work.path(), "b").await;
    let on_a = a.client().await.unwrap();
    let mailbox = on_a.create(MailboxKind::Private).await.unwrap();
    let sender_key = random_key();
    on_a.secure(&mailbox, sender_key.verifying_key().as_bytes())
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..50 {
        let id = random_id();
        let mut request = send_request(&mailbox.sender_id, &id, b"before the crash");
        sign_send(&mut request, &sender_key);
        on_a.send(request).await.unwrap();
        ids.push(id);
    }
    a.kill();
    // The client moves to the other node and finds all of it.
    let on_b = b.client().await.unwrap();
    let envelopes = on_b.drain(&mailbox).await.unwrap();
    let got: Vec<Vec<u8>> = envelopes.into_iter().map(|e| e.envelope_id).collect();
    assert_eq!(got, ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_no_replica_can_confirm_is_refused_as_unavailable_not_acknowledged() {
    let mut cluster = cluster().await;
    let work = tempfile::tempdir().unwrap();
    let relay = node(&cluster, work.path(), "a").await;
    let client = relay.client().await.unwrap();
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    client
        .send(send_request(
            &mailbox.sender_id,
            &random_id(),
            b"replicated",
        ))
        .await
        .unwrap();
    // Every replica gone: a primary alone cannot promise the write survives it.
    let replicas = cluster.replicas();
    for port in &replicas {
        cluster.kill(*port);
    }
    let refused = client
        .send(send_request(
            &mailbox.sender_id,
            &random_id(),
            b"unconfirmed",
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("replicas"),
        "{}",
        refused.message()
    );
    // Replicas back: the same kind of send is acknowledged again.
    for port in &replicas {
        cluster.restart(*port);
    }
    let _cluster = tokio::task::spawn_blocking(move || {
        cluster.wait_until_ok();
        cluster
    })
    .await
    .unwrap();
    let mut attempts = 0;
    loop {
        match client
            .send(send_request(
                &mailbox.sender_id,
                &random_id(),
                b"confirmed again",
            ))
            .await
        {
            Ok(_) => break,
            Err(status) if attempts < 50 => {
                assert_eq!(
                    status.code(),
                    tonic::Code::Unavailable,
                    "{}",
                    relay
                        .log()
                        .lines()
                        .filter(|l| l.contains("ERROR"))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => panic!("sends did not recover: {status:?}"),
        }
    }
}

/// Review F13: each node remembered signatures for itself, so a `Receive`
/// open (or any signed call) captured on the hop to one node passed again on
/// every other node, giving read and ack access to the mailbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_request_accepted_by_one_node_is_refused_by_another() {
    let cluster = cluster().await;
    let work = tempfile::tempdir().unwrap();
    let a = node(&cluster, work.path(), "a").await;
    let b = node(&cluster, work.path(), "b").await;
    let (on_a, on_b) = (a.client().await.unwrap(), b.client().await.unwrap());
    let mailbox = on_a.create(MailboxKind::Private).await.unwrap();
    on_a.send_numbered(&mailbox, 1).await;
    let open = |window: u32| proto::ReceiveRequest {
        kind: Some(proto::receive_request::Kind::Open(proto::ReceiveOpen {
            recipient_id: mailbox.recipient_id.clone(),
            window,
            auth: Some(sign(
                &mailbox.key,
                Method::Receive,
                &mailbox.recipient_id,
                &[&window.to_be_bytes()],
            )),
        })),
    };
    let captured = open(8);
    let mut stream = on_a.receive_raw(captured.clone()).await.unwrap();
    assert!(matches!(stream.next().await, Ok(Some(Kind::Envelope(_)))));
    let replayed = match on_b.receive_raw(captured).await {
        Ok(mut stream) => stream.next().await.map(|_| ()),
        Err(status) => Err(status),
    };
    let refused = replayed.expect_err("the replayed open is refused on the other node");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("already used"), "{refused:?}");
    // Signed anew, the owner streams from either node.
    let mut fresh = on_b.receive(&mailbox, 8).await.unwrap();
    assert!(matches!(fresh.next().await, Ok(Some(Kind::Envelope(_)))));
}

/// Second fresh review H-1 across nodes: a first contact's record lives in
/// its mailbox's slot with the envelope, so the saved request sent to another
/// node after the supporter's ack stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_contact_replayed_on_another_node_after_its_ack_stores_nothing() {
    let cluster = cluster().await;
    let work = tempfile::tempdir().unwrap();
    let a = node(&cluster, work.path(), "a").await;
    let b = node(&cluster, work.path(), "b").await;
    let (on_a, on_b) = (a.client().await.unwrap(), b.client().await.unwrap());
    let difficulty = on_a.get_info().await.unwrap().intake_pow_difficulty;
    let intake = on_a.create(MailboxKind::Intake).await.unwrap();
    let mut saved = send_request(&intake.sender_id, &random_id(), b"first contact");
    stamp_send(&mut saved, difficulty);
    assert!(!on_a.send(saved.clone()).await.unwrap().duplicate);
    let fetched = on_a.stored(&intake).await;
    on_a.ack(&intake, vec![fetched[0].envelope_id.clone()])
        .await
        .unwrap();
    assert!(on_b.send(saved).await.unwrap().duplicate);
    assert!(on_b.stored(&intake).await.is_empty());
}

/// Review F13 for the Keys service: a supporter's `SetCapacity` (or a
/// device's `PublishPrekeys`) replayed on another node within the window set
/// an older capacity again (reopening a paused supporter), or put back
/// one-time prekeys already handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capacity_change_replayed_on_another_node_is_refused() {
    use haven_proto::directory::{DocumentKind, sign as sign_document};
    use prost::Message as _;
    let cluster = cluster().await;
    let association = random_key();
    let node = || {
        let mut config = haven_e2e::test_config();
        config.store = haven_server::config::StoreKind::Redis;
        config.redis.nodes = cluster.urls();
        config.association_key = Some(hex::encode(association.verifying_key().to_bytes()));
        haven_e2e::InProcessRelay::start(config)
    };
    let (a, b) = (node().await.unwrap(), node().await.unwrap());
    let channel = |relay: &haven_e2e::InProcessRelay| haven_e2e::connect(relay.address);
    let (on_a, on_b) = (channel(&a).await.unwrap(), channel(&b).await.unwrap());
    let supporter = random_key();
    let entry =
        super::directory::entry(&supporter, "Kari", "general practice", "Vestland", &["nb"]);
    let document = sign_document(
        DocumentKind::SupporterEntry,
        entry.encode_to_vec(),
        &association,
    );
    proto::directory_client::DirectoryClient::new(on_a.clone())
        .publish_entry(super::directory::publish(document))
        .await
        .unwrap();
    let open = super::directory::capacity(&supporter, 3);
    proto::keys_client::KeysClient::new(on_a.clone())
        .set_capacity(open.clone())
        .await
        .unwrap();
    let refused = proto::keys_client::KeysClient::new(on_b.clone())
        .set_capacity(open)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("already used"), "{refused:?}");
    // Signed anew, the supporter is served on either node.
    proto::keys_client::KeysClient::new(on_b)
        .set_capacity(super::directory::capacity(&supporter, 0))
        .await
        .unwrap();
}
