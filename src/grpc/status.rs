//! The one table that turns Cairn's errors into gRPC statuses with etcd's codes and
//! messages (etcd api/v3rpc/rpctypes/error.go). Clients match these strings byte for byte.
//!
//! Every failure reaches the edge as one [`server::Error`]; the server has already folded
//! the errors of the layers below it into that enum's kinds, so this table names no layer
//! but the server.

use tonic::{Code, Status};

use crate::server::{self, MemberError};

/// etcd's error strings, as clients compare them.
pub mod msg {
    /// Empty key.
    pub const EMPTY_KEY: &str = "etcdserver: key is not provided";
    /// ignore_value/ignore_lease on a missing key, or an empty txn op.
    pub const KEY_NOT_FOUND: &str = "etcdserver: key not found";
    /// A value with ignore_value.
    pub const VALUE_PROVIDED: &str = "etcdserver: value is provided";
    /// A lease with ignore_lease.
    pub const LEASE_PROVIDED: &str = "etcdserver: lease is provided";
    /// Txn over `--max-txn-ops`.
    pub const TOO_MANY_OPS: &str = "etcdserver: too many operations in txn request";
    /// The same key written twice in one txn branch.
    pub const DUPLICATE_KEY: &str = "etcdserver: duplicate key given in txn request";
    /// Unknown sort enum.
    pub const INVALID_SORT_OPTION: &str = "etcdserver: invalid sort option";
    /// Compacted revision.
    pub const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";
    /// Future revision.
    pub const FUTURE_REV: &str = "etcdserver: mvcc: required revision is a future revision";
    /// Request over `--max-request-bytes`.
    pub const REQUEST_TOO_LARGE: &str = "etcdserver: request is too large";
    /// Apply lagging commit.
    pub const TOO_MANY_REQUESTS: &str = "etcdserver: too many requests";
    /// Backend quota exhausted (a NOSPACE alarm is raised).
    pub const NO_SPACE: &str = "etcdserver: mvcc: database space exceeded";
    /// A CORRUPT alarm is raised.
    pub const CORRUPT: &str = "etcdserver: corrupt cluster";
    /// Unknown lease.
    pub const LEASE_NOT_FOUND: &str = "etcdserver: requested lease not found";
    /// Duplicate lease id.
    pub const LEASE_EXISTS: &str = "etcdserver: lease already exists";
    /// Lease TTL over the maximum.
    pub const LEASE_TTL_TOO_LARGE: &str = "etcdserver: too large lease TTL";
    /// No leader.
    pub const NO_LEADER: &str = "etcdserver: no leader";
    /// Stopped.
    pub const STOPPED: &str = "etcdserver: server stopped";
    /// Timed out.
    pub const TIMEOUT: &str = "etcdserver: request timed out";
    /// Not the leader.
    pub const NOT_LEADER: &str = "etcdserver: not leader";
    /// A learner refuses the RPC.
    pub const LEARNER: &str = "etcdserver: rpc not supported for learner";
    /// Peer traffic from another cluster.
    pub const CLUSTER_ID_MISMATCH: &str = "etcdserver: cluster ID mismatch";
    /// Peer traffic from a member removed from the cluster.
    pub const MEMBER_REMOVED: &str =
        "etcdserver: the member has been permanently removed from the cluster";
    /// MoveLeader to a member that cannot lead.
    pub const BAD_LEADER_TRANSFEREE: &str = "etcdserver: bad leader transferee";
    /// A request without a user while auth is enabled.
    pub const USER_EMPTY: &str = "etcdserver: user name is empty";
    /// MoveLeader whose transfer did not finish in time.
    pub const LEADER_TRANSFER_TIMEOUT: &str =
        "etcdserver: request timed out, leader transfer took too long";
}

