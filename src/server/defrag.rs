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
//!
//! # `dbSizeInUse`
//!
//! sled does not say how much of its files is free, so `Maintenance.Status` reports an
//! estimate: the bytes of the records the state machine holds (storage keys plus values,
//! counted exactly by mvcc for the revisions and by a scan of the small keyspaces), times
//! the engine's *space factor*, the bytes on disk per byte of records. The factor is
//! measured after each defragmentation (when the files hold exactly the records) and
//! whenever the estimate would exceed `dbSize` (first of all at the first status, and
//! when the factor was taken on a nearly empty store); the estimate is then `dbSize`. Right after a defragmentation
//! it equals `dbSize`; compaction and deletes lower it by the space their records took, so
//! `1 - dbSizeInUse / dbSize` estimates what the next defragmentation gives back (the
//! operator's `minFreeRatio`). Records awaiting a compaction's deletion count as in use
//! until their batch deletes them.

use std::sync::Arc;

use super::{Error, Server};
use crate::mvcc::Pin;
use crate::storage::{Batch, Engine, Keyspace, Rewrite};

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
                        server.measure_space_factor(after);
                        // The quota check must not go on comparing the old size.
                        server.forget_quota_size();
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

impl Server {
    /// The bytes of records the state machine holds (see the module docs).
    fn record_bytes(&self) -> u64 {
        let mut small = 0u64;
        let _ = crate::storage::scan_non_kv(self.engine.as_ref(), &mut |_, k, v| {
            small = small.saturating_add((k.len() + v.len() + 1) as u64);
        });
        self.kv.stored_bytes().saturating_add(small)
    }

    /// Records the space factor for `db_size` bytes on disk holding the current records.
    fn measure_space_factor(&self, db_size: u64) -> f64 {
        let factor = (db_size as f64 / self.record_bytes().max(1) as f64).max(1.0);
        *self.space_factor.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(factor);
        factor
    }

    /// `dbSizeInUse` for `db_size` bytes on disk (see the module docs).
    pub(super) fn db_size_in_use(&self, db_size: u64) -> u64 {
        let known = *self.space_factor.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let estimate = known.map(|factor| self.record_bytes() as f64 * factor);
        match estimate {
            // Rounded: right after a measurement the product is the file size give or take
            // a float's last bit.
            Some(bytes) if bytes.round() <= db_size as f64 => bytes.round() as u64,
            // More records than the files could hold at the measured factor: the factor
            // was taken on a (nearly) empty store, whose fixed overhead dwarfs its records.
            // The files are then taken as full, and the factor measured again.
            _ => {
                self.measure_space_factor(db_size);
                db_size
            }
        }
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
    // The bulk is made durable before writes are held off; the switch syncs only the rest.
    rw.sync().map_err(storage)?;
    // The switch-over: no write group runs while the closure does.
    let (_, switched) = kv.pin(|| {
        copy_kv(&pin, false, rw.as_mut())?;
        let mut batch = Batch::new();
        crate::storage::scan_non_kv(engine, &mut |ks, k, v| {
            batch.put(ks, k.to_vec(), v.to_vec());
        })
        .map_err(storage)?;
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
