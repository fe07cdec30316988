//! Reading history back: the events of a window of revisions, replayed from the `Kv`
//! keyspace, for watchers that start in the past or fell behind (etcd's
//! `watchable_store.go` reads `[minRev, curRev]` of the key bucket the same way).
//!
//! Storage keys are revisions in byte order, so one scan from `from` to `to` yields every
//! change of the window in the order it was applied; a tombstone record is a delete. The
//! previous key-value of an event is not stored beside it: it is whatever the key held one
//! revision earlier, found through the key index when the caller asks for it.

use super::codec;
use super::index::KeyRange;
use super::range::View;
use super::revision::Revision;
use super::{Error, Event, EventKind, KeyValue, KvStore, Result};
use crate::storage::{Keyspace, Scan};

/// A read of the events of `[key, range_end)` at revisions `from..=to`.
///
/// `key`/`range_end` follow [`super::RangeRequest`]'s convention: an empty `range_end` is
/// the single key, `"\0"` is every key from `key` on (`key == "\0"` too: every key).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryRequest {
    /// First key (inclusive).
    pub key: Vec<u8>,
    /// End of the range (exclusive); see the type docs for the special values.
    pub range_end: Vec<u8>,
    /// The oldest revision to read (inclusive); must not be below the compaction revision.
    pub from: i64,
    /// The newest revision to read (inclusive); must not be above the current revision.
    pub to: i64,
    /// Stop once this many events are collected, at the end of that revision (a revision
    /// is never cut in two); 0 means no limit.
    pub limit: usize,
    /// Fill `prev_kv` of each event that has a previous key-value still in history.
    pub prev_kv: bool,
}

/// Events read by [`KvStore::events`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// The matching events in revision order (sub-revision order within a revision).
    pub events: Vec<Event>,
    /// The newest revision read completely: `to`, or less when `limit` stopped the read.
    /// The next read of the same window continues at `last_revision + 1`.
    pub last_revision: i64,
}

impl KeyRange<'_> {
    /// Returns true when `key` lies in this range.
    fn contains(&self, key: &[u8]) -> bool {
        match *self {
            KeyRange::Single(k) => k == key,
            KeyRange::Span { start, end } => start <= key && end.is_none_or(|e| key < e),
        }
    }
}

impl KvStore {
    /// Reads the events that changed keys of the request's range at revisions
    /// `from..=to`, in the order they were applied.
    ///
    /// A put that created its key has no `prev_kv`; so has any event whose previous
    /// key-value is older than the compaction revision ("nothing is returned if the
    /// previous version has been compacted", as etcd documents `prev_kv`). Reading from
    /// exactly the compaction revision is allowed, as in etcd: that revision's puts are
    /// still stored but its deletes are not.
    ///
    /// # Errors
    /// [`Error::Compacted`] when `from` is below the compaction revision, or when a
    /// compaction that ran during the read reached `from` (events may be missing then);
    /// [`Error::FutureRevision`] when `to` is above the current revision; storage and
    /// corruption errors.
    pub fn events(&self, req: &HistoryRequest) -> Result<History> {
        let compact_before = {
            let st = self.inner.read_state();
            if req.to > st.current_rev {
                return Err(Error::FutureRevision);
            }
            if req.from < st.compact_rev {
                return Err(Error::Compacted);
            }
            st.compact_rev
        };
        if req.from > req.to {
            return Ok(History { events: Vec::new(), last_revision: req.to });
        }
        let range = KeyRange::new(&req.key, &req.range_end);
        // The scan runs without the state lock, so apply is never held up by a catch-up;
        // a compaction that deletes records meanwhile is detected below.
        let (mut events, last_revision) = self.scan_window(range, req)?;
        // Deletes at the compaction revision are dropped by it, but in the background
        // (`compaction.rs`): leave them out whether or not they are gone yet.
        events.retain(|e| !(e.kind == EventKind::Delete && e.kv.mod_revision <= compact_before));

        let st = self.inner.read_state();
        if st.compact_rev != compact_before && st.compact_rev >= req.from {
            return Err(Error::Compacted);
        }
        if req.prev_kv {
            let view = st.committed_view(self.inner.engine.as_ref());
            for event in &mut events {
                event.prev_kv = previous(&view, &event.kv, event.kind)?;
            }
        }
        Ok(History { events, last_revision })
    }

