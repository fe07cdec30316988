//! The Watch service through the `etcd-client` crate, item by item of ETCD-COMPAT.md §1.4:
//! ranges, start revisions, prev_kv, filters, ids, fragments, cancel, progress, compaction.
//! The load, slow-consumer and restart tests live in `watch_load.rs`.

use std::time::Duration;

use etcd_client::{
    Client, DeleteOptions, EventType, Txn, TxnOp, WatchFilterType, WatchOptions, WatchResponse,
    WatchStream,
};

use crate::harness::Cairn;

/// One event as the tests compare it: (P|D, key, mod revision, value, previous value).
pub type Seen = (char, String, i64, String, Option<String>);

/// Reduces a response's events to [`Seen`] tuples.
pub fn seen(r: &WatchResponse) -> Vec<Seen> {
    r.events()
        .iter()
        .map(|e| {
            let kv = e.kv().unwrap();
            (
                if e.event_type() == EventType::Put { 'P' } else { 'D' },
                kv.key_str().unwrap().to_owned(),
                kv.mod_revision(),
                kv.value_str().unwrap().to_owned(),
                e.prev_kv().map(|p| p.value_str().unwrap().to_owned()),
            )
        })
        .collect()
}

fn put(key: &str, rev: i64, value: &str, prev: Option<&str>) -> Seen {
    ('P', key.into(), rev, value.into(), prev.map(str::to_owned))
}

fn del(key: &str, rev: i64, prev: Option<&str>) -> Seen {
    ('D', key.into(), rev, String::new(), prev.map(str::to_owned))
}

/// The next response within 10 s.
pub async fn next(s: &mut WatchStream) -> WatchResponse {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("a watch response within 10 s")
        .expect("the stream is healthy")
        .expect("the stream is open")
}

/// Asserts that nothing arrives for a moment.
async fn quiet(s: &mut WatchStream) {
    if let Ok(r) = tokio::time::timeout(Duration::from_millis(300), s.message()).await {
        panic!("unexpected response {r:?}");
    }
}

/// Reads responses until `n` events have arrived.
async fn events(s: &mut WatchStream, n: usize) -> Vec<Seen> {
    let mut out = Vec::new();
    while out.len() < n {
        out.extend(seen(&next(s).await));
    }
    out
}

/// Opens a stream with one watcher and waits for its `created`.
async fn watch(c: &mut Client, key: &str, opts: WatchOptions) -> WatchStream {
    let mut s = c.watch(key, Some(opts)).await.unwrap();
    let r = next(&mut s).await;
    assert!(r.created() && !r.canceled(), "{r:?}");
    s
}

async fn rev_of(c: &mut Client) -> i64 {
    c.get("cairn-probe", None).await.unwrap().header().unwrap().revision()
}

#[tokio::test]
async fn watchers_see_exactly_their_key_range_prefix_from_key_or_all_keys() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    // (watch id, options, keys that must be seen)
    let table: Vec<(i64, &str, WatchOptions, &[&str])> = vec![
        (1, "b", WatchOptions::new(), &["b"]),
        (2, "b", WatchOptions::new().with_range("c"), &["b", "b1", "b2"]),
        (3, "b", WatchOptions::new().with_prefix(), &["b", "b1", "b2"]),
        (4, "b1", WatchOptions::new().with_from_key(), &["b1", "b2", "c"]),
        (5, "", WatchOptions::new().with_all_keys(), &["a", "b", "b1", "b2", "c"]),
    ];
    let mut s = c.watch("unused", Some(WatchOptions::new().with_watch_id(99))).await.unwrap();
    next(&mut s).await;
    for (id, key, opts, _) in &table {
        s.watch(*key, Some(opts.clone().with_watch_id(*id))).await.unwrap();
        let r = next(&mut s).await;
        assert_eq!((r.watch_id(), r.created()), (*id, true));
    }
    for k in ["a", "b", "b1", "b2", "c"] {
        c.put(k, "v", None).await.unwrap();
    }
    let mut got: std::collections::BTreeMap<i64, Vec<String>> = Default::default();
    for _ in 0..(1 + 3 + 3 + 3 + 5) {
        let r = next(&mut s).await;
        got.entry(r.watch_id()).or_default().extend(seen(&r).into_iter().map(|e| e.1));
    }
    quiet(&mut s).await;
    for (id, _, _, want) in &table {
        assert_eq!(got.remove(id).unwrap_or_default(), *want, "watcher {id}");
    }
    assert!(got.is_empty(), "{got:?}");
}

