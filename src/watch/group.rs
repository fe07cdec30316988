//! The sets watchers move between, and the index that finds the synced ones an event
//! concerns (etcd's `watcher_group.go`).
//!
//! A watcher is in exactly one of two states, kept in its [`Watcher::synced`] flag:
//!
//! - **synced**: it has every event up to the hub's revision (or wants only later ones),
//!   so apply hands it new events directly. Only synced watchers are in the [`Group`].
//! - **unsynced**: it must first read history from storage. New watchers with an old
//!   `start_revision` start here, and so do *victims*: synced watchers whose stream's queue
//!   was full when apply had events for them. etcd keeps victims in a third set; here a
//!   victim is simply an unsynced watcher whose `next_rev` is where delivery stopped,
//!   which is exactly what catching up needs to know.
//!
//! The [`Group`] keys single-key watchers by key (one hash lookup per event) and range
//! watchers by their start, so an event only visits ranges that start at or before its key.
//! Many watchers usually share a range (every kube-apiserver watch cache watches its
//! resource prefix), so each distinct range holds the list of its watchers.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use super::KeyRange;

/// The position of a watcher in the hub's [`Slab`]; stable while the watcher lives.
pub(super) type Slot = u32;

/// One watcher's registration and delivery state.
#[derive(Debug)]
pub(super) struct Watcher {
    /// Unique over the hub's life, so a catch-up finishing late can tell that its slot was
    /// reused by a newer watcher.
    pub uid: u64,
    /// The stream the watcher belongs to.
    pub stream: u64,
    /// The id the client knows the watcher by, unique within its stream.
    pub watch_id: i64,
    /// The keys watched.
    pub range: KeyRange,
    /// The oldest revision whose events the watcher may still need. While synced it only
    /// filters out events older than a future `start_revision`; while unsynced it is where
    /// catching up continues.
    pub next_rev: i64,
    /// In the synced group (apply delivers to it) rather than catching up.
    pub synced: bool,
    /// Options the client chose.
    pub opts: Options,
    /// No events were queued since the last progress tick (etcd's `progress[id]`).
    pub quiet: bool,
}

/// Per-watcher options from the create request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Options {
    /// Include each event's previous key-value.
    pub prev_kv: bool,
    /// Allow one revision's events to be split over several responses.
    pub fragment: bool,
    /// Drop put events.
    pub no_put: bool,
    /// Drop delete events.
    pub no_delete: bool,
    /// Send a progress notification on each tick in which the watcher got no event.
    pub progress_notify: bool,
}

/// Every live watcher, addressed by [`Slot`]; freed slots are reused.
#[derive(Debug, Default)]
pub(super) struct Slab {
    slots: Vec<Option<Watcher>>,
    free: Vec<Slot>,
    len: usize,
}

impl Slab {
    /// Stores `w` and returns its slot, or `None` when 2^32 - 1 watchers already exist
    /// (`Slot::MAX` is never a slot: the hub uses it as a marker).
    pub(super) fn insert(&mut self, w: Watcher) -> Option<Slot> {
        let slot = match self.free.pop() {
            Some(slot) => {
                let cell = self.slots.get_mut(slot as usize)?;
                *cell = Some(w);
                slot
            }
            None => {
                let slot = Slot::try_from(self.slots.len()).ok().filter(|s| *s != Slot::MAX)?;
                self.slots.push(Some(w));
                slot
            }
        };
        self.len += 1;
        Some(slot)
    }

    /// Removes and returns the watcher at `slot`.
    pub(super) fn remove(&mut self, slot: Slot) -> Option<Watcher> {
        let w = self.slots.get_mut(slot as usize)?.take()?;
        self.free.push(slot);
        self.len -= 1;
        Some(w)
    }

    /// The watcher at `slot`.
    pub(super) fn get(&self, slot: Slot) -> Option<&Watcher> {
        self.slots.get(slot as usize)?.as_ref()
    }

    /// The watcher at `slot`, mutably.
    pub(super) fn get_mut(&mut self, slot: Slot) -> Option<&mut Watcher> {
        self.slots.get_mut(slot as usize)?.as_mut()
    }

    /// The number of live watchers.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The slots of every synced watcher.
    pub(super) fn synced_slots(&self) -> Vec<Slot> {
        self.slots
            .iter()
            .zip(0..)
            .filter_map(|(w, slot)| w.as_ref().filter(|w| w.synced).map(|_| slot))
            .collect()
    }
}

/// The watchers of one key or one range: almost always one, often many of one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Slots {
    One(Slot),
    Many(Vec<Slot>),
}

impl Slots {
    fn push(&mut self, slot: Slot) {
        match self {
            Slots::One(first) => *self = Slots::Many(vec![*first, slot]),
            Slots::Many(v) => v.push(slot),
        }
    }

    /// Removes `slot`; returns true when no watcher is left.
    fn remove(&mut self, slot: Slot) -> bool {
        match self {
            Slots::One(s) => *s == slot,
            Slots::Many(v) => {
                if let Some(i) = v.iter().position(|s| *s == slot) {
                    v.swap_remove(i);
                }
                let only = match v.as_slice() {
                    [] => return true,
                    [only] => *only,
                    _ => return false,
                };
                *self = Slots::One(only);
                false
            }
        }
    }

    fn for_each(&self, mut f: impl FnMut(Slot)) {
        match self {
            Slots::One(s) => f(*s),
            Slots::Many(v) => v.iter().copied().for_each(f),
        }
    }
}

