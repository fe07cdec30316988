//! Member records: the cluster's membership as state-machine data, and how apply changes
//! them (conf-change entries, `MemberPublish`, `MemberUpdate`).
//!
//! Records live in the `Members` keyspace (member id, big-endian, to an encoded
//! `etcdserverpb.Member`), so they are written in the same atomic batch as the entry that
//! changes them and travel inside snapshots. Raft's own conf state follows them: apply hands
//! each applied conf change back to the raft task.

use cairn_proto::etcdserverpb as pb;
use cairn_proto::internal::ConfChangeContext;
use prost::Message as _;
use tokio::sync::watch;

use super::{ApplyResult, Error, Response};
use crate::mvcc;
use crate::raft::{ConfChange, ConfChangeType};
use crate::storage::{Batch, Engine, Keyspace, Scan};

/// A cluster member as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Member {
    /// The member id.
    pub id: u64,
    /// The member's name; empty until the member has started and published it.
    pub name: String,
    /// Peer URLs.
    pub peer_urls: Vec<String>,
    /// Client URLs; empty until the member has started and published them.
    pub client_urls: Vec<String>,
    /// True for a learner (non-voting) member.
    pub is_learner: bool,
}

impl From<pb::Member> for Member {
    fn from(m: pb::Member) -> Self {
        Member {
            id: m.id,
            name: m.name,
            peer_urls: m.peer_ur_ls,
            client_urls: m.client_ur_ls,
            is_learner: m.is_learner,
        }
    }
}

impl From<&Member> for pb::Member {
    fn from(m: &Member) -> Self {
        pb::Member {
            id: m.id,
            name: m.name.clone(),
            peer_ur_ls: m.peer_urls.clone(),
            client_ur_ls: m.client_urls.clone(),
            is_learner: m.is_learner,
        }
    }
}

/// Loads every member record, ordered by id.
///
/// # Errors
/// Storage errors, or [`mvcc::Error::Corrupt`] when a record does not decode.
pub fn load(engine: &dyn Engine) -> Result<Vec<Member>, mvcc::Error> {
    let mut out = Vec::new();
    let mut bad = None;
    engine.scan(Keyspace::Members, b"", None, &mut |_, v| match pb::Member::decode(v) {
        Ok(m) => {
            out.push(Member::from(m));
            Scan::Continue
        }
        Err(e) => {
            bad = Some(e);
            Scan::Stop
        }
    })?;
    match bad {
        Some(e) => Err(mvcc::Error::Corrupt(format!("member record: {e}"))),
        None => Ok(out),
    }
}

/// Adds the write of `m`'s record to `batch`.
pub fn put(batch: &mut Batch, m: &Member) {
    batch.put(Keyspace::Members, m.id.to_be_bytes().to_vec(), pb::Member::from(m).encode_to_vec());
}

/// Adds the removal of member `id`'s record to `batch`.
pub fn delete(batch: &mut Batch, id: u64) {
    batch.delete(Keyspace::Members, id.to_be_bytes().to_vec());
}

/// The member records as of the applied index, and where apply publishes them.
///
/// Apply owns the only writable copy: conf-change entries and the `MemberPublish` /
/// `MemberUpdate` requests change it, each writing the changed record into the entry's
/// batch, and every change is published to the rest of the member (the server's member
/// list, the transport's address book).
pub struct Members {
    /// The records, ordered by id.
    records: Vec<Member>,
    /// Hears the records after each change.
    publish: watch::Sender<Vec<Member>>,
}

impl Members {
    /// Takes the records `publish` holds (recovered at start) as the applied ones.
    pub fn new(publish: watch::Sender<Vec<Member>>) -> Self {
        let records = publish.borrow().clone();
        Self { records, publish }
    }

    /// Publishes the records as they are now.
    pub(super) fn publish(&self) {
        self.publish.send_replace(self.records.clone());
    }

    /// Replaces the records with those of an installed snapshot and publishes them.
    pub(super) fn replace(&mut self, records: Vec<Member>) {
        self.records = records;
        self.publish();
    }

    /// Applies a conf-change entry's data to the records; returns the proposer's wait id
    /// with its result, and the change raft must apply (`None` when it was refused, and
    /// raft's configuration then stays as it is). The caller publishes once the entry's
    /// batch is committed, so the records never run ahead of storage.
    pub(super) fn apply_conf_change(
        &mut self,
        batch: &mut Batch,
        index: u64,
        data: &[u8],
    ) -> Option<(u64, ApplyResult, Option<ConfChange>)> {
        use protobuf::Message as _;
        let cc = match ConfChange::parse_from_bytes(data) {
            Ok(cc) => cc,
            Err(e) => {
                tracing::error!(index, error = %e, "skipping undecodable conf change");
                return None;
            }
        };
        let ctx = ConfChangeContext::decode(cc.get_context()).unwrap_or_default();
        let id = cc.node_id;
        let existing = self.records.iter().position(|m| m.id == id);
        let refuse = |reason| Err(Error::Membership { id, reason });
        let res = match (cc.get_change_type(), existing) {
            (ConfChangeType::AddNode | ConfChangeType::AddLearnerNode, None) => {
                let mut m: Member = ctx.member.unwrap_or_default().into();
                m.id = id;
                m.is_learner = cc.get_change_type() == ConfChangeType::AddLearnerNode;
                put(batch, &m);
                self.records.push(m);
                Ok(())
            }
            (ConfChangeType::AddNode, Some(i)) => match self.records.get_mut(i) {
                // Promotion of a learner.
                Some(m) if m.is_learner => {
                    m.is_learner = false;
                    put(batch, m);
                    Ok(())
                }
                _ => refuse("member ID already exist"),
            },
            (ConfChangeType::AddLearnerNode, Some(_)) => refuse("member ID already exist"),
            (ConfChangeType::RemoveNode, Some(i)) => {
                self.records.remove(i);
                delete(batch, id);
                Ok(())
            }
            (ConfChangeType::RemoveNode, None) => refuse("member not found"),
        };
        self.records.sort_by_key(|m| m.id);
        let ok = res.is_ok();
        let res = res.map(|()| Response::Members(self.records.clone()));
        Some((ctx.id, res, ok.then_some(cc)))
    }

    /// Records a member's name and client URLs (etcd's publish after start) and publishes
    /// the records at once.
    pub(super) fn publish_member(&mut self, batch: &mut Batch, m: Member) -> ApplyResult {
        let Some(rec) = self.records.iter_mut().find(|r| r.id == m.id) else {
            return Err(Error::Membership { id: m.id, reason: "member not found" });
        };
        rec.name = m.name;
        rec.client_urls = m.client_urls;
        put(batch, rec);
        self.publish();
        Ok(Response::Members(self.records.clone()))
    }

    /// Replaces a member's peer URLs (etcd's MemberUpdate; the learner flag is kept) and
    /// publishes the records at once.
    pub(super) fn update_member(
        &mut self,
        batch: &mut Batch,
        id: u64,
        peer_urls: Vec<String>,
    ) -> ApplyResult {
        let Some(rec) = self.records.iter_mut().find(|r| r.id == id) else {
            return Err(Error::Membership { id, reason: "member not found" });
        };
        rec.peer_urls = peer_urls;
        put(batch, rec);
        self.publish();
        Ok(Response::Members(self.records.clone()))
    }
}
