//! Pure builders of the objects a Cluster owns: the StatefulSet, the headless peer Service,
//! the client Service, the PodDisruptionBudget and the members ConfigMap, plus the names,
//! labels and URLs they share.
//!
//! No I/O here: each builder takes the Cluster (and what the reconciler decided) and returns
//! the full desired object for a server-side apply.
//!
//! The ConfigMap carries `--initial-cluster`, its state and the token. Pods read it through
//! env vars at container start, so membership changes never edit the pod template (which
//! would roll every member).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
    StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapKeySelector, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile,
    SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use super::membership::quorum;
use crate::crd::{AutoCompactionMode, Cluster, quantity_bytes};
use crate::{Error, Result};

/// Client port of every member.
pub const CLIENT_PORT: i32 = 2379;
/// Peer port of every member.
pub const PEER_PORT: i32 = 2380;
/// The plain-http `--listen-metrics-urls` port of every member: `/metrics` and the health
/// endpoints the probes use, reachable without a client certificate.
pub const METRICS_PORT: i32 = 2381;
/// Where the client TLS Secret is mounted in store and backup containers.
pub const CLIENT_TLS_DIR: &str = "/etc/cairn/tls/client";
/// Where the peer TLS Secret is mounted in store containers.
pub const PEER_TLS_DIR: &str = "/etc/cairn/tls/peer";
/// Where the data volume is mounted in the store container.
pub const DATA_MOUNT: &str = "/var/lib/cairn";
/// The data dir inside the volume (a subdirectory, so a volume's `lost+found` is not in it).
pub const DATA_DIR: &str = "/var/lib/cairn/data";
/// Label on store pods that are voters (selected by the PDB).
pub const ROLE_LABEL: &str = "cairn.dev/role";
/// Default claim size.
pub const DEFAULT_STORAGE_SIZE: &str = "8Gi";

/// Labels every owned object carries.
pub fn labels(cluster: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(cluster);
    l.insert("app.kubernetes.io/managed-by".into(), "cairn-operator".into());
    l
}

/// Labels that select a Cluster's pods (the StatefulSet selector; immutable).
pub fn selector_labels(cluster: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "cairn".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), cluster.to_owned()),
    ])
}

/// The selector string of [`selector_labels`] (for `status.selector` and list calls).
pub fn selector_string(cluster: &str) -> String {
    selector_labels(cluster).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// Name of the headless peer Service (the StatefulSet's `serviceName`).
pub fn peer_service_name(cluster: &str) -> String {
    format!("{cluster}-peer")
}

/// Name of the client Service.
pub fn client_service_name(cluster: &str) -> String {
    format!("{cluster}-client")
}

/// Name of the members ConfigMap.
pub fn config_map_name(cluster: &str) -> String {
    format!("{cluster}-members")
}

/// Name of the pod (and member) with `ordinal`.
pub fn pod_name(cluster: &str, ordinal: u32) -> String {
    format!("{cluster}-{ordinal}")
}

/// Name of the data claim of `ordinal` (the StatefulSet's `<template>-<pod>`).
pub fn claim_name(cluster: &str, ordinal: u32) -> String {
    format!("data-{}", pod_name(cluster, ordinal))
}

fn host(cluster: &str, ns: &str, ordinal: u32) -> String {
    format!("{}.{}.{ns}.svc", pod_name(cluster, ordinal), peer_service_name(cluster))
}

/// `https` with TLS, else `http`.
pub fn scheme(tls: bool) -> &'static str {
    if tls { "https" } else { "http" }
}

/// Peer URL of `ordinal` (stable DNS of the headless Service), https with peer TLS.
pub fn peer_url(cluster: &str, ns: &str, ordinal: u32, tls: bool) -> String {
    format!("{}://{}:{PEER_PORT}", scheme(tls), host(cluster, ns, ordinal))
}

/// Client URL of `ordinal`, https with client TLS.
pub fn client_url(cluster: &str, ns: &str, ordinal: u32, tls: bool) -> String {
    format!("{}://{}:{CLIENT_PORT}", scheme(tls), host(cluster, ns, ordinal))
}

