//! The raft owner task: the only code that touches the `RawNode`.
//!
//! The loop runs on its own thread (a current-thread tokio runtime), because each `Ready`
//! ends in an fdatasync that must not stall the client-facing workers. Per iteration it
//! drains every queued command before looking at `Ready`, so all proposals that arrived
//! while the previous fdatasync ran land in one `Ready` and share one fdatasync (group
//! commit). The order inside `on_ready` follows raft-rs's contract (tikv/raft-rs
//! examples/five_mem_node): messages first (a leader may send before it persists, raft thesis
//! 10.2.1), committed entries to apply, persist entries and hard state, then the persisted
//! messages (votes and appends a follower may only send once durable), then `advance`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use raft::prelude::*;
use raft::{RawNode, StateRole};
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    Cause, Command, Error, Fatal, LogStore, RaftConfig, RaftHandle, RaftStatus, ToApply, Transport,
};

/// Capacity of the raft task's inbox. Senders wait when it is full, which pushes back on
/// clients instead of growing memory without bound.
const INBOX_CAPACITY: usize = 4096;

/// Most proposals held during a leader transfer (see [`Held`]); past it, raft refuses them
/// as it would without the hold.
const HELD_CAPACITY: usize = 4096;

/// Starts the raft task on its own thread.
///
/// `log` must be open; when it is empty, it is bootstrapped with `cfg.initial_voters`.
/// Committed entries go to `apply_tx` in order. The task stops when every [`RaftHandle`]
/// is dropped.
///
/// # Errors
/// Fails when the log cannot be bootstrapped or raft-rs rejects the configuration.
pub fn start(
    cfg: RaftConfig,
    log: LogStore,
    transport: Arc<dyn Transport>,
    apply_tx: mpsc::Sender<ToApply>,
) -> Result<(RaftHandle, thread::JoinHandle<()>), Error> {
    // A member joining an existing cluster starts with an empty log and no configuration:
    // the leader sends it a snapshot that carries both.
    if log.is_empty() && !cfg.initial_voters.is_empty() {
        let mut cs = ConfState::default();
        cs.set_voters(cfg.initial_voters.clone());
        log.initialize(cs)?;
    }
    // Entries the state machine already holds are never replayed. raft requires the applied
    // index not to exceed the commit index it knows; the commit record is written without
    // its own fdatasync, so after a crash it may lag the state machine. Every applied entry
    // was committed, so the commit index is raised to the applied index.
    let compacted = log.first_index().saturating_sub(1);
    // The bootstrap point (index 1) holds no data, so an empty state machine is at it.
    if cfg.applied < compacted && compacted > 1 {
        return Err(Error::StateBehindLog { applied: cfg.applied, compacted });
    }
    let applied = cfg.applied.clamp(compacted, log.last_index().max(compacted));
    if applied > log.hard_state().commit {
        log.set_commit(applied)?;
    }
    let raft_cfg = raft::Config {
        id: cfg.id,
        election_tick: cfg.election_ticks,
        heartbeat_tick: 1,
        applied,
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 256,
        check_quorum: true,
        pre_vote: true,
        read_only_option: raft::ReadOnlyOption::Safe,
        ..Default::default()
    };
    raft_cfg.validate()?;
    let mut raw = RawNode::new(&raft_cfg, log.clone(), &super::tracing_logger())?;

    // A cluster of one elects itself at once instead of waiting out an election timeout.
    let voters = log.conf_state().voters.clone();
    if voters.len() == 1 && voters.first() == Some(&cfg.id) {
        raw.campaign()?;
    }

    let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
    let initial = RaftStatus {
        id: cfg.id,
        leader: 0,
        term: raw.status().hs.term,
        commit: raw.status().hs.commit,
        last_index: log.last_index(),
        progress: Vec::new(),
        voters: log.conf_state().voters.clone(),
        active: Vec::new(),
    };
    let (status_tx, status_rx) = watch::channel(initial);
    let node = Node {
        raw,
        log,
        transport,
        apply_tx,
        status: status_tx,
        pending_reads: HashMap::new(),
        held: VecDeque::new(),
        cfg,
        fatal: Fatal::default(),
        heard: HashMap::new(),
    };
    let fatal = node.fatal.clone();
    let handle = thread::Builder::new()
        .name("cairn-raft".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_time().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot build the raft runtime");
                    return;
                }
            };
            rt.block_on(node.run(rx));
        })
        .map_err(|e| {
            tracing::error!(error = %e, "cannot spawn the raft thread");
            Error::Stopped
        })?;
    Ok((RaftHandle { tx, status: status_rx, fatal, images: Arc::default() }, handle))
}

