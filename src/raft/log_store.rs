//! The durable raft log: [`LogStore`] implements raft-rs's [`raft::Storage`] over the
//! segment WAL in [`super::wal`].
//!
//! This module owns the raft log's state (entries after the compaction point, hard state,
//! conf state, the compaction point and the latest snapshot) and raft's rules about it:
//! appends must be contiguous, may replace a conflicting suffix (Raft §5.3), and may not
//! reach below the compaction point. It knows nothing of the state machine, gRPC or mvcc;
//! the bytes inside entries are opaque here.
//!
//! Every entry after the compaction point is kept in memory, as etcd's `MemoryStorage` does:
//! compaction follows the state machine's checkpoints (about every 10,000 entries), so the
//! in-memory log stays bounded and raft reads never touch the disk.
//!
//! # Durability argument
//!
//! - Each mutating method encodes its change as one record, writes it with one `write_all`
//!   and one `fdatasync` ([`super::wal::Wal::write`]), and only then changes the in-memory
//!   state. Readers therefore never see an entry or hard state that is not on disk, and a
//!   method that returned `Ok` has made its change durable: a crash loses nothing
//!   acknowledged. [`LogStore::append`] takes a whole raft `Ready` (entries and hard state)
//!   as one record, so many proposals share one `fdatasync` (group commit).
//! - When a record does not fit in the active segment, and on [`LogStore::apply_snapshot`],
//!   the new state is written as a fresh self-contained
//!   segment that becomes visible by an atomic rename after its `fdatasync`; older segments
//!   are deleted only after that (see [`super::wal`]).
//! - A crash mid-write can only tear the last record of the last segment, which was never
//!   acknowledged; open cuts it. Corruption anywhere else is reported, not repaired.
//! - After a failed write or sync the store refuses every later write ([`Error::Failed`]):
//!   the caller must treat it as fatal and reopen, which replays what the disk really holds.
//! - The snapshot recorded by [`LogStore::set_snapshot`] (and the data of one passed to
//!   [`LogStore::apply_snapshot`]) is kept in memory only: the state machine owns that data
//!   durably. After a reopen, raft's requests for a snapshot get
//!   `SnapshotTemporarilyUnavailable` until the node records a new one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

use super::wal::{self, Record, Wal};

/// Errors from the durable raft log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file system operation on the log's directory or one of its files failed.
    #[error("raft log I/O on {path}: {source}")]
    Io {
        /// The file or directory the operation touched.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A segment holds a record that cannot be read, outside the torn tail a crash may leave.
    #[error("raft log corrupt in {path} at offset {offset}: {reason}")]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// The byte offset of the bad record in that file.
        offset: u64,
        /// What is wrong with the record.
        reason: String,
    },
    /// A raft message could not be encoded for the log.
    #[error("cannot encode a raft log record: {reason}")]
    Encode {
        /// The encoder's complaint.
        reason: String,
    },
    /// One record would exceed the 4 GiB a record length can express.
    #[error("a raft log record of {len} bytes exceeds the record size limit")]
    RecordTooLarge {
        /// The record's size in bytes.
        len: usize,
    },
    /// The entries passed to an append do not have consecutive indexes.
    #[error("appended entries are not contiguous: index {got} follows {prev}")]
    NotContiguous {
        /// The index of the earlier entry.
        prev: u64,
        /// The index that follows it instead of `prev + 1`.
        got: u64,
    },
    /// An append starts after `last_index + 1`, which would leave a hole in the log.
    #[error("append at index {index} leaves a gap after the last index {last_index}")]
    Gap {
        /// The first appended index.
        index: u64,
        /// The log's last index.
        last_index: u64,
    },
    /// An append starts at or below the compaction point, whose entries are gone.
    #[error("append at index {index} is at or below the compaction point {compact_index}")]
    Compacted {
        /// The first appended index.
        index: u64,
        /// The last compacted index.
        compact_index: u64,
    },
    /// A compaction was asked past the last index.
    #[error("cannot compact to index {index}, past the last index {last_index}")]
    CompactPastLast {
        /// The requested compaction index.
        index: u64,
        /// The log's last index.
        last_index: u64,
    },
    /// A snapshot to install is older than the log's compaction point.
    #[error("snapshot at index {index} is older than the compaction point {compact_index}")]
    SnapshotOutOfDate {
        /// The snapshot's index.
        index: u64,
        /// The last compacted index.
        compact_index: u64,
    },
    /// [`LogStore::initialize`] was called on a log that already holds state.
    #[error("the raft log is already initialized")]
    AlreadyInitialized,
    /// An earlier write failed, so the log's durable state is unknown and writes are refused.
    #[error("the raft log refuses writes after an earlier write failure; reopen it to recover")]
    Failed,
}

impl From<Error> for raft::Error {
    /// Wraps a log error as raft's `StorageError::Other`, for code that returns raft errors.
    fn from(error: Error) -> raft::Error {
        raft::Error::Store(StorageError::Other(Box::new(error)))
    }
}

/// The in-memory image of the log.
///
/// Invariant: `entries[i].index == compact_index + 1 + i`, so the last index is
/// `compact_index + entries.len()` and an index maps to a position by subtraction.
#[derive(Default)]
struct State {
    hard_state: HardState,
    conf_state: ConfState,
    /// The compaction point: the last index dropped from the log (0 when none).
    compact_index: u64,
    /// The term of the entry at `compact_index`, kept for raft's log matching.
    compact_term: u64,
    entries: Vec<Entry>,
    /// The latest snapshot for `Storage::snapshot`; memory only.
    snapshot: Option<Snapshot>,
}

impl State {
    fn first_index(&self) -> u64 {
        self.compact_index + 1
    }

    fn last_index(&self) -> u64 {
        self.compact_index + self.entries.len() as u64
    }

    fn is_empty(&self) -> bool {
        self.compact_index == 0
            && self.entries.is_empty()
            && self.hard_state == HardState::default()
            && self.conf_state == ConfState::default()
    }

    /// The term of the entry at `index`, which must be in `[compact_index, last_index]`.
    fn term(&self, index: u64) -> Result<u64, StorageError> {
        if index < self.compact_index {
            return Err(StorageError::Compacted);
        }
        if index == self.compact_index {
            return Ok(self.compact_term);
        }
        self.entry(index).map(|e| e.term).ok_or(StorageError::Unavailable)
    }

    fn entry(&self, index: u64) -> Option<&Entry> {
        let offset = index.checked_sub(self.first_index())?;
        self.entries.get(usize::try_from(offset).ok()?)
    }

    /// Checks that `entries` can be appended: contiguous, starting no later than
    /// `last_index + 1` and after the compaction point.
    fn check_append(&self, entries: &[Entry]) -> Result<(), Error> {
        for (prev, next) in entries.iter().zip(entries.iter().skip(1)) {
            if next.index != prev.index + 1 {
                return Err(Error::NotContiguous { prev: prev.index, got: next.index });
            }
        }
        let Some(first) = entries.first() else {
            return Ok(());
        };
        if first.index <= self.compact_index {
            return Err(Error::Compacted { index: first.index, compact_index: self.compact_index });
        }
        if first.index > self.last_index() + 1 {
            return Err(Error::Gap { index: first.index, last_index: self.last_index() });
        }
        Ok(())
    }

