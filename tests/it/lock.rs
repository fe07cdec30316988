//! Lock and Election (etcd's v3lock and v3election) through real clients: the `etcd-client`
//! crate's lock and election clients, curl through the JSON gateway, 50 contenders for one
//! lock, hand-over on lease revocation and on a killed member, a waiter that disconnects,
//! and a differential run against etcd 3.5.1.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_proto::v3electionpb::{
    CampaignRequest, LeaderKey as PbLeaderKey, LeaderRequest, ProclaimRequest, ResignRequest,
    election_client::ElectionClient,
};
use cairn_proto::v3lockpb::{LockRequest, UnlockRequest, lock_client::LockClient};
use etcd_client::{Client, GetOptions, LockOptions, ProclaimOptions, ResignOptions};
use futures::StreamExt as _;

use crate::cluster::Cluster;
use crate::harness::{Cairn, Etcd};

/// Keys under `prefix`, read through `c`.
async fn keys(c: &mut Client, prefix: &str) -> Vec<String> {
    let r = c.get(prefix, Some(GetOptions::new().with_prefix())).await.unwrap();
    r.kvs().iter().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).collect()
}

/// Polls until `prefix` holds `n` keys (panics after 20 s).
async fn wait_keys(c: &mut Client, prefix: &str, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let k = keys(c, prefix).await;
        if k.len() == n {
            return k;
        }
        assert!(Instant::now() < deadline, "{prefix}: wanted {n} keys, have {k:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The gRPC status of an etcd-client error.
fn status(e: etcd_client::Error) -> (tonic::Code, String) {
    match e {
        etcd_client::Error::GRpcStatus(s) => (s.code(), s.message().to_owned()),
        other => panic!("not a gRPC status: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_and_election_clients_lock_campaign_proclaim_observe_and_resign() {
    let cairn = Cairn::start().await;
    let mut c = cairn.client().await;
    let l1 = c.lease_grant(30, None).await.unwrap().id();
    let l2 = c.lease_grant(30, None).await.unwrap().id();

    // Lock: the key is <name>/<lease hex>; the same lease locking again is a no-op.
    let held = c.lock("res", Some(LockOptions::new().with_lease(l1))).await.unwrap();
    assert_eq!(held.key(), format!("res/{l1:x}").as_bytes());
    let again = c.lock("res", Some(LockOptions::new().with_lease(l1))).await.unwrap();
    assert_eq!(again.key(), held.key());
    let mut waiter = c.clone();
    let second = tokio::spawn(async move {
        waiter.lock("res", Some(LockOptions::new().with_lease(l2))).await.unwrap()
    });
    wait_keys(&mut c, "res/", 2).await;
    assert!(!second.is_finished());
    c.unlock(held.key()).await.unwrap();
    let second = second.await.unwrap();
    assert_eq!(second.key(), format!("res/{l2:x}").as_bytes());
    assert!(second.header().unwrap().revision() > held.header().unwrap().revision());
    c.unlock(second.key()).await.unwrap();
    assert!(keys(&mut c, "res/").await.is_empty());
    // A lock under an unknown lease fails as the put would.
    let e = c.lock("res", Some(LockOptions::new().with_lease(0x7777))).await.unwrap_err();
    // etcd's lock server reaches KV through an in-process client: its errors carry code Unknown.
    assert_eq!(status(e), (tonic::Code::Unknown, "etcdserver: requested lease not found".into()));

    // Election.
    let e = c.leader("el").await.unwrap_err();
    assert_eq!(status(e), (tonic::Code::Unknown, "election: no leader".into()));
    let mut observe = c.observe("el").await.unwrap();
    let won = c.campaign("el", "a", l1).await.unwrap();
    let leader = won.leader().unwrap().clone();
    assert_eq!(leader.key(), format!("el/{l1:x}").as_bytes());
    assert_eq!(leader.lease(), l1);
    assert_eq!(leader.name(), b"el");
    let now = c.leader("el").await.unwrap();
    assert_eq!(now.kv().unwrap().value(), b"a");
    assert_eq!(now.kv().unwrap().create_revision(), leader.rev());
    c.proclaim("a2", Some(ProclaimOptions::new().with_leader(leader.clone()))).await.unwrap();
    assert_eq!(c.leader("el").await.unwrap().kv().unwrap().value(), b"a2");
    // A stale leader key (wrong create revision) is not the leader.
    let stale = leader.clone().with_rev(leader.rev() + 1000);
    let e = c.proclaim("x", Some(ProclaimOptions::new().with_leader(stale))).await.unwrap_err();
    assert_eq!(status(e), (tonic::Code::Unknown, "election: not leader".into()));

    let mut contender = c.clone();
    let next = tokio::spawn(async move { contender.campaign("el", "b", l2).await.unwrap() });
    wait_keys(&mut c, "el/", 2).await;
    assert!(!next.is_finished());
    c.resign(Some(ResignOptions::new().with_leader(leader.clone()))).await.unwrap();
    let next = next.await.unwrap();
    assert_eq!(next.leader().unwrap().key(), format!("el/{l2:x}").as_bytes());
    // Resigning a leadership already given up is no error, as in etcd.
    c.resign(Some(ResignOptions::new().with_leader(leader))).await.unwrap();
    // Revoking the leader's lease hands leadership to the next candidate.
    let l3 = c.lease_grant(30, None).await.unwrap().id();
    let mut third = c.clone();
    let last = tokio::spawn(async move { third.campaign("el", "c", l3).await.unwrap() });
    wait_keys(&mut c, "el/", 2).await;
    assert!(!last.is_finished());
    c.lease_revoke(l2).await.unwrap();
    let last = tokio::time::timeout(Duration::from_secs(20), last).await.expect("elected").unwrap();
    assert_eq!(last.leader().unwrap().key(), format!("el/{l3:x}").as_bytes());

    // Observe delivered every change in order: a, a2, b, then c.
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let msg = tokio::time::timeout(Duration::from_secs(10), observe.message())
            .await
            .expect("observe delivers")
            .unwrap()
            .unwrap();
        seen.push(String::from_utf8_lossy(msg.kv().unwrap().value()).into_owned());
    }
    assert_eq!(seen, ["a", "a2", "b", "c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_contenders_are_each_served_once_in_create_revision_order_never_two_at_once() {
    let cairn = Cairn::start().await;
    let mut c = cairn.client().await;
    let holding = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (mut c, holding, counter, served) =
            (c.clone(), holding.clone(), counter.clone(), served.clone());
        tasks.push(tokio::spawn(async move {
            let lease = c.lease_grant(60, None).await.unwrap().id();
            let held = c.lock("ctr", Some(LockOptions::new().with_lease(lease))).await.unwrap();
            assert!(!holding.swap(true, Ordering::SeqCst), "two holders at once");
            // A non-atomic read-modify-write: lost updates would show without mutual exclusion.
            let v = counter.load(Ordering::SeqCst);
            tokio::task::yield_now().await;
            counter.store(v + 1, Ordering::SeqCst);
            let kv = c.get(held.key(), None).await.unwrap();
            let create = kv.kvs()[0].create_revision();
            served.lock().unwrap().push((lease, create));
            holding.store(false, Ordering::SeqCst);
            c.unlock(held.key()).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(counter.load(Ordering::SeqCst), 50);
    let served = served.lock().unwrap().clone();
    let mut leases: Vec<i64> = served.iter().map(|(l, _)| *l).collect();
    leases.sort_unstable();
    leases.dedup();
    assert_eq!(leases.len(), 50, "every contender served once");
    let revs: Vec<i64> = served.iter().map(|(_, r)| *r).collect();
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "served out of create order: {revs:?}");
    assert!(keys(&mut c, "ctr/").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_holders_lock_passes_to_the_waiter_and_a_disconnected_waiter_leaves_no_key() {
    let cairn = Cairn::start().await;
    let mut c = cairn.client().await;
    let la = c.lease_grant(60, None).await.unwrap().id();
    let lb = c.lease_grant(60, None).await.unwrap().id();
    let lc = c.lease_grant(60, None).await.unwrap().id();
    let held = c.lock("h", Some(LockOptions::new().with_lease(la))).await.unwrap();
    let mut wb = c.clone();
    let b = tokio::spawn(async move {
        wb.lock("h", Some(LockOptions::new().with_lease(lb))).await.unwrap()
    });
    wait_keys(&mut c, "h/", 2).await;
    c.lease_revoke(la).await.unwrap();
    let b = tokio::time::timeout(Duration::from_secs(20), b).await.expect("hand-over").unwrap();
    assert_eq!(b.key(), format!("h/{lb:x}").as_bytes());
    assert_ne!(b.key(), held.key());

    // A waiter on its own connection goes away: its key is withdrawn.
    let mut wc = cairn.client().await;
    let gone = tokio::spawn(async move {
        let _ = wc.lock("h", Some(LockOptions::new().with_lease(lc))).await;
    });
    wait_keys(&mut c, "h/", 2).await;
    gone.abort();
    let _ = gone.await;
    let left = wait_keys(&mut c, "h/", 1).await;
    assert_eq!(left, [format!("h/{lb:x}")]);
    // The lock is still usable: a newcomer gets it once b releases.
    c.unlock(b.key()).await.unwrap();
    let ld = c.lease_grant(60, None).await.unwrap().id();
    let d = tokio::time::timeout(
        Duration::from_secs(20),
        c.lock("h", Some(LockOptions::new().with_lease(ld))),
    )
    .await
    .expect("lock free")
    .unwrap();
    assert_eq!(d.key(), format!("h/{ld:x}").as_bytes());
}

/// Keeps `lease` alive through `c` until the task is aborted, reopening the keep-alive
/// stream after a failure (a leader change, a member restarting).
fn keep_alive(mut c: Client, lease: i64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Ok((mut keeper, mut stream)) = c.lease_keep_alive(lease).await {
                while keeper.keep_alive().await.is_ok() {
                    match tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
                        Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                        _ => break,
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_passes_when_the_leaders_member_is_killed_and_survives_a_member_killed_mid_campaign()
 {
    let mut cluster = Cluster::start(3, &[]).await;
    let mut c0 = cluster.members[0].client().await;
    let mut c1 = cluster.members[1].client().await;
    let mut c2 = cluster.members[2].client().await;
    let mut observe = c2.observe("boss").await.unwrap();
    let la = c0.lease_grant(3, None).await.unwrap().id();
    let ka = keep_alive(c0.clone(), la);
    c0.campaign("boss", "a", la).await.unwrap();
    let lb = c1.lease_grant(3, None).await.unwrap().id();
    let kb = keep_alive(c1.clone(), lb);
    let mut cb = c1.clone();
    let b = tokio::spawn(async move { cb.campaign("boss", "b", lb).await });
    wait_keys(&mut c2, "boss/", 2).await;
    let lc = c2.lease_grant(3, None).await.unwrap().id();
    let _kc = keep_alive(c2.clone(), lc);
    let mut cc = c2.clone();
    let cand = tokio::spawn(async move { cc.campaign("boss", "c", lc).await });
    wait_keys(&mut c2, "boss/", 3).await;

    // b's member dies mid-campaign: its campaign fails, its key ends with its lease.
    cluster.members[1].kill9();
    kb.abort();
    assert!(b.await.unwrap().is_err());
    cluster.members[1].spawn().await;
    // a's member dies: a's lease is no longer kept alive and expires, and c (whose member
    // lives) is elected once every earlier candidate's key is gone.
    cluster.members[0].kill9();
    ka.abort();
    let won = tokio::time::timeout(Duration::from_secs(60), cand)
        .await
        .expect("c elected")
        .unwrap()
        .unwrap();
    assert_eq!(won.leader().unwrap().key(), format!("boss/{lc:x}").as_bytes());
    let now = c2.leader("boss").await.unwrap();
    assert_eq!(now.kv().unwrap().value(), b"c");
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("c") {
        let msg = tokio::time::timeout(Duration::from_secs(30), observe.message())
            .await
            .expect("observe delivers")
            .unwrap()
            .unwrap();
        seen.push(String::from_utf8_lossy(msg.kv().unwrap().value()).into_owned());
    }
    assert_eq!(seen.first().map(String::as_str), Some("a"), "{seen:?}");
    assert!(seen.iter().all(|v| ["a", "b", "c"].contains(&v.as_str())), "{seen:?}");
}

/// Runs `curl` with a JSON body and returns its stdout.
fn curl(url: &str, path: &str, body: &str) -> serde_json::Value {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-X", "POST", &format!("{url}{path}"), "-d", body])
        .output()
        .expect("curl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_locks_and_campaigns_through_the_gateway_and_observe_streams() {
    use std::io::BufRead as _;
    let cairn = Cairn::start().await;
    let url = cairn.client_url.clone();
    let lease = curl(&url, "/v3/lease/grant", r#"{"TTL":30}"#)["ID"].as_str().unwrap().to_owned();
    let id: i64 = lease.parse().unwrap();
    // "lk" and "el" and "v1" base64-encoded.
    let lock = curl(&url, "/v3/lock/lock", &format!(r#"{{"name":"bGs=","lease":"{lease}"}}"#));
    let key = lock["key"].as_str().unwrap().to_owned();
    assert!(lock["header"]["revision"].is_string(), "{lock}");
    let mut c = cairn.client().await;
    assert_eq!(keys(&mut c, "lk/").await, [format!("lk/{id:x}")]);
    let un = curl(&url, "/v3/lock/unlock", &format!(r#"{{"key":"{key}"}}"#));
    assert!(un["header"]["revision"].is_string(), "{un}");
    assert!(keys(&mut c, "lk/").await.is_empty());

    let err = curl(&url, "/v3/election/leader", r#"{"name":"ZWw="}"#);
    assert_eq!(err["message"], "election: no leader", "{err}");
    assert_eq!(err["code"], 2, "{err}");
    let mut observer = std::process::Command::new("curl")
        .args(["-sSN", "-X", "POST", &format!("{url}/v3/election/observe"), "-d"])
        .arg(r#"{"name":"ZWw="}"#)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let camp = curl(
        &url,
        "/v3/election/campaign",
        &format!(r#"{{"name":"ZWw=","lease":"{lease}","value":"djE="}}"#),
    );
    let leader = camp["leader"].clone();
    assert_eq!(leader["lease"], lease.as_str(), "{camp}");
    let got = curl(&url, "/v3/election/leader", r#"{"name":"ZWw="}"#);
    assert_eq!(got["kv"]["value"], "djE=", "{got}");
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(observer.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let _ = observer.kill();
        let _ = observer.wait();
        line
    })
    .await
    .unwrap();
    let msg: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(msg["result"]["kv"]["value"], "djE=", "{line}");
    let pro = curl(
        &url,
        "/v3/election/proclaim",
        &serde_json::json!({"leader": leader, "value": "djI="}).to_string(),
    );
    assert!(pro["header"].is_object(), "{pro}");
    let res = curl(&url, "/v3/election/resign", &serde_json::json!({"leader": leader}).to_string());
    assert!(res["header"].is_object(), "{res}");
    let err = curl(&url, "/v3/election/proclaim", r#"{"value":"djI="}"#);
    assert_eq!(err["message"], r#""leader" field must be provided"#, "{err}");

    // A curl waiting for a held lock is killed: its waiter key is withdrawn.
    let holder = curl(&url, "/v3/lock/lock", &format!(r#"{{"name":"bGs=","lease":"{lease}"}}"#));
    assert!(holder["key"].is_string(), "{holder}");
    let other = c.lease_grant(30, None).await.unwrap().id();
    let mut waiter = std::process::Command::new("curl")
        .args(["-sS", "-X", "POST", &format!("{url}/v3/lock/lock"), "-d"])
        .arg(format!(r#"{{"name":"bGs=","lease":"{other}"}}"#))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_keys(&mut c, "lk/", 2).await;
    waiter.kill().unwrap();
    waiter.wait().unwrap();
    assert_eq!(wait_keys(&mut c, "lk/", 1).await, [format!("lk/{id:x}")]);
}

/// A message's text with the header's member, cluster and term cleared (they differ between
/// any two servers); revisions are kept.
fn norm<T: std::fmt::Debug>(tag: &str, r: Result<tonic::Response<T>, tonic::Status>) -> String {
    match r {
        Ok(r) => {
            let s = format!("{:?}", r.into_inner());
            let mut out = String::new();
            let mut rest = s.as_str();
            // Blank `cluster_id: N`, `member_id: N` and `raft_term: N`.
            while let Some(i) = ["cluster_id: ", "member_id: ", "raft_term: "]
                .iter()
                .filter_map(|f| rest.find(f).map(|i| (i, f.len())))
                .min()
                .map(|(i, n)| i + n)
            {
                out.push_str(&rest[..i]);
                let end =
                    rest[i..].find(|ch: char| !ch.is_ascii_digit()).map_or(rest.len(), |e| i + e);
                out.push('_');
                rest = &rest[end..];
            }
            out.push_str(rest);
            format!("{tag}: {out}")
        }
        Err(s) => format!("{tag}: error {:?} {:?}", s.code(), s.message()),
    }
}

/// One Lock/Election scenario, each answer as text, against the server at `url`.
async fn scenario(url: &str) -> Vec<String> {
    let mut kv = Client::connect([url], None).await.unwrap();
    for (id, ttl) in [(0x10, 60), (0x20, 60)] {
        kv.lease_grant(ttl, Some(etcd_client::LeaseGrantOptions::new().with_id(id))).await.unwrap();
    }
    let ch =
        tonic::transport::Endpoint::from_shared(url.to_owned()).unwrap().connect().await.unwrap();
    let mut lock = LockClient::new(ch.clone());
    let mut el = ElectionClient::new(ch);
    let mut out = Vec::new();
    let first = lock.lock(LockRequest { name: b"dl".to_vec(), lease: 0x10 }).await;
    let first_key = first.as_ref().map(|r| r.get_ref().key.clone()).unwrap_or_default();
    out.push(norm("lock", first));
    let mut l2 = lock.clone();
    let second =
        tokio::spawn(
            async move { l2.lock(LockRequest { name: b"dl".to_vec(), lease: 0x20 }).await },
        );
    wait_keys(&mut kv, "dl/", 2).await;
    out.push(norm("unlock", lock.unlock(UnlockRequest { key: first_key }).await));
    out.push(norm("lock 2", second.await.unwrap()));
    out.push(norm(
        "lock unknown lease",
        lock.lock(LockRequest { name: b"dl".to_vec(), lease: 0x99 }).await,
    ));
    out.push(norm("unlock empty", lock.unlock(UnlockRequest { key: Vec::new() }).await));

    let camp = |lease: i64, value: &str| CampaignRequest {
        name: b"de".to_vec(),
        lease,
        value: value.as_bytes().to_vec(),
    };
    out.push(norm("leader none", el.leader(LeaderRequest { name: b"de".to_vec() }).await));
    let won = el.campaign(camp(0x10, "v1")).await;
    let leader: PbLeaderKey = won.as_ref().unwrap().get_ref().leader.clone().unwrap();
    out.push(norm("campaign", won));
    out.push(norm("campaign again", el.campaign(camp(0x10, "v2")).await));
    out.push(norm("leader", el.leader(LeaderRequest { name: b"de".to_vec() }).await));
    let mut obs = el.observe(LeaderRequest { name: b"de".to_vec() }).await.unwrap().into_inner();
    out.push(format!("observe: {:?}", norm_msg(obs.next().await)));
    let pro = |leader: Option<PbLeaderKey>, v: &str| ProclaimRequest {
        leader,
        value: v.as_bytes().to_vec(),
    };
    out.push(norm("proclaim", el.proclaim(pro(Some(leader.clone()), "v3")).await));
    out.push(format!("observe: {:?}", norm_msg(obs.next().await)));
    let stale = PbLeaderKey { rev: leader.rev + 1000, ..leader.clone() };
    out.push(norm("proclaim stale", el.proclaim(pro(Some(stale), "v4")).await));
    out.push(norm("proclaim none", el.proclaim(pro(None, "v4")).await));
    out.push(norm("resign none", el.resign(ResignRequest { leader: None }).await));
    out.push(norm("resign", el.resign(ResignRequest { leader: Some(leader.clone()) }).await));
    out.push(norm("resign again", el.resign(ResignRequest { leader: Some(leader) }).await));
    out.push(norm("leader gone", el.leader(LeaderRequest { name: b"de".to_vec() }).await));
    out.push(norm("campaign unknown lease", el.campaign(camp(0x99, "x")).await));
    out
}

/// An observed message as text, header normalized as [`norm`] does.
fn norm_msg<T: std::fmt::Debug>(m: Option<Result<T, tonic::Status>>) -> String {
    match m {
        Some(Ok(m)) => norm("msg", Ok(tonic::Response::new(m))),
        Some(Err(s)) => norm::<T>("msg", Err(s)),
        None => "end".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_and_election_answers_match_etcd() {
    let Some(etcd) = Etcd::start().await else { return };
    let cairn = Cairn::start().await;
    let want = scenario(&etcd.client_url).await;
    let got = scenario(&cairn.client_url).await;
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(g, w);
    }
    assert_eq!(got.len(), want.len());
}
