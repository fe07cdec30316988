//! The state machine's storage: a narrow [`Engine`] trait over an ordered byte store.
//!
//! Everything the state machine keeps (the mvcc keyspace, meta records such as the applied
//! index, and later leases, auth and members) lives in one engine, split into [`Keyspace`]s
//! by a one-byte key prefix, so that one [`Batch`] covering several keyspaces is atomic.
//!
//! This module knows nothing of mvcc, raft or the wire. The raft log does **not** live here:
//! it has its own fdatasynced log in `raft::log_store`, because sled's flush is not an fsync.
//! [`SledEngine`] is the only file that names sled; [`MemEngine`] serves unit tests and
//! benches.

mod memory;
mod sled;

pub use self::memory::MemEngine;
pub use self::sled::SledEngine;
#[cfg(test)]
use self::sled::tests::reopen as reopen_sled;

/// The nice value that reading or installing a raft snapshot image runs at (above the
/// default 0, so applies and client requests get the CPU first when it is short).
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority to [`BACKGROUND_NICE`] (on Linux a thread has
/// its own nice value); a no-op elsewhere, and when the system refuses. Call it only on a
/// thread of its own, never on a pooled one (a nice value cannot always be raised again).
pub fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    {
        #[allow(unsafe_code)]
        // SAFETY: gettid and setpriority take and return plain integers; no memory is shared.
        let failed = unsafe {
            libc::setpriority(libc::PRIO_PROCESS, libc::gettid().unsigned_abs(), BACKGROUND_NICE)
        } != 0;
        if failed {
            let error = std::io::Error::last_os_error();
            tracing::debug!(%error, "cannot lower a background thread's priority");
        }
    }
}

/// Errors from a storage engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The underlying engine failed (I/O, corruption, a poisoned lock).
    #[error("storage engine: {0}")]
    Engine(String),
    /// A filesystem operation on the engine's directory failed.
    #[error("storage I/O on {path}: {source}")]
    Io {
        /// The file or directory the operation touched.
        path: std::path::PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
}

/// Result alias for storage operations.
pub type Result<T> = std::result::Result<T, Error>;

/// A named region of the engine's single ordered key space.
///
/// Each keyspace is a one-byte prefix; keys of different keyspaces never interleave, and a
/// scan never crosses from one keyspace into the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Keyspace {
    /// mvcc revisions: `revision (16 bytes) [+ tombstone mark]` to an encoded key-value.
    Kv,
    /// Small records about the state machine itself: applied index, revisions, versions.
    Meta,
    /// Leases: id to granted TTL and checkpointed remaining TTL.
    Lease,
    /// Auth users, roles and the auth revision.
    Auth,
    /// Cluster members.
    Members,
}

impl Keyspace {
    /// Every keyspace, in a fixed order.
    pub const ALL: [Keyspace; 5] =
        [Keyspace::Kv, Keyspace::Meta, Keyspace::Lease, Keyspace::Auth, Keyspace::Members];

    /// The keyspace stored under `prefix`, if any.
    pub fn from_prefix(prefix: u8) -> Option<Keyspace> {
        Keyspace::ALL.into_iter().find(|k| k.prefix() == prefix)
    }

    /// The one-byte prefix under which this keyspace's keys are stored.
    pub const fn prefix(self) -> u8 {
        match self {
            Keyspace::Kv => b'k',
            Keyspace::Meta => b'm',
            Keyspace::Lease => b'l',
            Keyspace::Auth => b'a',
            Keyspace::Members => b'b',
        }
    }

    /// The encoded `[start, end)` of a scan of this keyspace (`end = None` means to the end
    /// of the keyspace), for the engines' range iterators.
    pub fn scan_bounds(self, start: &[u8], end: Option<&[u8]>) -> (Vec<u8>, Vec<u8>) {
        let hi = match end {
            Some(end) => self.encode(end),
            None => vec![self.prefix() + 1],
        };
        (self.encode(start), hi)
    }

    /// Prepends this keyspace's prefix to `key`.
    pub fn encode(self, key: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(key.len() + 1);
        out.push(self.prefix());
        out.extend_from_slice(key);
        out
    }
}

/// One write in a [`Batch`]: a put when `value` is `Some`, a delete otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchOp {
    /// The keyspace written.
    pub keyspace: Keyspace,
    /// The key inside the keyspace (without the prefix).
    pub key: Vec<u8>,
    /// The new value, or `None` to delete the key.
    pub value: Option<Vec<u8>>,
}

/// An ordered list of writes applied atomically by [`Engine::write`]: after a crash either
/// all of them are visible or none.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Batch {
    ops: Vec<BatchOp>,
}

