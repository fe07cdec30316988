//! Reading snapshots saved from etcd (its bbolt database with the SHA-256 trailer).
//!
//! Not implemented yet: these functions refuse the file with a clear error.

use std::path::Path;

use super::Error;
use super::cli::Status;

fn unsupported(path: &Path) -> Error {
    Error::Invalid {
        path: path.to_owned(),
        reason: "not a Cairn snapshot, and reading etcd (bbolt) snapshots is not implemented yet"
            .into(),
    }
}

/// Checks an etcd snapshot, returning its revision.
pub(super) fn check(path: &Path, _skip_hash_check: bool) -> Result<i64, Error> {
    Err(unsupported(path))
}

/// Reads an etcd snapshot as Cairn storage records.
pub(super) fn read(
    path: &Path,
    _skip_hash_check: bool,
    _visit: super::Visit<'_>,
) -> Result<(), Error> {
    Err(unsupported(path))
}

/// etcdutl's status of an etcd snapshot.
pub(super) fn status(path: &Path) -> Result<Status, Error> {
    Err(unsupported(path))
}
