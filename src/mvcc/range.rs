//! Range reads: a [`View`] of the store at some revision, and the execution of a
//! [`RangeRequest`] over it with etcd's limit, filter, sort and count rules
//! (etcd's `server/etcdserver/txn/range.go` and `mvcc/kvstore_txn.go`).
//!
//! The index answers which revision holds each key, its version and create revision; the
//! engine (or, for a writer, its pending changes) supplies values. Filters and sorts on
//! those index fields run before any value is loaded, so a limited read loads at most
//! `limit` values unless it sorts by value.

use super::codec;
use super::index::{Index, KeyRange};
use super::key_index::KeyRev;
use super::revision::Revision;
use super::{
    Error, Event, EventKind, KeyValue, RangeRequest, RangeResult, Result, SortOrder, SortTarget,
};
use crate::storage::{Engine, Keyspace};

/// Changes a writer has made but not yet committed, readable by that writer only.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pending<'a> {
    /// Every pending change has a main revision above this (the last committed revision).
    pub above: i64,
    /// The revision of each entry of `events`, ascending.
    pub revs: &'a [Revision],
    /// The pending changes, in revision order.
    pub events: &'a [Event],
}

impl Pending<'_> {
    /// No pending changes: what committed readers see.
    pub(super) const NONE: Pending<'static> = Pending { above: i64::MAX, revs: &[], events: &[] };
}

/// A consistent read-only view: an index, where values live, and the revision bounds.
pub(super) struct View<'a> {
    /// The key index (shared with a writer that only appends revisions above `rev`).
    pub index: &'a Index,
    /// Where committed values live.
    pub engine: &'a dyn Engine,
    /// The newest revision this view may read: the store's current revision as seen here.
    pub rev: i64,
    /// Reads below this revision fail with [`Error::Compacted`].
    pub compact_rev: i64,
    /// The writer's uncommitted changes, when the view belongs to a writer.
    pub pending: Pending<'a>,
}

impl View<'_> {
    /// Loads the key-value stored at `rev`, without its value unless `with_value`.
    ///
    /// # Errors
    /// [`Error::Corrupt`] when the index names a revision that storage does not hold or
    /// that does not decode; [`Error::Storage`] when the engine fails.
    pub(super) fn load(&self, rev: Revision, with_value: bool) -> Result<KeyValue> {
        if rev.main > self.pending.above {
            let event = self
                .pending
                .revs
                .binary_search(&rev)
                .ok()
                .and_then(|i| self.pending.events.get(i))
                .filter(|e| e.kind == EventKind::Put)
                .ok_or_else(|| Error::Corrupt(format!("pending revision {rev:?} not found")))?;
            let kv = &event.kv;
            return Ok(KeyValue {
                key: kv.key.clone(),
                value: if with_value { kv.value.clone() } else { Vec::new() },
                ..*kv
            });
        }
        let bytes = self
            .engine
            .get(Keyspace::Kv, &rev.to_key(false))?
            .ok_or_else(|| Error::Corrupt(format!("revision {rev:?} missing from storage")))?;
        codec::decode(&bytes, with_value)
    }

    /// Loads the newest key-value of `key` at main revision `at`, with its value.
    pub(super) fn get(&self, key: &[u8], at: i64) -> Result<Option<KeyValue>> {
        self.index.get(key, at).map(|state| self.load(state.modified, true)).transpose()
    }

    /// Checks a requested read revision against this view: `<= 0` means [`View::rev`].
    ///
    /// # Errors
    /// [`Error::FutureRevision`] above the view's revision, [`Error::Compacted`] below the
    /// compaction point (reading exactly at it is allowed).
    pub(super) fn read_revision(&self, requested: i64) -> Result<i64> {
        if requested > self.rev {
            return Err(Error::FutureRevision);
        }
        let at = if requested <= 0 { self.rev } else { requested };
        if at < self.compact_rev {
            return Err(Error::Compacted);
        }
        Ok(at)
    }

    /// Executes a range read; `RangeResult::revision` is this view's revision even when
    /// reading at an older one, as etcd's response header is.
    ///
    /// # Errors
    /// See [`View::read_revision`]; also storage and corruption errors from loading values.
    pub(super) fn range(&self, req: &RangeRequest) -> Result<RangeResult> {
        let at = self.read_revision(req.revision)?;
        let range = KeyRange::new(&req.key, &req.range_end);
        if req.count_only {
            return Ok(RangeResult {
                count: self.index.count(range, at),
                revision: self.rev,
                ..RangeResult::default()
            });
        }

        let order = effective_order(req.sort_target, req.sort_order);
        let limit = usize::try_from(req.limit).ok().filter(|&l| l > 0);
        // Without a sort, index order is the answer order, so one key past the limit is
        // enough to know whether there is `more`; sorting needs every match.
        let collect_max = match (order, limit) {
            (SortOrder::None, Some(l)) => l.saturating_add(1),
            _ => usize::MAX,
        };
        let mut count = 0;
        let mut matches: Vec<(&[u8], KeyRev)> = Vec::new();
        self.index.visit_live(range, at, |key, state| {
            // `count` is every live key of the range: limit and filters never change it.
            count += 1;
            if matches.len() < collect_max && passes_filters(req, &state) {
                matches.push((key, state));
            }
            true
        });

        let by_value = order != SortOrder::None && req.sort_target == SortTarget::Value;
        let mut more = false;
        if !by_value {
            sort_by_index(&mut matches, req.sort_target, order);
            more = truncate(&mut matches, limit);
        }
        // Sorting by value needs the values even for keys-only reads; they are dropped
        // after the sort, as etcd drops them after sorting.
        let with_value = !req.keys_only || by_value;
        let mut kvs = Vec::with_capacity(matches.len());
        for (key, state) in &matches {
            let kv = self.load(state.modified, with_value)?;
            if kv.key != *key {
                return Err(Error::Corrupt(format!(
                    "revision {:?} holds key {:?}, index says {:?}",
                    state.modified, kv.key, key
                )));
            }
            kvs.push(kv);
        }
        if by_value {
            match order {
                SortOrder::Descend => kvs.sort_by(|a, b| b.value.cmp(&a.value)),
                _ => kvs.sort_by(|a, b| a.value.cmp(&b.value)),
            }
            more = truncate(&mut kvs, limit);
            if req.keys_only {
                kvs.iter_mut().for_each(|kv| kv.value = Vec::new());
            }
        }
        Ok(RangeResult { kvs, more, count, revision: self.rev })
    }
}

