//! Watch under load, through `etcd-client`: many watchers over many streams against a
//! mixed write load, a stream whose client stops reading during a burst, and a restart
//! that watchers survive by resuming from their last revision + 1. Every test checks each
//! watcher's events against an oracle built from the write responses: every event meant
//! for it, exactly once, in order.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse, WatchFilterType,
    WatchOptions, WatchResponseStream,
};
use tokio::sync::watch;

use crate::harness::Cairn;
use crate::watch::{Seen, seen};

/// A small deterministic generator (xorshift64*), so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// One change to one key, as the write responses report it.
#[derive(Debug, Clone)]
struct Change {
    rev: i64,
    /// Position inside the revision (txn op order; key order within a delete).
    sub: usize,
    key: String,
    put: bool,
    value: String,
}

/// The history of every write, in revision order, with each change's previous value.
struct Oracle {
    events: Vec<(Change, Option<String>)>,
}

impl Oracle {
    fn new(mut changes: Vec<Change>) -> Oracle {
        changes.sort_by_key(|c| (c.rev, c.sub));
        let mut live: HashMap<String, String> = HashMap::new();
        let events = changes
            .into_iter()
            .map(|c| {
                let prev = if c.put {
                    live.insert(c.key.clone(), c.value.clone())
                } else {
                    live.remove(&c.key)
                };
                (c, prev)
            })
            .collect();
        Oracle { events }
    }

    fn last_revision(&self) -> i64 {
        self.events.last().map_or(1, |(c, _)| c.rev)
    }

    /// What watcher `w` must receive.
    fn expected(&self, w: &Spec) -> Vec<Seen> {
        self.events
            .iter()
            .filter(|(c, _)| c.rev >= w.start && w.contains(&c.key))
            .filter(|(c, _)| if c.put { !w.no_put } else { !w.no_delete })
            .map(|(c, prev)| {
                let value = if c.put { c.value.clone() } else { String::new() };
                let prev = if w.prev_kv { prev.clone() } else { None };
                (if c.put { 'P' } else { 'D' }, c.key.clone(), c.rev, value, prev)
            })
            .collect()
    }
}

/// A watcher: its range as `[key, end)` (`end` empty: the key alone; `None`: no bound).
#[derive(Debug, Clone)]
struct Spec {
    id: i64,
    key: String,
    end: Option<String>,
    start: i64,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
}

impl Spec {
    fn contains(&self, k: &str) -> bool {
        match &self.end {
            Some(end) if end.is_empty() => k == self.key,
            Some(end) => self.key.as_str() <= k && k < end.as_str(),
            None => self.key.as_str() <= k,
        }
    }

    fn options(&self) -> WatchOptions {
        let mut o = WatchOptions::new().with_watch_id(self.id).with_start_revision(self.start);
        match &self.end {
            Some(end) if end.is_empty() => {}
            Some(end) => o = o.with_range(end.as_str()),
            None => o = o.with_from_key(),
        }
        if self.prev_kv {
            o = o.with_prev_key();
        }
        let mut filters = Vec::new();
        if self.no_put {
            filters.push(WatchFilterType::NoPut);
        }
        if self.no_delete {
            filters.push(WatchFilterType::NoDelete);
        }
        o.with_filters(filters)
    }
}

/// Compares what a watcher got with what it must get, reporting the first difference.
fn check(w: &Spec, got: &[Seen], want: &[Seen]) {
    if got == want {
        return;
    }
    let at = got.iter().zip(want).position(|(g, w)| g != w).unwrap_or(got.len().min(want.len()));
    panic!(
        "watcher {w:?}: got {} events, want {}; first difference at {at}: got {:?}, want {:?}",
        got.len(),
        want.len(),
        got.get(at),
        want.get(at)
    );
}

/// Reads a stream until a progress response at or above the target revision (set once
/// the writes are done) proves every earlier event has arrived; returns events by
/// watcher. `pause` makes the reader slow: it sleeps 50 ms after every that many responses.
async fn read_stream(
    mut rs: WatchResponseStream,
    target: watch::Receiver<i64>,
    created: tokio::sync::mpsc::Sender<()>,
    pause: Option<usize>,
) -> HashMap<i64, Vec<Seen>> {
    let mut got: HashMap<i64, Vec<Seen>> = HashMap::new();
    let mut n = 0;
    loop {
        let r = tokio::time::timeout(Duration::from_secs(60), rs.message())
            .await
            .expect("a response within 60 s")
            .unwrap()
            .expect("the stream stays open");
        n += 1;
        if pause.is_some_and(|p| n % p == 0) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!r.canceled(), "watcher {} canceled: {r:?}", r.watch_id());
        if r.created() {
            created.send(()).await.unwrap();
        } else if r.watch_id() == -1 {
            let t = *target.borrow();
            if t > 0 && r.header().unwrap().revision() >= t {
                return got;
            }
        } else {
            got.entry(r.watch_id()).or_default().extend(seen(&r));
        }
    }
}

