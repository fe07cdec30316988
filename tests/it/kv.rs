//! The KV service through the `etcd-client` crate, item by item of ETCD-COMPAT.md §1.3.

use etcd_client::{
    CompactionOptions, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp, TxnOpResponse,
};
use tonic::Code;

use crate::harness::Cairn;

/// Unwraps a gRPC error into (code, message).
pub fn grpc_err(e: etcd_client::Error) -> (Code, String) {
    match e {
        etcd_client::Error::GRpcStatus(s) => (s.code(), s.message().to_owned()),
        other => panic!("expected a gRPC status, got {other:?}"),
    }
}

fn keys(resp: &etcd_client::GetResponse) -> Vec<String> {
    resp.kvs().iter().map(|kv| kv.key_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn put_then_get_reports_revisions_versions_and_headers() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    let r = c.put("a", "1", None).await.unwrap();
    let h = r.header().unwrap();
    assert_eq!(h.revision(), 2, "a fresh store is at revision 1; the first write makes 2");
    assert_ne!(h.cluster_id(), 0);
    assert_ne!(h.member_id(), 0);
    assert!(h.raft_term() >= 1);
    c.put("a", "2", None).await.unwrap();
    let g = c.get("a", None).await.unwrap();
    let kv = &g.kvs()[0];
    assert_eq!(
        (kv.value(), kv.create_revision(), kv.mod_revision(), kv.version()),
        (&b"2"[..], 2, 3, 2)
    );
    assert_eq!(g.count(), 1);
    assert_eq!(g.header().unwrap().revision(), 3);
    // Deleting and re-creating starts a new generation.
    c.delete("a", None).await.unwrap();
    c.put("a", "3", None).await.unwrap();
    let kv = c.get("a", None).await.unwrap().kvs()[0].clone();
    assert_eq!((kv.create_revision(), kv.mod_revision(), kv.version()), (5, 5, 1));
}

#[tokio::test]
async fn ranges_cover_keys_prefixes_from_key_and_all_keys_with_limits() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    for k in ["a", "b", "b1", "b2", "c", "d"] {
        c.put(k, format!("v-{k}"), None).await.unwrap();
    }
    let r = c.get("b", Some(GetOptions::new().with_range("c"))).await.unwrap();
    assert_eq!(keys(&r), ["b", "b1", "b2"]);
    let r = c.get("b", Some(GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(keys(&r), ["b", "b1", "b2"]);
    let r = c.get("c", Some(GetOptions::new().with_from_key())).await.unwrap();
    assert_eq!(keys(&r), ["c", "d"]);
    let r = c.get("", Some(GetOptions::new().with_all_keys())).await.unwrap();
    assert_eq!(r.kvs().len(), 6);
    let r = c.get("", Some(GetOptions::new().with_all_keys().with_limit(2))).await.unwrap();
    assert_eq!(keys(&r), ["a", "b"]);
    assert!(r.more());
    assert_eq!(r.count(), 6, "count ignores the limit");
    let r = c.get("", Some(GetOptions::new().with_all_keys().with_limit(6))).await.unwrap();
    assert!(!r.more());
    let r = c.get("missing", None).await.unwrap();
    assert!(r.kvs().is_empty());
    assert_eq!(r.count(), 0);
}

#[tokio::test]
async fn ranges_sort_on_every_target_and_order() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    // Values and versions ordered differently from keys.
    c.put("k1", "z", None).await.unwrap();
    c.put("k2", "y", None).await.unwrap();
    c.put("k3", "x", None).await.unwrap();
    c.put("k2", "w", None).await.unwrap(); // k2: version 2, latest mod
    let get = |t, o| GetOptions::new().with_prefix().with_sort(t, o);
    let cases = [
        (SortTarget::Key, SortOrder::Ascend, ["k1", "k2", "k3"]),
        (SortTarget::Key, SortOrder::Descend, ["k3", "k2", "k1"]),
        (SortTarget::Value, SortOrder::Ascend, ["k2", "k3", "k1"]),
        (SortTarget::Value, SortOrder::Descend, ["k1", "k3", "k2"]),
        (SortTarget::Create, SortOrder::Descend, ["k3", "k2", "k1"]),
        (SortTarget::Mod, SortOrder::Descend, ["k2", "k3", "k1"]),
        (SortTarget::Mod, SortOrder::Ascend, ["k1", "k3", "k2"]),
        (SortTarget::Version, SortOrder::Descend, ["k2", "k1", "k3"]),
    ];
    for (t, o, want) in cases {
        let r = c.get("k", Some(get(t, o))).await.unwrap();
        assert_eq!(keys(&r), want, "{t:?} {o:?}");
    }
    // A sort target other than KEY with order NONE sorts ascending, as etcd does.
    let r = c.get("k", Some(get(SortTarget::Mod, SortOrder::None))).await.unwrap();
    assert_eq!(keys(&r), ["k1", "k3", "k2"]);
    // Sorting happens before the limit.
    let r =
        c.get("k", Some(get(SortTarget::Value, SortOrder::Ascend).with_limit(1))).await.unwrap();
    assert_eq!(keys(&r), ["k2"]);
    assert!(r.more());
}

#[tokio::test]
async fn keys_only_count_only_and_revision_filters() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    for k in ["p1", "p2", "p3"] {
        c.put(k, "value", None).await.unwrap(); // revisions 2, 3, 4
    }
    c.put("p1", "again", None).await.unwrap(); // revision 5
    let r = c.get("p", Some(GetOptions::new().with_prefix().with_keys_only())).await.unwrap();
    assert!(r.kvs().iter().all(|kv| kv.value().is_empty()));
    assert_eq!(r.kvs().len(), 3);
    let r = c.get("p", Some(GetOptions::new().with_prefix().with_count_only())).await.unwrap();
    assert!(r.kvs().is_empty());
    assert_eq!(r.count(), 3);
    let r =
        c.get("p", Some(GetOptions::new().with_prefix().with_min_mod_revision(4))).await.unwrap();
    assert_eq!(keys(&r), ["p1", "p3"]);
    assert_eq!(r.count(), 3, "filters do not change count");
    let r =
        c.get("p", Some(GetOptions::new().with_prefix().with_max_mod_revision(3))).await.unwrap();
    assert_eq!(keys(&r), ["p2"]);
    let r = c
        .get("p", Some(GetOptions::new().with_prefix().with_min_create_revision(3)))
        .await
        .unwrap();
    assert_eq!(keys(&r), ["p2", "p3"]);
    let r = c
        .get("p", Some(GetOptions::new().with_prefix().with_max_create_revision(2)))
        .await
        .unwrap();
    assert_eq!(keys(&r), ["p1"]);
}

