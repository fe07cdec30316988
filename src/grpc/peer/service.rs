//! The server side of the peer port: [`PeerService`] steps inbound raft messages into the
//! local raft node, receives snapshot streams, lists members for joiners, and answers the
//! lease calls followers forward to the leader.

use std::sync::Arc;

use cairn_proto::etcdserverpb as pb;
use cairn_proto::internal::peer_server::{Peer, PeerServer};
use cairn_proto::internal::{MembersRequest, MembersResponse, PeerAck, RaftBatch, SnapshotChunk};
use futures::StreamExt as _;
use protobuf::Message as _;
use tonic::{Code, Request, Response, Status, Streaming};

use super::MAX_MESSAGE;
use crate::grpc::status;
use crate::raft::{Message, Reference};
use crate::server::Server;

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
        // The image goes to a file as it arrives, never whole into memory; apply installs
        // it from there (`raft/snapshot.rs`).
        let path = self.server.raft_snapshot_staging(msg.get_snapshot().get_metadata().index);
        self.server.prune_staged_snapshots();
        let staged = stage(&path, first.data, &mut stream).await;
        let reference = match staged {
            Ok(()) => Reference::staged(&path)
                .ok_or_else(|| Status::internal("the data dir path is not UTF-8")),
            Err(e) => Err(e),
        };
        let reference = match reference {
            Ok(r) => r,
            Err(e) => {
                let _ = tokio::fs::remove_file(&path).await;
                return Err(e);
            }
        };
        msg.mut_snapshot().set_data(reference.into());
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
        if !self.server.is_leader() {
            return Err(status::from_server(crate::server::Error::NotLeader {
                leader: self.server.leader(),
            }));
        }
        Ok(Response::new(crate::grpc::lease::time_to_live(&self.server, None, &r)))
    }
}

/// Writes a streamed snapshot image to `path` (`first` is the data of the first chunk),
/// checking the trailing CRC32 of the data, and syncs it.
async fn stage(
    path: &std::path::Path,
    first: Vec<u8>,
    stream: &mut Streaming<SnapshotChunk>,
) -> Result<(), Status> {
    use tokio::io::AsyncWriteExt as _;
    let io = |what: &str, e: std::io::Error| {
        Status::internal(format!("cannot stage the snapshot in {}: {what}: {e}", path.display()))
    };
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(|e| io("create dir", e))?;
    }
    let file = tokio::fs::File::create(path).await.map_err(|e| io("create", e))?;
    let mut file = tokio::io::BufWriter::with_capacity(1 << 20, file);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&first);
    file.write_all(&first).await.map_err(|e| io("write", e))?;
    let mut trailer = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        crc.update(&chunk.data);
        file.write_all(&chunk.data).await.map_err(|e| io("write", e))?;
        if chunk.last {
            trailer = Some(chunk.crc32);
            break;
        }
    }
    if trailer != Some(crc.finalize()) {
        return Err(Status::data_loss("snapshot checksum mismatch"));
    }
    file.flush().await.map_err(|e| io("flush", e))?;
    file.get_ref().sync_all().await.map_err(|e| io("sync", e))?;
    Ok(())
}
