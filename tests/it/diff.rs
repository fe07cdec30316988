//! Differential test: one KV scenario against real etcd and against Cairn, responses
//! normalized (member, cluster ids and term dropped) and compared field by field.

use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions,
    SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
};

use crate::harness::{Cairn, Etcd};

fn kv(kv: &etcd_client::KeyValue) -> String {
    format!(
        "{{key={:?} value={:?} create={} mod={} version={} lease={}}}",
        String::from_utf8_lossy(kv.key()),
        String::from_utf8_lossy(kv.value()),
        kv.create_revision(),
        kv.mod_revision(),
        kv.version(),
        kv.lease()
    )
}

fn rev(h: Option<&etcd_client::ResponseHeader>) -> i64 {
    h.map(|h| h.revision()).unwrap_or(-1)
}

fn get(r: &etcd_client::GetResponse) -> String {
    let kvs: Vec<String> = r.kvs().iter().map(kv).collect();
    format!(
        "get rev={} count={} more={} kvs=[{}]",
        rev(r.header()),
        r.count(),
        r.more(),
        kvs.join(",")
    )
}

fn txn(r: &etcd_client::TxnResponse) -> String {
    let ops: Vec<String> = r
        .op_responses()
        .iter()
        .map(|op| match op {
            TxnOpResponse::Get(g) => get(g),
            TxnOpResponse::Put(p) => {
                format!("put rev={} prev={:?}", rev(p.header()), p.prev_key().map(kv))
            }
            TxnOpResponse::Delete(d) => {
                let prev: Vec<String> = d.prev_kvs().iter().map(kv).collect();
                format!(
                    "del rev={} deleted={} prev=[{}]",
                    rev(d.header()),
                    d.deleted(),
                    prev.join(",")
                )
            }
            TxnOpResponse::Txn(t) => txn(t),
        })
        .collect();
    format!("txn rev={} succeeded={} ops=[{}]", rev(r.header()), r.succeeded(), ops.join("; "))
}

fn err(e: etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            format!("error code={:?} message={:?}", s.code(), s.message())
        }
        other => format!("client error {other}"),
    }
}

/// Runs the scenario and returns one normalized line per step.
async fn scenario(c: &mut Client) -> Vec<String> {
    let mut out = Vec::new();
    macro_rules! step {
        ($e:expr, $fmt:expr) => {
            out.push(match $e.await {
                Ok(r) => $fmt(&r),
                Err(e) => err(e),
            })
        };
    }
    let put = |r: &etcd_client::PutResponse| {
        format!("put rev={} prev={:?}", rev(r.header()), r.prev_key().map(kv))
    };
    let del = |r: &etcd_client::DeleteResponse| {
        let prev: Vec<String> = r.prev_kvs().iter().map(kv).collect();
        format!("del rev={} deleted={} prev=[{}]", rev(r.header()), r.deleted(), prev.join(","))
    };
    let compact = |r: &etcd_client::CompactionResponse| format!("compact rev={}", rev(r.header()));

    step!(c.get("a", None), get);
    for (k, v) in [("a", "1"), ("b", "2"), ("b/x", "3"), ("c", "4"), ("a", "5")] {
        step!(c.put(k, v, Some(PutOptions::new().with_prev_key())), put);
    }
    step!(c.get("a", None), get);
    step!(c.get("b", Some(GetOptions::new().with_prefix())), get);
    step!(c.get("", Some(GetOptions::new().with_all_keys().with_limit(2))), get);
    step!(c.get("b", Some(GetOptions::new().with_from_key().with_keys_only())), get);
    step!(c.get("a", Some(GetOptions::new().with_from_key().with_count_only())), get);
    step!(
        c.get(
            "a",
            Some(
                GetOptions::new().with_from_key().with_sort(SortTarget::Value, SortOrder::Descend)
            )
        ),
        get
    );
    step!(
        c.get(
            "a",
            Some(GetOptions::new().with_from_key().with_sort(SortTarget::Mod, SortOrder::None))
        ),
        get
    );
    step!(c.get("a", Some(GetOptions::new().with_from_key().with_min_mod_revision(4))), get);
    step!(c.get("a", Some(GetOptions::new().with_revision(2))), get);
    step!(c.get("a", Some(GetOptions::new().with_revision(99))), get);
    step!(c.get("", None), get);
    step!(c.put("", "x", None), put);
    step!(c.put("zz", "", Some(PutOptions::new().with_ignore_value())), put);
    step!(c.put("a", "", Some(PutOptions::new().with_ignore_value().with_prev_key())), put);
    step!(c.put("a", "x", Some(PutOptions::new().with_lease(77))), put);
    step!(c.delete("b", Some(DeleteOptions::new().with_prefix().with_prev_key())), del);
    step!(c.delete("nothing", None), del);
    step!(
        c.txn(
            Txn::new()
                .when([
                    Compare::value("a", CompareOp::Equal, "5"),
                    Compare::mod_revision("q", CompareOp::Equal, 0)
                ])
                .and_then([
                    TxnOp::put("q", "1", Some(PutOptions::new().with_prev_key())),
                    TxnOp::get("q", None),
                    TxnOp::delete("c", Some(DeleteOptions::new().with_prev_key())),
                    TxnOp::txn(
                        Txn::new()
                            .when([Compare::version("q", CompareOp::Greater, 0)])
                            .and_then([TxnOp::put("r", "2", None)])
                    ),
                ])
                .or_else([TxnOp::get("a", None)])
        ),
        txn
    );
    step!(
        c.txn(
            Txn::new()
                .when([Compare::version("a", CompareOp::Less, 1)])
                .and_then([TxnOp::put("a", "no", None)])
                .or_else([TxnOp::get("", Some(GetOptions::new().with_all_keys())),])
        ),
        txn
    );
    step!(
        c.txn(Txn::new().when([Compare::version("a", CompareOp::Greater, 0).with_range("zz")])),
        txn
    );
    step!(
        c.txn(Txn::new().when([Compare::version("m", CompareOp::Greater, 0).with_range("n")])),
        txn
    );
    step!(
        c.txn(Txn::new().when([Compare::version("m", CompareOp::Equal, 0).with_range("n")])),
        txn
    );
    step!(
        c.txn(Txn::new().and_then([TxnOp::put("d", "1", None), TxnOp::put("d", "2", None)])),
        txn
    );
    step!(c.compact(4, Some(CompactionOptions::new().with_physical())), compact);
    step!(c.get("a", Some(GetOptions::new().with_revision(3))), get);
    step!(c.get("a", Some(GetOptions::new().with_revision(4))), get);
    step!(c.compact(4, None), compact);
    step!(c.get("", Some(GetOptions::new().with_all_keys())), get);
    out
}

#[tokio::test]
async fn cairn_answers_a_kv_scenario_exactly_as_etcd_does() {
    let Some(etcd) = Etcd::start().await else { return };
    let cairn = Cairn::start().await;
    let mut e = Client::connect([etcd.client_url.as_str()], None).await.unwrap();
    let mut c = cairn.client().await;
    // The harness probe touched neither store; both start at revision 1.
    let want = scenario(&mut e).await;
    let got = scenario(&mut c).await;
    assert_eq!(want.len(), got.len());
    let mut diffs = Vec::new();
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        if w != g {
            diffs.push(format!("step {i}:\n  etcd:  {w}\n  cairn: {g}"));
        }
    }
    assert!(diffs.is_empty(), "responses differ:\n{}", diffs.join("\n"));
}
