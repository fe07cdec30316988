//! Routes one replicated request to the state machine that owns it.

use cairn_proto::internal::internal_request::Op;

use super::{Error, Response, convert};
use crate::lease::Lessor;
use crate::mvcc::{self, WriteTxn};

/// Applies `op` inside `txn`. Lease revokes must start a fresh `txn` (see `Applier`), so
/// the keys attached by earlier entries are known.
pub(super) fn apply(
    txn: &mut WriteTxn<'_>,
    leases: &Lessor,
    op: Option<Op>,
) -> Result<Response, Error> {
    match op {
        Some(Op::LeaseGrant(r)) => {
            let ttl = leases.grant(r.id, r.ttl, txn.batch_mut())?;
            Ok(Response::LeaseGrant { id: r.id, ttl })
        }
        Some(Op::LeaseRevoke(r)) => {
            let keys = leases.revoke(r.id, txn.batch_mut())?;
            // Every attached key goes at one revision, one DELETE event each.
            let deletes = keys
                .into_iter()
                .map(|key| {
                    mvcc::TxnOp::DeleteRange(mvcc::DeleteRangeRequest { key, ..Default::default() })
                })
                .collect();
            txn.txn(
                &mvcc::TxnRequest { compare: vec![], success: deletes, failure: vec![] },
                leases,
            )?;
            Ok(Response::LeaseRevoke)
        }
        Some(Op::LeaseCheckpoint(r)) => {
            for cp in r.checkpoints {
                leases.checkpoint(cp.id, cp.remaining_ttl, txn.batch_mut());
            }
            Ok(Response::LeaseCheckpoint)
        }
        Some(Op::Put(r)) => Ok(Response::Put(txn.put(&convert::put_request(&r), leases)?)),
        Some(Op::DeleteRange(r)) => {
            Ok(Response::DeleteRange(txn.delete_range(&convert::delete_range_request(&r))?))
        }
        Some(Op::Txn(r)) => Ok(Response::Txn(txn.txn(&convert::txn_request(&r)?, leases)?)),
        Some(Op::Compaction(r)) => {
            txn.compact(r.revision)?;
            Ok(Response::Compact)
        }
        None => Err(Error::Convert(convert::ConvertError::EmptyOp)),
    }
}
