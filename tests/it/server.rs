//! The binary's configuration surface: etcd flags and `ETCD_*` variables, refusal of bad
//! input before anything is written, and restarts from the data dir alone.

use std::process::Command;

use crate::harness::{Cairn, free_port};
use crate::kv::grpc_err;

fn cairn() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
}

#[test]
fn bad_flags_and_values_exit_non_zero_before_writing_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let cases: Vec<Vec<String>> = vec![
        vec!["--no-such-flag".into()],
        vec!["--initial-cluster-state".into(), "maybe".into()],
        vec![
            "--heartbeat-interval".into(),
            "500".into(),
            "--election-timeout".into(),
            "1000".into(),
        ],
        vec!["--listen-client-urls".into(), "not-a-url".into()],
        vec!["--snapshot-count".into(), "abc".into()],
        vec!["--auto-compaction-mode".into(), "sometimes".into()],
        vec!["--initial-cluster".into(), "other=http://127.0.0.1:1".into()],
    ];
    for args in cases {
        let out = cairn().arg("--data-dir").arg(&dir).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(!out.stderr.is_empty(), "{args:?} gave no error message");
        assert!(!dir.exists(), "{args:?} wrote the data dir");
    }
}

#[test]
fn a_data_dir_cairn_did_not_create_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("etcd-data");
    std::fs::create_dir_all(dir.join("member/wal")).unwrap();
    let port = free_port();
    let out = cairn()
        .arg("--data-dir")
        .arg(&dir)
        .arg("--listen-client-urls")
        .arg(format!("http://127.0.0.1:{port}"))
        .arg("--listen-peer-urls")
        .arg(format!("http://127.0.0.1:{}", free_port()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not created by Cairn"), "{stderr}");
    let entries: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(entries.len(), 1, "the foreign dir was modified");
}

#[test]
fn version_flag_prints_cairn_and_etcd_versions() {
    let out = cairn().arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cairn Version:") && text.contains("etcd API Version: 3."), "{text}");
}

#[tokio::test]
async fn etcd_environment_variables_configure_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let client = format!("http://127.0.0.1:{}", free_port());
    let peer = format!("http://127.0.0.1:{}", free_port());
    let mut child = cairn()
        .env("ETCD_NAME", "envnode")
        .env("ETCD_DATA_DIR", tmp.path().join("d"))
        .env("ETCD_LISTEN_CLIENT_URLS", &client)
        .env("ETCD_ADVERTISE_CLIENT_URLS", &client)
        .env("ETCD_LISTEN_PEER_URLS", &peer)
        .env("ETCD_INITIAL_ADVERTISE_PEER_URLS", &peer)
        .env("ETCD_INITIAL_CLUSTER", format!("envnode={peer}"))
        .env("ETCD_MAX_TXN_OPS", "2")
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    crate::harness::wait_ready(&client).await;
    let mut c = etcd_client::Client::connect([client.as_str()], None).await.unwrap();
    let members = c.member_list().await.unwrap();
    assert_eq!(members.members()[0].name(), "envnode");
    assert_eq!(members.members()[0].peer_urls(), std::slice::from_ref(&peer));
    use etcd_client::{Txn, TxnOp};
    let ops =
        vec![TxnOp::put("a", "1", None), TxnOp::put("b", "1", None), TxnOp::put("c", "1", None)];
    let (_, msg) = grpc_err(c.txn(Txn::new().and_then(ops)).await.unwrap_err());
    assert_eq!(msg, "etcdserver: too many operations in txn request");
    assert!(tmp.path().join("d").exists());
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn a_member_restarts_from_its_data_dir_with_its_identity_and_data() {
    let mut srv = Cairn::start_with(&["--snapshot-count", "50"]).await;
    let mut c = srv.client().await;
    // Enough writes to cross several checkpoints and raft log compactions.
    for i in 0..300 {
        c.put(format!("k{i:03}"), format!("v{i}"), None).await.unwrap();
    }
    let before = c.status().await.unwrap();
    let id = before.header().unwrap().member_id();
    drop(c);
    srv.restart().await;
    let mut c = srv.client().await;
    let after = c.status().await.unwrap();
    assert_eq!(after.header().unwrap().member_id(), id);
    let g = c.get("k", Some(etcd_client::GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(g.count(), 300);
    assert_eq!(g.header().unwrap().revision(), 301);
    assert_eq!(c.get("k299", None).await.unwrap().kvs()[0].value(), b"v299");
    let r = c.put("new", "x", None).await.unwrap();
    assert_eq!(r.header().unwrap().revision(), 302);
}

#[tokio::test]
async fn the_default_member_has_etcds_default_ids() {
    // Default flags except ports: ids derive from the advertised peer URL and token.
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    let list = c.member_list().await.unwrap();
    let m = &list.members()[0];
    assert_eq!(m.client_urls(), std::slice::from_ref(&srv.client_url));
    assert!(!m.is_learner());
}

/// The `grpc.health.v1.Health` answers of the server at `url`, as text.
async fn health_answers(url: &str) -> Vec<String> {
    use cairn_proto::grpc::health::v1::{HealthCheckRequest, health_client::HealthClient};
    let ch =
        tonic::transport::Endpoint::from_shared(url.to_owned()).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(ch);
    let ask = |service: &str| HealthCheckRequest { service: service.to_owned() };
    let text = |r: Result<tonic::Response<_>, tonic::Status>| match r {
        Ok(r) => format!("{:?}", r.into_inner()),
        Err(s) => format!("error {:?} {:?}", s.code(), s.message()),
    };
    let mut out = vec![text(health.check(ask("")).await), text(health.check(ask("etcd")).await)];
    for service in ["", "etcdserverpb.KV"] {
        let mut watch = health.watch(ask(service)).await.unwrap().into_inner();
        out.push(format!("watch {service:?}: {:?}", watch.message().await));
    }
    out
}

#[tokio::test]
async fn the_grpc_health_service_answers_as_etcds() {
    let Some(etcd) = crate::harness::Etcd::start().await else { return };
    let cairn = Cairn::start().await;
    let want = health_answers(&etcd.client_url).await;
    assert_eq!(health_answers(&cairn.client_url).await, want);
    assert!(want[0].contains("Serving"), "etcd is SERVING: {want:?}");
}