/// A proposal that arrived while this leader hands leadership over. raft-rs refuses
/// proposals while `lead_transferee` is set (as etcd's raft does); a local one would fail
/// the client's write and one a follower forwarded would be lost silently, its client timing
/// out. Instead it is held and offered to raft as soon as the transfer has ended (checked
/// after every batch of commands and every tick), in arrival order: the old leader then either appends it (transfer aborted) or, now a
/// follower, forwards it to the new leader. A held proposal was appended nowhere, so it can
/// never apply twice.
enum Held {
    /// A proposal of this member's server, with its caller.
    Local { data: Vec<u8>, reply: oneshot::Sender<Result<(), Error>> },
    /// A `MsgProp` a follower forwarded.
    Forwarded(Box<Message>),
}

/// Maps raft's refusal of a proposal: dropped means no leader could take it.
fn proposal_error(e: raft::Error) -> Error {
    match e {
        raft::Error::ProposalDropped => Error::NoLeader,
        e => Error::Raft(e),
    }
}

/// The state owned by the raft task.
struct Node {
    raw: RawNode<LogStore>,
    log: LogStore,
    transport: Arc<dyn Transport>,
    apply_tx: mpsc::Sender<ToApply>,
    status: watch::Sender<RaftStatus>,
    /// Read-index requests waiting for raft's answer, by context.
    pending_reads: HashMap<Vec<u8>, oneshot::Sender<Result<u64, Error>>>,
    /// Proposals that arrived during a leader transfer, in arrival order.
    held: VecDeque<Held>,
    cfg: RaftConfig,
    /// Set on the first unrecoverable error, here or in apply; the task stops once it is.
    fatal: Fatal,
    /// When a message from each peer last arrived, by the wall clock (see `publish_status`).
    heard: HashMap<u64, Instant>,
}

