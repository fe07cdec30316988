//! The test kubelet: the bed's only node (`bed-node`), running Pods as local processes
//! because there is no container runtime here. It is the narrowest stand-in for a node:
//! everything above it (API server, controllers, the operator) is the real thing.
//!
//! What it does (the contract in notes/bed-contract.md):
//! - registers Node `bed-node` (Ready) and renews its Lease in `kube-node-lease`;
//! - schedules: binds every unbound Pod to `bed-node`;
//! - gives each Pod its own loopback IP `127.0.<block>.N` (block 1 unless another bed on
//!   this machine holds it) and writes `<hostname>.<subdomain>.<ns>.svc[.cluster.local]`
//!   for it into `/etc/hosts`, between marker lines it removes again;
//! - runs init containers in order, then the containers: the executable comes from the
//!   image (`cairn` → the cairn binary, `cairn-operator` → the operator binary,
//!   `CAIRN_BED_IMAGES` adds more) or, for a `command[0]` that is not the image's binary,
//!   from the host PATH; env from values, field refs, Secrets and ConfigMaps; `$(VAR)`
//!   expanded as a kubelet does;
//! - volumes: a PVC is a directory `<bed>/pvc/<ns>/<claim>` that outlives the Pod (the
//!   kubelet creates a pre-bound hostPath PV per claim, kube-controller-manager's PV
//!   controller binds them, the directory goes when the claim goes); emptyDir, ConfigMap,
//!   Secret, downward API and projected (service-account token) volumes are directories
//!   under the pod's own directory. A container sees them at their `mountPath` through a
//!   private mount namespace (`unshare --mount` + bind mounts), or, where that does not
//!   work (`CAIRN_BED_MOUNTS=rewrite` forces it), by rewriting the mountPath prefix in its
//!   command, args and env to the host directory;
//! - probes (httpGet, tcpSocket, exec) decide readiness and restart containers whose
//!   liveness probe fails; restart policies, restart counts and a short crash backoff;
//! - reports Pod status (phase, conditions, container statuses, IPs) through the `status`
//!   subresource; on deletion sends SIGTERM, waits the grace period, SIGKILLs, cleans up and
//!   deletes the Pod object with grace period 0.
//!
//! What it cannot do that a real kubelet would:
//! - no images: an image is only a name mapped to a host binary; image pulls, pull
//!   policies, image entrypoints and image env do not exist; the container's user,
//!   security context, capabilities and read-only mounts are ignored (all run as root);
//! - no network isolation: every process shares the host network namespace, so a store
//!   must listen on `$(POD_IP)` (a real pod may listen on 0.0.0.0 or 127.0.0.1 too, and
//!   containers of one pod cannot reach each other on 127.0.0.1 here); no Service
//!   ClusterIPs or kube-proxy (connect to pod DNS names or IPs), no cluster DNS server
//!   (names come from /etc/hosts: only pod hostname/subdomain names, no Service names),
//!   no NetworkPolicy, no hostPort;
//! - no resource limits or requests enforcement (no cgroups), no OOM kills, no eviction,
//!   no ephemeral-storage accounting; PVC sizes are not enforced; volume modes other than
//!   Filesystem, CSI, and volume types other than the ones above are refused (the Pod goes
//!   Failed... no: it stays Pending with the reason in its status);
//! - the scheduler is trivial: nodeSelector, affinity, tolerations, topology spread and
//!   resource fit are not evaluated; everything lands on `bed-node`;
//! - probes: HTTPS and gRPC probes are treated as TCP connects; readiness and startup
//!   probes run every min(periodSeconds, 1 s) so tests do not wait out real periods
//!   (liveness probes keep their real period and thresholds); exec probes run on the host
//!   with the container's env, outside its mount namespace;
//! - no `kubectl exec/logs/port-forward/attach` (logs are files under `<bed>/logs/`), no
//!   ephemeral containers, no sidecar (restartable init) containers, no lifecycle hooks,
//!   no pod readiness gates, no Kubernetes service env vars except
//!   KUBERNETES_SERVICE_HOST/PORT; `terminationMessagePath` (a file of the pod's bound at
//!   the path; `FallbackToLogsOnError` takes the log tail) works with mount namespaces only;
//! - an image's PATH is the host PATH with the mapped binary's directory first;
//! - pod IPs are reused: a recreated Pod usually gets the IP its predecessor had (the
//!   lowest free one), where a real cluster would usually hand out a new one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Node, PersistentVolume, PersistentVolumeClaim, Pod, Probe, Secret,
    ServiceAccount, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{Notify, watch};

/// The node every Pod runs on.
pub const NODE_NAME: &str = "bed-node";

/// How often readiness and startup probes run at most (see the module doc).
const FAST_PROBE_PERIOD: Duration = Duration::from_secs(1);

/// What the kubelet needs from the bed.
pub struct Config {
    /// Client for the bed's API server (admin).
    pub client: kube::Client,
    /// The bed directory (`pvc/`, `pods/`, `logs/` live under it).
    pub dir: PathBuf,
    /// Image name → host binary.
    pub images: ImageMap,
    /// The loopback block pod IPs come from.
    pub net: NetBlock,
    /// The `/etc/hosts` block of this bed.
    pub hosts: HostsFile,
    /// The bed's process group; every container process joins it.
    pub pgid: u32,
    /// The API server's port on 127.0.0.1 (for KUBERNETES_SERVICE_PORT).
    pub apiserver_port: u16,
}

/// The tests' handle on the kubelet: test hooks that bypass the API.
#[derive(Clone, Default)]
pub struct Handle {
    shared: Option<Arc<Shared>>,
}

impl Handle {
    fn shared(&self) -> anyhow::Result<&Arc<Shared>> {
        self.shared.as_ref().ok_or_else(|| anyhow!("the kubelet is not running"))
    }

    /// SIGKILLs every running container of a pod.
    pub fn kill_container(&self, namespace: &str, pod: &str) -> anyhow::Result<()> {
        let shared = self.shared()?;
        let ctx = shared
            .pod_by_name(namespace, pod)
            .ok_or_else(|| anyhow!("pod {namespace}/{pod} is not running on {NODE_NAME}"))?;
        let pids: Vec<u32> =
            ctx.state.lock().unwrap().containers.iter().filter_map(|c| c.pid).collect();
        if pids.is_empty() {
            bail!("pod {namespace}/{pod} has no running container");
        }
        for pid in pids {
            signal(pid, "KILL");
        }
        Ok(())
    }

    /// Empties a PVC's directory.
    pub fn wipe_pvc(&self, namespace: &str, claim: &str) -> anyhow::Result<()> {
        let dir = self.pvc_dir(namespace, claim);
        if !dir.is_dir() {
            bail!("PVC {namespace}/{claim} has no directory ({})", dir.display());
        }
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    /// The directory backing a PVC.
    pub fn pvc_dir(&self, namespace: &str, claim: &str) -> PathBuf {
        match &self.shared {
            Some(s) => pvc_dir(&s.dir, namespace, claim),
            None => PathBuf::new(),
        }
    }

    /// The IP of a running pod.
    pub fn pod_ip(&self, namespace: &str, pod: &str) -> Option<String> {
        let shared = self.shared.as_ref()?;
        shared.pod_by_name(namespace, pod).and_then(|ctx| ctx.state.lock().unwrap().ip.clone())
    }
}

fn pvc_dir(dir: &Path, namespace: &str, claim: &str) -> PathBuf {
    dir.join("pvc").join(namespace).join(claim)
}

/// Registers the node and starts the watchers on the current runtime.
pub async fn start(config: Config) -> anyhow::Result<Handle> {
    let mount_ns = match std::env::var("CAIRN_BED_MOUNTS").as_deref() {
        Ok("rewrite") => false,
        Ok("namespace") => true,
        _ => mount_namespaces_work(&config.dir).await,
    };
    let shared = Arc::new(Shared {
        client: config.client,
        dir: config.dir,
        images: config.images,
        net: config.net,
        ips: Mutex::new((BTreeSet::new(), 254)),
        hosts: config.hosts,
        pgid: config.pgid,
        apiserver_port: config.apiserver_port,
        mount_ns,
        pods: Mutex::new(HashMap::new()),
        done: Mutex::new(HashSet::new()),
    });
    register_node(&shared).await?;
    tokio::spawn(heartbeat(shared.clone()));
    tokio::spawn(watch_pods(shared.clone()));
    tokio::spawn(watch_claims(shared.clone()));
    Ok(Handle { shared: Some(shared) })
}

/// Whether `unshare --mount` with a bind mount works here (root, no seccomp ban).
async fn mount_namespaces_work(dir: &Path) -> bool {
    let probe = dir.join("pods").join(".mount-probe");
    let (src, dst) = (probe.join("src"), probe.join("dst"));
    if std::fs::create_dir_all(&src).is_err() || std::fs::create_dir_all(&dst).is_err() {
        return false;
    }
    let _ = std::fs::write(src.join("f"), "x");
    let ok = tokio::process::Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            r#"mount --bind "$1" "$2" && test -f "$2/f""#,
            "sh",
        ])
        .arg(&src)
        .arg(&dst)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    let _ = std::fs::remove_dir_all(&probe);
    ok
}

