//! Malformed input from the network never takes a member down.
//!
//! Two generators, deterministic (a fixed-seed xorshift, so a failure reproduces): raw bytes
//! on the client and peer ports (with and without an HTTP/2 preface in front), and gRPC
//! calls to every RPC Cairn serves, clients' and peers', whose payloads are random protobuf:
//! random field numbers and wire types with edge-case varints, nested messages, and now and
//! then a cut or flipped byte. Each call must get an answer or end; afterwards the member
//! must still run and serve reads and Status.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Cairn, Rng};

/// A varint value that is often an edge case.
fn interesting(rng: &mut Rng) -> u64 {
    match rng.below(7) {
        0 => 0,
        1 => 1,
        2 => u64::MAX,
        3 => i64::MAX as u64,
        4 => (-1i64) as u64,
        5 => rng.below(100),
        _ => rng.next(),
    }
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A random protobuf message: fields 1..=12 of every wire type, nested up to two levels.
fn random_message(rng: &mut Rng, depth: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.below(7) {
        let field = 1 + rng.below(12);
        match rng.below(4) {
            0 => {
                varint(&mut out, field << 3);
                let v = interesting(rng);
                varint(&mut out, v);
            }
            1 => {
                varint(&mut out, (field << 3) | 2);
                let inner = if depth < 2 && rng.below(2) == 0 {
                    random_message(rng, depth + 1)
                } else {
                    rng.bytes(24)
                };
                varint(&mut out, inner.len() as u64);
                out.extend(inner);
            }
            2 => {
                varint(&mut out, (field << 3) | 1);
                out.extend(rng.next().to_le_bytes());
            }
            _ => {
                varint(&mut out, (field << 3) | 5);
                out.extend((rng.next() as u32).to_le_bytes());
            }
        }
    }
    if !out.is_empty() && rng.below(6) == 0 {
        // A damaged message: cut short, or one byte flipped.
        let at = usize::try_from(rng.below(out.len() as u64)).unwrap();
        if rng.below(2) == 0 {
            out.truncate(at);
        } else {
            out[at] ^= 0xff;
        }
    }
    out
}

/// Every gRPC method Cairn serves on its client and peer ports.
const METHODS: &[&str] = &[
    "/etcdserverpb.KV/Range",
    "/etcdserverpb.KV/Put",
    "/etcdserverpb.KV/DeleteRange",
    "/etcdserverpb.KV/Txn",
    "/etcdserverpb.KV/Compact",
    "/etcdserverpb.Watch/Watch",
    "/etcdserverpb.Lease/LeaseGrant",
    "/etcdserverpb.Lease/LeaseRevoke",
    "/etcdserverpb.Lease/LeaseKeepAlive",
    "/etcdserverpb.Lease/LeaseTimeToLive",
    "/etcdserverpb.Lease/LeaseLeases",
    "/etcdserverpb.Cluster/MemberAdd",
    "/etcdserverpb.Cluster/MemberRemove",
    "/etcdserverpb.Cluster/MemberUpdate",
    "/etcdserverpb.Cluster/MemberList",
    "/etcdserverpb.Cluster/MemberPromote",
    "/etcdserverpb.Maintenance/Alarm",
    "/etcdserverpb.Maintenance/Status",
    "/etcdserverpb.Maintenance/Defragment",
    "/etcdserverpb.Maintenance/Hash",
    "/etcdserverpb.Maintenance/HashKV",
    "/etcdserverpb.Maintenance/Snapshot",
    "/etcdserverpb.Maintenance/MoveLeader",
    "/etcdserverpb.Maintenance/Downgrade",
    "/etcdserverpb.Auth/AuthStatus",
    "/etcdserverpb.Auth/Authenticate",
    "/etcdserverpb.Auth/UserGet",
    "/v3lockpb.Lock/Lock",
    "/v3lockpb.Lock/Unlock",
    "/v3electionpb.Election/Campaign",
    "/v3electionpb.Election/Proclaim",
    "/v3electionpb.Election/Leader",
    "/v3electionpb.Election/Observe",
    "/v3electionpb.Election/Resign",
];

const PEER_METHODS: &[&str] = &[
    "/cairn.internal.Peer/Send",
    "/cairn.internal.Peer/Stream",
    "/cairn.internal.Peer/Snapshot",
    "/cairn.internal.Peer/Members",
    "/cairn.internal.Peer/LeaseRenew",
    "/cairn.internal.Peer/LeaseTimeToLive",
];

/// Sends `calls` gRPC requests over one HTTP/2 connection to `base`, all at once; each gets
/// five seconds to answer (streams stay open, so their answer is the response head).
async fn fire(base: &str, calls: Vec<(&'static str, Vec<u8>)>) -> usize {
    let addr = base.trim_start_matches("http://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut tasks = tokio::task::JoinSet::new();
    for (path, payload) in calls {
        let mut framed = vec![0u8];
        framed.extend(u32::try_from(payload.len()).unwrap().to_be_bytes());
        framed.extend(payload);
        let req = http::Request::post(format!("http://{addr}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from(framed)))
            .unwrap();
        let mut send = send.clone();
        tasks.spawn(async move {
            let answer = async {
                let res = send.send_request(req).await.ok()?;
                let status = res.status();
                // Unary calls end with their trailers; streams may stay open.
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), res.into_body().collect()).await;
                Some(status)
            };
            tokio::time::timeout(Duration::from_secs(5), answer).await.ok().flatten()
        });
    }
    let mut answered = 0;
    while let Some(r) = tasks.join_next().await {
        if let Some(status) = r.unwrap() {
            assert_eq!(status, http::StatusCode::OK, "gRPC answers with HTTP 200");
            answered += 1;
        }
    }
    answered
}

/// The member still runs and serves Status and a linearizable read.
async fn assert_serving(srv: &mut Cairn) {
    assert!(srv.is_running(), "the member died");
    let mut c = srv.client().await;
    c.status().await.unwrap();
    c.get("after-garbage", None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_protobuf_to_every_rpc_gets_answers_and_never_breaks_the_member() {
    let mut srv = Cairn::start().await;
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let calls: Vec<(&'static str, Vec<u8>)> = METHODS
        .iter()
        .flat_map(|m| (0..30).map(move |_| *m))
        .map(|m| (m, random_message(&mut rng, 0)))
        .collect();
    let n = calls.len();
    let answered = fire(&srv.client_url, calls).await;
    assert!(answered * 10 >= n * 9, "only {answered} of {n} calls were answered");
    assert_serving(&mut srv).await;

    let peer_calls: Vec<(&'static str, Vec<u8>)> = PEER_METHODS
        .iter()
        .flat_map(|m| (0..40).map(move |_| *m))
        .map(|m| (m, random_message(&mut rng, 0)))
        .collect();
    let n = peer_calls.len();
    let answered = fire(&srv.peer_url, peer_calls).await;
    assert!(answered * 10 >= n * 9, "only {answered} of {n} peer calls were answered");
    assert_serving(&mut srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_on_the_client_and_peer_ports_never_break_the_member() {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut srv = Cairn::start().await;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for i in 0..300 {
        let url = if i % 2 == 0 { &srv.client_url } else { &srv.peer_url };
        let mut tcp =
            tokio::net::TcpStream::connect(url.trim_start_matches("http://")).await.unwrap();
        let mut junk = match rng.below(3) {
            0 => PREFACE.to_vec(),
            1 => b"POST /v3/kv/put HTTP/1.1\r\nhost: x\r\ncontent-length: 99999\r\n\r\n".to_vec(),
            _ => Vec::new(),
        };
        junk.extend(rng.bytes(600));
        let _ = tcp.write_all(&junk).await;
        let _ = tcp.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut sink)).await;
    }
    assert_serving(&mut srv).await;
}

/// Every path of etcd's JSON gateway (under `/v3`; `/v3beta` is the same table).
const GATEWAY_PATHS: &[&str] = &[
    "/kv/range",
    "/kv/put",
    "/kv/deleterange",
    "/kv/txn",
    "/kv/compaction",
    "/watch",
    "/lease/grant",
    "/lease/revoke",
    "/kv/lease/revoke",
    "/lease/keepalive",
    "/lease/timetolive",
    "/kv/lease/timetolive",
    "/lease/leases",
    "/kv/lease/leases",
    "/cluster/member/add",
    "/cluster/member/remove",
    "/cluster/member/update",
    "/cluster/member/list",
    "/cluster/member/promote",
    "/maintenance/alarm",
    "/maintenance/status",
    "/maintenance/defragment",
    "/maintenance/hash",
    "/maintenance/hashkv",
    "/maintenance/snapshot",
    "/maintenance/downgrade",
    "/auth/status",
    "/auth/authenticate",
    "/auth/user/add",
    "/auth/user/get",
    "/auth/user/list",
    "/auth/user/delete",
    "/auth/user/changepw",
    "/auth/user/grant",
    "/auth/user/revoke",
    "/auth/role/add",
    "/auth/role/get",
    "/auth/role/list",
    "/auth/role/delete",
    "/auth/role/grant",
    "/auth/role/revoke",
    "/lock/lock",
    "/lock/unlock",
    "/election/campaign",
    "/election/proclaim",
    "/election/leader",
    "/election/observe",
    "/election/resign",
];

/// Field names of etcd's request messages, in both protojson spellings, and a few unknown.
const JSON_FIELDS: &[&str] = &[
    "key",
    "range_end",
    "rangeEnd",
    "value",
    "lease",
    "prev_kv",
    "prevKv",
    "ignore_value",
    "ignore_lease",
    "limit",
    "revision",
    "sort_order",
    "sortOrder",
    "sort_target",
    "serializable",
    "keys_only",
    "count_only",
    "min_mod_revision",
    "max_create_revision",
    "compare",
    "success",
    "failure",
    "request_range",
    "request_put",
    "request_delete_range",
    "request_txn",
    "target",
    "result",
    "version",
    "create_revision",
    "mod_revision",
    "physical",
    "ID",
    "TTL",
    "keys",
    "name",
    "peerURLs",
    "isLearner",
    "create_request",
    "cancel_request",
    "progress_request",
    "watch_id",
    "filters",
    "fragment",
    "start_revision",
    "progress_notify",
    "password",
    "role",
    "perm",
    "permType",
    "user",
    "action",
    "alarm",
    "memberID",
    "targetID",
    "linearizable",
    "options",
    "no_password",
    "hashKV",
    "kv",
    "leader",
    "bogus",
    "",
];

/// Strings a field may hold: base64 (valid, padded or not, invalid), numbers as strings (as
/// protojson writes 64-bit integers), enum names, URLs.
const JSON_STRINGS: &[&str] = &[
    "Zm9v",
    "AA==",
    "AA",
    "====",
    "!!",
    "-1",
    "18446744073709551616",
    "9223372036854775807",
    "1e99",
    "0x10",
    "DESCEND",
    "PUT",
    "DELETE",
    "EQUAL",
    "MOD",
    "NOSPACE",
    "ACTIVATE",
    "READWRITE",
    "http://127.0.0.1:1",
    "http://[::1",
    "",
];

/// A random JSON value, objects built from etcd's field names, nested up to `depth`.
fn random_json(rng: &mut Rng, depth: u32) -> String {
    match rng.below(if depth == 0 { 6 } else { 9 }) {
        0 => "null".into(),
        1 => ["true", "false"][rng.below(2) as usize].into(),
        2 => match rng.below(5) {
            0 => (interesting(rng) as i64).to_string(),
            1 => interesting(rng).to_string(),
            2 => "1e400".into(),
            3 => "-0.5".into(),
            _ => "123456789012345678901234567890".into(),
        },
        3..=5 => {
            let s = JSON_STRINGS[rng.below(JSON_STRINGS.len() as u64) as usize];
            serde_json::Value::String(s.into()).to_string()
        }
        6 => {
            let items: Vec<String> =
                (0..rng.below(4)).map(|_| random_json(rng, depth - 1)).collect();
            format!("[{}]", items.join(","))
        }
        _ => {
            let fields: Vec<String> = (0..rng.below(5))
                .map(|_| {
                    let name = JSON_FIELDS[rng.below(JSON_FIELDS.len() as u64) as usize];
                    format!("\"{name}\":{}", random_json(rng, depth - 1))
                })
                .collect();
            format!("{{{}}}", fields.join(","))
        }
    }
}

/// A request body: a random JSON object, sometimes damaged, doubled (two values, as a
/// stream sends), deeply nested, or not JSON at all.
fn random_body(rng: &mut Rng) -> Vec<u8> {
    let mut body = format!("{{{}}}", {
        let v = random_json(rng, 3);
        v.strip_prefix('{').and_then(|v| v.strip_suffix('}')).unwrap_or("").to_owned()
    })
    .into_bytes();
    match rng.below(10) {
        0 if !body.is_empty() => {
            let at = rng.below(body.len() as u64) as usize;
            body.truncate(at);
        }
        1 if !body.is_empty() => {
            let at = rng.below(body.len() as u64) as usize;
            body[at] = rng.next() as u8;
        }
        2 => body.extend(body.clone()),
        3 => {
            let depth = 1 + rng.below(300) as usize;
            body =
                format!("{}{}", "{\"success\":[{\"request_txn\":".repeat(depth), "{}").into_bytes();
        }
        4 => body = rng.bytes(64),
        _ => {}
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_json_to_every_gateway_path_gets_etcd_shaped_answers_and_never_breaks_the_member() {
    let mut srv = Cairn::start().await;
    let url = srv.client_url.clone();
    let mut rng = Rng(0x4a53_4f4e_4741_5445);
    let mut answered = 0;
    for round in 0..12 {
        let mut tasks = tokio::task::JoinSet::new();
        for path in GATEWAY_PATHS {
            let body = random_body(&mut rng);
            let prefix = if round % 3 == 2 { "/v3beta" } else { "/v3" };
            let (url, path) = (url.clone(), format!("{prefix}{path}"));
            tasks.spawn(async move {
                let text = String::from_utf8_lossy(&body).into_owned();
                let call = crate::gateway::http1(&url, "POST", &path, &text);
                let answer = tokio::time::timeout(Duration::from_secs(3), call).await.ok();
                (path, text, answer)
            });
        }
        while let Some(r) = tasks.join_next().await {
            let (path, body, answer) = r.unwrap();
            // Streams (watch, keepalive, observe) and blocking calls may not finish in time.
            let Some(a) = answer else { continue };
            answered += 1;
            // A 500 is not a crash here: etcd answers gRPC code Unknown with it (its lock
            // and election services pass client errors through), so every answer is
            // checked for etcd's shape instead: JSON, and an error carries code and message.
            let first = a.body.lines().next().unwrap_or("");
            let json: serde_json::Value = serde_json::from_str(first)
                .unwrap_or_else(|e| panic!("{path} {body}: not JSON ({e}): {}", a.body));
            if a.status != 200 {
                assert!(
                    json["code"].is_i64() && json["message"].is_string(),
                    "{path} {body}: {first}"
                );
            }
        }
    }
    assert!(answered > 400, "only {answered} answers");
    assert_serving(&mut srv).await;
}
