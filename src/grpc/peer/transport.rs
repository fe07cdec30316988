//! The client side of the peer port: [`PeerTransport`] implements raft's `Transport`.
//! Every peer has its own bounded queue and sender task, so a dead or slow peer only fills
//! its own queue; what does not fit is dropped and reported unreachable (raft retries). A
//! sender drains its queue into batches on one long-lived client stream per peer, reopened
//! when it ends. Snapshot messages go on a client stream in chunks followed by a CRC32.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cairn_proto::internal::peer_client::PeerClient;
use cairn_proto::internal::{RaftBatch, SnapshotChunk};
use futures::StreamExt as _;
use protobuf::Message as _;
use tokio::sync::{mpsc, oneshot};
use tonic::Request;
use tonic::transport::Channel;

use super::{BATCH, CHUNK, QUEUE, SNAPSHOT_TIMEOUT, client, lazy};
use crate::grpc::status;
use crate::raft::{Message, MessageType, RaftHandle, Reference, Transport};

/// Batches buffered on an open message stream before the sender waits.
const STREAM_BUFFER: usize = 64;

/// Opens a message stream to peer `to` on `ch` (a channel without a call timeout: the
/// stream lives as long as the connection). The returned sender closes when the stream
/// ends; an error ending it is reported to raft and logged.
fn open_stream(
    ch: Channel,
    to: u64,
    raft: RaftHandle,
    removed: Arc<tokio::sync::watch::Sender<bool>>,
) -> mpsc::Sender<RaftBatch> {
    let (tx, rx) = mpsc::channel::<RaftBatch>(STREAM_BUFFER);
    tokio::spawn(async move {
        let outbound =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
        if let Err(e) = client(ch).stream(outbound).await {
            if e.message() == status::msg::MEMBER_REMOVED {
                tracing::warn!(to, "peer says this member was removed from the cluster");
                removed.send_replace(true);
            } else if e.message() == status::msg::CLUSTER_ID_MISMATCH {
                tracing::error!(to, "peer refused our messages: cluster ID mismatch");
            } else {
                tracing::debug!(to, error = %e, "raft message stream ended");
            }
            raft.report_unreachable(to);
        }
    });
    tx
}

/// One peer's queue and the URLs its sender dials.
struct PeerLink {
    urls: Vec<String>,
    tx: mpsc::Sender<Message>,
}

/// Identity and feedback shared by every sender task.
struct Attached {
    raft: RaftHandle,
    cluster_id: u64,
    local_id: u64,
}

/// The raft transport over the peer service.
pub struct PeerTransport {
    peers: Mutex<HashMap<u64, PeerLink>>,
    attached: Arc<OnceLock<Attached>>,
    /// Turns true when a peer says this member was removed from the cluster.
    removed: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for PeerTransport {
    fn default() -> Self {
        Self {
            peers: Mutex::default(),
            attached: Arc::default(),
            removed: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }
}

impl std::fmt::Debug for PeerTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTransport").finish_non_exhaustive()
    }
}

impl PeerTransport {
    /// Creates a transport with an empty address book. Must be used inside a tokio runtime.
    pub fn new() -> Self {
        Self::default()
    }

