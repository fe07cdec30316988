//! The `Cluster` and `Backup` resources (`cairn.dev/v1alpha1`): spec, status and the schema
//! rules the API server enforces (ranges, enums, defaults, CEL `x-kubernetes-validations`).
//!
//! The schema is generated from these types by schemars; `crds/` holds the YAML (`crdgen`).
//! This module knows nothing of reconciling: it only says what a user may write.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every Cairn resource.
pub const GROUP: &str = "cairn.dev";
/// The largest `spec.replicas` accepted (a bigger raft group only slows commits).
pub const MAX_REPLICAS: i32 = 9;
/// The image repository used when `spec.image` is not given.
pub const DEFAULT_IMAGE_REPOSITORY: &str = "cairn";

/// Flags the operator computes itself; `spec.options.extraArgs` must not set them.
pub const MANAGED_FLAGS: &[&str] = &[
    "name",
    "data-dir",
    "listen-client-urls",
    "advertise-client-urls",
    "listen-peer-urls",
    "initial-advertise-peer-urls",
    "initial-cluster",
    "initial-cluster-state",
    "initial-cluster-token",
    "quota-backend-bytes",
    "snapshot-count",
    "auto-compaction-mode",
    "auto-compaction-retention",
    "listen-metrics-urls",
    "cert-file",
    "key-file",
    "trusted-ca-file",
    "client-cert-auth",
    "peer-cert-file",
    "peer-key-file",
    "peer-trusted-ca-file",
    "peer-client-cert-auth",
];

/// A Go duration as etcd and Kubernetes write them (`90s`, `1h30m`, `500ms`).
const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";
/// A Kubernetes quantity (`8Gi`, `500M`, `1073741824`).
const QUANTITY_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$";
/// A five-field cron schedule (UTC), one of the `@` shorthands, or `@every <duration>`.
const SCHEDULE_PATTERN: &str = r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|@every ([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+|(\S+\s+){4}\S+)$";

/// The desired state of one Cairn cluster.
// kube's `printcolumn(...)` entries repeat `type_ = "string"`; clippy reads them as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "cairn.dev",
    version = "v1alpha1",
    kind = "Cluster",
    namespaced,
    shortname = "cc",
    status = "ClusterStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "A Cairn (etcd-compatible) cluster run by cairn-operator.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.readyReplicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.ready"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Members", type_ = "integer", json_path = ".status.memberCount"),
    printcolumn(name = "Leader", type_ = "string", json_path = ".status.leader"),
    printcolumn(name = "Version", type_ = "string", json_path = ".status.version"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!(has(self.image) && has(self.version))",
     "message": "set spec.image or spec.version, not both"},
    {"rule": "has(self.bootstrap) == has(oldSelf.bootstrap) && (!has(self.bootstrap) || self.bootstrap == oldSelf.bootstrap)",
     "message": "spec.bootstrap is immutable: it only applies when the cluster is created"},
    {"rule": "has(self.storage.emptyDir) == has(oldSelf.storage.emptyDir)",
     "message": "spec.storage cannot switch between a volume claim and emptyDir"},
    {"rule": "has(self.tls) == has(oldSelf.tls) && (!has(self.tls) || self.tls == oldSelf.tls)",
     "message": "spec.tls is immutable: set it when the cluster is created; rotate certificates by updating the Secrets"}
]))]
pub struct ClusterSpec {
    /// Number of members (0..9); 1, 3 or 5 are recommended, an even size gets a warning Event.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 9))]
    pub replicas: i32,

    /// Full image reference of the store (for example `registry.example/cairn:0.2.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,

    /// Store version, resolved as `<operator default repository>:<version>` when `image` is unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^v?[0-9]+\.[0-9]+\.[0-9]+([-+][0-9A-Za-z.-]+)?$"))]
    pub version: Option<String>,

    /// Image pull policy of the store container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,

    /// Pull secrets for the store image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,

    /// Where members keep their data.
    #[serde(default)]
    pub storage: StorageSpec,

    /// CPU and memory of the store container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Scheduling constraints of the store pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,

    /// Labels and annotations merged over the generated pod template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<PodTemplateOverrides>,

    /// Store flags the operator passes through.
    #[serde(default)]
    pub options: StoreOptions,

    /// Scheduled compaction: record the revision every tick, compact to the one recorded a
    /// retention earlier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compaction: Option<CompactionSpec>,

