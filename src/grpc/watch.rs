//! etcd's `Watch` service: one bidirectional stream carries many watchers
//! (etcd's `api/v3rpc/watch.go`).
//!
//! Per stream, a request task reads the client's create, cancel and progress requests and
//! hands them to the stream's [`WatchStream`](crate::server::types::WatchStream); the response
//! stream tonic sends is the stream's [`ResponseSource`], converted to etcd's messages
//! here. The watch module does the ordering, bounding and catching up; this file only
//! translates, splits large responses into fragments for watchers that allow it, and
//! enforces `hasleader`.
//!
//! As in etcd, a client that half-closes its side keeps receiving events; the stream ends
//! when the client cancels the call or goes away, and its watchers go with it.
//!
//! With auth on, each create is checked for READ on the watched range with the stream's
//! credentials (etcd's isWatchPermitted); a refused create gets etcd's answer, a created
//! and canceled response with watch id -1 and the permission-denied status text. Unlike etcd
//! 3.5, which checks a `>= key` watch as the single key, the whole open range is checked.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cairn_proto::etcdserverpb::{self as pb, watch_request::RequestUnion, watch_server::Watch};
use cairn_proto::mvccpb;
use futures::Stream;
use prost::Message as _;
use tonic::{Request, Response, Status, Streaming};

use super::{convert, status};
use crate::config::GRPC_OVERHEAD_BYTES;
use crate::server::types::{
    CreateRequest, Event, EventKind, ResponseKind, ResponseSource, WatchError, WatchResponse,
    WatchStream as Requests,
};
use crate::server::{Caller, HeaderInfo, Server};

/// Consecutive leader checks without a leader after which a `hasleader` stream is
/// canceled (etcd's `maxNoLeaderCnt`: reconnecting costs more than refusing new calls).
const MAX_NO_LEADER_CHECKS: u32 = 3;

/// The metadata key (and value) of clientv3's `WithRequireLeader`.
const HAS_LEADER_KEY: &str = "hasleader";

/// Reads the current header facts (member, cluster, term).
pub type HeaderFn = Arc<dyn Fn() -> HeaderInfo + Send + Sync>;

/// Tells whether the member knows a leader.
pub type LeaderFn = Arc<dyn Fn() -> bool + Send + Sync>;

/// Opens one watch stream on the member: its request and response sides.
pub type OpenFn = Arc<dyn Fn() -> (Requests, ResponseSource) + Send + Sync>;

/// Completes when the member failed (`Server::stopped`): open streams end on it.
pub type StoppedFn = Arc<dyn Fn() -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// Decides whether the stream's caller may watch `[key, range_end)`; a refusal carries the
/// current revision for the refusal's header.
pub type PermitFn = Arc<
    dyn Fn(Option<Caller>, Vec<u8>, Vec<u8>) -> futures::future::BoxFuture<'static, Result<(), i64>>
        + Send
        + Sync,
>;

/// The Watch service over one member's watchers.
#[derive(Clone)]
pub struct WatchService {
    open: OpenFn,
    header: HeaderFn,
    has_leader: LeaderFn,
    /// Responses of `fragment` watchers at or above this encoded size are split (etcd's
    /// `--max-request-bytes` plus its gRPC overhead allowance).
    fragment_bytes: usize,
    /// How often a `hasleader` stream checks for a leader (etcd: the election timeout).
    leader_check: Duration,
    /// The auth check of each create (everything passes when none is set).
    permit: Option<PermitFn>,
    /// The member's failure (never, when none is set).
    stopped: Option<StoppedFn>,
}

impl std::fmt::Debug for WatchService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchService")
            .field("fragment_bytes", &self.fragment_bytes)
            .finish_non_exhaustive()
    }
}

