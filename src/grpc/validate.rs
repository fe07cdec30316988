//! Request checks run before a request reaches the server, as etcd's `check*Request`
//! (server/etcdserver/api/v3rpc/key.go): the same order, the same errors.

use std::collections::HashSet;

use cairn_proto::etcdserverpb::{
    DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, range_request,
    request_op::Request,
};
use tonic::Status;

use super::status::{invalid, msg};

/// Checks a range request.
///
/// # Errors
/// Empty key or an unknown sort enum.
pub fn check_range(r: &RangeRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(invalid(msg::EMPTY_KEY));
    }
    if range_request::SortOrder::try_from(r.sort_order).is_err()
        || range_request::SortTarget::try_from(r.sort_target).is_err()
    {
        return Err(invalid(msg::INVALID_SORT_OPTION));
    }
    Ok(())
}

/// Checks a RangeStream request: a range request in the default key order and without
/// revision filters, since chunks are cut by key.
///
/// # Errors
/// As [`check_range`], plus InvalidArgument for sorting or revision filters.
pub fn check_range_stream(r: &RangeRequest) -> Result<(), Status> {
    check_range(r)?;
    let default_order = (r.sort_order == range_request::SortOrder::None as i32
        || r.sort_order == range_request::SortOrder::Ascend as i32)
        && r.sort_target == range_request::SortTarget::Key as i32;
    if !default_order {
        return Err(invalid("etcdserver: range stream supports only the default sort order"));
    }
    if r.min_mod_revision != 0
        || r.max_mod_revision != 0
        || r.min_create_revision != 0
        || r.max_create_revision != 0
    {
        return Err(invalid("etcdserver: range stream does not support revision filters"));
    }
    Ok(())
}

/// Checks a put request.
///
/// # Errors
/// Empty key, a value with `ignore_value`, a lease with `ignore_lease`.
pub fn check_put(r: &PutRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(invalid(msg::EMPTY_KEY));
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(invalid(msg::VALUE_PROVIDED));
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(invalid(msg::LEASE_PROVIDED));
    }
    Ok(())
}

/// Checks a delete request.
///
/// # Errors
/// Empty key.
pub fn check_delete(r: &DeleteRangeRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(invalid(msg::EMPTY_KEY));
    }
    Ok(())
}

/// Checks a txn: the op budget (nested txns draw on what their parent leaves), every
/// compare and op, then that no key is written twice in a branch.
///
/// # Errors
/// Too many ops, an invalid op, or a duplicate key.
pub fn check_txn(r: &TxnRequest, max_txn_ops: usize) -> Result<(), Status> {
    check_txn_ops(r, max_txn_ops)?;
    check_intervals(&r.success)?;
    check_intervals(&r.failure)?;
    Ok(())
}

fn check_txn_ops(r: &TxnRequest, max_txn_ops: usize) -> Result<(), Status> {
    let opc = r.compare.len().max(r.success.len()).max(r.failure.len());
    if opc > max_txn_ops {
        return Err(invalid(msg::TOO_MANY_OPS));
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(invalid(msg::EMPTY_KEY));
    }
    for op in r.success.iter().chain(&r.failure) {
        check_op(op, max_txn_ops - opc)?;
    }
    Ok(())
}

fn check_op(op: &RequestOp, budget: usize) -> Result<(), Status> {
    match op.request.as_ref() {
        Some(Request::RequestRange(r)) => check_range(r),
        Some(Request::RequestPut(r)) => check_put(r),
        Some(Request::RequestDeleteRange(r)) => check_delete(r),
        Some(Request::RequestTxn(r)) => check_txn_ops(r, budget),
        None => Err(invalid(msg::KEY_NOT_FOUND)),
    }
}

/// A half-open key interval `[start, end)`; `end == None` is unbounded, and a point is
/// `[k, k\0)`.
#[derive(Debug, Clone)]
struct Interval {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Interval {
    fn of_delete(key: &[u8], range_end: &[u8]) -> Interval {
        match range_end {
            [] => {
                let mut end = key.to_vec();
                end.push(0);
                Interval { start: key.to_vec(), end: Some(end) }
            }
            [0] => Interval { start: key.to_vec(), end: None },
            end => Interval { start: key.to_vec(), end: Some(end.to_vec()) },
        }
    }

    fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && self.end.as_ref().is_none_or(|e| key < e.as_slice())
    }
}

/// etcd's checkIntervals: a put may not hit a key another put or a delete of the same
/// branch (nested txns included) touches; puts in the two branches of one nested txn may
/// overlap, since only one branch runs.
fn check_intervals(ops: &[RequestOp]) -> Result<(HashSet<Vec<u8>>, Vec<Interval>), Status> {
    let mut dels: Vec<Interval> = ops
        .iter()
        .filter_map(|op| match op.request.as_ref() {
            Some(Request::RequestDeleteRange(d)) => Some(Interval::of_delete(&d.key, &d.range_end)),
            _ => None,
        })
        .collect();
    let hit = |dels: &[Interval], k: &[u8]| dels.iter().any(|d| d.contains(k));
    let mut puts: HashSet<Vec<u8>> = HashSet::new();
    for op in ops {
        let Some(Request::RequestTxn(t)) = op.request.as_ref() else { continue };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || hit(&dels, k) {
                return Err(invalid(msg::DUPLICATE_KEY));
            }
            puts.insert(k.clone());
        }
        for k in puts_else {
            if (puts.contains(&k) && !puts_then.contains(&k)) || hit(&dels, &k) {
                return Err(invalid(msg::DUPLICATE_KEY));
            }
            puts.insert(k);
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        let Some(Request::RequestPut(p)) = op.request.as_ref() else { continue };
        if puts.contains(&p.key) || hit(&dels, &p.key) {
            return Err(invalid(msg::DUPLICATE_KEY));
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest { key: k.into(), ..Default::default() })),
        }
    }
    fn del(k: &str, end: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: k.into(),
                range_end: end.into(),
                ..Default::default()
            })),
        }
    }
    fn txn(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestTxn(TxnRequest { compare: vec![], success, failure })),
        }
    }

    #[test]
    fn duplicate_puts_and_put_inside_delete_are_refused() {
        let cases: Vec<(Vec<RequestOp>, bool)> = vec![
            (vec![put("a"), put("b")], true),
            (vec![put("a"), put("a")], false),
            (vec![put("b"), del("a", "c")], false),
            (vec![put("c"), del("a", "c")], true),
            (vec![del("a", ""), del("a", "")], true),
            (vec![txn(vec![put("a")], vec![put("a")])], true),
            (vec![put("a"), txn(vec![put("a")], vec![])], false),
            (vec![del("a", "\0"), txn(vec![put("z")], vec![])], false),
        ];
        for (ops, ok) in cases {
            let r = TxnRequest { compare: vec![], success: ops, failure: vec![] };
            assert_eq!(check_txn(&r, 128).is_ok(), ok, "{r:?}");
        }
    }

    #[test]
    fn nested_txns_share_the_op_budget() {
        let inner = txn(vec![put("x"), put("y")], vec![]);
        let r = TxnRequest { compare: vec![], success: vec![put("a"), inner], failure: vec![] };
        assert!(check_txn(&r, 3).is_err());
        assert!(check_txn(&r, 4).is_ok());
        let r = TxnRequest { compare: vec![], success: vec![put("a"); 3], failure: vec![] };
        assert_eq!(check_txn(&r, 2).unwrap_err().message(), msg::TOO_MANY_OPS);
    }
}
