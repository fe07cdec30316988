//! The operator end to end on the test bed: the real `cairn-operator` process (with the
//! bed's kubeconfig) reconciles Clusters applied with `kubectl` into stores run by the test
//! kubelet. Scenarios: a 3-member cluster becomes Available; 3 → 5 → 3 with a client
//! writing throughout (no failed request, equal HashKV); a deleted pod rejoins as the same
//! member; a wiped member is replaced; `paused` stops every action; deleting the Cluster
//! removes everything; an invalid spec is rejected by the API server.
//!
//! One operator process serves every test of the run (started on first use, killed with
//! the bed). It runs with a 20 s failure window so that replacement shows up in a test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use cairn_operator::crd::{Cluster, ClusterStatus};
use etcd_client::{Client as Etcd, ConnectOptions};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams};

use crate::bed::{self, Bed, wait_for};

/// Long enough for members to start, join and be promoted on two shared cores.
pub(crate) const STEP_TIMEOUT: Duration = Duration::from_secs(240);

static OPERATOR: OnceLock<tokio::sync::Mutex<Option<tokio::process::Child>>> = OnceLock::new();

/// Starts the operator once for the whole run (it watches every namespace).
pub(crate) async fn operator(bed: &Bed) {
    let slot = OPERATOR.get_or_init(|| tokio::sync::Mutex::new(None));
    let mut guard = slot.lock().await;
    if guard.is_some() {
        return;
    }
    bed.kubectl(&[
        "apply",
        "--server-side",
        "-f",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/cluster.yaml"),
        "-f",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/backup.yaml"),
    ])
    .await
    .unwrap();
    bed.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/clusters.cairn.dev",
        "crd/backups.cairn.dev",
        "--timeout=60s",
    ])
    .await
    .unwrap();
    let log = std::fs::File::create(bed.dir().join("logs").join("operator.log")).unwrap();
    let port = bed::free_port().unwrap();
    let child = bed
        .command(bed::operator_bin().unwrap())
        .args([
            &format!("--metrics-addr=127.0.0.1:{port}"),
            "--failure-window-seconds=20",
            "--lease-namespace=default",
            "--log-format=text",
            "--log-level=info,cairn_operator=debug",
        ])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting cairn-operator");
    *guard = Some(child);
    eprintln!("operator: started, metrics on 127.0.0.1:{port}");
}

pub(crate) fn manifest(ns: &str, name: &str, replicas: u32, extra: &str) -> String {
    format!(
        "apiVersion: cairn.dev/v1alpha1\nkind: Cluster\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  replicas: {replicas}\n  image: registry.example/cairn:dev\n  storage: {{size: 1Gi}}\n{extra}"
    )
}

pub(crate) fn client_url(ns: &str, cluster: &str, ordinal: u32) -> String {
    format!("http://{cluster}-{ordinal}.{cluster}-peer.{ns}.svc:2379")
}

pub(crate) async fn etcd(urls: &[String]) -> anyhow::Result<Etcd> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(10))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
    Etcd::connect(urls, Some(opts)).await.with_context(|| format!("connecting to {urls:?}"))
}

pub(crate) async fn status(api: &Api<Cluster>, name: &str) -> anyhow::Result<ClusterStatus> {
    Ok(api.get(name).await?.status.unwrap_or_default())
}

pub(crate) fn condition<'a>(
    s: &'a ClusterStatus,
    t: &str,
) -> Option<&'a cairn_operator::crd::Condition> {
    s.conditions.iter().find(|c| c.type_ == t)
}

/// The status once the cluster has `n` healthy voters, no learner, no change in flight, and
/// is Available.
pub(crate) async fn settled(
    api: &Api<Cluster>,
    name: &str,
    n: usize,
) -> anyhow::Result<Option<ClusterStatus>> {
    let s = status(api, name).await?;
    let voters = s.members.iter().filter(|m| !m.learner && m.healthy).count();
    let ok = s.members.len() == n
        && voters == n
        && s.target.is_none()
        && condition(&s, "Available").is_some_and(|c| c.status == "True")
        && condition(&s, "Progressing").is_some_and(|c| c.status == "False");
    Ok(ok.then_some(s))
}

