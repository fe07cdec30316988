//! Lease operations and the leader's lease loops.
//!
//! Grants and revokes go through raft. Renewals do not (etcd's design): the leader resets
//! its clock and answers, except when the lease carries a checkpointed remaining TTL, which a
//! renewal must first reset through raft so that a restart cannot shorten the renewed lease.
//! The expiry loop runs on every member but acts only while it leads: expired leases are
//! revoked by proposals, at most `REVOKE_RATE` per second (etcd's `defaultLeaseRevokeRate`),
//! so a mass expiry cannot stall other writes. The checkpoint loop records remaining TTLs
//! through raft every `--experimental-lease-checkpoint-interval`, at most `CHECKPOINT_RATE`
//! leases per second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_proto::etcdserverpb::{
    LeaseCheckpoint, LeaseCheckpointRequest, LeaseGrantRequest, LeaseRevokeRequest,
};
use cairn_proto::internal::internal_request::Op;

use super::{Error, Server};
use crate::apply::Response;
use crate::lease::LeaseId;

/// Leases revoked per second at most (etcd's `defaultLeaseRevokeRate`).
const REVOKE_RATE: usize = 1000;
/// Lease checkpoints per second at most (etcd's `leaseCheckpointRate`).
const CHECKPOINT_RATE: usize = 1000;
/// How often the expiry loop looks: well inside the 500 ms an idle member may take to
/// revoke an expired lease.
const EXPIRY_TICK: Duration = Duration::from_millis(100);

/// What `LeaseTimeToLive` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeToLive {
    /// Seconds left (floored, so the lease ends within TTL+1 s).
    pub remaining: i64,
    /// The granted TTL in seconds.
    pub granted: i64,
    /// Attached keys.
    pub keys: Vec<Vec<u8>>,
}

impl Server {
    /// Grants a lease of `ttl` seconds under `id`, or under an id the server picks when
    /// `id` is 0. Returns `(id, granted ttl)`.
    ///
    /// # Errors
    /// The lessor's errors (exists, TTL too large) or the proposal's.
    pub async fn lease_grant(&self, id: LeaseId, ttl: i64) -> Result<(LeaseId, i64), Error> {
        let id = if id == 0 {
            // Positive and non-zero, as etcd's `reqIDGen.Next() & (1<<63 - 1)`.
            i64::try_from(self.ids.next() & (u64::MAX >> 1)).unwrap_or(1).max(1)
        } else {
            id
        };
        match self.propose(Op::LeaseGrant(LeaseGrantRequest { id, ttl })).await? {
            Response::LeaseGrant { id, ttl } => Ok((id, ttl)),
            _ => Err(Error::Internal("unexpected apply result for a lease grant".into())),
        }
    }

    /// Revokes lease `id`, deleting its keys.
    ///
    /// # Errors
    /// Not found, or the proposal's errors.
    pub async fn lease_revoke(&self, id: LeaseId) -> Result<(), Error> {
        self.propose(Op::LeaseRevoke(LeaseRevokeRequest { id })).await?;
        Ok(())
    }

    /// Renews lease `id`; returns its TTL, or 0 when the lease is unknown or expired.
    ///
    /// # Errors
    /// [`Error::NoLeader`] when this member does not lead (followers forward renewals to
    /// the leader once clusters exist), or the checkpoint proposal's errors.
    pub async fn lease_renew(&self, id: LeaseId) -> Result<i64, Error> {
        let is_leader = self.raft.is_leader();
        let ttl = {
            let mut clock = self.lease_clock();
            clock.sync(&self.leases, is_leader, Instant::now());
            if !clock.leading() {
                return Err(Error::NoLeader);
            }
            match clock.renew(id, Instant::now()) {
                Some(ttl) => ttl,
                None => return Ok(0),
            }
        };
        // A checkpointed remaining TTL would outlive this renewal across a restart and cut
        // the lease short: reset it through raft before acknowledging.
        if self.leases.get(id).is_some_and(|l| l.remaining != 0) {
            let checkpoint = LeaseCheckpoint { id, remaining_ttl: 0 };
            self.propose(Op::LeaseCheckpoint(LeaseCheckpointRequest {
                checkpoints: vec![checkpoint],
            }))
            .await?;
        }
        Ok(ttl)
    }