struct Shared {
    client: kube::Client,
    dir: PathBuf,
    images: ImageMap,
    net: NetBlock,
    /// Pod IPs in use (last octet), and the last one handed out.
    ips: Mutex<(BTreeSet<u8>, u8)>,
    hosts: HostsFile,
    pgid: u32,
    apiserver_port: u16,
    mount_ns: bool,
    /// Pod workers by pod UID.
    pods: Mutex<HashMap<String, PodEntry>>,
    /// UIDs of pods whose worker has finished (late watch events must not restart them).
    done: Mutex<HashSet<String>>,
}

struct PodEntry {
    tx: watch::Sender<Option<Pod>>,
    ctx: Arc<PodCtx>,
}

impl Shared {
    fn pod_by_name(&self, namespace: &str, name: &str) -> Option<Arc<PodCtx>> {
        let pods = self.pods.lock().unwrap();
        pods.values()
            .filter(|e| e.ctx.namespace == namespace && e.ctx.name == name)
            .map(|e| e.ctx.clone())
            .find(|ctx| !ctx.state.lock().unwrap().deleting)
    }

    /// Hands out the next free pod IP after the last one, round robin (as a CNI's IPAM does):
    /// an address freed by a deleted pod is not reused at once, so a name that still
    /// resolves to it for a moment never reaches another pod.
    fn allocate_ip(&self) -> anyhow::Result<String> {
        let mut ips = self.ips.lock().unwrap();
        let (used, last) = &mut *ips;
        let n = (1..=253u16)
            .map(|step| 2 + ((u16::from(*last) - 2 + step) % 253) as u8)
            .find(|n| !used.contains(n))
            .ok_or_else(|| anyhow!("out of pod IPs"))?;
        used.insert(n);
        *last = n;
        Ok(format!("127.0.{}.{n}", self.net.octet()))
    }

    fn release_ip(&self, ip: &str) {
        if let Some(n) = ip.rsplit('.').next().and_then(|n| n.parse::<u8>().ok()) {
            self.ips.lock().unwrap().0.remove(&n);
        }
    }
}

fn now() -> Value {
    serde_json::to_value(Time(Timestamp::now())).unwrap_or(Value::Null)
}

async fn register_node(shared: &Shared) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(shared.client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": NODE_NAME,
            "labels": {
                "kubernetes.io/hostname": NODE_NAME,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": std::env::consts::ARCH,
                "cairn.dev/test-bed": "true",
            },
        },
    }))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e).context("registering the node"),
    }
    node_status(shared).await
}

async fn node_status(shared: &Shared) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(shared.client.clone());
    let t = now();
    let cond = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": t, "lastTransitionTime": t})
    };
    let status = json!({"status": {
        "conditions": [
            cond("Ready", "True", "KubeletReady", "cairn test kubelet is posting ready status"),
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "no memory pressure"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk pressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "enough PIDs"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": NODE_NAME},
        ],
        "capacity": {"cpu": "2", "memory": "24Gi", "pods": "250", "ephemeral-storage": "100Gi"},
        "allocatable": {"cpu": "2", "memory": "24Gi", "pods": "250", "ephemeral-storage": "100Gi"},
        "nodeInfo": {
            "machineID": "cairn-test-bed", "systemUUID": "cairn-test-bed", "bootID": "cairn-test-bed",
            "kernelVersion": "", "osImage": "cairn test bed", "containerRuntimeVersion": "local-process://0",
            "kubeletVersion": "v1.34.4", "kubeProxyVersion": "", "operatingSystem": "linux",
            "architecture": std::env::consts::ARCH,
        },
    }});
    nodes
        .patch_status(NODE_NAME, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .context("posting the node status")?;
    Ok(())
}

/// Keeps the node Ready in the eyes of the node lifecycle controller.
async fn heartbeat(shared: Arc<Shared>) {
    let leases: Api<Lease> = Api::namespaced(shared.client.clone(), "kube-node-lease");
    let mut tick = 0u64;
    loop {
        let lease: Result<Lease, _> = serde_json::from_value(json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": NODE_NAME, "namespace": "kube-node-lease"},
            "spec": {
                "holderIdentity": NODE_NAME,
                "leaseDurationSeconds": 40,
                "renewTime": MicroTime(Timestamp::now()),
            },
        }));
        if let Ok(lease) = lease {
            let pp = PatchParams::apply("cairn-test-kubelet").force();
            if let Err(e) = leases.patch(NODE_NAME, &pp, &Patch::Apply(&lease)).await {
                eprintln!("test kubelet: renewing the node lease: {e}");
            }
        }
        if tick.is_multiple_of(3)
            && let Err(e) = node_status(&shared).await
        {
            eprintln!("test kubelet: {e:#}");
        }
        tick += 1;
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

async fn watch_pods(shared: Arc<Shared>) {
    let pods: Api<Pod> = Api::all(shared.client.clone());
    let mut stream = watcher(pods, watcher::Config::default()).default_backoff().boxed();
    let mut listed: HashSet<String> = HashSet::new();
    loop {
        match stream.try_next().await {
            Ok(Some(watcher::Event::Init)) => listed.clear(),
            Ok(Some(watcher::Event::InitApply(pod))) => {
                listed.insert(pod.metadata.uid.clone().unwrap_or_default());
                on_pod(&shared, pod);
            }
            Ok(Some(watcher::Event::InitDone)) => {
                // Pods deleted while the watch was down.
                let pods = shared.pods.lock().unwrap();
                for (uid, entry) in pods.iter() {
                    if !listed.contains(uid) {
                        let _ = entry.tx.send(None);
                    }
                }
            }
            Ok(Some(watcher::Event::Apply(pod))) => on_pod(&shared, pod),
            Ok(Some(watcher::Event::Delete(pod))) => {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                if let Some(entry) = shared.pods.lock().unwrap().get(&uid) {
                    let _ = entry.tx.send(None);
                }
            }
            Ok(None) => return,
            Err(e) => eprintln!("test kubelet: pod watch: {e}"),
        }
    }
}

fn on_pod(shared: &Arc<Shared>, pod: Pod) {
    let spec = pod.spec.as_ref();
    let node = spec.and_then(|s| s.node_name.clone());
    let deleting = pod.metadata.deletion_timestamp.is_some();
    match node.as_deref() {
        None if !deleting => {
            tokio::spawn(bind(shared.clone(), pod));
        }
        Some(NODE_NAME) => {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            let mut pods = shared.pods.lock().unwrap();
            if let Some(entry) = pods.get(&uid) {
                let _ = entry.tx.send(Some(pod));
                return;
            }
            if shared.done.lock().unwrap().contains(&uid) {
                return;
            }
            if deleting {
                // Deleted before it ran here: nothing to stop, only the object to remove.
                shared.done.lock().unwrap().insert(uid.clone());
                tokio::spawn(finish_delete(shared.clone(), pod, uid));
                return;
            }
            let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
            let ctx = Arc::new(PodCtx::new(&pod));
            let (tx, rx) = watch::channel(Some(pod));
            pods.insert(uid.clone(), PodEntry { tx, ctx: ctx.clone() });
            let terminal = phase == "Succeeded" || phase == "Failed";
            tokio::spawn(run_pod(shared.clone(), ctx, rx, uid, terminal));
        }
        _ => {}
    }
}

/// The scheduler's part: bind the pod to the only node.
async fn bind(shared: Arc<Shared>, pod: Pod) {
    let (Some(ns), Some(name)) = (pod.metadata.namespace.clone(), pod.metadata.name.clone()) else {
        return;
    };
    let pods: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
    let binding = json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": name, "namespace": ns, "uid": pod.metadata.uid},
        "target": {"apiVersion": "v1", "kind": "Node", "name": NODE_NAME},
    });
    match pods
        .create_subresource::<_, Value>("binding", &name, &PostParams::default(), &binding)
        .await
    {
        Ok(_) => {}
        // Already bound (a second event for the same pod) or gone.
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
        Err(e) => eprintln!("test kubelet: binding {ns}/{name}: {e}"),
    }
}

/// One container's state as reported in the pod status.
#[derive(Clone, Debug, Default)]
struct CState {
    name: String,
    image: String,
    pid: Option<u32>,
    restart_count: i32,
    ready: bool,
    started: bool,
    /// `state` of the container status (one of running/waiting/terminated), as JSON.
    state: Value,
    last_state: Value,
    /// Exit code of the last run.
    exit_code: Option<i32>,
}

#[derive(Default)]
struct PodState {
    ip: Option<String>,
    start_time: Option<Value>,
    init: Vec<CState>,
    containers: Vec<CState>,
    initialized: bool,
    phase: String,
    reason: Option<String>,
    message: Option<String>,
    deleting: bool,
    ip_released: bool,
    /// Condition type → (status, lastTransitionTime).
    conditions: BTreeMap<&'static str, (bool, Value)>,
}

