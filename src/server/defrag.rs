//! `Maintenance.Defragment`: rewrites the state machine into fresh files so the space of
//! compacted and deleted records goes back to the file system (etcd's `backend.Defrag`).
//!
//! Writes wait only for a short switch-over, not for the copy: the mvcc records up to a
//! pinned revision (`mvcc::Pin`) are copied while apply goes on; then, between two write
//! groups (the pause a pin takes), the records written since the pin and the small
//! keyspaces (meta, leases, auth, members) are copied and the engine switches to the new
//! files. A compaction or leader snapshot applied during the copy invalidates the pin;
//! the defragmentation then starts over (at most [`ATTEMPTS`] times).
//!
//! A crash at any point leaves either the old files or the new ones live (the engine
//! switches by an atomic rename after the new files are fsynced), each complete.

use std::sync::Arc;

use super::{Error, Server};
use crate::mvcc::Pin;
use crate::storage::{Batch, Engine, Keyspace, Rewrite, Scan};

/// Bytes of mvcc records per copy page.
const PAGE: usize = 1024 * 1024;
/// How often a copy invalidated by a compaction is started over.
const ATTEMPTS: usize = 3;

impl Server {
    /// Defragments this member's state machine; returns the size on disk before and after.
    ///
    /// # Errors
    /// [`Error::Interrupted`] when compactions kept invalidating the copy, storage errors.
    pub async fn defragment(self: &Arc<Self>) -> Result<(u64, u64), Error> {
        let server = self.clone();
        tokio::task::spawn_blocking(move || {
            // One defragmentation at a time on this member.
            let _one = server.maintenance.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let before = server.engine.size_on_disk().unwrap_or(0);
            let mut last = None;
            for _ in 0..ATTEMPTS {
                match defragment_once(server.engine.as_ref(), &server.kv) {
                    Ok(()) => {
                        let after = server.engine.size_on_disk().unwrap_or(0);
                        tracing::info!(before, after, "defragmented the state machine");
                        return Ok((before, after));
                    }
                    Err(e @ Error::Interrupted(_)) => last = Some(e),
                    Err(e) => return Err(e),
                }
            }
            Err(last.unwrap_or_else(|| Error::Interrupted("defragmentation retried".into())))
        })
        .await
        .map_err(|_| Error::Stopped)?
    }
}

/// Copies the records of one pin's side into `rw`, page by page.
fn copy_kv(pin: &Pin, upto_pin: bool, rw: &mut dyn Rewrite) -> Result<(), Error> {
    let mut after: Option<Vec<u8>> = None;
    loop {
        let mut batch = Batch::new();
        let next = pin.scan_kv(upto_pin, after.as_deref(), PAGE, &mut |k, v| {
            batch.put(Keyspace::Kv, k.to_vec(), v.to_vec());
        })?;
        rw.write(batch).map_err(|e| Error::Storage(e.to_string()))?;
        match next {
            Some(k) => after = Some(k),
            None => return Ok(()),
        }
    }
}

fn defragment_once(engine: &dyn Engine, kv: &crate::mvcc::KvStore) -> Result<(), Error> {
    let storage = |e: crate::storage::Error| Error::Storage(e.to_string());
    let mut rw = engine.rewrite().map_err(storage)?;
    let (pin, ()) = kv.pin(|| ());
    copy_kv(&pin, true, rw.as_mut())?;
    // The switch-over: no write group runs while the closure does.
    let (_, switched) = kv.pin(|| {
        copy_kv(&pin, false, rw.as_mut())?;
        let mut batch = Batch::new();
        for ks in Keyspace::ALL.into_iter().filter(|k| *k != Keyspace::Kv) {
            engine
                .scan(ks, b"", None, &mut |k, v| {
                    batch.put(ks, k.to_vec(), v.to_vec());
                    Scan::Continue
                })
                .map_err(storage)?;
        }
        rw.write(batch).map_err(storage)?;
        // Checked last: a leader snapshot installed since the first pin replaced records
        // this copy may have missed.
        if !pin.is_valid() {
            return Err(Error::Interrupted("state replaced during defragmentation".into()));
        }
        rw.commit().map_err(storage)
    });
    switched
}
