//! Compiles the peer contract with `protox` (no system `protoc` needed) and keeps its encoded
//! descriptor set for gRPC server reflection.
use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let signaling = "distributor/v1/signaling.proto";
    println!("cargo:rerun-if-changed={signaling}");

    let fds = protox::compile([signaling], ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let descriptors = prost::Message::encode_to_vec(&fds);
    fs::write(out.join("distributor_descriptor.bin"), &descriptors)?;
    // The proto3 JSON mapping (included with the `json` feature): unknown fields ignored, and
    // every field written, so that a frame always names its `event`, even `OFFER` (0).
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .ignore_unknown_fields()
        .emit_fields()
        .build(&[".distributor.v1"])?;
    // Small per-stream buffers: see src/codec.rs.
    tonic_prost_build::configure()
        .bytes(".distributor.v1")
        .codec_path("crate::codec::SmallBuffers")
        // No `connect(url)` helpers: they need tonic's transport, which a user of the
        // contract alone does not (a client builds its `Channel` and calls `new`).
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
