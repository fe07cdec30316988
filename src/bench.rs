//! `cairn bench`: a load generator for any etcd-compatible endpoint, modeled on etcd's
//! `benchmark` tool (tools/benchmark): the same workloads, flags and summary shape, so the
//! same command measures Cairn and real etcd on the same machine.

mod maintenance;
mod watch;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub mod expiry;

use cairn_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
    kv_client::KvClient, lease_client::LeaseClient, request_op,
};
use cairn_proto::v3lockpb::{LockRequest, UnlockRequest, lock_client::LockClient};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

/// Flags shared by every workload.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Comma-separated gRPC endpoints (`http://host:port`); connections round-robin over them.
    #[arg(long, default_value = "http://127.0.0.1:2379", global = true)]
    pub endpoints: String,
    /// Total number of gRPC connections.
    #[arg(long, default_value_t = 1, global = true)]
    pub conns: usize,
    /// Total number of concurrent clients (requests in flight).
    #[arg(long, default_value_t = 1, global = true)]
    pub clients: usize,
    /// Total number of requests.
    #[arg(long, default_value_t = 10_000, global = true)]
    pub total: u64,
    /// Verify `https://` endpoints with this CA bundle (etcd benchmark's `--cacert`).
    #[arg(long, global = true)]
    pub cacert: Option<std::path::PathBuf>,
    /// Identify with this client certificate (with `--key`).
    #[arg(long, global = true, requires = "tls_key")]
    pub cert: Option<std::path::PathBuf>,
    /// The client certificate's key (with `--cert`); its id differs from `range`'s key.
    #[arg(long = "key", id = "tls_key", global = true, requires = "cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Authenticate as `name:password` (once per connection, as etcd's benchmark does per
    /// client) and send the token with every put and range.
    #[arg(long, global = true)]
    pub user: Option<String>,
    /// The workload.
    #[command(subcommand)]
    pub workload: Workload,
}

/// Adds an auth token to every request of a client (none without `--user`).
#[derive(Debug, Clone)]
struct Token(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("token", t.clone());
        }
        Ok(req)
    }
}

/// One token per channel for `--user` (no tokens without it).
async fn tokens(args: &Args, channels: &[Channel]) -> anyhow::Result<Vec<Token>> {
    let Some(user) = &args.user else { return Ok(vec![Token(None); channels.len()]) };
    let (name, password) = user.split_once(':').unwrap_or((user.as_str(), ""));
    let mut out = Vec::with_capacity(channels.len());
    for ch in channels {
        let res = cairn_proto::etcdserverpb::auth_client::AuthClient::new(ch.clone())
            .authenticate(cairn_proto::etcdserverpb::AuthenticateRequest {
                name: name.to_owned(),
                password: password.to_owned(),
            })
            .await?;
        out.push(Token(Some(res.into_inner().token.parse()?)));
    }
    Ok(out)
}

/// The keys and values a writing workload puts.
#[derive(Debug, Clone, clap::Args)]
pub struct Writes {
    /// Key size in bytes.
    #[arg(long, default_value_t = 8)]
    pub key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 8)]
    pub val_size: usize,
    /// Number of distinct keys written (keys cycle through this space).
    #[arg(long, default_value_t = 1)]
    pub key_space_size: u64,
}

