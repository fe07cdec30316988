//! The composition root: builds storage, mvcc, raft and apply, wires them together, and is
//! the edge's only door into the member.
//!
//! The edge (`grpc/`, `gateway/`) calls typed methods, each returning its own result type
//! and the one [`Error`]: key-value reads and writes and the watch entry point (`kv.rs`),
//! leases (`lease.rs`), etcd's lock and election recipes (`concurrency/`), membership changes and MoveLeader (`reconfigure.rs`), status and
//! header facts (here). The domain types of those answers are re-exported in [`types`], so
//! the edge converts them to etcd's messages without importing the state machines; apply's
//! result enum never leaves this module. Inside, a write is proposed under a unique id and
//! waited for (`propose.rs`), a linearizable read waits on a batched ReadIndex (`read.rs`).
//!
//! It holds no protocol code: the gRPC edge validates requests and maps errors; this module
//! speaks the replicated request (`proto::internal`, which wraps etcd's request messages)
//! and domain types. `identity.rs` derives member and cluster ids as etcd does.
//! Maintenance: `snapshot.rs` (the `Snapshot` stream and `Hash` from a pinned view),
//! `defrag.rs` (rewriting the state machine into fresh files), `quota.rs` (the backend
//! quota check and the alarm requests), `datadir.rs` (also builds restored data dirs).
//!
//! Deviations from DESIGN's layout: its `membership.rs` is two files, `reconfigure.rs`
//! (the operations and the member's own duties) and `identity.rs` (ids, `Join`, etcd's
//! member errors), so neither is confused with `apply/members.rs` (the records); and the
//! edge's `grpc → server` arrow is enforced by re-exporting the domain types in [`types`]
//! rather than letting the edge import `mvcc` and `watch`.

mod auth;
mod compactor;
mod concurrency;
mod datadir;
mod defrag;
mod error;
pub mod identity;
mod kv;
mod lease;
mod propose;
mod quota;
mod read;
mod reconfigure;
mod snapshot;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::apply::{self, Applier, Wait};
use crate::config::Validated;
use crate::lease::Lessor;
use crate::lease::queue::LeaderClock;
use crate::mvcc::KvStore;
use crate::raft::{self, LogStore, RaftConfig, RaftHandle, RaftStatus, Transport};
use crate::storage::{Engine, SledEngine};
use crate::watch::{WatchConfig, WatchHub};

pub use self::auth::{Caller, current_caller, with_caller, with_caller_sync};
pub use self::concurrency::{Campaigned, LeaderKey, LeaderState, Locked, prefix_end};
pub use self::datadir::{Error as DataDirError, Identity, create_restored};
pub use self::error::Error;
pub use self::identity::{Join, Member, MemberError};
pub use self::lease::TimeToLive;
pub use self::propose::IdGen;
pub use self::quota::Alarm;
pub use self::snapshot::SnapshotStream;
pub use crate::auth::Error as AuthError;
/// For the edge's background threads (the peer port's snapshot reader), which may name
/// only the server (`tests/layering.rs`).
pub use crate::storage::lower_thread_priority;

