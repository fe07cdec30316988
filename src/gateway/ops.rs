//! The operations endpoints: `/health`, `/livez`, `/readyz` (and their per-check paths),
//! `/version` and `/metrics`, as etcd serves them (server/etcdserver/api/etcdhttp).
//!
//! They read the member through [`Member`], so the checks' logic is tested against fakes
//! and the real member answers through the same service impls that clients reach (alarms
//! come from `Maintenance.Alarm`, reads from `KV.Range`).
//!
//! - `/health` (etcd 3.5): a fatal failure first (Cairn's: `MEMBER FAILED:<cause>: <error>`),
//!   then alarms (minus `?exclude=NAME`), then the leader (skipped with
//!   `?serializable=true`), then a read of key "health". JSON `{"health","reason"}`, 200 or
//!   503.
//! - `/livez` and `/readyz` (etcd 3.6, backported to 3.5.11): named checks, each also at
//!   `/livez/<check>`; `?exclude=<check>` skips one, `?verbose` lists the results. A healthy
//!   answer is `ok`; an unhealthy one is 503 with the list and `<path> check failed`. Both
//!   add Cairn's `fatal_error` check: a member whose raft log or state machine failed (full
//!   disk, failed fdatasync, lost log) stays up refusing requests, and fails liveness too,
//!   so Kubernetes restarts it (see `raft::Fatal` for why it does not exit).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::get;
use cairn_proto::etcdserverpb::maintenance_server::Maintenance as _;
use cairn_proto::etcdserverpb::{self as pb, alarm_request::AlarmAction, kv_server::Kv as _};
use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;
use tonic::Status;

use crate::grpc::{KvService, MaintenanceService};
use crate::metrics;
use crate::server::{ETCD_VERSION, STORAGE_VERSION, Server, VERSION};

/// What the operations endpoints read from the member.
pub trait Member: Send + Sync + 'static {
    /// Whether the member knows a leader.
    fn has_leader(&self) -> bool;

    /// Whether the member is a learner.
    fn is_learner(&self) -> bool;

    /// Why the member stopped serving (`<cause>: <error>`), if it failed fatally.
    fn failure(&self) -> Option<String>;

    /// The alarms active on the member.
    fn alarms(&self) -> impl Future<Output = Result<Vec<pb::AlarmType>, Status>> + Send;

    /// Reads one key, linearizably unless `serializable`.
    fn read(&self, serializable: bool) -> impl Future<Output = Result<(), Status>> + Send;

    /// Refreshes the gauges that are read at scrape time (sizes, revision, identity).
    fn refresh_metrics(&self, metrics: &metrics::Metrics);
}

/// The real member: raft state from the server, alarms and reads through the service impls.
#[derive(Debug, Clone)]
pub struct MemberProbe {
    server: Arc<Server>,
    kv: KvService,
    maintenance: MaintenanceService,
    /// A bound on one health read, etcd's request timeout (5 s plus two election timeouts).
    timeout: Duration,
}

impl MemberProbe {
    /// Probes `server`.
    pub fn new(server: Arc<Server>) -> Self {
        let cfg = server.config();
        let election = cfg.heartbeat * u32::try_from(cfg.election_ticks).unwrap_or(10);
        MemberProbe {
            kv: KvService::new(server.clone()),
            maintenance: MaintenanceService::new(server.clone()),
            server,
            timeout: Duration::from_secs(5) + 2 * election,
        }
    }
}

impl Member for MemberProbe {
    fn has_leader(&self) -> bool {
        self.server.leader() != 0
    }

    fn is_learner(&self) -> bool {
        let me = self.server.header().member_id;
        self.server.members().iter().any(|m| m.id == me && m.is_learner)
    }

    fn failure(&self) -> Option<String> {
        self.server.failure().map(|f| format!("{}: {}", f.cause.as_str(), f.message))
    }