/// Applies etcd's defaulting of the sort order (range.go): a non-key target with no order
/// sorts ascending, and key-ascending is the natural order, so it needs no sort.
fn effective_order(target: SortTarget, order: SortOrder) -> SortOrder {
    match (target, order) {
        (SortTarget::Key, SortOrder::Ascend) => SortOrder::None,
        (SortTarget::Key, order) => order,
        (_, SortOrder::None) => SortOrder::Ascend,
        (_, order) => order,
    }
}

/// Returns whether a key passes the min/max mod and create revision filters (0 = none).
fn passes_filters(req: &RangeRequest, state: &KeyRev) -> bool {
    let m = state.modified.main;
    let c = state.created;
    !(req.max_mod_revision != 0 && m > req.max_mod_revision
        || req.min_mod_revision != 0 && m < req.min_mod_revision
        || req.max_create_revision != 0 && c > req.max_create_revision
        || req.min_create_revision != 0 && c < req.min_create_revision)
}

/// Sorts by a field the index knows. The sort is stable, so ties keep ascending key order.
fn sort_by_index(matches: &mut [(&[u8], KeyRev)], target: SortTarget, order: SortOrder) {
    let field = |s: &KeyRev| match target {
        SortTarget::Version => s.version,
        SortTarget::Create => s.created,
        SortTarget::Mod => s.modified.main,
        // Keys are handled below; values never reach this function.
        SortTarget::Key | SortTarget::Value => 0,
    };
    match (target, order) {
        (_, SortOrder::None) => {}
        (SortTarget::Key, SortOrder::Descend) => matches.reverse(),
        (SortTarget::Key, SortOrder::Ascend) => {}
        (_, SortOrder::Ascend) => matches.sort_by_key(|m| field(&m.1)),
        (_, SortOrder::Descend) => matches.sort_by_key(|m| std::cmp::Reverse(field(&m.1))),
    }
}

