//! Generates the `haven.v1` code from `proto/` with a vendored `protoc`, so a fresh
//! machine builds with cargo alone.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded, so setting the variable is sound;
    // `set_var` is unsafe in edition 2024 only because of other threads.
    #[allow(unsafe_code)] // reason: build script, single-threaded; tonic-prost-build reads PROTOC.
    unsafe {
        std::env::set_var("PROTOC", protoc);
    }
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        proto_root.join("haven/v1/relay.proto"),
        proto_root.join("haven/v1/mailbox.proto"),
        proto_root.join("haven/v1/directory.proto"),
        proto_root.join("haven/v1/keys.proto"),
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    tonic_prost_build::configure()
        .codec_path("crate::codec::LeanCodec")
        .file_descriptor_set_path(out_dir.join("haven_v1_descriptor.bin"))
        .compile_protos(&protos, &[proto_root])?;
    Ok(())
}
