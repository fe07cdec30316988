//! kill -9 under concurrent writers: every acknowledged write survives with its value and
//! revision, and revisions never go back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::harness::Cairn;

/// (key → (value, revision)) of acknowledged writes.
type Acked = Arc<Mutex<HashMap<String, (String, i64)>>>;

async fn writer(url: String, id: usize, round: usize, acked: Acked, stop: Arc<AtomicBool>) {
    let Ok(mut c) = etcd_client::Client::connect([url.as_str()], None).await else { return };
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // Unique keys, plus one hot key every writer overwrites.
        let (key, value) = if i.is_multiple_of(5) {
            ("hot".to_owned(), format!("w{id}-r{round}-{i}"))
        } else {
            (format!("w{id}/r{round}/{i}"), format!("value-{i}"))
        };
        match tokio::time::timeout(Duration::from_secs(2), c.put(key.clone(), value.clone(), None))
            .await
        {
            Ok(Ok(resp)) => {
                let rev = resp.header().unwrap().revision();
                let mut a = acked.lock().unwrap();
                // The hot key keeps only its newest acknowledged value.
                if a.get(&key).is_none_or(|(_, r)| *r < rev) {
                    a.insert(key, (value, rev));
                }
            }
            _ => return, // the server died under us; unacknowledged writes prove nothing
        }
        i += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_and_revisions_never_go_back() {
    let mut srv = Cairn::start_with(&["--snapshot-count", "500"]).await;
    let acked: Acked = Arc::default();
    let mut max_rev = 0;
    for round in 0..3 {
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..8)
            .map(|id| {
                tokio::spawn(writer(srv.client_url.clone(), id, round, acked.clone(), stop.clone()))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1200 + 300 * round as u64)).await;
        srv.kill9();
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.await.unwrap();
        }
        srv.spawn().await;

        let mut c = srv.client().await;
        let snapshot = acked.lock().unwrap().clone();
        assert!(snapshot.len() > 50, "the writers made too little progress to prove anything");
        for (key, (value, rev)) in &snapshot {
            let g = c.get(key.as_str(), None).await.unwrap();
            let kv = g
                .kvs()
                .first()
                .unwrap_or_else(|| panic!("acknowledged key {key} lost in round {round}"));
            if key == "hot" {
                assert!(kv.mod_revision() >= *rev, "hot key went back in round {round}");
            } else {
                assert_eq!(
                    (kv.value_str().unwrap(), kv.mod_revision()),
                    (value.as_str(), *rev),
                    "{key}"
                );
            }
            max_rev = max_rev.max(*rev);
        }
        let r = c.put("after-restart", "x", None).await.unwrap();
        assert!(r.header().unwrap().revision() > max_rev, "revision went back after restart");
    }
}
