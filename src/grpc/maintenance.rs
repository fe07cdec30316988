//! etcd's `Maintenance` service: `Status`, `Alarm`, `Defragment`, `Hash`, `HashKV`,
//! `Snapshot` and `MoveLeader` are served; the rest answer `Unimplemented` until the features behind them
//! exist.

use std::pin::Pin;
use std::sync::Arc;

use cairn_proto::etcdserverpb::{self as pb, maintenance_server::Maintenance};
use futures::Stream;
use tonic::{Request, Response, Status};

use super::convert;
use crate::server::{ETCD_VERSION, STORAGE_VERSION, Server};

/// The Maintenance service over one server.
#[derive(Debug, Clone)]
pub struct MaintenanceService {
    server: Arc<Server>,
}

impl MaintenanceService {
    /// Creates the service.
    pub fn new(server: Arc<Server>) -> Self {
        Self { server }
    }

    /// Refuses a caller without the `root` role while auth is on (etcd's
    /// authMaintenanceServer guards Defragment, Hash, HashKV and Snapshot).
    async fn admin(&self) -> Result<(), Status> {
        self.server.check_admin().await.map_err(super::status::from_server)
    }
}

/// A stream fed by a task through a small channel (the task stops when the client leaves).
fn async_stream<F, Fut>(
    produce: F,
) -> impl Stream<Item = Result<pb::SnapshotResponse, Status>> + Send + 'static
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::SnapshotResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(produce(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn unimplemented(method: &str) -> Status {
    Status::unimplemented(format!(
        "etcdserverpb.Maintenance/{method} is not implemented by Cairn yet"
    ))
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    /// Raises or clears alarms through raft; lists them from the applied state.
    async fn alarm(
        &self,
        request: Request<pb::AlarmRequest>,
    ) -> Result<Response<pb::AlarmResponse>, Status> {
        let r = request.into_inner();
        let alarms = self
            .server
            .alarm(r.action, r.member_id, r.alarm)
            .await
            .map_err(super::status::from_server)?;
        Ok(Response::new(pb::AlarmResponse {
            header: convert::current_header(&self.server),
            alarms: alarms
                .into_iter()
                .map(|(member_id, alarm)| pb::AlarmMember { member_id, alarm })
                .collect(),
        }))
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let s = self.server.status();
        let db_size = i64::try_from(s.db_size).unwrap_or(i64::MAX);
        Ok(Response::new(pb::StatusResponse {
            header: convert::current_header(&self.server),
            version: ETCD_VERSION.to_owned(),
            db_size,
            leader: s.raft.leader,
            raft_index: s.raft.commit,
            raft_term: s.raft.term,
            raft_applied_index: s.applied,
            // etcd lists each raised alarm as its protobuf text form.
            errors: self
                .server
                .alarms()
                .into_iter()
                .map(|(member_id, alarm)| {
                    let name = pb::AlarmType::try_from(alarm)
                        .map_or_else(|_| alarm.to_string(), |a| a.as_str_name().to_owned());
                    format!("memberID:{member_id} alarm:{name} ")
                })
                .collect(),
            db_size_in_use: i64::try_from(s.db_size_in_use).unwrap_or(i64::MAX),
            is_learner: self.server.is_learner(),
            storage_version: STORAGE_VERSION.to_owned(),
            db_size_quota: i64::try_from(s.quota).unwrap_or(i64::MAX),
            downgrade_info: None,
        }))
    }

    /// Member-local and blocking, as etcd's: answers once the new files are live.
    async fn defragment(
        &self,
        _: Request<pb::DefragmentRequest>,
    ) -> Result<Response<pb::DefragmentResponse>, Status> {
        self.admin().await?;
        self.server.defragment().await.map_err(super::status::from_server)?;
        Ok(Response::new(pb::DefragmentResponse { header: convert::current_header(&self.server) }))
    }

    async fn hash(
        &self,
        _: Request<pb::HashRequest>,
    ) -> Result<Response<pb::HashResponse>, Status> {
        self.admin().await?;
        let (hash, revision) = self.server.hash().await.map_err(super::status::from_server)?;
        Ok(Response::new(pb::HashResponse {
            header: convert::header(self.server.header(), revision),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        request: Request<pb::HashKvRequest>,
    ) -> Result<Response<pb::HashKvResponse>, Status> {
        self.admin().await?;
        let (hash, compact_revision, hash_revision) =
            self.server.hash_kv(request.get_ref().revision).map_err(super::status::from_server)?;
        Ok(Response::new(pb::HashKvResponse {
            header: convert::current_header(&self.server),
            hash,
            compact_revision,
            hash_revision,
        }))
    }

    type SnapshotStream =
        Pin<Box<dyn Stream<Item = Result<pb::SnapshotResponse, Status>> + Send + 'static>>;

    /// Streams the image in chunks, then its SHA-256 as the last chunk (etcd's v3rpc
    /// maintenance.go does the same; clients concatenate every blob into the file). The
    /// first response's header carries the snapshot's revision.
    async fn snapshot(
        &self,
        _: Request<pb::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        self.admin().await?;
        let mut snap = self.server.snapshot().await.map_err(super::status::from_server)?;
        let mut header = convert::header(self.server.header(), snap.header.revision);
        let mut remaining = snap.size_hint;
        let stream = async_stream(move |tx| async move {
            while let Some(chunk) = snap.next().await {
                let msg = chunk.map_err(super::status::from_server).map(|blob| {
                    remaining = remaining.saturating_sub(blob.len() as u64);
                    pb::SnapshotResponse {
                        header: header.take(),
                        remaining_bytes: remaining,
                        blob,
                        version: STORAGE_VERSION.to_owned(),
                    }
                });
                let failed = msg.is_err();
                if tx.send(msg).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn move_leader(
        &self,
        request: Request<pb::MoveLeaderRequest>,
    ) -> Result<Response<pb::MoveLeaderResponse>, Status> {
        self.server
            .move_leader(request.get_ref().target_id)
            .await
            .map_err(super::status::from_server)?;
        // etcd answers a successful MoveLeader with an empty response, header included
        // (v3rpc's maintenanceServer.MoveLeader returns `&pb.MoveLeaderResponse{}`).
        Ok(Response::new(pb::MoveLeaderResponse::default()))
    }

    async fn downgrade(
        &self,
        _: Request<pb::DowngradeRequest>,
    ) -> Result<Response<pb::DowngradeResponse>, Status> {
        Err(unimplemented("Downgrade"))
    }
}
