//! Proves the bed before (and without) the operator: a hand-written 3-member Cairn
//! StatefulSet runs, serves through pod DNS names, survives a pod deletion and a crash; Job
//! pods end Succeeded or Failed by exit code; and kube-apiserver really keeps its objects in
//! the bed's `cairn`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use etcd_client::{Client as Etcd, GetOptions};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;

use crate::bed::{self, wait_for};

const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// The StatefulSet a Cairn cluster runs as, following the contract's pod conventions.
fn cairn_statefulset(ns: &str) -> String {
    let peers: Vec<String> =
        (0..3).map(|i| format!("store-{i}=http://store-{i}.store-peer.{ns}.svc:2380")).collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: store-peer
  namespace: {ns}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  selector:
    app: smoke-store
  ports:
  - name: client
    port: 2379
  - name: peer
    port: 2380
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: store
  namespace: {ns}
spec:
  serviceName: store-peer
  replicas: 3
  podManagementPolicy: Parallel
  selector:
    matchLabels:
      app: smoke-store
  template:
    metadata:
      labels:
        app: smoke-store
    spec:
      terminationGracePeriodSeconds: 10
      containers:
      - name: cairn
        image: registry.example/cairn:dev
        command: ["cairn"]
        env:
        - name: POD_NAME
          valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
        - name: POD_NAMESPACE
          valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}
        - name: POD_IP
          valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}
        args:
        - --name=$(POD_NAME)
        - --data-dir=/var/lib/cairn/data
        - --listen-client-urls=http://$(POD_IP):2379
        - --advertise-client-urls=http://$(POD_NAME).store-peer.$(POD_NAMESPACE).svc:2379
        - --listen-peer-urls=http://$(POD_IP):2380
        - --initial-advertise-peer-urls=http://$(POD_NAME).store-peer.$(POD_NAMESPACE).svc:2380
        - --initial-cluster={peers}
        - --initial-cluster-state=new
        - --initial-cluster-token=smoke-{ns}
        ports:
        - name: client
          containerPort: 2379
        - name: peer
          containerPort: 2380
        readinessProbe:
          httpGet: {{path: /readyz, port: client}}
          periodSeconds: 5
        livenessProbe:
          httpGet: {{path: /livez, port: client}}
          initialDelaySeconds: 10
          periodSeconds: 10
          failureThreshold: 6
        volumeMounts:
        - name: data
          mountPath: /var/lib/cairn
  volumeClaimTemplates:
  - metadata:
      name: data
    spec:
      accessModes: ["ReadWriteOnce"]
      resources:
        requests:
          storage: 1Gi
"#,
        peers = peers.join(",")
    )
}

fn client_url(ns: &str, pod: &str) -> String {
    format!("http://{pod}.store-peer.{ns}.svc:2379")
}

async fn etcd(url: &str) -> anyhow::Result<Etcd> {
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5));
    Etcd::connect([url], Some(opts)).await.with_context(|| format!("connecting to {url}"))
}

/// The pod when it exists with `uid` other than `not_uid`, is Ready, and has run `restarts`
/// or more restarts.
async fn ready_pod(
    pods: &Api<Pod>,
    name: &str,
    not_uid: Option<&str>,
    restarts: i32,
) -> anyhow::Result<Option<Pod>> {
    let Some(pod) = pods.get_opt(name).await? else { return Ok(None) };
    if not_uid.is_some() && pod.metadata.uid.as_deref() == not_uid {
        return Ok(None);
    }
    let status = pod.status.clone().unwrap_or_default();
    let ready =
        status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
    let restarted =
        status.container_statuses.iter().flatten().map(|c| c.restart_count).sum::<i32>();
    Ok((ready && restarted >= restarts).then_some(pod))
}

async fn member_ids(url: &str) -> anyhow::Result<Vec<u64>> {
    let mut client = etcd(url).await?;
    let mut ids: Vec<u64> = client.member_list().await?.members().iter().map(|m| m.id()).collect();
    ids.sort_unstable();
    Ok(ids)
}