impl WatchService {
    /// Creates the service for `server`.
    pub fn new(server: Arc<Server>) -> Self {
        let cfg = server.config();
        let fragment_bytes = usize::try_from(cfg.raw.max_request_bytes)
            .unwrap_or(usize::MAX)
            .saturating_add(GRPC_OVERHEAD_BYTES);
        let election = cfg.heartbeat * u32::try_from(cfg.election_ticks).unwrap_or(10);
        let for_open = server.clone();
        let for_header = server.clone();
        let for_permit = server.clone();
        let for_stopped = server.clone();
        let has_leader: LeaderFn = Arc::new(move || server.leader() != 0);
        let permit: PermitFn = Arc::new(move |caller, key, range_end| {
            let server = for_permit.clone();
            Box::pin(async move {
                let Some(caller) = caller else { return Ok(()) };
                let check = server.check_read(&key, &range_end);
                match crate::server::with_caller(caller, check).await {
                    Ok(()) => Ok(()),
                    Err(_) => Err(server.current_revision()),
                }
            })
        });
        let mut svc = Self::from_parts(
            Arc::new(move || for_open.open_watch_stream()),
            Arc::new(move || for_header.header()),
            has_leader,
            fragment_bytes,
            election,
        );
        svc.permit = Some(permit);
        svc.stopped = Some(Arc::new(move || Box::pin(for_stopped.stopped())));
        svc
    }

    /// Creates the service from its parts (tests inject the leader check, so that losing
    /// the leader can be shown on a single member).
    pub fn from_parts(
        open: OpenFn,
        header: HeaderFn,
        has_leader: LeaderFn,
        fragment_bytes: usize,
        leader_check: Duration,
    ) -> Self {
        Self { open, header, has_leader, fragment_bytes, leader_check, permit: None, stopped: None }
    }
}