/// Maps a server error to etcd's status.
pub fn from_server(e: server::Error) -> Status {
    use server::Error as E;
    match e {
        E::NoLeader => Status::new(Code::Unavailable, msg::NO_LEADER),
        E::Timeout => Status::new(Code::Unavailable, msg::TIMEOUT),
        E::Stopped => Status::new(Code::Unavailable, msg::STOPPED),
        E::TooLarge => Status::new(Code::InvalidArgument, msg::REQUEST_TOO_LARGE),
        E::TooManyRequests => Status::new(Code::ResourceExhausted, msg::TOO_MANY_REQUESTS),
        E::NotLeader { .. } => Status::new(Code::FailedPrecondition, msg::NOT_LEADER),
        E::Learner => Status::new(Code::FailedPrecondition, msg::LEARNER),
        E::BadLeaderTransferee => Status::new(Code::FailedPrecondition, msg::BAD_LEADER_TRANSFEREE),
        E::LeaderTransferTimeout => {
            Status::new(Code::DeadlineExceeded, msg::LEADER_TRANSFER_TIMEOUT)
        }
        E::Member(e) => from_member(e),
        E::MemberRefused { reason, .. } => {
            Status::new(Code::FailedPrecondition, format!("etcdserver: {reason}"))
        }
        E::Compacted => Status::new(Code::OutOfRange, msg::COMPACTED),
        E::FutureRevision => Status::new(Code::OutOfRange, msg::FUTURE_REV),
        E::KeyNotFound => Status::new(Code::InvalidArgument, msg::KEY_NOT_FOUND),
        E::LeaseNotFound => Status::new(Code::NotFound, msg::LEASE_NOT_FOUND),
        E::LeaseExists => Status::new(Code::FailedPrecondition, msg::LEASE_EXISTS),
        E::LeaseTtlTooLarge => Status::new(Code::OutOfRange, msg::LEASE_TTL_TOO_LARGE),
        E::InvalidSortOption => Status::new(Code::InvalidArgument, msg::INVALID_SORT_OPTION),
        E::InvalidCompare => Status::new(Code::InvalidArgument, "etcdserver: invalid compare"),
        // etcd's concurrency services return these as plain Go errors (`from_concurrency`).
        e @ (E::ElectionNotLeader
        | E::ElectionNoLeader
        | E::LockSessionExpired
        | E::MissingLeaderKey) => Status::new(Code::Unknown, e.to_string()),
        E::Interrupted(e) => Status::new(Code::Unavailable, format!("etcdserver: {e}")),
        E::NoSpace => Status::new(Code::ResourceExhausted, msg::NO_SPACE),
        E::Corrupt => Status::new(Code::DataLoss, msg::CORRUPT),
        E::Storage(e) => {
            tracing::error!(error = %e, "storage failure serving a request");
            Status::new(Code::Internal, format!("etcdserver: {e}"))
        }
        E::Auth(e) => from_auth(e),
        e @ (E::Internal(_) | E::Startup(_)) => {
            Status::new(Code::Internal, format!("etcdserver: {e}"))
        }
    }
}

/// Maps an auth refusal to etcd's status (codes as rpctypes' ErrGRPC* auth errors).
pub fn from_auth(e: crate::server::AuthError) -> Status {
    use crate::server::AuthError as A;
    let code = match e {
        A::RootUserNotExist
        | A::RootRoleNotExist
        | A::UserAlreadyExist
        | A::UserNotFound
        | A::RoleAlreadyExist
        | A::RoleNotFound
        | A::RoleNotGranted
        | A::PermissionNotGranted
        | A::NotEnabled => Code::FailedPrecondition,
        A::UserEmpty
        | A::RoleEmpty
        | A::AuthFailed
        | A::PermissionNotGiven
        | A::InvalidAuthMgmt
        | A::OldRevision => Code::InvalidArgument,
        A::PermissionDenied => Code::PermissionDenied,
        A::InvalidToken => Code::Unauthenticated,
        A::Storage(_) => Code::Internal,
    };
    Status::new(code, format!("etcdserver: {e}"))
}

