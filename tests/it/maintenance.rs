//! Maintenance through real clients: `etcdctl snapshot save` (3.4 and 3.5) and `cairn
//! snapshot status | restore` into a new three-member cluster, refusal of damaged
//! snapshots, `etcdctl defrag` (also `--cluster`), and the NOSPACE alarm sequence compared
//! step by step with real etcd.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use etcd_client::{
    AlarmAction, AlarmOptions, AlarmType, Client, Compare, CompareOp, GetOptions, PutOptions, Txn,
    TxnOp,
};

use crate::cluster::Cluster;
use crate::harness::{Cairn, Etcd, etcdctls, wait_ready};

/// Runs `bin` with `args`; returns (success, stdout, stderr).
fn run(bin: &Path, args: &[&str]) -> (bool, String, String) {
    let out =
        Command::new(bin).env("ETCDCTL_API", "3").args(args).stdin(Stdio::null()).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn cairn_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cairn"))
}

/// Restores `snapshot` into `m`'s data dir as a member of `initial_cluster` (`m` alone
/// when empty), with `cairn snapshot restore`.
fn restore_into(snapshot: &Path, m: &Cairn, initial_cluster: &str) {
    let single = format!("{}={}", m.name, m.peer_url);
    let initial = if initial_cluster.is_empty() { single.as_str() } else { initial_cluster };
    let (ok, out, err) = run(
        &cairn_bin(),
        &[
            "snapshot",
            "restore",
            snapshot.to_str().unwrap(),
            "--name",
            &m.name,
            "--data-dir",
            m.data_dir.to_str().unwrap(),
            "--initial-cluster",
            initial,
            "--initial-advertise-peer-urls",
            &m.peer_url,
        ],
    );
    assert!(ok, "restore failed: {out} {err}");
}

/// Every key with its revisions, value and lease, read at `revision` (0 = newest).
async fn dump(c: &mut Client, revision: i64) -> Vec<(Vec<u8>, i64, i64, i64, Vec<u8>, i64)> {
    let opts = GetOptions::new().with_all_keys().with_revision(revision).with_serializable();
    let r = c.get(vec![0u8], Some(opts)).await.unwrap();
    r.kvs()
        .iter()
        .map(|kv| {
            (
                kv.key().to_vec(),
                kv.create_revision(),
                kv.mod_revision(),
                kv.version(),
                kv.value().to_vec(),
                kv.lease(),
            )
        })
        .collect()
}

