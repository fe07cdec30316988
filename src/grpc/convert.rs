//! Conversions from domain results to etcd's response messages.

use cairn_proto::etcdserverpb as pb;
use cairn_proto::mvccpb;

use crate::server::types;
use crate::server::{HeaderInfo, Server};

/// Builds `server`'s response header at the store's current revision, for responses that
/// read or write no particular revision (lease, cluster, maintenance, compaction).
pub fn current_header(server: &Server) -> Option<pb::ResponseHeader> {
    header(server.header(), server.current_revision())
}

/// Builds a response header at `revision`.
pub fn header(h: HeaderInfo, revision: i64) -> Option<pb::ResponseHeader> {
    Some(pb::ResponseHeader {
        cluster_id: h.cluster_id,
        member_id: h.member_id,
        revision,
        raft_term: h.raft_term,
    })
}

/// Converts a key-value.
pub fn kv(kv: types::KeyValue) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: kv.key,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        value: kv.value,
        lease: kv.lease,
    }
}

/// Converts a range result.
pub fn range(h: HeaderInfo, r: types::RangeResult) -> pb::RangeResponse {
    pb::RangeResponse {
        header: header(h, r.revision),
        kvs: r.kvs.into_iter().map(kv).collect(),
        more: r.more,
        count: r.count,
    }
}

/// Converts a put result.
pub fn put(h: HeaderInfo, r: types::PutResult) -> pb::PutResponse {
    pb::PutResponse { header: header(h, r.revision), prev_kv: r.prev_kv.map(kv) }
}

/// Converts a delete result.
pub fn delete_range(h: HeaderInfo, r: types::DeleteRangeResult) -> pb::DeleteRangeResponse {
    pb::DeleteRangeResponse {
        header: header(h, r.revision),
        deleted: r.deleted,
        prev_kvs: r.prev_kvs.into_iter().map(kv).collect(),
    }
}

/// Converts a txn result.
///
/// As in etcd, only the top-level header names the member, cluster and term: the headers of
/// the ops inside carry just their revision, and a nested txn's header is empty.
pub fn txn(h: HeaderInfo, r: types::TxnResult) -> pb::TxnResponse {
    let mut resp = txn_ops(r);
    resp.header = header(h, resp.header.map_or(0, |hd| hd.revision));
    resp
}

/// Converts a txn's ops; the returned header holds only the txn's revision.
fn txn_ops(r: types::TxnResult) -> pb::TxnResponse {
    use pb::response_op::Response as R;
    let bare = HeaderInfo { cluster_id: 0, member_id: 0, raft_term: 0 };
    let responses = r
        .responses
        .into_iter()
        .map(|op| pb::ResponseOp {
            response: Some(match op {
                types::TxnOpResult::Range(x) => R::ResponseRange(range(bare, x)),
                types::TxnOpResult::Put(x) => R::ResponsePut(put(bare, x)),
                types::TxnOpResult::DeleteRange(x) => R::ResponseDeleteRange(delete_range(bare, x)),
                types::TxnOpResult::Txn(x) => {
                    R::ResponseTxn(pb::TxnResponse { header: header(bare, 0), ..txn_ops(x) })
                }
            }),
        })
        .collect();
    pb::TxnResponse { header: header(bare, r.revision), succeeded: r.succeeded, responses }
}
