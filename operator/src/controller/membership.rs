//! The membership decision: observed state in, at most one safe step out.
//!
//! Pure and synchronous, so every interesting state is a table row in the tests below.
//! The rules (OPERATOR.md §2):
//! - the cluster is bootstrapped from one seed (ordinal 0); everything else joins as a
//!   learner and is promoted once its raft applied index has caught up with the leader's;
//! - the goal size is the locked `status.target` while a change runs, `spec.replicas`
//!   otherwise; it is never derived from what is running;
//! - scale-down takes the highest ordinal: leadership moves off it first, then it is
//!   removed (the StatefulSet shrinks in the next pass, from the member list);
//! - a member that lost its data, or whose pod cannot run for a long window, is removed and
//!   re-added as a fresh learner under the same name, only while the rest keep quorum;
//! - nothing happens while another change is half done (a learner not yet promoted, a
//!   member removed whose pod still runs).

use std::time::Duration;

/// A member as the decision sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    /// Member id.
    pub id: u64,
    /// StatefulSet ordinal parsed from its peer URL (`None`: not one of ours).
    pub ordinal: Option<u32>,
    /// A learner.
    pub learner: bool,
    /// Has started at least once (published its name).
    pub started: bool,
    /// Its Status, if it answered.
    pub status: Option<MemberHealth>,
    /// How long it has not answered (zero while it answers).
    pub unhealthy_for: Duration,
    /// Applied index recorded in status by an earlier pass.
    pub recorded_applied: Option<u64>,
}

/// What a member's Status said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberHealth {
    /// The id it answered with.
    pub member_id: u64,
    /// Its cluster.
    pub cluster_id: u64,
    /// Raft applied index.
    pub applied: u64,
    /// The leader it knows.
    pub leader: u64,
}

/// Everything the decision needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The size to move to (the locked target or the spec).
    pub goal: u32,
    /// The cluster id recorded in status (the cluster has formed).
    pub cluster_id: Option<u64>,
    /// The member list (empty when no member answered).
    pub members: Vec<MemberView>,
    /// A member being replaced (locked in `status.target.replacing`).
    pub replacing: Option<u32>,
    /// The pod with this ordinal or its volume predates the replacement: it must go first.
    pub replaced_volume_stale: bool,
    /// Ordinals whose volume claim is left over from a removed member.
    pub leftover_volumes: Vec<u32>,
    /// How long a started member may not answer before it is replaced.
    pub failure_window: Duration,
    /// How far (raft entries) a learner may trail the leader and still be promoted.
    pub promote_lag: u64,
}

/// One membership step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do: membership matches the goal and everyone is healthy.
    Steady,
    /// Wait for something to settle; the reason is shown in status.
    Wait(String),
    /// Start the seed (StatefulSet at one replica, `--initial-cluster-state new`).
    Bootstrap,
    /// MemberAdd ordinal as a learner (its pod starts in the next pass).
    AddLearner {
        /// Ordinal of the new member.
        ordinal: u32,
    },
    /// MemberPromote a caught-up learner.
    Promote {
        /// Member id.
        id: u64,
        /// Its ordinal.
        ordinal: u32,
    },
    /// MoveLeader from the member about to go to the most caught-up other voter.
    MoveLeader {
        /// Current leader.
        from: u64,
        /// New leader.
        to: u64,
    },
    /// MemberRemove the highest ordinal (scale-down).
    Remove {
        /// Member id.
        id: u64,
        /// Its ordinal.
        ordinal: u32,
    },
    /// MemberRemove a member to re-add it fresh, then clear its pod and volume.
    Replace {
        /// Member id.
        id: u64,
        /// Its ordinal.
        ordinal: u32,
        /// Why (for Events).
        reason: String,
    },
    /// Delete the pod and volume claim of an ordinal so it starts empty.
    ClearVolume {
        /// The ordinal.
        ordinal: u32,
    },
    /// Stuck until the user acts; the reason says what to fix.
    Blocked(String),
}

/// Voters needed for a quorum among `voters`.
pub fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

impl Observed {
    fn voters(&self) -> impl Iterator<Item = &MemberView> {
        self.members.iter().filter(|m| !m.learner)
    }

    fn healthy_voters(&self) -> usize {
        self.voters().filter(|m| m.status.is_some()).count()
    }

    /// The leader id most members agree on (any answering member's view).
    fn leader(&self) -> Option<&MemberView> {
        let id =
            self.members.iter().filter_map(|m| m.status).map(|s| s.leader).find(|&l| l != 0)?;
        self.members.iter().find(|m| m.id == id)
    }

