//! The revision history of one key, split into generations (etcd's `key_index.go`).
//!
//! A generation is one life of the key: it starts with the put that creates the key and
//! ends with the delete (tombstone) that removes it, after which an empty generation waits
//! for the next create. A key that was put at 1.0, updated at 2.0, deleted at 3.0 and put
//! again at 4.0 looks like this:
//!
//! ```text
//! generations: [ {created 1, ver 3, revs [1.0, 2.0, 3.0(t)]}, {created 4, ver 1, revs [4.0]} ]
//! ```
//!
//! Every non-last generation ends with its tombstone; the last generation never holds one
//! and is empty exactly when the key is currently deleted. Writers only ever append, which
//! is what lets readers at an older revision share the index with a writer that is adding
//! newer revisions, and what makes [`Shape`]-based rollback a pair of truncations.

use super::revision::Revision;

/// One life of a key, from its creating put to (for a non-last generation) its tombstone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Generation {
    /// The key's version at the newest revision in `revs` (tombstone included).
    ver: i64,
    /// Main revision of the put that created this generation.
    created: i64,
    /// Revisions of this generation in ascending order.
    revs: Vec<Revision>,
}

/// What a read at some revision learns about a live key from the index alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct KeyRev {
    /// The revision holding the key's value at the read revision.
    pub modified: Revision,
    /// `create_revision` of the key at the read revision.
    pub created: i64,
    /// `version` of the key at the read revision.
    pub version: i64,
}

/// The size of a [`KeyIndex`] before a write, enough to undo the appends made after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Shape {
    generations: usize,
    revs: usize,
    ver: i64,
    created: i64,
}

/// The prefix of a [`KeyIndex`] that a compaction removes: whole generations first, then
/// revisions at the front of the first generation that remains.
///
/// Positions stay valid while writers append after the plan is made, which lets a
/// compaction be planned inside a write group and applied at its commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Trim {
    generations: usize,
    revs: usize,
}

/// Pushes `x` onto `v`, doubling its capacity from one element when full.
///
/// Most keys hold one generation of one or two revisions, and `Vec`'s own first push
/// reserves room for four: with a million keys that spare room was half the index's memory.
fn push_small<T>(v: &mut Vec<T>, x: T) {
    if v.len() == v.capacity() {
        v.reserve_exact(v.len().max(1));
    }
    v.push(x);
}

/// All generations of one key; the key itself is the [`super::index::Index`] map key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct KeyIndex {
    generations: Vec<Generation>,
}

impl KeyIndex {
    /// Creates the index of a key first seen when rebuilding from storage, where compaction
    /// may have removed the start of its generation: `created` and `ver` come from the
    /// stored key-value rather than from counting (etcd's `keyIndex.restore`).
    pub(super) fn restored(created: i64, rev: Revision, ver: i64) -> Self {
        Self { generations: vec![Generation { ver, created, revs: vec![rev] }] }
    }

    /// Appends a put at `rev`, opening the key's generation if it is currently deleted.
    ///
    /// `rev` must be newer than every revision already recorded.
    pub(super) fn put(&mut self, rev: Revision) {
        if self.generations.is_empty() {
            push_small(&mut self.generations, Generation::default());
        }
        if let Some(g) = self.generations.last_mut() {
            if g.revs.is_empty() {
                g.created = rev.main;
            }
            push_small(&mut g.revs, rev);
            g.ver += 1;
        }
    }

    /// Appends a tombstone at `rev`, closing the current generation; returns false (and
    /// changes nothing) when the key is already deleted.
    pub(super) fn tombstone(&mut self, rev: Revision) -> bool {
        if self.generations.last().is_none_or(|g| g.revs.is_empty()) {
            return false;
        }
        self.put(rev);
        push_small(&mut self.generations, Generation::default());
        true
    }