    /// The entries an append starting at `first` keeps: those before it. An append that
    /// starts at or below the last index replaces the conflicting suffix (Raft §5.3).
    fn kept_before(&self, first: Option<&Entry>) -> &[Entry] {
        let keep = first.map_or(self.entries.len(), |e| self.position(e.index));
        self.entries.get(..keep).unwrap_or(&self.entries)
    }

    /// The position `index` would take in `entries`, clamped to the vector's length.
    fn position(&self, index: u64) -> usize {
        let offset = index.saturating_sub(self.first_index());
        usize::try_from(offset).unwrap_or(usize::MAX).min(self.entries.len())
    }

    /// Applies a checked append to memory.
    fn append(&mut self, entries: &[Entry], hard_state: Option<&HardState>) {
        if let Some(first) = entries.first() {
            let keep = self.position(first.index);
            self.entries.truncate(keep);
            self.entries.extend_from_slice(entries);
        }
        if let Some(hard_state) = hard_state {
            self.hard_state = hard_state.clone();
        }
    }

    /// Encodes this state, with `hard_state` and `conf_state` replacing the current ones,
    /// as the content of a new segment.
    fn encode_with(
        &self,
        hard_state: &HardState,
        conf_state: &ConfState,
    ) -> Result<Vec<u8>, Error> {
        wal::encode_state(
            hard_state,
            conf_state,
            self.compact_index,
            self.compact_term,
            &self.entries,
        )
    }

    /// Applies one replayed record, rejecting records that break the log's invariants: such
    /// a record passed its checksum, so the log on disk is inconsistent, not torn.
    fn replay(&mut self, record: Record) -> Result<(), String> {
        match record {
            Record::Base { hard_state, conf_state, index, term } => {
                *self = State {
                    hard_state,
                    conf_state,
                    compact_index: index,
                    compact_term: term,
                    entries: Vec::new(),
                    snapshot: None,
                };
            }
            Record::Append { hard_state, entries } => {
                self.check_append(&entries).map_err(|e| e.to_string())?;
                self.append(&entries, hard_state.as_ref());
            }
            Record::ConfState(conf_state) => self.conf_state = conf_state,
            Record::Compact { index, term } => {
                if index > self.last_index() {
                    return Err(format!(
                        "compaction to {index} past the last index {}",
                        self.last_index()
                    ));
                }
                if index > self.compact_index {
                    self.compact_to(index, term);
                }
            }
        }
        Ok(())
    }

    /// Drops the entries up to `index` (within the log) from memory.
    fn compact_to(&mut self, index: u64, term: u64) {
        let dropped = self.position(index + 1);
        self.entries.drain(..dropped);
        self.compact_index = index;
        self.compact_term = term;
    }
}

/// Checks the invariants raft-rs asserts (with a panic) when it restores `cs` at start:
/// no member id 0, no member twice in one list, no learner that is also a voter of either half of a joint
/// configuration, and `learners_next`/`auto_leave` only with outgoing voters, the former
/// among them (etcd raft `confchange.checkInvariants`).
fn check_conf_state(cs: &ConfState) -> Result<(), String> {
    use std::collections::HashSet;
    let set = |name: &str, ids: &[u64]| -> Result<HashSet<u64>, String> {
        let set: HashSet<u64> = ids.iter().copied().collect();
        if set.len() == ids.len() {
            Ok(set)
        } else {
            Err(format!("conf state lists a member twice in {name}"))
        }
    };
    let all = || cs.voters.iter().chain(&cs.learners).chain(&cs.voters_outgoing);
    if all().chain(&cs.learners_next).any(|id| *id == raft::INVALID_ID) {
        return Err("conf state names member id 0".into());
    }
    let voters = set("voters", &cs.voters)?;
    let learners = set("learners", &cs.learners)?;
    let outgoing = set("voters_outgoing", &cs.voters_outgoing)?;
    let next = set("learners_next", &cs.learners_next)?;
    if !learners.is_disjoint(&voters) || !learners.is_disjoint(&outgoing) {
        return Err("conf state has a member that is both a learner and a voter".into());
    }
    if outgoing.is_empty() && (!next.is_empty() || cs.auto_leave) {
        return Err(
            "conf state has learners_next or auto_leave without a joint configuration".into()
        );
    }
    if !next.is_subset(&outgoing) || !next.is_disjoint(&voters) || !next.is_disjoint(&learners) {
        return Err("conf state has learners_next outside the outgoing voters".into());
    }
    Ok(())
}

/// Everything one log directory owns, shared by the clones of a [`LogStore`].
struct Shared {
    /// The in-memory log, read by raft through `Storage` and replaced after each write.
    state: RwLock<State>,
    /// The WAL. Every mutation holds this lock from validation to the memory update, so
    /// mutations are serialised while readers only wait for the brief memory update, never
    /// for an `fdatasync`.
    wal: Mutex<Wal>,
    /// Set when raft asked for a snapshot newer than the recorded one; the raft task then
    /// asks apply to export the state machine.
    snapshot_wanted: std::sync::atomic::AtomicBool,
}

/// Cairn's durable raft log: raft-rs [`raft::Storage`] over our own segment WAL.
///
/// Cloning is cheap and every clone sees the same log; it is `Send + Sync`. Every mutating
/// method is durable (`fdatasync`ed) when it returns `Ok`, except for records whose loss is
/// harmless and which ride on the next `fdatasync` (a commit index alone, a compaction
/// point); on `Err` the change may or may not be on disk, and the store refuses further
/// writes (the caller treats that as fatal).
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
}

impl LogStore {
    /// Opens or creates the log in `dir`, replaying its segments.
    ///
    /// A torn record at the tail of the last segment (a crash mid-write) is cut off; the next
    /// append starts where it began.
    ///
    /// # Errors
    ///
    /// [`Error::Corrupt`] on a bad record anywhere else, or on records that break the log's
    /// invariants; [`Error::Io`] when the directory cannot be read or written.
    pub fn open(dir: &Path) -> Result<LogStore, Error> {
        LogStore::open_with(dir, wal::DEFAULT_SEGMENT_SIZE)
    }

    /// Opens the log with segments of `segment_size` bytes, so tests can rotate often.
    #[cfg(test)]
    pub(crate) fn open_with_segment_size(dir: &Path, segment_size: u64) -> Result<LogStore, Error> {
        LogStore::open_with(dir, segment_size)
    }

