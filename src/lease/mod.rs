//! Leases: the lessor's replicated state (which leases exist, their granted TTL, the
//! checkpointed remaining TTL, which keys are attached) and the leader-only expiry clock.
//!
//! Two halves with different rules:
//! - **Replicated state**, changed only by apply ([`Lessor::grant`], [`Lessor::revoke`],
//!   [`Lessor::checkpoint`], [`Lessor::observe`]): deterministic, no clock. Grants and
//!   checkpoints are persisted in `Keyspace::Lease` inside apply's atomic batch; attached
//!   keys are derived from mvcc (the `lease` field of live keys) and rebuilt at start.
//! - **Leader clock** ([`queue`]): deadlines exist only on the leader. It renews on
//!   keep-alive, finds expired leases and hands their ids out, so the server *proposes*
//!   their revocation through raft; a member never revokes on its own (ETCD-COMPAT.md §6.7).
//!
//! A lease never deletes keys itself: [`Lessor::revoke`] returns the attached keys and apply
//! deletes them in one revision (etcd's `RangeDeleter` spirit).
//!
//! TTL semantics (etcd server/lease/lessor.go): a TTL below the minimum (1.5 election
//! timeouts, rounded up to seconds) is raised to it; above [`MAX_LEASE_TTL`] it is refused.
//! The remaining TTL checkpointed through raft (`remaining`, 0 = the full TTL) is what a new
//! leader or a restarted member starts counting from, so neither hands every lease a fresh
//! TTL; a renewal resets it to 0 through raft before it is acknowledged, so a restart never
//! shortens a renewed lease either.

pub mod queue;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::storage::{Batch, Engine, Keyspace, Scan};

/// A lease id; 0 means "no lease".
pub type LeaseId = i64;

/// etcd's `MaxLeaseTTL`: 9,000,000,000 seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// Errors of the lessor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The lease does not exist.
    #[error("requested lease not found")]
    NotFound,
    /// A grant named an id that exists.
    #[error("lease already exists")]
    Exists,
    /// A grant asked for more than [`MAX_LEASE_TTL`].
    #[error("too large lease TTL")]
    TtlTooLarge,
    /// A grant asked for id 0 (the server must pick one before proposing).
    #[error("lease id 0 is reserved")]
    ZeroId,
    /// Stored lease data could not be decoded.
    #[error("corrupt lease record: {0}")]
    Corrupt(String),
    /// Storage failed.
    #[error("lease storage: {0}")]
    Storage(String),
}

/// A key's lease changing in a committed write (0 = no lease).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyMove<'a> {
    /// The key.
    pub key: &'a [u8],
    /// The lease the key was attached to before the write.
    pub from: LeaseId,
    /// The lease the key is attached to after it (0 after a delete).
    pub to: LeaseId,
}

/// One lease's replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Lease {
    /// Granted TTL in seconds (after the minimum was applied).
    ttl: i64,
    /// Checkpointed remaining TTL in seconds; 0 means the full `ttl`.
    remaining: i64,
    /// Keys attached to the lease.
    keys: BTreeSet<Vec<u8>>,
}

/// What a caller may learn about one lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    /// The lease id.
    pub id: LeaseId,
    /// Granted TTL in seconds.
    pub ttl: i64,
    /// Checkpointed remaining TTL in seconds (0 = full TTL).
    pub remaining: i64,
    /// Attached keys, in order.
    pub keys: Vec<Vec<u8>>,
}

#[derive(Debug, Default)]
struct State {
    leases: HashMap<LeaseId, Lease>,
    /// Leases granted since the leader clock last looked; it starts their deadlines.
    fresh: Vec<LeaseId>,
    /// Leases revoked since the leader clock last looked; it drops their deadlines.
    gone: Vec<LeaseId>,
}

/// The lessor: cheap to clone, shared by apply (writes) and the server (reads).
#[derive(Debug, Clone)]
pub struct Lessor {
    state: Arc<Mutex<State>>,
    min_ttl: i64,
}

fn encode(l: &Lease) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&l.ttl.to_be_bytes());
    v.extend_from_slice(&l.remaining.to_be_bytes());
    v
}

/// The `Keyspace::Lease` record of lease `id` granted with `ttl` seconds and `remaining`
/// checkpointed seconds (0 = the full TTL), for tools that write records directly
/// (restoring a snapshot taken from etcd).
pub fn storage_record(id: LeaseId, ttl: i64, remaining: i64) -> (Vec<u8>, Vec<u8>) {
    let lease = Lease { ttl, remaining: remaining.max(0), keys: BTreeSet::new() };
    (id.to_be_bytes().to_vec(), encode(&lease))
}

fn decode_i64(b: &[u8]) -> Result<i64, Error> {
    let arr: [u8; 8] = b.try_into().map_err(|_| Error::Corrupt(format!("{} bytes", b.len())))?;
    Ok(i64::from_be_bytes(arr))
}

