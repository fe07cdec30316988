//! Raft snapshots of the state machine, made and installed page by page (the handoff with
//! raft and the transport is `raft/snapshot.rs`).
//!
//! Making one costs apply a pause between two write groups: the mvcc revision is pinned
//! and the small keyspaces (meta with the applied index, leases, auth, members) are copied.
//! The result, a [`PinnedImage`], is what raft offers to members behind its compacted log;
//! the transport reads it while it streams, in the export image format of
//! `storage::image_seal` (length-prefixed full keys and values, then a CRC32), so memory
//! stays at a page or two whatever the state's size. The pin holds no resources: history
//! is append-only, so the records up to its revision stay until a newer compaction deletes
//! some, which invalidates the image (raft is then told, and takes a fresh one).
//!
//! Installing reads the image the peer service staged in a file into a rewrite of the
//! engine (`storage::import_image_file`), committed atomically once its checksum checked
//! out, and rebuilds the in-memory views from it. That copy runs at background CPU
//! priority (`storage::BACKGROUND_NICE`), and so does the transport's reading of a pinned
//! image on the sender.

use std::path::Path;

use crate::mvcc::{self, KvStore, Pin};
use crate::raft::SnapshotImage;
use crate::storage::{self, Engine, Keyspace};

/// The state machine at one applied index, readable while writes go on.
pub struct PinnedImage {
    pin: Pin,
    /// The small keyspaces' records, encoded as the image's first part.
    small: Vec<u8>,
}

impl PinnedImage {
    /// Pins `kv` between two write groups and copies the small keyspaces of `engine`
    /// meanwhile; returns the image with the applied index it stands for.
    ///
    /// # Errors
    /// Storage or corruption errors while copying.
    pub(super) fn take(kv: &KvStore, engine: &dyn Engine) -> mvcc::Result<(u64, PinnedImage)> {
        let (pin, small) = kv.pin(|| {
            let mut out = Vec::new();
            storage::scan_non_kv(engine, &mut |ks, k, v| {
                storage::image_push(&mut out, &ks.encode(k), v);
            })?;
            let applied = super::applied_index(engine)?;
            Ok::<_, mvcc::Error>((out, applied))
        });
        let (small, applied) = small?;
        Ok((applied, PinnedImage { pin, small }))
    }
}

impl SnapshotImage for PinnedImage {
    fn stream(&self, piece: usize, out: &mut dyn FnMut(Vec<u8>) -> bool) -> Result<(), String> {
        let mut crc = crc32fast::Hasher::new();
        let mut emit = |buf: &mut Vec<u8>, crc: &mut crc32fast::Hasher| -> bool {
            crc.update(buf);
            out(std::mem::take(buf))
        };
        let mut buf = self.small.clone();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let next = self
                .pin
                .scan_kv(true, after.as_deref(), piece.max(1), &mut |k, v| {
                    storage::image_push(&mut buf, &Keyspace::Kv.encode(k), v);
                })
                .map_err(|e| e.to_string())?;
            if buf.len() >= piece && !emit(&mut buf, &mut crc) {
                return Ok(());
            }
            match next {
                Some(k) => after = Some(k),
                None => break,
            }
        }
        if !buf.is_empty() && !emit(&mut buf, &mut crc) {
            return Ok(());
        }
        out(crc.finalize().to_be_bytes().to_vec());
        Ok(())
    }
}

/// Replaces the state machine's engine content with the image staged at `path` and
/// rebuilds the key index from it; the caller reloads the other views.
///
/// # Errors
/// A corrupt or unreadable image (nothing changed then), storage errors.
pub(super) fn install_staged(kv: &KvStore, engine: &dyn Engine, path: &Path) -> mvcc::Result<()> {
    let install =
        || kv.replace(|| storage::import_image_file(engine, path).map_err(mvcc::Error::from));
    // The copy runs on a helper thread at background priority while apply waits for it
    // (apply has nothing else to do meanwhile): a member catching up from a large image
    // then yields the CPU to whatever shares the machine with it.
    std::thread::scope(|s| {
        let helper =
            std::thread::Builder::new().name("cairn-snap-install".into()).spawn_scoped(s, || {
                storage::lower_thread_priority();
                install()
            });
        match helper {
            Ok(helper) => helper.join().unwrap_or_else(|_| {
                Err(mvcc::Error::Corrupt("the snapshot install thread panicked".into()))
            }),
            // No thread to spare: install on this one.
            Err(_) => install(),
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::mvcc::tests::put;
    use crate::storage::{Batch, MemEngine, Scan};

    fn records(engine: &dyn Engine) -> Vec<(Keyspace, Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        for ks in Keyspace::ALL {
            engine
                .scan(ks, b"", None, &mut |k, v| {
                    out.push((ks, k.to_vec(), v.to_vec()));
                    Scan::Continue
                })
                .unwrap();
        }
        out
    }

    #[test]
    fn a_pinned_image_streams_the_state_at_its_pin_and_installs_elsewhere() {
        let engine = Arc::new(MemEngine::new());
        let kv = KvStore::open(engine.clone()).unwrap();
        let mut b = Batch::new();
        b.put(Keyspace::Lease, b"lease-1".to_vec(), b"ttl".to_vec());
        engine.write(b).unwrap();
        for i in 0..500 {
            put(&kv, &format!("k{}", i % 37), &"v".repeat(i));
        }
        let want = records(engine.as_ref());
        let (_, image) = PinnedImage::take(&kv, engine.as_ref()).unwrap();
        // Writes after the pin are not in the image.
        put(&kv, "later", "x");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        let mut pieces = 0;
        let mut bytes = Vec::new();
        image
            .stream(4096, &mut |p| {
                pieces += 1;
                bytes.extend_from_slice(&p);
                true
            })
            .unwrap();
        assert!(pieces > 2, "streamed in pieces");
        std::fs::write(&path, &bytes).unwrap();

        let target = Arc::new(MemEngine::new());
        let other = KvStore::open(target.clone()).unwrap();
        put(&other, "stale", "gone after install");
        install_staged(&other, target.as_ref(), &path).unwrap();
        assert_eq!(records(target.as_ref()), want);
        assert_eq!(other.current_revision(), 501);

        // A damaged image is refused and changes nothing.
        let last = bytes.len() - 10;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let fresh = Arc::new(MemEngine::new());
        let third = KvStore::open(fresh.clone()).unwrap();
        put(&third, "kept", "1");
        assert!(install_staged(&third, fresh.as_ref(), &path).is_err());
        assert_eq!(third.current_revision(), 2);
    }
}