/// A benchmark workload.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Workload {
    /// Puts of fixed-size values.
    Put {
        /// Keys and values.
        #[command(flatten)]
        writes: Writes,
        /// Use sequential keys instead of pseudo-random ones.
        #[arg(long)]
        sequential_keys: bool,
    },
    /// Transactions of `--txn-ops` puts each (etcd benchmark's `txn-put`), with no compares.
    TxnPut {
        /// Keys and values.
        #[command(flatten)]
        writes: Writes,
        /// Puts per transaction.
        #[arg(long, default_value_t = 1)]
        txn_ops: u64,
    },
    /// Ranges over a key or `[key, end)`.
    Range {
        /// The key to read.
        key: String,
        /// The end of the range (exclusive), if any.
        end: Option<String>,
        /// `l` for linearizable, `s` for serializable.
        #[arg(long, default_value = "l")]
        consistency: String,
        /// Maximum keys per response (0 = no limit).
        #[arg(long, default_value_t = 0)]
        limit: i64,
        /// Return only the count of keys.
        #[arg(long)]
        count_only: bool,
    },
    /// Watch latency: watchers on a prefix, a writer at a fixed rate; put-acknowledged to
    /// event-received latency and lost events.
    WatchLatency(watch::LatencyArgs),
    /// Watch memory: the server's resident memory per watcher.
    WatchMemory(watch::MemoryArgs),
    /// Lease renewals: each client grants one lease and renews it over a keep-alive stream.
    LeaseKeepalive,
    /// Lock acquire/release cycles: each client grants a lease, then locks and unlocks one
    /// shared lock name (etcd's v3lock) in a loop; one request is one full cycle.
    Lock {
        /// The lock's name.
        #[arg(long, default_value = "bench-lock")]
        name: String,
    },
    /// Many leases (one key each) expiring together while the clients keep putting; reports
    /// put latency before and during the burst (`--total` is ignored).
    LeaseExpiry {
        /// Number of leases.
        #[arg(long, default_value_t = 10_000)]
        leases: usize,
        /// Their TTL in seconds.
        #[arg(long, default_value_t = 10)]
        ttl: i64,
    },
    /// Put latency while a long history is compacted (`bench/maintenance.rs`).
    CompactionP99(maintenance::CompactionArgs),
    /// Put latency while a new learner catches up from a snapshot (`bench/maintenance.rs`).
    LearnerP99(maintenance::LearnerArgs),
}

/// Latency statistics of a run.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Wall time of the run.
    pub total: Duration,
    /// Successful requests.
    pub ok: u64,
    /// Failed requests.
    pub errors: u64,
    /// Sorted latencies of successful requests.
    pub latencies: Vec<Duration>,
}

impl Summary {
    /// Requests per second over the run.
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.total.as_secs_f64().max(1e-9)
    }

    /// The `p`-th percentile latency (0..=100).
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * (self.latencies.len() - 1) as f64).round() as usize;
        self.latencies.get(rank.min(self.latencies.len() - 1)).copied().unwrap_or_default()
    }

    /// Prints the summary in the shape of etcd's benchmark tool.
    pub fn print(&self) {
        let secs = |d: Duration| d.as_secs_f64();
        let n = self.latencies.len().max(1) as f64;
        let avg = self.latencies.iter().map(|d| secs(*d)).sum::<f64>() / n;
        let var = self.latencies.iter().map(|d| (secs(*d) - avg).powi(2)).sum::<f64>() / n;
        println!("\nSummary:");
        println!("  Total:\t{:.4} secs.", secs(self.total));
        println!(
            "  Slowest:\t{:.4} secs.",
            secs(self.latencies.last().copied().unwrap_or_default())
        );
        println!(
            "  Fastest:\t{:.4} secs.",
            secs(self.latencies.first().copied().unwrap_or_default())
        );
        println!("  Average:\t{avg:.4} secs.");
        println!("  Stddev:\t{:.4} secs.", var.sqrt());
        println!("  Requests/sec:\t{:.4}", self.rps());
        if self.errors > 0 {
            println!("  Errors:\t{}", self.errors);
        }
        println!("\nLatency distribution:");
        for p in [10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9] {
            // Six decimals (etcd's tool prints four): a 0.1 ms step is too coarse for one
            // client's latencies.
            println!("  {p}% in {:.6} secs.", secs(self.percentile(p)));
        }
    }
}

/// Opens `conns` separate HTTP/2 connections over the endpoints (`https://` ones over TLS
/// with `--cacert`, and `--cert`/`--key` when given).
async fn connect(args: &Args, conns: usize) -> anyhow::Result<Vec<Channel>> {
    use crate::grpc::tls::{Connector, Dial};
    let eps: Vec<&str> =
        args.endpoints.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    anyhow::ensure!(!eps.is_empty(), "no endpoints");
    let tls = match &args.cacert {
        Some(ca) => {
            let identity = args.cert.as_deref().zip(args.tls_key.as_deref());
            Some(Connector::client(ca, identity)?)
        }
        None => None,
    };
    let mut out = Vec::with_capacity(conns);
    for i in 0..conns.max(1) {
        let ep = eps.get(i % eps.len()).copied().unwrap_or_default();
        let is_tls = ep.starts_with("https://");
        let endpoint = if is_tls {
            Connector::endpoint(ep).map_err(anyhow::Error::msg)?
        } else {
            Endpoint::from_shared(ep.to_owned())?
        };
        let endpoint = endpoint
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        let ch = match (&tls, is_tls) {
            (Some(tls), true) => endpoint.connect_with_connector(Dial(tls.clone())).await?,
            (None, true) => anyhow::bail!("{ep}: an https:// endpoint needs --cacert"),
            (_, false) => endpoint.connect().await?,
        };
        out.push(ch);
    }
    Ok(out)
}

