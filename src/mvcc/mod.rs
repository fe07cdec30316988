//! The revisioned keyspace: range, put, delete, txn and compaction with etcd v3 semantics,
//! emitting one [`Event`] per changed key.
//!
//! This module owns the store revision, the in-memory key index and the `Kv` keyspace of
//! the storage engine. It knows nothing of raft, gRPC or protobuf: callers hand it domain
//! requests ([`PutRequest`], [`TxnRequest`], ...) and get domain results and events back.
//! Leases are checked through the [`LeaseLookup`] trait declared here; attaching keys to
//! leases is the lease layer's job, driven by the events.
//!
//! # Revisions
//!
//! A fresh store is at revision 1. Each request that changes something gets the next main
//! revision; the keys a txn or a multi-key delete changes share it, told apart by
//! sub-revisions 0, 1, 2, ... Requests that change nothing (reads, a delete of nothing, a
//! txn whose chosen branch only reads) leave the revision alone.
//!
//! # Persistence layout
//!
//! - `Keyspace::Kv`: key = main revision (8 bytes big-endian) + sub-revision (8 bytes
//!   big-endian), plus the byte `t` for a tombstone; value = the key-value in the format of
//!   `codec.rs` (a tombstone's holds only the key and its deletion revision). Byte order
//!   is revision order, so one scan replays history to rebuild the index in
//!   [`KvStore::open`].
//! - `Keyspace::Meta`: `mvcc/current_revision` and `mvcc/compact_revision`, 8 bytes
//!   big-endian each. The current revision is kept because compaction can delete the
//!   newest record (a tombstone), after which the scan alone would under-report it.
//!
//! # Concurrency
//!
//! One [`WriteTxn`] at a time groups many requests into one atomic engine batch. Its index
//! changes happen in place but only ever append revisions above the committed one, and
//! readers never read above the committed revision, so readers see exactly the state
//! before the group until commit publishes the new revision (etcd's `keyIndex` reasoning).
//! A compaction's index trim is deferred to commit for the same reason.
//!
//! # Layout
//!
//! `revision.rs` (revisions and storage keys), `codec.rs` (the key-value record),
//! `key_index.rs` (one key's generations), `index.rs` (all keys), `range.rs` (reads),
//! `write.rs` ([`WriteTxn`]: put, delete, commit, rollback), `txn.rs` (compares and
//! branches), `compaction.rs`, `history.rs` (reading events back for watchers),
//! `types.rs` (requests and results), `pin.rs` (point-in-time views for snapshots and
//! defragmentation).

mod codec;
mod compaction;
mod history;
mod index;
mod key_index;
mod pin;
mod range;
mod revision;
mod txn;
mod types;
mod write;

use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{
    Arc, Condvar, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak,
};

pub use self::compaction::CompactionPacing;
pub use self::history::{History, HistoryRequest};
pub use self::pin::Pin;
pub use self::types::*;
pub use self::write::WriteTxn;

use self::index::Index;
use self::range::{Pending, View};
use self::revision::Revision;
use crate::storage::{Engine, Keyspace, Scan};

/// Errors of the mvcc layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The requested revision is older than the compaction point.
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    /// The requested revision is newer than the store's current revision.
    #[error("mvcc: required revision is a future revision")]
    FutureRevision,
    /// A put with `ignore_value` or `ignore_lease` named a key that does not exist.
    #[error("key not found")]
    KeyNotFound,
    /// A put named a lease that the [`LeaseLookup`] does not know.
    #[error("requested lease not found")]
    LeaseNotFound,
    /// The storage engine failed.
    #[error(transparent)]
    Storage(#[from] crate::storage::Error),
    /// Data read from storage could not be decoded or contradicts the index.
    #[error("mvcc: corrupt data: {0}")]
    Corrupt(String),
    /// A compaction or a state replacement ran while a [`Pin`] was read; retry.
    #[error("mvcc: pinned view invalidated by a compaction or state replacement; retry")]
    PinInvalidated,
    /// The physical part of a compaction stopped before completing (a storage failure).
    #[error("mvcc: compaction stopped: {0}")]
    Compaction(String),
}

/// Result alias for mvcc operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Tells whether a lease exists; implemented by the lease layer, consumed by puts.
pub trait LeaseLookup {
    /// Returns true when lease `id` is granted and not yet revoked.
    fn lease_exists(&self, id: i64) -> bool;
}