/// The ordinal a peer URL (http or https) belongs to, if it is one of this Cluster's.
pub fn ordinal_of_peer_url(cluster: &str, ns: &str, url: &str) -> Option<u32> {
    let (tls, rest) = match url.strip_prefix("https://") {
        Some(rest) => (true, rest),
        None => (false, url.strip_prefix("http://")?),
    };
    let rest = rest.strip_prefix(cluster)?.strip_prefix('-')?;
    let (ordinal, tail) = rest.split_once('.')?;
    let ordinal: u32 = ordinal.parse().ok()?;
    (url == peer_url(cluster, ns, ordinal, tls) && !tail.is_empty()).then_some(ordinal)
}

/// The `--initial-cluster-token` of this Cluster incarnation: `<namespace>-<name>-<uid>`.
///
/// A Cluster deleted and created again under the same name gets a new uid and so a new
/// token: its members can never join the old incarnation's.
///
/// # Errors
/// [`Error::MissingObjectKey`] when the object has no uid or namespace (not from the API).
pub fn token(c: &Cluster) -> Result<String> {
    let ns = c.namespace().ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let uid = c.uid().ok_or(Error::MissingObjectKey("metadata.uid"))?;
    Ok(format!("{ns}-{}-{uid}", c.name_any()))
}

/// `--initial-cluster` from the ordinals of the member list.
pub fn initial_cluster(cluster: &str, ns: &str, ordinals: &[u32], tls: bool) -> String {
    let mut o = ordinals.to_vec();
    o.sort_unstable();
    o.dedup();
    o.iter()
        .map(|&i| format!("{}={}", pod_name(cluster, i), peer_url(cluster, ns, i, tls)))
        .collect::<Vec<_>>()
        .join(",")
}

fn owner(c: &Cluster) -> Result<OwnerReference> {
    c.controller_owner_ref(&()).ok_or(Error::MissingObjectKey("metadata.uid"))
}

fn meta(c: &Cluster, name: String) -> Result<ObjectMeta> {
    Ok(ObjectMeta {
        name: Some(name),
        namespace: Some(c.namespace().ok_or(Error::MissingObjectKey("metadata.namespace"))?),
        labels: Some(labels(&c.name_any())),
        owner_references: Some(vec![owner(c)?]),
        ..Default::default()
    })
}

fn port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port,
        target_port: Some(IntOrString::Int(port)),
        ..Default::default()
    }
}

/// The headless peer Service: stable per-pod DNS, published before pods are ready (a
/// joining member must be reachable before it can become ready).
///
/// # Errors
/// [`Error::MissingObjectKey`] for an object not read from the API.
pub fn peer_service(c: &Cluster) -> Result<Service> {
    let name = c.name_any();
    Ok(Service {
        metadata: meta(c, peer_service_name(&name))?,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(&name)),
            ports: Some(vec![port("client", CLIENT_PORT), port("peer", PEER_PORT)]),
            ..Default::default()
        }),
        status: None,
    })
}

/// The client Service: ready members only (learners are not ready).
///
/// # Errors
/// [`Error::MissingObjectKey`] for an object not read from the API.
pub fn client_service(c: &Cluster) -> Result<Service> {
    let name = c.name_any();
    Ok(Service {
        metadata: meta(c, client_service_name(&name))?,
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(&name)),
            ports: Some(vec![port("client", CLIENT_PORT)]),
            ..Default::default()
        }),
        status: None,
    })
}

/// The members ConfigMap: `initial-cluster`, `initial-cluster-state`, `initial-cluster-token`.
///
/// # Errors
/// [`Error::MissingObjectKey`] for an object not read from the API.
pub fn config_map(c: &Cluster, initial_cluster: &str, state: &str) -> Result<ConfigMap> {
    Ok(ConfigMap {
        metadata: meta(c, config_map_name(&c.name_any()))?,
        data: Some(BTreeMap::from([
            ("initial-cluster".to_owned(), initial_cluster.to_owned()),
            ("initial-cluster-state".to_owned(), state.to_owned()),
            ("initial-cluster-token".to_owned(), token(c)?),
        ])),
        ..Default::default()
    })
}

