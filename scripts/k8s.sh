#!/usr/bin/env bash
# The Kubernetes control plane for the operator's end-to-end test bed.
#
#   scripts/k8s.sh build    builds kube-apiserver, kube-controller-manager and kubectl of one
#                           version from the Go module proxy (once; cached by version) and
#                           prints the directory that holds them.
#   scripts/k8s.sh dir      prints that directory without building.
#
# The binaries come from k8s.io/kubernetes at a v1.34 tag. That module cannot be required
# directly: its go.mod points every k8s.io/<staging> module at ./staging/src/..., which a
# module download does not contain. So a throw-away wrapper module requires
# k8s.io/kubernetes and maps each staging module (the list is read from the kubernetes go.mod
# itself) to the published v0.<minor>.<patch> tag of the same release.
#
# Environment:
#   CAIRN_KUBE_VERSION   Kubernetes version to build (default v1.34.4)
#   CAIRN_CACHE_DIR      cache root (default $HOME/.cache/cairn); binaries land in
#                        $CAIRN_CACHE_DIR/kubernetes/<version>/
#   GO                   the go command (default: go on PATH, else /usr/local/go/bin/go)
#
# The first build takes about 5-10 minutes on 2 cores and about 2 GB of memory; later calls
# find the cached binaries and return at once. CI caches the directory printed by `dir`.
set -euo pipefail

VERSION="${CAIRN_KUBE_VERSION:-v1.34.4}"
CACHE_ROOT="${CAIRN_CACHE_DIR:-$HOME/.cache/cairn}"
OUT_DIR="$CACHE_ROOT/kubernetes/$VERSION"
BINARIES=(kube-apiserver kube-controller-manager kubectl)

log() { printf '==> k8s.sh: %s\n' "$*" >&2; }
die() { printf 'k8s.sh: %s\n' "$*" >&2; exit 1; }

have_all() {
  local b
  for b in "${BINARIES[@]}"; do
    [ -x "$OUT_DIR/$b" ] || return 1
  done
}

# find_go
. "$(dirname "${BASH_SOURCE[0]}")/go-tool.sh"

build() {
  if have_all; then
    printf '%s\n' "$OUT_DIR"
    return 0
  fi
  [[ "$VERSION" =~ ^v1\.([0-9]+)\.([0-9]+)$ ]] ||
    die "CAIRN_KUBE_VERSION must look like v1.34.4, got '$VERSION'"
  local minor="${BASH_REMATCH[1]}"
  local staging_version="v0.${BASH_REMATCH[1]}.${BASH_REMATCH[2]}"
  local go
  go="$(find_go)"
  export GOTOOLCHAIN=local GOFLAGS=-mod=mod GO111MODULE=on
  local goversion
  goversion="$("$go" env GOVERSION 2>/dev/null || true)"
  if [[ "$goversion" =~ ^go1\.([0-9]+) ]] && [ "${BASH_REMATCH[1]}" -lt 24 ]; then
    die "Kubernetes $VERSION needs Go >= 1.24; $go is $goversion (install a newer Go from https://go.dev/dl or set GO=...)"
  fi

  # Global, not local: the EXIT trap runs after this function has returned.
  BUILD_DIR="$(mktemp -d "${TMPDIR:-/tmp}/cairn-k8s-build.XXXXXX")"
  trap 'rm -rf "$BUILD_DIR"' EXIT
  local work="$BUILD_DIR"
  cd "$work"
  log "building Kubernetes $VERSION (staging modules $staging_version) in $work"
  local started
  started="$(date +%s)"

  "$go" mod init cairn.dev/kube-bed-wrapper >/dev/null 2>&1

  # The staging list comes from the kubernetes go.mod, fetched through the module proxy.
  local gomod
  gomod="$("$go" mod download -json "k8s.io/kubernetes@$VERSION" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
  [ -f "$gomod" ] || die "could not download the go.mod of k8s.io/kubernetes@$VERSION"
  local staging
  staging="$(sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._/-]*\)[[:space:]]*=>[[:space:]]*\./staging/src/.*#\1#p' "$gomod")"
  [ -n "$staging" ] || die "no staging replace lines found in $gomod"

  {
    printf '\nrequire k8s.io/kubernetes %s\n\n' "$VERSION"
    local m
    for m in $staging; do
      printf 'replace %s => %s %s\n' "$m" "$m" "$staging_version"
    done
  } >>go.mod
  log "$(printf '%s\n' "$staging" | wc -l) staging modules mapped to $staging_version"

  local ldflags=""
  local pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$VERSION"
    ldflags+=" -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done

  # One go command for all three, so shared packages are compiled once.
  mkdir -p bin
  "$go" build -trimpath -ldflags "-s -w$ldflags" -o bin/ \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kubectl

  mkdir -p "$OUT_DIR"
  local b
  for b in "${BINARIES[@]}"; do
    [ -x "bin/$b" ] || die "go build produced no $b"
    # Copy then rename, so a concurrent reader never sees a half-written binary.
    cp "bin/$b" "$OUT_DIR/.$b.tmp"
    mv -f "$OUT_DIR/.$b.tmp" "$OUT_DIR/$b"
  done
  log "built in $(($(date +%s) - started)) s: $("$OUT_DIR/kubectl" version --client 2>/dev/null | head -1)"
  printf '%s\n' "$OUT_DIR"
}

case "${1:-}" in
  build) build ;;
  dir) printf '%s\n' "$OUT_DIR" ;;
  *)
    echo "usage: $0 build|dir" >&2
    exit 2
    ;;
esac