/// Maps an error of etcd's concurrency services (Lock, Election). etcd serves them through
/// an in-process client that turns the KV errors into plain Go errors, so every failure
/// reaches their callers with code Unknown and etcd's message.
pub fn from_concurrency(e: server::Error) -> Status {
    Status::new(Code::Unknown, from_server(e).message())
}

/// Maps a membership error to etcd's status (code as v3rpc's toGRPCErrorMap).
pub fn from_member(e: MemberError) -> Status {
    let code = match e {
        MemberError::NotFound => Code::NotFound,
        MemberError::BadUrls => Code::InvalidArgument,
        MemberError::IdExists
        | MemberError::PeerUrlExists
        | MemberError::TooManyLearners
        | MemberError::NotLearner
        | MemberError::LearnerNotReady
        | MemberError::NotEnoughStarted
        | MemberError::ClusterIdMismatch => Code::FailedPrecondition,
    };
    Status::new(code, format!("etcdserver: {e}"))
}

/// An InvalidArgument status with one of etcd's messages.
pub fn invalid(message: &'static str) -> Status {
    Status::new(Code::InvalidArgument, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{apply, lease, mvcc};

    /// The status a failure below the server reaches the client with.
    fn status_of(e: impl Into<server::Error>) -> (Code, String) {
        let s = from_server(e.into());
        (s.code(), s.message().to_owned())
    }

    #[test]
    fn failures_below_the_server_keep_etcds_codes_and_messages() {
        let cases: Vec<(server::Error, Code, &str)> = vec![
            (apply::Error::Mvcc(mvcc::Error::Compacted).into(), Code::OutOfRange, msg::COMPACTED),
            (mvcc::Error::FutureRevision.into(), Code::OutOfRange, msg::FUTURE_REV),
            (
                apply::Error::Mvcc(mvcc::Error::KeyNotFound).into(),
                Code::InvalidArgument,
                msg::KEY_NOT_FOUND,
            ),
            (
                apply::Error::Convert(apply::ConvertError::EmptyOp).into(),
                Code::InvalidArgument,
                msg::KEY_NOT_FOUND,
            ),
            (
                apply::ConvertError::InvalidSortOption.into(),
                Code::InvalidArgument,
                msg::INVALID_SORT_OPTION,
            ),
            (
                apply::ConvertError::InvalidCompare.into(),
                Code::InvalidArgument,
                "etcdserver: invalid compare",
            ),
            (mvcc::Error::LeaseNotFound.into(), Code::NotFound, msg::LEASE_NOT_FOUND),
            (
                apply::Error::Lease(lease::Error::NotFound).into(),
                Code::NotFound,
                msg::LEASE_NOT_FOUND,
            ),
            (
                apply::Error::Lease(lease::Error::Exists).into(),
                Code::FailedPrecondition,
                msg::LEASE_EXISTS,
            ),
            (
                apply::Error::Lease(lease::Error::TtlTooLarge).into(),
                Code::OutOfRange,
                msg::LEASE_TTL_TOO_LARGE,
            ),
            (
                apply::Error::Lease(lease::Error::ZeroId).into(),
                Code::Internal,
                "etcdserver: lease id 0 is reserved",
            ),
            (
                apply::Error::Membership { id: 5, reason: "member not found" }.into(),
                Code::FailedPrecondition,
                "etcdserver: member not found",
            ),
            (
                apply::Error::Decode { index: 3, reason: "bad".into() }.into(),
                Code::Internal,
                "etcdserver: undecodable entry at index 3: bad",
            ),
            (
                mvcc::Error::Corrupt("x".into()).into(),
                Code::Internal,
                "etcdserver: mvcc: corrupt data: x",
            ),
            (MemberError::NotFound.into(), Code::NotFound, "etcdserver: member not found"),
        ];
        for (e, code, message) in cases {
            let shown = format!("{e:?}");
            assert_eq!(status_of(e), (code, message.to_owned()), "{shown}");
        }
    }
}
