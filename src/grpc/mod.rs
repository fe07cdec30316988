//! The tonic edge: etcd's gRPC services on the client URLs.
//!
//! Each service validates its requests (`validate`), calls the server's typed methods, and
//! maps every error through `status`, the one table of etcd codes and messages. The
//! services know the member only through `crate::server` (its methods, its one error and
//! the domain types it re-exports); `tests/layering.rs` holds them to it. The peer port
//! (`peer/`) is the exception DESIGN names: it implements raft's `Transport` and steps
//! inbound messages into raft. DESIGN's single `peer.rs` is the `peer/` folder: transport
//! client, peer service, leader forwarding and join calls, one file each. Lock and Election
//! (`lock.rs`, `election.rs`) are thin shells over the server's concurrency recipes.
//! `health.rs` is gRPC's standard health service, which etcd registers too. `auth.rs` is
//! etcd's Auth service; `caller.rs` runs every client request (gRPC and the
//! gateway sharing the port) as its caller, the token and certificate CN it carries.

mod auth;
mod caller;
mod cluster;
pub mod convert;
pub mod corrupt;
mod election;
mod health;
mod kv;
mod leader;
mod lease;
mod lock;
mod maintenance;
mod metered;
pub mod peer;
pub mod status;
pub mod tls;
pub mod validate;
pub mod watch;

use std::net::SocketAddr;
use std::sync::Arc;

use cairn_proto::etcdserverpb::{
    auth_server::AuthServer, cluster_server::ClusterServer, kv_server::KvServer,
    lease_server::LeaseServer, maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use cairn_proto::grpc::health::v1::health_server::HealthServer;
use cairn_proto::v3electionpb::election_server::ElectionServer;
use cairn_proto::v3lockpb::lock_server::LockServer;
use tokio::net::TcpListener;
use tonic::server::NamedService;

pub use self::tls::{Acceptor, Listener};

pub use self::auth::AuthService;
pub use self::caller::CallerLayer;
pub use self::cluster::ClusterService;
pub use self::election::ElectionService;
pub use self::health::HealthService;
pub use self::kv::KvService;
pub use self::lease::LeaseService;
pub use self::lock::LockService;
pub use self::maintenance::MaintenanceService;
pub use self::metered::MetricsLayer;
pub use self::watch::WatchService;
use crate::config::{GRPC_OVERHEAD_BYTES, Url};
use crate::server::Server;

/// Errors while starting the client listeners.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listen URL's host did not resolve.
    #[error("cannot resolve {url}: {source}")]
    Resolve {
        /// The URL.
        url: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// No address of a listen URL could be bound.
    #[error("cannot listen on {url}: {source}")]
    Bind {
        /// The URL.
        url: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The server failed while serving.
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Binds every address of every URL (a `localhost` URL binds both loopback families when
/// the host has them), marking `https://` ones for TLS. A URL none of whose addresses binds
/// is an error.
///
/// # Errors
/// [`Error::Resolve`] or [`Error::Bind`].
pub async fn bind(urls: &[Url]) -> Result<Vec<Listener>, Error> {
    let mut listeners = Vec::new();
    for url in urls {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(url.host_port())
            .await
            .map_err(|source| Error::Resolve { url: url.raw.clone(), source })?
            .collect();
        let mut last_err = None;
        let before = listeners.len();
        for addr in addrs {
            match TcpListener::bind(addr).await {
                Ok(tcp) => listeners.push(Listener { tcp, tls: url.scheme == "https" }),
                Err(e) => last_err = Some(e),
            }
        }
        if listeners.len() == before {
            let source = last_err.unwrap_or_else(|| std::io::Error::other("no address"));
            return Err(Error::Bind { url: url.raw.clone(), source });
        }
    }
    Ok(listeners)
}

/// Initialises `svc`'s `grpc_server_*` series at zero (go-grpc-prometheus does so for every
/// registered service) and returns it.
fn metered<S: NamedService>(svc: S) -> S {
    if let Some(m) = crate::metrics::get() {
        m.init_grpc_service(S::NAME);
    }
    svc
}

/// Serves the client services on `listeners` until `shutdown` resolves, with `http` (the
/// JSON gateway and operations endpoints) on the same listeners over HTTP/1.1 and HTTP/2;
/// `https://` listeners speak TLS through `tls`.
///
/// # Errors
/// [`Error::Serve`] when the transport fails.
pub async fn serve(
    server: Arc<Server>,
    listeners: Vec<Listener>,
    tls: Option<Arc<Acceptor>>,
    http: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error> {
    let max_recv = usize::try_from(server.config().raw.max_request_bytes).unwrap_or(usize::MAX)
        + GRPC_OVERHEAD_BYTES;
    let incoming = tls::incoming(listeners, tls);
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(7200)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        // The gateway and /metrics answer plain HTTP/1.1 clients (curl) too.
        .accept_http1(true)
        .layer(MetricsLayer)
        .layer(CallerLayer)
        .add_routes(tonic::service::Routes::from(http))
        .add_service(metered(
            KvServer::new(KvService::new(server.clone()))
                .max_decoding_message_size(max_recv)
                .max_encoding_message_size(usize::MAX),
        ))
        .add_service(metered(
            LeaseServer::new(LeaseService::new(server.clone())).max_decoding_message_size(max_recv),
        ))
        .add_service(metered(
            MaintenanceServer::new(MaintenanceService::new(server.clone()))
                .max_decoding_message_size(max_recv)
                .max_encoding_message_size(usize::MAX),
        ))
        .add_service(metered(
            WatchServer::new(WatchService::new(server.clone()))
                .max_decoding_message_size(max_recv)
                .max_encoding_message_size(usize::MAX),
        ))
        .add_service(metered(
            LockServer::new(LockService::new(server.clone())).max_decoding_message_size(max_recv),
        ))
        .add_service(metered(
            ElectionServer::new(ElectionService::new(server.clone()))
                .max_decoding_message_size(max_recv),
        ))
        .add_service(metered(
            AuthServer::new(AuthService::new(server.clone())).max_decoding_message_size(max_recv),
        ))
        .add_service(metered(HealthServer::new(HealthService::new(server.clone()))))
        .add_service(metered(
            ClusterServer::new(ClusterService::new(server)).max_decoding_message_size(max_recv),
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// Serves the peer service on `listeners` until `shutdown` resolves; `https://` listeners
/// speak TLS through `tls` (the peer certificate, CA and allowed CN).
///
/// # Errors
/// [`Error::Serve`] when the transport fails.
pub async fn serve_peers(
    server: Arc<Server>,
    listeners: Vec<Listener>,
    tls: Option<Arc<Acceptor>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error> {
    let incoming = tls::incoming(listeners, tls);
    tonic::transport::Server::builder()
        // Peers ping every second; a dead connection is dropped within a few.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(1)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(3)))
        .add_service(peer::PeerService::new(server).into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
