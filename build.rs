//! Compiles the protos with `protox` (no system `protoc` needed) and keeps the encoded
//! descriptor set of the peer contract for gRPC server reflection.
use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let signaling = "proto/distributor/v1/signaling.proto";
    let link = "proto/distributor/cluster/v1/link.proto";
    println!("cargo:rerun-if-changed={signaling}");
    println!("cargo:rerun-if-changed={link}");

    let fds = protox::compile([signaling], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("distributor_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    // Small per-stream buffers: see src/codec.rs.
    tonic_prost_build::configure()
        .bytes(".distributor.v1")
        .codec_path("crate::codec::SmallBuffers")
        .compile_fds(fds)?;

    // The link protocol between instances is internal: messages only, not served.
    let fds = protox::compile([link], ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".distributor.cluster.v1")
        .build_client(false)
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
