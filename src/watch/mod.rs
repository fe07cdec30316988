//! Watch: etcd's watchers, fed by apply and caught up from history (etcd's
//! `watchable_store.go`, `watcher_group.go` and `watch_stream.go`).
//!
//! A client stream ([`WatchStream`] for its requests, [`ResponseSource`] for its responses)
//! holds any number of watchers. Each watcher is *synced* or *unsynced* (see `group.rs`):
//!
//! - Apply calls [`WatchHub::notify`] with each committed batch's events. The hub matches
//!   them against the synced watchers and appends one response per watcher to that
//!   watcher's stream queue. It never waits: when a stream's queue is full (its client is
//!   not reading), the watcher is set aside as unsynced at the first revision it missed.
//! - A stream's own response task catches its unsynced watchers up from storage
//!   (`sync.rs`), a window of at most [`WINDOW_REVISIONS`] revisions at a time, but only
//!   while its queue has room: a client that stops reading costs one bounded queue and
//!   nothing else, and the work of catching it up is done when, and as fast as, it reads.
//!   Other streams never wait for it, since apply never does.
//!
//! # Ordering
//!
//! Every change of a watcher's state and every append to a queue happens under the hub
//! lock, and `notify` runs under it too, after storage holds the batch. So a watcher's
//! responses are queued in revision order: its `created` first, history up to the hub's
//! revision before it joins the synced group, live events after. Within a response the
//! events of a revision are never split (except by `fragment`, at the edge). A progress
//! response at revision `r` is queued only when every watcher of the stream is synced, so
//! every later event of the stream is above `r`.
//!
//! # Memory
//!
//! A watcher costs a slab entry, an index entry and an id-map entry (a few hundred bytes;
//! `cairn bench watch-memory` measures it). A stream's queue holds at most
//! [`WatchConfig::queue_responses`] responses or [`WatchConfig::queue_bytes`] bytes of
//! events (one batch may overshoot, so a single revision larger than the budget still
//! goes out); events are shared between the watchers that receive them.
//!
//! This module speaks mvcc's domain types; the gRPC edge converts them.
//!
//! # Layout
//!
//! `mod.rs` (the hub: create, cancel, progress, fan-out from apply), `group.rs` (watchers,
//! the slab that holds them and the index of synced ones), `stream.rs` (a stream's bounded
//! queue and its two halves), `sync.rs` (catching up from history), `tests.rs`.

mod group;
mod stream;
mod sync;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

pub use self::stream::{ResponseSource, WatchStream};

use self::group::{Group, Options, Slab, Slot, Watcher};
use self::stream::Outbox;
use crate::mvcc::{self, Event, EventKind, KvStore};

/// etcd's `watchBatchMaxRevs`: the most revisions one catch-up step reads.
pub const WINDOW_REVISIONS: i64 = 1000;

/// A response grows past this many bytes of events only to keep a revision whole; the
/// next revision starts a new response (etcd's catch-up merges without a bound, which can
/// exceed a client's 4 MiB default receive limit).
const RESPONSE_SOFT_BYTES: usize = 1024 * 1024;

/// The id-map value of a watcher the server ended (behind the compaction point, or its
/// history unreadable): as in etcd, whose watch stream keeps such a watcher, its id stays
/// taken until the client cancels it, and that cancel is answered.
const ENDED: Slot = Slot::MAX;

/// Errors that end a watcher; the edge turns each into etcd's `cancel_reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The client chose a `watch_id` already live on the stream.
    #[error("mvcc: duplicate watch ID provided on the WatchStream")]
    DuplicateWatchId,
    /// `key >= range_end`: the range holds no key.
    #[error("mvcc: watcher range is empty")]
    EmptyRange,
    /// A negative `start_revision`: no such revision was ever kept.
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    /// The hub holds 2^32 watchers.
    #[error("too many watchers")]
    TooManyWatchers,
    /// Reading history failed (storage or corruption); the watcher cannot continue
    /// without a gap, so it is canceled.
    #[error("mvcc: cannot read history: {0}")]
    History(String),
}

