//! `cairn bench lease-expiry`: many leases expiring together while clients keep writing.
//!
//! Grants `leases` leases of `ttl` seconds, attaches one key to each, then runs puts from
//! every client until all leases are gone. Put latencies are split into the calm before the
//! first lease expires and the burst while the server revokes them, so the report shows what
//! a mass expiry costs other writers. Works against etcd and Cairn alike.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cairn_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseLeasesRequest, PutRequest, kv_client::KvClient,
    lease_client::LeaseClient,
};
use tonic::transport::Channel;

use super::Summary;

/// Latencies of puts issued before and during the expiry burst.
#[derive(Debug)]
pub struct Report {
    /// Puts before the first lease expired.
    pub calm: Summary,
    /// Puts while leases were being revoked.
    pub burst: Summary,
    /// From the TTL's end until the server held no lease.
    pub drain: Duration,
}

fn summary(mut lat: Vec<Duration>, total: Duration) -> Summary {
    lat.sort_unstable();
    Summary { total, ok: lat.len() as u64, errors: 0, latencies: lat }
}

/// Runs the workload over `channels` with `clients` writers.
///
/// # Errors
/// Fails when granting or attaching fails.
pub async fn run(
    channels: &[Channel],
    clients: usize,
    leases: usize,
    ttl: i64,
) -> anyhow::Result<Report> {
    let first = channels.first().cloned().ok_or_else(|| anyhow::anyhow!("no connection"))?;
    // Grant and attach from several tasks so setup takes a fraction of the TTL.
    let per = leases.div_ceil(16);
    let mut setup = Vec::new();
    for t in 0..16 {
        let ch = channels.get(t % channels.len()).cloned().unwrap_or_else(|| first.clone());
        setup.push(tokio::spawn(async move {
            let mut lc = LeaseClient::new(ch.clone());
            let mut kv = KvClient::new(ch);
            for i in t * per..((t + 1) * per).min(leases) {
                let id = lc.lease_grant(LeaseGrantRequest { ttl, id: 0 }).await?.into_inner().id;
                let key = format!("expiry/{i:08}").into_bytes();
                kv.put(PutRequest { key, value: b"x".to_vec(), lease: id, ..Default::default() })
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    let granted_from = Instant::now();
    for s in setup {
        s.await??;
    }
    // The first leases expire `ttl` after the setup began.
    let expiry_starts = granted_from + Duration::from_secs(u64::try_from(ttl).unwrap_or(0));

    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for c in 0..clients.max(1) {
        let ch = channels.get(c % channels.len()).cloned().unwrap_or_else(|| first.clone());
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut kv = KvClient::new(ch);
            let mut out = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("writer/{c}/{}", i % 1000).into_bytes();
                let t0 = Instant::now();
                if kv
                    .put(PutRequest { key, value: vec![b'v'; 256], ..Default::default() })
                    .await
                    .is_ok()
                {
                    out.push((t0, t0.elapsed()));
                }
                i += 1;
            }
            out
        }));
    }
    let mut lc = LeaseClient::new(first);
    let drained = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = Instant::now();
        if now > expiry_starts {
            let n = lc.lease_leases(LeaseLeasesRequest {}).await?.into_inner().leases.len();
            if n == 0 {
                break now;
            }
        }
        anyhow::ensure!(
            now < expiry_starts + Duration::from_secs(120),
            "leases did not drain within 120 s"
        );
    };
    stop.store(true, Ordering::Relaxed);
    let (mut calm, mut burst) = (Vec::new(), Vec::new());
    for w in writers {
        for (at, lat) in w.await? {
            if at < expiry_starts { calm.push(lat) } else { burst.push(lat) }
        }
    }
    let drain = drained.saturating_duration_since(expiry_starts);
    Ok(Report {
        calm: summary(calm, expiry_starts.saturating_duration_since(granted_from)),
        burst: summary(burst, drain),
        drain,
    })
}

/// Prints the report.
pub fn print(r: &Report) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("\nLease expiry burst:");
    println!(
        "  Drain time:\t{:.2} secs (from the TTL's end until no lease is left)",
        r.drain.as_secs_f64()
    );
    for (name, s) in [("before expiry", &r.calm), ("during expiry", &r.burst)] {
        println!(
            "  Puts {name}:\t{} ok, {:.1} req/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            s.ok,
            s.rps(),
            ms(s.percentile(50.0)),
            ms(s.percentile(99.0)),
            ms(s.latencies.last().copied().unwrap_or_default())
        );
    }
}
