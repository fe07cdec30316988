//! The write side: [`WriteTxn`], a group of requests applied in place to the key index and
//! committed to storage in one atomic batch.
//!
//! Every change of a group carries a revision above the last committed one, and committed
//! readers never read above that revision, so the group's in-place index changes stay
//! invisible to them until [`WriteTxn::commit`] publishes the new revision. Each index
//! change first records the key's [`Shape`], which is what lets a failed request, a failed
//! commit or a dropped group be undone by truncation.

use std::sync::PoisonError;

use super::index::KeyRange;
use super::key_index::Shape;
use super::range::{Pending, View};
use super::revision::Revision;
use super::{
    DeleteRangeRequest, DeleteRangeResult, Error, Event, EventKind, Inner, KeyValue, LeaseLookup,
    META_COMPACT_REVISION, META_CURRENT_REVISION, PutRequest, PutResult, RangeRequest, RangeResult,
    Result, State, codec,
};
use crate::storage::{Batch, Keyspace};

/// The revision a request writes at, and how many changes it has made so far.
///
/// Every change of one request shares `main`; `sub` numbers them. Reads inside the request
/// see its own changes once there are any (etcd reads at `beginRev + 1` then).
#[derive(Debug, Clone, Copy)]
pub(super) struct Stamp {
    main: i64,
    sub: i64,
}

impl Stamp {
    /// A request that will write at the revision after `current`.
    pub(super) fn after(current: i64) -> Self {
        Self { main: current + 1, sub: 0 }
    }

    /// True once the request has changed something.
    fn changed(&self) -> bool {
        self.sub > 0
    }

    /// The revision the request reads at: its own once it has written, else the previous.
    pub(super) fn read_rev(&self) -> i64 {
        if self.changed() { self.main } else { self.main - 1 }
    }

    /// Allocates the revision of the next change.
    fn next(&mut self) -> Revision {
        let rev = Revision::new(self.main, self.sub);
        self.sub += 1;
        rev
    }
}

/// How far a [`WriteTxn`] had got, to roll a failed request back to.
#[derive(Debug, Clone, Copy)]
pub(super) struct Mark {
    undo: usize,
    events: usize,
    current_rev: i64,
}

/// An exclusive write group: many requests, one atomic engine batch at [`WriteTxn::commit`].
///
/// Each request (`put`, `delete_range`, `txn`) takes the next revision if it changes
/// something. A request that fails changes nothing. Other readers see none of the group
/// until commit. Dropping a `WriteTxn` without committing rolls every change back, as if
/// the group never ran (nothing reached storage).
pub struct WriteTxn<'a> {
    pub(super) inner: &'a Inner,
    /// The caller's records plus, at commit, this group's.
    batch: Batch,
    /// The committed revision when the group began; every pending change is above it.
    base_rev: i64,
    /// The newest revision this group has written (== `base_rev` before any change).
    pub(super) current_rev: i64,
    base_compact_rev: i64,
    /// The newest compaction revision requested in this group, published at commit.
    compaction: Option<i64>,
    /// Every change so far, in revision order; committed as storage records.
    events: Vec<Event>,
    /// The revision of each entry of `events`.
    event_revs: Vec<Revision>,
    /// Each index change's key and its shape before the change, oldest first.
    undo: Vec<(Vec<u8>, Option<Shape>)>,
    finished: bool,
}

impl<'a> WriteTxn<'a> {
    /// Waits until no other group is open, then starts one on the committed state.
    pub(super) fn begin(inner: &'a Inner) -> Self {
        let mut busy = inner.writer_busy.lock().unwrap_or_else(PoisonError::into_inner);
        while *busy {
            busy = inner.writer_free.wait(busy).unwrap_or_else(PoisonError::into_inner);
        }
        *busy = true;
        drop(busy);
        let st = inner.read_state();
        WriteTxn {
            inner,
            batch: Batch::new(),
            base_rev: st.current_rev,
            current_rev: st.current_rev,
            base_compact_rev: st.compact_rev,
            compaction: None,
            events: Vec::new(),
            event_revs: Vec::new(),
            undo: Vec::new(),
            finished: false,
        }
    }
}