    /// Defragmentation, one member at a time, followers first and the leader last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defrag: Option<DefragSpec>,

    /// Scheduled backups (day two; accepted and validated now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSchedule>,

    /// How the cluster is created (restore from a backup); immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<BootstrapSpec>,

    /// What to do when quorum is lost (day two; accepted and validated now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<RecoverySpec>,

    /// Client and peer TLS from Secrets; immutable (certificates rotate by updating the
    /// Secrets in place).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,

    /// Stops every action of the operator on this cluster (status is still reported).
    #[serde(default)]
    pub paused: bool,
}

fn default_replicas() -> i32 {
    3
}

/// Kubernetes image pull policies.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    /// Always pull.
    Always,
    /// Pull when absent on the node.
    IfNotPresent,
    /// Never pull.
    Never,
}

impl PullPolicy {
    /// The policy's name as the pod spec writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// Data volumes: a claim per member (the default) or an `emptyDir` (data lost with the pod).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!(has(self.emptyDir) && (has(self.size) || has(self.storageClassName)))",
     "message": "storage.emptyDir excludes storage.size and storage.storageClassName"},
    {"rule": "(has(self.storageClassName) ? self.storageClassName : '') == (has(oldSelf.storageClassName) ? oldSelf.storageClassName : '')",
     "message": "storage.storageClassName is immutable"},
    {"rule": "!has(oldSelf.size) || (has(self.size) && quantity(self.size).compareTo(quantity(oldSelf.size)) >= 0)",
     "message": "storage.size cannot shrink"}
]))]
pub struct StorageSpec {
    /// Size of each member's claim (default 8Gi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = QUANTITY_PATTERN))]
    pub size: Option<String>,

    /// Storage class of the claims; immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,

    /// Keeps a removed member's claim after scale-down (default: delete it).
    #[serde(default)]
    pub retain_on_scale_down: bool,

    /// Use an `emptyDir` instead of claims (for tests; a restarted pod loses its data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_dir: Option<EmptyDirSpec>,
}

/// An `emptyDir` data volume.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EmptyDirSpec {
    /// `Memory` for a tmpfs, empty for the node's disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(Memory)?$"))]
    pub medium: Option<String>,
    /// Limit of the volume's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = QUANTITY_PATTERN))]
    pub size_limit: Option<String>,
}

/// Pod scheduling constraints, copied into the pod template.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Node and pod (anti-)affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Tolerations of node taints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Spread over zones or nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    /// Node labels a member's node must carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
}

/// Pod template fields merged over the generated ones (the generated selector labels win).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplateOverrides {
    /// Extra pod metadata.
    #[serde(default)]
    pub metadata: PodMetadata,
}

/// Labels and annotations for the store pods.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodMetadata {
    /// Extra labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Store flags set from the spec.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoreOptions {
    /// `--quota-backend-bytes` as a quantity (`8Gi`); unset keeps the store's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = QUANTITY_PATTERN))]
    pub quota_backend_bytes: Option<String>,

    /// `--snapshot-count`: applied entries between raft snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub snapshot_count: Option<i64>,

    /// `--auto-compaction-mode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_compaction_mode: Option<AutoCompactionMode>,

    /// `--auto-compaction-retention` (`1h` for periodic, a revision count for revision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+|([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+)$"))]
    pub auto_compaction_retention: Option<String>,

    /// More store flags, each `--flag=value`; flags the operator manages are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self.all(a, a.startsWith('--'))",
         "message": "options.extraArgs entries must be --flag or --flag=value"},
        {"rule": "self.all(a, !a.matches('^--(name|data-dir|listen-client-urls|advertise-client-urls|listen-peer-urls|initial-advertise-peer-urls|initial-cluster|initial-cluster-state|initial-cluster-token|quota-backend-bytes|snapshot-count|auto-compaction-mode|auto-compaction-retention|listen-metrics-urls|cert-file|key-file|trusted-ca-file|client-cert-auth|peer-cert-file|peer-key-file|peer-trusted-ca-file|peer-client-cert-auth|force-new-cluster)(=.*)?$'))",
         "message": "options.extraArgs must not set a flag the operator manages (name, data-dir, URLs, initial-cluster*, quota, snapshot-count, auto-compaction, TLS files); use the spec fields"}
    ]))]
    #[schemars(length(max = 32), inner(length(max = 256)))]
    pub extra_args: Vec<String>,
}