async fn serializable_get(url: &str, key: &str) -> anyhow::Result<Option<String>> {
    let mut client = etcd(url).await?;
    let resp = client.get(key, Some(GetOptions::new().with_serializable())).await?;
    Ok(resp.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cairn_statefulset_runs_rejoins_and_restarts() {
    let bed = bed::shared();
    let ns = bed.namespace("smoke").await.unwrap();
    let _logs = bed.dump_on_failure(&ns);
    let client = bed.client().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client, &ns);

    // 1. Three members, all Ready.
    let started = Instant::now();
    bed.apply(&cairn_statefulset(&ns)).await.unwrap();
    for i in 0..3 {
        let name = format!("store-{i}");
        wait_for(&format!("{name} Ready"), READY_TIMEOUT, || ready_pod(&pods, &name, None, 0))
            .await
            .unwrap();
    }
    eprintln!("smoke: 3 pods Ready after {:.1}s", started.elapsed().as_secs_f64());
    let pod0 = pods.get("store-0").await.unwrap();
    let ip0 = pod0.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap();
    assert!(ip0.starts_with("127.0."), "pod IP {ip0} is not a loopback address");
    assert_eq!(bed.pod_ip(&ns, "store-0"), Some(ip0.clone()), "the kubelet's view of the pod IP");
    assert_eq!(pod0.spec.as_ref().and_then(|s| s.node_name.as_deref()), Some("bed-node"));

    // 2. A write through one pod's DNS name, read back (linearizable) through another's.
    let mut c0 = etcd(&client_url(&ns, "store-0")).await.unwrap();
    c0.put("smoke/a", "1", None).await.unwrap();
    let mut c2 = etcd(&client_url(&ns, "store-2")).await.unwrap();
    let got = c2.get("smoke/a", None).await.unwrap();
    assert_eq!(got.kvs().first().map(|kv| kv.value()), Some(&b"1"[..]));
    let members = member_ids(&client_url(&ns, "store-0")).await.unwrap();
    assert_eq!(members.len(), 3, "member list: {members:?}");

    // The data lives in the PVC's directory, through the mount at /var/lib/cairn.
    let data_dir = bed.pvc_dir(&ns, "data-store-1").join("data");
    assert!(data_dir.is_dir(), "{} was not created by the member", data_dir.display());

    // 3. Delete a pod: the StatefulSet controller recreates it (new UID, same PVC) and it
    //    rejoins as the same member with its data.
    let started = Instant::now();
    let old_uid = pods.get("store-1").await.unwrap().metadata.uid.unwrap();
    bed.kubectl(&["delete", "pod", "store-1", "-n", &ns, "--wait=false"]).await.unwrap();
    wait_for("store-1 recreated and Ready", READY_TIMEOUT, || {
        ready_pod(&pods, "store-1", Some(&old_uid), 0)
    })
    .await
    .unwrap();
    eprintln!("smoke: store-1 recreated and Ready after {:.1}s", started.elapsed().as_secs_f64());
    let url1 = client_url(&ns, "store-1");
    // Its own (serializable) copy of the data, written before it was deleted.
    let u1 = &url1;
    let value =
        wait_for("store-1 serves smoke/a from its own copy", READY_TIMEOUT, move || async move {
            Ok(serializable_get(u1, "smoke/a").await.ok().flatten())
        })
        .await
        .unwrap();
    assert_eq!(value, "1");
    assert_eq!(member_ids(&url1).await.unwrap(), members, "store-1 rejoined as a different member");
    c0.put("smoke/b", "2", None).await.unwrap();
    let value = wait_for("store-1 replicates new writes", READY_TIMEOUT, move || async move {
        Ok(serializable_get(u1, "smoke/b").await.ok().flatten())
    })
    .await
    .unwrap();
    assert_eq!(value, "2");

    // 4. A crash (SIGKILL behind the API's back): the kubelet restarts the container.
    let started = Instant::now();
    bed.kill_container(&ns, "store-2").unwrap();
    let pod2 = wait_for("store-2 restarted and Ready", READY_TIMEOUT, || {
        ready_pod(&pods, "store-2", None, 1)
    })
    .await
    .unwrap();
    eprintln!("smoke: store-2 restarted and Ready after {:.1}s", started.elapsed().as_secs_f64());
    let last = pod2.status.unwrap().container_statuses.unwrap()[0].last_state.clone().unwrap();
    assert!(last.terminated.is_some(), "lastState of the killed container: {last:?}");
    let url2 = client_url(&ns, "store-2");
    let u2 = &url2;
    let value =
        wait_for("store-2 serves smoke/b after its restart", READY_TIMEOUT, move || async move {
            Ok(serializable_get(u2, "smoke/b").await.ok().flatten())
        })
        .await
        .unwrap();
    assert_eq!(value, "2");

    // 5. Deleting the StatefulSet and its claims removes the pods and the PVC directories.
    bed.kubectl(&["delete", "statefulset", "store", "-n", &ns, "--wait=true", "--timeout=120s"])
        .await
        .unwrap();
    let p = &pods;
    wait_for("the store pods gone", READY_TIMEOUT, move || async move {
        Ok(p.list(&Default::default()).await?.items.is_empty().then_some(()))
    })
    .await
    .unwrap();
    // The data outlived the pods; wipe_pvc empties it (the data-loss hook for operator tests).
    assert!(bed.pvc_dir(&ns, "data-store-0").join("data").is_dir());
    bed.wipe_pvc(&ns, "data-store-0").unwrap();
    assert_eq!(std::fs::read_dir(bed.pvc_dir(&ns, "data-store-0")).unwrap().count(), 0);
    bed.kubectl(&["delete", "pvc", "--all", "-n", &ns, "--wait=true", "--timeout=120s"])
        .await
        .unwrap();
    let dir = bed.pvc_dir(&ns, "data-store-0");
    let d = &dir;
    wait_for("the PVC directory removed", READY_TIMEOUT, move || async move {
        Ok((!d.exists()).then_some(()))
    })
    .await
    .unwrap();
}

/// A Job whose pod exits 0 completes; one whose pod exits 3 fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_pods_end_by_exit_code() {
    let bed = bed::shared();
    let ns = bed.namespace("jobs").await.unwrap();
    let _logs = bed.dump_on_failure(&ns);
    let client = bed.client().await.unwrap();
    let job = |name: &str, code: i32| {
        format!(
            "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  backoffLimit: 0\n  template:\n    spec:\n      restartPolicy: Never\n      containers:\n      - name: main\n        image: busybox:1.36\n        command: [\"sh\", \"-c\", \"echo ran in $(POD_NAME); exit {code}\"]\n        env:\n        - name: POD_NAME\n          valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}\n"
        )
    };
    bed.apply(&job("ok", 0)).await.unwrap();
    bed.apply(&job("bad", 3)).await.unwrap();
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(client.clone(), &ns);
    let condition = |name: &'static str, wanted: &'static str| {
        let jobs = jobs.clone();
        async move {
            let jobs = &jobs;
            wait_for(&format!("Job {name} {wanted}"), READY_TIMEOUT, move || async move {
                let job = jobs.get(name).await?;
                let conds = job.status.and_then(|s| s.conditions).unwrap_or_default();
                Ok(conds.iter().any(|c| c.type_ == wanted && c.status == "True").then_some(()))
            })
            .await
        }
    };
    condition("ok", "Complete").await.unwrap();
    condition("bad", "Failed").await.unwrap();

    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let phase_of = |job: &str| {
        let pods = pods.clone();
        let selector = format!("job-name={job}");
        async move {
            let list = pods.list(&kube::api::ListParams::default().labels(&selector)).await?;
            let pod = list.items.first().ok_or_else(|| anyhow!("no pod for {selector}"))?;
            let status = pod.status.clone().unwrap_or_default();
            let code = status.container_statuses.and_then(|c| {
                c.first().and_then(|c| c.state.clone()?.terminated.map(|t| t.exit_code))
            });
            anyhow::Ok((status.phase.unwrap_or_default(), code))
        }
    };
    assert_eq!(phase_of("ok").await.unwrap(), ("Succeeded".to_owned(), Some(0)));
    assert_eq!(phase_of("bad").await.unwrap(), ("Failed".to_owned(), Some(3)));
}