/// Cairn's own version (`cairn --version`, the `cairn_build_info` metric): the
/// `CAIRN_BUILD_VERSION` set at compile time, else the crate's version. The rolling-upgrade
/// test builds a second `cairn` this way to run two builds that differ (scripts/test.sh).
pub const VERSION: &str = match option_env!("CAIRN_BUILD_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// The etcd version Cairn reports in `Status` and `/version`: the etcd API level whose
/// behaviour it matches (clients such as Kubernetes gate features on it).
pub const ETCD_VERSION: &str = "3.6.0";

/// etcd's storage version string for the same level.
pub const STORAGE_VERSION: &str = "3.6.0";

/// The domain types of the server's answers, re-exported so the edge converts from them
/// while importing nothing below the server (DESIGN: grpc and gateway speak only to it).
pub mod types {
    pub use crate::mvcc::{
        DeleteRangeResult, Event, EventKind, KeyValue, PutResult, RangeRequest, RangeResult,
        TxnOpResult, TxnResult,
    };
    pub use crate::watch::{
        CreateRequest, Error as WatchError, Response as WatchResponse, ResponseKind,
        ResponseSource, WatchStats, WatchStream,
    };
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
    /// An estimate of the bytes of `db_size` that live data needs (`defrag.rs`).
    pub db_size_in_use: u64,
    /// The backend quota in bytes.
    pub quota: u64,
}

/// A running Cairn member.
pub struct Server {
    cfg: Arc<Validated>,
    header: HeaderInfo,
    members: watch::Receiver<Vec<Member>>,
    /// Turns true once this member is removed from the cluster.
    removed: watch::Sender<bool>,
    /// Members seen removed while this process ran.
    removed_ids: Mutex<std::collections::HashSet<u64>>,
    raft: RaftHandle,
    kv: KvStore,
    leases: Lessor,
    watch: WatchHub,
    lease_clock: Mutex<LeaderClock>,
    engine: Arc<dyn Engine>,
    alarms: apply::Alarms,
    /// Users, roles, permissions and tokens (apply changes them; reads are checked here).
    auth: crate::auth::AuthStore,
    wait: Arc<Wait>,
    applied: watch::Receiver<u64>,
    ids: IdGen,
    reads: read::ReadHandle,
    request_timeout: Duration,
    /// How long a request waits for a leader when none is known (an election in progress:
    /// after a leader was killed, removed or handed leadership on) before "no leader".
    leader_wait: Duration,
    /// The size on disk the quota check last read, and when.
    quota_size: Mutex<(Option<std::time::Instant>, u64)>,
    /// Held while a defragmentation runs.
    maintenance: Mutex<()>,
    /// The engine's bytes on disk per byte of records, measured (`defrag.rs`).
    space_factor: Mutex<Option<f64>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("member_id", &self.header.member_id).finish()
    }
}

/// etcd's `--force-new-cluster` on a member restarting from its data dir: the raft log is
/// rewritten so this member is the only voter and the other members' removals are committed
/// entries (apply deletes their records as it replays them); this member's own record stops
/// being a learner's. A fresh data dir has nothing to rewrite.
fn force_new_cluster(
    log: &LogStore,
    engine: &dyn Engine,
    records: &mut [Member],
    identity: &datadir::Identity,
    applied_index: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    if log.is_empty() {
        return Ok(());
    }
    let others: Vec<u64> =
        records.iter().map(|m| m.id).filter(|id| *id != identity.member_id).collect();
    log.force_new_cluster(identity.member_id, applied_index, &others)?;
    if let Some(me) = records.iter_mut().find(|m| m.id == identity.member_id && m.is_learner) {
        me.is_learner = false;
        let mut batch = crate::storage::Batch::new();
        apply::members::put(&mut batch, me);
        engine.write(batch)?;
    }
    tracing::warn!(
        member_id = %format!("{:x}", identity.member_id),
        removed = ?others,
        "--force-new-cluster: restarting as the only member of the cluster, data kept"
    );
    Ok(())
}