/// The store's `--auto-compaction-mode` values.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AutoCompactionMode {
    /// Keep a time window of history.
    Periodic,
    /// Keep a number of revisions.
    Revision,
}

/// Scheduled compaction: every tick, compact to the revision recorded one retention ago.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompactionSpec {
    /// Cron schedule of the compaction ticks.
    #[schemars(regex(pattern = SCHEDULE_PATTERN))]
    pub schedule: String,
    /// How much history to keep.
    pub retain: Retention,
}

/// How much history a compaction keeps: a duration or a number of revisions.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.duration) != has(self.revisions)",
     "message": "compaction.retain needs exactly one of duration or revisions"}
]))]
pub struct Retention {
    /// Keep this much time of history (a Go duration such as `1h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub duration: Option<String>,
    /// Keep this many revisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub revisions: Option<i64>,
}

/// Scheduled, sequenced defragmentation.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.schedule) || has(self.minFreeRatio)",
     "message": "defrag needs a schedule, a minFreeRatio, or both"}
]))]
pub struct DefragSpec {
    /// Cron schedule of defragmentation runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = SCHEDULE_PATTERN))]
    pub schedule: Option<String>,
    /// Defragment when at least this share of the database file is free (0..1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_free_ratio: Option<f64>,
}

/// Scheduled backups and their retention.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSchedule {
    /// Cron schedule of backups.
    #[schemars(regex(pattern = SCHEDULE_PATTERN))]
    pub schedule: String,
    /// Which backups to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<BackupRetention>,
    /// Where backups go.
    pub destination: BackupDestination,
}

/// Backup retention: by count, by age, or both (a backup goes when either says so).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.count) || has(self.maxAge)", "message": "backup.keep needs count, maxAge, or both"}
]))]
pub struct BackupRetention {
    /// Keep at most this many successful backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub count: Option<i32>,
    /// Delete backups older than this (a Go duration such as `168h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub max_age: Option<String>,
}

/// A backup destination: exactly one of a PVC or an S3-compatible bucket.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.pvc) != has(self.s3)", "message": "a backup destination needs exactly one of pvc or s3"}
]))]
pub struct BackupDestination {
    /// A PersistentVolumeClaim in the Cluster's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcDestination>,
    /// An S3-compatible bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Destination>,
}

/// Backups written into a claim.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PvcDestination {
    /// Name of the claim.
    #[schemars(length(min = 1))]
    pub claim_name: String,
    /// Directory inside the claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_path: Option<String>,
}

/// Backups uploaded to an S3-compatible bucket.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Destination {
    /// Endpoint URL (`https://s3.example:9000`); unset means AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub endpoint: Option<String>,
    /// Bucket name.
    #[schemars(length(min = 3, max = 63))]
    pub bucket: String,
    /// Key prefix of every object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Secret with `accessKeyId` and `secretAccessKey`.
    pub credentials_secret_ref: LocalObjectReference,
    /// Path-style addressing (MinIO and most self-hosted servers need it).
    #[serde(default)]
    pub force_path_style: bool,
}

/// How the cluster is created.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapSpec {
    /// Restore the first member from a backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_backup: Option<FromBackup>,
}

/// The backup a new cluster starts from: a `Backup` object or a location with its checksum.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.name) != has(self.location)",
     "message": "bootstrap.fromBackup needs exactly one of name or location"},
    {"rule": "!has(self.location) || has(self.checksum)",
     "message": "bootstrap.fromBackup.location needs a checksum"}
]))]
pub struct FromBackup {
    /// Name of a `Backup` in the Cluster's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Location of a snapshot (`pvc://claim/path` or `s3://bucket/key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// `sha256:<hex>` of the snapshot at `location`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^sha256:[0-9a-f]{64}$"))]
    pub checksum: Option<String>,
    /// Destination holding `location` (credentials for S3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<BackupDestination>,
}

/// Client and peer TLS of the members.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.client) || has(self.peer)", "message": "spec.tls needs client, peer or both"}
]))]
pub struct TlsSpec {
    /// Client TLS: https client URLs with `--client-cert-auth`; clients (the operator and
    /// backup Jobs included) present a certificate the Secret's `ca.crt` signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<TlsSecret>,
    /// Peer TLS: https peer URLs with `--peer-client-cert-auth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<TlsSecret>,
}