    fn open_with(dir: &Path, segment_size: u64) -> Result<LogStore, Error> {
        let mut state = State::default();
        let wal = Wal::open(dir, segment_size, |record| state.replay(record))?;
        // Records that passed their CRC can still disagree with each other (a bug, or damage
        // the CRC missed); raft-rs panics on such a state, so it is refused here with a
        // clear error (found by the fuzz tests in `wal.rs`).
        if let Err(reason) = check_conf_state(&state.conf_state) {
            return Err(Error::Corrupt { path: dir.to_path_buf(), offset: 0, reason });
        }
        if state.hard_state.commit > state.last_index() {
            return Err(Error::Corrupt {
                path: dir.to_path_buf(),
                offset: 0,
                reason: format!(
                    "the hard state's commit index {} is beyond the log's last index {}",
                    state.hard_state.commit,
                    state.last_index()
                ),
            });
        }
        Ok(LogStore {
            shared: Arc::new(Shared {
                state: RwLock::new(state),
                wal: Mutex::new(wal),
                snapshot_wanted: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    /// True when the log holds no state yet: no entries, no compaction point, default hard
    /// and conf states (a new member before [`LogStore::initialize`] or a snapshot).
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Bootstraps a new log as raft-rs `MemStorage::initialize_with_conf_state` does:
    /// compaction point index 1 term 1, hard state term 1 commit 1, and `conf_state`.
    ///
    /// Every founding member must be initialized with the same conf state; the log then
    /// starts at index 2. Durable when it returns.
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyInitialized`] when the log is not empty; write errors as for
    /// [`LogStore::append`].
    pub fn initialize(&self, conf_state: ConfState) -> Result<(), Error> {
        let mut wal = self.lock_wal();
        let hard_state = HardState { term: 1, commit: 1, ..HardState::default() };
        {
            let state = self.read();
            if !state.is_empty() {
                return Err(Error::AlreadyInitialized);
            }
            let mut record = Vec::new();
            wal::encode_base(&mut record, &hard_state, &conf_state, 1, 1)?;
            persist(&mut wal, &record, true, || Ok(record.clone()))?;
        }
        let mut state = self.write();
        *state = State {
            hard_state,
            conf_state,
            compact_index: 1,
            compact_term: 1,
            entries: Vec::new(),
            snapshot: None,
        };
        Ok(())
    }

    /// Appends `entries` and sets `hard_state` (if given) as one write and one `fdatasync`.
    ///
    /// This is the group commit of one raft `Ready`. Entries starting at or below the last
    /// index replace the conflicting suffix, as followers must (Raft §5.3). An empty call
    /// (no entries, no hard state) writes nothing. A call without entries whose hard state
    /// changes only the commit index is written without an `fdatasync`, for the reason
    /// [`LogStore::set_commit`] gives (etcd's `mustSync` likewise syncs only for entries, a
    /// new term or a new vote): otherwise every commit a follower learns, and every commit
    /// the leader of a cluster learns from its followers, costs a second `fdatasync` per
    /// write, on the raft task that the next `Ready` waits for.
    ///
    /// # Errors
    ///
    /// [`Error::NotContiguous`], [`Error::Gap`] or [`Error::Compacted`] when the entries do
    /// not fit the log (nothing is written); [`Error::Io`] or [`Error::RecordTooLarge`] when
    /// the write fails, and [`Error::Failed`] after an earlier failure.
    pub fn append(&self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<(), Error> {
        if entries.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        let mut wal = self.lock_wal();
        {
            let state = self.read();
            state.check_append(entries)?;
            let mut record = Vec::new();
            wal::encode_append(&mut record, hard_state, entries)?;
            let commit_only = entries.is_empty()
                && hard_state.is_some_and(|hs| {
                    hs.term == state.hard_state.term && hs.vote == state.hard_state.vote
                });
            persist(&mut wal, &record, !commit_only, || {
                let hard_state = hard_state.unwrap_or(&state.hard_state);
                let kept = state.kept_before(entries.first());
                wal::encode_state(
                    hard_state,
                    &state.conf_state,
                    state.compact_index,
                    state.compact_term,
                    kept.iter().chain(entries),
                )
            })?;
        }
        self.write().append(entries, hard_state);
        Ok(())
    }

    /// Persists a new conf state, after raft applied a conf change. Durable when it returns.
    ///
    /// # Errors
    ///
    /// Write errors as for [`LogStore::append`].
    pub fn set_conf_state(&self, conf_state: ConfState) -> Result<(), Error> {
        let mut wal = self.lock_wal();
        {
            let state = self.read();
            let mut record = Vec::new();
            wal::encode_conf_state(&mut record, &conf_state)?;
            persist(&mut wal, &record, true, || state.encode_with(&state.hard_state, &conf_state))?;
        }
        self.write().conf_state = conf_state;
        Ok(())
    }

    /// Persists `commit` into the hard state (raft-rs `LightReady::commit_index`).
    ///
    /// The record is written but not fdatasynced on its own (it rides on the next append's
    /// fdatasync): losing it in a crash is harmless, because raft re-learns the commit index
    /// and `raft::node::start` raises a stored commit that lags the state machine's applied
    /// index. A commit at or below the stored one is a no-op, since commit never moves back.
    ///
    /// # Errors
    ///
    /// Write errors as for [`LogStore::append`].
    pub fn set_commit(&self, commit: u64) -> Result<(), Error> {
        let mut wal = self.lock_wal();
        let hard_state = {
            let state = self.read();
            if commit <= state.hard_state.commit {
                return Ok(());
            }
            let mut hard_state = state.hard_state.clone();
            hard_state.commit = commit;
            let mut record = Vec::new();
            wal::encode_append(&mut record, Some(&hard_state), [])?;
            // The commit index needs no fdatasync of its own: raft re-learns it from the
            // leader, and a state machine found ahead of it at start raises it (see
            // `raft::node::start`). The next append's fdatasync makes it durable.
            persist(&mut wal, &record, false, || {
                state.encode_with(&hard_state, &state.conf_state)
            })?;
            hard_state
        };
        self.write().hard_state = hard_state;
        Ok(())
    }

    /// Drops the entries with index <= `index`, which the state machine has durably applied.
    ///
    /// The dropped point (`index` and its term) becomes the compaction point that
    /// `Storage::term` still answers for. A small compaction record goes into the active
    /// segment, without an `fdatasync` of its own (it rides on the next append's): should a
    /// crash lose it, the log merely keeps entries the state machine already holds, which
    /// raft skips. The disk space of the dropped entries is reclaimed at the next rotation,
    /// which writes only the entries after the compaction point. Rotating here instead, as
    /// before, rewrote the kept entries and had the pipeline zero-fill a whole new segment
    /// every `snapshot-count` entries, a burst of disk writes that stalled the appends of
    /// clients' writes behind it. A no-op when `index` is at or below the current compaction
    /// point.
    ///
    /// # Errors
    ///
    /// [`Error::CompactPastLast`] when `index` is past the last index; write errors as for
    /// [`LogStore::append`].
    pub fn compact(&self, index: u64) -> Result<(), Error> {
        let mut wal = self.lock_wal();
        let term = {
            let state = self.read();
            if index <= state.compact_index {
                return Ok(());
            }
            let last_index = state.last_index();
            let Some(term) = state.entry(index).map(|e| e.term) else {
                return Err(Error::CompactPastLast { index, last_index });
            };
            let mut record = Vec::new();
            wal::encode_compact(&mut record, index, term)?;
            persist(&mut wal, &record, false, || {
                let kept = state.entries.get(state.position(index + 1)..).unwrap_or_default();
                wal::encode_state(&state.hard_state, &state.conf_state, index, term, kept)
            })?;
            term
        };
        self.write().compact_to(index, term);
        Ok(())
    }

    /// Installs a snapshot received from the leader.
    ///
    /// Discards the whole log, sets the compaction point to the snapshot's index and term and
    /// the conf state to the snapshot's, and raises the hard state's commit (and term) to the
    /// snapshot's. The snapshot, data included, is kept in memory for `Storage::snapshot`.
    /// Durable when it returns (the metadata; the data is the state machine's to persist).
    ///
    /// # Errors
    ///
    /// [`Error::SnapshotOutOfDate`] when the snapshot is older than the compaction point;
    /// write errors as for [`LogStore::append`].
    pub fn apply_snapshot(&self, snapshot: Snapshot) -> Result<(), Error> {
        let mut wal = self.lock_wal();
        let metadata = snapshot.get_metadata();
        let (index, term) = (metadata.index, metadata.term);
        let conf_state = metadata.get_conf_state().clone();
        let hard_state = {
            let state = self.read();
            if index < state.compact_index {
                return Err(Error::SnapshotOutOfDate { index, compact_index: state.compact_index });
            }
            let mut hard_state = state.hard_state.clone();
            hard_state.commit = hard_state.commit.max(index);
            hard_state.term = hard_state.term.max(term);
            let content = wal::encode_state(&hard_state, &conf_state, index, term, [])?;
            wal.rotate(&content)?;
            hard_state
        };
        *self.write() = State {
            hard_state,
            conf_state,
            compact_index: index,
            compact_term: term,
            entries: Vec::new(),
            snapshot: Some(snapshot),
        };
        Ok(())
    }

    /// Rewrites the log so this member restarts as the only voter of its cluster (etcd's
    /// `--force-new-cluster`), keeping everything committed.
    ///
    /// As etcd does: entries after the commit index (raised to `applied`, which the state
    /// machine holds and was therefore committed) are discarded, since no quorum can decide
    /// them any more; then one committed `RemoveNode` conf change follows per other member
    /// (those in `remove`, the conf state's and those added by kept conf changes),
    /// so the state machine drops those members' records as it applies them; the conf state
    /// becomes `self_id` alone, so the member can elect itself at once. The new state is
    /// written as a fresh segment (durable when it returns). The removals carry an empty
    /// context: no client waits for them.
    ///
    /// # Errors
    ///
    /// Write errors as for [`LogStore::append`].
    pub fn force_new_cluster(
        &self,
        self_id: u64,
        applied: u64,
        remove: &[u64],
    ) -> Result<(), Error> {
        use protobuf::Message as _;
        let mut wal = self.lock_wal();
        let (hard_state, conf_state, entries) = {
            let state = self.read();
            let commit = state.hard_state.commit.max(applied).min(state.last_index());
            let keep = state.position(commit + 1);
            let mut entries: Vec<Entry> = state.entries.get(..keep).unwrap_or_default().to_vec();
            let term = state.hard_state.term.max(state.term(commit).unwrap_or(0));
            // Every member the log still knows: the conf state's, and those that kept but
            // not yet applied conf changes add.
            let mut ids: Vec<u64> = remove.to_vec();
            let cs = &state.conf_state;
            ids.extend(cs.voters.iter().chain(&cs.learners).chain(&cs.voters_outgoing));
            ids.extend(cs.learners_next.iter());
            for e in entries.iter().filter(|e| e.index > applied) {
                if e.get_entry_type() == raft::prelude::EntryType::EntryConfChange
                    && let Ok(cc) = raft::prelude::ConfChange::parse_from_bytes(&e.data)
                {
                    ids.push(cc.node_id);
                }
            }
            ids.sort_unstable();
            ids.dedup();
            let mut index = commit;
            for &id in ids.iter().filter(|&&id| id != self_id && id != 0) {
                let mut cc = raft::prelude::ConfChange::default();
                cc.set_change_type(raft::prelude::ConfChangeType::RemoveNode);
                cc.node_id = id;
                let data =
                    cc.write_to_bytes().map_err(|e| Error::Encode { reason: e.to_string() })?;
                index += 1;
                let mut entry = Entry::default();
                entry.set_entry_type(raft::prelude::EntryType::EntryConfChange);
                entry.term = term;
                entry.index = index;
                entry.data = data.into();
                entries.push(entry);
            }
            let hard_state = HardState { term, vote: 0, commit: index, ..HardState::default() };
            let conf_state = ConfState { voters: vec![self_id], ..ConfState::default() };
            let content = wal::encode_state(
                &hard_state,
                &conf_state,
                state.compact_index,
                state.compact_term,
                &entries,
            )?;
            wal.rotate(&content)?;
            (hard_state, conf_state, entries)
        };
        let mut state = self.write();
        state.hard_state = hard_state;
        state.conf_state = conf_state;
        state.entries = entries;
        state.snapshot = None;
        Ok(())
    }

    /// Records a snapshot produced by the state machine, to be served by `Storage::snapshot`.
    ///
    /// Memory only: the snapshot's data belongs to the state machine, which keeps it durable.
    pub fn set_snapshot(&self, snapshot: Snapshot) {
        self.write().snapshot = Some(snapshot);
    }

    /// Forgets the recorded snapshot if it is the one at `index`: raft then asks for a
    /// fresh one the next time a member needs it.
    pub fn drop_snapshot(&self, index: u64) {
        let mut state = self.write();
        if state.snapshot.as_ref().is_some_and(|s| s.get_metadata().index == index) {
            state.snapshot = None;
        }
    }

    /// Returns true, once, after raft asked for a snapshot that was not available.
    pub fn take_snapshot_request(&self) -> bool {
        self.shared.snapshot_wanted.swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// The term of the entry at `index`, if the log still knows it.
    pub fn term_of(&self, index: u64) -> Option<u64> {
        self.read().term(index).ok()
    }

    /// The current hard state (term, vote, commit).
    pub fn hard_state(&self) -> HardState {
        self.read().hard_state.clone()
    }

    /// The current conf state (voters, learners, joint configuration).
    pub fn conf_state(&self) -> ConfState {
        self.read().conf_state.clone()
    }

    /// The first index still in the log: the compaction point plus one.
    pub fn first_index(&self) -> u64 {
        self.read().first_index()
    }

    /// The last index in the log; the compaction point when no entry follows it.
    pub fn last_index(&self) -> u64 {
        self.read().last_index()
    }

    /// The active segment's sequence number, to observe rotation in tests.
    #[cfg(test)]
    fn active_segment(&self) -> u64 {
        self.lock_wal().active_seq()
    }

    // The critical sections below never panic, so a poisoned lock can only come from a
    // panicking caller elsewhere; the state it guards is still consistent, so take it.

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.shared.state.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.shared.state.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_wal(&self) -> MutexGuard<'_, Wal> {
        self.shared.wal.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Writes `record` to the active segment (with an `fdatasync` when `sync`; see
/// [`Wal::write`]), or, when it does not fit, starts a new segment with the full new state
/// that `rewrite` encodes (base record plus every entry), which replaces the record.
fn persist(
    wal: &mut Wal,
    record: &[u8],
    sync: bool,
    rewrite: impl FnOnce() -> Result<Vec<u8>, Error>,
) -> Result<(), Error> {
    if wal.fits(record.len()) { wal.write(record, sync) } else { wal.rotate(&rewrite()?) }
}

impl raft::Storage for LogStore {
    /// Returns the hard state and conf state.
    fn initial_state(&self) -> raft::Result<RaftState> {
        let state = self.read();
        Ok(RaftState::new(state.hard_state.clone(), state.conf_state.clone()))
    }

    /// Returns the entries in `[low, high)`, limited to `max_size` bytes (encoded size) but
    /// always at least one entry, as `raft::util::limit_size` does.
    ///
    /// Errors with `Compacted` when `low` is at or below the compaction point and with
    /// `Unavailable` when `high` is past `last_index + 1`, instead of panicking.
    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into().unwrap_or(raft::NO_LIMIT);
        let state = self.read();
        if low <= state.compact_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > state.last_index() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        if low >= high {
            return Ok(Vec::new());
        }
        let range = state.position(low)..state.position(high);
        let slice = state.entries.get(range).unwrap_or_default();
        // Counts first and clones after, so a small `max_size` does not copy the whole range.
        let mut size = 0u64;
        let count = slice
            .iter()
            .take_while(|entry| {
                let first = size == 0;
                size = size.saturating_add(u64::from(entry.compute_size()));
                first || size <= max_size
            })
            .count();
        Ok(slice.get(..count).unwrap_or_default().to_vec())
    }

    /// Returns the term of the entry at `idx`, including the compaction point's.
    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.read().term(idx).map_err(raft::Error::Store)
    }

    /// Returns the compaction point plus one.
    fn first_index(&self) -> raft::Result<u64> {
        Ok(LogStore::first_index(self))
    }

    /// Returns the last index, or the compaction point when the log after it is empty.
    fn last_index(&self) -> raft::Result<u64> {
        Ok(LogStore::last_index(self))
    }

    /// Returns the recorded snapshot when its index is at least `request_index` and its
    /// configuration includes `to`, and `SnapshotTemporarilyUnavailable` otherwise, so raft
    /// asks again after the state machine records a newer one.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let state = self.read();
        // A snapshot older than the compaction point would leave the receiver missing the
        // entries between it and the log, so it must be at least that recent.
        let wanted = request_index.max(state.compact_index);
        // A member added after the snapshot was taken is not in its ConfState, and raft-rs
        // drops such a snapshot ("not in the ConfState"): the new member would never catch
        // up. A fresh snapshot, taken after the conf change applied, includes it.
        let includes = |snapshot: &Snapshot| {
            let cs = snapshot.get_metadata().get_conf_state();
            to == 0
                || [&cs.voters, &cs.learners, &cs.voters_outgoing, &cs.learners_next]
                    .iter()
                    .any(|ids| ids.contains(&to))
        };
        match &state.snapshot {
            Some(snapshot) if snapshot.get_metadata().index >= wanted && includes(snapshot) => {
                Ok(snapshot.clone())
            }
            _ => {
                self.shared.snapshot_wanted.store(true, std::sync::atomic::Ordering::Relaxed);
                Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::ops::RangeInclusive;
    use std::path::{Path, PathBuf};

    use raft::prelude::{ConfState, Entry, HardState, Snapshot};
    use raft::{Config, GetEntriesContext, RawNode, StateRole, Storage, StorageError};

    use super::{Error, LogStore};

    /// Small segments make rotation cheap to reach in tests.
    const SEGMENT: u64 = 16 * 1024;

    fn open(dir: &Path) -> LogStore {
        LogStore::open_with_segment_size(dir, SEGMENT).unwrap()
    }

    fn entry(index: u64, term: u64) -> Entry {
        let data = format!("data-{index}-{term}").into_bytes().into();
        Entry { index, term, data, ..Entry::default() }
    }

    fn entries(range: RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        range.map(|index| entry(index, term)).collect()
    }

    fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
        HardState { term, vote, commit, ..HardState::default() }
    }

    fn ctx() -> GetEntriesContext {
        GetEntriesContext::empty(false)
    }

    /// Every entry in the log, through the raft `Storage` interface.
    fn all(store: &LogStore) -> Vec<Entry> {
        let (first, last) = (store.first_index(), store.last_index());
        store.entries(first, last + 1, None, ctx()).unwrap()
    }

    fn index_terms(store: &LogStore) -> Vec<(u64, u64)> {
        all(store).iter().map(|e| (e.index, e.term)).collect()
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|item| item.unwrap().path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "wal"))
            .collect();
        paths.sort();
        paths
    }

    fn only_segment(dir: &Path) -> PathBuf {
        let segments = segments(dir);
        assert_eq!(segments.len(), 1, "{segments:?}");
        segments.into_iter().next().unwrap()
    }

    /// One past the last non-zero byte: the end of the written data of a segment.
    fn written_end(path: &Path) -> usize {
        let data = fs::read(path).unwrap();
        data.iter().rposition(|&b| b != 0).unwrap() + 1
    }

    fn storage_error(result: raft::Result<impl std::fmt::Debug>) -> StorageError {
        match result {
            Err(raft::Error::Store(error)) => error,
            other => panic!("expected a storage error, got {other:?}"),
        }
    }

    fn snapshot(index: u64, term: u64, voters: Vec<u64>, data: &[u8]) -> Snapshot {
        let mut snapshot = Snapshot { data: data.to_vec().into(), ..Snapshot::default() };
        let metadata = snapshot.mut_metadata();
        metadata.index = index;
        metadata.term = term;
        metadata.set_conf_state(ConfState::from((voters, vec![])));
        snapshot
    }

    #[test]
    fn appended_entries_and_hard_state_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        assert!(store.is_empty());
        store.append(&entries(1..=3, 1), Some(&hard_state(1, 1, 0))).unwrap();
        store.append(&entries(4..=6, 2), Some(&hard_state(2, 1, 3))).unwrap();
        assert!(!store.is_empty());
        let before = all(&store);
        drop(store);

        let store = open(dir.path());
        assert_eq!(all(&store), before);
        assert_eq!(store.first_index(), 1);
        assert_eq!(store.last_index(), 6);
        assert_eq!(store.hard_state(), hard_state(2, 1, 3));
        assert_eq!(all(&store)[3].data.to_vec(), b"data-4-2".to_vec());
    }

    #[test]
    fn append_at_or_below_the_last_index_replaces_the_conflicting_suffix() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.append(&entries(1..=5, 1), None).unwrap();
        store.append(&entries(3..=4, 2), None).unwrap();
        let expected = vec![(1, 1), (2, 1), (3, 2), (4, 2)];
        assert_eq!(index_terms(&store), expected);
        assert_eq!(store.term(3).unwrap(), 2);
        assert_eq!(storage_error(store.term(5)), StorageError::Unavailable);
        drop(store);

        let store = open(dir.path());
        assert_eq!(index_terms(&store), expected);
        store.append(&entries(5..=5, 2), None).unwrap();
        assert_eq!(store.last_index(), 5);
    }

    #[test]
    fn append_rejects_gaps_non_contiguous_and_compacted_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.append(&entries(1..=5, 1), None).unwrap();
        store.compact(2).unwrap();

        let gap = store.append(&entries(7..=8, 1), None);
        assert!(matches!(gap, Err(Error::Gap { index: 7, last_index: 5 })), "{gap:?}");
        let holes = store.append(&[entry(6, 1), entry(8, 1)], None);
        assert!(matches!(holes, Err(Error::NotContiguous { prev: 6, got: 8 })), "{holes:?}");
        let compacted = store.append(&entries(2..=3, 1), None);
        assert!(
            matches!(compacted, Err(Error::Compacted { index: 2, compact_index: 2 })),
            "{compacted:?}"
        );
        // Rejected appends change nothing, and the store still accepts valid ones.
        assert_eq!(store.last_index(), 5);
        store.append(&entries(6..=6, 1), None).unwrap();
        assert_eq!(store.last_index(), 6);
    }

    #[test]
    fn hard_state_conf_state_and_commit_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.append(&entries(1..=4, 3), Some(&hard_state(3, 2, 1))).unwrap();
        let conf_state = ConfState::from((vec![1, 2, 3], vec![4]));
        store.set_conf_state(conf_state.clone()).unwrap();
        store.set_commit(4).unwrap();
        // Commit never moves back.
        store.set_commit(2).unwrap();
        store.append(&[], Some(&hard_state(4, 3, 4))).unwrap();
        drop(store);

        let store = open(dir.path());
        assert_eq!(store.hard_state(), hard_state(4, 3, 4));
        assert_eq!(store.conf_state(), conf_state);
        let state = store.initial_state().unwrap();
        assert_eq!(state.hard_state, hard_state(4, 3, 4));
        assert_eq!(state.conf_state, conf_state);
        assert_eq!(store.last_index(), 4);
    }

    #[test]
    fn initialize_bootstraps_like_mem_storage() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let conf_state = ConfState::from((vec![1, 2, 3], vec![]));
        store.initialize(conf_state.clone()).unwrap();
        let check = |store: &LogStore| {
            assert!(!store.is_empty());
            assert_eq!(Storage::first_index(store).unwrap(), 2);
            assert_eq!(Storage::last_index(store).unwrap(), 1);
            assert_eq!(store.term(1).unwrap(), 1);
            assert_eq!(storage_error(store.term(0)), StorageError::Compacted);
            assert_eq!(storage_error(store.term(2)), StorageError::Unavailable);
            let state = store.initial_state().unwrap();
            assert!(state.initialized());
            assert_eq!(state.hard_state, hard_state(1, 0, 1));
            assert_eq!(state.conf_state, conf_state);
            assert!(store.entries(2, 2, None, ctx()).unwrap().is_empty());
        };
        check(&store);
        assert!(matches!(store.initialize(conf_state.clone()), Err(Error::AlreadyInitialized)));
        drop(store);

        let store = open(dir.path());
        check(&store);
        assert!(matches!(store.initialize(conf_state.clone()), Err(Error::AlreadyInitialized)));
    }

    #[test]
    fn force_new_cluster_drops_uncommitted_entries_and_commits_removals_of_the_others() {
        use protobuf::Message as _;
        use raft::prelude::{ConfChange, ConfChangeType, EntryType};
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.initialize(ConfState { voters: vec![1, 2, 3], ..ConfState::default() }).unwrap();
        // Index 5 adds member 4 (committed, not yet applied); 6..=8 were never committed.
        let mut log = entries(2..=8, 2);
        let mut add = ConfChange::default();
        add.set_change_type(ConfChangeType::AddLearnerNode);
        add.node_id = 4;
        log[3].set_entry_type(EntryType::EntryConfChange);
        log[3].data = add.write_to_bytes().unwrap().into();
        store.append(&log, Some(&hard_state(2, 1, 5))).unwrap();

        store.force_new_cluster(2, 4, &[3, 9]).unwrap();
        let check = |store: &LogStore| {
            let hs = store.hard_state();
            assert_eq!((hs.term, hs.vote, hs.commit), (2, 0, 9));
            assert_eq!(store.conf_state().voters, vec![2]);
            let all = all(store);
            let indexes: Vec<u64> = all.iter().map(|e| e.index).collect();
            assert_eq!(indexes, (2..=9).collect::<Vec<_>>());
            let removed: Vec<u64> = all
                .iter()
                .filter(|e| e.index > 5)
                .map(|e| {
                    assert_eq!(e.get_entry_type(), EntryType::EntryConfChange);
                    let cc = ConfChange::parse_from_bytes(&e.data).unwrap();
                    assert_eq!(cc.get_change_type(), ConfChangeType::RemoveNode);
                    cc.node_id
                })
                .collect();
            // 1 and 3 from the conf state, 4 from the kept entry, 9 from the caller.
            assert_eq!(removed, vec![1, 3, 4, 9]);
        };
        check(&store);
        drop(store);
        check(&open(dir.path()));
    }

    #[test]
    fn entries_honours_max_size_and_reports_compacted_and_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let appended = entries(1..=10, 1);
        store.append(&appended, None).unwrap();
        let size = |e: &Entry| u64::from(protobuf::Message::compute_size(e));

        assert_eq!(store.entries(1, 11, None, ctx()).unwrap(), appended);
        assert_eq!(store.entries(1, 11, raft::NO_LIMIT, ctx()).unwrap().len(), 10);
        // At least one entry is returned even when it alone exceeds the limit.
        assert_eq!(store.entries(1, 11, 0, ctx()).unwrap(), appended[..1].to_vec());
        let two = size(&appended[2]) + size(&appended[3]);
        assert_eq!(store.entries(3, 11, two, ctx()).unwrap(), appended[2..4].to_vec());
        assert_eq!(store.entries(3, 11, two - 1, ctx()).unwrap(), appended[2..3].to_vec());
        assert_eq!(store.entries(4, 6, None, ctx()).unwrap(), appended[3..5].to_vec());
        assert!(store.entries(4, 4, None, ctx()).unwrap().is_empty());

        assert_eq!(storage_error(store.entries(0, 3, None, ctx())), StorageError::Compacted);
        assert_eq!(storage_error(store.entries(5, 12, None, ctx())), StorageError::Unavailable);
        store.compact(4).unwrap();
        assert_eq!(storage_error(store.entries(4, 6, None, ctx())), StorageError::Compacted);
        assert_eq!(store.entries(5, 6, None, ctx()).unwrap(), appended[4..5].to_vec());
    }

    #[test]
    fn compaction_drops_entries_keeps_the_term_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.append(&entries(1..=5, 1), None).unwrap();
        store.append(&entries(6..=10, 2), Some(&hard_state(2, 1, 10))).unwrap();
        let first_segment = only_segment(dir.path());
        store.compact(7).unwrap();
        let check = |store: &LogStore| {
            assert_eq!(store.first_index(), 8);
            assert_eq!(store.last_index(), 10);
            assert_eq!(store.term(7).unwrap(), 2);
            assert_eq!(storage_error(store.term(6)), StorageError::Compacted);
            assert_eq!(index_terms(store), vec![(8, 2), (9, 2), (10, 2)]);
            assert_eq!(store.hard_state(), hard_state(2, 1, 10));
        };
        check(&store);
        // Compaction only records the new point; the segment reclaims the space at rotation.
        assert_eq!(only_segment(dir.path()), first_segment);

        store.compact(5).unwrap();
        store.compact(7).unwrap();
        assert_eq!(store.first_index(), 8);
        let past = store.compact(11);
        assert!(matches!(past, Err(Error::CompactPastLast { index: 11, last_index: 10 })));
        drop(store);

        let store = open(dir.path());
        check(&store);
        // Compacting everything leaves an empty log after the compaction point.
        store.compact(10).unwrap();
        assert_eq!((store.first_index(), store.last_index()), (11, 10));
        assert_eq!(store.term(10).unwrap(), 2);
        drop(store);
        let store = open(dir.path());
        assert_eq!((store.first_index(), store.last_index()), (11, 10));
        store.append(&entries(11..=11, 3), None).unwrap();
        assert_eq!(store.last_index(), 11);
    }

    #[test]
    fn a_hard_state_that_only_moves_the_commit_index_is_kept_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.append(&entries(1..=3, 1), Some(&hard_state(1, 1, 0))).unwrap();
        // Written without its own fdatasync, still in the log for the next open.
        store.append(&[], Some(&hard_state(1, 1, 3))).unwrap();
        assert_eq!(store.hard_state(), hard_state(1, 1, 3));
        drop(store);
        let store = open(dir.path());
        assert_eq!(store.hard_state(), hard_state(1, 1, 3));
        assert_eq!(store.last_index(), 3);
        // A new vote is not commit-only and is written (and synced) as before.
        store.append(&[], Some(&hard_state(2, 2, 3))).unwrap();
        drop(store);
        assert_eq!(open(dir.path()).hard_state(), hard_state(2, 2, 3));
    }

    #[test]
    fn segments_rotate_when_full_and_the_log_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.initialize(ConfState::from((vec![1], vec![]))).unwrap();
        let big = |index: u64| {
            let mut e = entry(index, 1);
            e.data = vec![index as u8; 300].into();
            e
        };
        // Compacting as the state machine would keeps each rewrite small, so rotation (when
        // a segment is full; compaction itself only records its point) uses the pipeline's
        // preallocated segments.
        for index in 2..=400 {
            store.append(&[big(index)], Some(&hard_state(1, 1, index - 1))).unwrap();
            if index % 5 == 0 {
                store.compact(index - 5).unwrap();
            }
        }
        let seq = store.active_segment();
        assert!(seq > 8, "active segment {seq}");
        assert_eq!(only_segment(dir.path()).metadata().unwrap().len(), SEGMENT);
        let before = all(&store);
        assert_eq!(before.len(), 5);
        drop(store);

        let store = open(dir.path());
        assert_eq!(store.active_segment(), seq);
        assert_eq!(all(&store), before);
        assert_eq!(store.hard_state(), hard_state(1, 1, 399));
        assert_eq!(store.conf_state(), ConfState::from((vec![1], vec![])));

        // Without compaction the whole log outgrows a segment: rotation then makes segments
        // large enough to hold it twice, and still keeps every entry.
        for index in 401..=600 {
            store.append(&[big(index)], None).unwrap();
        }
        let segment_len = only_segment(dir.path()).metadata().unwrap().len();
        assert!(segment_len > SEGMENT, "segment of {segment_len} bytes");
        let before = all(&store);
        assert_eq!(before.len(), 205);
        drop(store);
        let store = open(dir.path());
        assert_eq!(all(&store), before);
    }

    #[test]
    fn segments_are_preallocated_with_real_blocks() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let size = 1 << 20;
        let store = LogStore::open_with_segment_size(dir.path(), size).unwrap();
        store.append(&entries(1..=3, 1), None).unwrap();
        let metadata = only_segment(dir.path()).metadata().unwrap();
        assert_eq!(metadata.len(), size);
        assert!(metadata.blocks() * 512 >= size, "{} blocks", metadata.blocks());
    }

    #[test]
    fn a_truncated_tail_record_is_cut_and_later_appends_work() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.append(&entries(1..=5, 1), Some(&hard_state(1, 1, 2))).unwrap();
        store.append(&entries(6..=8, 1), Some(&hard_state(1, 1, 5))).unwrap();
        drop(store);

        // A crash mid-write: the file ends inside the last record.
        let path = only_segment(dir.path());
        let end = written_end(&path);
        fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(end as u64 - 5).unwrap();

        let store = open(dir.path());
        assert_eq!(store.last_index(), 5);
        assert_eq!(store.hard_state(), hard_state(1, 1, 2));
        store.append(&entries(6..=7, 2), Some(&hard_state(2, 1, 5))).unwrap();
        drop(store);

        let store = open(dir.path());
        assert_eq!(store.last_index(), 7);
        assert_eq!(store.term(7).unwrap(), 2);
        assert_eq!(store.hard_state(), hard_state(2, 1, 5));
    }

    #[test]
    fn a_corrupt_last_record_is_cut_and_zeroed() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.append(&entries(1..=5, 1), None).unwrap();
        store.append(&entries(6..=8, 1), None).unwrap();
        drop(store);

        // A torn write whose last bytes reached the disk garbled.
        let path = only_segment(dir.path());
        let mut data = fs::read(&path).unwrap();
        let end = written_end(&path);
        data[end - 1] ^= 0xff;
        data[end + 100] = 0x5a; // a stray page of the torn write beyond its end
        fs::write(&path, &data).unwrap();

        let store = open(dir.path());
        assert_eq!(store.last_index(), 5);
        // Everything after the valid records is zero again.
        let cut = written_end(&path);
        assert!(cut < end - 1);
        store.append(&entries(6..=6, 2), None).unwrap();
        drop(store);
        let store = open(dir.path());
        assert_eq!(index_terms(&store).last(), Some(&(6, 2)));
    }

    #[test]
    fn a_last_record_torn_at_any_offset_is_dropped_and_the_log_before_it_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.append(&entries(1..=5, 1), Some(&hard_state(1, 1, 3))).unwrap();
        store.append(&entries(6..=8, 1), Some(&hard_state(1, 1, 7))).unwrap();
        drop(store);
        let path = only_segment(dir.path());
        let original = fs::read(&path).unwrap();
        // Records are an 8-byte header (length, crc) and a body: find the last one.
        let frames = {
            let mut starts = Vec::new();
            let mut at = 0;
            loop {
                let len = u32::from_le_bytes(original[at..at + 4].try_into().unwrap()) as usize;
                if len == 0 {
                    break starts;
                }
                starts.push((at, at + 8 + len));
                at += 8 + len;
            }
        };
        let &(last_start, last_end) = frames.last().unwrap();
        for cut in last_start + 1..last_end {
            // A crash mid-write: the record's first `cut - last_start` bytes reached the disk.
            let mut torn = original.clone();
            torn[cut..last_end].fill(0);
            fs::write(&path, &torn).unwrap();
            let store = open(dir.path());
            assert_eq!(store.last_index(), 5, "cut at {cut}");
            assert_eq!(store.hard_state(), hard_state(1, 1, 3), "cut at {cut}");
            drop(store);
        }
        // After the last cut the log takes appends again where the torn record began.
        let store = open(dir.path());
        store.append(&entries(6..=6, 2), None).unwrap();
        drop(store);
        assert_eq!(index_terms(&open(dir.path())).last(), Some(&(6, 2)));
    }

    #[test]
    fn corruption_before_the_last_record_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.append(&entries(1..=5, 1), None).unwrap();
        store.append(&entries(6..=8, 1), None).unwrap();
        drop(store);

        // Flip a byte inside the second record (the first append): a valid record follows,
        // so this is not a torn tail.
        let path = only_segment(dir.path());
        let mut data = fs::read(&path).unwrap();
        let base_len = u32::from_le_bytes(data[0..4].try_into().unwrap()) as usize;
        data[8 + base_len + 8 + 4] ^= 0xff;
        fs::write(&path, &data).unwrap();

        let error = LogStore::open_with_segment_size(dir.path(), SEGMENT).err().unwrap();
        assert!(
            matches!(&error, Error::Corrupt { path: p, offset, .. } if *p == path && *offset == 8 + base_len as u64),
            "{error:?}"
        );
    }

    #[test]
    fn corruption_in_an_older_segment_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.append(&entries(1..=5, 1), None).unwrap();
        store.compact(2).unwrap();
        store.append(&entries(6..=8, 1), None).unwrap();
        drop(store);

        // A crash after a rotation's rename but before the old segment's deletion leaves two
        // segments; the newer one is self-contained, the older one must still be sound.
        let older = only_segment(dir.path());
        let newer = older.with_file_name(format!("{:016x}.wal", 1000));
        fs::copy(&older, &newer).unwrap();
        let store = open(dir.path());
        assert_eq!(
            index_terms(&store),
            entries(3..=8, 1).iter().map(|e| (e.index, 1)).collect::<Vec<_>>()
        );
        assert_eq!(only_segment(dir.path()), newer, "the superseded segment is deleted");
        drop(store);

        fs::copy(&newer, &older).unwrap();
        let mut data = fs::read(&older).unwrap();
        data[20] ^= 0xff;
        fs::write(&older, &data).unwrap();
        let error = LogStore::open_with_segment_size(dir.path(), SEGMENT).err().unwrap();
        assert!(matches!(&error, Error::Corrupt { path, .. } if *path == older), "{error:?}");
    }

    #[test]
    fn apply_snapshot_resets_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.append(&entries(1..=10, 1), Some(&hard_state(2, 1, 8))).unwrap();
        store.apply_snapshot(snapshot(20, 3, vec![1, 2], b"state")).unwrap();
        let check = |store: &LogStore| {
            assert_eq!(store.first_index(), 21);
            assert_eq!(store.last_index(), 20);
            assert_eq!(store.term(20).unwrap(), 3);
            assert_eq!(storage_error(store.term(10)), StorageError::Compacted);
            assert_eq!(store.hard_state(), hard_state(3, 1, 20));
            assert_eq!(store.conf_state(), ConfState::from((vec![1, 2], vec![])));
        };
        check(&store);
        let served = store.snapshot(20, 2).unwrap();
        assert_eq!(served.data.to_vec(), b"state".to_vec());
        assert_eq!(served.get_metadata().index, 20);
        assert_eq!(
            storage_error(store.snapshot(21, 2)),
            StorageError::SnapshotTemporarilyUnavailable
        );
        let stale = store.apply_snapshot(snapshot(10, 1, vec![1], b""));
        assert!(matches!(stale, Err(Error::SnapshotOutOfDate { index: 10, compact_index: 20 })));
        drop(store);

        let store = open(dir.path());
        check(&store);
        // The snapshot's data is the state machine's; after a reopen raft must wait for one.
        assert_eq!(
            storage_error(store.snapshot(0, 2)),
            StorageError::SnapshotTemporarilyUnavailable
        );
        store.append(&entries(21..=22, 3), None).unwrap();
        assert_eq!(index_terms(&store), vec![(21, 3), (22, 3)]);
    }

    #[test]
    fn snapshot_serves_the_recorded_snapshot_when_recent_enough() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        assert_eq!(
            storage_error(store.snapshot(0, 2)),
            StorageError::SnapshotTemporarilyUnavailable
        );
        store.set_snapshot(snapshot(7, 2, vec![1, 2], b"sm"));
        assert_eq!(store.snapshot(5, 2).unwrap().get_metadata().index, 7);
        assert_eq!(store.snapshot(7, 2).unwrap().data.to_vec(), b"sm".to_vec());
        assert_eq!(
            storage_error(store.snapshot(8, 2)),
            StorageError::SnapshotTemporarilyUnavailable
        );
    }

    #[test]
    fn a_snapshot_taken_before_a_member_joined_is_not_sent_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.set_snapshot(snapshot(7, 2, vec![1, 2], b"sm"));
        assert_eq!(
            storage_error(store.snapshot(0, 3)),
            StorageError::SnapshotTemporarilyUnavailable
        );
        store.set_snapshot(snapshot(9, 2, vec![1, 2, 3], b"sm"));
        assert_eq!(store.snapshot(0, 3).unwrap().get_metadata().index, 9);
    }

    #[test]
    fn a_missing_or_stale_snapshot_is_requested_from_the_state_machine() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.initialize(ConfState::from((vec![1], vec![]))).unwrap();
        store.append(&entries(2..=10, 1), Some(&hard_state(1, 1, 10))).unwrap();
        assert!(!store.take_snapshot_request());
        let _ = store.snapshot(0, 2);
        assert!(store.take_snapshot_request(), "a missing snapshot is requested");
        assert!(!store.take_snapshot_request(), "the request is taken once");

        store.set_snapshot(snapshot(4, 1, vec![1], b"old"));
        store.compact(6).unwrap();
        assert_eq!(
            storage_error(store.snapshot(0, 2)),
            StorageError::SnapshotTemporarilyUnavailable,
            "a snapshot older than the compaction point would leave a gap"
        );
        assert!(store.take_snapshot_request());
        store.set_snapshot(snapshot(8, 1, vec![1, 2], b"new"));
        assert_eq!(store.snapshot(0, 2).unwrap().get_metadata().index, 8);
        assert_eq!(store.term_of(8), Some(1));
    }

    /// Processes every pending `Ready` of a single-voter node the way the node task will:
    /// persist, then advance, recording the data of committed normal entries in `applied`.
    fn drive(node: &mut RawNode<LogStore>, store: &LogStore, applied: &mut Vec<Vec<u8>>) {
        let apply = |committed: Vec<Entry>, applied: &mut Vec<Vec<u8>>| {
            applied
                .extend(committed.iter().filter(|e| !e.data.is_empty()).map(|e| e.data.to_vec()));
        };
        while node.has_ready() {
            let mut ready = node.ready();
            assert!(ready.messages().is_empty(), "a single voter has no one to talk to");
            if !ready.snapshot().is_empty() {
                store.apply_snapshot(ready.snapshot().clone()).unwrap();
            }
            apply(ready.take_committed_entries(), applied);
            store.append(ready.entries(), ready.hs()).unwrap();
            let mut light = node.advance(ready);
            if let Some(commit) = light.commit_index() {
                store.set_commit(commit).unwrap();
            }
            apply(light.take_committed_entries(), applied);
            node.advance_apply();
        }
    }

    #[test]
    fn raw_node_commits_proposals_that_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let store = open(dir.path());
        store.initialize(ConfState::from((vec![1], vec![]))).unwrap();

        let config = Config { id: 1, ..Config::default() };
        config.validate().unwrap();
        let mut node = RawNode::new(&config, store.clone(), &logger).unwrap();
        node.campaign().unwrap();
        let mut applied = Vec::new();
        drive(&mut node, &store, &mut applied);
        assert_eq!(node.status().ss.raft_state, StateRole::Leader);

        let proposals: Vec<Vec<u8>> = (0..50).map(|i| format!("put-{i}").into_bytes()).collect();
        for chunk in proposals.chunks(7) {
            // Several proposals per Ready: they share one append and one fdatasync.
            for proposal in chunk {
                node.propose(vec![], proposal.clone()).unwrap();
            }
            drive(&mut node, &store, &mut applied);
        }
        assert_eq!(applied, proposals);
        let last = store.last_index();
        assert_eq!(store.hard_state().commit, last);
        store.compact(last - 10).unwrap();
        drop(node);
        drop(store);

        let store = open(dir.path());
        assert_eq!(store.hard_state().commit, last);
        assert_eq!(store.last_index(), last);
        let tail: Vec<Vec<u8>> = all(&store).iter().map(|e| e.data.to_vec()).collect();
        assert_eq!(tail, proposals[proposals.len() - 10..].to_vec());

        // raft restarts over the reopened log, wins again and keeps committing.
        let config = Config { id: 1, applied: last, ..Config::default() };
        let mut node = RawNode::new(&config, store.clone(), &logger).unwrap();
        node.campaign().unwrap();
        let mut applied = Vec::new();
        drive(&mut node, &store, &mut applied);
        assert_eq!(node.status().ss.raft_state, StateRole::Leader);
        node.propose(vec![], b"after-restart".to_vec()).unwrap();
        drive(&mut node, &store, &mut applied);
        assert_eq!(applied, vec![b"after-restart".to_vec()]);
        assert!(store.hard_state().term >= 3);
    }
}
