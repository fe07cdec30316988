//! The peer service and its client: how members carry raft messages, snapshots and
//! forwarded lease calls to each other on the peer URLs.
//!
//! [`PeerTransport`] implements raft's [`Transport`]: every peer has its own bounded queue
//! and sender task, so a dead or slow peer only fills its own queue; what does not fit is
//! dropped and reported unreachable (raft retries). A sender drains its queue into batches
//! on one long-lived client stream per peer, reopened when it ends. Snapshot messages go on a client stream in chunks followed by a CRC32.
//! Every channel has HTTP/2 keepalive and each call a timeout, so a peer lost in a
//! partition is noticed rather than waited on forever (DEPENDENCIES.md trap 6).
//!
//! raft messages travel as opaque bytes encoded by rust-protobuf 2.28 (RUSTSEC-2024-0437:
//! decoding hostile input can overflow the stack; only members may reach the peer port).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use cairn_proto::etcdserverpb as pb;
use cairn_proto::internal::peer_client::PeerClient;
use cairn_proto::internal::peer_server::{Peer, PeerServer};
use cairn_proto::internal::{MembersRequest, MembersResponse, PeerAck, RaftBatch, SnapshotChunk};
use futures::StreamExt as _;
use protobuf::Message as _;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status, Streaming};

use super::status;
use crate::raft::{Message, MessageType, RaftHandle, Transport};
use crate::server::{Join, Member, Server};

/// Messages queued per peer before new ones are dropped.
const QUEUE: usize = 4096;
/// Messages sent in one call at most.
const BATCH: usize = 512;
/// One call's time limit; raft's own retries take over after it.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// A snapshot stream's time limit.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Snapshot data per chunk.
const CHUNK: usize = 1024 * 1024;
/// The largest message the peer service accepts (a raft append of many entries).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Builds a lazily connecting channel to `url` with keepalive and a per-call timeout.
fn channel(url: &str) -> Option<Channel> {
    Some(endpoint(url)?.timeout(CALL_TIMEOUT).connect_lazy())
}

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

fn client(ch: Channel) -> PeerClient<Channel> {
    PeerClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
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
    let Some(ch) = urls.first().and_then(|u| channel(u)) else {
        tracing::warn!(to, ?urls, "unusable peer URL");
        return;
    };
    let mut peer = client(ch);
    let Some(stream_ch) = urls.first().and_then(|u| endpoint(u)).map(|e| e.connect_lazy()) else {
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
            let ok = send_snapshot(&mut peer, a, snap).await;
            a.raft.report_snapshot(to, ok);
        }
    }
}

/// Streams a snapshot message: the message without its data, then the data in chunks, then
/// a CRC32 of the data.
async fn send_snapshot(peer: &mut PeerClient<Channel>, a: &Attached, mut msg: Message) -> bool {
    let data = msg.mut_snapshot().take_data();
    let Ok(header) = msg.write_to_bytes() else { return false };
    let crc = crc32fast::hash(&data);
    let mut chunks = vec![SnapshotChunk {
        cluster_id: a.cluster_id,
        from: a.local_id,
        message: header,
        ..Default::default()
    }];
    for part in data.chunks(CHUNK) {
        chunks.push(SnapshotChunk { data: part.to_vec(), ..Default::default() });
    }
    chunks.push(SnapshotChunk { last: true, crc32: crc, ..Default::default() });
    let mut req = Request::new(futures::stream::iter(chunks));
    req.set_timeout(SNAPSHOT_TIMEOUT);
    match peer.snapshot(req).await {
        Ok(_) => {
            tracing::info!(to = msg.to, bytes = data.len(), "sent raft snapshot");
            true
        }
        Err(e) => {
            tracing::warn!(to = msg.to, error = %e, "raft snapshot not delivered");
            false
        }
    }
}

/// The peer service over one server.
#[derive(Debug, Clone)]
pub struct PeerService {
    server: Arc<Server>,
}

impl PeerService {
    /// Creates the service.
    pub fn new(server: Arc<Server>) -> Self {
        Self { server }
    }

