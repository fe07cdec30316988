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
}

impl LeaseService {
    /// Creates the service.
    pub fn new(server: Arc<Server>) -> Self {
        Self { server }
    }

    fn header(&self) -> Option<pb::ResponseHeader> {
        convert::header(self.server.header(), self.server.kv().current_revision())
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
        let r = request.into_inner();
        let (id, ttl) = self.server.lease_grant(r.id, r.ttl).await.map_err(status::from_server)?;
        Ok(Response::new(pb::LeaseGrantResponse {
            header: self.header(),
            id,
            ttl,
            error: String::new(),
        }))
    }

    async fn lease_revoke(
        &self,
        request: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        self.server.lease_revoke(request.into_inner().id).await.map_err(status::from_server)?;
        Ok(Response::new(pb::LeaseRevokeResponse { header: self.header() }))
    }

    type LeaseKeepAliveStream =
        Pin<Box<dyn Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send + 'static>>;

    /// Renews leases as the client asks, one response per request in order. An unknown or
    /// expired lease answers TTL 0 rather than an error, as etcd does.
    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(KEEPALIVE_BUFFER);
        let svc = self.clone();
        tokio::spawn(async move {
            while let Some(req) = inbound.next().await {
                let Ok(req) = req else { break };
                let resp = match svc.server.lease_renew(req.id).await {
                    Ok(ttl) => {
                        Ok(pb::LeaseKeepAliveResponse { header: svc.header(), id: req.id, ttl })
                    }
                    Err(e) => Err(status::from_server(e)),
                };
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
        let r = request.into_inner();
        let resp = match self.server.lease_time_to_live(r.id) {
            Some(t) => pb::LeaseTimeToLiveResponse {
                header: self.header(),
                id: r.id,
                ttl: t.remaining,
                granted_ttl: t.granted,
                keys: if r.keys { t.keys } else { Vec::new() },
            },
            // etcd answers an unknown lease with TTL -1, not an error.
            None => pb::LeaseTimeToLiveResponse {
                header: self.header(),
                id: r.id,
                ttl: -1,
                ..Default::default()
            },
        };
        Ok(Response::new(resp))
    }

    async fn lease_leases(
        &self,
        _: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        let leases = self.server.lease_ids().into_iter().map(|id| pb::LeaseStatus { id }).collect();
        Ok(Response::new(pb::LeaseLeasesResponse { header: self.header(), leases }))
    }
}
