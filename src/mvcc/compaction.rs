//! Compaction: forgetting history older than a revision (etcd's `kvstore_compaction.go`
//! and `treeIndex.Compact`), carried out in bounded batches off the apply path.
//!
//! Compacting at `rev` keeps, for every key, the newest revision at or before `rev` (unless
//! that is a tombstone) and every newer revision, so any read at `rev` or later answers as
//! before; reads below `rev` fail with `Compacted` from then on.
//!
//! A compaction takes effect in two stages, as etcd's does. The write group that applies
//! it only records and publishes the compaction revision (reads below it fail from that
//! commit on), which costs the same whatever the history's length. The physical part,
//! trimming the key index and deleting the superseded records, then runs on a worker
//! thread in batches of at most `batch_limit` records (etcd's
//! `--experimental-compaction-batch-limit`, default 1000), each between two write groups
//! and followed by a pause (`--experimental-compaction-sleep-interval`, default 10 ms), so
//! applies interleave with a long compaction instead of waiting for all of it. The worker
//! deletes a batch's records one by one ([`crate::storage::Engine::remove_each`]): on
//! sled, one batch of a thousand deletes held every apply off until its end (put p99
//! during a 300k-revision compaction went from about 8 ms to about 6 ms with this). The
//! worker keeps the default CPU priority: it holds the writer slot while it plans, and a
//! lowered priority measured no better (a preempted holder would stall apply).
//!
//! Nothing reads the records a compaction drops: reads at or after the compaction revision
//! never reach them, and whatever scans storage directly ([`super::KvStore::hash_kv`],
//! pins) skips them by the rule in [`is_kept`], so the answers do not depend on how far
//! the physical part has come. The compaction revision is durable with the group; a
//! restart (or a leader snapshot taken mid-compaction) simply plans the physical part
//! again from the rebuilt index ([`super::KvStore::open`]).

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, Weak};
use std::time::Duration;

use super::index::Index;
use super::key_index::Trim;
use super::revision::Revision;
use super::write::WriteTxn;
use super::{Error, Inner, KvStore, Result, codec};
use crate::storage::Keyspace;

/// How the physical part of a compaction is paced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactionPacing {
    /// Most records deleted per batch (etcd's default 1000).
    pub batch_limit: usize,
    /// Pause after each batch (etcd's default 10 ms).
    pub sleep: Duration,
}

impl Default for CompactionPacing {
    fn default() -> Self {
        CompactionPacing { batch_limit: 1000, sleep: Duration::from_millis(10) }
    }
}

/// Index keys looked at per batch for each record the batch may delete: bounds a batch's
/// walk over keys that have nothing to drop.
const KEYS_PER_RECORD: usize = 10;

/// Where the physical part of compaction stands; shared by every clone of the store.
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// The newest compaction revision whose physical part is scheduled (0: none).
    target: i64,
    /// The first index key the next batch looks at (`None`: the first key).
    resume: Option<Vec<u8>>,
    /// The newest compaction revision whose physical part is complete.
    finished: i64,
    /// True while a worker thread runs.
    running: bool,
    /// Why the last worker stopped early, if it failed.
    failure: Option<String>,
    pacing: CompactionPacing,
}

/// One batch of a compaction: the index trims and the storage records to delete.
struct Chunk {
    trims: Vec<(Vec<u8>, Trim)>,
    dropped: Vec<Vec<u8>>,
    /// Where the next batch starts; `None` when the walk reached the last key.
    resume: Option<Vec<u8>>,
}

