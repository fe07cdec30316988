//! etcd's `Auth` service (api/v3rpc/auth.go): every call goes to the server, which
//! replicates it through raft (reads included, as etcd does) and checks the caller at
//! apply; this file only converts messages and maps errors.

use std::sync::Arc;

use cairn_proto::etcdserverpb::{self as pb, auth_server::Auth};
use tonic::{Request, Response, Status};

use super::{convert, status};
use crate::server::Server;

/// The Auth service over one server.
#[derive(Debug, Clone)]
pub struct AuthService {
    server: Arc<Server>,
}

impl AuthService {
    /// Creates the service.
    pub fn new(server: Arc<Server>) -> Self {
        Self { server }
    }

    fn header(&self) -> Option<pb::ResponseHeader> {
        convert::current_header(&self.server)
    }
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(
        &self,
        _: Request<pb::AuthEnableRequest>,
    ) -> Reply<pb::AuthEnableResponse> {
        self.server.auth_enable().await.map_err(status::from_server)?;
        Ok(Response::new(pb::AuthEnableResponse { header: self.header() }))
    }

    async fn auth_disable(
        &self,
        _: Request<pb::AuthDisableRequest>,
    ) -> Reply<pb::AuthDisableResponse> {
        self.server.auth_disable().await.map_err(status::from_server)?;
        Ok(Response::new(pb::AuthDisableResponse { header: self.header() }))
    }

    async fn auth_status(
        &self,
        _: Request<pb::AuthStatusRequest>,
    ) -> Reply<pb::AuthStatusResponse> {
        let (enabled, auth_revision) =
            self.server.auth_status().await.map_err(status::from_server)?;
        Ok(Response::new(pb::AuthStatusResponse { header: self.header(), enabled, auth_revision }))
    }

    async fn authenticate(
        &self,
        request: Request<pb::AuthenticateRequest>,
    ) -> Reply<pb::AuthenticateResponse> {
        let r = request.into_inner();
        let token =
            self.server.authenticate(r.name, r.password).await.map_err(status::from_server)?;
        Ok(Response::new(pb::AuthenticateResponse { header: self.header(), token }))
    }

    async fn user_add(
        &self,
        request: Request<pb::AuthUserAddRequest>,
    ) -> Reply<pb::AuthUserAddResponse> {
        self.server.user_add(request.into_inner()).await.map_err(status::from_server)?;
        Ok(Response::new(pb::AuthUserAddResponse { header: self.header() }))
    }

    async fn user_get(
        &self,
        request: Request<pb::AuthUserGetRequest>,
    ) -> Reply<pb::AuthUserGetResponse> {
        let roles =
            self.server.user_get(request.into_inner().name).await.map_err(status::from_server)?;
        Ok(Response::new(pb::AuthUserGetResponse { header: self.header(), roles }))
    }

    async fn user_list(
        &self,
        _: Request<pb::AuthUserListRequest>,
    ) -> Reply<pb::AuthUserListResponse> {
        let users = self.server.user_list().await.map_err(status::from_server)?;
        Ok(Response::new(pb::AuthUserListResponse { header: self.header(), users }))
    }

    async fn user_delete(
        &self,
        request: Request<pb::AuthUserDeleteRequest>,
    ) -> Reply<pb::AuthUserDeleteResponse> {
        self.server.user_delete(request.into_inner().name).await.map_err(status::from_server)?;
        Ok(Response::new(pb::AuthUserDeleteResponse { header: self.header() }))
    }

    async fn user_change_password(
        &self,
        request: Request<pb::AuthUserChangePasswordRequest>,
    ) -> Reply<pb::AuthUserChangePasswordResponse> {
        self.server
            .user_change_password(request.into_inner())
            .await
            .map_err(status::from_server)?;
        Ok(Response::new(pb::AuthUserChangePasswordResponse { header: self.header() }))
    }

    async fn user_grant_role(
        &self,
        request: Request<pb::AuthUserGrantRoleRequest>,
    ) -> Reply<pb::AuthUserGrantRoleResponse> {
        self.server.user_grant_role(request.into_inner()).await.map_err(status::from_server)?;
        Ok(Response::new(pb::AuthUserGrantRoleResponse { header: self.header() }))
    }

    async fn user_revoke_role(
        &self,
        request: Request<pb::AuthUserRevokeRoleRequest>,
    ) -> Reply<pb::AuthUserRevokeRoleResponse> {
        self.server.user_revoke_role(request.into_inner()).await.map_err(status::from_server)?;
        Ok(Response::new(pb::AuthUserRevokeRoleResponse { header: self.header() }))
    }

    async fn role_add(
        &self,
        request: Request<pb::AuthRoleAddRequest>,
    ) -> Reply<pb::AuthRoleAddResponse> {
        self.server.role_add(request.into_inner().name).await.map_err(status::from_server)?;
        Ok(Response::new(pb::AuthRoleAddResponse { header: self.header() }))
    }

    async fn role_get(
        &self,
        request: Request<pb::AuthRoleGetRequest>,
    ) -> Reply<pb::AuthRoleGetResponse> {
        let perm =
            self.server.role_get(request.into_inner().role).await.map_err(status::from_server)?;
        Ok(Response::new(pb::AuthRoleGetResponse { header: self.header(), perm }))
    }

    async fn role_list(
        &self,
        _: Request<pb::AuthRoleListRequest>,
    ) -> Reply<pb::AuthRoleListResponse> {
        let roles = self.server.role_list().await.map_err(status::from_server)?;
        Ok(Response::new(pb::AuthRoleListResponse { header: self.header(), roles }))
    }

    async fn role_delete(
        &self,
        request: Request<pb::AuthRoleDeleteRequest>,
    ) -> Reply<pb::AuthRoleDeleteResponse> {
        self.server.role_delete(request.into_inner().role).await.map_err(status::from_server)?;
        Ok(Response::new(pb::AuthRoleDeleteResponse { header: self.header() }))
    }

    async fn role_grant_permission(
        &self,
        request: Request<pb::AuthRoleGrantPermissionRequest>,
    ) -> Reply<pb::AuthRoleGrantPermissionResponse> {
        self.server
            .role_grant_permission(request.into_inner())
            .await
            .map_err(status::from_server)?;
        Ok(Response::new(pb::AuthRoleGrantPermissionResponse { header: self.header() }))
    }

    async fn role_revoke_permission(
        &self,
        request: Request<pb::AuthRoleRevokePermissionRequest>,
    ) -> Reply<pb::AuthRoleRevokePermissionResponse> {
        self.server
            .role_revoke_permission(request.into_inner())
            .await
            .map_err(status::from_server)?;
        Ok(Response::new(pb::AuthRoleRevokePermissionResponse { header: self.header() }))
    }
}
