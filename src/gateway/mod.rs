//! HTTP beside gRPC on the client port: etcd's JSON gateway (`/v3/...`, [`Gateway`]) and the
//! operations endpoints (`/health`, `/livez`, `/readyz`, `/version`, `/metrics`, [`ops`]).
//!
//! The gateway translates JSON to the gRPC service impls in-process (no loopback
//! connection, unlike etcd): it knows etcd's paths and JSON rules, and nothing of the
//! server's internals. The routes are an axum router that `grpc::serve` merges with the
//! tonic services on the same listener; gRPC requests are told apart by their paths
//! (`/etcdserverpb.KV/Range`), which never collide with these.
//!
//! To serve a new service through the gateway, add its impl in [`router`] (one line, e.g.
//! `.watch(WatchService::new(server.clone()))`); its paths already exist and answer
//! `Unimplemented` until then.

mod json;
pub mod ops;
mod routes;
mod stream;

use std::sync::Arc;

use axum::body::Body;
use http::{Response, StatusCode};

pub use self::json::{Limits, http_status};
pub use self::ops::{Member, MemberProbe};
pub use self::routes::Gateway;
use crate::config::GRPC_OVERHEAD_BYTES;
use crate::grpc::{
    AuthService, ClusterService, ElectionService, KvService, LeaseService, LockService,
    MaintenanceService, WatchService,
};
use crate::metrics;
use crate::server::Server;

/// The gateway's limits for `server`'s `--max-request-bytes`.
pub fn limits(server: &Server) -> Limits {
    let max = usize::try_from(server.config().raw.max_request_bytes).unwrap_or(usize::MAX);
    Limits::for_message_limit(max.saturating_add(GRPC_OVERHEAD_BYTES))
}

/// Every HTTP route of the client port: the JSON gateway over Cairn's services and the
/// operations endpoints.
pub fn router(server: &Arc<Server>) -> axum::Router {
    Gateway::new(limits(server))
        .kv(KvService::new(server.clone()))
        .lease(LeaseService::new(server.clone()))
        .watch(WatchService::new(server.clone()))
        .cluster(ClusterService::new(server.clone()))
        .maintenance(MaintenanceService::new(server.clone()))
        .auth(AuthService::new(server.clone()))
        .lock(LockService::new(server.clone()))
        .election(ElectionService::new(server.clone()))
        .into_router()
        .merge(ops::router(Arc::new(MemberProbe::new(server.clone()))))
        .fallback(fallback)
}

/// The routes of a `--listen-metrics-urls` listener: the operations endpoints only.
pub fn metrics_router(server: &Arc<Server>) -> axum::Router {
    ops::router(Arc::new(MemberProbe::new(server.clone()))).fallback(fallback)
}

/// Answers what no route matched: a gRPC call to a service Cairn does not register gets
/// gRPC's `Unimplemented` (as tonic's own fallback answers), anything else a JSON 404.
async fn fallback(req: axum::extract::Request) -> Response<Body> {
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        let (parts, ()) = tonic::Status::unimplemented("").into_http::<()>().into_parts();
        return Response::from_parts(parts, Body::empty());
    }
    count_http("other", StatusCode::NOT_FOUND);
    json::error_response(&tonic::Status::not_found("Not Found"))
}

/// Counts one HTTP answer in `cairn_http_requests_total`.
fn count_http(route: &str, status: StatusCode) {
    if let Some(m) = metrics::get() {
        m.cairn.http_requests_total.with_label_values(&[route, status.as_str()]).inc();
    }
}

