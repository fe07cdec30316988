//! The in-memory key index: every key the store knows, in key order, with its history
//! (etcd's `index.go`, a B-tree of [`KeyIndex`]).
//!
//! Values are not here; the index maps a key and a read revision to the [`Revision`] whose
//! record in storage holds the value. Deleted keys stay until a compaction removes their
//! last generation, so a read at an older revision still finds them.

use std::collections::BTreeMap;
use std::ops::Bound;

use super::key_index::{KeyIndex, KeyRev, Shape, Trim};
use super::revision::Revision;

/// The keys a request covers, decoded from etcd's `key`/`range_end` convention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyRange<'a> {
    /// `range_end` empty: exactly this key.
    Single(&'a [u8]),
    /// `[start, end)`, or every key `>= start` when `end` is `None` (`range_end == "\0"`).
    Span {
        /// First key, inclusive.
        start: &'a [u8],
        /// End, exclusive; `None` for no upper bound.
        end: Option<&'a [u8]>,
    },
}

impl<'a> KeyRange<'a> {
    /// Interprets `key` and `range_end` as etcd does (ETCD-COMPAT.md §1.2): empty end is
    /// the single key, `"\0"` is everything from `key` on (and `key == "\0"` too is thus
    /// all keys), anything else is the half-open `[key, range_end)`.
    pub(super) fn new(key: &'a [u8], range_end: &'a [u8]) -> Self {
        match range_end {
            [] => KeyRange::Single(key),
            [0] => KeyRange::Span { start: key, end: None },
            end => KeyRange::Span { start: key, end: Some(end) },
        }
    }
}

/// Every key with its generations, ordered by key bytes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Index {
    keys: BTreeMap<Vec<u8>, KeyIndex>,
}

impl Index {
    /// Returns the state of `key` at main revision `at`, or `None` when it was not live.
    pub(super) fn get(&self, key: &[u8], at: i64) -> Option<KeyRev> {
        self.keys.get(key)?.get(at)
    }

    /// Calls `visit(key, state)` for each key of `range` live at `at`, in ascending key
    /// order, until it returns false.
    pub(super) fn visit_live<'s>(
        &'s self,
        range: KeyRange<'_>,
        at: i64,
        mut visit: impl FnMut(&'s [u8], KeyRev) -> bool,
    ) {
        match range {
            KeyRange::Single(key) => {
                if let Some((k, state)) = self
                    .keys
                    .get_key_value(key)
                    .and_then(|(k, ki)| ki.get(at).map(|state| (k, state)))
                {
                    visit(k, state);
                }
            }
            KeyRange::Span { start, end } => {
                let upper = match end {
                    // BTreeMap::range panics on an inverted range; etcd answers nothing.
                    Some(end) if end < start => return,
                    Some(end) => Bound::Excluded(end),
                    None => Bound::Unbounded,
                };
                for (k, ki) in self.keys.range::<[u8], _>((Bound::Included(start), upper)) {
                    if let Some(state) = ki.get(at)
                        && !visit(k, state)
                    {
                        return;
                    }
                }
            }
        }
    }

    /// Returns the number of keys of `range` live at `at`.
    pub(super) fn count(&self, range: KeyRange<'_>, at: i64) -> i64 {
        let mut n = 0;
        self.visit_live(range, at, |_, _| {
            n += 1;
            true
        });
        n
    }

    /// Returns the shape of `key`'s history, `None` when the index does not hold the key;
    /// a writer records it before each change so that [`Self::restore`] can undo it.
    pub(super) fn shape(&self, key: &[u8]) -> Option<Shape> {
        self.keys.get(key).map(KeyIndex::shape)
    }

    /// Puts `key` back to `shape`, removing the key when it was absent (`None`).
    pub(super) fn restore(&mut self, key: &[u8], shape: Option<Shape>) {
        match shape {
            Some(shape) => {
                if let Some(ki) = self.keys.get_mut(key) {
                    ki.restore(shape);
                }
            }
            None => {
                self.keys.remove(key);
            }
        }
    }

    /// Records a put of `key` at `rev`.
    pub(super) fn put(&mut self, key: &[u8], rev: Revision) {
        // Look up before inserting so that updating an existing key allocates nothing.
        match self.keys.get_mut(key) {
            Some(ki) => ki.put(rev),
            None => {
                let mut ki = KeyIndex::default();
                ki.put(rev);
                self.keys.insert(key.to_vec(), ki);
            }
        }
    }

