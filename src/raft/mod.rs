//! Consensus: drives a raft-rs `RawNode` and persists its log.
//!
//! One owner task (in [`node`]) holds the `RawNode` on a dedicated thread, so the fdatasync
//! of each `Ready` never blocks the client-facing runtime. It selects over an inbox of
//! [`Command`]s and a ticker; per `Ready` it sends messages, hands committed entries to apply,
//! appends entries and hard state to the [`LogStore`] with one fdatasync (group commit: all
//! proposals that arrived since the last `Ready` share it), and advances.
//!
//! This module moves bytes. It knows nothing of gRPC, etcd messages or mvcc: entries are
//! `Vec<u8>`, peers are reached through the [`Transport`] trait declared here and implemented
//! by the peer service, and committed entries leave through a channel as [`ToApply`].

mod fatal;
pub mod log_store;
mod logger;
mod node;
mod snapshot;
mod transport;
mod wal;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

pub use self::fatal::{Cause, Failure, Fatal};
pub use self::log_store::LogStore;
pub use self::logger::tracing_logger;
pub use self::node::start;
pub use self::snapshot::{Images, Reference, SnapshotImage};
pub use self::transport::{NoPeers, Transport};
pub use raft::prelude::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, MessageType, Snapshot,
};

/// Errors of the consensus layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The member knows no leader, so a proposal or read index cannot be served.
    #[error("no leader")]
    NoLeader,
    /// The raft task has stopped (shutdown or a fatal persistence failure).
    #[error("raft stopped")]
    Stopped,
    /// raft-rs refused an operation.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// The state machine is behind the raft log's compaction point: the entries between were
    /// dropped, so replay cannot rebuild it (the state machine lost durable data).
    #[error(
        "state machine applied index {applied} is behind the raft log's compaction point {compacted}"
    )]
    StateBehindLog {
        /// The state machine's applied index.
        applied: u64,
        /// The last index dropped from the raft log.
        compacted: u64,
    },
    /// The durable raft log failed.
    #[error("raft log: {0}")]
    Log(#[from] log_store::Error),
}

/// What the raft task hands to the apply task, in log order.
#[derive(Debug)]
pub enum ToApply {
    /// Committed entries, contiguous and in index order.
    Entries(Vec<Entry>),
    /// A snapshot from the leader that replaces the state machine.
    Snapshot(Snapshot),
    /// raft needs a snapshot to send to a member behind the compacted log: export the state
    /// machine at the applied index and hand it back ([`RaftHandle::snapshot_ready`]).
    MakeSnapshot,
}

/// Static settings of the raft node.
#[derive(Debug, Clone)]
pub struct RaftConfig {
    /// This member's id (non-zero).
    pub id: u64,
    /// The voters of a brand-new cluster; used only when the log is empty.
    pub initial_voters: Vec<u64>,
    /// One tick.
    pub heartbeat: Duration,
    /// Election timeout in ticks (heartbeat is one tick).
    pub election_ticks: usize,
    /// The state machine's applied index at start; raft resends committed entries after it.
    pub applied: u64,
    /// Entries kept behind the compaction point for slow followers (etcd's 5000).
    pub catch_up_entries: u64,
}

/// A point-in-time view of the node, published after every `Ready`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaftStatus {
    /// This member's id.
    pub id: u64,
    /// The current leader's id, 0 when unknown.
    pub leader: u64,
    /// The current term.
    pub term: u64,
    /// The commit index.
    pub commit: u64,
    /// The last index in the log.
    pub last_index: u64,
    /// Per-member match index as the leader tracks it (empty on followers).
    pub progress: Vec<(u64, u64)>,
    /// The voters of the current configuration.
    pub voters: Vec<u64>,
    /// Members the leader heard from within the last election timeout (wall clock), itself
    /// included (empty on followers).
    pub active: Vec<u64>,
}

impl RaftStatus {
    /// True when this member is the leader.
    pub fn is_leader(&self) -> bool {
        self.leader != 0 && self.leader == self.id
    }
}

