//! Fuzzes prekey bundle parsing and verification.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(bundle) = haven_protocol::PrekeyBundle::from_bytes(data) {
        // Whatever parses must re-encode to the same bytes.
        assert_eq!(bundle.to_bytes(), data);
    }
});