#[tokio::test]
async fn old_revisions_read_until_compacted_and_future_ones_fail() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    c.put("k", "v1", None).await.unwrap(); // 2
    c.put("k", "v2", None).await.unwrap(); // 3
    c.put("k", "v3", None).await.unwrap(); // 4
    let r = c.get("k", Some(GetOptions::new().with_revision(2))).await.unwrap();
    assert_eq!(r.kvs()[0].value(), b"v1");
    assert_eq!(r.header().unwrap().revision(), 4, "the header carries the current revision");
    let (code, msg) =
        grpc_err(c.get("k", Some(GetOptions::new().with_revision(10))).await.unwrap_err());
    assert_eq!(
        (code, msg.as_str()),
        (Code::OutOfRange, "etcdserver: mvcc: required revision is a future revision")
    );

    c.compact(3, Some(CompactionOptions::new().with_physical())).await.unwrap();
    let (code, msg) =
        grpc_err(c.get("k", Some(GetOptions::new().with_revision(2))).await.unwrap_err());
    assert_eq!(
        (code, msg.as_str()),
        (Code::OutOfRange, "etcdserver: mvcc: required revision has been compacted")
    );
    let r = c.get("k", Some(GetOptions::new().with_revision(3))).await.unwrap();
    assert_eq!(r.kvs()[0].value(), b"v2", "the compaction revision itself stays readable");
    let (code, msg) = grpc_err(c.compact(3, None).await.unwrap_err());
    assert_eq!(
        (code, msg.as_str()),
        (Code::OutOfRange, "etcdserver: mvcc: required revision has been compacted")
    );
    let (code, msg) = grpc_err(c.compact(100, None).await.unwrap_err());
    assert_eq!(
        (code, msg.as_str()),
        (Code::OutOfRange, "etcdserver: mvcc: required revision is a future revision")
    );
}

#[tokio::test]
async fn serializable_and_linearizable_reads_agree_on_one_member() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    c.put("s", "1", None).await.unwrap();
    let l = c.get("s", None).await.unwrap();
    let s = c.get("s", Some(GetOptions::new().with_serializable())).await.unwrap();
    assert_eq!(l.kvs()[0].value(), s.kvs()[0].value());
}

