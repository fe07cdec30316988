//! Unit tests of the hub: a memory-backed store, writes committed by hand and handed to
//! `notify` as apply does, and streams read through their `ResponseSource`.

use std::time::Duration;

use super::*;
use crate::mvcc::tests::{NoLeases, del_req, put_req, store};
use crate::mvcc::{TxnOp, TxnRequest};

struct Fixture {
    kv: KvStore,
    hub: WatchHub,
}

fn fixture() -> Fixture {
    fixture_with(WatchConfig::default())
}

fn fixture_with(cfg: WatchConfig) -> Fixture {
    let kv = store();
    let hub = WatchHub::new(kv.clone(), cfg);
    Fixture { kv, hub }
}

impl Fixture {
    /// Commits one group of puts (one revision each) and notifies, as apply does.
    fn put(&self, key: &str, value: &str) -> i64 {
        let mut w = self.kv.write();
        let rev = w.put(&put_req(key, value), &NoLeases).unwrap().revision;
        self.hub.notify(w.commit().unwrap());
        rev
    }

    fn puts(&self, kvs: &[(&str, &str)]) {
        let mut w = self.kv.write();
        for (k, v) in kvs {
            w.put(&put_req(k, v), &NoLeases).unwrap();
        }
        self.hub.notify(w.commit().unwrap());
    }

    fn del(&self, key: &str, end: &str) -> i64 {
        let mut w = self.kv.write();
        let rev = w.delete_range(&del_req(key, end)).unwrap().revision;
        self.hub.notify(w.commit().unwrap());
        rev
    }

    fn txn_puts(&self, kvs: &[(&str, &str)]) -> i64 {
        let mut w = self.kv.write();
        let txn = TxnRequest {
            compare: vec![],
            success: kvs.iter().map(|(k, v)| TxnOp::Put(put_req(k, v))).collect(),
            failure: vec![],
        };
        let rev = w.txn(&txn, &NoLeases).unwrap().revision;
        self.hub.notify(w.commit().unwrap());
        rev
    }

    fn compact(&self, rev: i64) {
        let mut w = self.kv.write();
        w.compact(rev).unwrap();
        self.hub.notify(w.commit().unwrap());
    }
}

fn watch(key: &str, end: &str) -> CreateRequest {
    CreateRequest { key: key.into(), range_end: end.into(), ..Default::default() }
}

async fn recv(src: &mut ResponseSource) -> Response {
    tokio::time::timeout(Duration::from_secs(5), src.next())
        .await
        .expect("a response within 5 s")
        .expect("the stream is open")
}

async fn assert_quiet(src: &mut ResponseSource) {
    if let Ok(r) = tokio::time::timeout(Duration::from_millis(100), src.next()).await {
        panic!("unexpected response {r:?}");
    }
}

/// (kind, key, mod revision, previous value) of each event of an events response.
fn events(r: &Response) -> Vec<(char, String, i64, Option<String>)> {
    match &r.kind {
        ResponseKind::Events { events, prev_kv, .. } => events
            .iter()
            .map(|e| {
                (
                    if e.kind == EventKind::Put { 'P' } else { 'D' },
                    String::from_utf8_lossy(&e.kv.key).into_owned(),
                    e.kv.mod_revision,
                    e.prev_kv
                        .as_ref()
                        .filter(|_| *prev_kv)
                        .map(|p| String::from_utf8_lossy(&p.value).into_owned()),
                )
            })
            .collect(),
        other => panic!("expected events, got {other:?}"),
    }
}

fn ev(kind: char, key: &str, rev: i64) -> (char, String, i64, Option<String>) {
    (kind, key.into(), rev, None)
}

fn evp(kind: char, key: &str, rev: i64, prev: &str) -> (char, String, i64, Option<String>) {
    (kind, key.into(), rev, Some(prev.into()))
}

/// Reads responses until `n` events arrived; returns them all.
async fn collect(src: &mut ResponseSource, n: usize) -> Vec<(char, String, i64, Option<String>)> {
    let mut out = Vec::new();
    while out.len() < n {
        let r = recv(src).await;
        out.extend(events(&r));
    }
    out
}

