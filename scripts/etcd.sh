#!/usr/bin/env bash
# The reference etcd of the benchmarks (scripts/bench-vs-etcd.sh), built from the Go module
# proxy and cached by version outside the repo (the same scheme as scripts/k8s.sh and helm.sh).
#
#   scripts/etcd.sh build   builds etcd once and prints the path of the binary.
#   scripts/etcd.sh path    prints that path without building.
#
# Environment:
#   CAIRN_ETCD_VERSION   etcd server module version (default v3.6.17, the newest 3.6 release the
#                        proxy served in December 2026)
#   CAIRN_CACHE_DIR      cache root (default $HOME/.cache/cairn); the binary lands in
#                        $CAIRN_CACHE_DIR/etcd/<version>/etcd
#   GO                   the go command (default: go on PATH, else /usr/local/go/bin/go)
#
# etcd's own main package lives in its monorepo's root module, whose go.mod points every
# go.etcd.io/etcd/* module at ../ directories, so it cannot be built from the proxy directly.
# A throw-away wrapper module requires go.etcd.io/etcd/server/v3 at the named version and its
# main calls etcdmain.Main(os.Args), which is all etcd's main.go does. The versions of
# everything below come from the server module's go.mod. The first build takes about 3-6
# minutes on 2 cores.
set -euo pipefail

VERSION="${CAIRN_ETCD_VERSION:-v3.6.17}"
CACHE_ROOT="${CAIRN_CACHE_DIR:-$HOME/.cache/cairn}"
OUT_DIR="$CACHE_ROOT/etcd/$VERSION"

log() { printf '==> etcd.sh: %s\n' "$*" >&2; }
die() { printf 'etcd.sh: %s\n' "$*" >&2; exit 1; }

# find_go
. "$(dirname "${BASH_SOURCE[0]}")/go-tool.sh"

build() {
  if [ -x "$OUT_DIR/etcd" ]; then
    printf '%s\n' "$OUT_DIR/etcd"
    return 0
  fi
  [[ "$VERSION" =~ ^v3\.[0-9]+\.[0-9]+$ ]] || die "CAIRN_ETCD_VERSION must look like v3.6.17, got '$VERSION'"
  local go
  go="$(find_go)"
  export GOTOOLCHAIN=local GOFLAGS=-mod=mod GO111MODULE=on CGO_ENABLED=0
  # Global, not local: the EXIT trap runs after this function has returned.
  BUILD_DIR="$(mktemp -d "${TMPDIR:-/tmp}/cairn-etcd-build.XXXXXX")"
  trap 'rm -rf "$BUILD_DIR"' EXIT
  cd "$BUILD_DIR"
  log "building etcd $VERSION in $BUILD_DIR"
  local started
  started="$(date +%s)"
  "$go" mod init cairn.dev/etcd-wrapper >/dev/null 2>&1
  printf '\nrequire go.etcd.io/etcd/server/v3 %s\n' "$VERSION" >>go.mod
  cat >main.go <<'EOF'
// Command etcd is etcd's server, as etcd's own main.go builds it.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
EOF
  "$go" mod tidy >/dev/null
  mkdir -p bin
  "$go" build -trimpath -ldflags "-s -w" -o bin/etcd .
  [ -x bin/etcd ] || die "go build produced no etcd"
  mkdir -p "$OUT_DIR"
  # Copy then rename, so a concurrent reader never sees a half-written binary.
  cp bin/etcd "$OUT_DIR/.etcd.tmp"
  mv -f "$OUT_DIR/.etcd.tmp" "$OUT_DIR/etcd"
  log "built in $(($(date +%s) - started)) s: $("$OUT_DIR/etcd" --version | head -1)"
  printf '%s\n' "$OUT_DIR/etcd"
}

case "${1:-}" in
  build) build ;;
  path) printf '%s\n' "$OUT_DIR/etcd" ;;
  *)
    echo "usage: $0 build|path" >&2
    exit 2
    ;;
esac
