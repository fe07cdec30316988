//! etcd's `Cluster` service. `MemberList` is served from the member records; membership
//! changes answer `Unimplemented` until multi-member clusters exist.

use std::sync::Arc;

use cairn_proto::etcdserverpb::{self as pb, cluster_server::Cluster};
use tonic::{Request, Response, Status};

use super::convert;
use crate::server::{Member, Server};

/// The Cluster service over one server.
#[derive(Debug, Clone)]
pub struct ClusterService {
    server: Arc<Server>,
}

impl ClusterService {
    /// Creates the service.
    pub fn new(server: Arc<Server>) -> Self {
        Self { server }
    }
}

fn member(m: &Member) -> pb::Member {
    pb::Member {
        id: m.id,
        name: m.name.clone(),
        peer_ur_ls: m.peer_urls.clone(),
        client_ur_ls: m.client_urls.clone(),
        is_learner: m.is_learner,
    }
}

fn unimplemented(method: &str) -> Status {
    Status::unimplemented(format!(
        "etcdserverpb.Cluster/{method} needs multi-member support, not in Cairn yet"
    ))
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        _: Request<pb::MemberAddRequest>,
    ) -> Result<Response<pb::MemberAddResponse>, Status> {
        Err(unimplemented("MemberAdd"))
    }

    async fn member_remove(
        &self,
        _: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        Err(unimplemented("MemberRemove"))
    }

    async fn member_update(
        &self,
        _: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberUpdateResponse>, Status> {
        Err(unimplemented("MemberUpdate"))
    }

    async fn member_list(
        &self,
        request: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        if request.get_ref().linearizable {
            self.server.linearizable_barrier().await.map_err(super::status::from_server)?;
        }
        Ok(Response::new(pb::MemberListResponse {
            header: convert::header(self.server.header(), self.server.kv().current_revision()),
            members: self.server.members().iter().map(member).collect(),
        }))
    }

    async fn member_promote(
        &self,
        _: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        Err(unimplemented("MemberPromote"))
    }
}