/// The store's own member list, seen through `url`: (id, is_learner) pairs.
async fn store_members(url: &str) -> anyhow::Result<Vec<(u64, bool)>> {
    let mut c = etcd(&[url.to_owned()]).await?;
    let mut m: Vec<(u64, bool)> =
        c.member_list().await?.members().iter().map(|m| (m.id(), m.is_learner())).collect();
    m.sort_unstable();
    Ok(m)
}

async fn sts_replicas(bed: &Bed, ns: &str, name: &str) -> anyhow::Result<i32> {
    let api: Api<StatefulSet> = Api::namespaced(bed.client().await?, ns);
    Ok(api.get(name).await?.spec.and_then(|s| s.replicas).unwrap_or(-1))
}

/// A merge patch of a Cluster (the spec edits a user makes with `kubectl patch`).
pub(crate) async fn patch_spec(bed: &Bed, ns: &str, name: &str, patch: &str) {
    bed.kubectl(&["patch", "cc", name, "-n", ns, "--type=merge", "-p", patch]).await.unwrap();
}

pub(crate) async fn events(bed: &Bed, ns: &str) -> String {
    bed.kubectl(&[
        "get",
        "events",
        "-n",
        ns,
        "-o",
        "custom-columns=REASON:.reason,MESSAGE:.message",
        "--sort-by=.metadata.creationTimestamp",
    ])
    .await
    .unwrap_or_default()
}