#[tokio::test]
async fn a_watcher_receives_puts_and_deletes_of_its_key_in_revision_order() {
    let f = fixture();
    let (ctl, mut src) = f.hub.open_stream();
    ctl.create(watch("k", "")).await;
    let created = recv(&mut src).await;
    assert_eq!(created, Response { watch_id: 0, revision: 1, kind: ResponseKind::Created });
    f.put("k", "1");
    f.put("other", "x");
    f.put("k", "2");
    f.del("k", "");
    assert_eq!(events(&recv(&mut src).await), [ev('P', "k", 2)]);
    assert_eq!(events(&recv(&mut src).await), [ev('P', "k", 4)]);
    let delete = recv(&mut src).await;
    assert_eq!(delete.revision, 5);
    assert_eq!(events(&delete), [ev('D', "k", 5)]);
    assert_quiet(&mut src).await;
}

#[tokio::test]
async fn key_prefix_from_key_and_all_key_watchers_see_exactly_their_keys() {
    let f = fixture();
    let (ctl, mut src) = f.hub.open_stream();
    // (watch id, key, range_end, keys it must see)
    let table: &[(i64, &str, &str, &[&str])] = &[
        (1, "b", "", &["b"]),
        (2, "b", "c", &["b", "b1", "b2"]),
        (3, "b1", "\0", &["b1", "b2", "c"]),
        (4, "\0", "\0", &["a", "b", "b1", "b2", "c"]),
        (5, "", "", &[]),
    ];
    for (id, key, end, _) in table {
        ctl.create(CreateRequest { watch_id: *id, ..watch(key, end) }).await;
        assert_eq!(recv(&mut src).await.kind, ResponseKind::Created);
    }
    for k in ["a", "b", "b1", "b2", "c"] {
        f.put(k, "v");
    }
    let mut seen: HashMap<i64, Vec<String>> = HashMap::new();
    for _ in 0..(1 + 3 + 3 + 5) {
        let r = recv(&mut src).await;
        seen.entry(r.watch_id).or_default().extend(events(&r).into_iter().map(|e| e.1));
    }
    assert_quiet(&mut src).await;
    for (id, _, _, want) in table {
        assert_eq!(seen.remove(id).unwrap_or_default(), *want, "watcher {id}");
    }
}

#[tokio::test]
async fn events_of_one_revision_arrive_in_one_response_and_a_batch_may_merge_revisions() {
    let f = fixture();
    let (ctl, mut src) = f.hub.open_stream();
    ctl.create(CreateRequest { prev_kv: true, ..watch("t", "u") }).await;
    recv(&mut src).await;
    f.put("t1", "old");
    let rev = f.txn_puts(&[("t1", "new"), ("t2", "x"), ("zz", "y")]);
    assert_eq!(events(&recv(&mut src).await), [ev('P', "t1", 2)]);
    let r = recv(&mut src).await;
    assert_eq!(r.revision, rev);
    assert_eq!(events(&r), [evp('P', "t1", 3, "old"), ev('P', "t2", 3)]);
    let rev = f.del("t", "u");
    let r = recv(&mut src).await;
    assert_eq!(events(&r), [evp('D', "t1", rev, "new"), evp('D', "t2", rev, "x")]);
    // Two requests applied in one batch reach a watcher in one response.
    f.puts(&[("t3", "a"), ("t4", "b")]);
    assert_eq!(events(&recv(&mut src).await), [ev('P', "t3", 5), ev('P', "t4", 6)]);
}

#[tokio::test]
async fn filters_drop_puts_or_deletes_and_prev_kv_is_sent_only_when_asked() {
    let f = fixture();
    let (ctl, mut src) = f.hub.open_stream();
    ctl.create(CreateRequest { watch_id: 1, no_put: true, prev_kv: true, ..watch("k", "") }).await;
    ctl.create(CreateRequest { watch_id: 2, no_delete: true, ..watch("k", "") }).await;
    recv(&mut src).await;
    recv(&mut src).await;
    f.put("k", "1");
    f.put("k", "2");
    f.del("k", "");
    let mut by_id: HashMap<i64, Vec<_>> = HashMap::new();
    for _ in 0..3 {
        let r = recv(&mut src).await;
        by_id.entry(r.watch_id).or_default().extend(events(&r));
    }
    assert_quiet(&mut src).await;
    assert_eq!(by_id[&1], [evp('D', "k", 4, "2")]);
    assert_eq!(by_id[&2], [ev('P', "k", 2), ev('P', "k", 3)]);
}