/// The response stream tonic sends.
pub type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = ResponseStream;

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let require_leader =
            request.metadata().get(HAS_LEADER_KEY).is_some_and(|v| v.as_bytes() == b"true");
        if require_leader && !(self.has_leader)() {
            return Err(Status::unavailable(status::msg::NO_LEADER));
        }
        let (requests, source) = (self.open)();
        let (denied_tx, denied) = tokio::sync::mpsc::channel(16);
        let auth = self.permit.clone().map(|permit| Permit {
            permit,
            caller: crate::server::current_caller(),
            header: self.header.clone(),
            denied: denied_tx,
        });
        let reader = AbortOnDrop(tokio::spawn(read_requests(request.into_inner(), requests, auth)));
        let leader = require_leader.then(|| LeaderWatch {
            has_leader: self.has_leader.clone(),
            ticks: tokio::time::interval_at(
                tokio::time::Instant::now() + self.leader_check,
                self.leader_check,
            ),
            misses: 0,
        });
        let out = Outgoing {
            source,
            pending: VecDeque::new(),
            header: self.header.clone(),
            fragment_bytes: self.fragment_bytes,
            leader,
            denied,
            stopped: match &self.stopped {
                Some(stopped) => stopped(),
                None => Box::pin(std::future::pending()),
            },
            done: false,
            _reader: reader,
        };
        let stream = futures::stream::unfold(out, |mut out| async move {
            let item = out.next_message().await?;
            Some((item, out))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The auth check of one stream's creates, and where its refusals go.
struct Permit {
    permit: PermitFn,
    caller: Option<Caller>,
    header: HeaderFn,
    denied: tokio::sync::mpsc::Sender<pb::WatchResponse>,
}

impl Permit {
    /// True when the create may proceed; otherwise its refusal is queued for the client.
    async fn allows(&self, c: &pb::WatchCreateRequest) -> bool {
        // Watch maps an empty key to "\0", the smallest key (etcd's recvLoop).
        let key = if c.key.is_empty() { vec![0] } else { c.key.clone() };
        let Err(revision) = (self.permit)(self.caller.clone(), key, c.range_end.clone()).await
        else {
            return true;
        };
        let refusal = pb::WatchResponse {
            header: convert::header((self.header)(), revision),
            watch_id: -1,
            created: true,
            canceled: true,
            // etcd sends the gRPC error's text (ErrGRPCPermissionDenied.Error()).
            cancel_reason:
                "rpc error: code = PermissionDenied desc = etcdserver: permission denied".to_owned(),
            ..Default::default()
        };
        let _ = self.denied.send(refusal).await;
        false
    }
}

/// Feeds the client's requests to the stream until the client stops sending.
async fn read_requests(
    mut inbound: Streaming<pb::WatchRequest>,
    requests: Requests,
    auth: Option<Permit>,
) {
    // A half-close ends only this loop (etcd keeps the stream for events); an error
    // means the client is gone, and tonic drops the response side too.
    while let Ok(Some(req)) = inbound.message().await {
        match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => {
                if let Some(auth) = &auth
                    && !auth.allows(&c).await
                {
                    continue;
                }
                requests.create(create_request(c)).await;
            }
            Some(RequestUnion::CancelRequest(c)) => requests.cancel(c.watch_id).await,
            Some(RequestUnion::ProgressRequest(_)) => requests.request_progress().await,
            None => {}
        }
    }
}

/// Converts a create request; unknown filter values are ignored, as etcd ignores them.
fn create_request(c: pb::WatchCreateRequest) -> CreateRequest {
    use pb::watch_create_request::FilterType;
    let has = |f: FilterType| c.filters.contains(&(f as i32));
    CreateRequest {
        no_put: has(FilterType::Noput),
        no_delete: has(FilterType::Nodelete),
        key: c.key,
        range_end: c.range_end,
        start_revision: c.start_revision,
        progress_notify: c.progress_notify,
        prev_kv: c.prev_kv,
        watch_id: c.watch_id,
        fragment: c.fragment,
    }
}

/// Aborts a task when dropped: the request task must not outlive its stream.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The leader check of a `hasleader` stream.
struct LeaderWatch {
    has_leader: LeaderFn,
    ticks: tokio::time::Interval,
    misses: u32,
}

/// The response side of one stream.
struct Outgoing {
    source: ResponseSource,
    /// Fragments of a split response still to send.
    pending: VecDeque<pb::WatchResponse>,
    header: HeaderFn,
    fragment_bytes: usize,
    leader: Option<LeaderWatch>,
    /// Refused creates, answered in order with the other responses.
    denied: tokio::sync::mpsc::Receiver<pb::WatchResponse>,
    /// Completes when the member failed: the stream then ends with etcd's "server stopped"
    /// (Unavailable), and the client's retry finds another member.
    stopped: futures::future::BoxFuture<'static, ()>,
    done: bool,
    _reader: AbortOnDrop,
}

/// Waits for the next leader check of a `hasleader` stream (forever without one); true
/// when the stream has gone too long without a leader.
async fn leader_lost(leader: &mut Option<LeaderWatch>) -> bool {
    let Some(leader) = leader else { return std::future::pending().await };
    leader.ticks.tick().await;
    if (leader.has_leader)() {
        leader.misses = 0;
    } else {
        leader.misses += 1;
    }
    leader.misses >= MAX_NO_LEADER_CHECKS
}

impl Outgoing {
    /// The next message for the client; `None` ends the stream.
    async fn next_message(&mut self) -> Option<Result<pb::WatchResponse, Status>> {
        if self.done {
            return None;
        }
        if let Some(m) = self.pending.pop_front() {
            return Some(Ok(m));
        }
        loop {
            let response = tokio::select! {
                () = &mut self.stopped => {
                    self.done = true;
                    return Some(Err(Status::unavailable(status::msg::STOPPED)));
                }
                Some(refusal) = self.denied.recv() => return Some(Ok(refusal)),
                r = self.source.next() => r?,
                lost = leader_lost(&mut self.leader) => {
                    if lost {
                        self.done = true;
                        return Some(Err(Status::unavailable(status::msg::NO_LEADER)));
                    }
                    continue;
                }
            };
            let mut messages = to_messages((self.header)(), response, self.fragment_bytes);
            let first = messages.pop_front();
            self.pending = messages;
            if let Some(m) = first {
                return Some(Ok(m));
            }
        }
    }
}

/// etcd's `cancel_reason` for an error that ends a watcher.
fn cancel_reason(e: &WatchError) -> String {
    match e {
        // etcd 3.6 answers a negative start revision with the gRPC error's text.
        WatchError::Compacted => status::msg::COMPACTED.to_owned(),
        // etcd's mvcc errors travel without the "etcdserver: " prefix.
        WatchError::DuplicateWatchId | WatchError::EmptyRange => e.to_string(),
        WatchError::TooManyWatchers | WatchError::History(_) => format!("etcdserver: {e}"),
    }
}

/// Converts one hub response into etcd messages: one, or several fragments.
fn to_messages(
    h: HeaderInfo,
    r: WatchResponse,
    fragment_bytes: usize,
) -> VecDeque<pb::WatchResponse> {
    let base = pb::WatchResponse {
        header: convert::header(h, r.revision),
        watch_id: r.watch_id,
        ..Default::default()
    };
    let one = match r.kind {
        ResponseKind::Created => pb::WatchResponse { created: true, ..base },
        ResponseKind::Refused(e) => pb::WatchResponse {
            created: true,
            canceled: true,
            cancel_reason: cancel_reason(&e),
            ..base
        },
        ResponseKind::Canceled => pb::WatchResponse { canceled: true, ..base },
        ResponseKind::Compacted { compact_revision } => {
            pb::WatchResponse { canceled: true, compact_revision, ..base }
        }
        ResponseKind::Failed(e) => {
            pb::WatchResponse { canceled: true, cancel_reason: cancel_reason(&e), ..base }
        }
        ResponseKind::Progress => base,
        ResponseKind::Events { events, prev_kv, fragment } => {
            if let Some(m) = crate::metrics::get() {
                m.mvcc.events_total.inc_by(u64::try_from(events.len()).unwrap_or(u64::MAX));
            }
            let events = events.iter().map(|e| event(e, prev_kv)).collect();
            if fragment {
                return fragments(base, events, fragment_bytes);
            }
            pb::WatchResponse { events, ..base }
        }
    };
    VecDeque::from([one])
}

/// Converts an event, with its previous key-value only when the watcher asked for it.
fn event(e: &Event, prev_kv: bool) -> mvccpb::Event {
    let r#type = match e.kind {
        EventKind::Put => mvccpb::event::EventType::Put,
        EventKind::Delete => mvccpb::event::EventType::Delete,
    };
    mvccpb::Event {
        r#type: r#type as i32,
        kv: Some(convert::kv(e.kv.clone())),
        prev_kv: if prev_kv { e.prev_kv.clone().map(convert::kv) } else { None },
    }
}

