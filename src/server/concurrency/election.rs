//! etcd's leader election (clientv3/concurrency `Election`, served by v3election).

use std::sync::Arc;

use cairn_proto::etcdserverpb::{self as pb, request_op};
use tokio::sync::mpsc;

use super::{
    Withdraw, by_create, contender_key, created_at, delete, entered_revision, get, malformed, op,
    prefix_end, prefix_of, range_kvs,
};
use crate::server::types::{CreateRequest, EventKind, KeyValue, ResponseKind};
use crate::server::{Error, Server};

/// A leader's key, as etcd's `LeaderKey`: what Proclaim and Resign act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderKey {
    /// The election's name.
    pub name: Vec<u8>,
    /// The leader's key, `<name>/<lease in hex>`.
    pub key: Vec<u8>,
    /// The key's create revision: leadership is this generation of the key.
    pub rev: i64,
    /// The lease the campaign named.
    pub lease: i64,
}

/// A campaign won.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Campaigned {
    /// The leader key.
    pub leader: LeaderKey,
    /// The revision of the campaign's write (etcd's header revision).
    pub revision: i64,
}

/// The leader of an election as Leader and Observe report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderState {
    /// The leader's key-value.
    pub kv: KeyValue,
    /// The header revision.
    pub revision: i64,
}

/// Leadership changes queued per Observe stream before the observer waits for its client.
const OBSERVE_BUFFER: usize = 16;

impl Server {
    /// Blocks until the caller leads election `name` under `lease` (0: a new 60 s lease),
    /// announcing `value`, as etcd's `Election.Campaign`. A lease that already campaigns
    /// reuses its key (and proclaims `value` if it differs). Dropping the future before it
    /// resolves withdraws the candidate's key.
    ///
    /// # Errors
    /// [`Error::LeaseNotFound`], [`Error::ElectionNotLeader`] when a proclaim of the reused
    /// key found it gone, or the reads' and proposals' errors.
    pub async fn campaign(
        self: &Arc<Self>,
        name: &[u8],
        lease: i64,
        value: &[u8],
    ) -> Result<Campaigned, Error> {
        let session = self.session_lease(lease).await?;
        let prefix = prefix_of(name);
        let key = contender_key(&prefix, session);
        let put = op(request_op::Request::RequestPut(pb::PutRequest {
            key: key.clone(),
            value: value.to_vec(),
            lease: session,
            ..Default::default()
        }));
        let entry = pb::TxnRequest {
            compare: vec![created_at(&key, 0)],
            success: vec![put],
            failure: vec![get(&key)],
        };
        let res = self.enter(&key, entry).await?;
        let rev = entered_revision(&res).ok_or_else(malformed)?;
        let leader = |rev| LeaderKey { name: name.to_vec(), key: key.clone(), rev, lease };
        if !res.succeeded {
            let kv = range_kvs(&res, 0).and_then(|kvs| kvs.first()).ok_or_else(malformed)?;
            if kv.value != value
                && let Err(e) = self.proclaim(&leader(rev), value).await
            {
                // etcd resigns and reports the proclaim's error; the resign's own outcome
                // is not reported.
                let _ = self.resign(&leader(rev)).await;
                return Err(e);
            }
        }
        let guard = Withdraw::new(self, &key, rev);
        let waited = self.wait_deletes(&prefix, rev - 1).await;
        // As etcd, a wait that fails for another reason than the caller leaving keeps the key.
        guard.disarm();
        waited?;
        Ok(Campaigned { leader: leader(rev), revision: res.revision })
    }

    /// Replaces the leader's value if `leader` still leads (its key exists at its create
    /// revision); returns the write's revision.
    ///
    /// # Errors
    /// [`Error::ElectionNotLeader`] when it does not lead, or the proposal's errors.
    pub async fn proclaim(&self, leader: &LeaderKey, value: &[u8]) -> Result<i64, Error> {
        let put = op(request_op::Request::RequestPut(pb::PutRequest {
            key: leader.key.clone(),
            value: value.to_vec(),
            ignore_lease: true,
            ..Default::default()
        }));
        let res = self
            .txn(pb::TxnRequest {
                compare: vec![created_at(&leader.key, leader.rev)],
                success: vec![put],
                failure: Vec::new(),
            })
            .await?;
        if !res.succeeded {
            return Err(Error::ElectionNotLeader);
        }
        Ok(res.revision)
    }

