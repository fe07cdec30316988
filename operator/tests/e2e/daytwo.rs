//! The operator's day two on the test bed: scheduled compaction (status.lastCompaction
//! advances, an old revision answers "required revision has been compacted") and backups
//! (a `Backup` runs a Job with the cairn image that saves a snapshot into a PVC; scheduled
//! backups honour retention).
//!
//! Shares the operator process and helpers of `operator.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use cairn_operator::crd::{Backup, BackupPhase, Cluster, ClusterStatus};
use kube::ResourceExt;
use kube::api::{Api, ListParams};

use crate::bed::{self, Bed, wait_for};
use crate::operator::{
    STEP_TIMEOUT, client_url, etcd, events, manifest, operator, settled, status,
};

/// Applies a Cluster with `extra` spec lines and waits until it has `n` healthy voters.
async fn create(bed: &Bed, ns: &str, name: &str, n: u32, extra: &str) -> ClusterStatus {
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
    bed.kubectl(&[
        "patch",
        "cc",
        "cp",
        "-n",
        &ns,
        "--type=merge",
        "-p",
        r#"{"spec":{"paused":true}}"#,
    ])
    .await
    .unwrap();
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

/// The sha256 of a file, as `sha256sum` prints it.
fn sha256_of(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
}

async fn backups_of(api: &Api<Backup>, cluster: &str) -> anyhow::Result<Vec<Backup>> {
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|b| b.spec.cluster_name == cluster)
        .collect())
}

fn phase_of(b: &Backup) -> Option<BackupPhase> {
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
    bed.apply(&format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: backups, namespace: {ns}}}\nspec:\n  accessModes: [ReadWriteOnce]\n  resources: {{requests: {{storage: 1Gi}}}}\n"
    ))
    .await
    .unwrap();
    // A one-shot Backup of a Cluster that does not exist fails with a reason that says so.
    bed.apply(&format!(
        "apiVersion: cairn.dev/v1alpha1\nkind: Backup\nmetadata: {{name: orphan, namespace: {ns}}}\nspec: {{clusterName: nosuch}}\n"
    ))
    .await
    .unwrap();

    create(bed, &ns, "bk", 1, "").await;
    let url = client_url(&ns, "bk", 0);
    let mut c = etcd(std::slice::from_ref(&url)).await.unwrap();
    let mut written = 0;
    for i in 0..200 {
        written = c
            .put(format!("backup/{i:04}"), format!("value-{i}"), None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
    }
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
    let t =
        |s: &Option<String>| s.as_deref().unwrap().parse::<k8s_openapi::jiff::Timestamp>().unwrap();
    eprintln!(
        "backup: first Succeeded {:.1}s after enabling; its Job took {:.1}s; revision {}, {} bytes",
        started.elapsed().as_secs_f64(),
        t(&st.completion_time).duration_since(t(&st.start_time)).as_secs_f64(),
        st.revision.unwrap(),
        st.size.unwrap()
    );
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
    wait_for("a backup pruned by keep.count", STEP_TIMEOUT, || async {
        Ok(events(bed, &ns).await.contains("BackupPruned").then_some(()))
    })
    .await
    .unwrap();
    bed.kubectl(&[
        "patch",
        "cc",
        "bk",
        "-n",
        &ns,
        "--type=merge",
        "-p",
        r#"{"spec":{"backup":{"schedule":"@every 1h"}}}"#,
    ])
    .await
    .unwrap();
    let kept = wait_for("two backups kept, files matching", STEP_TIMEOUT, || async {
        let all = backups_of(&backups, "bk").await?;
        let good: Vec<String> = all
            .iter()
            .filter(|b| {
                phase_of(b) == Some(BackupPhase::Succeeded)
                    && b.metadata.deletion_timestamp.is_none()
            })
            .map(|b| b.name_any())
            .collect();
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
