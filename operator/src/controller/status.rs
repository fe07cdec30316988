//! Status conditions: Available, Progressing and Degraded, computed every pass, keeping a
//! condition's `lastTransitionTime` when its status did not change.

use crate::crd::{Condition, Phase};

/// What a pass found, reduced to what the conditions need.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// The cluster has formed (a cluster id is recorded).
    pub formed: bool,
    /// The cluster is created from a backup (`spec.bootstrap.fromBackup`).
    pub restoring: bool,
    /// Voters in the member list.
    pub voters: usize,
    /// Voters that answered Status.
    pub healthy_voters: usize,
    /// Members in the member list.
    pub members: usize,
    /// The size the spec asks for.
    pub desired: usize,
    /// `spec.paused`.
    pub paused: bool,
    /// A membership change is locked in `status.target`.
    pub changing: bool,
    /// The locked change passed its deadline.
    pub deadline_exceeded: bool,
    /// Why the last step waits or is blocked, if it does.
    pub waiting: Option<String>,
    /// A step failed or the operator is blocked: what the user must fix.
    pub failure: Option<String>,
    /// A rolling restart in progress: what it waits for.
    pub rolling: Option<String>,
    /// The roll stopped: a member did not come back healthy.
    pub upgrade_stalled: Option<String>,
    /// The requested image was refused (a downgrade or a version skip).
    pub upgrade_refused: Option<String>,
}

fn condition(type_: &str, ok: bool, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if ok { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: None,
        last_transition_time: String::new(),
    }
}

/// The three conditions for `s`.
pub fn conditions(s: &Summary) -> Vec<Condition> {
    let quorum = s.voters / 2 + 1;
    let available = if !s.formed {
        condition(
            "Available",
            false,
            "Bootstrapping",
            "the seed member has not formed the cluster yet".into(),
        )
    } else if s.healthy_voters >= quorum {
        condition(
            "Available",
            true,
            "QuorumHealthy",
            format!("{} of {} voters healthy (quorum {quorum})", s.healthy_voters, s.voters),
        )
    } else {
        condition(
            "Available",
            false,
            "QuorumLost",
            format!(
                "only {} of {} voters answer; quorum needs {quorum}",
                s.healthy_voters, s.voters
            ),
        )
    };
    let progressing = if s.paused {
        condition(
            "Progressing",
            false,
            "Paused",
            "spec.paused is true: the operator takes no action".into(),
        )
    } else if s.deadline_exceeded {
        condition(
            "Progressing",
            false,
            "DeadlineExceeded",
            format!(
                "the membership change did not finish before its deadline ({}); edit spec.replicas to retarget",
                s.waiting.clone().unwrap_or_default()
            ),
        )
    } else if s.changing || !s.formed || s.members != s.desired {
        let why = s.waiting.clone().unwrap_or_else(|| "membership change in progress".into());
        condition(
            "Progressing",
            true,
            "MembershipChanging",
            format!("{} of {} members: {why}", s.members, s.desired),
        )
    } else if let Some(r) = &s.rolling {
        condition("Progressing", true, "Upgrading", r.clone())
    } else {
        condition("Progressing", false, "Stable", format!("{} members as specified", s.members))
    };
    let degraded = if let Some(f) = &s.failure {
        let reason = if s.restoring && !s.formed { "RestoreFailed" } else { "ActionBlocked" };
        condition("Degraded", true, reason, f.clone())
    } else if let Some(why) = &s.upgrade_stalled {
        condition("Degraded", true, "UpgradeStalled", why.clone())
    } else if let Some(why) = &s.upgrade_refused {
        condition("Degraded", true, "UpgradeRefused", why.clone())
    } else if s.formed && s.healthy_voters < s.voters {
        condition(
            "Degraded",
            true,
            "MemberUnhealthy",
            format!("{} of {} voters do not answer", s.voters - s.healthy_voters, s.voters),
        )
    } else {
        condition("Degraded", false, "AllHealthy", "every member answers".into())
    };
    vec![available, progressing, degraded]
}

