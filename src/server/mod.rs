//! The composition root: builds storage, mvcc, raft and apply, wires them together, and
//! offers the edge three things: propose a write and wait for its result, make a read
//! linearizable, and read.
//!
//! It holds no protocol code: the gRPC edge validates requests and maps errors; this module
//! speaks the replicated request (`proto::internal`) and domain types.

mod compactor;
mod datadir;
mod lease;
pub mod membership;
mod propose;
mod read;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::apply::{self, Applier, Wait};
use crate::config::Validated;
use crate::lease::Lessor;
use crate::lease::queue::LeaderClock;
use crate::mvcc::{self, KvStore};
use crate::raft::{self, LogStore, RaftConfig, RaftHandle, RaftStatus};
use crate::storage::{Engine, SledEngine};
use crate::watch::{WatchConfig, WatchHub};

pub use self::lease::TimeToLive;
pub use self::membership::Member;
pub use self::propose::IdGen;

/// The etcd version Cairn reports in `Status` and `/version`: the etcd API level whose
/// behaviour it matches (clients such as Kubernetes gate features on it).
pub const ETCD_VERSION: &str = "3.6.0";

/// etcd's storage version string for the same level.
pub const STORAGE_VERSION: &str = "3.6.0";

/// Errors the server returns to the edge.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No leader is known.
    #[error("no leader")]
    NoLeader,
    /// The request did not complete within the request timeout.
    #[error("request timed out")]
    Timeout,
    /// The server is stopping or stopped.
    #[error("server stopped")]
    Stopped,
    /// The encoded request exceeds `--max-request-bytes`.
    #[error("request is too large")]
    TooLarge,
    /// Apply lags commit by more than etcd's 5000 entries.
    #[error("too many requests")]
    TooManyRequests,
    /// The request failed when applied.
    #[error(transparent)]
    Apply(#[from] apply::Error),
    /// A read failed in mvcc.
    #[error(transparent)]
    Mvcc(#[from] mvcc::Error),
    /// Startup failed.
    #[error("startup: {0}")]
    Startup(String),
}

/// Static facts about this member used in response headers and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderInfo {
    /// The cluster id.
    pub cluster_id: u64,
    /// This member's id.
    pub member_id: u64,
    /// The current raft term.
    pub raft_term: u64,
}

/// A snapshot of the member's state for `Maintenance.Status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusInfo {
    /// Raft view.
    pub raft: RaftStatus,
    /// Applied index.
    pub applied: u64,
    /// State machine size on disk in bytes.
    pub db_size: u64,
    /// The backend quota in bytes.
    pub quota: u64,
}

/// A running Cairn member.
pub struct Server {
    cfg: Arc<Validated>,
    header: HeaderInfo,
    members: Vec<Member>,
    raft: RaftHandle,
    kv: KvStore,
    leases: Lessor,
    watch: WatchHub,
    lease_clock: Mutex<LeaderClock>,
    engine: Arc<dyn Engine>,
    wait: Arc<Wait>,
    applied: watch::Receiver<u64>,
    ids: IdGen,
    reads: read::ReadHandle,
    request_timeout: Duration,
    threads: Mutex<Vec<JoinHandle<()>>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("member_id", &self.header.member_id).finish()
    }
}