/// Serves `router` (HTTP/1.1 and HTTP/2) on `listeners` until `shutdown` resolves: the
/// `--listen-metrics-urls` listeners.
///
/// # Errors
/// When the transport fails.
pub async fn serve_http(
    router: axum::Router,
    listeners: Vec<crate::grpc::Listener>,
    tls: Option<std::sync::Arc<crate::grpc::Acceptor>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let incoming = crate::grpc::tls::incoming(listeners, tls);
    tonic::transport::Server::builder()
        .accept_http1(true)
        .add_routes(tonic::service::Routes::from(router))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

#[cfg(test)]
mod tests {
    //! The gateway's HTTP behaviour against fake service impls: the streaming paths (whose
    //! real services land later) and the error shapes.

    use std::pin::Pin;
    use std::task::Context;

    use cairn_proto::etcdserverpb::{self as pb, lease_server::Lease, watch_server::Watch};
    use futures::{Stream, StreamExt as _};
    use http_body_util::BodyExt as _;
    use tonic::{Request, Status, Streaming};
    use tower_service::Service as _;

    use super::*;

    const LIMITS: Limits = Limits { max_message_bytes: 4096, max_body_bytes: 8192 };

    type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

    /// Answers each create request with a created response and an event, then fails the
    /// stream when asked to watch key "fail".
    struct FakeWatch;

    #[tonic::async_trait]
    impl Watch for FakeWatch {
        type WatchStream = Out<pb::WatchResponse>;

        async fn watch(
            &self,
            req: Request<Streaming<pb::WatchRequest>>,
        ) -> Result<tonic::Response<Self::WatchStream>, Status> {
            let out = req.into_inner().flat_map(|r| {
                let items: Vec<Result<pb::WatchResponse, Status>> = match r {
                    Ok(pb::WatchRequest {
                        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(c)),
                    }) if c.key == b"fail" => vec![Err(Status::invalid_argument("fail"))],
                    Ok(pb::WatchRequest {
                        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(c)),
                    }) => vec![
                        Ok(pb::WatchResponse { watch_id: 1, created: true, ..Default::default() }),
                        Ok(pb::WatchResponse {
                            watch_id: 1,
                            events: vec![cairn_proto::mvccpb::Event {
                                r#type: 1,
                                kv: Some(cairn_proto::mvccpb::KeyValue {
                                    key: c.key,
                                    mod_revision: 9,
                                    ..Default::default()
                                }),
                                prev_kv: None,
                            }],
                            ..Default::default()
                        }),
                    ],
                    Ok(_) => vec![],
                    Err(e) => vec![Err(e)],
                };
                futures::stream::iter(items)
            });
            Ok(tonic::Response::new(Box::pin(out)))
        }
    }

    /// Keeps every lease alive with TTL 5; grants always fail.
    struct FakeLease;

    #[tonic::async_trait]
    impl Lease for FakeLease {
        async fn lease_grant(
            &self,
            _: Request<pb::LeaseGrantRequest>,
        ) -> Result<tonic::Response<pb::LeaseGrantResponse>, Status> {
            Err(Status::new(tonic::Code::OutOfRange, "etcdserver: too large lease TTL"))
        }
        async fn lease_revoke(
            &self,
            r: Request<pb::LeaseRevokeRequest>,
        ) -> Result<tonic::Response<pb::LeaseRevokeResponse>, Status> {
            let _ = r;
            Ok(tonic::Response::new(pb::LeaseRevokeResponse::default()))
        }
        type LeaseKeepAliveStream = Out<pb::LeaseKeepAliveResponse>;
        async fn lease_keep_alive(
            &self,
            req: Request<Streaming<pb::LeaseKeepAliveRequest>>,
        ) -> Result<tonic::Response<Self::LeaseKeepAliveStream>, Status> {
            let out = req.into_inner().map(|r| {
                r.map(|r| pb::LeaseKeepAliveResponse { id: r.id, ttl: 5, ..Default::default() })
            });
            Ok(tonic::Response::new(Box::pin(out)))
        }
        async fn lease_time_to_live(
            &self,
            r: Request<pb::LeaseTimeToLiveRequest>,
        ) -> Result<tonic::Response<pb::LeaseTimeToLiveResponse>, Status> {
            let id = r.into_inner().id;
            Ok(tonic::Response::new(pb::LeaseTimeToLiveResponse {
                id,
                ttl: -1,
                ..Default::default()
            }))
        }
        async fn lease_leases(
            &self,
            _: Request<pb::LeaseLeasesRequest>,
        ) -> Result<tonic::Response<pb::LeaseLeasesResponse>, Status> {
            Ok(tonic::Response::new(pb::LeaseLeasesResponse {
                leases: vec![pb::LeaseStatus { id: 7 }],
                ..Default::default()
            }))
        }
    }

    fn gateway() -> axum::Router {
        Gateway::new(LIMITS).watch(FakeWatch).lease(FakeLease).into_router().fallback(fallback)
    }

    /// Sends one request through the router and returns status and body text.
    async fn send(
        router: &axum::Router,
        method: &str,
        path: &str,
        body: &str,
    ) -> (StatusCode, String) {
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .body(Body::from(body.to_owned()))
            .unwrap();
        let mut svc = router.clone();
        futures::future::poll_fn(|cx: &mut Context<'_>| {
            <axum::Router as tower_service::Service<http::Request<Body>>>::poll_ready(&mut svc, cx)
        })
        .await
        .unwrap();
        let res = svc.call(req).await.unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn a_watch_stream_answers_one_result_line_per_response() {
        let (status, body) = send(
            &gateway(),
            "POST",
            "/v3/watch",
            r#"{"create_request":{"key":"Zm9v"}} {"createRequest":{"key":"YmFy"}}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let lines: Vec<&str> = body.lines().collect();
        assert_eq!(
            lines,
            [
                r#"{"result":{"watch_id":"1","created":true}}"#,
                r#"{"result":{"watch_id":"1","events":[{"type":"DELETE","kv":{"key":"Zm9v","mod_revision":"9"}}]}}"#,
                r#"{"result":{"watch_id":"1","created":true}}"#,
                r#"{"result":{"watch_id":"1","events":[{"type":"DELETE","kv":{"key":"YmFy","mod_revision":"9"}}]}}"#,
            ]
        );
    }

    #[tokio::test]
    async fn a_stream_error_ends_the_stream_with_an_error_line() {
        let (status, body) = send(
            &gateway(),
            "POST",
            "/v3beta/watch",
            r#"{"create_request":{"key":"Zm9v"}}{"create_request":{"key":"ZmFpbA=="}}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let last = body.lines().last().unwrap();
        assert_eq!(
            last,
            r#"{"error":{"grpc_code":3,"http_code":400,"message":"fail","http_status":"Bad Request"}}"#
        );
        // A malformed later message ends the stream the same way.
        let (_, body) =
            send(&gateway(), "POST", "/v3/watch", r#"{"create_request":{"key":"Zm9v"}}{oops"#)
                .await;
        assert!(body.lines().last().unwrap().starts_with(r#"{"error":{"grpc_code":3,"#), "{body}");
    }

    #[tokio::test]
    async fn a_malformed_first_stream_message_is_a_400() {
        let (status, body) = send(&gateway(), "POST", "/v3/watch", "{bad").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.starts_with(r#"{"error":"key must be a string"#), "{body}");
    }

    #[tokio::test]
    async fn keepalives_stream_through_both_lease_paths_and_aliases_serve_unary_calls() {
        let (status, body) =
            send(&gateway(), "POST", "/v3/lease/keepalive", r#"{"ID":"7"}{"ID":8}"#).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            "{\"result\":{\"ID\":\"7\",\"TTL\":\"5\"}}\n{\"result\":{\"ID\":\"8\",\"TTL\":\"5\"}}\n"
        );
        let (status, body) = send(&gateway(), "POST", "/v3/kv/lease/leases", "{}").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, r#"{"leases":[{"ID":"7"}]}"#));
        let (status, body) =
            send(&gateway(), "POST", "/v3/kv/lease/timetolive", r#"{"ID":"9"}"#).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, r#"{"ID":"9","TTL":"-1"}"#));
        let (status, body) = send(&gateway(), "POST", "/v3/lease/grant", r#"{"TTL":"1e99"}"#).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    }

    #[tokio::test]
    async fn service_errors_carry_the_grpc_code_as_etcds_gateway_does() {
        let (status, body) = send(&gateway(), "POST", "/v3/lease/grant", r#"{"TTL":"60"}"#).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            body,
            r#"{"error":"etcdserver: too large lease TTL","code":11,"message":"etcdserver: too large lease TTL"}"#
        );
    }

    #[tokio::test]
    async fn unserved_services_answer_unimplemented_and_unknown_paths_404() {
        let (status, body) = send(&gateway(), "POST", "/v3/kv/range", r#"{"key":"YQ=="}"#).await;
        assert_eq!(status, StatusCode::NOT_IMPLEMENTED);
        assert_eq!(
            body,
            r#"{"error":"unknown service etcdserverpb.KV","code":12,"message":"unknown service etcdserverpb.KV"}"#
        );
        let (status, _) = send(&gateway(), "POST", "/v3/nope", "{}").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = send(&gateway(), "POST", "/v3alpha/kv/range", "{}").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = send(&gateway(), "GET", "/v3/lease/leases", "").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn oversized_bodies_are_refused_before_decoding() {
        let big = format!(r#"{{"ID":"1","pad":"{}"}}"#, "x".repeat(10_000));
        let (status, body) = send(&gateway(), "POST", "/v3/kv/lease/revoke", &big).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
        let (status, _) = send(&gateway(), "POST", "/v3/lease/keepalive", &big).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    }

    #[test]
    fn gateway_limits_leave_room_for_base64() {
        let l = Limits::for_message_limit(100);
        assert_eq!(l.max_body_bytes, 200);
    }
}