#[tokio::test]
async fn put_flags_prev_kv_ignore_value_and_ignore_lease() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    let r = c.put("k", "v1", Some(PutOptions::new().with_prev_key())).await.unwrap();
    assert!(r.prev_key().is_none());
    let r = c.put("k", "v2", Some(PutOptions::new().with_prev_key())).await.unwrap();
    assert_eq!(r.prev_key().unwrap().value(), b"v1");
    c.put("k", "", Some(PutOptions::new().with_ignore_value())).await.unwrap();
    let kv = c.get("k", None).await.unwrap().kvs()[0].clone();
    assert_eq!((kv.value(), kv.version()), (&b"v2"[..], 3));
    c.put("k", "v4", Some(PutOptions::new().with_ignore_lease())).await.unwrap();

    let (code, msg) =
        grpc_err(c.put("nope", "", Some(PutOptions::new().with_ignore_value())).await.unwrap_err());
    assert_eq!((code, msg.as_str()), (Code::InvalidArgument, "etcdserver: key not found"));
    let (code, msg) = grpc_err(
        c.put("nope", "x", Some(PutOptions::new().with_ignore_lease())).await.unwrap_err(),
    );
    assert_eq!((code, msg.as_str()), (Code::InvalidArgument, "etcdserver: key not found"));
    let (code, msg) =
        grpc_err(c.put("k", "x", Some(PutOptions::new().with_ignore_value())).await.unwrap_err());
    assert_eq!((code, msg.as_str()), (Code::InvalidArgument, "etcdserver: value is provided"));
    let (code, msg) = grpc_err(
        c.put("k", "x", Some(PutOptions::new().with_ignore_lease().with_lease(5)))
            .await
            .unwrap_err(),
    );
    assert_eq!((code, msg.as_str()), (Code::InvalidArgument, "etcdserver: lease is provided"));
    let (code, msg) =
        grpc_err(c.put("k", "x", Some(PutOptions::new().with_lease(1234))).await.unwrap_err());
    assert_eq!((code, msg.as_str()), (Code::NotFound, "etcdserver: requested lease not found"));
    // None of the failures wrote anything.
    let g = c.get("k", None).await.unwrap();
    assert_eq!(g.header().unwrap().revision(), 5);
    assert_eq!(g.kvs()[0].value(), b"v4");
}

#[tokio::test]
async fn delete_ranges_prefixes_and_all_keys_with_prev_kv() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    for k in ["a", "b1", "b2", "c", "d"] {
        c.put(k, k, None).await.unwrap();
    }
    let r = c.delete("b", Some(DeleteOptions::new().with_prefix().with_prev_key())).await.unwrap();
    assert_eq!(r.deleted(), 2);
    let prev: Vec<_> = r.prev_kvs().iter().map(|kv| kv.key_str().unwrap().to_owned()).collect();
    assert_eq!(prev, ["b1", "b2"]);
    assert_eq!(r.header().unwrap().revision(), 7, "one revision for the whole delete");
    let r = c.delete("a", None).await.unwrap();
    assert_eq!(r.deleted(), 1);
    assert!(r.prev_kvs().is_empty());
    let r = c.delete("zzz", None).await.unwrap();
    assert_eq!(r.deleted(), 0);
    assert_eq!(r.header().unwrap().revision(), 8, "deleting nothing makes no revision");
    let r = c.delete("c", Some(DeleteOptions::new().with_range("d"))).await.unwrap();
    assert_eq!(r.deleted(), 1);
    let r = c.delete("", Some(DeleteOptions::new().with_all_keys())).await.unwrap();
    assert_eq!(r.deleted(), 1);
    assert_eq!(c.get("", Some(GetOptions::new().with_all_keys())).await.unwrap().count(), 0);
}