impl Lessor {
    /// Loads the leases persisted in `engine`. `min_ttl` is the minimum TTL in seconds.
    /// Attached keys are added afterwards with [`Lessor::attach`] from mvcc's live keys.
    ///
    /// # Errors
    /// [`Error::Storage`] or [`Error::Corrupt`].
    pub fn open(engine: &dyn Engine, min_ttl: i64) -> Result<Lessor, Error> {
        let mut leases = HashMap::new();
        let mut bad = None;
        engine
            .scan(Keyspace::Lease, b"", None, &mut |k, v| {
                let parsed = decode_i64(k).and_then(|id| {
                    let ttl = decode_i64(v.get(..8).unwrap_or_default())?;
                    let remaining = decode_i64(v.get(8..16).unwrap_or_default())?;
                    Ok((id, Lease { ttl, remaining, keys: BTreeSet::new() }))
                });
                match parsed {
                    Ok((id, l)) => {
                        leases.insert(id, l);
                        Scan::Continue
                    }
                    Err(e) => {
                        bad = Some(e);
                        Scan::Stop
                    }
                }
            })
            .map_err(|e| Error::Storage(e.to_string()))?;
        if let Some(e) = bad {
            return Err(e);
        }
        let fresh = leases.keys().copied().collect();
        Ok(Lessor {
            state: Arc::new(Mutex::new(State { leases, fresh, gone: Vec::new() })),
            min_ttl,
        })
    }

    /// Replaces every lease with those persisted in `engine` (after a snapshot from the
    /// leader replaced the state machine). Old leases count as gone and the loaded ones as
    /// fresh, so the leader clock forgets and relearns them. Attached keys are added
    /// afterwards with [`Lessor::attach`].
    ///
    /// # Errors
    /// As [`Lessor::open`]; the lessor is unchanged on error.
    pub fn reload(&self, engine: &dyn Engine) -> Result<(), Error> {
        let loaded = Lessor::open(engine, self.min_ttl)?;
        let new_state = std::mem::replace(
            &mut *loaded.lock(),
            State { leases: HashMap::new(), fresh: Vec::new(), gone: Vec::new() },
        );
        let mut st = self.lock();
        let mut gone: Vec<LeaseId> = st.leases.keys().copied().collect();
        gone.append(&mut st.gone);
        st.leases = new_state.leases;
        st.fresh = new_state.fresh;
        st.gone = gone;
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a panic mid-update elsewhere; the data is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The minimum TTL in seconds.
    pub fn min_ttl(&self) -> i64 {
        self.min_ttl
    }

    /// Applies a grant: creates lease `id` with `ttl` seconds (raised to the minimum) and
    /// records it in `batch`. Returns the TTL granted.
    ///
    /// # Errors
    /// [`Error::ZeroId`], [`Error::TtlTooLarge`], [`Error::Exists`].
    pub fn grant(&self, id: LeaseId, ttl: i64, batch: &mut Batch) -> Result<i64, Error> {
        if id == 0 {
            return Err(Error::ZeroId);
        }
        if ttl > MAX_LEASE_TTL {
            return Err(Error::TtlTooLarge);
        }
        let mut st = self.lock();
        if st.leases.contains_key(&id) {
            return Err(Error::Exists);
        }
        let lease = Lease { ttl: ttl.max(self.min_ttl), remaining: 0, keys: BTreeSet::new() };
        batch.put(Keyspace::Lease, id.to_be_bytes().to_vec(), encode(&lease));
        let granted = lease.ttl;
        st.leases.insert(id, lease);
        st.fresh.push(id);
        Ok(granted)
    }

    /// Applies a revoke: forgets lease `id` (recorded in `batch`) and returns its attached
    /// keys, which the caller deletes in one revision.
    ///
    /// # Errors
    /// [`Error::NotFound`].
    pub fn revoke(&self, id: LeaseId, batch: &mut Batch) -> Result<Vec<Vec<u8>>, Error> {
        let mut st = self.lock();
        let lease = st.leases.remove(&id).ok_or(Error::NotFound)?;
        batch.delete(Keyspace::Lease, id.to_be_bytes().to_vec());
        st.gone.push(id);
        Ok(lease.keys.into_iter().collect())
    }

    /// Applies a checkpoint: lease `id` has `remaining` seconds left (0 = its full TTL).
    /// Unknown leases are skipped: a checkpoint may race with a revoke.
    pub fn checkpoint(&self, id: LeaseId, remaining: i64, batch: &mut Batch) {
        let mut st = self.lock();
        if let Some(l) = st.leases.get_mut(&id) {
            l.remaining = remaining.max(0);
            batch.put(Keyspace::Lease, id.to_be_bytes().to_vec(), encode(l));
        }
    }

    /// Attaches `key` to lease `id` (ignored when the lease is unknown or `id` is 0).
    pub fn attach(&self, id: LeaseId, key: &[u8]) {
        if id == 0 {
            return;
        }
        if let Some(l) = self.lock().leases.get_mut(&id) {
            l.keys.insert(key.to_vec());
        }
    }

    /// Updates attachments from a committed write's key moves: a put moves its key to the
    /// new lease, a delete detaches it (apply derives the moves from mvcc's events, so this
    /// module knows nothing of mvcc).
    pub fn observe<'a>(&self, moves: impl IntoIterator<Item = KeyMove<'a>>) {
        let mut st = self.lock();
        for KeyMove { key, from, to } in moves {
            if from == to {
                continue;
            }
            if let Some(l) = st.leases.get_mut(&from) {
                l.keys.remove(key);
            }
            if let Some(l) = st.leases.get_mut(&to) {
                l.keys.insert(key.to_vec());
            }
        }
    }

