//! Member and cluster identity, derived from peer URLs and the cluster token exactly as etcd
//! derives them (server/etcdserver/api/membership/member.go computeMemberID and cluster.go
//! genID), so a Cairn member in an etcd-shaped deployment gets the id etcd would give it;
//! plus what a joining member learned ([`Join`]) and etcd's membership errors.
//!
//! Not to be confused with `reconfigure.rs` (the membership operations) or
//! `apply/members.rs` (the replicated member records and how entries change them).

use sha1::{Digest, Sha1};

pub use crate::apply::Member;

/// What a member joining an existing cluster learned from a running member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Join {
    /// The cluster's id.
    pub cluster_id: u64,
    /// This member's id, as `MemberAdd` recorded it.
    pub member_id: u64,
    /// The members as the running member knows them.
    pub members: Vec<Member>,
}

/// etcd's membership errors (server/etcdserver/api/membership/errors.go, v3rpc rpctypes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MemberError {
    /// A member with this id exists.
    #[error("member ID already exist")]
    IdExists,
    /// Another member has one of these peer URLs.
    #[error("Peer URLs already exists")]
    PeerUrlExists,
    /// No member has this id.
    #[error("member not found")]
    NotFound,
    /// The peer URLs are not `http(s)://host:port`.
    #[error("given member URLs are invalid")]
    BadUrls,
    /// `--max-learners` reached.
    #[error("too many learner members in cluster")]
    TooManyLearners,
    /// Promote of a voter.
    #[error("can only promote a learner member")]
    NotLearner,
    /// Promote of a learner that lags the leader.
    #[error("can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    /// The change would leave too few started voters for a quorum.
    #[error("re-configuration failed due to not enough started members")]
    NotEnoughStarted,
    /// A peer belongs to another cluster.
    #[error("cluster ID mismatch")]
    ClusterIdMismatch,
}

fn first_8_bytes_be(digest: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    for (dst, src) in b.iter_mut().zip(digest) {
        *dst = *src;
    }
    u64::from_be_bytes(b)
}

/// Computes a member id: SHA-1 over the sorted peer URLs concatenated, then the token; the
/// id is the digest's first 8 bytes, big-endian.
pub fn member_id(peer_urls: &[String], token: &str) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let mut h = Sha1::new();
    h.update(urls.concat().as_bytes());
    h.update(token.as_bytes());
    first_8_bytes_be(&h.finalize())
}

/// Computes a cluster id: SHA-1 over the sorted member ids as 8-byte big-endian values.
pub fn cluster_id(member_ids: &[u64]) -> u64 {
    let mut ids = member_ids.to_vec();
    ids.sort_unstable();
    let mut h = Sha1::new();
    for id in ids {
        h.update(id.to_be_bytes());
    }
    first_8_bytes_be(&h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_match_a_default_etcd() {
        // A default `etcd` prints member 8e9e05c52164694d in cluster cdf818194e3a8c32.
        let id = member_id(&["http://localhost:2380".to_owned()], "etcd-cluster");
        assert_eq!(format!("{id:x}"), "8e9e05c52164694d");
        assert_eq!(format!("{:x}", cluster_id(&[id])), "cdf818194e3a8c32");
    }

    #[test]
    fn member_id_ignores_peer_url_order() {
        let a = member_id(&["http://b:1".into(), "http://a:1".into()], "t");
        let b = member_id(&["http://a:1".into(), "http://b:1".into()], "t");
        assert_eq!(a, b);
    }
}
