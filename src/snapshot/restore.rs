//! `cairn snapshot restore`: a fresh data dir for a new cluster, built from a snapshot.
//!
//! As etcdutl's restore: every key with its history, the revisions and the leases come
//! across; the member list is replaced by the one `--initial-cluster` names, with ids
//! derived from peer URLs and `--initial-cluster-token` (so the cluster id is new), and the
//! raft log starts empty: the new cluster's members bootstrap from `--initial-cluster` as
//! founders and apply their first entries on top of the restored state. Records that are
//! one member's own (the applied raft index, raised alarms) are dropped.
//!
//! The whole file is checked (structure and SHA-256 trailer) before anything is written,
//! and the data dir is built under a temporary name and renamed into place when complete,
//! so a truncated or corrupted snapshot leaves nothing behind.

use std::path::{Path, PathBuf};

use super::{Error, image};
use crate::apply;
use crate::server::{self, Identity, identity};
use crate::storage::{Batch, Engine, Keyspace};

/// How many records go into one storage batch while restoring.
const BATCH_RECORDS: usize = 4096;

/// etcdutl's restore flags.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The snapshot file.
    pub snapshot: PathBuf,
    /// This member's name (`--name`).
    pub name: String,
    /// The data dir to create (`--data-dir`, default `<name>.etcd`).
    pub data_dir: PathBuf,
    /// `--initial-cluster`: every founding member's name and peer URLs.
    pub initial_cluster: String,
    /// `--initial-cluster-token`.
    pub initial_cluster_token: String,
    /// `--initial-advertise-peer-urls`: this member's peer URLs.
    pub initial_advertise_peer_urls: String,
    /// `--skip-hash-check`: accept a snapshot without its SHA-256 trailer.
    pub skip_hash_check: bool,
}

/// What a restore produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The new member's id.
    pub member_id: u64,
    /// The new cluster's id.
    pub cluster_id: u64,
    /// The mvcc revision restored.
    pub revision: i64,
}

/// Restores `opts.snapshot` into a new data dir (see the module docs).
///
/// # Errors
/// [`Error::Config`] for inconsistent flags or an existing non-empty data dir,
/// [`Error::Invalid`] / [`Error::HashMismatch`] for a bad snapshot (nothing is written),
/// and storage or I/O errors while writing.
pub fn restore(opts: &RestoreOptions) -> Result<Restored, Error> {
    let cluster = crate::config::parse_initial_cluster(&opts.initial_cluster)
        .map_err(|e| Error::Config(e.to_string()))?;
    let mine: Vec<String> = opts
        .initial_advertise_peer_urls
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let listed = cluster.get(&opts.name).ok_or_else(|| {
        Error::Config(format!(
            "couldn't find local name {:?} in the initial cluster configuration",
            opts.name
        ))
    })?;
    let (mut a, mut b) = (listed.clone(), mine.clone());
    a.sort();
    b.sort();
    if a != b {
        return Err(Error::Config(format!(
            "--initial-cluster has {}={} but --initial-advertise-peer-urls is {}",
            opts.name,
            listed.join(","),
            opts.initial_advertise_peer_urls
        )));
    }
    let members: Vec<apply::Member> = cluster
        .iter()
        .map(|(name, urls)| apply::Member {
            id: identity::member_id(urls, &opts.initial_cluster_token),
            name: name.clone(),
            peer_urls: urls.clone(),
            client_urls: Vec::new(),
            is_learner: false,
        })
        .collect();
    let ids: Vec<u64> = members.iter().map(|m| m.id).collect();
    let ident = Identity {
        member_id: identity::member_id(&mine, &opts.initial_cluster_token),
        cluster_id: identity::cluster_id(&ids),
    };

    // First pass: check the whole file; nothing is written yet.
    let source = Source::detect(&opts.snapshot)?;
    let revision = source.check(&opts.snapshot, opts.skip_hash_check)?;

    // Second pass: write the records into a data dir built under a temporary name.
    let built = server::create_restored(&opts.data_dir, ident, |engine: &dyn Engine| {
        let mut batch = Batch::new();
        source.read(&opts.snapshot, opts.skip_hash_check, &mut |ks, k, v| {
            if keep(ks, k) {
                batch.put(ks, k.to_vec(), v.to_vec());
            }
            if batch.len() >= BATCH_RECORDS {
                engine.write(std::mem::take(&mut batch))?;
            }
            Ok(())
        })?;
        for m in &members {
            apply::members::put(&mut batch, m);
        }
        engine.write(batch)?;
        Ok::<(), Error>(())
    });
    match built {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(e @ server::DataDirError::Foreign { .. }) => {
            return Err(Error::Config(format!("data-dir {:?} exists: {e}", opts.data_dir)));
        }
        Err(e) => return Err(Error::Config(e.to_string())),
    }
    Ok(Restored { member_id: ident.member_id, cluster_id: ident.cluster_id, revision })
}

/// True for the records a restored member keeps: everything but the old member list and
/// the records that belong to one member of the old cluster.
fn keep(keyspace: Keyspace, key: &[u8]) -> bool {
    match keyspace {
        Keyspace::Members => false,
        Keyspace::Meta => !apply::is_member_local_meta(key),
        Keyspace::Kv | Keyspace::Lease | Keyspace::Auth => true,
    }
}

/// The kind of snapshot file.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// Cairn's own image.
    Cairn,
    /// etcd's bbolt database.
    Etcd,
}

impl Source {
    fn detect(path: &Path) -> Result<Self, Error> {
        if image::is_cairn_image(path)? { Ok(Source::Cairn) } else { Ok(Source::Etcd) }
    }

    /// Checks the whole file, returning its revision.
    fn check(self, path: &Path, skip_hash_check: bool) -> Result<i64, Error> {
        match self {
            Source::Cairn => {
                Ok(image::read_image(path, skip_hash_check, &mut |_, _, _| Ok(()))?.header.revision)
            }
            Source::Etcd => super::bbolt::check(path, skip_hash_check),
        }
    }

    /// Reads the file's records, converted to Cairn's storage records.
    fn read(
        self,
        path: &Path,
        skip_hash_check: bool,
        visit: super::Visit<'_>,
    ) -> Result<(), Error> {
        match self {
            Source::Cairn => image::read_image(path, skip_hash_check, visit).map(|_| ()),
            Source::Etcd => super::bbolt::read(path, skip_hash_check, visit),
        }
    }
}
