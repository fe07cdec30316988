//! The operator's day two on the test bed: scheduled compaction (status.lastCompaction
//! advances, an old revision answers "required revision has been compacted") and backups
//! (a `Backup` runs a Job with the cairn image that saves a snapshot into a PVC; scheduled
//! backups honour retention).
//!
//! Shares the operator process and helpers of `operator.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use cairn_operator::crd::{Cluster, ClusterStatus};
use kube::api::Api;

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
