//! Multi-member clusters: bootstrap from etcd's flags, any member serving clients, leader
//! failover under concurrent writers, membership changes with a learner that catches up by
//! snapshot, and members compared by `HashKV`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, MemberAddOptions};

use crate::harness::{Cairn, wait_ready};

/// A cluster of real `cairn` processes on loopback ports.
pub struct Cluster {
    pub members: Vec<Cairn>,
}

impl Cluster {
    /// Starts `n` founding members and waits until every one serves writes.
    pub async fn start(n: usize, extra: &[&str]) -> Cluster {
        let mut members: Vec<Cairn> = (0..n)
            .map(|i| Cairn::new(&format!("m{i}"), tempfile::tempdir().unwrap(), extra))
            .collect();
        let initial: Vec<String> =
            members.iter().map(|m| format!("{}={}", m.name, m.peer_url)).collect();
        for m in &mut members {
            m.initial_cluster = initial.join(",");
            m.spawn_only();
        }
        for m in &members {
            wait_ready(&m.client_url).await;
        }
        Cluster { members }
    }

    /// Every client URL of running members.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The index of the member every running member agrees leads, waiting up to 10 s.
    pub async fn leader(&mut self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut ids = Vec::new();
            for i in 0..self.members.len() {
                if !self.members[i].is_running() {
                    continue;
                }
                let mut c = self.members[i].client().await;
                if let Ok(s) = c.status().await {
                    ids.push((i, s.header().unwrap().member_id(), s.leader()));
                }
            }
            if let Some((_, _, leader)) = ids.first() {
                if *leader != 0 && ids.iter().all(|(_, _, l)| l == leader) {
                    if let Some((i, _, _)) = ids.iter().find(|(_, id, _)| id == leader) {
                        return *i;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no agreed leader: {ids:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Asserts that every running member reaches the same `HashKV` at the same revision.
    pub async fn assert_hashes_equal(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let mut seen = Vec::new();
            for m in self.members.iter_mut() {
                if !m.is_running() {
                    continue;
                }
                let mut c = m.client().await;
                let rev = c.status().await.unwrap().header().unwrap().revision();
                let h = c.hash_kv(0).await.unwrap();
                seen.push((rev, h.hash(), m.name.clone()));
            }
            let first = seen[0].clone();
            if seen.iter().all(|s| s.0 == first.0 && s.1 == first.1) {
                return;
            }
            assert!(Instant::now() < deadline, "members diverge: {seen:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// key → (value, revision) of every acknowledged write.
type Acked = Arc<Mutex<HashMap<String, (String, i64)>>>;

/// Writes unique keys through a client that knows every endpoint, recording each
/// acknowledged write, until told to stop. Failed writes are retried with new keys.
async fn writer(endpoints: Vec<String>, id: usize, acked: Acked, stop: Arc<AtomicBool>) {
    let mut c = Client::connect(endpoints, None).await.unwrap();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("w{id}/{i}");
        let value = format!("v{i}");
        i += 1;
        match tokio::time::timeout(Duration::from_secs(10), c.put(key.clone(), value.clone(), None))
            .await
        {
            Ok(Ok(resp)) => {
                let rev = resp.header().unwrap().revision();
                acked.lock().unwrap().insert(key, (value, rev));
            }
            Ok(Err(_)) | Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Starts `n` writers; returns the stop flag and their handles.
fn writers(
    endpoints: &[String],
    n: usize,
    acked: &Acked,
) -> (Arc<AtomicBool>, Vec<tokio::task::JoinHandle<()>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let handles = (0..n)
        .map(|id| tokio::spawn(writer(endpoints.to_vec(), id, acked.clone(), stop.clone())))
        .collect();
    (stop, handles)
}

/// Asserts that every acknowledged write reads back with its value and revision from every
/// running member (linearizable reads).
async fn assert_acked_readable(cluster: &mut Cluster, acked: &Acked) {
    let snapshot = acked.lock().unwrap().clone();
    assert!(snapshot.len() > 20, "writers made too little progress: {}", snapshot.len());
    for m in cluster.members.iter_mut() {
        if !m.is_running() {
            continue;
        }
        let mut c = m.client().await;
        let all = c.get("w", Some(GetOptions::new().with_prefix())).await.unwrap();
        let found: HashMap<String, (String, i64)> = all
            .kvs()
            .iter()
            .map(|kv| {
                (
                    kv.key_str().unwrap().to_owned(),
                    (kv.value_str().unwrap().to_owned(), kv.mod_revision()),
                )
            })
            .collect();
        for (k, v) in &snapshot {
            assert_eq!(found.get(k), Some(v), "acknowledged write {k} on {}", m.name);
        }
    }
}

/// Puts until one succeeds; returns how long that took.
async fn time_until_writable(endpoints: &[String]) -> Duration {
    let start = Instant::now();
    let mut c = Client::connect(endpoints.to_vec(), None).await.unwrap();
    loop {
        let put = c.put("probe", "x", None);
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(300), put).await {
            return start.elapsed();
        }
        assert!(start.elapsed() < Duration::from_secs(20), "cluster never became writable");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_of_three_serves_writes_and_reads_with_its_own_header() {
    let mut cluster = Cluster::start(3, &[]).await;
    let mut ids = Vec::new();
    for (i, m) in cluster.members.iter().enumerate() {
        let mut c = m.client().await;
        let put = c.put(format!("k{i}"), format!("v{i}"), None).await.unwrap();
        ids.push(put.header().unwrap().member_id());
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 3, "each member answers with its own id");
    for m in &cluster.members {
        let mut c = m.client().await;
        for i in 0..3 {
            let lin = c.get(format!("k{i}"), None).await.unwrap();
            assert_eq!(lin.kvs()[0].value_str().unwrap(), format!("v{i}"));
        }
        let ser = c.get("k0", Some(GetOptions::new().with_serializable())).await.unwrap();
        assert!(ser.kvs().len() <= 1);
    }
    // Names and client URLs are published into the member records.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = cluster.members[0].client().await.member_list().await.unwrap();
        let ready = list.members().len() == 3
            && list.members().iter().all(|m| !m.name().is_empty() && !m.client_urls().is_empty());
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "members never published: {:?}", list.members());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leader = cluster.leader().await;
    let mut c = cluster.members[leader].client().await;
    assert!(c.status().await.unwrap().raft_term() >= 1);
    cluster.assert_hashes_equal().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_leader_and_follower_kill_9_and_writes_resume_quickly() {
    let mut cluster = Cluster::start(3, &["--snapshot-count", "300"]).await;
    let endpoints = cluster.endpoints();
    let acked: Acked = Arc::default();
    let (stop, handles) = writers(&endpoints, 4, &acked);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The leader dies: the others elect a new one.
    let leader = cluster.leader().await;
    cluster.members[leader].kill9();
    let failover = time_until_writable(&endpoints).await;
    eprintln!("FAILOVER: writes succeeded again {failover:?} after the leader was killed");
    tokio::time::sleep(Duration::from_millis(800)).await;
    cluster.members[leader].spawn().await;

    // A follower dies and comes back.
    let leader = cluster.leader().await;
    let follower = (leader + 1) % 3;
    cluster.members[follower].kill9();
    tokio::time::sleep(Duration::from_millis(800)).await;
    cluster.members[follower].spawn().await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.await.unwrap();
    }
    assert_acked_readable(&mut cluster, &acked).await;
    cluster.assert_hashes_equal().await;
    assert!(failover < Duration::from_secs(5), "failover took {failover:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_of_three_down_writes_fail_with_etcd_errors_and_recover_when_back() {
    let mut cluster = Cluster::start(3, &[]).await;
    let mut c = cluster.members[0].client().await;
    c.put("before", "1", None).await.unwrap();
    cluster.members[1].kill9();
    cluster.members[2].kill9();
    let start = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(15), c.put("during", "x", None))
        .await
        .expect("a write without quorum must fail, not hang")
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("etcdserver: no leader") || msg.contains("etcdserver: request timed out"),
        "{msg}"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    cluster.members[1].spawn_only();
    cluster.members[2].spawn_only();
    let writable = time_until_writable(&cluster.endpoints()).await;
    eprintln!("QUORUM RESTORED: writable {writable:?} after restarting two members");
    let got = c.get("before", None).await.unwrap();
    assert_eq!(got.kvs()[0].value_str().unwrap(), "1");
    cluster.assert_hashes_equal().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_added_under_load_catches_up_by_snapshot_is_promoted_and_a_member_removed() {
    let mut cluster = Cluster::start(3, &["--snapshot-count", "200"]).await;
    let endpoints = cluster.endpoints();
    let acked: Acked = Arc::default();
    let (stop, handles) = writers(&endpoints, 4, &acked);
    tokio::time::sleep(Duration::from_millis(2000)).await;

    let leader = cluster.leader().await;
    let mut lc = cluster.members[leader].client().await;
    let mut new = Cairn::new("m3", tempfile::tempdir().unwrap(), &["--snapshot-count", "200"]);
    let added = lc
        .member_add([new.peer_url.as_str()], Some(MemberAddOptions::new().with_is_learner()))
        .await
        .unwrap();
    let new_id = added.member().unwrap().id();
    assert!(added.member().unwrap().is_learner());
    // A second learner is one too many (--max-learners 1).
    let err = lc
        .member_add(["http://127.0.0.1:1"], Some(MemberAddOptions::new().with_is_learner()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("etcdserver: too many learner members in cluster"), "{err}");
    let err = lc.member_add([new.peer_url.as_str()], None).await.unwrap_err();
    assert!(err.to_string().contains("etcdserver: Peer URLs already exists"), "{err}");

    let mut initial: Vec<String> =
        cluster.members.iter().map(|m| format!("{}={}", m.name, m.peer_url)).collect();
    initial.push(format!("m3={}", new.peer_url));
    new.initial_cluster = initial.join(",");
    new.cluster_state = "existing".into();
    new.spawn_only();

    // The learner refuses client writes, and is promoted once in sync.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match lc.member_promote(new_id).await {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    e.to_string().contains("in sync with leader")
                        || e.to_string().contains("not enough started"),
                    "{e}"
                );
                assert!(Instant::now() < deadline, "learner never caught up");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let err = lc.member_promote(new_id).await.unwrap_err();
    assert!(err.to_string().contains("can only promote a learner member"), "{err}");
    cluster.members.push(new);

    // Remove a follower under load; it stops serving.
    let leader = cluster.leader().await;
    let victim = (leader + 1) % 3;
    let victim_id = {
        let mut c = cluster.members[victim].client().await;
        c.status().await.unwrap().header().unwrap().member_id()
    };
    let mut lc = cluster.members[leader].client().await;
    let after = lc.member_remove(victim_id).await.unwrap();
    assert_eq!(after.members().len(), 3);
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.members[victim].is_running() {
        assert!(Instant::now() < deadline, "a removed member kept running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.members.remove(victim);

    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.await.unwrap();
    }
    assert_acked_readable(&mut cluster, &acked).await;
    cluster.assert_hashes_equal().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_leader_hands_leadership_to_the_target() {
    let mut cluster = Cluster::start(3, &[]).await;
    let leader = cluster.leader().await;
    let target = (leader + 1) % 3;
    let target_id = {
        let mut c = cluster.members[target].client().await;
        c.status().await.unwrap().header().unwrap().member_id()
    };
    let mut lc = cluster.members[leader].client().await;
    lc.move_leader(target_id).await.unwrap();
    assert_eq!(cluster.leader().await, target);
    let mut fc = cluster.members[leader].client().await;
    let err = fc.move_leader(target_id).await.unwrap_err();
    assert!(err.to_string().contains("etcdserver: not leader"), "{err}");
}