/// Meta record holding the store's current revision.
const META_CURRENT_REVISION: &[u8] = b"mvcc/current_revision";
/// Meta record holding the compaction revision.
const META_COMPACT_REVISION: &[u8] = b"mvcc/compact_revision";

/// The key index and the committed revisions, behind one lock.
///
/// Readers read at `current_rev`, which only [`WriteTxn::commit`] moves forward; the open
/// [`WriteTxn`] may already have appended newer revisions to `index`, which those reads
/// skip.
#[derive(Debug)]
struct State {
    index: Index,
    /// The newest committed revision.
    current_rev: i64,
    /// The newest committed compaction revision (0 when never compacted).
    compact_rev: i64,
}

impl State {
    /// A reader's view of the committed state, with values loaded from `engine`.
    fn committed_view<'a>(&'a self, engine: &'a dyn Engine) -> View<'a> {
        View {
            index: &self.index,
            engine,
            rev: self.current_rev,
            compact_rev: self.compact_rev,
            pending: Pending::NONE,
        }
    }
}

/// What every clone of a [`KvStore`] shares.
struct Inner {
    engine: Arc<dyn Engine>,
    state: RwLock<State>,
    /// True while a [`WriteTxn`] exists; a flag rather than a held `MutexGuard` so that a
    /// `WriteTxn` can move between threads (an apply task on a multi-threaded runtime).
    writer_busy: Mutex<bool>,
    writer_free: Condvar,
    /// Bumped before the engine's content is replaced (see `pin.rs`).
    epoch: AtomicU64,
    /// The newest compaction revision whose physical part has begun (see `pin.rs`).
    deleting_rev: AtomicI64,
    /// Bytes (storage key plus value) of the records in the `Kv` keyspace.
    stored_bytes: AtomicU64,
    /// Progress of the physical part of compactions (`compaction.rs`).
    compaction: Mutex<compaction::Progress>,
    /// Signalled when a compaction's physical part completes or stops.
    compaction_done: Condvar,
    /// This handle, for starting the compaction worker from a `&Inner`.
    me: Weak<Inner>,
}

impl Inner {
    // A poisoned lock means a panic happened while it was held. Every mutation under the
    // state lock is a sequence of infallible in-memory steps, and nothing in this module
    // panics by design, so the state is taken as it is rather than failing every later call.
    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn release_writer(&self) {
        *self.writer_busy.lock().unwrap_or_else(PoisonError::into_inner) = false;
        self.writer_free.notify_one();
    }
}

/// A handle to the revisioned keyspace; cloning is cheap and clones share the store.
#[derive(Clone)]
pub struct KvStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.inner.read_state();
        f.debug_struct("KvStore")
            .field("current_revision", &st.current_rev)
            .field("compact_revision", &st.compact_rev)
            .finish_non_exhaustive()
    }
}

impl KvStore {
    /// Opens the store kept in `engine`, rebuilding the key index from the `Kv` keyspace.
    ///
    /// An empty engine gives a fresh store at revision 1.
    ///
    /// # Errors
    /// [`Error::Storage`] when the engine fails; [`Error::Corrupt`] when a stored record or
    /// meta value does not decode.
    pub fn open(engine: Arc<dyn Engine>) -> Result<KvStore> {
        let (state, bytes) = load_state(engine.as_ref())?;
        let compact_rev = state.compact_rev;
        let inner = compaction::new_inner(|me| Inner {
            engine,
            state: RwLock::new(state),
            writer_busy: Mutex::new(false),
            writer_free: Condvar::new(),
            epoch: AtomicU64::new(0),
            deleting_rev: AtomicI64::new(0),
            stored_bytes: AtomicU64::new(bytes),
            compaction: Mutex::new(compaction::Progress::default()),
            compaction_done: Condvar::new(),
            me,
        });
        // Records a compaction had not yet deleted (a restart, or a snapshot taken
        // mid-compaction) came back into the index: plan their removal again.
        inner.restart_compaction(compact_rev);
        Ok(KvStore { inner })
    }

    /// Rebuilds the key index and revisions from the engine, after its whole content was
    /// replaced (a snapshot from the leader). Waits for, and blocks, writers meanwhile.
    ///
    /// # Errors
    /// As [`KvStore::open`]; the store is unchanged on error.
    pub fn reload(&self) -> Result<()> {
        self.replace(|| Ok(()))
    }

