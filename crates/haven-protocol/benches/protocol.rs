//! Haven's protocol operations next to vodozemac's Olm, in one run, so the ratio
//! survives this machine's drift: full handshake (initiator and responder, with
//! the first message), 1 KiB encrypt+decrypt in an established session, and
//! seal+open of a 1 KiB envelope (Haven only: Olm has no sealed sender).
//!
//! ```text
//! cargo bench -p haven-protocol --bench protocol
//! ```

#![allow(clippy::expect_used, clippy::panic, missing_docs)] // reason: a benchmark; a failed setup aborts it.

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use haven_protocol::{Device, IdentityKeyPair, Session, open, seal};
use rand_core::SeedableRng;
use std::hint::black_box;
use vodozemac::olm::{Account, OlmMessage, SessionConfig};

const NOW: u64 = 1_800_000_000;
const KIB: [u8; 1024] = [0x5a; 1024];

fn haven_pair(rng: &mut rand_chacha::ChaCha20Rng) -> (Session, Session) {
    let mut device = Device::generate(NOW, rng);
    let bundle = device.bundle(None, None).expect("bundle");
    let alice = IdentityKeyPair::generate(rng);
    let mut outbound = Session::initiate(&alice, &bundle, rng).expect("initiate");
    let first = outbound.encrypt(b"hello", rng).expect("encrypt");
    let (mut inbound, _) = device.accept(&first, rng).expect("accept");
    let reply = inbound.encrypt(b"hi", rng).expect("encrypt");
    outbound.decrypt(&reply, rng).expect("decrypt");
    (outbound, inbound)
}

fn olm_pair() -> (vodozemac::olm::Session, vodozemac::olm::Session) {
    let alice = Account::new();
    let mut bob = Account::new();
    bob.generate_one_time_keys(1);
    let one_time_key = *bob.one_time_keys().values().next().expect("one-time key");
    bob.mark_keys_as_published();
    let mut outbound = alice
        .create_outbound_session(
            SessionConfig::version_1(),
            bob.curve25519_key(),
            one_time_key,
        )
        .expect("outbound");
    let OlmMessage::PreKey(first) = outbound.encrypt(b"hello").expect("encrypt") else {
        panic!("first Olm message is a pre-key message");
    };
    let mut inbound = bob
        .create_inbound_session(SessionConfig::version_1(), alice.curve25519_key(), &first)
        .expect("inbound")
        .session;
    let reply = inbound.encrypt(b"hi").expect("encrypt");
    outbound.decrypt(&reply).expect("decrypt");
    (outbound, inbound)
}

fn handshake(c: &mut Criterion) {
    let mut group = c.benchmark_group("handshake");
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    let device = Device::generate(NOW, &mut rng);
    let snapshot = device.to_snapshot();
    let bundle = device.bundle(None, None).expect("bundle");
    group.bench_function("haven_pqxdh", |b| {
        b.iter_batched(
            || Device::from_snapshot(&snapshot).expect("restore"),
            |mut device| {
                let alice = IdentityKeyPair::generate(&mut rng);
                let mut outbound = Session::initiate(&alice, &bundle, &mut rng).expect("initiate");
                let first = outbound.encrypt(b"hello", &mut rng).expect("encrypt");
                black_box(device.accept(&first, &mut rng).expect("accept"));
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("vodozemac_olm", |b| {
        b.iter_batched(
            || {
                let mut bob = Account::new();
                bob.generate_one_time_keys(1);
                let key = *bob.one_time_keys().values().next().expect("one-time key");
                bob.mark_keys_as_published();
                (bob, key)
            },
            |(mut bob, one_time_key)| {
                let alice = Account::new();
                let mut outbound = alice
                    .create_outbound_session(
                        SessionConfig::version_1(),
                        bob.curve25519_key(),
                        one_time_key,
                    )
                    .expect("outbound");
                let OlmMessage::PreKey(first) = outbound.encrypt(b"hello").expect("encrypt") else {
                    panic!("pre-key message expected");
                };
                black_box(
                    bob.create_inbound_session(
                        SessionConfig::version_1(),
                        alice.curve25519_key(),
                        &first,
                    )
                    .expect("inbound"),
                );
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn message(c: &mut Criterion) {
    let mut group = c.benchmark_group("encrypt_decrypt_1KiB");
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
    let (mut alice, mut bob) = haven_pair(&mut rng);
    group.bench_function("haven_double_ratchet", |b| {
        b.iter(|| {
            let message = alice.encrypt(&KIB, &mut rng).expect("encrypt");
            black_box(bob.decrypt(&message, &mut rng).expect("decrypt"));
        })
    });
    let (mut alice, mut bob) = olm_pair();
    group.bench_function("vodozemac_olm", |b| {
        b.iter(|| {
            let message = alice.encrypt(KIB).expect("encrypt");
            black_box(bob.decrypt(&message).expect("decrypt"));
        })
    });
    group.finish();
}

fn sealing(c: &mut Criterion) {
    let mut group = c.benchmark_group("seal_open_1KiB");
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
    let sender = IdentityKeyPair::generate(&mut rng);
    let recipient = IdentityKeyPair::generate(&mut rng);
    group.bench_function("haven_sealed_sender", |b| {
        b.iter(|| {
            let sealed = seal(&sender, recipient.public(), &KIB, &mut rng).expect("seal");
            black_box(open(&recipient, &sealed).expect("open"));
        })
    });
    group.finish();
}

criterion_group!(benches, handshake, message, sealing);
criterion_main!(benches);