/// Requests to the raft task.
#[derive(Debug)]
pub(crate) enum Command {
    /// Propose `data` as a normal entry; the reply says whether raft accepted it (not
    /// whether it committed: the caller waits for apply).
    Propose { data: Vec<u8>, reply: oneshot::Sender<Result<(), Error>> },
    /// Ask for a read index; the reply carries the commit index to wait for.
    ReadIndex { ctx: Vec<u8>, reply: oneshot::Sender<Result<u64, Error>> },
    /// A message from a peer.
    Step(Box<Message>),
    /// The state machine has durably applied up to this index; the log may be compacted.
    Compact(u64),
    /// Propose a conf change (membership); like `Propose`, the reply only says accepted.
    ProposeConfChange { cc: ConfChange, reply: oneshot::Sender<Result<(), Error>> },
    /// Apply has applied this conf change to the member records; raft's conf state follows.
    ApplyConfChange(ConfChange),
    /// Apply exported the state machine at `index` for raft snapshots.
    SnapshotReady { index: u64, data: Vec<u8> },
    /// The transport could not deliver to this member.
    Unreachable(u64),
    /// The transport finished (or failed) sending a snapshot to this member.
    SnapshotStatus { to: u64, ok: bool },
    /// The snapshot recorded at this index can no longer be served; forget it.
    DropSnapshot(u64),
    /// Hand leadership to this member.
    TransferLeader(u64),
    /// Stop the raft task (graceful shutdown).
    Shutdown,
}

/// A cheap, cloneable handle to the raft task.
#[derive(Debug, Clone)]
pub struct RaftHandle {
    tx: mpsc::Sender<Command>,
    status: watch::Receiver<RaftStatus>,
    fatal: Fatal,
    /// The state image this member offers for raft snapshots (`snapshot.rs`).
    images: Arc<Images>,
}

