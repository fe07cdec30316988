//! [`SledEngine`]: the state machine on sled. The only file in Cairn that names sled.
//!
//! Everything lives in sled's default tree with keyspace prefixes, so one `sled::Batch` is
//! atomic across keyspaces. sled's `flush()` issues `sync_file_range`, which neither flushes
//! the device cache nor file metadata (sled issue #1452), so [`Engine::sync`] flushes and then
//! fsyncs every file in sled's directory and the directory itself.
//!
//! # Generations (defragmentation)
//!
//! sled never gives file space back, so [`Engine::rewrite`] copies the live records into a
//! new sled database in a sibling directory `gen-<n>` and switches to it. The engine's
//! directory then holds `CURRENT` (the name of the live generation, replaced atomically
//! by rename after the new generation is fsynced) and that generation's directory; a
//! generation left behind by a crash before the switch is removed at open. A directory
//! without `CURRENT` holds sled's files directly (the layout before generations, and a
//! new engine until its first rewrite).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};
use std::time::Instant;

use super::{
    Batch, Engine, Error, Keyspace, Result, Rewrite, Scan, image_pairs, image_push, image_seal,
};

/// The file naming the live generation.
const CURRENT: &str = "CURRENT";
/// Prefix of generation directories.
const GEN_PREFIX: &str = "gen-";

/// sled's page cache bound, counted in the pages' on-disk sizes. sled defaults to 1 GiB; the
/// state machine's hot set is far smaller and the OS page cache holds the rest of the file.
/// At 256 MiB a member loaded with 1M keys of 256 bytes peaked about 220 MiB higher than
/// at 64 MiB (issue 13's peak-memory target).
const CACHE_CAPACITY: u64 = 64 * 1024 * 1024;

/// An [`Engine`] backed by a sled database in one directory.
pub struct SledEngine {
    /// The live database and the directory holding its files.
    live: RwLock<(sled::Db, PathBuf)>,
    /// The engine's directory.
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

/// Converts a batch into sled's, prefixing each key with its keyspace.
fn sled_batch(batch: Batch) -> sled::Batch {
    let mut b = sled::Batch::default();
    for op in batch.into_ops() {
        let key = op.keyspace.encode(&op.key);
        match op.value {
            Some(v) => b.insert(key, v),
            None => b.remove(key),
        }
    }
    b
}

/// Removes a file or a directory tree.
fn remove_path(path: &Path) -> Result<()> {
    let removed =
        if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
    removed.map_err(|source| Error::Io { path: path.to_owned(), source })
}

impl SledEngine {
    /// Opens (creating if needed) the sled database in `dir`.
    ///
    /// # Errors
    /// Fails when the directory cannot be created or sled cannot open or recover it.
    pub fn open(dir: &Path) -> Result<Self> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let current = dir.join(CURRENT);
        let live_dir = match std::fs::read_to_string(&current) {
            Ok(name) => dir.join(name.trim()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => dir.to_owned(),
            Err(e) => return Err(io(&current)(e)),
        };
        // Generations other than the live one are rewrites a crash interrupted; with a
        // generation live, everything else but CURRENT is what a crash left of the old
        // files after the switch.
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let path = entry.map_err(io(dir))?.path();
            let name =
                path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let stale = if live_dir == dir {
                name.starts_with(GEN_PREFIX)
            } else {
                path != live_dir && name != CURRENT
            };
            if stale {
                remove_path(&path)?;
            }
        }
        let db = Self::open_db(&live_dir)?;
        Ok(Self { live: RwLock::new((db, live_dir)), dir: dir.to_owned() })
    }