#[tokio::test]
async fn an_old_start_revision_replays_history_with_prev_kv_then_continues_live() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    c.put("k", "1", None).await.unwrap(); // 2
    c.put("k", "2", None).await.unwrap(); // 3
    c.delete("k", None).await.unwrap(); // 4
    c.put("k", "3", None).await.unwrap(); // 5
    let opts = WatchOptions::new().with_start_revision(2).with_prev_key();
    let mut s = watch(&mut c, "k", opts).await;
    assert_eq!(
        events(&mut s, 4).await,
        [
            put("k", 2, "1", None),
            put("k", 3, "2", Some("1")),
            del("k", 4, Some("2")),
            put("k", 5, "3", None),
        ]
    );
    c.put("k", "4", None).await.unwrap();
    c.delete("k", None).await.unwrap();
    let live = events(&mut s, 2).await;
    assert_eq!(live, [put("k", 6, "4", Some("3")), del("k", 7, Some("4"))]);
    // A DELETE event carries the key with the deletion revision and nothing else.
    c.put("k", "5", None).await.unwrap();
    let r = next(&mut s).await;
    let kv = r.events()[0].kv().unwrap();
    assert_eq!((kv.create_revision(), kv.version()), (8, 1));
}

#[tokio::test]
async fn a_resumed_watch_from_last_revision_plus_one_sees_exactly_the_rest() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    let mut s = watch(&mut c, "r/", WatchOptions::new().with_prefix()).await;
    for i in 0..5 {
        c.put(format!("r/{i}"), "a", None).await.unwrap();
    }
    let first = events(&mut s, 3).await;
    drop(s);
    for i in 5..8 {
        c.put(format!("r/{i}"), "b", None).await.unwrap();
    }
    let resume = first.last().unwrap().2 + 1;
    let opts = WatchOptions::new().with_prefix().with_start_revision(resume);
    let mut s = watch(&mut c, "r/", opts).await;
    let rest = events(&mut s, 5).await;
    let revs: Vec<i64> = first.iter().chain(&rest).map(|e| e.2).collect();
    assert_eq!(revs, (2..10).collect::<Vec<_>>());
    quiet(&mut s).await;
}

#[tokio::test]
async fn a_txn_or_multi_key_delete_arrives_in_one_response() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    c.put("t1", "old", None).await.unwrap(); // 2
    let mut s = watch(&mut c, "t", WatchOptions::new().with_prefix().with_prev_key()).await;
    let txn = Txn::new().and_then(vec![
        TxnOp::put("t1", "new", None),
        TxnOp::put("t2", "x", None),
        TxnOp::put("zz", "y", None),
    ]);
    c.txn(txn).await.unwrap(); // 3
    let r = next(&mut s).await;
    assert_eq!(seen(&r), [put("t1", 3, "new", Some("old")), put("t2", 3, "x", None)]);
    assert_eq!(r.header().unwrap().revision(), 3);
    c.delete("t", Some(DeleteOptions::new().with_prefix())).await.unwrap(); // 4
    let r = next(&mut s).await;
    assert_eq!(seen(&r), [del("t1", 4, Some("new")), del("t2", 4, Some("x"))]);
}

#[tokio::test]
async fn a_lease_revoke_deletes_its_keys_in_one_response_with_prev_kv() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    let lease = c.lease_grant(60, None).await.unwrap().id();
    for k in ["l/a", "l/b", "l/c"] {
        c.put(k, "up", Some(etcd_client::PutOptions::new().with_lease(lease))).await.unwrap();
    }
    let mut s = watch(&mut c, "l/", WatchOptions::new().with_prefix().with_prev_key()).await;
    let rev = c.lease_revoke(lease).await.unwrap().header().unwrap().revision();
    let r = next(&mut s).await;
    assert_eq!(
        seen(&r),
        [del("l/a", rev, Some("up")), del("l/b", rev, Some("up")), del("l/c", rev, Some("up"))]
    );
}

#[tokio::test]
async fn noput_and_nodelete_filters_drop_their_event_kinds() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    let opts = WatchOptions::new().with_filters([WatchFilterType::NoPut]).with_watch_id(1);
    let mut s = watch(&mut c, "k", opts).await;
    s.watch(
        "k",
        Some(WatchOptions::new().with_filters([WatchFilterType::NoDelete]).with_watch_id(2)),
    )
    .await
    .unwrap();
    next(&mut s).await;
    c.put("k", "1", None).await.unwrap();
    c.delete("k", None).await.unwrap();
    let mut by_id = std::collections::BTreeMap::new();
    for _ in 0..2 {
        let r = next(&mut s).await;
        by_id.insert(r.watch_id(), seen(&r));
    }
    quiet(&mut s).await;
    assert_eq!(by_id[&1], [del("k", 3, None)]);
    assert_eq!(by_id[&2], [put("k", 2, "1", None)]);
}

