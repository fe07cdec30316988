//! Leader forwarding: a follower's lease renewals and TTL queries go to the leader's peer
//! service, because only the leader's clock counts a lease down.

use std::sync::{Arc, Mutex};

use cairn_proto::etcdserverpb as pb;
use cairn_proto::internal::peer_client::PeerClient;
use tonic::Status;
use tonic::transport::Channel;

use super::{channel, client};
use crate::grpc::status;
use crate::server::Server;

/// Forwards lease calls to the leader's peer service.
#[derive(Debug, Clone)]
pub(in crate::grpc) struct LeaderForward {
    server: Arc<Server>,
    /// The channel to the last leader dialed, reused while it leads: a keep-alive stream
    /// renews every few seconds and must not open a connection each time.
    cached: Arc<Mutex<Option<(String, Channel)>>>,
}

impl LeaderForward {
    pub(in crate::grpc) fn new(server: Arc<Server>) -> Self {
        Self { server, cached: Arc::default() }
    }

    fn leader_client(&self) -> Result<PeerClient<Channel>, Status> {
        let leader = self.server.leader();
        if leader == 0 {
            return Err(status::from_server(crate::server::Error::NoLeader));
        }
        let url = self
            .server
            .members()
            .into_iter()
            .find(|m| m.id == leader)
            .and_then(|m| m.peer_urls.into_iter().next())
            .ok_or_else(|| status::from_server(crate::server::Error::NoLeader))?;
        let mut cached = self.cached.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((cached_url, ch)) = cached.as_ref()
            && *cached_url == url
        {
            return Ok(client(ch.clone()));
        }
        let ch =
            channel(&url).ok_or_else(|| status::from_server(crate::server::Error::NoLeader))?;
        *cached = Some((url, ch.clone()));
        Ok(client(ch))
    }

    /// Renews lease `id` on the leader.
    pub(in crate::grpc) async fn renew(&self, id: i64) -> Result<i64, Status> {
        let mut c = self.leader_client()?;
        Ok(c.lease_renew(pb::LeaseKeepAliveRequest { id }).await?.into_inner().ttl)
    }

    /// Asks the leader for lease `r.id`'s time to live.
    pub(in crate::grpc) async fn time_to_live(
        &self,
        r: pb::LeaseTimeToLiveRequest,
    ) -> Result<pb::LeaseTimeToLiveResponse, Status> {
        let mut c = self.leader_client()?;
        Ok(c.lease_time_to_live(r).await?.into_inner())
    }
}
