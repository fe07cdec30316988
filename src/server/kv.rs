//! The key-value requests the edge makes: reads (linearizable or serializable) and writes
//! proposed through raft, each returning its own result type, plus the watch and hash
//! entry points over the same keyspace.
//!
//! The edge validates requests first (etcd's `check*Request`); the checks here are the ones
//! that need the member: the learner refusal, the conversion of etcd's enums to domain
//! values (so a bad txn never reaches the log) and the read barrier.

use cairn_proto::etcdserverpb as pb;
use cairn_proto::internal::internal_request::Op;

use super::types::{
    DeleteRangeResult, PutResult, RangeRequest, RangeResult, ResponseSource, TxnResult, WatchStats,
    WatchStream,
};
use super::{Error, Server};
use crate::apply::{Response, convert};

/// The error for an apply result of the wrong kind: a bug, reported rather than panicked on.
fn mismatch() -> Error {
    Error::Internal("unexpected apply result".into())
}

impl Server {
    /// Converts `r` to a domain range and, unless it is serializable, waits until this
    /// member may serve it (raft ReadIndex); the returned request reads with
    /// [`Server::read`].
    ///
    /// # Errors
    /// [`Error::InvalidSortOption`], [`Error::Learner`] for a linearizable read on a learner
    /// (etcd's learners serve serializable reads only), or the barrier's errors.
    pub async fn prepare_range(&self, r: &pb::RangeRequest) -> Result<RangeRequest, Error> {
        let req = convert::range_request(r)?;
        if !r.serializable {
            if self.is_learner() {
                return Err(Error::Learner);
            }
            self.linearizable_barrier().await?;
        }
        // After the barrier, so the check sees every auth change committed before the read.
        self.check_read(&r.key, &r.range_end).await?;
        Ok(req)
    }

    /// Serves etcd's Range: [`Server::prepare_range`], then [`Server::read`].
    ///
    /// # Errors
    /// As those two.
    pub async fn range(&self, r: &pb::RangeRequest) -> Result<RangeResult, Error> {
        let req = self.prepare_range(r).await?;
        self.read(&req)
    }

    /// Reads `req` from the local state machine at once.
    ///
    /// # Errors
    /// [`Error::Stopped`] once the member failed (its state stopped following the log),
    /// [`Error::Compacted`], [`Error::FutureRevision`] or [`Error::Storage`].
    pub fn read(&self, req: &RangeRequest) -> Result<RangeResult, Error> {
        self.refuse_if_failed()?;
        Ok(self.kv.range(req)?)
    }

    /// The revision of the newest committed write this member applied.
    pub fn current_revision(&self) -> i64 {
        self.kv.current_revision()
    }

    /// Writes one key through raft.
    ///
    /// # Errors
    /// [`Error::Learner`], the proposal's errors, or the put's ([`Error::KeyNotFound`] for
    /// `ignore_*` on a missing key, [`Error::LeaseNotFound`]).
    pub async fn put(&self, r: pb::PutRequest) -> Result<PutResult, Error> {
        match self.propose_from_client(Op::Put(r)).await? {
            Response::Put(res) => Ok(res),
            _ => Err(mismatch()),
        }
    }

    /// Deletes a key or range through raft.
    ///
    /// # Errors
    /// [`Error::Learner`] or the proposal's errors.
    pub async fn delete_range(
        &self,
        r: pb::DeleteRangeRequest,
    ) -> Result<DeleteRangeResult, Error> {
        match self.propose_from_client(Op::DeleteRange(r)).await? {
            Response::DeleteRange(res) => Ok(res),
            _ => Err(mismatch()),
        }
    }

    /// Runs a transaction through raft. Its enums are converted before proposing, so a bad
    /// request never reaches the log.
    ///
    /// # Errors
    /// [`Error::InvalidSortOption`] / [`Error::InvalidCompare`] / [`Error::KeyNotFound`]
    /// for an op without request, [`Error::Learner`], the proposal's or the txn's errors.
    pub async fn txn(&self, r: pb::TxnRequest) -> Result<TxnResult, Error> {
        convert::txn_request(&r)?;
        match self.propose_from_client(Op::Txn(r)).await? {
            Response::Txn(res) => Ok(res),
            _ => Err(mismatch()),
        }
    }

    /// Compacts the keyspace's history up to `r.revision` through raft.
    ///
    /// # Errors
    /// [`Error::Compacted`], [`Error::FutureRevision`], [`Error::Learner`] or the
    /// proposal's errors.
    ///
    /// With `r.physical` the answer waits until this member has also deleted the compacted
    /// records (they leave storage in background batches otherwise).
    pub async fn compact(&self, r: pb::CompactionRequest) -> Result<(), Error> {
        let (revision, physical) = (r.revision, r.physical);
        match self.propose_from_client(Op::Compaction(r)).await? {
            Response::Compact if physical => {
                let kv = self.kv.clone();
                tokio::task::spawn_blocking(move || kv.wait_compacted(revision))
                    .await
                    .map_err(|_| Error::Stopped)??;
                Ok(())
            }
            Response::Compact => Ok(()),
            _ => Err(mismatch()),
        }
    }

    /// Hashes the keyspace at `revision` (the current one when `<= 0`); returns the hash,
    /// the compaction revision and the revision hashed.
    ///
    /// # Errors
    /// [`Error::Stopped`] once the member failed, [`Error::Compacted`],
    /// [`Error::FutureRevision`] or [`Error::Storage`].
    pub fn hash_kv(&self, revision: i64) -> Result<(u32, i64, i64), Error> {
        self.refuse_if_failed()?;
        Ok(self.kv.hash_kv(revision)?)
    }

    /// Opens one watch stream: the request side takes creates, cancels and progress
    /// requests, the response side yields what the stream's watchers see.
    pub fn open_watch_stream(&self) -> (WatchStream, ResponseSource) {
        self.watch.open_stream()
    }

    /// Counts of watchers, streams and queued events, for metrics.
    pub fn watch_stats(&self) -> WatchStats {
        self.watch.stats()
    }

    /// Proposes a client's write: learners refuse writes, as etcd's do.
    async fn propose_from_client(&self, op: Op) -> Result<Response, Error> {
        if self.is_learner() {
            return Err(Error::Learner);
        }
        self.propose(op).await
    }
}
