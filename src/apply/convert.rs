//! Conversions from etcd's request messages to mvcc's domain requests.
//!
//! This is the one place where etcd request protos become domain values: apply uses it for
//! replicated entries and the gRPC edge for reads, so a request means the same on both paths.
//! Enum values out of range are reported, never guessed.

use cairn_proto::etcdserverpb as pb;
use pb::compare::{CompareResult as PbResult, CompareTarget as PbTarget, TargetUnion};
use pb::range_request::{SortOrder as PbOrder, SortTarget as PbSortTarget};
use pb::request_op::Request;

use crate::mvcc;

/// A request that cannot be expressed in domain terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// `sort_order` or `sort_target` is not one of etcd's values.
    #[error("invalid sort option")]
    InvalidSortOption,
    /// A compare's `result` or `target` is not one of etcd's values.
    #[error("invalid compare")]
    InvalidCompare,
    /// A txn op carries no request.
    #[error("empty txn op")]
    EmptyOp,
}

/// Converts a range request.
///
/// # Errors
/// [`ConvertError::InvalidSortOption`] for unknown sort enums.
pub fn range_request(r: &pb::RangeRequest) -> Result<mvcc::RangeRequest, ConvertError> {
    let sort_order =
        match PbOrder::try_from(r.sort_order).map_err(|_| ConvertError::InvalidSortOption)? {
            PbOrder::None => mvcc::SortOrder::None,
            PbOrder::Ascend => mvcc::SortOrder::Ascend,
            PbOrder::Descend => mvcc::SortOrder::Descend,
        };
    let sort_target =
        match PbSortTarget::try_from(r.sort_target).map_err(|_| ConvertError::InvalidSortOption)? {
            PbSortTarget::Key => mvcc::SortTarget::Key,
            PbSortTarget::Version => mvcc::SortTarget::Version,
            PbSortTarget::Create => mvcc::SortTarget::Create,
            PbSortTarget::Mod => mvcc::SortTarget::Mod,
            PbSortTarget::Value => mvcc::SortTarget::Value,
        };
    Ok(mvcc::RangeRequest {
        key: r.key.clone(),
        range_end: r.range_end.clone(),
        limit: r.limit,
        revision: r.revision,
        sort_order,
        sort_target,
        keys_only: r.keys_only,
        count_only: r.count_only,
        min_mod_revision: r.min_mod_revision,
        max_mod_revision: r.max_mod_revision,
        min_create_revision: r.min_create_revision,
        max_create_revision: r.max_create_revision,
    })
}

/// Converts a put request.
pub fn put_request(r: &pb::PutRequest) -> mvcc::PutRequest {
    mvcc::PutRequest {
        key: r.key.clone(),
        value: r.value.clone(),
        lease: r.lease,
        prev_kv: r.prev_kv,
        ignore_value: r.ignore_value,
        ignore_lease: r.ignore_lease,
    }
}

/// Converts a delete-range request.
pub fn delete_range_request(r: &pb::DeleteRangeRequest) -> mvcc::DeleteRangeRequest {
    mvcc::DeleteRangeRequest {
        key: r.key.clone(),
        range_end: r.range_end.clone(),
        prev_kv: r.prev_kv,
    }
}

/// Converts one compare. As in etcd, `target` selects the field and the operand comes from
/// the matching `target_union` member, or is zero when another member (or none) is set.
///
/// # Errors
/// [`ConvertError::InvalidCompare`] for unknown enums.
pub fn compare(c: &pb::Compare) -> Result<mvcc::Compare, ConvertError> {
    let result = match PbResult::try_from(c.result).map_err(|_| ConvertError::InvalidCompare)? {
        PbResult::Equal => mvcc::CompareResult::Equal,
        PbResult::Greater => mvcc::CompareResult::Greater,
        PbResult::Less => mvcc::CompareResult::Less,
        PbResult::NotEqual => mvcc::CompareResult::NotEqual,
    };
    let u = c.target_union.as_ref();
    let target = match PbTarget::try_from(c.target).map_err(|_| ConvertError::InvalidCompare)? {
        PbTarget::Version => mvcc::CompareTarget::Version(match u {
            Some(TargetUnion::Version(v)) => *v,
            _ => 0,
        }),
        PbTarget::Create => mvcc::CompareTarget::Create(match u {
            Some(TargetUnion::CreateRevision(v)) => *v,
            _ => 0,
        }),
        PbTarget::Mod => mvcc::CompareTarget::Mod(match u {
            Some(TargetUnion::ModRevision(v)) => *v,
            _ => 0,
        }),
        PbTarget::Value => mvcc::CompareTarget::Value(match u {
            Some(TargetUnion::Value(v)) => v.clone(),
            _ => Vec::new(),
        }),
        PbTarget::Lease => mvcc::CompareTarget::Lease(match u {
            Some(TargetUnion::Lease(v)) => *v,
            _ => 0,
        }),
    };
    Ok(mvcc::Compare { key: c.key.clone(), range_end: c.range_end.clone(), result, target })
}

/// Converts a txn request, nested txns included.
///
/// # Errors
/// Any [`ConvertError`] of its parts.
pub fn txn_request(r: &pb::TxnRequest) -> Result<mvcc::TxnRequest, ConvertError> {
    let ops = |ops: &[pb::RequestOp]| -> Result<Vec<mvcc::TxnOp>, ConvertError> {
        ops.iter()
            .map(|op| match op.request.as_ref() {
                Some(Request::RequestRange(r)) => Ok(mvcc::TxnOp::Range(range_request(r)?)),
                Some(Request::RequestPut(r)) => Ok(mvcc::TxnOp::Put(put_request(r))),
                Some(Request::RequestDeleteRange(r)) => {
                    Ok(mvcc::TxnOp::DeleteRange(delete_range_request(r)))
                }
                Some(Request::RequestTxn(r)) => Ok(mvcc::TxnOp::Txn(txn_request(r)?)),
                None => Err(ConvertError::EmptyOp),
            })
            .collect()
    };
    Ok(mvcc::TxnRequest {
        compare: r.compare.iter().map(compare).collect::<Result<_, _>>()?,
        success: ops(&r.success)?,
        failure: ops(&r.failure)?,
    })
}
