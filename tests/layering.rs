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

/// The top-level module names that `code` reaches with `crate::` paths; a grouped import
/// (`use crate::{a, b::{c, d}}`) counts each of its top-level names.
fn crate_names(code: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
    };
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        let Some(group) = rest.strip_prefix('{') else {
            out.push(ident(rest));
            continue;
        };
        let (mut depth, mut start) = (0usize, 0usize);
        for (i, ch) in group.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' if depth > 0 => depth -= 1,
                ',' | '}' if depth == 0 => {
                    out.push(ident(&group[start..i]));
                    start = i + 1;
                    if ch == '}' {
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    out.retain(|n| !n.is_empty());
    out
}

/// Lines of production code under `src/<module>`: [`code_lines`] without the test modules
/// (`#[cfg(test)] mod tests`, which may build real parts directly).
fn production_lines(module: &str) -> Vec<(PathBuf, usize, String)> {
    let mut out: Vec<(PathBuf, usize, String)> = Vec::new();
    let mut in_tests: Option<PathBuf> = None;
    let mut prev = (PathBuf::new(), String::new());
    for (file, line, code) in code_lines(module) {
        if in_tests.as_ref() == Some(&file) {
            continue;
        }
        if prev.0 == file
            && prev.1.trim() == "#[cfg(test)]"
            && code.trim_start().starts_with("mod tests")
        {
            in_tests = Some(file);
            out.pop();
            continue;
        }
        prev = (file.clone(), code.clone());
        out.push((file, line, code));
    }
    out
}

/// The `crate::<module>` names used by the production code of `src/<module>/`, each with
/// its file and line; an import spanning lines counts at its first line.
fn crate_paths(module: &str) -> Vec<(PathBuf, usize, String)> {
    let mut out = Vec::new();
    let mut stmt = String::new();
    let mut at = (PathBuf::new(), 0);
    for (file, line, code) in production_lines(module) {
        if !stmt.is_empty() && at.0 != file {
            out.extend(crate_names(&stmt).into_iter().map(|n| (at.0.clone(), at.1, n)));
            stmt.clear();
        }
        if stmt.is_empty() {
            at = (file.clone(), line);
        }
        stmt.push_str(&code);
        stmt.push(' ');
        // A `use` with an open brace continues on the next line; anything else ends here.
        let t = stmt.trim_start();
        let is_use = t.starts_with("use ")
            || (t.starts_with("pub") && t.split_whitespace().nth(1) == Some("use"));
        if !(is_use && stmt.matches('{').count() > stmt.matches('}').count()) {
            out.extend(crate_names(&stmt).into_iter().map(|n| (at.0.clone(), at.1, n)));
            stmt.clear();
        }
    }
    out.extend(crate_names(&stmt).into_iter().map(|n| (at.0.clone(), at.1, n)));
    out
}

/// Asserts that `src/<module>/` names no crate module outside `allowed`, except the
/// `(file suffix, module)` pairs in `exceptions`.
fn only(module: &str, allowed: &[&str], exceptions: &[(&str, &str)]) {
    let mut hits = Vec::new();
    for (file, line, name) in crate_paths(module) {
        let excepted = exceptions
            .iter()
            .any(|(suffix, m)| *m == name && file.to_string_lossy().ends_with(suffix));
        if !allowed.contains(&name.as_str()) && !excepted {
            hits.push(format!("{}:{line}: `crate::{name}` in {module}/", file.display()));
        }
    }
    assert!(hits.is_empty(), "layering violations:\n{}", hits.join("\n"));
}

#[test]
fn the_edge_speaks_only_to_the_server() {
    // The gRPC services reach the member through `Server`'s typed methods and its error;
    // only the peer port steps raft directly (it implements raft's Transport, DESIGN).
    let peer_raft = [("grpc/peer/transport.rs", "raft"), ("grpc/peer/service.rs", "raft")];
    only("grpc", &["server", "config", "metrics", "grpc"], &peer_raft);
    // The gateway runs the gRPC service impls in-process (DESIGN), and the server.
    only("gateway", &["server", "config", "metrics", "grpc", "gateway"], &[]);
}

#[test]
fn the_layering_guard_sees_plain_grouped_and_nested_paths() {
    assert_eq!(crate_names("let x = crate::mvcc::KvStore::open(e);"), ["mvcc"]);
    assert_eq!(
        crate_names("use crate::{apply, server::{Error, Server}, watch::{self, A}};"),
        ["apply", "server", "watch"]
    );
    assert_eq!(crate_names("use crate::{\n    lease,\n    mvcc::Event,\n};"), ["lease", "mvcc"]);
    assert!(crate_names("use super::status;").is_empty());
    // And it reads the real tree: grpc/ does name the server.
    assert!(crate_paths("grpc").iter().any(|(_, _, n)| n == "server"));
}

#[test]
fn lease_knows_only_storage() {
    // The lessor returns keys and takes key moves; apply translates mvcc's events and
    // answers mvcc's LeaseLookup, so neither state machine imports the other.
    only("lease", &["storage", "metrics", "lease"], &[]);
    forbid("lease", &["crate::mvcc", "crate::apply", "cairn_proto", "tonic"]);
}

#[test]
fn apply_routes_ops_in_one_place() {
    // Every `Op::` variant is matched in the router only; the loop hands whole requests on.
    for (file, line, code) in production_lines("apply") {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        // `Op::` itself, not `TxnOp::` or `RequestOp::`.
        let names_op = code.match_indices("Op::").any(|(at, _)| {
            code[..at].chars().next_back().is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
        });
        if names_op && name != "dispatch.rs" {
            panic!("{}:{line}: an op is matched outside apply/dispatch.rs", file.display());
        }
    }
}
