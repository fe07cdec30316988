//! Revisions and their storage-key encoding.
//!
//! A [`Revision`] names one change: `main` is the store revision of the request that made
//! it, `sub` orders the changes inside that request (a txn or a multi-key delete writes
//! several keys at one main revision). The storage key is the big-endian pair, so the
//! engine's byte order is revision order and a scan of the `Kv` keyspace replays history.

use super::{Error, Result};

/// Length of an encoded revision without the tombstone mark.
pub(super) const REVISION_LEN: usize = 16;

/// The byte appended to a revision's storage key when the change is a deletion, as etcd's
/// `markTombstone` does; the value then holds only the key.
const TOMBSTONE_MARK: u8 = b't';

/// The position of one change in the store's history: a main revision and a sub-revision.
///
/// Ordering is by `main`, then `sub`, which is the order changes were applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision {
    /// The store revision of the request that made the change.
    pub main: i64,
    /// The change's index among the changes of that request, from 0.
    pub sub: i64,
}

impl Revision {
    /// Creates a revision from its main and sub parts.
    pub const fn new(main: i64, sub: i64) -> Self {
        Self { main, sub }
    }

    /// Encodes this revision as a storage key, with the tombstone mark when `tombstone`.
    ///
    /// Revisions are never negative, so the two's-complement big-endian bytes sort the same
    /// as the numbers.
    pub fn to_key(self, tombstone: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(REVISION_LEN + 1);
        out.extend_from_slice(&self.main.to_be_bytes());
        out.extend_from_slice(&self.sub.to_be_bytes());
        if tombstone {
            out.push(TOMBSTONE_MARK);
        }
        out
    }

    /// Decodes a storage key into its revision and whether it marks a tombstone.
    ///
    /// # Errors
    /// Returns [`Error::Corrupt`] when the key is neither 16 bytes nor 16 bytes plus the
    /// tombstone mark.
    pub fn from_key(key: &[u8]) -> Result<(Revision, bool)> {
        let (head, tail) = key.split_at_checked(REVISION_LEN).ok_or_else(|| bad_key(key))?;
        let tombstone = match tail {
            [] => false,
            [TOMBSTONE_MARK] => true,
            _ => return Err(bad_key(key)),
        };
        let (main, sub) = head.split_at_checked(8).ok_or_else(|| bad_key(key))?;
        let main = i64::from_be_bytes(main.try_into().map_err(|_| bad_key(key))?);
        let sub = i64::from_be_bytes(sub.try_into().map_err(|_| bad_key(key))?);
        if main < 0 || sub < 0 {
            return Err(bad_key(key));
        }
        Ok((Revision { main, sub }, tombstone))
    }
}

fn bad_key(key: &[u8]) -> Error {
    Error::Corrupt(format!("malformed revision key {key:02x?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_keys_round_trip_and_sort_in_revision_order() {
        let revs = [
            Revision::new(1, 0),
            Revision::new(1, 1),
            Revision::new(2, 0),
            Revision::new(255, 3),
            Revision::new(256, 0),
            Revision::new(i64::MAX, 0),
        ];
        for (rev, tomb) in revs.iter().flat_map(|r| [(*r, false), (*r, true)]) {
            assert_eq!(Revision::from_key(&rev.to_key(tomb)).unwrap(), (rev, tomb));
        }
        let keys: Vec<_> = revs.iter().map(|r| r.to_key(false)).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        // A tombstone sorts right after the plain key of the same revision and before the
        // next revision, so a scan still visits changes in order.
        assert!(Revision::new(1, 0).to_key(true) < Revision::new(1, 1).to_key(false));
    }

    #[test]
    fn malformed_storage_keys_are_corrupt_not_panics() {
        let mut wrong_mark = Revision::new(3, 0).to_key(false);
        wrong_mark.push(b'x');
        let negative = Revision::new(-1, 0).to_key(false);
        for key in [&b""[..], &[0; 15][..], &[0; 18][..], &wrong_mark[..], &negative[..]] {
            assert!(matches!(Revision::from_key(key), Err(Error::Corrupt(_))), "{key:?}");
        }
    }
}