    /// Whether removing one voter keeps a quorum of healthy voters among those that stay.
    fn can_lose_voter(&self, leaving: &MemberView) -> bool {
        let voters = self.voters().count();
        let healthy_after =
            self.voters().filter(|m| m.id != leaving.id && m.status.is_some()).count();
        voters > 1 && healthy_after >= quorum(voters - 1)
    }
}

/// Why a member must be replaced, if it must.
fn replacement_reason(o: &Observed, m: &MemberView) -> Option<String> {
    if let Some(s) = m.status {
        if s.member_id != m.id {
            return Some(format!(
                "answers as member {:x}, not {:x}: its data belongs to another member",
                s.member_id, m.id
            ));
        }
        if o.cluster_id.is_some_and(|c| c != s.cluster_id) {
            return Some(format!("belongs to cluster {:x}: its data was replaced", s.cluster_id));
        }
        // A restart replays from durable state, never far behind what it reported before;
        // falling back by more than the promotion lag means the log itself is gone.
        if m.recorded_applied.is_some_and(|r| s.applied.saturating_add(o.promote_lag) < r)
            && !m.learner
        {
            return Some(format!(
                "applied index went back from {} to {}: its data was lost",
                m.recorded_applied.unwrap_or(0),
                s.applied
            ));
        }
        return None;
    }
    // Unanswering: replace only once it had run (a fresh learner may still be starting)
    // and it has not answered for the whole window (a deleted pod comes back well before).
    (m.started && m.unhealthy_for >= o.failure_window)
        .then(|| format!("has not answered for {}s", m.unhealthy_for.as_secs()))
}

/// Decides the next step.
pub fn decide(o: &Observed) -> Step {
    if o.cluster_id.is_none() {
        return if o.members.is_empty() {
            Step::Bootstrap
        } else {
            Step::Wait("seed forming the cluster".into())
        };
    }
    if o.members.is_empty() {
        return Step::Wait("no member answered MemberList".into());
    }
    if let Some(m) = o.members.iter().find(|m| m.ordinal.is_none()) {
        return Step::Blocked(format!(
            "member {:x} has peer URLs that are not this cluster's pods; remove it by hand",
            m.id
        ));
    }
    let healthy = o.healthy_voters();
    let voters = o.voters().count();
    if healthy < quorum(voters) {
        return Step::Blocked(format!(
            "quorum lost: {healthy} of {voters} voters answer; the operator will not change membership (recovery.quorumLoss: Manual)"
        ));
    }

    // A replacement in flight finishes before anything else.
    if let Some(ordinal) = o.replacing {
        let current = o.members.iter().find(|m| m.ordinal == Some(ordinal));
        return match current {
            // Already re-added as a learner: the promotion rule below finishes it.
            Some(m) if m.learner => next_for_learner(o, m),
            Some(m) => {
                if o.can_lose_voter(m) {
                    Step::Replace { id: m.id, ordinal, reason: "replacement in progress".into() }
                } else {
                    Step::Wait(format!("member {ordinal} waits for the others to be healthy"))
                }
            }
            None if o.replaced_volume_stale => Step::ClearVolume { ordinal },
            None => Step::AddLearner { ordinal },
        };
    }

    // Finish a learner before anything else (at most one learner at a time).
    if let Some(l) = o.members.iter().find(|m| m.learner) {
        return next_for_learner(o, l);
    }

    // Replace a broken voter (data lost, or gone for good) while the rest keep quorum.
    for m in &o.members {
        if let Some(reason) = replacement_reason(o, m) {
            let ordinal = m.ordinal.unwrap_or(0);
            return if o.can_lose_voter(m) {
                Step::Replace { id: m.id, ordinal, reason }
            } else {
                Step::Blocked(format!(
                    "member {ordinal} {reason}, but removing it would lose quorum"
                ))
            };
        }
    }

    let size = u32::try_from(o.members.len()).unwrap_or(u32::MAX);
    let next = o.members.iter().filter_map(|m| m.ordinal).max().map_or(0, |x| x + 1);
    if size < o.goal {
        if next != size {
            return Step::Blocked(format!(
                "member ordinals are not contiguous (next would be {next}, size is {size})"
            ));
        }
        if healthy < voters {
            return Step::Wait("a voter is unhealthy; growing waits".into());
        }
        if o.leftover_volumes.contains(&next) {
            return Step::ClearVolume { ordinal: next };
        }
        return Step::AddLearner { ordinal: next };
    }
    if size > o.goal && size > 1 {
        let Some(top) = o.members.iter().max_by_key(|m| m.ordinal) else {
            return Step::Steady;
        };
        if let Some(leader) = o.leader()
            && leader.id == top.id
        {
            return match most_caught_up_other(o, top.id) {
                Some(to) => Step::MoveLeader { from: top.id, to },
                None => Step::Wait("no healthy voter to take leadership".into()),
            };
        }
        if !o.can_lose_voter(top) {
            return Step::Wait(
                "removing a member now would lose quorum; waiting for health".into(),
            );
        }
        return Step::Remove { id: top.id, ordinal: top.ordinal.unwrap_or(0) };
    }
    if healthy < voters {
        return Step::Wait(format!("{} of {voters} voters answer", healthy));
    }
    Step::Steady
}

