//! etcd's `KV` service: validate, call the server, map errors.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;

use cairn_proto::etcdserverpb::{self as pb, kv_server::Kv};
use tonic::{Request, Response, Status};

use super::{convert, status, validate};
use crate::server::Server;
use crate::server::types::RangeRequest;

/// The KV service over one server.
#[derive(Debug, Clone)]
pub struct KvService {
    server: Arc<Server>,
}

impl KvService {
    /// Creates the service.
    pub fn new(server: Arc<Server>) -> Self {
        Self { server }
    }
}

/// Keys per RangeStream chunk: bounds the memory one streaming read holds at a time.
const STREAM_CHUNK: i64 = 1000;

/// Where a RangeStream continues.
struct StreamState {
    server: Arc<Server>,
    req: RangeRequest,
    /// Keys still allowed by the client's limit (`None` = no limit).
    remaining: Option<i64>,
    /// `count` of the first page: the whole range at the pinned revision.
    count: Option<i64>,
    done: bool,
}

/// Produces the next chunk of a RangeStream: a page at the pinned revision, continuing
/// after the last key sent. The final chunk carries header, `more` and `count`.
fn next_chunk(
    mut st: StreamState,
) -> Option<(Result<pb::RangeStreamResponse, Status>, StreamState)> {
    if st.done {
        return None;
    }
    let page = st.remaining.map_or(STREAM_CHUNK, |r| r.min(STREAM_CHUNK));
    let mut req = st.req.clone();
    req.limit = page;
    let res = match st.server.read(&req) {
        Ok(res) => res,
        Err(e) => {
            st.done = true;
            return Some((Err(status::from_server(e)), st));
        }
    };
    let count = *st.count.get_or_insert(res.count);
    if let Some(r) = st.remaining.as_mut() {
        *r -= i64::try_from(res.kvs.len()).unwrap_or(i64::MAX);
    }
    let exhausted = st.remaining.is_some_and(|r| r <= 0);
    let last = !res.more || exhausted || st.req.range_end.is_empty() || res.kvs.is_empty();
    if let Some(kv) = res.kvs.last() {
        let mut next = kv.key.clone();
        next.push(0);
        st.req.key = next;
    }
    let header = st.server.header();
    let mut chunk = convert::range(header, res);
    if last {
        st.done = true;
        chunk.count = count;
        // `more` on the final chunk: keys remain beyond the client's limit.
        chunk.more = exhausted && chunk.more;
    } else {
        chunk.header = None;
        chunk.more = false;
        chunk.count = 0;
    }
    Some((Ok(pb::RangeStreamResponse { range_response: Some(chunk) }), st))
}

#[tonic::async_trait]
impl Kv for KvService {
    type RangeStreamStream =
        Pin<Box<dyn Stream<Item = Result<pb::RangeStreamResponse, Status>> + Send + 'static>>;

    async fn range_stream(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        super::leader::require_leader(&request, &self.server)?;
        let r = request.into_inner();
        validate::check_range_stream(&r)?;
        let mut req = self.server.prepare_range(&r).await.map_err(status::from_server)?;
        // Pin every page to one revision so the chunks form one consistent view.
        if req.revision <= 0 {
            req.revision = self.server.current_revision();
        }
        let st = StreamState {
            server: self.server.clone(),
            remaining: (req.limit > 0).then_some(req.limit),
            req,
            count: None,
            done: false,
        };
        let stream = futures::stream::unfold(st, |st| async move { next_chunk(st) });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn range(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        super::leader::require_leader(&request, &self.server)?;
        let r = request.into_inner();
        validate::check_range(&r)?;
        let res = self.server.range(&r).await.map_err(status::from_server)?;
        Ok(Response::new(convert::range(self.server.header(), res)))
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        super::leader::require_leader(&request, &self.server)?;
        let r = request.into_inner();
        validate::check_put(&r)?;
        let res = self.server.put(r).await.map_err(status::from_server)?;
        Ok(Response::new(convert::put(self.server.header(), res)))
    }

    async fn delete_range(
        &self,
        request: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        super::leader::require_leader(&request, &self.server)?;
        let r = request.into_inner();
        validate::check_delete(&r)?;
        let res = self.server.delete_range(r).await.map_err(status::from_server)?;
        Ok(Response::new(convert::delete_range(self.server.header(), res)))
    }

    async fn txn(
        &self,
        request: Request<pb::TxnRequest>,
    ) -> Result<Response<pb::TxnResponse>, Status> {
        super::leader::require_leader(&request, &self.server)?;
        let r = request.into_inner();
        let max_ops = usize::try_from(self.server.config().raw.max_txn_ops).unwrap_or(usize::MAX);
        validate::check_txn(&r, max_ops)?;
        let res = self.server.txn(r).await.map_err(status::from_server)?;
        Ok(Response::new(convert::txn(self.server.header(), res)))
    }

    async fn compact(
        &self,
        request: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        super::leader::require_leader(&request, &self.server)?;
        let r = request.into_inner();
        self.server.compact(r).await.map_err(status::from_server)?;
        Ok(Response::new(pb::CompactionResponse { header: convert::current_header(&self.server) }))
    }
}