/// The keys a watcher covers, decoded from etcd's `key`/`range_end` convention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRange {
    /// Exactly one key.
    Key(Box<[u8]>),
    /// `[start, end)`, or every key `>= start` when `end` is `None`.
    Span {
        /// First key, inclusive.
        start: Box<[u8]>,
        /// End, exclusive; `None` for no upper bound.
        end: Option<Box<[u8]>>,
    },
}

impl KeyRange {
    /// Decodes a watch request's range as etcd does: an empty key means `"\0"` (the one
    /// place etcd accepts it), an empty `range_end` the single key, `"\0"` every key from
    /// `key` on, anything else `[key, range_end)`.
    ///
    /// # Errors
    /// [`Error::EmptyRange`] when `key >= range_end`.
    pub fn new(key: &[u8], range_end: &[u8]) -> Result<Self, Error> {
        let key: Box<[u8]> = if key.is_empty() { Box::new([0]) } else { key.into() };
        match range_end {
            [] => Ok(KeyRange::Key(key)),
            [0] => Ok(KeyRange::Span { start: key, end: None }),
            end if *key >= *end => Err(Error::EmptyRange),
            end => Ok(KeyRange::Span { start: key, end: Some(end.into()) }),
        }
    }

    /// Returns true when `key` lies in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        match self {
            KeyRange::Key(k) => **k == *key,
            KeyRange::Span { start, end } => {
                **start <= *key && end.as_deref().is_none_or(|e| key < e)
            }
        }
    }

    /// The range as mvcc's `(key, range_end)` pair.
    fn to_request(&self) -> (Vec<u8>, Vec<u8>) {
        match self {
            KeyRange::Key(k) => (k.to_vec(), Vec::new()),
            KeyRange::Span { start, end: None } => (start.to_vec(), vec![0]),
            KeyRange::Span { start, end: Some(end) } => (start.to_vec(), end.to_vec()),
        }
    }
}

/// A request to create a watcher (etcd's `WatchCreateRequest` in domain terms).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateRequest {
    /// First key; empty means `"\0"`.
    pub key: Vec<u8>,
    /// End of the range, with [`KeyRange::new`]'s convention.
    pub range_end: Vec<u8>,
    /// The first revision to deliver (inclusive); 0 means the next one. An old revision
    /// replays history first; one below the compaction point cancels the watcher with
    /// the compaction revision.
    pub start_revision: i64,
    /// Send a progress notification on each idle tick.
    pub progress_notify: bool,
    /// Drop put events.
    pub no_put: bool,
    /// Drop delete events.
    pub no_delete: bool,
    /// Include each event's previous key-value.
    pub prev_kv: bool,
    /// The client's id for the watcher; 0 lets the stream pick one (counting up from 0,
    /// skipping ids in use, as etcd's `nextID`).
    pub watch_id: i64,
    /// Allow a revision's events to be split over several responses.
    pub fragment: bool,
}

/// One response to a stream's client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The watcher it concerns; -1 for a refused create and for a stream-wide progress
    /// response (etcd's `InvalidWatchID`).
    pub watch_id: i64,
    /// The header revision: the hub's revision when the response was made (0 for
    /// [`ResponseKind::Compacted`], as etcd sends it).
    pub revision: i64,
    /// What happened.
    pub kind: ResponseKind,
}

/// What a [`Response`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseKind {
    /// The watcher was created.
    Created,
    /// The create was refused: etcd answers created and canceled at once, with a reason.
    Refused(Error),
    /// The watcher was canceled at the client's request.
    Canceled,
    /// The watcher needs history older than the compaction revision and is canceled.
    Compacted {
        /// The store's compaction revision.
        compact_revision: i64,
    },
    /// The watcher failed and is canceled.
    Failed(Error),
    /// Events of one or more whole revisions, in revision order.
    Events {
        /// The events, shared with other watchers of the same change.
        events: Vec<Arc<Event>>,
        /// The watcher wants `prev_kv` (events always carry it when known).
        prev_kv: bool,
        /// The watcher allows splitting a large response.
        fragment: bool,
    },
    /// A progress notification: no event of the watcher (or, for -1, of the stream) at or
    /// below `revision` is still to come.
    Progress,
}