    fn open_db(dir: &Path) -> Result<sled::Db> {
        sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_CAPACITY)
            // Durability comes from the raft log plus explicit checkpoints, not from sled's
            // background flusher; a longer interval keeps it off the apply path.
            .flush_every_ms(Some(1000))
            .open()
            .map_err(engine_err)
    }

    /// The live database (a cheap handle clone).
    fn db(&self) -> sled::Db {
        self.live.read().unwrap_or_else(PoisonError::into_inner).0.clone()
    }

    /// The directory of the live generation.
    fn live_dir(&self) -> PathBuf {
        self.live.read().unwrap_or_else(PoisonError::into_inner).1.clone()
    }

    /// Fsyncs every regular file below `dir`, then `dir` itself.
    fn fsync_tree(dir: &Path) -> Result<()> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io { path, source }
        };
        // sled deletes blob files it no longer needs while this walks (a flush that
        // supersedes them); a file gone between the listing and its open needs no sync, and
        // the directory's own sync below makes its removal durable.
        let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            let path = entry.path();
            let kind = match entry.file_type() {
                Ok(kind) => kind,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(io(&path)(e)),
            };
            if kind.is_dir() {
                Self::fsync_tree(&path)?;
            } else if kind.is_file() {
                match File::open(&path).and_then(|f| f.sync_all()) {
                    Err(e) if !gone(&e) => return Err(io(&path)(e)),
                    _ => {}
                }
            }
        }
        File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
    }
}

impl Engine for SledEngine {
    fn get(&self, keyspace: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db().get(keyspace.encode(key)).map_err(engine_err)?.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        keyspace: Keyspace,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> Scan,
    ) -> Result<()> {
        let (lo, hi) = keyspace.scan_bounds(start, end);
        for item in self.db().range(lo..hi) {
            let (k, v) = item.map_err(engine_err)?;
            if visit(k.get(1..).unwrap_or_default(), &v) == Scan::Stop {
                break;
            }
        }
        Ok(())
    }

    fn write(&self, batch: Batch) -> Result<()> {
        let b = sled_batch(batch);
        let start = Instant::now();
        let result = self.db().apply_batch(b).map_err(engine_err);
        if let Some(m) = crate::metrics::get() {
            m.disk.backend_commit_duration_seconds.observe(start.elapsed().as_secs_f64());
        }
        result
    }

    fn remove_each(&self, keyspace: Keyspace, keys: Vec<Vec<u8>>) -> Result<u64> {
        // One `remove` per key: a sled batch holds sled's process-wide write lock until its
        // last op, and every apply and read waits for it meanwhile.
        let db = self.db();
        let mut freed = 0u64;
        for key in keys {
            if let Some(value) = db.remove(keyspace.encode(&key)).map_err(engine_err)? {
                freed = freed.saturating_add((key.len() + value.len()) as u64);
            }
        }
        Ok(freed)
    }

    fn sync(&self) -> Result<()> {
        let start = Instant::now();
        // The live generation is read once: a rewrite's commit syncs its own files.
        let (db, dir) = self.live.read().unwrap_or_else(PoisonError::into_inner).clone();
        db.flush().map_err(engine_err)?;
        let result = Self::fsync_tree(&dir);
        if let Some(m) = crate::metrics::get() {
            m.cairn.backend_sync_duration_seconds.observe(start.elapsed().as_secs_f64());
        }
        result
    }

    fn size_on_disk(&self) -> Result<u64> {
        self.db().size_on_disk().map_err(engine_err)
    }

    fn export(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for item in self.db().iter() {
            let (k, v) = item.map_err(engine_err)?;
            image_push(&mut out, &k, &v);
        }
        Ok(image_seal(out))
    }

    fn import(&self, image: &[u8]) -> Result<()> {
        let pairs = image_pairs(image)?;
        // One sled batch removes the old content and inserts the new, so a crash leaves one
        // or the other.
        let db = self.db();
        let mut b = sled::Batch::default();
        for item in db.iter().keys() {
            b.remove(item.map_err(engine_err)?);
        }
        for (k, v) in pairs {
            b.insert(k, v);
        }
        db.apply_batch(b).map_err(engine_err)
    }

    fn rewrite(&self) -> Result<Box<dyn Rewrite + '_>> {
        let live = self.live_dir();
        let next = (1u64..)
            .map(|n| self.dir.join(format!("{GEN_PREFIX}{n}")))
            .find(|p| *p != live && !p.exists())
            .unwrap_or_else(|| self.dir.join(format!("{GEN_PREFIX}new")));
        let db = Self::open_db(&next)?;
        Ok(Box::new(SledRewrite { engine: self, db, dir: next }))
    }
}

/// A rewrite into a new generation directory (see the module docs).
struct SledRewrite<'a> {
    engine: &'a SledEngine,
    db: sled::Db,
    dir: PathBuf,
}

