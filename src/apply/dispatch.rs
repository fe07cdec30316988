//! Routes one replicated request to the state machine that owns it.

use cairn_proto::internal::internal_request::Op;

use super::{Error, Response, convert};
use crate::mvcc::{LeaseLookup, WriteTxn};

/// The lease view until leases exist: none does, so a put naming a lease is refused with
/// etcd's "requested lease not found".
struct NoLeases;

impl LeaseLookup for NoLeases {
    fn lease_exists(&self, _id: i64) -> bool {
        false
    }
}

/// Applies `op` inside `txn`.
pub(super) fn apply(txn: &mut WriteTxn<'_>, op: Option<Op>) -> Result<Response, Error> {
    match op {
        Some(Op::Put(r)) => Ok(Response::Put(txn.put(&convert::put_request(&r), &NoLeases)?)),
        Some(Op::DeleteRange(r)) => {
            Ok(Response::DeleteRange(txn.delete_range(&convert::delete_range_request(&r))?))
        }
        Some(Op::Txn(r)) => Ok(Response::Txn(txn.txn(&convert::txn_request(&r)?, &NoLeases)?)),
        Some(Op::Compaction(r)) => {
            txn.compact(r.revision)?;
            Ok(Response::Compact)
        }
        None => Err(Error::Convert(convert::ConvertError::EmptyOp)),
    }
}
