//! etcd's `Lease` service.

use std::pin::Pin;
use std::sync::Arc;

use cairn_proto::etcdserverpb::{self as pb, lease_server::Lease};
use futures::{Stream, StreamExt as _};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::{convert, status};
use crate::server::Server;

/// The Lease service over one server.
#[derive(Debug, Clone)]
pub struct LeaseService {
    server: Arc<Server>,
    forward: super::peer::LeaderForward,
}

impl LeaseService {
    /// Creates the service.
    pub fn new(server: Arc<Server>) -> Self {
        Self { forward: super::peer::LeaderForward::new(server.clone()), server }
    }

    /// Learners serve no lease RPCs (etcd: "rpc not supported for learner").
    fn refuse_learner(&self) -> Result<(), Status> {
        if self.server.is_learner() {
            return Err(status::from_server(crate::server::Error::Learner));
        }
        Ok(())
    }
}

/// Responses queued per keep-alive stream before the reader waits for the client.
const KEEPALIVE_BUFFER: usize = 16;

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        super::leader::require_leader(&request, &self.server)?;
        self.refuse_learner()?;
        let r = request.into_inner();
        let (id, ttl) = self.server.lease_grant(r.id, r.ttl).await.map_err(status::from_server)?;
        Ok(Response::new(pb::LeaseGrantResponse {
            header: convert::current_header(&self.server),
            id,
            ttl,
            error: String::new(),
        }))
    }

    async fn lease_revoke(
        &self,
        request: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        super::leader::require_leader(&request, &self.server)?;
        self.refuse_learner()?;
        self.server.lease_revoke(request.into_inner().id).await.map_err(status::from_server)?;
        Ok(Response::new(pb::LeaseRevokeResponse { header: convert::current_header(&self.server) }))
    }

    type LeaseKeepAliveStream =
        Pin<Box<dyn Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send + 'static>>;

    /// Renews leases as the client asks, one response per request in order. An unknown or
    /// expired lease answers TTL 0 rather than an error, as etcd does.
    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        super::leader::require_leader(&request, &self.server)?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(KEEPALIVE_BUFFER);
        let svc = self.clone();
        tokio::spawn(async move {
            while let Some(req) = inbound.next().await {
                let Ok(req) = req else { break };
                let renewed = match svc.server.lease_renew(req.id).await {
                    // Only the leader keeps lease clocks: a follower forwards the renewal.
                    Err(
                        crate::server::Error::NoLeader | crate::server::Error::NotLeader { .. },
                    ) if svc.server.leader() != 0 => svc.forward.renew(req.id).await,
                    other => other.map_err(status::from_server),
                };
                let resp = renewed.map(|ttl| pb::LeaseKeepAliveResponse {
                    header: convert::current_header(&svc.server),
                    id: req.id,
                    ttl,
                });
                let failed = resp.is_err();
                if tx.send(resp).await.is_err() || failed {
                    break;
                }
            }
        });
        let stream =
            futures::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|item| (item, rx)) },
            );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        super::leader::require_leader(&request, &self.server)?;
        let r = request.into_inner();
        if !self.server.is_leader() && self.server.leader() != 0 {
            // The leader's clock is the one that counts down.
            let mut resp = self.forward.time_to_live(r).await?;
            resp.header = convert::current_header(&self.server);
            return Ok(Response::new(resp));
        }
        Ok(Response::new(time_to_live(&self.server, convert::current_header(&self.server), &r)))
    }

    async fn lease_leases(
        &self,
        _: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        let leases = self.server.lease_ids().into_iter().map(|id| pb::LeaseStatus { id }).collect();
        Ok(Response::new(pb::LeaseLeasesResponse {
            header: convert::current_header(&self.server),
            leases,
        }))
    }
}

/// Answers a TimeToLive from this member's lessor.
pub(in crate::grpc) fn time_to_live(
    server: &Server,
    header: Option<pb::ResponseHeader>,
    r: &pb::LeaseTimeToLiveRequest,
) -> pb::LeaseTimeToLiveResponse {
    match server.lease_time_to_live(r.id) {
        Some(t) => pb::LeaseTimeToLiveResponse {
            header,
            id: r.id,
            ttl: t.remaining,
            granted_ttl: t.granted,
            keys: if r.keys { t.keys } else { Vec::new() },
        },
        // etcd answers an unknown lease with TTL -1, not an error.
        None => pb::LeaseTimeToLiveResponse { header, id: r.id, ttl: -1, ..Default::default() },
    }
}