    /// A receiver that turns true when a peer reports this member removed.
    pub fn removed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.removed.subscribe()
    }

    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<u64, PeerLink>> {
        self.peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Transport for PeerTransport {
    fn send(&self, msgs: Vec<Message>) {
        let links = self.links();
        for m in msgs {
            let to = m.to;
            let Some(link) = links.get(&to) else {
                tracing::debug!(to, "no address for raft peer; message dropped");
                continue;
            };
            if link.tx.try_send(m).is_err() {
                // The peer is slow or gone: drop rather than block the raft task.
                if let Some(a) = self.attached.get() {
                    a.raft.report_unreachable(to);
                }
            }
        }
    }

    fn attach(&self, raft: RaftHandle, cluster_id: u64, local_id: u64) {
        let _ = self.attached.set(Attached { raft, cluster_id, local_id });
    }

    fn update_peers(&self, peers: Vec<(u64, Vec<String>)>) {
        let local = self.attached.get().map(|a| a.local_id);
        let mut links = self.links();
        links.retain(|id, _| peers.iter().any(|(p, _)| p == id));
        for (id, urls) in peers {
            if Some(id) == local || urls.is_empty() {
                continue;
            }
            if links.get(&id).is_some_and(|l| l.urls == urls) {
                continue;
            }
            let (tx, rx) = mpsc::channel(QUEUE);
            // Replacing a link drops its sender, which ends the old task.
            tokio::spawn(run_link(
                id,
                urls.clone(),
                rx,
                self.attached.clone(),
                self.removed.clone(),
            ));
            links.insert(id, PeerLink { urls, tx });
        }
    }
}

/// Sends one peer's queued messages until its link is dropped.
async fn run_link(
    to: u64,
    urls: Vec<String>,
    mut rx: mpsc::Receiver<Message>,
    attached: Arc<OnceLock<Attached>>,
    removed: Arc<tokio::sync::watch::Sender<bool>>,
) {
    let Some(stream_ch) = urls.first().and_then(|u| lazy(u, None)) else {
        tracing::warn!(to, ?urls, "unusable peer URL");
        return;
    };
    let mut open: Option<mpsc::Sender<RaftBatch>> = None;
    while let Some(first) = rx.recv().await {
        let Some(a) = attached.get() else { continue };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let (snapshots, msgs): (Vec<_>, Vec<_>) =
            batch.into_iter().partition(|m| m.get_msg_type() == MessageType::MsgSnapshot);
        if !msgs.is_empty() {
            let messages = msgs.iter().filter_map(|m| m.write_to_bytes().ok()).collect();
            let req = RaftBatch { cluster_id: a.cluster_id, from: a.local_id, messages };
            // One long-lived stream per peer: batches follow each other without waiting for
            // an answer. A stream that ended is reopened; what was sent into it meanwhile
            // is lost, which raft's retries cover.
            let tx = match &open {
                Some(tx) if !tx.is_closed() => tx.clone(),
                _ => {
                    let tx = open_stream(stream_ch.clone(), to, a.raft.clone(), removed.clone());
                    open = Some(tx.clone());
                    tx
                }
            };
            if tx.send(req).await.is_err() {
                open = None;
                a.raft.report_unreachable(to);
            }
        }
        for snap in snapshots {
            // The message channel's per-call timeout would cut a large image short; the
            // snapshot call carries its own (SNAPSHOT_TIMEOUT).
            let mut peer = client(stream_ch.clone());
            let ok = send_snapshot(&mut peer, a, snap).await;
            a.raft.report_snapshot(to, ok);
        }
    }
}

/// Chunks of a snapshot image buffered between its reader thread and the stream.
const SNAPSHOT_BUFFER: usize = 4;

/// Streams a snapshot message: the message without its data, then the data in chunks, then
/// a CRC32 of the data. A pinned image (`raft/snapshot.rs`) is read by a blocking thread
/// page by page while it streams, so neither side holds it whole.
async fn send_snapshot(peer: &mut PeerClient<Channel>, a: &Attached, mut msg: Message) -> bool {
    let data = msg.mut_snapshot().take_data();
    let index = msg.get_snapshot().get_metadata().index;
    let Ok(header) = msg.write_to_bytes() else { return false };
    let first = SnapshotChunk {
        cluster_id: a.cluster_id,
        from: a.local_id,
        message: header,
        ..Default::default()
    };
    let (tx, rx) = mpsc::channel::<SnapshotChunk>(SNAPSHOT_BUFFER);
    let reader = match Reference::parse(&data) {
        Reference::Pinned(i) if i == index => match a.raft.snapshot_image(index) {
            Some(image) => match spawn_reader(move || stream_image(image.as_ref(), &tx)) {
                Ok(reader) => reader,
                Err(e) => {
                    tracing::warn!(to = msg.to, error = %e, "cannot start a snapshot reader");
                    return false;
                }
            },
            None => {
                // Not the image offered now (a newer one replaced it): raft takes a new one.
                a.raft.snapshot_unusable(index);
                return false;
            }
        },
        Reference::Inline(image) => {
            let image = image.to_vec();
            let (done_tx, done_rx) = oneshot::channel();
            tokio::task::spawn_blocking(move || {
                let out = |piece: Vec<u8>| tx.blocking_send(chunk(piece)).is_ok();
                let done = image.chunks(CHUNK).all(|p| out(p.to_vec()));
                let crc = done.then(|| crc32fast::hash(&image));
                let _ = done_tx.send(crc.ok_or_else(|| "receiver gone".to_owned()));
            });
            done_rx
        }
        Reference::Pinned(_) | Reference::Staged(_) => {
            // A reference only this member's past understood (a snapshot it received
            // before it led, say): raft takes a fresh one.
            a.raft.snapshot_unusable(index);
            return false;
        }
    };
    let body =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let (trailer_tx, trailer_rx) = tokio::sync::oneshot::channel::<SnapshotChunk>();
    let trailer = futures::stream::once(trailer_rx).filter_map(|c| async move { c.ok() });
    let outbound = futures::stream::once(async move { first }).chain(body).chain(trailer);
    let mut req = Request::new(outbound);
    req.set_timeout(SNAPSHOT_TIMEOUT);
    let (sent, produced) = tokio::join!(peer.snapshot(req), async move {
        let produced = reader.await.unwrap_or_else(|_| Err("the reader thread died".into()));
        if let Ok(crc) = &produced {
            let _ =
                trailer_tx.send(SnapshotChunk { last: true, crc32: *crc, ..Default::default() });
        }
        // On failure the trailer sender is dropped: the stream ends without its last
        // chunk, which the receiver refuses.
        produced
    });
    match (sent, produced) {
        (Ok(_), Ok(_)) => {
            tracing::info!(to = msg.to, index, "sent raft snapshot");
            true
        }
        (_, Err(e)) => {
            tracing::warn!(to = msg.to, index, error = %e, "raft snapshot image unreadable; taking a new one");
            a.raft.snapshot_unusable(index);
            false
        }
        (Err(e), Ok(_)) => {
            tracing::warn!(to = msg.to, error = %e, "raft snapshot not delivered");
            false
        }
    }
}

/// Runs a pinned image's reader on a thread of its own at background priority
/// (`server::lower_thread_priority`): reading and encoding the image's pages yields the
/// CPU to applies and client requests. Its result arrives on the returned channel.
fn spawn_reader(
    read: impl FnOnce() -> Result<u32, String> + Send + 'static,
) -> std::io::Result<oneshot::Receiver<Result<u32, String>>> {
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new().name("cairn-snap-read".into()).spawn(move || {
        crate::server::lower_thread_priority();
        let _ = done_tx.send(read());
    })?;
    Ok(done_rx)
}

/// A data chunk of a snapshot stream.
fn chunk(data: Vec<u8>) -> SnapshotChunk {
    SnapshotChunk { data, ..Default::default() }
}

/// Reads `image` into `tx` in chunks; returns the CRC32 of what it sent.
fn stream_image(
    image: &dyn crate::raft::SnapshotImage,
    tx: &mpsc::Sender<SnapshotChunk>,
) -> Result<u32, String> {
    let mut crc = crc32fast::Hasher::new();
    let mut gone = false;
    image.stream(CHUNK, &mut |piece| {
        crc.update(&piece);
        gone = tx.blocking_send(chunk(piece)).is_err();
        !gone
    })?;
    if gone {
        return Err("the receiver went away".into());
    }
    Ok(crc.finalize())
}
