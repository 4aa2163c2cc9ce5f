//! Real relay processes: restarts, kill -9, SIGTERM, logs, health, reflection,
//! metrics, TLS and configuration errors.

use std::collections::HashSet;
use std::io::{Read as _, Write as _};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use haven_e2e::{
    RelayProcess, TestClient, WAIT, random_id, random_key, send_request, sign, sign_send,
    stamp_send,
};
use haven_proto::auth::Method;
use haven_proto::v1::{self as proto, MailboxKind, receive_response::Kind};
use tonic::Code;

const RELAY: &str = env!("CARGO_BIN_EXE_haven-relay-e2e");

/// (mailbox index, envelope id) of every send the relay acknowledged.
type Acknowledged = Arc<Mutex<Vec<(usize, Vec<u8>)>>>;

#[tokio::test]
async fn restart_keeps_unexpired_envelopes_and_drops_expired_ones() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("relay.log");
    let data = dir.path().join("data");
    let args = ["--expiry-bucket-seconds", "1"];
    let mut relay = RelayProcess::start(RELAY, &data, &log, &args)
        .await
        .unwrap();
    let client = relay.client().await.unwrap();
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    let mut short = send_request(&mailbox.sender_id, &random_id(), b"short-lived");
    short.ttl_seconds = 1;
    client.send(short).await.unwrap();
    for n in 0..3u8 {
        client
            .send(send_request(&mailbox.sender_id, &random_id(), &[n; 64]))
            .await
            .unwrap();
    }
    assert!(
        relay.terminate().await.unwrap().success(),
        "clean exit:\n{}",
        relay.log()
    );
    drop(relay);
    // Let the short envelope's bucket pass while the relay is down.
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let relay = RelayProcess::start(RELAY, &data, &log, &args)
        .await
        .unwrap();
    let client = relay.client().await.unwrap();
    let stored = client.drain(&mailbox).await.unwrap();
    let payloads: Vec<_> = stored.iter().map(|e| e.ciphertext.clone()).collect();
    assert_eq!(payloads, [vec![0; 64], vec![1; 64], vec![2; 64]]);
}

#[tokio::test]
async fn kill_9_loses_no_acknowledged_envelope() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("relay.log");
    let data = dir.path().join("data");
    let mut relay = RelayProcess::start(RELAY, &data, &log, &[]).await.unwrap();
    let setup = relay.client().await.unwrap();
    let mut mailboxes = Vec::new();
    // Secured, so that they take the full quota (an unsecured mailbox holds 16).
    let sender_key = random_key();
    for _ in 0..4 {
        let mailbox = setup.create(MailboxKind::Private).await.unwrap();
        setup
            .secure(&mailbox, sender_key.verifying_key().as_bytes())
            .await
            .unwrap();
        mailboxes.push(Arc::new(mailbox));
    }
    let acknowledged: Acknowledged = Arc::default();
    let mut senders = Vec::new();
    for sender in 0..8 {
        // Each sender is its own client connection.
        let client = relay.client().await.unwrap();
        let mailbox_index = sender % mailboxes.len();
        let mailbox = Arc::clone(&mailboxes[mailbox_index]);
        let acknowledged = Arc::clone(&acknowledged);
        let sender_key = sender_key.clone();
        senders.push(tokio::spawn(async move {
            // Bounded: at most 2000 sends each; the kill stops them far earlier.
            for n in 0..2000u32 {
                let id = random_id();
                let payload = format!("sender {sender} envelope {n}").into_bytes();
                let mut request = send_request(&mailbox.sender_id, &id, &payload);
                sign_send(&mut request, &sender_key);
                match client.send(request).await {
                    Ok(_) => acknowledged.lock().unwrap().push((mailbox_index, id)),
                    Err(_) => return,
                }
            }
        }));
    }
    let deadline = Instant::now() + WAIT;
    while acknowledged.lock().unwrap().len() < 500 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    relay.kill();
    for sender in senders {
        sender.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() >= 500,
        "senders were acknowledged {} times",
        acknowledged.len()
    );
    drop(relay);

    let relay = RelayProcess::start(RELAY, &data, &log, &[]).await.unwrap();
    let client = relay.client().await.unwrap();
    let mut delivered = HashSet::new();
    for (index, mailbox) in mailboxes.iter().enumerate() {
        for envelope in client.drain(mailbox).await.unwrap() {
            delivered.insert((index, envelope.envelope_id));
        }
    }
    let lost: Vec<_> = acknowledged
        .iter()
        .filter(|entry| !delivered.contains(*entry))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged envelopes were lost after kill -9 ({} delivered)",
        lost.len(),
        acknowledged.len(),
        delivered.len()
    );
    println!(
        "kill -9: {} acknowledged, {} delivered after restart",
        acknowledged.len(),
        delivered.len()
    );
}