/// kube-apiserver keeps its objects in the bed's `cairn`, under `/registry/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_stores_its_objects_in_cairn() {
    let bed = bed::shared();
    let ns = bed.namespace("storage").await.unwrap();
    bed.kubectl(&["create", "configmap", "marker", "-n", &ns, "--from-literal=k=cairn-holds-this"])
        .await
        .unwrap();
    let mut store = etcd(bed.store_url()).await.unwrap();
    let key = format!("/registry/configmaps/{ns}/marker");
    let resp = store.get(key.as_str(), None).await.unwrap();
    let kv = resp.kvs().first().unwrap_or_else(|| panic!("{key} is not in the bed's cairn"));
    // Stored as protobuf (the k8s\0 envelope), the literal value inside.
    let raw = kv.value();
    assert!(raw.starts_with(b"k8s\0"), "unexpected encoding: {:?}", &raw[..raw.len().min(16)]);
    assert!(raw.windows(16).any(|w| w == b"cairn-holds-this"));
    let namespaces = store
        .get("/registry/namespaces/", Some(GetOptions::new().with_prefix().with_keys_only()))
        .await
        .unwrap();
    let names: Vec<String> =
        namespaces.kvs().iter().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).collect();
    assert!(names.contains(&format!("/registry/namespaces/{ns}")), "{names:?}");
    // A delete through the API removes the key from the store.
    bed.kubectl(&["delete", "configmap", "marker", "-n", &ns]).await.unwrap();
    let resp = store.get(key.as_str(), None).await.unwrap();
    assert!(resp.kvs().is_empty(), "{key} still in the store after the delete");
}
