//! etcd's gateway paths and the in-process calls behind them.
//!
//! [`Gateway::new`] registers every path of etcd's gateway (ETCD-COMPAT.md §1.12) answering
//! `Unimplemented` ("unknown service ...", as grpc-go answers for a service that is not
//! registered). Each service method (`kv`, `watch`, `lease`, `cluster`, `maintenance`) takes
//! any impl of the tonic-generated trait and claims that service's paths, so wiring a new
//! service is one line where the gateway is composed (`gateway::router`).
//!
//! Calls go straight to the trait impl, the same code gRPC clients reach, and are counted in
//! the `grpc_server_*` metrics as etcd counts its gateway's loopback gRPC calls.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::routing::post;
use cairn_proto::etcdserverpb::{
    auth_server::Auth, cluster_server::Cluster, kv_server::Kv, lease_server::Lease,
    maintenance_server::Maintenance, watch_server::Watch,
};
use cairn_proto::v3electionpb::election_server::Election;
use cairn_proto::v3lockpb::lock_server::Lock;
use futures::Stream;
use futures::future::BoxFuture;
use http::{HeaderMap, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::Status;

use super::json::{self, Limits};
use super::stream;
use crate::metrics::{self, GrpcType};

/// A gRPC method as the metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Method {
    /// The fully qualified service, e.g. "etcdserverpb.KV".
    pub service: &'static str,
    /// The method, e.g. "Range".
    pub name: &'static str,
    /// Its kind.
    pub kind: GrpcType,
}

/// Records one gateway call in the `grpc_server_*` metrics; dropping it unfinished counts
/// the call as canceled (the client went away).
pub(super) struct Call {
    open: Option<(Method, Instant)>,
}

impl Call {
    /// Counts the start of a call to `method`.
    pub(super) fn start(method: Method) -> Call {
        match metrics::get() {
            Some(m) => {
                m.grpc_started(method.kind, method.service, method.name);
                Call { open: Some((method, Instant::now())) }
            }
            None => Call { open: None },
        }
    }

    /// Counts the end of the call with `code`.
    pub(super) fn finish(mut self, code: tonic::Code) {
        self.record(code);
    }

    fn record(&mut self, code: tonic::Code) {
        if let (Some((method, start)), Some(m)) = (self.open.take(), metrics::get()) {
            m.grpc_handled(method.kind, method.service, method.name, code as i32, start.elapsed());
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.record(tonic::Code::Cancelled);
    }
}

/// Builds the tonic request for `msg`, carrying the metadata etcd's gateway forwards: the
/// `Authorization` header becomes the `authorization` metadata etcd's auth reads a token from.
pub(super) fn grpc_request<T>(headers: &HeaderMap, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(token) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| tonic::metadata::MetadataValue::try_from(v).ok())
    {
        req.metadata_mut().insert("authorization", token);
    }
    req
}

/// Serves one HTTP request.
type Handler = Arc<dyn Fn(http::Request<Body>) -> BoxFuture<'static, Response<Body>> + Send + Sync>;

const KV: &str = "etcdserverpb.KV";
const WATCH: &str = "etcdserverpb.Watch";
const LEASE: &str = "etcdserverpb.Lease";
const CLUSTER: &str = "etcdserverpb.Cluster";
const MAINTENANCE: &str = "etcdserverpb.Maintenance";
const AUTH: &str = "etcdserverpb.Auth";
const LOCK: &str = "v3lockpb.Lock";
const ELECTION: &str = "v3electionpb.Election";

