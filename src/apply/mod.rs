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
//! Files: this one runs the loop (grouping entries into write transactions, committing,
//! asking for checkpoints, snapshot export and install); [`checkpoint`] makes checkpoints on
//! their own thread; [`dispatch`] is the router, the one place an
//! op is matched, with its chain of wrapper appliers (quota, auth, alarms add one wrapper
//! each); [`alarm`] is the alarm wrapper (raised alarms, NOSPACE and CORRUPT refusals);
//! [`auth`] is the auth wrapper (the caller's permissions for every key a request reads or
//! writes, the root role for auth management); [`members`] holds the member records and applies membership changes to them;
//! `wait` pairs results with proposers; [`convert`] turns etcd request messages into mvcc's
//! domain requests.
//!
//! Deviation noted in DESIGN terms: the replicated request wraps etcd's request messages (as
//! etcd's InternalRaftRequest does), so the conversion from those messages to mvcc's domain
//! requests lives here, in [`convert`], and the server reuses it for reads. The lessor's
//! view of mvcc runs through here too: apply answers mvcc's `LeaseLookup` and turns each
//! group's events into lease key moves, so `lease` depends on `storage` alone (DESIGN).
//!
//! A failed state-machine write, checkpoint or snapshot install is fatal: apply records it
//! in the member's [`Fatal`] latch and stops applying (the raft task stops on seeing it),
//! so the member stays up refusing requests and reporting why until it is restarted, and
//! the restart replays the raft log from the last durable applied index. A failed
//! checkpoint is never retried: after a failed fsync the kernel may have dropped the dirty
//! pages, so a later sync that succeeds would not make them durable (fsyncgate; see
//! [`Fatal`]), and compacting the raft log on its word could lose entries.

pub mod alarm;
pub mod auth;
mod checkpoint;
pub mod convert;
pub mod dispatch;
pub mod members;
mod raft_snapshot;
mod wait;

use std::sync::Arc;

use prost::Message as _;
use tokio::sync::{mpsc, watch};

use crate::lease::{self, KeyMove, Lessor};
use crate::mvcc::{self, EventKind, KvStore, WriteTxn};
use crate::raft::{ConfChange, Entry, EntryType, Fatal, ToApply};
use crate::storage::{Engine, Keyspace};
use crate::watch::WatchHub;