#[tokio::test]
async fn watch_ids_are_chosen_by_the_client_or_counted_up_and_duplicates_are_refused() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    let mut s = watch(&mut c, "a", WatchOptions::new().with_watch_id(7)).await;
    s.watch("b", Some(WatchOptions::new().with_watch_id(7))).await.unwrap();
    let dup = next(&mut s).await;
    assert_eq!(
        (dup.watch_id(), dup.created(), dup.canceled(), dup.cancel_reason()),
        (-1, true, true, "mvcc: duplicate watch ID provided on the WatchStream")
    );
    for want in [0, 1] {
        s.watch("c", None).await.unwrap();
        assert_eq!(next(&mut s).await.watch_id(), want);
    }
    s.watch("b", Some(WatchOptions::new().with_range("a"))).await.unwrap();
    let empty = next(&mut s).await;
    assert_eq!(
        (empty.watch_id(), empty.canceled(), empty.cancel_reason()),
        (-1, true, "mvcc: watcher range is empty")
    );
    s.watch("a", Some(WatchOptions::new().with_start_revision(-1))).await.unwrap();
    let negative = next(&mut s).await;
    assert_eq!(
        (negative.watch_id(), negative.created(), negative.canceled(), negative.cancel_reason()),
        (-1, true, true, "etcdserver: mvcc: required revision has been compacted")
    );
}

#[tokio::test]
async fn cancel_answers_canceled_and_stops_the_events_of_that_watcher_only() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    let mut s = watch(&mut c, "k", WatchOptions::new().with_watch_id(1)).await;
    s.watch("k", Some(WatchOptions::new().with_watch_id(2))).await.unwrap();
    next(&mut s).await;
    s.cancel(1).await.unwrap();
    let r = next(&mut s).await;
    assert_eq!((r.watch_id(), r.canceled(), r.created()), (1, true, false));
    assert_eq!(r.header().unwrap().revision(), 1);
    // An unknown id gets no answer, as in etcd.
    s.cancel(42).await.unwrap();
    c.put("k", "v", None).await.unwrap();
    let r = next(&mut s).await;
    assert_eq!((r.watch_id(), seen(&r)), (2, vec![put("k", 2, "v", None)]));
    quiet(&mut s).await;
}

#[tokio::test]
async fn compacted_start_revisions_are_created_then_canceled_with_the_compact_revision() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    for v in ["1", "2", "3", "4"] {
        c.put("k", v, None).await.unwrap(); // 2..=5
    }
    c.compact(4, None).await.unwrap();
    let mut s = watch(&mut c, "k", WatchOptions::new().with_start_revision(3)).await;
    let r = next(&mut s).await;
    assert_eq!((r.canceled(), r.compact_revision(), r.watch_id()), (true, 4, 0));
    // The compaction revision itself is still watchable (etcd allows it too).
    let mut s = watch(&mut c, "k", WatchOptions::new().with_start_revision(4)).await;
    assert_eq!(events(&mut s, 2).await, [put("k", 4, "3", None), put("k", 5, "4", None)]);
}