/// The forms in which bytes could leak into a log line.
fn leak_forms(bytes: &[u8]) -> Vec<String> {
    let debug_list = format!("{:?}", &bytes[..4]);
    vec![
        hex::encode(bytes),
        hex::encode_upper(bytes),
        hex::encode(&bytes[..8]),
        debug_list.trim_end_matches(']').to_owned(),
    ]
}

#[tokio::test]
async fn logs_at_trace_level_carry_no_ids_keys_addresses_or_contents() {
    for format in ["text", "json"] {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("relay.log");
        let args = [
            "--log-level",
            "trace",
            "--log-format",
            format,
            "--push-allow-local-endpoints",
        ];
        let mut relay = RelayProcess::start(RELAY, &dir.path().join("data"), &log, &args)
            .await
            .unwrap();
        let client = relay.client().await.unwrap();
        let mut secrets: Vec<Vec<u8>> = Vec::new();

        let private = client.create(MailboxKind::Private).await.unwrap();
        let intake = client.create(MailboxKind::Intake).await.unwrap();
        let sender_key = random_key();
        client
            .secure(&private, &sender_key.verifying_key().to_bytes())
            .await
            .unwrap();
        // Push wake-ups, delivered and answered "gone": endpoints and tokens stay out.
        let phone = haven_e2e::PushReceiver::start().await.unwrap();
        phone.status(410);
        client
            .register_push(&intake, &phone.url, b"PUSH-TOKEN-do-not-log")
            .await
            .unwrap();
        let marker = b"PLAINTEXT-MARKER-do-not-log".to_vec();
        let mut first_contact = send_request(&intake.sender_id, &random_id(), &marker);
        stamp_send(&mut first_contact, 8);
        client.send(first_contact.clone()).await.unwrap();
        assert_eq!(
            phone.wait_for(1).await.len(),
            1,
            "the intake mailbox was woken"
        );
        let mut reply = send_request(&private.sender_id, &random_id(), &marker);
        sign_send(&mut reply, &sender_key);
        client.send(reply.clone()).await.unwrap();
        let mut stream = client.receive(&private, 4).await.unwrap();
        let envelope = stream.next_envelope().await;
        stream.ack(vec![envelope.envelope_id.clone()]).await;
        drop(stream);
        let fetched = client.fetch(&intake, 10).await.unwrap();
        client
            .ack(&intake, vec![fetched.envelopes[0].envelope_id.clone()])
            .await
            .unwrap();
        // Failures are logged too: a replay, an unknown mailbox, a bad signature.
        let auth = sign(
            &intake.key,
            Method::Fetch,
            &intake.recipient_id,
            &[&1u32.to_be_bytes()],
        );
        let fetch = proto::FetchRequest {
            recipient_id: intake.recipient_id.clone(),
            limit: 1,
            auth: Some(auth),
        };
        client.mailbox.clone().fetch(fetch.clone()).await.unwrap();
        assert!(client.mailbox.clone().fetch(fetch).await.is_err());
        assert!(
            client
                .send(send_request(&random_id(), &random_id(), &marker))
                .await
                .is_err()
        );
        let mut forged = send_request(&private.sender_id, &random_id(), &marker);
        sign_send(&mut forged, &random_key());
        assert!(client.send(forged.clone()).await.is_err());
        client.delete(&private).await.unwrap();
        client.delete(&intake).await.unwrap();
        assert!(relay.terminate().await.unwrap().success());

        for mailbox in [&private, &intake] {
            secrets.push(mailbox.recipient_id.clone());
            secrets.push(mailbox.sender_id.clone());
            secrets.push(mailbox.key.verifying_key().to_bytes().to_vec());
            secrets.push(mailbox.key.to_bytes().to_vec());
        }
        secrets.push(sender_key.verifying_key().to_bytes().to_vec());
        for request in [&first_contact, &reply, &forged] {
            secrets.push(request.envelope_id.clone());
            secrets.push(request.sender_signature.clone());
        }
        secrets.retain(|bytes| !bytes.is_empty());

        let output = relay.log();
        assert!(
            output.contains("handled"),
            "{format}: trace logging produced no request lines:\n{output}"
        );
        assert!(
            output.contains("stream ended"),
            "{format}: stream lifecycle not logged"
        );
        assert!(
            !output.contains("PLAINTEXT-MARKER"),
            "{format}: envelope content in the log"
        );
        let host = phone.url["http://".len()..]
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        for registration in ["PUSH-TOKEN", "UFVTSC1UT0tFTi", "endpoint-1", host.as_str()] {
            assert!(
                !output.contains(registration),
                "{format}: a push registration in the log"
            );
        }
        for secret in &secrets {
            for form in leak_forms(secret) {
                assert!(
                    !output.contains(&form),
                    "{format}: log contains {form}:\n{output}"
                );
            }
        }
        // The only addresses in the log are the relay's own listeners.
        let own = [relay.address.to_string(), relay.metrics.to_string()];
        for (at, _) in output.match_indices("127.0.0.1:") {
            let rest = &output[at..];
            assert!(
                own.iter().any(|address| rest.starts_with(address.as_str())),
                "{format}: a client address is in the log:\n{output}"
            );
        }
    }
}