#[tokio::test]
async fn txn_compares_every_target_and_runs_one_branch_at_one_revision() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    c.put("x", "10", None).await.unwrap(); // rev 2
    c.put("x", "11", None).await.unwrap(); // rev 3, version 2
    let truths = [
        Compare::version("x", CompareOp::Equal, 2),
        Compare::version("x", CompareOp::Greater, 1),
        Compare::version("x", CompareOp::Less, 3),
        Compare::version("x", CompareOp::NotEqual, 5),
        Compare::create_revision("x", CompareOp::Equal, 2),
        Compare::mod_revision("x", CompareOp::Equal, 3),
        Compare::value("x", CompareOp::Equal, "11"),
        Compare::value("x", CompareOp::Greater, "10"),
        Compare::lease("x", CompareOp::Equal, 0),
        Compare::mod_revision("absent", CompareOp::Equal, 0),
        Compare::version("a", CompareOp::Greater, 0).with_range("y"),
    ];
    for cmp in truths {
        let r = c.txn(Txn::new().when([cmp.clone()])).await.unwrap();
        assert!(r.succeeded(), "{cmp:?} should hold");
    }
    let falsehoods = [
        Compare::version("x", CompareOp::Equal, 1),
        Compare::value("x", CompareOp::Less, "10"),
        Compare::value("absent", CompareOp::Equal, ""),
        Compare::create_revision("x", CompareOp::Greater, 2),
    ];
    for cmp in falsehoods {
        let r = c.txn(Txn::new().when([cmp.clone()])).await.unwrap();
        assert!(!r.succeeded(), "{cmp:?} should not hold");
    }
    // Both branches: create-if-absent, the kube-apiserver shape.
    let create = |k: &str| {
        Txn::new()
            .when([Compare::mod_revision(k, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(k, "new", None)])
            .or_else([TxnOp::get(k, None)])
    };
    let r = c.txn(create("obj")).await.unwrap();
    assert!(r.succeeded());
    let rev = r.header().unwrap().revision();
    let r = c.txn(create("obj")).await.unwrap();
    assert!(!r.succeeded());
    assert_eq!(r.header().unwrap().revision(), rev, "a read-only branch makes no revision");
    match &r.op_responses()[0] {
        TxnOpResponse::Get(g) => assert_eq!(g.kvs()[0].value(), b"new"),
        other => panic!("unexpected {other:?}"),
    }
    // Several writes share one revision; a range after a put sees it.
    let r = c
        .txn(Txn::new().and_then([
            TxnOp::put("t1", "a", None),
            TxnOp::put("t2", "b", None),
            TxnOp::get("t", Some(GetOptions::new().with_prefix())),
            TxnOp::delete("obj", None),
        ]))
        .await
        .unwrap();
    let rev = r.header().unwrap().revision();
    match &r.op_responses()[2] {
        TxnOpResponse::Get(g) => assert_eq!(g.kvs().len(), 2, "the txn reads its own writes"),
        other => panic!("unexpected {other:?}"),
    }
    let g = c.get("t", Some(GetOptions::new().with_prefix())).await.unwrap();
    assert!(g.kvs().iter().all(|kv| kv.mod_revision() == rev));
    assert_eq!(g.header().unwrap().revision(), rev);
}

#[tokio::test]
async fn nested_txns_apply_inside_the_parent_revision() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    let inner = Txn::new()
        .when([Compare::version("n", CompareOp::Equal, 0)])
        .and_then([TxnOp::put("n", "inner", None)])
        .or_else([TxnOp::put("m", "else", None)]);
    let r = c
        .txn(Txn::new().and_then([TxnOp::put("outer", "o", None), TxnOp::txn(inner)]))
        .await
        .unwrap();
    assert!(r.succeeded());
    match &r.op_responses()[1] {
        TxnOpResponse::Txn(t) => assert!(t.succeeded()),
        other => panic!("unexpected {other:?}"),
    }
    let rev = r.header().unwrap().revision();
    let n = c.get("n", None).await.unwrap();
    assert_eq!(n.kvs()[0].mod_revision(), rev);
    assert!(c.get("m", None).await.unwrap().kvs().is_empty());
}

#[tokio::test]
async fn txn_limits_and_duplicate_keys_give_etcds_errors() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    let ops: Vec<TxnOp> = (0..129).map(|i| TxnOp::put(format!("k{i}"), "v", None)).collect();
    let (code, msg) = grpc_err(c.txn(Txn::new().and_then(ops)).await.unwrap_err());
    assert_eq!(
        (code, msg.as_str()),
        (Code::InvalidArgument, "etcdserver: too many operations in txn request")
    );
    let ops: Vec<TxnOp> = (0..128).map(|i| TxnOp::put(format!("k{i}"), "v", None)).collect();
    c.txn(Txn::new().and_then(ops)).await.unwrap();
    let (code, msg) = grpc_err(
        c.txn(Txn::new().and_then([TxnOp::put("d", "1", None), TxnOp::put("d", "2", None)]))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (code, msg.as_str()),
        (Code::InvalidArgument, "etcdserver: duplicate key given in txn request")
    );
    let (code, msg) = grpc_err(
        c.txn(Txn::new().and_then([
            TxnOp::delete("a", Some(DeleteOptions::new().with_range("z"))),
            TxnOp::put("m", "2", None),
        ]))
        .await
        .unwrap_err(),
    );
    assert_eq!(
        (code, msg.as_str()),
        (Code::InvalidArgument, "etcdserver: duplicate key given in txn request")
    );
    // A txn that fails in apply (ignore_value on a missing key) changes nothing.
    let before = c.get("k0", None).await.unwrap().header().unwrap().revision();
    let (code, _) = grpc_err(
        c.txn(Txn::new().and_then([
            TxnOp::put("fresh", "1", None),
            TxnOp::put("missing", "", Some(PutOptions::new().with_ignore_value())),
        ]))
        .await
        .unwrap_err(),
    );
    assert_eq!(code, Code::InvalidArgument);
    let after = c.get("fresh", None).await.unwrap();
    assert!(after.kvs().is_empty());
    assert_eq!(after.header().unwrap().revision(), before);
}

