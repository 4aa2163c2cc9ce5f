//! The protocol core's scenario, security, format and known-answer tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)] // reason: tests.

mod formats;
mod security;
mod sim;
mod vectors;

use haven_protocol::{Device, IdentityKeyPair, PrekeyBundle, Session};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

pub const NOW: u64 = 1_800_000_000;

pub fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

/// A supporter device with one-time prekeys and a bundle that uses the first of each.
pub fn device_with_bundle(rng: &mut ChaCha20Rng) -> (Device, PrekeyBundle) {
    let mut device = Device::generate(NOW, rng);
    device.generate_one_time_prekeys(4, rng);
    let bundle = device
        .bundle(
            Some(device.one_time_prekey_ids()[0]),
            Some(device.kem_one_time_prekey_ids()[0]),
        )
        .unwrap();
    (device, bundle)
}

/// A help-seeker with an established session to a supporter device (one round trip done).
pub fn established(seed: u64) -> (ChaCha20Rng, IdentityKeyPair, Session, Device, Session) {
    let mut rng = rng(seed);
    let (mut device, bundle) = device_with_bundle(&mut rng);
    let alice = IdentityKeyPair::generate(&mut rng);
    let mut outbound = Session::initiate(&alice, &bundle, &mut rng).unwrap();
    let first = outbound.encrypt(b"hello", &mut rng).unwrap();
    let (mut inbound, _) = device.accept(&first, &mut rng).unwrap();
    let reply = inbound.encrypt(b"hi", &mut rng).unwrap();
    outbound.decrypt(&reply, &mut rng).unwrap();
    (rng, alice, outbound, device, inbound)
}
