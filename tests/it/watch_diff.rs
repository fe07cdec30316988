//! Differential test: one watch scenario (history, compaction, ids, refusals, cancel,
//! progress, filters, prev_kv, live txns and deletes) against real etcd and against Cairn,
//! every response normalized (member and cluster ids and term dropped) and compared.
//!
//! Events are compared one per line, so that the two servers may group revisions into
//! responses differently (both keep a revision whole); everything else is compared
//! response by response.

use std::time::Duration;

use etcd_client::{
    Client, DeleteOptions, EventType, Txn, TxnOp, WatchFilterType, WatchOptions, WatchStream,
};

use crate::harness::{Cairn, Etcd};

fn kv(kv: &etcd_client::KeyValue) -> String {
    format!(
        "{{key={:?} value={:?} create={} mod={} version={} lease={}}}",
        kv.key_str().unwrap(),
        kv.value_str().unwrap(),
        kv.create_revision(),
        kv.mod_revision(),
        kv.version(),
        kv.lease()
    )
}

/// Reads what the stream sends until it has been quiet for a while (etcd catches up
/// unsynced watchers every 100 ms), one line per response or per event. Lines are grouped
/// by watcher, keeping each watcher's order: the order between watchers is not part of
/// etcd's contract.
async fn drain(s: &mut WatchStream, out: &mut Vec<String>) {
    let mut lines: Vec<(i64, String)> = Vec::new();
    while let Ok(r) = tokio::time::timeout(Duration::from_millis(600), s.message()).await {
        let r = r.unwrap().unwrap();
        let head = format!(
            "id={} created={} canceled={} reason={:?} compact={} rev={}",
            r.watch_id(),
            r.created(),
            r.canceled(),
            r.cancel_reason(),
            r.compact_revision(),
            r.header().map_or(-1, |h| h.revision())
        );
        if r.events().is_empty() {
            lines.push((r.watch_id(), head));
        }
        for e in r.events() {
            let kind = if e.event_type() == EventType::Put { "PUT" } else { "DELETE" };
            let line = format!(
                "id={} {kind} kv={} prev={:?}",
                r.watch_id(),
                kv(e.kv().unwrap()),
                e.prev_kv().map(kv)
            );
            lines.push((r.watch_id(), line));
        }
    }
    lines.sort_by_key(|(id, _)| *id);
    out.extend(lines.into_iter().map(|(_, l)| l));
}

async fn scenario(c: &mut Client) -> Vec<String> {
    let mut out = Vec::new();
    c.put("a", "1", None).await.unwrap(); // 2
    c.put("a", "2", None).await.unwrap(); // 3
    c.put("b", "1", None).await.unwrap(); // 4
    c.delete("a", None).await.unwrap(); // 5
    c.txn(Txn::new().and_then(vec![TxnOp::put("c", "1", None), TxnOp::put("b", "2", None)]))
        .await
        .unwrap(); // 6
    c.compact(3, None).await.unwrap();

    out.push("-- below the compaction point; its id stays taken until canceled".into());
    let mut s = c.watch("a", Some(WatchOptions::new().with_start_revision(2))).await.unwrap();
    drain(&mut s, &mut out).await;
    s.watch("b", None).await.unwrap();
    drain(&mut s, &mut out).await;
    s.cancel(0).await.unwrap();
    s.cancel(1).await.unwrap();
    drain(&mut s, &mut out).await;
    out.push("-- from the compaction point, with prev_kv".into());
    s.watch("a", Some(WatchOptions::new().with_start_revision(3).with_prev_key())).await.unwrap();
    drain(&mut s, &mut out).await;
    out.push("-- all keys from 4 with a chosen id, then refusals".into());
    let all = WatchOptions::new().with_all_keys().with_start_revision(4).with_watch_id(5);
    s.watch("", Some(all.clone())).await.unwrap();
    drain(&mut s, &mut out).await;
    s.watch("x", Some(WatchOptions::new().with_watch_id(5))).await.unwrap();
    s.watch("b", Some(WatchOptions::new().with_range("a"))).await.unwrap();
    drain(&mut s, &mut out).await;
    out.push("-- filters and a prefix, then live writes".into());
    s.watch("b", Some(WatchOptions::new().with_filters([WatchFilterType::NoPut]).with_prev_key()))
        .await
        .unwrap();
    s.watch("", Some(WatchOptions::new().with_prefix().with_filters([WatchFilterType::NoDelete])))
        .await
        .unwrap();
    drain(&mut s, &mut out).await;
    c.put("a", "3", None).await.unwrap(); // 7
    c.delete("b", Some(DeleteOptions::new().with_prev_key())).await.unwrap(); // 8
    c.txn(Txn::new().and_then(vec![
        TxnOp::put("d", "1", None),
        TxnOp::delete("c", None),
        TxnOp::put("a", "4", None),
    ]))
    .await
    .unwrap(); // 9
    c.delete("", Some(DeleteOptions::new().with_all_keys())).await.unwrap(); // 10
    drain(&mut s, &mut out).await;
    out.push("-- progress, cancel, unknown cancel".into());
    s.request_progress().await.unwrap();
    drain(&mut s, &mut out).await;
    s.cancel(5).await.unwrap();
    s.cancel(99).await.unwrap();
    drain(&mut s, &mut out).await;
    c.put("z", "1", None).await.unwrap(); // 11
    drain(&mut s, &mut out).await;
    out
}

#[tokio::test]
async fn watch_responses_match_real_etcd_field_by_field() {
    let Some(etcd) = Etcd::start().await else { return };
    let srv = Cairn::start().await;
    let mut e = Client::connect([etcd.client_url.as_str()], None).await.unwrap();
    let mut c = srv.client().await;
    let (want, got) = tokio::join!(scenario(&mut e), scenario(&mut c));
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(g, w, "line {i}\n etcd:  {want:#?}\n cairn: {got:#?}");
    }
    assert_eq!(got.len(), want.len(), "etcd: {want:#?}\ncairn: {got:#?}");
}