#[tokio::test]
async fn a_watcher_that_falls_behind_a_compaction_is_canceled_with_compact_revision() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    let mut s = watch(&mut c, "big/", WatchOptions::new().with_prefix()).await;
    // The client stops reading while ~26 MB of events pile up: past every buffer between
    // (HTTP/2 windows, the server's 8 MiB queue), so the server sets the watcher aside.
    let value = "v".repeat(64 * 1024);
    let mut writers = Vec::new();
    for w in 0..8 {
        let (mut c, value) = (c.clone(), value.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..50 {
                c.put(format!("big/{w}/{i}"), value.clone(), None).await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let head = rev_of(&mut c).await;
    c.compact(head, None).await.unwrap();
    let mut revs = Vec::new();
    let canceled = loop {
        let r = next(&mut s).await;
        if r.canceled() {
            break r;
        }
        revs.extend(seen(&r).into_iter().map(|e| e.2));
    };
    assert_eq!(canceled.compact_revision(), head);
    assert!(revs.windows(2).all(|w| w[1] == w[0] + 1), "no gap before the cancel");
    assert!((revs.len() as i64) < head - 1, "some events were never queued: {}", revs.len());
    // Resuming from the compaction revision works.
    let opts = WatchOptions::new().with_prefix().with_start_revision(head);
    let mut s = watch(&mut c, "big/", opts).await;
    assert_eq!(events(&mut s, 1).await[0].2, head);
}

#[tokio::test]
async fn a_large_revision_is_fragmented_only_for_watchers_that_ask() {
    // A small request limit keeps the test light: fragments are cut at the limit plus
    // etcd's 512 KiB gRPC overhead allowance.
    let srv = Cairn::start_with(&["--max-request-bytes", "100000"]).await;
    let mut c = srv.client().await;
    let value = "x".repeat(90_000);
    for i in 0..8 {
        c.put(format!("f{i}"), value.clone(), None).await.unwrap(); // 2..=9
    }
    let opts = WatchOptions::new().with_prefix().with_prev_key();
    let mut frag = watch(&mut c, "f", opts.clone().with_fragment()).await;
    let mut whole = watch(&mut c, "f", opts).await;
    c.delete("f", Some(DeleteOptions::new().with_prefix())).await.unwrap(); // 10
    let r = next(&mut whole).await;
    assert_eq!(r.events().len(), 8, "one response without fragment");
    let mut parts = Vec::new();
    while parts.iter().map(Vec::len).sum::<usize>() < 8 {
        parts.push(seen(&next(&mut frag).await));
    }
    assert!(
        parts.len() >= 2,
        "the fragments: {:?}",
        parts.iter().map(Vec::len).collect::<Vec<_>>()
    );
    let keys: Vec<String> = parts.concat().into_iter().map(|e| e.1).collect();
    assert_eq!(keys, (0..8).map(|i| format!("f{i}")).collect::<Vec<_>>());
    assert!(parts.concat().iter().all(|e| e.2 == 10 && e.4.as_deref() == Some(value.as_str())));
}

#[tokio::test]
async fn a_progress_request_answers_with_watch_id_minus_one_and_the_current_revision() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    let mut s = watch(&mut c, "k", WatchOptions::new()).await;
    c.put("other", "1", None).await.unwrap(); // 2
    c.put("k", "1", None).await.unwrap(); // 3
    c.put("other", "2", None).await.unwrap(); // 4
    assert_eq!(seen(&next(&mut s).await), [put("k", 3, "1", None)]);
    s.request_progress().await.unwrap();
    let r = next(&mut s).await;
    assert_eq!((r.watch_id(), r.created(), r.canceled()), (-1, false, false));
    assert!(r.events().is_empty());
    assert_eq!(r.header().unwrap().revision(), 4);
}

#[tokio::test]
async fn progress_notify_watchers_hear_the_revision_when_idle() {
    let srv = Cairn::start_with(&["--watch-progress-notify-interval", "300ms"]).await;
    let mut c = srv.client().await;
    let mut s = watch(&mut c, "k", WatchOptions::new().with_progress_notify()).await;
    c.put("other", "1", None).await.unwrap(); // 2
    let r = next(&mut s).await;
    assert_eq!((r.watch_id(), r.events().len()), (0, 0));
    assert!(!r.created() && !r.canceled());
    let rev = r.header().unwrap().revision();
    assert!(rev >= 1);
    let r = next(&mut s).await;
    assert_eq!(r.header().unwrap().revision(), 2, "the next tick reports the new revision");
}

/// Reads `/metrics` over plain HTTP/1.1 and returns the value of an unlabelled sample.
async fn metric(base: &str, name: &str) -> f64 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(base.trim_start_matches("http://")).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: cairn\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    tcp.read_to_string(&mut body).await.unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} not in the scrape"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn watch_metrics_count_watchers_streams_and_sent_events() {
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    let mut a = watch(&mut c, "m", WatchOptions::new().with_watch_id(1)).await;
    a.watch("m", Some(WatchOptions::new().with_watch_id(2))).await.unwrap();
    next(&mut a).await;
    let mut b = watch(&mut c, "m", WatchOptions::new().with_prefix()).await;
    c.put("m", "1", None).await.unwrap();
    next(&mut a).await;
    next(&mut a).await;
    next(&mut b).await;
    let url = srv.client_url.as_str();
    assert_eq!(metric(url, "etcd_debugging_mvcc_watcher_total").await, 3.0);
    assert_eq!(metric(url, "etcd_debugging_mvcc_watch_stream_total").await, 2.0);
    assert_eq!(metric(url, "etcd_debugging_mvcc_slow_watcher_total").await, 0.0);
    assert_eq!(metric(url, "etcd_debugging_mvcc_pending_events_total").await, 0.0);
    assert_eq!(metric(url, "etcd_debugging_mvcc_events_total").await, 3.0);
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(metric(url, "etcd_debugging_mvcc_watch_stream_total").await, 1.0);
}