/// Records one op's changes from its response.
fn deleted(rev: i64, sub0: usize, prev_kvs: &[etcd_client::KeyValue]) -> Vec<Change> {
    prev_kvs
        .iter()
        .enumerate()
        .map(|(i, kv)| Change {
            rev,
            sub: sub0 + i,
            key: kv.key_str().unwrap().to_owned(),
            put: false,
            value: String::new(),
        })
        .collect()
}

/// Runs `ops` mixed writes from `writer`: 70 % puts, 15 % deletes of a key or a group
/// prefix, 15 % txns (two puts and a delete); returns the changes they made.
async fn write_mix(mut c: Client, writer: u64, ops: u64, done: Arc<Mutex<u64>>) -> Vec<Change> {
    let mut rng = Rng(0x9E37_79B9 + writer * 7919);
    let key = |rng: &mut Rng| format!("s/{}/{}", rng.below(10), rng.below(10));
    let mut out = Vec::new();
    for i in 0..ops {
        let value = format!("{writer}-{i}");
        let roll = rng.below(100);
        if roll < 70 {
            let k = key(&mut rng);
            let r = c.put(k.as_str(), value.as_str(), None).await.unwrap();
            let rev = r.header().unwrap().revision();
            out.push(Change { rev, sub: 0, key: k, put: true, value });
        } else if roll < 85 {
            let (k, opts) = if roll < 80 {
                (key(&mut rng), DeleteOptions::new().with_prev_key())
            } else {
                (
                    format!("s/{}/", rng.below(10)),
                    DeleteOptions::new().with_prev_key().with_prefix(),
                )
            };
            let r = c.delete(k, Some(opts)).await.unwrap();
            out.extend(deleted(r.header().unwrap().revision(), 0, r.prev_kvs()));
        } else {
            let mut keys = Vec::new();
            while keys.len() < 3 {
                let k = key(&mut rng);
                if !keys.contains(&k) {
                    keys.push(k);
                }
            }
            let txn = Txn::new().and_then(vec![
                TxnOp::put(keys[0].as_str(), format!("{value}a"), None),
                TxnOp::put(keys[1].as_str(), format!("{value}b"), None),
                TxnOp::delete(keys[2].as_str(), Some(DeleteOptions::new().with_prev_key())),
            ]);
            let r = c.txn(txn).await.unwrap();
            let rev = r.header().unwrap().revision();
            for (sub, suffix) in [(0, "a"), (1, "b")] {
                let (key, value) = (keys[sub].clone(), format!("{value}{suffix}"));
                out.push(Change { rev, sub, key, put: true, value });
            }
            if let Some(TxnOpResponse::Delete(d)) = r.op_responses().get(2) {
                out.extend(deleted(rev, 2, d.prev_kvs()));
            }
        }
        *done.lock().unwrap() += 1;
    }
    out
}

/// The watcher of index `i` (of 1000): mostly single keys, then group prefixes, ranges,
/// from-key and all-key watchers, with prev_kv and filters sprinkled over them.
fn spec(i: i64, start: i64) -> Spec {
    let (g, k) = (i % 10, (i / 10) % 10);
    let (key, end) = match i % 20 {
        0..=11 => (format!("s/{g}/{k}"), Some(String::new())),
        12..=15 => (format!("s/{g}/"), Some(format!("s/{g}0"))),
        16 | 17 => (format!("s/{g}/2"), Some(format!("s/{g}/6"))),
        18 => (format!("s/{g}/5"), None),
        _ => ("\0".to_owned(), None),
    };
    Spec {
        id: i,
        key,
        end,
        start,
        prev_kv: i % 3 == 0,
        no_put: i % 37 == 5,
        no_delete: i % 41 == 7,
    }
}

