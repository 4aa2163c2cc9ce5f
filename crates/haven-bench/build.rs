//! Generates the raw-baseline echo service with a vendored `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    #[allow(unsafe_code)] // reason: build script, single-threaded; tonic-prost-build reads PROTOC.
    unsafe {
        std::env::set_var("PROTOC", protoc);
    }
    println!("cargo:rerun-if-changed=proto/bench.proto");
    tonic_prost_build::configure().compile_protos(&["proto/bench.proto"], &["proto"])?;
    Ok(())
}
