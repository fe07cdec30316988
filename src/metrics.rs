//! Prometheus metrics with etcd's names, labels, types and buckets, so that etcd's mixin
//! alerts and dashboards work against Cairn unchanged (ETCD-COMPAT.md §5). docs/metrics.md
//! lists every metric and what it measures.
//!
//! # One process-wide registry
//!
//! This module owns the only registry: [`install`] builds it once at startup (from `main`)
//! and [`get`] hands out the typed handles. Measurement points call
//! `if let Some(m) = metrics::get() { ... }`. The alternative, a `Metrics` handle passed
//! down, would widen the constructors of the raft log, the WAL, the storage engine and
//! apply only to carry an object that is per-process anyway: one `cairn` process is one
//! member, `process_*` metrics are process facts, and the scrape endpoint serves one
//! registry. Unlike etcd's package-level `init()` globals, the registry lives in this one
//! file, is created explicitly, and is absent (so nothing is recorded) until installed, so
//! unit tests, benches and tools never pay for or pollute it. Tests of this module build
//! their own [`Metrics`] with [`Metrics::new`].
//!
//! This module is a leaf: it knows nothing of raft, storage, tonic or etcd messages.

use std::sync::{OnceLock, RwLock};
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    Encoder as _, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The content type of [`Metrics::render`]'s output (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Errors building the registry (a bad name, label or bucket: a programming error that the
/// unit tests catch) or encoding it.
pub type Error = prometheus::Error;

/// How much etcd's `--metrics` flag asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Level {
    /// etcd's default: no gRPC latency histogram.
    #[default]
    Basic,
    /// Adds `grpc_server_handling_seconds` (etcd registers it only then).
    Extensive,
}

/// The kind of a gRPC method, as go-grpc-prometheus labels it in `grpc_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GrpcType {
    /// One request, one response.
    Unary,
    /// A stream of requests, one response.
    ClientStream,
    /// One request, a stream of responses.
    ServerStream,
    /// Streams both ways.
    BidiStream,
}

impl GrpcType {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            GrpcType::Unary => "unary",
            GrpcType::ClientStream => "client_stream",
            GrpcType::ServerStream => "server_stream",
            GrpcType::BidiStream => "bidi_stream",
        }
    }
}

/// Every method of etcd's gRPC services with its kind: the `grpc_method` label values that
/// are initialised at zero when a service is registered (go-grpc-prometheus
/// `InitializeMetrics` does the same from the server's service info).
pub const GRPC_METHODS: &[(&str, &[(&str, GrpcType)])] = {
    use GrpcType::{BidiStream as B, ServerStream as S, Unary as U};
    &[
        (
            "etcdserverpb.KV",
            &[
                ("Range", U),
                ("RangeStream", S),
                ("Put", U),
                ("DeleteRange", U),
                ("Txn", U),
                ("Compact", U),
            ],
        ),
        ("etcdserverpb.Watch", &[("Watch", B)]),
        (
            "etcdserverpb.Lease",
            &[
                ("LeaseGrant", U),
                ("LeaseRevoke", U),
                ("LeaseKeepAlive", B),
                ("LeaseTimeToLive", U),
                ("LeaseLeases", U),
            ],
        ),
        (
            "etcdserverpb.Cluster",
            &[
                ("MemberAdd", U),
                ("MemberRemove", U),
                ("MemberUpdate", U),
                ("MemberList", U),
                ("MemberPromote", U),
            ],
        ),
        (
            "etcdserverpb.Maintenance",
            &[
                ("Alarm", U),
                ("Status", U),
                ("Defragment", U),
                ("Hash", U),
                ("HashKV", U),
                ("Snapshot", S),
                ("MoveLeader", U),
                ("Downgrade", U),
            ],
        ),
        (
            "etcdserverpb.Auth",
            &[
                ("AuthEnable", U),
                ("AuthDisable", U),
                ("AuthStatus", U),
                ("Authenticate", U),
                ("UserAdd", U),
                ("UserGet", U),
                ("UserList", U),
                ("UserDelete", U),
                ("UserChangePassword", U),
                ("UserGrantRole", U),
                ("UserRevokeRole", U),
                ("RoleAdd", U),
                ("RoleGet", U),
                ("RoleList", U),
                ("RoleDelete", U),
                ("RoleGrantPermission", U),
                ("RoleRevokePermission", U),
            ],
        ),
        ("v3lockpb.Lock", &[("Lock", U), ("Unlock", U)]),
        (
            "v3electionpb.Election",
            &[("Campaign", U), ("Proclaim", U), ("Leader", U), ("Observe", S), ("Resign", U)],
        ),
    ]
};

