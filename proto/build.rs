//! Compiles the peer contract with `protox` (no system `protoc` needed) and keeps its encoded
//! descriptor set for gRPC server reflection.
use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let signaling = "distributor/v1/signaling.proto";
    println!("cargo:rerun-if-changed={signaling}");

    let fds = protox::compile([signaling], ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("distributor_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    // Small per-stream buffers: see src/codec.rs.
    tonic_prost_build::configure()
        .bytes(".distributor.v1")
        .codec_path("crate::codec::SmallBuffers")
        .compile_fds(fds)?;
    Ok(())
}
