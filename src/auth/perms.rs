//! Range permissions: a user's READ and WRITE grants merged into sorted half-open intervals,
//! and the coverage check etcd's interval tree answers (server/auth/range_perm_cache.go).
//!
//! A grant on one key (empty `range_end`) is the interval `[key, key + "\0")`, which holds
//! exactly that key; a `range_end` of `"\0"` is open-ended (every key `>= key`). A request is
//! permitted when the union of the grants of its kind covers the whole requested interval,
//! so two adjacent grants together permit a range that spans both, as in etcd.

use cairn_proto::authpb::{Permission, permission::Type};

/// Which kind of access a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reading keys (Range, compares, a watch, `prev_kv`).
    Read,
    /// Writing keys (Put, DeleteRange, lease revokes of attached keys).
    Write,
}

/// A half-open key interval; `end = None` is unbounded.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Interval {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Interval {
    /// The interval a grant or a request names, with etcd's range conventions.
    fn of(key: &[u8], range_end: &[u8]) -> Interval {
        let end = match range_end {
            [] => {
                let mut end = key.to_vec();
                end.push(0);
                Some(end)
            }
            [0] => None,
            end => Some(end.to_vec()),
        };
        Interval { start: key.to_vec(), end }
    }

    fn is_empty(&self) -> bool {
        self.end.as_ref().is_some_and(|e| e.as_slice() <= self.start.as_slice())
    }
}

/// One user's merged grants, read and write side each sorted by start.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UserPerms {
    read: Vec<Interval>,
    write: Vec<Interval>,
}

impl UserPerms {
    /// Merges the permissions of every role a user holds.
    pub fn new<'a>(perms: impl IntoIterator<Item = &'a Permission>) -> UserPerms {
        let mut out = UserPerms::default();
        for p in perms {
            let ivl = Interval::of(&p.key, &p.range_end);
            if ivl.is_empty() {
                continue;
            }
            match Type::try_from(p.perm_type) {
                Ok(Type::Read) => out.read.push(ivl),
                Ok(Type::Write) => out.write.push(ivl),
                Ok(Type::Readwrite) => {
                    out.read.push(ivl.clone());
                    out.write.push(ivl);
                }
                Err(_) => {}
            }
        }
        out.read.sort_by(|a, b| a.start.cmp(&b.start));
        out.write.sort_by(|a, b| a.start.cmp(&b.start));
        out
    }

    /// True when the grants of `access`'s kind cover `[key, range_end)` (etcd's range
    /// conventions: empty `range_end` is the single key, `"\0"` every key from `key` on).
    pub fn permits(&self, access: Access, key: &[u8], range_end: &[u8]) -> bool {
        let grants = match access {
            Access::Read => &self.read,
            Access::Write => &self.write,
        };
        let want = Interval::of(key, range_end);
        let mut covered = want.start.clone();
        for g in grants {
            // Sorted by start: a grant starting past what is covered leaves a gap.
            if g.start.as_slice() > covered.as_slice() {
                return false;
            }
            match &g.end {
                None => return true,
                Some(end) if end.as_slice() > covered.as_slice() => covered.clone_from(end),
                Some(_) => {}
            }
            if want.end.as_ref().is_some_and(|w| covered.as_slice() >= w.as_slice()) {
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perm(t: Type, key: &str, end: &[u8]) -> Permission {
        Permission { perm_type: t as i32, key: key.into(), range_end: end.to_vec() }
    }

    #[test]
    fn single_keys_ranges_prefixes_and_open_ends_follow_etcds_conventions() {
        let p = [
            perm(Type::Readwrite, "a", b""),
            perm(Type::Read, "b", b"c"),
            perm(Type::Write, "p/", b"p0"),
            perm(Type::Read, "z", b"\0"),
        ];
        let u = UserPerms::new(&p);
        assert!(u.permits(Access::Read, b"a", b""));
        assert!(u.permits(Access::Write, b"a", b""));
        assert!(!u.permits(Access::Read, b"a0", b""), "a single-key grant holds one key");
        assert!(!u.permits(Access::Read, b"a", b"b"), "nor a range from it");
        assert!(u.permits(Access::Read, b"b", b""));
        assert!(u.permits(Access::Read, b"bzz", b"c"));
        assert!(!u.permits(Access::Read, b"b", b"d"));
        assert!(!u.permits(Access::Write, b"b", b""));
        assert!(u.permits(Access::Write, b"p/x", b""));
        assert!(u.permits(Access::Write, b"p/", b"p0"));
        assert!(!u.permits(Access::Read, b"p/x", b""));
        assert!(u.permits(Access::Read, b"zzz", b"\0"));
        assert!(u.permits(Access::Read, b"z", b"\xff\xff"));
        assert!(!u.permits(Access::Read, b"y", b"\0"));
    }

    #[test]
    fn adjacent_grants_together_cover_a_range_spanning_both() {
        let p = [perm(Type::Read, "a", b"m"), perm(Type::Readwrite, "m", b"z")];
        let u = UserPerms::new(&p);
        assert!(u.permits(Access::Read, b"b", b"y"));
        assert!(!u.permits(Access::Read, b"b", b"zz"));
        assert!(!u.permits(Access::Write, b"b", b"y"));
    }
}