struct PodCtx {
    namespace: String,
    name: String,
    uid: String,
    state: Mutex<PodState>,
    changed: Notify,
}

impl PodCtx {
    fn new(pod: &Pod) -> PodCtx {
        let spec = pod.spec.clone().unwrap_or_default();
        let cstate = |c: &Container| CState {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            state: json!({"waiting": {"reason": "PodInitializing"}}),
            ..CState::default()
        };
        PodCtx {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            state: Mutex::new(PodState {
                init: spec.init_containers.iter().flatten().map(cstate).collect(),
                containers: spec.containers.iter().map(cstate).collect(),
                phase: "Pending".to_owned(),
                ..PodState::default()
            }),
            changed: Notify::new(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut PodState)) {
        f(&mut self.state.lock().unwrap());
        self.changed.notify_one();
    }

    fn container(&self, kind: Kind, idx: usize, f: impl FnOnce(&mut CState)) {
        self.update(|s| {
            let list = match kind {
                Kind::Init => &mut s.init,
                Kind::Main => &mut s.containers,
            };
            if let Some(c) = list.get_mut(idx) {
                f(c);
            }
        });
    }

    /// The pod status as JSON.
    fn status(&self) -> Value {
        let mut s = self.state.lock().unwrap();
        let all_ready = !s.containers.is_empty() && s.containers.iter().all(|c| c.ready);
        let ready_now = all_ready && s.phase == "Running";
        let initialized = s.initialized;
        let mut conditions = Vec::new();
        for (type_, value) in [
            ("PodReadyToStartContainers", s.ip.is_some()),
            ("PodScheduled", true),
            ("Initialized", initialized),
            ("ContainersReady", ready_now),
            ("Ready", ready_now),
        ] {
            let entry = s.conditions.entry(type_).or_insert_with(|| (value, now()));
            if entry.0 != value {
                *entry = (value, now());
            }
            let mut cond = json!({"type": type_, "status": if value { "True" } else { "False" },
                                  "lastProbeTime": null, "lastTransitionTime": entry.1});
            if !value && (type_ == "Ready" || type_ == "ContainersReady") {
                let not_ready: Vec<&str> =
                    s.containers.iter().filter(|c| !c.ready).map(|c| c.name.as_str()).collect();
                if !not_ready.is_empty() {
                    cond["reason"] = json!("ContainersNotReady");
                    cond["message"] =
                        json!(format!("containers with unready status: [{}]", not_ready.join(" ")));
                }
            }
            conditions.push(cond);
        }
        let statuses = |list: &[CState]| -> Vec<Value> {
            list.iter()
                .map(|c| {
                    json!({
                        "name": c.name, "image": c.image, "imageID": "",
                        "containerID": c.pid.map(|p| format!("bed://{p}")),
                        "ready": c.ready, "started": c.started, "restartCount": c.restart_count,
                        "state": c.state, "lastState": c.last_state,
                    })
                })
                .collect()
        };
        let mut status = json!({
            "phase": s.phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "conditions": conditions,
            "containerStatuses": statuses(&s.containers),
        });
        if !s.init.is_empty() {
            status["initContainerStatuses"] = json!(statuses(&s.init));
        }
        if let Some(ip) = &s.ip {
            status["podIP"] = json!(ip);
            status["podIPs"] = json!([{"ip": ip}]);
        }
        if let Some(t) = &s.start_time {
            status["startTime"] = t.clone();
        }
        if let Some(r) = &s.reason {
            status["reason"] = json!(r);
        }
        if let Some(m) = &s.message {
            status["message"] = json!(m);
        }
        json!({ "status": status })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Init,
    Main,
}

/// Everything one pod needs while it runs.
struct Run {
    shared: Arc<Shared>,
    ctx: Arc<PodCtx>,
    pod: Pod,
    api: Api<Pod>,
    pod_dir: PathBuf,
    /// Volume name → host directory.
    volumes: Mutex<HashMap<String, PathBuf>>,
    /// Set (to the grace period) when the pod must stop.
    stop: watch::Sender<Option<Duration>>,
}

/// Runs a pod from binding to deletion.
async fn run_pod(
    shared: Arc<Shared>,
    ctx: Arc<PodCtx>,
    mut rx: watch::Receiver<Option<Pod>>,
    uid: String,
    terminal: bool,
) {
    let Some(pod) = rx.borrow_and_update().clone() else { return };
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &ctx.namespace);
    let (stop, _) = watch::channel(None);
    let run = Run {
        pod_dir: shared.dir.join("pods").join(&uid),
        shared: shared.clone(),
        ctx: ctx.clone(),
        pod,
        api,
        volumes: Mutex::new(HashMap::new()),
        stop,
    };
    let writer =
        tokio::spawn(status_writer(run.ctx.clone(), run.api.clone(), run.stop.subscribe()));

    if !terminal {
        let lifecycle = run.lifecycle();
        tokio::pin!(lifecycle);
        tokio::select! {
            () = &mut lifecycle => {}
            grace = wait_deleted(&mut rx) => {
                // Every step of the lifecycle watches `stop`: containers get SIGTERM, the
                // grace period, then SIGKILL.
                let _ = run.stop.send(Some(grace));
                lifecycle.await;
            }
        }
        run.wait_stopped().await;
        run.teardown();
    }
    // Pods that ended (Succeeded/Failed) stay until deleted.
    let grace = wait_deleted(&mut rx).await;
    let _ = run.stop.send(Some(grace));
    run.wait_stopped().await;
    run.teardown();
    writer.abort();
    let gone = rx.borrow().is_none();
    let _ = std::fs::remove_dir_all(&run.pod_dir);
    shared.done.lock().unwrap().insert(uid.clone());
    if !gone {
        delete_now(&run.api, &run.ctx.namespace, &run.ctx.name, &uid).await;
    }
    shared.pods.lock().unwrap().remove(&uid);
}

async fn finish_delete(shared: Arc<Shared>, pod: Pod, uid: String) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
    delete_now(&api, &ns, &name, &uid).await;
}

/// Removes the Pod object (grace period 0), as a kubelet does once its containers are gone.
async fn delete_now(api: &Api<Pod>, ns: &str, name: &str, uid: &str) {
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions { uid: Some(uid.to_owned()), resource_version: None }),
        ..DeleteParams::default()
    };
    match api.delete(name, &dp).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => eprintln!("test kubelet: deleting {ns}/{name}: {e}"),
    }
}

/// Waits until the pod has a deletion timestamp (returns its grace period) or is gone.
async fn wait_deleted(rx: &mut watch::Receiver<Option<Pod>>) -> Duration {
    loop {
        match &*rx.borrow_and_update() {
            None => return Duration::ZERO,
            Some(pod) if pod.metadata.deletion_timestamp.is_some() => {
                let secs = pod
                    .metadata
                    .deletion_grace_period_seconds
                    .or(pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds))
                    .unwrap_or(30);
                return Duration::from_secs(secs.max(0) as u64);
            }
            Some(_) => {}
        }
        if rx.changed().await.is_err() {
            return Duration::ZERO;
        }
    }
}

/// Writes the pod status whenever it changes (and retries failed writes every 2 s).
async fn status_writer(
    ctx: Arc<PodCtx>,
    api: Api<Pod>,
    mut stop: watch::Receiver<Option<Duration>>,
) {
    let mut last = Value::Null;
    loop {
        let status = ctx.status();
        if status != last {
            match api.patch_status(&ctx.name, &PatchParams::default(), &Patch::Merge(&status)).await
            {
                Ok(_) => last = status,
                Err(kube::Error::Api(e)) if e.code == 404 => return,
                Err(e) => eprintln!("test kubelet: status of {}/{}: {e}", ctx.namespace, ctx.name),
            }
        }
        tokio::select! {
            () = ctx.changed.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.changed() => {}
        }
    }
}

impl Run {
    fn spec(&self) -> k8s_openapi::api::core::v1::PodSpec {
        self.pod.spec.clone().unwrap_or_default()
    }

    fn restart_policy(&self) -> String {
        self.spec().restart_policy.unwrap_or_else(|| "Always".to_owned())
    }