fn http_get(address: std::net::SocketAddr, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[tokio::test]
async fn health_reflection_and_metrics_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("relay.log");
    let relay = RelayProcess::start(RELAY, &dir.path().join("data"), &log, &[])
        .await
        .unwrap();
    let channel = haven_e2e::connect(relay.address).await.unwrap();

    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: HashSet<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "haven.v1.Mailbox",
        "haven.v1.Relay",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.contains(expected),
            "{expected} missing from {names:?}"
        );
    }

    let client = TestClient::new(channel);
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    client
        .send(send_request(&mailbox.sender_id, &random_id(), b"counted"))
        .await
        .unwrap();
    assert!(client.fetch(&mailbox, 0).await.is_ok());
    let _ = client
        .send(send_request(&random_id(), &random_id(), b"x"))
        .await;

    let metrics = http_get(relay.metrics, "/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    for expected in [
        "grpc_server_handled_total{grpc_service=\"haven.v1.Mailbox\",grpc_method=\"Send\",grpc_type=\"unary\",grpc_code=\"OK\"} 1",
        "grpc_server_handled_total{grpc_service=\"haven.v1.Mailbox\",grpc_method=\"Send\",grpc_type=\"unary\",grpc_code=\"NotFound\"} 1",
        "grpc_server_handling_seconds_bucket{",
        "haven_stored_envelopes 1",
        "haven_stored_mailboxes 1",
        "haven_sweeps_total{result=\"ok\"}",
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected:?} in:\n{metrics}"
        );
    }
    for secret in [&mailbox.recipient_id, &mailbox.sender_id] {
        assert!(!metrics.contains(&hex::encode(secret)));
    }
    assert!(http_get(relay.metrics, "/other").starts_with("HTTP/1.1 404"));
}

#[tokio::test]
async fn sigterm_drains_streams_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("relay.log");
    let mut relay = RelayProcess::start(RELAY, &dir.path().join("data"), &log, &[])
        .await
        .unwrap();
    let client = relay.client().await.unwrap();
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    let mut stream = client.receive(&mailbox, 0).await.unwrap();
    assert!(matches!(stream.next().await, Ok(Some(Kind::QueueEmpty(_)))));
    let status = relay.terminate().await.unwrap();
    assert!(status.success(), "exit status {status:?}:\n{}", relay.log());
    let ended = stream.next().await.unwrap_err();
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    let output = relay.log();
    assert!(
        output.contains("shutting down") && output.contains("stopped"),
        "{output}"
    );
}