impl WriteTxn<'_> {
    /// Reads the state as this group has made it so far (its own writes included).
    ///
    /// # Errors
    /// As [`KvStore::range`](super::KvStore::range), with this group's revision and
    /// compaction as the bounds.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResult> {
        let st = self.inner.read_state();
        self.view(&st, self.current_rev).range(req)
    }

    /// Puts one key at a new revision.
    ///
    /// # Errors
    /// [`Error::LeaseNotFound`] when `req.lease` is set (without `ignore_lease`) and
    /// unknown to `leases`; [`Error::KeyNotFound`] when `ignore_value` or `ignore_lease`
    /// names a missing key. Nothing changes on error.
    pub fn put(&mut self, req: &PutRequest, leases: &dyn LeaseLookup) -> Result<PutResult> {
        // etcd checks the lease before looking at the key (applierV3backend.Put).
        if !req.ignore_lease && req.lease != 0 && !leases.lease_exists(req.lease) {
            return Err(Error::LeaseNotFound);
        }
        let mut stamp = Stamp::after(self.current_rev);
        let mark = self.mark();
        let result = self.put_at(&mut stamp, req);
        self.finish(mark, stamp, result)
    }

    /// Deletes every live key of `[req.key, req.range_end)` at one new revision; deleting
    /// nothing takes no revision.
    ///
    /// # Errors
    /// Storage or corruption errors while loading the deleted values; nothing changes then.
    pub fn delete_range(&mut self, req: &DeleteRangeRequest) -> Result<DeleteRangeResult> {
        let mut stamp = Stamp::after(self.current_rev);
        let mark = self.mark();
        let result = self.delete_at(&mut stamp, req);
        self.finish(mark, stamp, result)
    }

    /// Compacts history at `revision`: reads through this group refuse revisions below it
    /// at once, other readers from commit on, and the superseded records leave the index
    /// and storage after commit, in bounded batches (`compaction.rs`).
    ///
    /// # Errors
    /// [`Error::Compacted`] when `revision` is not above the current compaction revision;
    /// [`Error::FutureRevision`] when it is above the current revision.
    pub fn compact(&mut self, revision: i64) -> Result<()> {
        if revision <= self.compact_floor() {
            return Err(Error::Compacted);
        }
        if revision > self.current_rev {
            return Err(Error::FutureRevision);
        }
        // A later compaction in the same group supersedes this one (compactions compose).
        self.compaction = Some(revision);
        Ok(())
    }

    /// Gives access to the batch that [`WriteTxn::commit`] writes, for the caller's own
    /// records (such as the applied raft index) that must be atomic with this group.
    pub fn batch_mut(&mut self) -> &mut Batch {
        &mut self.batch
    }

    /// Writes the group in one atomic engine batch and publishes it to readers; returns
    /// every event in revision order (sub-revision order within a revision).
    ///
    /// # Errors
    /// [`Error::Storage`] when the engine write fails; the group is then rolled back and
    /// nothing of it is visible.
    pub fn commit(mut self) -> Result<Vec<Event>> {
        let mut batch = std::mem::take(&mut self.batch);
        // Encode before taking the write lock: readers wait only for the engine write and
        // the index publication.
        let mut added = 0u64;
        for (event, rev) in self.events.iter().zip(&self.event_revs) {
            let tombstone = event.kind == EventKind::Delete;
            let (key, value) = (rev.to_key(tombstone), codec::encode(&event.kv));
            added = added.saturating_add((key.len() + value.len()) as u64);
            batch.put(Keyspace::Kv, key, value);
        }
        let compaction = self.compaction.take();
        if let Some(rev) = compaction {
            batch.put(Keyspace::Meta, META_COMPACT_REVISION, rev.to_be_bytes().to_vec());
        }
        if self.current_rev != self.base_rev {
            batch.put(
                Keyspace::Meta,
                META_CURRENT_REVISION,
                self.current_rev.to_be_bytes().to_vec(),
            );
        }

        let inner = self.inner;
        let mut st = inner.write_state();
        if !batch.is_empty()
            && let Err(e) = inner.engine.write(batch)
        {
            self.rollback(&mut st, self.start_mark());
            self.finished = true;
            return Err(e.into());
        }
        if let Some(rev) = compaction {
            st.compact_rev = rev;
        }
        st.current_rev = self.current_rev;
        drop(st);
        inner.stored_bytes.fetch_add(added, std::sync::atomic::Ordering::SeqCst);
        self.finished = true;
        if let Some(rev) = compaction {
            // The worker waits for the writer slot, which this group holds until dropped.
            inner.schedule_compaction(rev);
        }
        Ok(std::mem::take(&mut self.events))
    }
}

