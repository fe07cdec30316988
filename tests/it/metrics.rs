//! `/metrics` of a real `cairn` process, parsed as Prometheus text: etcd's names, types,
//! label sets and buckets, and counters that move with traffic.

use std::collections::{BTreeMap, BTreeSet};

use tonic::Code;

use crate::gateway::get;
use crate::harness::{Cairn, free_port};
use crate::kv::grpc_err;

/// One sample line: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed exposition: `# TYPE` per family and every sample.
#[derive(Debug, Default)]
struct Scrape {
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

/// Parses the Prometheus text format (0.0.4) as far as Cairn writes it: `# HELP`/`# TYPE`
/// comments, and `name{label="value",...} number` samples with escaped label values.
fn parse(text: &str) -> Scrape {
    let mut scrape = Scrape::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE line");
            let prev = scrape.types.insert(name.to_owned(), kind.to_owned());
            assert!(prev.is_none(), "family {name} declared twice");
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (name, rest) = match line.find('{') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => {
                let (name, value) = line.split_once(' ').expect("sample line");
                let value = value.parse().unwrap_or_else(|_| panic!("bad value in {line}"));
                scrape.samples.push(Sample { name: name.into(), labels: BTreeMap::new(), value });
                continue;
            }
        };
        let mut labels = BTreeMap::new();
        let mut chars = rest.chars().peekable();
        loop {
            let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
            assert_eq!(chars.next(), Some('"'), "in {line}");
            let mut value = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some('n') => value.push('\n'),
                        Some(other) => value.push(other),
                        None => panic!("dangling escape in {line}"),
                    },
                    '"' => break,
                    c => value.push(c),
                }
            }
            labels.insert(key.trim_start_matches(',').to_owned(), value);
            match chars.next() {
                Some(',') if chars.peek() == Some(&'}') => {
                    chars.next();
                    break;
                }
                Some(',') => continue,
                Some('}') => break,
                other => panic!("unexpected {other:?} in {line}"),
            }
        }
        let value: String = chars.collect();
        let value = value.trim().parse().unwrap_or_else(|_| panic!("bad value in {line}"));
        scrape.samples.push(Sample { name: name.to_owned(), labels, value });
    }
    scrape
}

impl Scrape {
    fn kind(&self, family: &str) -> &str {
        self.types.get(family).map(String::as_str).unwrap_or_else(|| panic!("no family {family}"))
    }

    fn all(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// The value of the one sample of `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = self
            .all(name)
            .into_iter()
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v)))
            .collect();
        assert_eq!(found.len(), 1, "{name}{labels:?}: {found:?}");
        found[0].value
    }
}

async fn scrape(base: &str) -> Scrape {
    let a = get(base, "/metrics").await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.content_type, "text/plain; version=0.0.4; charset=utf-8");
    parse(&a.body)
}

fn kv_labels<'a>(method: &'a str, code: &'a str) -> [(&'a str, &'a str); 4] {
    [
        ("grpc_type", "unary"),
        ("grpc_service", "etcdserverpb.KV"),
        ("grpc_method", method),
        ("grpc_code", code),
    ]
}

