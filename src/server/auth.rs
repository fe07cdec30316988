//! Auth at the server: who the caller is, the read-side permission checks, and the Auth
//! RPCs (etcd's v3_server.go auth half).
//!
//! # The caller
//!
//! The edge wraps every client request in [`with_caller`]: the token from the request's
//! `token` metadata (gRPC) or `Authorization` header (gateway), and the CN of a verified
//! client certificate. The server reads it where it needs it, as etcd reads its context:
//! [`Server::propose`](super::Server::propose) resolves it to a user and the current auth
//! revision and records both in the replicated request, for the auth wrapper applier to
//! check at apply; reads (Range, Watch creation) and the maintenance and membership calls
//! that need the `root` role are checked here when served. Work the member does on its own
//! (lease expiry, checkpoints, alarms, publishing itself) runs outside any caller scope
//! and is never refused.
//!
//! # Tokens
//!
//! With `--auth-token jwt,...` a token is a signed JWT naming the user and the auth
//! revision it was issued at; any member verifies it with the public key. A simple token names the raft index of the `Authenticate` entry that assigned it; a
//! member that has not applied that index yet waits for it (up to the request timeout), so
//! a token issued by one member works on every other. With `--client-cert-auth`, a request
//! without a token is the user its certificate's CN names, as in etcd.

use std::future::Future;

use cairn_proto::etcdserverpb as pb;
use cairn_proto::internal::{AuthHeader, Authenticate, internal_request::Op};

use super::{Error, Server};
use crate::apply::Response;
use crate::auth::{self, Access, AuthInfo};

/// The credentials a client request arrived with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// The auth token (`token` metadata or `Authorization` header).
    pub token: Option<String>,
    /// The CN of the verified client certificate, if any.
    pub common_name: Option<String>,
}

tokio::task_local! {
    static CALLER: Caller;
}

/// Runs `fut` as a request of `caller` (the edge wraps every client request in this).
pub async fn with_caller<F: Future>(caller: Caller, fut: F) -> F::Output {
    CALLER.scope(caller, fut).await
}

/// Runs `f` as a request of `caller`, for the synchronous part of a service call.
pub fn with_caller_sync<R>(caller: Caller, f: impl FnOnce() -> R) -> R {
    CALLER.sync_scope(caller, f)
}

/// The credentials of the request being served; `None` outside any client request (the
/// member's own work), which auth never refuses.
pub fn current_caller() -> Option<Caller> {
    CALLER.try_with(Clone::clone).ok()
}

/// Auth revision tries of one Authenticate: the password is checked before the token is
/// assigned through raft, and a change in between makes etcd check again.
const AUTHENTICATE_TRIES: usize = 3;

/// An apply result of the wrong kind: a bug, reported rather than panicked on.
fn mismatch() -> Error {
    Error::Internal("unexpected apply result".into())
}

impl Server {
    /// The user and auth revision `caller` stands for; nobody (empty) without a token or
    /// certificate.
    ///
    /// # Errors
    /// [`auth::Error::InvalidToken`] for an unknown, expired or malformed token.
    pub async fn auth_info(&self, caller: &Caller) -> Result<AuthInfo, Error> {
        if let Some(token) = &caller.token {
            if let Some(jwt) = self.auth.jwt() {
                return Ok(jwt.verify(token)?);
            }
            let index = auth::token::token_index(token).ok_or(auth::Error::InvalidToken)?;
            // A token assigned by an entry this member has not applied yet: wait for it.
            let mut applied = self.applied.clone();
            let waited =
                tokio::time::timeout(self.request_timeout, applied.wait_for(|a| *a >= index));
            if !matches!(waited.await, Ok(Ok(_))) {
                return Err(auth::Error::InvalidToken.into());
            }
            return Ok(self.auth.info_from_token(token)?);
        }
        if let Some(cn) = &caller.common_name
            && self.cfg.client_tls.as_ref().is_some_and(|t| t.client_cert_auth)
        {
            return Ok(self.auth.info_from_cert(cn));
        }
        Ok(AuthInfo::default())
    }

    /// The auth header of a proposal made now: the current caller's, or none for the
    /// member's own work.
    pub(super) async fn auth_header(&self) -> Result<Option<AuthHeader>, Error> {
        let Some(caller) = current_caller() else { return Ok(None) };
        let info = self.auth_info(&caller).await?;
        Ok(Some(AuthHeader { username: info.username, revision: info.revision }))
    }