/// The kind of `method` of `service`, when both are etcd's.
pub fn grpc_type(service: &str, method: &str) -> Option<GrpcType> {
    GRPC_METHODS
        .iter()
        .find(|(s, _)| *s == service)
        .and_then(|(_, methods)| methods.iter().find(|(m, _)| *m == method))
        .map(|(_, t)| *t)
}

/// gRPC status code names as go-grpc-prometheus writes them in `grpc_code`, by code number.
pub const GRPC_CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// The `grpc_code` label of a gRPC status code number ("Unknown" for numbers past the table).
pub fn grpc_code_name(code: i32) -> &'static str {
    usize::try_from(code).ok().and_then(|i| GRPC_CODES.get(i).copied()).unwrap_or("Unknown")
}

/// Exponential buckets `start * factor^i` for `i < count`, as Go's
/// `prometheus.ExponentialBuckets` (infallible for the constants used here).
fn exponential(start: f64, factor: f64, count: i32) -> Vec<f64> {
    (0..count).map(|i| start * factor.powi(i)).collect()
}

/// Go's `prometheus.DefBuckets`, which go-grpc-prometheus's handling histogram uses.
const DEFAULT_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Server and raft state (`etcd_server_*`).
#[derive(Clone)]
pub struct ServerMetrics {
    /// 1 when this member knows a leader.
    pub has_leader: IntGauge,
    /// 1 when this member is the leader.
    pub is_leader: IntGauge,
    /// 1 when this member is a learner.
    pub is_learner: IntGauge,
    /// Leader changes this member has seen (to a known leader).
    pub leader_changes_seen_total: IntCounter,
    /// The raft commit index (a gauge named `_total`, as in etcd).
    pub proposals_committed_total: IntGauge,
    /// The applied index (a gauge named `_total`, as in etcd).
    pub proposals_applied_total: IntGauge,
    /// Proposals from this member waiting for their apply result.
    pub proposals_pending: IntGauge,
    /// Proposals that failed (dropped for want of a leader, timed out, raft stopped).
    pub proposals_failed_total: IntCounter,
    /// Authenticate calls refused for a wrong password, an unknown user or a user without
    /// password (Cairn's own; etcd has none).
    pub auth_failures_total: IntCounter,
    /// The backend quota in bytes.
    pub quota_backend_bytes: IntGauge,
    /// 1 for this member's id in hex (`server_id` label).
    pub id: IntGaugeVec,
    /// 1 for the etcd version Cairn reports (`server_version` label).
    pub version: IntGaugeVec,
    /// 1 for the cluster version (`cluster_version` label).
    pub cluster_version: IntGaugeVec,
    /// Health checks that passed (`/health`, `/livez`, `/readyz`).
    pub health_success: IntCounter,
    /// Health checks that failed.
    pub health_failures: IntCounter,
}

/// Disk latencies (`etcd_disk_*`).
#[derive(Clone)]
pub struct DiskMetrics {
    /// Durations of the raft log's fdatasync calls.
    pub wal_fsync_duration_seconds: Histogram,
    /// Bytes written to the raft log (a gauge named `_total`, as in etcd 3.5).
    pub wal_write_bytes_total: IntGauge,
    /// Durations of atomic batch commits to the state machine's backend.
    pub backend_commit_duration_seconds: Histogram,
}