#[tokio::test]
async fn empty_keys_and_oversized_requests_are_refused() {
    let srv = Cairn::start_with(&["--max-request-bytes", "4096"]).await;
    let mut c = srv.client().await;
    let (code, msg) = grpc_err(c.put("", "v", None).await.unwrap_err());
    assert_eq!((code, msg.as_str()), (Code::InvalidArgument, "etcdserver: key is not provided"));
    let (code, msg) = grpc_err(c.get("", None).await.unwrap_err());
    assert_eq!((code, msg.as_str()), (Code::InvalidArgument, "etcdserver: key is not provided"));
    let (code, msg) = grpc_err(c.delete("", None).await.unwrap_err());
    assert_eq!((code, msg.as_str()), (Code::InvalidArgument, "etcdserver: key is not provided"));
    let (code, msg) = grpc_err(c.put("big", vec![b'x'; 8192], None).await.unwrap_err());
    assert_eq!((code, msg.as_str()), (Code::InvalidArgument, "etcdserver: request is too large"));
    c.put("small", vec![b'x'; 1024], None).await.unwrap();
}

#[tokio::test]
async fn invalid_sort_options_are_refused_on_the_wire() {
    use cairn_proto::etcdserverpb::{RangeRequest, kv_client::KvClient};
    let srv = Cairn::start().await;
    let mut raw = KvClient::connect(srv.client_url.clone()).await.unwrap();
    let err = raw
        .range(RangeRequest { key: b"a".to_vec(), sort_order: 7, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "etcdserver: invalid sort option")
    );
    let err = raw
        .range(RangeRequest { key: b"a".to_vec(), sort_target: 9, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "etcdserver: invalid sort option")
    );
}

#[tokio::test]
async fn range_stream_returns_disjoint_chunks_with_count_on_the_last() {
    use cairn_proto::etcdserverpb::{RangeRequest, kv_client::KvClient};
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    let ops: Vec<TxnOp> = (0..100).map(|i| TxnOp::put(format!("r/{i:04}"), "v", None)).collect();
    c.txn(Txn::new().and_then(ops)).await.unwrap();
    for i in 100..2500 {
        c.put(format!("r/{i:04}"), "v", None).await.unwrap();
    }
    let mut raw = KvClient::connect(srv.client_url.clone()).await.unwrap();
    let mut stream = raw
        .range_stream(RangeRequest {
            key: b"r/".to_vec(),
            range_end: b"r0".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut all = Vec::new();
    let mut chunks = 0;
    let mut last = None;
    while let Some(chunk) = stream.message().await.unwrap() {
        let r = chunk.range_response.unwrap();
        chunks += 1;
        all.extend(r.kvs.iter().map(|kv| kv.key.clone()));
        last = Some(r);
    }
    let last = last.unwrap();
    assert!(chunks >= 3);
    assert_eq!(all.len(), 2500);
    assert!(all.windows(2).all(|w| w[0] < w[1]), "chunks are disjoint and ordered");
    assert_eq!(last.count, 2500);
    assert!(!last.more);
    assert!(last.header.is_some());
}

#[tokio::test]
async fn status_reports_an_etcd_version_and_raft_indexes() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    c.put("a", "b", None).await.unwrap();
    let s = c.status().await.unwrap();
    let version: Vec<u32> = s.version().split('.').map(|p| p.parse().unwrap()).collect();
    assert!(
        version >= vec![3, 5, 13],
        "Kubernetes gates consistent reads on >= 3.5.13: {}",
        s.version()
    );
    assert_eq!(s.leader(), s.header().unwrap().member_id());
    assert!(s.raft_index() >= 2);
    assert!(s.raft_applied_index() >= 2);
    assert!(s.raft_term() >= 1);
    assert!(s.db_size() > 0);
}
