//! Apply: the one task that applies committed raft entries to the state machine, in order.
//!
//! Each batch of committed entries becomes one mvcc write transaction; the entries' effects
//! and the applied index are written in one atomic storage batch, so a restart never applies
//! an entry twice or skips one: the state machine reports the applied index it recovered and
//! raft replays the entries after it.
//!
//! Apply is deterministic: it reads no clock, randomness or network; everything it needs
//! travels inside the entry. It never syncs storage per entry: durability of acknowledged
//! writes comes from the raft log. Every `snapshot_count` entries (and at shutdown) it makes
//! a checkpoint: storage is synced and only then may the raft log be compacted up to the
//! checkpointed index.
//!
//! Deviation noted in DESIGN terms: the replicated request wraps etcd's request messages (as
//! etcd's InternalRaftRequest does), so the conversion from those messages to mvcc's domain
//! requests lives here, in [`convert`], and the gRPC edge reuses it for reads.

pub mod convert;
mod dispatch;
mod wait;

use std::sync::Arc;

use prost::Message as _;
use tokio::sync::{mpsc, watch};

use cairn_proto::internal::internal_request::Op;

use crate::lease::{self, Lessor};
use crate::mvcc::{self, KvStore, WriteTxn};
use crate::raft::{Entry, EntryType, ToApply};
use crate::storage::{Engine, Keyspace};
use crate::watch::WatchHub;

pub use self::convert::ConvertError;
pub use self::wait::Wait;

/// The `Keyspace::Meta` key holding the raft index of the last applied entry.
const APPLIED_INDEX_KEY: &[u8] = b"raft_applied_index";