/// The PodDisruptionBudget: `minAvailable` is the quorum of `voters` (the larger of current
/// and target voters), over pods labelled as voters.
///
/// # Errors
/// [`Error::MissingObjectKey`] for an object not read from the API.
pub fn pdb(c: &Cluster, voters: usize) -> Result<PodDisruptionBudget> {
    let name = c.name_any();
    let mut selector = selector_labels(&name);
    selector.insert(ROLE_LABEL.into(), "voter".into());
    let min = i32::try_from(quorum(voters.max(1))).unwrap_or(i32::MAX);
    Ok(PodDisruptionBudget {
        metadata: meta(c, name)?,
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(min)),
            selector: Some(LabelSelector { match_labels: Some(selector), ..Default::default() }),
            ..Default::default()
        }),
        status: None,
    })
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn env_config(name: &str, cm: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            config_map_key_ref: Some(ConfigMapKeySelector {
                name: cm.to_owned(),
                key: key.to_owned(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The ConfigMap key that, while present, makes a starting store pod restart its member
/// alone with `--force-new-cluster` (recovery from quorum loss; see `reconcile`).
pub const FORCE_KEY: &str = "force-new-cluster";

/// The store container's environment: downward API, the members ConfigMap, and with
/// `recovery.quorumLoss: FromSurvivor` or `FromBackup` the optional force flag (`ETCD_FORCE_NEW_CLUSTER`,
/// read by `cairn` like the flag; absent key, unset variable).
fn store_env(c: &Cluster, cm: &str) -> Vec<EnvVar> {
    let mut env = vec![
        env_field("POD_NAME", "metadata.name"),
        env_field("POD_NAMESPACE", "metadata.namespace"),
        env_field("POD_IP", "status.podIP"),
        env_config("INITIAL_CLUSTER", cm, "initial-cluster"),
        env_config("INITIAL_CLUSTER_STATE", cm, "initial-cluster-state"),
        env_config("INITIAL_CLUSTER_TOKEN", cm, "initial-cluster-token"),
    ];
    let recovers = c
        .spec
        .recovery
        .as_ref()
        .is_some_and(|r| r.quorum_loss != crate::crd::QuorumLossPolicy::Manual);
    if recovers {
        let mut force = env_config("ETCD_FORCE_NEW_CLUSTER", cm, FORCE_KEY);
        if let Some(r) = force.value_from.as_mut().and_then(|v| v.config_map_key_ref.as_mut()) {
            r.optional = Some(true);
        }
        env.push(force);
    }
    env
}

/// The store container's arguments, all `--flag=value`.
///
/// # Errors
/// [`Error::InvalidSpec`] when a quantity in `spec.options` cannot be parsed.
pub fn store_args(c: &Cluster) -> Result<Vec<String>> {
    let name = c.name_any();
    let peer = peer_service_name(&name);
    let host = format!("$(POD_NAME).{peer}.$(POD_NAMESPACE).svc");
    let client_tls = c.spec.client_tls().is_some();
    let peer_tls = c.spec.peer_tls().is_some();
    let (cs, ps) = (scheme(client_tls), scheme(peer_tls));
    let mut args = vec![
        "--name=$(POD_NAME)".to_owned(),
        format!("--data-dir={DATA_DIR}"),
        format!("--listen-client-urls={cs}://$(POD_IP):{CLIENT_PORT}"),
        format!("--advertise-client-urls={cs}://{host}:{CLIENT_PORT}"),
        format!("--listen-peer-urls={ps}://$(POD_IP):{PEER_PORT}"),
        format!("--initial-advertise-peer-urls={ps}://{host}:{PEER_PORT}"),
        format!("--listen-metrics-urls=http://$(POD_IP):{METRICS_PORT}"),
        "--initial-cluster=$(INITIAL_CLUSTER)".to_owned(),
        "--initial-cluster-state=$(INITIAL_CLUSTER_STATE)".to_owned(),
        "--initial-cluster-token=$(INITIAL_CLUSTER_TOKEN)".to_owned(),
    ];
    if client_tls {
        args.extend(tls_args("", CLIENT_TLS_DIR));
    }
    if peer_tls {
        args.extend(tls_args("peer-", PEER_TLS_DIR));
    }
    let o = &c.spec.options;
    if let Some(q) = &o.quota_backend_bytes {
        let bytes = quantity_bytes(q)
            .map_err(|e| Error::InvalidSpec(format!("spec.options.quotaBackendBytes: {e}")))?;
        args.push(format!("--quota-backend-bytes={bytes}"));
    }
    if let Some(n) = o.snapshot_count {
        args.push(format!("--snapshot-count={n}"));
    }
    if let Some(mode) = o.auto_compaction_mode {
        let mode = match mode {
            AutoCompactionMode::Periodic => "periodic",
            AutoCompactionMode::Revision => "revision",
        };
        args.push(format!("--auto-compaction-mode={mode}"));
    }
    if let Some(r) = &o.auto_compaction_retention {
        args.push(format!("--auto-compaction-retention={r}"));
    }
    args.extend(o.extra_args.iter().cloned());
    Ok(args)
}

/// The user and group of the store image (`Dockerfile`: distroless `nonroot`, 65532).
pub const STORE_UID: i64 = 65532;

/// The store pod's security context: non-root as the image's user, the data volume made
/// writable for its group (`fsGroup`), seccomp RuntimeDefault.
fn pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(STORE_UID),
        run_as_group: Some(STORE_UID),
        fs_group: Some(STORE_UID),
        // Re-own a volume only when its root does not match already (large data dirs).
        fs_group_change_policy: Some("OnRootMismatch".into()),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The store container's security context: read-only root file system (it writes only
/// its data volume), no privilege escalation, no capabilities.
fn container_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
        ..Default::default()
    }
}

/// etcd's TLS flags for one side (`prefix` "" for clients, "peer-" for peers) with the
/// Secret's files mounted at `dir`, certificate auth on.
fn tls_args(prefix: &str, dir: &str) -> [String; 4] {
    [
        format!("--{prefix}cert-file={dir}/tls.crt"),
        format!("--{prefix}key-file={dir}/tls.key"),
        format!("--{prefix}trusted-ca-file={dir}/ca.crt"),
        format!("--{prefix}client-cert-auth=true"),
    ]
}

/// The TLS Secrets' volumes and their read-only mounts: the client Secret (at
/// [`CLIENT_TLS_DIR`]) when client TLS is on, and with `peer` the peer Secret (at
/// [`PEER_TLS_DIR`]). Whole directories, not `subPath`s, so the kubelet's updates of a
/// rotated Secret reach the files the store re-reads.
pub fn tls_volumes(c: &Cluster, peer: bool) -> (Vec<Volume>, Vec<VolumeMount>) {
    let secrets = [
        ("tls-client", c.spec.client_tls(), CLIENT_TLS_DIR),
        ("tls-peer", c.spec.peer_tls().filter(|_| peer), PEER_TLS_DIR),
    ];
    secrets
        .into_iter()
        .filter_map(|(volume, secret, dir)| {
            let v = Volume {
                name: volume.to_owned(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secret?.to_owned()),
                    // Owner and group (fsGroup) read; the key is not world-readable.
                    default_mode: Some(0o440),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let m = VolumeMount {
                name: volume.to_owned(),
                mount_path: dir.to_owned(),
                read_only: Some(true),
                ..Default::default()
            };
            Some((v, m))
        })
        .unzip()
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("metrics".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Default::default()
    }
}

/// The StatefulSet with `replicas` pods (ordinals `0..replicas`).
///
/// # Errors
/// [`Error::InvalidSpec`] for an unparsable option, [`Error::MissingObjectKey`] for an
/// object not read from the API.
pub fn stateful_set(c: &Cluster, replicas: i32, default_repository: &str) -> Result<StatefulSet> {
    let name = c.name_any();
    let spec = &c.spec;
    let cm = config_map_name(&name);
    let (tls_volumes, tls_mounts) = tls_volumes(c, true);
    let container = Container {
        name: "cairn".into(),
        image: Some(c.image(default_repository)),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_owned()),
        command: Some(vec!["cairn".into()]),
        args: Some(store_args(c)?),
        env: Some(store_env(c, &cm)),
        ports: Some(vec![
            ContainerPort {
                name: Some("client".into()),
                container_port: CLIENT_PORT,
                ..Default::default()
            },
            ContainerPort {
                name: Some("peer".into()),
                container_port: PEER_PORT,
                ..Default::default()
            },
            ContainerPort {
                name: Some("metrics".into()),
                container_port: METRICS_PORT,
                ..Default::default()
            },
        ]),
        readiness_probe: Some(probe("/readyz", 2, 3)),
        liveness_probe: Some(Probe { initial_delay_seconds: Some(10), ..probe("/livez", 10, 6) }),
        resources: spec.resources.clone(),
        security_context: Some(container_security_context()),
        volume_mounts: Some(
            std::iter::once(VolumeMount {
                name: "data".into(),
                mount_path: DATA_MOUNT.into(),
                ..Default::default()
            })
            .chain(tls_mounts.clone())
            .collect(),
        ),
        ..Default::default()
    };
    let placement = spec.placement.clone().unwrap_or_default();
    let overrides = spec.pod_template.clone().unwrap_or_default().metadata;
    let mut pod_labels = overrides.labels;
    pod_labels.extend(selector_labels(&name));
    let empty_dir = spec.storage.empty_dir.as_ref();
    let volumes: Vec<Volume> = empty_dir
        .map(|e| Volume {
            name: "data".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: e.medium.clone(),
                size_limit: e.size_limit.clone().map(Quantity),
            }),
            ..Default::default()
        })
        .into_iter()
        .chain(tls_volumes)
        .collect();
    let volumes = (!volumes.is_empty()).then_some(volumes);
    let claims = empty_dir.is_none().then(|| {
        let size = spec.storage.size.clone().unwrap_or_else(|| DEFAULT_STORAGE_SIZE.to_owned());
        vec![PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some("data".into()),
                labels: Some(selector_labels(&name)),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: spec.storage.storage_class_name.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([("storage".to_owned(), Quantity(size))])),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            status: None,
        }]
    });
    let when_scaled = if spec.storage.retain_on_scale_down { "Retain" } else { "Delete" };
    Ok(StatefulSet {
        metadata: meta(c, name.clone())?,
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas),
            service_name: Some(peer_service_name(&name)),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&name)),
                ..Default::default()
            },
            // Membership is sequenced by the operator, one step at a time; Parallel lets a
            // failed low ordinal not block a higher one from restarting.
            pod_management_policy: Some("Parallel".into()),
            // Template changes are rolled by the operator (followers first, the leader after
            // a leadership move, each member back and caught up before the next).
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".into()),
                ..Default::default()
            }),
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some("Delete".into()),
                    when_scaled: Some(when_scaled.into()),
                },
            ),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: (!overrides.annotations.is_empty())
                        .then_some(overrides.annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes,
                    affinity: placement.affinity,
                    tolerations: (!placement.tolerations.is_empty())
                        .then_some(placement.tolerations),
                    topology_spread_constraints: (!placement
                        .topology_spread_constraints
                        .is_empty())
                    .then_some(placement.topology_spread_constraints),
                    node_selector: (!placement.node_selector.is_empty())
                        .then_some(placement.node_selector),
                    image_pull_secrets: (!spec.image_pull_secrets.is_empty())
                        .then(|| spec.image_pull_secrets.clone()),
                    termination_grace_period_seconds: Some(30),
                    security_context: Some(pod_security_context()),
                    ..Default::default()
                }),
            },
            volume_claim_templates: claims,
            ..Default::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ClusterSpec, EmptyDirSpec, PodMetadata, PodTemplateOverrides, StorageSpec};

    fn cluster(spec: ClusterSpec) -> Cluster {
        let mut c = Cluster::new("main", spec);
        c.metadata.namespace = Some("db".into());
        c.metadata.uid = Some("u-1".into());
        c
    }

    fn pod_spec(s: &StatefulSet) -> &PodSpec {
        s.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    #[test]
    fn urls_are_stable_dns_names_and_parse_back_to_ordinals() {
        assert_eq!(peer_url("main", "db", 2, false), "http://main-2.main-peer.db.svc:2380");
        assert_eq!(client_url("main", "db", 0, false), "http://main-0.main-peer.db.svc:2379");
        assert_eq!(peer_url("main", "db", 2, true), "https://main-2.main-peer.db.svc:2380");
        assert_eq!(client_url("main", "db", 0, true), "https://main-0.main-peer.db.svc:2379");
        assert_eq!(
            ordinal_of_peer_url("main", "db", "https://main-2.main-peer.db.svc:2380"),
            Some(2)
        );
        assert_eq!(
            ordinal_of_peer_url("main", "db", "http://main-2.main-peer.db.svc:2380"),
            Some(2)
        );
        assert_eq!(ordinal_of_peer_url("main", "db", "http://main-2.other-peer.db.svc:2380"), None);
        assert_eq!(ordinal_of_peer_url("main", "db", "http://mainx-2.main-peer.db.svc:2380"), None);
        assert_eq!(ordinal_of_peer_url("main", "db", "http://10.0.0.1:2380"), None);
        assert_eq!(ordinal_of_peer_url("ma", "db", "http://main-2.main-peer.db.svc:2380"), None);
    }

    #[test]
    fn initial_cluster_lists_each_ordinal_once_in_order() {
        assert_eq!(
            initial_cluster("a", "n", &[1, 0, 1], false),
            "a-0=http://a-0.a-peer.n.svc:2380,a-1=http://a-1.a-peer.n.svc:2380"
        );
        assert_eq!(initial_cluster("a", "n", &[0], true), "a-0=https://a-0.a-peer.n.svc:2380");
    }

    #[test]
    fn tls_makes_https_urls_with_cert_auth_and_mounts_the_secrets_whole() {
        use crate::crd::{SecretRef, TlsSecret, TlsSpec};
        let secret = |n: &str| Some(TlsSecret { secret_ref: SecretRef { name: n.into() } });
        let c = cluster(ClusterSpec {
            tls: Some(TlsSpec { client: secret("cli"), peer: secret("peer") }),
            ..Default::default()
        });
        let s = stateful_set(&c, 1, "cairn").unwrap();
        let container = &pod_spec(&s).containers[0];
        let args = container.args.as_ref().unwrap();
        for a in [
            "--listen-client-urls=https://$(POD_IP):2379",
            "--advertise-client-urls=https://$(POD_NAME).main-peer.$(POD_NAMESPACE).svc:2379",
            "--listen-peer-urls=https://$(POD_IP):2380",
            "--initial-advertise-peer-urls=https://$(POD_NAME).main-peer.$(POD_NAMESPACE).svc:2380",
            "--listen-metrics-urls=http://$(POD_IP):2381",
            "--cert-file=/etc/cairn/tls/client/tls.crt",
            "--key-file=/etc/cairn/tls/client/tls.key",
            "--trusted-ca-file=/etc/cairn/tls/client/ca.crt",
            "--client-cert-auth=true",
            "--peer-cert-file=/etc/cairn/tls/peer/tls.crt",
            "--peer-key-file=/etc/cairn/tls/peer/tls.key",
            "--peer-trusted-ca-file=/etc/cairn/tls/peer/ca.crt",
            "--peer-client-cert-auth=true",
        ] {
            assert!(args.contains(&a.to_owned()), "{a} not in {args:?}");
        }
        let mounts = container.volume_mounts.as_ref().unwrap();
        for (name, dir) in [("tls-client", CLIENT_TLS_DIR), ("tls-peer", PEER_TLS_DIR)] {
            let m = mounts.iter().find(|m| m.name == name).unwrap();
            assert_eq!(m.mount_path, dir);
            assert_eq!(m.read_only, Some(true));
            assert!(m.sub_path.is_none(), "a subPath mount never sees a rotated Secret");
        }
        let volumes = pod_spec(&s).volumes.as_ref().unwrap();
        let secret_of = |v: &str| {
            volumes
                .iter()
                .find(|x| x.name == v)
                .unwrap()
                .secret
                .as_ref()
                .unwrap()
                .secret_name
                .clone()
        };
        assert_eq!(secret_of("tls-client").as_deref(), Some("cli"));
        assert_eq!(secret_of("tls-peer").as_deref(), Some("peer"));
        // Probes do not need a client certificate: the plain metrics listener serves them.
        let probe_port =
            |p: &Option<Probe>| p.as_ref().unwrap().http_get.as_ref().unwrap().port.clone();
        assert_eq!(probe_port(&container.readiness_probe), IntOrString::String("metrics".into()));
        assert_eq!(probe_port(&container.liveness_probe), IntOrString::String("metrics".into()));
        // Without TLS: plain URLs, no TLS flags or volumes.
        let plain = stateful_set(&cluster(ClusterSpec::default()), 1, "cairn").unwrap();
        let args = pod_spec(&plain).containers[0].args.clone().unwrap();
        assert!(!args.iter().any(|a| a.contains("https") || a.contains("cert")), "{args:?}");
        assert!(pod_spec(&plain).volumes.is_none());
    }

    #[test]
    fn token_is_per_incarnation() {
        let a = cluster(ClusterSpec::default());
        let mut b = a.clone();
        b.metadata.uid = Some("u-2".into());
        assert_eq!(token(&a).unwrap(), "db-main-u-1");
        assert_ne!(token(&a).unwrap(), token(&b).unwrap());
        let mut no_uid = a.clone();
        no_uid.metadata.uid = None;
        assert!(matches!(token(&no_uid), Err(Error::MissingObjectKey(_))));
    }

    #[test]
    fn store_pods_run_non_root_with_a_read_only_root_and_a_group_writable_volume() {
        let s = stateful_set(&cluster(ClusterSpec::default()), 1, "cairn").unwrap();
        let pod = pod_spec(&s).security_context.as_ref().unwrap();
        assert_eq!(pod.run_as_non_root, Some(true));
        assert_eq!(pod.run_as_user, Some(STORE_UID));
        assert_eq!(pod.fs_group, Some(STORE_UID));
        assert_eq!(pod.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        let c = pod_spec(&s).containers[0].security_context.as_ref().unwrap();
        assert_eq!(c.read_only_root_filesystem, Some(true));
        assert_eq!(c.allow_privilege_escalation, Some(false));
        assert_eq!(c.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_owned()][..]));
    }

    #[test]
    fn stateful_set_follows_the_bed_contract() {
        let s =
            stateful_set(&cluster(ClusterSpec { replicas: 3, ..Default::default() }), 2, "cairn")
                .unwrap();
        let spec = s.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(2));
        assert_eq!(spec.service_name.as_deref(), Some("main-peer"));
        let labels = spec.template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
        assert_eq!(labels["app.kubernetes.io/name"], "cairn");
        assert_eq!(labels["app.kubernetes.io/instance"], "main");
        let c = &pod_spec(&s).containers[0];
        assert_eq!(c.name, "cairn");
        assert_eq!(c.image.as_deref(), Some("cairn:latest"));
        assert_eq!(c.command.as_deref(), Some(&["cairn".to_owned()][..]));
        let args = c.args.as_ref().unwrap();
        assert!(args.iter().all(|a| a.starts_with("--") && a.contains('=')), "{args:?}");
        assert!(args.contains(&"--listen-client-urls=http://$(POD_IP):2379".to_owned()));
        assert!(args.contains(&"--initial-advertise-peer-urls=http://$(POD_NAME).main-peer.$(POD_NAMESPACE).svc:2380".to_owned()));
        assert!(args.contains(&"--initial-cluster-state=$(INITIAL_CLUSTER_STATE)".to_owned()));
        assert!(args.contains(&"--data-dir=/var/lib/cairn/data".to_owned()));
        let env: Vec<&str> = c.env.as_ref().unwrap().iter().map(|e| e.name.as_str()).collect();
        for v in [
            "POD_NAME",
            "POD_NAMESPACE",
            "POD_IP",
            "INITIAL_CLUSTER",
            "INITIAL_CLUSTER_STATE",
            "INITIAL_CLUSTER_TOKEN",
        ] {
            assert!(env.contains(&v), "{v}");
        }
        assert_eq!(
            c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(),
            Some("/readyz")
        );
        assert_eq!(
            c.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(),
            Some("/livez")
        );
        assert_eq!(c.volume_mounts.as_ref().unwrap()[0].mount_path, "/var/lib/cairn");
        let claim = &spec.volume_claim_templates.as_ref().unwrap()[0];
        assert_eq!(claim.metadata.name.as_deref(), Some("data"));
        let size = &claim
            .spec
            .as_ref()
            .unwrap()
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()["storage"];
        assert_eq!(size.0, "8Gi");
        let policy = spec.persistent_volume_claim_retention_policy.as_ref().unwrap();
        assert_eq!(policy.when_scaled.as_deref(), Some("Delete"));
        let owner = &s.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.controller), ("Cluster", Some(true)));
    }

    #[test]
    fn empty_dir_storage_replaces_the_claim_template() {
        let spec = ClusterSpec {
            storage: StorageSpec { empty_dir: Some(EmptyDirSpec::default()), ..Default::default() },
            ..Default::default()
        };
        let s = stateful_set(&cluster(spec), 1, "cairn").unwrap();
        assert!(s.spec.as_ref().unwrap().volume_claim_templates.is_none());
        assert!(pod_spec(&s).volumes.as_ref().unwrap()[0].empty_dir.is_some());
    }

    #[test]
    fn options_become_flags_and_overrides_cannot_steal_selector_labels() {
        let mut spec = ClusterSpec::default();
        spec.options.quota_backend_bytes = Some("2Gi".into());
        spec.options.snapshot_count = Some(5000);
        spec.options.auto_compaction_mode = Some(AutoCompactionMode::Revision);
        spec.options.auto_compaction_retention = Some("1000".into());
        spec.options.extra_args = vec!["--log-level=debug".into()];
        spec.storage.retain_on_scale_down = true;
        spec.version = Some("0.2.0".into());
        spec.pod_template = Some(PodTemplateOverrides {
            metadata: PodMetadata {
                labels: BTreeMap::from([
                    ("team".to_owned(), "db".to_owned()),
                    ("app.kubernetes.io/instance".to_owned(), "evil".to_owned()),
                ]),
                annotations: BTreeMap::from([("a".to_owned(), "b".to_owned())]),
            },
        });
        let c = cluster(spec);
        let args = store_args(&c).unwrap();
        for f in [
            "--quota-backend-bytes=2147483648",
            "--snapshot-count=5000",
            "--auto-compaction-mode=revision",
            "--auto-compaction-retention=1000",
            "--log-level=debug",
        ] {
            assert!(args.contains(&f.to_owned()), "{f}");
        }
        let s = stateful_set(&c, 3, "reg/cairn").unwrap();
        let spec = s.spec.as_ref().unwrap();
        let meta = spec.template.metadata.as_ref().unwrap();
        assert_eq!(meta.labels.as_ref().unwrap()["app.kubernetes.io/instance"], "main");
        assert_eq!(meta.labels.as_ref().unwrap()["team"], "db");
        assert_eq!(meta.annotations.as_ref().unwrap()["a"], "b");
        assert_eq!(pod_spec(&s).containers[0].image.as_deref(), Some("reg/cairn:0.2.0"));
        assert_eq!(
            spec.persistent_volume_claim_retention_policy.as_ref().unwrap().when_scaled.as_deref(),
            Some("Retain")
        );
    }

    #[test]
    fn services_are_headless_for_peers_and_plain_for_clients() {
        let c = cluster(ClusterSpec::default());
        let peer = peer_service(&c).unwrap();
        let ps = peer.spec.as_ref().unwrap();
        assert_eq!(peer.metadata.name.as_deref(), Some("main-peer"));
        assert_eq!(ps.cluster_ip.as_deref(), Some("None"));
        assert_eq!(ps.publish_not_ready_addresses, Some(true));
        assert_eq!(ps.ports.as_ref().unwrap().len(), 2);
        let client = client_service(&c).unwrap();
        assert_eq!(client.metadata.name.as_deref(), Some("main-client"));
        assert_eq!(client.spec.as_ref().unwrap().cluster_ip, None);
    }

    #[test]
    fn pdb_keeps_quorum_over_voters() {
        let c = cluster(ClusterSpec::default());
        for (voters, min) in [(0, 1), (1, 1), (3, 2), (5, 3)] {
            let p = pdb(&c, voters).unwrap();
            let spec = p.spec.as_ref().unwrap();
            assert_eq!(spec.min_available, Some(IntOrString::Int(min)), "{voters}");
            assert_eq!(
                spec.selector.as_ref().unwrap().match_labels.as_ref().unwrap()[ROLE_LABEL],
                "voter"
            );
        }
    }

    #[test]
    fn config_map_carries_the_bootstrap_flags() {
        let c = cluster(ClusterSpec::default());
        let cm = config_map(&c, "main-0=http://x:2380", "new").unwrap();
        let d = cm.data.as_ref().unwrap();
        assert_eq!(cm.metadata.name.as_deref(), Some("main-members"));
        assert_eq!(d["initial-cluster"], "main-0=http://x:2380");
        assert_eq!(d["initial-cluster-state"], "new");
        assert_eq!(d["initial-cluster-token"], "db-main-u-1");
    }

    #[test]
    fn a_bad_quota_is_a_clear_spec_error() {
        let mut spec = ClusterSpec::default();
        spec.options.quota_backend_bytes = Some("lots".into());
        let err = store_args(&cluster(spec)).unwrap_err();
        assert!(err.to_string().contains("spec.options.quotaBackendBytes"), "{err}");
    }
}