pub(crate) async fn apply_and_settle(
    bed: &Bed,
    ns: &str,
    name: &str,
    n: u32,
    api: &Api<Cluster>,
) -> ClusterStatus {
    let started = Instant::now();
    bed.apply(&manifest(ns, name, n, "")).await.unwrap();
    let s = wait_for(&format!("{name}: {n} voters, Available"), STEP_TIMEOUT, || {
        settled(api, name, n as usize)
    })
    .await
    .unwrap();
    eprintln!("{name}: {n} members Available after {:.1}s", started.elapsed().as_secs_f64());
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_are_rejected_by_the_api_server_with_a_clear_message() {
    let bed = bed::shared();
    operator(bed).await;
    let ns = bed.namespace("op-invalid").await.unwrap();
    let cases = [
        (12, "", "spec.replicas in body should be less than or equal to 9"),
        (3, "  version: \"0.2.0\"\n", "set spec.image or spec.version, not both"),
        (
            3,
            "  options:\n    extraArgs: [\"--initial-cluster-state=new\"]\n",
            "must not set a flag the operator manages",
        ),
        (
            3,
            "  backup:\n    schedule: \"@hourly\"\n    destination: {}\n",
            "a backup destination needs exactly one of pvc or s3",
        ),
        (
            3,
            "  compaction:\n    schedule: \"* * *\"\n    retain: {duration: 1h}\n",
            "spec.compaction.schedule in body should match",
        ),
    ];
    for (replicas, extra, want) in cases {
        let err = bed
            .apply(&manifest(&ns, "bad", replicas, extra))
            .await
            .expect_err(&format!("accepted: {replicas} {extra}"));
        assert!(err.to_string().contains(want), "for {replicas} {extra:?}: {err}");
    }
    // Immutable fields: the storage class and size shrink on an existing Cluster.
    bed.apply(&manifest(&ns, "imm", 1, "  paused: true\n")).await.unwrap();
    for (patch, want) in [
        (r#"{"spec":{"storage":{"size":"512Mi"}}}"#, "storage.size cannot shrink"),
        (
            r#"{"spec":{"storage":{"storageClassName":"fast"}}}"#,
            "storage.storageClassName is immutable",
        ),
    ] {
        let args = ["patch", "cc", "imm", "-n", &ns, "--type=merge", "-p", patch];
        let err = bed.kubectl(&args).await.expect_err(&format!("accepted: {patch}"));
        assert!(err.to_string().contains(want), "{err}");
    }
    bed.kubectl(&["delete", "cc", "imm", "-n", &ns]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_3_to_5_to_3_under_writes_fails_no_request_and_keeps_hashes_equal() {
    let bed = bed::shared();
    operator(bed).await;
    let ns = bed.namespace("op-scale").await.unwrap();
    let _logs = bed.dump_on_failure(&ns);
    let api: Api<Cluster> = Api::namespaced(bed.client().await.unwrap(), &ns);
    apply_and_settle(bed, &ns, "sc", 3, &api).await;

    // A client writes throughout, through the members that stay (0, 1, 2).
    let stays: Vec<String> = (0..3).map(|o| client_url(&ns, "sc", o)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let writer = {
        let (stop, ok, failed, errors, stays) =
            (stop.clone(), ok.clone(), failed.clone(), errors.clone(), stays.clone());
        tokio::spawn(async move {
            let mut c = etcd(&stays).await.unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match c.put(format!("scale/{:06}", i % 5000), format!("v{i}"), None).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        errors.lock().unwrap().push(e.to_string());
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // Up: kubectl scale to 5.
    let started = Instant::now();
    bed.kubectl(&["scale", "cc/sc", "-n", &ns, "--replicas=5"]).await.unwrap();
    wait_for("sc: 5 voters", STEP_TIMEOUT, || settled(&api, "sc", 5)).await.unwrap();
    let up = started.elapsed();
    assert_eq!(sts_replicas(bed, &ns, "sc").await.unwrap(), 5);
    let members = store_members(&stays[0]).await.unwrap();
    assert_eq!(members.len(), 5, "{members:?}");
    assert!(members.iter().all(|(_, learner)| !learner), "{members:?}");
    eprintln!(
        "scale 3->5: {:.1}s ({} writes ok, {} failed so far)",
        up.as_secs_f64(),
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );

    // Leadership on a member that goes must move first (LeaderMoved), as a leader move
    // it may fail an in-flight write in Cairn as in etcd; the test does not force one.
    let leader_leaves = status(&api, "sc")
        .await
        .unwrap()
        .members
        .iter()
        .any(|m| m.leader && (m.name == "sc-3" || m.name == "sc-4"));

    // Down: kubectl apply with replicas 3.
    let started = Instant::now();
    bed.apply(&manifest(&ns, "sc", 3, "")).await.unwrap();
    wait_for("sc: 3 voters", STEP_TIMEOUT, || settled(&api, "sc", 3)).await.unwrap();
    wait_for("sc: StatefulSet at 3", STEP_TIMEOUT, || async {
        Ok((sts_replicas(bed, &ns, "sc").await? == 3).then_some(()))
    })
    .await
    .unwrap();
    let down = started.elapsed();
    eprintln!("scale 5->3: {:.1}s", down.as_secs_f64());
    // A little more writing on the final membership, then stop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "scale 3->5->3: {ok} writes acknowledged, {failed} failed; errors: {:?}",
        errors.lock().unwrap()
    );
    assert!(ok > 0);
    assert_eq!(failed, 0, "failed requests: {:?}", errors.lock().unwrap());

    // Every remaining member holds the same keyspace: HashKV at one revision, equal.
    let members = store_members(&stays[0]).await.unwrap();
    assert_eq!(members.len(), 3, "{members:?}");
    let mut c = etcd(&stays[..1]).await.unwrap();
    let rev = c.get("scale/000000", None).await.unwrap().header().unwrap().revision();
    let hashes = wait_for("equal HashKV on 3 members", Duration::from_secs(30), || {
        let stays = stays.clone();
        async move {
            let mut hashes = Vec::new();
            for url in &stays {
                let mut c = etcd(std::slice::from_ref(url)).await?;
                hashes.push(c.hash_kv(rev).await?.hash());
            }
            Ok((hashes.iter().all(|h| *h == hashes[0])).then_some(hashes))
        }
    })
    .await
    .unwrap();
    eprintln!("scale 3->5->3: HashKV at revision {rev} on all 3 members: {:x}", hashes[0]);
    let ev = events(bed, &ns).await;
    for reason in ["MemberAdded", "MemberPromoted", "MemberRemoved"] {
        assert!(ev.contains(reason), "no {reason} event in\n{ev}");
    }
    assert!(!leader_leaves || ev.contains("LeaderMoved"), "leadership had to move: {ev}");
    // Scale-down removed the pods and (retainOnScaleDown: false) their claims.
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(bed.client().await.unwrap(), &ns);
    wait_for("claims of removed members deleted", STEP_TIMEOUT, || async {
        let names: Vec<String> = pvcs
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(|p| p.metadata.name.unwrap_or_default())
            .collect();
        Ok((!names.iter().any(|n| n == "data-sc-3" || n == "data-sc-4")).then_some(()))
    })
    .await
    .unwrap();
    bed.kubectl(&["delete", "cc", "sc", "-n", &ns, "--wait=false"]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_heals_pauses_and_goes_away_with_its_objects() {
    let bed = bed::shared();
    operator(bed).await;
    let ns = bed.namespace("op-life").await.unwrap();
    let _logs = bed.dump_on_failure(&ns);
    let client = bed.client().await.unwrap();
    let api: Api<Cluster> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);

    // 1. Three members, Available, three voters in the store's own member list.
    let s = apply_and_settle(bed, &ns, "life", 3, &api).await;
    assert!(s.cluster_id.is_some());
    assert_eq!(s.ready_replicas, 3);
    let url0 = client_url(&ns, "life", 0);
    let members = store_members(&url0).await.unwrap();
    assert_eq!(members.len(), 3);
    assert!(members.iter().all(|(_, learner)| !learner));
    let table = bed.kubectl(&["get", "cc", "life", "-n", &ns]).await.unwrap();
    assert!(
        table.contains("READY") && table.contains("3/3") && table.contains("Running"),
        "{table}"
    );
    let id_of = |s: &ClusterStatus, name: &str| {
        s.members.iter().find(|m| m.name == name).map(|m| m.id.clone())
    };

    // 2. A deleted pod comes back as the same member (same id, not replaced).
    let before = id_of(&s, "life-1").unwrap();
    let old_uid = pods.get("life-1").await.unwrap().metadata.uid.unwrap();
    let started = Instant::now();
    bed.kubectl(&["delete", "pod", "life-1", "-n", &ns, "--wait=false"]).await.unwrap();
    wait_for("life-1 recreated", STEP_TIMEOUT, || async {
        Ok(pods
            .get_opt("life-1")
            .await?
            .filter(|p| p.metadata.uid.as_deref() != Some(&old_uid))
            .map(|_| ()))
    })
    .await
    .unwrap();
    // The new pod's process answers as the member the old one was (its data survived).
    let url1 = client_url(&ns, "life", 1);
    let rejoined = wait_for("life-1 answering as its old member", STEP_TIMEOUT, || async {
        let mut c = etcd(std::slice::from_ref(&url1)).await?;
        Ok(Some(format!("{:x}", c.status().await?.header().unwrap().member_id())))
    })
    .await
    .unwrap();
    assert_eq!(rejoined, before, "the recreated pod must rejoin as the same member");
    let s = wait_for("life: 3 voters after the pod deletion", STEP_TIMEOUT, || {
        settled(&api, "life", 3)
    })
    .await
    .unwrap();
    assert_eq!(id_of(&s, "life-1"), Some(before), "status must keep the same member");
    assert_eq!(store_members(&url0).await.unwrap().len(), 3);
    eprintln!("life: deleted pod rejoined after {:.1}s", started.elapsed().as_secs_f64());

    // 3. A member whose data is lost (volume wiped, process crashed) is replaced: removed,
    //    its volume and pod deleted, re-added as a fresh learner, promoted.
    let before = id_of(&s, "life-2").unwrap();
    let started = Instant::now();
    bed.wipe_pvc(&ns, "data-life-2").unwrap();
    bed.kill_container(&ns, "life-2").unwrap();
    let s = wait_for("life-2 replaced by a new voter", STEP_TIMEOUT, || async {
        let s = settled(&api, "life", 3).await?;
        Ok(s.filter(|s| id_of(s, "life-2").is_some_and(|id| id != before)))
    })
    .await
    .unwrap();
    eprintln!(
        "life: wiped member replaced after {:.1}s (id {before} -> {})",
        started.elapsed().as_secs_f64(),
        id_of(&s, "life-2").unwrap()
    );
    let ev = events(bed, &ns).await;
    assert!(ev.contains("MemberReplacing"), "{ev}");
    let members = store_members(&url0).await.unwrap();
    assert_eq!(members.len(), 3, "{members:?}");

    // 4. Paused: a spec change and a deleted owned object are left alone.
    patch_spec(bed, &ns, "life", r#"{"spec":{"paused":true,"replicas":5}}"#).await;
    wait_for("phase Paused", STEP_TIMEOUT, || async {
        let s = status(&api, "life").await?;
        Ok((s.phase == Some(cairn_operator::crd::Phase::Paused)).then_some(()))
    })
    .await
    .unwrap();
    bed.kubectl(&["delete", "service", "life-client", "-n", &ns]).await.unwrap();
    // Several passes' worth of time (status resyncs every pass): nothing may change.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    assert!(
        services.get_opt("life-client").await.unwrap().is_none(),
        "a paused cluster's service was recreated"
    );
    assert_eq!(sts_replicas(bed, &ns, "life").await.unwrap(), 3);
    assert_eq!(store_members(&url0).await.unwrap().len(), 3);
    let s = status(&api, "life").await.unwrap();
    assert_eq!(condition(&s, "Progressing").map(|c| c.reason.as_str()), Some("Paused"));

    // Unpaused (and back at 3), the operator restores what was deleted.
    patch_spec(bed, &ns, "life", r#"{"spec":{"paused":false,"replicas":3}}"#).await;
    wait_for("client service restored", STEP_TIMEOUT, || async {
        Ok(services.get_opt("life-client").await?.map(|_| ()))
    })
    .await
    .unwrap();
    wait_for("life settled after unpause", STEP_TIMEOUT, || settled(&api, "life", 3))
        .await
        .unwrap();
    // The replicas: 5 written while paused never took effect.
    let ev = events(bed, &ns).await;
    assert!(!ev.contains("life-3 added"), "an edit made while paused was acted on:\n{ev}");

    // A grown storage.size cannot reach the StatefulSet's immutable claim templates: the
    // operator says so in an Event and keeps reconciling (no failing passes).
    patch_spec(bed, &ns, "life", r#"{"spec":{"storage":{"size":"2Gi"}}}"#).await;
    wait_for("StorageResizeNotApplied event", STEP_TIMEOUT, || async {
        Ok(events(bed, &ns).await.contains("StorageResizeNotApplied").then_some(()))
    })
    .await
    .unwrap();
    wait_for("life settled after the resize", STEP_TIMEOUT, || settled(&api, "life", 3))
        .await
        .unwrap();
    assert!(!events(bed, &ns).await.contains("ReconcileFailed"), "{}", events(bed, &ns).await);

    // 5. Deleting the Cluster removes everything it owned, claims included.
    bed.kubectl(&["delete", "cc", "life", "-n", &ns]).await.unwrap();
    wait_for("every owned object gone", STEP_TIMEOUT, || async {
        let c = bed.client().await?;
        let lp = ListParams::default().labels("app.kubernetes.io/instance=life");
        let left = [
            Api::<StatefulSet>::namespaced(c.clone(), &ns).list(&lp).await?.items.len(),
            Api::<Service>::namespaced(c.clone(), &ns).list(&lp).await?.items.len(),
            Api::<ConfigMap>::namespaced(c.clone(), &ns).list(&lp).await?.items.len(),
            Api::<PodDisruptionBudget>::namespaced(c.clone(), &ns).list(&lp).await?.items.len(),
            Api::<Pod>::namespaced(c.clone(), &ns).list(&lp).await?.items.len(),
            Api::<PersistentVolumeClaim>::namespaced(c.clone(), &ns).list(&lp).await?.items.len(),
        ];
        if left.iter().sum::<usize>() == 0 {
            Ok(Some(()))
        } else {
            Err(anyhow!("left (sts, svc, cm, pdb, pod, pvc): {left:?}"))
        }
    })
    .await
    .unwrap();
}
