//! Multi-member clusters: bootstrap from etcd's flags, any member serving clients, leader
//! failover under concurrent writers, membership changes with a learner that catches up by
//! snapshot, and members compared by `HashKV`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, MemberAddOptions};

use crate::harness::{Cairn, Proxy, etcdctls, wait_ready};

/// A cluster of real `cairn` processes on loopback ports.
pub struct Cluster {
    pub members: Vec<Cairn>,
    /// One proxy per member in front of its peer port, when started with proxies.
    pub proxies: Vec<Proxy>,
}

impl Cluster {
    /// Starts `n` founding members and waits until every one serves writes.
    pub async fn start(n: usize, extra: &[&str]) -> Cluster {
        Self::start_with(n, extra, false).await
    }

    /// Starts `n` founding members, each behind a peer proxy when `proxied`.
    pub async fn start_with(n: usize, extra: &[&str], proxied: bool) -> Cluster {
        let mut members: Vec<Cairn> = (0..n)
            .map(|i| Cairn::new(&format!("m{i}"), tempfile::tempdir().unwrap(), extra))
            .collect();
        let mut proxies = Vec::new();
        if proxied {
            for m in &mut members {
                let listen = m.peer_url.clone();
                let proxy = Proxy::start(listen.trim_start_matches("http://").to_owned()).await;
                m.listen_peer_url = Some(listen);
                m.peer_url = proxy.url.clone();
                proxies.push(proxy);
            }
        }
        Self::start_members(members, proxies).await
    }

    /// Starts `members` (configured, not yet started) as the founding members of one
    /// cluster and waits until every one serves and has published itself.
    pub async fn start_members(mut members: Vec<Cairn>, proxies: Vec<Proxy>) -> Cluster {
        let n = members.len();
        let initial: Vec<String> =
            members.iter().map(|m| format!("{}={}", m.name, m.peer_url)).collect();
        for m in &mut members {
            m.initial_cluster = initial.join(",");
            m.spawn_only();
        }
        for m in &members {
            wait_ready(&m.client_url).await;
        }
        let cluster = Cluster { members, proxies };
        cluster.wait_published(n).await;
        cluster
    }

