//! Fuzzes opening sealed envelopes.
#![no_main]

use std::sync::OnceLock;

use haven_protocol::IdentityKeyPair;
use rand_core::SeedableRng;

fn recipient() -> &'static IdentityKeyPair {
    static RECIPIENT: OnceLock<IdentityKeyPair> = OnceLock::new();
    RECIPIENT.get_or_init(|| IdentityKeyPair::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(1)))
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = haven_protocol::open(recipient(), data);
});
