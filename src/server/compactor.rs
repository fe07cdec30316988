//! Auto-compaction (`--auto-compaction-mode` / `--auto-compaction-retention`), as etcd's
//! v3compactor: only the leader compacts, through raft like any client's Compact.
//!
//! - periodic: every `retention / 10` the current revision is sampled; every
//!   `min(retention, 1h)` the store is compacted to the newest sample at least `retention`
//!   old, so roughly the last `retention` of history stays readable.
//! - revision: every 5 minutes the store is compacted to `current - retention`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use cairn_proto::etcdserverpb::CompactionRequest;
use cairn_proto::internal::internal_request::Op;
use tokio::time::Instant;

use super::Server;
use crate::config::AutoCompaction;

/// etcd's revision-mode compaction period.
const REVISION_PERIOD: Duration = Duration::from_secs(300);

/// Starts the compactor when configured.
pub(super) fn start(server: Arc<Server>) -> Option<tokio::task::JoinHandle<()>> {
    match server.cfg.auto_compaction {
        AutoCompaction::Disabled => None,
        AutoCompaction::Periodic(retention) => Some(tokio::spawn(periodic(server, retention))),
        AutoCompaction::Revision(keep) => Some(tokio::spawn(by_revision(server, keep))),
    }
}

async fn compact(server: &Server, revision: i64) {
    if revision <= server.kv.compact_revision() || !server.raft.is_leader() {
        return;
    }
    match server.propose(Op::Compaction(CompactionRequest { revision, physical: false })).await {
        Ok(_) => tracing::info!(revision, "auto-compaction finished"),
        Err(e) => tracing::warn!(revision, error = %e, "auto-compaction failed"),
    }
}

async fn periodic(server: Arc<Server>, retention: Duration) {
    let sample_every = (retention / 10).max(Duration::from_secs(1));
    let compact_every = retention.min(Duration::from_secs(3600));
    let mut samples: VecDeque<(Instant, i64)> = VecDeque::new();
    let mut last_compaction = Instant::now();
    let mut tick = tokio::time::interval(sample_every);
    loop {
        tick.tick().await;
        let now = Instant::now();
        samples.push_back((now, server.kv.current_revision()));
        if now.duration_since(last_compaction) < compact_every {
            continue;
        }
        // The newest sample that is at least `retention` old.
        let target = samples
            .iter()
            .rev()
            .find(|(t, _)| now.duration_since(*t) >= retention)
            .map(|(_, r)| *r);
        if let Some(rev) = target {
            compact(&server, rev).await;
            last_compaction = now;
            while samples.front().is_some_and(|(t, _)| now.duration_since(*t) > retention) {
                samples.pop_front();
            }
        }
    }
}

async fn by_revision(server: Arc<Server>, keep: i64) {
    let mut tick = tokio::time::interval(REVISION_PERIOD);
    tick.tick().await;
    loop {
        tick.tick().await;
        let target = server.kv.current_revision() - keep;
        if target > 0 {
            compact(&server, target).await;
        }
    }
}
