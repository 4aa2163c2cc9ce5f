//! Fuzzes a device accepting initial messages.
#![no_main]

use std::sync::OnceLock;

use haven_protocol::Device;
use rand_core::SeedableRng;

fn device_snapshot() -> &'static [u8] {
    static SNAPSHOT: OnceLock<Vec<u8>> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let mut device = Device::generate(1_800_000_000, &mut rng);
        device.generate_one_time_prekeys(2, &mut rng);
        device.to_snapshot().to_vec()
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(mut device) = Device::from_snapshot(device_snapshot()) else { return };
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
    let _ = haven_protocol::InitialInfo::of(data);
    let _ = device.accept(data, &mut rng);
});
