//! The leader's lease clock: deadlines, renewals and the expiry queue.
//!
//! Only the leader counts time (etcd lessor.go Promote/Demote). When a member becomes
//! leader, every lease starts from its checkpointed remaining TTL (or its full TTL); when it
//! stops leading, all deadlines are dropped. Expired leases are handed out for the server to
//! revoke through raft; until the revoke applies they stay known but count as expired, so a
//! keep-alive cannot resurrect them, and the revoke is retried if it does not apply in time.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use super::{LeaseId, Lessor};

/// How long an expired lease waits before its revoke is proposed again (etcd's
/// `expiredLeaseRetryInterval`).
const REVOKE_RETRY: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy)]
struct Clock {
    deadline: Instant,
    ttl: i64,
    /// Handed out for revocation; renewals no longer apply.
    expired: bool,
}

/// Deadlines of every lease while this member leads.
#[derive(Debug, Default)]
pub struct LeaderClock {
    leading: bool,
    clocks: HashMap<LeaseId, Clock>,
    /// Min-heap of (deadline, id); entries whose deadline no longer matches are stale.
    heap: BinaryHeap<Reverse<(Instant, LeaseId)>>,
}

fn secs(ttl: i64) -> Duration {
    Duration::from_secs(u64::try_from(ttl).unwrap_or(0))
}

impl LeaderClock {
    /// Creates an idle clock (not leading).
    pub fn new() -> Self {
        Self::default()
    }

    /// True while this member counts time.
    pub fn leading(&self) -> bool {
        self.leading
    }

    fn start(&mut self, id: LeaseId, ttl: i64, remaining: i64, now: Instant) {
        let left = if remaining > 0 { remaining.min(ttl) } else { ttl };
        let deadline = now + secs(left);
        self.clocks.insert(id, Clock { deadline, ttl, expired: false });
        self.heap.push(Reverse((deadline, id)));
    }

    /// Brings the clock in line with leadership and with the lessor's grants and revokes.
    pub fn sync(&mut self, lessor: &Lessor, is_leader: bool, now: Instant) {
        let (fresh, gone) = lessor.take_changes();
        if is_leader && !self.leading {
            // Promotion: every lease counts from its checkpoint, never from zero.
            self.leading = true;
            self.clocks.clear();
            self.heap.clear();
            for (id, ttl, remaining) in lessor.snapshot_ttls() {
                self.start(id, ttl, remaining, now);
            }
            return;
        }
        if !is_leader {
            if self.leading {
                self.leading = false;
                self.clocks.clear();
                self.heap.clear();
            }
            return;
        }
        for id in gone {
            self.clocks.remove(&id);
        }
        for id in fresh {
            if let Some(info) = lessor.get(id) {
                self.start(id, info.ttl, info.remaining, now);
            }
        }
    }

    /// Renews lease `id` to its full TTL; returns the TTL, or `None` when the lease is
    /// unknown, expired, or this member does not lead.
    pub fn renew(&mut self, id: LeaseId, now: Instant) -> Option<i64> {
        if !self.leading {
            return None;
        }
        let c = self.clocks.get_mut(&id)?;
        if c.expired || c.deadline <= now {
            return None;
        }
        c.deadline = now + secs(c.ttl);
        self.heap.push(Reverse((c.deadline, id)));
        Some(c.ttl)
    }

    /// Time left on lease `id`, when this member leads and knows it.
    pub fn remaining(&self, id: LeaseId, now: Instant) -> Option<Duration> {
        let c = self.clocks.get(&id)?;
        if c.expired {
            return Some(Duration::ZERO);
        }
        Some(c.deadline.saturating_duration_since(now))
    }

    /// Pops up to `limit` leases whose deadline passed, marking them expired and scheduling
    /// a retry in case their revoke does not apply.
    pub fn expired(&mut self, now: Instant, limit: usize) -> Vec<LeaseId> {
        let mut out = Vec::new();
        while out.len() < limit {
            let Some(Reverse((deadline, id))) = self.heap.peek().copied() else { break };
            if deadline > now {
                break;
            }
            self.heap.pop();
            let Some(c) = self.clocks.get_mut(&id) else { continue };
            if c.deadline != deadline {
                continue; // stale heap entry: renewed since
            }
            c.expired = true;
            c.deadline = now + REVOKE_RETRY;
            self.heap.push(Reverse((c.deadline, id)));
            out.push(id);
        }
        out
    }

    /// The remaining TTL of every live lease with at least `min_left` left, as
    /// `(id, seconds)` rounded up (a checkpoint must never shorten a lease). Leases that
    /// expire sooner need no checkpoint: they end before the next round matters.
    pub fn checkpoints(&self, now: Instant, min_left: Duration) -> Vec<(LeaseId, i64)> {
        self.clocks
            .iter()
            .filter(|(_, c)| !c.expired)
            .filter_map(|(id, c)| {
                let left = c.deadline.saturating_duration_since(now);
                if left < min_left {
                    return None;
                }
                let up = left.as_secs() + u64::from(left.subsec_nanos() > 0);
                Some((*id, i64::try_from(up).unwrap_or(c.ttl).min(c.ttl)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Batch, MemEngine};

    fn lessor_with(leases: &[(LeaseId, i64)]) -> Lessor {
        let l = Lessor::open(&MemEngine::new(), 1).unwrap();
        let mut b = Batch::new();
        for (id, ttl) in leases {
            l.grant(*id, *ttl, &mut b).unwrap();
        }
        l
    }

    #[test]
    fn only_the_leader_counts_and_expiry_follows_renewals() {
        let l = lessor_with(&[(1, 10), (2, 20)]);
        let mut c = LeaderClock::new();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        c.sync(&l, false, t0);
        assert_eq!(c.renew(1, t0), None, "followers do not renew");
        c.sync(&l, true, t0);
        assert!(c.expired(at(9_000), 10).is_empty());
        assert_eq!(c.renew(1, at(9_000)), Some(10));
        assert!(c.expired(at(15_000), 10).is_empty());
        assert_eq!(c.expired(at(19_500), 10), vec![1]);
        assert_eq!(c.renew(2, at(19_500)), Some(20));
        assert!(c.expired(at(21_000), 10).is_empty());
        assert_eq!(c.renew(1, at(21_000)), None, "an expired lease stays expired");
        assert_eq!(c.expired(at(22_500), 10), vec![1], "its revoke is retried");
    }

    #[test]
    fn promotion_starts_from_checkpoints_and_revoke_retries() {
        let l = lessor_with(&[(1, 100)]);
        let mut b = Batch::new();
        l.checkpoint(1, 30, &mut b);
        let mut c = LeaderClock::new();
        let t0 = Instant::now();
        c.sync(&l, true, t0);
        let left = c.remaining(1, t0).unwrap();
        assert_eq!(left, Duration::from_secs(30));
        assert_eq!(c.expired(t0 + Duration::from_secs(31), 10), vec![1]);
        assert!(c.expired(t0 + Duration::from_secs(32), 10).is_empty());
        assert_eq!(c.expired(t0 + Duration::from_secs(35), 10), vec![1], "retried after 3 s");
    }

    #[test]
    fn checkpoints_cover_long_leases_and_round_up() {
        let l = lessor_with(&[(1, 100), (2, 5)]);
        let mut c = LeaderClock::new();
        let t0 = Instant::now();
        c.sync(&l, true, t0);
        let got = c.checkpoints(t0 + Duration::from_millis(10_500), Duration::from_secs(10));
        assert_eq!(got, vec![(1, 90)], "short leases are skipped; 89.5 s rounds up");
    }
}