    /// Reports lease `id`'s remaining and granted TTL, or `None` when it does not exist.
    pub fn lease_time_to_live(&self, id: LeaseId) -> Option<TimeToLive> {
        let info = self.leases.get(id)?;
        let now = Instant::now();
        let remaining = {
            let mut clock = self.lease_clock();
            clock.sync(&self.leases, self.raft.is_leader(), now);
            clock.remaining(id, now)
        };
        let remaining = match remaining {
            Some(left) => i64::try_from(left.as_secs()).unwrap_or(info.ttl),
            // Not counting time here: the checkpoint is the best knowledge.
            None if info.remaining > 0 => info.remaining,
            None => info.ttl,
        };
        Some(TimeToLive { remaining, granted: info.ttl, keys: info.keys })
    }

    /// Every lease id, ascending.
    pub fn lease_ids(&self) -> Vec<LeaseId> {
        self.leases.ids()
    }

    fn lease_clock(&self) -> std::sync::MutexGuard<'_, crate::lease::queue::LeaderClock> {
        self.lease_clock.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs the expiry and checkpoint loops until the server stops.
pub(super) async fn run(server: Arc<Server>, checkpoint_every: Option<Duration>) {
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let per_tick =
        REVOKE_RATE / (1000 / usize::try_from(EXPIRY_TICK.as_millis()).unwrap_or(100)).max(1);
    let mut next_checkpoint = checkpoint_every.map(|d| Instant::now() + d);
    let checkpointing = Arc::new(tokio::sync::Semaphore::new(1));
    loop {
        tick.tick().await;
        let now = Instant::now();
        let is_leader = server.raft.is_leader();
        let (expired, checkpoints) = {
            let mut clock = server.lease_clock();
            clock.sync(&server.leases, is_leader, now);
            let expired = clock.expired(now, per_tick);
            let due = match (checkpoint_every, next_checkpoint) {
                (Some(every), Some(at)) if now >= at => {
                    next_checkpoint = Some(now + every);
                    clock.leading()
                }
                _ => false,
            };
            let cps = if due {
                checkpoint_every.map(|every| clock.checkpoints(now, every))
            } else {
                None
            };
            (expired, cps)
        };
        for id in expired {
            let server = server.clone();
            tokio::spawn(async move {
                match server.lease_revoke(id).await {
                    Ok(()) => tracing::debug!(lease = id, "revoked expired lease"),
                    // The clock retries after a pause; a lease already gone needs nothing.
                    Err(e) => {
                        tracing::debug!(lease = id, error = %e, "expired lease revoke failed")
                    }
                }
            });
        }
        if let Some(cps) = checkpoints.filter(|c| !c.is_empty()) {
            // One round at a time, at a bounded rate.
            if let Ok(permit) = checkpointing.clone().try_acquire_owned() {
                let server = server.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    for (i, chunk) in cps.chunks(CHECKPOINT_RATE).enumerate() {
                        // The rate limit spaces chunks; sleeping after the last one would
                        // hold the permit into the next round and make it skip.
                        if i > 0 {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        let checkpoints = chunk
                            .iter()
                            .map(|(id, remaining_ttl)| LeaseCheckpoint {
                                id: *id,
                                remaining_ttl: *remaining_ttl,
                            })
                            .collect();
                        let op = Op::LeaseCheckpoint(LeaseCheckpointRequest { checkpoints });
                        if let Err(e) = server.propose(op).await {
                            tracing::warn!(error = %e, "lease checkpoint failed");
                            return;
                        }
                    }
                });
            }
        }
    }
}