/// The phase for `s`.
pub fn phase(s: &Summary) -> Phase {
    if s.paused {
        Phase::Paused
    } else if !s.formed && s.restoring {
        Phase::Restoring
    } else if !s.formed {
        Phase::Creating
    } else if s.failure.is_some() || s.healthy_voters < s.voters {
        Phase::Degraded
    } else if s.changing || s.members != s.desired {
        Phase::Scaling
    } else {
        Phase::Running
    }
}

/// Stamps `generation` and a transition time on `new`, keeping the old time when a
/// condition's status is unchanged.
pub fn merge(
    old: &[Condition],
    mut new: Vec<Condition>,
    generation: Option<i64>,
    now: &str,
) -> Vec<Condition> {
    for c in &mut new {
        c.observed_generation = generation;
        c.last_transition_time = old
            .iter()
            .find(|o| o.type_ == c.type_ && o.status == c.status)
            .map_or_else(|| now.to_owned(), |o| o.last_transition_time.clone());
    }
    new
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy(n: usize) -> Summary {
        Summary {
            formed: true,
            voters: n,
            healthy_voters: n,
            members: n,
            desired: n,
            ..Default::default()
        }
    }

    fn get<'a>(c: &'a [Condition], t: &str) -> &'a Condition {
        c.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn a_healthy_cluster_is_available_stable_and_running() {
        let c = conditions(&healthy(3));
        assert_eq!(
            (get(&c, "Available").status.as_str(), get(&c, "Available").reason.as_str()),
            ("True", "QuorumHealthy")
        );
        assert_eq!(get(&c, "Progressing").reason, "Stable");
        assert_eq!(get(&c, "Degraded").status, "False");
        assert_eq!(phase(&healthy(3)), Phase::Running);
    }

    #[test]
    fn lost_quorum_and_blocked_steps_show_in_conditions() {
        let s = Summary { healthy_voters: 1, ..healthy(3) };
        let c = conditions(&s);
        assert_eq!(get(&c, "Available").reason, "QuorumLost");
        assert_eq!(get(&c, "Degraded").reason, "MemberUnhealthy");
        assert_eq!(phase(&s), Phase::Degraded);
        let s = Summary { failure: Some("fix it".into()), ..healthy(3) };
        assert_eq!(get(&conditions(&s), "Degraded").message, "fix it");
    }

    #[test]
    fn scaling_paused_and_deadline_have_their_reasons() {
        let s = Summary {
            desired: 5,
            changing: true,
            waiting: Some("learner 3 starting".into()),
            ..healthy(3)
        };
        let c = conditions(&s);
        assert_eq!(get(&c, "Progressing").message, "3 of 5 members: learner 3 starting");
        assert_eq!(phase(&s), Phase::Scaling);
        let s = Summary { paused: true, ..s };
        assert_eq!(get(&conditions(&s), "Progressing").reason, "Paused");
        assert_eq!(phase(&s), Phase::Paused);
        let s = Summary { paused: false, deadline_exceeded: true, ..s };
        assert_eq!(get(&conditions(&s), "Progressing").reason, "DeadlineExceeded");
        let s = Summary { formed: false, ..Default::default() };
        assert_eq!(get(&conditions(&s), "Available").reason, "Bootstrapping");
        assert_eq!(phase(&s), Phase::Creating);
    }

    #[test]
    fn transition_time_survives_an_unchanged_status() {
        let first = merge(&[], conditions(&healthy(3)), Some(1), "t1");
        let again = merge(&first, conditions(&healthy(3)), Some(2), "t2");
        assert!(
            again
                .iter()
                .all(|c| c.last_transition_time == "t1" && c.observed_generation == Some(2))
        );
        let s = Summary { healthy_voters: 2, ..healthy(3) };
        let changed = merge(&again, conditions(&s), Some(2), "t3");
        assert_eq!(get(&changed, "Degraded").last_transition_time, "t3");
        assert_eq!(get(&changed, "Available").last_transition_time, "t1");
    }
}
