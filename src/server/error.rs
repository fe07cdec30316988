//! The one error the server returns to the edge.
//!
//! Every failure below the server (apply's results, mvcc reads, the lessor, membership
//! checks, raft) is folded into [`Error`] here, as a kind the edge can name without knowing
//! the layer it came from; `grpc/status.rs` maps each kind to etcd's gRPC code and message.

use super::identity::MemberError;
use crate::{apply, lease, mvcc};

/// Errors the server returns to the edge.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No leader is known.
    #[error("no leader")]
    NoLeader,
    /// The request did not complete within the request timeout.
    #[error("request timed out")]
    Timeout,
    /// The server is stopping or stopped.
    #[error("server stopped")]
    Stopped,
    /// The encoded request exceeds `--max-request-bytes`.
    #[error("request is too large")]
    TooLarge,
    /// Apply lags commit by more than etcd's 5000 entries.
    #[error("too many requests")]
    TooManyRequests,
    /// Startup failed.
    #[error("startup: {0}")]
    Startup(String),
    /// This member is not the leader; the request must go to `leader` (0 when unknown).
    #[error("not leader")]
    NotLeader {
        /// The leader's id, 0 when unknown.
        leader: u64,
    },
    /// A membership request was refused (etcd's member errors).
    #[error("{0}")]
    Member(#[from] MemberError),
    /// A membership change was refused when applied (the member vanished or exists).
    #[error("{reason}")]
    MemberRefused {
        /// The member id.
        id: u64,
        /// etcd's wording of the refusal.
        reason: &'static str,
    },
    /// The leader-transfer target is not a voting member.
    #[error("bad leader transferee")]
    BadLeaderTransferee,
    /// The leader transfer did not finish within the request timeout.
    #[error("request timed out, leader transfer took too long")]
    LeaderTransferTimeout,
    /// The member is a learner and does not serve this RPC.
    #[error("rpc not supported for learner")]
    Learner,
    /// The revision asked for is below the compaction point.
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    /// The revision asked for is above the current revision.
    #[error("mvcc: required revision is a future revision")]
    FutureRevision,
    /// `ignore_value`/`ignore_lease` on a missing key, or a txn op without a request.
    #[error("key not found")]
    KeyNotFound,
    /// The lease named does not exist.
    #[error("requested lease not found")]
    LeaseNotFound,
    /// A grant named a lease id that exists.
    #[error("lease already exists")]
    LeaseExists,
    /// A grant asked for more than the maximum TTL.
    #[error("too large lease TTL")]
    LeaseTtlTooLarge,
    /// `sort_order` or `sort_target` is not one of etcd's values.
    #[error("invalid sort option")]
    InvalidSortOption,
    /// A compare's `result` or `target` is not one of etcd's values.
    #[error("invalid compare")]
    InvalidCompare,
    /// A long read (a snapshot stream) was cut short by a concurrent compaction or state
    /// replacement; the client may retry.
    #[error("{0}")]
    Interrupted(String),
    /// The backend quota is exhausted (a NOSPACE alarm is raised).
    #[error("mvcc: database space exceeded")]
    NoSpace,
    /// A CORRUPT alarm is raised: the cluster refuses writes.
    #[error("corrupt cluster")]
    Corrupt,
    /// The state machine's storage failed or holds corrupt data.
    #[error("{0}")]
    Storage(String),
    /// Proclaim by a caller that no longer leads (etcd's concurrency `ErrElectionNotLeader`).
    #[error("election: not leader")]
    ElectionNotLeader,
    /// Leader of an election nobody leads (`ErrElectionNoLeader`).
    #[error("election: no leader")]
    ElectionNoLeader,
    /// A lock waiter's key vanished (its lease ended) before it owned the lock (etcd's
    /// concurrency `ErrSessionExpired`).
    #[error("mutex: session is expired")]
    LockSessionExpired,
    /// Proclaim or Resign without a leader key (etcd's v3election `ErrMissingLeaderKey`).
    #[error("\"leader\" field must be provided")]
    MissingLeaderKey,
    /// The auth store refused the request (etcd's auth errors).
    #[error(transparent)]
    Auth(#[from] crate::auth::Error),
    /// A failure that is a bug or a damaged entry, not the client's doing.
    #[error("{0}")]
    Internal(String),
}

impl From<mvcc::Error> for Error {
    fn from(e: mvcc::Error) -> Self {
        match e {
            mvcc::Error::Compacted => Error::Compacted,
            mvcc::Error::FutureRevision => Error::FutureRevision,
            mvcc::Error::KeyNotFound => Error::KeyNotFound,
            mvcc::Error::LeaseNotFound => Error::LeaseNotFound,
            e @ mvcc::Error::PinInvalidated => Error::Interrupted(e.to_string()),
            e
            @ (mvcc::Error::Storage(_) | mvcc::Error::Corrupt(_) | mvcc::Error::Compaction(_)) => {
                Error::Storage(e.to_string())
            }
        }
    }
}

impl From<lease::Error> for Error {
    fn from(e: lease::Error) -> Self {
        match e {
            lease::Error::NotFound => Error::LeaseNotFound,
            lease::Error::Exists => Error::LeaseExists,
            lease::Error::TtlTooLarge => Error::LeaseTtlTooLarge,
            e @ (lease::Error::ZeroId | lease::Error::Corrupt(_) | lease::Error::Storage(_)) => {
                Error::Internal(e.to_string())
            }
        }
    }
}

impl From<apply::ConvertError> for Error {
    fn from(e: apply::ConvertError) -> Self {
        match e {
            apply::ConvertError::InvalidSortOption => Error::InvalidSortOption,
            apply::ConvertError::InvalidCompare => Error::InvalidCompare,
            apply::ConvertError::EmptyOp => Error::KeyNotFound,
        }
    }
}

impl From<apply::Error> for Error {
    fn from(e: apply::Error) -> Self {
        match e {
            apply::Error::Mvcc(e) => e.into(),
            apply::Error::Lease(e) => e.into(),
            apply::Error::Convert(e) => e.into(),
            apply::Error::Membership { id, reason } => Error::MemberRefused { id, reason },
            apply::Error::NoSpace => Error::NoSpace,
            apply::Error::Corrupt => Error::Corrupt,
            apply::Error::Auth(e) => Error::Auth(e),
            e @ (apply::Error::Decode { .. } | apply::Error::NoApplier { .. }) => {
                Error::Internal(e.to_string())
            }
        }
    }
}
