//! State-machine checkpoints on their own thread, so a sync never stalls apply.
//!
//! A checkpoint flushes storage and fsyncs its files (`Engine::sync`), then reports the index
//! it covers through `on_durable` (the raft log may be compacted up to it). On sled with
//! 10,000 entries written since the last one, that takes tens of milliseconds; run on the
//! apply thread, every write in flight waited for it, which was the long tail of the put
//! latency at 256 clients. Here apply only asks: it hands over the applied index of writes it
//! has already made, and the sync that runs afterwards covers them (a flush makes durable
//! everything written before it starts). Apply never waits for a background checkpoint; it
//! waits only where it must (after installing a leader's snapshot, and at shutdown).
//!
//! Durability of acknowledged writes does not depend on any of this: they are in the raft
//! log, which is compacted only up to an index a finished checkpoint reported.
//!
//! A failed checkpoint is fatal and never retried (fsyncgate, see the apply module doc): the
//! thread records it in the member's [`Fatal`] latch and stops taking requests.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use crate::raft::Fatal;
use crate::storage::Engine;

/// A checkpoint to make: the index it covers, and whom to tell when it is done (a caller
/// that waits for it).
type Request = (u64, Option<SyncSender<bool>>);

/// The checkpoint thread and what apply knows of it.
pub(super) struct Checkpointer {
    tx: Option<SyncSender<Request>>,
    thread: Option<JoinHandle<()>>,
    /// The index the last successful checkpoint covers.
    durable: Arc<AtomicU64>,
    /// True from a request until its checkpoint has finished.
    busy: Arc<AtomicBool>,
    /// The member's fatal-failure latch, given once the applier knows it.
    fatal: Arc<OnceLock<Fatal>>,
}

impl Checkpointer {
    /// Starts the thread; `durable` is the index storage already holds durably.
    pub(super) fn start(
        engine: Arc<dyn Engine>,
        on_durable: Box<dyn Fn(u64) + Send>,
        durable: u64,
    ) -> Self {
        let (tx, rx) = sync_channel::<Request>(1);
        let durable = Arc::new(AtomicU64::new(durable));
        let busy = Arc::new(AtomicBool::new(false));
        let fatal = Arc::new(OnceLock::new());
        let (d, b, f) = (durable.clone(), busy.clone(), fatal.clone());
        let thread = std::thread::Builder::new()
            .name("cairn-checkpoint".into())
            .spawn(move || run(&rx, engine.as_ref(), on_durable.as_ref(), &d, &b, &f));
        let (tx, thread) = match thread {
            Ok(thread) => (Some(tx), Some(thread)),
            Err(e) => {
                // Without the thread nothing is checkpointed and the raft log keeps growing
                // until restart; writes stay durable through it.
                tracing::error!(error = %e, "cannot start the checkpoint thread");
                (None, None)
            }
        };
        Self { tx, thread, durable, busy, fatal }
    }

    /// Records a failed checkpoint in `fatal` (the member's latch).
    pub(super) fn set_fatal(&self, fatal: Fatal) {
        let _ = self.fatal.set(fatal);
    }

    /// The index the last successful checkpoint covers.
    pub(super) fn durable(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// Asks for a checkpoint covering `index` (whose writes are made) in the background,
    /// unless one is under way; never blocks.
    pub(super) fn request(&self, index: u64) {
        let Some(tx) = &self.tx else { return };
        if self.busy.swap(true, Ordering::AcqRel) {
            return;
        }
        if tx.try_send((index, None)).is_err() {
            self.busy.store(false, Ordering::Release);
        }
    }

    /// Makes a checkpoint covering `index` and waits for it; true when it succeeded.
    pub(super) fn checkpoint_now(&self, index: u64) -> bool {
        let Some(tx) = &self.tx else { return false };
        let (done, wait) = sync_channel(1);
        // A background checkpoint may hold the queue's slot: `send` waits for it.
        self.busy.store(true, Ordering::Release);
        if tx.send((index, Some(done))).is_err() {
            return false;
        }
        wait.recv().unwrap_or(false)
    }

    /// Lets the running checkpoint finish and stops the thread.
    pub(super) fn stop(&mut self) {
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The thread: one checkpoint per request, in order, until apply drops its sender.
fn run(
    rx: &Receiver<Request>,
    engine: &dyn Engine,
    on_durable: &(dyn Fn(u64) + Send),
    durable: &AtomicU64,
    busy: &AtomicBool,
    fatal: &OnceLock<Fatal>,
) {
    while let Ok((index, done)) = rx.recv() {
        let ok = match engine.sync() {
            Ok(()) => {
                // Never moves back: a waited-for checkpoint may have covered more already.
                durable.fetch_max(index, Ordering::AcqRel);
                on_durable(index);
                tracing::debug!(index, "state machine checkpoint");
                true
            }
            Err(e) => {
                // Never retried: the member stops, and the raft log, never compacted past
                // the last good checkpoint, replays at the restart.
                match fatal.get() {
                    Some(fatal) => {
                        fatal.set_error("state machine checkpoint (fsync) failed", &e);
                    }
                    None => tracing::error!(error = %e, "state machine checkpoint failed"),
                }
                false
            }
        };
        busy.store(false, Ordering::Release);
        if let Some(done) = done {
            let _ = done.send(ok);
        }
        if !ok {
            break;
        }
    }
}
