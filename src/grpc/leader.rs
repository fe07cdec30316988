//! etcd's `hasleader` metadata: a client that sets it (clientv3.WithRequireLeader, as
//! kube-apiserver does) wants "etcdserver: no leader" at once from a member that knows no
//! leader, instead of a request that waits out the request timeout (ETCD-COMPAT.md §1.10).

use tonic::{Request, Status};

use super::status;
use crate::server::{Error, Server};

/// Fails with etcd's no-leader error when `request` requires a leader and none is known.
///
/// # Errors
/// `Unavailable` / "etcdserver: no leader".
pub(super) fn require_leader<T>(request: &Request<T>, server: &Server) -> Result<(), Status> {
    let wants_leader = request
        .metadata()
        .get("hasleader")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "true");
    if wants_leader && server.leader() == 0 {
        return Err(status::from_server(Error::NoLeader));
    }
    Ok(())
}
