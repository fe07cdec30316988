//! The operator's day two on the test bed: scheduled compaction (status.lastCompaction
//! advances, an old revision answers "required revision has been compacted"), backups (a
//! `Backup` runs a Job with the cairn image that saves a snapshot into a PVC; scheduled
//! backups honour retention), restore into a new Cluster (HashKV equal to a member restored
//! by hand; a wrong checksum stops it with a condition), a defragmentation run that takes
//! the followers before the leader, recovery from quorum loss from the survivor with
//! every acknowledged write kept, and (no survivor) a rebuild from the newest backup.
//!
//! Shares the operator process and helpers of `operator.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use cairn_operator::crd::{Backup, BackupPhase, Cluster, ClusterStatus};
use kube::ResourceExt;
use kube::api::{Api, ListParams};

use crate::bed::{self, Bed, wait_for};
use crate::operator::{
    STEP_TIMEOUT, client_url, etcd, events, manifest, operator, patch_spec, settled, status,
};

/// Puts `n` keys `<prefix>/0000`… with values `value-<i>`; returns the last revision.
pub(crate) async fn put_numbered(c: &mut etcd_client::Client, prefix: &str, n: usize) -> i64 {
    let mut written = 0;
    for i in 0..n {
        written = c
            .put(format!("{prefix}/{i:04}"), format!("value-{i}"), None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
    }
    written
}

/// The Degraded condition a restore refused for a checksum mismatch sets, if set.
pub(crate) fn checksum_refusal(s: &ClusterStatus) -> Option<cairn_operator::crd::Condition> {
    s.conditions
        .iter()
        .find(|c| {
            c.type_ == "Degraded"
                && c.reason == "RestoreFailed"
                && c.message.contains("checksum mismatch")
        })
        .cloned()
}

/// Applies a Cluster with `extra` spec lines and waits until it has `n` healthy voters.
pub(crate) async fn create(bed: &Bed, ns: &str, name: &str, n: u32, extra: &str) -> ClusterStatus {
    let api: Api<Cluster> = Api::namespaced(bed.client().await.unwrap(), ns);
    let started = Instant::now();
    bed.apply(&manifest(ns, name, n, extra)).await.unwrap();
    let s = wait_for(&format!("{name}: {n} voters, Available"), STEP_TIMEOUT, || {
        settled(&api, name, n as usize)
    })
    .await
    .unwrap();
    eprintln!("{name}: {n} members Available after {:.1}s", started.elapsed().as_secs_f64());
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_compaction_advances_and_old_revisions_answer_compacted() {
    let bed = bed::shared();
    operator(bed).await;
    let ns = bed.namespace("op-compact").await.unwrap();
    let _logs = bed.dump_on_failure(&ns);
    let api: Api<Cluster> = Api::namespaced(bed.client().await.unwrap(), &ns);
    let extra = "  compaction:\n    schedule: \"@every 2s\"\n    retain: {duration: 4s}\n";
    create(bed, &ns, "cp", 1, extra).await;

    let url = client_url(&ns, "cp", 0);
    let mut c = etcd(std::slice::from_ref(&url)).await.unwrap();
    let first = c.put("compact/k", "v0", None).await.unwrap().header().unwrap().revision();
    // Keep writing so that every recorded revision differs.
    let started = Instant::now();
    let mut i = 1;
    let compacted = loop {
        c.put("compact/k", format!("v{i}"), None).await.unwrap();
        i += 1;
        let s = status(&api, "cp").await.unwrap();
        if let Some(l) = s.last_compaction.clone().filter(|l| l.revision > first) {
            break l;
        }
        assert!(started.elapsed() < STEP_TIMEOUT, "no compaction past {first}: {s:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "compaction: lastCompaction at revision {} after {:.1}s ({i} writes)",
        compacted.revision,
        started.elapsed().as_secs_f64()
    );
    // The compacted history is gone: the first write's revision is refused as etcd does.
    let err = c
        .get("compact/k", Some(etcd_client::GetOptions::new().with_revision(first)))
        .await
        .expect_err("an old revision still answered after compaction");
    assert!(err.to_string().contains("required revision has been compacted"), "{err}");
    // The revision compacted to still answers (etcd keeps the compaction revision itself).
    let kept = c
        .get("compact/k", Some(etcd_client::GetOptions::new().with_revision(compacted.revision)))
        .await
        .unwrap();
    assert_eq!(kept.kvs().len(), 1);

    // It keeps going: a later tick compacts further.
    let later = wait_for("a second, later compaction", STEP_TIMEOUT, || {
        let (api, url) = (api.clone(), url.clone());
        async move {
            let mut c = etcd(std::slice::from_ref(&url)).await?;
            c.put("compact/k", "more", None).await?;
            let s = status(&api, "cp").await?;
            Ok(s.last_compaction.filter(|l| l.revision > compacted.revision))
        }
    })
    .await
    .unwrap();
    let t = |s: &str| s.parse::<k8s_openapi::jiff::Timestamp>().unwrap();
    assert!(t(&later.time) >= t(&compacted.time), "{later:?} after {compacted:?}");
    let ev = events(bed, &ns).await;
    assert!(ev.contains("Compacted"), "{ev}");
    assert!(!ev.contains("CompactionFailed"), "{ev}");
    let s = status(&api, "cp").await.unwrap();
    let samples = s.compaction.map(|c| c.samples.len()).unwrap_or_default();
    assert!(samples > 0 && samples <= 32, "status keeps a bounded sample list: {samples}");

    // Paused: no more compactions.
    patch_spec(bed, &ns, "cp", r#"{"spec":{"paused":true}}"#).await;
    wait_for("phase Paused", STEP_TIMEOUT, || async {
        let s = status(&api, "cp").await?;
        Ok((s.phase == Some(cairn_operator::crd::Phase::Paused)).then_some(()))
    })
    .await
    .unwrap();
    let before = status(&api, "cp").await.unwrap().last_compaction;
    for _ in 0..20 {
        c.put("compact/k", "paused", None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(status(&api, "cp").await.unwrap().last_compaction, before, "compacted while paused");
    bed.kubectl(&["delete", "cc", "cp", "-n", &ns, "--wait=false"]).await.unwrap();
}

/// Creates the claim `backups` that backups go to.
async fn backup_claim(bed: &Bed, ns: &str) {
    bed.apply(&format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: backups, namespace: {ns}}}\nspec:\n  accessModes: [ReadWriteOnce]\n  resources: {{requests: {{storage: 1Gi}}}}\n"
    ))
    .await
    .unwrap();
}

/// The sha256 of a file, as `sha256sum` prints it.
pub(crate) fn sha256_of(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
}

/// Waits until retention pruned a backup of `cluster`, then slows its schedule to hourly so
/// the set of kept backups settles.
pub(crate) async fn settle_after_pruning(bed: &Bed, ns: &str, cluster: &str) {
    wait_for("a backup pruned by keep.count", STEP_TIMEOUT, || async {
        Ok(events(bed, ns).await.contains("BackupPruned").then_some(()))
    })
    .await
    .unwrap();
    patch_spec(bed, ns, cluster, r#"{"spec":{"backup":{"schedule":"@every 1h"}}}"#).await;
}

/// The names of the succeeded Backups among `all` that retention has not deleted, sorted.
pub(crate) fn kept_names(all: &[Backup]) -> Vec<String> {
    let mut names: Vec<String> = all
        .iter()
        .filter(|b| {
            phase_of(b) == Some(BackupPhase::Succeeded) && b.metadata.deletion_timestamp.is_none()
        })
        .map(|b| b.name_any())
        .collect();
    names.sort();
    names
}

pub(crate) async fn backups_of(api: &Api<Backup>, cluster: &str) -> anyhow::Result<Vec<Backup>> {
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|b| b.spec.cluster_name == cluster)
        .collect())
}

pub(crate) fn phase_of(b: &Backup) -> Option<BackupPhase> {
    b.status.as_ref().and_then(|s| s.phase)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backups_land_in_a_claim_with_checksums_and_retention() {
    let bed = bed::shared();
    operator(bed).await;
    let ns = bed.namespace("op-backup").await.unwrap();
    let _logs = bed.dump_on_failure(&ns);
    let client = bed.client().await.unwrap();
    let api: Api<Cluster> = Api::namespaced(client.clone(), &ns);
    let backups: Api<Backup> = Api::namespaced(client.clone(), &ns);
    backup_claim(bed, &ns).await;
    // A one-shot Backup of a Cluster that does not exist fails with a reason that says so.
    bed.apply(&format!(
        "apiVersion: cairn.dev/v1alpha1\nkind: Backup\nmetadata: {{name: orphan, namespace: {ns}}}\nspec: {{clusterName: nosuch}}\n"
    ))
    .await
    .unwrap();

    create(bed, &ns, "bk", 1, "").await;
    let url = client_url(&ns, "bk", 0);
    let mut c = etcd(std::slice::from_ref(&url)).await.unwrap();
    let written = put_numbered(&mut c, "backup", 200).await;
    // Backups every 3 s, keeping the newest 2.
    let started = Instant::now();
    bed.kubectl(&[
        "patch", "cc", "bk", "-n", &ns, "--type=merge", "-p",
        r#"{"spec":{"backup":{"schedule":"@every 3s","keep":{"count":2},"destination":{"pvc":{"claimName":"backups","subPath":"bk"}}}}}"#,
    ])
    .await
    .unwrap();
    let first = wait_for("a successful backup", STEP_TIMEOUT, || async {
        Ok(backups_of(&backups, "bk")
            .await?
            .into_iter()
            .find(|b| phase_of(b) == Some(BackupPhase::Succeeded)))
    })
    .await
    .unwrap();
    let st = first.status.clone().unwrap();
    report_first_backup("backup", started, &st);
    assert!(st.revision.unwrap() >= written, "{st:?} misses writes up to {written}");
    let dir = bed.pvc_dir(&ns, "backups").join("bk");
    let file = dir.join(format!("{}.db", first.name_any()));
    assert_eq!(
        st.location.as_deref(),
        Some(format!("pvc://backups/bk/{}.db", first.name_any()).as_str())
    );
    assert_eq!(st.checksum.clone().unwrap(), format!("sha256:{}", sha256_of(&file)));
    assert_eq!(st.size.unwrap() as u64, std::fs::metadata(&file).unwrap().len());
    // The file is a snapshot `cairn snapshot status` reads at the recorded revision.
    let out = std::process::Command::new(bed::cairn_bin().unwrap())
        .args(["snapshot", "status", file.to_str().unwrap(), "-w", "json"])
        .output()
        .unwrap();
    let status_json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status_json["revision"].as_i64(), st.revision);

    // Retention: once older backups are pruned, slow the schedule down and let it settle:
    // exactly the newest two successful backups remain, objects and files alike.
    settle_after_pruning(bed, &ns, "bk").await;
    let kept = wait_for("two backups kept, files matching", STEP_TIMEOUT, || async {
        let all = backups_of(&backups, "bk").await?;
        let good = kept_names(&all);
        let mut files: Vec<String> = std::fs::read_dir(&dir)?
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        let mut want: Vec<String> =
            good.iter().flat_map(|n| [format!("{n}.db"), format!("{n}.db.sha256")]).collect();
        want.sort();
        Ok((all.len() == 2 && good.len() == 2 && files == want).then_some(good))
    })
    .await
    .unwrap();
    eprintln!("backup: retention kept {kept:?}");
    let s = status(&api, "bk").await.unwrap();
    let last = s.last_backup.clone().expect("status.lastBackup");
    assert!(kept.contains(&last.name), "{last:?} not among {kept:?}");
    let healthy = s.conditions.iter().find(|c| c.type_ == "BackupHealthy").expect("BackupHealthy");
    assert_eq!(healthy.status, "True", "{healthy:?}");

    let orphan = backups.get("orphan").await.unwrap().status.unwrap_or_default();
    assert_eq!(orphan.phase, Some(BackupPhase::Failed), "{orphan:?}");
    assert!(orphan.reason.unwrap_or_default().contains("Cluster nosuch not found"));
    let ev = events(bed, &ns).await;
    assert!(ev.contains("BackupSucceeded"), "{ev}");
    bed.kubectl(&["delete", "cc", "bk", "-n", &ns, "--wait=false"]).await.unwrap();
}

/// Creates the 3-member Cluster `name` from Backup `backup` and checks it: Available, a
/// cluster ID other than `src`'s, `keys.1` keys under the prefix `keys.0`, and `lease`.
/// Returns the members' client URLs.
pub(crate) async fn restored(
    bed: &Bed,
    ns: &str,
    name: &str,
    backup: &str,
    src: &ClusterStatus,
    keys: (&str, usize),
    lease: i64,
) -> Vec<String> {
    let started = Instant::now();
    let extra = format!("  bootstrap: {{fromBackup: {{name: {backup}}}}}\n");
    let dst = create(bed, ns, name, 3, &extra).await;
    eprintln!(
        "restore: 3-member cluster {name} from backup {backup} Available after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert_ne!(dst.cluster_id, src.cluster_id, "a restored cluster gets a new cluster ID");
    let urls: Vec<String> = (0..3).map(|o| client_url(ns, name, o)).collect();
    let mut d = etcd(&urls[..1]).await.unwrap();
    let got = d.get(keys.0, Some(etcd_client::GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(got.kvs().len(), keys.1, "keys under {} in {name}", keys.0);
    let leases: Vec<i64> = d.leases().await.unwrap().leases().iter().map(|l| l.id()).collect();
    assert!(leases.contains(&lease), "lease {lease:x} missing from {leases:?}");
    urls
}

/// Asserts that every member answers HashKV at `revision` with `want`.
pub(crate) async fn assert_hash_kv(urls: &[String], revision: i64, want: u32) {
    for u in urls {
        let h = wait_for(&format!("HashKV at {revision} on {u}"), Duration::from_secs(60), || {
            let u = u.clone();
            async move { Ok(Some(etcd(&[u]).await?.hash_kv(revision).await?.hash())) }
        })
        .await
        .unwrap();
        assert_eq!(h, want, "{u}: HashKV at {revision} differs");
    }
}

/// Prints how long the first backup took: since the schedule was set, and its Job.
pub(crate) fn report_first_backup(
    what: &str,
    started: Instant,
    st: &cairn_operator::crd::BackupStatus,
) {
    let t =
        |s: &Option<String>| s.as_deref().unwrap().parse::<k8s_openapi::jiff::Timestamp>().unwrap();
    eprintln!(
        "{what}: first Succeeded {:.1}s after enabling; its Job took {:.1}s; revision {}, {} bytes",
        started.elapsed().as_secs_f64(),
        t(&st.completion_time).duration_since(t(&st.start_time)).as_secs_f64(),
        st.revision.unwrap(),
        st.size.unwrap()
    );
}

/// Waits until a Backup is Succeeded and returns its status.
pub(crate) async fn succeeded(api: &Api<Backup>, name: &str) -> cairn_operator::crd::BackupStatus {
    wait_for(&format!("backup {name} Succeeded"), STEP_TIMEOUT, || async {
        let s = api.get(name).await?.status.unwrap_or_default();
        match s.phase {
            Some(BackupPhase::Failed) => Err(anyhow::anyhow!("backup {name} failed: {s:?}")),
            Some(BackupPhase::Succeeded) => Ok(Some(s)),
            _ => Ok(None),
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_restored_from_a_backup_matches_a_hand_restored_member() {
    let bed = bed::shared();
    operator(bed).await;
    let ns = bed.namespace("op-restore").await.unwrap();
    let _logs = bed.dump_on_failure(&ns);
    let client = bed.client().await.unwrap();
    let api: Api<Cluster> = Api::namespaced(client.clone(), &ns);
    let backups: Api<Backup> = Api::namespaced(client.clone(), &ns);
    backup_claim(bed, &ns).await;
    let src = create(bed, &ns, "src", 1, "").await;
    let mut c = etcd(&[client_url(&ns, "src", 0)]).await.unwrap();
    for i in 0..300 {
        c.put(format!("restore/{i:04}"), format!("value-{i}"), None).await.unwrap();
    }
    c.delete("restore/0000", None).await.unwrap();
    let lease = c.lease_grant(3600, None).await.unwrap().id();
    c.put("restore/leased", "x", Some(etcd_client::PutOptions::new().with_lease(lease)))
        .await
        .unwrap();
    bed.apply(&format!(
        "apiVersion: cairn.dev/v1alpha1\nkind: Backup\nmetadata: {{name: snap, namespace: {ns}}}\nspec:\n  clusterName: src\n  destination: {{pvc: {{claimName: backups}}}}\n"
    ))
    .await
    .unwrap();
    let snap = succeeded(&backups, "snap").await;
    let revision = snap.revision.unwrap();

    // A new 3-member cluster from the backup: the seed restores, two learners join.
    // 299 written keys are left plus the leased one.
    let urls = restored(bed, &ns, "dst", "snap", &src, ("restore/", 300), lease).await;

    // A member restored by hand from the same file answers the same HashKV.
    let file = bed.pvc_dir(&ns, "backups").join("snap.db");
    let work = tempfile::tempdir().unwrap();
    let (cport, pport) = (bed::free_port().unwrap(), bed::free_port().unwrap());
    let peer = format!("http://127.0.0.1:{pport}");
    let data = work.path().join("hand");
    let out = std::process::Command::new(bed::cairn_bin().unwrap())
        .args(["snapshot", "restore", file.to_str().unwrap(), "--name", "hand"])
        .args(["--data-dir", data.to_str().unwrap(), "--initial-cluster", &format!("hand={peer}")])
        .args(["--initial-cluster-token", "hand", "--initial-advertise-peer-urls", &peer])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let client_url_hand = format!("http://127.0.0.1:{cport}");
    let _hand = bed
        .command(bed::cairn_bin().unwrap())
        .args([
            "--name=hand",
            &format!("--data-dir={}", data.display()),
            &format!("--listen-client-urls={client_url_hand}"),
            &format!("--advertise-client-urls={client_url_hand}"),
            &format!("--listen-peer-urls={peer}"),
            &format!("--initial-advertise-peer-urls={peer}"),
            &format!("--initial-cluster=hand={peer}"),
            "--initial-cluster-token=hand",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(work.path().join("hand.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let hand_hash =
        wait_for("the hand-restored member answers HashKV", Duration::from_secs(60), || {
            let u = client_url_hand.clone();
            async move { Ok(Some(etcd(&[u]).await?.hash_kv(revision).await?.hash())) }
        })
        .await
        .unwrap();
    assert_hash_kv(&urls, revision, hand_hash).await;
    eprintln!(
        "restore: HashKV at revision {revision} equal on 3 members and the hand-restored one: {hand_hash:x}"
    );

    // A wrong checksum stops the restore with a condition that says so.
    let zero = format!("sha256:{}", "0".repeat(64));
    bed.apply(&manifest(
        &ns,
        "bad",
        1,
        &format!("  bootstrap: {{fromBackup: {{location: \"pvc://backups/snap.db\", checksum: \"{zero}\"}}}}\n"),
    ))
    .await
    .unwrap();
    let cond = wait_for("RestoreFailed condition", STEP_TIMEOUT, || async {
        let s = status(&api, "bad").await?;
        Ok(checksum_refusal(&s).filter(|_| s.phase == Some(cairn_operator::crd::Phase::Restoring)))
    })
    .await
    .unwrap();
    eprintln!("restore: bad checksum reported: {}", cond.message);
    for name in ["dst", "bad", "src"] {
        bed.kubectl(&["delete", "cc", name, "-n", &ns, "--wait=false"]).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_defragmentation_run_takes_followers_first_and_the_leader_last() {
    let bed = bed::shared();
    operator(bed).await;
    let ns = bed.namespace("op-defrag").await.unwrap();
    let _logs = bed.dump_on_failure(&ns);
    let api: Api<Cluster> = Api::namespaced(bed.client().await.unwrap(), &ns);
    create(bed, &ns, "df", 3, "").await;
    let mut c = etcd(&[client_url(&ns, "df", 0)]).await.unwrap();
    for i in 0..200 {
        c.put(format!("defrag/{i:04}"), "x".repeat(512), None).await.unwrap();
    }
    c.delete("defrag/", Some(etcd_client::DeleteOptions::new().with_prefix())).await.unwrap();
    let started = Instant::now();
    patch_spec(bed, &ns, "df", r#"{"spec":{"defrag":{"schedule":"@every 1h"}}}"#).await;
    let state = wait_for("a finished defragmentation run over 3 members", STEP_TIMEOUT, || async {
        let s = status(&api, "df").await?;
        Ok(s.defrag.filter(|d| d.running.is_none() && d.members.len() == 3))
    })
    .await
    .unwrap();
    eprintln!(
        "defrag: run over 3 members finished {:.1}s after enabling",
        started.elapsed().as_secs_f64()
    );
    let t = |s: &str| s.parse::<k8s_openapi::jiff::Timestamp>().unwrap();
    let leaders: Vec<_> = state.members.iter().filter(|m| m.leader).collect();
    assert_eq!(leaders.len(), 1, "{state:?}");
    for f in state.members.iter().filter(|m| !m.leader) {
        assert!(
            t(&f.time) < t(&leaders[0].time),
            "follower {f:?} after the leader {:?}",
            leaders[0]
        );
    }
    let ev = events(bed, &ns).await;
    // Events of one reason are aggregated, so the run's order is read from DefragFinished,
    // which lists the members in the order they were done.
    assert!(ev.contains("Defragmented"), "{ev}");
    let finished = ev.lines().find(|l| l.starts_with("DefragFinished")).unwrap_or_default();
    assert!(
        finished.trim_end().ends_with(&leaders[0].name),
        "the leader must come last: {finished}"
    );
    assert!(ev.contains("DefragFinished"), "{ev}");
    bed.kubectl(&["delete", "cc", "df", "-n", &ns, "--wait=false"]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_loss_is_recovered_from_the_survivor_with_every_acknowledged_write() {
    let bed = bed::shared();
    operator(bed).await;
    let ns = bed.namespace("op-recover").await.unwrap();
    let _logs = bed.dump_on_failure(&ns);
    let api: Api<Cluster> = Api::namespaced(bed.client().await.unwrap(), &ns);
    let extra = "  recovery: {quorumLoss: FromSurvivor, window: 5s}\n";
    create(bed, &ns, "rc", 3, extra).await;
    let urls: Vec<String> = (0..3).map(|o| client_url(&ns, "rc", o)).collect();

    // A client writes until quorum is lost; every acknowledged write is remembered.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, urls) = (stop.clone(), urls.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut c = etcd(&urls).await.unwrap();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (k, v) = (format!("recover/{i:05}"), format!("v{i}"));
                if tokio::time::timeout(Duration::from_secs(2), c.put(k.clone(), v.clone(), None))
                    .await
                    .is_ok_and(|r| r.is_ok())
                {
                    acked.push((k, v));
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Two of three members lose their data for good: quorum is gone.
    let lost_at = Instant::now();
    for pod in ["rc-1", "rc-2"] {
        bed.wipe_pvc(&ns, &format!("data-{pod}")).unwrap();
        bed.kill_container(&ns, pod).unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writer.await.unwrap();
    assert!(acked.len() > 10, "too few writes before the loss: {}", acked.len());

    wait_for("the operator sees the quorum loss", STEP_TIMEOUT, || async {
        let s = status(&api, "rc").await?;
        Ok((s.quorum_lost_since.is_some() || s.recovery.is_some()).then_some(()))
    })
    .await
    .unwrap();
    let s =
        wait_for("rc: 3 voters again after the recovery", STEP_TIMEOUT, || settled(&api, "rc", 3))
            .await
            .unwrap();
    eprintln!(
        "recovery: quorum lost -> 3 voters again after {:.1}s ({} acknowledged writes)",
        lost_at.elapsed().as_secs_f64(),
        acked.len()
    );
    assert!(s.recovery.is_none() && s.quorum_lost_since.is_none(), "{s:?}");
    let mut c = etcd(&urls[..1]).await.unwrap();
    for (k, v) in &acked {
        let r = c.get(k.as_str(), None).await.unwrap();
        let got = r.kvs().first().map(|kv| kv.value_str().unwrap().to_owned());
        assert_eq!(got.as_deref(), Some(v.as_str()), "acknowledged write {k} lost");
    }
    let rev = c.get("recover/00000", None).await.unwrap().header().unwrap().revision();
    let hashes = wait_for("equal HashKV on 3 members", Duration::from_secs(60), || {
        let urls = urls.clone();
        async move {
            let mut hashes = Vec::new();
            for u in &urls {
                hashes.push(etcd(std::slice::from_ref(u)).await?.hash_kv(rev).await?.hash());
            }
            Ok(hashes.iter().all(|h| *h == hashes[0]).then_some(hashes))
        }
    })
    .await
    .unwrap();
    eprintln!("recovery: HashKV at {rev} equal on 3 members: {:x}", hashes[0]);
    let ev = events(bed, &ns).await;
    for reason in ["QuorumLost", "QuorumLossRecovery", "Recovered"] {
        assert!(ev.contains(reason), "no {reason} event in\n{ev}");
    }
    bed.kubectl(&["delete", "cc", "rc", "-n", &ns, "--wait=false"]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_loss_with_no_survivor_is_rebuilt_from_the_newest_backup() {
    let bed = bed::shared();
    operator(bed).await;
    let ns = bed.namespace("op-rebuild").await.unwrap();
    let _logs = bed.dump_on_failure(&ns);
    let client = bed.client().await.unwrap();
    let api: Api<Cluster> = Api::namespaced(client.clone(), &ns);
    let backups: Api<Backup> = Api::namespaced(client.clone(), &ns);
    backup_claim(bed, &ns).await;
    create(bed, &ns, "rb", 3, "  recovery: {quorumLoss: FromBackup, window: 5s}\n").await;
    let urls: Vec<String> = (0..3).map(|o| client_url(&ns, "rb", o)).collect();
    let mut c = etcd(&urls).await.unwrap();
    for i in 0..200 {
        c.put(format!("rebuild/{i:04}"), format!("v{i}"), None).await.unwrap();
    }
    // The first scheduled backup is taken at once.
    patch_spec(
        bed,
        &ns,
        "rb",
        r#"{"spec":{"backup":{"schedule":"@every 1h","destination":{"pvc":{"claimName":"backups"}}}}}"#,
    )
    .await;
    let first = wait_for("a successful backup", STEP_TIMEOUT, || async {
        Ok(backups_of(&backups, "rb")
            .await?
            .into_iter()
            .find(|b| phase_of(b) == Some(BackupPhase::Succeeded)))
    })
    .await
    .unwrap();
    let revision = first.status.clone().unwrap().revision.unwrap();
    // Writes after the backup are lost with every member's data.
    for i in 0..20 {
        c.put(format!("after/{i:04}"), "lost", None).await.unwrap();
    }
    drop(c);

    // Every member loses its data: no survivor is left. The pods are deleted rather than
    // their containers killed: the test kubelet resolves a container's env once per pod, so
    // a restarted seed container would keep the `new` state of its first start (a real
    // kubelet reads the members ConfigMap again, and the seed fails with `existing`).
    let lost_at = Instant::now();
    for o in 0..3 {
        bed.wipe_pvc(&ns, &format!("data-rb-{o}")).unwrap();
    }
    bed.kubectl(&["delete", "pod", "rb-0", "rb-1", "rb-2", "-n", &ns, "--wait=false"])
        .await
        .unwrap();
    wait_for("the operator starts the rebuild", STEP_TIMEOUT, || async {
        let s = status(&api, "rb").await?;
        Ok(s.recovery.filter(|r| r.from_backup.is_some()))
    })
    .await
    .unwrap();
    let s =
        wait_for("rb: 3 voters again after the rebuild", STEP_TIMEOUT, || settled(&api, "rb", 3))
            .await
            .unwrap();
    eprintln!(
        "rebuild: all data lost -> 3 voters from backup {} (revision {revision}) after {:.1}s",
        first.name_any(),
        lost_at.elapsed().as_secs_f64()
    );
    assert!(s.recovery.is_none() && s.quorum_lost_since.is_none(), "{s:?}");
    assert!(s.cluster_id.is_some(), "{s:?}");
    let mut c = etcd(&urls[..1]).await.unwrap();
    let got = c.get("rebuild/", Some(etcd_client::GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(got.kvs().len(), 200, "every key of the backup is back");
    let after = c.get("after/", Some(etcd_client::GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(after.kvs().len(), 0, "writes after the backup cannot be in it");
    let hashes = wait_for("equal HashKV on 3 members", Duration::from_secs(60), || {
        let urls = urls.clone();
        async move {
            let mut hashes = Vec::new();
            for u in &urls {
                hashes.push(etcd(std::slice::from_ref(u)).await?.hash_kv(revision).await?.hash());
            }
            Ok(hashes.iter().all(|h| *h == hashes[0]).then_some(hashes))
        }
    })
    .await
    .unwrap();
    eprintln!("rebuild: HashKV at {revision} equal on 3 members: {:x}", hashes[0]);
    let ev = events(bed, &ns).await;
    for reason in ["QuorumLost", "QuorumLossRecovery", "Recovered"] {
        assert!(ev.contains(reason), "no {reason} event in\n{ev}");
    }
    assert!(ev.contains("rebuilding from backup"), "{ev}");
    bed.kubectl(&["delete", "cc", "rb", "-n", &ns, "--wait=false"]).await.unwrap();
}
