//! `cairn bench watch-latency` and `cairn bench watch-memory`: the watch workloads, run the
//! same way against Cairn and real etcd.
//!
//! - **watch-latency**: W watchers on one prefix spread over S streams; one writer puts at
//!   a fixed rate on its own connection. Each event's latency runs from the moment the
//!   writer heard its put acknowledged to the moment a watcher received the event (zero
//!   when the event came first: both servers notify watchers before answering the put).
//!   Every watcher must receive every put exactly once: misses are reported as lost.
//! - **watch-memory**: N watchers over S streams, each on its own key (or all on one);
//!   the server's resident memory (`VmRSS` of `/proc/<pid>/status`) is read with the
//!   streams open before and after creating them, giving bytes per watcher.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use cairn_proto::etcdserverpb::{
    PutRequest, WatchCreateRequest, WatchRequest, WatchResponse, kv_client::KvClient,
    watch_client::WatchClient, watch_request::RequestUnion,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::{Args, Summary, connect};
use crate::server::prefix_end;

/// Flags of `watch-latency`.
#[derive(Debug, Clone, clap::Args)]
pub struct LatencyArgs {
    /// Watchers, all on the prefix.
    #[arg(long, default_value_t = 100)]
    pub watchers: usize,
    /// Streams the watchers are spread over (round-robin over `--conns` connections).
    #[arg(long, default_value_t = 10)]
    pub streams: usize,
    /// Puts per second.
    #[arg(long, default_value_t = 200)]
    pub rate: u64,
    /// Number of puts.
    #[arg(long, default_value_t = 2000)]
    pub puts: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    pub val_size: usize,
    /// The watched prefix; keys are the prefix plus a counter.
    #[arg(long, default_value = "/bench/watch/")]
    pub prefix: String,
}

/// Flags of `watch-memory`.
#[derive(Debug, Clone, clap::Args)]
pub struct MemoryArgs {
    /// Watchers to create.
    #[arg(long, default_value_t = 100_000)]
    pub watchers: usize,
    /// Streams the watchers are spread over (round-robin over `--conns` connections).
    #[arg(long, default_value_t = 100)]
    pub streams: usize,
    /// The server's process id, whose resident memory is read from /proc.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Put every watcher on one key (default: a key each).
    #[arg(long)]
    pub same_key: bool,
}

/// One open watch stream: where to send requests and what it received.
struct Stream {
    tx: mpsc::Sender<WatchRequest>,
    reader: tokio::task::JoinHandle<anyhow::Result<Received>>,
}

/// What a stream's reader saw.
#[derive(Default)]
struct Received {
    /// (watch id, revision, when) of every event.
    events: Vec<(i64, i64, Instant)>,
    /// When each `created` arrived, in order.
    created: Vec<Instant>,
}

/// Opens a stream whose reader records until it has `created` creates and `events` events
/// (or `stop` fires); with `hold`, it then keeps the stream open until `stop` fires.
fn open_stream(
    ch: Channel,
    created: usize,
    events: usize,
    progress: Arc<Mutex<usize>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    hold: bool,
) -> Stream {
    let (tx, rx) = mpsc::channel(1024);
    let mut client = WatchClient::new(ch).max_decoding_message_size(usize::MAX);
    let reader = tokio::spawn(async move {
        // The call is made here, not before returning: etcd (grpc-go) sends the response
        // headers only with its first message, which needs a create request first.
        let mut inbound = client.watch(ReceiverStream::new(rx)).await?.into_inner();
        let mut got = Received::default();
        while got.created.len() < created || got.events.len() < events {
            let msg: Option<WatchResponse> = tokio::select! {
                m = inbound.message() => m?,
                _ = stop.changed() => break,
            };
            let Some(r) = msg else { break };
            let now = Instant::now();
            anyhow::ensure!(!r.canceled, "watcher {} canceled: {}", r.watch_id, r.cancel_reason);
            if r.created {
                got.created.push(now);
                if let Ok(mut p) = progress.lock() {
                    *p += 1;
                }
            }
            for e in &r.events {
                let rev = e.kv.as_ref().map_or(0, |kv| kv.mod_revision);
                got.events.push((r.watch_id, rev, now));
            }
        }
        if hold && !*stop.borrow() {
            let _ = stop.changed().await;
        }
        drop(inbound);
        Ok(got)
    });
    Stream { tx, reader }
}