/// Settings of the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchConfig {
    /// `--watch-progress-notify-interval`: how often idle `progress_notify` watchers hear
    /// from the server (etcd adds up to 10 % jitter; so does Cairn, per stream).
    pub progress_notify_interval: Duration,
    /// The most event responses a stream queues before its watchers are set aside.
    pub queue_responses: usize,
    /// The most event bytes a stream queues before its watchers are set aside.
    pub queue_bytes: usize,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            progress_notify_interval: Duration::from_secs(600),
            queue_responses: 1024,
            queue_bytes: 8 * 1024 * 1024,
        }
    }
}

/// The watcher registry: cheap to clone, shared by apply (notify) and the streams.
#[derive(Clone)]
pub struct WatchHub {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for WatchHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.shared.lock();
        f.debug_struct("WatchHub")
            .field("revision", &st.rev)
            .field("watchers", &st.watchers.len())
            .field("streams", &st.streams.len())
            .finish()
    }
}

/// What the hub handle and every stream share.
struct Shared {
    kv: KvStore,
    cfg: WatchConfig,
    state: Mutex<HubState>,
}

/// Everything behind the hub lock.
struct HubState {
    /// The newest revision handed to `notify` (the store's revision when the hub began).
    rev: i64,
    watchers: Slab,
    synced: Group,
    streams: HashMap<u64, StreamEntry>,
    next_stream: u64,
    next_uid: u64,
}

/// The hub's view of one stream.
struct StreamEntry {
    outbox: Arc<Outbox>,
    /// Client watch id to slot.
    ids: HashMap<i64, Slot>,
    /// Where the search for a free automatic id starts (etcd's `nextID`).
    next_auto_id: i64,
    /// Slots of this stream's unsynced watchers, caught up by its response task.
    unsynced: BTreeSet<Slot>,
    /// A progress request waits for every watcher to be synced.
    progress_deferred: bool,
}

impl StreamEntry {
    /// Queues the stream-wide progress response when one is owed and may now be given.
    fn settle_deferred_progress(&mut self, rev: i64) {
        if self.progress_deferred && self.unsynced.is_empty() {
            self.progress_deferred = false;
            let progress = Response { watch_id: -1, revision: rev, kind: ResponseKind::Progress };
            self.outbox.push_control(progress);
        }
    }
}

