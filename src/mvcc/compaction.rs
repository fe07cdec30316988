//! Compaction: forgetting history older than a revision (etcd's `kvstore_compaction.go`
//! and `treeIndex.Compact`).
//!
//! Compacting at `rev` keeps, for every key, the newest revision at or before `rev` (unless
//! that is a tombstone) and every newer revision, so any read at `rev` or later answers as
//! before; reads below `rev` fail with `Compacted` from then on.
//!
//! A compaction runs in two steps so that readers never see it half done. [`plan`] walks
//! the index under the read lock (readers keep going) and lists what to drop; the writer
//! then deletes those records in the same atomic batch as the group's other changes and
//! [`apply`] trims the index under the write lock at commit. Planning is valid across
//! later writes of the group because writes only append revisions above `rev`.

use super::index::Index;
use super::key_index::Trim;

/// What a compaction at one revision removes from the index and from storage.
#[derive(Debug, Default)]
pub(super) struct CompactionPlan {
    /// The compaction revision.
    pub rev: i64,
    /// Keys losing history, with how much of it.
    trims: Vec<(Vec<u8>, Trim)>,
    /// Storage keys (encoded revisions, tombstone marks included) to delete.
    pub dropped: Vec<Vec<u8>>,
}

/// Plans a compaction of `index` at `rev`.
///
/// The walk visits every key (as etcd's does); only keys with something to drop cost an
/// allocation.
pub(super) fn plan(index: &Index, rev: i64) -> CompactionPlan {
    let mut out = CompactionPlan { rev, ..CompactionPlan::default() };
    for (key, ki) in index.iter() {
        let dropped = &mut out.dropped;
        if let Some(trim) = ki.plan_compaction(rev, |r, tomb| dropped.push(r.to_key(tomb))) {
            out.trims.push((key.clone(), trim));
        }
    }
    out
}

/// Trims `index` as `plan` says; keys left with no history leave the index.
pub(super) fn apply(index: &mut Index, plan: &CompactionPlan) {
    for (key, trim) in &plan.trims {
        index.apply_trim(key, *trim);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::revision::Revision;
    use super::super::tests::{NoLeases, del, put, put_req, range_req, rng, store};
    use super::super::{Error, KvStore};
    use crate::storage::{Engine, Keyspace, MemEngine, Scan};

    fn stored_revisions(engine: &dyn Engine) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        engine
            .scan(Keyspace::Kv, b"", None, &mut |k, _| {
                out.push(k.to_vec());
                Scan::Continue
            })
            .unwrap();
        out
    }

    fn compact(kv: &KvStore, rev: i64) -> Result<(), Error> {
        let mut w = kv.write();
        w.compact(rev)?;
        w.commit().map(|_| ())
    }

    fn key(main: i64, tombstone: bool) -> Vec<u8> {
        Revision::new(main, 0).to_key(tombstone)
    }

    #[test]
    fn compaction_keeps_latest_revisions_and_drops_tombstones() {
        let engine = Arc::new(MemEngine::new());
        let kv = KvStore::open(engine.clone()).unwrap();
        put(&kv, "a", "1"); // 2
        put(&kv, "a", "2"); // 3
        put(&kv, "b", "1"); // 4
        del(&kv, "b", ""); // 5
        put(&kv, "c", "1"); // 6
        del(&kv, "c", ""); // 7
        put(&kv, "c", "2"); // 8

        compact(&kv, 5).unwrap();
        assert_eq!(kv.compact_revision(), 5);
        assert_eq!(kv.current_revision(), 8, "compaction creates no revision");
        // a keeps its newest revision <= 5; b, deleted at 5, is gone; c's history all
        // lies after 5.
        let left = [key(3, false), key(6, false), key(7, true), key(8, false)];
        assert_eq!(stored_revisions(engine.as_ref()), left);

        // Reads at and after the compaction point are unchanged.
        assert_eq!(rng(&kv, "a", "", 5).kvs[0].value, b"2");
        assert_eq!(rng(&kv, "c", "", 6).kvs[0].value, b"1");
        assert!(rng(&kv, "b", "", 5).kvs.is_empty());
        assert_eq!(rng(&kv, "\0", "\0", 0).count, 2);
        assert!(matches!(kv.range(&range_req("a", "", 4)), Err(Error::Compacted)));

        // Compacting past c's tombstone leaves one record per live key.
        compact(&kv, 8).unwrap();
        assert_eq!(stored_revisions(engine.as_ref()), [key(3, false), key(8, false)]);
    }

    #[test]
    fn compact_rejects_old_and_future_revisions() {
        let kv = store();
        put(&kv, "a", "1"); // 2
        put(&kv, "a", "2"); // 3
        assert!(matches!(compact(&kv, 0), Err(Error::Compacted)));
        assert!(matches!(compact(&kv, 4), Err(Error::FutureRevision)));
        compact(&kv, 2).unwrap();
        assert!(matches!(compact(&kv, 2), Err(Error::Compacted)));
        assert!(matches!(compact(&kv, 1), Err(Error::Compacted)));
        compact(&kv, 3).unwrap();
        assert_eq!(kv.compact_revision(), 3);
    }

    #[test]
    fn compaction_inside_a_group_takes_effect_at_commit() {
        let kv = store();
        put(&kv, "a", "1"); // 2
        let mut w = kv.write();
        w.put(&put_req("a", "2"), &NoLeases).unwrap(); // 3
        w.compact(3).unwrap();
        // The writer already refuses reads below its pending compaction point ...
        assert!(matches!(w.range(&range_req("a", "", 2)), Err(Error::Compacted)));
        // ... while committed readers still see the old history until commit.
        assert_eq!(rng(&kv, "a", "", 2).kvs[0].value, b"1");
        w.put(&put_req("a", "3"), &NoLeases).unwrap(); // 4
        w.commit().unwrap();
        assert!(matches!(kv.range(&range_req("a", "", 2)), Err(Error::Compacted)));
        assert_eq!(rng(&kv, "a", "", 3).kvs[0].value, b"2");
        assert_eq!(rng(&kv, "a", "", 0).kvs[0].value, b"3");
    }

    #[test]
    fn compactions_in_one_group_compose_and_reach_records_written_in_it() {
        let engine = Arc::new(MemEngine::new());
        let kv = KvStore::open(engine.clone()).unwrap();
        let mut w = kv.write();
        for v in ["1", "2", "3", "4"] {
            w.put(&put_req("a", v), &NoLeases).unwrap(); // 2, 3, 4, 5
        }
        w.compact(3).unwrap();
        w.compact(4).unwrap();
        assert!(matches!(w.compact(4), Err(Error::Compacted)));
        let events = w.commit().unwrap();
        assert_eq!(events.len(), 4, "compaction never hides events from watchers");
        assert_eq!(kv.compact_revision(), 4);
        assert_eq!(stored_revisions(engine.as_ref()), [key(4, false), key(5, false)]);
        assert_eq!(rng(&kv, "a", "", 4).kvs[0].value, b"3");
    }
}
