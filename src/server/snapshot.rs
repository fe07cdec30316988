//! `Maintenance.Snapshot`: streams a consistent point-in-time image of the state machine
//! in Cairn's snapshot format (`snapshot` module docs) without building it in memory.
//!
//! The non-mvcc keyspaces (meta with the applied index, leases, auth, members) are small
//! and copied between two write groups, under the same pause that pins the mvcc revision
//! (`mvcc::Pin`); the mvcc records up to that revision are then read page by page while
//! writes go on, and leave as chunks through a small bounded channel, so memory stays at a
//! few chunks whatever the database size and a slow client only slows its own reader
//! thread. A compaction or a leader snapshot applied meanwhile would remove records the
//! stream has not read yet: the stream then fails with [`Error::Interrupted`] rather than
//! send an inconsistent image (etcd keeps old bbolt pages alive instead; sled cannot).

use std::sync::Arc;

use tokio::sync::mpsc;

use super::{Error, Server};
use crate::mvcc::Pin;
use crate::snapshot::{Header, ImageWriter};
use crate::storage::Keyspace;

/// Size of the chunks sent to the client (etcd sends 32 KiB).
const CHUNK: usize = 64 * 1024;
/// Bytes of mvcc records read per page.
const PAGE: usize = 256 * 1024;

/// A snapshot being streamed: chunks of the image, then its SHA-256 trailer.
#[derive(Debug)]
pub struct SnapshotStream {
    /// The pinned point in time.
    pub header: Header,
    /// The state machine's size on disk when the stream began (an estimate of the image
    /// size, for `remaining_bytes`).
    pub size_hint: u64,
    rx: mpsc::Receiver<Result<Vec<u8>, Error>>,
}

impl SnapshotStream {
    /// The next chunk; `None` after the trailer.
    pub async fn next(&mut self) -> Option<Result<Vec<u8>, Error>> {
        self.rx.recv().await
    }
}

/// The records of the small keyspaces and the applied index, copied under a pin.
type PinnedState = Result<(Vec<(Keyspace, Vec<u8>, Vec<u8>)>, u64), Error>;

impl Server {
    /// Where a raft snapshot streamed from the leader for `index` is staged before apply
    /// installs it (`<data-dir>/snap/`, as etcd's member/snap holds its `.snap.db`).
    pub fn raft_snapshot_staging(&self, index: u64) -> std::path::PathBuf {
        self.cfg.data_dir.join("snap").join(format!("{index:016x}.incoming"))
    }

    /// Removes staged raft snapshots that can no longer be installed: those at or below the
    /// applied index, which apply skips. A snapshot raft refused on arrival (older than its
    /// commit index) is one; it goes at the next arrival or restart.
    pub fn prune_staged_snapshots(&self) {
        let applied = *self.applied.borrow();
        prune_staged(&self.cfg.data_dir.join("snap"), applied);
    }

    /// Pins the mvcc revision and copies, in the same pause between write groups, every
    /// record outside the mvcc keyspace, with the applied index.
    fn pin_state(&self) -> (Pin, PinnedState) {
        let engine = self.engine.clone();
        let (pin, copied) = self.kv.pin(|| {
            let mut records = Vec::new();
            crate::storage::scan_non_kv(engine.as_ref(), &mut |ks, k, v| {
                records.push((ks, k.to_vec(), v.to_vec()));
            })?;
            let applied = crate::apply::applied_index(engine.as_ref())?;
            Ok::<_, crate::mvcc::Error>((records, applied))
        });
        (pin, copied.map_err(Error::from))
    }

    /// etcd's `Hash`: a CRC-32 over every record of the state machine at one point in
    /// time (each record's keyspace byte, key and value), leaving out the records that
    /// are this member's own (applied index, alarms), so members at the same revision
    /// compare equal. Returns the hash and the revision it covers.
    ///
    /// # Errors
    /// [`Error::Interrupted`] when a compaction ran while hashing; storage errors.
    pub async fn hash(self: &Arc<Self>) -> Result<(u32, i64), Error> {
        let server = self.clone();
        tokio::task::spawn_blocking(move || {
            let (pin, copied) = server.pin_state();
            let (records, _) = copied?;
            let mut crc = crc32fast::Hasher::new();
            for (ks, k, v) in &records {
                if *ks == Keyspace::Meta && crate::apply::is_member_local_meta(k) {
                    continue;
                }
                crc.update(&[ks.prefix()]);
                crc.update(k);
                crc.update(v);
            }
            let mut after: Option<Vec<u8>> = None;
            loop {
                let next = pin.scan_kv(true, after.as_deref(), PAGE, &mut |k, v| {
                    crc.update(&[Keyspace::Kv.prefix()]);
                    crc.update(k);
                    crc.update(v);
                })?;
                match next {
                    Some(k) => after = Some(k),
                    None => return Ok((crc.finalize(), pin.revision())),
                }
            }
        })
        .await
        .map_err(|_| Error::Stopped)?
    }

