//! Linearizability of a three-member cluster under faults, checked here.
//!
//! Clients on every member read, write and compare-and-swap a few keys while members are
//! paused (SIGSTOP), killed and cut off from their peers; every operation's call and return
//! times and result are recorded, and [`checker::linearizable`] searches for an order of
//! them that respects real time and explains every result (Wing & Gong's search with
//! Lowe's memoization, as Porcupine and Knossos do). Keys are independent registers, so each
//! key's history is checked on its own. A write or swap whose answer never came (a timeout,
//! a killed member) may have taken effect at any time after its call, or never: it gets an
//! open-ended return time and, for a swap, an unknown outcome.
//!
//! The checker is shown to catch what it exists to catch: a real stale read (serializable,
//! from a member cut off from the leader) makes a history it must reject.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};

use crate::cluster::Cluster;
use crate::harness::Rng;

/// The checker: histories of single registers and the Wing–Gong–Lowe search.
pub mod checker {
    use std::collections::HashSet;

    /// What one operation did to a register (values are non-zero; 0 is "no value").
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Kind {
        /// A read that returned `saw`.
        Read {
            /// The value read.
            saw: u64,
        },
        /// A write of `value` (acknowledged or not).
        Write {
            /// The value written.
            value: u64,
        },
        /// Set `new` if the register holds `expect`; `outcome` is None when no answer came.
        Cas {
            /// The value compared with.
            expect: u64,
            /// The value set on success.
            new: u64,
            /// Whether it succeeded, when known.
            outcome: Option<bool>,
        },
    }

    /// One operation: when it was called, when it returned (`u64::MAX`: never), and what it
    /// did.
    #[derive(Debug, Clone, Copy)]
    pub struct Op {
        /// Call time (any monotonic unit).
        pub call: u64,
        /// Return time, `u64::MAX` when the answer never came.
        pub ret: u64,
        /// The operation and its result.
        pub kind: Kind,
    }

    /// The register's next value after `kind`, or None when `kind`'s result cannot follow
    /// `state`.
    fn step(state: u64, kind: Kind) -> Option<u64> {
        match kind {
            Kind::Read { saw } => (state == saw).then_some(state),
            Kind::Write { value } => Some(value),
            Kind::Cas { expect, new, outcome: Some(true) } => (state == expect).then_some(new),
            Kind::Cas { expect, outcome: Some(false), .. } => (state != expect).then_some(state),
            Kind::Cas { expect, new, outcome: None } => {
                Some(if state == expect { new } else { state })
            }
        }
    }

    const NONE: usize = usize::MAX;

    /// True when some total order of `ops`, in which an operation that returned before
    /// another was called comes first, explains every result starting from `initial`.
    pub fn linearizable(ops: &[Op], initial: u64) -> bool {
        // Events in time order, calls before returns at equal times (overlap is lenient);
        // node 0 is the list head, node k the event events[k - 1].
        let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * ops.len());
        for (i, op) in ops.iter().enumerate() {
            events.push((op.call, false, i));
            events.push((op.ret, true, i));
        }
        events.sort_unstable();
        let len = events.len();
        let mut next: Vec<usize> = (1..=len).chain([NONE]).collect();
        let mut prev: Vec<usize> = [NONE].into_iter().chain(0..len).collect();
        next[len] = NONE;
        let mut return_node = vec![0; ops.len()];
        for (k, (_, is_return, op)) in events.iter().enumerate() {
            if *is_return {
                return_node[*op] = k + 1;
            }
        }
        let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, node: usize| {
            next[prev[node]] = next[node];
            if next[node] != NONE {
                prev[next[node]] = prev[node];
            }
        };
        let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, node: usize| {
            next[prev[node]] = node;
            if next[node] != NONE {
                prev[next[node]] = node;
            }
        };

