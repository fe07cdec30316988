//! Pinned views of the `Kv` keyspace: what a maintenance snapshot or a defragmentation reads
//! while writes go on.
//!
//! History in the `Kv` keyspace is append-only: a put or a delete adds a record under a
//! new revision and never rewrites an old one. So the records with revisions up to `R` are
//! the whole keyspace as of revision `R`, however many groups commit afterwards, with two
//! exceptions that remove records: a compaction (it deletes superseded revisions) and the
//! wholesale replacement of the engine's content (a leader's snapshot being installed).
//!
//! A replacement bumps the store's *epoch* before it touches storage. A compaction's
//! batches first raise the store's *deleting revision* to the compaction revision. A
//! [`Pin`] remembers the epoch and the compaction revision it was taken at and checks,
//! after every page it reads, that the epoch is unchanged and that no compaction newer than
//! its own has begun deleting, so a reader never returns a page that may have lost
//! records, and instead fails with [`Error::PinInvalidated`] (the caller retries; etcd's
//! bbolt read transactions keep old pages alive instead, which sled cannot do). The
//! batches of the pin's own compaction (or an older one) still running in the background
//! do not invalidate it: the pin leaves out the records they delete anyway
//! (`compaction::is_kept`), so what it returns does not depend on their progress.
//!
//! A pin is taken between write groups ([`KvStore::pin`]), so whatever the caller copies
//! from the other keyspaces at that moment (meta, leases, members) is consistent with the
//! pinned revision.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::revision::Revision;
use super::{Error, Inner, KvStore, Result, compaction};
use crate::storage::{Keyspace, Scan};

/// A point-in-time view of the `Kv` keyspace at one revision (see the module docs).
pub struct Pin {
    inner: Arc<Inner>,
    rev: i64,
    compact_rev: i64,
    epoch: u64,
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pin").field("rev", &self.rev).field("epoch", &self.epoch).finish()
    }
}

impl KvStore {
    /// Waits for the open write group to commit, then runs `f` while no group can start,
    /// and returns a [`Pin`] at the committed revision with `f`'s result.
    ///
    /// `f` must not start a write group itself (it would wait for itself).
    pub fn pin<T>(&self, f: impl FnOnce() -> T) -> (Pin, T) {
        // An empty write group holds off the apply task between groups; dropping it
        // unused rolls nothing back.
        let txn = self.write();
        let st = self.inner.read_state();
        let pin = Pin {
            inner: self.inner.clone(),
            rev: st.current_rev,
            compact_rev: st.compact_rev,
            epoch: self.inner.epoch.load(Ordering::SeqCst),
        };
        drop(st);
        let out = f();
        drop(txn);
        (pin, out)
    }

    /// Invalidates every [`Pin`]: the caller is about to replace the engine's content.
    pub fn invalidate_pins(&self) {
        self.inner.epoch.fetch_add(1, Ordering::SeqCst);
    }
}

impl Pin {
    /// The pinned revision.
    pub fn revision(&self) -> i64 {
        self.rev
    }

    /// The compaction revision when the pin was taken.
    pub fn compact_revision(&self) -> i64 {
        self.compact_rev
    }

    /// True while no newer compaction has begun deleting and no state replacement has
    /// happened since the pin.
    pub fn is_valid(&self) -> bool {
        self.inner.epoch.load(Ordering::SeqCst) == self.epoch
            && self.inner.deleting_rev.load(Ordering::SeqCst) <= self.compact_rev
    }

    /// Visits the stored `Kv` records with revisions up to the pin (`upto_pin`) or above it
    /// (`!upto_pin`), in revision order, leaving out those its compaction drops, starting after the storage key `after` (from the
    /// first record when `None`), until about `max_bytes` of keys and values were visited.
    /// Returns the last key visited, `None` when the scan reached the end.
    ///
    /// # Errors
    /// [`Error::PinInvalidated`] when a compaction or replacement ran since the pin (the
    /// page may have missed records), and storage errors.
    pub fn scan_kv(
        &self,
        upto_pin: bool,
        after: Option<&[u8]>,
        max_bytes: usize,
        visit: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<Option<Vec<u8>>> {
        let bound = Revision::new(self.rev.saturating_add(1), 0).to_key(false);
        let start = match after {
            Some(k) => {
                let mut s = k.to_vec();
                s.push(0);
                s
            }
            None if upto_pin => Vec::new(),
            None => bound.clone(),
        };
        let end = if upto_pin { Some(bound.as_slice()) } else { None };
        let mut seen = 0usize;
        let mut last = None;
        let mut failure = None;
        self.inner.engine.scan(Keyspace::Kv, &start, end, &mut |k, v| {
            let kept = Revision::from_key(k).and_then(|(rev, tomb)| {
                if rev.main > self.compact_rev {
                    return Ok(true);
                }
                let st = self.inner.read_state();
                compaction::is_kept(&st.index, rev, tomb, v, self.compact_rev)
            });
            match kept {
                Ok(true) => visit(k, v),
                Ok(false) => {}
                Err(e) => {
                    failure = Some(e);
                    return Scan::Stop;
                }
            }
            seen = seen.saturating_add(k.len() + v.len());
            if seen >= max_bytes {
                last = Some(k.to_vec());
                Scan::Stop
            } else {
                Scan::Continue
            }
        })?;
        // Checked after the read: a newer compaction raises the deleting revision before it
        // trims or deletes, so a valid pin here means nothing it needs was removed before
        // or during the read.
        if !self.is_valid() {
            return Err(Error::PinInvalidated);
        }
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(last)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{put, store};
    use super::*;

    fn collect(pin: &Pin, upto: bool) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let next = pin.scan_kv(upto, after.as_deref(), 1, &mut |k, _| out.push(k.to_vec()))?;
            match next {
                Some(k) => after = Some(k),
                None => return Ok(out),
            }
        }
    }

    #[test]
    fn a_pin_sees_history_up_to_its_revision_while_writes_go_on() {
        let kv = store();
        put(&kv, "a", "1"); // 2
        put(&kv, "b", "1"); // 3
        let (pin, ()) = kv.pin(|| ());
        put(&kv, "a", "2"); // 4
        assert_eq!(pin.revision(), 3);
        assert_eq!(collect(&pin, true).unwrap().len(), 2);
        assert_eq!(collect(&pin, false).unwrap().len(), 1, "one record above the pin");
    }

    #[test]
    fn a_compaction_invalidates_the_pin() {
        let kv = store();
        put(&kv, "a", "1"); // 2
        put(&kv, "a", "2"); // 3
        let (pin, ()) = kv.pin(|| ());
        let mut w = kv.write();
        w.compact(3).unwrap();
        w.commit().unwrap();
        kv.wait_compacted(3).unwrap();
        assert!(!pin.is_valid());
        assert!(matches!(collect(&pin, true), Err(Error::PinInvalidated)));
    }
}