    /// Waits until every member's record carries its name and client URLs (etcdctl's
    /// `--cluster` commands dial the client URLs of the member list).
    pub async fn wait_published(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let list = self.members[0].client().await.member_list().await.unwrap();
            let ready = list.members().len() == n
                && list
                    .members()
                    .iter()
                    .all(|m| !m.name().is_empty() && !m.client_urls().is_empty());
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "members never published: {:?}", list.members());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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
            if let Some((_, _, leader)) = ids.first()
                && *leader != 0
                && ids.iter().all(|(_, _, l)| l == leader)
                && let Some((i, _, _)) = ids.iter().find(|(_, id, _)| id == leader)
            {
                return *i;
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
pub type Acked = Arc<Mutex<HashMap<String, (String, i64)>>>;

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
pub fn writers(
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
pub async fn assert_acked_readable(cluster: &mut Cluster, acked: &Acked) {
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
    // Revisions never go back: a new write lands above every acknowledged one.
    let max = snapshot.values().map(|(_, rev)| *rev).max().unwrap_or(0);
    let mut c = Client::connect(cluster.endpoints(), None).await.unwrap();
    let put = c.put("after-faults", "x", None).await.unwrap();
    assert!(put.header().unwrap().revision() > max, "revision went back");
}

/// Puts until one succeeds; returns how long that took.
pub async fn time_until_writable(endpoints: &[String]) -> Duration {
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
    // A client that requires a leader (hasleader=true) is told at once, even for a read.
    let opts = etcd_client::ConnectOptions::new().with_require_leader(true);
    let mut rc =
        Client::connect([cluster.members[0].client_url.as_str()], Some(opts)).await.unwrap();
    let t = Instant::now();
    let err = rc.get("before", Some(GetOptions::new().with_serializable())).await.unwrap_err();
    assert!(err.to_string().contains("etcdserver: no leader"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(1));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_its_followers_steps_down_and_no_acknowledged_write_is_lost() {
    let mut cluster = Cluster::start_with(3, &[], true).await;
    let endpoints = cluster.endpoints();
    let acked: Acked = Arc::default();
    let (stop, handles) = writers(&endpoints, 4, &acked);
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // Nothing reaches the leader's peer port any more: its appends go out but no answer
    // comes back, so CheckQuorum makes it step down and the others elect a leader.
    let old = cluster.leader().await;
    cluster.proxies[old].block();
    let others: Vec<String> =
        (0..3).filter(|i| *i != old).map(|i| cluster.members[i].client_url.clone()).collect();
    let failover = time_until_writable(&others).await;
    eprintln!(
        "PARTITION FAILOVER: writes succeeded again {failover:?} after the leader was cut off"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut oc = cluster.members[old].client().await;
    let status = oc.status().await.unwrap();
    assert_ne!(
        status.leader(),
        status.header().unwrap().member_id(),
        "the cut-off leader still leads"
    );

    cluster.proxies[old].heal();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.await.unwrap();
    }
    assert_acked_readable(&mut cluster, &acked).await;
    cluster.assert_hashes_equal().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_member_is_replaced_and_catches_up_while_writers_run() {
    let mut cluster = Cluster::start(3, &["--snapshot-count", "200"]).await;
    let endpoints = cluster.endpoints();
    let acked: Acked = Arc::default();
    let (stop, handles) = writers(&endpoints, 4, &acked);
    tokio::time::sleep(Duration::from_millis(1000)).await;

    let leader = cluster.leader().await;
    let victim = (leader + 1) % 3;
    let victim_id = {
        let mut c = cluster.members[victim].client().await;
        c.status().await.unwrap().header().unwrap().member_id()
    };
    cluster.members[victim].kill9();
    cluster.members[victim].wipe();
    let mut lc = cluster.members[leader].client().await;
    lc.member_remove(victim_id).await.unwrap();
    let peer_url = cluster.members[victim].peer_url.clone();
    let added = lc.member_add([peer_url.as_str()], None).await.unwrap();
    assert!(!added.member().unwrap().is_learner());
    let initial: Vec<String> =
        cluster.members.iter().map(|m| format!("{}={}", m.name, m.peer_url)).collect();
    let m = &mut cluster.members[victim];
    m.initial_cluster = initial.join(",");
    m.cluster_state = "existing".into();
    m.spawn().await;

    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.await.unwrap();
    }
    assert_acked_readable(&mut cluster, &acked).await;
    cluster.assert_hashes_equal().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_new_cluster_restarts_a_survivor_of_a_lost_quorum_alone_with_its_data() {
    let mut cluster = Cluster::start(3, &[]).await;
    let acked: Acked = Arc::default();
    let (stop, handles) = writers(&cluster.endpoints(), 4, &acked);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.await.unwrap();
    }
    cluster.assert_hashes_equal().await;

    // The two followers are lost for good; a write the leader accepts now never commits.
    let survivor = cluster.leader().await;
    let survivor_id = {
        let mut c = cluster.members[survivor].client().await;
        c.status().await.unwrap().header().unwrap().member_id()
    };
    let survivor = cluster.members.remove(survivor);
    cluster.members = vec![survivor]; // the others are killed and gone with their data
    let mut c = cluster.members[0].client().await;
    let put = c.put("uncommitted", "x", None);
    let answer = tokio::time::timeout(Duration::from_secs(3), put).await;
    assert!(!matches!(answer, Ok(Ok(_))), "a write succeeded without a quorum");
    drop(c);

    let m = &mut cluster.members[0];
    m.kill9();
    m.add_flags(&["--force-new-cluster"]);
    m.spawn().await;
    let mut c = m.client().await;
    let list = c.member_list().await.unwrap();
    let ids: Vec<u64> = list.members().iter().map(|m| m.id()).collect();
    assert_eq!(ids, [survivor_id], "only the survivor is left");
    assert!(!list.members()[0].is_learner());
    let gone = c.get("uncommitted", None).await.unwrap();
    assert!(gone.kvs().is_empty(), "an entry no quorum committed was kept");
    assert_acked_readable(&mut cluster, &acked).await;

    // The one-member cluster grows again.
    let m = &cluster.members[0];
    let mut new = Cairn::new("m3", tempfile::tempdir().unwrap(), &[]);
    let mut c = m.client().await;
    c.member_add([new.peer_url.as_str()], None).await.unwrap();
    new.initial_cluster = format!("{}={},m3={}", m.name, m.peer_url, new.peer_url);
    new.cluster_state = "existing".into();
    new.spawn().await;
    cluster.members.push(new);
    c.put("after-recovery", "y", None).await.unwrap();
    cluster.assert_hashes_equal().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_members_keep_serving_with_two_down_including_the_leader() {
    let mut cluster = Cluster::start(5, &[]).await;
    let mut c = Client::connect(cluster.endpoints(), None).await.unwrap();
    c.put("five", "1", None).await.unwrap();
    let leader = cluster.leader().await;
    cluster.members[leader].kill9();
    cluster.members[(leader + 1) % 5].kill9();
    let writable = time_until_writable(&cluster.endpoints()).await;
    eprintln!("FIVE MEMBERS: writable {writable:?} after losing the leader and a follower");
    cluster.assert_hashes_equal().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_data_dir_was_wiped_refuses_to_rejoin_under_its_old_id() {
    let mut cluster = Cluster::start(3, &[]).await;
    let mut c = cluster.members[0].client().await;
    c.put("k", "v", None).await.unwrap();
    // Wiped underneath the running process, as a replaced volume is, then killed.
    let m = &mut cluster.members[2];
    m.wipe();
    tokio::time::sleep(Duration::from_millis(300)).await;
    m.kill9();
    m.cluster_state = "existing".into();
    let (ok, stderr) = m.run_to_exit();
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("has already been bootstrapped"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restarted_on_an_old_copy_of_its_data_stops_with_a_clear_error_not_a_panic() {
    let mut cluster = Cluster::start(3, &[]).await;
    let leader = cluster.leader().await;
    let m = &mut cluster.members[(leader + 1) % 3];
    m.kill9();
    let old = tempfile::tempdir().unwrap();
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        let ok = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
        assert!(ok.success());
    };
    copy(&m.data_dir, &old.path().join("data"));
    m.spawn().await;
    // The member acknowledges many more entries, then is put back on the old copy.
    let mut c = m.client().await;
    for i in 0..300 {
        c.put(format!("k{i}"), "v", None).await.unwrap();
    }
    drop(c);
    m.kill9();
    std::fs::remove_dir_all(&m.data_dir).unwrap();
    copy(&old.path().join("data"), &m.data_dir);
    let (exited, stderr) = m.run_for(Duration::from_secs(15));
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Unless it happened to catch up before any heartbeat arrived, it stops serving and says
    // why; it stays up in that failed state (its /livez fails) until it is restarted.
    if stderr.contains("raft log lost entries it had acknowledged") {
        assert!(stderr.contains("cause=\"raft_log_lost\""), "{stderr}");
        assert_eq!(exited, None, "a failed member stays up to report why: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_of_another_cluster_is_refused_with_cluster_id_mismatch() {
    let cluster = Cluster::start(3, &[]).await;
    // A stranger bootstrapped its own single-member cluster, then claims to join ours.
    let mut stranger = Cairn::new("m0", tempfile::tempdir().unwrap(), &[]);
    stranger.spawn().await;
    stranger.kill9();
    let initial: Vec<String> =
        cluster.members.iter().map(|m| format!("{}={}", m.name, m.peer_url)).collect();
    stranger.initial_cluster = format!("{},m9={}", initial.join(","), stranger.peer_url);
    stranger.name = "m9".into();
    stranger.cluster_state = "existing".into();
    let (ok, stderr) = stranger.run_to_exit();
    assert!(!ok);
    assert!(stderr.contains("cluster ID mismatch"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_manages_and_inspects_a_three_member_cluster() {
    if !crate::etcdctl::have_etcdctl() {
        return;
    }
    let mut cluster = Cluster::start(3, &[]).await;
    // Debian's etcdctl 3.4 and, beside the reference etcd, 3.5: both must work.
    for bin in etcdctls() {
        manage_and_inspect_with(&bin, &mut cluster).await;
    }
}

/// The etcdctl session of the test above with one etcdctl binary.
async fn manage_and_inspect_with(bin: &std::path::Path, cluster: &mut Cluster) {
    let bin = bin.to_owned();
    let leader = cluster.leader().await;
    let eps: Vec<String> = cluster.endpoints();
    let all = eps.join(",");
    let leader_ep = eps[leader].clone();
    let target_ep = eps[(leader + 1) % 3].clone();
    let new_peer = format!("http://127.0.0.1:{}", crate::harness::free_port());
    tokio::task::spawn_blocking(move || {
        // stdout followed by stderr (3.4 reports `endpoint health` on stderr, 3.5 on stdout).
        let ctl = |args: &[&str]| -> String {
            let out = std::process::Command::new(&bin)
                .env("ETCDCTL_API", "3")
                // etcdctl reads every ETCDCTL_* variable and warns about the harness's.
                .env_remove("ETCDCTL_BIN")
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "etcdctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr)
        };
        let e = format!("--endpoints={all}");
        ctl(&[&e, "put", "k", "v"]);
        let list = ctl(&[&e, "member", "list"]);
        assert_eq!(list.lines().count(), 3, "{list}");
        let status = ctl(&[&e, "endpoint", "status", "--cluster"]);
        assert_eq!(status.lines().filter(|l| l.contains(", true, false,")).count(), 1, "{status}");
        let health = ctl(&[&e, "endpoint", "health", "--cluster"]);
        assert_eq!(health.matches("is healthy").count(), 3, "{health}");
        let hashes = ctl(&[&e, "endpoint", "hashkv", "--cluster"]);
        let values: Vec<&str> = hashes.lines().filter_map(|l| l.split(", ").nth(1)).collect();
        assert_eq!(values.len(), 3, "{hashes}");
        assert!(values.iter().all(|v| *v == values[0]), "{hashes}");

        // Membership round trip: add a learner, update its URLs, remove it.
        let added =
            ctl(&[&e, "member", "add", "extra", "--learner", &format!("--peer-urls={new_peer}")]);
        let id = added.split_whitespace().nth(1).unwrap().to_owned();
        let moved = new_peer.replace("127.0.0.1", "localhost");
        ctl(&[&e, "member", "update", &id, &format!("--peer-urls={moved}")]);
        assert!(ctl(&[&e, "member", "list"]).contains(&moved));
        let out = std::process::Command::new(&bin)
            .args([e.as_str(), "member", "promote", id.as_str()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("in sync with leader"), "{err}");
        ctl(&[&e, "member", "remove", &id]);
        assert_eq!(ctl(&[&e, "member", "list"]).lines().count(), 3);

        // Leadership moves where it is told.
        let target_id = ctl(&[&format!("--endpoints={target_ep}"), "endpoint", "status"])
            .split(", ")
            .nth(1)
            .unwrap()
            .to_owned();
        let moved = ctl(&[&format!("--endpoints={leader_ep}"), "move-leader", &target_id]);
        assert!(moved.contains("Leadership transferred"), "{moved}");
    })
    .await
    .unwrap();
    assert_eq!(cluster.leader().await, (leader + 1) % 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_keep_alive_and_time_to_live_on_a_follower_reach_the_leader() {
    let mut cluster = Cluster::start(3, &[]).await;
    let leader = cluster.leader().await;
    let follower = (leader + 1) % 3;
    let mut fc = cluster.members[follower].client().await;
    let lease = fc.lease_grant(5, None).await.unwrap();
    fc.put("leased", "v", Some(etcd_client::PutOptions::new().with_lease(lease.id())))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (mut keeper, mut stream) = fc.lease_keep_alive(lease.id()).await.unwrap();
    keeper.keep_alive().await.unwrap();
    let resp = stream.message().await.unwrap().unwrap();
    assert_eq!(resp.ttl(), 5, "a follower's renewal reaches the leader's lease clock");
    let ttl = fc.lease_time_to_live(lease.id(), None).await.unwrap();
    assert!(ttl.ttl() >= 4 && ttl.ttl() <= 5, "TimeToLive after renewal: {}", ttl.ttl());
    assert_eq!(ttl.granted_ttl(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_would_lose_quorum_is_refused_by_the_strict_reconfiguration_check() {
    let mut cluster = Cluster::start(3, &[]).await;
    let leader = cluster.leader().await;
    let down = (leader + 1) % 3;
    let up = (leader + 2) % 3;
    let up_id = {
        let mut c = cluster.members[up].client().await;
        c.status().await.unwrap().header().unwrap().member_id()
    };
    cluster.members[down].kill9();
    // The leader notices the dead member within an election timeout or two.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Asked through the surviving follower, so the change is handed to the leader.
    let mut fc = cluster.members[up].client().await;
    let err = fc.member_add(["http://127.0.0.1:1"], None).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("etcdserver: re-configuration failed due to not enough started members"),
        "{err}"
    );
    let err = fc.member_remove(up_id).await.unwrap_err();
    assert!(err.to_string().contains("not enough started members"), "{err}");
    // A learner does not vote, so adding one is fine.
    fc.member_add(["http://127.0.0.1:1"], Some(MemberAddOptions::new().with_is_learner()))
        .await
        .unwrap();
}
