//! The HTTP/JSON gateway and the operations endpoints of a real `cairn` process, through a
//! plain HTTP client (hyper, HTTP/1.1 and HTTP/2) and through `curl` as a child process.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};

use crate::harness::Cairn;

/// An HTTP answer: status, content type and body text.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

fn host_port(base: &str) -> String {
    base.trim_start_matches("http://").to_owned()
}

fn request(base: &str, method: &str, path: &str, body: &str) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .method(method)
        .uri(format!("{base}{path}"))
        .header("host", host_port(base))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

async fn collect(res: http::Response<hyper::body::Incoming>) -> Answer {
    let status = res.status().as_u16();
    let content_type = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Answer { status, content_type, body: String::from_utf8(body.to_vec()).unwrap() }
}

/// Sends one HTTP/1.1 request to `base` (e.g. `http://127.0.0.1:2379`).
pub async fn http1(base: &str, method: &str, path: &str, body: &str) -> Answer {
    let tcp = tokio::net::TcpStream::connect(host_port(base)).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    collect(send.send_request(request(base, method, path, body)).await.unwrap()).await
}

/// Sends one HTTP/2 (prior knowledge, h2c) request to `base`.
pub async fn http2(base: &str, method: &str, path: &str, body: &str) -> Answer {
    let tcp = tokio::net::TcpStream::connect(host_port(base)).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    collect(send.send_request(request(base, method, path, body)).await.unwrap()).await
}

/// POSTs `body` to a gateway path over HTTP/1.1.
pub async fn post(base: &str, path: &str, body: Value) -> Answer {
    http1(base, "POST", path, &body.to_string()).await
}

/// GETs `path` over HTTP/1.1.
pub async fn get(base: &str, path: &str) -> Answer {
    http1(base, "GET", path, "").await
}

