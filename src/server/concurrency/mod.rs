//! etcd's concurrency recipes (clientv3/concurrency, served by etcd's v3lock and
//! v3election) built on the server's own typed methods: every step is a `txn`, `range` or
//! `delete_range` proposed or read exactly as a client's, and waiting is a watcher on the
//! member's own watch hub.
//!
//! It lives inside `server` rather than beside it because the edge may import only
//! `server` (DESIGN.md's `grpc → server` arrow, enforced by `tests/layering.rs`), and the
//! recipes are member-side behaviour the edge calls like any other typed method; yet it
//! reaches nothing below the server but what `kv.rs` and `lease.rs` already expose, so it
//! adds no new dependency on the state machines.
//!
//! The semantics are etcd's: a contender's key is `<name>/<lease in hex>`, created with the
//! caller's lease under a `create_revision == 0` compare; the owner is the key with the
//! lowest create revision under the prefix, and a contender waits until every key with a
//! lower create revision is deleted (`wait_deletes`). Unlike etcd's server, which cleans up
//! only when the client's context ends while it waits, a waiter whose request future is
//! dropped at any point, even while its key's creation is being committed ([`Server::enter`]),
//! deletes the key ([`Withdraw`]), so a disconnected client leaves no stale waiter.

mod election;
mod lock;

use std::sync::Arc;

use cairn_proto::etcdserverpb::{self as pb, compare, range_request, request_op};

use super::types::{
    CreateRequest, EventKind, KeyValue, RangeResult, ResponseKind, TxnOpResult, TxnResult,
};
use super::{Error, Server};

pub use self::election::{Campaigned, LeaderKey, LeaderState};
pub use self::lock::Locked;

/// The TTL of the lease granted for a request naming lease 0 (etcd's session default).
const SESSION_TTL: i64 = 60;

/// The pause before a read that found no leader is tried again.
const READ_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

/// The key of the lease `lease` under `prefix`: etcd's `fmt.Sprintf("%s%x", pfx, lease)`.
fn contender_key(prefix: &[u8], lease: i64) -> Vec<u8> {
    let hex = if lease < 0 { format!("-{:x}", lease.unsigned_abs()) } else { format!("{lease:x}") };
    [prefix, hex.as_bytes()].concat()
}

/// `name` followed by `/`, the prefix under which contenders' keys live.
fn prefix_of(name: &[u8]) -> Vec<u8> {
    [name, b"/"].concat()
}

/// The end of the range of every key starting with `prefix` (etcd's `GetPrefixRangeEnd`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A range of the single key under `prefix` with the lowest (`first`) or highest create
/// revision, limited to create revisions up to `max_create_rev` when it is positive.
fn by_create(prefix: &[u8], first: bool, max_create_rev: i64) -> pb::RangeRequest {
    let order =
        if first { range_request::SortOrder::Ascend } else { range_request::SortOrder::Descend };
    pb::RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_end(prefix),
        limit: 1,
        sort_order: order as i32,
        sort_target: range_request::SortTarget::Create as i32,
        max_create_revision: max_create_rev.max(0),
        ..Default::default()
    }
}

/// A compare holding when `key`'s create revision is `rev` (0: the key does not exist).
fn created_at(key: &[u8], rev: i64) -> pb::Compare {
    pb::Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key: key.to_vec(),
        range_end: Vec::new(),
        target_union: Some(compare::TargetUnion::CreateRevision(rev)),
    }
}

/// A txn op.
fn op(request: request_op::Request) -> pb::RequestOp {
    pb::RequestOp { request: Some(request) }
}

/// A txn op reading one key.
fn get(key: &[u8]) -> pb::RequestOp {
    op(request_op::Request::RequestRange(pb::RangeRequest {
        key: key.to_vec(),
        ..Default::default()
    }))
}

/// A txn op deleting one key.
fn delete(key: &[u8]) -> pb::RequestOp {
    op(request_op::Request::RequestDeleteRange(pb::DeleteRangeRequest {
        key: key.to_vec(),
        ..Default::default()
    }))
}

/// The create revision of the contender's key after its entry txn (`created_at(key, 0)`,
/// then a put on success or a read of the key first on failure): the txn's revision when it
/// created the key, else the existing key's.
fn entered_revision(res: &TxnResult) -> Option<i64> {
    if res.succeeded {
        Some(res.revision)
    } else {
        range_kvs(res, 0)?.first().map(|kv| kv.create_revision)
    }
}

/// The key-values of the txn's `i`th op, when it was a range.
fn range_kvs(res: &TxnResult, i: usize) -> Option<&[KeyValue]> {
    match res.responses.get(i) {
        Some(TxnOpResult::Range(r)) => Some(&r.kvs),
        _ => None,
    }
}

