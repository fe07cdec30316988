//! Leases through the `etcd-client` crate and `etcdctl`: grant, revoke, keep-alive,
//! time-to-live, expiry through raft, and remaining TTLs across restarts.

use std::time::{Duration, Instant};

use etcd_client::{GetOptions, LeaseGrantOptions, LeaseTimeToLiveOptions, PutOptions, Txn, TxnOp};
use tonic::Code;

use crate::harness::Cairn;
use crate::kv::grpc_err;

#[tokio::test]
async fn grants_pick_ids_raise_short_ttls_and_refuse_bad_requests() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    let g = c.lease_grant(60, None).await.unwrap();
    assert!(g.id() > 0);
    assert_eq!(g.ttl(), 60);
    let g = c.lease_grant(1, Some(LeaseGrantOptions::new().with_id(42))).await.unwrap();
    assert_eq!((g.id(), g.ttl()), (42, 2), "TTLs below 1.5 election timeouts are raised");
    let (code, msg) =
        grpc_err(c.lease_grant(10, Some(LeaseGrantOptions::new().with_id(42))).await.unwrap_err());
    assert_eq!(
        (code, msg.as_str()),
        (Code::FailedPrecondition, "etcdserver: lease already exists")
    );
    let (code, msg) = grpc_err(c.lease_grant(9_000_000_001, None).await.unwrap_err());
    assert_eq!((code, msg.as_str()), (Code::OutOfRange, "etcdserver: too large lease TTL"));
    let mut ids: Vec<i64> = c.leases().await.unwrap().leases().iter().map(|l| l.id()).collect();
    ids.sort();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&42));
    let (code, msg) = grpc_err(c.lease_revoke(7).await.unwrap_err());
    assert_eq!((code, msg.as_str()), (Code::NotFound, "etcdserver: requested lease not found"));
    let t = c.lease_time_to_live(7, None).await.unwrap();
    assert_eq!(t.ttl(), -1, "an unknown lease reports TTL -1");
}

#[tokio::test]
async fn puts_attach_keys_and_revoke_deletes_them_at_one_revision() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    let a = c.lease_grant(100, None).await.unwrap().id();
    let b = c.lease_grant(100, None).await.unwrap().id();
    c.put("k1", "v", Some(PutOptions::new().with_lease(a))).await.unwrap();
    c.put("k2", "v", Some(PutOptions::new().with_lease(a))).await.unwrap();
    c.txn(Txn::new().and_then([TxnOp::put("k3", "v", Some(PutOptions::new().with_lease(a)))]))
        .await
        .unwrap();
    c.put("moved", "v", Some(PutOptions::new().with_lease(a))).await.unwrap();
    c.put("moved", "v2", Some(PutOptions::new().with_lease(b))).await.unwrap();
    c.put("k1", "v2", Some(PutOptions::new().with_ignore_lease())).await.unwrap();
    let t = c.lease_time_to_live(a, Some(LeaseTimeToLiveOptions::new().with_keys())).await.unwrap();
    let keys: Vec<&[u8]> = t.keys().iter().map(|k| k.as_slice()).collect();
    assert_eq!(keys, [&b"k1"[..], b"k2", b"k3"]);
    assert_eq!(t.granted_ttl(), 100);
    assert!(t.ttl() > 90 && t.ttl() <= 100, "{}", t.ttl());
    let t = c.lease_time_to_live(a, None).await.unwrap();
    assert!(t.keys().is_empty(), "keys only when asked");

    let before = c.get("k1", None).await.unwrap().header().unwrap().revision();
    c.lease_revoke(a).await.unwrap();
    let g = c.get("k", Some(GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(g.count(), 0, "every attached key is gone");
    assert_eq!(g.header().unwrap().revision(), before + 1, "one revision for the whole revoke");
    assert_eq!(c.get("moved", None).await.unwrap().kvs()[0].lease(), b);
    let (code, _) =
        grpc_err(c.put("x", "v", Some(PutOptions::new().with_lease(a))).await.unwrap_err());
    assert_eq!(code, Code::NotFound);
}

#[tokio::test]
async fn keep_alive_streams_renew_many_times_and_answer_unknown_leases_with_zero() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    let id = c.lease_grant(5, None).await.unwrap().id();
    let (mut keeper, mut stream) = c.lease_keep_alive(id).await.unwrap();
    for _ in 0..200 {
        keeper.keep_alive().await.unwrap();
        let r = stream.message().await.unwrap().unwrap();
        assert_eq!((r.id(), r.ttl()), (id, 5));
    }
    // etcd-client turns the TTL 0 answer into its own "lease not found" error...
    assert!(c.lease_keep_alive(987_654).await.is_err());
    // ...and on the wire it is a TTL 0 response, not a gRPC error.
    use cairn_proto::etcdserverpb::{LeaseKeepAliveRequest, lease_client::LeaseClient};
    let mut raw = LeaseClient::connect(srv.client_url.clone()).await.unwrap();
    let reqs = futures::stream::iter(vec![
        LeaseKeepAliveRequest { id: 987_654 },
        LeaseKeepAliveRequest { id },
    ]);
    let mut resps = raw.lease_keep_alive(reqs).await.unwrap().into_inner();
    let r = resps.message().await.unwrap().unwrap();
    assert_eq!((r.id, r.ttl), (987_654, 0));
    let r = resps.message().await.unwrap().unwrap();
    assert_eq!((r.id, r.ttl), (id, 5));
}