/// A workload with history: overwrites, deletes, a txn, a leased key and a compaction.
async fn workload(c: &mut Client) -> i64 {
    for i in 0..200 {
        c.put(format!("key/{:03}", i % 50), format!("value-{i}"), None).await.unwrap();
    }
    c.delete("key/007", None).await.unwrap();
    c.delete("key/01", Some(etcd_client::DeleteOptions::new().with_prefix())).await.unwrap();
    let lease = c.lease_grant(600, None).await.unwrap().id();
    c.put("leased", "v", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    let rev = c.put("mid", "m", None).await.unwrap().header().unwrap().revision();
    c.compact(rev - 20, None).await.unwrap();
    c.txn(
        Txn::new()
            .when([Compare::version("mid", CompareOp::Greater, 0)])
            .and_then([TxnOp::put("t1", "a", None), TxnOp::put("t2", "b", None)]),
    )
    .await
    .unwrap();
    lease
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_snapshots_restore_into_a_new_three_member_cluster_with_equal_hashes() {
    let src = Cairn::start().await;
    let mut c = src.client().await;
    let lease = workload(&mut c).await;
    let status = c.status().await.unwrap();
    let rev = status.header().unwrap().revision();
    let want = dump(&mut c, 0).await;
    let compacted_rev = c.hash_kv(0).await.unwrap().compact_version();
    let want_hash = c.hash_kv(rev).await.unwrap().hash();

    let tmp = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (i, ctl) in etcdctls().iter().enumerate() {
        let path = tmp.path().join(format!("etcdctl-{i}.db"));
        let (ok, _, err) = run(
            ctl,
            &[
                &format!("--endpoints={}", src.endpoint()),
                "snapshot",
                "save",
                path.to_str().unwrap(),
            ],
        );
        assert!(ok, "{} snapshot save failed: {err}", ctl.display());
        files.push(path);
    }
    let own = tmp.path().join("cairn.db");
    let (ok, out, err) = run(
        &cairn_bin(),
        &["snapshot", "save", own.to_str().unwrap(), "--endpoints", &src.endpoint()],
    );
    assert!(ok && out.contains("Snapshot saved at"), "{out} {err}");
    files.push(own);
    // Nothing was written in between, so every client saved the same image.
    let first = std::fs::read(&files[0]).unwrap();
    for f in &files[1..] {
        assert_eq!(std::fs::read(f).unwrap(), first, "{} differs", f.display());
    }

    let (ok, out, err) =
        run(&cairn_bin(), &["snapshot", "status", files[0].to_str().unwrap(), "-w", "json"]);
    assert!(ok, "{err}");
    let js: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(js["revision"], rev);
    assert_eq!(js["totalSize"], first.len() as u64);
    assert!(js["totalKey"].as_u64().unwrap() > 50);
    let (ok, out, _) =
        run(&cairn_bin(), &["snapshot", "status", files[0].to_str().unwrap(), "-w", "table"]);
    assert!(ok && out.contains("| REVISION |") && out.contains(&format!(" {rev} |")), "{out}");
    drop(c);
    drop(src);

    // Three members, each restored from the snapshot with its own name and peer URL.
    let mut members: Vec<Cairn> =
        (0..3).map(|i| Cairn::new(&format!("r{i}"), tempfile::tempdir().unwrap(), &[])).collect();
    let initial: Vec<String> =
        members.iter().map(|m| format!("{}={}", m.name, m.peer_url)).collect();
    let initial = initial.join(",");
    for m in &mut members {
        m.initial_cluster = initial.clone();
        restore_into(&files[0], m, &initial);
    }
    for m in &mut members {
        m.spawn_only();
    }
    for m in &members {
        wait_ready(&m.client_url).await;
    }
    let mut cluster = Cluster { members, proxies: Vec::new() };
    cluster.wait_published(3).await;
    cluster.assert_hashes_equal().await;
    for m in &cluster.members {
        let mut c = m.client().await;
        assert_eq!(dump(&mut c, 0).await, want, "{} restored other keys", m.name);
        assert_eq!(c.hash_kv(rev).await.unwrap().hash(), want_hash, "{}", m.name);
        assert_eq!(c.hash_kv(0).await.unwrap().compact_version(), compacted_rev);
        let leases = c.leases().await.unwrap();
        assert_eq!(leases.leases().iter().map(|l| l.id()).collect::<Vec<_>>(), [lease]);
        let members = c.member_list().await.unwrap();
        assert_eq!(members.members().len(), 3, "the new member list replaces the old one");
    }
    // The new cluster takes writes on top of the restored revision, and old history reads.
    let mut c = cluster.members[1].client().await;
    let next = c.put("after", "restore", None).await.unwrap().header().unwrap().revision();
    assert_eq!(next, rev + 1);
    let old = dump(&mut c, rev - 1).await;
    assert!(!old.is_empty());
}

#[tokio::test]
async fn truncated_or_corrupted_snapshots_are_refused_and_nothing_is_written() {
    let src = Cairn::start().await;
    let mut c = src.client().await;
    workload(&mut c).await;
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.db");
    let (ok, _, err) = run(
        &cairn_bin(),
        &["snapshot", "save", good.to_str().unwrap(), "--endpoints", &src.endpoint()],
    );
    assert!(ok, "{err}");
    let bytes = std::fs::read(&good).unwrap();
    let bad = tmp.path().join("bad.db");
    let target = tmp.path().join("restored");
    let damaged: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("without its trailer", bytes[..bytes.len() - 32].to_vec()),
        ("flipped", {
            let mut b = bytes.clone();
            let mid = b.len() / 3;
            b[mid] ^= 0x01;
            b
        }),
        ("empty", Vec::new()),
    ];
    for (what, content) in damaged {
        std::fs::write(&bad, &content).unwrap();
        let (ok, _, err) = run(
            &cairn_bin(),
            &["snapshot", "restore", bad.to_str().unwrap(), "--data-dir", target.to_str().unwrap()],
        );
        assert!(!ok, "a {what} snapshot was restored");
        assert!(err.contains("snapshot") || err.contains("sha256"), "{what}: unclear error {err}");
        assert!(!target.exists(), "a {what} snapshot left {} behind", target.display());
        // etcdutl's status reads a database without a trailer; anything damaged is refused.
        let (ok, _, _) = run(&cairn_bin(), &["snapshot", "status", bad.to_str().unwrap()]);
        assert_eq!(ok, what == "without its trailer", "status of a {what} snapshot");
    }
    // The good one restores; a second restore into the same data dir is refused.
    let args =
        ["snapshot", "restore", good.to_str().unwrap(), "--data-dir", target.to_str().unwrap()];
    assert!(run(&cairn_bin(), &args).0);
    let (ok, _, err) = run(&cairn_bin(), &args);
    assert!(!ok && err.contains("exists"), "{err}");
}

/// Status's dbSize of the member behind `c`.
async fn db_size(c: &mut Client) -> i64 {
    c.status().await.unwrap().db_size()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defrag_after_compaction_returns_space_and_keeps_every_key() {
    let m = Cairn::start().await;
    let mut c = m.client().await;
    // 100k revisions over 1000 keys, written by 16 concurrent clients.
    let mut tasks = Vec::new();
    for t in 0..16 {
        let mut c = m.client().await;
        tasks.push(tokio::spawn(async move {
            let value = vec![b'x'; 256];
            for i in 0..6250 {
                c.put(format!("k{:04}", (t * 6250 + i) % 1000), value.clone(), None).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rev = c.put("last", "1", None).await.unwrap().header().unwrap().revision();
    assert!(rev > 100_000);
    c.compact(rev, None).await.unwrap();
    // HashKV refuses the compaction revision itself, as etcd's does: hash one above it.
    c.put("last", "2", None).await.unwrap();
    let want = dump(&mut c, 0).await;
    let before = db_size(&mut c).await;
    let hashed = c.hash_kv(0).await.unwrap();
    let (hash, hash_rev) = (hashed.hash(), hashed.header().unwrap().revision());
    // A writer goes on during the defrag (on keys of its own); its slowest put is
    // reported, not asserted (no wall-clock assertions).
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let mut w = m.client().await;
        let done = done.clone();
        tokio::spawn(async move {
            let (mut n, mut slowest) = (0u64, std::time::Duration::ZERO);
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let t = std::time::Instant::now();
                w.put(format!("during/{n}"), "x", None).await.unwrap();
                slowest = slowest.max(t.elapsed());
                n += 1;
            }
            (n, slowest)
        })
    };
    let t = std::time::Instant::now();
    c.defragment().await.unwrap();
    let took = t.elapsed();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let (puts, slowest) = writer.await.unwrap();
    let after = db_size(&mut c).await;
    eprintln!(
        "defrag of 100k overwritten revisions: dbSize {before} -> {after}, took {took:?}; \
         {puts} puts meanwhile, slowest {slowest:?}"
    );
    let during =
        c.delete("during/", Some(etcd_client::DeleteOptions::new().with_prefix())).await.unwrap();
    assert_eq!(during.deleted() as u64, puts, "every put during the defrag is kept");
    assert!(after * 4 < before, "defrag kept {after} of {before} bytes");
    assert_eq!(dump(&mut c, 0).await, want);
    assert_eq!(c.hash_kv(hash_rev).await.unwrap().hash(), hash);
    // Still durable and complete across a restart after the switch.
    let mut m = m;
    m.restart().await;
    let mut c = m.client().await;
    assert_eq!(dump(&mut c, 0).await, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_defrag_cluster_alarm_and_hash_work_on_three_members() {
    // The corruption check runs all along and must find nothing on a healthy cluster.
    let mut cluster = Cluster::start(3, &["--experimental-corrupt-check-time=1s"]).await;
    let mut c = cluster.members[0].client().await;
    for i in 0..2000 {
        c.put(format!("k{}", i % 20), vec![b'v'; 1024], None).await.unwrap();
    }
    let rev = c.put("x", "y", None).await.unwrap().header().unwrap().revision();
    c.compact(rev, Some(etcd_client::CompactionOptions::new().with_physical())).await.unwrap();
    let endpoints = cluster.endpoints().join(",");
    for ctl in etcdctls() {
        let (ok, out, err) =
            run(&ctl, &[&format!("--endpoints={}", cluster.endpoints()[0]), "defrag", "--cluster"]);
        assert!(ok, "{}: {out} {err}", ctl.display());
        assert_eq!(out.matches("Finished defragmenting etcd member").count(), 3, "{out}");
        let (ok, out, err) = run(&ctl, &[&format!("--endpoints={endpoints}"), "alarm", "list"]);
        assert!(ok && out.trim().is_empty(), "{out} {err}");
        let (ok, out, err) =
            run(&ctl, &[&format!("--endpoints={endpoints}"), "endpoint", "hashkv"]);
        assert!(ok, "{err}");
        let hashes: std::collections::HashSet<&str> =
            out.lines().filter_map(|l| l.split(", ").nth(1)).collect();
        assert_eq!(hashes.len(), 1, "{out}");
    }
    cluster.assert_hashes_equal().await;
    // Hash answers, and members that applied the same log hash equally.
    let mut seen = std::collections::HashSet::new();
    for m in &cluster.members {
        let mut c = m.client().await;
        let h = c.hash().await.unwrap();
        seen.insert((h.header().unwrap().revision(), h.hash()));
    }
    assert_eq!(seen.len(), 1, "{seen:?}");
}

/// The outcome of one step: Ok, or the error's gRPC code and message.
fn outcome<T>(r: Result<T, etcd_client::Error>) -> String {
    match r {
        Ok(_) => "ok".to_owned(),
        Err(etcd_client::Error::GRpcStatus(s)) => format!("{:?}: {}", s.code(), s.message()),
        Err(e) => format!("other: {e}"),
    }
}

/// The NOSPACE sequence against one server: fill past the quota, probe what is refused and
/// what still works, free space, disarm, write again. Returns each step's outcome.
async fn nospace_sequence(url: &str) -> Vec<(String, String)> {
    let mut c = Client::connect([url], None).await.unwrap();
    let mut steps = Vec::new();
    let big = vec![b'a'; 100 * 1024];
    let mut acknowledged = Vec::new();
    let mut first_error = None;
    for i in 0..200 {
        match c.put(format!("big/{i:03}"), big.clone(), None).await {
            Ok(_) => acknowledged.push(format!("big/{i:03}")),
            Err(e) => {
                first_error = Some(outcome::<()>(Err(e)));
                break;
            }
        }
    }
    steps.push((
        "fill until refused".to_owned(),
        first_error.unwrap_or_else(|| "never refused".into()),
    ));
    let alarms = c.alarm(AlarmAction::Get, AlarmType::None, None).await.unwrap();
    let kinds: Vec<_> = alarms.alarms().iter().map(|a| a.alarm()).collect();
    steps.push(("alarm list".into(), format!("{kinds:?}")));
    steps.push(("small put".into(), outcome(c.put("small", "v", None).await)));
    steps.push((
        "txn with a put".into(),
        outcome(c.txn(Txn::new().and_then([TxnOp::put("small", "v", None)])).await),
    ));
    steps.push(("lease grant".into(), outcome(c.lease_grant(60, None).await)));
    steps.push(("get".into(), outcome(c.get("big/000", None).await)));
    steps.push((
        "read-only txn".into(),
        outcome(c.txn(Txn::new().and_then([TxnOp::get("big/000", None)])).await),
    ));
    let got = c.get("big/", Some(GetOptions::new().with_prefix().with_keys_only())).await.unwrap();
    let keys: Vec<String> =
        got.kvs().iter().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).collect();
    steps.push(("every acknowledged put is there".into(), (keys == acknowledged).to_string()));
    let del = c.delete("big/", Some(etcd_client::DeleteOptions::new().with_prefix())).await;
    steps.push(("delete".into(), outcome(del)));
    let rev = c.get("x", None).await.unwrap().header().unwrap().revision();
    steps.push(("compact".into(), outcome(c.compact(rev, None).await)));
    steps.push(("defrag".into(), outcome(c.defragment().await)));
    steps.push(("put before disarm".into(), outcome(c.put("small", "v", None).await)));
    let mut opts = AlarmOptions::new();
    opts.with_member(alarms.alarms().first().map_or(0, |a| a.member_id()));
    let disarmed = c.alarm(AlarmAction::Deactivate, AlarmType::Nospace, Some(opts)).await;
    steps.push(("disarm".into(), outcome(disarmed)));
    let left = c.alarm(AlarmAction::Get, AlarmType::None, None).await.unwrap();
    steps.push(("alarms after disarm".into(), left.alarms().len().to_string()));
    steps.push(("put after disarm".into(), outcome(c.put("small", "v", None).await)));
    steps.push(("lease grant after disarm".into(), outcome(c.lease_grant(60, None).await)));
    steps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nospace_sequence_matches_etcd_step_by_step() {
    let quota = "--quota-backend-bytes=2000000";
    let cairn = Cairn::start_with(&[quota]).await;
    let ours = nospace_sequence(&cairn.client_url).await;
    eprintln!("cairn: {ours:#?}");
    assert!(ours[0].1.contains("ResourceExhausted: etcdserver: mvcc: database space exceeded"));
    let Some(etcd) = Etcd::start_with(&[quota]).await else { return };
    let mut theirs = nospace_sequence(&etcd.client_url).await;
    // The one known difference: etcd 3.5 refuses even a read-only txn over quota; etcd 3.6
    // lets requests that cannot grow the database through (etcd commit 7b6554fd3, "non
    // mutating requests pass through quotaKVServer when NOSPACE"), as Cairn does.
    let step = theirs.iter_mut().find(|(name, _)| name == "read-only txn").unwrap();
    assert_eq!(step.1, "ResourceExhausted: etcdserver: mvcc: database space exceeded");
    step.1 = "ok".into();
    assert_eq!(ours, theirs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_snapshot_restores_into_cairn_with_every_key_and_revision() {
    let Some(etcd) = Etcd::start().await else { return };
    let mut e = Client::connect([etcd.client_url.as_str()], None).await.unwrap();
    let lease = workload(&mut e).await;
    // Enough keys for bbolt to split the key bucket over many branch and leaf pages, and
    // values past one page (overflow pages).
    for i in 0..3000 {
        e.put(format!("many/{i:05}"), format!("v{i}"), None).await.unwrap();
    }
    e.put("large", vec![b'L'; 20_000], None).await.unwrap();
    e.delete("many/0", Some(etcd_client::DeleteOptions::new().with_prefix())).await.unwrap();
    let rev = e.status().await.unwrap().header().unwrap().revision();
    let compacted = rev - 2000;
    e.compact(compacted, None).await.unwrap();
    let rev = e.put("final", "f", None).await.unwrap().header().unwrap().revision();

    let tmp = tempfile::tempdir().unwrap();
    let snap = tmp.path().join("etcd.db");
    let ctl = etcdctls().pop().expect("etcdctl");
    let (ok, _, err) = run(
        &ctl,
        &[&format!("--endpoints={}", etcd.client_url), "snapshot", "save", snap.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    let (ok, out, err) =
        run(&cairn_bin(), &["snapshot", "status", snap.to_str().unwrap(), "-w", "json"]);
    assert!(ok, "{err}");
    let js: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(js["revision"], rev);

    let mut m = Cairn::new("migrated", tempfile::tempdir().unwrap(), &[]);
    restore_into(&snap, &m, "");
    m.spawn().await;
    let mut c = m.client().await;
    assert_eq!(c.status().await.unwrap().header().unwrap().revision(), rev);
    // Every key with its revisions, value and lease, now and at revisions back to the
    // compaction point; below it both refuse.
    for at in [0, rev, rev - 1, rev - 500, compacted + 1, compacted] {
        assert_eq!(dump(&mut c, at).await, dump(&mut e, at).await, "at revision {at}");
    }
    let below = GetOptions::new().with_revision(compacted - 1);
    assert_eq!(
        outcome(c.get("final", Some(below.clone())).await),
        outcome(e.get("final", Some(below)).await)
    );
    let theirs = e.lease_time_to_live(lease, None).await.unwrap();
    let ours = c.lease_time_to_live(lease, None).await.unwrap();
    assert_eq!(ours.granted_ttl(), theirs.granted_ttl());
    assert!(ours.ttl() > 0);
    // The migrated member goes on from etcd's revision.
    let next = c.put("after", "x", None).await.unwrap().header().unwrap().revision();
    assert_eq!(next, rev + 1);
    // A damaged etcd snapshot is refused and writes nothing.
    let mut bytes = std::fs::read(&snap).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&snap, &bytes).unwrap();
    let target = tmp.path().join("never");
    let (ok, _, err) = run(
        &cairn_bin(),
        &["snapshot", "restore", snap.to_str().unwrap(), "--data-dir", target.to_str().unwrap()],
    );
    assert!(!ok && err.contains("sha256"), "{err}");
    assert!(!target.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_defrag_or_a_snapshot_stream_loses_nothing() {
    let mut m = Cairn::start().await;
    let mut c = m.client().await;
    let mut want = Vec::new();
    for i in 0..20_000 {
        c.put(format!("k{:03}", i % 500), format!("v{i}"), None).await.unwrap();
    }
    let rev = c.put("mark", "0", None).await.unwrap().header().unwrap().revision();
    c.compact(rev, None).await.unwrap();
    want.push(dump(&mut c, 0).await);
    drop(c);
    // Kill the member at different points of a defragmentation: before, during, or after
    // the switch-over; every acknowledged write survives each time.
    for (round, delay_ms) in [0u64, 20, 80, 300].into_iter().enumerate() {
        let mut c = m.client().await;
        let ack = c.put("mark", round.to_string(), None).await.unwrap();
        assert!(ack.header().is_some());
        let expected = dump(&mut c, 0).await;
        let mut d = m.client().await;
        let defrag = tokio::spawn(async move { d.defragment().await.is_ok() });
        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
        m.kill9();
        let _ = defrag.await;
        m.spawn().await;
        let mut c = m.client().await;
        assert_eq!(dump(&mut c, 0).await, expected, "after a kill in round {round}");
    }
    // Kill it while a snapshot streams to a slow reader; the member restarts whole, and a
    // later snapshot is complete.
    let mut c = m.client().await;
    let expected = dump(&mut c, 0).await;
    let mut stream = c.snapshot().await.unwrap();
    let first = stream.message().await.unwrap();
    assert!(first.is_some());
    m.kill9();
    while let Ok(Some(_)) = stream.message().await {}
    m.spawn().await;
    let mut c = m.client().await;
    assert_eq!(dump(&mut c, 0).await, expected);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("after.db");
    let (ok, _, err) = run(
        &cairn_bin(),
        &["snapshot", "save", path.to_str().unwrap(), "--endpoints", &m.endpoint()],
    );
    assert!(ok, "{err}");
    let (ok, out, _) =
        run(&cairn_bin(), &["snapshot", "status", path.to_str().unwrap(), "-w", "json"]);
    assert!(ok);
    let js: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(js["revision"], c.status().await.unwrap().header().unwrap().revision());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_a_point_in_time_image_while_writes_go_on() {
    let m = Cairn::start().await;
    let mut c = m.client().await;
    for i in 0..5000 {
        c.put(format!("k{:04}", i % 2000), vec![b'x'; 512], None).await.unwrap();
    }
    let writer = {
        let mut w = m.client().await;
        tokio::spawn(async move {
            for i in 0..2000 {
                w.put(format!("w{i}"), "during", None).await.unwrap();
            }
        })
    };
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("live.db");
    let mut stream = c.snapshot().await.unwrap();
    let mut bytes = Vec::new();
    let mut revision = None;
    while let Some(msg) = stream.message().await.unwrap() {
        if revision.is_none() {
            revision = msg.header().map(|h| h.revision());
        }
        bytes.extend_from_slice(msg.blob());
    }
    std::fs::write(&path, &bytes).unwrap();
    writer.await.unwrap();
    let revision = revision.expect("the first response carries the snapshot's revision");
    // The image holds exactly the state at its revision: restore it and compare with the
    // source read at that revision.
    let mut r = Cairn::new("pit", tempfile::tempdir().unwrap(), &[]);
    restore_into(&path, &r, "");
    r.spawn().await;
    let mut rc = r.client().await;
    assert_eq!(rc.status().await.unwrap().header().unwrap().revision(), revision);
    assert_eq!(dump(&mut rc, 0).await, dump(&mut c, revision).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_diverged_data_raises_a_corrupt_alarm_and_writes_stop() {
    // Two sources at the same revision with one value different; two members restored
    // from one, the third from the other.
    let tmp = tempfile::tempdir().unwrap();
    let mut snaps = Vec::new();
    for (i, odd) in ["same", "different"].into_iter().enumerate() {
        let src = Cairn::start().await;
        let mut c = src.client().await;
        for k in 0..50 {
            c.put(format!("k{k}"), "v", None).await.unwrap();
        }
        c.put("odd", odd, None).await.unwrap();
        let path = tmp.path().join(format!("src{i}.db"));
        let (ok, _, err) = run(
            &cairn_bin(),
            &["snapshot", "save", path.to_str().unwrap(), "--endpoints", &src.endpoint()],
        );
        assert!(ok, "{err}");
        snaps.push(path);
    }
    let flags = ["--experimental-corrupt-check-time=1s"];
    let mut members: Vec<Cairn> = (0..3)
        .map(|i| Cairn::new(&format!("c{i}"), tempfile::tempdir().unwrap(), &flags))
        .collect();
    let initial: Vec<String> =
        members.iter().map(|m| format!("{}={}", m.name, m.peer_url)).collect();
    let initial = initial.join(",");
    for (i, m) in members.iter_mut().enumerate() {
        m.initial_cluster = initial.clone();
        restore_into(&snaps[usize::from(i == 2)], m, &initial);
        m.spawn_only();
    }
    for m in &members {
        wait_ready(&m.client_url).await;
    }
    let cluster = Cluster { members, proxies: Vec::new() };
    cluster.wait_published(3).await;
    let mut c = cluster.members[0].client().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let alarms = c.alarm(AlarmAction::Get, AlarmType::None, None).await.unwrap();
        if alarms.alarms().iter().any(|a| a.alarm() == AlarmType::Corrupt) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no CORRUPT alarm was raised");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(outcome(c.put("x", "y", None).await), "DataLoss: etcdserver: corrupt cluster");
    // Reads still work.
    assert_eq!(outcome(c.get("odd", None).await), "ok");
}

#[tokio::test]
async fn etcdctl_alarm_list_and_disarm_work() {
    for ctl in etcdctls() {
        let m = Cairn::start_with(&["--quota-backend-bytes=1000000"]).await;
        let mut c = m.client().await;
        let big = vec![b'a'; 100 * 1024];
        let mut refused = false;
        for i in 0..100 {
            if c.put(format!("big/{i}"), big.clone(), None).await.is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused, "the quota was never reached");
        let ep = format!("--endpoints={}", m.endpoint());
        let (ok, out, err) = run(&ctl, &[&ep, "alarm", "list"]);
        assert!(ok && out.contains("alarm:NOSPACE"), "{}: {out} {err}", ctl.display());
        let (ok, out, err) = run(&ctl, &[&ep, "alarm", "disarm"]);
        assert!(ok && out.contains("alarm:NOSPACE"), "{}: {out} {err}", ctl.display());
        let (ok, out, err) = run(&ctl, &[&ep, "alarm", "list"]);
        assert!(ok && out.trim().is_empty(), "{}: {out} {err}", ctl.display());
    }
}
