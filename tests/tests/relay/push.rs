//! Push wake-ups, against a local HTTP receiver standing in for a push gateway
//! or UnifiedPush distributor: content-free, only when no stream watches,
//! coalesced, removed on 410, never in the way of a Send.

use std::time::Duration;

use base64::Engine as _;
use haven_e2e::{InProcessRelay, PushReceiver, TestClient, random_id, send_request, test_config};
use haven_proto::v1::{MailboxKind, receive_response::Kind};

async fn relay_with_push(interval_seconds: u64) -> (InProcessRelay, TestClient) {
    let mut config = test_config();
    config.push.allow_local_endpoints = true;
    config.push.interval_seconds = interval_seconds;
    config.push.timeout_seconds = 60;
    let relay = InProcessRelay::start(config).await.unwrap();
    let client = relay.client().await.unwrap();
    (relay, client)
}

#[tokio::test]
async fn an_offline_mailbox_gets_one_wake_up_that_carries_only_the_token() {
    let (_relay, client) = relay_with_push(60).await;
    let receiver = PushReceiver::start().await.unwrap();
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    let token = b"opaque-token-of-this-registration";
    client
        .register_push(&mailbox, &receiver.url, token)
        .await
        .unwrap();
    let envelope_id = random_id();
    client
        .send(send_request(&mailbox.sender_id, &envelope_id, &[7; 300]))
        .await
        .unwrap();
    let requests = receiver.wait_for(1).await;
    let [push] = requests.as_slice() else {
        panic!("expected one wake-up, got {requests:?}");
    };
    assert!(
        push.head.starts_with("POST /push/endpoint-1 HTTP/1.1"),
        "{}",
        push.head
    );
    assert!(
        push.head
            .to_ascii_lowercase()
            .contains("content-type: application/json")
    );
    let expected = format!(
        "{{\"token\":\"{}\"}}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token)
    );
    assert_eq!(String::from_utf8_lossy(&push.body), expected);
    // Nothing that names the mailbox or the envelope, in any encoding.
    let everything = [push.head.as_bytes(), &push.body].concat();
    for secret in [&mailbox.recipient_id, &mailbox.sender_id, &envelope_id] {
        for form in [
            secret.clone(),
            hex::encode(secret).into_bytes(),
            base64::engine::general_purpose::STANDARD
                .encode(secret)
                .into_bytes(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(secret)
                .into_bytes(),
        ] {
            assert!(
                !everything.windows(form.len()).any(|w| w == form.as_slice()),
                "a wake-up names the mailbox or the envelope"
            );
        }
    }

    // More arrivals while it is unread: coalesced into that one wake-up.
    for _ in 0..4 {
        client
            .send(send_request(&mailbox.sender_id, &random_id(), b"more"))
            .await
            .unwrap();
    }
    // Once read, the next arrival wakes it again (and only then).
    client.fetch(&mailbox, 0).await.unwrap();
    client
        .send(send_request(
            &mailbox.sender_id,
            &random_id(),
            b"after reading",
        ))
        .await
        .unwrap();
    let requests = receiver.wait_for(2).await;
    assert_eq!(requests.len(), 2, "one per unread stretch: {requests:?}");
}

#[tokio::test]
async fn no_wake_up_while_a_stream_watches() {
    let (_relay, client) = relay_with_push(1).await;
    let receiver = PushReceiver::start().await.unwrap();
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    client
        .register_push(&mailbox, &receiver.url, b"t")
        .await
        .unwrap();
    let mut stream = client.receive(&mailbox, 0).await.unwrap();
    assert!(matches!(stream.next().await, Ok(Some(Kind::QueueEmpty(_)))));
    for n in 0..3u8 {
        client
            .send(send_request(&mailbox.sender_id, &random_id(), &[n]))
            .await
            .unwrap();
        let envelope = stream.next_envelope().await;
        stream.ack(vec![envelope.envelope_id]).await;
    }
    // A wake-up, had one been sent, would have come within milliseconds.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(receiver.requests().is_empty(), "woken while streaming");
    drop(stream);
    // The stream is gone: the next arrival wakes the device, and it is the
    // first wake-up the receiver ever saw.
    let mut sent = 0;
    let requests = loop {
        // The relay notices the closed stream asynchronously; send until a
        // wake-up comes (bounded).
        client
            .send(send_request(&mailbox.sender_id, &random_id(), b"offline"))
            .await
            .unwrap();
        sent += 1;
        let requests = receiver.wait_for(1).await;
        if !requests.is_empty() || sent == 5 {
            break requests;
        }
    };
    assert_eq!(requests.len(), 1, "{requests:?}");
}

#[tokio::test]
async fn a_gone_endpoint_loses_its_registration_and_a_dead_one_never_slows_send() {
    let (_relay, client) = relay_with_push(1).await;
    let receiver = PushReceiver::start().await.unwrap();
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    client
        .register_push(&mailbox, &receiver.url, b"t")
        .await
        .unwrap();
    receiver.status(410);
    client
        .send(send_request(&mailbox.sender_id, &random_id(), b"one"))
        .await
        .unwrap();
    assert_eq!(receiver.wait_for(1).await.len(), 1);
    // Give the relay time to act on the 410 (bounded), then read and send
    // again past the interval: no registration, no wake-up.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    receiver.status(200);
    client.fetch(&mailbox, 0).await.unwrap();
    client
        .send(send_request(&mailbox.sender_id, &random_id(), b"two"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        receiver.requests().len(),
        1,
        "the 410 removed the registration"
    );

    // A dead endpoint (accepts, never answers; the relay waits up to 60 s):
    // sends to twenty mailboxes registered there all complete regardless.
    let dead = PushReceiver::start().await.unwrap();
    dead.status(0);
    let mut mailboxes = Vec::new();
    for _ in 0..20 {
        let mailbox = client.create(MailboxKind::Private).await.unwrap();
        client
            .register_push(&mailbox, &dead.url, b"t")
            .await
            .unwrap();
        mailboxes.push(mailbox);
    }
    let sends = async {
        for mailbox in &mailboxes {
            client
                .send(send_request(&mailbox.sender_id, &random_id(), b"x"))
                .await
                .unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(20), sends)
        .await
        .expect("sends completed while every wake-up hung");
    // As many as one host may hold (`push.max_in_flight_per_host`, 16); the
    // rest were dropped rather than queued behind it.
    assert_eq!(
        dead.wait_for(16).await.len(),
        16,
        "the dead host was sent its share of wake-ups"
    );
}

#[tokio::test]
async fn registrations_are_checked() {
    let (_relay, client) = relay().await;
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    for (endpoint, token, why) in [
        ("http://push.example.org/x", &b"t"[..], "https"),
        ("https://127.0.0.1/x", b"t", "local or private"),
        ("https://[::1]/x", b"t", "local or private"),
        ("https://10.0.0.7/x", b"t", "local or private"),
        ("https://[::ffff:127.0.0.1]/x", b"t", "local or private"),
        ("https://0x7f000001/x", b"t", "standard form"),
        ("https://push.example.org:8443/x", b"t", "push.ports"),
        ("not a url", b"t", "not a URL"),
        ("", b"t", "a token without an endpoint"),
        ("https://push.example.org/x", &[0u8; 257][..], "at most 256"),
    ] {
        let status = client
            .register_push(&mailbox, endpoint, token)
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{endpoint}");
        assert!(status.message().contains(why), "{}", status.message());
        assert!(
            !status.message().contains("push.example.org"),
            "errors do not echo endpoints"
        );
    }
    // A public https endpoint is accepted, and an empty one removes it.
    client
        .register_push(&mailbox, "https://push.example.org/up?token=abc", b"t")
        .await
        .unwrap();
    client.register_push(&mailbox, "", b"").await.unwrap();
    // Only the mailbox's key may register.
    let mut stranger = client.create(MailboxKind::Private).await.unwrap();
    stranger.recipient_id = mailbox.recipient_id.clone();
    let status = client
        .register_push(&stranger, "https://push.example.org/x", b"t")
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    client.delete(&mailbox).await.unwrap();
    let status = client
        .register_push(&mailbox, "https://push.example.org/x", b"t")
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
}

/// A loopback TCP listener that counts the connections it accepts (and drops them).
struct CountingListener {
    port: u16,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingListener {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                drop(socket);
            }
        });
        Self {
            port,
            accepted,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until at least `count` connections were accepted.
    async fn wait_for(&self, count: usize) -> usize {
        for _ in 0..100 {
            if self.accepted() >= count {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.accepted()
    }
}

impl Drop for CountingListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Addresses a push endpoint's name must never lead the relay to (review F11).
const SPECIAL_ADDRESSES: [&str; 24] = [
    "0.0.0.0",
    "0.1.2.3",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "192.0.0.1",
    "198.18.0.1",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "::",
    "::ffff:127.0.0.1",
    "::127.0.0.1",
    "64:ff9b::7f00:1",
    "2002:7f00:1::1",
    "fc00::1",
    "fd12:3456::1",
    "fe80::1",
    "ff02::1",
    "2001:0:4136:e378::1",
    "::ffff:10.0.0.1",
    "64:ff9b:1::a00:1",
];

#[tokio::test]
async fn odd_numeric_spellings_of_loopback_are_refused_and_never_connect() {
    let listener = CountingListener::start().await;
    // Even with the tests' loopback allowance, which lets 127.0.0.1 through.
    let (_relay, client) = relay_with_push(60).await;
    let port = listener.port;
    let mut refused = Vec::new();
    for host in [
        "0x7f000001",
        "2130706433",
        "127.1",
        "0177.0.0.1",
        "127.0.0.01",
        "0x7f.0.0.1",
        "017700000001",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[::127.0.0.1]",
        "0.0.0.0",
        "[::]",
    ] {
        let mailbox = client.create(MailboxKind::Private).await.unwrap();
        let endpoint = format!("http://{host}:{port}/x");
        let status = client
            .register_push(&mailbox, &endpoint, b"t")
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{host}");
        assert!(
            !status.message().contains(host.trim_matches(['[', ']'])),
            "the refusal echoes the host: {}",
            status.message()
        );
        // Had it been registered, this would wake it.
        client
            .send(send_request(&mailbox.sender_id, &random_id(), b"x"))
            .await
            .unwrap();
        refused.push(host);
    }
    // The canonical spelling, allowed in tests only, does connect: the
    // listener would have seen the others.
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    client
        .register_push(&mailbox, &format!("http://127.0.0.1:{port}/x"), b"t")
        .await
        .unwrap();
    client
        .send(send_request(&mailbox.sender_id, &random_id(), b"x"))
        .await
        .unwrap();
    assert_eq!(
        listener.wait_for(1).await,
        1,
        "only the canonical endpoint connected"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(listener.accepted(), 1, "refused: {refused:?}");
}

#[tokio::test]
async fn a_name_resolving_to_any_special_address_is_never_connected_to() {
    let listener = CountingListener::start().await;
    let port = listener.port;
    let loopback: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let mut config = test_config();
    config.push.allow_local_endpoints = true;
    config.push.timeout_seconds = 10;
    // Each special address alone, and behind a loopback address (allowed in
    // tests) that a connector checking only the first answer would use.
    let mut names = Vec::new();
    for (index, address) in SPECIAL_ADDRESSES.iter().enumerate() {
        let address: std::net::IpAddr = address.parse().unwrap();
        for (form, addresses) in [("only", vec![address]), ("mixed", vec![loopback, address])] {
            let name = format!("{form}-{index}.push.test");
            config
                .push
                .resolve_for_tests
                .push((name.clone(), addresses));
            names.push(name);
        }
    }
    config
        .push
        .resolve_for_tests
        .push(("fine.push.test".into(), vec![loopback]));
    let relay = InProcessRelay::start(config).await.unwrap();
    let client = relay.client().await.unwrap();
    for name in &names {
        let mailbox = client.create(MailboxKind::Private).await.unwrap();
        client
            .register_push(&mailbox, &format!("http://{name}:{port}/x"), b"t")
            .await
            .unwrap();
        client
            .send(send_request(&mailbox.sender_id, &random_id(), b"x"))
            .await
            .unwrap();
    }
    // The control: a name resolving to loopback alone connects (tests allow it).
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    client
        .register_push(&mailbox, &format!("http://fine.push.test:{port}/x"), b"t")
        .await
        .unwrap();
    client
        .send(send_request(&mailbox.sender_id, &random_id(), b"x"))
        .await
        .unwrap();
    assert_eq!(listener.wait_for(1).await, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(listener.accepted(), 1, "a special address was connected to");
}

#[tokio::test]
async fn without_the_test_allowance_a_name_resolving_to_loopback_is_never_connected_to() {
    let listener = CountingListener::start().await;
    let port = listener.port;
    let mut config = test_config();
    config.push.ports = vec![port];
    config.push.resolve_for_tests = vec![
        ("push.test".into(), vec!["127.0.0.1".parse().unwrap()]),
        ("v6.push.test".into(), vec!["::1".parse().unwrap()]),
    ];
    let relay = InProcessRelay::start(config).await.unwrap();
    let client = relay.client().await.unwrap();
    for name in ["push.test", "v6.push.test"] {
        let mailbox = client.create(MailboxKind::Private).await.unwrap();
        // A name passes registration; its addresses are checked at connect time.
        client
            .register_push(&mailbox, &format!("https://{name}:{port}/x"), b"t")
            .await
            .unwrap();
        for _ in 0..3 {
            client
                .send(send_request(&mailbox.sender_id, &random_id(), b"x"))
                .await
                .unwrap();
            client.fetch(&mailbox, 0).await.unwrap();
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(listener.accepted(), 0, "the relay connected to loopback");
}

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::relay;

/// Review M3: every wake-up shared one in-flight cap, so endpoints on a host
/// that accepts and never answers held all of it for the request timeout,
/// and every other device's wake-up was dropped meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_never_answers_takes_only_its_share_of_push_slots() {
    let tarpit = PushReceiver::start().await.unwrap();
    tarpit.status(0);
    let gateway = PushReceiver::start().await.unwrap();
    let mut config = test_config();
    config.push.allow_local_endpoints = true;
    config.push.timeout_seconds = 60;
    config.push.max_in_flight = 8;
    config.push.max_in_flight_per_host = 4;
    let loopback = vec![std::net::IpAddr::from([127, 0, 0, 1])];
    config.push.resolve_for_tests = vec![
        ("tarpit.test".into(), loopback.clone()),
        ("gateway.test".into(), loopback),
    ];
    let relay = InProcessRelay::start(config).await.unwrap();
    let client = relay.client().await.unwrap();
    // The attacker: 20 mailboxes whose wake-ups go to the silent host.
    let silent = tarpit.url.replace("127.0.0.1", "tarpit.test");
    for _ in 0..20 {
        let mailbox = client.create(MailboxKind::Private).await.unwrap();
        client
            .register_push(&mailbox, &silent, b"attacker")
            .await
            .unwrap();
        client
            .send(send_request(&mailbox.sender_id, &random_id(), &[1; 32]))
            .await
            .unwrap();
    }
    // Only the host's share reached it (and hangs there).
    let held = tarpit.wait_for(4).await;
    assert_eq!(held.len(), 4, "the silent host holds its share only");
    // A device on another host is still woken.
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    let endpoint = gateway.url.replace("127.0.0.1", "gateway.test");
    client
        .register_push(&mailbox, &endpoint, b"device")
        .await
        .unwrap();
    client
        .send(send_request(&mailbox.sender_id, &random_id(), &[2; 32]))
        .await
        .unwrap();
    assert_eq!(gateway.wait_for(1).await.len(), 1, "the device is woken");
    assert_eq!(tarpit.requests().len(), 4);
}

/// Review F21: a mailbox was marked as woken before anyone knew it had a
/// registration, so one that registered just after an envelope arrived got
/// no wake-up for the next arrival until the interval passed (and every
/// unregistered mailbox took a place in the coalescing memory).
#[tokio::test]
async fn an_arrival_before_registering_does_not_hold_back_the_first_wake_up() {
    let (_relay, client) = relay_with_push(60).await;
    let receiver = PushReceiver::start().await.unwrap();
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    client
        .send(send_request(&mailbox.sender_id, &random_id(), &[1; 32]))
        .await
        .unwrap();
    // Time for the first arrival's wake-up task to run (it sends nothing, so
    // there is no event to wait on); then the device registers.
    tokio::time::sleep(Duration::from_millis(200)).await;
    client
        .register_push(&mailbox, &receiver.url, b"token")
        .await
        .unwrap();
    client
        .send(send_request(&mailbox.sender_id, &random_id(), &[2; 32]))
        .await
        .unwrap();
    assert_eq!(receiver.wait_for(1).await.len(), 1, "the device is woken");
}

/// Fresh relay review M-E: a gateway the operator chose (FCM, APNs, a
/// UnifiedPush distributor) carries everyone's wake-ups, so at the per-host
/// share anyone's mailboxes could take all of its places and every other
/// device behind it lost its wake-ups. A host under `allowed_host_suffixes`
/// has a larger share of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chosen_gateway_keeps_room_for_everyones_wake_ups() {
    let gateway = PushReceiver::start().await.unwrap();
    // Slow: holds every wake-up for the test's length.
    gateway.status(0);
    let mut config = test_config();
    config.push.allow_local_endpoints = true;
    config.push.timeout_seconds = 60;
    config.push.max_in_flight = 8;
    config.push.max_in_flight_per_host = 2;
    config.push.max_in_flight_per_gateway = 6;
    config.push.allowed_host_suffixes = vec!["gateway.test".into()];
    config.push.resolve_for_tests = vec![(
        "gateway.test".into(),
        vec![std::net::IpAddr::from([127, 0, 0, 1])],
    )];
    let relay = InProcessRelay::start(config).await.unwrap();
    let client = relay.client().await.unwrap();
    let endpoint = gateway.url.replace("127.0.0.1", "gateway.test");
    // Someone's four mailboxes behind the gateway: more than a host's share.
    for _ in 0..4 {
        let mailbox = client.create(MailboxKind::Private).await.unwrap();
        client
            .register_push(&mailbox, &endpoint, b"attacker")
            .await
            .unwrap();
        client
            .send(send_request(&mailbox.sender_id, &random_id(), &[1; 32]))
            .await
            .unwrap();
    }
    assert_eq!(gateway.wait_for(4).await.len(), 4, "all four reached it");
    // A device behind the same gateway is still woken.
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    client
        .register_push(&mailbox, &endpoint, b"device")
        .await
        .unwrap();
    client
        .send(send_request(&mailbox.sender_id, &random_id(), &[2; 32]))
        .await
        .unwrap();
    assert_eq!(gateway.wait_for(5).await.len(), 5, "the device is woken");
}