    async fn alarms(&self) -> Result<Vec<pb::AlarmType>, Status> {
        let req = pb::AlarmRequest { action: AlarmAction::Get as i32, ..Default::default() };
        let res = self.maintenance.alarm(tonic::Request::new(req)).await?;
        Ok(res.into_inner().alarms.iter().map(|a| a.alarm()).collect())
    }

    async fn read(&self, serializable: bool) -> Result<(), Status> {
        let req = pb::RangeRequest {
            key: b"health".to_vec(),
            serializable,
            keys_only: true,
            limit: 1,
            ..Default::default()
        };
        match tokio::time::timeout(self.timeout, self.kv.range(tonic::Request::new(req))).await {
            // With auth on, an anonymous read is refused after the member served it: the
            // member is healthy (etcd ignores ErrUserEmpty and ErrPermissionDenied here).
            Ok(Err(s))
                if s.code() == tonic::Code::PermissionDenied
                    || s.message() == crate::grpc::status::msg::USER_EMPTY =>
            {
                Ok(())
            }
            Ok(res) => res.map(|_| ()),
            Err(_) => Err(Status::unavailable("etcdserver: request timed out")),
        }
    }

    fn refresh_metrics(&self, m: &metrics::Metrics) {
        let status = self.server.status();
        let me = self.server.header().member_id;
        let size = i64::try_from(status.db_size).unwrap_or(i64::MAX);
        m.mvcc.db_total_size_in_bytes.set(size);
        // The estimate Maintenance.Status reports as dbSizeInUse (server/defrag.rs).
        m.mvcc
            .db_total_size_in_use_in_bytes
            .set(i64::try_from(status.db_size_in_use).unwrap_or(i64::MAX));
        m.mvcc.current_revision.set(self.server.current_revision());
        let watch = self.server.watch_stats();
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        m.mvcc.watcher_total.set(count(watch.watchers));
        m.mvcc.watch_stream_total.set(count(watch.streams));
        m.mvcc.slow_watcher_total.set(count(watch.unsynced));
        m.mvcc.pending_events_total.set(count(watch.pending_events));
        m.server.quota_backend_bytes.set(i64::try_from(status.quota).unwrap_or(i64::MAX));
        m.server.is_learner.set(i64::from(self.is_learner()));
        m.server.id.with_label_values(&[&format!("{me:x}")]).set(1);
        m.server.version.with_label_values(&[ETCD_VERSION]).set(1);
        m.server.cluster_version.with_label_values(&[&cluster_version()]).set(1);
        m.cairn.build_info.with_label_values(&[VERSION, ETCD_VERSION]).set(1);
        for peer in self.server.members().iter().filter(|p| p.id != me) {
            m.init_peer(&format!("{:x}", peer.id));
        }
    }
}

/// The cluster version etcd reports for [`ETCD_VERSION`]: its major.minor with patch 0.
fn cluster_version() -> String {
    let mut parts = ETCD_VERSION.split('.');
    match (parts.next(), parts.next()) {
        (Some(major), Some(minor)) => format!("{major}.{minor}.0"),
        _ => ETCD_VERSION.to_owned(),
    }
}

/// The query parameters the health endpoints read.
#[derive(Debug, Default)]
struct Query {
    serializable: bool,
    verbose: bool,
    exclude: Vec<String>,
}

impl Query {
    fn parse(query: Option<&str>) -> Query {
        let mut q = Query::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "serializable" => q.serializable = value == "true",
                "verbose" => q.verbose = true,
                "exclude" => q.exclude.push(value.to_owned()),
                _ => {}
            }
        }
        q
    }
}

/// `/health`'s body.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Health {
    /// "true" or "false", a string as in etcd.
    pub health: String,
    /// Why it is unhealthy, empty when healthy.
    pub reason: String,
}

