//! Maintenance snapshots: Cairn's snapshot image format, the `cairn snapshot save |
//! status | restore` subcommands (etcdutl's), and `upload | download | delete` of snapshots
//! in an S3-compatible bucket (for the operator's backups).
//!
//! # The image format (version 1)
//!
//! A snapshot is one file holding every record of the state machine's storage engine at
//! one applied raft index, followed, as etcd does, by the 32-byte SHA-256 of everything
//! before it. All integers are big-endian.
//!
//! ```text
//! magic      8 bytes  "CAIRNSNP"
//! version    u32      1
//! header_len u32      length of the header that follows (40 in version 1; readers skip
//!                     bytes past the fields they know)
//! header     revision i64, compact_revision i64, applied_index u64, cluster_id u64,
//!            member_id u64 (the point in time, and who took it)
//! record*    tag u8 = 1, keyspace u8 (the storage prefix: 'k' mvcc, 'm' meta, 'l' leases,
//!            'a' auth, 'b' members), key_len u32, key, value_len u32, value
//! end        tag u8 = 0, record_count u64 (records above; a cut file never ends right)
//! padding    zero bytes up to a multiple of 512 bytes: etcd's clients (`etcdctl
//!            snapshot save`) accept a stream only when its size modulo 512 is 32
//!            (`hasChecksum`, made for bbolt's whole pages)
//! sha256     32 bytes over every byte before it (etcd's trailer, also sent by the server
//!            as the last chunk of `Maintenance.Snapshot`)
//! ```
//!
//! Records are the storage engine's keys and values as they are (see `storage` and the
//! `mvcc` persistence layout): the non-mvcc keyspaces first, copied between two write
//! groups, then the mvcc records with revisions up to `revision`, streamed from a pinned
//! view while writes go on (`mvcc::Pin`). The server never holds the image in memory: it
//! sends it in chunks as it reads, hashing as it goes.
//!
//! `status` reports the `hash` (CRC-32/IEEE over each record's keyspace byte, key and
//! value, in file order), the revision, the record count ("total keys", as etcdutl counts
//! every key of every bucket) and the file size. `restore` checks the trailer and the
//! structure of the whole file before it writes anything.
//!
//! `restore` also reads snapshots saved from etcd (bbolt files), see `bbolt.rs`.

mod bbolt;
mod cli;
mod image;
mod restore;
mod s3;

pub use self::cli::{Args, run};
pub use self::image::{Header, ImageWriter, Summary, read_image};
pub use self::restore::{RestoreOptions, Restored, restore};

/// Receives each record of a snapshot in file order: keyspace, key, value.
pub type Visit<'a> = &'a mut dyn FnMut(crate::storage::Keyspace, &[u8], &[u8]) -> Result<(), Error>;

/// Errors of reading, checking or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a snapshot this build understands, or is damaged.
    #[error("snapshot {path} is invalid: {reason}")]
    Invalid {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The SHA-256 trailer does not match the content.
    #[error("snapshot {path}: expected sha256 {expected}, got {actual} (the file is corrupt)")]
    HashMismatch {
        /// The file.
        path: std::path::PathBuf,
        /// The trailer's digest.
        expected: String,
        /// The content's digest.
        actual: String,
    },
    /// The member serving the snapshot failed or could not be reached.
    #[error("{0}")]
    Remote(String),
    /// The restore's settings are inconsistent.
    #[error("{0}")]
    Config(String),
    /// The target storage failed.
    #[error(transparent)]
    Storage(#[from] crate::storage::Error),
}
