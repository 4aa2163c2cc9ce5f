//! Fuzzes an established session decrypting messages.
#![no_main]

use std::sync::OnceLock;

use haven_protocol::{Device, IdentityKeyPair, Session};
use rand_core::SeedableRng;

fn session_snapshot() -> &'static [u8] {
    static SNAPSHOT: OnceLock<Vec<u8>> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let mut device = Device::generate(1_800_000_000, &mut rng);
        let bundle = device.bundle(None, None).expect("bundle");
        let alice = IdentityKeyPair::generate(&mut rng);
        let mut outbound = Session::initiate(&alice, &bundle, &mut rng).expect("initiate");
        let first = outbound.encrypt(b"hi", &mut rng).expect("encrypt");
        let (inbound, _) = device.accept(&first, &mut rng).expect("accept");
        inbound.to_snapshot().to_vec()
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(mut session) = Session::from_snapshot(session_snapshot()) else { return };
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
    let _ = haven_protocol::MessageKind::of(data);
    let _ = session.decrypt(data, &mut rng);
});
