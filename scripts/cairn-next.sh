#!/usr/bin/env bash
# The second build of `cairn` for the operator's rolling-upgrade test
# (operator/tests/e2e/upgrade.rs): the same sources compiled with CAIRN_BUILD_VERSION=0.2.0,
# so it reports 0.2.0 in `cairn --version` and in its cairn_build_info metric while the
# normal build reports the crate's version. The test bed runs image `cairn:0.2.0` with it.
#
#   scripts/cairn-next.sh   builds it when its inputs changed, else finds the cached copy,
#                           and prints its path: $CARGO_TARGET_DIR/debug/cairn-0.2.0/cairn
#                           (where the e2e harness looks; CAIRN_BIN_NEXT points it elsewhere).
#                           The file is named `cairn`: the bed's kubelet runs a container's
#                           `command: [cairn]` with the image's binary only when the names match.
#
# How: the version is an option_env! in the cairn library, which cargo tracks, so changing it
# recompiles only the cairn crate (library and binary), never a dependency. The binary is
# built with the variable set, copied out, then built again without it (a few seconds:
# incremental), so target/debug/cairn is the normal build when this returns. `--examples`
# (the workspace has none) turns the dev-dependencies' features on as scripts/test.sh's
# `cargo build --workspace --bins --tests` does, so tokio, hyper, tonic and the rest are
# shared with that build; a few build-script crates and raft and cairn-proto above them
# resolve differently and get builds of their own the first time (about 30 s, once), and the
# cairn units are distinct from the normal build's, which this never invalidates.
#
# Cache: a hash of everything the binary is built from (the toolchain, Cargo.toml,
# Cargo.lock, src/, proto/, RUSTFLAGS) is kept next to the copy; when it matches, nothing is
# built.
set -euo pipefail
cd "$(dirname "$0")/.."

NEXT_VERSION=0.2.0
TARGET="${CARGO_TARGET_DIR:-target}"
case "$TARGET" in /*) ;; *) TARGET="$(pwd)/$TARGET" ;; esac
OUT_DIR="$TARGET/debug/cairn-$NEXT_VERSION"
OUT="$OUT_DIR/cairn"

log() { printf '==> cairn-next.sh: %s\n' "$*" >&2; }

key="$(
  {
    rustc -vV
    printf 'RUSTFLAGS=%s\n' "${RUSTFLAGS:-}"
    find Cargo.toml Cargo.lock src proto -type f -print0 | sort -z | xargs -0 sha256sum
  } | sha256sum | cut -d' ' -f1
)"
if [ -x "$OUT" ] && [ "$(cat "$OUT.key" 2>/dev/null)" = "$key" ]; then
  log "cached $OUT"
  echo "$OUT"
  exit 0
fi

select=(--workspace --bin cairn --examples --locked)
started=$SECONDS
log "building cairn $NEXT_VERSION (CAIRN_BUILD_VERSION=$NEXT_VERSION)"
CAIRN_BUILD_VERSION="$NEXT_VERSION" cargo build "${select[@]}" >&2
mkdir -p "$OUT_DIR"
cp "$TARGET/debug/cairn" "$OUT.tmp"
reported="$("$OUT.tmp" --version | sed -n 's/^cairn Version: //p')"
if [ "$reported" != "$NEXT_VERSION" ]; then
  echo "cairn-next.sh: the build reports version '$reported', not $NEXT_VERSION" >&2
  exit 1
fi
log "rebuilding the normal cairn"
env -u CAIRN_BUILD_VERSION cargo build "${select[@]}" >&2
mv "$OUT.tmp" "$OUT"
echo "$key" >"$OUT.key"
log "built $OUT in $((SECONDS - started)) s (both builds)"
echo "$OUT"