fn create(key: &[u8], range_end: &[u8], watch_id: i64) -> WatchRequest {
    WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: key.to_vec(),
            range_end: range_end.to_vec(),
            watch_id,
            ..Default::default()
        })),
    }
}

/// Waits until `counter` reaches `n`, failing after `limit`.
async fn wait_for(
    counter: &Mutex<usize>,
    n: usize,
    limit: Duration,
    what: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while counter.lock().map(|c| *c).unwrap_or(0) < n {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Runs `watch-latency`.
///
/// # Errors
/// Fails when the endpoint cannot be reached, a watcher is canceled or a put fails.
pub async fn latency(args: &Args, w: &LatencyArgs) -> anyhow::Result<Summary> {
    let channels = connect(args, args.conns).await?;
    let writer = connect(args, 1).await?.pop().context("no writer connection")?;
    let streams_n = w.streams.clamp(1, w.watchers.max(1));
    let prefix = w.prefix.as_bytes();
    let end = prefix_end(prefix);
    let created = Arc::new(Mutex::new(0));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut streams = Vec::new();
    for s in 0..streams_n {
        let ch = channels.get(s % channels.len()).cloned().context("no connection")?;
        let mine = (s..w.watchers).step_by(streams_n).count();
        let n_events = mine * usize::try_from(w.puts)?;
        let stream = open_stream(ch, mine, n_events, created.clone(), stop.clone(), false);
        streams.push(stream);
    }
    for i in 0..w.watchers {
        let stream = streams.get(i % streams_n).context("no stream")?;
        stream.tx.send(create(prefix, &end, i64::try_from(i)?)).await?;
    }
    wait_for(&created, w.watchers, Duration::from_secs(60), "watchers to be created").await?;

    // The writer: one put per tick, each in its own task so a slow put does not delay
    // the schedule.
    let acks: Arc<Mutex<HashMap<i64, (Instant, Instant)>>> = Arc::default();
    let failures = Arc::new(Mutex::new(0u64));
    let value = vec![b'v'; w.val_size];
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / w.rate.max(1) as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut puts = Vec::new();
    for i in 0..w.puts {
        tick.tick().await;
        let mut kv = KvClient::new(writer.clone());
        let mut key = prefix.to_vec();
        key.extend_from_slice(format!("{:08}", i % 1000).as_bytes());
        let (value, acks, failures) = (value.clone(), acks.clone(), failures.clone());
        puts.push(tokio::spawn(async move {
            let sent = Instant::now();
            match kv.put(PutRequest { key, value, ..Default::default() }).await {
                Ok(r) => {
                    let acked = Instant::now();
                    let rev = r.into_inner().header.map_or(0, |h| h.revision);
                    if let Ok(mut a) = acks.lock() {
                        a.insert(rev, (sent, acked));
                    }
                }
                Err(_) => {
                    if let Ok(mut f) = failures.lock() {
                        *f += 1;
                    }
                }
            }
        }));
    }
    for p in puts {
        p.await?;
    }
    let total = started.elapsed();
    // Give the last events a moment, then stop the readers that are still waiting.
    let grace = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let _ = stop_tx.send(true);
    });
    let mut received = Vec::new();
    for s in streams {
        drop(s.tx);
        received.push(s.reader.await??);
    }
    grace.abort();

    let acks = acks.lock().map(|a| a.clone()).unwrap_or_default();
    let mut seen: HashMap<(i64, i64), Instant> = HashMap::new();
    let mut duplicates = 0u64;
    for r in &received {
        for (id, rev, at) in &r.events {
            if seen.insert((*id, *rev), *at).is_some() {
                duplicates += 1;
            }
        }
    }
    let mut latencies = Vec::with_capacity(seen.len());
    let mut from_send = Vec::with_capacity(seen.len());
    for ((_, rev), at) in &seen {
        if let Some((sent, acked)) = acks.get(rev) {
            latencies.push(at.saturating_duration_since(*acked));
            from_send.push(at.saturating_duration_since(*sent));
        }
    }
    let expected = acks.len() * w.watchers;
    let lost = expected.saturating_sub(latencies.len()) as u64;
    latencies.sort_unstable();
    from_send.sort_unstable();
    let put_failures = failures.lock().map(|f| *f).unwrap_or(0);
    let summary = Summary {
        total,
        ok: latencies.len() as u64,
        errors: lost + duplicates + put_failures,
        latencies,
    };
    let p99 = summary.percentile(99.0);
    let send_p99 = Summary { latencies: from_send, ..summary.clone() }.percentile(99.0);
    print_notes(&[
        format!("Watchers:\t{} on {} streams, {} connections", w.watchers, streams_n, args.conns),
        format!("Puts:\t{} acknowledged at {}/s ({} failed)", acks.len(), w.rate, put_failures),
        format!("Event latency p99 (put acknowledged -> event received):\t{} us", p99.as_micros()),
        format!("Event latency p99 (put sent -> event received):\t{} us", send_p99.as_micros()),
        format!("Events expected:\t{expected}"),
        format!("Events lost:\t{lost}"),
        format!("Events duplicated:\t{duplicates}"),
    ]);
    Ok(summary)
}

