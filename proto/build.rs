//! Compiles etcd's wire protos and Cairn's internal protos with `protox` (pure Rust, so no
//! system `protoc` is needed) and generates prost messages plus tonic clients and servers.
//!
//! With the `json` feature it also generates protojson serde impls (pbjson) for the etcd
//! packages, configured as etcd's HTTP gateway marshals (grpc-gateway with protojson
//! `UseProtoNames` and `DiscardUnknown`): proto field names on output, both proto and
//! lowerCamel names accepted on input, unknown fields ignored, 64-bit integers as strings,
//! bytes as base64, enums as names, zero values omitted.

use std::path::PathBuf;

use prost::Message as _;

/// The .proto files compiled into this crate, relative to the include roots.
const FILES: &[&str] = &[
    "etcdserverpb/rpc.proto",
    "mvccpb/kv.proto",
    "authpb/auth.proto",
    "v3lockpb/v3lock.proto",
    "v3electionpb/v3election.proto",
    "internal/request.proto",
    "internal/peer.proto",
    "grpc/health/v1/health.proto",
];

/// The proto packages that get protojson impls: etcd's public API, never Cairn's internals.
const JSON_PACKAGES: &[&str] =
    &[".etcdserverpb", ".mvccpb", ".authpb", ".v3lockpb", ".v3electionpb"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let includes = [root.join("etcd"), root.clone()];
    for dir in &includes {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    let fds = protox::compile(FILES, includes)?;
    if std::env::var_os("CARGO_FEATURE_JSON").is_some() {
        pbjson_build::Builder::new()
            .register_descriptors(&fds.encode_to_vec())?
            .preserve_proto_field_names()
            .ignore_unknown_fields()
            .build(JSON_PACKAGES)?;
    }
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}