#[tokio::test]
async fn a_past_start_revision_replays_history_then_continues_live() {
    let f = fixture();
    f.put("a", "1"); // 2
    f.put("a", "2"); // 3
    f.del("a", ""); // 4
    f.put("b", "1"); // 5
    let (ctl, mut src) = f.hub.open_stream();
    ctl.create(CreateRequest { start_revision: 3, prev_kv: true, ..watch("a", "") }).await;
    assert_eq!(recv(&mut src).await.kind, ResponseKind::Created);
    let history = recv(&mut src).await;
    assert_eq!(history.revision, 5);
    assert_eq!(events(&history), [evp('P', "a", 3, "1"), evp('D', "a", 4, "2")]);
    f.put("a", "3");
    assert_eq!(events(&recv(&mut src).await), [ev('P', "a", 6)]);
    assert_eq!(f.hub.unsynced_count(), 0);
}

#[tokio::test]
async fn a_create_is_answered_while_another_watcher_replays_a_long_history() {
    let f = fixture();
    for i in 0..20 * WINDOW_REVISIONS {
        f.put("busy", &i.to_string());
    }
    let (ctl, mut src) = f.hub.open_stream();
    // Twenty windows to scan, none with an event for this watcher.
    ctl.create(CreateRequest { start_revision: 1, ..watch("quiet", "") }).await;
    assert_eq!(recv(&mut src).await.kind, ResponseKind::Created);
    ctl.create(CreateRequest { watch_id: 9, ..watch("other", "") }).await;
    let r = recv(&mut src).await;
    assert_eq!((r.watch_id, r.kind), (9, ResponseKind::Created));
    assert!(f.hub.unsynced_count() == 1, "answered before the replay finished");
}

#[tokio::test]
async fn live_events_are_not_held_back_by_another_watchers_long_replay() {
    let f = fixture();
    for i in 0..20 * WINDOW_REVISIONS {
        f.put(if i % 100 == 0 { "old" } else { "busy" }, &i.to_string());
    }
    let (ctl, mut src) = f.hub.open_stream();
    ctl.create(watch("live", "")).await;
    ctl.create(CreateRequest { start_revision: 1, ..watch("old", "") }).await;
    recv(&mut src).await;
    recv(&mut src).await;
    let rev = f.put("live", "now");
    // The live event comes within a step or two of the replay, not after all of it.
    let mut replayed = 0;
    loop {
        let r = recv(&mut src).await;
        if r.watch_id == 0 {
            assert_eq!(events(&r), [ev('P', "live", rev)]);
            break;
        }
        replayed += events(&r).len();
    }
    assert!(replayed < 100, "{replayed} replayed events went out first");
    assert_eq!(f.hub.unsynced_count(), 1, "the replay is still going");
    assert_eq!(collect(&mut src, 200 - replayed).await.len(), 200 - replayed);
}

#[tokio::test]
async fn a_future_start_revision_waits_for_that_revision() {
    let f = fixture();
    let (ctl, mut src) = f.hub.open_stream();
    ctl.create(CreateRequest { start_revision: 4, ..watch("k", "") }).await;
    recv(&mut src).await;
    f.put("k", "1"); // 2
    f.put("k", "2"); // 3
    f.put("k", "3"); // 4
    assert_eq!(events(&recv(&mut src).await), [ev('P', "k", 4)]);
}