        let mut linearized = vec![0u64; ops.len().div_ceil(64)];
        let mut seen: HashSet<(Vec<u64>, u64)> = HashSet::new();
        let mut stack: Vec<(usize, u64)> = Vec::new();
        let mut state = initial;
        let mut entry = next[0];
        while next[0] != NONE {
            let (_, is_return, op) = events[entry - 1];
            if !is_return {
                if let Some(after) = step(state, ops[op].kind) {
                    linearized[op / 64] |= 1 << (op % 64);
                    if seen.insert((linearized.clone(), after)) {
                        stack.push((entry, state));
                        state = after;
                        unlink(&mut next, &mut prev, entry);
                        unlink(&mut next, &mut prev, return_node[op]);
                        entry = next[0];
                        continue;
                    }
                    linearized[op / 64] &= !(1 << (op % 64));
                }
                entry = next[entry];
            } else {
                // A pending operation's return: nothing before it can be linearized next.
                let Some((call, before)) = stack.pop() else { return false };
                let op = events[call - 1].2;
                linearized[op / 64] &= !(1 << (op % 64));
                state = before;
                relink(&mut next, &mut prev, return_node[op]);
                relink(&mut next, &mut prev, call);
                entry = next[call];
            }
        }
        true
    }

    #[cfg(test)]
    mod tests {
        use super::{Kind, Op, linearizable};

        fn op(call: u64, ret: u64, kind: Kind) -> Op {
            Op { call, ret, kind }
        }
        fn w(value: u64) -> Kind {
            Kind::Write { value }
        }
        fn r(saw: u64) -> Kind {
            Kind::Read { saw }
        }

        #[test]
        fn a_sequential_history_is_linearizable_and_a_stale_read_is_not() {
            let ok = [op(0, 1, w(1)), op(2, 3, r(1)), op(4, 5, w(2)), op(6, 7, r(2))];
            assert!(linearizable(&ok, 0));
            let stale = [op(0, 1, w(1)), op(2, 3, w(2)), op(4, 5, r(1))];
            assert!(!linearizable(&stale, 0));
            assert!(!linearizable(&[op(0, 1, r(7))], 0), "a value nobody wrote");
        }

        #[test]
        fn overlapping_operations_may_take_effect_in_either_order() {
            // The read overlaps both writes: 1 or 2 are fine, the initial 0 is not once the
            // first write returned before the read began.
            let h = |saw| [op(0, 10, w(1)), op(5, 20, w(2)), op(8, 30, r(saw))];
            assert!(linearizable(&h(1), 0));
            assert!(linearizable(&h(2), 0));
            assert!(linearizable(&h(0), 0));
            let after = |saw| [op(0, 1, w(1)), op(5, 20, w(2)), op(8, 30, r(saw))];
            assert!(!linearizable(&after(0), 0));
            // Reads that see 2 then 1 while no write is pending contradict each other.
            let flip = [op(0, 1, w(1)), op(2, 3, w(2)), op(4, 5, r(2)), op(6, 7, r(1))];
            assert!(!linearizable(&flip, 0));
        }

        #[test]
        fn swaps_succeed_only_on_the_expected_value_and_unknown_outcomes_may_go_either_way() {
            let cas = |expect, new, outcome| Kind::Cas { expect, new, outcome };
            let good = [op(0, 1, w(1)), op(2, 3, cas(1, 5, Some(true))), op(4, 5, r(5))];
            assert!(linearizable(&good, 0));
            let bad = [op(0, 1, w(1)), op(2, 3, cas(2, 5, Some(true)))];
            assert!(!linearizable(&bad, 0));
            let failed = [op(0, 1, w(1)), op(2, 3, cas(1, 5, Some(false)))];
            assert!(!linearizable(&failed, 0));
            // A swap and a write that never answered: took effect, or not.
            for saw in [1, 5] {
                let h = [op(0, 1, w(1)), op(2, u64::MAX, cas(1, 5, None)), op(4, 5, r(saw))];
                assert!(linearizable(&h, 0), "saw {saw}");
            }
            let lost = [op(0, 1, w(1)), op(2, u64::MAX, w(9)), op(4, 5, r(9)), op(6, 7, r(1))];
            assert!(!linearizable(&lost, 0), "an unanswered write cannot be undone");
        }

        #[test]
        fn a_long_concurrent_history_is_checked_quickly_enough() {
            // 8 clients, 4000 operations, every read sees the last write.
            let mut ops = Vec::new();
            let mut last = 0;
            for i in 0..4000u64 {
                let t = i * 10;
                if i % 3 == 0 {
                    last = i + 1;
                    ops.push(op(t, t + 35, w(last)));
                } else {
                    ops.push(op(t + 30, t + 60, r(last)));
                }
            }
            assert!(linearizable(&ops, 0));
        }
    }
}

use checker::{Kind, Op};

/// Keys in the workload; each is one register.
const KEYS: u64 = 4;
/// How long a client waits for an answer before the operation counts as unanswered.
const OP_TIMEOUT: Duration = Duration::from_secs(2);