#[tokio::test]
async fn metrics_carry_etcds_names_types_and_labels_and_move_with_traffic() {
    let metrics_url = format!("http://127.0.0.1:{}", free_port());
    let srv =
        Cairn::start_with(&["--metrics", "extensive", "--listen-metrics-urls", &metrics_url]).await;
    let url = srv.client_url.as_str();
    let before = scrape(url).await;

    for (family, kind) in [
        ("etcd_server_has_leader", "gauge"),
        ("etcd_server_is_leader", "gauge"),
        ("etcd_server_leader_changes_seen_total", "counter"),
        ("etcd_server_proposals_committed_total", "gauge"),
        ("etcd_server_proposals_applied_total", "gauge"),
        ("etcd_server_proposals_pending", "gauge"),
        ("etcd_server_proposals_failed_total", "counter"),
        ("etcd_server_quota_backend_bytes", "gauge"),
        ("etcd_disk_wal_fsync_duration_seconds", "histogram"),
        ("etcd_disk_backend_commit_duration_seconds", "histogram"),
        ("etcd_mvcc_db_total_size_in_bytes", "gauge"),
        ("etcd_mvcc_db_total_size_in_use_in_bytes", "gauge"),
        ("etcd_network_peer_sent_bytes_total", "counter"),
        ("etcd_network_peer_received_bytes_total", "counter"),
        ("etcd_network_peer_sent_failures_total", "counter"),
        ("etcd_network_peer_round_trip_time_seconds", "histogram"),
        ("etcd_network_client_grpc_sent_bytes_total", "counter"),
        ("etcd_network_client_grpc_received_bytes_total", "counter"),
        ("grpc_server_started_total", "counter"),
        ("grpc_server_handled_total", "counter"),
        ("grpc_server_handling_seconds", "histogram"),
        ("process_resident_memory_bytes", "gauge"),
        ("cairn_build_info", "gauge"),
    ] {
        assert_eq!(before.kind(family), kind, "{family}");
    }
    assert_eq!(before.value("etcd_server_has_leader", &[]), 1.0);
    assert_eq!(before.value("etcd_server_is_leader", &[]), 1.0);
    assert!(before.value("etcd_server_leader_changes_seen_total", &[]) >= 1.0);
    assert_eq!(before.value("etcd_server_quota_backend_bytes", &[]), 2147483648.0);
    assert!(before.value("etcd_mvcc_db_total_size_in_bytes", &[]) > 0.0);
    assert!(before.value("process_resident_memory_bytes", &[]) > 0.0);
    let id = before.all("etcd_server_id");
    assert_eq!(id.len(), 1);
    // etcd formats the id as unpadded hex (`%x`), so a leading zero nibble makes it shorter.
    let hex = &id[0].labels["server_id"];
    assert!((1..=16).contains(&hex.len()), "{:?}", id[0]);
    assert!(u64::from_str_radix(hex, 16).is_ok(), "{:?}", id[0]);

    // etcd's WAL fsync buckets: 1 ms doubling to 8.192 s.
    let les: Vec<String> = before
        .all("etcd_disk_wal_fsync_duration_seconds_bucket")
        .iter()
        .map(|s| s.labels["le"].clone())
        .collect();
    assert_eq!(
        les,
        [
            "0.001", "0.002", "0.004", "0.008", "0.016", "0.032", "0.064", "0.128", "0.256",
            "0.512", "1.024", "2.048", "4.096", "8.192", "+Inf"
        ]
    );

    // Every method of every registered service starts at zero under every code.
    let label_sets: BTreeSet<Vec<String>> = before
        .all("grpc_server_handled_total")
        .iter()
        .map(|s| s.labels.keys().cloned().collect())
        .collect();
    assert_eq!(
        label_sets,
        BTreeSet::from([vec![
            "grpc_code".to_owned(),
            "grpc_method".into(),
            "grpc_service".into(),
            "grpc_type".into()
        ]])
    );
    assert_eq!(before.value("grpc_server_handled_total", &kv_labels("Compact", "DataLoss")), 0.0);
    let keepalive = [
        ("grpc_type", "bidi_stream"),
        ("grpc_service", "etcdserverpb.Lease"),
        ("grpc_method", "LeaseKeepAlive"),
    ];
    assert_eq!(before.value("grpc_server_started_total", &keepalive), 0.0);

    // Traffic: three puts, one refused range, one gateway put.
    let mut c = srv.client().await;
    for i in 0..3 {
        c.put(format!("k{i}"), "v", None).await.unwrap();
    }
    let (code, _) = grpc_err(c.get("", None).await.unwrap_err());
    assert_eq!(code, Code::InvalidArgument);
    let put =
        crate::gateway::post(url, "/v3/kv/put", serde_json::json!({"key":"Zw==","value":"dg=="}))
            .await;
    assert_eq!(put.status, 200);

    // The commit index is published after raft hands the entries to apply, so a reply can
    // overtake it by one `Ready`: wait until it catches up.
    let committed = "etcd_server_proposals_committed_total";
    let mut after = scrape(url).await;
    for _ in 0..40 {
        if after.value(committed, &[]) >= before.value(committed, &[]) + 4.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        after = scrape(url).await;
    }
    let delta = |name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels) - before.value(name, labels)
    };
    let started_put =
        [("grpc_type", "unary"), ("grpc_service", "etcdserverpb.KV"), ("grpc_method", "Put")];
    assert_eq!(delta("grpc_server_started_total", &started_put), 4.0, "gateway calls count too");
    assert_eq!(delta("grpc_server_handled_total", &kv_labels("Put", "OK")), 4.0);
    assert_eq!(delta("grpc_server_handled_total", &kv_labels("Range", "InvalidArgument")), 1.0);
    assert_eq!(delta("grpc_server_handling_seconds_count", &started_put), 4.0);
    assert!(delta("etcd_disk_wal_fsync_duration_seconds_count", &[]) >= 4.0);
    assert!(delta("etcd_disk_wal_fsync_duration_seconds_sum", &[]) > 0.0);
    assert!(delta("etcd_disk_backend_commit_duration_seconds_count", &[]) >= 1.0);
    assert!(delta("etcd_server_proposals_committed_total", &[]) >= 4.0);
    assert!(delta("etcd_server_proposals_applied_total", &[]) >= 4.0);
    assert!(delta("etcd_network_client_grpc_received_bytes_total", &[]) > 0.0);
    assert!(delta("etcd_network_client_grpc_sent_bytes_total", &[]) > 0.0);
    assert!(delta("etcd_debugging_mvcc_current_revision", &[]) >= 4.0);
    assert_eq!(after.value("etcd_server_proposals_pending", &[]), 0.0);
    // The first scrape is counted once it has been answered.
    assert!(
        after.value("cairn_http_requests_total", &[("route", "/metrics"), ("code", "200")]) >= 1.0
    );

    // The metrics listener serves the operations endpoints and nothing else.
    let on_metrics_port = scrape(&metrics_url).await;
    assert_eq!(on_metrics_port.value("etcd_server_has_leader", &[]), 1.0);
    assert_eq!(get(&metrics_url, "/health").await.status, 200);
    let gateway_there =
        crate::gateway::post(&metrics_url, "/v3/kv/range", serde_json::json!({"key":"Zw=="})).await;
    assert_eq!(gateway_there.status, 404);
}

#[tokio::test]
async fn basic_metrics_leave_out_the_grpc_latency_histogram() {
    let srv = Cairn::start().await;
    let s = scrape(&srv.client_url).await;
    assert!(!s.types.contains_key("grpc_server_handling_seconds"));
    assert_eq!(s.kind("grpc_server_handled_total"), "counter");
}

#[test]
fn the_parser_reads_escaped_labels_and_plain_samples() {
    let s = parse(
        "# HELP a_total x\n# TYPE a_total counter\na_total{k=\"v\\\"q\",z=\"\"} 3\nb 1.5e3\n",
    );
    assert_eq!(s.kind("a_total"), "counter");
    assert_eq!(s.value("a_total", &[("k", "v\"q"), ("z", "")]), 3.0);
    assert_eq!(s.value("b", &[]), 1500.0);
}