impl Server {
    /// Opens (or creates) the data dir, recovers state, and starts raft, apply and the
    /// background tasks. Must run inside a tokio runtime.
    ///
    /// # Errors
    /// [`Error::Startup`] when the data dir is foreign, storage cannot be opened or the
    /// configuration asks for what this build cannot do.
    pub fn start(
        cfg: Validated,
        transport: Arc<dyn Transport>,
        join: Option<Join>,
    ) -> Result<Arc<Server>, Error> {
        let startup = |e: &dyn std::fmt::Display| Error::Startup(e.to_string());
        let token = &cfg.raw.initial_cluster_token;
        let peer_urls: Vec<String> =
            cfg.advertise_peer_urls.iter().map(|u| u.raw.clone()).collect();
        // The founding members, each with the id etcd derives from its peer URLs and the
        // token; the cluster id derives from all of them.
        let founders: Vec<Member> = cfg
            .initial_cluster
            .iter()
            .map(|(name, urls)| Member {
                id: identity::member_id(urls, token),
                name: name.clone(),
                peer_urls: urls.clone(),
                client_urls: Vec::new(),
                is_learner: false,
            })
            .collect();
        let recorded = datadir::DataDir::inspect(&cfg.data_dir).map_err(|e| startup(&e))?;
        let (identity, seed_members) = match (recorded, &join) {
            // A restart: the data dir alone says who this member is.
            (Some(identity), _) => (identity, Vec::new()),
            (None, Some(join)) => (
                datadir::Identity { member_id: join.member_id, cluster_id: join.cluster_id },
                join.members.clone(),
            ),
            (None, None) if cfg.new_cluster => {
                let ids: Vec<u64> = founders.iter().map(|m| m.id).collect();
                let identity = datadir::Identity {
                    member_id: identity::member_id(&peer_urls, token),
                    cluster_id: identity::cluster_id(&ids),
                };
                (identity, founders.clone())
            }
            (None, None) => {
                return Err(Error::Startup(
                    "--initial-cluster-state existing needs a reachable member to join".into(),
                ));
            }
        };
        let fresh = recorded.is_none();
        let dir =
            datadir::DataDir::create_or_open(&cfg.data_dir, identity).map_err(|e| startup(&e))?;

        let engine: Arc<dyn Engine> =
            Arc::new(SledEngine::open(&dir.state_dir()).map_err(|e| startup(&e))?);
        let kv = KvStore::open(engine.clone()).map_err(|e| startup(&e))?;
        kv.set_compaction_pacing(crate::mvcc::CompactionPacing {
            batch_limit: cfg.compaction_batch_limit,
            sleep: cfg.compaction_sleep_interval,
        });
        // etcd's minimum TTL: 1.5 election timeouts (in whole ticks), rounded up to seconds.
        let min_ttl_ms = u64::try_from(cfg.election_ticks * 3 / 2).unwrap_or(15)
            * u64::try_from(cfg.heartbeat.as_millis()).unwrap_or(100);
        let min_ttl = i64::try_from(min_ttl_ms.div_ceil(1000)).unwrap_or(2);
        let leases = Lessor::open(engine.as_ref(), min_ttl).map_err(|e| startup(&e))?;
        let alarms = apply::Alarms::load(engine.as_ref()).map_err(|e| startup(&e))?;
        let auth = crate::auth::AuthStore::load(
            engine.as_ref(),
            Duration::from_secs(cfg.raw.auth_token_ttl),
        )
        .map_err(|e| startup(&e))?;
        let auth = match cfg.raw.auth_token.strip_prefix("jwt") {
            Some(options) => auth.with_jwt(
                crate::auth::JwtProvider::from_options(options.trim_start_matches(','))
                    .map_err(|e| startup(&e))?,
            ),
            None => auth,
        };
        apply::attach_leased_keys(&kv, &leases).map_err(|e| startup(&e))?;
        let mut applied_index = apply::applied_index(engine.as_ref()).map_err(|e| startup(&e))?;
        let log = LogStore::open(&dir.raft_dir()).map_err(|e| startup(&e))?;
        let mut member_records = apply::members::load(engine.as_ref()).map_err(|e| startup(&e))?;
        if member_records.is_empty() && fresh && applied_index == 0 {
            // The founders' records (or, for a joining member, the cluster as a peer reported
            // it, until the leader's snapshot replaces it) are written before raft starts,
            // identically on every founder, so apply starts from the same state everywhere.
            let mut batch = crate::storage::Batch::new();
            for m in &seed_members {
                apply::members::put(&mut batch, m);
            }
            engine.write(batch).map_err(|e| startup(&e))?;
            member_records = seed_members.clone();
            if join.is_some() {
                // A joiner's state comes whole from the leader's snapshot.
                applied_index = 0;
            }
        }
        if cfg.raw.force_new_cluster {
            force_new_cluster(&log, engine.as_ref(), &mut member_records, &identity, applied_index)
                .map_err(|e| startup(&e))?;
            if fresh {
                tracing::warn!("--force-new-cluster ignored: the data dir held no member yet");
            }
        }
        member_records.sort_by_key(|m| m.id);
        let initial_voters: Vec<u64> = if cfg.new_cluster && join.is_none() {
            let mut v: Vec<u64> = founders.iter().map(|m| m.id).collect();
            v.sort_unstable();
            v
        } else {
            Vec::new()
        };
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
            initial_voters,
            heartbeat: cfg.heartbeat,
            election_ticks: cfg.election_ticks,
            applied: applied_index,
            catch_up_entries: 5000,
        };
        transport.update_peers(peer_book(&member_records));
        let (raft, raft_thread) =
            raft::start(raft_cfg, log, transport.clone(), apply_tx).map_err(|e| startup(&e))?;
        transport.attach(raft.clone(), identity.cluster_id, identity.member_id);
        let (members_tx, members_rx) = watch::channel(member_records);

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
        // The applier chain, in etcd's order (see `apply::dispatch`): alarms first, then
        // auth.
        let applier = Applier::new(
            apply::StateMachine {
                kv: kv.clone(),
                leases: leases.clone(),
                engine: engine.clone(),
                alarms: alarms.clone(),
                auth: auth.clone(),
            },
            cfg.raw.snapshot_count,
            apply::Hooks {
                wait: wait.clone(),
                applied: applied_tx,
                members: members_tx,
                on_durable: Box::new(move |index| compact_raft.compact(index)),
                on_conf_change: {
                    let raft = raft.clone();
                    Box::new(move |cc| raft.applied_conf_change(cc))
                },
                on_snapshot: {
                    let raft = raft.clone();
                    Arc::new(move |index, image| raft.offer_snapshot(index, image))
                },
            },
        )
        .with_wrapper(Box::new(apply::AlarmWrapper::new(alarms.clone())))
        .with_wrapper(Box::new(apply::AuthWrapper::new(auth.clone())))
        .with_watch(watch_hub.clone())
        .with_fatal(raft.fatal().clone());
        let apply_thread = std::thread::Builder::new()
            .name("cairn-apply".into())
            .spawn(move || applier.run(apply_rx))
            .map_err(|e| startup(&e))?;