#[tokio::test]
async fn expired_leases_are_revoked_with_their_keys() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    let kept = c.lease_grant(2, None).await.unwrap().id();
    let granted = Instant::now();
    let id = c.lease_grant(2, None).await.unwrap().id();
    c.put("ephemeral", "v", Some(PutOptions::new().with_lease(id))).await.unwrap();
    c.put("kept", "v", Some(PutOptions::new().with_lease(kept))).await.unwrap();
    let (mut keeper, mut stream) = c.lease_keep_alive(kept).await.unwrap();
    let gone = loop {
        keeper.keep_alive().await.unwrap();
        stream.message().await.unwrap().unwrap();
        if c.get("ephemeral", None).await.unwrap().kvs().is_empty() {
            break granted.elapsed();
        }
        assert!(granted.elapsed() < Duration::from_secs(15), "the lease never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("a 2 s lease was revoked {:?} after its grant", gone);
    assert!(gone >= Duration::from_secs(2), "revoked before its TTL ended: {gone:?}");
    assert_eq!(c.lease_time_to_live(id, None).await.unwrap().ttl(), -1);
    assert_eq!(c.get("kept", None).await.unwrap().kvs().len(), 1, "a renewed lease stays");
}

#[tokio::test]
async fn a_restart_keeps_leases_keys_and_the_checkpointed_remaining_ttl() {
    let mut srv = Cairn::start_with(&["--experimental-lease-checkpoint-interval", "1s"]).await;
    let mut c = srv.client().await;
    let granted = Instant::now();
    let id = c.lease_grant(30, None).await.unwrap().id();
    c.put("svc/a", "v", Some(PutOptions::new().with_lease(id))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    drop(c);
    srv.kill9();
    srv.spawn().await;
    let mut c = srv.client().await;
    let t =
        c.lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys())).await.unwrap();
    // At most what the last checkpoint (>= 2 s after the grant) recorded; at least what is
    // left after everything that happened since the grant (a slow restart only lowers it).
    let floor = 30 - granted.elapsed().as_secs() as i64 - 1;
    assert!(t.ttl() >= floor && t.ttl() <= 28, "remaining TTL after restart: {}", t.ttl());
    assert_eq!(t.keys(), [b"svc/a".to_vec()]);

    // A renewal after a checkpoint must not be cut short by the next restart.
    let (mut keeper, mut stream) = c.lease_keep_alive(id).await.unwrap();
    let renewed = Instant::now();
    keeper.keep_alive().await.unwrap();
    assert_eq!(stream.message().await.unwrap().unwrap().ttl(), 30);
    drop((keeper, stream, c));
    srv.kill9();
    srv.spawn().await;
    let mut c = srv.client().await;
    let t = c.lease_time_to_live(id, None).await.unwrap();
    // Without the renewal's checkpoint the lease would come back with the older, shorter
    // remaining TTL (<= 28 minus the time since); with it, only the time since the renewal
    // is gone.
    let floor = (30 - renewed.elapsed().as_secs() as i64 - 1).min(28);
    assert!(t.ttl() >= floor, "a renewed lease came back shortened: {} < {floor}", t.ttl());
}