/// Opens one stream (on its own connection) holding `specs`; returns the reader task.
async fn open_stream(
    srv: &Cairn,
    specs: &[Spec],
    target: &watch::Receiver<i64>,
    pause: Option<usize>,
) -> (etcd_client::WatchRequestSender, tokio::task::JoinHandle<HashMap<i64, Vec<Seen>>>) {
    let mut c = srv.client().await;
    let first = &specs[0];
    let stream = c.watch(first.key.as_str(), Some(first.options())).await.unwrap();
    let (mut tx, rs) = stream.split();
    let (created_tx, mut created_rx) = tokio::sync::mpsc::channel(specs.len());
    let reader = tokio::spawn(read_stream(rs, target.clone(), created_tx, pause));
    for s in &specs[1..] {
        tx.watch(s.key.as_str(), Some(s.options())).await.unwrap();
    }
    for _ in specs {
        created_rx.recv().await.unwrap();
    }
    (tx, reader)
}

#[tokio::test]
async fn a_thousand_watchers_on_ten_streams_get_every_event_of_ten_thousand_writes_once() {
    let srv = Cairn::start().await;
    let (target_tx, target) = watch::channel(0);
    let mut streams = Vec::new();
    // Streams 0-8 watch from now; stream 3 reads slowly. Stream 9 joins halfway through
    // the writes and replays them from revision 2 while they continue.
    for s in 0..9 {
        let specs: Vec<Spec> = (s * 100..(s + 1) * 100).map(|i| spec(i, 0)).collect();
        let pause = (s == 3).then_some(200);
        streams.push((specs.clone(), open_stream(&srv, &specs, &target, pause).await));
    }
    let started = Instant::now();
    let (writers, per_writer) = (16, 625);
    let done = Arc::new(Mutex::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(srv.client().await);
    }
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let c = clients[w as usize % clients.len()].clone();
            tokio::spawn(write_mix(c, w, per_writer, done.clone()))
        })
        .collect();
    while *done.lock().unwrap() < writers * per_writer / 2 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let late: Vec<Spec> = (900..1000).map(|i| spec(i, 2)).collect();
    streams.push((late.clone(), open_stream(&srv, &late, &target, None).await));
    let mut changes = Vec::new();
    for t in tasks {
        changes.extend(t.await.unwrap());
    }
    let wrote = started.elapsed();
    let oracle = Oracle::new(changes);
    target_tx.send(oracle.last_revision()).unwrap();
    let mut checked = 0;
    for (specs, (mut tx, reader)) in streams {
        tx.request_progress().await.unwrap();
        let got = reader.await.unwrap();
        for s in &specs {
            let want = oracle.expected(s);
            check(s, got.get(&s.id).map_or(&[][..], Vec::as_slice), &want);
            checked += want.len();
        }
    }
    eprintln!(
        "{} writes to revision {} in {wrote:?}; {checked} events checked in {:?}",
        writers * per_writer,
        oracle.last_revision(),
        started.elapsed()
    );
}

/// The `q`-quantile of `xs`.
fn quantile(mut xs: Vec<Duration>, q: f64) -> Duration {
    xs.sort_unstable();
    let i = ((xs.len() as f64 - 1.0) * q).round() as usize;
    xs.get(i).copied().unwrap_or_default()
}