/// etcd 3.5's `/health` check.
async fn check_health<M: Member>(member: &M, q: &Query) -> Health {
    let unhealthy = |reason: String| Health { health: "false".into(), reason };
    if let Some(failure) = member.failure() {
        return unhealthy(format!("MEMBER FAILED:{failure}"));
    }
    match member.alarms().await {
        Ok(alarms) => {
            if let Some(alarm) =
                alarms.iter().find(|a| !q.exclude.iter().any(|e| e == a.as_str_name()))
            {
                return unhealthy(format!("ALARM {}", alarm.as_str_name()));
            }
        }
        Err(status) => return unhealthy(format!("ALARM ERROR:{}", status.message())),
    }
    if !q.serializable && !member.has_leader() {
        return unhealthy("RAFT NO LEADER".into());
    }
    if let Err(status) = member.read(q.serializable).await {
        return unhealthy(format!("QGET ERROR:{}", status.message()));
    }
    Health { health: "true".into(), reason: String::new() }
}

/// The named checks of `/livez` and `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    DataCorruption,
    SerializableRead,
    LinearizableRead,
    NonLearner,
    FatalError,
}

impl Check {
    fn name(self) -> &'static str {
        match self {
            Check::DataCorruption => "data_corruption",
            Check::SerializableRead => "serializable_read",
            Check::LinearizableRead => "linearizable_read",
            Check::NonLearner => "non_learner",
            Check::FatalError => "fatal_error",
        }
    }

    async fn run<M: Member>(self, member: &M) -> Result<(), String> {
        match self {
            Check::DataCorruption => match member.alarms().await {
                Ok(alarms) if alarms.contains(&pb::AlarmType::Corrupt) => {
                    Err("alarm activated: CORRUPT".into())
                }
                Ok(_) => Ok(()),
                Err(status) => Err(status.message().to_owned()),
            },
            Check::SerializableRead => member.read(true).await.map_err(|s| s.message().to_owned()),
            Check::LinearizableRead => member.read(false).await.map_err(|s| s.message().to_owned()),
            Check::NonLearner => {
                if member.is_learner() {
                    Err("not supported for learner".into())
                } else {
                    Ok(())
                }
            }
            Check::FatalError => member.failure().map_or(Ok(()), Err),
        }
    }
}

const LIVEZ: &[Check] = &[Check::SerializableRead, Check::FatalError];
const READYZ: &[Check] = &[
    Check::DataCorruption,
    Check::SerializableRead,
    Check::LinearizableRead,
    Check::NonLearner,
    Check::FatalError,
];

/// Runs `checks` (minus exclusions) and renders etcd's text answer for `path`.
async fn run_checks<M: Member>(
    member: &M,
    path: &str,
    checks: &[Check],
    q: &Query,
) -> (StatusCode, String) {
    let mut out = String::new();
    let mut failed = false;
    for check in checks {
        if q.exclude.iter().any(|e| e == check.name()) {
            out.push_str(&format!("[+]{} excluded: ok\n", check.name()));
            continue;
        }
        match check.run(member).await {
            Ok(()) => out.push_str(&format!("[+]{} ok\n", check.name())),
            Err(reason) => {
                failed = true;
                out.push_str(&format!("[-]{} failed: {reason}\n", check.name()));
            }
        }
    }
    if failed {
        // A failure always lists every check, as etcd does.
        out.push_str(&format!("{path} check failed\n"));
        return (StatusCode::SERVICE_UNAVAILABLE, out);
    }
    if q.verbose {
        out.push_str("ok\n");
        (StatusCode::OK, out)
    } else {
        (StatusCode::OK, "ok\n".into())
    }
}

fn text_response(status: StatusCode, body: String) -> Response<Body> {
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    res.headers_mut().insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    res
}

fn count_health(ok: bool) {
    if let Some(m) = metrics::get() {
        if ok { m.server.health_success.inc() } else { m.server.health_failures.inc() }
    }
}

