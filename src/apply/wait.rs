//! Pending proposals: the proposer registers an id and waits; apply triggers it with the
//! entry's result (etcd's pkg/wait).

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::oneshot;

use super::ApplyResult;

/// Waiters keyed by request id.
#[derive(Debug, Default)]
pub struct Wait {
    waiters: Mutex<HashMap<u64, oneshot::Sender<ApplyResult>>>,
}

impl Wait {
    /// Creates an empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `id` and returns the receiver of its result.
    pub fn register(&self, id: u64) -> oneshot::Receiver<ApplyResult> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiters.lock() {
            w.insert(id, tx);
        }
        rx
    }

    /// Forgets `id` (the proposer gave up).
    pub fn cancel(&self, id: u64) {
        if let Ok(mut w) = self.waiters.lock() {
            w.remove(&id);
        }
    }

    /// Hands `result` to the waiter of `id`, if this member has one (entries proposed by
    /// other members have none here).
    pub fn trigger(&self, id: u64, result: ApplyResult) {
        let tx = self.waiters.lock().ok().and_then(|mut w| w.remove(&id));
        if let Some(tx) = tx {
            let _ = tx.send(result);
        }
    }
}