/// Every path of etcd's gateway below `/v3`, with the service and method behind it.
const PATHS: &[(&str, &str, &str)] = &[
    ("/kv/range", KV, "Range"),
    ("/kv/put", KV, "Put"),
    ("/kv/deleterange", KV, "DeleteRange"),
    ("/kv/txn", KV, "Txn"),
    ("/kv/compaction", KV, "Compact"),
    ("/watch", WATCH, "Watch"),
    ("/lease/grant", LEASE, "LeaseGrant"),
    ("/lease/revoke", LEASE, "LeaseRevoke"),
    ("/kv/lease/revoke", LEASE, "LeaseRevoke"),
    ("/lease/keepalive", LEASE, "LeaseKeepAlive"),
    ("/lease/timetolive", LEASE, "LeaseTimeToLive"),
    ("/kv/lease/timetolive", LEASE, "LeaseTimeToLive"),
    ("/lease/leases", LEASE, "LeaseLeases"),
    ("/kv/lease/leases", LEASE, "LeaseLeases"),
    ("/cluster/member/add", CLUSTER, "MemberAdd"),
    ("/cluster/member/remove", CLUSTER, "MemberRemove"),
    ("/cluster/member/update", CLUSTER, "MemberUpdate"),
    ("/cluster/member/list", CLUSTER, "MemberList"),
    ("/cluster/member/promote", CLUSTER, "MemberPromote"),
    ("/maintenance/alarm", MAINTENANCE, "Alarm"),
    ("/maintenance/status", MAINTENANCE, "Status"),
    ("/maintenance/defragment", MAINTENANCE, "Defragment"),
    ("/maintenance/hash", MAINTENANCE, "Hash"),
    ("/maintenance/hashkv", MAINTENANCE, "HashKV"),
    ("/maintenance/snapshot", MAINTENANCE, "Snapshot"),
    ("/maintenance/transfer-leadership", MAINTENANCE, "MoveLeader"),
    ("/maintenance/downgrade", MAINTENANCE, "Downgrade"),
    ("/auth/enable", AUTH, "AuthEnable"),
    ("/auth/disable", AUTH, "AuthDisable"),
    ("/auth/status", AUTH, "AuthStatus"),
    ("/auth/authenticate", AUTH, "Authenticate"),
    ("/auth/user/add", AUTH, "UserAdd"),
    ("/auth/user/get", AUTH, "UserGet"),
    ("/auth/user/list", AUTH, "UserList"),
    ("/auth/user/delete", AUTH, "UserDelete"),
    ("/auth/user/changepw", AUTH, "UserChangePassword"),
    ("/auth/user/grant", AUTH, "UserGrantRole"),
    ("/auth/user/revoke", AUTH, "UserRevokeRole"),
    ("/auth/role/add", AUTH, "RoleAdd"),
    ("/auth/role/get", AUTH, "RoleGet"),
    ("/auth/role/list", AUTH, "RoleList"),
    ("/auth/role/delete", AUTH, "RoleDelete"),
    ("/auth/role/grant", AUTH, "RoleGrantPermission"),
    ("/auth/role/revoke", AUTH, "RoleRevokePermission"),
    ("/lock/lock", LOCK, "Lock"),
    ("/lock/unlock", LOCK, "Unlock"),
    ("/election/campaign", ELECTION, "Campaign"),
    ("/election/proclaim", ELECTION, "Proclaim"),
    ("/election/leader", ELECTION, "Leader"),
    ("/election/observe", ELECTION, "Observe"),
    ("/election/resign", ELECTION, "Resign"),
];

/// The prefixes etcd's gateway serves: `/v3beta` is rewritten to `/v3` (etcd 3.5 dropped
/// `/v3alpha`).
const PREFIXES: &[&str] = &["/v3", "/v3beta"];

/// The JSON gateway's routing table, filled service by service.
pub struct Gateway {
    limits: Limits,
    handlers: BTreeMap<&'static str, Handler>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("limits", &self.limits).finish_non_exhaustive()
    }
}

fn method(service: &'static str, name: &'static str) -> Method {
    Method { service, name, kind: metrics::grpc_type(service, name).unwrap_or(GrpcType::Unary) }
}

impl Gateway {
    /// A gateway on which every etcd path answers `Unimplemented` until a service claims it.
    pub fn new(limits: Limits) -> Gateway {
        let mut handlers = BTreeMap::new();
        for &(path, service, _) in PATHS {
            let handler: Handler = Arc::new(move |_req| {
                Box::pin(async move {
                    json::error_response(&Status::unimplemented(format!(
                        "unknown service {service}"
                    )))
                })
            });
            handlers.insert(path, handler);
        }
        Gateway { limits, handlers }
    }

