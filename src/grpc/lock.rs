//! etcd's `v3lockpb.Lock` service: a thin shell over the server's lock recipe.

use std::sync::Arc;

use cairn_proto::etcdserverpb as pb;
use cairn_proto::v3lockpb::{self as lockpb, lock_server::Lock};
use tonic::{Request, Response, Status};

use super::{convert, status, validate};
use crate::server::Server;

/// The Lock service over one server.
#[derive(Debug, Clone)]
pub struct LockService {
    server: Arc<Server>,
}

impl LockService {
    /// Creates the service.
    pub fn new(server: Arc<Server>) -> Self {
        Self { server }
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(
        &self,
        request: Request<lockpb::LockRequest>,
    ) -> Result<Response<lockpb::LockResponse>, Status> {
        super::leader::require_leader(&request, &self.server)?;
        let r = request.into_inner();
        let locked = self.server.lock(&r.name, r.lease).await.map_err(status::from_concurrency)?;
        Ok(Response::new(lockpb::LockResponse {
            header: convert::header(self.server.header(), locked.revision),
            key: locked.key,
        }))
    }

    async fn unlock(
        &self,
        request: Request<lockpb::UnlockRequest>,
    ) -> Result<Response<lockpb::UnlockResponse>, Status> {
        super::leader::require_leader(&request, &self.server)?;
        // etcd's Unlock is a plain delete of the key.
        let del = pb::DeleteRangeRequest { key: request.into_inner().key, ..Default::default() };
        validate::check_delete(&del).map_err(|s| Status::unknown(s.message()))?;
        let res = self.server.delete_range(del).await.map_err(status::from_concurrency)?;
        Ok(Response::new(lockpb::UnlockResponse {
            header: convert::header(self.server.header(), res.revision),
        }))
    }
}