    /// Sets up the sandbox, runs init containers, then the containers until they end.
    async fn lifecycle(&self) {
        let ip = match self.shared.allocate_ip() {
            Ok(ip) => ip,
            Err(e) => return self.fail_pending("IPAllocationFailed", &format!("{e:#}")),
        };
        let spec = self.spec();
        if let (Some(host), Some(sub)) = (&spec.hostname, &spec.subdomain) {
            let base = format!("{host}.{sub}.{}.svc", self.ctx.namespace);
            self.shared.hosts.set(&self.ctx.uid, &ip, &[format!("{base}.cluster.local"), base]);
        }
        self.ctx.update(|s| {
            s.ip = Some(ip);
            s.start_time = Some(now());
        });
        if let Err(e) = std::fs::create_dir_all(&self.pod_dir) {
            return self.fail_pending("PodDirFailed", &e.to_string());
        }
        if let Err(e) = self.prepare_volumes().await {
            return self.fail_pending("VolumeSetupFailed", &format!("{e:#}"));
        }
        self.ctx.update(|s| {
            s.reason = None;
            s.message = None;
        });

        // Init containers, in order, each to a successful end.
        for (idx, c) in spec.init_containers.iter().flatten().enumerate() {
            if self.stop.borrow().is_some() {
                return;
            }
            let code = Supervisor::new(self, Kind::Init, idx, c.clone()).await.run().await;
            if code != Some(0) {
                if code.is_some() {
                    // restartPolicy Never: the pod fails.
                    self.ctx.update(|s| s.phase = "Failed".to_owned());
                }
                return;
            }
        }
        self.ctx.update(|s| {
            s.initialized = true;
            s.phase = "Running".to_owned();
        });

        let mut tasks = Vec::new();
        for (idx, c) in spec.containers.iter().enumerate() {
            if self.stop.borrow().is_some() {
                break;
            }
            let sup = Supervisor::new(self, Kind::Main, idx, c.clone()).await;
            tasks.push(tokio::spawn(sup.run()));
        }
        let mut codes = Vec::new();
        for t in tasks {
            codes.push(t.await.ok().flatten());
        }
        // Every container has ended for good (restart policy Never or OnFailure).
        if self.stop.borrow().is_none() {
            let ok = codes.iter().all(|c| *c == Some(0));
            self.ctx.update(|s| s.phase = if ok { "Succeeded" } else { "Failed" }.to_owned());
        }
    }

    fn fail_pending(&self, reason: &str, message: &str) {
        eprintln!(
            "test kubelet: pod {}/{}: {reason}: {message}",
            self.ctx.namespace, self.ctx.name
        );
        self.ctx.update(|s| {
            s.reason = Some(reason.to_owned());
            s.message = Some(message.to_owned());
        });
    }

    /// Waits until no container of the pod runs any more.
    async fn wait_stopped(&self) {
        loop {
            let running = {
                let s = self.ctx.state.lock().unwrap();
                s.init.iter().chain(&s.containers).any(|c| c.pid.is_some())
            };
            if !running {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Releases the sandbox (IP, DNS names). Idempotent.
    fn teardown(&self) {
        self.shared.hosts.remove(&self.ctx.uid);
        let ip = {
            let mut s = self.ctx.state.lock().unwrap();
            if s.ip_released {
                None
            } else {
                s.ip_released = true;
                s.ip.clone()
            }
        };
        if let Some(ip) = ip {
            self.shared.release_ip(&ip);
        }
        self.ctx.update(|s| {
            s.deleting = true;
            for c in s.init.iter_mut().chain(s.containers.iter_mut()) {
                c.ready = false;
            }
        });
    }

    async fn prepare_volumes(&self) -> anyhow::Result<()> {
        let spec = self.spec();
        for v in spec.volumes.iter().flatten() {
            let dir = self.prepare_volume(v).await.with_context(|| format!("volume {}", v.name))?;
            self.volumes.lock().unwrap().insert(v.name.clone(), dir);
        }
        Ok(())
    }

    async fn prepare_volume(&self, v: &Volume) -> anyhow::Result<PathBuf> {
        let client = self.shared.client.clone();
        let ns = &self.ctx.namespace;
        let own = self.pod_dir.join("volumes").join(&v.name);
        if let Some(pvc) = &v.persistent_volume_claim {
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(client, ns);
            // A real kubelet mounts a claim only once it is bound.
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let claim = claims.get_opt(&pvc.claim_name).await?;
                let phase =
                    claim.as_ref().and_then(|c| c.status.as_ref()).and_then(|s| s.phase.clone());
                if phase.as_deref() == Some("Bound") {
                    break;
                }
                if Instant::now() > deadline || self.stop.borrow().is_some() {
                    bail!("PVC {} is not bound (phase {phase:?})", pvc.claim_name);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let dir = pvc_dir(&self.shared.dir, ns, &pvc.claim_name);
            std::fs::create_dir_all(&dir)?;
            return Ok(dir);
        }
        if v.empty_dir.is_some() {
            std::fs::create_dir_all(&own)?;
            return Ok(own);
        }
        if let Some(hp) = &v.host_path {
            let path = PathBuf::from(&hp.path);
            if matches!(hp.type_.as_deref(), Some("DirectoryOrCreate")) {
                std::fs::create_dir_all(&path)?;
            }
            return Ok(path);
        }
        if let Some(cm) = &v.config_map {
            std::fs::create_dir_all(&own)?;
            self.project_config_map(&own, &cm.name, cm.items.as_deref(), cm.optional).await?;
            return Ok(own);
        }
        if let Some(secret) = &v.secret {
            std::fs::create_dir_all(&own)?;
            let name = secret.secret_name.clone().unwrap_or_default();
            self.project_secret(&own, &name, secret.items.as_deref(), secret.optional).await?;
            return Ok(own);
        }
        if let Some(dapi) = &v.downward_api {
            std::fs::create_dir_all(&own)?;
            for item in dapi.items.iter().flatten() {
                if let Some(f) = &item.field_ref {
                    write_file(&own, &item.path, self.field(&f.field_path)?.as_bytes())?;
                }
            }
            return Ok(own);
        }
        if let Some(projected) = &v.projected {
            std::fs::create_dir_all(&own)?;
            for source in projected.sources.iter().flatten() {
                if let Some(cm) = &source.config_map {
                    self.project_config_map(&own, &cm.name, cm.items.as_deref(), cm.optional)
                        .await?;
                }
                if let Some(secret) = &source.secret {
                    self.project_secret(
                        &own,
                        &secret.name,
                        secret.items.as_deref(),
                        secret.optional,
                    )
                    .await?;
                }
                if let Some(dapi) = &source.downward_api {
                    for item in dapi.items.iter().flatten() {
                        if let Some(f) = &item.field_ref {
                            write_file(&own, &item.path, self.field(&f.field_path)?.as_bytes())?;
                        }
                    }
                }
                if let Some(token) = &source.service_account_token {
                    let sa =
                        self.spec().service_account_name.unwrap_or_else(|| "default".to_owned());
                    let accounts: Api<ServiceAccount> =
                        Api::namespaced(self.shared.client.clone(), ns);
                    let request = json!({
                        "apiVersion": "authentication.k8s.io/v1",
                        "kind": "TokenRequest",
                        "spec": {
                            "audiences": token.audience.as_ref().map(|a| vec![a.clone()]),
                            "expirationSeconds": token.expiration_seconds.unwrap_or(3607),
                            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.ctx.name, "uid": self.ctx.uid},
                        },
                    });
                    let answer: Value = accounts
                        .create_subresource("token", &sa, &PostParams::default(), &request)
                        .await
                        .with_context(|| format!("requesting a token for ServiceAccount {sa}"))?;
                    let jwt = answer["status"]["token"].as_str().unwrap_or_default();
                    write_file(&own, &token.path, jwt.as_bytes())?;
                }
            }
            return Ok(own);
        }
        bail!(
            "this volume type is not supported by the test kubelet (supported: persistentVolumeClaim, emptyDir, hostPath, configMap, secret, downwardAPI, projected)"
        )
    }

    async fn project_config_map(
        &self,
        dir: &Path,
        name: &str,
        items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
        optional: Option<bool>,
    ) -> anyhow::Result<()> {
        let Some(cm) = self.get_source::<ConfigMap>(name, optional).await? else { return Ok(()) };
        let data: BTreeMap<String, Vec<u8>> = cm
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .chain(cm.binary_data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)))
            .collect();
        project(dir, &data, items)
    }

    async fn project_secret(
        &self,
        dir: &Path,
        name: &str,
        items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
        optional: Option<bool>,
    ) -> anyhow::Result<()> {
        let Some(secret) = self.get_source::<Secret>(name, optional).await? else { return Ok(()) };
        let data: BTreeMap<String, Vec<u8>> =
            secret.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
        project(dir, &data, items)
    }

    /// Reads a volume's ConfigMap or Secret from the pod's namespace: None when it is missing
    /// and the volume says `optional`, an error when it is missing otherwise.
    async fn get_source<K>(&self, name: &str, optional: Option<bool>) -> anyhow::Result<Option<K>>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let api: Api<K> = Api::namespaced(self.shared.client.clone(), &self.ctx.namespace);
        match api.get_opt(name).await? {
            Some(source) => Ok(Some(source)),
            None if optional == Some(true) => Ok(None),
            None => bail!("{} {name} not found", K::kind(&K::DynamicType::default())),
        }
    }

