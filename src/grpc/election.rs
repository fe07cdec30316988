//! etcd's `v3electionpb.Election` service: a thin shell over the server's election recipe.

use std::pin::Pin;
use std::sync::Arc;

use cairn_proto::v3electionpb::{self as epb, election_server::Election};
use futures::{Stream, StreamExt as _};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{convert, status};
use crate::server::{self, Server};

/// The Election service over one server.
#[derive(Debug, Clone)]
pub struct ElectionService {
    server: Arc<Server>,
}

impl ElectionService {
    /// Creates the service.
    pub fn new(server: Arc<Server>) -> Self {
        Self { server }
    }

    fn leader_response(&self, state: server::LeaderState) -> epb::LeaderResponse {
        epb::LeaderResponse {
            header: convert::header(self.server.header(), state.revision),
            kv: Some(convert::kv(state.kv)),
        }
    }
}

/// The domain leader key of a request's `leader`, which etcd requires.
fn leader_key(leader: Option<epb::LeaderKey>) -> Result<server::LeaderKey, Status> {
    let l = leader.ok_or_else(|| status::from_concurrency(server::Error::MissingLeaderKey))?;
    Ok(server::LeaderKey { name: l.name, key: l.key, rev: l.rev, lease: l.lease })
}

#[tonic::async_trait]
impl Election for ElectionService {
    async fn campaign(
        &self,
        request: Request<epb::CampaignRequest>,
    ) -> Result<Response<epb::CampaignResponse>, Status> {
        super::leader::require_leader(&request, &self.server)?;
        let r = request.into_inner();
        let won = self
            .server
            .campaign(&r.name, r.lease, &r.value)
            .await
            .map_err(status::from_concurrency)?;
        let l = won.leader;
        Ok(Response::new(epb::CampaignResponse {
            header: convert::header(self.server.header(), won.revision),
            leader: Some(epb::LeaderKey { name: l.name, key: l.key, rev: l.rev, lease: l.lease }),
        }))
    }

    async fn proclaim(
        &self,
        request: Request<epb::ProclaimRequest>,
    ) -> Result<Response<epb::ProclaimResponse>, Status> {
        super::leader::require_leader(&request, &self.server)?;
        let r = request.into_inner();
        let leader = leader_key(r.leader)?;
        let rev =
            self.server.proclaim(&leader, &r.value).await.map_err(status::from_concurrency)?;
        Ok(Response::new(epb::ProclaimResponse {
            header: convert::header(self.server.header(), rev),
        }))
    }

    async fn leader(
        &self,
        request: Request<epb::LeaderRequest>,
    ) -> Result<Response<epb::LeaderResponse>, Status> {
        super::leader::require_leader(&request, &self.server)?;
        let name = request.into_inner().name;
        let state = self.server.election_leader(&name).await.map_err(status::from_concurrency)?;
        Ok(Response::new(self.leader_response(state)))
    }

    type ObserveStream = Pin<Box<dyn Stream<Item = Result<epb::LeaderResponse, Status>> + Send>>;

    async fn observe(
        &self,
        request: Request<epb::LeaderRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        super::leader::require_leader(&request, &self.server)?;
        let name = request.into_inner().name;
        let this = self.clone();
        let stream = ReceiverStream::new(self.server.observe(&name))
            .map(move |state| Ok(this.leader_response(state)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn resign(
        &self,
        request: Request<epb::ResignRequest>,
    ) -> Result<Response<epb::ResignResponse>, Status> {
        super::leader::require_leader(&request, &self.server)?;
        let leader = leader_key(request.into_inner().leader)?;
        let rev = self.server.resign(&leader).await.map_err(status::from_concurrency)?;
        Ok(Response::new(epb::ResignResponse {
            header: convert::header(self.server.header(), rev),
        }))
    }
}