impl Node {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut ticker = tokio::time::interval(self.cfg.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if self.fatal.is_set() {
                        // Apply failed: a leader that kept heartbeating would hold the
                        // cluster's leadership while applying nothing.
                        break;
                    }
                    self.raw.tick();
                    self.offer_held();
                    // Read indexes raft dropped (e.g. before the leader committed in its
                    // term) have callers that gave up; forget them.
                    self.pending_reads.retain(|_, reply| !reply.is_closed());
                }
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    let mut stop = self.handle(cmd);
                    // Drain what queued up meanwhile so it shares this Ready's fdatasync.
                    while let Ok(cmd) = rx.try_recv() {
                        stop |= self.handle(cmd);
                    }
                    // A step may have ended a leader transfer: release what it held.
                    self.offer_held();
                    if stop {
                        // Persist what was accepted so far, then leave.
                        let _ = self.on_ready().await;
                        break;
                    }
                }
            }
            if let Err(e) = self.on_ready().await {
                // The raft log is the source of truth for acknowledged writes; if it cannot
                // be written, continuing would risk acknowledging lost data, and retrying a
                // failed fdatasync could report lost pages as durable (see `fatal`). Stop.
                self.fatal.set_error("raft log persistence failed", &e);
                break;
            }
        }
        self.fail_pending_reads();
        // A stopped member leads nothing and knows no leader; its last status must not say
        // otherwise to Status callers and health checks.
        self.status.send_modify(|s| s.leader = raft::INVALID_ID);
        if let Some(m) = crate::metrics::get() {
            m.server.has_leader.set(0);
            m.server.is_leader.set(0);
        }
        tracing::info!("raft task stopped");
    }

    /// Whether a new proposal must be held: a leader transfer is under way (raft-rs offers
    /// no accessor for it, so this reads the `lead_transferee` field), or earlier proposals
    /// are still held and this one must not overtake them. Past [`HELD_CAPACITY`] nothing
    /// more is held and raft refuses as before.
    fn holding(&self) -> bool {
        (self.raw.raft.lead_transferee.is_some() || !self.held.is_empty())
            && self.held.len() < HELD_CAPACITY
    }

    /// Proposes `data` and tells the caller whether raft took it.
    fn propose(&mut self, data: Vec<u8>, reply: oneshot::Sender<Result<(), Error>>) {
        let _ = reply.send(self.raw.propose(vec![], data).map_err(proposal_error));
    }

    /// Offers the held proposals to raft, in arrival order, once no transfer is under way.
    fn offer_held(&mut self) {
        if self.held.is_empty() || self.raw.raft.lead_transferee.is_some() {
            return;
        }
        for held in std::mem::take(&mut self.held) {
            match held {
                Held::Local { data, reply } => {
                    self.propose(data, reply);
                }
                Held::Forwarded(msg) => {
                    if let Err(e) = self.raw.step(*msg) {
                        tracing::debug!(error = %e, "dropping a held forwarded proposal");
                    }
                }
            }
        }
    }

    /// Handles one command; returns true when the task must stop.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Shutdown => return true,
            Command::Propose { data, reply } => {
                if self.holding() {
                    self.held.push_back(Held::Local { data, reply });
                    return false;
                }
                self.propose(data, reply);
            }
            Command::ReadIndex { ctx, reply } => {
                if self.raw.status().ss.leader_id == raft::INVALID_ID {
                    let _ = reply.send(Err(Error::NoLeader));
                    return false;
                }
                self.raw.read_index(ctx.clone());
                self.pending_reads.insert(ctx, reply);
            }
            Command::ProposeConfChange { cc, reply } => {
                let _ =
                    reply.send(self.raw.propose_conf_change(vec![], cc).map_err(proposal_error));
            }
            Command::ApplyConfChange(cc) => match self.raw.apply_conf_change(&cc) {
                Ok(cs) => {
                    if let Err(e) = self.log.set_conf_state(cs) {
                        // The conf state is part of the raft log's durable state; losing it
                        // could let a removed member vote. Stop like any persistence failure.
                        self.fatal.set_error("cannot persist the conf state", &e);
                        return true;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "raft refused an applied conf change"),
            },
            Command::SnapshotReady { index, data } => {
                if let Some(term) = self.log.term_of(index) {
                    let mut snap = Snapshot::default();
                    snap.set_data(data.into());
                    let meta = snap.mut_metadata();
                    meta.index = index;
                    meta.term = term;
                    meta.set_conf_state(self.log.conf_state());
                    self.log.set_snapshot(snap);
                    tracing::info!(index, term, "raft snapshot ready to send");
                }
            }
            Command::Unreachable(to) => self.raw.report_unreachable(to),
            Command::DropSnapshot(index) => self.log.drop_snapshot(index),
            Command::SnapshotStatus { to, ok } => {
                let status = if ok { SnapshotStatus::Finish } else { SnapshotStatus::Failure };
                self.raw.report_snapshot(to, status);
            }
            Command::TransferLeader(to) => self.raw.transfer_leader(to),
            Command::Step(msg) => {
                self.heard.insert(msg.from, Instant::now());
                if msg.get_msg_type() == MessageType::MsgPropose && self.holding() {
                    self.held.push_back(Held::Forwarded(msg));
                    return false;
                }
                if msg.get_msg_type() == MessageType::MsgHeartbeat
                    && msg.commit > self.raw.raft.raft_log.last_index()
                {
                    // The leader only marks committed what this member acknowledged as
                    // durable, so its log lost entries it once had: the data dir was wiped
                    // or restored from an old copy. raft-rs would panic; stop instead.
                    self.fatal.set(
                        Cause::LogLost,
                        format!(
                            "this member's raft log lost entries it had acknowledged (data dir wiped or restored from an old copy): leader {:x} commits {} but the log ends at {}; remove the member (MemberRemove) and add it again",
                            msg.from,
                            msg.commit,
                            self.raw.raft.raft_log.last_index()
                        ),
                    );
                    return true;
                }
                if let Err(e) = self.raw.step(*msg) {
                    tracing::debug!(error = %e, "dropping raft message");
                }
            }
            Command::Compact(durable) => {
                let keep = self.cfg.catch_up_entries;
                let to = durable.saturating_sub(keep);
                if to >= self.log.first_index() {
                    if let Err(e) = self.log.compact(to) {
                        tracing::warn!(error = %e, index = to, "raft log compaction failed");
                    } else {
                        tracing::debug!(index = to, "compacted raft log");
                    }
                }
            }
        }
        false
    }

    async fn on_ready(&mut self) -> Result<(), Error> {
        if self.log.take_snapshot_request() {
            self.to_apply(ToApply::MakeSnapshot).await?;
        }
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut rd = self.raw.ready();

        // 1. A leader sends before it persists; followers' messages come with persisted ones.
        if !rd.messages().is_empty() {
            self.transport.send(rd.take_messages());
        }
        // 2. A snapshot from the leader replaces the log and, through apply, the state.
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            self.log.apply_snapshot(snap.clone())?;
            self.to_apply(ToApply::Snapshot(snap)).await?;
        }
        // 3. Read indexes: answered with the commit index at the time raft confirmed
        //    leadership; the caller waits for apply to reach it.
        for rs in rd.take_read_states() {
            if let Some(reply) = self.pending_reads.remove(&rs.request_ctx) {
                let _ = reply.send(Ok(rs.index));
            }
        }
        // 4. Entries committed in earlier Readies go to apply (already durable).
        let committed = rd.take_committed_entries();
        if !committed.is_empty() {
            self.to_apply(ToApply::Entries(committed)).await?;
        }
        // 5. Persist new entries and hard state: one write, one fdatasync.
        if !rd.entries().is_empty() || rd.hs().is_some() {
            tracing::trace!(entries = rd.entries().len(), hard_state = ?rd.hs(), "persisting ready");
            self.log.append(rd.entries(), rd.hs())?;
        }
        let role_changed = rd.ss().is_some();
        // 6. Messages that may only leave once the log is durable (votes, follower acks).
        if !rd.persisted_messages().is_empty() {
            self.transport.send(rd.take_persisted_messages());
        }
        // 7. Advance; the light ready carries what became committed by this persist.
        //    Apply and the followers hear of it first; the commit record (no fdatasync of its
        //    own, see `LogStore::set_commit`) is written while they work.
        let mut light = self.raw.advance(rd);
        if !light.messages().is_empty() {
            self.transport.send(light.take_messages());
        }
        let committed = light.take_committed_entries();
        if !committed.is_empty() {
            self.to_apply(ToApply::Entries(committed)).await?;
        }
        if let Some(commit) = light.commit_index() {
            self.log.set_commit(commit)?;
        }
        // Apply is ordered and runs behind us; entries handed over count as applied for
        // raft's own bookkeeping (as etcd's raftNode does).
        self.raw.advance_apply();

        if role_changed && self.raw.status().ss.raft_state != StateRole::Leader {
            // Reads queued on a member that lost leadership would never be answered.
            self.fail_pending_reads();
        }
        self.publish_status();
        Ok(())
    }

    async fn to_apply(&self, task: ToApply) -> Result<(), Error> {
        self.apply_tx.send(task).await.map_err(|_| Error::Stopped)
    }

    fn fail_pending_reads(&mut self) {
        for (_, reply) in self.pending_reads.drain() {
            let _ = reply.send(Err(Error::NoLeader));
        }
    }

    fn publish_status(&self) {
        // raft-rs's `Status` copies the hard and soft state and lends the progress tracker
        // on the leader only, which is exactly when match indexes and activity mean anything.
        let st = self.raw.status();
        let progress = st.progress.filter(|_| st.ss.raft_state == StateRole::Leader);
        let next = RaftStatus {
            id: self.cfg.id,
            leader: st.ss.leader_id,
            term: st.hs.term,
            commit: st.hs.commit,
            last_index: self.log.last_index(),
            progress: progress
                .map(|prs| prs.iter().map(|(id, pr)| (*id, pr.matched)).collect())
                .unwrap_or_default(),
            // The durable conf state, which follows every applied conf change and snapshot.
            voters: self.log.conf_state().voters.clone(),
            // Who answered within an election timeout, by the wall clock. raft-rs's
            // `recent_active` is cleared only at its tick-driven quorum checks, so on a
            // loaded machine (ticks delayed) a member killed seconds ago still counted as
            // active, and the strict reconfiguration check let a quorum-losing removal by.
            active: progress
                .map(|prs| {
                    let window = self.cfg.heartbeat
                        * u32::try_from(self.cfg.election_ticks).unwrap_or(u32::MAX);
                    prs.iter()
                        .map(|(id, _)| *id)
                        .filter(|id| {
                            *id == self.cfg.id
                                || self.heard.get(id).is_some_and(|at| at.elapsed() < window)
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        record_status(&self.status.borrow(), &next);
        self.status.send_if_modified(|cur| {
            // Waiters look for leadership, term and membership changes. The commit and last
            // index and the progress move with nearly every write and are only ever read, so
            // they update the value without waking anyone (a wake per `Ready` is a
            // cross-thread wake-up per write on an idle runtime).
            let notify = cur.id != next.id
                || cur.leader != next.leader
                || cur.term != next.term
                || cur.voters != next.voters;
            *cur = next;
            notify
        });
    }
}

/// Updates the `etcd_server_*` raft gauges and counts a leader change the way etcd's
/// raftNode does: when the leader differs from the previous one and is known.
fn record_status(prev: &RaftStatus, next: &RaftStatus) {
    let Some(m) = crate::metrics::get() else { return };
    if next.leader != raft::INVALID_ID && next.leader != prev.leader {
        m.server.leader_changes_seen_total.inc();
    }
    m.server.has_leader.set(i64::from(next.leader != raft::INVALID_ID));
    m.server.is_leader.set(i64::from(next.is_leader()));
    m.server.proposals_committed_total.set(i64::try_from(next.commit).unwrap_or(i64::MAX));
}