    /// Refuses the current caller unless it may read `[key, range_end)` (Range, a
    /// read-only check when serving; Watch creation).
    ///
    /// # Errors
    /// [`Error::Auth`] with etcd's refusal.
    pub async fn check_read(&self, key: &[u8], range_end: &[u8]) -> Result<(), Error> {
        let Some(info) = self.caller_to_check().await? else { return Ok(()) };
        Ok(self.auth.is_permitted(&info, Access::Read, key, range_end)?)
    }

    /// Refuses the current caller unless it holds the `root` role (snapshots, defrag,
    /// hashes, membership changes).
    ///
    /// # Errors
    /// [`Error::Auth`] with etcd's refusal.
    pub async fn check_admin(&self) -> Result<(), Error> {
        let Some(info) = self.caller_to_check().await? else { return Ok(()) };
        Ok(self.auth.is_admin_permitted(&info)?)
    }

    /// Who the current caller is, when there is something to check: none for the member's
    /// own work, or without a token while auth is off. A token is resolved even with auth
    /// off, as etcd does (a stale one is refused).
    async fn caller_to_check(&self) -> Result<Option<AuthInfo>, Error> {
        let Some(caller) = current_caller() else { return Ok(None) };
        if caller.token.is_none() && !self.auth.is_enabled() {
            return Ok(None);
        }
        Ok(Some(self.auth_info(&caller).await?))
    }

    async fn auth_op(&self, op: Op) -> Result<(), Error> {
        match self.propose(op).await? {
            Response::AuthDone => Ok(()),
            _ => Err(mismatch()),
        }
    }

    async fn names(&self, op: Op) -> Result<Vec<String>, Error> {
        match self.propose(op).await? {
            Response::Names(names) => Ok(names),
            _ => Err(mismatch()),
        }
    }

    /// Enables auth.
    ///
    /// # Errors
    /// etcd's refusals ([`auth::Error::RootUserNotExist`], ...) or the proposal's errors.
    pub async fn auth_enable(&self) -> Result<(), Error> {
        self.auth_op(Op::AuthEnable(pb::AuthEnableRequest {})).await
    }

    /// Disables auth.
    ///
    /// # Errors
    /// The caller is not root, or the proposal's errors.
    pub async fn auth_disable(&self) -> Result<(), Error> {
        self.auth_op(Op::AuthDisable(pb::AuthDisableRequest {})).await
    }

    /// Whether auth is enabled, and the auth revision.
    ///
    /// # Errors
    /// The caller is not root, or the proposal's errors.
    pub async fn auth_status(&self) -> Result<(bool, u64), Error> {
        match self.propose(Op::AuthStatus(pb::AuthStatusRequest {})).await? {
            Response::AuthStatus { enabled, revision } => Ok((enabled, revision)),
            _ => Err(mismatch()),
        }
    }

    /// Checks `name`'s password and assigns a simple token on every member.
    ///
    /// # Errors
    /// [`auth::Error::NotEnabled`], [`auth::Error::AuthFailed`] (counted in
    /// `cairn_server_auth_failures_total`), or the proposal's errors.
    pub async fn authenticate(&self, name: String, mut password: String) -> Result<String, Error> {
        for _ in 0..AUTHENTICATE_TRIES {
            let (store, n, p) = (self.auth.clone(), name.clone(), password);
            let checked = tokio::task::spawn_blocking(move || (store.check_password(&n, &p), p))
                .await
                .map_err(|e| Error::Internal(e.to_string()))?;
            let (checked, p) = checked;
            password = p;
            let checked = match checked {
                Err(e @ auth::Error::AuthFailed) => {
                    if let Some(m) = crate::metrics::get() {
                        m.server.auth_failures_total.inc();
                    }
                    tracing::info!(user = %name, "authentication failed");
                    return Err(e.into());
                }
                other => other?,
            };
            let prefix = match self.auth.jwt() {
                Some(_) => String::new(),
                None => auth::token::new_prefix().map_err(|e| Error::Internal(e.to_string()))?,
            };
            let op = Op::Authenticate(Authenticate { name: name.clone(), simple_token: prefix });
            let mut token = match self.propose(op).await? {
                Response::AuthToken(token) => token,
                _ => return Err(mismatch()),
            };
            if let Some(jwt) = self.auth.jwt() {
                token = jwt.sign(&name, self.auth.revision())?;
            }
            if checked >= self.auth.revision() {
                return Ok(token);
            }
            tracing::info!(user = %name, "auth revision changed while authenticating; checking again");
        }
        Err(auth::Error::AuthFailed.into())
    }

