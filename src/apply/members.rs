//! Member records: the cluster's membership as state-machine data.
//!
//! Records live in the `Members` keyspace (member id, big-endian, to an encoded
//! `etcdserverpb.Member`), so they are written in the same atomic batch as the entry that
//! changes them and travel inside snapshots. Raft's own conf state follows them: apply hands
//! each applied conf change back to the raft task.

use cairn_proto::etcdserverpb as pb;
use prost::Message as _;

use crate::mvcc;
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