    /// A downward-API field of the pod.
    fn field(&self, path: &str) -> anyhow::Result<String> {
        let m = &self.pod.metadata;
        let spec = self.spec();
        Ok(match path {
            "metadata.name" => m.name.clone().unwrap_or_default(),
            "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
            "metadata.uid" => m.uid.clone().unwrap_or_default(),
            "spec.nodeName" => NODE_NAME.to_owned(),
            "spec.serviceAccountName" => spec.service_account_name.unwrap_or_default(),
            "status.podIP" => self.ctx.state.lock().unwrap().ip.clone().unwrap_or_default(),
            "status.hostIP" => "127.0.0.1".to_owned(),
            p => {
                if let Some(key) =
                    p.strip_prefix("metadata.labels['").and_then(|k| k.strip_suffix("']"))
                {
                    m.labels.as_ref().and_then(|l| l.get(key)).cloned().unwrap_or_default()
                } else if let Some(key) =
                    p.strip_prefix("metadata.annotations['").and_then(|k| k.strip_suffix("']"))
                {
                    m.annotations.as_ref().and_then(|l| l.get(key)).cloned().unwrap_or_default()
                } else {
                    bail!("field {p} is not supported by the test kubelet's downward API")
                }
            }
        })
    }

    /// The container's environment, in the order a kubelet builds it.
    async fn env(&self, c: &Container) -> anyhow::Result<Vec<(String, String)>> {
        let mut path = std::env::var("PATH").unwrap_or_else(|_| {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned()
        });
        // The image's own PATH: its binary's directory comes first, so a shell in the
        // container finds `cairn` as it would in the real image.
        if let Some(dir) =
            c.image.as_deref().and_then(|i| self.shared.images.resolve(i)).and_then(Path::parent)
        {
            path = format!("{}:{path}", dir.display());
        }
        let mut env: Vec<(String, String)> = vec![
            ("PATH".to_owned(), path),
            ("HOSTNAME".to_owned(), self.spec().hostname.unwrap_or_else(|| self.ctx.name.clone())),
            ("HOME".to_owned(), "/root".to_owned()),
            ("KUBERNETES_SERVICE_HOST".to_owned(), "127.0.0.1".to_owned()),
            ("KUBERNETES_SERVICE_PORT".to_owned(), self.shared.apiserver_port.to_string()),
        ];
        let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
            env.retain(|(name, _)| *name != k);
            env.push((k, v));
        };
        let ns = &self.ctx.namespace;
        for from in c.env_from.iter().flatten() {
            let prefix = from.prefix.clone().unwrap_or_default();
            if let Some(r) = &from.config_map_ref {
                let api: Api<ConfigMap> = Api::namespaced(self.shared.client.clone(), ns);
                match api.get_opt(&r.name).await? {
                    Some(cm) => {
                        for (k, v) in cm.data.unwrap_or_default() {
                            set(&mut env, format!("{prefix}{k}"), v);
                        }
                    }
                    None if r.optional == Some(true) => {}
                    None => bail!("ConfigMap {} (envFrom) not found", r.name),
                }
            }
            if let Some(r) = &from.secret_ref {
                let api: Api<Secret> = Api::namespaced(self.shared.client.clone(), ns);
                match api.get_opt(&r.name).await? {
                    Some(s) => {
                        for (k, v) in s.data.unwrap_or_default() {
                            set(
                                &mut env,
                                format!("{prefix}{k}"),
                                String::from_utf8_lossy(&v.0).into_owned(),
                            );
                        }
                    }
                    None if r.optional == Some(true) => {}
                    None => bail!("Secret {} (envFrom) not found", r.name),
                }
            }
        }
        for var in c.env.iter().flatten() {
            let value = if let Some(from) = &var.value_from {
                if let Some(f) = &from.field_ref {
                    self.field(&f.field_path)?
                } else if let Some(r) = &from.secret_key_ref {
                    let api: Api<Secret> = Api::namespaced(self.shared.client.clone(), ns);
                    let v = api.get_opt(&r.name).await?.and_then(|s| s.data).and_then(|d| {
                        d.get(&r.key).map(|b| String::from_utf8_lossy(&b.0).into_owned())
                    });
                    match v {
                        Some(v) => v,
                        None if r.optional == Some(true) => continue,
                        None => {
                            bail!("env {}: key {} of Secret {} not found", var.name, r.key, r.name)
                        }
                    }
                } else if let Some(r) = &from.config_map_key_ref {
                    let api: Api<ConfigMap> = Api::namespaced(self.shared.client.clone(), ns);
                    let v = api
                        .get_opt(&r.name)
                        .await?
                        .and_then(|s| s.data)
                        .and_then(|d| d.get(&r.key).cloned());
                    match v {
                        Some(v) => v,
                        None if r.optional == Some(true) => continue,
                        None => bail!(
                            "env {}: key {} of ConfigMap {} not found",
                            var.name,
                            r.key,
                            r.name
                        ),
                    }
                } else {
                    bail!("env {}: this valueFrom is not supported by the test kubelet", var.name)
                }
            } else {
                let map: HashMap<String, String> = env.iter().cloned().collect();
                expand(var.value.as_deref().unwrap_or_default(), &map)
            };
            set(&mut env, var.name.clone(), value);
        }
        Ok(env)
    }

    /// The host command line for a container: (program, args), with mounts applied.
    async fn command(&self, c: &Container) -> anyhow::Result<Launch> {
        let env = self.env(c).await?;
        let map: HashMap<String, String> = env.iter().cloned().collect();
        let image = c.image.clone().unwrap_or_default();
        let mapped = self.shared.images.resolve(&image);
        let command: Vec<String> = c.command.iter().flatten().map(|s| expand(s, &map)).collect();
        let args: Vec<String> = c.args.iter().flatten().map(|s| expand(s, &map)).collect();
        let (exe, mut argv) = match command.split_first() {
            Some((first, rest)) => {
                let exe = match mapped {
                    Some(m) if basename(first) == basename(&m.to_string_lossy()) => m.to_owned(),
                    _ => which(first).ok_or_else(|| anyhow!("{first}: not found on the host PATH (and not image {image}'s binary)"))?,
                };
                (exe, rest.to_vec())
            }
            None => (
                mapped.map(Path::to_owned).ok_or_else(|| {
                    anyhow!("image {image} is not in the bed's image map (cairn, cairn-operator, CAIRN_BED_IMAGES) and the container has no command")
                })?,
                Vec::new(),
            ),
        };
        argv.extend(args);

        let mut mounts: Vec<(String, PathBuf)> = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let dir = self
                .volumes
                .lock()
                .unwrap()
                .get(&m.name)
                .cloned()
                .ok_or_else(|| anyhow!("volumeMount {} names no volume of the pod", m.name))?;
            let src = match m.sub_path.as_deref() {
                Some(sub) if !sub.is_empty() => {
                    let p = dir.join(sub);
                    if !p.exists() {
                        std::fs::create_dir_all(&p)?;
                    }
                    p
                }
                _ => dir,
            };
            mounts.push((m.mount_path.clone(), src));
        }
        // terminationMessagePath: a file of the pod's own, bound at the path (mount
        // namespaces only); read into the terminated state when the container ends.
        let termination = match c.termination_message_path.as_deref() {
            Some(p) if self.shared.mount_ns && p.starts_with('/') => {
                let dir = self.pod_dir.join("termination");
                std::fs::create_dir_all(&dir)?;
                let file = dir.join(&c.name);
                std::fs::write(&file, b"")?;
                mounts.push((p.to_owned(), file.clone()));
                Some(file)
            }
            _ => None,
        };
        if self.shared.mount_ns {
            // unshare → sh (bind mounts) → exec the program: one PID throughout.
            mounts.sort_by(|a, b| a.0.cmp(&b.0));
            let mut wrapped = vec![
                "--mount".to_owned(),
                "--propagation".to_owned(),
                "private".to_owned(),
                "--".to_owned(),
                "sh".to_owned(),
                "-c".to_owned(),
                MOUNT_SCRIPT.to_owned(),
                "sh".to_owned(),
            ];
            for (target, src) in &mounts {
                wrapped.push(src.to_string_lossy().into_owned());
                wrapped.push(target.clone());
            }
            wrapped.push("--".to_owned());
            wrapped.push(exe.to_string_lossy().into_owned());
            wrapped.extend(argv);
            Ok(Launch { program: PathBuf::from("unshare"), args: wrapped, env, termination })
        } else {
            // Longest mountPath first, so /a/b wins over /a.
            mounts.sort_by_key(|m| std::cmp::Reverse(m.0.len()));
            let rewrite = |s: &str| -> String {
                for (target, src) in &mounts {
                    if let Some(pos) = s.find(target.as_str()) {
                        let end = pos + target.len();
                        if s[end..].is_empty() || s[end..].starts_with('/') {
                            return format!("{}{}{}", &s[..pos], src.display(), &s[end..]);
                        }
                    }
                }
                s.to_owned()
            };
            let argv = argv.iter().map(|a| rewrite(a)).collect();
            let env = env.into_iter().map(|(k, v)| (k, rewrite(&v))).collect();
            Ok(Launch { program: exe, args: argv, env, termination })
        }
    }

    fn log_path(&self, container: &str) -> PathBuf {
        self.shared
            .dir
            .join("logs")
            .join(format!("{}_{}_{container}.log", self.ctx.namespace, self.ctx.name))
    }
}