    /// Scans the `Kv` keyspace over the request's revisions, keeping the events of keys in
    /// `range`; returns them with the newest revision read completely.
    fn scan_window(&self, range: KeyRange<'_>, req: &HistoryRequest) -> Result<(Vec<Event>, i64)> {
        let start = Revision::new(req.from.max(0), 0).to_key(false);
        let end = Revision::new(req.to.saturating_add(1), 0).to_key(false);
        let mut events = Vec::new();
        let mut last_revision = req.to;
        let mut failure = None;
        self.inner.engine.scan(Keyspace::Kv, &start, Some(&end), &mut |key, value| {
            let record = Revision::from_key(key).and_then(|(rev, tombstone)| {
                // Only the key is decoded for records outside the range.
                let kv = codec::decode(value, false)?;
                Ok((rev, tombstone, range.contains(&kv.key)))
            });
            let (rev, tombstone, wanted) = match record {
                Ok(r) => r,
                Err(e) => {
                    failure = Some(e);
                    return Scan::Stop;
                }
            };
            // The limit is checked on the first record of a new revision, so a revision
            // is never cut in two.
            if req.limit > 0
                && events.len() >= req.limit
                && events.last().is_some_and(|e: &Event| e.kv.mod_revision < rev.main)
            {
                last_revision = rev.main - 1;
                return Scan::Stop;
            }
            if !wanted {
                return Scan::Continue;
            }
            match codec::decode(value, true) {
                Ok(kv) => {
                    let kind = if tombstone { EventKind::Delete } else { EventKind::Put };
                    events.push(Event { kind, kv, prev_kv: None });
                    Scan::Continue
                }
                Err(e) => {
                    failure = Some(e);
                    Scan::Stop
                }
            }
        })?;
        match failure {
            Some(e) => Err(e),
            None => Ok((events, last_revision)),
        }
    }
}