impl<'a> WriteTxn<'a> {
    /// A view of this group's state reading at `rev`.
    pub(super) fn view<'s>(&'s self, st: &'s State, rev: i64) -> View<'s> {
        View {
            index: &st.index,
            engine: self.inner.engine.as_ref(),
            rev,
            compact_rev: self.compact_floor(),
            pending: Pending { above: self.base_rev, revs: &self.event_revs, events: &self.events },
        }
    }

    /// The compaction revision as this group sees it.
    fn compact_floor(&self) -> i64 {
        self.compaction.unwrap_or(self.base_compact_rev)
    }

    /// Where the group stands now, for [`Self::finish`] to roll a failed request back to.
    pub(super) fn mark(&self) -> Mark {
        Mark { undo: self.undo.len(), events: self.events.len(), current_rev: self.current_rev }
    }

    /// Where the group began, for rolling the whole group back.
    fn start_mark(&self) -> Mark {
        Mark { undo: 0, events: 0, current_rev: self.base_rev }
    }

    /// Ends a request: publishes its revision to the group on success, undoes it on error.
    pub(super) fn finish<T>(&mut self, mark: Mark, stamp: Stamp, result: Result<T>) -> Result<T> {
        match result {
            Ok(v) => {
                if stamp.changed() {
                    self.current_rev = stamp.main;
                }
                Ok(v)
            }
            Err(e) => {
                let inner = self.inner;
                self.rollback(&mut inner.write_state(), mark);
                Err(e)
            }
        }
    }

    /// Undoes every index change and event after `mark`, newest first.
    fn rollback(&mut self, st: &mut State, mark: Mark) {
        for (key, shape) in self.undo.drain(mark.undo..).rev() {
            st.index.restore(&key, shape);
        }
        self.events.truncate(mark.events);
        self.event_revs.truncate(mark.events);
        self.current_rev = mark.current_rev;
    }

    /// Records `event` at `rev`.
    fn push_event(&mut self, rev: Revision, event: Event) {
        self.events.push(event);
        self.event_revs.push(rev);
    }

    /// Puts one key as part of the request `stamp` belongs to; the caller has checked the
    /// lease.
    pub(super) fn put_at(&mut self, stamp: &mut Stamp, req: &PutRequest) -> Result<PutResult> {
        let prev = {
            let st = self.inner.read_state();
            self.view(&st, stamp.read_rev()).get(&req.key, stamp.read_rev())?
        };
        let (value, lease) = match (&prev, req.ignore_value || req.ignore_lease) {
            (None, true) => return Err(Error::KeyNotFound),
            (Some(p), _) => (
                if req.ignore_value { p.value.clone() } else { req.value.clone() },
                if req.ignore_lease { p.lease } else { req.lease },
            ),
            (None, false) => (req.value.clone(), req.lease),
        };
        let rev = stamp.next();
        let kv = KeyValue {
            key: req.key.clone(),
            create_revision: prev.as_ref().map_or(rev.main, |p| p.create_revision),
            mod_revision: rev.main,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            value,
            lease,
        };
        {
            let mut st = self.inner.write_state();
            self.undo.push((req.key.clone(), st.index.shape(&req.key)));
            st.index.put(&req.key, rev);
        }
        let result = PutResult {
            prev_kv: if req.prev_kv { prev.clone() } else { None },
            revision: rev.main,
        };
        // The event always carries the previous key-value: watchers asking for prev_kv and
        // the lease layer (detaching the old lease) both need it.
        self.push_event(rev, Event { kind: EventKind::Put, kv, prev_kv: prev });
        Ok(result)
    }

