//! gRPC's standard health service (`grpc.health.v1.Health`), which etcd registers on its
//! client port beside its own services (and kine does too), so gRPC probes (Kubernetes'
//! `grpc:` probe, Envoy, `grpc-health-probe`) work against Cairn unchanged.
//!
//! As in etcd, only the server as a whole (`service: ""`) is known: it is SERVING until the
//! member stops on a fatal failure (`raft::Fatal`), NOT_SERVING after. Any other name is
//! NOT_FOUND "unknown service" for Check and SERVICE_UNKNOWN for Watch, as grpc-go's health
//! server answers. Leader loss does not flip it: etcd's does not either, and a member
//! without a leader still serves serializable reads and watches.

use std::pin::Pin;
use std::sync::Arc;

use cairn_proto::grpc::health::v1::{
    self as pb, health_check_response::ServingStatus, health_server::Health,
};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::server::Server;

/// The health service of one member.
#[derive(Clone)]
pub struct HealthService {
    server: Arc<Server>,
}

impl std::fmt::Debug for HealthService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthService").finish_non_exhaustive()
    }
}

impl HealthService {
    /// Creates the service for `server`.
    pub fn new(server: Arc<Server>) -> Self {
        Self { server }
    }

    fn status(&self) -> ServingStatus {
        if self.server.failure().is_some() {
            ServingStatus::NotServing
        } else {
            ServingStatus::Serving
        }
    }
}

fn response(status: ServingStatus) -> pb::HealthCheckResponse {
    pb::HealthCheckResponse { status: status.into() }
}

/// The response stream of Watch.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<pb::HealthCheckRequest>,
    ) -> Result<Response<pb::HealthCheckResponse>, Status> {
        if !request.get_ref().service.is_empty() {
            return Err(Status::not_found("unknown service"));
        }
        Ok(Response::new(response(self.status())))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let known = request.get_ref().service.is_empty();
        let first = if known { self.status() } else { ServingStatus::ServiceUnknown };
        // The current status, then NOT_SERVING when a serving member fails (the latch never
        // clears, so that is the last change); the stream stays open until the client goes.
        let stopped = (first == ServingStatus::Serving).then(|| self.server.stopped());
        let later = futures::stream::iter(stopped).then(|stopped| async move {
            stopped.await;
            Ok(response(ServingStatus::NotServing))
        });
        let stream = futures::stream::iter([Ok(response(first))])
            .chain(later)
            .chain(futures::stream::pending());
        Ok(Response::new(Box::pin(stream)))
    }
}