fn b64(s: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in s.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Asserts an etcd gateway error: status, gRPC code and message.
fn assert_error(a: &Answer, status: u16, code: i64, message: &str) {
    assert_eq!(a.status, status, "{}", a.body);
    let v = a.json();
    assert_eq!(v["code"], json!(code), "{}", a.body);
    assert_eq!(v["error"], v["message"], "{}", a.body);
    assert!(v["message"].as_str().unwrap().contains(message), "{} lacks {message}", a.body);
}

#[tokio::test]
async fn kv_calls_round_trip_bytes_as_base64_and_int64_as_strings() {
    let srv = Cairn::start().await;
    let url = srv.client_url.as_str();
    // Bytes that are not UTF-8 survive the base64 round trip.
    let key: &[u8] = b"bin\xff\x00key";
    let value: &[u8] = b"\x00\x01\xfe\xff";
    let put = post(url, "/v3/kv/put", json!({"key": b64(key), "value": b64(value)})).await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(put.content_type, "application/json");
    let header = &put.json()["header"];
    let rev: i64 = header["revision"].as_str().expect("revision is a string").parse().unwrap();
    assert!(header["cluster_id"].is_string() && header["member_id"].is_string());

    let got = post(url, "/v3/kv/range", json!({"key": b64(key)})).await.json();
    let kv = &got["kvs"][0];
    assert_eq!(kv["key"], json!(b64(key)));
    assert_eq!(kv["value"], json!(b64(value)));
    assert_eq!(kv["create_revision"], json!(rev.to_string()));
    assert_eq!(kv["version"], json!("1"));
    assert_eq!(got["count"], json!("1"));
    assert!(kv.get("lease").is_none(), "zero values are omitted");
    assert!(got.get("more").is_none(), "false is omitted");

    // What went in through JSON is what gRPC clients read.
    let mut c = srv.client().await;
    let r = c.get(key, None).await.unwrap();
    assert_eq!(r.kvs()[0].value(), value);

    // lowerCamel input, numbers for int64 and enum names are all accepted.
    let got = post(
        url,
        "/v3/kv/range",
        json!({"key": b64(b"bin"), "rangeEnd": b64(b"bio"), "countOnly": true, "revision": rev,
               "sort_order": "DESCEND", "unknown_field": 1}),
    )
    .await
    .json();
    assert_eq!(got["count"], json!("1"));
    assert!(got.get("kvs").is_none());

    let txn = post(
        url,
        "/v3/kv/txn",
        json!({
            "compare": [{"key": b64(key), "result": "EQUAL", "target": "VALUE", "value": b64(value)}],
            "success": [{"request_put": {"key": b64(key), "value": b64(b"v2"), "prev_kv": true}},
                        {"requestRange": {"key": b64(key)}}],
        }),
    )
    .await
    .json();
    assert_eq!(txn["succeeded"], json!(true));
    assert_eq!(txn["responses"][0]["response_put"]["prev_kv"]["value"], json!(b64(value)));
    assert_eq!(txn["responses"][1]["response_range"]["kvs"][0]["value"], json!(b64(b"v2")));

    let del =
        post(url, "/v3/kv/deleterange", json!({"key": b64(key), "prev_kv": true})).await.json();
    assert_eq!(del["deleted"], json!("1"));
    assert_eq!(del["prev_kvs"][0]["value"], json!(b64(b"v2")));

    let compact = post(url, "/v3/kv/compaction", json!({"revision": rev.to_string()})).await;
    assert_eq!(compact.status, 200, "{}", compact.body);
    let again = post(url, "/v3/kv/compaction", json!({"revision": rev.to_string()})).await;
    assert_error(&again, 400, 11, "etcdserver: mvcc: required revision has been compacted");

    // /v3beta is the same API.
    let beta = post(url, "/v3beta/kv/range", json!({"key": b64(b"absent")})).await;
    assert_eq!(beta.status, 200);
    assert!(beta.json().get("kvs").is_none());
}

#[tokio::test]
async fn bad_requests_get_etcds_errors_and_never_break_the_server() {
    let srv = Cairn::start().await;
    let url = srv.client_url.as_str();
    assert_error(&post(url, "/v3/kv/range", json!({})).await, 400, 3, "key is not provided");
    let empty = http1(url, "POST", "/v3/kv/range", "").await;
    assert_error(&empty, 400, 3, "etcdserver: key is not provided");
    let future = post(url, "/v3/kv/range", json!({"key": "YQ==", "revision": "1000"})).await;
    assert_error(&future, 400, 11, "required revision is a future revision");
    assert_error(&http1(url, "POST", "/v3/kv/put", "{bad").await, 400, 3, "key must be a string");
    assert_error(&post(url, "/v3/kv/put", json!({"key": 1})).await, 400, 3, "base64");
    assert_error(&post(url, "/v3/kv/put", json!({"key": "!!!"})).await, 400, 3, "");
    assert_error(
        &post(url, "/v3/kv/range", json!({"key": "YQ==", "limit": "x"})).await,
        400,
        3,
        "",
    );
    assert_error(
        &post(url, "/v3/kv/range", json!({"key": "YQ==", "sort_order": "NOPE"})).await,
        400,
        3,
        "NOPE",
    );
    // 2 MiB of value: past the 1.5 MiB request limit plus gRPC's overhead allowance.
    let big = json!({"key": "YQ==", "value": b64(&vec![7u8; 2 * 1024 * 1024])});
    assert_error(&post(url, "/v3/kv/put", big).await, 429, 8, "larger than max");
    // Just past --max-request-bytes but within the receive limit: the server's own check.
    let large = json!({"key": "YQ==", "value": b64(&vec![7u8; 1_600_000])});
    assert_error(&post(url, "/v3/kv/put", large).await, 400, 3, "etcdserver: request is too large");

    let missing = post(url, "/v3/kv/nope", json!({})).await;
    assert_error(&missing, 404, 5, "Not Found");
    assert_eq!(post(url, "/v3alpha/kv/range", json!({"key": "YQ=="})).await.status, 404);
    assert_eq!(get(url, "/v3/kv/range").await.status, 405);
    // The member still serves.
    assert_eq!(post(url, "/v3/kv/put", json!({"key": "YQ==", "value": "Yg=="})).await.status, 200);
}

#[tokio::test]
async fn the_gateway_speaks_http2_beside_grpc_on_one_port() {
    let srv = Cairn::start().await;
    let url = srv.client_url.as_str();
    let put = http2(url, "POST", "/v3/kv/put", r#"{"key":"aDI=","value":"eWVz"}"#).await;
    assert_eq!(put.status, 200, "{}", put.body);
    let got = http2(url, "POST", "/v3/kv/range", r#"{"key":"aDI="}"#).await.json();
    assert_eq!(got["kvs"][0]["value"], json!("eWVz"));
    let mut c = srv.client().await;
    assert_eq!(c.get("h2", None).await.unwrap().kvs()[0].value(), b"yes");
    assert_eq!(http2(url, "GET", "/health", "").await.status, 200);
}

#[tokio::test]
async fn maintenance_and_cluster_paths_answer_or_say_unimplemented_as_etcd_would() {
    let srv = Cairn::start().await;
    let url = srv.client_url.as_str();
    let status = post(url, "/v3/maintenance/status", json!({})).await.json();
    assert_eq!(status["version"], json!(cairn::server::ETCD_VERSION));
    assert!(status["dbSize"].is_string() && status["raftIndex"].is_string(), "{status}");
    assert_eq!(status["leader"], status["header"]["member_id"]);
    let alarms = post(url, "/v3/maintenance/alarm", json!({"action": "GET"})).await;
    assert_eq!(alarms.status, 200);
    assert!(alarms.json().get("alarms").is_none(), "no alarm is raised");
    let members = post(url, "/v3/cluster/member/list", json!({"linearizable": true})).await.json();
    let m = &members["members"][0];
    assert_eq!(m["ID"], members["header"]["member_id"]);
    assert_eq!(m["name"], json!("it"));
    assert_eq!(m["clientURLs"], json!([srv.client_url]));
    assert_eq!(m["peerURLs"], json!([srv.peer_url]));
    let hash = post(url, "/v3/maintenance/hashkv", json!({})).await;
    assert_eq!(hash.status, 200, "{}", hash.body);
    assert!(hash.json()["hash_revision"].is_string(), "{}", hash.body);
    // Membership calls are served: a request naming no member gets etcd's error, not 501.
    for path in ["/v3/cluster/member/remove", "/v3/cluster/member/promote"] {
        let a = post(url, path, json!({})).await;
        assert_ne!(a.status, 501, "{path}: {}", a.body);
        assert!(
            a.json()["message"].as_str().is_some_and(|m| m.starts_with("etcdserver: ")),
            "{}",
            a.body
        );
    }
    // Hash, Defragment and the Snapshot stream are served.
    let h = post(url, "/v3/maintenance/hash", json!({})).await;
    assert_eq!(h.status, 200, "{}", h.body);
    assert!(h.json()["hash"].is_number(), "{}", h.body);
    let d = post(url, "/v3/maintenance/defragment", json!({})).await;
    assert_eq!(d.status, 200, "{}", d.body);
    let snap = post(url, "/v3/maintenance/snapshot", json!({})).await;
    assert_eq!(snap.status, 200);
    assert!(snap.body.contains("\"blob\""), "{}", snap.body);
    let a = post(url, "/v3/maintenance/downgrade", json!({})).await;
    assert_error(&a, 501, 12, "");
    // Auth is served (tests/it/auth.rs covers it): with auth off, status says so.
    let a = post(url, "/v3/auth/status", json!({})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["authRevision"], "1", "{}", a.body);
    let a = post(url, "/v3/auth/role/list", json!({})).await;
    assert_eq!(a.status, 200, "{}", a.body);
}

/// Reads a streaming response line by line until `done` accepts a line or `limit` passes.
async fn read_lines(
    res: http::Response<hyper::body::Incoming>,
    limit: Duration,
    mut done: impl FnMut(&Value) -> bool,
) -> Vec<Value> {
    let mut body = res.into_body();
    let mut buf = Vec::new();
    let mut lines = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let v: Value = serde_json::from_slice(&line).unwrap();
            let stop = done(&v);
            lines.push(v);
            if stop {
                return lines;
            }
        }
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => buf.extend_from_slice(frame.data_ref().map_or(&[][..], |d| d)),
            Ok(_) | Err(_) => return lines,
        }
    }
}

