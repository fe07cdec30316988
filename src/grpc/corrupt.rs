//! The periodic corruption check (etcd's `--experimental-corrupt-check-time`): every
//! interval the leader computes its `HashKV` at its current revision and asks every other
//! member for theirs at the same revision over the client API; a member that answers for
//! the same revision and compaction point with another hash has diverged, and the leader
//! raises a CORRUPT alarm for it through raft. From then on the cluster refuses writes
//! (`etcdserver: corrupt cluster`) until an operator disarms the alarm (etcd's
//! corrupt.go `checkHashKV` / `monitorKVHashes`).
//!
//! It lives at the edge because it is a client of the other members' Maintenance service;
//! the member itself is reached only through `Server`.

use std::sync::Arc;
use std::time::Duration;

use cairn_proto::etcdserverpb::{
    AlarmType, HashKvRequest, alarm_request::AlarmAction, maintenance_client::MaintenanceClient,
};

use crate::server::Server;

/// How long one member may take to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts the check loop when `--experimental-corrupt-check-time` is set.
pub fn spawn(server: Arc<Server>) -> Option<tokio::task::JoinHandle<()>> {
    let every = server.config().corrupt_check_interval?;
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            if server.is_leader() {
                check_once(&server).await;
            }
        }
    }))
}

/// Asks `url` for its `HashKV` at `revision`: `(hash, compact revision)`.
async fn ask(url: &str, revision: i64) -> Option<(u32, i64)> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .ok()?
        .connect_timeout(ASK_TIMEOUT)
        .timeout(ASK_TIMEOUT)
        .connect()
        .await
        .ok()?;
    let resp = MaintenanceClient::new(channel).hash_kv(HashKvRequest { revision }).await.ok()?;
    let r = resp.into_inner();
    Some((r.hash, r.compact_revision))
}

/// One comparison round; raises a CORRUPT alarm for each member whose hash differs.
pub async fn check_once(server: &Server) {
    let Ok((hash, compacted, revision)) = server.hash_kv(0) else { return };
    let me = server.header().member_id;
    for m in server.members() {
        if m.id == me || m.is_learner {
            continue;
        }
        // A member that has not applied `revision` yet answers FutureRevision; one that
        // compacted further cannot be compared. Both are skipped, as etcd does.
        let Some(url) = m.client_urls.first() else { continue };
        let Some((theirs, their_compact)) = ask(url, revision).await else { continue };
        if their_compact == compacted && theirs != hash {
            tracing::error!(
                member = %format!("{:x}", m.id),
                revision,
                leader_hash = hash,
                member_hash = theirs,
                "HashKV mismatch: raising CORRUPT"
            );
            let raised =
                server.alarm(AlarmAction::Activate as i32, m.id, AlarmType::Corrupt as i32).await;
            if let Err(e) = raised {
                tracing::warn!(error = %e, "cannot raise the CORRUPT alarm");
            }
        }
    }
}