/// Errors of applying one entry; they travel back to the proposer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The mvcc layer refused the request (compacted, future revision, key not found, ...).
    #[error(transparent)]
    Mvcc(#[from] mvcc::Error),
    /// The lessor refused the request (unknown lease, duplicate id, TTL too large).
    #[error(transparent)]
    Lease(#[from] lease::Error),
    /// The request could not be converted to a domain request.
    #[error(transparent)]
    Convert(#[from] ConvertError),
    /// The entry's payload is not a valid replicated request.
    #[error("undecodable entry at index {index}: {reason}")]
    Decode {
        /// The raft index of the entry.
        index: u64,
        /// The decoder's message.
        reason: String,
    },
}

/// The domain result of one applied request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// A put's result.
    Put(mvcc::PutResult),
    /// A delete's result.
    DeleteRange(mvcc::DeleteRangeResult),
    /// A txn's result.
    Txn(mvcc::TxnResult),
    /// A compaction finished (physically: the compacted revisions are gone from storage).
    Compact,
    /// A lease was granted with this id and TTL (seconds, after the minimum was applied).
    LeaseGrant {
        /// The lease id.
        id: i64,
        /// The granted TTL in seconds.
        ttl: i64,
    },
    /// A lease was revoked and its keys deleted.
    LeaseRevoke,
    /// Remaining TTLs were checkpointed.
    LeaseCheckpoint,
}

/// What the proposer of an entry receives.
pub type ApplyResult = Result<Response, Error>;

/// Reads the applied index recorded in `engine` (0 for a new state machine).
///
/// # Errors
/// Fails when storage cannot be read or the record is malformed.
pub fn applied_index(engine: &dyn Engine) -> Result<u64, mvcc::Error> {
    match engine.get(Keyspace::Meta, APPLIED_INDEX_KEY)? {
        None => Ok(0),
        Some(v) => {
            let bytes: [u8; 8] = v
                .as_slice()
                .try_into()
                .map_err(|_| mvcc::Error::Corrupt("applied index record is not 8 bytes".into()))?;
            Ok(u64::from_be_bytes(bytes))
        }
    }
}

/// Entries applied in one write transaction, awaiting its commit.
#[derive(Default)]
struct Group {
    /// Raft index of the last entry in the group (0 = empty group).
    last: u64,
    /// Results for the proposers, triggered once the group is committed.
    results: Vec<(u64, ApplyResult)>,
}

/// The apply task's state.
pub struct Applier {
    kv: KvStore,
    leases: Lessor,
    engine: Arc<dyn Engine>,
    wait: Arc<Wait>,
    applied: watch::Sender<u64>,
    /// Entries between checkpoints.
    snapshot_count: u64,
    /// The index covered by the last checkpoint.
    checkpointed: u64,
    /// Told the durable index after each checkpoint (the raft log may be compacted to it).
    on_durable: Box<dyn Fn(u64) + Send>,
    /// Hears each committed group's events (notify only: it never blocks apply).
    watch: Option<WatchHub>,
}

impl Applier {
    /// Creates the applier. `applied` must hold the recovered applied index.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kv: KvStore,
        leases: Lessor,
        engine: Arc<dyn Engine>,
        wait: Arc<Wait>,
        applied: watch::Sender<u64>,
        snapshot_count: u64,
        on_durable: Box<dyn Fn(u64) + Send>,
    ) -> Self {
        let checkpointed = *applied.borrow();
        Self {
            kv,
            leases,
            engine,
            wait,
            applied,
            snapshot_count,
            checkpointed,
            on_durable,
            watch: None,
        }
    }

    /// Hands every committed group's events to `hub` from now on.
    pub fn with_watch(mut self, hub: WatchHub) -> Self {
        self.watch = Some(hub);
        self
    }

    /// Applies everything raft hands over until the channel closes, then checkpoints.
    ///
    /// Runs on its own thread: it blocks on storage.
    pub fn run(mut self, mut rx: mpsc::Receiver<ToApply>) {
        while let Some(task) = rx.blocking_recv() {
            match task {
                ToApply::Entries(entries) => {
                    // Merge what is already queued into one storage batch.
                    let mut entries = entries;
                    while entries.len() < 4096 {
                        match rx.try_recv() {
                            Ok(ToApply::Entries(more)) => entries.extend(more),
                            Ok(ToApply::Snapshot(_)) => {
                                tracing::error!(
                                    "leader snapshots need a multi-member cluster; stopping apply"
                                );
                                return;
                            }
                            Err(_) => break,
                        }
                    }
                    self.apply_entries(entries);
                }
                ToApply::Snapshot(_) => {
                    // A single-member cluster never receives one: its log is never behind a
                    // leader. Installing leader snapshots arrives with multi-member clusters.
                    tracing::error!("leader snapshots need a multi-member cluster; stopping apply");
                    return;
                }
            }
            let applied = *self.applied.borrow();
            if applied.saturating_sub(self.checkpointed) >= self.snapshot_count {
                self.checkpoint(applied);
            }
        }
        let applied = *self.applied.borrow();
        if applied > self.checkpointed {
            self.checkpoint(applied);
        }
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) {
        let prev = *self.applied.borrow();
        let mut group = Group::default();
        let mut txn = self.kv.write();
        for entry in entries {
            // raft may resend entries the state machine already holds after a restart.
            if entry.index <= prev {
                continue;
            }
            match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {
                    // The empty entry a new leader appends to commit its term.
                }
                EntryType::EntryNormal => {
                    match cairn_proto::internal::InternalRequest::decode(entry.data.as_ref()) {
                        Ok(req) => {
                            if matches!(req.op, Some(Op::LeaseRevoke(_))) && group.last > 0 {
                                // A revoke deletes the keys attached to its lease, and keys
                                // attach when their puts commit: commit what came before.
                                self.commit(txn, std::mem::take(&mut group));
                                txn = self.kv.write();
                            }
                            let res = dispatch::apply(&mut txn, &self.leases, req.op);
                            group.results.push((req.id, res));
                        }
                        Err(e) => {
                            tracing::error!(index = entry.index, error = %e, "skipping undecodable entry");
                        }
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    tracing::warn!(
                        index = entry.index,
                        "membership changes need a multi-member cluster; entry skipped"
                    );
                }
            }
            group.last = entry.index;
        }
        if group.last > 0 {
            self.commit(txn, group);
        }
    }

    /// Writes one group's effects with its applied index atomically, then publishes them:
    /// lease attachments, the applied index, and the proposers' results.
    fn commit(&self, mut txn: WriteTxn<'_>, group: Group) {
        txn.batch_mut().put(
            Keyspace::Meta,
            APPLIED_INDEX_KEY.to_vec(),
            group.last.to_be_bytes().to_vec(),
        );
        let events = match txn.commit() {
            Ok(events) => events,
            Err(e) => {
                // The state machine diverged from the log it claims to have applied; the
                // only safe course is to stop and recover from the raft log on restart.
                tracing::error!(error = %e, index = group.last, "state machine write failed");
                std::process::abort();
            }
        };
        self.leases.observe(&events);
        // Watchers hear of the group once storage holds it (a catch-up may read it back)
        // and before the proposers do, as etcd notifies at the end of each apply txn.
        if let Some(hub) = &self.watch {
            hub.notify(events);
        }
        self.applied.send_replace(group.last);
        if let Some(m) = crate::metrics::get() {
            m.server.proposals_applied_total.set(i64::try_from(group.last).unwrap_or(i64::MAX));
        }
        for (id, res) in group.results {
            self.wait.trigger(id, res);
        }
    }

    fn checkpoint(&mut self, index: u64) {
        match self.engine.sync() {
            Ok(()) => {
                self.checkpointed = index;
                (self.on_durable)(index);
                tracing::debug!(index, "state machine checkpoint");
            }
            Err(e) => tracing::warn!(error = %e, "state machine checkpoint failed; raft log kept"),
        }
    }
}