impl Rewrite for SledRewrite<'_> {
    fn write(&mut self, batch: Batch) -> Result<()> {
        let b = sled_batch(batch);
        self.db.apply_batch(b).map_err(engine_err)
    }

    fn sync(&mut self) -> Result<()> {
        self.db.flush().map_err(engine_err)?;
        SledEngine::fsync_tree(&self.dir)
    }

    fn commit(self: Box<Self>) -> Result<()> {
        let root = &self.engine.dir;
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io { path, source }
        };
        // The new generation is durable before CURRENT names it.
        self.db.flush().map_err(engine_err)?;
        SledEngine::fsync_tree(&self.dir)?;
        let name =
            self.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = root.join(format!("{CURRENT}.tmp"));
        std::fs::write(&tmp, name.as_bytes()).map_err(io(&tmp))?;
        File::open(&tmp).and_then(|f| f.sync_all()).map_err(io(&tmp))?;
        std::fs::rename(&tmp, root.join(CURRENT)).map_err(io(root))?;
        File::open(root).and_then(|d| d.sync_all()).map_err(io(root))?;
        let (old_db, old_dir) = std::mem::replace(
            &mut *self.engine.live.write().unwrap_or_else(PoisonError::into_inner),
            (self.db, self.dir),
        );
        drop(old_db);
        // Free the old files: a generation directory whole, or sled's files in the
        // engine's own directory (the layout before the first rewrite).
        if old_dir == *root {
            for entry in std::fs::read_dir(root).map_err(io(root))? {
                let path = entry.map_err(io(root))?.path();
                let name =
                    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                if name.starts_with(GEN_PREFIX) || name.starts_with(CURRENT) {
                    continue;
                }
                remove_path(&path)?;
            }
        } else {
            std::fs::remove_dir_all(&old_dir).map_err(io(&old_dir))?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Opens `dir` again after an engine on it was dropped: sled's background flusher may
    /// hold the file lock a moment longer (it answers "could not acquire lock" meanwhile).
    pub(crate) fn reopen(dir: &Path) -> SledEngine {
        for _ in 0..100 {
            match SledEngine::open(dir) {
                Ok(engine) => return engine,
                Err(e) if e.to_string().contains("could not acquire lock") => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("reopen: {e}"),
            }
        }
        panic!("the sled lock was never released");
    }

    fn fill(engine: &SledEngine, n: usize, value: &[u8]) {
        for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
            let mut b = Batch::new();
            for i in chunk {
                b.put(Keyspace::Kv, format!("k{i:06}").into_bytes(), value.to_vec());
            }
            engine.write(b).unwrap();
        }
    }

    #[test]
    fn a_rewrite_gives_space_back_and_keeps_every_record_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let engine = SledEngine::open(dir.path()).unwrap();
        fill(&engine, 5000, &[7u8; 512]);
        let mut b = Batch::new();
        for i in 100..5000 {
            b.delete(Keyspace::Kv, format!("k{i:06}").into_bytes());
        }
        engine.write(b).unwrap();
        engine.sync().unwrap();
        let before = engine.size_on_disk().unwrap();

        let mut rw = engine.rewrite().unwrap();
        let mut b = Batch::new();
        engine
            .scan(Keyspace::Kv, b"", None, &mut |k, v| {
                b.put(Keyspace::Kv, k.to_vec(), v.to_vec());
                Scan::Continue
            })
            .unwrap();
        rw.write(b).unwrap();
        rw.commit().unwrap();
        let after = engine.size_on_disk().unwrap();
        assert!(after < before / 4, "rewrite kept {after} of {before} bytes");
        fill(&engine, 1, b"after");
        engine.sync().unwrap();
        drop(engine);

        let engine = reopen(dir.path());
        let mut n = 0;
        engine
            .scan(Keyspace::Kv, b"", None, &mut |_, _| {
                n += 1;
                Scan::Continue
            })
            .unwrap();
        assert_eq!(n, 100);
        assert_eq!(engine.get(Keyspace::Kv, b"k000000").unwrap(), Some(b"after".to_vec()));
        let entries: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(entries.len(), 2, "only CURRENT and the live generation remain: {entries:?}");
    }
}