#[tokio::test]
async fn long_histories_are_replayed_in_windows_without_gap_or_repeat() {
    let f = fixture();
    let n = 2 * WINDOW_REVISIONS as usize + 300;
    for i in 0..n {
        f.put(if i % 3 == 0 { "x" } else { "y" }, &i.to_string());
    }
    let (ctl, mut src) = f.hub.open_stream();
    ctl.create(CreateRequest { start_revision: 1, ..watch("x", "") }).await;
    ctl.create(CreateRequest { start_revision: 500, ..watch("\0", "\0") }).await;
    recv(&mut src).await;
    recv(&mut src).await;
    let want_x: Vec<i64> = (0..n).filter(|i| i % 3 == 0).map(|i| i as i64 + 2).collect();
    let want_all: Vec<i64> = (500..n as i64 + 2).collect();
    let mut got: HashMap<i64, Vec<i64>> = HashMap::new();
    while got.get(&0).map_or(0, Vec::len) < want_x.len()
        || got.get(&1).map_or(0, Vec::len) < want_all.len()
    {
        let r = recv(&mut src).await;
        got.entry(r.watch_id).or_default().extend(events(&r).iter().map(|e| e.2));
    }
    assert_eq!(got[&0], want_x);
    assert_eq!(got[&1], want_all);
    f.put("x", "live");
    let live: Vec<i64> = (0..2).map(|_| 0).collect();
    for _ in live {
        let r = recv(&mut src).await;
        assert_eq!(events(&r).iter().map(|e| e.2).collect::<Vec<_>>(), [n as i64 + 2]);
    }
}

#[tokio::test]
async fn compacted_start_revisions_are_created_then_canceled_with_the_compact_revision() {
    let f = fixture();
    for v in ["1", "2", "3", "4"] {
        f.put("k", v); // 2..=5
    }
    f.compact(4);
    let (ctl, mut src) = f.hub.open_stream();
    ctl.create(CreateRequest { watch_id: 5, start_revision: 3, ..watch("k", "") }).await;
    assert_eq!(recv(&mut src).await.kind, ResponseKind::Created);
    let canceled = recv(&mut src).await;
    assert_eq!(
        canceled,
        Response {
            watch_id: 5,
            revision: 0,
            kind: ResponseKind::Compacted { compact_revision: 4 }
        }
    );
    // As in etcd, the id stays taken until the client cancels it, and that is answered.
    ctl.create(CreateRequest { watch_id: 5, ..watch("k", "") }).await;
    assert_eq!(recv(&mut src).await.kind, ResponseKind::Refused(Error::DuplicateWatchId));
    ctl.cancel(5).await;
    assert_eq!(
        recv(&mut src).await,
        Response { watch_id: 5, revision: 5, kind: ResponseKind::Canceled }
    );
    // Exactly at the compaction revision is still readable, as in etcd.
    ctl.create(CreateRequest { watch_id: 5, start_revision: 4, ..watch("k", "") }).await;
    assert_eq!(recv(&mut src).await.kind, ResponseKind::Created);
    assert_eq!(events(&recv(&mut src).await), [ev('P', "k", 4), ev('P', "k", 5)]);
    assert_eq!(f.hub.watcher_count(), 1);
}

#[tokio::test]
async fn bad_creates_are_refused_with_etcds_reasons() {
    let f = fixture();
    let (ctl, mut src) = f.hub.open_stream();
    let refused = |e| Response { watch_id: -1, revision: 1, kind: ResponseKind::Refused(e) };
    ctl.create(CreateRequest { start_revision: -1, ..watch("k", "") }).await;
    assert_eq!(recv(&mut src).await, refused(Error::Compacted));
    ctl.create(watch("b", "a")).await;
    assert_eq!(recv(&mut src).await, refused(Error::EmptyRange));
    ctl.create(watch("b", "b")).await;
    assert_eq!(recv(&mut src).await, refused(Error::EmptyRange));
    ctl.create(CreateRequest { watch_id: 7, ..watch("k", "") }).await;
    assert_eq!(recv(&mut src).await.watch_id, 7);
    ctl.create(CreateRequest { watch_id: 7, ..watch("j", "") }).await;
    assert_eq!(recv(&mut src).await, refused(Error::DuplicateWatchId));
    // Automatic ids count up from 0, skipping ids the client chose.
    ctl.create(CreateRequest { watch_id: 1, ..watch("k", "") }).await;
    recv(&mut src).await;
    for want in [0, 2, 3] {
        ctl.create(watch("k", "")).await;
        assert_eq!(recv(&mut src).await.watch_id, want);
    }
    assert_eq!(f.hub.watcher_count(), 5);
}

