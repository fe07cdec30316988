//! The peer transport as raft needs it, declared here (the consumer owns the trait) and
//! implemented by the peer service in `grpc/`.

use raft::prelude::Message;

/// Sends raft messages to peers.
///
/// Implementations must never block the raft task: they queue per peer with a bound and drop
/// (then report) what does not fit, because raft retries on its own.
pub trait Transport: Send + Sync + 'static {
    /// Queues `msgs` for their destinations (`Message::to`).
    fn send(&self, msgs: Vec<Message>);
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
