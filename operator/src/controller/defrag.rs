//! Sequenced defragmentation, decided as pure functions: when a run is due (a schedule
//! tick, or a member whose free share of the database reaches `minFreeRatio`) and which
//! member goes next (followers in name order, the leader last, so the cluster keeps its
//! leader while followers pause, and the leader's pause comes once).
//!
//! The reconciler defragments one member per pass, only while every member answers and no
//! membership change is in flight.

use k8s_openapi::jiff::Timestamp;

use crate::crd::{DefragSpec, DefragState};
use crate::schedule::Schedule;

/// One member as the defragmenter sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Member (pod) name.
    pub name: String,
    /// It leads.
    pub leader: bool,
    /// Database size, bytes.
    pub db_size: i64,
    /// Bytes in use.
    pub db_size_in_use: i64,
}

/// Whether a new run starts now, and why.
///
/// # Errors
/// A message when the schedule cannot be parsed.
pub fn due(
    spec: &DefragSpec,
    state: &DefragState,
    members: &[Candidate],
    now: Timestamp,
) -> Result<Option<String>, String> {
    if state.running.is_some() {
        return Ok(None);
    }
    if let Some(s) = &spec.schedule {
        let schedule = Schedule::parse(s)?;
        let last = state.last_tick.as_deref().and_then(super::parse_time);
        if last.is_none_or(|t| schedule.next_after(t).is_some_and(|n| n <= now)) {
            return Ok(Some(format!("schedule {s}")));
        }
    }
    if let Some(ratio) = spec.min_free_ratio {
        for m in members {
            if m.db_size <= 0 {
                continue;
            }
            #[allow(clippy::cast_precision_loss)]
            let free = (m.db_size - m.db_size_in_use).max(0) as f64 / m.db_size as f64;
            if free >= ratio {
                return Ok(Some(format!("{} has {:.0}% free space", m.name, free * 100.0)));
            }
        }
    }
    Ok(None)
}

/// The member to defragment next: a follower not yet done (in name order), else the leader.
pub fn next<'a>(members: &'a [Candidate], done: &[String]) -> Option<&'a Candidate> {
    let mut followers: Vec<&Candidate> =
        members.iter().filter(|m| !m.leader && !done.contains(&m.name)).collect();
    followers.sort_by(|a, b| a.name.cmp(&b.name));
    followers
        .first()
        .copied()
        .or_else(|| members.iter().find(|m| m.leader && !done.contains(&m.name)))
}

/// When the next scheduled run is due (for the requeue).
pub fn next_tick(spec: &DefragSpec, state: &DefragState) -> Option<Timestamp> {
    let schedule = Schedule::parse(spec.schedule.as_deref()?).ok()?;
    schedule.next_after(state.last_tick.as_deref()?.parse().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::DefragRun;

    fn c(name: &str, leader: bool, size: i64, used: i64) -> Candidate {
        Candidate { name: name.into(), leader, db_size: size, db_size_in_use: used }
    }

    #[test]
    fn followers_go_first_in_name_order_and_the_leader_last() {
        let m = [c("a-2", false, 1, 1), c("a-0", true, 1, 1), c("a-1", false, 1, 1)];
        let mut done = Vec::new();
        while let Some(n) = next(&m, &done) {
            done.push(n.name.clone());
        }
        assert_eq!(done, ["a-1", "a-2", "a-0"]);
    }

    #[test]
    fn a_run_is_due_on_a_tick_or_a_free_share_and_never_twice() {
        let now: Timestamp = "2026-12-03T10:00:00Z".parse().unwrap();
        let spec = DefragSpec { schedule: Some("@every 1h".into()), min_free_ratio: None };
        let state = DefragState::default();
        assert!(due(&spec, &state, &[], now).unwrap().is_some());
        let ticked =
            DefragState { last_tick: Some("2026-12-03T09:30:00Z".into()), ..state.clone() };
        assert!(due(&spec, &ticked, &[], now).unwrap().is_none());
        let spec = DefragSpec { schedule: None, min_free_ratio: Some(0.3) };
        assert!(due(&spec, &state, &[c("a-0", true, 100, 80)], now).unwrap().is_none());
        let why = due(&spec, &state, &[c("a-0", true, 100, 60)], now).unwrap().unwrap();
        assert!(why.contains("40% free"), "{why}");
        let running =
            DefragState { running: Some(DefragRun { started: "x".into(), done: vec![] }), ..state };
        assert!(due(&spec, &running, &[c("a-0", true, 100, 0)], now).unwrap().is_none());
    }
}