/// Opens a streaming call over HTTP/1.1 and returns its response head and body.
async fn open_stream(base: &str, path: &str, body: &str) -> http::Response<hyper::body::Incoming> {
    let tcp = tokio::net::TcpStream::connect(host_port(base)).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    send.send_request(request(base, "POST", path, body)).await.unwrap()
}

#[tokio::test]
async fn a_watch_streams_live_events_or_answers_unimplemented_until_watch_lands() {
    let srv = Cairn::start().await;
    let url = srv.client_url.as_str();
    let res = open_stream(url, "/v3/watch", r#"{"create_request":{"key":"d2F0Y2hlZA=="}}"#).await;
    if res.status() == 501 {
        let a = collect(res).await;
        assert_error(&a, 501, 12, "unknown service etcdserverpb.Watch");
        return;
    }
    assert_eq!(res.status(), 200);
    let writer = {
        let url = url.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            post(&url, "/v3/kv/put", json!({"key": "d2F0Y2hlZA==", "value": "djE="})).await
        })
    };
    let lines =
        read_lines(res, Duration::from_secs(10), |v| v["result"].get("events").is_some()).await;
    assert_eq!(writer.await.unwrap().status, 200);
    assert_eq!(lines[0]["result"]["created"], json!(true), "{lines:?}");
    let event = &lines.last().unwrap()["result"]["events"][0];
    assert_eq!(event["kv"]["key"], json!("d2F0Y2hlZA=="), "{lines:?}");
    assert_eq!(event["kv"]["value"], json!("djE="));
    assert!(event.get("type").is_none(), "PUT is the zero enum value, omitted");
}

