//! Fuzzes the untrusted-input decoders of the wire rules: supporter links and
//! directory document verification.
#![no_main]

use haven_proto::directory::{parse_supporter_link, verify_device_list, verify_revocation, verify_supporter_entry};
use haven_proto::v1::SignedDocument;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_supporter_link(text);
    }
    let split = data.len().min(64);
    let document = SignedDocument { signature: data[..split].to_vec(), body: data[split..].to_vec() };
    let _ = verify_supporter_entry(&document, &[7; 32], 1_800_000_000, &[]);
    let _ = verify_device_list(&document, &[7; 32], 1_800_000_000, Some(3));
    let _ = verify_revocation(&document, &[7; 32]);
});