/// Makes the key for request `i`.
fn make_key(i: u64, key_size: usize, key_space: u64, sequential: bool) -> Vec<u8> {
    let n = if sequential {
        i % key_space.max(1)
    } else {
        // A multiplicative hash spreads requests over the key space without a RNG crate.
        i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % key_space.max(1)
    };
    let mut key = vec![b'0'; key_size];
    let digits = n.to_string();
    let start = key_size.saturating_sub(digits.len());
    for (dst, src) in key.iter_mut().skip(start).zip(digits.bytes()) {
        *dst = src;
    }
    key
}

/// Runs `args` and returns the summary.
///
/// # Errors
/// Fails when the endpoints cannot be reached.
pub async fn run(args: &Args) -> anyhow::Result<Summary> {
    match &args.workload {
        Workload::WatchLatency(w) => return watch::latency(args, w).await,
        Workload::WatchMemory(m) => return watch::memory(args, m).await,
        _ => {}
    }
    let channels = connect(args, args.conns).await?;
    let first = channels.first().cloned().ok_or_else(|| anyhow::anyhow!("no connection"))?;
    match &args.workload {
        Workload::CompactionP99(a) => return maintenance::compaction(first, args.clients, a).await,
        Workload::LearnerP99(a) => return maintenance::learner(first, args.clients, a).await,
        _ => {}
    }
    let tokens = tokens(args, &channels).await?;
    if let Workload::LeaseExpiry { leases, ttl } = args.workload {
        let report = expiry::run(&channels, args.clients, leases, ttl).await?;
        expiry::print(&report);
        return Ok(report.burst);
    }
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(args.clients);
    for c in 0..args.clients.max(1) {
        let Some(ch) = channels.get(c % channels.len()).cloned() else { continue };
        let next = next.clone();
        let errors = errors.clone();
        let workload = args.workload.clone();
        let total = args.total;
        if let Workload::LeaseKeepalive = workload {
            tasks.push(tokio::spawn(keepalive_client(ch, next, errors, total)));
            continue;
        }
        if let Workload::Lock { name } = &workload {
            tasks.push(tokio::spawn(lock_client(
                ch,
                name.clone().into_bytes(),
                next,
                errors,
                total,
            )));
            continue;
        }
        let token = tokens.get(c % channels.len()).cloned().unwrap_or(Token(None));
        let mut client =
            KvClient::with_interceptor(ch, token).max_decoding_message_size(usize::MAX);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let t0 = Instant::now();
                let res = match &workload {
                    Workload::Put { writes: w, sequential_keys } => {
                        let key = make_key(i, w.key_size, w.key_space_size, *sequential_keys);
                        client
                            .put(PutRequest {
                                key,
                                value: vec![b'v'; w.val_size],
                                ..Default::default()
                            })
                            .await
                            .map(|_| ())
                    }
                    Workload::TxnPut { writes: w, txn_ops } => {
                        // Distinct keys within one transaction (while the key space holds
                        // them): etcd refuses a txn that puts one key twice.
                        let put = |j: u64| PutRequest {
                            key: make_key(i * txn_ops + j, w.key_size, w.key_space_size, true),
                            value: vec![b'v'; w.val_size],
                            ..Default::default()
                        };
                        let success = (0..*txn_ops)
                            .map(|j| RequestOp {
                                request: Some(request_op::Request::RequestPut(put(j))),
                            })
                            .collect();
                        client.txn(TxnRequest { success, ..Default::default() }).await.map(|_| ())
                    }
                    Workload::Range { key, end, consistency, limit, count_only } => client
                        .range(RangeRequest {
                            key: key.clone().into_bytes(),
                            range_end: end.clone().unwrap_or_default().into_bytes(),
                            serializable: consistency == "s",
                            limit: *limit,
                            count_only: *count_only,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ()),
                    // Run above, never per request.
                    Workload::WatchLatency(_) | Workload::WatchMemory(_) => return lat,
                    Workload::LeaseKeepalive
                    | Workload::LeaseExpiry { .. }
                    | Workload::Lock { .. }
                    | Workload::CompactionP99(_)
                    | Workload::LearnerP99(_) => Ok(()),
                };
                match res {
                    Ok(()) => lat.push(t0.elapsed()),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await?);
    }
    let total = start.elapsed();
    latencies.sort_unstable();
    Ok(Summary {
        total,
        ok: latencies.len() as u64,
        errors: errors.load(Ordering::Relaxed),
        latencies,
    })
}

/// One keep-alive client: grants a lease, then renews it over one stream, one request in
/// flight at a time, until the shared request budget is spent.
async fn keepalive_client(
    ch: Channel,
    next: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    total: u64,
) -> Vec<Duration> {
    let mut lat = Vec::new();
    let mut client = LeaseClient::new(ch);
    let id = match client.lease_grant(LeaseGrantRequest { ttl: 600, id: 0 }).await {
        Ok(r) => r.into_inner().id,
        Err(_) => {
            errors.fetch_add(1, Ordering::Relaxed);
            return lat;
        }
    };
    let (tx, rx) = mpsc::channel(1);
    let requests =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    // The first renewal is queued before the call: a grpc-go server (etcd) sends response
    // headers only with its first response, so the call would not return until then.
    if next.fetch_add(1, Ordering::Relaxed) >= total {
        return lat;
    }
    let mut t0 = Instant::now();
    if tx.send(LeaseKeepAliveRequest { id }).await.is_err() {
        errors.fetch_add(1, Ordering::Relaxed);
        return lat;
    }
    let Ok(resp) = client.lease_keep_alive(requests).await else {
        errors.fetch_add(1, Ordering::Relaxed);
        return lat;
    };
    let mut responses = resp.into_inner();
    loop {
        match responses.message().await {
            Ok(Some(r)) if r.ttl > 0 => lat.push(t0.elapsed()),
            _ => {
                errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
        if next.fetch_add(1, Ordering::Relaxed) >= total {
            break;
        }
        t0 = Instant::now();
        if tx.send(LeaseKeepAliveRequest { id }).await.is_err() {
            errors.fetch_add(1, Ordering::Relaxed);
            break;
        }
    }
    lat
}

/// One lock client: grants a lease, then runs lock/unlock cycles of `name` until the shared
/// request budget is spent; a cycle's latency includes the wait for the other holders.
async fn lock_client(
    ch: Channel,
    name: Vec<u8>,
    next: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    total: u64,
) -> Vec<Duration> {
    let mut lat = Vec::new();
    let lease =
        match LeaseClient::new(ch.clone()).lease_grant(LeaseGrantRequest { ttl: 600, id: 0 }).await
        {
            Ok(r) => r.into_inner().id,
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
                return lat;
            }
        };
    let mut client = LockClient::new(ch);
    while next.fetch_add(1, Ordering::Relaxed) < total {
        let t0 = Instant::now();
        let cycle = async {
            let key =
                client.lock(LockRequest { name: name.clone(), lease }).await?.into_inner().key;
            client.unlock(UnlockRequest { key }).await
        };
        match cycle.await {
            Ok(_) => lat.push(t0.elapsed()),
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    lat
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn tls_flags_parse_beside_every_workload() {
        use clap::Parser as _;
        let tls = ["--cacert", "ca.pem", "--cert", "c.pem", "--key", "k.pem"];
        for workload in [&["put"][..], &["range", "000", "zzz"], &["lease-keepalive"]] {
            let argv = [&["bench"][..], &tls[..], workload].concat();
            let cli = Cli::try_parse_from(argv).unwrap();
            assert_eq!(cli.args.tls_key.as_deref(), Some(std::path::Path::new("k.pem")));
        }
        let cli = Cli::try_parse_from(["bench", "range", "000", "--key", "k.pem"]);
        assert!(cli.is_err(), "--key without --cert is refused");
    }

    #[test]
    fn keys_have_the_requested_size_and_cycle_through_the_space() {
        assert_eq!(make_key(7, 8, 100, true), b"00000007".to_vec());
        assert_eq!(make_key(107, 8, 100, true), b"00000007".to_vec());
        assert_eq!(make_key(3, 4, 1, false), b"0000".to_vec());
    }

    #[test]
    fn percentiles_pick_from_sorted_latencies() {
        let s = Summary {
            total: Duration::from_secs(1),
            ok: 100,
            errors: 0,
            latencies: (1..=100).map(Duration::from_millis).collect(),
        };
        assert_eq!(s.percentile(50.0), Duration::from_millis(51));
        assert_eq!(s.percentile(99.0), Duration::from_millis(99));
        assert!((s.rps() - 100.0).abs() < 1e-6);
    }
}