/// Prints a workload's own figures; the common summary follows them.
fn print_notes(notes: &[String]) {
    println!("Workload:");
    for n in notes {
        println!("  {n}");
    }
}

/// Reads the resident memory of `pid` in bytes.
fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("no VmRSS line")?;
    Ok(kb * 1024)
}

/// Runs `watch-memory`.
///
/// # Errors
/// Fails when the endpoint cannot be reached, a watcher is refused or RSS cannot be read.
pub async fn memory(args: &Args, m: &MemoryArgs) -> anyhow::Result<Summary> {
    let channels = connect(args, args.conns).await?;
    let streams_n = m.streams.clamp(1, m.watchers.max(1));
    let created = Arc::new(Mutex::new(0));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut streams = Vec::new();
    for s in 0..streams_n {
        let ch = channels.get(s % channels.len()).cloned().context("no connection")?;
        let mine = (s..m.watchers).step_by(streams_n).count();
        streams.push(open_stream(ch, mine, 0, created.clone(), stop.clone(), true));
    }
    // Let the streams settle so that the baseline includes them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = m.pid.map(rss).transpose()?;
    let started = Instant::now();
    let mut sent: Vec<VecDeque<Instant>> = vec![VecDeque::new(); streams_n];
    for i in 0..m.watchers {
        let key = if m.same_key {
            b"/bench/mem/key".to_vec()
        } else {
            format!("/bench/mem/{i:08}").into_bytes()
        };
        let s = i % streams_n;
        if let (Some(stream), Some(times)) = (streams.get(s), sent.get_mut(s)) {
            times.push_back(Instant::now());
            stream.tx.send(create(&key, b"", 0)).await?;
        }
    }
    wait_for(&created, m.watchers, Duration::from_secs(300), "watchers to be created").await?;
    let total = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = m.pid.map(rss).transpose()?;
    // The readers held their streams (and so the watchers) open until now.
    let _ = stop_tx.send(true);
    let mut latencies = Vec::with_capacity(m.watchers);
    for (s, times) in streams.into_iter().zip(sent) {
        drop(s.tx);
        let got = s.reader.await??;
        latencies
            .extend(got.created.iter().zip(times).map(|(c, t)| c.saturating_duration_since(t)));
    }
    latencies.sort_unstable();
    let mut notes = vec![format!(
        "Watchers:\t{} on {} streams, {} connections{}",
        m.watchers,
        streams_n,
        args.conns,
        if m.same_key { ", one key" } else { ", a key each" }
    )];
    match (before, after) {
        (Some(b), Some(a)) => {
            let per = a.saturating_sub(b) as f64 / m.watchers.max(1) as f64;
            notes.push(format!("Server RSS before:\t{:.1} MiB", b as f64 / 1048576.0));
            notes.push(format!("Server RSS after:\t{:.1} MiB", a as f64 / 1048576.0));
            notes.push(format!("Bytes per watcher:\t{per:.0}"));
        }
        _ => notes.push("Server RSS:\tnot measured (give --pid)".to_owned()),
    }
    print_notes(&notes);
    Ok(Summary { total, ok: latencies.len() as u64, errors: 0, latencies })
}