/// How a container is started on the host.
#[derive(Clone, Debug)]
struct Launch {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// The host file behind the container's terminationMessagePath.
    termination: Option<PathBuf>,
}

/// Binds `$1` on `$2`, `$3` on `$4`, ... up to `--`, then execs the rest.
const MOUNT_SCRIPT: &str = r#"
while [ "$1" != "--" ]; do
  if [ -d "$1" ]; then mkdir -p "$2"; else mkdir -p "$(dirname "$2")"; [ -e "$2" ] || : > "$2"; fi
  mount --bind "$1" "$2" || { echo "test kubelet: cannot bind $1 on $2" >&2; exit 127; }
  shift 2
done
shift
exec "$@"
"#;

/// Writes `data` (or the `items` subset) as files into `dir`.
fn project(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
) -> anyhow::Result<()> {
    match items {
        Some(items) => {
            for item in items {
                let v = data.get(&item.key).ok_or_else(|| anyhow!("key {} not found", item.key))?;
                write_file(dir, &item.path, v)?;
            }
        }
        None => {
            for (k, v) in data {
                write_file(dir, k, v)?;
            }
        }
    }
    Ok(())
}

fn write_file(dir: &Path, rel: &str, data: &[u8]) -> anyhow::Result<()> {
    if rel.split('/').any(|p| p == "..") || rel.starts_with('/') {
        bail!("path {rel} leaves the volume");
    }
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&path, data).with_context(|| format!("writing {}", path.display()))
}

/// Runs one container: starts it, restarts it as the policy says, stops it on request.
struct Supervisor {
    ctx: Arc<PodCtx>,
    kind: Kind,
    idx: usize,
    container: Container,
    restart_policy: String,
    stop: watch::Receiver<Option<Duration>>,
    /// The prepared command line (program, args, env), or why it could not be prepared.
    command: Result<Launch, String>,
    log: PathBuf,
    pgid: u32,
    cwd: PathBuf,
    pod_ip: String,
    /// terminationGracePeriodSeconds, for restarts after failed liveness probes.
    grace: Duration,
}

impl Supervisor {
    async fn new(run: &Run, kind: Kind, idx: usize, container: Container) -> Supervisor {
        SupervisorBuilder { run, kind, idx, container }.build().await
    }

    /// Runs until the container ends for good or the pod stops. Returns the last exit code
    /// (`None` when stopped, or when the container never ran).
    async fn run(mut self) -> Option<i32> {
        let mut failures = 0u32;
        let probes = (self.kind == Kind::Main).then(|| self.start_probes());
        let (restart_tx, mut restart_rx) = tokio::sync::mpsc::channel::<()>(1);
        if let Some(p) = &probes {
            let _ = p.send(Some(restart_tx.clone()));
        }
        let result = loop {
            if self.stop.borrow().is_some() {
                break None;
            }
            let ran_since = Instant::now();
            let exit = match self.start() {
                Err(e) => {
                    self.set(|c| {
                        c.state = json!({"waiting": {"reason": "RunContainerError", "message": e}});
                    });
                    None
                }
                Ok(mut child) => {
                    let pid = child.id().unwrap_or_default();
                    let started_at = now();
                    self.set(|c| {
                        c.pid = Some(pid);
                        c.state = json!({"running": {"startedAt": started_at}});
                        c.started = c.started || self.kind == Kind::Init;
                    });
                    let status = tokio::select! {
                        s = child.wait() => s.ok(),
                        _ = self.stop.changed() => {
                            let grace = self.stop.borrow().unwrap_or_default();
                            terminate(&mut child, pid, grace).await
                        }
                        Some(()) = restart_rx.recv() => {
                            terminate(&mut child, pid, self.grace).await
                        }
                    };
                    let code = status.map(exit_code).unwrap_or(137);
                    let message = self.termination_message(code);
                    let finished = now();
                    self.set(|c| {
                        let reason = if code == 0 { "Completed" } else { "Error" };
                        c.pid = None;
                        c.ready = false;
                        c.started = false;
                        c.exit_code = Some(code);
                        c.state = json!({"terminated": {"exitCode": code, "reason": reason,
                            "startedAt": started_at, "finishedAt": finished, "containerID": format!("bed://{pid}")}});
                        if !message.is_empty() {
                            c.state["terminated"]["message"] = json!(message);
                        }
                    });
                    Some(code)
                }
            };
            if self.stop.borrow().is_some() {
                break None;
            }
            let failed = exit != Some(0);
            let again = match (self.kind, self.restart_policy.as_str()) {
                (Kind::Init, "Never") => false,
                (Kind::Init, _) => failed,
                (Kind::Main, "Always") => true,
                (Kind::Main, "OnFailure") => failed,
                _ => false,
            };
            if !again {
                break exit.or(Some(128));
            }
            if ran_since.elapsed() > Duration::from_secs(30) {
                failures = 0;
            }
            failures += 1;
            let backoff =
                Duration::from_millis(500 * (1 << failures.min(5))).min(Duration::from_secs(10));
            self.set(|c| {
                c.restart_count += 1;
                c.last_state = c.state.clone();
                if failed {
                    c.state = json!({"waiting": {"reason": "CrashLoopBackOff",
                        "message": format!("back-off {}s restarting failed container", backoff.as_secs())}});
                }
            });
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = self.stop.changed() => {}
            }
        };
        if let Some(p) = probes {
            let _ = p.send(None);
        }
        result
    }

    fn set(&self, f: impl FnOnce(&mut CState)) {
        self.ctx.container(self.kind, self.idx, f);
    }

    fn start(&self) -> Result<tokio::process::Child, String> {
        let Launch { program, args, env, termination } = self.command.clone()?;
        if let Some(t) = &termination {
            // Each run starts with an empty message, as each real container instance does.
            std::fs::write(t, b"").map_err(|e| format!("{}: {e}", t.display()))?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("opening {}: {e}", self.log.display()))?;
        {
            use std::io::Write as _;
            let mut header = &log;
            let _ = writeln!(
                header,
                "----- test kubelet: starting {} {}",
                program.display(),
                args.join(" ")
            );
        }
        let err = log.try_clone().map_err(|e| e.to_string())?;
        tokio::process::Command::new(&program)
            .args(&args)
            .env_clear()
            .envs(env)
            .current_dir(&self.cwd)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(self.pgid as i32)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", program.display()))
    }

    /// The container's termination message: its terminationMessagePath file (at most 4096
    /// bytes, as the kubelet reads), or with `FallbackToLogsOnError` after a failure and an
    /// empty file, the tail of its log.
    fn termination_message(&self, code: i32) -> String {
        let Ok(Launch { termination: Some(file), .. }) = &self.command else {
            return String::new();
        };
        let tail = |bytes: Vec<u8>, max: usize| {
            let start = bytes.len().saturating_sub(max);
            String::from_utf8_lossy(&bytes[start..]).into_owned()
        };
        let mut message = std::fs::read(file).map(|b| tail(b, 4096)).unwrap_or_default();
        let policy = self.container.termination_message_policy.as_deref();
        if message.is_empty() && code != 0 && policy == Some("FallbackToLogsOnError") {
            message = std::fs::read(&self.log).map(|b| tail(b, 2048)).unwrap_or_default();
        }
        message
    }

    /// Starts the probe task; it stops when `None` is sent and learns where to ask for
    /// restarts when `Some` is sent.
    fn start_probes(&self) -> watch::Sender<Option<tokio::sync::mpsc::Sender<()>>> {
        let (tx, rx) = watch::channel(None);
        let prober = Prober {
            ctx: self.ctx.clone(),
            idx: self.idx,
            container: self.container.clone(),
            pod_ip: self.pod_ip.clone(),
            env: self.command.as_ref().map(|c| c.env.clone()).unwrap_or_default(),
        };
        tokio::spawn(prober.run(rx));
        tx
    }
}

struct SupervisorBuilder<'a> {
    run: &'a Run,
    kind: Kind,
    idx: usize,
    container: Container,
}

impl SupervisorBuilder<'_> {
    async fn build(self) -> Supervisor {
        let command = self.run.command(&self.container).await.map_err(|e| format!("{e:#}"));
        if let Err(e) = &command {
            eprintln!(
                "test kubelet: {}/{} container {}: {e}",
                self.run.ctx.namespace, self.run.ctx.name, self.container.name
            );
        }
        Supervisor {
            ctx: self.run.ctx.clone(),
            kind: self.kind,
            idx: self.idx,
            restart_policy: self.run.restart_policy(),
            stop: self.run.stop.subscribe(),
            command,
            log: self.run.log_path(&self.container.name),
            pgid: self.run.shared.pgid,
            cwd: self.run.pod_dir.clone(),
            pod_ip: self.run.ctx.state.lock().unwrap().ip.clone().unwrap_or_default(),
            grace: Duration::from_secs(
                self.run.spec().termination_grace_period_seconds.unwrap_or(30).max(0) as u64,
            ),
            container: self.container,
        }
    }
}