/// A Secret holding `tls.crt`, `tls.key` and `ca.crt` (the `kubernetes.io/tls` shape
/// cert-manager writes).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSecret {
    /// The Secret, in the Cluster's namespace.
    pub secret_ref: SecretRef,
}

/// A Secret in the Cluster's namespace, by name.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

impl ClusterSpec {
    /// The client TLS Secret's name, when client TLS is on.
    pub fn client_tls(&self) -> Option<&str> {
        self.tls.as_ref()?.client.as_ref().map(|t| t.secret_ref.name.as_str())
    }

    /// The peer TLS Secret's name, when peer TLS is on.
    pub fn peer_tls(&self) -> Option<&str> {
        self.tls.as_ref()?.peer.as_ref().map(|t| t.secret_ref.name.as_str())
    }
}

/// Quorum-loss handling.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecoverySpec {
    /// What to do when a majority of members is gone longer than `window`.
    #[serde(default)]
    pub quorum_loss: QuorumLossPolicy,
    /// How long quorum must be lost before recovery starts (default 5m).
    #[serde(default = "default_recovery_window")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub window: String,
}

fn default_recovery_window() -> String {
    "5m".to_owned()
}

/// Quorum-loss policies.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum QuorumLossPolicy {
    /// Only report (a condition and an Event).
    #[default]
    Manual,
    /// Restart the most caught-up survivor as a one-member cluster, then grow back.
    FromSurvivor,
    /// As `FromSurvivor` while a member answers with data; when none does, rebuild the
    /// cluster from the newest good backup (writes after it are lost).
    FromBackup,
}

/// The observed state of a Cluster, written by the operator only.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// A one-word summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Available, Progressing, Degraded (and BackupHealthy once backups run).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Members in the store's member list.
    #[serde(default)]
    pub replicas: i32,
    /// Members that are healthy voters or caught-up learners, with a Ready pod.
    #[serde(default)]
    pub ready_replicas: i32,
    /// `ready/desired`, for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// Number of members (voters and learners) in the member list.
    #[serde(default)]
    pub member_count: i32,
    /// Label selector of the store pods (the scale subresource's `labelSelectorPath`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// The store's cluster id (hex) once the seed has formed the cluster.
    #[serde(default, rename = "clusterID", skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    /// Name of the leading member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// The store version members report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// One entry per member in the store's member list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberStatus>,
    /// The locked membership change in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    /// The last scheduled compaction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_compaction: Option<LastCompaction>,
    /// The scheduled compactor's memory: its last tick and the revisions it recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compaction: Option<CompactionState>,
    /// Since when a quorum of voters has not answered (RFC 3339), while it lasts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum_lost_since: Option<String>,
    /// A recovery from quorum loss in progress (`recovery.quorumLoss: FromSurvivor` or
    /// `FromBackup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<RecoveryProgress>,
    /// Defragmentation: the run in progress and each member's last defragmentation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defrag: Option<DefragState>,
    /// The last successful backup (day two).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<LastBackup>,
    /// The image every member runs (set when a roll completes; upgrades are checked
    /// against it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_image: Option<String>,
    /// A rolling restart in progress (image, version or pod template change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
}

/// A rolling restart of the members, one at a time (see `controller::upgrade`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// The image being rolled out.
    pub image: String,
    /// The StatefulSet revision being rolled out.
    pub revision: String,
    /// When the roll started (RFC 3339).
    pub since: String,
    /// The member restarted last, until it is back, healthy and caught up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// When that member was restarted (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarted_at: Option<String>,
    /// Members restarted and back so far, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub done: Vec<String>,
    /// Why the roll stopped (a member did not come back healthy in time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled: Option<String>,
}

/// One-word cluster phases.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// The seed has not formed the cluster yet.
    Creating,
    /// Membership matches the spec and every member is healthy.
    Running,
    /// A membership change is in flight.
    Scaling,
    /// The cluster is being restored from a backup.
    Restoring,
    /// A member is unhealthy or a step failed.
    Degraded,
    /// `spec.paused` is set.
    Paused,
}

