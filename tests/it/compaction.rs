//! Compaction of a long history through real clients: writes go on while the compacted
//! records leave storage in bounded batches (`--experimental-compaction-batch-limit`,
//! `--experimental-compaction-sleep-interval`), members agree on `HashKV` whatever their
//! progress, and what clients see at and around the compaction revision matches etcd.

use etcd_client::{Client, CompactionOptions, GetOptions, Txn, TxnOp};

use crate::cluster::Cluster;
use crate::harness::{Cairn, Etcd};

/// Keys each history round overwrites, in one txn.
const KEYS: usize = 100;

/// Overwrites the same `KEYS` keys in `rounds` txns: `rounds * KEYS` records, `rounds`
/// revisions. Returns the revision after the last txn.
async fn history(c: &mut Client, rounds: usize) -> i64 {
    let mut rev = 0;
    for round in 0..rounds {
        let ops: Vec<TxnOp> =
            (0..KEYS).map(|k| TxnOp::put(format!("h/{k:03}"), format!("{round}"), None)).collect();
        let r = c.txn(Txn::new().and_then(ops)).await.unwrap();
        rev = r.header().unwrap().revision();
    }
    rev
}

fn outcome<T>(r: Result<T, etcd_client::Error>) -> String {
    match r {
        Ok(_) => "ok".to_owned(),
        Err(etcd_client::Error::GRpcStatus(s)) => format!("{:?}: {}", s.code(), s.message()),
        Err(e) => format!("other: {e}"),
    }
}

/// What a client sees around a compaction of a long history, step by step (the values
/// that differ by design between servers, such as hash values, are compared, not shown).
async fn compaction_sequence(url: &str) -> Vec<(&'static str, String)> {
    let mut c = Client::connect([url], None).await.unwrap();
    let mut steps = Vec::new();
    let rev = history(&mut c, 200).await;
    let at = rev - 10;
    let hash_before = c.hash_kv(at).await.unwrap().hash();
    steps.push(("compact", outcome(c.compact(at, None).await)));
    steps.push(("put after", outcome(c.put("after", "v", None).await)));
    let below = c.get("h/000", Some(GetOptions::new().with_revision(at - 1))).await;
    steps.push(("get below", outcome(below)));
    let got = c.get("h/000", Some(GetOptions::new().with_revision(at))).await.unwrap();
    let value = String::from_utf8_lossy(got.kvs()[0].value()).into_owned();
    steps.push(("get at the compaction revision", value));
    steps.push(("hash below", outcome(c.hash_kv(at - 1).await)));
    steps.push(("hash at", outcome(c.hash_kv(at).await)));
    let mid = c.hash_kv(at + 1).await.unwrap();
    steps.push(("hash compact revision", mid.compact_version().to_string()));
    steps.push(("compaction changes the hash", (mid.hash() != hash_before).to_string()));
    // A physical compaction answers once this and every earlier one left storage.
    let physical = Some(CompactionOptions::new().with_physical());
    steps.push(("compact physical", outcome(c.compact(at + 1, physical).await)));
    let after = c.hash_kv(at + 5).await.unwrap();
    let again = c.hash_kv(at + 5).await.unwrap();
    steps.push(("hash stable after", (after.hash() == again.hash()).to_string()));
    steps.push(("compact again", outcome(c.compact(at + 1, None).await)));
    steps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_answers_match_etcd_step_by_step() {
    let cairn = Cairn::start_with(&["--experimental-compaction-batch-limit=100"]).await;
    let ours = compaction_sequence(&cairn.client_url).await;
    eprintln!("cairn: {ours:#?}");
    let Some(etcd) = Etcd::start_with(&["--experimental-compaction-batch-limit=100"]).await else {
        return;
    };
    let theirs = compaction_sequence(&etcd.client_url).await;
    assert_eq!(ours, theirs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_interleave_with_a_long_compaction_and_members_agree_on_hashes() {
    // 20,000 records in batches of 100 with a 20 ms pause: the physical part takes 200
    // batches, far longer than a put.
    let flags = [
        "--experimental-compaction-batch-limit=100",
        "--experimental-compaction-sleep-interval=20ms",
    ];
    let mut cluster = Cluster::start(3, &flags).await;
    let mut c = cluster.members[0].client().await;
    let rev = history(&mut c, 200).await;
    let at = rev - 10;
    c.compact(at, None).await.unwrap();

    // A physical compaction of the next revision answers only when the long one is done.
    let mut waiter = cluster.members[0].client().await;
    let physical = tokio::spawn(async move {
        waiter.compact(at + 1, Some(CompactionOptions::new().with_physical())).await.unwrap();
    });
    let mut during = 0;
    let mut mid_hashes = Vec::new();
    while !physical.is_finished() {
        let r = c.put(format!("during/{during}"), "v", None).await.unwrap();
        assert!(r.header().unwrap().revision() > rev);
        during += 1;
        if during == 5 {
            for m in &cluster.members {
                mid_hashes.push(m.client().await.hash_kv(at + 2).await.unwrap().hash());
            }
        }
    }
    physical.await.unwrap();
    assert!(during >= 5, "only {during} puts went through during the compaction");
    eprintln!("{during} puts were applied while the compaction ran");

    // Members hashed equally mid-compaction, and the same as when it is over.
    for m in &cluster.members {
        let mut mc = m.client().await;
        let h = mc.hash_kv(at + 2).await.unwrap();
        assert_eq!(h.compact_version(), at + 1);
        assert!(mid_hashes.iter().all(|&x| x == h.hash()), "{mid_hashes:?} {}", h.hash());
        let got = mc
            .get(
                "h/",
                Some(GetOptions::new().with_prefix().with_revision(at + 1).with_serializable()),
            )
            .await
            .unwrap();
        assert_eq!(got.kvs().len(), KEYS);
        let below = mc.get("h/000", Some(GetOptions::new().with_revision(at))).await;
        assert!(outcome(below).contains("required revision has been compacted"));
    }
    cluster.assert_hashes_equal().await;
}
