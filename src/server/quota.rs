//! The backend quota and alarms: before a request that grows the database is proposed,
//! the member compares its state machine's size on disk plus the request's cost with
//! `--quota-backend-bytes`; over it, it raises a NOSPACE alarm through raft and refuses the
//! request (etcd's `quotaAlarmer`, api/v3rpc/quota.go, with etcd's cost model from
//! server/storage/quota.go). While the alarm is raised, apply's alarm wrapper refuses such
//! requests on every member (`apply::alarm`).

use cairn_proto::etcdserverpb::{AlarmRequest, AlarmType, PutRequest, RequestOp, TxnRequest};
use cairn_proto::etcdserverpb::{alarm_request::AlarmAction, request_op};
use cairn_proto::internal::internal_request::Op;

use super::{Error, Server};
use crate::apply::Response;

/// etcd's per-key overhead in the cost of a put.
const KV_OVERHEAD: u64 = 256;
/// etcd's cost of a lease grant.
const LEASE_OVERHEAD: u64 = 64;

/// One raised alarm: the member and etcd's `AlarmType` number.
pub type Alarm = (u64, i32);

fn cost_put(r: &PutRequest) -> u64 {
    KV_OVERHEAD + r.key.len() as u64 + r.value.len() as u64
}

fn cost_ops(ops: &[RequestOp]) -> u64 {
    ops.iter()
        .map(|op| match &op.request {
            Some(request_op::Request::RequestPut(p)) => cost_put(p),
            Some(request_op::Request::RequestTxn(t)) => cost_txn(t),
            _ => 0,
        })
        .sum()
}

fn cost_txn(r: &TxnRequest) -> u64 {
    cost_ops(&r.success).max(cost_ops(&r.failure))
}

/// etcd's `BackendQuota.Cost`: how much `op` may grow the database (0 for the rest).
fn cost(op: &Op) -> u64 {
    match op {
        Op::Put(p) => cost_put(p),
        Op::Txn(t) => cost_txn(t),
        Op::LeaseGrant(_) => LEASE_OVERHEAD,
        _ => 0,
    }
}

impl Server {
    /// Refuses `op` with [`Error::NoSpace`], after raising a NOSPACE alarm for this member,
    /// when it would take the state machine past the quota.
    ///
    /// # Errors
    /// [`Error::NoSpace`].
    pub(super) async fn check_quota(&self, op: &Op) -> Result<(), Error> {
        let cost = cost(op);
        if cost == 0 {
            return Ok(());
        }
        let size = self.engine.size_on_disk().unwrap_or(0);
        if size.saturating_add(cost) < self.cfg.quota_backend_bytes {
            return Ok(());
        }
        tracing::warn!(
            size,
            quota = self.cfg.quota_backend_bytes,
            "backend quota exceeded; raising NOSPACE"
        );
        let raise = Op::Alarm(AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: self.header.member_id,
            alarm: AlarmType::Nospace as i32,
        });
        // As etcd, the refusal does not depend on the alarm's own proposal succeeding.
        if let Err(e) = Box::pin(self.propose(raise)).await {
            tracing::warn!(error = %e, "cannot raise the NOSPACE alarm");
        }
        Err(Error::NoSpace)
    }

    /// etcd's `Alarm`: `action` (etcd's `AlarmAction` number) raises, clears or lists
    /// alarms through raft; returns the alarms raised or cleared, or all of them for GET.
    ///
    /// # Errors
    /// The proposal's errors.
    pub async fn alarm(
        &self,
        action: i32,
        member_id: u64,
        alarm: i32,
    ) -> Result<Vec<Alarm>, Error> {
        match self.propose(Op::Alarm(AlarmRequest { action, member_id, alarm })).await? {
            Response::Alarms(list) => Ok(list),
            other => Err(Error::Internal(format!("alarm request answered with {other:?}"))),
        }
    }

    /// The alarms raised as of this member's applied index.
    pub fn alarms(&self) -> Vec<Alarm> {
        self.alarms.list()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_follow_etcds_model() {
        let put = |k: &str, v: &str| RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: k.into(),
                value: v.into(),
                ..Default::default()
            })),
        };
        assert_eq!(
            cost(&Op::Put(PutRequest {
                key: b"k".to_vec(),
                value: b"vv".to_vec(),
                ..Default::default()
            })),
            259
        );
        let txn = TxnRequest {
            compare: vec![],
            success: vec![put("a", "1")],
            failure: vec![put("a", "1"), put("b", "2")],
        };
        assert_eq!(cost(&Op::Txn(txn)), 2 * 258, "the larger branch counts");
        assert_eq!(cost(&Op::Txn(TxnRequest::default())), 0);
        assert_eq!(cost(&Op::LeaseGrant(Default::default())), 64);
    }
}