    /// Replaces the engine's whole content with `import` and rebuilds the key index and
    /// revisions from it. Waits for the open write group; no write group, compaction batch
    /// or pin starts until it is done, and every existing [`Pin`] is invalidated first.
    ///
    /// # Errors
    /// `import`'s error (the store is then unchanged if `import` changed nothing), or as
    /// [`KvStore::open`].
    pub fn replace(&self, import: impl FnOnce() -> Result<()>) -> Result<()> {
        let inner = &self.inner;
        // Holding the writer mutex (with no group open) keeps every writer out, the
        // compaction worker included, for the whole replacement.
        let mut busy = inner.writer_busy.lock().unwrap_or_else(PoisonError::into_inner);
        while *busy {
            busy = inner.writer_free.wait(busy).unwrap_or_else(PoisonError::into_inner);
        }
        inner.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        import()?;
        let (state, bytes) = load_state(inner.engine.as_ref())?;
        let compact_rev = state.compact_rev;
        *inner.write_state() = state;
        inner.stored_bytes.store(bytes, std::sync::atomic::Ordering::SeqCst);
        drop(busy);
        inner.restart_compaction(compact_rev);
        Ok(())
    }

    /// Reads committed state as of `req.revision` (`<= 0` for the newest); never sees a
    /// write group that has not committed.
    ///
    /// # Errors
    /// [`Error::FutureRevision`] above the current revision, [`Error::Compacted`] below the
    /// compaction revision, and storage or corruption errors while loading values.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResult> {
        let st = self.inner.read_state();
        // The read lock is held while values load: a commit's compaction deletes records,
        // and must not do so under a reader that still holds the old index.
        st.committed_view(self.inner.engine.as_ref()).range(req)
    }

    /// Returns the newest committed revision (1 for a fresh store, as etcd).
    pub fn current_revision(&self) -> i64 {
        self.inner.read_state().current_rev
    }

    /// Returns the bytes (storage keys plus encoded values) of the records the `Kv`
    /// keyspace holds, those awaiting a compaction's deletion included: exact, kept up to
    /// date by commits and compaction batches.
    pub fn stored_bytes(&self) -> u64 {
        self.inner.stored_bytes.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Returns the revision of the last compaction, 0 when the store was never compacted.
    pub fn compact_revision(&self) -> i64 {
        self.inner.read_state().compact_rev
    }

    /// Hashes every stored revision up to `revision` (`<= 0` for the newest), as etcd's
    /// `HashKV` does, so members can be compared. Returns `(hash, compact revision, hashed
    /// revision)`.
    ///
    /// The hash is a CRC32 (IEEE) over each record's storage key and value in revision order,
    /// counting at or below the compaction revision only the records that compaction keeps
    /// (etcd's `HashByRev` keeps the same set), so two members that applied the same log
    /// hash equally however far their physical compaction has come.
    ///
    /// # Errors
    /// [`Error::FutureRevision`] above the current revision, [`Error::Compacted`] at or below
    /// the compaction revision, and storage errors.
    pub fn hash_kv(&self, revision: i64) -> Result<(u32, i64, i64)> {
        let st = self.inner.read_state();
        let rev = if revision <= 0 { st.current_rev } else { revision };
        if rev > st.current_rev {
            return Err(Error::FutureRevision);
        }
        // etcd refuses an explicit revision at the compaction revision too (`HashByRev`:
        // `rev > 0 && rev <= compactRev`), unlike a range read.
        if rev < st.compact_rev || (revision > 0 && rev == st.compact_rev) {
            return Err(Error::Compacted);
        }
        let end = Revision::new(rev.saturating_add(1), 0).to_key(false);
        let mut hasher = crc32fast::Hasher::new();
        let mut failure = None;
        self.inner.engine.scan(Keyspace::Kv, b"", Some(&end), &mut |k, v| {
            let kept = Revision::from_key(k)
                .and_then(|(r, tomb)| compaction::is_kept(&st.index, r, tomb, v, st.compact_rev));
            match kept {
                Ok(true) => {
                    hasher.update(k);
                    hasher.update(v);
                    Scan::Continue
                }
                Ok(false) => Scan::Continue,
                Err(e) => {
                    failure = Some(e);
                    Scan::Stop
                }
            }
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        Ok((hasher.finalize(), st.compact_rev, rev))
    }

    /// Starts a write group, waiting while another [`WriteTxn`] is open.
    ///
    /// Calling this again on the same thread while holding a `WriteTxn` deadlocks.
    pub fn write(&self) -> WriteTxn<'_> {
        WriteTxn::begin(&self.inner)
    }
}

/// The `Kv` keyspace record of one change at revision `(main, sub)`, for tools that write
/// a store's records directly (restoring a snapshot taken from etcd). A tombstone's `kv`
/// holds the key and, as its mod revision, the deletion's main revision.
pub fn storage_record(main: i64, sub: i64, tombstone: bool, kv: &KeyValue) -> (Vec<u8>, Vec<u8>) {
    (Revision::new(main, sub).to_key(tombstone), codec::encode(kv))
}

/// The `Meta` keyspace records that give a store written with [`storage_record`] its
/// current and compaction revisions.
pub fn revision_records(current: i64, compacted: i64) -> [(Vec<u8>, Vec<u8>); 2] {
    [
        (META_CURRENT_REVISION.to_vec(), current.to_be_bytes().to_vec()),
        (META_COMPACT_REVISION.to_vec(), compacted.to_be_bytes().to_vec()),
    ]
}

/// Loads the key index and revisions kept in `engine`, with the bytes of its records.
fn load_state(engine: &dyn Engine) -> Result<(State, u64)> {
    let compact_rev = read_meta(engine, META_COMPACT_REVISION)?.unwrap_or(0);
    let mut current_rev = read_meta(engine, META_CURRENT_REVISION)?.unwrap_or(1);
    let mut index = Index::default();
    let mut failure = None;
    let mut bytes = 0u64;
    engine.scan(
        Keyspace::Kv,
        b"",
        None,
        &mut |key, value| match replay(&mut index, key, value) {
            Ok(rev) => {
                current_rev = current_rev.max(rev.main);
                bytes = bytes.saturating_add((key.len() + value.len()) as u64);
                Scan::Continue
            }
            Err(e) => {
                failure = Some(e);
                Scan::Stop
            }
        },
    )?;
    if let Some(e) = failure {
        return Err(e);
    }
    let state = State { index, current_rev: current_rev.max(compact_rev).max(1), compact_rev };
    Ok((state, bytes))
}

/// Reads an 8-byte big-endian meta record.
fn read_meta(engine: &dyn Engine, key: &[u8]) -> Result<Option<i64>> {
    engine
        .get(Keyspace::Meta, key)?
        .map(|bytes| {
            <[u8; 8]>::try_from(bytes.as_slice()).map(i64::from_be_bytes).map_err(|_| {
                Error::Corrupt(format!("meta {} is {} bytes", key.escape_ascii(), bytes.len()))
            })
        })
        .transpose()
}

/// Replays one stored record into `index`, returning its revision.
fn replay(index: &mut Index, key: &[u8], value: &[u8]) -> Result<Revision> {
    let (rev, tombstone) = Revision::from_key(key)?;
    let kv = codec::decode(value, false)?;
    index.replay(&kv.key, rev, tombstone, kv.create_revision, kv.version);
    Ok(rev)
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::storage::{Batch, MemEngine, SledEngine};

    /// A lease lookup that knows no lease.
    pub(crate) struct NoLeases;

    impl LeaseLookup for NoLeases {
        fn lease_exists(&self, _: i64) -> bool {
            false
        }
    }

    /// A lease lookup that knows exactly the listed leases.
    pub(crate) struct Leases(pub &'static [i64]);

    impl LeaseLookup for Leases {
        fn lease_exists(&self, id: i64) -> bool {
            self.0.contains(&id)
        }
    }

    pub(crate) fn store() -> KvStore {
        KvStore::open(Arc::new(MemEngine::new())).unwrap()
    }

    pub(crate) fn put_req(key: &str, value: &str) -> PutRequest {
        PutRequest { key: key.into(), value: value.into(), ..Default::default() }
    }

    pub(crate) fn del_req(key: &str, end: &str) -> DeleteRangeRequest {
        DeleteRangeRequest { key: key.into(), range_end: end.into(), prev_kv: true }
    }

    pub(crate) fn range_req(key: &str, end: &str, revision: i64) -> RangeRequest {
        RangeRequest { key: key.into(), range_end: end.into(), revision, ..Default::default() }
    }

    /// Puts in a group of its own.
    pub(crate) fn put(kv: &KvStore, key: &str, value: &str) -> PutResult {
        let mut w = kv.write();
        let res = w.put(&put_req(key, value), &NoLeases).unwrap();
        w.commit().unwrap();
        res
    }

    /// Deletes `[key, end)` in a group of its own, asking for the previous key-values.
    pub(crate) fn del(kv: &KvStore, key: &str, end: &str) -> DeleteRangeResult {
        let mut w = kv.write();
        let res = w.delete_range(&del_req(key, end)).unwrap();
        w.commit().unwrap();
        res
    }

    pub(crate) fn rng(kv: &KvStore, key: &str, end: &str, revision: i64) -> RangeResult {
        kv.range(&range_req(key, end, revision)).unwrap()
    }

    /// The (key, value, create, mod, version, lease) of each key-value, for compact asserts.
    pub(crate) fn rows(kvs: &[KeyValue]) -> Vec<(String, String, i64, i64, i64, i64)> {
        kvs.iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv.key).into_owned(),
                    String::from_utf8_lossy(&kv.value).into_owned(),
                    kv.create_revision,
                    kv.mod_revision,
                    kv.version,
                    kv.lease,
                )
            })
            .collect()
    }

    pub(crate) fn row(
        key: &str,
        value: &str,
        create: i64,
        modified: i64,
        version: i64,
    ) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.into(),
            create_revision: create,
            mod_revision: modified,
            version,
            lease: 0,
        }
    }

    #[test]
    fn a_fresh_store_is_at_revision_one_and_the_first_write_gets_two() {
        let kv = store();
        assert_eq!(kv.current_revision(), 1);
        assert_eq!(kv.compact_revision(), 0);
        assert_eq!(rng(&kv, "a", "", 0), RangeResult { revision: 1, ..Default::default() });
        assert_eq!(put(&kv, "a", "1").revision, 2);
        assert_eq!(kv.current_revision(), 2);
    }

    #[test]
    fn revisions_and_versions_follow_puts_deletes_and_recreates() {
        let kv = store();
        put(&kv, "k", "v1"); // 2
        put(&kv, "k", "v2"); // 3
        assert_eq!(del(&kv, "k", "").deleted, 1); // 4
        put(&kv, "k", "v3"); // 5
        put(&kv, "k", "v4"); // 6
        // (read revision, expected key-value or None)
        let table = [
            (1, None),
            (2, Some(row("k", "v1", 2, 2, 1))),
            (3, Some(row("k", "v2", 2, 3, 2))),
            (4, None),
            (5, Some(row("k", "v3", 5, 5, 1))),
            (6, Some(row("k", "v4", 5, 6, 2))),
            (0, Some(row("k", "v4", 5, 6, 2))),
        ];
        for (at, want) in table {
            let got = rng(&kv, "k", "", at);
            assert_eq!(got.kvs.first().cloned(), want, "at {at}");
            assert_eq!(got.revision, 6, "the header revision is the current one");
        }
    }

    fn build_history(kv: &KvStore) {
        put(kv, "a", "1"); // 2
        put(kv, "b", "1"); // 3
        put(kv, "a", "2"); // 4
        del(kv, "b", ""); // 5
        put(kv, "b", "2"); // 6
        let mut w = kv.write();
        w.put(&PutRequest { lease: 5, ..put_req("c", "1") }, &Leases(&[5])).unwrap(); // 7
        w.compact(4).unwrap();
        w.commit().unwrap();
        kv.wait_compacted(4).unwrap();
        put(kv, "c", "2"); // 8
        del(kv, "a", ""); // 9
        put(kv, "d", "1"); // 10
        del(kv, "d", ""); // 11
    }

    fn assert_same_state(a: &KvStore, b: &KvStore) {
        let (sa, sb) = (a.inner.read_state(), b.inner.read_state());
        assert_eq!(sa.index, sb.index);
        assert_eq!((sa.current_rev, sa.compact_rev), (sb.current_rev, sb.compact_rev));
        drop((sa, sb));
        for at in a.compact_revision()..=a.current_revision() {
            assert_eq!(rng(a, "\0", "\0", at), rng(b, "\0", "\0", at), "at {at}");
        }
    }

    #[test]
    fn reopening_a_sled_store_rebuilds_identical_state() {
        let dir = tempfile::tempdir().unwrap();
        let first = KvStore::open(Arc::new(SledEngine::open(dir.path()).unwrap())).unwrap();
        build_history(&first);
        let reference = store();
        build_history(&reference);
        assert_same_state(&first, &reference);
        drop(first);

        let reopened = KvStore::open(Arc::new(SledEngine::open(dir.path()).unwrap())).unwrap();
        reopened.wait_compacted(4).unwrap();
        assert_same_state(&reopened, &reference);
        assert_eq!((reopened.current_revision(), reopened.compact_revision()), (11, 4));
        // Writing after the reopen continues the history.
        assert_eq!(put(&reopened, "c", "3").revision, 12);
        let c = rng(&reopened, "c", "", 0).kvs;
        assert_eq!(rows(&c), vec![("c".into(), "3".into(), 7, 12, 3, 0)]);
    }

    #[test]
    fn reopening_keeps_the_revision_when_compaction_removed_the_newest_record() {
        let engine = Arc::new(MemEngine::new());
        let kv = KvStore::open(engine.clone()).unwrap();
        put(&kv, "a", "1"); // 2
        del(&kv, "a", ""); // 3
        let mut w = kv.write();
        w.compact(3).unwrap();
        w.commit().unwrap();
        kv.wait_compacted(3).unwrap();
        let mut records = 0;
        engine
            .scan(Keyspace::Kv, b"", None, &mut |_, _| {
                records += 1;
                Scan::Continue
            })
            .unwrap();
        assert_eq!(records, 0);
        let reopened = KvStore::open(engine).unwrap();
        assert_eq!((reopened.current_revision(), reopened.compact_revision()), (3, 3));
        assert_eq!(reopened.inner.read_state().index.len(), 0);
    }

    #[test]
    fn undecodable_storage_is_reported_as_corrupt() {
        let cases: [(&[u8], &[u8], Keyspace); 3] = [
            (b"short", b"", Keyspace::Kv),
            (&[0; 16], &[7, 7], Keyspace::Kv),
            (META_CURRENT_REVISION, b"123", Keyspace::Meta),
        ];
        for (key, value, ks) in cases {
            let engine = Arc::new(MemEngine::new());
            let mut b = Batch::new();
            b.put(ks, key.to_vec(), value.to_vec());
            engine.write(b).unwrap();
            assert!(matches!(KvStore::open(engine), Err(Error::Corrupt(_))), "{key:?}");
        }
        // A record the index points at but storage lost is corrupt at read time.
        let engine = Arc::new(MemEngine::new());
        let kv = KvStore::open(engine.clone()).unwrap();
        put(&kv, "a", "1");
        let mut b = Batch::new();
        b.delete(Keyspace::Kv, Revision::new(2, 0).to_key(false));
        engine.write(b).unwrap();
        assert!(matches!(kv.range(&range_req("a", "", 0)), Err(Error::Corrupt(_))));
    }

    #[test]
    fn concurrent_readers_never_see_a_partial_group() {
        let kv = store();
        // Each group moves one unit from one of 4 keys to another within a txn-free pair of
        // puts; a reader that saw half a group would see a total other than 400.
        for k in 0..4 {
            put(&kv, &format!("k{k}"), "100");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (kv, stop) = (kv.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut reads = 0;
                    while !stop.load(Ordering::SeqCst) || reads == 0 {
                        let res = rng(&kv, "k", "l", 0);
                        let total: i64 = res
                            .kvs
                            .iter()
                            .map(|kv| {
                                std::str::from_utf8(&kv.value).unwrap().parse::<i64>().unwrap()
                            })
                            .sum();
                        assert_eq!((res.count, total), (4, 400), "at {}", res.revision);
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        for i in 0..300 {
            let (from, to) = (format!("k{}", i % 4), format!("k{}", (i + 1) % 4));
            let mut w = kv.write();
            let value = |w: &WriteTxn<'_>, k: &str| -> i64 {
                let kvs = w.range(&range_req(k, "", 0)).unwrap().kvs;
                std::str::from_utf8(&kvs[0].value).unwrap().parse().unwrap()
            };
            let (a, b) = (value(&w, &from), value(&w, &to));
            w.put(&put_req(&from, &(a - 1).to_string()), &NoLeases).unwrap();
            w.put(&put_req(&to, &(b + 1).to_string()), &NoLeases).unwrap();
            w.commit().unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        for r in readers {
            assert!(r.join().unwrap() > 0);
        }
        assert_eq!(kv.current_revision(), 5 + 600);
    }
}
