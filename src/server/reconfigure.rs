//! Membership operations (etcd's MemberAdd/Remove/Promote/Update, MoveLeader) and the
//! member's own background duties: publishing its name and client URLs, keeping the peer
//! transport's address book current, and stopping once removed from the cluster.
//!
//! Changes go through raft as conf changes; apply writes the member records
//! (`apply/members.rs`) and hands each change back to raft. The strict reconfiguration
//! check (etcd's default) runs here, on the leader's view of which peers are active.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_proto::etcdserverpb::{Member as PbMember, MemberUpdateRequest};
use cairn_proto::internal::{ConfChangeContext, internal_request::Op};
use prost::Message as _;

use super::identity::{self, Member, MemberError};
use super::{Error, Server};
use crate::apply::Response;
use crate::raft::{ConfChange, ConfChangeType, Transport};

/// etcd's `readyPercent`: a learner whose match index reaches this share of the leader's
/// commit index may be promoted.
const LEARNER_READY_PERCENT: f64 = 0.9;

/// How often the publish loop retries until the member's record carries its attributes.
const PUBLISH_RETRY: Duration = Duration::from_millis(500);

impl Server {
    /// Adds a member with `peer_urls` (a learner when `is_learner`); returns the new member
    /// and the members after the change.
    ///
    /// # Errors
    /// [`MemberError`]s as etcd gives them, or the proposal's errors.
    pub async fn member_add(
        &self,
        peer_urls: Vec<String>,
        is_learner: bool,
    ) -> Result<(Member, Vec<Member>), Error> {
        for u in &peer_urls {
            crate::config::Url::parse("peer-urls", u).map_err(|_| MemberError::BadUrls)?;
        }
        if peer_urls.is_empty() {
            return Err(MemberError::BadUrls.into());
        }
        let members = self.members();
        if members.iter().any(|m| m.peer_urls.iter().any(|u| peer_urls.contains(u))) {
            return Err(MemberError::PeerUrlExists.into());
        }
        if is_learner {
            let learners = members.iter().filter(|m| m.is_learner).count();
            if learners >= self.cfg.raw.max_learners {
                return Err(MemberError::TooManyLearners.into());
            }
        } else if members.iter().filter(|m| !m.is_learner).count() > 1 {
            // etcd's one exception: a voter may always join a one-member cluster (how a
            // cluster restored from a snapshot or `--force-new-cluster` grows back).
            ready_to_add_voter(&members, false)?;
            self.quorum_stays_after(|voters, active| (voters + 1, active)).await?;
        }
        // etcd derives an added member's id from its URLs and the time of the request.
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let id = identity::member_id(&peer_urls, &format!("{nanos}"));
        if members.iter().any(|m| m.id == id) {
            return Err(MemberError::IdExists.into());
        }
        let member =
            Member { id, name: String::new(), peer_urls, client_urls: Vec::new(), is_learner };
        let kind =
            if is_learner { ConfChangeType::AddLearnerNode } else { ConfChangeType::AddNode };
        let after = self.conf_change(kind, id, Some(&member)).await?;
        Ok((member, after))
    }

    /// Removes member `id`; returns the members after the change.
    ///
    /// # Errors
    /// [`MemberError::NotFound`], [`MemberError::NotEnoughStarted`], or the proposal's.
    pub async fn member_remove(&self, id: u64) -> Result<Vec<Member>, Error> {
        let members = self.members();
        let target = members.iter().find(|m| m.id == id).ok_or(MemberError::NotFound)?;
        if !target.is_learner {
            let status = self.raft.status();
            let target_active = status.active.contains(&id) || id == status.id;
            self.quorum_stays_after(|voters, active| {
                (voters.saturating_sub(1), active.saturating_sub(usize::from(target_active)))
            })
            .await?;
        }
        self.conf_change(ConfChangeType::RemoveNode, id, None).await
    }

    /// Promotes learner `id` to a voter once it has caught up with the leader.
    ///
    /// # Errors
    /// [`MemberError::NotFound`], [`MemberError::NotLearner`],
    /// [`MemberError::LearnerNotReady`], [`Error::NotLeader`] on a follower (only the
    /// leader knows how far the learner is), or the proposal's errors.
    pub async fn member_promote(&self, id: u64) -> Result<Vec<Member>, Error> {
        let members = self.members();
        let target = members.iter().find(|m| m.id == id).ok_or(MemberError::NotFound)?;
        if !target.is_learner {
            return Err(MemberError::NotLearner.into());
        }
        let status = self.raft.status();
        if !status.is_leader() {
            return Err(Error::NotLeader { leader: status.leader });
        }
        let matched = status.progress.iter().find(|(m, _)| *m == id).map_or(0, |(_, i)| *i);
        #[allow(clippy::cast_precision_loss)]
        let ready = matched as f64 >= status.commit as f64 * LEARNER_READY_PERCENT;
        if !ready {
            return Err(MemberError::LearnerNotReady.into());
        }
        ready_to_add_voter(&members, true)?;
        self.quorum_stays_after(|voters, active| {
            (voters + 1, active + usize::from(status.active.contains(&id)))
        })
        .await?;
        self.conf_change(ConfChangeType::AddNode, id, Some(target)).await
    }