/// Cuts `items` to `limit`, returning true when something was cut (etcd's `more`).
fn truncate<T>(items: &mut Vec<T>, limit: Option<usize>) -> bool {
    match limit {
        Some(l) if items.len() > l => {
            items.truncate(l);
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{put, range_req, rng, store};
    use super::super::{Error, KvStore, RangeRequest, SortOrder, SortTarget};

    /// Final state at revision 8:
    /// a = "t" (create 2, mod 8, version 3), b = "w" (3, 5, 2), c = "x" (4, 4, 1),
    /// d = "v" (6, 6, 1).
    fn fixture() -> KvStore {
        let kv = store();
        for (k, v) in [("a", "z"), ("b", "y"), ("c", "x"), ("b", "w"), ("d", "v")] {
            put(&kv, k, v);
        }
        put(&kv, "a", "u");
        put(&kv, "a", "t");
        kv
    }

    fn all() -> RangeRequest {
        range_req("\0", "\0", 0)
    }

    fn keys(kv: &KvStore, req: &RangeRequest) -> (String, bool, i64) {
        let res = kv.range(req).unwrap();
        let keys: String = res.kvs.iter().map(|kv| String::from_utf8_lossy(&kv.key)).collect();
        (keys, res.more, res.count)
    }

    #[test]
    fn sort_targets_and_orders_follow_etcd() {
        let kv = fixture();
        use SortOrder::{Ascend, Descend, None};
        use SortTarget::{Create, Key, Mod, Value, Version};
        let table = [
            (Key, None, "abcd"),
            (Key, Ascend, "abcd"),
            (Key, Descend, "dcba"),
            // A non-key target without an order sorts ascending; ties keep key order.
            (Version, None, "cdba"),
            (Version, Ascend, "cdba"),
            (Version, Descend, "abcd"),
            (Create, Ascend, "abcd"),
            (Create, Descend, "dcba"),
            (Mod, None, "cbda"),
            (Mod, Descend, "adbc"),
            (Value, None, "adbc"),
            (Value, Descend, "cbda"),
        ];
        for (target, order, want) in table {
            let req = RangeRequest { sort_target: target, sort_order: order, ..all() };
            assert_eq!(keys(&kv, &req), (want.to_owned(), false, 4), "{target:?} {order:?}");
        }
    }

    #[test]
    fn limit_filters_and_sorting_decide_more_but_never_count() {
        let kv = fixture();
        let sorted = |limit| RangeRequest {
            limit,
            sort_target: SortTarget::Mod,
            sort_order: SortOrder::Descend,
            ..all()
        };
        let by_value = |limit| RangeRequest { limit, sort_target: SortTarget::Value, ..all() };
        let table = [
            (RangeRequest { limit: 1, ..all() }, "a", true),
            (RangeRequest { limit: 3, ..all() }, "abc", true),
            (RangeRequest { limit: 4, ..all() }, "abcd", false),
            (RangeRequest { limit: 9, ..all() }, "abcd", false),
            (RangeRequest { limit: -1, ..all() }, "abcd", false),
            (sorted(2), "ad", true),
            (sorted(4), "adbc", false),
            (by_value(1), "a", true),
            (by_value(3), "adb", true),
            (RangeRequest { min_mod_revision: 5, ..all() }, "abd", false),
            (RangeRequest { max_mod_revision: 5, ..all() }, "bc", false),
            (RangeRequest { min_create_revision: 3, ..all() }, "bcd", false),
            (RangeRequest { max_create_revision: 3, ..all() }, "ab", false),
            (RangeRequest { min_mod_revision: 5, max_create_revision: 3, ..all() }, "ab", false),
            (RangeRequest { min_mod_revision: 5, limit: 2, ..all() }, "ab", true),
            (RangeRequest { min_mod_revision: 8, limit: 1, ..all() }, "a", false),
            (RangeRequest { min_mod_revision: 9, ..all() }, "", false),
            (RangeRequest { min_mod_revision: 5, ..sorted(2) }, "ad", true),
            (
                RangeRequest { range_end: b"d".to_vec(), limit: 2, ..range_req("b", "", 0) },
                "bc",
                false,
            ),
        ];
        for (req, want, more) in table {
            let count = if req.key == b"b" { 2 } else { 4 };
            assert_eq!(keys(&kv, &req), (want.to_owned(), more, count), "{req:?}");
        }
    }

    #[test]
    fn keys_only_and_count_only_trim_the_answer() {
        let kv = fixture();
        let res = kv.range(&RangeRequest { keys_only: true, ..all() }).unwrap();
        let full = rng(&kv, "\0", "\0", 0);
        assert_eq!(res.kvs.len(), 4);
        for (k, f) in res.kvs.iter().zip(&full.kvs) {
            assert!(k.value.is_empty());
            assert_eq!(
                (&k.key, k.create_revision, k.mod_revision, k.version),
                (&f.key, f.create_revision, f.mod_revision, f.version)
            );
        }
        let by_value = RangeRequest { keys_only: true, sort_target: SortTarget::Value, ..all() };
        let res = kv.range(&by_value).unwrap();
        assert!(res.kvs.iter().all(|kv| kv.value.is_empty()));
        assert_eq!(keys(&kv, &by_value).0, "adbc", "sorting by value still uses the values");

        let res = kv.range(&RangeRequest { count_only: true, limit: 1, ..all() }).unwrap();
        assert_eq!((res.kvs.len(), res.more, res.count, res.revision), (0, false, 4, 8));
    }

    #[test]
    fn old_revisions_read_history_with_the_current_header_revision() {
        let kv = fixture();
        let at4 = rng(&kv, "\0", "\0", 4);
        let values: Vec<&[u8]> = at4.kvs.iter().map(|kv| kv.value.as_slice()).collect();
        assert_eq!(values, [&b"z"[..], b"y", b"x"]);
        assert_eq!((at4.count, at4.revision), (3, 8));
        assert_eq!(rng(&kv, "a", "", 7).kvs[0].version, 2);
        assert_eq!(rng(&kv, "\0", "\0", 1).count, 0);
        assert_eq!(rng(&kv, "\0", "\0", 8), rng(&kv, "\0", "\0", -3), "negative is current");
    }

    #[test]
    fn future_and_compacted_revisions_are_refused() {
        let kv = fixture();
        assert!(matches!(kv.range(&range_req("a", "", 9)), Err(Error::FutureRevision)));
        let mut w = kv.write();
        w.compact(5).unwrap();
        w.commit().unwrap();
        assert!(matches!(kv.range(&range_req("a", "", 4)), Err(Error::Compacted)));
        let counted = RangeRequest { count_only: true, ..range_req("a", "", 4) };
        assert!(matches!(kv.range(&counted), Err(Error::Compacted)));
        assert_eq!(rng(&kv, "\0", "\0", 5).count, 3, "the compaction revision stays readable");
    }
}