/// Writes `n` puts under `b/` from 16 concurrent writers; returns the send instant of each
/// revision.
async fn burst(c: &Client, n: u64, value: &str) -> HashMap<i64, Instant> {
    let sent = Arc::new(Mutex::new(HashMap::new()));
    let next = Arc::new(Mutex::new(0));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (mut c, sent, next, value) =
                (c.clone(), sent.clone(), next.clone(), value.to_owned());
            tokio::spawn(async move {
                loop {
                    let i = {
                        let mut n2 = next.lock().unwrap();
                        *n2 += 1;
                        *n2
                    };
                    if i > n {
                        return;
                    }
                    let t0 = Instant::now();
                    let r = c.put(format!("b/{}", i % 50), value.clone(), None).await.unwrap();
                    sent.lock().unwrap().insert(r.header().unwrap().revision(), t0);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    Arc::try_unwrap(sent).unwrap().into_inner().unwrap()
}

/// A stream that keeps reading: records when each revision's event reached each watcher.
fn timed_reader(
    mut rs: WatchResponseStream,
    arrivals: Arc<Mutex<Vec<(i64, Instant)>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(Some(r)) = rs.message().await {
            let now = Instant::now();
            let mut a = arrivals.lock().unwrap();
            for e in r.events() {
                a.push((e.kv().unwrap().mod_revision(), now));
            }
        }
    })
}

#[tokio::test]
async fn a_stream_that_stops_reading_delays_no_other_stream_and_later_gets_everything() {
    let srv = Cairn::start().await;
    let writer = srv.client().await;
    let opts = |id| WatchOptions::new().with_prefix().with_watch_id(id);
    // Nine streams keep reading, each on its own connection, ten watchers each.
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let mut readers = Vec::new();
    for _ in 0..9 {
        let mut c = srv.client().await;
        let (mut tx, rs) = c.watch("b/", Some(opts(0))).await.unwrap().split();
        for id in 1..10 {
            tx.watch("b/", Some(opts(id))).await.unwrap();
        }
        readers.push((tx, timed_reader(rs, arrivals.clone())));
    }
    // The tenth stream's client will stop reading; its watchers want prev_kv too.
    let mut c = srv.client().await;
    let mut stalled = c.watch("b/", Some(opts(0).with_prev_key())).await.unwrap();
    for id in 1..10 {
        stalled.watch("b/", Some(opts(id).with_prev_key())).await.unwrap();
    }
    for _ in 0..10 {
        assert!(crate::watch::next(&mut stalled).await.created());
    }
    let start_rev = c.get("b/", None).await.unwrap().header().unwrap().revision() + 1;
    let value = "v".repeat(512);
    let latency = |sent: &HashMap<i64, Instant>, arrivals: &Mutex<Vec<(i64, Instant)>>| {
        let mut a = arrivals.lock().unwrap();
        let lat: Vec<Duration> = a
            .drain(..)
            .filter_map(|(rev, at)| sent.get(&rev).map(|t0| at.saturating_duration_since(*t0)))
            .collect();
        (lat.len(), quantile(lat, 0.99))
    };
    let wait_all = |n: usize| {
        let arrivals = arrivals.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while arrivals.lock().unwrap().len() < n {
                assert!(Instant::now() < deadline, "events did not arrive");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    // Phase 1: the tenth stream reads too (a plain reader drains it), as a baseline.
    let n = 1000;
    let drain = tokio::spawn(async move {
        let mut got = 0;
        while got < n as usize * 10 {
            got += crate::watch::next(&mut stalled).await.events().len();
        }
        stalled
    });
    let sent = burst(&writer, n, &value).await;
    wait_all(n as usize * 90).await;
    let (count, baseline) = latency(&sent, &arrivals);
    assert_eq!(count, n as usize * 90);
    let mut stalled = drain.await.unwrap();
    // Phase 2: the tenth stream's client stops reading during a burst of 10,000 responses
    // for it (1,000 puts, ten watchers): ten times what its queue holds.
    let sent = burst(&writer, n, &value).await;
    wait_all(n as usize * 90).await;
    let (count, stalled_p99) = latency(&sent, &arrivals);
    assert_eq!(count, n as usize * 90);
    eprintln!(
        "p99 event latency of the reading streams: {baseline:?} baseline, {stalled_p99:?} with a stalled stream"
    );
    assert!(
        stalled_p99 <= baseline * 3 + Duration::from_millis(250),
        "a stalled stream delayed the others: p99 {stalled_p99:?} vs {baseline:?}"
    );
    // The stalled client reads again: every watcher gets every event of both bursts once,
    // in order, with the right previous values.
    let end_rev = start_rev + 2 * n as i64 - 1;
    let mut got: BTreeMap<i64, Vec<Seen>> = BTreeMap::new();
    let mut all = 0;
    while all < n as usize * 10 {
        let r = crate::watch::next(&mut stalled).await;
        let evs = seen(&r);
        all += evs.len();
        got.entry(r.watch_id()).or_default().extend(evs);
    }
    let history = {
        let opts = GetOptions::new().with_prefix();
        let r = c.get("b/", Some(opts)).await.unwrap();
        r.header().unwrap().revision()
    };
    assert_eq!(history, end_rev);
    for (id, evs) in got {
        let revs: Vec<i64> = evs.iter().map(|e| e.2).collect();
        let want: Vec<i64> = (start_rev + n as i64..=end_rev).collect();
        assert_eq!(revs, want, "watcher {id}");
        for (i, e) in evs.iter().enumerate() {
            // Key b/k is written every 50 revisions (in send order, which may differ from
            // revision order): its previous value is the value, or absent on its first put.
            assert_eq!(e.3, value, "watcher {id} event {i}");
            assert!(e.4.as_deref().is_none_or(|p| p == value), "watcher {id} event {i}");
        }
    }
    for (tx, reader) in readers {
        drop(tx);
        reader.abort();
    }
}

#[tokio::test]
async fn watchers_that_resume_from_their_last_revision_after_a_restart_miss_nothing() {
    let mut srv = Cairn::start().await;
    let specs = [
        Spec {
            id: 1,
            key: "r/".into(),
            end: Some("r0".into()),
            start: 0,
            prev_kv: true,
            no_put: false,
            no_delete: false,
        },
        Spec {
            id: 2,
            key: "r/5".into(),
            end: Some(String::new()),
            start: 0,
            prev_kv: false,
            no_put: false,
            no_delete: false,
        },
        Spec {
            id: 3,
            key: "\0".into(),
            end: None,
            start: 0,
            prev_kv: false,
            no_put: false,
            no_delete: true,
        },
    ];
    let mut acked: Vec<Change> = Vec::new();
    let mut got: HashMap<i64, Vec<Seen>> = HashMap::new();
    let mut i = 0;
    for round in 0..3 {
        // (Re)connect every watcher from its last revision + 1.
        let mut c = srv.client().await;
        let first = c.get("x", None).await.unwrap().header().unwrap().revision();
        let mut stream = None;
        for s in &specs {
            let resume = got.get(&s.id).and_then(|e| e.last()).map_or(first + 1, |e| e.2 + 1);
            let s = Spec { start: if round == 0 { first + 1 } else { resume }, ..s.clone() };
            match &mut stream {
                None => stream = Some(c.watch(s.key.as_str(), Some(s.options())).await.unwrap()),
                Some(st) => st.watch(s.key.as_str(), Some(s.options())).await.unwrap(),
            }
        }
        let mut stream = stream.unwrap();
        // A resumed watcher replays the history it missed at once, so its events may come
        // before a later watcher's `created`: keep them, in order, while waiting.
        let mut created = 0;
        while created < specs.len() {
            let r = crate::watch::next(&mut stream).await;
            if r.created() {
                created += 1;
            }
            got.entry(r.watch_id()).or_default().extend(seen(&r));
        }
        let (_tx, mut rs) = stream.split();
        let collector = tokio::spawn(async move {
            let mut got: HashMap<i64, Vec<Seen>> = HashMap::new();
            // The stream ends with an error when the server is killed.
            while let Ok(Some(r)) = rs.message().await {
                got.entry(r.watch_id()).or_default().extend(seen(&r));
            }
            got
        });
        for _ in 0..150 {
            let (k, v) = (format!("r/{}", i % 10), format!("v{i}"));
            let opts = PutOptions::new();
            let r = if i % 7 == 3 {
                c.delete(k.as_str(), Some(DeleteOptions::new().with_prev_key())).await.unwrap();
                None
            } else {
                Some(c.put(k.as_str(), v.as_str(), Some(opts)).await.unwrap())
            };
            if let Some(r) = r {
                acked.push(Change {
                    rev: r.header().unwrap().revision(),
                    sub: 0,
                    key: k,
                    put: true,
                    value: v,
                });
            }
            i += 1;
        }
        if round < 2 {
            srv.kill9();
            srv.spawn().await;
        } else {
            // Let the last events arrive, then end the stream.
            tokio::time::sleep(Duration::from_millis(500)).await;
            srv.kill9();
        }
        for (id, evs) in collector.await.unwrap() {
            got.entry(id).or_default().extend(evs);
        }
    }
    // The oracle: the whole history read back by a fresh watcher from revision 2.
    srv.spawn().await;
    let mut c = srv.client().await;
    let head = c.get("x", None).await.unwrap().header().unwrap().revision();
    let mut all = c
        .watch(
            "\0",
            Some(WatchOptions::new().with_from_key().with_prev_key().with_start_revision(2)),
        )
        .await
        .unwrap();
    let mut history = Vec::new();
    while history.last().is_none_or(|e: &Seen| e.2 < head) {
        history.extend(seen(&crate::watch::next(&mut all).await));
    }
    let changes: Vec<Change> = history
        .iter()
        .enumerate()
        .map(|(sub, e)| Change {
            rev: e.2,
            sub,
            key: e.1.clone(),
            put: e.0 == 'P',
            value: e.3.clone(),
        })
        .collect();
    // Every acknowledged put is in the history.
    for a in &acked {
        assert!(
            changes.iter().any(|c| c.rev == a.rev && c.key == a.key && c.value == a.value),
            "lost {a:?}"
        );
    }
    let oracle = Oracle::new(changes);
    let first = oracle.events.first().map_or(2, |(c, _)| c.rev);
    for s in &specs {
        let s = Spec { start: first, ..s.clone() };
        check(&s, got.get(&s.id).map_or(&[][..], Vec::as_slice), &oracle.expected(&s));
    }
}