/// Returns the key-value `kv.key` held just before the change `kv` describes, when that is
/// still in history.
///
/// A txn never writes one key twice (etcd refuses duplicate keys in a txn), so the state at
/// the previous main revision is the state just before this change.
fn previous(view: &View<'_>, kv: &KeyValue, kind: EventKind) -> Result<Option<KeyValue>> {
    let creates = kind == EventKind::Put && kv.create_revision == kv.mod_revision;
    let at = kv.mod_revision - 1;
    if creates || at < view.compact_rev {
        return Ok(None);
    }
    view.get(&kv.key, at)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::tests::{NoLeases, del, put, put_req, store};
    use super::super::{DeleteRangeRequest, TxnOp, TxnRequest};
    use super::*;

    fn req(key: &str, end: &str, from: i64, to: i64) -> HistoryRequest {
        HistoryRequest { key: key.into(), range_end: end.into(), from, to, limit: 0, prev_kv: true }
    }

    /// (kind, key, mod revision, previous value) of each event.
    fn summary(h: &History) -> Vec<(char, String, i64, Option<String>)> {
        h.events
            .iter()
            .map(|e| {
                (
                    if e.kind == EventKind::Put { 'P' } else { 'D' },
                    String::from_utf8_lossy(&e.kv.key).into_owned(),
                    e.kv.mod_revision,
                    e.prev_kv.as_ref().map(|p| String::from_utf8_lossy(&p.value).into_owned()),
                )
            })
            .collect()
    }

    fn ev(
        kind: char,
        key: &str,
        rev: i64,
        prev: Option<&str>,
    ) -> (char, String, i64, Option<String>) {
        (kind, key.into(), rev, prev.map(str::to_owned))
    }

    /// a=1 @2, b=1 @3, a=2 @4, delete a @5, txn {c=1, b=2} @6, delete [b, d) @7, a=3 @8.
    fn fixture() -> KvStore {
        let kv = store();
        put(&kv, "a", "1");
        put(&kv, "b", "1");
        put(&kv, "a", "2");
        del(&kv, "a", "");
        let mut w = kv.write();
        let txn = TxnRequest {
            compare: vec![],
            success: vec![TxnOp::Put(put_req("c", "1")), TxnOp::Put(put_req("b", "2"))],
            failure: vec![],
        };
        w.txn(&txn, &NoLeases).unwrap();
        w.commit().unwrap();
        del(&kv, "b", "d");
        put(&kv, "a", "3");
        kv
    }

    #[test]
    fn history_replays_puts_deletes_and_txns_in_revision_order_with_prev_kv() {
        let kv = fixture();
        let all = kv.events(&req("\0", "\0", 1, 8)).unwrap();
        assert_eq!(all.last_revision, 8);
        assert_eq!(
            summary(&all),
            [
                ev('P', "a", 2, None),
                ev('P', "b", 3, None),
                ev('P', "a", 4, Some("1")),
                ev('D', "a", 5, Some("2")),
                ev('P', "c", 6, None),
                ev('P', "b", 6, Some("1")),
                ev('D', "b", 7, Some("2")),
                ev('D', "c", 7, Some("1")),
                ev('P', "a", 8, None),
            ]
        );
        // A delete carries only the key and its deletion revision; a re-created key starts
        // a new generation.
        let delete = &all.events[3];
        assert_eq!(
            delete.kv,
            KeyValue { key: b"a".to_vec(), mod_revision: 5, ..Default::default() }
        );
        let recreated = &all.events[8].kv;
        assert_eq!((recreated.create_revision, recreated.version), (8, 1));
    }

    #[test]
    fn history_filters_keys_and_windows() {
        let kv = fixture();
        // (key, range_end, from, to, expected (key, revision) pairs)
        type Case = (&'static str, &'static str, i64, i64, &'static [(&'static str, i64)]);
        let table: &[Case] = &[
            ("a", "", 1, 8, &[("a", 2), ("a", 4), ("a", 5), ("a", 8)]),
            ("b", "c", 4, 7, &[("b", 6), ("b", 7)]),
            ("b", "\0", 6, 6, &[("c", 6), ("b", 6)]),
            ("a", "", 6, 7, &[]),
            ("\0", "\0", 8, 8, &[("a", 8)]),
            ("\0", "\0", 9, 8, &[]),
        ];
        for &(key, end, from, to, want) in table {
            let got = kv.events(&req(key, end, from, to)).unwrap();
            let got: Vec<_> = got
                .events
                .iter()
                .map(|e| (String::from_utf8_lossy(&e.kv.key).into_owned(), e.kv.mod_revision))
                .collect();
            let want: Vec<_> = want.iter().map(|(k, r)| ((*k).to_owned(), *r)).collect();
            assert_eq!(got, want, "{key}..{end} @{from}..={to}");
        }
    }

    #[test]
    fn a_limit_stops_at_a_revision_boundary_and_reports_where() {
        let kv = fixture();
        let mut from = 1;
        let mut seen = Vec::new();
        let mut reads = 0;
        while from <= 8 {
            let h = kv.events(&HistoryRequest { limit: 1, ..req("\0", "\0", from, 8) }).unwrap();
            // A revision of two events (the txn at 6, the delete at 7) comes back whole.
            let revs: Vec<i64> = h.events.iter().map(|e| e.kv.mod_revision).collect();
            assert!(revs.windows(2).all(|w| w[0] == w[1]), "{revs:?}");
            seen.extend(revs);
            from = h.last_revision + 1;
            reads += 1;
        }
        assert_eq!(seen, [2, 3, 4, 5, 6, 6, 7, 7, 8]);
        assert_eq!(reads, 7);
    }

    #[test]
    fn prev_kv_is_left_out_when_not_asked_or_compacted() {
        let kv = fixture();
        let h = kv.events(&HistoryRequest { prev_kv: false, ..req("a", "", 1, 8) }).unwrap();
        assert!(h.events.iter().all(|e| e.prev_kv.is_none()));
        let mut w = kv.write();
        w.compact(4).unwrap();
        w.commit().unwrap();
        // From the compaction revision on, history is readable; the event at 4 lost its
        // previous value (revision 2 is gone), the delete at 5 still has it.
        let h = kv.events(&req("a", "", 4, 8)).unwrap();
        assert_eq!(
            summary(&h),
            [ev('P', "a", 4, None), ev('D', "a", 5, Some("2")), ev('P', "a", 8, None)]
        );
    }

    #[test]
    fn compacted_and_future_windows_are_refused() {
        let kv = fixture();
        let mut w = kv.write();
        w.compact(5).unwrap();
        w.commit().unwrap();
        assert!(matches!(kv.events(&req("\0", "\0", 4, 8)), Err(Error::Compacted)));
        assert!(matches!(kv.events(&req("\0", "\0", 5, 9)), Err(Error::FutureRevision)));
        // The tombstone at exactly the compaction revision is gone, as in etcd.
        let h = kv.events(&req("\0", "\0", 5, 8)).unwrap();
        assert_eq!(summary(&h).first(), Some(&ev('P', "c", 6, None)));
    }

    #[test]
    fn a_sled_backed_history_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            let engine = Arc::new(crate::storage::SledEngine::open(dir.path()).unwrap());
            KvStore::open(engine).unwrap()
        };
        let kv = open();
        put(&kv, "k", "1");
        put(&kv, "k", "2");
        let mut w = kv.write();
        w.delete_range(&DeleteRangeRequest { key: b"k".to_vec(), ..Default::default() }).unwrap();
        w.commit().unwrap();
        let before = kv.events(&req("k", "", 2, 4)).unwrap();
        drop(kv);
        let after = open().events(&req("k", "", 2, 4)).unwrap();
        assert_eq!(before, after);
        assert_eq!(
            summary(&after),
            [ev('P', "k", 2, None), ev('P', "k", 3, Some("1")), ev('D', "k", 4, Some("2"))]
        );
    }
}
