//! `cargo run -p uniffi-bindgen -- generate --library <libhaven_ffi.so> --language kotlin --out-dir <dir>`:
//! UniFFI's own bindgen, pinned to the version `haven-ffi` is built with.

fn main() {
    uniffi::uniffi_bindgen_main()
}