/// Splits a response whose encoding reaches `limit` bytes into fragments, as etcd's
/// `sendFragments` does: each fragment is the longest run of events that stays under the
/// limit (at least one event), all but the last flagged `fragment`.
fn fragments(
    base: pb::WatchResponse,
    events: Vec<mvccpb::Event>,
    limit: usize,
) -> VecDeque<pb::WatchResponse> {
    // Each event is field 11 (a one-byte key), a length, then the message.
    let field_len = |e: &mvccpb::Event| {
        let n = e.encoded_len();
        1 + prost::length_delimiter_len(n) + n
    };
    let empty = pb::WatchResponse { fragment: true, ..base.clone() }.encoded_len();
    let total = events.iter().map(field_len).sum::<usize>() + empty;
    if total < limit || events.len() < 2 {
        return VecDeque::from([pb::WatchResponse { events, ..base }]);
    }
    let mut out = VecDeque::new();
    let mut cur = pb::WatchResponse { fragment: true, ..base.clone() };
    let mut size = empty;
    for e in events {
        let len = field_len(&e);
        if !cur.events.is_empty() && size + len >= limit {
            let next = pb::WatchResponse { fragment: true, ..base.clone() };
            out.push_back(std::mem::replace(&mut cur, next));
            size = empty;
        }
        size += len;
        cur.events.push(e);
    }
    cur.fragment = false;
    out.push_back(cur);
    out
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use cairn_proto::etcdserverpb::watch_server::WatchServer;
    use etcd_client::{Client, ConnectOptions};
    use tokio_stream::wrappers::TcpListenerStream;

    use super::*;
    use crate::mvcc::tests::store;
    use crate::watch::{WatchConfig, WatchHub};

    /// Serves a Watch service over a memory store on a loopback port, with a leader flag
    /// the test controls; returns the endpoint.
    async fn serve(leader: Arc<AtomicBool>) -> String {
        let hub = WatchHub::new(store(), WatchConfig::default());
        let header: HeaderFn =
            Arc::new(|| HeaderInfo { cluster_id: 1, member_id: 2, raft_term: 3 });
        let has_leader: LeaderFn = Arc::new(move || leader.load(Ordering::SeqCst));
        let open: OpenFn = Arc::new(move || hub.open_stream());
        let svc =
            WatchService::from_parts(open, header, has_leader, 1 << 20, Duration::from_millis(50));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(WatchServer::new(svc))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    async fn client(endpoint: &str, require_leader: bool) -> Client {
        let opts = ConnectOptions::new().with_require_leader(require_leader);
        Client::connect([endpoint], Some(opts)).await.unwrap()
    }

    fn grpc_status(e: etcd_client::Error) -> (tonic::Code, String) {
        match e {
            etcd_client::Error::GRpcStatus(s) => (s.code(), s.message().to_owned()),
            other => panic!("expected a gRPC status, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn hasleader_streams_are_refused_without_a_leader_and_canceled_when_it_is_lost() {
        let leader = Arc::new(AtomicBool::new(false));
        let endpoint = serve(leader.clone()).await;
        let mut c = client(&endpoint, true).await;
        let refused = c.watch("k", None).await.map(|_| ()).unwrap_err();
        assert_eq!(
            grpc_status(refused),
            (tonic::Code::Unavailable, "etcdserver: no leader".into())
        );
        // Without the metadata a stream is served regardless.
        let mut plain = client(&endpoint, false).await.watch("k", None).await.unwrap();
        assert!(plain.message().await.unwrap().unwrap().created());

        leader.store(true, Ordering::SeqCst);
        let mut s = c.watch("k", None).await.unwrap();
        assert!(s.message().await.unwrap().unwrap().created());
        // Losing the leader for three checks cancels the stream with etcd's error.
        leader.store(false, Ordering::SeqCst);
        let err =
            tokio::time::timeout(Duration::from_secs(5), s.message()).await.unwrap().unwrap_err();
        assert_eq!(grpc_status(err), (tonic::Code::Unavailable, "etcdserver: no leader".into()));
        let alive = tokio::time::timeout(Duration::from_millis(300), plain.message()).await;
        assert!(alive.is_err(), "the stream without hasleader stays open: {alive:?}");
    }

    fn put_event(key: &str, value_len: usize) -> mvccpb::Event {
        mvccpb::Event {
            r#type: 0,
            kv: Some(mvccpb::KeyValue {
                key: key.into(),
                value: vec![b'x'; value_len],
                mod_revision: 9,
                ..Default::default()
            }),
            prev_kv: None,
        }
    }

    #[test]
    fn large_responses_split_into_fragments_under_the_limit_like_etcd() {
        let base = pb::WatchResponse { watch_id: 3, ..Default::default() };
        let events: Vec<_> = (0..6).map(|i| put_event(&format!("f{i}"), 400_000)).collect();
        // etcd's limit: 1.5 MiB of request plus 512 KiB of gRPC overhead; five 400 kB
        // events fit under it, the sixth goes alone (what etcd 3.5 sends, too).
        let limit = 1_572_864 + 512 * 1024;
        let out = fragments(base.clone(), events.clone(), limit);
        let shape: Vec<(usize, bool)> = out.iter().map(|r| (r.events.len(), r.fragment)).collect();
        assert_eq!(shape, [(5, true), (1, false)]);
        assert!(out.iter().all(|r| r.watch_id == 3 && r.encoded_len() < limit));
        let rejoined: Vec<_> = out.into_iter().flat_map(|r| r.events).collect();
        assert_eq!(rejoined, events);
        // Under the limit, or one event however large: one response, no fragment flag.
        let small = fragments(base.clone(), events[..2].to_vec(), limit);
        assert_eq!(small.len(), 1);
        let huge = fragments(base, vec![put_event("big", 3_000_000)], limit);
        assert_eq!((huge.len(), huge[0].fragment), (1, false));
    }

    #[test]
    fn cancel_reasons_are_etcds_strings() {
        assert_eq!(
            cancel_reason(&WatchError::DuplicateWatchId),
            "mvcc: duplicate watch ID provided on the WatchStream"
        );
        assert_eq!(cancel_reason(&WatchError::EmptyRange), "mvcc: watcher range is empty");
        assert_eq!(
            cancel_reason(&WatchError::Compacted),
            "etcdserver: mvcc: required revision has been compacted"
        );
    }
}