    /// Returns the key's state at main revision `at`, or `None` when it did not exist then
    /// (never created yet, or deleted at or before `at`).
    pub(super) fn get(&self, at: i64) -> Option<KeyRev> {
        let g = self.find_generation(at)?;
        // Revisions are ascending, so the newest one at or before `at` sits just before the
        // partition point; a binary search keeps hot keys with long histories cheap.
        let n = g.revs.partition_point(|r| r.main <= at).checked_sub(1)?;
        let modified = *g.revs.get(n)?;
        let newer = (g.revs.len() - 1 - n) as i64;
        Some(KeyRev { modified, created: g.created, version: g.ver - newer })
    }

    /// Finds the generation alive at `at` (etcd's `findGeneration`).
    fn find_generation(&self, at: i64) -> Option<&Generation> {
        let last = self.generations.len().checked_sub(1)?;
        for (i, g) in self.generations.iter().enumerate().rev() {
            let (Some(first), Some(newest)) = (g.revs.first(), g.revs.last()) else {
                continue;
            };
            // A closed generation whose tombstone is at or before `at` means the key was
            // deleted at `at`, and no older generation can be the answer either.
            if i != last && newest.main <= at {
                return None;
            }
            if first.main <= at {
                return Some(g);
            }
        }
        None
    }

    /// Returns true when the index holds no revision, or only a deleted key's empty
    /// generation; compaction removes such keys from the index.
    pub(super) fn is_empty(&self) -> bool {
        match self.generations.as_slice() {
            [] => true,
            [only] => only.revs.is_empty(),
            _ => false,
        }
    }

    /// Captures the current size so that later appends can be undone by [`Self::restore`].
    pub(super) fn shape(&self) -> Shape {
        let last = self.generations.last();
        Shape {
            generations: self.generations.len(),
            revs: last.map_or(0, |g| g.revs.len()),
            ver: last.map_or(0, |g| g.ver),
            created: last.map_or(0, |g| g.created),
        }
    }

    /// Undoes every append made since `shape` was captured.
    ///
    /// Appends only touch the last generation or push new ones, so truncating back to the
    /// captured sizes restores the exact earlier state.
    pub(super) fn restore(&mut self, shape: Shape) {
        self.generations.truncate(shape.generations);
        if let Some(g) = self.generations.last_mut() {
            g.revs.truncate(shape.revs);
            g.ver = shape.ver;
            g.created = shape.created;
        }
    }

    /// Plans a compaction at main revision `at` (etcd's `keyIndex.compact`): keeps the
    /// newest revision at or before `at` unless it is a tombstone, plus everything newer.
    ///
    /// Calls `dropped(revision, is_tombstone)` for each revision the compaction removes and
    /// returns the trim to apply, or `None` when nothing goes.
    #[cfg(test)]
    pub(super) fn plan_compaction(
        &self,
        at: i64,
        dropped: impl FnMut(Revision, bool),
    ) -> Option<Trim> {
        self.plan_compaction_bounded(at, usize::MAX, dropped).map(|(trim, _)| trim)
    }

    /// As `plan_compaction`, but removes at most `max` revisions, oldest first; also
    /// returns whether the trim is the whole compaction of this key (false: plan again to
    /// remove the rest).
    ///
    /// A partial trim removes a prefix of what the whole one removes, so the revisions it
    /// leaves are all at or before the kept one and reads at or after `at` answer the same
    /// before, between and after the parts. `max` below 1 is taken as 1.
    pub(super) fn plan_compaction_bounded(
        &self,
        at: i64,
        max: usize,
        mut dropped: impl FnMut(Revision, bool),
    ) -> Option<(Trim, bool)> {
        let max = max.max(1);
        let last = self.generations.len().checked_sub(1)?;
        // Skip the generations whose tombstone is older than `at`: they are gone entirely.
        let mut gi = 0;
        while gi < last {
            match self.generations.get(gi).and_then(|g| g.revs.last()) {
                Some(tomb) if tomb.main >= at => break,
                _ => gi += 1,
            }
        }
        let g = self.generations.get(gi)?;
        let at_or_before = g.revs.partition_point(|r| r.main <= at);
        let mut trim = Trim { generations: gi, revs: 0 };
        if at_or_before > 0 {
            trim.revs = at_or_before - 1;
            // Only the tombstone would remain: a key deleted at or before `at` leaves no
            // trace, so its generation goes too.
            if g.revs.len() - trim.revs == 1 && gi != last {
                trim = Trim { generations: gi + 1, revs: 0 };
            }
        }
        let mut part = Trim { generations: 0, revs: 0 };
        let mut budget = max;
        for g in self.generations.iter().take(trim.generations) {
            if g.revs.len() > budget {
                // Part of a closed generation: its tombstone (the last revision) stays.
                g.revs.iter().take(budget).for_each(|rev| dropped(*rev, false));
                part.revs = budget;
                return Some((part, false));
            }
            let tomb_at = g.revs.len().saturating_sub(1);
            for (i, rev) in g.revs.iter().enumerate() {
                dropped(*rev, i == tomb_at);
            }
            budget -= g.revs.len();
            part.generations += 1;
        }
        if let Some(g) = self.generations.get(trim.generations) {
            // Revisions before the kept one are puts: a tombstone only ever ends a
            // generation.
            part.revs = trim.revs.min(budget);
            g.revs.iter().take(part.revs).for_each(|rev| dropped(*rev, false));
        }
        (part.generations > 0 || part.revs > 0).then_some((part, part == trim))
    }