fn next_for_learner(o: &Observed, l: &MemberView) -> Step {
    let ordinal = l.ordinal.unwrap_or(0);
    let leader_applied = o.leader().and_then(|m| m.status).map(|s| s.applied);
    match (l.status, leader_applied) {
        (Some(s), Some(la)) if s.applied.saturating_add(o.promote_lag) >= la => {
            Step::Promote { id: l.id, ordinal }
        }
        (Some(s), Some(la)) => {
            Step::Wait(format!("learner {ordinal} catching up ({} of {la} applied)", s.applied))
        }
        (None, _) if l.started && l.unhealthy_for >= o.failure_window => Step::Blocked(format!(
            "learner {ordinal} has not answered for {}s; check its pod's logs",
            o.failure_window.as_secs()
        )),
        _ => Step::Wait(format!("learner {ordinal} starting")),
    }
}

/// The voter to hand leadership to: the most caught-up among those that stay (ordinal
/// below the goal), ties to the lowest ordinal, so a 5 → 3 scale-down moves it only once.
fn most_caught_up_other(o: &Observed, leaving: u64) -> Option<u64> {
    let candidates = || o.voters().filter(|m| m.id != leaving && m.status.is_some());
    let staying = candidates().any(|m| m.ordinal.is_some_and(|x| x < o.goal));
    candidates()
        .filter(|m| !staying || m.ordinal.is_some_and(|x| x < o.goal))
        .filter_map(|m| m.status.map(|s| (s.applied, std::cmp::Reverse(m.ordinal), m.id)))
        .max()
        .map(|(_, _, id)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: u64 = 0xc1;

    fn voter(ordinal: u32) -> MemberView {
        let id = 100 + u64::from(ordinal);
        MemberView {
            id,
            ordinal: Some(ordinal),
            learner: false,
            started: true,
            status: Some(MemberHealth {
                member_id: id,
                cluster_id: CID,
                applied: 5000,
                leader: 100,
            }),
            unhealthy_for: Duration::ZERO,
            recorded_applied: Some(4000),
        }
    }

    fn learner(ordinal: u32, applied: Option<u64>) -> MemberView {
        let mut m = voter(ordinal);
        m.learner = true;
        m.started = applied.is_some();
        m.status = applied.map(|a| MemberHealth { applied: a, ..m.status.unwrap() });
        m
    }

    fn down(mut m: MemberView, secs: u64) -> MemberView {
        m.status = None;
        m.unhealthy_for = Duration::from_secs(secs);
        m
    }

    fn observed(goal: u32, members: Vec<MemberView>) -> Observed {
        Observed {
            goal,
            cluster_id: Some(CID),
            members,
            replacing: None,
            replaced_volume_stale: false,
            leftover_volumes: vec![],
            failure_window: Duration::from_secs(60),
            promote_lag: 1000,
        }
    }

    fn leader_is(mut o: Observed, id: u64) -> Observed {
        for m in &mut o.members {
            if let Some(s) = m.status.as_mut() {
                s.leader = id;
            }
        }
        o
    }

    #[test]
    fn decisions_over_the_interesting_states() {
        let long = 300;
        let short = 5;
        let mut unformed = observed(3, vec![]);
        unformed.cluster_id = None;
        let mut seed_up = observed(3, vec![voter(0)]);
        seed_up.cluster_id = None;
        let mut stranger = voter(2);
        stranger.status = Some(MemberHealth { member_id: 999, ..stranger.status.unwrap() });
        let mut wiped = voter(1);
        wiped.status = Some(MemberHealth { applied: 3, ..wiped.status.unwrap() });
        let mut restarted = voter(1);
        restarted.status = Some(MemberHealth { applied: 3900, ..restarted.status.unwrap() });
        let mut foreign = voter(1);
        foreign.ordinal = None;
        let mut replacing_removed = observed(3, vec![voter(0), voter(2)]);
        replacing_removed.replacing = Some(1);
        let mut replacing_stale = replacing_removed.clone();
        replacing_stale.replaced_volume_stale = true;
        let mut replacing_voter = observed(3, vec![voter(0), voter(1), voter(2)]);
        replacing_voter.replacing = Some(1);
        let mut leftover = observed(4, vec![voter(0), voter(1), voter(2)]);
        leftover.leftover_volumes = vec![3];

        let table: Vec<(&str, Observed, Step)> = vec![
            ("nothing formed: start the seed", unformed, Step::Bootstrap),
            ("seed listed but no cluster id yet: wait", seed_up, Step::Wait("seed forming the cluster".into())),
            ("one member, goal three: add ordinal 1 as learner", observed(3, vec![voter(0)]), Step::AddLearner { ordinal: 1 }),
            ("three of three healthy: steady", observed(3, vec![voter(0), voter(1), voter(2)]), Step::Steady),
            ("goal five: add ordinal 3", observed(5, vec![voter(0), voter(1), voter(2)]), Step::AddLearner { ordinal: 3 }),
            ("learner not started: wait, never a second add", observed(5, vec![voter(0), voter(1), voter(2), learner(3, None)]), Step::Wait("learner 3 starting".into())),
            ("learner far behind: wait", observed(5, vec![voter(0), voter(1), voter(2), learner(3, Some(10))]), Step::Wait("learner 3 catching up (10 of 5000 applied)".into())),
            ("learner within lag: promote", observed(5, vec![voter(0), voter(1), voter(2), learner(3, Some(4500))]), Step::Promote { id: 103, ordinal: 3 }),
            ("learner pending even when goal shrank: finish it first", observed(3, vec![voter(0), voter(1), voter(2), learner(3, Some(5000))]), Step::Promote { id: 103, ordinal: 3 }),
            ("five, goal three, top follows: remove ordinal 4", observed(3, (0..5).map(voter).collect()), Step::Remove { id: 104, ordinal: 4 }),
            ("five, goal three, top leads: move leadership first", leader_is(observed(3, (0..5).map(voter).collect()), 104), Step::MoveLeader { from: 104, to: 100 }),
            ("scale-down with another voter down and no margin: wait", observed(2, vec![voter(0), down(voter(1), short), voter(2)]), Step::Wait("removing a member now would lose quorum; waiting for health".into())),
            ("growth with a voter down: wait", observed(5, vec![voter(0), down(voter(1), short), voter(2)]), Step::Wait("a voter is unhealthy; growing waits".into())),
            ("voter briefly down: wait, no replacement", observed(3, vec![voter(0), down(voter(1), short), voter(2)]), Step::Wait("2 of 3 voters answer".into())),
            ("voter gone for good: replace", observed(3, vec![voter(0), down(voter(1), long), voter(2)]), Step::Replace { id: 101, ordinal: 1, reason: "has not answered for 300s".into() }),
            ("voter answers with another id: replace", observed(3, vec![voter(0), voter(1), stranger]), Step::Replace { id: 102, ordinal: 2, reason: "answers as member 3e7, not 66: its data belongs to another member".into() }),
            ("voter applied index went back: data lost, replace", observed(3, vec![voter(0), wiped, voter(2)]), Step::Replace { id: 101, ordinal: 1, reason: "applied index went back from 4000 to 3: its data was lost".into() }),
            ("voter restarted slightly behind its record: no replacement", observed(3, vec![voter(0), restarted, voter(2)]), Step::Steady),
            ("two of three down: quorum lost, blocked", observed(3, vec![voter(0), down(voter(1), long), down(voter(2), long)]), Step::Blocked("quorum lost: 1 of 3 voters answer; the operator will not change membership (recovery.quorumLoss: Manual)".into())),
            ("a member that is not ours: blocked", observed(3, vec![voter(0), foreign, voter(2)]), Step::Blocked("member 65 has peer URLs that are not this cluster's pods; remove it by hand".into())),
            ("replacing, removed, volume stale: clear it", replacing_stale, Step::ClearVolume { ordinal: 1 }),
            ("replacing, removed, volume fresh: re-add as learner", replacing_removed, Step::AddLearner { ordinal: 1 }),
            ("replacing, still a voter: remove it", replacing_voter, Step::Replace { id: 101, ordinal: 1, reason: "replacement in progress".into() }),
            ("growing onto a leftover volume: clear it first", leftover, Step::ClearVolume { ordinal: 3 }),
            ("goal one from one: steady", observed(1, vec![voter(0)]), Step::Steady),
        ];
        for (name, o, want) in table {
            assert_eq!(decide(&o), want, "{name}");
        }
    }

    #[test]
    fn quorum_is_a_strict_majority() {
        assert_eq!([1, 2, 3, 4, 5].map(quorum), [1, 2, 2, 3, 3]);
    }

    #[test]
    fn a_fresh_learner_that_never_started_is_not_replaced() {
        let o = observed(4, vec![voter(0), voter(1), voter(2), learner(3, None)]);
        assert_eq!(decide(&o), Step::Wait("learner 3 starting".into()));
    }
}