impl Server {
    /// Opens (or creates) the data dir, recovers state, and starts raft, apply and the
    /// background tasks. Must run inside a tokio runtime.
    ///
    /// # Errors
    /// [`Error::Startup`] when the data dir is foreign, storage cannot be opened or the
    /// configuration asks for what this build cannot do.
    pub fn start(cfg: Validated) -> Result<Arc<Server>, Error> {
        let startup = |e: &dyn std::fmt::Display| Error::Startup(e.to_string());
        if cfg.initial_cluster.len() != 1 || !cfg.new_cluster {
            return Err(Error::Startup(
                "multi-member clusters (--initial-cluster with several members, or --initial-cluster-state existing) \
                 are not supported by this build yet"
                    .into(),
            ));
        }
        let token = &cfg.raw.initial_cluster_token;
        let peer_urls: Vec<String> =
            cfg.advertise_peer_urls.iter().map(|u| u.raw.clone()).collect();
        let computed_id = membership::member_id(&peer_urls, token);
        let computed = datadir::Identity {
            member_id: computed_id,
            cluster_id: membership::cluster_id(&[computed_id]),
        };
        let identity =
            datadir::DataDir::inspect(&cfg.data_dir).map_err(|e| startup(&e))?.unwrap_or(computed);
        let dir =
            datadir::DataDir::create_or_open(&cfg.data_dir, identity).map_err(|e| startup(&e))?;

        let engine: Arc<dyn Engine> =
            Arc::new(SledEngine::open(&dir.state_dir()).map_err(|e| startup(&e))?);
        let kv = KvStore::open(engine.clone()).map_err(|e| startup(&e))?;
        // etcd's minimum TTL: 1.5 election timeouts (in whole ticks), rounded up to seconds.
        let min_ttl_ms = u64::try_from(cfg.election_ticks * 3 / 2).unwrap_or(15)
            * u64::try_from(cfg.heartbeat.as_millis()).unwrap_or(100);
        let min_ttl = i64::try_from(min_ttl_ms.div_ceil(1000)).unwrap_or(2);
        let leases = Lessor::open(engine.as_ref(), min_ttl).map_err(|e| startup(&e))?;
        attach_leased_keys(&kv, &leases).map_err(|e| startup(&e))?;
        let applied_index = apply::applied_index(engine.as_ref()).map_err(|e| startup(&e))?;
        let log = LogStore::open(&dir.raft_dir()).map_err(|e| startup(&e))?;
        tracing::info!(
            member_id = %format!("{:x}", identity.member_id),
            cluster_id = %format!("{:x}", identity.cluster_id),
            applied_index,
            revision = kv.current_revision(),
            data_dir = %cfg.data_dir.display(),
            "starting member"
        );

        let (apply_tx, apply_rx) = mpsc::channel(1024);
        let raft_cfg = RaftConfig {
            id: identity.member_id,
            initial_voters: vec![identity.member_id],
            heartbeat: cfg.heartbeat,
            election_ticks: cfg.election_ticks,
            applied: applied_index,
            catch_up_entries: 5000,
        };
        let (raft, raft_thread) = raft::start(raft_cfg, log, Arc::new(raft::NoPeers), apply_tx)
            .map_err(|e| startup(&e))?;

        let wait = Arc::new(Wait::new());
        let (applied_tx, applied_rx) = watch::channel(applied_index);
        let compact_raft = raft.clone();
        let watch_hub = WatchHub::new(
            kv.clone(),
            WatchConfig {
                progress_notify_interval: cfg.raw.watch_progress_notify_interval,
                ..WatchConfig::default()
            },
        );
        let applier = Applier::new(
            kv.clone(),
            leases.clone(),
            engine.clone(),
            wait.clone(),
            applied_tx,
            cfg.raw.snapshot_count,
            Box::new(move |index| compact_raft.compact(index)),
        )
        .with_watch(watch_hub.clone());
        let apply_thread = std::thread::Builder::new()
            .name("cairn-apply".into())
            .spawn(move || applier.run(apply_rx))
            .map_err(|e| startup(&e))?;

        // etcd's request timeout: 5 s plus two election timeouts.
        let election = cfg.heartbeat * u32::try_from(cfg.election_ticks).unwrap_or(10);
        let request_timeout = Duration::from_secs(5) + 2 * election;
        let (reads, read_task) = read::start(raft.clone(), applied_rx.clone(), request_timeout);

        let members = vec![Member {
            id: identity.member_id,
            name: cfg.raw.name.clone(),
            peer_urls,
            client_urls: cfg.advertise_client_urls.iter().map(|u| u.raw.clone()).collect(),
            is_learner: false,
        }];
        let server = Arc::new(Server {
            header: HeaderInfo {
                cluster_id: identity.cluster_id,
                member_id: identity.member_id,
                raft_term: 0,
            },
            members,
            ids: IdGen::new(identity.member_id),
            cfg: Arc::new(cfg),
            raft,
            kv,
            leases,
            watch: watch_hub,
            lease_clock: Mutex::new(LeaderClock::new()),
            engine,
            wait,
            applied: applied_rx,
            reads,
            request_timeout,
            threads: Mutex::new(vec![raft_thread, apply_thread]),
            tasks: Mutex::new(vec![read_task]),
        });
        let lease_loop =
            tokio::spawn(lease::run(server.clone(), server.cfg.lease_checkpoint_interval));
        let compactor = compactor::start(server.clone());
        if let Ok(mut t) = server.tasks.lock() {
            t.push(lease_loop);
            t.extend(compactor);
        }
        Ok(server)
    }