    /// Hashes `password` with `--bcrypt-cost` off the async workers.
    async fn hash_password(&self, password: String) -> Result<String, Error> {
        let cost = self.cfg.raw.bcrypt_cost;
        let hash = tokio::task::spawn_blocking(move || auth::hash_password(&password, cost))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        String::from_utf8(hash).map_err(|e| Error::Internal(e.to_string()))
    }

    /// Adds a user; its password is hashed here, so only the hash is replicated.
    ///
    /// # Errors
    /// etcd's refusals or the proposal's errors.
    pub async fn user_add(&self, mut r: pb::AuthUserAddRequest) -> Result<(), Error> {
        if !r.options.is_some_and(|o| o.no_password) {
            r.hashed_password = self.hash_password(std::mem::take(&mut r.password)).await?;
        }
        r.password.clear();
        self.auth_op(Op::UserAdd(r)).await
    }

    /// A user's roles.
    ///
    /// # Errors
    /// etcd's refusals or the proposal's errors.
    pub async fn user_get(&self, name: String) -> Result<Vec<String>, Error> {
        self.names(Op::UserGet(pb::AuthUserGetRequest { name })).await
    }

    /// Every user.
    ///
    /// # Errors
    /// etcd's refusals or the proposal's errors.
    pub async fn user_list(&self) -> Result<Vec<String>, Error> {
        self.names(Op::UserList(pb::AuthUserListRequest {})).await
    }

    /// Deletes a user.
    ///
    /// # Errors
    /// etcd's refusals or the proposal's errors.
    pub async fn user_delete(&self, name: String) -> Result<(), Error> {
        self.auth_op(Op::UserDelete(pb::AuthUserDeleteRequest { name })).await
    }

    /// Changes a user's password (hashed here).
    ///
    /// # Errors
    /// etcd's refusals or the proposal's errors.
    pub async fn user_change_password(
        &self,
        mut r: pb::AuthUserChangePasswordRequest,
    ) -> Result<(), Error> {
        r.hashed_password = self.hash_password(std::mem::take(&mut r.password)).await?;
        self.auth_op(Op::UserChangePassword(r)).await
    }

    /// Grants a role to a user.
    ///
    /// # Errors
    /// etcd's refusals or the proposal's errors.
    pub async fn user_grant_role(&self, r: pb::AuthUserGrantRoleRequest) -> Result<(), Error> {
        self.auth_op(Op::UserGrantRole(r)).await
    }

    /// Revokes a role from a user.
    ///
    /// # Errors
    /// etcd's refusals or the proposal's errors.
    pub async fn user_revoke_role(&self, r: pb::AuthUserRevokeRoleRequest) -> Result<(), Error> {
        self.auth_op(Op::UserRevokeRole(r)).await
    }

    /// Adds a role.
    ///
    /// # Errors
    /// etcd's refusals or the proposal's errors.
    pub async fn role_add(&self, name: String) -> Result<(), Error> {
        self.auth_op(Op::RoleAdd(pb::AuthRoleAddRequest { name })).await
    }

    /// A role's permissions.
    ///
    /// # Errors
    /// etcd's refusals or the proposal's errors.
    pub async fn role_get(
        &self,
        role: String,
    ) -> Result<Vec<cairn_proto::authpb::Permission>, Error> {
        match self.propose(Op::RoleGet(pb::AuthRoleGetRequest { role })).await? {
            Response::Permissions(perms) => Ok(perms),
            _ => Err(mismatch()),
        }
    }

    /// Every role.
    ///
    /// # Errors
    /// etcd's refusals or the proposal's errors.
    pub async fn role_list(&self) -> Result<Vec<String>, Error> {
        self.names(Op::RoleList(pb::AuthRoleListRequest {})).await
    }

    /// Deletes a role.
    ///
    /// # Errors
    /// etcd's refusals or the proposal's errors.
    pub async fn role_delete(&self, role: String) -> Result<(), Error> {
        self.auth_op(Op::RoleDelete(pb::AuthRoleDeleteRequest { role })).await
    }

    /// Grants a permission to a role.
    ///
    /// # Errors
    /// etcd's refusals or the proposal's errors.
    pub async fn role_grant_permission(
        &self,
        r: pb::AuthRoleGrantPermissionRequest,
    ) -> Result<(), Error> {
        self.auth_op(Op::RoleGrantPermission(r)).await
    }

    /// Revokes a permission from a role.
    ///
    /// # Errors
    /// etcd's refusals or the proposal's errors.
    pub async fn role_revoke_permission(
        &self,
        r: pb::AuthRoleRevokePermissionRequest,
    ) -> Result<(), Error> {
        self.auth_op(Op::RoleRevokePermission(r)).await
    }
}
