//! `cairn bench compaction-p99` and `cairn bench learner-p99`: what maintenance costs the
//! writers of an etcd-compatible server, measured the same way against Cairn and etcd.
//!
//! Both fill the server first, then run `--clients` closed-loop writers (each puts its own
//! keys, one request in flight) and split their put latencies into a *baseline* window of
//! `--baseline-secs` and a *during* window:
//!
//! - `compaction-p99` writes `--revisions` puts over `--keys` keys, then compacts to the
//!   newest revision with `physical: true`; the during window lasts until the compaction
//!   answers, i.e. until the compacted records are gone from storage.
//! - `learner-p99` writes about `--fill-bytes` of values, then adds a learner through
//!   `MemberAdd`, starts it with `--learner-cmd` (a shell command; `$INITIAL_CLUSTER` holds
//!   the member list to start it with) and measures until the learner's applied index
//!   reaches the leader's at the time it was added (with a small `--snapshot-count` on
//!   both, the learner can only catch up from a raft snapshot). With `--leader-pid` the
//!   leader's resident memory is sampled every 100 ms and its peak reported.
//!
//! The last line printed is `key=value` pairs for scripts (`scripts/bench-maintenance.sh`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cairn_proto::etcdserverpb::{
    CompactionRequest, MemberAddRequest, PutRequest, RangeRequest, StatusRequest,
    cluster_client::ClusterClient, kv_client::KvClient, maintenance_client::MaintenanceClient,
};
use tonic::transport::{Channel, Endpoint};

use super::Summary;

/// Flags of `compaction-p99`.
#[derive(Debug, Clone, clap::Args)]
pub struct CompactionArgs {
    /// Revisions (puts) written before the compaction.
    #[arg(long, default_value_t = 1_000_000)]
    pub revisions: u64,
    /// Keys the puts cycle over.
    #[arg(long, default_value_t = 1000)]
    pub keys: u64,
    /// Value size of the fill in bytes.
    #[arg(long, default_value_t = 64)]
    pub val_size: usize,
    /// Concurrent writers of the fill.
    #[arg(long, default_value_t = 64)]
    pub fill_clients: usize,
    /// Length of the baseline window in seconds.
    #[arg(long, default_value_t = 3)]
    pub baseline_secs: u64,
}

/// Flags of `learner-p99`.
#[derive(Debug, Clone, clap::Args)]
pub struct LearnerArgs {
    /// Bytes of values written before the learner is added.
    #[arg(long, default_value_t = 1 << 30)]
    pub fill_bytes: u64,
    /// Value size of the fill in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    pub val_size: usize,
    /// Concurrent writers of the fill.
    #[arg(long, default_value_t = 16)]
    pub fill_clients: usize,
    /// The learner's advertised peer URL.
    #[arg(long)]
    pub learner_peer_url: String,
    /// The learner's client URL (polled for its applied index).
    #[arg(long)]
    pub learner_client_url: String,
    /// The learner's name in `$INITIAL_CLUSTER`.
    #[arg(long, default_value = "learner")]
    pub learner_name: String,
    /// Shell command that starts the learner (run with `sh -c`, `$INITIAL_CLUSTER` set).
    #[arg(long)]
    pub learner_cmd: String,
    /// The leader's process id, to sample its resident memory.
    #[arg(long)]
    pub leader_pid: Option<u32>,
    /// Length of the baseline window in seconds.
    #[arg(long, default_value_t = 3)]
    pub baseline_secs: u64,
    /// Give up waiting for the learner after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
}

/// Put latencies split at the start of the maintenance step.
struct Split {
    baseline: Summary,
    during: Summary,
}

fn summary(mut lat: Vec<Duration>, total: Duration, errors: u64) -> Summary {
    lat.sort_unstable();
    Summary { total, ok: lat.len() as u64, errors, latencies: lat }
}

