//! The peer transport as raft needs it, declared here (the consumer owns the trait) and
//! implemented by the peer service in `grpc/`.

use raft::prelude::Message;

use super::RaftHandle;

/// Sends raft messages to peers.
///
/// Implementations must never block the raft task: they queue per peer with a bound and drop
/// (then report) what does not fit, because raft retries on its own.
pub trait Transport: Send + Sync + 'static {
    /// Queues `msgs` for their destinations (`Message::to`).
    fn send(&self, msgs: Vec<Message>);

    /// Tells the transport which raft node it serves (for delivery reports) and the ids that
    /// stamp outgoing traffic. Called once, before any [`Transport::send`].
    fn attach(&self, _raft: RaftHandle, _cluster_id: u64, _local_id: u64) {}

    /// Replaces the address book: each member id with its peer URLs.
    fn update_peers(&self, _peers: Vec<(u64, Vec<String>)>) {}
}

/// A transport for a cluster of one: there is nobody to send to.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoPeers;

impl Transport for NoPeers {
    fn send(&self, msgs: Vec<Message>) {
        for m in msgs {
            tracing::warn!(to = m.to, msg_type = ?m.get_msg_type(), "no transport to reach peer; message dropped");
        }
    }
}