impl Shared {
    // A poisoned lock means a panic under it; every mutation under the hub lock leaves the
    // state consistent between statements that can fail, so it is taken as it is.
    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl WatchHub {
    /// Creates the hub over `kv`, at the store's current revision.
    pub fn new(kv: KvStore, cfg: WatchConfig) -> Self {
        let rev = kv.current_revision();
        let state = HubState {
            rev,
            watchers: Slab::default(),
            synced: Group::default(),
            streams: HashMap::new(),
            next_stream: 1,
            next_uid: 1,
        };
        Self { shared: Arc::new(Shared { kv, cfg, state: Mutex::new(state) }) }
    }

    /// Opens a client stream: requests go through the [`WatchStream`], responses come out
    /// of the [`ResponseSource`]; dropping the source ends the stream and its watchers.
    pub fn open_stream(&self) -> (WatchStream, ResponseSource) {
        let outbox = Arc::new(Outbox::new(self.shared.cfg));
        let id = {
            let mut st = self.shared.lock();
            let id = st.next_stream;
            st.next_stream += 1;
            st.streams.insert(
                id,
                StreamEntry {
                    outbox: outbox.clone(),
                    ids: HashMap::new(),
                    next_auto_id: 0,
                    unsynced: BTreeSet::new(),
                    progress_deferred: false,
                },
            );
            id
        };
        stream::open(self.shared.clone(), id, outbox)
    }

    /// Delivers a committed batch's events (revision order, as `WriteTxn::commit` returns
    /// them) to the synced watchers. Called by apply after the batch is in storage; never
    /// blocks on a client.
    pub fn notify(&self, events: Vec<Event>) {
        let (Some(first), Some(last)) =
            (events.first().map(|e| e.kv.mod_revision), events.last().map(|e| e.kv.mod_revision))
        else {
            return;
        };
        let events: Vec<Arc<Event>> = events.into_iter().map(Arc::new).collect();
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        // Group per watcher first: a watcher gets the whole batch in one response (split
        // only at revision boundaries) or, when its queue is full, none of it.
        let mut matched: HashMap<Slot, Vec<Arc<Event>>> = HashMap::new();
        for ev in &events {
            st.synced.for_each_match(&ev.kv.key, |slot| {
                matched.entry(slot).or_default().push(Arc::clone(ev));
            });
        }
        let mut victims = Vec::new();
        for (slot, evs) in matched {
            let Some(w) = st.watchers.get_mut(slot) else { continue };
            let evs = select(w, evs.into_iter());
            if evs.is_empty() {
                continue;
            }
            let Some(entry) = st.streams.get(&w.stream) else { continue };
            if entry.outbox.offer(pack(w, evs, last)) {
                w.quiet = false;
            } else {
                victims.push(slot);
            }
        }
        for slot in victims {
            st.set_aside(slot, first);
        }
        st.rev = st.rev.max(last);
    }

    /// Tells the hub the store was replaced wholesale (a leader snapshot installed on a
    /// member that fell behind): synced watchers never saw the revisions in between, so every
    /// one of them catches up from storage from where it stood, or is canceled with
    /// `compact_revision` when that history is gone.
    pub fn state_replaced(&self) {
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        let from = st.rev + 1;
        for slot in st.watchers.synced_slots() {
            st.set_aside(slot, from);
        }
        st.rev = st.rev.max(self.shared.kv.current_revision());
    }

    /// The newest revision the hub has delivered to synced watchers.
    pub fn revision(&self) -> i64 {
        self.shared.lock().rev
    }

    /// The number of live watchers, across streams.
    pub fn watcher_count(&self) -> usize {
        self.shared.lock().watchers.len()
    }

    /// The number of watchers waiting to catch up from history.
    pub fn unsynced_count(&self) -> usize {
        self.shared.lock().streams.values().map(|s| s.unsynced.len()).sum()
    }

    /// Counts of watchers, streams and queued events, for metrics.
    pub fn stats(&self) -> WatchStats {
        let st = self.shared.lock();
        WatchStats {
            watchers: st.watchers.len(),
            streams: st.streams.len(),
            unsynced: st.streams.values().map(|s| s.unsynced.len()).sum(),
            pending_events: st.streams.values().map(|s| s.outbox.pending_events()).sum(),
        }
    }
}

/// A snapshot of the hub's size (etcd's `etcd_debugging_mvcc_*` watch gauges).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchStats {
    /// Live watchers.
    pub watchers: usize,
    /// Open streams.
    pub streams: usize,
    /// Watchers catching up from history.
    pub unsynced: usize,
    /// Events queued in the streams' queues, not yet taken by their senders.
    pub pending_events: usize,
}

impl HubState {
    /// Moves a synced watcher out of the group: it will catch up from `from` (or from its
    /// own start, if later) when its stream has room again.
    fn set_aside(&mut self, slot: Slot, from: i64) {
        let Some(w) = self.watchers.get_mut(slot) else { return };
        if !w.synced {
            return;
        }
        w.synced = false;
        w.next_rev = w.next_rev.max(from);
        self.synced.remove(slot, &w.range);
        if let Some(entry) = self.streams.get_mut(&w.stream) {
            entry.unsynced.insert(slot);
            entry.outbox.set_unsynced(entry.unsynced.len());
        }
    }