impl Batch {
    /// Creates an empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a put of `value` at `key` in `keyspace`; a later op on the same key wins.
    pub fn put(&mut self, keyspace: Keyspace, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(BatchOp { keyspace, key: key.into(), value: Some(value.into()) });
    }

    /// Adds a delete of `key` in `keyspace`; a later op on the same key wins.
    pub fn delete(&mut self, keyspace: Keyspace, key: impl Into<Vec<u8>>) {
        self.ops.push(BatchOp { keyspace, key: key.into(), value: None });
    }

    /// Appends every op of `other` after this batch's ops.
    pub fn extend(&mut self, other: Batch) {
        self.ops.extend(other.ops);
    }

    /// Returns true when the batch holds no op.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Returns the number of ops in the batch.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Returns the ops in the order they were added.
    pub fn ops(&self) -> &[BatchOp] {
        &self.ops
    }

    /// Consumes the batch, returning its ops in order.
    pub fn into_ops(self) -> Vec<BatchOp> {
        self.ops
    }
}

/// What a scan callback tells the scan to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// Visit the next key.
    Continue,
    /// Stop the scan here.
    Stop,
}

/// An ordered key-value store holding the state machine.
///
/// Reads see every completed [`Engine::write`]. Writes are atomic per batch but not durable
/// until [`Engine::sync`] returns: after a process crash the engine recovers a prefix of the
/// batches written (never a torn batch); after a power loss, everything up to the last
/// `sync`. Callers therefore record the applied raft index inside each batch and keep the
/// raft log until a `sync` has covered it.
pub trait Engine: Send + Sync + 'static {
    /// Returns the value at `key` in `keyspace`, or `None` when absent.
    ///
    /// # Errors
    /// Fails when the engine cannot read.
    fn get(&self, keyspace: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Visits the keys of `keyspace` in `[start, end)` in ascending order (`end = None`
    /// means to the end of the keyspace), calling `visit(key, value)` with the prefix
    /// removed until it returns [`Scan::Stop`].
    ///
    /// # Errors
    /// Fails when the engine cannot read.
    fn scan(
        &self,
        keyspace: Keyspace,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> Scan,
    ) -> Result<()>;

    /// Applies every op of `batch` atomically, in order.
    ///
    /// # Errors
    /// Fails when the engine cannot write; nothing of the batch is then visible.
    fn write(&self, batch: Batch) -> Result<()>;

    /// Removes each of `keys` from `keyspace` on its own, not atomically (after a crash
    /// any subset may be gone), and returns the bytes (key plus value) of the records it
    /// removed. For work that may be cut short and redone, such as compaction's deletes:
    /// unlike one large [`Engine::write`], it never holds other writers off for long.
    ///
    /// # Errors
    /// Fails when the engine cannot write; the keys removed before stay removed.
    fn remove_each(&self, keyspace: Keyspace, keys: Vec<Vec<u8>>) -> Result<u64> {
        let mut freed = 0u64;
        for key in keys {
            if let Some(value) = self.get(keyspace, &key)? {
                freed = freed.saturating_add((key.len() + value.len()) as u64);
                let mut batch = Batch::new();
                batch.delete(keyspace, key);
                self.write(batch)?;
            }
        }
        Ok(freed)
    }

    /// Makes every completed write durable against power loss (a checkpoint).
    ///
    /// # Errors
    /// Fails when flushing or fsyncing fails; the caller must not treat data as durable.
    fn sync(&self) -> Result<()>;

    /// Returns the engine's size on disk in bytes (0 for an in-memory engine).
    ///
    /// # Errors
    /// Fails when the size cannot be read.
    fn size_on_disk(&self) -> Result<u64>;

    /// Returns every key and value of every keyspace as one consistent image, in the format
    /// [`Engine::import`] reads (length-prefixed pairs, then a CRC32 of everything before).
    ///
    /// Consistent as long as no [`Engine::write`] runs meanwhile: the apply task, the only
    /// writer, is the one that calls it.
    ///
    /// # Errors
    /// Fails when the engine cannot read.
    fn export(&self) -> Result<Vec<u8>>;

    /// Starts rewriting the engine into fresh files (defragmentation): the caller copies
    /// every record into the returned [`Rewrite`], then commits it, which makes the new
    /// files the engine's and frees the old ones. Reads and writes of the engine go on
    /// meanwhile; the caller must see to it that no write lands between its last copy and
    /// the commit.
    ///
    /// # Errors
    /// Fails when the new files cannot be created.
    fn rewrite(&self) -> Result<Box<dyn Rewrite + '_>>;

    /// Replaces the whole content of the engine with an image from [`Engine::export`],
    /// atomically: after a crash either the old or the new content is visible.
    ///
    /// # Errors
    /// [`Error::Engine`] when the image is corrupt (nothing is changed) or the write fails.
    fn import(&self, image: &[u8]) -> Result<()>;
}

/// A rewrite of an engine into fresh files, from [`Engine::rewrite`].
pub trait Rewrite: Send {
    /// Writes `batch` into the new files.
    ///
    /// # Errors
    /// Fails when the new files cannot be written.
    fn write(&mut self, batch: Batch) -> Result<()>;

    /// Makes what was written so far durable, so that [`Rewrite::commit`] has only the
    /// rest to sync (callers sync the bulk before they hold writes off for the switch).
    ///
    /// # Errors
    /// Fails when flushing or fsyncing fails.
    fn sync(&mut self) -> Result<()>;

    /// Makes the new files durable and the engine's own, atomically with respect to a
    /// crash (the old files stay authoritative until the switch is durable), and frees
    /// the old files.
    ///
    /// # Errors
    /// Fails when syncing or switching fails; the engine then keeps its old files.
    fn commit(self: Box<Self>) -> Result<()>;
}

/// Receives records with their keyspace: keyspace, key (without prefix), value.
pub type Records<'a> = &'a mut dyn FnMut(Keyspace, &[u8], &[u8]);

/// Visits every record outside the mvcc keyspace (meta, leases, auth, members: the small
/// keyspaces that snapshots and rewrites copy whole between two write groups), keyspace
/// by keyspace.
///
/// # Errors
/// The engine's read errors.
pub fn scan_non_kv(engine: &dyn Engine, visit: Records<'_>) -> Result<()> {
    for ks in Keyspace::ALL.into_iter().filter(|k| *k != Keyspace::Kv) {
        engine.scan(ks, b"", None, &mut |k, v| {
            visit(ks, k, v);
            Scan::Continue
        })?;
    }
    Ok(())
}

/// Appends one key-value pair to an export image.
pub(crate) fn image_push(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    for part in [key, value] {
        out.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(part);
    }
}

/// Seals an export image with its CRC32.
pub(crate) fn image_seal(mut out: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// Checks an export image's CRC32 and splits it into its pairs (full keys, prefix included).
pub(crate) fn image_pairs(image: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let corrupt = |why: &str| Error::Engine(format!("corrupt state image: {why}"));
    let split = image.len().checked_sub(4).ok_or_else(|| corrupt("shorter than its checksum"))?;
    let (body, crc) = image.split_at(split);
    let crc: [u8; 4] = crc.try_into().map_err(|_| corrupt("checksum"))?;
    if crc32fast::hash(body) != u32::from_be_bytes(crc) {
        return Err(corrupt("checksum mismatch"));
    }
    let take = |rest: &mut &[u8]| -> Result<Vec<u8>> {
        let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(|| corrupt("length"))?;
        let len = usize::try_from(u32::from_be_bytes(*len)).map_err(|_| corrupt("length"))?;
        let (part, tail) = tail.split_at_checked(len).ok_or_else(|| corrupt("truncated"))?;
        *rest = tail;
        Ok(part.to_vec())
    };
    let mut pairs = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let k = take(&mut rest)?;
        let v = take(&mut rest)?;
        pairs.push((k, v));
    }
    Ok(pairs)
}

/// Bytes of records written per batch by [`import_image_file`].
const IMPORT_BATCH: usize = 4 * 1024 * 1024;

/// Replaces the whole content of `engine` with the export image (the format of
/// [`image_seal`]) kept in the file at `path`, reading it page by page: the image never
/// sits in memory whole. The records go into a [`Engine::rewrite`] whose commit switches
/// the engine to them atomically, and only after the image's CRC32 checked out, so a
/// corrupt or short image, or a crash midway, leaves the old content in place.
///
/// The caller must see to it that nothing writes the engine meanwhile.
///
/// # Errors
/// [`Error::Io`] when the file cannot be read, [`Error::Engine`] when the image is corrupt
/// or the engine fails.
pub(crate) fn import_image_file(engine: &dyn Engine, path: &std::path::Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let io = |source| Error::Io { path: path.to_owned(), source };
    let corrupt =
        |why: &str| Error::Engine(format!("corrupt state image {}: {why}", path.display()));
    let mut file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let body_len = len.checked_sub(4).ok_or_else(|| corrupt("shorter than its checksum"))?;
    let mut trailer = [0u8; 4];
    file.seek(SeekFrom::Start(body_len)).map_err(io)?;
    file.read_exact(&mut trailer).map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    let mut body = std::io::BufReader::with_capacity(1 << 20, file.take(body_len));

    let mut crc = crc32fast::Hasher::new();
    let read_part = |body: &mut dyn Read, crc: &mut crc32fast::Hasher| -> Result<Option<Vec<u8>>> {
        let mut len = [0u8; 4];
        match body.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(io(e)),
        }
        let n = u32::from_be_bytes(len);
        let mut part = vec![0u8; usize::try_from(n).map_err(|_| corrupt("length"))?];
        body.read_exact(&mut part).map_err(|_| corrupt("truncated record"))?;
        crc.update(&len);
        crc.update(&part);
        Ok(Some(part))
    };
    let mut rw = engine.rewrite()?;
    let mut batch = Batch::new();
    let mut batched = 0usize;
    while let Some(key) = read_part(&mut body, &mut crc)? {
        let value = read_part(&mut body, &mut crc)?.ok_or_else(|| corrupt("key without value"))?;
        let (prefix, key) = key.split_first().ok_or_else(|| corrupt("empty key"))?;
        let ks = Keyspace::from_prefix(*prefix).ok_or_else(|| corrupt("unknown keyspace"))?;
        batched = batched.saturating_add(key.len() + value.len());
        batch.put(ks, key.to_vec(), value);
        if batched >= IMPORT_BATCH {
            rw.write(std::mem::take(&mut batch))?;
            batched = 0;
        }
    }
    if crc.finalize() != u32::from_be_bytes(trailer) {
        return Err(corrupt("checksum mismatch"));
    }
    rw.write(batch)?;
    rw.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the contract checks every engine must pass.
    pub(crate) fn engine_contract(engine: &dyn Engine) {
        let mut b = Batch::new();
        b.put(Keyspace::Kv, b"a".to_vec(), b"1".to_vec());
        b.put(Keyspace::Kv, b"b".to_vec(), b"2".to_vec());
        b.put(Keyspace::Kv, b"c".to_vec(), b"3".to_vec());
        b.put(Keyspace::Meta, b"a".to_vec(), b"meta".to_vec());
        b.delete(Keyspace::Kv, b"c".to_vec());
        engine.write(b).unwrap();

        assert_eq!(engine.get(Keyspace::Kv, b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(engine.get(Keyspace::Kv, b"c").unwrap(), None);
        assert_eq!(engine.get(Keyspace::Meta, b"a").unwrap(), Some(b"meta".to_vec()));

        let mut seen = Vec::new();
        engine
            .scan(Keyspace::Kv, b"", None, &mut |k, v| {
                seen.push((k.to_vec(), v.to_vec()));
                Scan::Continue
            })
            .unwrap();
        assert_eq!(seen, vec![(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"2".to_vec())]);

        let mut seen = Vec::new();
        engine
            .scan(Keyspace::Kv, b"b", Some(b"c"), &mut |k, _| {
                seen.push(k.to_vec());
                Scan::Continue
            })
            .unwrap();
        assert_eq!(seen, vec![b"b".to_vec()]);

        let mut count = 0;
        engine
            .scan(Keyspace::Kv, b"", None, &mut |_, _| {
                count += 1;
                Scan::Stop
            })
            .unwrap();
        assert_eq!(count, 1);
        engine.sync().unwrap();

        let image = engine.export().unwrap();
        let mut b = Batch::new();
        b.put(Keyspace::Lease, b"x".to_vec(), b"gone after import".to_vec());
        engine.write(b).unwrap();
        engine.import(&image).unwrap();
        assert_eq!(engine.get(Keyspace::Lease, b"x").unwrap(), None);
        assert_eq!(engine.get(Keyspace::Kv, b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(engine.export().unwrap(), image);
        let mut bad = image.clone();
        if let Some(b) = bad.first_mut() {
            *b ^= 1;
        }
        assert!(engine.import(&bad).is_err(), "a corrupt image must be refused");
        assert_eq!(engine.get(Keyspace::Kv, b"b").unwrap(), Some(b"2".to_vec()));
    }

    #[test]
    fn mem_engine_keeps_the_contract() {
        engine_contract(&MemEngine::new());
    }

    #[test]
    fn sled_engine_keeps_the_contract_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let engine = SledEngine::open(dir.path()).unwrap();
            engine_contract(&engine);
        }
        let engine = super::reopen_sled(dir.path());
        assert_eq!(engine.get(Keyspace::Kv, b"b").unwrap(), Some(b"2".to_vec()));
        assert!(engine.size_on_disk().unwrap() > 0);
    }
}
