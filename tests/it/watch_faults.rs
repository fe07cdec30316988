//! Watch exactness under faults: a watcher on every member sees each acknowledged write
//! exactly once, in revision order, while leaders are killed and members restart.
//!
//! Each watcher does what a client does when its stream breaks: it reconnects to its member
//! and resumes from the last revision it saw plus one. Afterwards every watcher's events
//! must be strictly increasing in revision (no duplicate, nothing out of order), include
//! every acknowledged write with its revision, and agree with every other watcher on what
//! happened at each revision they both saw.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, EventType, WatchOptions};

use crate::cluster::{self, Acked, Cluster};

/// (revision, key, value) of each put event a watcher saw, in arrival order.
type Seen = Arc<Mutex<Vec<(i64, String, String)>>>;

/// Watches prefix `w` on `url` from `start`, resuming after every broken stream.
async fn watcher(url: String, start: i64, stop: Arc<AtomicBool>, seen: Seen) {
    let mut next = start;
    while !stop.load(Ordering::Relaxed) {
        let Ok(Ok(mut c)) =
            tokio::time::timeout(Duration::from_secs(2), Client::connect([url.as_str()], None))
                .await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let opts = WatchOptions::new().with_prefix().with_start_revision(next);
        let Ok(Ok(mut stream)) =
            tokio::time::timeout(Duration::from_secs(2), c.watch("w", Some(opts))).await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let msg = match tokio::time::timeout(Duration::from_millis(500), stream.message()).await
            {
                Err(_) => continue, // idle; check the stop flag
                Ok(Ok(Some(msg))) => msg,
                Ok(_) => break, // the stream broke: reconnect and resume
            };
            if msg.canceled() {
                break;
            }
            for ev in msg.events() {
                let kv = ev.kv().unwrap();
                if ev.event_type() == EventType::Put {
                    let entry = (
                        kv.mod_revision(),
                        kv.key_str().unwrap().to_owned(),
                        kv.value_str().unwrap().to_owned(),
                    );
                    seen.lock().unwrap().push(entry);
                }
                next = next.max(kv.mod_revision() + 1);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_on_every_member_see_each_acknowledged_write_once_in_order_across_failovers() {
    let mut cluster = Cluster::start(3, &[]).await;
    let start = {
        let mut c = cluster.members[0].client().await;
        c.put("w-start", "x", None).await.unwrap().header().unwrap().revision() + 1
    };
    let stop = Arc::new(AtomicBool::new(false));
    let seens: Vec<Seen> = (0..3).map(|_| Seen::default()).collect();
    let watchers: Vec<_> = cluster
        .members
        .iter()
        .zip(&seens)
        .map(|(m, seen)| {
            tokio::spawn(watcher(m.client_url.clone(), start, stop.clone(), seen.clone()))
        })
        .collect();
    let acked: Acked = Arc::default();
    let (stop_writes, writers) = cluster::writers(&cluster.endpoints(), 3, &acked);
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // The leader dies and comes back; then a follower does.
    for round in 0..2 {
        let leader = cluster.leader().await;
        let victim = if round == 0 { leader } else { (leader + 1) % 3 };
        cluster.members[victim].kill9();
        tokio::time::sleep(Duration::from_millis(2000)).await;
        cluster.members[victim].spawn().await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    stop_writes.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    // Let every watcher catch up to the last write, then stop them.
    let last = acked.lock().unwrap().values().map(|(_, rev)| *rev).max().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while seens.iter().any(|s| s.lock().unwrap().last().is_none_or(|e| e.0 < last)) {
        assert!(
            std::time::Instant::now() < deadline,
            "a watcher never caught up to revision {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in watchers {
        w.await.unwrap();
    }

    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 50, "writers made too little progress: {}", acked.len());
    let mut reference: BTreeMap<i64, (String, String)> = BTreeMap::new();
    for (i, seen) in seens.iter().enumerate() {
        let seen = seen.lock().unwrap().clone();
        for pair in seen.windows(2) {
            assert!(
                pair[0].0 < pair[1].0,
                "watcher {i}: revision {} after {} (duplicate or out of order)",
                pair[1].0,
                pair[0].0
            );
        }
        let by_rev: BTreeMap<i64, (String, String)> =
            seen.iter().map(|(rev, k, v)| (*rev, (k.clone(), v.clone()))).collect();
        for (key, (value, rev)) in &acked {
            assert_eq!(
                by_rev.get(rev),
                Some(&(key.clone(), value.clone())),
                "watcher {i} missed acknowledged {key}@{rev}"
            );
        }
        for (rev, kv) in &by_rev {
            if let Some(other) = reference.insert(*rev, kv.clone()) {
                assert_eq!(&other, kv, "watchers disagree at revision {rev}");
            }
        }
        eprintln!(
            "WATCH FAULTS: watcher {i} saw {} events, in order, every acknowledged write",
            seen.len()
        );
    }
    cluster.assert_hashes_equal().await;
}
