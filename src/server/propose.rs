//! Proposing a write: encode the replicated request under a unique id, hand it to raft, and
//! wait for apply to report its result.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use cairn_proto::internal::{InternalRequest, internal_request::Op};
use prost::Message as _;

use super::{Error, Server};
use crate::apply::Response;

/// etcd's `maxGapBetweenApplyAndCommitIndex`: beyond this apply lag, writes are refused.
const MAX_APPLY_LAG: u64 = 5000;

/// Generates request ids unique across members and restarts, as etcd's idutil does: the
/// member id's low 16 bits, then the start time in milliseconds (40 bits), then a counter.
#[derive(Debug)]
pub struct IdGen {
    next: AtomicU64,
}

impl IdGen {
    /// Creates a generator for `member_id`, seeded with the current time.
    pub fn new(member_id: u64) -> Self {
        let millis =
            SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let millis = u64::try_from(millis).unwrap_or(0) & ((1 << 40) - 1);
        Self { next: AtomicU64::new(((member_id & 0xffff) << 48) | (millis << 8)) }
    }

    /// Returns the next id.
    pub fn next(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
}

impl Server {
    /// The leader's id, waiting out an election in progress (up to three election timeouts)
    /// when none is known; 0 when still none is.
    pub async fn await_leader(&self) -> u64 {
        if self.raft.leader() == 0 {
            self.raft.wait_for_leader(self.leader_wait).await;
        }
        self.raft.leader()
    }

    /// Replicates `op` through raft and returns its apply result.
    ///
    /// # Errors
    /// [`Error::NoSpace`] when `op` would take the backend past its quota,
    /// [`Error::TooLarge`] past `--max-request-bytes`, [`Error::TooManyRequests`] when apply
    /// lags, [`Error::NoLeader`], [`Error::Timeout`], [`Error::Stopped`], or the apply error.
    pub async fn propose(&self, op: Op) -> Result<Response, Error> {
        self.check_quota(&op).await?;
        if self.raft.commit().saturating_sub(*self.applied.borrow()) > MAX_APPLY_LAG {
            return Err(Error::TooManyRequests);
        }
        // Who asks travels with the request: the auth wrapper checks it at apply.
        let auth = self.auth_header().await?;
        let id = self.ids.next();
        let data = InternalRequest { id, op: Some(op), auth }.encode_to_vec();
        if data.len() > usize::try_from(self.cfg.raw.max_request_bytes).unwrap_or(usize::MAX) {
            return Err(Error::TooLarge);
        }
        let rx = self.wait.register(id);
        // Pending from registration until this call returns, whatever the outcome.
        let _pending = crate::metrics::get()
            .map(|m| crate::metrics::GaugeGuard::new(&m.server.proposals_pending));
        // During an election the proposal waits for the new leader rather than failing at
        // once: raft would drop it, and etcd's clients do not retry a failed Put.
        self.await_leader().await;
        if let Err(e) = self.raft.propose(data).await {
            self.wait.cancel(id);
            count_failed_proposal();
            return Err(match e {
                crate::raft::Error::NoLeader => Error::NoLeader,
                _ => Error::Stopped,
            });
        }
        match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(result)) => Ok(result?),
            Ok(Err(_)) => Err(Error::Stopped),
            Err(_) => {
                self.wait.cancel(id);
                count_failed_proposal();
                Err(Error::Timeout)
            }
        }
    }
}

/// Counts a proposal that never produced an apply result (`etcd_server_proposals_failed_total`,
/// as etcd counts dropped and timed-out proposals; apply errors are results, not failures).
fn count_failed_proposal() {
    if let Some(m) = crate::metrics::get() {
        m.server.proposals_failed_total.inc();
    }
}