pub use self::alarm::{AlarmWrapper, Alarms};
pub use self::auth::AuthWrapper;
pub use self::convert::ConvertError;
pub use self::dispatch::{Ctx, Kind, Next, Wrapper};
pub use self::members::{Member, Members};
pub use self::raft_snapshot::PinnedImage;
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
    /// A NOSPACE alarm is raised and the request would grow the database.
    #[error("mvcc: database space exceeded")]
    NoSpace,
    /// A CORRUPT alarm is raised: no write is applied.
    #[error("corrupt cluster")]
    Corrupt,
    /// The auth store refused the request (etcd's auth errors).
    #[error(transparent)]
    Auth(#[from] crate::auth::Error),
    /// The op is served by a wrapper applier that is not installed.
    #[error("no applier for {op} requests is installed")]
    NoApplier {
        /// The op's name.
        op: &'static str,
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
    /// A compaction was applied (its records leave storage in background batches).
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
    /// An alarm request was applied: the alarms it raised or cleared, or every alarm for
    /// a GET.
    Alarms(Vec<alarm::Alarm>),
    /// A membership change was applied; the members after it.
    Members(Vec<Member>),
    /// An auth change was applied.
    AuthDone,
    /// Whether auth is enabled, and the auth revision.
    AuthStatus {
        /// Auth is enabled.
        enabled: bool,
        /// The auth revision.
        revision: u64,
    },
    /// The simple token an `Authenticate` assigned.
    AuthToken(String),
    /// Names: a user's roles, every user, or every role.
    Names(Vec<String>),
    /// A role's permissions.
    Permissions(Vec<cairn_proto::authpb::Permission>),
}

/// What the proposer of an entry receives.
pub type ApplyResult = Result<Response, Error>;

/// The `Keyspace::Meta` key prefix of the raised alarms (`alarm.rs`).
pub(crate) const ALARM_KEY_PREFIX: &[u8] = b"alarm/";

/// True for the meta records that belong to one member rather than to the replicated
/// history: the applied raft index and the raised alarms. A restored member starts
/// without them.
pub fn is_member_local_meta(key: &[u8]) -> bool {
    key == APPLIED_INDEX_KEY || key.starts_with(ALARM_KEY_PREFIX)
}

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

/// The replicated state apply writes.
pub struct StateMachine {
    /// The mvcc keyspace.
    pub kv: KvStore,
    /// The lessor.
    pub leases: Lessor,
    /// The storage both live in (snapshots export and import it whole).
    pub engine: Arc<dyn Engine>,
    /// The raised alarms (the alarm wrapper applies and enforces them).
    pub alarms: Alarms,
    /// Users, roles and permissions (the auth wrapper enforces them).
    pub auth: crate::auth::AuthStore,
}

/// What apply tells the rest of the member: results, progress, membership and snapshots.
pub struct Hooks {
    /// Pairs each applied request's result with its proposer.
    pub wait: Arc<Wait>,
    /// Holds the applied index; must hold the recovered one when the applier is built.
    pub applied: watch::Sender<u64>,
    /// Publishes the member records after each change; holds the recovered records when the
    /// applier is built.
    pub members: watch::Sender<Vec<Member>>,
    /// Told the durable index after each checkpoint (the raft log may be compacted to it).
    pub on_durable: Box<dyn Fn(u64) + Send>,
    /// Hands an applied conf change back to raft (raft's conf state follows apply, as in
    /// etcd). Must not be lost: raft's configuration depends on it.
    pub on_conf_change: Box<dyn Fn(ConfChange) + Send>,
    /// Hands a state image at an applied index to raft, to serve as a raft snapshot.
    pub on_snapshot: Arc<dyn Fn(u64, Arc<PinnedImage>) + Send + Sync>,
}

/// The apply task's state.
pub struct Applier {
    state: StateMachine,
    /// The op router and its wrapper chain.
    router: dispatch::Router,
    /// The member records as of the applied index.
    members: Members,
    wait: Arc<Wait>,
    applied: watch::Sender<u64>,
    /// Entries between checkpoints.
    snapshot_count: u64,
    /// Makes checkpoints on its own thread and knows the index the last one covers.
    checkpoints: checkpoint::Checkpointer,
    on_conf_change: Box<dyn Fn(ConfChange) + Send>,
    on_snapshot: Arc<dyn Fn(u64, Arc<PinnedImage>) + Send + Sync>,
    /// Hears each committed group's events (notify only: it never blocks apply).
    watch: Option<WatchHub>,
    /// The member's fatal-failure latch; apply stops once it is set.
    fatal: Fatal,
}

impl Applier {
    /// Creates the applier over `state`, checkpointing every `snapshot_count` entries.
    pub fn new(state: StateMachine, snapshot_count: u64, hooks: Hooks) -> Self {
        let Hooks { wait, applied, members, on_durable, on_conf_change, on_snapshot } = hooks;
        let checkpoints =
            checkpoint::Checkpointer::start(state.engine.clone(), on_durable, *applied.borrow());
        Self {
            state,
            router: dispatch::Router::default(),
            members: Members::new(members),
            wait,
            applied,
            snapshot_count,
            checkpoints,
            on_conf_change,
            on_snapshot,
            watch: None,
            fatal: Fatal::default(),
        }
    }

    /// Records fatal failures in `fatal` (the member's latch, shared with raft and health).
    pub fn with_fatal(mut self, fatal: Fatal) -> Self {
        self.checkpoints.set_fatal(fatal.clone());
        self.fatal = fatal;
        self
    }

    /// Adds `wrapper` to the applier chain, inside the wrappers added before it (see
    /// [`dispatch`] for the chain and how to write a wrapper).
    pub fn with_wrapper(mut self, wrapper: Box<dyn Wrapper>) -> Self {
        self.router.push(wrapper);
        self
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
            if self.fatal.is_set() {
                // Nothing after a fatal failure may reach the state machine, not even the
                // final checkpoint: the restart replays from the last durable one.
                return;
            }
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
            if applied.saturating_sub(self.checkpoints.durable()) >= self.snapshot_count {
                // In the background: the writes in flight need not wait for the sync.
                self.checkpoints.request(applied);
            }
        }
        let applied = *self.applied.borrow();
        if applied > self.checkpoints.durable() {
            self.checkpoints.checkpoint_now(applied);
        }
        self.checkpoints.stop();
    }

    /// Offers raft the state machine at the applied index, for a member behind the
    /// compacted log, without stalling apply or building the image in memory: a pin and a
    /// copy of the small keyspaces between two write groups (`raft_snapshot.rs`).
    fn make_snapshot(&mut self) {
        match PinnedImage::take(&self.state.kv, self.state.engine.as_ref()) {
            Ok((index, image)) => (self.on_snapshot)(index, Arc::new(image)),
            Err(e) => tracing::warn!(error = %e, "cannot pin the state for a raft snapshot"),
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
        let sm = &self.state;
        // Pinned readers (snapshot streams) are invalidated by the replacement.
        let staged = match crate::raft::Reference::parse(snapshot.get_data()) {
            crate::raft::Reference::Staged(path) => Some(path),
            _ => None,
        };
        let replaced = match (&staged, crate::raft::Reference::parse(snapshot.get_data())) {
            (Some(path), _) => raft_snapshot::install_staged(&sm.kv, sm.engine.as_ref(), path),
            (None, crate::raft::Reference::Inline(image)) => {
                sm.kv.replace(|| sm.engine.import(image).map_err(mvcc::Error::from))
            }
            (None, _) => Err(mvcc::Error::Corrupt(
                "a raft snapshot refers to an image of another member".into(),
            )),
        };
        if let Some(path) = &staged {
            // The staged image is installed (or useless): its space goes back.
            let _ = std::fs::remove_file(path);
        }
        let installed = replaced
            .and_then(|()| {
                sm.leases
                    .reload(sm.engine.as_ref())
                    .map_err(|e| mvcc::Error::Corrupt(e.to_string()))
            })
            .and_then(|()| attach_leased_keys(&sm.kv, &sm.leases))
            .and_then(|()| sm.alarms.reload(sm.engine.as_ref()).map_err(mvcc::Error::from))
            .and_then(|()| {
                sm.auth.reload(sm.engine.as_ref()).map_err(|e| mvcc::Error::Corrupt(e.to_string()))
            })
            .and_then(|()| members::load(sm.engine.as_ref()));
        match installed {
            Ok(members) => {
                if let Some(hub) = &self.watch {
                    hub.state_replaced();
                }
                self.members.replace(members);
                self.applied.send_replace(index);
                // Durable at once: the raft log now starts after the snapshot.
                self.checkpoints.checkpoint_now(index);
                tracing::info!(
                    index,
                    revision = self.state.kv.current_revision(),
                    "installed leader snapshot"
                );
            }
            Err(e) => {
                // A half-installed state machine cannot serve; restart recovers from the
                // leader again.
                self.fatal
                    .set_error(&format!("cannot install the leader's snapshot at {index}"), &e);
            }
        }
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) {
        let prev = *self.applied.borrow();
        let mut group = Group::default();
        // A clone, so the open write group does not borrow `self` while the router and the
        // member records are borrowed mutably.
        let kv = self.state.kv.clone();
        let mut txn = kv.write();
        for entry in entries {
            if self.fatal.is_set() {
                return;
            }
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
                            if dispatch::needs_fresh_group(&req) && group.last > 0 {
                                self.commit(txn, std::mem::take(&mut group));
                                txn = kv.write();
                            }
                            let id = req.id;
                            let mut ctx = Ctx {
                                txn: &mut txn,
                                leases: &self.state.leases,
                                members: &mut self.members,
                                auth: &self.state.auth,
                                index: entry.index,
                            };
                            let res = self.router.apply(&mut ctx, req);
                            group.results.push((id, res));
                        }
                        Err(e) => {
                            tracing::error!(index = entry.index, error = %e, "skipping undecodable entry");
                        }
                    }
                }
                EntryType::EntryConfChange => {
                    group.last = entry.index;
                    let applied =
                        self.members.apply_conf_change(txn.batch_mut(), entry.index, &entry.data);
                    let mut change = None;
                    if let Some((id, res, cc)) = applied {
                        group.results.push((id, res));
                        change = cc;
                    }
                    // The change must be durable in the state machine before raft's conf
                    // state follows it, and the next entries see the new members.
                    self.commit(txn, std::mem::take(&mut group));
                    txn = kv.write();
                    if let Some(cc) = change {
                        self.members.publish();
                        (self.on_conf_change)(cc);
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
                // The proposers hear nothing: their writes are in the raft log, and their
                // waits end in a timeout, never in a success.
                self.fatal.set_error(&format!("state machine write failed at {}", group.last), &e);
                return;
            }
        };
        self.state.leases.observe(events.iter().map(|ev| KeyMove {
            key: &ev.kv.key,
            from: ev.prev_kv.as_ref().map_or(0, |p| p.lease),
            to: if ev.kind == EventKind::Put { ev.kv.lease } else { 0 },
        }));
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
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use cairn_proto::internal::InternalRequest;
    use cairn_proto::internal::internal_request::Op;
    use protobuf::Message as _;

    use crate::raft::ConfChangeType;
    use tokio::sync::watch;

    use super::*;
    use crate::storage::MemEngine;

    /// What a test sees of an applier: the conf changes it handed to raft, its storage,
    /// and the member records it published.
    struct Seen {
        conf_changes: Arc<Mutex<Vec<ConfChange>>>,
        engine: Arc<dyn Engine>,
        members: watch::Receiver<Vec<Member>>,
        wait: Arc<Wait>,
    }

    /// An applier over a fresh in-memory state machine.
    fn applier(members: Vec<Member>) -> (Applier, Seen) {
        let engine: Arc<dyn Engine> = Arc::new(MemEngine::new());
        let kv = KvStore::open(engine.clone()).unwrap();
        let leases = Lessor::open(engine.as_ref(), 1).unwrap();
        let handed = Arc::new(Mutex::new(Vec::new()));
        let seen = handed.clone();
        let (members_tx, members_rx) = watch::channel(members);
        let wait = Arc::new(Wait::new());
        let hooks = Hooks {
            wait: wait.clone(),
            applied: watch::channel(0).0,
            members: members_tx,
            on_durable: Box::new(|_| {}),
            on_conf_change: Box::new(move |cc| seen.lock().unwrap().push(cc)),
            on_snapshot: Arc::new(|_, _| {}),
        };
        let a = Applier::new(
            StateMachine {
                kv,
                leases,
                engine: engine.clone(),
                alarms: Alarms::default(),
                auth: crate::auth::AuthStore::load(
                    engine.as_ref(),
                    std::time::Duration::from_secs(60),
                )
                .unwrap(),
            },
            1000,
            hooks,
        );
        (a, Seen { conf_changes: handed, engine, members: members_rx, wait })
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
        let (mut a, seen) = applier(vec![founder.clone()]);
        let (handed, engine) = (seen.conf_changes.clone(), seen.engine.clone());
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
        assert_eq!(*seen.members.borrow(), stored);
    }

    #[test]
    fn a_snapshot_image_replaces_the_state_machine_and_its_members() {
        let (mut source, _) = applier(vec![]);
        source.apply_entries(vec![conf_change(2, ConfChangeType::AddNode, 9)]);
        let image = source.state.engine.export().unwrap();

        let (mut target, seen) = applier(vec![]);
        let engine = seen.engine.clone();
        let mut snap = crate::raft::Snapshot::default();
        snap.set_data(image.into());
        snap.mut_metadata().index = 2;
        target.install_snapshot(&snap);
        assert_eq!(*target.applied.borrow(), 2);
        assert_eq!(members::load(engine.as_ref()).unwrap().len(), 1);
        assert_eq!(seen.members.borrow().first().map(|m| m.id), Some(9));
    }

    fn request(index: u64, id: u64, op: Op) -> Entry {
        let mut e = Entry::default();
        e.set_entry_type(EntryType::EntryNormal);
        e.index = index;
        e.term = 1;
        e.data = cairn_proto::internal::InternalRequest { id, op: Some(op), auth: None }
            .encode_to_vec()
            .into();
        e
    }

    fn put(key: &str) -> Op {
        Op::Put(cairn_proto::etcdserverpb::PutRequest {
            key: key.into(),
            value: b"v".to_vec(),
            ..Default::default()
        })
    }

    /// A wrapper that logs the requests it sees and refuses puts of its `forbidden` key.
    struct Gate {
        name: &'static str,
        forbidden: &'static str,
        log: Arc<Mutex<Vec<(&'static str, u64)>>>,
    }

    impl Wrapper for Gate {
        fn name(&self) -> &'static str {
            self.name
        }

        fn apply(
            &mut self,
            ctx: &mut Ctx<'_, '_>,
            req: InternalRequest,
            next: Next<'_>,
        ) -> ApplyResult {
            self.log.lock().unwrap().push((self.name, req.id));
            if let Some(Op::Put(p)) = &req.op
                && p.key == self.forbidden.as_bytes()
            {
                return Err(Error::Lease(lease::Error::NotFound));
            }
            next.run(ctx, req)
        }
    }

    #[test]
    fn wrappers_run_outermost_first_and_a_refusal_changes_nothing_and_reaches_the_proposer() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (a, seen) = applier(vec![]);
        let gate = |name, forbidden| Box::new(Gate { name, forbidden, log: log.clone() });
        let mut a = a.with_wrapper(gate("quota", "q")).with_wrapper(gate("auth", "a"));
        let results: Vec<_> = (1..=3).map(|id| seen.wait.register(id)).collect();
        a.apply_entries(vec![
            request(2, 1, put("ok")),
            request(3, 2, put("a")),
            request(4, 3, put("q")),
        ]);

        // Each request passes the outer wrapper before the inner one; a refusal by the outer
        // wrapper never reaches the inner one.
        assert_eq!(
            *log.lock().unwrap(),
            [("quota", 1), ("auth", 1), ("quota", 2), ("auth", 2), ("quota", 3)]
        );
        let mut results = results.into_iter().map(|mut rx| rx.try_recv().unwrap());
        assert!(matches!(results.next(), Some(Ok(Response::Put(_)))));
        assert!(matches!(results.next(), Some(Err(Error::Lease(lease::Error::NotFound)))));
        assert!(matches!(results.next(), Some(Err(Error::Lease(lease::Error::NotFound)))));
        // Only the admitted put is in the keyspace; the group's index is recorded anyway.
        let kv = a.state.kv.clone();
        let all = kv
            .range(&mvcc::RangeRequest { key: vec![0], range_end: vec![0], ..Default::default() })
            .unwrap();
        let keys: Vec<_> = all.kvs.iter().map(|k| k.key.clone()).collect();
        assert_eq!(keys, [b"ok".to_vec()]);
        assert_eq!(applied_index(seen.engine.as_ref()).unwrap(), 4);
    }

    fn alarm(index: u64, id: u64, action: i32) -> Entry {
        let op = Op::Alarm(cairn_proto::etcdserverpb::AlarmRequest {
            action,
            member_id: 7,
            alarm: cairn_proto::etcdserverpb::AlarmType::Nospace as i32,
        });
        request(index, id, op)
    }

    #[test]
    fn a_nospace_alarm_refuses_growing_writes_until_cleared_and_survives_a_reload() {
        let (a, seen) = applier(vec![]);
        let alarms = a.state.alarms.clone();
        let mut a = a.with_wrapper(Box::new(AlarmWrapper::new(alarms.clone())));
        let del = Op::DeleteRange(cairn_proto::etcdserverpb::DeleteRangeRequest {
            key: b"a".to_vec(),
            ..Default::default()
        });
        let results: Vec<_> = (1..=5).map(|id| seen.wait.register(id)).collect();
        a.apply_entries(vec![
            request(2, 1, put("a")),
            alarm(3, 2, 1),
            request(4, 3, put("b")),
            request(5, 4, del),
            alarm(6, 5, 0),
        ]);
        let mut results = results.into_iter().map(|mut rx| rx.try_recv().unwrap());
        assert!(matches!(results.next(), Some(Ok(Response::Put(_)))));
        assert!(matches!(results.next(), Some(Ok(Response::Alarms(v))) if v == [(7, 1)]));
        assert!(matches!(results.next(), Some(Err(Error::NoSpace))));
        assert!(matches!(results.next(), Some(Ok(Response::DeleteRange(_)))));
        assert!(matches!(results.next(), Some(Ok(Response::Alarms(v))) if v.len() == 1));
        assert!(
            alarms.has(cairn_proto::etcdserverpb::AlarmType::Nospace),
            "GET lists and leaves the alarm"
        );
        // Deactivate (action 2) clears it, in memory and in storage.
        let mut cleared = seen.wait.register(6);
        a.apply_entries(vec![alarm(7, 6, 2), request(8, 7, put("b"))]);
        assert!(matches!(cleared.try_recv(), Ok(Ok(Response::Alarms(v))) if v == [(7, 1)]));
        assert!(Alarms::load(seen.engine.as_ref()).unwrap().list().is_empty());
        assert!(alarms.list().is_empty());
    }

    /// A request from `user` (resolved at auth revision `rev`), or the member's own.
    fn as_user(index: u64, id: u64, op: Op, user: Option<(&str, u64)>) -> Entry {
        let mut e = request(index, id, op);
        let auth = user.map(|(u, revision)| cairn_proto::internal::AuthHeader {
            username: u.into(),
            revision,
        });
        e.data =
            InternalRequest { id, op: InternalRequest::decode(e.data.as_ref()).unwrap().op, auth }
                .encode_to_vec()
                .into();
        e
    }

    #[test]
    fn the_auth_wrapper_checks_every_key_a_write_touches_at_the_callers_revision() {
        use cairn_proto::authpb::{Permission, permission::Type};
        use cairn_proto::etcdserverpb as pb;
        let (a, seen) = applier(vec![]);
        let (store, alarms) = (a.state.auth.clone(), a.state.alarms.clone());
        let mut a = a
            .with_wrapper(Box::new(AlarmWrapper::new(alarms)))
            .with_wrapper(Box::new(AuthWrapper::new(store.clone())));
        let user = |name: &str| {
            Op::UserAdd(pb::AuthUserAddRequest { name: name.into(), ..Default::default() })
        };
        let grant = |u: &str, r: &str| {
            Op::UserGrantRole(pb::AuthUserGrantRoleRequest { user: u.into(), role: r.into() })
        };
        let perm =
            Permission { perm_type: Type::Readwrite as i32, key: b"a".to_vec(), range_end: vec![] };
        // The member's own requests (no header) set auth up and are never refused.
        a.apply_entries(vec![
            request(2, 1, user("root")),
            request(3, 2, grant("root", "root")),
            request(4, 3, user("u")),
            request(5, 4, Op::RoleAdd(pb::AuthRoleAddRequest { name: "r".into() })),
            request(
                6,
                5,
                Op::RoleGrantPermission(pb::AuthRoleGrantPermissionRequest {
                    name: "r".into(),
                    perm: Some(perm),
                }),
            ),
            request(7, 6, grant("u", "r")),
            request(8, 7, Op::AuthEnable(pb::AuthEnableRequest {})),
        ]);
        assert!(store.is_enabled());
        let rev = store.revision();
        let txn = |fail_key: &str| {
            Op::Txn(pb::TxnRequest {
                compare: vec![],
                success: vec![],
                failure: vec![pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                        key: fail_key.into(),
                        ..Default::default()
                    })),
                }],
            })
        };
        let results: Vec<_> = (10..=15).map(|id| seen.wait.register(id)).collect();
        a.apply_entries(vec![
            as_user(9, 10, put("a"), Some(("u", rev))),
            as_user(10, 11, put("b"), Some(("u", rev))),
            as_user(11, 12, txn("b"), Some(("u", rev))),
            as_user(12, 13, put("a"), Some(("", 0))),
            as_user(13, 14, put("a"), Some(("u", rev - 1))),
            as_user(14, 15, put("b"), Some(("root", rev))),
        ]);
        let denied =
            |r: &ApplyResult| matches!(r, Err(Error::Auth(crate::auth::Error::PermissionDenied)));
        let results: Vec<ApplyResult> =
            results.into_iter().map(|mut rx| rx.try_recv().unwrap()).collect();
        assert!(matches!(results[0], Ok(Response::Put(_))), "{:?}", results[0]);
        assert!(denied(&results[1]), "{:?}", results[1]);
        assert!(denied(&results[2]), "a put in the failure branch is checked: {:?}", results[2]);
        assert!(matches!(results[3], Err(Error::Auth(crate::auth::Error::UserEmpty))));
        assert!(matches!(results[4], Err(Error::Auth(crate::auth::Error::OldRevision))));
        assert!(matches!(results[5], Ok(Response::Put(_))), "root may write anything");
    }

    #[test]
    fn member_requests_are_routed_to_the_member_records() {
        let founder =
            Member { id: 1, peer_urls: vec!["http://m1:2380".into()], ..Default::default() };
        let (mut a, seen) = applier(vec![founder]);
        let publish = Op::MemberPublish(cairn_proto::etcdserverpb::Member {
            id: 1,
            name: "one".into(),
            client_ur_ls: vec!["http://m1:2379".into()],
            ..Default::default()
        });
        let update = Op::MemberUpdate(cairn_proto::etcdserverpb::MemberUpdateRequest {
            id: 1,
            peer_ur_ls: vec!["http://m1:2390".into()],
        });
        let missing = Op::MemberUpdate(cairn_proto::etcdserverpb::MemberUpdateRequest {
            id: 5,
            peer_ur_ls: vec![],
        });
        let mut refused = seen.wait.register(9);
        a.apply_entries(vec![
            request(2, 7, publish),
            request(3, 8, update),
            request(4, 9, missing),
        ]);
        let stored = members::load(seen.engine.as_ref()).unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].name, "one");
        assert_eq!(stored[0].client_urls, ["http://m1:2379"]);
        assert_eq!(stored[0].peer_urls, ["http://m1:2390"]);
        assert_eq!(*seen.members.borrow(), stored);
        assert!(matches!(
            refused.try_recv().unwrap(),
            Err(Error::Membership { id: 5, reason: "member not found" })
        ));
    }

    /// A state machine image as a member exports it for a raft snapshot (and as `snapshot
    /// restore` writes its records): mvcc revisions with tombstones and leases, revision
    /// meta records, leases, member records and the applied index.
    fn state_image(rng: &mut crate::fuzz::Rng) -> Vec<u8> {
        let engine = MemEngine::new();
        let mut batch = crate::storage::Batch::new();
        let mut main = 1i64;
        for i in 0..1 + rng.below(6) {
            main += 1;
            let tombstone = rng.one_in(4);
            let kv = mvcc::KeyValue {
                key: format!("k{}", rng.below(3)).into_bytes(),
                create_revision: main - rng.below(2) as i64,
                mod_revision: main,
                version: if tombstone { 0 } else { 1 + rng.below(2) as i64 },
                value: rng.bytes(8),
                lease: if rng.one_in(3) { 7 } else { 0 },
            };
            let (k, v) = mvcc::storage_record(main, i as i64 % 2, tombstone, &kv);
            batch.put(Keyspace::Kv, k, v);
        }
        for (k, v) in mvcc::revision_records(main, rng.below(main as usize) as i64) {
            batch.put(Keyspace::Meta, k, v);
        }
        let (k, v) = lease::storage_record(7, 30, 10);
        batch.put(Keyspace::Lease, k, v);
        members::put(
            &mut batch,
            &Member {
                id: 1,
                name: "m1".into(),
                peer_urls: vec!["http://127.0.0.1:2380".into()],
                client_urls: vec![],
                is_learner: false,
            },
        );
        batch.put(Keyspace::Meta, APPLIED_INDEX_KEY.to_vec(), 9u64.to_be_bytes().to_vec());
        engine.write(batch).unwrap();
        engine.export().unwrap()
    }

    /// A fuzz case: the image with damaged keys or values under a valid checksum (so every
    /// record decoder sees them), damaged framing, or random bytes.
    fn fuzzed_state_image(rng: &mut crate::fuzz::Rng) -> Vec<u8> {
        let image = state_image(rng);
        match rng.below(4) {
            0 | 1 => {
                let mut pairs = crate::storage::image_pairs(&image).unwrap();
                for _ in 0..1 + rng.below(3) {
                    let i = rng.below(pairs.len());
                    let part = if rng.one_in(2) { &mut pairs[i].0 } else { &mut pairs[i].1 };
                    rng.mutate(part, 3);
                }
                let mut out = Vec::new();
                for (k, v) in &pairs {
                    crate::storage::image_push(&mut out, k, v);
                }
                crate::storage::image_seal(out)
            }
            2 => {
                let mut image = image;
                rng.mutate(&mut image, 4);
                image
            }
            _ => rng.bytes(128),
        }
    }

    #[test]
    fn fuzzed_state_images_load_with_an_error_or_a_state_that_serves() {
        crate::fuzz::Target {
            name: "state image",
            seed: 0x5354_4154,
            cases: 5_000,
            min_accepted: 0.2,
            limit: std::time::Duration::from_secs(120),
        }
        .run(fuzzed_state_image, |image| {
            // What a member does with a leader's snapshot, and at start on a restored
            // data dir: import, then load every state machine from the records.
            let engine: Arc<dyn Engine> = Arc::new(MemEngine::new());
            if engine.import(image).is_err() {
                return false;
            }
            let _ = applied_index(engine.as_ref());
            let _ = members::load(engine.as_ref());
            let _ = Alarms::load(engine.as_ref());
            let Ok(kv) = KvStore::open(engine.clone()) else { return false };
            let Ok(leases) = Lessor::open(engine.as_ref(), 1) else { return false };
            let _ = attach_leased_keys(&kv, &leases);
            let all = mvcc::RangeRequest { key: vec![0], range_end: vec![0], ..Default::default() };
            let _ = kv.range(&mvcc::RangeRequest { revision: 2, ..all.clone() });
            let _ = kv.hash_kv(0);
            let _ = kv.reload();
            kv.range(&all).is_ok()
        });
    }
}
