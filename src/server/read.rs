//! Linearizable reads: one ReadIndex serves every reader that queued while the previous one
//! was in flight (etcd's linearizableReadLoop), then each waits for apply to reach the index.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::Error;
use crate::raft::{self, RaftHandle};

/// How long one ReadIndex attempt may take before it is retried (raft drops read indexes
/// silently, e.g. while a new leader has not committed in its term).
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);

/// Why a batch of reads failed; cheap to copy to every waiter.
#[derive(Debug, Clone, Copy)]
enum Failure {
    NoLeader,
    Timeout,
    Stopped,
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Self {
        match f {
            Failure::NoLeader => Error::NoLeader,
            Failure::Timeout => Error::Timeout,
            Failure::Stopped => Error::Stopped,
        }
    }
}

type Waiter = oneshot::Sender<Result<(), Failure>>;

/// The readers' side of the read loop.
#[derive(Debug, Clone)]
pub(super) struct ReadHandle {
    tx: mpsc::Sender<Waiter>,
}

impl ReadHandle {
    /// Waits until a linearizable read may run locally.
    pub(super) async fn barrier(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(tx).await.map_err(|_| Error::Stopped)?;
        match rx.await {
            Ok(r) => r.map_err(Error::from),
            Err(_) => Err(Error::Stopped),
        }
    }
}

/// Starts the read loop task.
pub(super) fn start(
    raft: RaftHandle,
    applied: watch::Receiver<u64>,
    timeout: Duration,
    leader_wait: Duration,
) -> (ReadHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(4096);
    let task = tokio::spawn(run(raft, applied, rx, timeout, leader_wait));
    (ReadHandle { tx }, task)
}

async fn run(
    raft: RaftHandle,
    mut applied: watch::Receiver<u64>,
    mut rx: mpsc::Receiver<Waiter>,
    timeout: Duration,
    leader_wait: Duration,
) {
    let mut seq: u64 = 0;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(w) = rx.try_recv() {
            batch.push(w);
        }
        let deadline = Instant::now() + timeout;
        // An election in progress is waited out (once, up to `leader_wait`), not reported.
        let mut leader_deadline = Some(Instant::now() + leader_wait);
        let result = async {
            let index = loop {
                seq += 1;
                let ctx = seq.to_be_bytes().to_vec();
                match tokio::time::timeout(ATTEMPT_TIMEOUT, raft.read_index(ctx)).await {
                    Ok(Ok(index)) => break index,
                    Ok(Err(raft::Error::NoLeader)) => match leader_deadline.take() {
                        Some(until) => {
                            let limit =
                                until.min(deadline).saturating_duration_since(Instant::now());
                            if !raft.wait_for_leader(limit).await {
                                return Err(Failure::NoLeader);
                            }
                        }
                        None => return Err(Failure::NoLeader),
                    },
                    Ok(Err(_)) => return Err(Failure::Stopped),
                    Err(_) if Instant::now() >= deadline => return Err(Failure::Timeout),
                    Err(_) => continue,
                }
            };
            match tokio::time::timeout_at(deadline, applied.wait_for(|a| *a >= index)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(_)) => Err(Failure::Stopped),
                Err(_) => Err(Failure::Timeout),
            }
        }
        .await;
        for w in batch {
            let _ = w.send(result);
        }
    }
}