    /// Returns true when lease `id` is granted and not yet revoked.
    pub fn exists(&self, id: LeaseId) -> bool {
        self.lock().leases.contains_key(&id)
    }

    /// Returns lease `id`'s replicated state.
    pub fn get(&self, id: LeaseId) -> Option<LeaseInfo> {
        self.lock().leases.get(&id).map(|l| LeaseInfo {
            id,
            ttl: l.ttl,
            remaining: l.remaining,
            keys: l.keys.iter().cloned().collect(),
        })
    }

    /// Returns every lease id, ascending.
    pub fn ids(&self) -> Vec<LeaseId> {
        let mut ids: Vec<_> = self.lock().leases.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Returns `(id, ttl, remaining)` of every lease, for the leader clock.
    pub(crate) fn snapshot_ttls(&self) -> Vec<(LeaseId, i64, i64)> {
        self.lock().leases.iter().map(|(id, l)| (*id, l.ttl, l.remaining)).collect()
    }

    /// Takes the ids granted and revoked since the last call, for the leader clock.
    pub(crate) fn take_changes(&self) -> (Vec<LeaseId>, Vec<LeaseId>) {
        let mut st = self.lock();
        (std::mem::take(&mut st.fresh), std::mem::take(&mut st.gone))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemEngine;

    #[test]
    fn grants_raise_small_ttls_refuse_huge_ones_and_duplicate_ids() {
        let l = Lessor::open(&MemEngine::new(), 2).unwrap();
        let mut b = Batch::new();
        assert_eq!(l.grant(1, 1, &mut b), Ok(2));
        assert_eq!(l.grant(2, 60, &mut b), Ok(60));
        assert_eq!(l.grant(1, 60, &mut b), Err(Error::Exists));
        assert_eq!(l.grant(3, MAX_LEASE_TTL + 1, &mut b), Err(Error::TtlTooLarge));
        assert_eq!(l.grant(0, 5, &mut b), Err(Error::ZeroId));
        assert_eq!(l.ids(), vec![1, 2]);
    }

    #[test]
    fn events_move_keys_between_leases_and_revoke_returns_them() {
        let l = Lessor::open(&MemEngine::new(), 2).unwrap();
        let mut b = Batch::new();
        l.grant(1, 10, &mut b).unwrap();
        l.grant(2, 10, &mut b).unwrap();
        let mv = |key: &'static str, from, to| KeyMove { key: key.as_bytes(), from, to };
        // Puts of a, b, c; b moves to lease 2; c is deleted.
        l.observe([mv("a", 0, 1), mv("b", 0, 1), mv("c", 0, 2)]);
        l.observe([mv("b", 1, 2)]);
        l.observe([mv("c", 2, 0)]);
        assert_eq!(l.get(1).unwrap().keys, vec![b"a".to_vec()]);
        assert_eq!(l.get(2).unwrap().keys, vec![b"b".to_vec()]);
        assert_eq!(l.revoke(1, &mut b).unwrap(), vec![b"a".to_vec()]);
        assert_eq!(l.revoke(1, &mut b), Err(Error::NotFound));
        assert!(!l.exists(1));
    }

    #[test]
    fn grants_and_checkpoints_survive_reopen() {
        let engine = MemEngine::new();
        let l = Lessor::open(&engine, 2).unwrap();
        let mut b = Batch::new();
        l.grant(7, 100, &mut b).unwrap();
        l.grant(8, 100, &mut b).unwrap();
        l.checkpoint(7, 42, &mut b);
        l.revoke(8, &mut b).unwrap();
        engine.write(b).unwrap();
        let l = Lessor::open(&engine, 2).unwrap();
        let info = l.get(7).unwrap();
        assert_eq!((info.ttl, info.remaining), (100, 42));
        assert!(l.get(8).is_none());
    }
}
