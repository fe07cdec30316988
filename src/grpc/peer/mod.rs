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

mod forward;
mod join;
mod service;
mod transport;

use std::time::Duration;

use cairn_proto::internal::peer_client::PeerClient;
use tonic::transport::{Channel, Endpoint};

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

/// Builds a lazily connecting channel to `url` with keepalive and a per-call timeout.
pub(super) fn channel(url: &str) -> Option<Channel> {
    Some(endpoint(url)?.timeout(CALL_TIMEOUT).connect_lazy())
}

/// An endpoint with connect timeout, TCP_NODELAY and HTTP/2 keepalive, so a peer lost in a
/// partition is noticed within seconds even on a long-lived stream.
pub(super) fn endpoint(url: &str) -> Option<Endpoint> {
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