async fn health<M: Member>(member: Arc<M>, query: Option<&str>) -> Response<Body> {
    let h = check_health(member.as_ref(), &Query::parse(query)).await;
    let ok = h.health == "true";
    count_health(ok);
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    super::json::json_response(status, serde_json::to_vec(&h).unwrap_or_default())
}

async fn checks<M: Member>(
    member: Arc<M>,
    path: &str,
    checks: &[Check],
    query: Option<&str>,
) -> Response<Body> {
    let (status, body) = run_checks(member.as_ref(), path, checks, &Query::parse(query)).await;
    count_health(status == StatusCode::OK);
    text_response(status, body)
}

/// `/version`'s body.
#[derive(Debug, Serialize)]
struct Version {
    etcdserver: &'static str,
    etcdcluster: String,
    storage: &'static str,
}

fn version() -> Response<Body> {
    let v = Version {
        etcdserver: ETCD_VERSION,
        etcdcluster: cluster_version(),
        storage: STORAGE_VERSION,
    };
    super::json::json_response(StatusCode::OK, serde_json::to_vec(&v).unwrap_or_default())
}

fn render_metrics<M: Member>(member: &M) -> Response<Body> {
    let Some(m) = metrics::get() else {
        return text_response(StatusCode::NOT_FOUND, "metrics are not enabled\n".into());
    };
    member.refresh_metrics(m);
    match m.render() {
        Ok(text) => {
            let mut res = text_response(StatusCode::OK, text);
            res.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(metrics::CONTENT_TYPE));
            res
        }
        Err(e) => text_response(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// The operations routes over `member` (GET only, as in etcd).
pub fn router<M: Member>(member: Arc<M>) -> axum::Router {
    let mut router = axum::Router::new();
    let m = member.clone();
    router = router.route(
        "/health",
        get(move |req: axum::extract::Request| async move {
            let res = health(m, req.uri().query()).await;
            super::count_http("/health", res.status());
            res
        }),
    );
    for (path, list) in [("/livez", LIVEZ), ("/readyz", READYZ)] {
        let m = member.clone();
        router = router.route(
            path,
            get(move |req: axum::extract::Request| async move {
                let res = checks(m, path, list, req.uri().query()).await;
                super::count_http(path, res.status());
                res
            }),
        );
        for check in list {
            let m = member.clone();
            let sub = format!("{path}/{}", check.name());
            let label = sub.clone();
            router = router.route(
                &sub,
                get(move |req: axum::extract::Request| async move {
                    let res = checks(m, &label, &[*check], req.uri().query()).await;
                    super::count_http(&label, res.status());
                    res
                }),
            );
        }
    }
    router = router.route(
        "/version",
        get(|| async {
            let res = version();
            super::count_http("/version", res.status());
            res
        }),
    );
    let m = member;
    router.route(
        "/metrics",
        get(move || async move {
            let res = render_metrics(m.as_ref());
            super::count_http("/metrics", res.status());
            res
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A member whose answers the test sets.
    #[derive(Default)]
    struct Fake {
        no_leader: bool,
        learner: bool,
        alarms: Vec<pb::AlarmType>,
        read_error: Mutex<Option<String>>,
        failure: Option<String>,
    }

    impl Member for Fake {
        fn has_leader(&self) -> bool {
            !self.no_leader
        }
        fn is_learner(&self) -> bool {
            self.learner
        }
        fn failure(&self) -> Option<String> {
            self.failure.clone()
        }
        async fn alarms(&self) -> Result<Vec<pb::AlarmType>, Status> {
            Ok(self.alarms.clone())
        }
        async fn read(&self, serializable: bool) -> Result<(), Status> {
            if !serializable && self.no_leader {
                return Err(Status::unavailable("etcdserver: no leader"));
            }
            match self.read_error.lock().unwrap().clone() {
                Some(e) => Err(Status::unavailable(e)),
                None => Ok(()),
            }
        }
        fn refresh_metrics(&self, _: &metrics::Metrics) {}
    }

    fn q(s: &str) -> Query {
        Query::parse(Some(s))
    }

    #[tokio::test]
    async fn a_member_with_a_leader_and_no_alarm_is_healthy() {
        let h = check_health(&Fake::default(), &q("")).await;
        assert_eq!(h, Health { health: "true".into(), reason: String::new() });
        assert_eq!(serde_json::to_string(&h).unwrap(), r#"{"health":"true","reason":""}"#);
    }

    #[tokio::test]
    async fn no_leader_is_unhealthy_unless_the_check_is_serializable() {
        let fake = Fake { no_leader: true, ..Fake::default() };
        assert_eq!(check_health(&fake, &q("")).await.reason, "RAFT NO LEADER");
        assert_eq!(check_health(&fake, &q("serializable=true")).await.health, "true");
    }

    #[tokio::test]
    async fn a_nospace_alarm_is_unhealthy_unless_excluded() {
        let fake = Fake { alarms: vec![pb::AlarmType::Nospace], ..Fake::default() };
        assert_eq!(check_health(&fake, &q("")).await.reason, "ALARM NOSPACE");
        assert_eq!(check_health(&fake, &q("exclude=NOSPACE")).await.health, "true");
        assert_eq!(check_health(&fake, &q("exclude=CORRUPT")).await.reason, "ALARM NOSPACE");
    }

    #[tokio::test]
    async fn a_failing_read_is_unhealthy_with_its_reason() {
        let fake = Fake::default();
        *fake.read_error.lock().unwrap() = Some("etcdserver: request timed out".into());
        assert_eq!(
            check_health(&fake, &q("")).await.reason,
            "QGET ERROR:etcdserver: request timed out"
        );
    }

    #[tokio::test]
    async fn readyz_lists_failed_checks_and_honours_exclusions() {
        let fake = Fake { no_leader: true, ..Fake::default() };
        let (status, body) = run_checks(&fake, "/readyz", READYZ, &q("")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            "[+]data_corruption ok\n[+]serializable_read ok\n[-]linearizable_read failed: etcdserver: no leader\n[+]non_learner ok\n[+]fatal_error ok\n/readyz check failed\n"
        );
        let (status, body) =
            run_checks(&fake, "/readyz", READYZ, &q("exclude=linearizable_read")).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok\n"));
        let (status, body) = run_checks(&fake, "/livez", LIVEZ, &q("verbose")).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "[+]serializable_read ok\n[+]fatal_error ok\nok\n")
        );
    }

    #[tokio::test]
    async fn a_failed_member_fails_health_liveness_and_readiness_with_the_reason() {
        let reason = "disk_io: raft log persistence failed: fdatasync: Input/output error";
        let fake = Fake { failure: Some(reason.into()), ..Fake::default() };
        assert_eq!(
            check_health(&fake, &q("serializable=true")).await.reason,
            format!("MEMBER FAILED:{reason}")
        );
        for (path, list) in [("/livez", LIVEZ), ("/readyz", READYZ)] {
            let (status, body) = run_checks(&fake, path, list, &q("")).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
            assert!(body.contains(&format!("[-]fatal_error failed: {reason}\n")), "{body}");
        }
    }

    #[tokio::test]
    async fn a_corrupt_alarm_or_a_learner_fails_readiness() {
        let fake = Fake { alarms: vec![pb::AlarmType::Corrupt], learner: true, ..Fake::default() };
        let (status, body) = run_checks(&fake, "/readyz", READYZ, &q("")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("[-]data_corruption failed: alarm activated: CORRUPT\n"), "{body}");
        assert!(body.contains("[-]non_learner failed: not supported for learner\n"), "{body}");
    }

    #[test]
    fn the_cluster_version_is_the_minor_release() {
        assert_eq!(cluster_version(), format!("{}.0", &ETCD_VERSION[..3]));
    }
}
