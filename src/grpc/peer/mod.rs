//! The peer port: how members carry raft messages, snapshots and forwarded lease calls to
//! each other on the peer URLs. Three parts, one file each:
//!
//! - [`transport`]: the client side, [`PeerTransport`], which implements raft's
//!   [`Transport`](crate::raft::Transport) (declared by raft, implemented here at the edge);
//! - [`service`]: the server side, [`PeerService`], which steps inbound messages into raft,
//!   installs snapshots and answers lease calls forwarded from followers;
//! - [`forward`]: a follower's client for the leader's lease calls ([`LeaderForward`]);
//!
//! plus [`join`], the calls a starting member makes to find its cluster. This module holds
//! what they share: limits, and channels with keepalive and a per-call timeout, so a peer
//! lost in a partition is noticed rather than waited on forever (DEPENDENCIES.md trap 6).
//!
//! raft messages travel as opaque bytes encoded by rust-protobuf 2.28 (RUSTSEC-2024-0437:
//! decoding hostile input can overflow the stack; only members may reach the peer port).
//! With peer TLS (`https://` peer URLs, `--peer-client-cert-auth`) that holds: the peer
//! listener admits only connections whose client certificate chains to the peer CA (and
//! carries `--peer-cert-allowed-cn` when set), and members dial each other through the
//! process's one [`Connector`], installed at start with [`use_tls`].

mod forward;
mod join;
mod service;
mod transport;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cairn_proto::internal::peer_client::PeerClient;
use tonic::transport::{Channel, Endpoint};

use super::tls::{Connector, Dial};

pub(super) use self::forward::LeaderForward;
pub use self::join::{fetch_cluster, remote_cluster_id};
pub use self::service::PeerService;
pub use self::transport::PeerTransport;

/// Messages queued per peer before new ones are dropped.
pub(super) const QUEUE: usize = 4096;
/// Messages sent in one call at most.
pub(super) const BATCH: usize = 512;
/// One call's time limit; raft's own retries take over after it.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// A snapshot stream's time limit.
pub(super) const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Snapshot data per chunk.
pub(super) const CHUNK: usize = 1024 * 1024;
/// The largest message the peer service accepts (a raft append of many entries).
pub(super) const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// The dialer for `https://` peer URLs; set once at start when peer TLS is configured.
static TLS: OnceLock<Arc<Connector>> = OnceLock::new();

/// Makes every later connection to an `https://` peer URL use `connector` (call once,
/// before the member starts; later calls are ignored).
pub fn use_tls(connector: Arc<Connector>) {
    let _ = TLS.set(connector);
}

/// Builds a lazily connecting channel to `url` with keepalive and a per-call timeout.
pub(super) fn channel(url: &str) -> Option<Channel> {
    lazy(url, Some(CALL_TIMEOUT))
}

/// A lazily connecting channel to `url` (with a per-call `timeout` if given), over TLS for
/// an `https://` URL. `None` for a malformed URL, or an `https://` one without peer TLS.
pub(super) fn lazy(url: &str, timeout: Option<Duration>) -> Option<Channel> {
    let (tls, plain) = match url.strip_prefix("https://") {
        // tonic is asked for plain HTTP/2; the connector below does the TLS.
        Some(rest) => (Some(TLS.get()?.clone()), format!("http://{rest}")),
        None => (None, url.to_owned()),
    };
    let mut ep = endpoint(&plain)?;
    if let Some(t) = timeout {
        ep = ep.timeout(t);
    }
    Some(match tls {
        Some(connector) => {
            ep.connect_timeout(TLS_CONNECT_TIMEOUT).connect_with_connector_lazy(Dial(connector))
        }
        None => ep.connect_lazy(),
    })
}

/// Connect plus handshake time allowed on a TLS peer connection.
const TLS_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// An endpoint with connect timeout, TCP_NODELAY and HTTP/2 keepalive, so a peer lost in a
/// partition is noticed within seconds even on a long-lived stream.
fn endpoint(url: &str) -> Option<Endpoint> {
    let ep = Endpoint::from_shared(url.to_owned()).ok()?;
    Some(
        ep.connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true),
    )
}

/// A peer client with the peer port's message limits.
pub(super) fn client(ch: Channel) -> PeerClient<Channel> {
    PeerClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}