/// A status condition (the shape of `metav1.Condition`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Available, Progressing, Degraded or BackupHealthy.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase reason.
    pub reason: String,
    /// What happened and, for failures, what the user must fix.
    pub message: String,
    /// The generation the condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
}

/// One member as the store reports it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// Member (and pod) name.
    pub name: String,
    /// Member id in hex, as etcdctl prints it.
    pub id: String,
    /// First advertised client URL.
    #[serde(default, rename = "clientURL", skip_serializing_if = "Option::is_none")]
    pub client_url: Option<String>,
    /// A non-voting learner.
    #[serde(default)]
    pub learner: bool,
    /// The current raft leader.
    #[serde(default)]
    pub leader: bool,
    /// Answered Status within the timeout.
    #[serde(default)]
    pub healthy: bool,
    /// Raft applied index from Status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_index: Option<u64>,
    /// Current revision from the Status header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
    /// When it stopped answering (RFC 3339), while it does not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_since: Option<String>,
}

/// The locked membership change: spec edits wait until it is done or its deadline passes.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// The member count the change moves to.
    pub replicas: i32,
    /// When the change started (RFC 3339).
    pub since: String,
    /// When the change is declared stuck (RFC 3339).
    pub deadline: String,
    /// Name of a member being replaced, if this change is a replacement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replacing: Option<String>,
    /// The member id (hex) that the replacement removes; the new member gets another.
    #[serde(default, rename = "replacingID", skip_serializing_if = "Option::is_none")]
    pub replacing_id: Option<String>,
}

/// The last compaction.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastCompaction {
    /// When it ran (RFC 3339).
    pub time: String,
    /// The revision compacted to.
    pub revision: i64,
}

/// What the scheduled compactor remembers between passes (kept in status, so an operator
/// restart or a new leader continues where the last one stopped).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompactionState {
    /// The last schedule tick (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_tick: Option<String>,
    /// Revisions recorded at ticks, oldest first (duration retention only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<RevisionSample>,
}

/// A recovery from quorum loss: the survivor restarts alone with `--force-new-cluster`, or
/// (`FromBackup`, no survivor) the cluster is rebuilt from a backup.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryProgress {
    /// The member (pod) recovered from: the answering voter with the highest applied index
    /// (empty when rebuilding from a backup).
    #[serde(default)]
    pub survivor: String,
    /// Its member id (hex).
    #[serde(default, rename = "survivorID")]
    pub survivor_id: String,
    /// The Backup the cluster is rebuilt from (`quorumLoss: FromBackup` when no member
    /// answers with data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_backup: Option<String>,
    /// When the recovery started (RFC 3339).
    pub since: String,
    /// When the force flag was published (RFC 3339); the survivor restarts after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forced_at: Option<String>,
    /// When the survivor was found alone (RFC 3339); the flag is withdrawn, then the other
    /// pods restart empty and join as learners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled_at: Option<String>,
}

/// What the defragmenter remembers between passes.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DefragState {
    /// When the last run started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_tick: Option<String>,
    /// The run in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<DefragRun>,
    /// Each member's last defragmentation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberDefrag>,
}

/// A defragmentation run: members one at a time, followers first, the leader last.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DefragRun {
    /// When it started (RFC 3339).
    pub started: String,
    /// Members done so far, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub done: Vec<String>,
}

/// One member's last defragmentation.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberDefrag {
    /// Member (pod) name.
    pub name: String,
    /// When it finished (RFC 3339).
    pub time: String,
    /// It led the cluster then.
    #[serde(default)]
    pub leader: bool,
    /// Database size before, in bytes.
    #[serde(default)]
    pub size_before: i64,
}

/// The store's revision at one moment.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionSample {
    /// When it was read (RFC 3339).
    pub time: String,
    /// The revision then.
    pub revision: i64,
}

/// The last successful backup (day two).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastBackup {
    /// Name of the `Backup` object.
    pub name: String,
    /// When it completed (RFC 3339).
    pub time: String,
    /// The store revision it holds.
    pub revision: i64,
    /// Snapshot size in bytes.
    pub size: i64,
    /// `sha256:<hex>`.
    pub checksum: String,
}