    /// Replaces member `id`'s peer URLs; returns the members after the change.
    ///
    /// # Errors
    /// [`MemberError::NotFound`], [`MemberError::PeerUrlExists`], [`MemberError::BadUrls`],
    /// or the proposal's errors.
    pub async fn member_update(
        &self,
        id: u64,
        peer_urls: Vec<String>,
    ) -> Result<Vec<Member>, Error> {
        for u in &peer_urls {
            crate::config::Url::parse("peer-urls", u).map_err(|_| MemberError::BadUrls)?;
        }
        let members = self.members();
        if !members.iter().any(|m| m.id == id) {
            return Err(MemberError::NotFound.into());
        }
        if members.iter().any(|m| m.id != id && m.peer_urls.iter().any(|u| peer_urls.contains(u))) {
            return Err(MemberError::PeerUrlExists.into());
        }
        match self
            .propose(Op::MemberUpdate(MemberUpdateRequest { id, peer_ur_ls: peer_urls }))
            .await?
        {
            Response::Members(m) => Ok(m),
            _ => Ok(self.members()),
        }
    }

    /// Hands leadership to voter `target` and waits until it leads.
    ///
    /// # Errors
    /// [`Error::NotLeader`] on a follower, [`Error::BadLeaderTransferee`] when `target` is
    /// not a voting member, [`Error::LeaderTransferTimeout`] when the transfer does not finish
    /// in time.
    pub async fn move_leader(&self, target: u64) -> Result<(), Error> {
        let status = self.raft.status();
        if !status.is_leader() {
            return Err(Error::NotLeader { leader: status.leader });
        }
        if !self.members().iter().any(|m| m.id == target && !m.is_learner) {
            return Err(Error::BadLeaderTransferee);
        }
        if target == status.id {
            return Ok(());
        }
        self.raft.transfer_leader(target).await.map_err(|_| Error::Stopped)?;
        let mut sub = self.raft.subscribe();
        let moved =
            tokio::time::timeout(self.request_timeout, sub.wait_for(|s| s.leader == target));
        match moved.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(Error::Stopped),
            Err(_) => Err(Error::LeaderTransferTimeout),
        }
    }

    /// [`Server::check_quorum_after`], given a second chance: a member whose heartbeat
    /// answer is merely late (a loaded machine) is not taken for a dead one. etcd looks at
    /// five seconds of connectivity; this re-checks for up to two seconds before refusing.
    async fn quorum_stays_after(
        &self,
        f: impl Fn(usize, usize) -> (usize, usize),
    ) -> Result<(), Error> {
        for _ in 0..4 {
            if !self.raft.is_leader() {
                break; // only the leader's view counts; a lost leadership is not a pass
            }
            if self.check_quorum_after(&f).is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.check_quorum_after(&f)
    }

    /// etcd's strict reconfiguration check: after the change (`f` maps the current voter
    /// count and started voters to the new ones), the started voters must still form a
    /// quorum. Only the leader sees which peers are active; a follower skips the check.
    fn check_quorum_after(&self, f: &impl Fn(usize, usize) -> (usize, usize)) -> Result<(), Error> {
        let status = self.raft.status();
        if !status.is_leader() {
            return Ok(());
        }
        let voters = status.voters.len();
        let active = status.voters.iter().filter(|v| status.active.contains(v)).count();
        let (voters, active) = f(voters, active);
        if active < voters / 2 + 1 {
            return Err(MemberError::NotEnoughStarted.into());
        }
        Ok(())
    }

    /// Proposes one conf change and waits until this member applied it.
    async fn conf_change(
        &self,
        kind: ConfChangeType,
        id: u64,
        member: Option<&Member>,
    ) -> Result<Vec<Member>, Error> {
        let wait_id = self.ids.next();
        let ctx = ConfChangeContext { id: wait_id, member: member.map(PbMember::from) };
        let mut cc = ConfChange::default();
        cc.set_change_type(kind);
        cc.node_id = id;
        cc.set_context(ctx.encode_to_vec().into());
        self.await_leader().await;
        let rx = self.wait.register(wait_id);
        if let Err(e) = self.raft.propose_conf_change(cc).await {
            self.wait.cancel(wait_id);
            return Err(match e {
                crate::raft::Error::NoLeader => Error::NoLeader,
                e => {
                    tracing::warn!(error = %e, "conf change refused by raft");
                    Error::Timeout
                }
            });
        }
        match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(Ok(Response::Members(m)))) => Ok(m),
            Ok(Ok(Ok(_))) => Ok(self.members()),
            Ok(Ok(Err(e))) => Err(match Error::from(e) {
                Error::MemberRefused { reason, .. } => match reason {
                    "member not found" => MemberError::NotFound.into(),
                    _ => MemberError::IdExists.into(),
                },
                e => e,
            }),
            Ok(Err(_)) => Err(Error::Stopped),
            Err(_) => {
                self.wait.cancel(wait_id);
                Err(Error::Timeout)
            }
        }
    }

    /// A receiver that turns true once this member was removed from the cluster.
    pub fn removed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.removed.subscribe()
    }

    /// Marks this member removed (a peer told it so), which stops it.
    pub fn mark_removed(&self) {
        self.removed.send_replace(true);
    }

    /// True when `id` was a member this member saw removed: its peer traffic is refused, so
    /// it learns of its removal even if it missed the entry's commit.
    pub fn was_removed(&self, id: u64) -> bool {
        self.removed_ids.lock().map(|s| s.contains(&id)).unwrap_or(false)
    }
}