#[tokio::test]
async fn a_canceled_watcher_gets_nothing_after_its_canceled_response() {
    let f = fixture();
    let (ctl, mut src) = f.hub.open_stream();
    ctl.create(watch("k", "")).await;
    recv(&mut src).await;
    f.put("k", "1");
    ctl.cancel(0).await;
    ctl.cancel(42).await;
    f.put("k", "2");
    assert_eq!(events(&recv(&mut src).await), [ev('P', "k", 2)]);
    let canceled = recv(&mut src).await;
    assert_eq!(canceled, Response { watch_id: 0, revision: 2, kind: ResponseKind::Canceled });
    assert_quiet(&mut src).await;
    assert_eq!(f.hub.watcher_count(), 0);
    // Automatic ids keep counting up, as etcd's do.
    ctl.create(watch("k", "")).await;
    assert_eq!(recv(&mut src).await.watch_id, 1);
}

#[tokio::test]
async fn a_progress_request_waits_until_every_watcher_of_the_stream_is_synced() {
    let f = fixture_with(WatchConfig { queue_responses: 2, ..WatchConfig::default() });
    let (ctl, mut src) = f.hub.open_stream();
    ctl.request_progress().await;
    let progress = Response { watch_id: -1, revision: 1, kind: ResponseKind::Progress };
    assert_eq!(recv(&mut src).await, progress, "no watcher: answered at once");
    ctl.create(watch("k", "")).await;
    recv(&mut src).await;
    // The client does not read: the watcher is set aside after two queued responses.
    for i in 0..5 {
        f.put("k", &i.to_string());
    }
    assert_eq!(f.hub.unsynced_count(), 1);
    ctl.request_progress().await;
    ctl.request_progress().await;
    // Reading resumes: every event first, then one progress response at the revision
    // every event of the stream is at or below.
    let got = collect(&mut src, 5).await;
    assert_eq!(got.iter().map(|e| e.2).collect::<Vec<_>>(), [2, 3, 4, 5, 6]);
    assert_eq!(recv(&mut src).await, Response { revision: 6, ..progress });
    assert_quiet(&mut src).await;
}

#[tokio::test]
async fn progress_notify_ticks_reach_idle_synced_watchers_only() {
    let interval = Duration::from_millis(300);
    let cfg = WatchConfig { progress_notify_interval: interval, ..Default::default() };
    let f = fixture_with(cfg);
    let (ctl, mut src) = f.hub.open_stream();
    ctl.create(CreateRequest { watch_id: 1, progress_notify: true, ..watch("a", "") }).await;
    ctl.create(CreateRequest { watch_id: 2, progress_notify: true, ..watch("b", "") }).await;
    ctl.create(CreateRequest { watch_id: 3, ..watch("c", "") }).await;
    for _ in 0..3 {
        recv(&mut src).await;
    }
    // The first tick: both progress watchers were idle.
    let mut ticks: Vec<_> = vec![recv(&mut src).await, recv(&mut src).await];
    ticks.sort_by_key(|r| r.watch_id);
    assert_eq!(
        ticks,
        [1, 2].map(|id| Response { watch_id: id, revision: 1, kind: ResponseKind::Progress })
    );
    // Watcher 1 gets an event during the next interval, so only 2 hears the tick.
    f.put("a", "1");
    assert_eq!(events(&recv(&mut src).await), [ev('P', "a", 2)]);
    let tick = recv(&mut src).await;
    assert_eq!(tick, Response { watch_id: 2, revision: 2, kind: ResponseKind::Progress });
}