/// SIGTERM, up to `grace`, then SIGKILL.
async fn terminate(
    child: &mut tokio::process::Child,
    pid: u32,
    grace: Duration,
) -> Option<std::process::ExitStatus> {
    if !grace.is_zero() {
        signal(pid, "TERM");
        if let Ok(status) = tokio::time::timeout(grace, child.wait()).await {
            return status.ok();
        }
    }
    let _ = child.start_kill();
    child.wait().await.ok()
}

fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Runs a container's startup, readiness and liveness probes.
struct Prober {
    ctx: Arc<PodCtx>,
    idx: usize,
    container: Container,
    pod_ip: String,
    env: Vec<(String, String)>,
}

impl Prober {
    async fn run(self, mut rx: watch::Receiver<Option<tokio::sync::mpsc::Sender<()>>>) {
        // Wait for the supervisor's restart channel.
        let restart = loop {
            if let Some(tx) = rx.borrow_and_update().clone() {
                break tx;
            }
            if rx.changed().await.is_err() {
                return;
            }
        };
        let c = &self.container;
        let mut last_pid: Option<u32> = None;
        let mut started_at = Instant::now();
        let (mut ready_ok, mut ready_fail, mut live_fail, mut startup_fail) =
            (0i32, 0i32, 0i32, 0i32);
        let mut next_live = Instant::now();
        loop {
            if rx.borrow().is_none() {
                return;
            }
            let pid = self.ctx.state.lock().unwrap().containers.get(self.idx).and_then(|c| c.pid);
            if pid != last_pid {
                last_pid = pid;
                started_at = Instant::now();
                (ready_ok, ready_fail, live_fail, startup_fail) = (0, 0, 0, 0);
                next_live = Instant::now();
            }
            if pid.is_some() {
                let started = self
                    .ctx
                    .state
                    .lock()
                    .unwrap()
                    .containers
                    .get(self.idx)
                    .is_some_and(|s| s.started);
                if !started {
                    match &c.startup_probe {
                        Some(p) if started_at.elapsed() >= delay(p) => {
                            if self.probe(p).await {
                                self.set(|s| s.started = true);
                            } else {
                                startup_fail += 1;
                                if startup_fail >= p.failure_threshold.unwrap_or(3).max(1) {
                                    let _ = restart.try_send(());
                                    startup_fail = 0;
                                }
                            }
                        }
                        Some(_) => {}
                        None => self.set(|s| s.started = true),
                    }
                } else {
                    match &c.readiness_probe {
                        Some(p) if started_at.elapsed() >= delay(p) => {
                            if self.probe(p).await {
                                ready_fail = 0;
                                ready_ok += 1;
                                if ready_ok >= p.success_threshold.unwrap_or(1).max(1) {
                                    self.set(|s| s.ready = true);
                                }
                            } else {
                                ready_ok = 0;
                                ready_fail += 1;
                                if ready_fail >= p.failure_threshold.unwrap_or(3).max(1) {
                                    self.set(|s| s.ready = false);
                                }
                            }
                        }
                        Some(_) => {}
                        None => self.set(|s| s.ready = true),
                    }
                    if let Some(p) = &c.liveness_probe
                        && started_at.elapsed() >= delay(p)
                        && Instant::now() >= next_live
                    {
                        next_live = Instant::now() + period(p);
                        if self.probe(p).await {
                            live_fail = 0;
                        } else {
                            live_fail += 1;
                            if live_fail >= p.failure_threshold.unwrap_or(3).max(1) {
                                eprintln!(
                                    "test kubelet: {}/{} container {} failed its liveness probe; restarting",
                                    self.ctx.namespace, self.ctx.name, c.name
                                );
                                live_fail = 0;
                                let _ = restart.try_send(());
                            }
                        }
                    }
                }
            }
            let fast = [&c.readiness_probe, &c.startup_probe]
                .into_iter()
                .flatten()
                .map(|p| period(p).min(FAST_PROBE_PERIOD))
                .min()
                .unwrap_or(FAST_PROBE_PERIOD);
            tokio::select! {
                () = tokio::time::sleep(fast.min(Duration::from_millis(500)).max(Duration::from_millis(100))) => {}
                r = rx.changed() => if r.is_err() { return },
            }
        }
    }

    fn set(&self, f: impl FnOnce(&mut CState)) {
        self.ctx.container(Kind::Main, self.idx, |c| {
            if c.pid.is_some() {
                f(c);
            }
        });
    }

    async fn probe(&self, p: &Probe) -> bool {
        let timeout = Duration::from_secs(p.timeout_seconds.unwrap_or(1).max(1) as u64);
        if let Some(get) = &p.http_get {
            let Some(port) = self.port(&get.port) else { return false };
            let host = get.host.clone().unwrap_or_else(|| self.pod_ip.clone());
            if get.scheme.as_deref() == Some("HTTPS") {
                return tcp_connect(&host, port, timeout).await;
            }
            let path = get.path.clone().unwrap_or_else(|| "/".to_owned());
            return matches!(http_get(&host, port, &path, timeout).await, Ok((code, _)) if (200..400).contains(&code));
        }
        if let Some(tcp) = &p.tcp_socket {
            let Some(port) = self.port(&tcp.port) else { return false };
            let host = tcp.host.clone().unwrap_or_else(|| self.pod_ip.clone());
            return tcp_connect(&host, port, timeout).await;
        }
        if let Some(grpc) = &p.grpc {
            return tcp_connect(&self.pod_ip, grpc.port as u16, timeout).await;
        }
        if let Some(exec) = &p.exec {
            let argv = exec.command.clone().unwrap_or_default();
            let Some((first, rest)) = argv.split_first() else { return false };
            let Some(program) = which(first) else { return false };
            let out = tokio::process::Command::new(program)
                .args(rest)
                .env_clear()
                .envs(self.env.iter().cloned())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .status();
            return matches!(tokio::time::timeout(timeout, out).await, Ok(Ok(s)) if s.success());
        }
        false
    }

    fn port(&self, port: &IntOrString) -> Option<u16> {
        match port {
            IntOrString::Int(n) => u16::try_from(*n).ok(),
            IntOrString::String(name) => self
                .container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok()),
        }
    }
}

fn delay(p: &Probe) -> Duration {
    Duration::from_secs(p.initial_delay_seconds.unwrap_or(0).max(0) as u64)
}

fn period(p: &Probe) -> Duration {
    Duration::from_secs(p.period_seconds.unwrap_or(10).max(1) as u64)
}

async fn tcp_connect(host: &str, port: u16, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port))).await,
        Ok(Ok(_))
    )
}

/// A plain HTTP/1.1 GET; returns the status code and body.
pub async fn http_get(
    host: &str,
    port: u16,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<(u16, String)> {
    let fut = async {
        let mut stream = tokio::net::TcpStream::connect((host, port)).await?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.34\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| anyhow!("no HTTP status line from {host}:{port}"))?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        anyhow::Ok((code, body))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow!("GET http://{host}:{port}{path} timed out"))?
}

/// Keeps PVCs backed by directories: a pre-bound hostPath PV per claim (the PV controller
/// binds it), the directory removed with the claim.
async fn watch_claims(shared: Arc<Shared>) {
    let claims: Api<PersistentVolumeClaim> = Api::all(shared.client.clone());
    let mut stream = watcher(claims, watcher::Config::default()).default_backoff().boxed();
    loop {
        match stream.try_next().await {
            Ok(Some(watcher::Event::Apply(pvc) | watcher::Event::InitApply(pvc))) => {
                if let Err(e) = provision(&shared, &pvc).await {
                    eprintln!("test kubelet: PVC {:?}: {e:#}", pvc.metadata.name);
                }
            }
            Ok(Some(watcher::Event::Delete(pvc))) => {
                let (ns, name) = (
                    pvc.metadata.namespace.clone().unwrap_or_default(),
                    pvc.metadata.name.clone().unwrap_or_default(),
                );
                let _ = std::fs::remove_dir_all(pvc_dir(&shared.dir, &ns, &name));
                let pvs: Api<PersistentVolume> = Api::all(shared.client.clone());
                let pv = pv_name(&pvc);
                match pvs.delete(&pv, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => eprintln!("test kubelet: deleting PV {pv}: {e}"),
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => return,
            Err(e) => eprintln!("test kubelet: PVC watch: {e}"),
        }
    }
}

fn pv_name(pvc: &PersistentVolumeClaim) -> String {
    format!("pvc-{}", pvc.metadata.uid.clone().unwrap_or_default())
}

async fn provision(shared: &Shared, pvc: &PersistentVolumeClaim) -> anyhow::Result<()> {
    if pvc.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    let phase = pvc.status.as_ref().and_then(|s| s.phase.clone());
    let spec = pvc.spec.clone().unwrap_or_default();
    if phase.as_deref() == Some("Bound") || spec.volume_name.is_some() {
        return Ok(());
    }
    let ns = pvc.metadata.namespace.clone().unwrap_or_default();
    let name = pvc.metadata.name.clone().unwrap_or_default();
    let dir = pvc_dir(&shared.dir, &ns, &name);
    std::fs::create_dir_all(&dir)?;
    let size = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage").cloned())
        .map(|q| q.0)
        .unwrap_or_else(|| "1Gi".to_owned());
    let pv: PersistentVolume = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": pv_name(pvc), "labels": {"cairn.dev/test-bed": "hostpath"}},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": spec.access_modes.clone().unwrap_or_else(|| vec!["ReadWriteOnce".to_owned()]),
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": spec.storage_class_name.clone().unwrap_or_default(),
            "volumeMode": spec.volume_mode.clone().unwrap_or_else(|| "Filesystem".to_owned()),
            "hostPath": {"path": dir.to_string_lossy(), "type": "DirectoryOrCreate"},
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": ns, "name": name, "uid": pvc.metadata.uid},
        },
    }))?;
    let pvs: Api<PersistentVolume> = Api::all(shared.client.clone());
    match pvs.create(&PostParams::default(), &pv).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e).context("creating the PV"),
    }
}

