//! One client stream: its bounded response queue ([`Outbox`]), the request side
//! ([`WatchStream`]) and the response side ([`ResponseSource`]), which also drives the
//! stream's catch-up and progress ticks.
//!
//! The queue has two budgets. Event responses (what apply and catch-up queue) are bounded by
//! [`WatchConfig`]: past it, apply sets the watcher aside instead of queueing. Control
//! responses (`created`, `canceled`, progress answers) are bounded by [`CONTROL_CAP`], and
//! a request waits for room there, so a client that sends requests without reading
//! answers is slowed down rather than buffered without end (etcd's `ctrlStream` of 16).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{CreateRequest, Response, ResponseKind, Shared, WatchConfig};

/// Control responses a stream queues before its requests wait (etcd's `ctrlStreamBufLen`).
pub const CONTROL_CAP: usize = 16;

/// What one queued response counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cost {
    /// An answer to a request.
    Control,
    /// Events: their size estimate and their number.
    Events(usize, usize),
    /// A progress tick or a catch-up cancel: bounded by the number of watchers.
    Free,
}

/// The response queue of one stream, shared by the hub (producers) and the stream's
/// response task (the consumer).
pub(super) struct Outbox {
    queue: Mutex<Queue>,
    /// Wakes the response task: something was queued, or the stream closed.
    wake: Notify,
    /// Wakes the request task: a control response left the queue.
    room: Notify,
    cfg: WatchConfig,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<(Response, Cost)>,
    /// Event responses queued.
    event_items: usize,
    /// Event bytes queued.
    event_bytes: usize,
    /// Events queued (a response holds one or more).
    events: usize,
    /// Control responses queued.
    control_items: usize,
    /// The stream's unsynced watchers (mirrors the hub's set, readable without its lock).
    unsynced: usize,
    /// The stream's watchers with `progress_notify`.
    progress_watchers: usize,
    closed: bool,
}

/// What the response task should do next.
enum Next {
    Send(Response),
    CatchUp,
    Idle,
    Closed,
}

impl Outbox {
    pub(super) fn new(cfg: WatchConfig) -> Self {
        Self { queue: Mutex::default(), wake: Notify::new(), room: Notify::new(), cfg }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues an answer to a request (`created`, `canceled`, a refusal, a stream-wide
    /// progress response); the request side waits for [`CONTROL_CAP`] room beforehand.
    pub(super) fn push_control(&self, r: Response) {
        self.push_with(r, Cost::Control);
    }

    /// Queues a progress tick or a catch-up's cancel: at most one per watcher at a time.
    pub(super) fn push_free(&self, r: Response) {
        self.push_with(r, Cost::Free);
    }

    /// Queues catch-up output regardless of the event budget: the catch-up step runs only
    /// while the budget is at most half used, and bounds what one step produces.
    pub(super) fn push_events(&self, responses: Vec<(Response, usize)>) {
        for (r, bytes) in responses {
            let n = event_count(&r);
            self.push_with(r, Cost::Events(bytes, n));
        }
    }

    fn push_with(&self, r: Response, cost: Cost) {
        let mut q = self.lock();
        if q.closed {
            return;
        }
        match cost {
            Cost::Control => q.control_items += 1,
            Cost::Events(bytes, n) => {
                q.event_items += 1;
                q.event_bytes += bytes;
                q.events += n;
            }
            Cost::Free => {}
        }
        q.items.push_back((r, cost));
        drop(q);
        self.wake.notify_one();
    }

    /// Queues a watcher's event responses if the event budget has room; returns false (and
    /// queues nothing) otherwise. An empty queue always takes them, so a revision larger
    /// than the budget still goes out.
    pub(super) fn offer(&self, responses: Vec<(Response, usize)>) -> bool {
        let mut q = self.lock();
        if q.closed {
            // Nobody will read them; pretend they went out rather than set anyone aside.
            return true;
        }
        let full =
            q.event_items >= self.cfg.queue_responses || q.event_bytes >= self.cfg.queue_bytes;
        if full && q.event_items > 0 {
            return false;
        }
        for (r, bytes) in responses {
            let n = event_count(&r);
            q.event_items += 1;
            q.event_bytes += bytes;
            q.events += n;
            q.items.push_back((r, Cost::Events(bytes, n)));
        }
        drop(q);
        self.wake.notify_one();
        true
    }

    /// The number of events queued.
    pub(super) fn pending_events(&self) -> usize {
        self.lock().events
    }

    /// Records how many of the stream's watchers wait to catch up.
    pub(super) fn set_unsynced(&self, n: usize) {
        let mut q = self.lock();
        let became = q.unsynced == 0 && n > 0;
        q.unsynced = n;
        drop(q);
        if became {
            self.wake.notify_one();
        }
    }

    /// Adjusts the count of `progress_notify` watchers.
    pub(super) fn add_progress_watchers(&self, delta: isize) {
        let mut q = self.lock();
        q.progress_watchers = q.progress_watchers.saturating_add_signed(delta);
        drop(q);
        self.wake.notify_one();
    }

    /// Closes the queue: queued responses are dropped and waiters released.
    pub(super) fn close(&self) {
        let mut q = self.lock();
        q.closed = true;
        q.items.clear();
        drop(q);
        self.wake.notify_one();
        self.room.notify_waiters();
    }

    /// Waits until a control response fits; false when the stream closed.
    async fn control_room(&self) -> bool {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let q = self.lock();
                if q.closed {
                    return false;
                }
                if q.control_items < CONTROL_CAP {
                    return true;
                }
            }
            room.await;
        }
    }