#[tokio::test]
async fn leases_grant_keep_alive_as_a_stream_and_revoke_through_every_alias() {
    let srv = Cairn::start().await;
    let url = srv.client_url.as_str();
    let grant = post(url, "/v3/lease/grant", json!({"TTL": "60", "ID": "4660"})).await.json();
    assert_eq!((grant["ID"].clone(), grant["TTL"].clone()), (json!("4660"), json!("60")));
    let put =
        post(url, "/v3/kv/put", json!({"key": "bGVhc2Vk", "value": "dg==", "lease": "4660"})).await;
    assert_eq!(put.status, 200, "{}", put.body);

    // Two keep-alives in one body, one per line of the answer; an unknown lease gets TTL 0
    // (omitted), not an error.
    let res = open_stream(url, "/v3/lease/keepalive", r#"{"ID":"4660"}{"ID":"99"}"#).await;
    assert_eq!(res.status(), 200);
    let lines =
        read_lines(res, Duration::from_secs(10), |v| v["result"]["ID"] == json!("99")).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["result"]["TTL"], json!("60"));
    assert!(lines[1]["result"].get("TTL").is_none(), "{lines:?}");

    for path in ["/v3/lease/timetolive", "/v3/kv/lease/timetolive"] {
        let ttl = post(url, path, json!({"ID": "4660", "keys": true})).await.json();
        assert_eq!(ttl["grantedTTL"], json!("60"));
        assert_eq!(ttl["keys"], json!(["bGVhc2Vk"]));
    }
    for path in ["/v3/lease/leases", "/v3/kv/lease/leases"] {
        let leases = post(url, path, json!({})).await.json();
        assert_eq!(leases["leases"], json!([{"ID": "4660"}]));
    }
    assert_eq!(post(url, "/v3/kv/lease/revoke", json!({"ID": "4660"})).await.status, 200);
    let again = post(url, "/v3/lease/revoke", json!({"ID": "4660"})).await;
    assert_error(&again, 404, 5, "etcdserver: requested lease not found");
    let gone = post(url, "/v3/kv/range", json!({"key": "bGVhc2Vk"})).await.json();
    assert!(gone.get("kvs").is_none(), "revoke deleted the attached key");
    let bad = open_stream(url, "/v3/lease/keepalive", r#"{"ID":true}"#).await;
    assert_error(&collect(bad).await, 400, 3, "");
}

#[tokio::test]
async fn health_livez_readyz_and_version_report_a_healthy_member() {
    let srv = Cairn::start().await;
    let url = srv.client_url.as_str();
    for path in ["/health", "/health?serializable=true", "/health?exclude=NOSPACE"] {
        let h = get(url, path).await;
        assert_eq!(h.status, 200, "{path}");
        assert_eq!(h.json(), json!({"health": "true", "reason": ""}), "{path}");
    }
    for path in ["/livez", "/readyz", "/readyz/linearizable_read", "/livez/serializable_read"] {
        let a = get(url, path).await;
        assert_eq!((a.status, a.body.as_str()), (200, "ok\n"), "{path}");
    }
    let verbose = get(url, "/readyz?verbose&exclude=non_learner").await;
    assert_eq!(
        verbose.body,
        "[+]data_corruption ok\n[+]serializable_read ok\n[+]linearizable_read ok\n[+]non_learner excluded: ok\n[+]fatal_error ok\nok\n"
    );
    assert_eq!(get(url, "/readyz/no_such_check").await.status, 404);
    assert_eq!(http1(url, "POST", "/health", "").await.status, 405);
    let v = get(url, "/version").await.json();
    assert_eq!(
        v,
        json!({"etcdserver": cairn::server::ETCD_VERSION, "etcdcluster": "3.6.0", "storage": "3.6.0"})
    );
}

/// Runs `curl` with `args`, returning its stdout; `None` when curl is not installed.
fn curl(args: &[&str]) -> Option<String> {
    match std::process::Command::new("curl").arg("-sS").args(args).output() {
        Ok(out) => {
            assert!(
                out.status.success(),
                "curl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Some(String::from_utf8(out.stdout).unwrap())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(std::env::var_os("CAIRN_REQUIRE_ETCD").is_none(), "curl is required");
            None
        }
        Err(e) => panic!("curl: {e}"),
    }
}

/// Blanks the values of the ids that differ from member to member.
fn normalize_ids(text: &str) -> String {
    let mut out = text.to_owned();
    for field in ["\"cluster_id\":\"", "\"member_id\":\""] {
        let mut from = 0;
        while let Some(i) = out[from..].find(field) {
            let start = from + i + field.len();
            let end = start + out[start..].find('"').unwrap();
            out.replace_range(start..end, "ID");
            from = start;
        }
    }
    out
}

/// The `$ curl` commands of the README's gateway section with the output shown after each.
fn readme_examples() -> Vec<(String, String)> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme.split("## HTTP/JSON gateway").nth(1).unwrap();
    let section = section.split("\n## ").next().unwrap();
    let mut examples: Vec<(String, String)> = Vec::new();
    let mut in_console = false;
    for line in section.lines() {
        if line.starts_with("```") {
            in_console = line == "```console";
            continue;
        }
        if !in_console {
            continue;
        }
        match line.strip_prefix("$ ") {
            Some(cmd) => examples.push((cmd.to_owned(), String::new())),
            None => {
                let (_, out) = examples.last_mut().unwrap();
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    examples
}

#[tokio::test]
async fn curl_gives_the_answers_the_readme_shows() {
    if curl(&["--version"]).is_none() {
        eprintln!("no curl; skipping");
        return;
    }
    let examples = readme_examples();
    assert!(examples.len() >= 10, "the README shows curl examples");
    let srv = Cairn::start().await;
    let url = srv.client_url.clone();
    tokio::task::spawn_blocking(move || {
        for (cmd, expected) in examples {
            assert!(cmd.starts_with("curl "), "{cmd}");
            let cmd = cmd.replace("http://localhost:2379", &url);
            let out = std::process::Command::new("sh").arg("-c").arg(&cmd).output().unwrap();
            assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
            let got = String::from_utf8(out.stdout).unwrap();
            // Unary answers have no trailing newline; the README shows one line each.
            let got = format!("{}\n", got.trim_end());
            assert_eq!(normalize_ids(&got), normalize_ids(&expected), "{cmd}");
        }
    })
    .await
    .unwrap();
}