    /// Routes `path` to a unary call of `svc` through `call`.
    fn unary<S, Req, Resp, F, Fut>(&mut self, path: &'static str, svc: &Arc<S>, call: F)
    where
        S: Send + Sync + 'static,
        Req: DeserializeOwned + prost::Message + Default + Send + 'static,
        Resp: Serialize + Send + 'static,
        F: Fn(Arc<S>, tonic::Request<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>> + Send + 'static,
    {
        let Some(&(_, service, name)) = PATHS.iter().find(|(p, ..)| *p == path) else { return };
        let (svc, call, limits, method) =
            (svc.clone(), Arc::new(call), self.limits, method(service, name));
        let handler: Handler = Arc::new(move |req: http::Request<Body>| {
            let (svc, call) = (svc.clone(), call.clone());
            Box::pin(async move {
                let (parts, body) = req.into_parts();
                let msg = match json::read_body(body, limits)
                    .await
                    .and_then(|bytes| json::decode::<Req>(&bytes, limits))
                {
                    Ok(msg) => msg,
                    Err(status) => return json::error_response(&status),
                };
                let recorder = Call::start(method);
                match call(svc, grpc_request(&parts.headers, msg)).await {
                    Ok(res) => {
                        recorder.finish(tonic::Code::Ok);
                        json::message_response(res.get_ref())
                    }
                    Err(status) => {
                        recorder.finish(status.code());
                        json::error_response(&status)
                    }
                }
            })
        });
        self.handlers.insert(path, handler);
    }

    /// Routes `path` to a bidirectional streaming call of `svc` through `call`.
    fn bidi<S, Req, Resp, St, F, Fut>(&mut self, path: &'static str, svc: &Arc<S>, call: F)
    where
        S: Send + Sync + 'static,
        Req: DeserializeOwned + prost::Message + Default + Send + 'static,
        Resp: Serialize + Send + 'static,
        St: Stream<Item = Result<Resp, Status>> + Send + 'static,
        F: Fn(Arc<S>, tonic::Request<tonic::Streaming<Req>>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<tonic::Response<St>, Status>> + Send + 'static,
    {
        let Some(&(_, service, name)) = PATHS.iter().find(|(p, ..)| *p == path) else { return };
        let (svc, call, limits, method) =
            (svc.clone(), Arc::new(call), self.limits, method(service, name));
        let handler: Handler = Arc::new(move |req| {
            let (svc, call) = (svc.clone(), call.clone());
            Box::pin(async move { stream::bidi(svc, call.as_ref(), method, limits, req).await })
        });
        self.handlers.insert(path, handler);
    }

    /// Routes `path` to a server-streaming call of `svc` through `call`.
    fn server_stream<S, Req, Resp, St, F, Fut>(&mut self, path: &'static str, svc: &Arc<S>, call: F)
    where
        S: Send + Sync + 'static,
        Req: DeserializeOwned + prost::Message + Default + Send + 'static,
        Resp: Serialize + Send + 'static,
        St: Stream<Item = Result<Resp, Status>> + Send + 'static,
        F: Fn(Arc<S>, tonic::Request<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<tonic::Response<St>, Status>> + Send + 'static,
    {
        let Some(&(_, service, name)) = PATHS.iter().find(|(p, ..)| *p == path) else { return };
        let (svc, call, limits, method) =
            (svc.clone(), Arc::new(call), self.limits, method(service, name));
        let handler: Handler = Arc::new(move |req| {
            let (svc, call) = (svc.clone(), call.clone());
            Box::pin(
                async move { stream::server_stream(svc, call.as_ref(), method, limits, req).await },
            )
        });
        self.handlers.insert(path, handler);
    }

    /// Serves etcd's KV paths with `svc`.
    pub fn kv<S: Kv>(mut self, svc: S) -> Self {
        let s = Arc::new(svc);
        self.unary("/kv/range", &s, |s, r| async move { s.range(r).await });
        self.unary("/kv/put", &s, |s, r| async move { s.put(r).await });
        self.unary("/kv/deleterange", &s, |s, r| async move { s.delete_range(r).await });
        self.unary("/kv/txn", &s, |s, r| async move { s.txn(r).await });
        self.unary("/kv/compaction", &s, |s, r| async move { s.compact(r).await });
        self
    }

    /// Serves `/v3/watch` with `svc`.
    pub fn watch<S: Watch>(mut self, svc: S) -> Self {
        let s = Arc::new(svc);
        self.bidi("/watch", &s, |s, r| async move { s.watch(r).await });
        self
    }

    /// Serves etcd's lease paths (and their `/v3/kv/lease/...` aliases) with `svc`.
    pub fn lease<S: Lease>(mut self, svc: S) -> Self {
        let s = Arc::new(svc);
        self.unary("/lease/grant", &s, |s, r| async move { s.lease_grant(r).await });
        for path in ["/lease/revoke", "/kv/lease/revoke"] {
            self.unary(path, &s, |s, r| async move { s.lease_revoke(r).await });
        }
        self.bidi("/lease/keepalive", &s, |s, r| async move { s.lease_keep_alive(r).await });
        for path in ["/lease/timetolive", "/kv/lease/timetolive"] {
            self.unary(path, &s, |s, r| async move { s.lease_time_to_live(r).await });
        }
        for path in ["/lease/leases", "/kv/lease/leases"] {
            self.unary(path, &s, |s, r| async move { s.lease_leases(r).await });
        }
        self
    }

    /// Serves etcd's cluster paths with `svc`.
    pub fn cluster<S: Cluster>(mut self, svc: S) -> Self {
        let s = Arc::new(svc);
        self.unary("/cluster/member/add", &s, |s, r| async move { s.member_add(r).await });
        self.unary("/cluster/member/remove", &s, |s, r| async move { s.member_remove(r).await });
        self.unary("/cluster/member/update", &s, |s, r| async move { s.member_update(r).await });
        self.unary("/cluster/member/list", &s, |s, r| async move { s.member_list(r).await });
        self.unary("/cluster/member/promote", &s, |s, r| async move { s.member_promote(r).await });
        self
    }

    /// Serves etcd's maintenance paths with `svc`.
    pub fn maintenance<S: Maintenance>(mut self, svc: S) -> Self {
        let s = Arc::new(svc);
        self.unary("/maintenance/alarm", &s, |s, r| async move { s.alarm(r).await });
        self.unary("/maintenance/status", &s, |s, r| async move { s.status(r).await });
        self.unary("/maintenance/defragment", &s, |s, r| async move { s.defragment(r).await });
        self.unary("/maintenance/hash", &s, |s, r| async move { s.hash(r).await });
        self.unary("/maintenance/hashkv", &s, |s, r| async move { s.hash_kv(r).await });
        self.server_stream("/maintenance/snapshot", &s, |s, r| async move { s.snapshot(r).await });
        self.unary(
            "/maintenance/transfer-leadership",
            &s,
            |s, r| async move { s.move_leader(r).await },
        );
        self.unary("/maintenance/downgrade", &s, |s, r| async move { s.downgrade(r).await });
        self
    }

    /// Serves etcd's auth paths with `svc`.
    pub fn auth<S: Auth>(mut self, svc: S) -> Self {
        let s = Arc::new(svc);
        self.unary("/auth/enable", &s, |s, r| async move { s.auth_enable(r).await });
        self.unary("/auth/disable", &s, |s, r| async move { s.auth_disable(r).await });
        self.unary("/auth/status", &s, |s, r| async move { s.auth_status(r).await });
        self.unary("/auth/authenticate", &s, |s, r| async move { s.authenticate(r).await });
        self.unary("/auth/user/add", &s, |s, r| async move { s.user_add(r).await });
        self.unary("/auth/user/get", &s, |s, r| async move { s.user_get(r).await });
        self.unary("/auth/user/list", &s, |s, r| async move { s.user_list(r).await });
        self.unary("/auth/user/delete", &s, |s, r| async move { s.user_delete(r).await });
        self.unary(
            "/auth/user/changepw",
            &s,
            |s, r| async move { s.user_change_password(r).await },
        );
        self.unary("/auth/user/grant", &s, |s, r| async move { s.user_grant_role(r).await });
        self.unary("/auth/user/revoke", &s, |s, r| async move { s.user_revoke_role(r).await });
        self.unary("/auth/role/add", &s, |s, r| async move { s.role_add(r).await });
        self.unary("/auth/role/get", &s, |s, r| async move { s.role_get(r).await });
        self.unary("/auth/role/list", &s, |s, r| async move { s.role_list(r).await });
        self.unary("/auth/role/delete", &s, |s, r| async move { s.role_delete(r).await });
        self.unary("/auth/role/grant", &s, |s, r| async move { s.role_grant_permission(r).await });
        self.unary(
            "/auth/role/revoke",
            &s,
            |s, r| async move { s.role_revoke_permission(r).await },
        );
        self
    }

    /// Serves etcd's lock paths with `svc`.
    pub fn lock<S: Lock>(mut self, svc: S) -> Self {
        let s = Arc::new(svc);
        self.unary("/lock/lock", &s, |s, r| async move { s.lock(r).await });
        self.unary("/lock/unlock", &s, |s, r| async move { s.unlock(r).await });
        self
    }

    /// Serves etcd's election paths with `svc` (`/v3/election/observe` streams).
    pub fn election<S: Election>(mut self, svc: S) -> Self {
        let s = Arc::new(svc);
        self.unary("/election/campaign", &s, |s, r| async move { s.campaign(r).await });
        self.unary("/election/proclaim", &s, |s, r| async move { s.proclaim(r).await });
        self.unary("/election/leader", &s, |s, r| async move { s.leader(r).await });
        self.server_stream("/election/observe", &s, |s, r| async move { s.observe(r).await });
        self.unary("/election/resign", &s, |s, r| async move { s.resign(r).await });
        self
    }

    /// The axum router serving every path under each of etcd's prefixes (POST only; other
    /// methods get 405 as in etcd).
    pub fn into_router(self) -> axum::Router {
        let mut router = axum::Router::new();
        for (path, handler) in self.handlers {
            let label = format!("/v3{path}");
            for prefix in PREFIXES {
                let (handler, label) = (handler.clone(), label.clone());
                router = router.route(
                    &format!("{prefix}{path}"),
                    post(move |req: axum::extract::Request| async move {
                        let res = handler(req).await;
                        super::count_http(&label, res.status());
                        res
                    }),
                );
            }
        }
        router
    }
}