/// The error for a txn answer of an unexpected shape: a bug, reported rather than panicked on.
fn malformed() -> Error {
    Error::Internal("unexpected txn result in a concurrency recipe".into())
}

/// Deletes a contender's key when dropped armed: the cleanup of a waiter whose request
/// ended (client gone, error) before it owned what it waited for. The delete is guarded by
/// the key's create revision, so it never removes a later generation of the key.
struct Withdraw {
    server: Arc<Server>,
    key: Vec<u8>,
    rev: i64,
    armed: bool,
}

impl Withdraw {
    /// An armed guard over `key`, created at `rev`.
    fn new(server: &Arc<Server>, key: &[u8], rev: i64) -> Self {
        Withdraw { server: server.clone(), key: key.to_vec(), rev, armed: true }
    }

    /// Leaves the key in place.
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Withdraw {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let (server, key, rev) = (self.server.clone(), std::mem::take(&mut self.key), self.rev);
        rt.spawn(async move {
            let txn = pb::TxnRequest {
                compare: vec![created_at(&key, rev)],
                success: vec![delete(&key)],
                failure: Vec::new(),
            };
            if let Err(e) = server.txn(txn).await {
                tracing::warn!(error = %e, "could not delete an abandoned lock or election key");
            }
        });
    }
}

impl Server {
    /// Runs a contender's entry txn for `key` (see [`entered_revision`]) to its end even if
    /// the caller leaves meanwhile: the txn runs in its own task, and when its answer finds
    /// the caller gone, the key it entered is withdrawn at once. A future dropped while the
    /// proposal was in flight would otherwise leave the key waiting in line until its lease
    /// expired, with no [`Withdraw`] yet to clean it up.
    async fn enter(self: &Arc<Self>, key: &[u8], txn: pb::TxnRequest) -> Result<TxnResult, Error> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (server, key) = (self.clone(), key.to_vec());
        tokio::spawn(async move {
            if let Err(Ok(res)) = tx.send(server.txn(txn).await)
                && let Some(rev) = entered_revision(&res)
            {
                drop(Withdraw::new(&server, &key, rev));
            }
        });
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// The lease a request runs under: `lease`, or for 0 a new lease of etcd's session TTL
    /// (etcd's server opens a session, which grants one).
    async fn session_lease(&self, lease: i64) -> Result<i64, Error> {
        if lease != 0 {
            return Ok(lease);
        }
        Ok(self.lease_grant(0, SESSION_TTL).await?.0)
    }

    /// Reads `req`, retrying while no leader is known or the read timed out, as etcd's
    /// in-process client retries its reads on `Unavailable`: a raft election in the middle
    /// of a long wait does not fail it. The caller bounds the wait by going away.
    async fn range_retrying(&self, req: &pb::RangeRequest) -> Result<RangeResult, Error> {
        loop {
            match self.range(req).await {
                Err(Error::NoLeader | Error::Timeout) => tokio::time::sleep(READ_RETRY).await,
                res => return res,
            }
        }
    }

    /// Waits until no key under `prefix` has a create revision at or below
    /// `max_create_rev` (etcd's `waitDeletes`): reads the newest such key, watches it from
    /// the read's revision until it is deleted, and reads again. Returns the revision of
    /// the last read.
    async fn wait_deletes(&self, prefix: &[u8], max_create_rev: i64) -> Result<i64, Error> {
        loop {
            let res = self.range_retrying(&by_create(prefix, false, max_create_rev)).await?;
            let Some(kv) = res.kvs.into_iter().next() else { return Ok(res.revision) };
            self.wait_delete(kv.key, res.revision).await?;
        }
    }

    /// Waits for a delete of `key` at or after `rev`. A watcher cancelled by compaction
    /// returns too: the caller reads the key's state again.
    async fn wait_delete(&self, key: Vec<u8>, rev: i64) -> Result<(), Error> {
        let (stream, mut source) = self.open_watch_stream();
        stream.create(CreateRequest { key, start_revision: rev, ..Default::default() }).await;
        loop {
            let Some(resp) = source.next().await else { return Err(Error::Stopped) };
            match resp.kind {
                ResponseKind::Events { events, .. } => {
                    if events.iter().any(|e| e.kind == EventKind::Delete) {
                        return Ok(());
                    }
                }
                ResponseKind::Compacted { .. } => return Ok(()),
                ResponseKind::Refused(e) | ResponseKind::Failed(e) => {
                    return Err(Error::Internal(format!("watch: {e}")));
                }
                ResponseKind::Created | ResponseKind::Canceled | ResponseKind::Progress => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_ranges_are_etcds() {
        assert_eq!(contender_key(b"l/", 0x694d_8a3b_1c2f), b"l/694d8a3b1c2f");
        assert_eq!(contender_key(b"l/", -1), b"l/-1");
        assert_eq!(prefix_end(b"a/"), b"a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_of(b"x"), b"x/");
    }
}