#[tokio::test]
async fn tls_is_served_from_certificate_files() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();
    let port = haven_e2e::free_port();
    let mut child = std::process::Command::new(RELAY)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            "off",
            "--store",
            "memory",
        ])
        .arg("--tls-cert")
        .arg(&cert_path)
        .arg("--tls-key")
        .arg(&key_path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            certified.cert.pem(),
        ))
        .domain_name("localhost");
    let endpoint = tonic::transport::Channel::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let channel = loop {
        match endpoint.connect().await {
            Ok(channel) => break channel,
            Err(error) => {
                assert!(Instant::now() < deadline, "no TLS connection: {error:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let client = TestClient::new(channel);
    let info = client.get_info().await.unwrap();
    assert!(!info.version.is_empty());
    // Plaintext to the TLS port fails.
    let plaintext = haven_e2e::connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap();
    assert!(TestClient::new(plaintext).get_info().await.is_err());
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn bad_configuration_exits_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let output = std::process::Command::new(RELAY)
            .args(args)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stderr) = run(&["--listen", "0.0.0.0:0", "--metrics-listen", "off"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("not loopback and no TLS"), "{stderr}");

    let file = dir.path().join("relay.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:0\"\n[limits]\nmax_ttl_seconds = 2000000\n",
    )
    .unwrap();
    let (code, stderr) = run(&["--config", file.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("max_ttl_seconds is 2000000"), "{stderr}");

    std::fs::write(&file, "lisen = \"127.0.0.1:0\"\n").unwrap();
    let (code, stderr) = run(&["--config", file.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("unknown field `lisen`"), "{stderr}");

    let (code, stderr) = run(&["--metrics-listen", "nonsense"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("is neither an address"), "{stderr}");
}

/// Review F17: after the sled store's log write failed (a full disk), every
/// write failed INTERNAL while health said SERVING, so load balancers and
/// probes kept the dead relay. The failure here is real: the relay runs with a
/// 16 MiB file size limit (`ulimit -f`, SIGXFSZ ignored as a full disk would
/// give ENOSPC, not a signal), so a write past it fails with EFBIG.
#[tokio::test]
async fn a_failed_store_turns_health_not_serving_shows_in_metrics_and_exits() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("relay.log");
    let wrapper = dir.path().join("relay-with-small-files.sh");
    std::fs::write(
        &wrapper,
        format!("#!/bin/bash\ntrap '' XFSZ\nulimit -f 16384\nexec {RELAY} \"$@\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, "store_failure_exit_seconds = 2\n").unwrap();
    let mut relay = RelayProcess::start(
        wrapper.to_str().unwrap(),
        &dir.path().join("data"),
        &log,
        &["--config", config.to_str().unwrap()],
    )
    .await
    .unwrap();
    assert!(http_get(relay.metrics, "/metrics").contains("haven_store_failed 0"));
    let client = relay.client().await.unwrap();
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    let sender_key = random_key();
    client
        .secure(&mailbox, sender_key.verifying_key().as_bytes())
        .await
        .unwrap();
    // Bounded: 400 × 64 KiB is 25 MiB, past the 16 MiB limit.
    let mut failed = None;
    for _ in 0..400 {
        let mut request = send_request(&mailbox.sender_id, &random_id(), &[7; 64 * 1024]);
        sign_send(&mut request, &sender_key);
        if let Err(status) = client.send(request).await {
            failed = Some(status);
            break;
        }
    }
    let failed = failed.expect("a write past the file size limit failed");
    assert_eq!(failed.code(), Code::Internal, "{failed:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while haven_e2e::serving(relay.address).await.unwrap() {
        assert!(
            Instant::now() < deadline,
            "health still SERVING after the store failed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(http_get(relay.metrics, "/metrics").contains("haven_store_failed 1"));
    let status = relay.wait_exit(Duration::from_secs(20)).await.unwrap();
    assert!(
        !status.success(),
        "a failed store is an error exit: {status}"
    );
    assert!(relay.log().contains("the store failed"), "{}", relay.log());
}

#[tokio::test]
async fn silent_metrics_connections_are_closed_and_a_scrape_is_still_served() {
    // Relay review F22: the metrics listener had no cap and no header timeout,
    // so silent sockets there could take the process's file descriptors.
    let work = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(
        RELAY,
        &work.path().join("data"),
        &work.path().join("relay.log"),
        &[],
    )
    .await
    .unwrap();
    let silent: Vec<std::net::TcpStream> = (0..40)
        .map(|_| std::net::TcpStream::connect(relay.metrics).unwrap())
        .collect();
    // Each is closed by the relay: at once past the cap, else after the header timeout.
    for mut socket in silent {
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(15)))
            .unwrap();
        let mut byte = [0u8; 1];
        let read = socket.read(&mut byte);
        assert!(
            matches!(read, Ok(0))
                || read
                    .as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "a silent metrics connection stayed open: {read:?}"
        );
    }
    let mut scrape = std::net::TcpStream::connect(relay.metrics).unwrap();
    write!(
        scrape,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    scrape.read_to_string(&mut text).unwrap();
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..text.len().min(80)]
    );
}

/// Review F13: the replay memory was per process, so a signed request
/// captured before a restart (even a kill -9) passed again after it.
#[tokio::test]
async fn a_signed_request_replayed_after_a_restart_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("relay.log");
    let data = dir.path().join("data");
    let mut relay = RelayProcess::start(RELAY, &data, &log, &[]).await.unwrap();
    let client = relay.client().await.unwrap();
    let mailbox = client.create(MailboxKind::Private).await.unwrap();
    client.send_numbered(&mailbox, 1).await;
    let captured = proto::FetchRequest {
        recipient_id: mailbox.recipient_id.clone(),
        limit: 10,
        auth: Some(sign(
            &mailbox.key,
            Method::Fetch,
            &mailbox.recipient_id,
            &[&10u32.to_be_bytes()],
        )),
    };
    let fetched = client
        .mailbox
        .clone()
        .fetch(captured.clone())
        .await
        .unwrap();
    assert_eq!(fetched.into_inner().envelopes.len(), 1);
    relay.kill();
    drop(relay);

    let relay = RelayProcess::start(RELAY, &data, &log, &[]).await.unwrap();
    let client = relay.client().await.unwrap();
    let replayed = client.mailbox.clone().fetch(captured).await.unwrap_err();
    assert_eq!(replayed.code(), Code::Unauthenticated, "{replayed:?}");
    assert!(replayed.message().contains("already used"), "{replayed:?}");
    // The owner, signing anew, is served.
    assert_eq!(client.stored(&mailbox).await.len(), 1);
}

/// Second fresh review H-1 across a kill -9: a first contact's record goes
/// through the log with the envelope, so the saved request sent again after
/// the supporter's ack and a restart stores nothing.
#[tokio::test]
async fn a_first_contact_replayed_after_its_ack_and_a_restart_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("relay.log");
    let data = dir.path().join("data");
    let mut relay = RelayProcess::start(RELAY, &data, &log, &[]).await.unwrap();
    let client = relay.client().await.unwrap();
    let difficulty = client.get_info().await.unwrap().intake_pow_difficulty;
    let intake = client.create(MailboxKind::Intake).await.unwrap();
    let mut saved = send_request(&intake.sender_id, &random_id(), b"first contact");
    stamp_send(&mut saved, difficulty);
    assert!(!client.send(saved.clone()).await.unwrap().duplicate);
    let fetched = client.stored(&intake).await;
    client
        .ack(&intake, vec![fetched[0].envelope_id.clone()])
        .await
        .unwrap();
    relay.kill();
    drop(relay);

    let relay = RelayProcess::start(RELAY, &data, &log, &[]).await.unwrap();
    let client = relay.client().await.unwrap();
    assert!(client.send(saved).await.unwrap().duplicate);
    assert!(client.stored(&intake).await.is_empty());
}

/// The series a scrape shows: each sample's name and labels.
fn series(scrape: &str) -> HashSet<String> {
    scrape
        .lines()
        .skip_while(|line| !line.is_empty())
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' ').map(|(series, _)| series.to_owned()))
        .collect()
}

/// Review L1: every metric label is a value from a fixed set in the code
/// (`&'static str`: method names, codes, reasons), never from a request, so
/// what anyone sends cannot grow the recorder's series. Unknown services and
/// methods, undecodable bodies and made-up mailboxes: a second round of new
/// names adds no series.
#[tokio::test]
async fn metrics_series_do_not_grow_with_what_clients_send() {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("relay.log");
    let relay = RelayProcess::start(RELAY, &dir.path().join("data"), &log, &[])
        .await
        .unwrap();
    let http: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let client = relay.client().await.unwrap();
    let round = |seed: u32| {
        let (http, client) = (http.clone(), client.clone());
        let address = relay.address;
        async move {
            for n in 0..20u32 {
                let paths = [
                    format!("/haven.v1.Mailbox/Made{seed}x{n}"),
                    format!("/haven.v{seed}.Made{n}/Up"),
                    format!("/{seed}/{n}"),
                    "/haven.v1.Mailbox/Fetch".to_owned(),
                ];
                for path in paths {
                    // A gRPC frame that is not a protobuf message.
                    let body = Bytes::from_static(&[0, 0, 0, 0, 3, 0xff, 0xff, 0xff]);
                    let request = hyper::Request::post(format!("http://{address}{path}"))
                        .header("content-type", "application/grpc")
                        .header("te", "trailers")
                        .body(Full::new(body))
                        .unwrap();
                    let _ = tokio::time::timeout(WAIT, http.request(request)).await;
                }
                let made_up = haven_e2e::OwnedMailbox {
                    recipient_id: random_id(),
                    sender_id: random_id(),
                    key: random_key(),
                };
                let _ = client.fetch(&made_up, n).await;
                let _ = client
                    .send(send_request(&random_id(), &random_id(), &[1; 16]))
                    .await;
            }
        }
    };
    round(1).await;
    let after_one = series(&http_get(relay.metrics, "/metrics"));
    round(2).await;
    let after_two = series(&http_get(relay.metrics, "/metrics"));
    assert!(
        after_one
            .iter()
            .any(|series| series.starts_with("grpc_server_handled_total")
                && series.contains("Fetch")),
        "the scrape shows the calls: {after_one:?}"
    );
    let added: Vec<_> = after_two.difference(&after_one).collect();
    assert!(added.is_empty(), "new series from new names: {added:?}");
    assert!(
        after_two.len() < 2_000,
        "{} series after two rounds",
        after_two.len()
    );
}