    /// Starts streaming a snapshot of this member's state machine.
    ///
    /// # Errors
    /// [`Error::Storage`] when the first read fails; later failures arrive in the stream.
    pub async fn snapshot(self: &Arc<Self>) -> Result<SnapshotStream, Error> {
        let server = self.clone();
        let (tx, rx) = mpsc::channel(4);
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        tokio::task::spawn_blocking(move || server.produce_snapshot(&tx, first_tx));
        let (header, size_hint) = first_rx.await.map_err(|_| Error::Stopped)??;
        Ok(SnapshotStream { header, size_hint, rx })
    }

    /// The reader thread: pins, copies, pages through mvcc, sends chunks.
    fn produce_snapshot(
        &self,
        tx: &mpsc::Sender<Result<Vec<u8>, Error>>,
        first: tokio::sync::oneshot::Sender<Result<(Header, u64), Error>>,
    ) {
        let (pin, copied) = self.pin_state();
        let (records, applied) = match copied {
            Ok(c) => c,
            Err(e) => {
                let _ = first.send(Err(e));
                return;
            }
        };
        let header = Header {
            revision: pin.revision(),
            compact_revision: pin.compact_revision(),
            applied_index: applied,
            cluster_id: self.header.cluster_id,
            member_id: self.header.member_id,
        };
        let size_hint = self.engine.size_on_disk().unwrap_or(0);
        if first.send(Ok((header, size_hint))).is_err() {
            return;
        }
        tracing::info!(revision = header.revision, applied, "sending database snapshot to client");
        let mut w = ImageWriter::new(&header);
        let send = |w: &mut ImageWriter, force: bool| -> bool {
            if w.buffered() >= CHUNK || (force && w.buffered() > 0) {
                return tx.blocking_send(Ok(w.take())).is_ok();
            }
            true
        };
        for (ks, k, v) in records {
            w.record(ks, &k, &v);
            if !send(&mut w, false) {
                return;
            }
        }
        let mut after: Option<Vec<u8>> = None;
        loop {
            let mut buffered = Vec::new();
            let page = pin.scan_kv(true, after.as_deref(), PAGE, &mut |k, v| {
                buffered.push((k.to_vec(), v.to_vec()));
            });
            match page {
                Err(e) => {
                    tracing::warn!(error = %e, "snapshot stream interrupted");
                    let _ = tx.blocking_send(Err(Error::Interrupted(e.to_string())));
                    return;
                }
                Ok(next) => {
                    for (k, v) in buffered {
                        w.record(Keyspace::Kv, &k, &v);
                        if !send(&mut w, false) {
                            return;
                        }
                    }
                    match next {
                        Some(k) => after = Some(k),
                        None => break,
                    }
                }
            }
        }
        let (last, sha) = w.finish();
        if tx.blocking_send(Ok(last)).is_ok() && tx.blocking_send(Ok(sha.to_vec())).is_ok() {
            tracing::info!(revision = header.revision, "sent database snapshot to client");
        }
    }
}

/// Removes the `<index>.incoming` files in `dir` whose index is at most `applied`; returns
/// how many went. Other files, and a missing `dir`, are left alone.
fn prune_staged(dir: &std::path::Path, applied: u64) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let index = name
            .to_str()
            .and_then(|n| n.strip_suffix(".incoming"))
            .and_then(|hex| u64::from_str_radix(hex, 16).ok());
        if index.is_some_and(|i| i <= applied) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove a stale staged raft snapshot")
                }
            }
        }
    }
    if removed > 0 {
        tracing::info!(
            removed,
            applied,
            "removed staged raft snapshots at or below the applied index"
        );
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_snapshots_at_or_below_the_applied_index_go_and_the_rest_stay() {
        let dir = tempfile::tempdir().unwrap();
        let names = [
            format!("{:016x}.incoming", 90u64),
            format!("{:016x}.incoming", 100u64),
            format!("{:016x}.incoming", 101u64),
            "0000000000000005.snap".to_owned(),
            "notes.incoming".to_owned(),
        ];
        for n in &names {
            std::fs::write(dir.path().join(n), b"x").unwrap();
        }
        assert_eq!(prune_staged(dir.path(), 100), 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, [names[3].clone(), names[2].clone(), names[4].clone()]);
        assert_eq!(prune_staged(&dir.path().join("missing"), 100), 0);
    }
}