        // etcd's request timeout: 5 s plus two election timeouts.
        let election = cfg.heartbeat * u32::try_from(cfg.election_ticks).unwrap_or(10);
        let request_timeout = Duration::from_secs(5) + 2 * election;
        // A follower elects after one to two election timeouts (PreVote adds a round).
        let leader_wait = (3 * election).min(request_timeout);
        let (reads, read_task) =
            read::start(raft.clone(), applied_rx.clone(), request_timeout, leader_wait);

        let server = Arc::new(Server {
            header: HeaderInfo {
                cluster_id: identity.cluster_id,
                member_id: identity.member_id,
                raft_term: 0,
            },
            members: members_rx,
            removed: watch::channel(false).0,
            removed_ids: Mutex::default(),
            ids: IdGen::new(identity.member_id),
            cfg: Arc::new(cfg),
            raft,
            kv,
            leases,
            watch: watch_hub,
            lease_clock: Mutex::new(LeaderClock::new()),
            engine,
            alarms,
            auth,
            wait,
            applied: applied_rx,
            reads,
            request_timeout,
            leader_wait,
            quota_size: Mutex::new((None, 0)),
            space_factor: Mutex::new(None),
            maintenance: Mutex::new(()),
            threads: Mutex::new(vec![raft_thread, apply_thread]),
            tasks: Mutex::new(vec![read_task]),
        });
        server.prune_staged_snapshots();
        let lease_loop =
            tokio::spawn(lease::run(server.clone(), server.cfg.lease_checkpoint_interval));
        let compactor = compactor::start(server.clone());
        if let Ok(mut t) = server.tasks.lock() {
            t.push(lease_loop);
            t.extend(compactor);
        }
        let member_tasks = reconfigure::start(server.clone(), transport);
        if let Ok(mut t) = server.tasks.lock() {
            t.extend(member_tasks);
        }
        Ok(server)
    }

    /// True when `cfg` asks to join an existing cluster and the data dir holds no member
    /// yet, so the cluster must first be fetched from a running member.
    pub fn needs_join(cfg: &Validated) -> bool {
        !cfg.new_cluster && matches!(datadir::DataDir::inspect(&cfg.data_dir), Ok(None))
    }

    /// The cluster id recorded in the data dir, if it holds a member.
    pub fn recorded_cluster_id(cfg: &Validated) -> Option<u64> {
        datadir::DataDir::inspect(&cfg.data_dir).ok().flatten().map(|i| i.cluster_id)
    }

    /// The validated configuration.
    pub fn config(&self) -> &Validated {
        &self.cfg
    }

    /// Header facts with the current term.
    pub fn header(&self) -> HeaderInfo {
        HeaderInfo { raft_term: self.raft.term(), ..self.header }
    }

    /// The cluster's members as of this member's applied index, ordered by id.
    pub fn members(&self) -> Vec<Member> {
        let mut members = self.members.borrow().clone();
        // Until its publish entry applies, this member's own record lacks its name and client
        // URLs; it knows them, so it answers with them (the records themselves stay as raft
        // made them on every member).
        if let Some(me) = members.iter_mut().find(|m| m.id == self.header.member_id)
            && me.client_urls.is_empty()
        {
            me.name.clone_from(&self.cfg.raw.name);
            me.client_urls = self.cfg.advertise_client_urls.iter().map(|u| u.raw.clone()).collect();
        }
        members
    }

    /// The raft handle, for the peer service to deliver messages.
    pub fn raft(&self) -> &RaftHandle {
        &self.raft
    }

    /// True when this member is a learner.
    pub fn is_learner(&self) -> bool {
        self.members.borrow().iter().any(|m| m.id == self.header.member_id && m.is_learner)
    }

    /// The current leader's id, 0 when none is known.
    pub fn leader(&self) -> u64 {
        self.raft.leader()
    }

    /// True when this member leads.
    pub fn is_leader(&self) -> bool {
        self.raft.is_leader()
    }

    /// The fatal failure this member stopped on, if any (see `raft::Fatal`): the member then
    /// refuses requests and its health checks fail with this reason until it is restarted.
    pub fn failure(&self) -> Option<raft::Failure> {
        self.raft.fatal().get().cloned()
    }

    /// Completes once the member failed (at once if it has): streams end on it.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.raft.fatal().failed()
    }

    /// Refuses local reads once the member failed: its state no longer follows the log.
    fn refuse_if_failed(&self) -> Result<(), Error> {
        if self.raft.fatal().is_set() { Err(Error::Stopped) } else { Ok(()) }
    }

    /// Status for `Maintenance.Status`.
    pub fn status(&self) -> StatusInfo {
        let db_size = self.engine.size_on_disk().unwrap_or(0);
        StatusInfo {
            raft: self.raft.status(),
            applied: *self.applied.borrow(),
            db_size,
            db_size_in_use: self.db_size_in_use(db_size),
            quota: self.cfg.quota_backend_bytes,
        }
    }

    /// Waits until this member's state machine reflects every write committed before the
    /// call (raft ReadIndex, batched across concurrent readers).
    ///
    /// # Errors
    /// [`Error::NoLeader`], [`Error::Timeout`] or [`Error::Stopped`].
    pub async fn linearizable_barrier(&self) -> Result<(), Error> {
        self.reads.barrier().await
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

/// Each member id with its peer URLs, for the transport.
fn peer_book(members: &[Member]) -> Vec<(u64, Vec<String>)> {
    members.iter().map(|m| (m.id, m.peer_urls.clone())).collect()
}