    /// Moves an unsynced watcher into the synced group.
    fn join_synced(&mut self, slot: Slot) {
        let Some(w) = self.watchers.get_mut(slot) else { return };
        if w.synced {
            return;
        }
        w.synced = true;
        self.synced.insert(slot, &w.range);
        if let Some(entry) = self.streams.get_mut(&w.stream) {
            entry.unsynced.remove(&slot);
            entry.outbox.set_unsynced(entry.unsynced.len());
        }
    }

    /// Removes a watcher everywhere; returns it.
    fn remove_watcher(&mut self, slot: Slot) -> Option<Watcher> {
        let w = self.watchers.remove(slot)?;
        if w.synced {
            self.synced.remove(slot, &w.range);
        }
        if let Some(entry) = self.streams.get_mut(&w.stream) {
            entry.ids.remove(&w.watch_id);
            if entry.unsynced.remove(&slot) {
                entry.outbox.set_unsynced(entry.unsynced.len());
            }
            if w.opts.progress_notify {
                entry.outbox.add_progress_watchers(-1);
            }
        }
        Some(w)
    }

    /// Removes a watcher the server ends, keeping its id taken (see [`ENDED`]).
    fn end_watcher(&mut self, slot: Slot) -> Option<Watcher> {
        let w = self.remove_watcher(slot)?;
        if let Some(entry) = self.streams.get_mut(&w.stream) {
            entry.ids.insert(w.watch_id, ENDED);
        }
        Some(w)
    }

    /// Registers a watcher for stream `stream` and queues the answer to its create.
    fn create(&mut self, stream: u64, req: CreateRequest) {
        let rev = self.rev;
        let Some(entry) = self.streams.get_mut(&stream) else { return };
        let refuse = |entry: &StreamEntry, err| {
            let refused = ResponseKind::Refused(err);
            entry.outbox.push_control(Response { watch_id: -1, revision: rev, kind: refused });
        };
        // etcd refuses a negative start revision before looking at anything else.
        if req.start_revision < 0 {
            return refuse(entry, Error::Compacted);
        }
        let range = match KeyRange::new(&req.key, &req.range_end) {
            Ok(r) => r,
            Err(e) => return refuse(entry, e),
        };
        let watch_id = if req.watch_id != 0 {
            if entry.ids.contains_key(&req.watch_id) {
                return refuse(entry, Error::DuplicateWatchId);
            }
            req.watch_id
        } else {
            while entry.ids.contains_key(&entry.next_auto_id) {
                entry.next_auto_id += 1;
            }
            entry.next_auto_id += 1;
            entry.next_auto_id - 1
        };
        // 0 is "from the next revision"; a revision above the current one waits for it.
        let next_rev = if req.start_revision == 0 { rev + 1 } else { req.start_revision };
        let synced = next_rev > rev;
        let opts = Options {
            prev_kv: req.prev_kv,
            fragment: req.fragment,
            no_put: req.no_put,
            no_delete: req.no_delete,
            progress_notify: req.progress_notify,
        };
        let w = Watcher {
            uid: self.next_uid,
            stream,
            watch_id,
            range: range.clone(),
            next_rev,
            synced,
            opts,
            quiet: true,
        };
        let Some(slot) = self.watchers.insert(w) else {
            return refuse(entry, Error::TooManyWatchers);
        };
        self.next_uid += 1;
        entry.ids.insert(watch_id, slot);
        // `created` is queued before the watcher can receive anything, under the same lock
        // as every delivery, so it always comes first.
        entry.outbox.push_control(Response {
            watch_id,
            revision: rev,
            kind: ResponseKind::Created,
        });
        if opts.progress_notify {
            entry.outbox.add_progress_watchers(1);
        }
        if synced {
            self.synced.insert(slot, &range);
        } else {
            entry.unsynced.insert(slot);
            entry.outbox.set_unsynced(entry.unsynced.len());
        }
    }