    /// Deletes a range as part of the request `stamp` belongs to.
    pub(super) fn delete_at(
        &mut self,
        stamp: &mut Stamp,
        req: &DeleteRangeRequest,
    ) -> Result<DeleteRangeResult> {
        let at = stamp.read_rev();
        // Load every victim before touching the index, so a storage error leaves no trace.
        let victims = {
            let st = self.inner.read_state();
            let view = self.view(&st, at);
            let mut revs = Vec::new();
            st.index.visit_live(KeyRange::new(&req.key, &req.range_end), at, |_, state| {
                revs.push(state.modified);
                true
            });
            revs.into_iter().map(|r| view.load(r, true)).collect::<Result<Vec<_>>>()?
        };
        let prev_kvs = if req.prev_kv { victims.clone() } else { Vec::new() };
        let deleted = victims.len() as i64;
        let mut st = self.inner.write_state();
        for prev in victims {
            let rev = stamp.next();
            self.undo.push((prev.key.clone(), st.index.shape(&prev.key)));
            st.index.tombstone(&prev.key, rev);
            let kv =
                KeyValue { key: prev.key.clone(), mod_revision: rev.main, ..KeyValue::default() };
            self.events.push(Event { kind: EventKind::Delete, kv, prev_kv: Some(prev) });
            self.event_revs.push(rev);
        }
        drop(st);
        Ok(DeleteRangeResult { deleted, prev_kvs, revision: stamp.read_rev() })
    }
}