    /// Records a deletion of `key` at `rev`; returns false when the key was not live.
    pub(super) fn tombstone(&mut self, key: &[u8], rev: Revision) -> bool {
        self.keys.get_mut(key).is_some_and(|ki| ki.tombstone(rev))
    }

    /// Replays one stored record while rebuilding the index from storage, in revision
    /// order (etcd's `restoreIntoIndex`).
    ///
    /// The first record of a key carries `create_revision` and `version` because
    /// compaction may have removed the start of its generation. A tombstone for a key the
    /// index does not know is skipped, as etcd does: there is nothing for it to end.
    pub(super) fn replay(
        &mut self,
        key: &[u8],
        rev: Revision,
        tombstone: bool,
        created: i64,
        version: i64,
    ) {
        match self.keys.get_mut(key) {
            Some(ki) if tombstone => {
                ki.tombstone(rev);
            }
            Some(ki) => ki.put(rev),
            None if tombstone => {}
            None => {
                self.keys.insert(key.to_vec(), KeyIndex::restored(created, rev, version));
            }
        }
    }

    /// Iterates over the keys from `start` on (inclusive), with their history, in key order.
    pub(super) fn iter_from<'s>(
        &'s self,
        start: &[u8],
    ) -> impl Iterator<Item = (&'s Vec<u8>, &'s KeyIndex)> {
        self.keys.range::<[u8], _>((Bound::Included(start), Bound::Unbounded))
    }

    /// Applies a compaction trim to `key`, dropping the key once nothing of it remains.
    pub(super) fn apply_trim(&mut self, key: &[u8], trim: Trim) {
        let empty = match self.keys.get_mut(key) {
            Some(ki) => {
                ki.apply_trim(trim);
                ki.is_empty()
            }
            None => false,
        };
        if empty {
            self.keys.remove(key);
        }
    }

    /// Returns the number of keys held, deleted-but-uncompacted ones included.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index_of(keys: &[&str]) -> Index {
        let mut index = Index::default();
        for (i, k) in keys.iter().enumerate() {
            index.put(k.as_bytes(), Revision::new(i as i64 + 2, 0));
        }
        index
    }

    fn live(index: &Index, key: &[u8], end: &[u8], at: i64) -> Vec<String> {
        let mut out = Vec::new();
        index.visit_live(KeyRange::new(key, end), at, |k, _| {
            out.push(String::from_utf8(k.to_vec()).unwrap());
            true
        });
        out
    }

    #[test]
    fn ranges_follow_etcds_key_range_convention() {
        let index = index_of(&["a", "b", "ba", "c", "d"]);
        let table: &[(&[u8], &[u8], &[&str])] = &[
            (b"b", b"", &["b"]),
            (b"bb", b"", &[]),
            (b"b", b"c", &["b", "ba"]),
            (b"b", b"\0", &["b", "ba", "c", "d"]),
            (b"\0", b"\0", &["a", "b", "ba", "c", "d"]),
            (b"a", b"a", &[]),
            (b"c", b"b", &[]),
            (b"a", b"\xff", &["a", "b", "ba", "c", "d"]),
        ];
        for &(key, end, want) in table {
            assert_eq!(live(&index, key, end, 100), want, "{key:?}..{end:?}");
            assert_eq!(index.count(KeyRange::new(key, end), 100), want.len() as i64);
        }
    }

    #[test]
    fn keys_appear_only_from_their_creating_revision_on() {
        let index = index_of(&["a", "b", "c"]);
        assert_eq!(live(&index, b"\0", b"\0", 1), Vec::<String>::new());
        assert_eq!(live(&index, b"\0", b"\0", 3), ["a", "b"]);
    }

    #[test]
    fn visiting_stops_when_asked() {
        let index = index_of(&["a", "b", "c"]);
        let mut seen = 0;
        index.visit_live(KeyRange::new(b"a", b"\0"), 10, |_, _| {
            seen += 1;
            seen < 2
        });
        assert_eq!(seen, 2);
    }

    #[test]
    fn restoring_an_absent_shape_removes_a_new_key() {
        let mut index = index_of(&["a"]);
        let shape = index.shape(b"b");
        index.put(b"b", Revision::new(9, 0));
        index.restore(b"b", shape);
        assert_eq!(index, index_of(&["a"]));
    }
}