/// Plans one batch at `rev`, walking the index from `start`.
fn plan_chunk(index: &Index, rev: i64, start: Option<&[u8]>, limit: usize) -> Chunk {
    let limit = limit.max(1);
    let mut chunk = Chunk { trims: Vec::new(), dropped: Vec::new(), resume: None };
    for (visited, (key, ki)) in index.iter_from(start.unwrap_or_default()).enumerate() {
        let budget = limit.saturating_sub(chunk.dropped.len());
        if budget == 0 || visited >= limit.saturating_mul(KEYS_PER_RECORD) {
            chunk.resume = Some(key.clone());
            break;
        }
        let dropped = &mut chunk.dropped;
        let planned =
            ki.plan_compaction_bounded(rev, budget, |r, tomb| dropped.push(r.to_key(tomb)));
        if let Some((trim, whole)) = planned {
            chunk.trims.push((key.clone(), trim));
            if !whole {
                // A long history of one key: the next batch goes on with the same key.
                chunk.resume = Some(key.clone());
                break;
            }
        }
    }
    chunk
}

/// True when the stored record `(rev, tombstone, value)` survives a compaction at
/// `compact_rev` as the index says: every record after it, and at or before it only the
/// newest revision of a key that is live at `compact_rev` (etcd's `keyIndex.keep`).
///
/// # Errors
/// [`Error::Corrupt`] when the record does not decode.
pub(super) fn is_kept(
    index: &Index,
    rev: Revision,
    tombstone: bool,
    value: &[u8],
    compact_rev: i64,
) -> Result<bool> {
    if rev.main > compact_rev {
        return Ok(true);
    }
    if tombstone {
        return Ok(false);
    }
    let kv = codec::decode(value, false)?;
    Ok(index.get(&kv.key, compact_rev).is_some_and(|k| k.modified == rev))
}

impl Inner {
    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.compaction.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Schedules the physical part of a compaction at `rev` (published already), starting
    /// a worker when none runs. A newer compaction supersedes an unfinished older one: its
    /// walk starts over from the first key and drops everything the older one would.
    pub(super) fn schedule_compaction(&self, rev: i64) {
        let mut p = self.progress();
        if rev <= p.target && (p.running || p.finished >= p.target) {
            return;
        }
        if rev > p.target {
            p.target = rev;
            p.resume = None;
        }
        p.failure = None;
        if !p.running {
            p.running = true;
            let weak = self.me.clone();
            let spawned = std::thread::Builder::new()
                .name("mvcc-compact".into())
                .spawn(move || run_worker(&weak));
            if let Err(e) = spawned {
                p.running = false;
                p.failure = Some(format!("cannot start the compaction thread: {e}"));
                tracing::warn!(error = %e, "cannot start the compaction thread");
            }
        }
    }
}

/// The worker: one batch, a pause, until the scheduled compaction is complete or the store
/// is gone.
fn run_worker(weak: &Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let more = match step(&inner) {
            Ok(more) => more,
            Err(e) => {
                tracing::warn!(error = %e, "compaction stopped; it resumes at the next compaction or restart");
                let mut p = inner.progress();
                p.running = false;
                p.failure = Some(e.to_string());
                drop(p);
                inner.compaction_done.notify_all();
                return;
            }
        };
        if !more {
            return;
        }
        let pause = inner.progress().pacing.sleep;
        drop(inner);
        std::thread::sleep(pause);
    }
}

/// Runs one batch; returns false (and marks the worker stopped) when nothing is left.
fn step(inner: &Inner) -> Result<bool> {
    // The index is trimmed between two write groups (holding the writer slot): nobody else
    // changes it then, and a group's rollback never meets a trimmed key.
    let slot = WriteTxn::begin(inner);
    let (target, resume, limit) = {
        let mut p = inner.progress();
        if p.target <= p.finished {
            p.running = false;
            drop(p);
            inner.compaction_done.notify_all();
            return Ok(false);
        }
        (p.target, p.resume.clone(), p.pacing.batch_limit)
    };
    let chunk = plan_chunk(&inner.read_state().index, target, resume.as_deref(), limit);
    if !chunk.trims.is_empty() {
        // Pins older than `target` must learn of the removal before it happens (`pin.rs`).
        inner.deleting_rev.fetch_max(target, Ordering::SeqCst);
        let mut st = inner.write_state();
        for (key, trim) in &chunk.trims {
            st.index.apply_trim(key, *trim);
        }
    }
    inner.progress().resume = chunk.resume.clone();
    let epoch = inner.epoch.load(Ordering::SeqCst);
    drop(slot);

    // The deletes need no slot: no write group touches these records, and every reader
    // already skips them (`is_kept`). They go one by one, not as one atomic batch: a
    // crash midway only leaves records that the restart plans again, while a large batch
    // would hold the engine's writers (apply) off until its end.
    let freed = inner.engine.remove_each(Keyspace::Kv, chunk.dropped)?;
    // A replacement of the whole state meanwhile recounted the bytes and restarted the
    // compaction: this batch's bookkeeping belongs to the old state.
    let replaced = inner.epoch.load(Ordering::SeqCst) != epoch;
    if !replaced {
        let _ = inner
            .stored_bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| Some(b.saturating_sub(freed)));
    }
    let mut p = inner.progress();
    if chunk.resume.is_none() && p.target == target && !replaced {
        p.finished = target;
        drop(p);
        inner.compaction_done.notify_all();
    }
    Ok(true)
}

