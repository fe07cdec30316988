//! The one table that turns Cairn's errors into gRPC statuses with etcd's codes and
//! messages (etcd api/v3rpc/rpctypes/error.go). Clients match these strings byte for byte.

use tonic::{Code, Status};

use crate::{apply, lease, mvcc, server};

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
}

/// Maps a server error to etcd's status.
pub fn from_server(e: server::Error) -> Status {
    match e {
        server::Error::NoLeader => Status::new(Code::Unavailable, msg::NO_LEADER),
        server::Error::Timeout => Status::new(Code::Unavailable, msg::TIMEOUT),
        server::Error::Stopped => Status::new(Code::Unavailable, msg::STOPPED),
        server::Error::TooLarge => Status::new(Code::InvalidArgument, msg::REQUEST_TOO_LARGE),
        server::Error::TooManyRequests => {
            Status::new(Code::ResourceExhausted, msg::TOO_MANY_REQUESTS)
        }
        server::Error::Apply(apply::Error::Mvcc(e)) | server::Error::Mvcc(e) => from_mvcc(e),
        server::Error::Apply(apply::Error::Convert(e)) => from_convert(&e),
        server::Error::Apply(apply::Error::Lease(e)) => from_lease(&e),
        e @ (server::Error::Apply(apply::Error::Decode { .. }) | server::Error::Startup(_)) => {
            Status::new(Code::Internal, format!("etcdserver: {e}"))
        }
    }
}

/// Maps an mvcc error to etcd's status.
pub fn from_mvcc(e: mvcc::Error) -> Status {
    match e {
        mvcc::Error::Compacted => Status::new(Code::OutOfRange, msg::COMPACTED),
        mvcc::Error::FutureRevision => Status::new(Code::OutOfRange, msg::FUTURE_REV),
        mvcc::Error::KeyNotFound => Status::new(Code::InvalidArgument, msg::KEY_NOT_FOUND),
        mvcc::Error::LeaseNotFound => Status::new(Code::NotFound, msg::LEASE_NOT_FOUND),
        e @ (mvcc::Error::Storage(_) | mvcc::Error::Corrupt(_)) => {
            tracing::error!(error = %e, "storage failure serving a request");
            Status::new(Code::Internal, format!("etcdserver: {e}"))
        }
    }
}

/// Maps a lessor error to etcd's status.
pub fn from_lease(e: &lease::Error) -> Status {
    match e {
        lease::Error::NotFound => Status::new(Code::NotFound, msg::LEASE_NOT_FOUND),
        lease::Error::Exists => Status::new(Code::FailedPrecondition, msg::LEASE_EXISTS),
        lease::Error::TtlTooLarge => Status::new(Code::OutOfRange, msg::LEASE_TTL_TOO_LARGE),
        e => Status::new(Code::Internal, format!("etcdserver: {e}")),
    }
}

/// Maps a conversion error to etcd's status.
pub fn from_convert(e: &apply::ConvertError) -> Status {
    match e {
        apply::ConvertError::InvalidSortOption => {
            Status::new(Code::InvalidArgument, msg::INVALID_SORT_OPTION)
        }
        apply::ConvertError::EmptyOp => Status::new(Code::InvalidArgument, msg::KEY_NOT_FOUND),
        apply::ConvertError::InvalidCompare => {
            Status::new(Code::InvalidArgument, "etcdserver: invalid compare")
        }
    }
}

/// An InvalidArgument status with one of etcd's messages.
pub fn invalid(message: &'static str) -> Status {
    Status::new(Code::InvalidArgument, message)
}
