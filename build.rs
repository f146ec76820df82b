//! Compiles the link protocol between instances (internal to the server: messages only, not
//! served) with `protox`, no system `protoc` needed. The peer contract is the crate
//! `distributor-proto`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let link = "proto/distributor/cluster/v1/link.proto";
    println!("cargo:rerun-if-changed={link}");
    let fds = protox::compile([link], ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".distributor.cluster.v1")
        .build_client(false)
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
