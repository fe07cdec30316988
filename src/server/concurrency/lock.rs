//! etcd's distributed mutex (clientv3/concurrency `Mutex`, served by v3lock's `Lock`).

use std::sync::Arc;

use cairn_proto::etcdserverpb::{self as pb, request_op};

use super::{
    Withdraw, by_create, contender_key, created_at, entered_revision, get, malformed, op,
    prefix_of, range_kvs,
};
use crate::server::{Error, Server};

/// A lock acquired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locked {
    /// The owner key, `<name>/<lease in hex>`; deleting it releases the lock.
    pub key: Vec<u8>,
    /// The revision of the read or write that established ownership (the header revision).
    pub revision: i64,
}

impl Server {
    /// Blocks until the caller owns lock `name` under `lease` (0: a new 60 s lease) and
    /// returns its owner key, as etcd's `Mutex.Lock`. Ownership goes by the lowest create
    /// revision under `<name>/`; each waiter waits only for the keys created before its own,
    /// so the lock passes in request order. Dropping the future before it resolves deletes
    /// the waiter's key.
    ///
    /// # Errors
    /// [`Error::LeaseNotFound`] for an unknown lease, [`Error::LockSessionExpired`] when the
    /// caller's key vanished (its lease expired) while it waited, or the reads' and
    /// proposals' errors.
    pub async fn lock(self: &Arc<Self>, name: &[u8], lease: i64) -> Result<Locked, Error> {
        let lease = self.session_lease(lease).await?;
        let prefix = prefix_of(name);
        let key = contender_key(&prefix, lease);
        let put = op(request_op::Request::RequestPut(pb::PutRequest {
            key: key.clone(),
            lease,
            ..Default::default()
        }));
        let owner = op(request_op::Request::RequestRange(by_create(&prefix, true, 0)));
        let entry = pb::TxnRequest {
            compare: vec![created_at(&key, 0)],
            success: vec![put, owner.clone()],
            failure: vec![get(&key), owner],
        };
        let res = self.enter(&key, entry).await?;
        // On failure this lease already holds or waits for the lock: its key is reused.
        let my_rev = entered_revision(&res).ok_or_else(malformed)?;
        let owner_rev =
            range_kvs(&res, 1).ok_or_else(malformed)?.first().map(|kv| kv.create_revision);
        if owner_rev.is_none_or(|rev| rev == my_rev) {
            return Ok(Locked { key, revision: res.revision });
        }
        // From here until ownership, an error or a dropped future withdraws the key.
        let guard = Withdraw::new(self, &key, my_rev);
        self.wait_deletes(&prefix, my_rev - 1).await?;
        let got = self
            .range_retrying(&pb::RangeRequest { key: key.clone(), ..Default::default() })
            .await?;
        guard.disarm();
        if got.kvs.is_empty() {
            return Err(Error::LockSessionExpired);
        }
        Ok(Locked { key, revision: got.revision })
    }
}