/// Backend sizes (`etcd_mvcc_*`).
#[derive(Clone)]
pub struct MvccMetrics {
    /// Bytes the backend occupies on disk.
    pub db_total_size_in_bytes: IntGauge,
    /// Bytes of the backend logically in use.
    pub db_total_size_in_use_in_bytes: IntGauge,
    /// The current revision (`etcd_debugging_mvcc_current_revision`).
    pub current_revision: IntGauge,
    /// Live watchers (`etcd_debugging_mvcc_watcher_total`).
    pub watcher_total: IntGauge,
    /// Open watch streams (`etcd_debugging_mvcc_watch_stream_total`).
    pub watch_stream_total: IntGauge,
    /// Watchers catching up from history (`etcd_debugging_mvcc_slow_watcher_total`).
    pub slow_watcher_total: IntGauge,
    /// Events queued for watch streams, not yet sent
    /// (`etcd_debugging_mvcc_pending_events_total`).
    pub pending_events_total: IntGauge,
    /// Events sent to watchers (`etcd_debugging_mvcc_events_total`).
    pub events_total: IntCounter,
}

/// Network traffic (`etcd_network_*`).
#[derive(Clone)]
pub struct NetworkMetrics {
    /// Bytes sent to each peer (`To` = peer member id in hex).
    pub peer_sent_bytes_total: IntCounterVec,
    /// Bytes received from each peer (`From`).
    pub peer_received_bytes_total: IntCounterVec,
    /// Failed sends to each peer (`To`).
    pub peer_sent_failures_total: IntCounterVec,
    /// Failed receives from each peer (`From`).
    pub peer_received_failures_total: IntCounterVec,
    /// Round-trip times to each peer (`To`).
    pub peer_round_trip_time_seconds: HistogramVec,
    /// gRPC bytes (framed messages) sent to clients.
    pub client_grpc_sent_bytes_total: IntCounter,
    /// gRPC bytes (framed messages) received from clients.
    pub client_grpc_received_bytes_total: IntCounter,
}

/// go-grpc-prometheus's server metrics (`grpc_server_*`).
#[derive(Clone)]
pub struct GrpcMetrics {
    /// RPCs started.
    pub started_total: IntCounterVec,
    /// RPCs completed, by status code.
    pub handled_total: IntCounterVec,
    /// RPC latency from start to completion; registered only at [`Level::Extensive`].
    pub handling_seconds: Option<HistogramVec>,
}

/// Cairn's own metrics (`cairn_*`).
#[derive(Clone)]
pub struct CairnMetrics {
    /// 1 with the build's version and the etcd API version it speaks.
    pub build_info: IntGaugeVec,
    /// Durations of state machine checkpoints (flush plus fsync of every backend file).
    pub backend_sync_duration_seconds: Histogram,
    /// HTTP requests served by the gateway and operations endpoints, by route and status.
    pub http_requests_total: IntCounterVec,
    /// 1, labelled with the cause, once the member stopped on a fatal error (raft::Fatal).
    pub fatal_error: IntGaugeVec,
}

/// Every metric handle plus the registry they are registered in.
pub struct Metrics {
    registry: Registry,
    /// The gRPC services registered on the client port (see [`Metrics::init_grpc_service`]).
    grpc_services: RwLock<Vec<&'static str>>,
    /// Families that have labels but may have no series yet (peer metrics of a member with
    /// no peers); rendered with their HELP and TYPE so their registration is visible.
    labelled: Vec<(String, String, &'static str)>,
    /// `etcd_server_*`.
    pub server: ServerMetrics,
    /// `etcd_disk_*`.
    pub disk: DiskMetrics,
    /// `etcd_mvcc_*`.
    pub mvcc: MvccMetrics,
    /// `etcd_network_*`.
    pub network: NetworkMetrics,
    /// `grpc_server_*`.
    pub grpc: GrpcMetrics,
    /// `cairn_*`.
    pub cairn: CairnMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("extensive", &self.grpc.handling_seconds.is_some()).finish()
    }
}

/// Registers metrics in one registry and remembers labelled families.
struct Builder {
    registry: Registry,
    labelled: Vec<(String, String, &'static str)>,
}

impl Builder {
    fn register<C: Collector + Clone + 'static>(&self, c: C) -> Result<C, Error> {
        self.registry.register(Box::new(c.clone()))?;
        Ok(c)
    }

    fn counter(&self, name: &str, help: &str) -> Result<IntCounter, Error> {
        self.register(IntCounter::new(name, help)?)
    }

