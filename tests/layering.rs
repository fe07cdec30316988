//! Guards DESIGN.md's module boundaries while every module lives in one crate: each module's
//! sources may not name what its layer must not know.

// Test helpers (harness, clients, parsers) are test code even outside `#[test]` functions,
// where `.clippy.toml`'s allow-*-in-tests does not reach: a failure there should panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::fs;
use std::path::{Path, PathBuf};

fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// Lines of code (comments dropped) of every file under `src/<module>`.
fn code_lines(module: &str) -> Vec<(PathBuf, usize, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(module);
    let files = if root.is_dir() { sources(&root) } else { vec![root.with_extension("rs")] };
    let mut out = Vec::new();
    for f in files {
        for (i, line) in fs::read_to_string(&f).unwrap().lines().enumerate() {
            let code = line.split("//").next().unwrap_or("").to_owned();
            if !code.trim().is_empty() {
                out.push((f.clone(), i + 1, code));
            }
        }
    }
    out
}

fn forbid(module: &str, words: &[&str]) {
    let mut hits = Vec::new();
    for (file, line, code) in code_lines(module) {
        for w in words {
            if code.contains(w) {
                hits.push(format!("{}:{line}: `{w}` in {module}/", file.display()));
            }
        }
    }
    assert!(hits.is_empty(), "layering violations:\n{}", hits.join("\n"));
}

#[test]
fn raft_knows_no_grpc_etcd_types_or_state_machines() {
    forbid(
        "raft",
        &[
            "tonic",
            "cairn_proto",
            "etcdserverpb",
            "crate::grpc",
            "crate::mvcc",
            "crate::server",
            "crate::apply",
            "sled",
        ],
    );
}

#[test]
fn state_machines_speak_domain_types_only() {
    for m in ["mvcc", "storage"] {
        forbid(
            m,
            &[
                "tonic",
                "cairn_proto",
                "crate::raft",
                "crate::grpc",
                "crate::server",
                "crate::apply",
            ],
        );
    }
}

#[test]
fn apply_and_server_hold_no_protocol_code() {
    forbid("apply", &["tonic", "crate::grpc", "crate::server"]);
    forbid("server", &["tonic", "crate::grpc"]);
}

#[test]
fn watch_speaks_mvcc_domain_types_and_knows_no_edge_or_consensus() {
    forbid(
        "watch",
        &[
            "tonic",
            "cairn_proto",
            "etcdserverpb",
            "crate::raft",
            "crate::grpc",
            "crate::server",
            "crate::apply",
            "crate::storage",
        ],
    );
}

#[test]
fn sled_is_named_in_one_file_only() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed = root.join("storage").join("sled.rs");
    for f in sources(&root) {
        if f == allowed {
            continue;
        }
        let text = fs::read_to_string(&f).unwrap();
        // `self::sled::` is the storage module re-exporting SledEngine, not the crate.
        let offending = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .any(|l| l.replace("self::sled::", "").contains("sled::"));
        assert!(!offending, "{} names sled", f.display());
    }
}

#[test]
fn metrics_is_a_leaf_everyone_may_use() {
    forbid("metrics", &["crate::", "tonic", "cairn_proto", "sled"]);
}

#[test]
fn the_gateway_reaches_the_member_through_the_service_impls() {
    forbid("gateway", &["crate::raft", "crate::apply", "crate::mvcc", "crate::storage"]);
}