    /// The service as a tonic server with generous message limits.
    pub fn into_server(self) -> PeerServer<PeerService> {
        PeerServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// Checks a batch's origin and steps its messages into raft, in order.
    async fn deliver(&self, batch: RaftBatch) -> Result<(), Status> {
        self.check_cluster(batch.cluster_id)?;
        if self.server.was_removed(batch.from) {
            return Err(Status::new(Code::FailedPrecondition, status::msg::MEMBER_REMOVED));
        }
        for bytes in batch.messages {
            let msg = Message::parse_from_bytes(&bytes)
                .map_err(|e| Status::invalid_argument(format!("bad raft message: {e}")))?;
            self.server.raft().step(msg).await.map_err(|_| Status::unavailable("raft stopped"))?;
        }
        Ok(())
    }

    fn check_cluster(&self, cluster_id: u64) -> Result<(), Status> {
        let mine = self.server.header().cluster_id;
        if cluster_id != mine {
            tracing::warn!(
                local = %format!("{mine:x}"),
                remote = %format!("{cluster_id:x}"),
                "refusing peer traffic: cluster ID mismatch"
            );
            return Err(Status::new(Code::FailedPrecondition, status::msg::CLUSTER_ID_MISMATCH));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn send(&self, request: Request<RaftBatch>) -> Result<Response<PeerAck>, Status> {
        self.deliver(request.into_inner()).await?;
        Ok(Response::new(PeerAck {}))
    }

    async fn stream(
        &self,
        request: Request<Streaming<RaftBatch>>,
    ) -> Result<Response<PeerAck>, Status> {
        let mut inbound = request.into_inner();
        while let Some(batch) = inbound.next().await {
            self.deliver(batch?).await?;
        }
        Ok(Response::new(PeerAck {}))
    }

    async fn snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<PeerAck>, Status> {
        let mut stream = request.into_inner();
        let first = stream.next().await.ok_or_else(|| Status::invalid_argument("empty"))??;
        self.check_cluster(first.cluster_id)?;
        let mut msg = Message::parse_from_bytes(&first.message)
            .map_err(|e| Status::invalid_argument(format!("bad snapshot message: {e}")))?;
        let mut data = first.data;
        let mut crc = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            data.extend_from_slice(&chunk.data);
            if chunk.last {
                crc = Some(chunk.crc32);
                break;
            }
        }
        if crc != Some(crc32fast::hash(&data)) {
            return Err(Status::data_loss("snapshot checksum mismatch"));
        }
        msg.mut_snapshot().set_data(data.into());
        self.server.raft().step(msg).await.map_err(|_| Status::unavailable("raft stopped"))?;
        Ok(Response::new(PeerAck {}))
    }

    async fn members(
        &self,
        _: Request<MembersRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        Ok(Response::new(MembersResponse {
            cluster_id: self.server.header().cluster_id,
            members: self.server.members().iter().map(pb::Member::from).collect(),
        }))
    }

    async fn lease_renew(
        &self,
        request: Request<pb::LeaseKeepAliveRequest>,
    ) -> Result<Response<pb::LeaseKeepAliveResponse>, Status> {
        let id = request.into_inner().id;
        let ttl = self.server.lease_renew(id).await.map_err(status::from_server)?;
        Ok(Response::new(pb::LeaseKeepAliveResponse { header: None, id, ttl }))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let r = request.into_inner();
        if !self.server.raft_status().is_leader() {
            return Err(status::from_server(crate::server::Error::NotLeader {
                leader: self.server.raft_status().leader,
            }));
        }
        Ok(Response::new(super::lease::time_to_live(&self.server, None, &r)))
    }
}

/// Forwards lease calls to the leader's peer service.
#[derive(Debug, Clone)]
pub(super) struct LeaderForward {
    server: Arc<Server>,
    /// The channel to the last leader dialed, reused while it leads: a keep-alive stream
    /// renews every few seconds and must not open a connection each time.
    cached: Arc<Mutex<Option<(String, Channel)>>>,
}

impl LeaderForward {
    pub(super) fn new(server: Arc<Server>) -> Self {
        Self { server, cached: Arc::default() }
    }

    fn leader_client(&self) -> Result<PeerClient<Channel>, Status> {
        let leader = self.server.raft_status().leader;
        if leader == 0 {
            return Err(status::from_server(crate::server::Error::NoLeader));
        }
        let url = self
            .server
            .members()
            .into_iter()
            .find(|m| m.id == leader)
            .and_then(|m| m.peer_urls.into_iter().next())
            .ok_or_else(|| status::from_server(crate::server::Error::NoLeader))?;
        let mut cached = self.cached.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((cached_url, ch)) = cached.as_ref()
            && *cached_url == url
        {
            return Ok(client(ch.clone()));
        }
        let ch =
            channel(&url).ok_or_else(|| status::from_server(crate::server::Error::NoLeader))?;
        *cached = Some((url, ch.clone()));
        Ok(client(ch))
    }

    /// Renews lease `id` on the leader.
    pub(super) async fn renew(&self, id: i64) -> Result<i64, Status> {
        let mut c = self.leader_client()?;
        Ok(c.lease_renew(pb::LeaseKeepAliveRequest { id }).await?.into_inner().ttl)
    }

    /// Asks the leader for lease `r.id`'s time to live.
    pub(super) async fn time_to_live(
        &self,
        r: pb::LeaseTimeToLiveRequest,
    ) -> Result<pb::LeaseTimeToLiveResponse, Status> {
        let mut c = self.leader_client()?;
        Ok(c.lease_time_to_live(r).await?.into_inner())
    }
}

/// Asks the other members listed in `--initial-cluster` for their cluster id; `None` when
/// none answers.
pub async fn remote_cluster_id(peer_urls: &[String], initial_cluster: &[String]) -> Option<u64> {
    for url in initial_cluster.iter().filter(|u| !peer_urls.contains(u)) {
        let Some(ch) = channel(url) else { continue };
        if let Ok(resp) = client(ch).members(MembersRequest {}).await {
            return Some(resp.into_inner().cluster_id);
        }
    }
    None
}

/// Asks the members listed in `--initial-cluster` (other than this one) for the cluster a
/// member started with `--initial-cluster-state existing` joins, and finds this member's
/// record by its peer URLs (etcd's GetClusterFromRemotePeers).
///
/// # Errors
/// A message when no peer answers, when none of the members has this member's peer URLs
/// (it was not added with `MemberAdd`), or when this member has started before (its data
/// dir was lost).
pub async fn fetch_cluster(
    peer_urls: &[String],
    initial_cluster: &[String],
) -> Result<Join, String> {
    let mut wanted = peer_urls.to_vec();
    wanted.sort();
    let mut last = String::from("no other member in --initial-cluster");
    // A member that has not applied the MemberAdd yet does not list us: ask the others,
    // and ask again for a few seconds.
    for _ in 0..10 {
        for url in initial_cluster.iter().filter(|u| !peer_urls.contains(u)) {
            let Some(ch) = channel(url) else { continue };
            match client(ch).members(MembersRequest {}).await {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    let members: Vec<Member> = resp.members.into_iter().map(Member::from).collect();
                    let me = members.iter().find(|m| {
                        let mut urls = m.peer_urls.clone();
                        urls.sort();
                        urls == wanted
                    });
                    match me {
                        // A member that already published its client URLs has run before:
                        // an empty data dir now means its data (and its raft votes) were
                        // lost, and rejoining under the same id could break raft's safety.
                        // It must be removed and added again (etcd's isMemberBootstrapped).
                        Some(me) if !me.client_urls.is_empty() => {
                            return Err(format!(
                                "member {:x} has already been bootstrapped, but its data dir is empty: remove it (MemberRemove) and add it again",
                                me.id
                            ));
                        }
                        Some(me) => {
                            let member_id = me.id;
                            return Ok(Join { cluster_id: resp.cluster_id, member_id, members });
                        }
                        None => {
                            last = format!(
                                "member with peer URLs {peer_urls:?} is not in the cluster's member list; add it with MemberAdd first"
                            );
                        }
                    }
                }
                Err(e) => last = format!("{url}: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(format!("cannot join the cluster: {last}"))
}
