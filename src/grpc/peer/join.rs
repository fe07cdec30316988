//! Joining: the calls a starting member makes to the members listed in
//! `--initial-cluster`, to learn their cluster id or the cluster it joins.

use std::time::Duration;

use cairn_proto::internal::MembersRequest;

use super::{channel, client};
use crate::server::{Join, Member};

/// Asks the other members listed in `--initial-cluster` for their cluster id; `None` when
/// none answers.
pub async fn remote_cluster_id(peer_urls: &[String], initial_cluster: &[String]) -> Option<u64> {
    for url in initial_cluster.iter().filter(|u| !peer_urls.contains(u)) {
        let Some(ch) = channel(url) else { continue };
        if let Ok(resp) = client(ch).members(MembersRequest {}).await {
            return Some(resp.into_inner().cluster_id);
        }
    }
    None
}

/// Asks the members listed in `--initial-cluster` (other than this one) for the cluster a
/// member started with `--initial-cluster-state existing` joins, and finds this member's
/// record by its peer URLs (etcd's GetClusterFromRemotePeers).
///
/// # Errors
/// A message when no peer answers, when none of the members has this member's peer URLs
/// (it was not added with `MemberAdd`), or when this member has started before (its data
/// dir was lost).
pub async fn fetch_cluster(
    peer_urls: &[String],
    initial_cluster: &[String],
) -> Result<Join, String> {
    let mut wanted = peer_urls.to_vec();
    wanted.sort();
    let mut last = String::from("no other member in --initial-cluster");
    // A member that has not applied the MemberAdd yet does not list us: ask the others,
    // and ask again for a few seconds.
    for _ in 0..10 {
        for url in initial_cluster.iter().filter(|u| !peer_urls.contains(u)) {
            let Some(ch) = channel(url) else { continue };
            match client(ch).members(MembersRequest {}).await {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    let members: Vec<Member> = resp.members.into_iter().map(Member::from).collect();
                    let me = members.iter().find(|m| {
                        let mut urls = m.peer_urls.clone();
                        urls.sort();
                        urls == wanted
                    });
                    match me {
                        // A member that already published its client URLs has run before:
                        // an empty data dir now means its data (and its raft votes) were
                        // lost, and rejoining under the same id could break raft's safety.
                        // It must be removed and added again (etcd's isMemberBootstrapped).
                        Some(me) if !me.client_urls.is_empty() => {
                            return Err(format!(
                                "member {:x} has already been bootstrapped, but its data dir is empty: remove it (MemberRemove) and add it again",
                                me.id
                            ));
                        }
                        Some(me) => {
                            let member_id = me.id;
                            return Ok(Join { cluster_id: resp.cluster_id, member_id, members });
                        }
                        None => {
                            last = format!(
                                "member with peer URLs {peer_urls:?} is not in the cluster's member list; add it with MemberAdd first"
                            );
                        }
                    }
                }
                Err(e) => last = format!("{url}: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(format!("cannot join the cluster: {last}"))
}
