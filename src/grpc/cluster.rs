//! etcd's `Cluster` service: member list and membership changes, each a raft conf change
//! (or, for `MemberUpdate`, a replicated request) applied to the member records. A follower
//! hands adds, removes and promotions to the leader, which alone sees which members are
//! active and how far a learner is.

use std::sync::Arc;

use std::time::Duration;

use cairn_proto::etcdserverpb::{
    self as pb, cluster_client::ClusterClient, cluster_server::Cluster,
};
use tonic::transport::{Channel, Endpoint};
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

    /// A client of the leader's Cluster service when this member is a follower that knows
    /// the leader; `None` on the leader. Membership changes run on the leader: only it knows
    /// which members are active (the strict reconfiguration check) and how far a learner is.
    /// Refuses a caller without the `root` role while auth is on (etcd's
    /// checkMembershipOperationPermission; MemberList is open to everyone).
    async fn admin(&self) -> Result<(), Status> {
        self.server.check_admin().await.map_err(status::from_server)
    }

    async fn leader_client(&self) -> Result<Option<ClusterClient<Channel>>, Status> {
        let leader = self.server.await_leader().await;
        if self.server.is_leader() || leader == 0 {
            return Ok(None);
        }
        let no_leader = || status::from_server(crate::server::Error::NoLeader);
        let url = self
            .server
            .members()
            .into_iter()
            .find(|m| m.id == leader)
            .and_then(|m| m.client_urls.into_iter().next())
            .ok_or_else(no_leader)?;
        let channel = Endpoint::from_shared(url)
            .map_err(|e| Status::internal(e.to_string()))?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(15))
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|_| no_leader())?;
        Ok(Some(ClusterClient::new(channel)))
    }
}

/// A request to forward to the leader, carrying the caller's token so the leader checks
/// the same user.
fn forwarded<T>(msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    if let Some(token) = crate::server::current_caller()
        .and_then(|c| c.token)
        .and_then(|t| tonic::metadata::MetadataValue::try_from(t).ok())
    {
        req.metadata_mut().insert("token", token);
    }
    req
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
        self.admin().await?;
        if let Some(mut leader) = self.leader_client().await? {
            return leader.member_add(forwarded(r)).await;
        }
        let (member, after) = self
            .server
            .member_add(r.peer_ur_ls, r.is_learner)
            .await
            .map_err(status::from_server)?;
        Ok(Response::new(pb::MemberAddResponse {
            header: convert::current_header(&self.server),
            member: Some(pb::Member::from(&member)),
            members: members(&after),
        }))
    }

    async fn member_remove(
        &self,
        request: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        let id = request.into_inner().id;
        self.admin().await?;
        if let Some(mut leader) = self.leader_client().await? {
            return leader.member_remove(forwarded(pb::MemberRemoveRequest { id })).await;
        }
        let after = self.server.member_remove(id).await.map_err(status::from_server)?;
        Ok(Response::new(pb::MemberRemoveResponse {
            header: convert::current_header(&self.server),
            members: members(&after),
        }))
    }

    async fn member_update(
        &self,
        request: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberUpdateResponse>, Status> {
        let r = request.into_inner();
        self.admin().await?;
        let after =
            self.server.member_update(r.id, r.peer_ur_ls).await.map_err(status::from_server)?;
        Ok(Response::new(pb::MemberUpdateResponse {
            header: convert::current_header(&self.server),
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
            header: convert::current_header(&self.server),
            members: members(&self.server.members()),
        }))
    }

    async fn member_promote(
        &self,
        request: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        let id = request.into_inner().id;
        self.admin().await?;
        match self.server.member_promote(id).await {
            Ok(after) => Ok(Response::new(pb::MemberPromoteResponse {
                header: convert::current_header(&self.server),
                members: members(&after),
            })),
            // Only the leader knows whether the learner caught up: ask it (etcd forwards
            // promotions to the leader too).
            Err(crate::server::Error::NotLeader { .. }) => match self.leader_client().await? {
                Some(mut leader) => {
                    leader.member_promote(forwarded(pb::MemberPromoteRequest { id })).await
                }
                None => Err(status::from_server(crate::server::Error::NoLeader)),
            },
            Err(e) => Err(status::from_server(e)),
        }
    }
}