/// `$(VAR)` expansion as the kubelet does it: known variables are replaced, unknown ones
/// are left as written, `$$` is a literal `$`.
pub fn expand(input: &str, env: &HashMap<String, String>) -> String {
    let chars: Vec<char> = input.chars().collect();
    let mut out = String::with_capacity(input.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '$' && i + 1 < chars.len() {
            match chars[i + 1] {
                '$' => {
                    out.push('$');
                    i += 2;
                    continue;
                }
                '(' => {
                    if let Some(len) = chars[i + 2..].iter().position(|&c| c == ')') {
                        let name: String = chars[i + 2..i + 2 + len].iter().collect();
                        match env.get(&name) {
                            Some(v) => out.push_str(v),
                            None => {
                                out.push_str("$(");
                                out.push_str(&name);
                                out.push(')');
                            }
                        }
                        i += len + 3;
                        continue;
                    }
                }
                _ => {}
            }
        }
        out.push(c);
        i += 1;
    }
    out
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Resolves a program as a shell would: a path as is, a bare name on the host PATH.
fn which(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|d| d.join(program)).find(|p| p.is_file()))
        .unwrap_or(None)
}

/// Image name (repository basename, optionally with `:tag`) → host binary.
#[derive(Clone, Debug, Default)]
pub struct ImageMap {
    entries: HashMap<String, PathBuf>,
}

impl ImageMap {
    /// `cairn`, (when built) `cairn-operator` and the second cairn build under its
    /// `name:tag`, plus `CAIRN_BED_IMAGES="name[:tag]=/path,..."`.
    pub fn from_env(
        cairn: &Path,
        operator: Option<&Path>,
        next: Option<(String, PathBuf)>,
    ) -> anyhow::Result<ImageMap> {
        let mut entries = HashMap::new();
        entries.insert("cairn".to_owned(), cairn.to_owned());
        if let Some(op) = operator {
            entries.insert("cairn-operator".to_owned(), op.to_owned());
        }
        entries.extend(next);
        if let Ok(extra) = std::env::var("CAIRN_BED_IMAGES") {
            for item in extra.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let (name, path) = item.split_once('=').ok_or_else(|| {
                    anyhow!("CAIRN_BED_IMAGES entry {item:?} is not name[:tag]=/path")
                })?;
                let path = PathBuf::from(path);
                if !path.is_file() {
                    bail!("CAIRN_BED_IMAGES: {} (for {name}) does not exist", path.display());
                }
                entries.insert(name.to_owned(), path);
            }
        }
        Ok(ImageMap { entries })
    }

    /// The binary for an image reference: exact `name:tag` first, then `name`.
    pub fn resolve(&self, image: &str) -> Option<&Path> {
        let no_digest = image.split('@').next().unwrap_or(image);
        let last = no_digest.rsplit('/').next().unwrap_or(no_digest);
        let name = last.split(':').next().unwrap_or(last);
        self.entries.get(last).or_else(|| self.entries.get(name)).map(PathBuf::as_path)
    }
}

/// A /24 of loopback addresses (`127.0.<octet>.0/24`) held by one bed through a lock file,
/// so two beds on one machine never hand out the same pod IP.
pub struct NetBlock {
    octet: u8,
    _lock: std::fs::File,
}

impl NetBlock {
    /// Claims the lowest free block, starting at 127.0.1.0/24.
    pub fn claim() -> anyhow::Result<NetBlock> {
        let dir = std::env::temp_dir().join("cairn-bed-net");
        std::fs::create_dir_all(&dir)?;
        for octet in 1..=254u8 {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(format!("{octet}.lock")))?;
            if file.try_lock().is_ok() {
                return Ok(NetBlock { octet, _lock: file });
            }
        }
        bail!("every 127.0.N.0/24 block is held by another test bed")
    }

    /// The third octet of the block.
    pub fn octet(&self) -> u8 {
        self.octet
    }
}

/// This bed's block in the hosts file (`/etc/hosts`, or `CAIRN_BED_HOSTS_FILE`), between
/// `# cairn-bed <id> begin` / `end` marker lines; edited under an advisory lock shared with
/// other beds and the watchdog.
pub struct HostsFile {
    path: PathBuf,
    lock: PathBuf,
    id: String,
    entries: Mutex<BTreeMap<String, String>>,
}

impl HostsFile {
    /// The block of bed `id` (nothing is written until a pod gets a name).
    pub fn new(id: &str) -> HostsFile {
        HostsFile {
            path: std::env::var_os("CAIRN_BED_HOSTS_FILE")
                .map(PathBuf::from)
                .unwrap_or_else(|| "/etc/hosts".into()),
            lock: std::env::temp_dir().join("cairn-bed-hosts.lock"),
            id: id.to_owned(),
            entries: Mutex::new(BTreeMap::new()),
        }
    }

    /// The hosts file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lock file guarding edits.
    pub fn lock_path(&self) -> &Path {
        &self.lock
    }

    /// The bed id in the marker lines.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn set(&self, key: &str, ip: &str, names: &[String]) {
        let line = format!("{ip} {}", names.join(" "));
        self.entries.lock().unwrap().insert(key.to_owned(), line);
        self.write();
    }

    fn remove(&self, key: &str) {
        if self.entries.lock().unwrap().remove(key).is_some() {
            self.write();
        }
    }

    fn write(&self) {
        if let Err(e) = self.try_write() {
            eprintln!("test kubelet: updating {}: {e:#}", self.path.display());
        }
    }

    fn try_write(&self) -> anyhow::Result<()> {
        let entries = self.entries.lock().unwrap();
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock)?;
        lock.lock()?;
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let begin = format!("# cairn-bed {} begin", self.id);
        let end = format!("# cairn-bed {} end", self.id);
        let mut out = String::new();
        let mut inside = false;
        for line in text.lines() {
            if line == begin {
                inside = true;
            } else if line == end {
                inside = false;
            } else if !inside {
                out.push_str(line);
                out.push('\n');
            }
        }
        if !entries.is_empty() {
            out.push_str(&begin);
            out.push('\n');
            for line in entries.values() {
                out.push_str(line);
                out.push('\n');
            }
            out.push_str(&end);
            out.push('\n');
        }
        // Replaced atomically (a resolver reading it meanwhile sees the old or the new file,
        // never a half-written one); in place where it cannot be renamed over (a bind mount).
        let tmp = self.path.with_file_name(format!(".hosts.cairn-bed.{}", std::process::id()));
        let renamed = std::fs::write(&tmp, &out)
            .and_then(|()| {
                if let Ok(meta) = std::fs::metadata(&self.path) {
                    std::fs::set_permissions(&tmp, meta.permissions())?;
                }
                std::fs::rename(&tmp, &self.path)
            })
            .is_ok();
        if !renamed {
            let _ = std::fs::remove_file(&tmp);
            std::fs::write(&self.path, out)
                .with_context(|| format!("writing {}", self.path.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expand_follows_kubelet_rules() {
        let env: HashMap<String, String> = [("POD_IP", "127.0.1.2"), ("A", "x")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        assert_eq!(expand("http://$(POD_IP):2379", &env), "http://127.0.1.2:2379");
        assert_eq!(expand("$(MISSING)-$(A)", &env), "$(MISSING)-x");
        assert_eq!(expand("$$(A) $$ $x $(A", &env), "$(A) $ $x $(A");
    }

    #[test]
    fn image_map_prefers_exact_tag() {
        let mut map = ImageMap::default();
        map.entries.insert("cairn".into(), "/bin/a".into());
        map.entries.insert("cairn:v2".into(), "/bin/b".into());
        assert_eq!(map.resolve("ghcr.io/x/cairn:v1"), Some(Path::new("/bin/a")));
        assert_eq!(map.resolve("ghcr.io/x/cairn:v2"), Some(Path::new("/bin/b")));
        assert_eq!(map.resolve("localhost:5000/cairn@sha256:abc"), Some(Path::new("/bin/a")));
        assert_eq!(map.resolve("busybox"), None);
    }
}