    /// Takes the next response, or says why there is none. With `may_step`, catching up
    /// comes first while the event budget is at most half used and no answer to a request
    /// waits, so unsynced watchers progress even on a busy stream, and never when the
    /// client is not reading (the queue stays full then). Also returns the number of
    /// `progress_notify` watchers.
    fn next(&self, may_step: bool) -> (Next, usize) {
        let mut q = self.lock();
        let progress_watchers = q.progress_watchers;
        (self.next_locked(&mut q, may_step), progress_watchers)
    }

    /// The number of responses queued.
    fn len(&self) -> usize {
        self.lock().items.len()
    }

    fn next_locked(&self, q: &mut Queue, may_step: bool) -> Next {
        if q.closed {
            return Next::Closed;
        }
        // Answers to requests go out before more history is read: a watcher replaying a
        // long history must not hold up another one's `created`.
        if may_step
            && q.unsynced > 0
            && q.control_items == 0
            && q.event_items <= self.cfg.queue_responses / 2
            && q.event_bytes <= self.cfg.queue_bytes / 2
        {
            return Next::CatchUp;
        }
        let Some((r, cost)) = q.items.pop_front() else {
            return Next::Idle;
        };
        match cost {
            Cost::Control => {
                q.control_items -= 1;
                self.room.notify_one();
            }
            Cost::Events(bytes, n) => {
                q.event_items -= 1;
                q.event_bytes -= bytes;
                q.events -= n;
            }
            Cost::Free => {}
        }
        Next::Send(r)
    }
}

/// The number of events a response carries.
fn event_count(r: &Response) -> usize {
    match &r.kind {
        ResponseKind::Events { events, .. } => events.len(),
        _ => 0,
    }
}

/// The request side of a client stream: create, cancel, ask for progress. Cheap to clone.
#[derive(Clone)]
pub struct WatchStream {
    shared: Arc<Shared>,
    id: u64,
    outbox: Arc<Outbox>,
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream").field("id", &self.id).finish()
    }
}

impl WatchStream {
    /// Creates a watcher; its `created` (or refusal) and then its events come out of the
    /// stream's [`ResponseSource`]. Waits while the client leaves too many answers unread.
    pub async fn create(&self, req: CreateRequest) {
        if self.outbox.control_room().await {
            self.shared.lock().create(self.id, req);
        }
    }

    /// Cancels watcher `watch_id`: it gets no event after its `canceled` response.
    pub async fn cancel(&self, watch_id: i64) {
        if self.outbox.control_room().await {
            self.shared.lock().cancel(self.id, watch_id);
        }
    }

    /// Asks for one stream-wide progress response (watch id -1), sent as soon as every
    /// watcher of the stream is synced.
    pub async fn request_progress(&self) {
        if self.outbox.control_room().await {
            self.shared.lock().request_progress(self.id);
        }
    }
}

/// The response side of a client stream; dropping it ends the stream and its watchers.
pub struct ResponseSource {
    shared: Arc<Shared>,
    id: u64,
    outbox: Arc<Outbox>,
    /// When the next progress tick is due, while the stream has `progress_notify`
    /// watchers.
    next_tick: Option<Instant>,
    /// Responses to send before the next catch-up step: what was queued when the last
    /// step ended. Steps and sends take turns, so live events of the stream's synced
    /// watchers wait for at most one step, however long another watcher's replay is.
    sends_before_step: usize,
}

impl std::fmt::Debug for ResponseSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseSource").field("id", &self.id).finish()
    }
}

/// Builds the two halves of stream `id`.
pub(super) fn open(
    shared: Arc<Shared>,
    id: u64,
    outbox: Arc<Outbox>,
) -> (WatchStream, ResponseSource) {
    let req = WatchStream { shared: shared.clone(), id, outbox: outbox.clone() };
    (req, ResponseSource { shared, id, outbox, next_tick: None, sends_before_step: 0 })
}

impl ResponseSource {
    /// Returns the next response for the client, catching unsynced watchers up and
    /// sending progress ticks as they fall due; `None` once the stream is closed.
    ///
    /// Cancel-safe: a call dropped while it waits (or while a catch-up read is in flight)
    /// loses nothing; the catch-up is simply redone.
    pub async fn next(&mut self) -> Option<Response> {
        loop {
            let wake = self.outbox.wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            if self.next_tick.is_some_and(|t| t <= Instant::now()) {
                self.next_tick = None;
                self.shared.lock().progress_tick(self.id);
            }
            let (next, progress_watchers) = self.outbox.next(self.sends_before_step == 0);
            // Ticks run while the stream has `progress_notify` watchers, busy or not.
            if progress_watchers == 0 {
                self.next_tick = None;
            } else if self.next_tick.is_none() {
                self.next_tick = Some(Instant::now() + self.tick_interval());
            }
            match next {
                Next::Send(r) => {
                    self.sends_before_step = self.sends_before_step.saturating_sub(1);
                    return Some(r);
                }
                Next::Closed => return None,
                Next::CatchUp => {
                    super::sync::step(&self.shared, self.id).await;
                    self.sends_before_step = self.outbox.len();
                    continue;
                }
                Next::Idle => {}
            }
            match self.next_tick {
                Some(at) => {
                    tokio::select! {
                        () = &mut wake => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => wake.await,
            }
        }
    }

    /// The progress interval plus up to 10 % jitter, as etcd adds, so that streams opened
    /// together do not tick together. The jitter comes from hashing the stream id: Cairn
    /// carries no random number generator, and ids spread streams just as well.
    fn tick_interval(&self) -> Duration {
        let base = self.shared.cfg.progress_notify_interval;
        let permille = self.id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54; // 0..1023
        base + base.mul_f64((permille % 100) as f64 / 1000.0)
    }
}

impl Drop for ResponseSource {
    fn drop(&mut self) {
        self.shared.lock().close(self.id);
    }
}