#[tokio::test]
async fn a_reader_that_stops_is_set_aside_then_caught_up_without_gap_or_repeat() {
    let cfg = WatchConfig { queue_responses: 4, ..WatchConfig::default() };
    let f = fixture_with(cfg);
    let (slow_ctl, mut slow) = f.hub.open_stream();
    let (fast_ctl, mut fast) = f.hub.open_stream();
    slow_ctl.create(CreateRequest { prev_kv: true, ..watch("k", "l") }).await;
    fast_ctl.create(CreateRequest { prev_kv: true, ..watch("k", "l") }).await;
    recv(&mut slow).await;
    recv(&mut fast).await;
    let mut want = Vec::new();
    for i in 0..300 {
        let key = format!("k{}", i % 7);
        let prev = (i >= 7).then(|| (i - 7).to_string());
        let rev = f.put(&key, &i.to_string());
        want.push(('P', key, rev, prev));
        // The fast reader keeps up: it is never set aside.
        let got = events(&recv(&mut fast).await);
        assert_eq!(got.last(), want.last());
    }
    assert_eq!(f.hub.unsynced_count(), 1, "the slow reader was set aside");
    let stats = f.hub.stats();
    assert_eq!(
        stats,
        WatchStats { watchers: 2, streams: 2, unsynced: 1, pending_events: 4 },
        "the slow stream holds a full queue (4 responses of one event), the fast one nothing"
    );
    let got = collect(&mut slow, want.len()).await;
    assert_eq!(got, want);
    assert_eq!(f.hub.unsynced_count(), 0);
    f.put("k0", "live");
    assert_eq!(events(&recv(&mut slow).await).len(), 1);
}

#[tokio::test]
async fn a_set_aside_watcher_overtaken_by_compaction_is_canceled_with_compact_revision() {
    let cfg = WatchConfig { queue_responses: 1, ..WatchConfig::default() };
    let f = fixture_with(cfg);
    let (ctl, mut src) = f.hub.open_stream();
    ctl.create(watch("k", "")).await;
    recv(&mut src).await;
    for i in 0..5 {
        f.put("k", &i.to_string()); // 2..=6
    }
    f.compact(5);
    // The one queued response still goes out; then the watcher needs revision 3, which
    // is gone.
    assert_eq!(events(&recv(&mut src).await), [ev('P', "k", 2)]);
    assert_eq!(
        recv(&mut src).await,
        Response {
            watch_id: 0,
            revision: 0,
            kind: ResponseKind::Compacted { compact_revision: 5 }
        }
    );
    assert_eq!(f.hub.watcher_count(), 0);
}

#[tokio::test]
async fn unread_answers_hold_back_further_requests() {
    let f = fixture();
    let (ctl, mut src) = f.hub.open_stream();
    for _ in 0..stream::CONTROL_CAP {
        ctl.create(watch("k", "")).await;
    }
    let blocked = tokio::time::timeout(Duration::from_millis(100), ctl.create(watch("k", "")));
    assert!(blocked.await.is_err(), "the 17th create waits for the client to read");
    let next = tokio::spawn({
        let ctl = ctl.clone();
        async move { ctl.create(watch("k", "")).await }
    });
    recv(&mut src).await;
    tokio::time::timeout(Duration::from_secs(5), next).await.unwrap().unwrap();
    assert_eq!(f.hub.watcher_count(), stream::CONTROL_CAP + 1);
}

#[tokio::test]
async fn dropping_the_response_side_ends_the_stream_and_its_watchers() {
    let f = fixture();
    let (ctl, src) = f.hub.open_stream();
    ctl.create(watch("k", "")).await;
    ctl.create(CreateRequest { start_revision: 1, ..watch("j", "") }).await;
    assert_eq!(f.hub.watcher_count(), 2);
    drop(src);
    assert_eq!(f.hub.watcher_count(), 0);
    assert_eq!(f.hub.unsynced_count(), 0);
    // Requests on a closed stream are ignored, and writes reach nobody.
    ctl.create(watch("k", "")).await;
    f.put("k", "1");
    assert_eq!(f.hub.watcher_count(), 0);
}

#[test]
fn key_ranges_decode_etcds_watch_convention() {
    let r = |k: &[u8], e: &[u8]| KeyRange::new(k, e);
    assert_eq!(r(b"", b""), Ok(KeyRange::Key(Box::new([0]))));
    assert_eq!(r(b"a", b"\0"), Ok(KeyRange::Span { start: b"a"[..].into(), end: None }));
    assert_eq!(r(b"b", b"a"), Err(Error::EmptyRange));
    let span = r(b"a", b"c").unwrap();
    assert!(span.contains(b"a") && span.contains(b"bzz") && !span.contains(b"c"));
    assert!(r(b"", b"\0").unwrap().contains(b"\0"), "all keys");
}
