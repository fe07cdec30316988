//! Transactions: compare evaluation, branch choice and execution (etcd's
//! `server/etcdserver/txn/txn.go`).
//!
//! A txn runs in three steps, each mirroring etcd:
//!
//! 1. **Plan.** Every compare, nested txns' included, is evaluated against the state
//!    before the txn (etcd's `compareToPath` reads one view for the whole tree), which
//!    picks the branch at every level. Nested compares therefore never see the outer
//!    txn's own writes.
//! 2. **Check.** The puts of every chosen branch are checked for `KeyNotFound` and
//!    `LeaseNotFound`, then the ranges for future or compacted revisions (etcd's
//!    `checkRequests`, puts first). A failure here returns before anything is written.
//! 3. **Execute.** Ops run in order at one main revision with increasing sub-revisions,
//!    nested txns sharing the counter. A range after a write reads the txn's own revision,
//!    so it sees the writes. Should an op still fail (a storage error, or a put with
//!    `ignore_value` on a key an earlier op of the same txn deleted, which etcd's gRPC
//!    layer rejects as a duplicate key), the whole txn is rolled back.

use super::index::KeyRange;
use super::range::View;
use super::write::Stamp;
use super::{
    Compare, CompareResult, CompareTarget, DeleteRangeRequest, Error, LeaseLookup, PutRequest,
    RangeRequest, Result, TxnOp, TxnOpResult, TxnRequest, TxnResult, WriteTxn,
};

/// The branch chosen at one level of a txn, with the plans of its nested txns.
struct Plan<'r> {
    succeeded: bool,
    steps: Vec<Step<'r>>,
}