    /// The validated configuration.
    pub fn config(&self) -> &Validated {
        &self.cfg
    }

    /// Header facts with the current term.
    pub fn header(&self) -> HeaderInfo {
        HeaderInfo { raft_term: self.raft.status().term, ..self.header }
    }

    /// The mvcc store (for reads).
    pub fn kv(&self) -> &KvStore {
        &self.kv
    }

    /// The watcher registry (the gRPC Watch service opens its streams here).
    pub fn watch_hub(&self) -> &WatchHub {
        &self.watch
    }

    /// The cluster's members.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The raft view of this member.
    pub fn raft_status(&self) -> RaftStatus {
        self.raft.status()
    }

    /// Status for `Maintenance.Status`.
    pub fn status(&self) -> StatusInfo {
        StatusInfo {
            raft: self.raft.status(),
            applied: *self.applied.borrow(),
            db_size: self.engine.size_on_disk().unwrap_or(0),
            quota: self.cfg.quota_backend_bytes,
        }
    }

    /// Reads `req` from the local state machine. Call [`Server::linearizable_barrier`]
    /// first unless the read is serializable.
    ///
    /// # Errors
    /// mvcc's errors (compacted, future revision, storage).
    pub fn range(&self, req: &mvcc::RangeRequest) -> Result<mvcc::RangeResult, Error> {
        Ok(self.kv.range(req)?)
    }

    /// Waits until this member's state machine reflects every write committed before the
    /// call (raft ReadIndex, batched across concurrent readers).
    ///
    /// # Errors
    /// [`Error::NoLeader`], [`Error::Timeout`] or [`Error::Stopped`].
    pub async fn linearizable_barrier(&self) -> Result<(), Error> {
        self.reads.barrier().await
    }

    /// The lessor (replicated lease state).
    pub fn leases(&self) -> &Lessor {
        &self.leases
    }

    /// Stops raft and apply (apply finishes what was committed and checkpoints) and waits
    /// for their threads.
    pub async fn shutdown(&self) {
        self.raft.shutdown().await;
        let tasks: Vec<_> =
            self.tasks.lock().map(|mut t| t.drain(..).collect()).unwrap_or_default();
        for t in tasks {
            t.abort();
        }
        let threads: Vec<_> =
            self.threads.lock().map(|mut t| t.drain(..).collect()).unwrap_or_default();
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

/// Rebuilds lease attachments from the live keys (they are not stored twice), paging
/// through the keyspace so start-up memory stays bounded.
fn attach_leased_keys(kv: &KvStore, leases: &Lessor) -> Result<(), mvcc::Error> {
    let mut req = mvcc::RangeRequest {
        key: vec![0],
        range_end: vec![0],
        limit: 10_000,
        keys_only: true,
        ..Default::default()
    };
    req.revision = kv.current_revision();
    loop {
        let page = kv.range(&req)?;
        for item in &page.kvs {
            leases.attach(item.lease, &item.key);
        }
        match page.kvs.last() {
            Some(last) if page.more => {
                let mut next = last.key.clone();
                next.push(0);
                req.key = next;
            }
            _ => return Ok(()),
        }
    }
}