/// Fills with `total` puts from `clients` writers; `key(i)` names request `i`'s key.
async fn fill(
    ch: &Channel,
    clients: usize,
    total: u64,
    val_size: usize,
    key: Arc<dyn Fn(u64) -> Vec<u8> + Send + Sync>,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients.max(1) {
        let mut kv = KvClient::new(ch.clone());
        let (next, key) = (next.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, tonic::Status>(());
                }
                // The fill is setup, not a measurement: a put that failed (a timeout while
                // the server checkpoints a large store) is retried a few times.
                let mut tries = 0;
                loop {
                    let put = PutRequest {
                        key: key(i),
                        value: vec![b'f'; val_size],
                        ..Default::default()
                    };
                    match kv.put(put).await {
                        Ok(_) => break,
                        Err(e) if tries < 5 => {
                            tries += 1;
                            eprintln!("fill: put {i} failed ({}); retrying", e.message());
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// One writer's puts (when sent, how long it took) and its failed puts.
type WriterLog = (Vec<(Instant, Duration)>, u64);

/// Runs `clients` writers until `stop` is set, recording when each put was sent.
fn writers(
    ch: &Channel,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<WriterLog>> {
    (0..clients.max(1))
        .map(|c| {
            let mut kv = KvClient::new(ch.clone());
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut out, mut errors) = (Vec::new(), 0u64);
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("bench-live/{c:03}/{:04}", i % 1000).into_bytes();
                    i += 1;
                    let t0 = Instant::now();
                    match kv
                        .put(PutRequest { key, value: vec![b'w'; 64], ..Default::default() })
                        .await
                    {
                        Ok(_) => out.push((t0, t0.elapsed())),
                        Err(_) => errors += 1,
                    }
                }
                (out, errors)
            })
        })
        .collect()
}

/// Measures writers for the baseline window, then runs `step` and measures until it ends.
async fn measure<F: std::future::Future<Output = anyhow::Result<()>>>(
    ch: &Channel,
    clients: usize,
    baseline: Duration,
    step: F,
) -> anyhow::Result<(Split, Duration)> {
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = writers(ch, clients, stop.clone());
    let began = Instant::now();
    tokio::time::sleep(baseline).await;
    let split_at = Instant::now();
    step.await?;
    let took = split_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (mut before, mut during, mut errors) = (Vec::new(), Vec::new(), 0);
    for t in tasks {
        let (lat, e) = t.await?;
        errors += e;
        for (sent, d) in lat {
            if sent < split_at { before.push(d) } else { during.push(d) }
        }
    }
    Ok((
        Split {
            baseline: summary(before, split_at - began, 0),
            during: summary(during, took, errors),
        },
        took,
    ))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn print_split(split: &Split) -> String {
    let b = &split.baseline;
    let d = &split.during;
    format!(
        "baseline_p50_ms={:.3} baseline_p99_ms={:.3} baseline_ops={} during_p50_ms={:.3} during_p99_ms={:.3} during_max_ms={:.3} during_ops={} during_errors={}",
        ms(b.percentile(50.0)),
        ms(b.percentile(99.0)),
        b.ok,
        ms(d.percentile(50.0)),
        ms(d.percentile(99.0)),
        ms(d.latencies.last().copied().unwrap_or_default()),
        d.ok,
        d.errors
    )
}

/// `compaction-p99` (see the module docs); returns the during window's summary.
///
/// # Errors
/// Fails when the fill or the compaction fails.
pub async fn compaction(
    ch: Channel,
    clients: usize,
    a: &CompactionArgs,
) -> anyhow::Result<Summary> {
    let t = Instant::now();
    let keys = a.keys.max(1);
    let key = Arc::new(move |i: u64| format!("fill/{:06}", i % keys).into_bytes());
    fill(&ch, a.fill_clients, a.revisions, a.val_size, key).await?;
    let rev = KvClient::new(ch.clone())
        .range(RangeRequest { key: b"fill/".to_vec(), ..Default::default() })
        .await?
        .into_inner()
        .header
        .map_or(0, |h| h.revision);
    eprintln!(
        "filled {} revisions in {:.1}s; compacting to {rev}",
        a.revisions,
        t.elapsed().as_secs_f64()
    );
    let mut kv = KvClient::new(ch.clone());
    let (split, took) = measure(&ch, clients, Duration::from_secs(a.baseline_secs), async move {
        kv.compact(CompactionRequest { revision: rev, physical: true }).await?;
        Ok(())
    })
    .await?;
    println!("{} compaction_s={:.3}", print_split(&split), took.as_secs_f64());
    Ok(split.during)
}

/// Resident memory of `pid` in bytes, from `/proc`.
fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `learner-p99` (see the module docs); returns the during window's summary.
///
/// # Errors
/// Fails when the fill, the member add or the learner's start fails, or the learner does
/// not catch up in time.
pub async fn learner(ch: Channel, clients: usize, a: &LearnerArgs) -> anyhow::Result<Summary> {
    let t = Instant::now();
    let puts = a.fill_bytes.div_ceil(a.val_size.max(1) as u64);
    let key = Arc::new(|i: u64| format!("big/{i:08}").into_bytes());
    fill(&ch, a.fill_clients, puts, a.val_size, key).await?;
    let mut mc = MaintenanceClient::new(ch.clone());
    let before = mc.status(StatusRequest {}).await?.into_inner();
    eprintln!(
        "filled {puts} values ({} MB on disk) in {:.1}s",
        before.db_size / 1_000_000,
        t.elapsed().as_secs_f64()
    );
    let rss_before = a.leader_pid.and_then(rss).unwrap_or(0);
    let peak = Arc::new(AtomicU64::new(rss_before));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = a.leader_pid.map(|pid| {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                if let Some(r) = rss(pid) {
                    peak.fetch_max(r, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    let args = a.clone();
    let leader = ch.clone();
    let step = async move {
        let mut cc = ClusterClient::new(leader.clone());
        let added = cc
            .member_add(MemberAddRequest {
                peer_ur_ls: vec![args.learner_peer_url.clone()],
                is_learner: true,
            })
            .await?
            .into_inner();
        let initial: Vec<String> = added
            .members
            .iter()
            .flat_map(|m| {
                let name =
                    if m.name.is_empty() { args.learner_name.clone() } else { m.name.clone() };
                m.peer_ur_ls.iter().map(move |u| format!("{name}={u}")).collect::<Vec<_>>()
            })
            .collect();
        let target = MaintenanceClient::new(leader).status(StatusRequest {}).await?.into_inner();
        let target = target.raft_index;
        std::process::Command::new("sh")
            .arg("-c")
            .arg(&args.learner_cmd)
            .env("INITIAL_CLUSTER", initial.join(","))
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
        loop {
            anyhow::ensure!(Instant::now() < deadline, "the learner did not catch up in time");
            tokio::time::sleep(Duration::from_millis(100)).await;
            let Ok(ep) = Endpoint::from_shared(args.learner_client_url.clone()) else {
                anyhow::bail!("bad learner client URL");
            };
            let Ok(lch) = ep.connect_timeout(Duration::from_millis(500)).connect().await else {
                continue;
            };
            if let Ok(s) = MaintenanceClient::new(lch).status(StatusRequest {}).await
                && s.get_ref().raft_applied_index >= target
            {
                return Ok(());
            }
        }
    };
    let (split, took) = measure(&ch, clients, Duration::from_secs(a.baseline_secs), step).await?;
    sampling.store(false, Ordering::Relaxed);
    if let Some(s) = sampler {
        let _ = s.await;
    }
    println!(
        "{} catchup_s={:.3} db_size_mb={} leader_rss_before_mb={} leader_rss_peak_mb={}",
        print_split(&split),
        took.as_secs_f64(),
        before.db_size / 1_000_000,
        rss_before / 1_000_000,
        peak.load(Ordering::Relaxed) / 1_000_000
    );
    Ok(split.during)
}