pub type History = Arc<Mutex<Vec<(u64, Op)>>>;

fn key(k: u64) -> String {
    format!("lin/{k}")
}

fn nanos(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap()
}

/// The value a response carried for the key (0 when absent).
fn value_of(resp: &etcd_client::GetResponse) -> u64 {
    resp.kvs().first().map_or(0, |kv| kv.value_str().unwrap().parse().unwrap())
}

/// One client on one member: random reads (linearizable), writes of unique values and
/// swaps from the last value it saw, recorded with their times until `stop`.
pub async fn client(endpoint: String, id: u64, start: Instant, stop: Arc<AtomicBool>, h: History) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (id << 17) ^ id);
    let mut seq = 0u64;
    let mut last_seen: HashMap<u64, u64> = HashMap::new();
    let mut c = None;
    while !stop.load(Ordering::Relaxed) {
        let Some(cl) = c.as_mut() else {
            let opts = etcd_client::ConnectOptions::new().with_timeout(OP_TIMEOUT);
            c = Client::connect([endpoint.as_str()], Some(opts)).await.ok();
            if c.is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            continue;
        };
        let k = rng.next() % KEYS;
        seq += 1;
        let value = (id << 32) | seq;
        let call = nanos(start);
        let op = match rng.next() % 3 {
            0 => match tokio::time::timeout(OP_TIMEOUT, cl.get(key(k), None)).await {
                Ok(Ok(resp)) => {
                    let saw = value_of(&resp);
                    last_seen.insert(k, saw);
                    Some(Op { call, ret: nanos(start), kind: Kind::Read { saw } })
                }
                _ => {
                    // A read without an answer changed nothing; the member is down or cut off.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    None
                }
            },
            1 => {
                let answer =
                    tokio::time::timeout(OP_TIMEOUT, cl.put(key(k), value.to_string(), None));
                let ret = match answer.await {
                    Ok(Ok(_)) => {
                        last_seen.insert(k, value);
                        nanos(start)
                    }
                    _ => u64::MAX,
                };
                Some(Op { call, ret, kind: Kind::Write { value } })
            }
            _ => {
                let expect = last_seen.get(&k).copied().unwrap_or(0);
                let compare = if expect == 0 {
                    Compare::version(key(k), CompareOp::Equal, 0)
                } else {
                    Compare::value(key(k), CompareOp::Equal, expect.to_string())
                };
                let txn = Txn::new().when([compare]).and_then([TxnOp::put(
                    key(k),
                    value.to_string(),
                    None,
                )]);
                match tokio::time::timeout(OP_TIMEOUT, cl.txn(txn)).await {
                    Ok(Ok(resp)) => {
                        if resp.succeeded() {
                            last_seen.insert(k, value);
                        }
                        let outcome = Some(resp.succeeded());
                        let kind = Kind::Cas { expect, new: value, outcome };
                        Some(Op { call, ret: nanos(start), kind })
                    }
                    _ => {
                        let kind = Kind::Cas { expect, new: value, outcome: None };
                        Some(Op { call, ret: u64::MAX, kind })
                    }
                }
            }
        };
        if let Some(op) = op {
            let unanswered = op.ret == u64::MAX;
            h.lock().unwrap().push((k, op));
            if unanswered {
                // The member is down or cut off: do not pile up unanswered operations.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Drops unanswered operations that cannot matter, which keeps the search small.
///
/// An unanswered write or swap may be linearized at the very end, where it changes nothing
/// anyone saw; it can only be needed to explain a read or a swap expectation of its value,
/// or a failed swap called after it. Without any of those, the history is linearizable with
/// it exactly when it is without it.
fn prune(ops: Vec<Op>) -> Vec<Op> {
    let observed: std::collections::HashSet<u64> = ops
        .iter()
        .filter_map(|op| match op.kind {
            Kind::Read { saw } => Some(saw),
            Kind::Cas { expect, .. } => Some(expect),
            Kind::Write { .. } => None,
        })
        .collect();
    let failed_swaps: Vec<u64> = ops
        .iter()
        .filter(|op| matches!(op.kind, Kind::Cas { outcome: Some(false), .. }))
        .map(|op| op.call)
        .collect();
    ops.iter()
        .filter(|op| {
            let value = match op.kind {
                _ if op.ret != u64::MAX => return true,
                Kind::Write { value } | Kind::Cas { new: value, .. } => value,
                Kind::Read { .. } => return true,
            };
            observed.contains(&value) || failed_swaps.iter().any(|&t| t > op.call)
        })
        .copied()
        .collect()
}

/// Checks every key's history; returns how many operations were answered.
pub fn check(history: &[(u64, Op)]) -> usize {
    for k in 0..KEYS {
        let ops: Vec<Op> = history.iter().filter(|(key, _)| *key == k).map(|(_, op)| *op).collect();
        let ops = prune(ops);
        if !checker::linearizable(&ops, 0) {
            let path =
                std::env::temp_dir().join(format!("cairn-lin-{}-key{k}.txt", std::process::id()));
            let text: Vec<String> = ops.iter().map(|op| format!("{op:?}")).collect();
            std::fs::write(&path, text.join("\n")).unwrap();
            panic!(
                "key {k}: {} operations not linearizable; history in {}",
                ops.len(),
                path.display()
            );
        }
    }
    history.iter().filter(|(_, op)| op.ret != u64::MAX).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_writes_and_swaps_stay_linearizable_while_members_are_paused_killed_and_cut_off() {
    let mut cluster = Cluster::start_with(3, &[], true).await;
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let history: History = Arc::default();
    let clients: Vec<_> = (0..9u64)
        .map(|id| {
            let endpoint = cluster.members[usize::try_from(id % 3).unwrap()].client_url.clone();
            tokio::spawn(client(endpoint, id + 1, start, stop.clone(), history.clone()))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The leader freezes (SIGSTOP) long enough for the others to elect, then thaws as a
    // stale leader that must step down.
    let leader = cluster.leader().await;
    cluster.members[leader].signal("STOP");
    tokio::time::sleep(Duration::from_millis(3000)).await;
    cluster.members[leader].signal("CONT");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The new leader is killed and comes back.
    let leader = cluster.leader().await;
    cluster.members[leader].kill9();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    cluster.members[leader].spawn().await;
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // The leader is cut off from its peers, then healed.
    let leader = cluster.leader().await;
    cluster.proxies[leader].block();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    cluster.proxies[leader].heal();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let history = history.lock().unwrap().clone();
    let answered = check(&history);
    eprintln!(
        "LINEARIZABILITY: {} operations, {answered} answered, all linearizable",
        history.len()
    );
    assert!(answered > 200, "the workload made too little progress: {answered}");
    cluster.assert_hashes_equal().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_rejects_a_real_stale_read_from_a_member_cut_off_from_the_leader() {
    let mut cluster = Cluster::start_with(3, &[], true).await;
    let leader = cluster.leader().await;
    let cut = (leader + 1) % 3;
    let start = Instant::now();
    let mut writer = cluster.members[leader].client().await;
    let mut reader = cluster.members[cut].client().await;
    let serializable = || Some(GetOptions::new().with_serializable());
    let mut ops = Vec::new();

    let call = nanos(start);
    writer.put(key(0), "1", None).await.unwrap();
    ops.push(Op { call, ret: nanos(start), kind: Kind::Write { value: 1 } });
    // The member has the first write before it is cut off.
    let deadline = Instant::now() + Duration::from_secs(10);
    while value_of(&reader.get(key(0), serializable()).await.unwrap()) != 1 {
        assert!(Instant::now() < deadline, "the member never caught up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.proxies[cut].block();
    let call = nanos(start);
    writer.put(key(0), "2", None).await.unwrap();
    ops.push(Op { call, ret: nanos(start), kind: Kind::Write { value: 2 } });
    assert!(checker::linearizable(&ops, 0));

    // A serializable read answers from the cut-off member's own, now stale, state.
    let call = nanos(start);
    let saw = value_of(&reader.get(key(0), serializable()).await.unwrap());
    ops.push(Op { call, ret: nanos(start), kind: Kind::Read { saw } });
    assert_eq!(saw, 1, "the cut-off member should still hold the old value");
    assert!(!checker::linearizable(&ops, 0), "the checker missed a stale read");

    // A linearizable read there cannot answer stale: it fails or waits, never says 1.
    let lin = tokio::time::timeout(Duration::from_secs(3), reader.get(key(0), None)).await;
    if let Ok(Ok(resp)) = lin {
        assert_eq!(value_of(&resp), 2, "a linearizable read answered stale");
    }
    cluster.proxies[cut].heal();
}