/// Starts the member's background duties.
pub(super) fn start(
    server: Arc<Server>,
    transport: Arc<dyn Transport>,
) -> Vec<tokio::task::JoinHandle<()>> {
    vec![tokio::spawn(follow_members(server.clone(), transport)), tokio::spawn(publish(server))]
}

/// Keeps the transport's address book in step with the member records, and notices this
/// member's removal.
async fn follow_members(server: Arc<Server>, transport: Arc<dyn Transport>) {
    let mut rx = server.members.clone();
    let me = server.header.member_id;
    let mut was_member = rx.borrow().iter().any(|m| m.id == me);
    let mut known: Vec<u64> = rx.borrow().iter().map(|m| m.id).collect();
    loop {
        let (book, present) = {
            let members = rx.borrow_and_update();
            let now: Vec<u64> = members.iter().map(|m| m.id).collect();
            if let Ok(mut removed) = server.removed_ids.lock() {
                removed.extend(known.iter().filter(|id| !now.contains(id)));
            }
            known = now;
            (super::peer_book(&members), members.iter().any(|m| m.id == me))
        };
        transport.update_peers(book);
        if was_member && !present {
            tracing::warn!("this member was removed from the cluster; stopping");
            server.removed.send_replace(true);
        }
        was_member |= present;
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Publishes this member's name and client URLs into its record (etcd's publish), retrying
/// until the record carries them.
async fn publish(server: Arc<Server>) {
    let me = server.header.member_id;
    let name = server.cfg.raw.name.clone();
    let client_urls: Vec<String> =
        server.cfg.advertise_client_urls.iter().map(|u| u.raw.clone()).collect();
    loop {
        let current = server.members.borrow().iter().find(|m| m.id == me).cloned();
        match current {
            Some(m) if m.name == name && m.client_urls == client_urls => return,
            Some(m) => {
                let record = PbMember {
                    id: me,
                    name: name.clone(),
                    peer_ur_ls: m.peer_urls,
                    client_ur_ls: client_urls.clone(),
                    is_learner: m.is_learner,
                };
                if let Err(e) = server.propose(Op::MemberPublish(record)).await {
                    tracing::debug!(error = %e, "publishing member attributes failed; retrying");
                }
            }
            None => {}
        }
        tokio::time::sleep(PUBLISH_RETRY).await;
    }
}

/// etcd's check before a voter joins (`IsReadyToAddVotingMember`, or with `promoting`
/// `IsReadyToPromoteMember`): the started voters (those that published their name), counting
/// a promoted learner as started, must be a quorum of the voters after the change. Counting
/// started members, not recently heard ones, as etcd does, keeps a loaded but healthy
/// cluster from refusing a change.
fn ready_to_add_voter(members: &[Member], promoting: bool) -> Result<(), Error> {
    let voters: Vec<&Member> = members.iter().filter(|m| !m.is_learner).collect();
    let started = voters.iter().filter(|m| !m.name.is_empty()).count() + usize::from(promoting);
    let after = voters.len() + 1;
    if started < after / 2 + 1 {
        return Err(MemberError::NotEnoughStarted.into());
    }
    Ok(())
}