    /// Cancels watcher `watch_id` of `stream` at the client's request; an unknown id gets
    /// no answer, as in etcd.
    fn cancel(&mut self, stream: u64, watch_id: i64) {
        let rev = self.rev;
        let Some(slot) = self.streams.get(&stream).and_then(|e| e.ids.get(&watch_id).copied())
        else {
            return;
        };
        if slot == ENDED {
            if let Some(entry) = self.streams.get_mut(&stream) {
                entry.ids.remove(&watch_id);
            }
        } else {
            self.remove_watcher(slot);
        }
        if let Some(entry) = self.streams.get_mut(&stream) {
            let canceled = Response { watch_id, revision: rev, kind: ResponseKind::Canceled };
            entry.outbox.push_control(canceled);
            entry.settle_deferred_progress(rev);
        }
    }

    /// Answers a stream-wide progress request now if every watcher is synced, else once
    /// they are.
    fn request_progress(&mut self, stream: u64) {
        let rev = self.rev;
        if let Some(entry) = self.streams.get_mut(&stream) {
            entry.progress_deferred = true;
            entry.settle_deferred_progress(rev);
        }
    }

    /// A progress tick: each synced `progress_notify` watcher that got no event since the
    /// last tick hears the current revision (etcd's `RequestProgress` per watcher).
    fn progress_tick(&mut self, stream: u64) {
        let rev = self.rev;
        let Some(entry) = self.streams.get(&stream) else { return };
        for slot in entry.ids.values() {
            let Some(w) = self.watchers.get_mut(*slot) else { continue };
            if !w.opts.progress_notify {
                continue;
            }
            if w.synced && w.quiet {
                let watch_id = w.watch_id;
                let progress = Response { watch_id, revision: rev, kind: ResponseKind::Progress };
                entry.outbox.push_free(progress);
            }
            w.quiet = true;
        }
    }

    /// Ends a stream: its watchers go away and its queue closes.
    fn close(&mut self, stream: u64) {
        let Some(entry) = self.streams.remove(&stream) else { return };
        for slot in entry.ids.values() {
            if let Some(w) = self.watchers.remove(*slot)
                && w.synced
            {
                self.synced.remove(*slot, &w.range);
            }
        }
        entry.outbox.close();
    }
}

/// Keeps the events a watcher wants: at or above its `next_rev`, not filtered out.
fn select(w: &Watcher, events: impl Iterator<Item = Arc<Event>>) -> Vec<Arc<Event>> {
    events
        .filter(|e| {
            e.kv.mod_revision >= w.next_rev
                && !(w.opts.no_put && e.kind == EventKind::Put)
                && !(w.opts.no_delete && e.kind == EventKind::Delete)
        })
        .collect()
}

/// Packs a watcher's events into responses with header revision `revision`, starting a new
/// response at a revision boundary once one passes [`RESPONSE_SOFT_BYTES`]; returns each
/// with its size estimate.
fn pack(w: &Watcher, events: Vec<Arc<Event>>, revision: i64) -> Vec<(Response, usize)> {
    let mut out = Vec::new();
    let mut cur: Vec<Arc<Event>> = Vec::new();
    let mut bytes = 0;
    let make = |events, bytes| {
        let kind =
            ResponseKind::Events { events, prev_kv: w.opts.prev_kv, fragment: w.opts.fragment };
        (Response { watch_id: w.watch_id, revision, kind }, bytes)
    };
    for ev in events {
        let boundary = cur.last().is_some_and(|l| l.kv.mod_revision != ev.kv.mod_revision);
        if boundary && bytes >= RESPONSE_SOFT_BYTES {
            out.push(make(std::mem::take(&mut cur), bytes));
            bytes = 0;
        }
        bytes += event_bytes(&ev);
        cur.push(ev);
    }
    if !cur.is_empty() {
        out.push(make(cur, bytes));
    }
    out
}

/// An estimate of the memory and wire size of an event.
fn event_bytes(e: &Event) -> usize {
    let kv = |kv: &mvcc::KeyValue| 48 + kv.key.len() + kv.value.len();
    kv(&e.kv) + e.prev_kv.as_ref().map_or(0, kv)
}

#[cfg(test)]
mod tests;