    /// Deletes the leader's key if `leader` still leads (no error when it does not, as in
    /// etcd); returns the txn's revision.
    ///
    /// # Errors
    /// The proposal's errors.
    pub async fn resign(&self, leader: &LeaderKey) -> Result<i64, Error> {
        let res = self
            .txn(pb::TxnRequest {
                compare: vec![created_at(&leader.key, leader.rev)],
                success: vec![delete(&leader.key)],
                failure: Vec::new(),
            })
            .await?;
        Ok(res.revision)
    }

    /// The current leader of election `name`: the key with the lowest create revision.
    ///
    /// # Errors
    /// [`Error::ElectionNoLeader`] when nobody leads, or the read's errors.
    pub async fn election_leader(&self, name: &[u8]) -> Result<LeaderState, Error> {
        let res = self.range(&by_create(&prefix_of(name), true, 0)).await?;
        let kv = res.kvs.into_iter().next().ok_or(Error::ElectionNoLeader)?;
        Ok(LeaderState { kv, revision: res.revision })
    }

    /// Streams election `name`'s leadership, as etcd's `Election.Observe`: the current
    /// leader (or the first to appear), then each of its value changes, and on its
    /// resignation the next leader, in order. The stream ends when a read or watch fails;
    /// dropping the receiver stops the observer.
    pub fn observe(self: &Arc<Self>, name: &[u8]) -> mpsc::Receiver<LeaderState> {
        let (tx, rx) = mpsc::channel(OBSERVE_BUFFER);
        let (server, prefix) = (self.clone(), prefix_of(name));
        // The observer reads as its caller (a spawned task leaves the caller's scope).
        let caller = super::super::current_caller().unwrap_or_default();
        tokio::spawn(super::super::with_caller(caller, async move {
            tokio::select! {
                () = tx.closed() => {}
                res = server.observe_loop(&prefix, &tx) => {
                    if let Err(e) = res {
                        tracing::debug!(error = %e, "election observer ended");
                    }
                }
            }
        }));
        rx
    }

    /// The body of [`Server::observe`]; returns when the receiver is gone or on an error.
    async fn observe_loop(
        &self,
        prefix: &[u8],
        tx: &mpsc::Sender<LeaderState>,
    ) -> Result<(), Error> {
        loop {
            let res = self.range_retrying(&by_create(prefix, true, 0)).await?;
            let first = match res.kvs.into_iter().next() {
                Some(kv) => LeaderState { kv, revision: res.revision },
                None => self.first_put(prefix, res.revision).await?,
            };
            let (key, from) = (first.kv.key.clone(), first.revision + 1);
            if tx.send(first).await.is_err() {
                return Ok(());
            }
            // Follow the leader's key until it is deleted.
            let (stream, mut source) = self.open_watch_stream();
            stream.create(CreateRequest { key, start_revision: from, ..Default::default() }).await;
            'leader: loop {
                let Some(resp) = source.next().await else { return Err(Error::Stopped) };
                match resp.kind {
                    ResponseKind::Events { events, .. } => {
                        for ev in events {
                            if ev.kind == EventKind::Delete {
                                break 'leader;
                            }
                            let state = LeaderState { kv: ev.kv.clone(), revision: resp.revision };
                            if tx.send(state).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                    ResponseKind::Created | ResponseKind::Progress => {}
                    other => {
                        return Err(Error::Internal(format!("observe watch ended: {other:?}")));
                    }
                }
            }
        }
    }

    /// Waits for the first put under `prefix` at or after `rev` (an election without a
    /// leader); its header revision is the put's, as etcd reports it.
    async fn first_put(&self, prefix: &[u8], rev: i64) -> Result<LeaderState, Error> {
        let (stream, mut source) = self.open_watch_stream();
        stream
            .create(CreateRequest {
                key: prefix.to_vec(),
                range_end: prefix_end(prefix),
                start_revision: rev,
                ..Default::default()
            })
            .await;
        loop {
            let Some(resp) = source.next().await else { return Err(Error::Stopped) };
            match resp.kind {
                ResponseKind::Events { events, .. } => {
                    if let Some(ev) = events.iter().find(|e| e.kind == EventKind::Put) {
                        let kv = ev.kv.clone();
                        return Ok(LeaderState { revision: kv.mod_revision, kv });
                    }
                }
                ResponseKind::Created | ResponseKind::Progress => {}
                other => return Err(Error::Internal(format!("observe watch ended: {other:?}"))),
            }
        }
    }
}