/// The index of synced watchers by the keys they watch.
#[derive(Debug, Default)]
pub(super) struct Group {
    /// Single-key watchers.
    keys: HashMap<Box<[u8]>, Slots>,
    /// Range watchers by start key, then by end.
    ranges: BTreeMap<Box<[u8]>, Ends>,
}

/// The distinct ends of the ranges that share a start (`None`: no upper bound), each with
/// its watchers.
type Ends = Vec<(Option<Box<[u8]>>, Slots)>;

impl Group {
    /// Adds the watcher at `slot` watching `range`.
    pub(super) fn insert(&mut self, slot: Slot, range: &KeyRange) {
        match range {
            KeyRange::Key(key) => match self.keys.get_mut(key) {
                Some(slots) => slots.push(slot),
                None => {
                    self.keys.insert(key.clone(), Slots::One(slot));
                }
            },
            KeyRange::Span { start, end } => {
                let ends = self.ranges.entry(start.clone()).or_default();
                match ends.iter_mut().find(|(e, _)| e == end) {
                    Some((_, slots)) => slots.push(slot),
                    None => ends.push((end.clone(), Slots::One(slot))),
                }
            }
        }
    }

    /// Removes the watcher at `slot` watching `range`.
    pub(super) fn remove(&mut self, slot: Slot, range: &KeyRange) {
        match range {
            KeyRange::Key(key) => {
                if self.keys.get_mut(key).is_some_and(|slots| slots.remove(slot)) {
                    self.keys.remove(key);
                }
            }
            KeyRange::Span { start, end } => {
                let Some(ends) = self.ranges.get_mut(start) else { return };
                if let Some(i) = ends.iter().position(|(e, _)| e == end)
                    && ends.get_mut(i).is_some_and(|(_, slots)| slots.remove(slot))
                {
                    ends.swap_remove(i);
                }
                if ends.is_empty() {
                    self.ranges.remove(start);
                }
            }
        }
    }

    /// Calls `f` with every synced watcher whose range holds `key`.
    pub(super) fn for_each_match(&self, key: &[u8], mut f: impl FnMut(Slot)) {
        if let Some(slots) = self.keys.get(key) {
            slots.for_each(&mut f);
        }
        let upto = (Bound::Unbounded, Bound::Included(key));
        for ends in self.ranges.range::<[u8], _>(upto).map(|(_, ends)| ends) {
            for (end, slots) in ends {
                if end.as_deref().is_none_or(|e| key < e) {
                    slots.for_each(&mut f);
                }
            }
        }
    }

    /// True when no watcher is indexed.
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.ranges.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(g: &Group, key: &str) -> Vec<Slot> {
        let mut out = Vec::new();
        g.for_each_match(key.as_bytes(), |s| out.push(s));
        out.sort_unstable();
        out
    }

    fn range(key: &str, end: &str) -> KeyRange {
        KeyRange::new(key.as_bytes(), end.as_bytes()).unwrap()
    }

    #[test]
    fn events_reach_exactly_the_watchers_whose_range_holds_the_key() {
        let mut g = Group::default();
        let watchers = [
            (0, range("a", "")),
            (1, range("a", "")),
            (2, range("a", "c")),
            (3, range("b", "\0")),
            (4, range("\0", "\0")),
            (5, range("ab", "ac")),
            (6, range("a", "c")),
        ];
        for (slot, r) in &watchers {
            g.insert(*slot, r);
        }
        let table: &[(&str, &[Slot])] = &[
            ("a", &[0, 1, 2, 4, 6]),
            ("ab", &[2, 4, 5, 6]),
            ("abc", &[2, 4, 5, 6]),
            ("ac", &[2, 4, 6]),
            ("b", &[2, 3, 4, 6]),
            ("c", &[3, 4]),
            ("\0", &[4]),
        ];
        for (key, want) in table {
            assert_eq!(matches(&g, key), *want, "{key:?}");
        }
        for (slot, r) in &watchers {
            g.remove(*slot, r);
        }
        assert!(g.is_empty());
        assert!(matches(&g, "a").is_empty());
    }

    #[test]
    fn removing_one_of_many_watchers_of_a_range_keeps_the_others() {
        let mut g = Group::default();
        let r = range("p/", "p0");
        for slot in 0..4 {
            g.insert(slot, &r);
        }
        g.remove(2, &r);
        g.remove(9, &r);
        assert_eq!(matches(&g, "p/x"), [0, 1, 3]);
        g.remove(0, &r);
        g.remove(1, &r);
        assert_eq!(matches(&g, "p/x"), [3]);
        g.remove(3, &r);
        assert!(g.is_empty());
    }

    #[test]
    fn slab_slots_are_reused_after_removal() {
        let w = |id| Watcher {
            uid: id as u64,
            stream: 0,
            watch_id: id,
            range: range("k", ""),
            next_rev: 1,
            synced: true,
            opts: Options::default(),
            quiet: true,
        };
        let mut slab = Slab::default();
        let a = slab.insert(w(1)).unwrap();
        let b = slab.insert(w(2)).unwrap();
        assert_eq!(slab.remove(a).unwrap().watch_id, 1);
        assert!(slab.remove(a).is_none());
        let c = slab.insert(w(3)).unwrap();
        assert_eq!(c, a);
        assert_eq!(slab.get(b).unwrap().watch_id, 2);
        assert_eq!(slab.len(), 2);
    }
}