impl Drop for WriteTxn<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let inner = self.inner;
            let start = self.start_mark();
            self.rollback(&mut inner.write_state(), start);
        }
        self.inner.release_writer();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::super::tests::{
        Leases, NoLeases, del_req, put, put_req, range_req, rng, row, rows, store,
    };
    use super::super::*;
    use crate::storage::{Batch, Engine, MemEngine, Scan};

    #[test]
    fn put_flags_keep_old_fields_and_prev_kv_is_returned_only_when_asked() {
        let kv = store();
        let leases = Leases(&[7, 8]);
        let mut w = kv.write();
        let first = PutRequest { lease: 7, ..put_req("k", "v1") };
        assert_eq!(w.put(&first, &leases).unwrap(), PutResult { prev_kv: None, revision: 2 });
        // (request, expected stored key-value, prev_kv in the result)
        let table = [
            (PutRequest { lease: 8, ..put_req("k", "v2") }, ("v2", 8), false),
            (PutRequest { ignore_value: true, lease: 7, ..put_req("k", "") }, ("v2", 7), true),
            (PutRequest { ignore_lease: true, ..put_req("k", "v3") }, ("v3", 7), true),
            (
                PutRequest { ignore_lease: true, ignore_value: true, ..put_req("k", "") },
                ("v3", 7),
                false,
            ),
            (put_req("k", "v4"), ("v4", 0), true),
        ];
        for (i, (req, (value, lease), ask_prev)) in table.into_iter().enumerate() {
            let before = w.range(&range_req("k", "", 0)).unwrap().kvs;
            let req = PutRequest { prev_kv: ask_prev, ..req };
            let res = w.put(&req, &leases).unwrap();
            assert_eq!(res.revision, 3 + i as i64);
            assert_eq!(res.prev_kv, if ask_prev { before.first().cloned() } else { None });
            let now = w.range(&range_req("k", "", 0)).unwrap().kvs;
            assert_eq!((now[0].value.as_slice(), now[0].lease), (value.as_bytes(), lease));
            assert_eq!((now[0].version, now[0].create_revision), (2 + i as i64, 2));
        }
        let events = w.commit().unwrap();
        assert_eq!(events.len(), 6);
        // Every put event but the creating one carries the previous key-value.
        assert!(events[0].prev_kv.is_none());
        for pair in events.windows(2) {
            assert_eq!(pair[1].prev_kv.as_ref(), Some(&pair[0].kv));
            assert_eq!(pair[1].kind, EventKind::Put);
        }
    }

    #[test]
    fn put_errors_change_nothing() {
        let kv = store();
        put(&kv, "a", "1"); // 2
        let mut w = kv.write();
        let cases = [
            (PutRequest { ignore_value: true, ..put_req("missing", "") }, "key"),
            (PutRequest { ignore_lease: true, ..put_req("missing", "x") }, "key"),
            (PutRequest { lease: 99, ..put_req("a", "x") }, "lease"),
            // etcd checks the lease before the key.
            (PutRequest { lease: 99, ignore_value: true, ..put_req("missing", "") }, "lease"),
        ];
        for (req, want) in cases {
            match (w.put(&req, &Leases(&[1])), want) {
                (Err(Error::KeyNotFound), "key") | (Err(Error::LeaseNotFound), "lease") => {}
                (other, _) => panic!("{req:?}: {other:?}"),
            }
        }
        assert_eq!(w.range(&range_req("\0", "\0", 0)).unwrap().revision, 2);
        assert!(w.commit().unwrap().is_empty());
        assert_eq!(kv.current_revision(), 2);
        assert_eq!(rows(&rng(&kv, "\0", "\0", 0).kvs), rows(&[row("a", "1", 2, 2, 1)]));
    }

    #[test]
    fn delete_range_removes_live_keys_at_one_revision() {
        // (key, range_end, deleted keys)
        let table: &[(&str, &str, &[&str])] = &[
            ("b", "", &["b"]),
            ("nope", "", &[]),
            ("b", "c", &["b", "ba", "bb"]),
            ("ba", "\0", &["ba", "bb", "c"]),
            ("\0", "\0", &["a", "b", "ba", "bb", "c"]),
        ];
        for &(key, end, want) in table {
            let kv = store();
            for k in ["a", "b", "ba", "bb", "c"] {
                put(&kv, k, k); // 2..=6
            }
            let mut w = kv.write();
            let res = w.delete_range(&del_req(key, end)).unwrap();
            let events = w.commit().unwrap();
            let deleted: Vec<&[u8]> = res.prev_kvs.iter().map(|kv| kv.key.as_slice()).collect();
            let want_keys: Vec<&[u8]> = want.iter().map(|k| k.as_bytes()).collect();
            assert_eq!(deleted, want_keys, "{key}..{end}");
            assert_eq!(res.deleted, want.len() as i64);
            let rev = if want.is_empty() { 6 } else { 7 };
            assert_eq!((res.revision, kv.current_revision()), (rev, rev));
            assert_eq!(events.len(), want.len());
            for (event, prev) in events.iter().zip(&res.prev_kvs) {
                assert_eq!(event.kind, EventKind::Delete);
                let tomb =
                    KeyValue { key: prev.key.clone(), mod_revision: 7, ..Default::default() };
                assert_eq!((&event.kv, event.prev_kv.as_ref()), (&tomb, Some(prev)));
            }
            assert_eq!(rng(&kv, "\0", "\0", 0).count, 5 - want.len() as i64);
            assert_eq!(rng(&kv, "\0", "\0", 6).count, 5, "history is still readable");
        }
    }

    #[test]
    fn delete_range_returns_prev_kvs_only_when_asked() {
        let kv = store();
        put(&kv, "a", "1");
        let mut w = kv.write();
        let res = w.delete_range(&DeleteRangeRequest { prev_kv: false, ..del_req("a", "") });
        assert_eq!(res.unwrap(), DeleteRangeResult { deleted: 1, prev_kvs: vec![], revision: 3 });
        let events = w.commit().unwrap();
        assert_eq!(events[0].prev_kv.as_ref().map(|p| p.value.as_slice()), Some(&b"1"[..]));
    }

    #[test]
    fn a_group_commits_events_in_revision_order_and_bumps_once_per_changing_request() {
        let kv = store();
        let mut w = kv.write();
        assert_eq!(w.put(&put_req("a", "1"), &NoLeases).unwrap().revision, 2);
        assert_eq!(w.put(&put_req("b", "1"), &NoLeases).unwrap().revision, 3);
        assert_eq!(w.delete_range(&del_req("zzz", "")).unwrap().revision, 3);
        assert_eq!(w.delete_range(&del_req("a", "c")).unwrap().revision, 4);
        assert_eq!(w.put(&put_req("a", "2"), &NoLeases).unwrap().revision, 5);
        w.batch_mut().put(Keyspace::Meta, b"applied".to_vec(), b"42".to_vec());
        // Readers outside the group still see the fresh store.
        assert_eq!(kv.current_revision(), 1);
        assert_eq!(rng(&kv, "a", "", 0).count, 0);
        let events = w.commit().unwrap();
        let got: Vec<(EventKind, &[u8], i64)> =
            events.iter().map(|e| (e.kind, e.kv.key.as_slice(), e.kv.mod_revision)).collect();
        use EventKind::{Delete, Put};
        let want: Vec<(EventKind, &[u8], i64)> = vec![
            (Put, b"a", 2),
            (Put, b"b", 3),
            (Delete, b"a", 4),
            (Delete, b"b", 4),
            (Put, b"a", 5),
        ];
        assert_eq!(got, want);
        assert_eq!(kv.current_revision(), 5);
        assert_eq!(rows(&rng(&kv, "a", "", 0).kvs), rows(&[row("a", "2", 5, 5, 1)]));
        let applied = kv.inner.engine.get(Keyspace::Meta, b"applied").unwrap();
        assert_eq!(applied, Some(b"42".to_vec()));
    }

    #[test]
    fn dropping_a_group_without_commit_rolls_everything_back() {
        let kv = store();
        put(&kv, "a", "1"); // 2
        let before = kv.inner.read_state().index.clone();
        {
            let mut w = kv.write();
            w.put(&put_req("a", "2"), &NoLeases).unwrap();
            w.put(&put_req("new", "x"), &NoLeases).unwrap();
            w.delete_range(&del_req("a", "")).unwrap();
            w.put(&put_req("a", "3"), &NoLeases).unwrap();
        }
        assert_eq!(kv.inner.read_state().index, before);
        assert_eq!(kv.current_revision(), 2);
        // The next group reuses the revisions the dropped one never committed.
        assert_eq!(put(&kv, "b", "1").revision, 3);
        assert_eq!(rng(&kv, "\0", "\0", 0).count, 2);
    }

    /// A [`MemEngine`] whose writes fail on demand.
    struct FailingEngine {
        mem: MemEngine,
        fail: AtomicBool,
    }

    impl Engine for FailingEngine {
        fn get(&self, ks: Keyspace, key: &[u8]) -> crate::storage::Result<Option<Vec<u8>>> {
            self.mem.get(ks, key)
        }
        fn scan(
            &self,
            ks: Keyspace,
            start: &[u8],
            end: Option<&[u8]>,
            visit: &mut dyn FnMut(&[u8], &[u8]) -> Scan,
        ) -> crate::storage::Result<()> {
            self.mem.scan(ks, start, end, visit)
        }
        fn write(&self, batch: Batch) -> crate::storage::Result<()> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(crate::storage::Error::Engine("injected".into()));
            }
            self.mem.write(batch)
        }
        fn sync(&self) -> crate::storage::Result<()> {
            Ok(())
        }
        fn size_on_disk(&self) -> crate::storage::Result<u64> {
            Ok(0)
        }
        fn export(&self) -> crate::storage::Result<Vec<u8>> {
            self.mem.export()
        }
        fn import(&self, image: &[u8]) -> crate::storage::Result<()> {
            self.mem.import(image)
        }
        fn rewrite(&self) -> crate::storage::Result<Box<dyn crate::storage::Rewrite + '_>> {
            self.mem.rewrite()
        }
    }

    #[test]
    fn a_failed_commit_leaves_the_store_as_before() {
        let engine =
            Arc::new(FailingEngine { mem: MemEngine::new(), fail: AtomicBool::new(false) });
        let kv = KvStore::open(engine.clone()).unwrap();
        put(&kv, "a", "1"); // 2
        engine.fail.store(true, Ordering::SeqCst);
        let mut w = kv.write();
        w.put(&put_req("a", "2"), &NoLeases).unwrap();
        w.compact(2).unwrap();
        assert!(matches!(w.commit(), Err(Error::Storage(_))));
        assert_eq!((kv.current_revision(), kv.compact_revision()), (2, 0));
        engine.fail.store(false, Ordering::SeqCst);
        assert_eq!(put(&kv, "a", "3").revision, 3);
        assert_eq!(rows(&rng(&kv, "a", "", 0).kvs), rows(&[row("a", "3", 2, 3, 2)]));
    }

    /// Builds a history with every kind of record, including compacted ones.
    #[test]
    fn a_write_txn_can_move_to_another_thread() {
        fn assert_send<T: Send>(_: &T) {}
        let kv = store();
        let w = kv.write();
        assert_send(&w);
        std::thread::scope(|s| {
            s.spawn(move || {
                let mut w = w;
                w.put(&put_req("a", "1"), &NoLeases).unwrap();
                w.commit().unwrap();
            });
        });
        assert_eq!(kv.current_revision(), 2);
    }
}
