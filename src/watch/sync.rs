//! Catching unsynced watchers up from history (etcd's `syncWatchers`, run per stream).
//!
//! One step, run by the stream's response task while its queue has room and no answer to a
//! request waits (steps take turns with sending what is queued, so the stream's live
//! events are never held back by a long replay):
//!
//! 1. *Plan*, under the hub lock: cancel the watchers that need history older than the
//!    compaction point; move those already at the hub's revision into the synced group;
//!    pick the rest (oldest first, at most [`WATCHERS_PER_STEP`]) and a window of at most
//!    [`WINDOW_REVISIONS`] revisions from the oldest one's `next_rev`, ending at or below
//!    the hub's revision (whose events storage already holds).
//! 2. *Read* the window from storage on the blocking pool, without the hub lock: apply
//!    keeps notifying meanwhile, and only synced watchers hear from it.
//! 3. *Finish*, under the hub lock: queue each watcher's events at or after its
//!    `next_rev`, advance it past the window, and move it into the synced group when the
//!    window reached the hub's revision. If apply moved the revision on during the read,
//!    the watcher stays unsynced and the next step reads the rest.
//!
//! Because step 3 and `notify` both run under the hub lock and a watcher joins the synced
//! group only when it has every event up to the hub's revision, nothing is missed or sent
//! twice at the hand-over. A compaction that overtakes a read makes the read fail rather
//! than return a gap; the next plan then cancels whoever fell behind it.

use std::sync::Arc;

use super::group::Slot;
use super::{Error, HubState, Response, ResponseKind, Shared, WINDOW_REVISIONS, pack, select};
use crate::mvcc::{self, Event, History, HistoryRequest};

/// The most watchers one step catches up (etcd's `maxWatchersPerSync` is 512 for the whole
/// store; this is per stream).
const WATCHERS_PER_STEP: usize = 256;

/// The most events one step reads (a revision is never cut, so a step may read more).
const EVENTS_PER_STEP: usize = 1024;

/// What one step reads, and for whom.
#[derive(Debug)]
pub(super) struct Plan {
    request: HistoryRequest,
    /// The watchers being caught up, with their uids (a slot may be reused meanwhile).
    watchers: Vec<(Slot, u64)>,
}

/// The result of a step's read.
enum Outcome {
    Read(History),
    /// The window was compacted away during the read.
    Compacted,
    Failed(String),
}

/// Runs one catch-up step for `stream`.
pub(super) async fn step(shared: &Arc<Shared>, stream: u64) {
    let compact_rev = shared.kv.compact_revision();
    let Some(plan) = shared.lock().plan_catch_up(stream, compact_rev) else { return };
    let kv = shared.kv.clone();
    let request = plan.request.clone();
    // A window read takes up to a few milliseconds of storage reads: off the async workers.
    let outcome = match tokio::task::spawn_blocking(move || kv.events(&request)).await {
        Ok(Ok(history)) => Outcome::Read(history),
        Ok(Err(mvcc::Error::Compacted)) => Outcome::Compacted,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "watch catch-up cannot read history");
            Outcome::Failed(e.to_string())
        }
        Err(e) => Outcome::Failed(format!("catch-up task failed: {e}")),
    };
    shared.lock().finish_catch_up(stream, plan, outcome);
}

impl HubState {
    /// Step 1: settles the watchers that need no read and plans a read for the others.
    fn plan_catch_up(&mut self, stream: u64, compact_rev: i64) -> Option<Plan> {
        let rev = self.rev;
        let slots: Vec<Slot> = self.streams.get(&stream)?.unsynced.iter().copied().collect();
        let mut pending: Vec<(i64, Slot)> = Vec::new();
        for slot in slots {
            let Some(w) = self.watchers.get(slot) else {
                // Cannot happen (removal clears the set); dropping it avoids a busy loop.
                if let Some(entry) = self.streams.get_mut(&stream) {
                    entry.unsynced.remove(&slot);
                    entry.outbox.set_unsynced(entry.unsynced.len());
                }
                continue;
            };
            if w.next_rev < compact_rev {
                // etcd sends this response with an empty header revision.
                let watch_id = w.watch_id;
                self.end_watcher(slot);
                let kind = ResponseKind::Compacted { compact_revision: compact_rev };
                if let Some(entry) = self.streams.get(&stream) {
                    entry.outbox.push_free(Response { watch_id, revision: 0, kind });
                }
            } else if w.next_rev > rev {
                self.join_synced(slot);
            } else {
                pending.push((w.next_rev, slot));
            }
        }
        if let Some(entry) = self.streams.get_mut(&stream) {
            entry.settle_deferred_progress(rev);
        }
        pending.sort_unstable();
        pending.truncate(WATCHERS_PER_STEP);
        let from = pending.first()?.0;
        let to = rev.min(from.saturating_add(WINDOW_REVISIONS - 1));
        let mut range = None;
        let mut shared_range = true;
        let mut prev_kv = false;
        let mut watchers = Vec::with_capacity(pending.len());
        for (_, slot) in &pending {
            let Some(w) = self.watchers.get(*slot) else { continue };
            prev_kv |= w.opts.prev_kv;
            match range {
                None => range = Some(&w.range),
                Some(r) => shared_range &= *r == w.range,
            }
            watchers.push((*slot, w.uid));
        }
        // One range (the usual case: one new watcher) is filtered by the read itself;
        // several are matched here, from one read of every key in the window.
        let (key, range_end) = match range {
            Some(r) if shared_range => r.to_request(),
            _ => (vec![0], vec![0]),
        };
        let request = HistoryRequest { key, range_end, from, to, limit: EVENTS_PER_STEP, prev_kv };
        Some(Plan { request, watchers })
    }

    /// Step 3: queues what was read and advances the watchers.
    fn finish_catch_up(&mut self, stream: u64, plan: Plan, outcome: Outcome) {
        let rev = self.rev;
        match outcome {
            Outcome::Read(history) => {
                let events: Vec<Arc<Event>> = history.events.into_iter().map(Arc::new).collect();
                let upto = history.last_revision;
                for (slot, uid) in plan.watchers {
                    let Some(w) = self.watchers.get_mut(slot) else { continue };
                    if w.uid != uid || w.synced {
                        continue;
                    }
                    let mine = events.iter().filter(|e| w.range.contains(&e.kv.key)).cloned();
                    let evs = select(w, mine);
                    if !evs.is_empty() {
                        w.quiet = false;
                        let responses = pack(w, evs, upto);
                        if let Some(entry) = self.streams.get(&w.stream) {
                            entry.outbox.push_events(responses);
                        }
                    }
                    w.next_rev = w.next_rev.max(upto.saturating_add(1));
                    if w.next_rev > rev {
                        self.join_synced(slot);
                    }
                }
            }
            // The next plan cancels whoever is now behind the compaction point.
            Outcome::Compacted => {}
            Outcome::Failed(reason) => {
                for (slot, uid) in plan.watchers {
                    if self.watchers.get(slot).is_none_or(|w| w.uid != uid) {
                        continue;
                    }
                    if let Some(w) = self.end_watcher(slot)
                        && let Some(entry) = self.streams.get(&stream)
                    {
                        let kind = ResponseKind::Failed(Error::History(reason.clone()));
                        entry.outbox.push_free(Response {
                            watch_id: w.watch_id,
                            revision: rev,
                            kind,
                        });
                    }
                }
            }
        }
        if let Some(entry) = self.streams.get_mut(&stream) {
            entry.settle_deferred_progress(rev);
        }
    }
}
