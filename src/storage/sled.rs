//! [`SledEngine`]: the state machine on sled. The only file in Cairn that names sled.
//!
//! Everything lives in sled's default tree with keyspace prefixes, so one `sled::Batch` is
//! atomic across keyspaces. sled's `flush()` issues `sync_file_range`, which neither flushes
//! the device cache nor file metadata (sled issue #1452), so [`Engine::sync`] flushes and then
//! fsyncs every file in sled's directory and the directory itself.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{Batch, Engine, Error, Keyspace, Result, Scan, image_pairs, image_push, image_seal};

/// sled's page cache bound. sled defaults to 1 GiB; the state machine's hot set is far smaller
/// and the OS page cache holds the rest.
const CACHE_CAPACITY: u64 = 256 * 1024 * 1024;

/// An [`Engine`] backed by a sled database in one directory.
pub struct SledEngine {
    db: sled::Db,
    dir: PathBuf,
}

impl std::fmt::Debug for SledEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledEngine").field("dir", &self.dir).finish()
    }
}

fn engine_err(e: sled::Error) -> Error {
    Error::Engine(e.to_string())
}

impl SledEngine {
    /// Opens (creating if needed) the sled database in `dir`.
    ///
    /// # Errors
    /// Fails when the directory cannot be created or sled cannot open or recover it.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|source| Error::Io { path: dir.to_owned(), source })?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_CAPACITY)
            // Durability comes from the raft log plus explicit checkpoints, not from sled's
            // background flusher; a longer interval keeps it off the apply path.
            .flush_every_ms(Some(1000))
            .open()
            .map_err(engine_err)?;
        Ok(Self { db, dir: dir.to_owned() })
    }

    /// Fsyncs every regular file below `dir`, then `dir` itself.
    fn fsync_tree(dir: &Path) -> Result<()> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io { path, source }
        };
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            let path = entry.path();
            let kind = entry.file_type().map_err(io(&path))?;
            if kind.is_dir() {
                Self::fsync_tree(&path)?;
            } else if kind.is_file() {
                File::open(&path).and_then(|f| f.sync_all()).map_err(io(&path))?;
            }
        }
        File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
    }
}

impl Engine for SledEngine {
    fn get(&self, keyspace: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get(keyspace.encode(key)).map_err(engine_err)?.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        keyspace: Keyspace,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> Scan,
    ) -> Result<()> {
        let (lo, hi) = keyspace.scan_bounds(start, end);
        for item in self.db.range(lo..hi) {
            let (k, v) = item.map_err(engine_err)?;
            if visit(k.get(1..).unwrap_or_default(), &v) == Scan::Stop {
                break;
            }
        }
        Ok(())
    }

    fn write(&self, batch: Batch) -> Result<()> {
        let mut b = sled::Batch::default();
        for op in batch.into_ops() {
            let key = op.keyspace.encode(&op.key);
            match op.value {
                Some(v) => b.insert(key, v),
                None => b.remove(key),
            }
        }
        let start = Instant::now();
        let result = self.db.apply_batch(b).map_err(engine_err);
        if let Some(m) = crate::metrics::get() {
            m.disk.backend_commit_duration_seconds.observe(start.elapsed().as_secs_f64());
        }
        result
    }

    fn sync(&self) -> Result<()> {
        let start = Instant::now();
        self.db.flush().map_err(engine_err)?;
        let result = Self::fsync_tree(&self.dir);
        if let Some(m) = crate::metrics::get() {
            m.cairn.backend_sync_duration_seconds.observe(start.elapsed().as_secs_f64());
        }
        result
    }

    fn size_on_disk(&self) -> Result<u64> {
        self.db.size_on_disk().map_err(engine_err)
    }

    fn export(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for item in self.db.iter() {
            let (k, v) = item.map_err(engine_err)?;
            image_push(&mut out, &k, &v);
        }
        Ok(image_seal(out))
    }

    fn import(&self, image: &[u8]) -> Result<()> {
        let pairs = image_pairs(image)?;
        // One sled batch removes the old content and inserts the new, so a crash leaves one
        // or the other.
        let mut b = sled::Batch::default();
        for item in self.db.iter().keys() {
            b.remove(item.map_err(engine_err)?);
        }
        for (k, v) in pairs {
            b.insert(k, v);
        }
        self.db.apply_batch(b).map_err(engine_err)
    }
}
