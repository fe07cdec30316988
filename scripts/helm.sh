#!/usr/bin/env bash
# Go-built tools the chart checks need, from the Go module proxy, cached by version outside the
# repo (the same scheme as scripts/k8s.sh).
#
#   scripts/helm.sh build            builds helm (helm.sh/helm/v4) once and prints its directory.
#   scripts/helm.sh dir              prints that directory without building.
#   scripts/helm.sh build-promtool   builds promtool (github.com/prometheus/prometheus) once and
#                                    prints its directory. Optional: a large build (see README).
#   scripts/helm.sh promtool-dir     prints promtool's directory without building.
#
# Environment:
#   CAIRN_HELM_VERSION      helm version (default v4.3.2)
#   CAIRN_PROMTOOL_VERSION  prometheus module version (default v0.316.0, i.e. Prometheus 3.16)
#   CAIRN_CACHE_DIR         cache root (default $HOME/.cache/cairn); binaries land in
#                           $CAIRN_CACHE_DIR/helm/<version>/ and $CAIRN_CACHE_DIR/promtool/<version>/
#   GO                      the go command (default: go on PATH, else /usr/local/go/bin/go)
#
# Each tool is built in a throw-away wrapper module that requires the tool's module at the
# named version, so the versions of everything below it are the ones the tool's go.mod pins.
set -euo pipefail

HELM_VERSION="${CAIRN_HELM_VERSION:-v4.3.2}"
PROMTOOL_VERSION="${CAIRN_PROMTOOL_VERSION:-v0.316.0}"
CACHE_ROOT="${CAIRN_CACHE_DIR:-$HOME/.cache/cairn}"
HELM_DIR="$CACHE_ROOT/helm/$HELM_VERSION"
PROMTOOL_DIR="$CACHE_ROOT/promtool/$PROMTOOL_VERSION"

log() { printf '==> helm.sh: %s\n' "$*" >&2; }
die() { printf 'helm.sh: %s\n' "$*" >&2; exit 1; }

# find_go
. "$(dirname "${BASH_SOURCE[0]}")/go-tool.sh"

# go_build MODULE VERSION PACKAGE BINARY OUT_DIR [LDFLAGS]: builds PACKAGE of MODULE@VERSION
# into OUT_DIR/BINARY unless it is there already, and prints OUT_DIR.
go_build() {
  local module="$1" version="$2" package="$3" binary="$4" out_dir="$5" ldflags="${6:-}"
  if [ -x "$out_dir/$binary" ]; then
    printf '%s\n' "$out_dir"
    return 0
  fi
  [[ "$version" =~ ^v[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "version must look like v1.2.3, got '$version'"
  local go
  go="$(find_go)"
  export GOTOOLCHAIN=local GOFLAGS=-mod=mod GO111MODULE=on
  # Global, not local: the EXIT trap runs after this function has returned.
  BUILD_DIR="$(mktemp -d "${TMPDIR:-/tmp}/cairn-$binary-build.XXXXXX")"
  trap 'rm -rf "$BUILD_DIR"' EXIT
  cd "$BUILD_DIR"
  log "building $binary from $module@$version in $BUILD_DIR"
  local started
  started="$(date +%s)"
  "$go" mod init "cairn.dev/$binary-wrapper" >/dev/null 2>&1
  printf '\nrequire %s %s\n' "$module" "$version" >>go.mod
  mkdir -p bin
  "$go" build -trimpath -ldflags "-s -w $ldflags" -o "bin/$binary" "$package"
  [ -x "bin/$binary" ] || die "go build produced no $binary"
  mkdir -p "$out_dir"
  # Copy then rename, so a concurrent reader never sees a half-written binary.
  cp "bin/$binary" "$out_dir/.$binary.tmp"
  mv -f "$out_dir/.$binary.tmp" "$out_dir/$binary"
  log "built $binary in $(($(date +%s) - started)) s"
  printf '%s\n' "$out_dir"
}

case "${1:-}" in
  build)
    # helm prints this version (`helm version`); charts with kubeVersion constraints need the
    # Kubernetes version it assumes offline to be a real one.
    go_build helm.sh/helm/v4 "$HELM_VERSION" helm.sh/helm/v4/cmd/helm helm "$HELM_DIR" \
      "-X helm.sh/helm/v4/internal/version.version=$HELM_VERSION"
    ;;
  dir) printf '%s\n' "$HELM_DIR" ;;
  build-promtool)
    go_build github.com/prometheus/prometheus "$PROMTOOL_VERSION" \
      github.com/prometheus/prometheus/cmd/promtool promtool "$PROMTOOL_DIR"
    ;;
  promtool-dir) printf '%s\n' "$PROMTOOL_DIR" ;;
  *)
    echo "usage: $0 build|dir|build-promtool|promtool-dir" >&2
    exit 2
    ;;
esac