impl KvStore {
    /// Sets how the physical part of compactions is paced (etcd's
    /// `--experimental-compaction-batch-limit` and `--experimental-compaction-sleep-interval`).
    pub fn set_compaction_pacing(&self, pacing: CompactionPacing) {
        self.inner.progress().pacing = pacing;
    }

    /// Blocks until the physical part of the compaction at `rev` is complete: its records
    /// are gone from storage (etcd's `CompactionRequest.physical`).
    ///
    /// # Errors
    /// [`Error::Compaction`] when the worker stopped on a storage failure first.
    pub fn wait_compacted(&self, rev: i64) -> Result<()> {
        let mut p = self.inner.progress();
        loop {
            if p.finished >= rev {
                return Ok(());
            }
            if !p.running {
                let why = p.failure.clone().unwrap_or_else(|| "not scheduled".into());
                return Err(Error::Compaction(why));
            }
            p = self.inner.compaction_done.wait(p).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Inner {
    /// Forgets the physical progress after the engine's content was replaced, and plans
    /// the compaction at `rev` (the new content's) from the first key.
    pub(super) fn restart_compaction(&self, rev: i64) {
        let mut p = self.progress();
        p.target = 0;
        p.finished = 0;
        p.resume = None;
        drop(p);
        if rev > 0 {
            self.schedule_compaction(rev);
        }
    }
}

/// Creates the shared handle, with a weak self-reference for starting workers.
pub(super) fn new_inner(f: impl FnOnce(Weak<Inner>) -> Inner) -> Arc<Inner> {
    Arc::new_cyclic(|me| f(me.clone()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use std::time::Duration;

    use super::super::revision::Revision;
    use super::super::tests::{NoLeases, del, put, put_req, range_req, rng, store};
    use super::super::{Error, KvStore};
    use super::CompactionPacing;
    use crate::storage::{Engine, Keyspace, MemEngine, Scan, SledEngine};

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

    fn record_bytes(engine: &dyn Engine) -> u64 {
        let mut n = 0;
        engine
            .scan(Keyspace::Kv, b"", None, &mut |k, v| {
                n += (k.len() + v.len()) as u64;
                Scan::Continue
            })
            .unwrap();
        n
    }

    fn compact(kv: &KvStore, rev: i64) -> Result<(), Error> {
        let mut w = kv.write();
        w.compact(rev)?;
        w.commit()?;
        kv.wait_compacted(rev)
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
        kv.wait_compacted(4).unwrap();
        assert_eq!(stored_revisions(engine.as_ref()), [key(4, false), key(5, false)]);
        assert_eq!(rng(&kv, "a", "", 4).kvs[0].value, b"3");
    }

    /// Batches of 5 and a pause no test waits out: a compaction stops after one batch.
    const STALLED: CompactionPacing =
        CompactionPacing { batch_limit: 5, sleep: Duration::from_secs(3600) };

    /// 60 puts over three keys (revisions 2..=61), then a delete of `k0` (62).
    fn long_history(kv: &KvStore) {
        for i in 0..60 {
            put(kv, &format!("k{}", i % 3), &i.to_string());
        }
        del(kv, "k0", "");
    }

    /// Commits a compaction at `rev` and waits until its first batch deleted its
    /// `STALLED.batch_limit` records (they go one by one); returns how many went.
    fn start_compaction(kv: &KvStore, engine: &dyn Engine, rev: i64) -> usize {
        let before = stored_revisions(engine).len();
        let mut w = kv.write();
        w.compact(rev).unwrap();
        w.commit().unwrap();
        loop {
            let now = stored_revisions(engine).len();
            if now + STALLED.batch_limit <= before {
                return before - now;
            }
            std::thread::yield_now();
        }
    }

    fn pinned_records(kv: &KvStore) -> Vec<Vec<u8>> {
        let (pin, ()) = kv.pin(|| ());
        let mut out = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let next =
                pin.scan_kv(true, after.as_deref(), 64, &mut |k, _| out.push(k.to_vec())).unwrap();
            match next {
                Some(k) => after = Some(k),
                None => return out,
            }
        }
    }

    #[test]
    fn a_long_compaction_runs_in_bounded_batches_between_writes() {
        let engine = Arc::new(MemEngine::new());
        let kv = KvStore::open(engine.clone()).unwrap();
        kv.set_compaction_pacing(STALLED);
        let reference = store();
        long_history(&kv);
        long_history(&reference);

        assert_eq!(start_compaction(&kv, engine.as_ref(), 50), 5, "one batch of 5 records");
        compact(&reference, 50).unwrap();
        // The compaction is unfinished, yet the writer is free between its batches ...
        put(&kv, "k1", "after");
        put(&reference, "k1", "after");
        // ... and every answer is already that of the finished compaction.
        assert!(matches!(kv.range(&range_req("k1", "", 49)), Err(Error::Compacted)));
        for at in 50..=63 {
            assert_eq!(rng(&kv, "k", "l", at), rng(&reference, "k", "l", at), "at {at}");
        }
        for at in [51, 55, 0] {
            assert_eq!(kv.hash_kv(at).unwrap(), reference.hash_kv(at).unwrap(), "hash at {at}");
        }
        assert!(matches!(kv.hash_kv(50), Err(Error::Compacted)));
        assert_eq!(pinned_records(&kv), pinned_records(&reference));
        assert!(stored_revisions(engine.as_ref()).len() > pinned_records(&kv).len());
        assert_eq!(kv.stored_bytes(), record_bytes(engine.as_ref()), "counted as stored");
    }

    #[test]
    fn a_compaction_cut_short_by_a_restart_completes_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(SledEngine::open(dir.path()).unwrap());
        let kv = KvStore::open(engine.clone()).unwrap();
        kv.set_compaction_pacing(STALLED);
        long_history(&kv);
        start_compaction(&kv, engine.as_ref(), 50);
        let hash = kv.hash_kv(0).unwrap();
        drop(kv);
        // The worker holds the store for the rest of its batch after the deletes land;
        // sled's lock on the directory goes only with the last handle on the engine.
        while Arc::strong_count(&engine) > 1 {
            std::thread::yield_now();
        }
        drop(engine);

        let engine = Arc::new(SledEngine::open(dir.path()).unwrap());
        let reopened = KvStore::open(engine.clone()).unwrap();
        reopened.wait_compacted(50).unwrap();
        let reference = store();
        long_history(&reference);
        compact(&reference, 50).unwrap();
        assert_eq!(reopened.hash_kv(0).unwrap(), hash);
        assert_eq!(reopened.stored_bytes(), record_bytes(engine.as_ref()));
        assert_eq!(stored_revisions(engine.as_ref()), pinned_records(&reference));
        for at in 50..=62 {
            assert_eq!(rng(&reopened, "k", "l", at), rng(&reference, "k", "l", at), "at {at}");
        }
    }
}
