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
pub mod members;
mod wait;

use std::sync::Arc;

use prost::Message as _;
use tokio::sync::{mpsc, watch};

use cairn_proto::internal::internal_request::Op;

use crate::lease::{self, Lessor};
use crate::mvcc::{self, KvStore, WriteTxn};
use crate::raft::{ConfChange, ConfChangeType, Entry, EntryType, ToApply};
use crate::storage::{Engine, Keyspace};
use crate::watch::WatchHub;

pub use self::convert::ConvertError;
pub use self::members::Member;
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
    /// A membership change refused when applied (the member vanished or already exists).
    #[error("member {id:x}: {reason}")]
    Membership {
        /// The member id.
        id: u64,
        /// Why the change was refused.
        reason: &'static str,
    },
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
    /// A membership change was applied; the members after it.
    Members(Vec<Member>),
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

/// Rebuilds lease attachments from the live keys (they are not stored twice), paging
/// through the keyspace so memory stays bounded.
///
/// # Errors
/// mvcc's read errors.
pub fn attach_leased_keys(kv: &KvStore, leases: &Lessor) -> Result<(), mvcc::Error> {
    let mut req = mvcc::RangeRequest {
        key: vec![0],
        range_end: vec![0],
        limit: 10_000,
        keys_only: true,
        ..Default::default()
    };
    req.revision = kv.current_revision();
    loop {
        let page = kv.range(&req)?;
        for item in &page.kvs {
            leases.attach(item.lease, &item.key);
        }
        match page.kvs.last() {
            Some(last) if page.more => {
                let mut next = last.key.clone();
                next.push(0);
                req.key = next;
            }
            _ => return Ok(()),
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
    /// The hooks back to raft and the member records.
    cluster: ClusterHooks,
    /// The members as of the applied index.
    members: Vec<Member>,
    /// Hears each committed group's events (notify only: it never blocks apply).
    watch: Option<WatchHub>,
}

/// What apply tells the rest of the member about membership and snapshots.
pub struct ClusterHooks {
    /// Publishes the member records after each change.
    pub members: watch::Sender<Vec<Member>>,
    /// Hands an applied conf change back to raft (raft's conf state follows apply, as in
    /// etcd). Must not be lost: raft's configuration depends on it.
    pub on_conf_change: Box<dyn Fn(ConfChange) + Send>,
    /// Hands a state image at an applied index to raft, to serve as a raft snapshot.
    pub on_snapshot: Box<dyn Fn(u64, Vec<u8>) + Send>,
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
        cluster: ClusterHooks,
    ) -> Self {
        let checkpointed = *applied.borrow();
        let members = cluster.members.borrow().clone();
        Self {
            kv,
            leases,
            engine,
            wait,
            applied,
            snapshot_count,
            checkpointed,
            on_durable,
            cluster,
            members,
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
        let mut next = None;
        loop {
            let task = match next.take() {
                Some(task) => task,
                None => match rx.blocking_recv() {
                    Some(task) => task,
                    None => break,
                },
            };
            match task {
                ToApply::Entries(entries) => {
                    // Merge what is already queued into one storage batch.
                    let mut entries = entries;
                    while entries.len() < 4096 {
                        match rx.try_recv() {
                            Ok(ToApply::Entries(more)) => entries.extend(more),
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.apply_entries(entries);
                }
                ToApply::Snapshot(snapshot) => self.install_snapshot(&snapshot),
                ToApply::MakeSnapshot => self.make_snapshot(),
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

    /// Exports the state machine at the applied index for raft to send to a member that
    /// fell behind the compacted log. Runs between write groups, so the image is consistent
    /// with the applied index recorded inside it.
    fn make_snapshot(&mut self) {
        let index = *self.applied.borrow();
        match self.engine.export() {
            Ok(image) => (self.cluster.on_snapshot)(index, image),
            Err(e) => tracing::warn!(error = %e, "cannot export the state for a raft snapshot"),
        }
    }

    /// Replaces the state machine with a leader's snapshot, then reloads every in-memory
    /// view of it (key index, leases, members) and makes it durable at once: the raft log
    /// now starts after the snapshot, so nothing could rebuild the state after a crash.
    fn install_snapshot(&mut self, snapshot: &crate::raft::Snapshot) {
        let index = snapshot.get_metadata().index;
        if index <= *self.applied.borrow() {
            return;
        }
        let installed = self
            .engine
            .import(snapshot.get_data())
            .map_err(mvcc::Error::from)
            .and_then(|()| self.kv.reload())
            .and_then(|()| {
                self.leases
                    .reload(self.engine.as_ref())
                    .map_err(|e| mvcc::Error::Corrupt(e.to_string()))
            })
            .and_then(|()| attach_leased_keys(&self.kv, &self.leases))
            .and_then(|()| members::load(self.engine.as_ref()));
        match installed {
            Ok(members) => {
                if let Some(hub) = &self.watch {
                    hub.state_replaced();
                }
                self.members = members.clone();
                self.cluster.members.send_replace(members);
                self.applied.send_replace(index);
                self.checkpoint(index);
                tracing::info!(
                    index,
                    revision = self.kv.current_revision(),
                    "installed leader snapshot"
                );
            }
            Err(e) => {
                // A half-installed state machine cannot serve; restart recovers from the
                // leader again.
                tracing::error!(error = %e, index, "cannot install the leader's snapshot");
                std::process::abort();
            }
        }
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) {
        let prev = *self.applied.borrow();
        let mut group = Group::default();
        // A clone, so the open write group does not borrow `self` while entries update the
        // member records.
        let kv = self.kv.clone();
        let mut txn = kv.write();
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
                        Ok(cairn_proto::internal::InternalRequest {
                            id,
                            op: Some(Op::MemberPublish(m)),
                        }) => {
                            let res = self.publish_member(txn.batch_mut(), m.into());
                            group.results.push((id, res));
                        }
                        Ok(cairn_proto::internal::InternalRequest {
                            id,
                            op: Some(Op::MemberUpdate(u)),
                        }) => {
                            let res = self.update_member(txn.batch_mut(), u.id, u.peer_ur_ls);
                            group.results.push((id, res));
                        }
                        Ok(req) => {
                            if matches!(req.op, Some(Op::LeaseRevoke(_))) && group.last > 0 {
                                // A revoke deletes the keys attached to its lease, and keys
                                // attach when their puts commit: commit what came before.
                                self.commit(txn, std::mem::take(&mut group));
                                txn = kv.write();
                            }
                            let res = dispatch::apply(&mut txn, &self.leases, req.op);
                            group.results.push((req.id, res));
                        }
                        Err(e) => {
                            tracing::error!(index = entry.index, error = %e, "skipping undecodable entry");
                        }
                    }
                }
                EntryType::EntryConfChange => {
                    group.last = entry.index;
                    let applied = self.apply_conf_change(txn.batch_mut(), &entry, &mut group);
                    // The change must be durable in the state machine before raft's conf
                    // state follows it, and the next entries see the new members.
                    self.commit(txn, std::mem::take(&mut group));
                    txn = kv.write();
                    if let Some(cc) = applied {
                        self.cluster.members.send_replace(self.members.clone());
                        (self.cluster.on_conf_change)(cc);
                    }
                    continue;
                }
                EntryType::EntryConfChangeV2 => {
                    tracing::warn!(
                        index = entry.index,
                        "joint conf changes are not used; entry skipped"
                    );
                }
            }
            group.last = entry.index;
        }
        if group.last > 0 {
            self.commit(txn, group);
        }
    }

    /// Applies a conf-change entry to the member records; returns the change raft must
    /// apply, or `None` when it was refused (raft's configuration then stays as it is).
    fn apply_conf_change(
        &mut self,
        batch: &mut crate::storage::Batch,
        entry: &Entry,
        group: &mut Group,
    ) -> Option<ConfChange> {
        use protobuf::Message as _;
        let cc = match ConfChange::parse_from_bytes(&entry.data) {
            Ok(cc) => cc,
            Err(e) => {
                tracing::error!(index = entry.index, error = %e, "skipping undecodable conf change");
                return None;
            }
        };
        let ctx =
            cairn_proto::internal::ConfChangeContext::decode(cc.get_context()).unwrap_or_default();
        let id = cc.node_id;
        let existing = self.members.iter().position(|m| m.id == id);
        let refuse = |reason| Err(Error::Membership { id, reason });
        let res = match (cc.get_change_type(), existing) {
            (ConfChangeType::AddNode | ConfChangeType::AddLearnerNode, None) => {
                let mut m: Member = ctx.member.unwrap_or_default().into();
                m.id = id;
                m.is_learner = cc.get_change_type() == ConfChangeType::AddLearnerNode;
                members::put(batch, &m);
                self.members.push(m);
                Ok(())
            }
            (ConfChangeType::AddNode, Some(i)) => match self.members.get_mut(i) {
                // Promotion of a learner.
                Some(m) if m.is_learner => {
                    m.is_learner = false;
                    members::put(batch, m);
                    Ok(())
                }
                _ => refuse("member ID already exist"),
            },
            (ConfChangeType::AddLearnerNode, Some(_)) => refuse("member ID already exist"),
            (ConfChangeType::RemoveNode, Some(i)) => {
                self.members.remove(i);
                members::delete(batch, id);
                Ok(())
            }
            (ConfChangeType::RemoveNode, None) => refuse("member not found"),
        };
        self.members.sort_by_key(|m| m.id);
        let ok = res.is_ok();
        group.results.push((ctx.id, res.map(|()| Response::Members(self.members.clone()))));
        ok.then_some(cc)
    }

    /// Records a member's name and client URLs (etcd's publish after start).
    fn publish_member(&mut self, batch: &mut crate::storage::Batch, m: Member) -> ApplyResult {
        let Some(rec) = self.members.iter_mut().find(|r| r.id == m.id) else {
            return Err(Error::Membership { id: m.id, reason: "member not found" });
        };
        rec.name = m.name;
        rec.client_urls = m.client_urls;
        members::put(batch, rec);
        self.cluster.members.send_replace(self.members.clone());
        Ok(Response::Members(self.members.clone()))
    }

    /// Replaces a member's peer URLs (etcd's MemberUpdate; the learner flag is kept).
    fn update_member(
        &mut self,
        batch: &mut crate::storage::Batch,
        id: u64,
        peer_urls: Vec<String>,
    ) -> ApplyResult {
        let Some(rec) = self.members.iter_mut().find(|r| r.id == id) else {
            return Err(Error::Membership { id, reason: "member not found" });
        };
        rec.peer_urls = peer_urls;
        members::put(batch, rec);
        self.cluster.members.send_replace(self.members.clone());
        Ok(Response::Members(self.members.clone()))
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use protobuf::Message as _;
    use tokio::sync::watch;

    use super::*;
    use crate::storage::MemEngine;

    /// An applier over a fresh in-memory state machine, recording the conf changes it hands
    /// back to raft.
    fn applier(members: Vec<Member>) -> (Applier, Arc<Mutex<Vec<ConfChange>>>, Arc<dyn Engine>) {
        let engine: Arc<dyn Engine> = Arc::new(MemEngine::new());
        let kv = KvStore::open(engine.clone()).unwrap();
        let leases = Lessor::open(engine.as_ref(), 1).unwrap();
        let handed = Arc::new(Mutex::new(Vec::new()));
        let seen = handed.clone();
        let hooks = ClusterHooks {
            members: watch::channel(members).0,
            on_conf_change: Box::new(move |cc| seen.lock().unwrap().push(cc)),
            on_snapshot: Box::new(|_, _| {}),
        };
        let a = Applier::new(
            kv,
            leases,
            engine.clone(),
            Arc::new(Wait::new()),
            watch::channel(0).0,
            1000,
            Box::new(|_| {}),
            hooks,
        );
        (a, handed, engine)
    }

    fn conf_change(index: u64, kind: ConfChangeType, id: u64) -> Entry {
        let mut cc = ConfChange::default();
        cc.set_change_type(kind);
        cc.node_id = id;
        let ctx = cairn_proto::internal::ConfChangeContext {
            id: 0,
            member: Some(cairn_proto::etcdserverpb::Member {
                id,
                peer_ur_ls: vec![format!("http://m{id}:2380")],
                ..Default::default()
            }),
        };
        cc.set_context(ctx.encode_to_vec().into());
        let mut e = Entry::default();
        e.set_entry_type(EntryType::EntryConfChange);
        e.index = index;
        e.term = 1;
        e.data = cc.write_to_bytes().unwrap().into();
        e
    }

    #[test]
    fn conf_changes_update_member_records_and_reach_raft_in_order() {
        let founder =
            Member { id: 1, peer_urls: vec!["http://m1:2380".into()], ..Default::default() };
        let (mut a, handed, engine) = applier(vec![founder.clone()]);
        a.apply_entries(vec![
            conf_change(2, ConfChangeType::AddLearnerNode, 7),
            conf_change(3, ConfChangeType::AddNode, 7),
            conf_change(4, ConfChangeType::AddLearnerNode, 7),
            conf_change(5, ConfChangeType::RemoveNode, 1),
        ]);
        let kinds: Vec<_> = handed.lock().unwrap().iter().map(|cc| cc.get_change_type()).collect();
        // The second learner add of an existing member is refused and never reaches raft.
        assert_eq!(
            kinds,
            vec![
                ConfChangeType::AddLearnerNode,
                ConfChangeType::AddNode,
                ConfChangeType::RemoveNode
            ]
        );
        let stored = members::load(engine.as_ref()).unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].id, 7);
        assert!(!stored[0].is_learner, "the learner was promoted");
        assert_eq!(applied_index(engine.as_ref()).unwrap(), 5);
        assert_eq!(*a.cluster.members.borrow(), stored);
    }

    #[test]
    fn a_snapshot_image_replaces_the_state_machine_and_its_members() {
        let (mut source, _, _) = applier(vec![]);
        source.apply_entries(vec![conf_change(2, ConfChangeType::AddNode, 9)]);
        let image = source.engine.export().unwrap();

        let (mut target, _, engine) = applier(vec![]);
        let mut snap = crate::raft::Snapshot::default();
        snap.set_data(image.into());
        snap.mut_metadata().index = 2;
        target.install_snapshot(&snap);
        assert_eq!(*target.applied.borrow(), 2);
        assert_eq!(members::load(engine.as_ref()).unwrap().len(), 1);
        assert_eq!(target.cluster.members.borrow().first().map(|m| m.id), Some(9));
    }
}
