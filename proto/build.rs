//! Compiles etcd's wire protos and Cairn's internal protos with `protox` (pure Rust, so no
//! system `protoc` is needed) and generates prost messages plus tonic clients and servers.

use std::path::PathBuf;

/// The .proto files compiled into this crate, relative to the include roots.
const FILES: &[&str] = &[
    "etcdserverpb/rpc.proto",
    "mvccpb/kv.proto",
    "authpb/auth.proto",
    "v3lockpb/v3lock.proto",
    "v3electionpb/v3election.proto",
    "internal/request.proto",
    "internal/peer.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let includes = [root.join("etcd"), root.clone()];
    for dir in &includes {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    let fds = protox::compile(FILES, includes)?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}
