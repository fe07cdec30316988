//! Rolling upgrades: which image changes the store can take, and which member restarts next.
//!
//! The StatefulSet uses the `OnDelete` strategy, so the controller never restarts a store
//! pod by itself: the operator deletes one outdated pod at a time (its replacement comes
//! from the new template) and waits until that member is back, healthy and caught up before
//! the next. Members that are already down go first (restarting them costs nothing), then
//! the followers, then the leader after its leadership was moved to the most caught-up
//! follower. A member that does not come back in time stops the roll (Degraded,
//! `UpgradeStalled`); nothing else is restarted until the spec changes.
//!
//! The version check compares the tags of the current and the requested image: a downgrade,
//! a major version change, or a jump of more than one minor version is refused (the
//! StatefulSet keeps the current image, Degraded `UpgradeRefused`). Tags that are not
//! versions (`latest`, `dev`, digests) cannot be judged and are rolled without the check.

/// A `major.minor.patch` version.
pub type Version = (u64, u64, u64);

/// The version in an image's tag (`repo/cairn:v0.2.1` → `(0, 2, 1)`; a missing patch is 0;
/// a pre-release or build suffix is ignored).
pub fn version_of(image: &str) -> Option<Version> {
    let name = image.rsplit('/').next().unwrap_or(image);
    let name = name.split('@').next().unwrap_or(name);
    let tag = name.split_once(':')?.1;
    let core = tag.trim_start_matches('v').split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    let major = parts.next()??;
    let minor = parts.next()??;
    let patch = match parts.next() {
        Some(p) => p?,
        None => 0,
    };
    if parts.next().is_some() {
        return None;
    }
    Some((major, minor, patch))
}

/// Whether the store can go from image `from` to image `to` in one roll.
///
/// # Errors
/// Why not, in words for the user.
pub fn check(from: &str, to: &str) -> Result<(), String> {
    let (Some(a), Some(b)) = (version_of(from), version_of(to)) else { return Ok(()) };
    let show = |v: Version| format!("{}.{}.{}", v.0, v.1, v.2);
    if b < a {
        return Err(format!(
            "{to} would downgrade the members from {} to {}: downgrades are refused",
            show(a),
            show(b)
        ));
    }
    if b.0 != a.0 {
        return Err(format!(
            "{to} changes the major version ({} to {}): refused, upgrade through each release",
            show(a),
            show(b)
        ));
    }
    if b.1 > a.1 + 1 {
        return Err(format!(
            "{to} skips more than one minor version ({} to {}): upgrade to {}.{} first",
            show(a),
            show(b),
            a.0,
            a.1 + 1
        ));
    }
    Ok(())
}

/// An outdated member as the choice sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outdated {
    /// Pod ordinal.
    pub ordinal: u32,
    /// It leads.
    pub leader: bool,
    /// It answers and its pod is Ready.
    pub up: bool,
}

/// The next step of a roll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Delete this pod (it comes back from the new template).
    Restart(u32),
    /// Move leadership off the outdated leader first.
    MoveLeader(u32),
    /// Nothing may restart now.
    Wait(String),
}

/// Picks the next member to restart: a down one first, else a follower (highest ordinal
/// first), else the leader, after a leadership move when another voter can take it.
/// `others_down` names an up-to-date member that is not healthy: then nothing that is up
/// may restart (it would cost quorum or redundancy).
pub fn next(outdated: &[Outdated], others_down: Option<&str>, voters: usize) -> Choice {
    if let Some(down) = outdated.iter().find(|m| !m.up) {
        return Choice::Restart(down.ordinal);
    }
    if let Some(name) = others_down {
        return Choice::Wait(format!("{name} is not healthy: the roll waits for it"));
    }
    if let Some(f) = outdated.iter().filter(|m| !m.leader).max_by_key(|m| m.ordinal) {
        return Choice::Restart(f.ordinal);
    }
    match outdated.first() {
        Some(l) if voters > 1 => Choice::MoveLeader(l.ordinal),
        Some(l) => Choice::Restart(l.ordinal),
        None => Choice::Wait("no member is outdated".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_come_from_the_tag() {
        assert_eq!(version_of("cairn:0.2.0"), Some((0, 2, 0)));
        assert_eq!(version_of("registry:5000/x/cairn:v1.3"), Some((1, 3, 0)));
        assert_eq!(version_of("cairn:0.3.1-rc.1"), Some((0, 3, 1)));
        assert_eq!(version_of("cairn:dev"), None);
        assert_eq!(version_of("registry:5000/cairn"), None);
        assert_eq!(version_of("cairn:1.2.3.4"), None);
    }

    #[test]
    fn downgrades_major_changes_and_minor_skips_are_refused() {
        assert!(check("cairn:0.1.0", "cairn:0.2.0").is_ok());
        assert!(check("cairn:0.2.0", "cairn:0.2.5").is_ok());
        assert!(check("cairn:dev", "cairn:0.9.0").is_ok());
        assert!(check("cairn:0.2.0", "cairn:0.1.9").unwrap_err().contains("downgrade"));
        assert!(check("cairn:0.2.0", "cairn:0.4.0").unwrap_err().contains("more than one minor"));
        assert!(check("cairn:0.9.0", "cairn:1.0.0").unwrap_err().contains("major"));
    }

    #[test]
    fn down_members_then_followers_then_the_leader_after_a_move() {
        let m = |ordinal, leader, up| Outdated { ordinal, leader, up };
        let all = [m(0, true, true), m(1, false, true), m(2, false, true)];
        assert_eq!(next(&all, None, 3), Choice::Restart(2));
        assert_eq!(next(&all[..2], None, 3), Choice::Restart(1));
        assert_eq!(next(&all[..1], None, 3), Choice::MoveLeader(0));
        assert_eq!(next(&all[..1], None, 1), Choice::Restart(0));
        let broken = [m(0, true, true), m(1, false, false)];
        assert_eq!(next(&broken, Some("c-2"), 3), Choice::Restart(1));
        assert!(matches!(next(&all, Some("c-2"), 3), Choice::Wait(_)));
    }
}
