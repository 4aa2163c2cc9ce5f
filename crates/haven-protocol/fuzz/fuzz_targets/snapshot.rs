//! Fuzzes restoring device and session snapshots.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(device) = haven_protocol::Device::from_snapshot(data) {
        assert_eq!(&device.to_snapshot()[..], data);
    }
    if let Ok(session) = haven_protocol::Session::from_snapshot(data) {
        assert_eq!(&session.to_snapshot()[..], data);
    }
});