    fn gauge(&self, name: &str, help: &str) -> Result<IntGauge, Error> {
        self.register(IntGauge::new(name, help)?)
    }

    fn counter_vec(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, Error> {
        self.labelled.push((name.to_owned(), help.to_owned(), "counter"));
        self.register(IntCounterVec::new(Opts::new(name, help), labels)?)
    }

    fn gauge_vec(&mut self, name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec, Error> {
        self.labelled.push((name.to_owned(), help.to_owned(), "gauge"));
        self.register(IntGaugeVec::new(Opts::new(name, help), labels)?)
    }

    fn histogram(&self, name: &str, help: &str, buckets: Vec<f64>) -> Result<Histogram, Error> {
        self.register(Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?)
    }

    fn histogram_vec(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: Vec<f64>,
    ) -> Result<HistogramVec, Error> {
        self.labelled.push((name.to_owned(), help.to_owned(), "histogram"));
        self.register(HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?)
    }
}

/// The labels of `grpc_server_started_total`.
const GRPC_LABELS: &[&str] = &["grpc_type", "grpc_service", "grpc_method"];
/// The labels of `grpc_server_handled_total`.
const GRPC_CODE_LABELS: &[&str] = &["grpc_type", "grpc_service", "grpc_method", "grpc_code"];

impl Metrics {
    /// Builds every metric in a fresh registry, with etcd's help strings and buckets.
    ///
    /// # Errors
    /// Only on an invalid name, label or bucket list (a bug).
    pub fn new(level: Level) -> Result<Metrics, Error> {
        let mut b = Builder { registry: Registry::new(), labelled: Vec::new() };
        let server = ServerMetrics {
            has_leader: b.gauge(
                "etcd_server_has_leader",
                "Whether or not a leader exists. 1 is existence, 0 is not.",
            )?,
            is_leader: b.gauge(
                "etcd_server_is_leader",
                "Whether or not this member is a leader. 1 if is, 0 otherwise.",
            )?,
            is_learner: b.gauge(
                "etcd_server_is_learner",
                "Whether or not this member is a learner. 1 if is, 0 otherwise.",
            )?,
            leader_changes_seen_total: b.counter(
                "etcd_server_leader_changes_seen_total",
                "The number of leader changes seen.",
            )?,
            proposals_committed_total: b.gauge(
                "etcd_server_proposals_committed_total",
                "The total number of consensus proposals committed.",
            )?,
            proposals_applied_total: b.gauge(
                "etcd_server_proposals_applied_total",
                "The total number of consensus proposals applied.",
            )?,
            proposals_pending: b.gauge(
                "etcd_server_proposals_pending",
                "The current number of pending proposals to commit.",
            )?,
            proposals_failed_total: b.counter(
                "etcd_server_proposals_failed_total",
                "The total number of failed proposals seen.",
            )?,
            auth_failures_total: b.counter(
                "cairn_server_auth_failures_total",
                "The total number of failed authentications (wrong password, unknown user or a user without password).",
            )?,
            quota_backend_bytes: b.gauge(
                "etcd_server_quota_backend_bytes",
                "Current backend storage quota size in bytes.",
            )?,
            id: b.gauge_vec(
                "etcd_server_id",
                "Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID.",
                &["server_id"],
            )?,
            version: b.gauge_vec(
                "etcd_server_version",
                "Which version is running. 1 for 'server_version' label with current version.",
                &["server_version"],
            )?,
            cluster_version: b.gauge_vec(
                "etcd_cluster_version",
                "Which version is running. 1 for 'cluster_version' label with current cluster version",
                &["cluster_version"],
            )?,
            health_success: b.counter(
                "etcd_server_health_success",
                "The total number of successful health checks",
            )?,
            health_failures: b.counter(
                "etcd_server_health_failures",
                "The total number of failed health checks",
            )?,
        };
        let disk = DiskMetrics {
            wal_fsync_duration_seconds: b.histogram(
                "etcd_disk_wal_fsync_duration_seconds",
                "The latency distributions of fsync called by WAL.",
                exponential(0.001, 2.0, 14),
            )?,
            wal_write_bytes_total: b.gauge(
                "etcd_disk_wal_write_bytes_total",
                "Total number of bytes written in WAL.",
            )?,
            backend_commit_duration_seconds: b.histogram(
                "etcd_disk_backend_commit_duration_seconds",
                "The latency distributions of commit called by backend.",
                exponential(0.001, 2.0, 14),
            )?,
        };
        let mvcc = MvccMetrics {
            db_total_size_in_bytes: b.gauge(
                "etcd_mvcc_db_total_size_in_bytes",
                "Total size of the underlying database physically allocated in bytes.",
            )?,
            db_total_size_in_use_in_bytes: b.gauge(
                "etcd_mvcc_db_total_size_in_use_in_bytes",
                "Total size of the underlying database logically in use in bytes.",
            )?,
            current_revision: b
                .gauge("etcd_debugging_mvcc_current_revision", "The current revision of store.")?,
            watcher_total: b
                .gauge("etcd_debugging_mvcc_watcher_total", "Total number of watchers.")?,
            watch_stream_total: b.gauge(
                "etcd_debugging_mvcc_watch_stream_total",
                "Total number of watch streams.",
            )?,
            slow_watcher_total: b.gauge(
                "etcd_debugging_mvcc_slow_watcher_total",
                "Total number of unsynced slow watchers.",
            )?,
            pending_events_total: b.gauge(
                "etcd_debugging_mvcc_pending_events_total",
                "Total number of pending events to be sent.",
            )?,
            events_total: b.counter(
                "etcd_debugging_mvcc_events_total",
                "Total number of events sent by this member.",
            )?,
        };
        let network = NetworkMetrics {
            peer_sent_bytes_total: b.counter_vec(
                "etcd_network_peer_sent_bytes_total",
                "The total number of bytes sent to peers.",
                &["To"],
            )?,
            peer_received_bytes_total: b.counter_vec(
                "etcd_network_peer_received_bytes_total",
                "The total number of bytes received from peers.",
                &["From"],
            )?,
            peer_sent_failures_total: b.counter_vec(
                "etcd_network_peer_sent_failures_total",
                "The total number of send failures from peers.",
                &["To"],
            )?,
            peer_received_failures_total: b.counter_vec(
                "etcd_network_peer_received_failures_total",
                "The total number of receive failures from peers.",
                &["From"],
            )?,
            peer_round_trip_time_seconds: b.histogram_vec(
                "etcd_network_peer_round_trip_time_seconds",
                "Round-Trip-Time histogram between peers",
                &["To"],
                exponential(0.0001, 2.0, 14),
            )?,
            client_grpc_sent_bytes_total: b.counter(
                "etcd_network_client_grpc_sent_bytes_total",
                "The total number of bytes sent to grpc clients.",
            )?,
            client_grpc_received_bytes_total: b.counter(
                "etcd_network_client_grpc_received_bytes_total",
                "The total number of bytes received from grpc clients.",
            )?,
        };
        let grpc = GrpcMetrics {
            started_total: b.counter_vec(
                "grpc_server_started_total",
                "Total number of RPCs started on the server.",
                GRPC_LABELS,
            )?,
            handled_total: b.counter_vec(
                "grpc_server_handled_total",
                "Total number of RPCs completed on the server, regardless of success or failure.",
                GRPC_CODE_LABELS,
            )?,
            handling_seconds: match level {
                Level::Basic => None,
                Level::Extensive => Some(b.histogram_vec(
                    "grpc_server_handling_seconds",
                    "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
                    GRPC_LABELS,
                    DEFAULT_BUCKETS.to_vec(),
                )?),
            },
        };
        let cairn = CairnMetrics {
            build_info: b.gauge_vec(
                "cairn_build_info",
                "1 with the Cairn version and the etcd API version it serves.",
                &["version", "etcd_version"],
            )?,
            backend_sync_duration_seconds: b.histogram(
                "cairn_disk_backend_sync_duration_seconds",
                "The latency distributions of state machine checkpoints (flush and fsync of the backend).",
                exponential(0.001, 2.0, 14),
            )?,
            http_requests_total: b.counter_vec(
                "cairn_http_requests_total",
                "HTTP requests served by the JSON gateway and the operations endpoints.",
                &["route", "code"],
            )?,
            fatal_error: b.gauge_vec(
                "cairn_server_fatal_error",
                "1 once the member stopped on a fatal error (disk_full, disk_io, raft_log_lost, other) and refuses requests until restarted.",
                &["cause"],
            )?,
        };
        #[cfg(target_os = "linux")]
        b.registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok(Metrics {
            registry: b.registry,
            grpc_services: RwLock::new(Vec::new()),
            labelled: b.labelled,
            server,
            disk,
            mvcc,
            network,
            grpc,
            cairn,
        })
    }

    /// Creates the zero-valued series of every method of `service` (an etcd service name
    /// such as "etcdserverpb.KV"): `started_total` per method and `handled_total` per method
    /// and code, as go-grpc-prometheus does for every registered service. Unknown names are
    /// ignored.
    pub fn init_grpc_service(&self, service: &str) {
        let Some((name, methods)) = GRPC_METHODS.iter().find(|(s, _)| *s == service) else {
            return;
        };
        if let Ok(mut registered) = self.grpc_services.write()
            && !registered.contains(name)
        {
            registered.push(name);
        }
        for (method, kind) in *methods {
            let labels = [kind.as_str(), service, method];
            self.grpc.started_total.with_label_values(&labels);
            if let Some(h) = &self.grpc.handling_seconds {
                h.with_label_values(&labels);
            }
            for code in GRPC_CODES {
                self.grpc.handled_total.with_label_values(&[kind.as_str(), service, method, code]);
            }
        }
    }

    /// The kind of `method` of `service` when the service is registered on the client port:
    /// calls to anything else (a service Cairn does not serve) are not counted, as
    /// go-grpc-prometheus never sees them.
    pub fn registered_grpc_method(&self, service: &str, method: &str) -> Option<GrpcType> {
        let registered = self.grpc_services.read().ok()?;
        registered.contains(&service).then(|| grpc_type(service, method)).flatten()
    }

    /// Counts the start of an RPC.
    pub fn grpc_started(&self, kind: GrpcType, service: &str, method: &str) {
        self.grpc.started_total.with_label_values(&[kind.as_str(), service, method]).inc();
    }

    /// Counts the completion of an RPC with gRPC status `code` after `elapsed`.
    pub fn grpc_handled(
        &self,
        kind: GrpcType,
        service: &str,
        method: &str,
        code: i32,
        elapsed: Duration,
    ) {
        let code = grpc_code_name(code);
        self.grpc.handled_total.with_label_values(&[kind.as_str(), service, method, code]).inc();
        if let Some(h) = &self.grpc.handling_seconds {
            h.with_label_values(&[kind.as_str(), service, method]).observe(elapsed.as_secs_f64());
        }
    }

    /// Creates the zero-valued series of peer `id` (hex member id) so that its counters
    /// exist before the first byte moves.
    pub fn init_peer(&self, id: &str) {
        self.network.peer_sent_bytes_total.with_label_values(&[id]);
        self.network.peer_received_bytes_total.with_label_values(&[id]);
        self.network.peer_sent_failures_total.with_label_values(&[id]);
        self.network.peer_received_failures_total.with_label_values(&[id]);
        self.network.peer_round_trip_time_seconds.with_label_values(&[id]);
    }

    /// Renders every metric in the Prometheus text format ([`CONTENT_TYPE`]).
    ///
    /// A labelled family with no series yet (peer metrics of a member without peers) is
    /// rendered as its `# HELP` and `# TYPE` lines alone, which the format allows.
    ///
    /// # Errors
    /// When the encoder fails (it writes to memory, so only on a malformed family).
    pub fn render(&self) -> Result<String, Error> {
        let families = self.registry.gather();
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&families, &mut out)?;
        let mut text = String::from_utf8(out)
            .map_err(|e| prometheus::Error::Msg(format!("metrics text is not UTF-8: {e}")))?;
        for (name, help, kind) in &self.labelled {
            if !families.iter().any(|f| f.name() == name) {
                text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            }
        }
        Ok(text)
    }
}

/// Holds one unit of a gauge (such as `etcd_server_proposals_pending`) until dropped, so
/// every exit path of the measured operation gives it back.
#[derive(Debug)]
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    /// Increments `gauge` until the guard is dropped.
    pub fn new(gauge: &IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

static GLOBAL: OnceLock<Metrics> = OnceLock::new();

/// Builds the process registry at `level` and installs it; later calls return the
/// installed registry unchanged (the level of the first call wins).
///
/// # Errors
/// As [`Metrics::new`].
pub fn install(level: Level) -> Result<&'static Metrics, Error> {
    if let Some(m) = GLOBAL.get() {
        return Ok(m);
    }
    let built = Metrics::new(level)?;
    Ok(GLOBAL.get_or_init(|| built))
}

/// The process registry, or `None` before [`install`] (unit tests, benches, tools), in
/// which case measurement points record nothing.
pub fn get() -> Option<&'static Metrics> {
    GLOBAL.get()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_registers_with_valid_names_and_buckets() {
        let m = Metrics::new(Level::Extensive).unwrap();
        m.init_grpc_service("etcdserverpb.KV");
        let text = m.render().unwrap();
        for name in [
            "etcd_server_has_leader",
            "etcd_disk_wal_fsync_duration_seconds_bucket{le=\"8.192\"}",
            "etcd_disk_backend_commit_duration_seconds_bucket{le=\"0.001\"}",
            "grpc_server_handling_seconds_bucket",
            "# TYPE etcd_network_peer_round_trip_time_seconds histogram",
            "# TYPE etcd_network_peer_sent_failures_total counter",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }

    #[test]
    fn registering_a_service_initialises_every_method_and_code_at_zero() {
        let m = Metrics::new(Level::Basic).unwrap();
        m.init_grpc_service("etcdserverpb.Maintenance");
        let text = m.render().unwrap();
        let handled = text
            .lines()
            .filter(|l| l.starts_with("grpc_server_handled_total{"))
            .filter(|l| l.ends_with(" 0"))
            .count();
        assert_eq!(handled, 8 * GRPC_CODES.len());
        assert!(text.contains(
            "grpc_server_started_total{grpc_method=\"Snapshot\",grpc_service=\"etcdserverpb.Maintenance\",grpc_type=\"server_stream\"} 0"
        ));
        assert!(!text.contains("grpc_server_handling_seconds"), "basic level has no histogram");
    }

    #[test]
    fn handled_rpcs_count_under_their_code_name() {
        let m = Metrics::new(Level::Basic).unwrap();
        m.grpc_started(GrpcType::Unary, "etcdserverpb.KV", "Put");
        m.grpc_handled(GrpcType::Unary, "etcdserverpb.KV", "Put", 14, Duration::from_millis(3));
        let c = m
            .grpc
            .handled_total
            .with_label_values(&["unary", "etcdserverpb.KV", "Put", "Unavailable"])
            .get();
        assert_eq!(c, 1);
        assert_eq!(grpc_code_name(99), "Unknown");
        assert_eq!(m.registered_grpc_method("etcdserverpb.KV", "Put"), None);
        m.init_grpc_service("etcdserverpb.KV");
        assert_eq!(m.registered_grpc_method("etcdserverpb.KV", "Put"), Some(GrpcType::Unary));
        assert_eq!(m.registered_grpc_method("etcdserverpb.Watch", "Watch"), None);
    }

    #[test]
    fn a_gauge_guard_gives_its_unit_back_when_dropped() {
        let m = Metrics::new(Level::Basic).unwrap();
        let guard = GaugeGuard::new(&m.server.proposals_pending);
        assert_eq!(m.server.proposals_pending.get(), 1);
        drop(guard);
        assert_eq!(m.server.proposals_pending.get(), 0);
    }

    #[test]
    fn exponential_buckets_match_etcds_fsync_boundaries() {
        let b = exponential(0.001, 2.0, 14);
        assert_eq!(b.len(), 14);
        assert!((b[13] - 8.192).abs() < 1e-9);
        assert_eq!(grpc_type("etcdserverpb.Watch", "Watch"), Some(GrpcType::BidiStream));
        assert_eq!(grpc_type("etcdserverpb.KV", "Nope"), None);
    }
}