impl RaftHandle {
    /// Proposes `data` as a log entry.
    ///
    /// # Errors
    /// [`Error::NoLeader`] when raft drops the proposal for want of a leader,
    /// [`Error::Stopped`] when the raft task is gone.
    pub async fn propose(&self, data: Vec<u8>) -> Result<(), Error> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Propose { data, reply }).await.map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// Asks raft for a read index under the unique context `ctx` and returns the index a
    /// linearizable read must wait for the state machine to reach.
    ///
    /// The answer may never come (a leader change drops it); callers bound the wait.
    ///
    /// # Errors
    /// [`Error::NoLeader`] or [`Error::Stopped`].
    pub async fn read_index(&self, ctx: Vec<u8>) -> Result<u64, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::ReadIndex { ctx, reply }).await.map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// Delivers a message from a peer.
    ///
    /// # Errors
    /// [`Error::Stopped`] when the raft task is gone.
    pub async fn step(&self, msg: Message) -> Result<(), Error> {
        self.tx.send(Command::Step(Box::new(msg))).await.map_err(|_| Error::Stopped)
    }

    /// Proposes a membership change; `cc.context` carries the proposer's wait id.
    ///
    /// # Errors
    /// As [`RaftHandle::propose`].
    pub async fn propose_conf_change(&self, cc: ConfChange) -> Result<(), Error> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::ProposeConfChange { cc, reply }).await.map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// Tells raft that apply applied `cc`; blocks the (non-async) apply thread until queued,
    /// because a lost conf change would leave raft's configuration behind the members.
    pub fn applied_conf_change(&self, cc: ConfChange) {
        if self.tx.blocking_send(Command::ApplyConfChange(cc)).is_err() {
            tracing::warn!("raft stopped before an applied conf change reached it");
        }
    }

    /// Hands raft a state image at `index` to serve as its snapshot; never blocks.
    pub fn snapshot_ready(&self, index: u64, data: Vec<u8>) {
        // A full inbox drops it; raft asks again when it still needs one.
        let _ = self.tx.try_send(Command::SnapshotReady { index, data });
    }

    /// Offers `image`, the state at applied index `index`, as raft's snapshot; raft's
    /// snapshot then carries a reference to it, read by the transport when it sends.
    pub fn offer_snapshot(&self, index: u64, image: Arc<dyn SnapshotImage>) {
        self.images.offer(index, image);
        self.snapshot_ready(index, Reference::pinned(index));
    }

    /// The image offered at `index`, if it is still the current one.
    pub fn snapshot_image(&self, index: u64) -> Option<Arc<dyn SnapshotImage>> {
        self.images.get(index)
    }

    /// Tells raft that its snapshot at `index` can no longer be read (its view was
    /// invalidated, or it is a reference only another member understood); the next member
    /// that needs a snapshot gets a fresh one. Never blocks.
    pub fn snapshot_unusable(&self, index: u64) {
        self.images.forget(index);
        let _ = self.tx.try_send(Command::DropSnapshot(index));
    }

    /// Reports that `to` could not be reached; never blocks.
    pub fn report_unreachable(&self, to: u64) {
        let _ = self.tx.try_send(Command::Unreachable(to));
    }

    /// Reports the outcome of sending a snapshot to `to`; never blocks.
    pub fn report_snapshot(&self, to: u64, ok: bool) {
        let _ = self.tx.try_send(Command::SnapshotStatus { to, ok });
    }

    /// Asks the leader to hand leadership to `to` (raft's leader transfer).
    ///
    /// # Errors
    /// [`Error::Stopped`] when the raft task is gone.
    pub async fn transfer_leader(&self, to: u64) -> Result<(), Error> {
        self.tx.send(Command::TransferLeader(to)).await.map_err(|_| Error::Stopped)
    }

    /// Tells raft the state machine is durable up to `index`; never blocks.
    pub fn compact(&self, index: u64) {
        // A full inbox only delays compaction until the next checkpoint.
        let _ = self.tx.try_send(Command::Compact(index));
    }

    /// Stops the raft task; committed entries already handed to apply are still applied.
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown).await;
    }

    /// Returns a copy of the latest published status (its member lists allocate: the
    /// accessors below read one field without copying the rest).
    pub fn status(&self) -> RaftStatus {
        self.status.borrow().clone()
    }

    /// Returns the current leader's id, 0 when none is known.
    pub fn leader(&self) -> u64 {
        self.status.borrow().leader
    }

    /// Returns true when this member leads.
    pub fn is_leader(&self) -> bool {
        self.status.borrow().is_leader()
    }

    /// Returns the current term.
    pub fn term(&self) -> u64 {
        self.status.borrow().term
    }

    /// Returns the commit index.
    pub fn commit(&self) -> u64 {
        self.status.borrow().commit
    }

    /// Waits until this member knows a leader, at most `limit`; true when it does.
    pub async fn wait_for_leader(&self, limit: Duration) -> bool {
        let mut status = self.status.clone();
        matches!(tokio::time::timeout(limit, status.wait_for(|s| s.leader != 0)).await, Ok(Ok(_)))
    }

    /// True once the raft task has ended.
    pub fn is_stopped(&self) -> bool {
        self.tx.is_closed()
    }

    /// Resolves once the raft task has ended: at shutdown, or on a fatal error it logged
    /// (a failed log write, a log that lost acknowledged entries).
    pub async fn stopped(&self) {
        let mut status = self.status.clone();
        while status.changed().await.is_ok() {}
    }

    /// The member's fatal-failure latch, set when the raft or the apply task stopped on an
    /// unrecoverable error (see [`Fatal`]).
    pub fn fatal(&self) -> &Fatal {
        &self.fatal
    }

    /// Returns a receiver woken by every change of leader, term or voters (the commit and
    /// last index and the progress change silently: read them, do not wait for them).
    pub fn subscribe(&self) -> watch::Receiver<RaftStatus> {
        self.status.clone()
    }
}
