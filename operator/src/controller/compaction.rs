//! Scheduled compaction, decided as a pure function of the spec, what status remembers and
//! the store's current revision.
//!
//! Like etcd's periodic compactor, but driven from outside so it is visible and pausable:
//! every schedule tick records (time, current revision); the compaction target is the
//! newest recorded revision at least one retention old (duration retention), or the
//! current revision minus the retained count (revision retention). Samples are taken at
//! most every tenth of the retention (etcd's compactor samples at the same granularity),
//! so status stays small whatever the schedule.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::parse_time;
use crate::crd::{CompactionSpec, CompactionState, LastCompaction, RevisionSample};
use crate::schedule::{Schedule, parse_duration};

/// The most samples status keeps (a safety bound; the sampling interval keeps it near 11).
const MAX_SAMPLES: usize = 32;

/// What one pass should do about compaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The compactor state to record.
    pub state: CompactionState,
    /// Compact to this revision now.
    pub compact_to: Option<i64>,
    /// When the next tick is due (for the requeue).
    pub next_tick: Option<Timestamp>,
}

fn minus(t: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d).ok().and_then(|d| t.checked_sub(d).ok()).unwrap_or(Timestamp::MIN)
}

/// Decides this pass's compaction: whether a tick is due, the sample to record, and the
/// revision to compact to (never at or below the last compaction, never above `current`).
///
/// # Errors
/// A message when the schedule or retention cannot be parsed (the API server's patterns
/// let through a few, such as minute 61).
pub fn plan(
    spec: &CompactionSpec,
    state: Option<&CompactionState>,
    last: Option<&LastCompaction>,
    now: Timestamp,
    current: i64,
) -> Result<Plan, String> {
    let schedule = Schedule::parse(&spec.schedule)?;
    let mut state = state.cloned().unwrap_or_default();
    let last_tick = state.last_tick.as_deref().and_then(parse_time);
    let due = last_tick.is_none_or(|t| schedule.next_after(t).is_some_and(|n| n <= now));
    if !due {
        let next_tick = last_tick.and_then(|t| schedule.next_after(t));
        return Ok(Plan { state, compact_to: None, next_tick });
    }
    state.last_tick = Some(now.to_string());
    let compacted = last.map_or(0, |l| l.revision);
    let target = match (&spec.retain.duration, spec.retain.revisions) {
        (_, Some(keep)) => Some(current.saturating_sub(keep)),
        (Some(d), None) => {
            let retention = parse_duration(d).map_err(|e| format!("compaction.retain: {e}"))?;
            let newest = state.samples.last().and_then(|s| parse_time(&s.time));
            if newest.is_none_or(|t| t <= minus(now, retention / 10)) {
                state.samples.push(RevisionSample { time: now.to_string(), revision: current });
            }
            let cutoff = minus(now, retention);
            let old_enough = state
                .samples
                .iter()
                .rposition(|s| parse_time(&s.time).is_some_and(|t| t <= cutoff));
            // Samples older than the target are never needed again.
            if let Some(i) = old_enough {
                state.samples.drain(..i);
            }
            old_enough.and_then(|_| state.samples.first().map(|s| s.revision))
        }
        (None, None) => return Err("compaction.retain needs a duration or revisions".into()),
    };
    if state.samples.len() > MAX_SAMPLES {
        let extra = state.samples.len() - MAX_SAMPLES;
        state.samples.drain(..extra);
    }
    let compact_to = target.filter(|&r| r > compacted && r > 0 && r <= current);
    Ok(Plan { state, compact_to, next_tick: schedule.next_after(now) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::Retention;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn spec(schedule: &str, duration: Option<&str>, revisions: Option<i64>) -> CompactionSpec {
        CompactionSpec {
            schedule: schedule.into(),
            retain: Retention { duration: duration.map(Into::into), revisions },
        }
    }

    #[test]
    fn duration_retention_compacts_to_the_revision_recorded_one_retention_ago() {
        let s = spec("@every 10s", Some("20s"), None);
        let t0 = at("2026-12-03T10:00:00Z");
        let p = plan(&s, None, None, t0, 100).unwrap();
        assert_eq!(p.compact_to, None, "nothing is a retention old yet");
        assert_eq!(p.state.samples.len(), 1);
        assert_eq!(p.next_tick, Some(at("2026-12-03T10:00:10Z")));
        // Not due yet: nothing changes.
        let early = plan(&s, Some(&p.state), None, at("2026-12-03T10:00:05Z"), 150).unwrap();
        assert_eq!(early.state, p.state);
        assert_eq!(early.compact_to, None);
        let p = plan(&s, Some(&p.state), None, at("2026-12-03T10:00:10Z"), 200).unwrap();
        assert_eq!(p.compact_to, None);
        let p = plan(&s, Some(&p.state), None, at("2026-12-03T10:00:20Z"), 300).unwrap();
        assert_eq!(p.compact_to, Some(100));
        assert_eq!(p.state.samples.first().map(|s| s.revision), Some(100));
        let last = LastCompaction { time: String::new(), revision: 100 };
        let p = plan(&s, Some(&p.state), Some(&last), at("2026-12-03T10:00:30Z"), 400).unwrap();
        assert_eq!(p.compact_to, Some(200));
        assert_eq!(p.state.samples.iter().map(|s| s.revision).collect::<Vec<_>>(), [200, 300, 400]);
    }

    #[test]
    fn revision_retention_keeps_that_many_revisions_and_never_goes_back() {
        let s = spec("@every 10s", None, Some(50));
        let t0 = at("2026-12-03T10:00:00Z");
        assert_eq!(plan(&s, None, None, t0, 30).unwrap().compact_to, None);
        assert_eq!(plan(&s, None, None, t0, 130).unwrap().compact_to, Some(80));
        let last = LastCompaction { time: String::new(), revision: 90 };
        assert_eq!(plan(&s, None, Some(&last), t0, 130).unwrap().compact_to, None);
        assert!(plan(&s, None, None, t0, 130).unwrap().state.samples.is_empty());
    }

    #[test]
    fn samples_are_taken_at_most_every_tenth_of_the_retention() {
        let s = spec("@every 1s", Some("100s"), None);
        let mut state = None;
        for i in 0..60 {
            let t = at("2026-12-03T10:00:00Z").checked_add(SignedDuration::from_secs(i)).unwrap();
            state = Some(plan(&s, state.as_ref(), None, t, 10 + i).unwrap().state);
        }
        assert_eq!(state.unwrap().samples.len(), 6);
    }

    #[test]
    fn a_bad_schedule_is_an_error_not_a_panic() {
        let s = spec("61 * * * *", Some("1h"), None);
        assert!(plan(&s, None, None, Timestamp::now(), 10).is_err());
    }
}
