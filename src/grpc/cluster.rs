//! etcd's `Cluster` service: member list and membership changes, each a raft conf change
//! (or, for `MemberUpdate`, a replicated request) applied to the member records.

use std::sync::Arc;

use cairn_proto::etcdserverpb::{self as pb, cluster_server::Cluster};
use tonic::{Request, Response, Status};

use super::{convert, status};
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

    fn header(&self) -> Option<pb::ResponseHeader> {
        convert::header(self.server.header(), self.server.kv().current_revision())
    }
}

fn members(list: &[Member]) -> Vec<pb::Member> {
    list.iter().map(pb::Member::from).collect()
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        request: Request<pb::MemberAddRequest>,
    ) -> Result<Response<pb::MemberAddResponse>, Status> {
        let r = request.into_inner();
        let (member, after) = self
            .server
            .member_add(r.peer_ur_ls, r.is_learner)
            .await
            .map_err(status::from_server)?;
        Ok(Response::new(pb::MemberAddResponse {
            header: self.header(),
            member: Some(pb::Member::from(&member)),
            members: members(&after),
        }))
    }

    async fn member_remove(
        &self,
        request: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        let after = self
            .server
            .member_remove(request.into_inner().id)
            .await
            .map_err(status::from_server)?;
        Ok(Response::new(pb::MemberRemoveResponse {
            header: self.header(),
            members: members(&after),
        }))
    }

    async fn member_update(
        &self,
        request: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberUpdateResponse>, Status> {
        let r = request.into_inner();
        let after =
            self.server.member_update(r.id, r.peer_ur_ls).await.map_err(status::from_server)?;
        Ok(Response::new(pb::MemberUpdateResponse {
            header: self.header(),
            members: members(&after),
        }))
    }

    async fn member_list(
        &self,
        request: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        if request.get_ref().linearizable {
            self.server.linearizable_barrier().await.map_err(status::from_server)?;
        }
        Ok(Response::new(pb::MemberListResponse {
            header: self.header(),
            members: members(&self.server.members()),
        }))
    }

    async fn member_promote(
        &self,
        request: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        let id = request.into_inner().id;
        match self.server.member_promote(id).await {
            Ok(after) => Ok(Response::new(pb::MemberPromoteResponse {
                header: self.header(),
                members: members(&after),
            })),
            // Only the leader knows whether the learner caught up: ask it (etcd forwards
            // promotions to the leader too).
            Err(crate::server::Error::NotLeader { leader }) if leader != 0 => {
                let url = self
                    .server
                    .members()
                    .into_iter()
                    .find(|m| m.id == leader)
                    .and_then(|m| m.client_urls.into_iter().next())
                    .ok_or_else(|| status::from_server(crate::server::Error::NoLeader))?;
                let channel = tonic::transport::Endpoint::from_shared(url)
                    .map_err(|e| Status::internal(e.to_string()))?
                    .connect_timeout(std::time::Duration::from_secs(1))
                    .timeout(std::time::Duration::from_secs(10))
                    .connect()
                    .await
                    .map_err(|_| status::from_server(crate::server::Error::NoLeader))?;
                let mut leader_client = pb::cluster_client::ClusterClient::new(channel);
                leader_client.member_promote(pb::MemberPromoteRequest { id }).await
            }
            Err(e) => Err(status::from_server(e)),
        }
    }
}