/// One op of a chosen branch.
enum Step<'r> {
    Range(&'r RangeRequest),
    Put(&'r PutRequest),
    Delete(&'r DeleteRangeRequest),
    Txn(Plan<'r>),
}

impl WriteTxn<'_> {
    /// Runs a txn as one request: if every compare holds, `success` runs, else `failure`;
    /// writes share one new revision, and a txn that only reads takes none.
    ///
    /// `TxnResult::revision` is the new revision when the txn wrote, else the current one.
    /// Nested results carry the revision the txn had reached when they finished.
    ///
    /// # Errors
    /// [`Error::KeyNotFound`] / [`Error::LeaseNotFound`] for a put of a chosen branch,
    /// [`Error::FutureRevision`] / [`Error::Compacted`] for a range of a chosen branch at a
    /// bad revision, and storage or corruption errors. Nothing changes on error.
    pub fn txn(&mut self, req: &TxnRequest, leases: &dyn LeaseLookup) -> Result<TxnResult> {
        let plan = {
            let st = self.inner.read_state();
            let view = self.view(&st, self.current_rev);
            let plan = plan(&view, req)?;
            check_puts(&view, &plan, leases)?;
            check_ranges(&view, &plan)?;
            plan
        };
        let mut stamp = Stamp::after(self.current_rev);
        let mark = self.mark();
        let result = self.execute(&plan, &mut stamp);
        let mut result = self.finish(mark, stamp, result)?;
        result.revision = self.current_rev;
        Ok(result)
    }

    /// Executes a planned branch; nested txns recurse with the same stamp.
    fn execute(&mut self, plan: &Plan<'_>, stamp: &mut Stamp) -> Result<TxnResult> {
        let mut responses = Vec::with_capacity(plan.steps.len());
        for step in &plan.steps {
            let response = match step {
                Step::Range(r) => {
                    let st = self.inner.read_state();
                    TxnOpResult::Range(self.view(&st, stamp.read_rev()).range(r)?)
                }
                Step::Put(p) => TxnOpResult::Put(self.put_at(stamp, p)?),
                Step::Delete(d) => TxnOpResult::DeleteRange(self.delete_at(stamp, d)?),
                Step::Txn(nested) => TxnOpResult::Txn(self.execute(nested, stamp)?),
            };
            responses.push(response);
        }
        Ok(TxnResult { succeeded: plan.succeeded, responses, revision: stamp.read_rev() })
    }
}

/// Evaluates the compares of `req` and of the nested txns of the chosen branches, all
/// against `view`.
fn plan<'r>(view: &View<'_>, req: &'r TxnRequest) -> Result<Plan<'r>> {
    let mut succeeded = true;
    for c in &req.compare {
        if !compare_holds(view, c)? {
            succeeded = false;
            break;
        }
    }
    let ops = if succeeded { &req.success } else { &req.failure };
    let steps = ops
        .iter()
        .map(|op| {
            Ok(match op {
                TxnOp::Range(r) => Step::Range(r),
                TxnOp::Put(p) => Step::Put(p),
                TxnOp::DeleteRange(d) => Step::Delete(d),
                TxnOp::Txn(t) => Step::Txn(plan(view, t)?),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Plan { succeeded, steps })
}

/// Checks every put of the plan against the state before the txn (etcd's
/// `checkRequestPut`): flags that need an existing key, then the lease.
fn check_puts(view: &View<'_>, plan: &Plan<'_>, leases: &dyn LeaseLookup) -> Result<()> {
    for step in &plan.steps {
        match step {
            Step::Put(p) => {
                if (p.ignore_value || p.ignore_lease) && view.index.get(&p.key, view.rev).is_none()
                {
                    return Err(Error::KeyNotFound);
                }
                if !p.ignore_lease && p.lease != 0 && !leases.lease_exists(p.lease) {
                    return Err(Error::LeaseNotFound);
                }
            }
            Step::Txn(nested) => check_puts(view, nested, leases)?,
            Step::Range(_) | Step::Delete(_) => {}
        }
    }
    Ok(())
}

/// Checks the revision of every range of the plan against the state before the txn (etcd's
/// `checkRequestRange`): a range cannot ask for the revision the txn itself creates.
fn check_ranges(view: &View<'_>, plan: &Plan<'_>) -> Result<()> {
    for step in &plan.steps {
        match step {
            Step::Range(r) if r.revision > 0 => {
                view.read_revision(r.revision)?;
            }
            Step::Txn(nested) => check_ranges(view, nested)?,
            Step::Range(_) | Step::Put(_) | Step::Delete(_) => {}
        }
    }
    Ok(())
}

/// Evaluates one compare at the view's revision (etcd's `applyCompare`).
///
/// Every live key of the range must satisfy it. With no live key, a value compare fails
/// (there is no value to compare) and any other compares the operand with 0, as against
/// a missing key: that is how `mod == 0` tests absence, over a single key or a range.
fn compare_holds(view: &View<'_>, c: &Compare) -> Result<bool> {
    let mut seen = false;
    let mut holds = true;
    let mut failure = None;
    view.index.visit_live(KeyRange::new(&c.key, &c.range_end), view.rev, |_, state| {
        seen = true;
        // Version, create and mod revisions come from the index; value and lease need the
        // stored record.
        let loaded = |with_value| view.load(state.modified, with_value);
        let ordering = match &c.target {
            CompareTarget::Version(v) => state.version.cmp(v),
            CompareTarget::Create(v) => state.created.cmp(v),
            CompareTarget::Mod(v) => state.modified.main.cmp(v),
            CompareTarget::Value(v) => match loaded(true) {
                Ok(kv) => kv.value.as_slice().cmp(v.as_slice()),
                Err(e) => {
                    failure = Some(e);
                    return false;
                }
            },
            CompareTarget::Lease(v) => match loaded(false) {
                Ok(kv) => kv.lease.cmp(v),
                Err(e) => {
                    failure = Some(e);
                    return false;
                }
            },
        };
        holds = relation_holds(c.result, ordering);
        holds
    });
    if let Some(e) = failure {
        return Err(e);
    }
    if seen {
        return Ok(holds);
    }
    Ok(match &c.target {
        CompareTarget::Value(_) => false,
        CompareTarget::Version(v)
        | CompareTarget::Create(v)
        | CompareTarget::Mod(v)
        | CompareTarget::Lease(v) => relation_holds(c.result, 0.cmp(v)),
    })
}

/// Returns whether `field ? operand` holds, given `field.cmp(operand)`.
fn relation_holds(result: CompareResult, ordering: std::cmp::Ordering) -> bool {
    use std::cmp::Ordering::{Equal, Greater, Less};
    match result {
        CompareResult::Equal => ordering == Equal,
        CompareResult::NotEqual => ordering != Equal,
        CompareResult::Greater => ordering == Greater,
        CompareResult::Less => ordering == Less,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{
        Leases, NoLeases, del_req, put, put_req, range_req, rng, rows, store,
    };
    use super::super::*;

    /// a = "1" (create 2, mod 2, version 1); b = "3" (create 3, mod 4, version 2);
    /// l = "x" with lease 9 (create 5).
    fn fixture() -> KvStore {
        let kv = store();
        put(&kv, "a", "1");
        put(&kv, "b", "2");
        put(&kv, "b", "3");
        let mut w = kv.write();
        w.put(&PutRequest { lease: 9, ..put_req("l", "x") }, &Leases(&[9])).unwrap();
        w.commit().unwrap();
        kv
    }

    fn cmp(key: &str, end: &str, target: CompareTarget, result: CompareResult) -> Compare {
        Compare { key: key.into(), range_end: end.into(), result, target }
    }

    fn run(kv: &KvStore, req: &TxnRequest) -> Result<(TxnResult, Vec<Event>)> {
        let mut w = kv.write();
        let res = w.txn(req, &Leases(&[9]))?;
        Ok((res, w.commit()?))
    }

    #[test]
    fn compares_cover_every_target_and_relation() {
        use CompareResult::{Equal, Greater, Less, NotEqual};
        use CompareTarget::{Create, Lease, Mod, Value, Version};
        let v = |s: &str| Value(s.into());
        let table = [
            (cmp("a", "", Version(1), Equal), true),
            (cmp("a", "", Version(0), Greater), true),
            (cmp("a", "", Version(1), Less), false),
            (cmp("a", "", Version(1), NotEqual), false),
            (cmp("a", "", Create(2), Equal), true),
            (cmp("a", "", Create(3), Less), true),
            (cmp("b", "", Mod(4), Equal), true),
            (cmp("b", "", Mod(4), Less), false),
            (cmp("b", "", Mod(3), Greater), true),
            (cmp("b", "", v("3"), Equal), true),
            (cmp("b", "", v("2"), Greater), true),
            (cmp("b", "", v("2"), Less), false),
            (cmp("b", "", v("3"), NotEqual), false),
            (cmp("b", "", v("30"), Less), true),
            (cmp("l", "", Lease(9), Equal), true),
            (cmp("a", "", Lease(0), Equal), true),
            (cmp("l", "", Lease(9), Greater), false),
            // A missing key has zero version, revisions and lease, and no value at all.
            (cmp("missing", "", Mod(0), Equal), true),
            (cmp("missing", "", Version(0), Greater), false),
            (cmp("missing", "", Lease(0), Equal), true),
            (cmp("missing", "", v(""), Equal), false),
            (cmp("missing", "", v("x"), NotEqual), false),
            // Range compares hold when every live key in the range holds.
            (cmp("a", "c", Version(0), Greater), true),
            (cmp("a", "c", Version(1), Equal), false),
            (cmp("a", "c", Create(3), Less), false),
            (cmp("a", "\0", Mod(100), Less), true),
            (cmp("\0", "\0", v("0"), Greater), true),
            // Over no key, etcd compares against an empty key-value (value compares fail).
            (cmp("x", "z", Version(0), Equal), true),
            (cmp("x", "z", Version(0), Greater), false),
            (cmp("x", "z", v(""), Equal), false),
        ];
        for (compare, want) in table {
            let kv = fixture();
            let req = TxnRequest {
                compare: vec![compare.clone()],
                success: vec![TxnOp::Put(put_req("s", "1"))],
                failure: vec![TxnOp::Range(range_req("a", "", 0))],
            };
            let (res, events) = run(&kv, &req).unwrap();
            assert_eq!(res.succeeded, want, "{compare:?}");
            // The failure branch only reads, so it takes no revision.
            assert_eq!((res.revision, events.len()), if want { (6, 1) } else { (5, 0) });
        }
    }

    #[test]
    fn compares_are_a_conjunction() {
        let kv = fixture();
        let holds = cmp("a", "", CompareTarget::Version(1), CompareResult::Equal);
        let fails = cmp("b", "", CompareTarget::Version(1), CompareResult::Equal);
        for (compares, want) in
            [(vec![], true), (vec![holds.clone()], true), (vec![holds, fails], false)]
        {
            let req = TxnRequest { compare: compares, ..TxnRequest::default() };
            assert_eq!(run(&kv, &req).unwrap().0.succeeded, want);
        }
    }

    #[test]
    fn a_txn_writes_at_one_revision_and_reads_its_own_writes() {
        let kv = fixture();
        let req = TxnRequest {
            compare: vec![],
            success: vec![
                TxnOp::Range(range_req("x", "", 0)),
                TxnOp::Put(put_req("x", "1")),
                TxnOp::Range(range_req("x", "", 0)),
                TxnOp::Put(PutRequest { prev_kv: true, ..put_req("x", "2") }),
                TxnOp::DeleteRange(del_req("a", "c")),
                TxnOp::Range(range_req("\0", "\0", 0)),
                TxnOp::DeleteRange(del_req("nothing", "")),
            ],
            failure: vec![],
        };
        let (res, events) = run(&kv, &req).unwrap();
        assert_eq!(res.revision, 6);
        let TxnResult { responses, .. } = res;
        let [
            TxnOpResult::Range(before),
            TxnOpResult::Put(p1),
            TxnOpResult::Range(after),
            TxnOpResult::Put(p2),
            TxnOpResult::DeleteRange(d),
            TxnOpResult::Range(everything),
            TxnOpResult::DeleteRange(none),
        ] = responses.as_slice()
        else {
            panic!("{responses:?}");
        };
        assert_eq!((before.count, before.revision), (0, 5));
        assert_eq!((p1.revision, p1.prev_kv.is_none()), (6, true));
        assert_eq!(rows(&after.kvs), vec![("x".into(), "1".into(), 6, 6, 1, 0)]);
        assert_eq!(after.revision, 6);
        assert_eq!(p2.prev_kv.as_ref().map(|p| p.version), Some(1));
        assert_eq!((d.deleted, d.revision), (2, 6));
        let keys: Vec<&[u8]> = everything.kvs.iter().map(|kv| kv.key.as_slice()).collect();
        assert_eq!(keys, [&b"l"[..], b"x"]);
        assert_eq!(everything.kvs[1].version, 2, "two puts of x in one txn");
        assert_eq!((none.deleted, none.revision), (0, 6));

        let stamps: Vec<(&[u8], i64)> =
            events.iter().map(|e| (e.kv.key.as_slice(), e.kv.mod_revision)).collect();
        assert_eq!(stamps, [(&b"x"[..], 6), (b"x", 6), (b"a", 6), (b"b", 6)]);
        assert_eq!(kv.current_revision(), 6);
        assert_eq!(rng(&kv, "x", "", 0).kvs[0].value, b"2");
    }

    #[test]
    fn a_read_only_txn_takes_no_revision() {
        let kv = fixture();
        let req = TxnRequest {
            compare: vec![cmp("a", "", CompareTarget::Version(1), CompareResult::Equal)],
            success: vec![
                TxnOp::Range(range_req("a", "", 0)),
                TxnOp::DeleteRange(del_req("zz", "")),
            ],
            failure: vec![TxnOp::Put(put_req("never", "1"))],
        };
        let (res, events) = run(&kv, &req).unwrap();
        assert!(res.succeeded && events.is_empty());
        assert_eq!((res.revision, kv.current_revision()), (5, 5));
        let TxnOpResult::DeleteRange(d) = &res.responses[1] else { panic!() };
        assert_eq!(d.revision, 5);
    }

    #[test]
    fn nested_txns_share_the_revision_and_compare_against_the_state_before_the_txn() {
        let kv = fixture();
        let nested = TxnRequest {
            // The outer txn has just changed a; nested compares still see a == "1".
            compare: vec![cmp("a", "", CompareTarget::Value(b"1".to_vec()), CompareResult::Equal)],
            success: vec![TxnOp::Put(put_req("n1", "1")), TxnOp::Range(range_req("a", "", 0))],
            failure: vec![TxnOp::Put(put_req("n2", "1"))],
        };
        let req = TxnRequest {
            compare: vec![],
            success: vec![
                TxnOp::Put(put_req("a", "changed")),
                TxnOp::Txn(nested),
                TxnOp::Put(put_req("z", "1")),
            ],
            failure: vec![],
        };
        let (res, events) = run(&kv, &req).unwrap();
        let TxnOpResult::Txn(inner) = &res.responses[1] else { panic!() };
        assert!(inner.succeeded);
        let TxnOpResult::Range(seen) = &inner.responses[1] else { panic!() };
        assert_eq!(seen.kvs[0].value, b"changed", "nested ops do see earlier writes");
        let keys: Vec<&[u8]> = events.iter().map(|e| e.kv.key.as_slice()).collect();
        assert_eq!(keys, [&b"a"[..], b"n1", b"z"]);
        assert!(events.iter().all(|e| e.kv.mod_revision == 6));
        assert_eq!((res.revision, inner.revision), (6, 6));
        assert!(rng(&kv, "n2", "", 0).kvs.is_empty());
    }

    #[test]
    fn a_failing_txn_changes_nothing() {
        let missing = PutRequest { ignore_value: true, ..put_req("missing", "") };
        let nested_bad =
            TxnRequest { success: vec![TxnOp::Put(missing.clone())], ..Default::default() };
        let cases = [
            // A bad put in a nested chosen branch fails before anything is written.
            (vec![TxnOp::Put(put_req("x", "1")), TxnOp::Txn(nested_bad)], "key"),
            (vec![TxnOp::Put(PutRequest { lease: 77, ..put_req("x", "1") })], "lease"),
            // A range cannot ask for the revision the txn creates, even after a write.
            (vec![TxnOp::Put(put_req("x", "1")), TxnOp::Range(range_req("x", "", 6))], "future"),
            (vec![TxnOp::Range(range_req("a", "", 1))], "compacted"),
            // Passes the checks (a exists before the txn) but fails when it runs.
            (
                vec![
                    TxnOp::Put(put_req("x", "1")),
                    TxnOp::DeleteRange(del_req("a", "")),
                    TxnOp::Put(PutRequest { ignore_value: true, ..put_req("a", "") }),
                ],
                "key",
            ),
        ];
        for (ops, want) in cases {
            let kv = fixture();
            let mut w = kv.write();
            w.compact(2).unwrap();
            let before = w.range(&range_req("\0", "\0", 0)).unwrap();
            let req = TxnRequest { success: ops, ..Default::default() };
            let err = w.txn(&req, &Leases(&[9])).unwrap_err();
            let got = match err {
                Error::KeyNotFound => "key",
                Error::LeaseNotFound => "lease",
                Error::FutureRevision => "future",
                Error::Compacted => "compacted",
                other => panic!("{other:?}"),
            };
            assert_eq!(got, want, "{req:?}");
            assert_eq!(w.range(&range_req("\0", "\0", 0)).unwrap(), before);
            // The group goes on: the next request takes the revision the failed one did not.
            assert_eq!(w.put(&put_req("after", "1"), &NoLeases).unwrap().revision, 6);
            let events = w.commit().unwrap();
            assert_eq!(events.len(), 1);
        }
    }

    #[test]
    fn an_unchosen_branch_is_not_checked() {
        let kv = fixture();
        let req = TxnRequest {
            compare: vec![],
            success: vec![TxnOp::Put(put_req("ok", "1"))],
            failure: vec![TxnOp::Put(PutRequest { lease: 77, ..put_req("x", "1") })],
        };
        assert!(run(&kv, &req).unwrap().0.succeeded);
    }
}
