//! Compaction of a long history through real clients: writes go on while the compacted
//! records leave storage in bounded batches (`--experimental-compaction-batch-limit`,
//! `--experimental-compaction-sleep-interval`), members agree on `HashKV` whatever their
//! progress, what clients see at and around the compaction revision matches etcd, and a
//! learner catches up from a raft snapshot streamed from a pinned view meanwhile.

use std::time::Duration;

use etcd_client::{Client, CompactionOptions, GetOptions, MemberAddOptions, Txn, TxnOp};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_catches_up_from_a_streamed_snapshot_while_history_is_compacted() {
    // A small --snapshot-count compacts the raft log early, so the learner can only catch
    // up from a snapshot; the state (about 24 MB of history) is streamed from a pinned
    // view while writes and compactions go on.
    let flags = ["--snapshot-count=100", "--experimental-compaction-batch-limit=200"];
    let mut cluster = Cluster::start(1, &flags).await;
    let mut c = cluster.members[0].client().await;
    let value = vec![b'v'; 64 * 1024];
    let mut rev = 0;
    for i in 0..400 {
        let r = c.put(format!("big/{:03}", i % 200), value.clone(), None).await.unwrap();
        rev = r.header().unwrap().revision();
    }
    let mut learner = Cairn::new("m1", tempfile::tempdir().unwrap(), &flags);
    let added = c
        .member_add([learner.peer_url.as_str()], Some(MemberAddOptions::new().with_is_learner()))
        .await
        .unwrap();
    let learner_id = added.member().unwrap().id();
    learner.initial_cluster = format!("m0={},m1={}", cluster.members[0].peer_url, learner.peer_url);
    learner.cluster_state = "existing".into();
    learner.spawn_only();
    // Writes and a compaction while the learner catches up.
    for i in 0..50 {
        c.put(format!("during/{i}"), "x", None).await.unwrap();
        if i == 10 {
            c.compact(rev - 100, None).await.unwrap();
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while let Err(e) = c.member_promote(learner_id).await {
        let e = e.to_string();
        assert!(e.contains("in sync with leader") || e.contains("not enough started"), "{e}");
        assert!(std::time::Instant::now() < deadline, "learner never caught up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.members.push(learner);
    cluster.assert_hashes_equal().await;
    let mut lc = cluster.members[1].client().await;
    let all = GetOptions::new().with_prefix().with_keys_only().with_serializable();
    let theirs = lc.get("big/", Some(all.clone())).await.unwrap();
    let ours = c.get("big/", Some(all)).await.unwrap();
    assert_eq!(theirs.kvs().len(), 200);
    let rows = |r: &etcd_client::GetResponse| -> Vec<(Vec<u8>, i64, i64, i64)> {
        r.kvs()
            .iter()
            .map(|kv| (kv.key().to_vec(), kv.create_revision(), kv.mod_revision(), kv.version()))
            .collect()
    };
    assert_eq!(rows(&theirs), rows(&ours));
    // The learner staged the streamed image (so it did catch up by snapshot), and the
    // staged file is gone once installed.
    let snap = cluster.members[1].data_dir.join("snap");
    let left: Vec<_> = std::fs::read_dir(&snap).unwrap().flatten().collect();
    assert!(left.is_empty(), "staged images left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_size_in_use_shows_what_compaction_frees_and_defrag_gives_back() {
    let m = Cairn::start().await;
    let mut c = m.client().await;
    let value = vec![b'x'; 1024];
    let mut rev = 0;
    for _ in 0..100 {
        let ops: Vec<TxnOp> =
            (0..KEYS).map(|k| TxnOp::put(format!("k/{k:03}"), value.clone(), None)).collect();
        rev = c.txn(Txn::new().and_then(ops)).await.unwrap().header().unwrap().revision();
    }
    let s = c.status().await.unwrap();
    let (size, in_use) = (s.db_size(), s.raft_used_db_size());
    assert!(in_use <= size && in_use * 10 > size * 9, "full store: {in_use} of {size}");
    c.compact(rev, Some(CompactionOptions::new().with_physical())).await.unwrap();
    let s = c.status().await.unwrap();
    let (size, freed_in_use) = (s.db_size(), s.raft_used_db_size());
    // 99 of every 100 records went; the files keep their size until a defragmentation.
    assert!(freed_in_use * 10 < size, "after compaction: {freed_in_use} of {size}");
    c.defragment().await.unwrap();
    let s = c.status().await.unwrap();
    eprintln!(
        "dbSize {size} -> {} after defrag; dbSizeInUse {in_use} -> {freed_in_use} after compaction, {} after defrag",
        s.db_size(),
        s.raft_used_db_size()
    );
    assert_eq!(s.raft_used_db_size(), s.db_size(), "right after a defragmentation");
    assert!(s.db_size() * 4 < size);
}