    /// Removes the prefix described by `trim`.
    pub(super) fn apply_trim(&mut self, trim: Trim) {
        self.generations.drain(..trim.generations.min(self.generations.len()));
        if let Some(g) = self.generations.first_mut() {
            g.revs.drain(..trim.revs.min(g.revs.len()));
        }
    }

    /// Returns every revision with its tombstone flag, oldest first (tests and checks).
    #[cfg(test)]
    pub(super) fn revisions(&self) -> Vec<(Revision, bool)> {
        let last = self.generations.len().saturating_sub(1);
        let mut out = Vec::new();
        for (gi, g) in self.generations.iter().enumerate() {
            for (i, rev) in g.revs.iter().enumerate() {
                out.push((*rev, gi != last && i + 1 == g.revs.len()));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(main: i64) -> Revision {
        Revision::new(main, 0)
    }

    /// put 2, put 4, delete 6, put 8, put 10, delete 12, put 14 (etcd's key_index tests use
    /// a similar history).
    fn history() -> KeyIndex {
        let mut ki = KeyIndex::default();
        ki.put(rev(2));
        ki.put(rev(4));
        assert!(ki.tombstone(rev(6)));
        ki.put(rev(8));
        ki.put(rev(10));
        assert!(ki.tombstone(rev(12)));
        ki.put(rev(14));
        ki
    }

    #[test]
    fn get_answers_per_revision_across_generations() {
        let ki = history();
        // (at, expected (modified, created, version))
        type Case = (i64, Option<(i64, i64, i64)>);
        let table: &[Case] = &[
            (1, None),
            (2, Some((2, 2, 1))),
            (3, Some((2, 2, 1))),
            (5, Some((4, 2, 2))),
            (6, None),
            (7, None),
            (8, Some((8, 8, 1))),
            (11, Some((10, 8, 2))),
            (12, None),
            (13, None),
            (14, Some((14, 14, 1))),
            (100, Some((14, 14, 1))),
        ];
        for &(at, want) in table {
            let got = ki.get(at).map(|k| (k.modified.main, k.created, k.version));
            assert_eq!(got, want, "at {at}");
        }
    }

    #[test]
    fn tombstone_on_a_deleted_key_changes_nothing() {
        let mut ki = KeyIndex::default();
        assert!(!ki.tombstone(rev(1)));
        ki.put(rev(2));
        assert!(ki.tombstone(rev(3)));
        let before = ki.clone();
        assert!(!ki.tombstone(rev(4)));
        assert_eq!(ki, before);
        assert!(ki.get(3).is_none());
    }

    #[test]
    fn restore_undoes_puts_and_tombstones_appended_after_the_shape() {
        let mut ki = KeyIndex::default();
        ki.put(rev(2));
        let original = ki.clone();
        let shape = ki.shape();
        ki.put(rev(3));
        ki.tombstone(rev(4));
        ki.put(rev(5));
        ki.restore(shape);
        assert_eq!(ki, original);

        // From a deleted state (trailing empty generation) too.
        ki.tombstone(rev(6));
        let deleted = ki.clone();
        let shape = ki.shape();
        ki.put(rev(7));
        ki.restore(shape);
        assert_eq!(ki, deleted);
    }

    fn compact(ki: &KeyIndex, at: i64) -> (KeyIndex, Vec<(i64, bool)>) {
        let mut dropped = Vec::new();
        let mut out = ki.clone();
        if let Some(trim) = ki.plan_compaction(at, |r, t| dropped.push((r.main, t))) {
            out.apply_trim(trim);
        }
        (out, dropped)
    }

    #[test]
    fn compaction_keeps_the_newest_revision_and_drops_tombstones() {
        let ki = history();
        // (at, remaining revisions, dropped revisions with tombstone flag)
        type Case<'a> = (i64, &'a [i64], &'a [(i64, bool)]);
        let table: &[Case] = &[
            (1, &[2, 4, 6, 8, 10, 12, 14], &[]),
            (2, &[2, 4, 6, 8, 10, 12, 14], &[]),
            (4, &[4, 6, 8, 10, 12, 14], &[(2, false)]),
            (5, &[4, 6, 8, 10, 12, 14], &[(2, false)]),
            (6, &[8, 10, 12, 14], &[(2, false), (4, false), (6, true)]),
            (7, &[8, 10, 12, 14], &[(2, false), (4, false), (6, true)]),
            (10, &[10, 12, 14], &[(2, false), (4, false), (6, true), (8, false)]),
            (12, &[14], &[(2, false), (4, false), (6, true), (8, false), (10, false), (12, true)]),
            (15, &[14], &[(2, false), (4, false), (6, true), (8, false), (10, false), (12, true)]),
        ];
        for &(at, remaining, dropped) in table {
            let (out, got) = compact(&ki, at);
            let revs: Vec<i64> = out.revisions().iter().map(|(r, _)| r.main).collect();
            assert_eq!(revs, remaining, "remaining at {at}");
            assert_eq!(got, dropped, "dropped at {at}");
            // Reads at or after the compaction point are unchanged.
            for read in at..16 {
                assert_eq!(out.get(read), ki.get(read), "compact {at}, read {read}");
            }
        }
    }

    #[test]
    fn bounded_compaction_in_parts_ends_where_the_whole_one_does() {
        let ki = history();
        for at in 1..16 {
            let (whole, whole_dropped) = compact(&ki, at);
            for max in 1..8 {
                let mut part = ki.clone();
                let mut dropped = Vec::new();
                while let Some((trim, done)) =
                    part.plan_compaction_bounded(at, max, |r, t| dropped.push((r.main, t)))
                {
                    part.apply_trim(trim);
                    // Every intermediate state answers reads at or after `at` as before.
                    for read in at..16 {
                        assert_eq!(part.get(read), ki.get(read), "at {at} max {max} read {read}");
                    }
                    if done {
                        break;
                    }
                }
                assert_eq!(part, whole, "at {at} max {max}");
                assert_eq!(dropped, whole_dropped, "at {at} max {max}");
            }
        }
    }

    #[test]
    fn compacting_a_deleted_key_past_its_tombstone_empties_it() {
        let mut ki = KeyIndex::default();
        ki.put(rev(2));
        ki.tombstone(rev(3));
        let (out, dropped) = compact(&ki, 3);
        assert!(out.is_empty());
        assert_eq!(dropped, vec![(2, false), (3, true)]);
        let (out, _) = compact(&ki, 2);
        assert!(!out.is_empty());
    }

    #[test]
    fn a_compaction_plan_stays_valid_after_later_appends() {
        let mut ki = KeyIndex::default();
        ki.put(rev(2));
        ki.tombstone(rev(3));
        let trim = ki.plan_compaction(4, |_, _| {}).unwrap();
        ki.put(rev(5));
        ki.apply_trim(trim);
        assert_eq!(ki.revisions(), vec![(rev(5), false)]);
        assert_eq!(ki.get(5).map(|k| k.version), Some(1));
    }
}