/// A one-shot backup of a Cluster (scheduled backups create these too).
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "cairn.dev",
    version = "v1alpha1",
    kind = "Backup",
    namespaced,
    status = "BackupStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "A one-shot backup of a Cairn Cluster.",
    printcolumn(name = "Cluster", type_ = "string", json_path = ".spec.clusterName"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Revision", type_ = "integer", json_path = ".status.revision"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self == oldSelf", "message": "a Backup's spec is immutable"}
]))]
pub struct BackupSpec {
    /// The Cluster (same namespace) to back up.
    #[schemars(length(min = 1))]
    pub cluster_name: String,
    /// Where to write it; unset uses the Cluster's `spec.backup.destination`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<BackupDestination>,
}

/// Progress and result of a backup.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    /// Pending, Running, Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<BackupPhase>,
    /// Where the snapshot was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Snapshot size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<i64>,
    /// The store revision it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
    /// `sha256:<hex>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// Start (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// End (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Backup phases.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum BackupPhase {
    /// Created, not started.
    Pending,
    /// The Job runs.
    Running,
    /// Written and verified.
    Succeeded,
    /// Failed; `reason` says why.
    Failed,
}

impl Cluster {
    /// The image the store pods run: `spec.image`, else `<repository>:<version or latest>`.
    pub fn image(&self, default_repository: &str) -> String {
        match (&self.spec.image, &self.spec.version) {
            (Some(image), _) => image.clone(),
            (None, Some(v)) => format!("{default_repository}:{}", v.trim_start_matches('v')),
            (None, None) => format!("{default_repository}:latest"),
        }
    }
}

/// Parses a Kubernetes quantity (`8Gi`, `500M`, `1024`) into bytes.
///
/// # Errors
/// Returns the offending text when it is not a whole, non-negative quantity.
pub fn quantity_bytes(q: &str) -> Result<u64, String> {
    let bad = || format!("{q:?} is not a quantity such as 8Gi or 500M");
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (digits, suffix) = q.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let mult: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn quantities_parse_with_binary_and_decimal_suffixes() {
        assert_eq!(quantity_bytes("8Gi"), Ok(8 << 30));
        assert_eq!(quantity_bytes("500M"), Ok(500_000_000));
        assert_eq!(quantity_bytes("1024"), Ok(1024));
        assert!(quantity_bytes("1.5Gi").is_err());
        assert!(quantity_bytes("8Gb").is_err());
        assert!(quantity_bytes("").is_err());
        assert!(quantity_bytes("99999999999Ei").is_err());
    }

    #[test]
    fn image_comes_from_image_or_version_or_latest() {
        let mut c = Cluster::new("a", ClusterSpec::default());
        assert_eq!(c.image("cairn"), "cairn:latest");
        c.spec.version = Some("v0.2.0".into());
        assert_eq!(c.image("reg/cairn"), "reg/cairn:0.2.0");
        c.spec.image = Some("x/cairn:dev".into());
        assert_eq!(c.image("cairn"), "x/cairn:dev");
    }

    #[test]
    fn schema_patterns_match_their_documented_constants() {
        let yaml = serde_json::to_string(&Cluster::crd()).unwrap();
        for p in [DURATION_PATTERN, QUANTITY_PATTERN, SCHEDULE_PATTERN] {
            let escaped = serde_json::to_string(p).unwrap();
            assert!(yaml.contains(escaped.trim_matches('"')), "pattern {p} missing");
        }
    }

    #[test]
    fn crd_has_scale_status_short_name_and_printer_columns() {
        let crd = serde_json::to_value(Cluster::crd()).unwrap();
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "cc");
        let v = &crd["spec"]["versions"][0];
        assert_eq!(v["subresources"]["scale"]["specReplicasPath"], ".spec.replicas");
        assert_eq!(v["subresources"]["scale"]["labelSelectorPath"], ".status.selector");
        assert!(v["subresources"]["status"].is_object());
        let cols: Vec<&str> = v["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(cols, ["Ready", "Phase", "Members", "Leader", "Version", "Age"]);
        let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["properties"]["replicas"]["maximum"], MAX_REPLICAS as f64);
        assert_eq!(spec["properties"]["replicas"]["default"], 3);
    }

    #[test]
    fn extra_args_rule_names_every_managed_flag() {
        let crd = serde_json::to_string(&Cluster::crd()).unwrap();
        for f in MANAGED_FLAGS {
            assert!(crd.contains(&format!("|{f}|")) || crd.contains(&format!("({f}|")), "{f}");
        }
    }
}
