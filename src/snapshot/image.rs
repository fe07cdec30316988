//! Writing and reading Cairn's snapshot image (the format is in the module docs of
//! `snapshot`): an incremental writer that hands out chunks as they fill, and a streaming
//! reader that checks structure and trailer without loading the file.

use std::io::{BufReader, Read};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::Error;
use crate::storage::Keyspace;

/// The file's first bytes.
pub(super) const MAGIC: &[u8; 8] = b"CAIRNSNP";
/// The format version this build writes and reads.
const VERSION: u32 = 1;
/// Length of the version-1 header.
const HEADER_LEN: u32 = 40;
/// Tag of a record.
const TAG_RECORD: u8 = 1;
/// Tag of the end marker.
const TAG_END: u8 = 0;
/// The image is padded to a multiple of this, because etcd's clients accept a snapshot
/// stream only when its size modulo 512 is the 32 bytes of the trailer (bbolt files are
/// whole pages; client/v3/snapshot `hasChecksum`).
const ALIGN: u64 = 512;
/// The start of the error for an image without its trailer (etcdutl's wording).
pub(super) const MISSING_HASH: &str = "snapshot missing hash";
/// Length of the SHA-256 trailer.
pub(super) const SHA_LEN: usize = 32;

/// The point in time an image holds, and who took it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// The mvcc revision of the image.
    pub revision: i64,
    /// The compaction revision of the image.
    pub compact_revision: i64,
    /// The raft index applied when the image was taken.
    pub applied_index: u64,
    /// The cluster that took it.
    pub cluster_id: u64,
    /// The member that took it.
    pub member_id: u64,
}

/// Builds an image incrementally; [`ImageWriter::take`] hands out what is buffered.
pub struct ImageWriter {
    buf: Vec<u8>,
    sha: Sha256,
    records: u64,
    /// Bytes handed out so far.
    written: u64,
}

impl std::fmt::Debug for ImageWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageWriter").field("records", &self.records).finish_non_exhaustive()
    }
}

impl ImageWriter {
    /// Starts an image at `header`.
    pub fn new(header: &Header) -> Self {
        let mut buf = Vec::with_capacity(64 * 1024);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&VERSION.to_be_bytes());
        buf.extend_from_slice(&HEADER_LEN.to_be_bytes());
        buf.extend_from_slice(&header.revision.to_be_bytes());
        buf.extend_from_slice(&header.compact_revision.to_be_bytes());
        buf.extend_from_slice(&header.applied_index.to_be_bytes());
        buf.extend_from_slice(&header.cluster_id.to_be_bytes());
        buf.extend_from_slice(&header.member_id.to_be_bytes());
        Self { buf, sha: Sha256::new(), records: 0, written: 0 }
    }

    /// Appends one storage record.
    pub fn record(&mut self, keyspace: Keyspace, key: &[u8], value: &[u8]) {
        self.buf.push(TAG_RECORD);
        self.buf.push(keyspace.prefix());
        for part in [key, value] {
            // Engine keys and values are far below 4 GiB (requests are capped at MiBs).
            self.buf
                .extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
            self.buf.extend_from_slice(part);
        }
        self.records += 1;
    }

    /// Bytes buffered and not yet handed out.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Hands out everything buffered (hashed into the trailer).
    pub fn take(&mut self) -> Vec<u8> {
        let out = std::mem::take(&mut self.buf);
        self.sha.update(&out);
        self.written += out.len() as u64;
        out
    }

    /// Ends the image: returns the last bytes (end marker) and, separately, the SHA-256
    /// trailer, which the server sends as its own final chunk, as etcd does.
    pub fn finish(mut self) -> (Vec<u8>, [u8; SHA_LEN]) {
        self.buf.push(TAG_END);
        self.buf.extend_from_slice(&self.records.to_be_bytes());
        let len = self.written + self.buf.len() as u64;
        let pad = (ALIGN - len % ALIGN) % ALIGN;
        self.buf.resize(self.buf.len() + usize::try_from(pad).unwrap_or(0), 0);
        let last = self.take();
        (last, self.sha.finalize().into())
    }
}

/// What reading a whole image found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// The image's header.
    pub header: Header,
    /// Every record of every keyspace.
    pub records: u64,
    /// CRC-32/IEEE over each record's keyspace byte, key and value.
    pub hash: u32,
    /// The file size in bytes.
    pub size: u64,
    /// True when a SHA-256 trailer was present (and, unless skipped, matched).
    pub has_trailer: bool,
}

/// A reader that hashes what it reads and counts it.
struct Hashing<R> {
    inner: R,
    sha: Sha256,
    read: u64,
}

impl<R: Read> Hashing<R> {
    fn exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_exact(buf)?;
        self.sha.update(&*buf);
        self.read += u64::try_from(buf.len()).unwrap_or(u64::MAX);
        Ok(())
    }

    fn u8(&mut self) -> std::io::Result<u8> {
        let mut b = [0u8; 1];
        self.exact(&mut b)?;
        Ok(b[0])
    }

    fn u32(&mut self) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        self.exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        self.exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }
}

/// True when the file at `path` starts with Cairn's magic.
///
/// # Errors
/// [`Error::Io`] when the file cannot be read.
pub(super) fn is_cairn_image(path: &Path) -> Result<bool, Error> {
    let io = |source| Error::Io { path: path.to_owned(), source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut magic = [0u8; 8];
    match f.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(io(e)),
    }
}

/// Reads the image at `path` from start to end, calling `visit` for each record, and
/// checks its structure and its SHA-256 trailer (a missing trailer is accepted only with
/// `skip_hash_check`, which also skips comparing a present one).
///
/// # Errors
/// [`Error::Invalid`] for a file that is not an image or is cut short, damaged or has
/// bytes after its end; [`Error::HashMismatch`]; [`Error::Io`]; and `visit`'s errors.
pub fn read_image(
    path: &Path,
    skip_hash_check: bool,
    visit: super::Visit<'_>,
) -> Result<Summary, Error> {
    let invalid = |reason: String| Error::Invalid { path: path.to_owned(), reason };
    let file =
        std::fs::File::open(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
    let size = file.metadata().map_err(|source| Error::Io { path: path.to_owned(), source })?.len();
    let mut r =
        Hashing { inner: BufReader::with_capacity(256 * 1024, file), sha: Sha256::new(), read: 0 };
    let cut = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::Invalid { path: path.to_owned(), reason: "the file is truncated".into() }
        } else {
            Error::Io { path: path.to_owned(), source: e }
        }
    };
    let mut magic = [0u8; 8];
    r.exact(&mut magic).map_err(cut)?;
    if &magic != MAGIC {
        return Err(invalid("not a Cairn snapshot (bad magic)".into()));
    }
    let version = r.u32().map_err(cut)?;
    if version != VERSION {
        return Err(invalid(format!("format version {version}, this build reads {VERSION}")));
    }
    let header_len = r.u32().map_err(cut)?;
    if header_len < HEADER_LEN || u64::from(header_len) > size {
        return Err(invalid(format!("header length {header_len}")));
    }
    let header = Header {
        revision: r.u64().map_err(cut)? as i64,
        compact_revision: r.u64().map_err(cut)? as i64,
        applied_index: r.u64().map_err(cut)?,
        cluster_id: r.u64().map_err(cut)?,
        member_id: r.u64().map_err(cut)?,
    };
    let mut skip = vec![0u8; usize::try_from(header_len - HEADER_LEN).unwrap_or(0)];
    r.exact(&mut skip).map_err(cut)?;
    let mut crc = crc32fast::Hasher::new();
    let mut records = 0u64;
    let mut key = Vec::new();
    let mut value = Vec::new();
    loop {
        match r.u8().map_err(cut)? {
            TAG_END => break,
            TAG_RECORD => {}
            tag => return Err(invalid(format!("unknown record tag {tag} at byte {}", r.read - 1))),
        }
        let prefix = r.u8().map_err(cut)?;
        let keyspace = Keyspace::from_prefix(prefix)
            .ok_or_else(|| invalid(format!("unknown keyspace byte {prefix:#x}")))?;
        for part in [&mut key, &mut value] {
            let len = u64::from(r.u32().map_err(cut)?);
            if len > size.saturating_sub(r.read) {
                return Err(invalid("the file is truncated (a record runs past its end)".into()));
            }
            part.resize(usize::try_from(len).unwrap_or(0), 0);
            r.exact(part).map_err(cut)?;
        }
        crc.update(&[prefix]);
        crc.update(&key);
        crc.update(&value);
        records += 1;
        visit(keyspace, &key, &value)?;
    }
    let count = r.u64().map_err(cut)?;
    if count != records {
        return Err(invalid(format!(
            "end marker counts {count} records, the file holds {records}"
        )));
    }
    let pad = (ALIGN - r.read % ALIGN) % ALIGN;
    let mut padding = vec![0u8; usize::try_from(pad).unwrap_or(0)];
    r.exact(&mut padding).map_err(cut)?;
    if padding.iter().any(|b| *b != 0) {
        return Err(invalid("non-zero padding after the end marker".into()));
    }
    let actual: [u8; SHA_LEN] = r.sha.clone().finalize().into();
    let mut rest = Vec::new();
    r.inner.read_to_end(&mut rest).map_err(|source| Error::Io { path: path.to_owned(), source })?;
    let has_trailer = match rest.len() {
        0 if skip_hash_check => false,
        0 => {
            return Err(invalid("snapshot missing hash but --skip-hash-check=false".into()));
        }
        SHA_LEN => {
            if !skip_hash_check && rest != actual {
                return Err(Error::HashMismatch {
                    path: path.to_owned(),
                    expected: hex(&rest),
                    actual: hex(&actual),
                });
            }
            true
        }
        n => return Err(invalid(format!("{n} unexpected bytes after the end marker"))),
    };
    Ok(Summary { header, records, hash: crc.finalize(), size, has_trailer })
}

/// Lower-case hex of `bytes`.
pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path) -> std::path::PathBuf {
        let header = Header {
            revision: 7,
            compact_revision: 3,
            applied_index: 12,
            cluster_id: 1,
            member_id: 2,
        };
        let mut w = ImageWriter::new(&header);
        let mut bytes = Vec::new();
        w.record(Keyspace::Meta, b"m", b"1");
        bytes.extend(w.take());
        w.record(Keyspace::Kv, b"0123456789abcdef", b"value");
        let (last, sha) = w.finish();
        bytes.extend(last);
        bytes.extend(sha);
        let path = dir.join("snap.db");
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn an_image_reads_back_with_its_header_and_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = image(dir.path());
        let mut seen = Vec::new();
        let s = read_image(&path, false, &mut |ks, k, v| {
            seen.push((ks, k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(s.header.revision, 7);
        assert_eq!(s.header.applied_index, 12);
        assert_eq!(s.records, 2);
        assert!(s.has_trailer);
        assert_eq!(seen[1], (Keyspace::Kv, b"0123456789abcdef".to_vec(), b"value".to_vec()));
    }

    #[test]
    fn truncated_corrupted_and_trailerless_images_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = image(dir.path());
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() % 512, SHA_LEN, "etcd clients need size % 512 == 32");
        let none = &mut |_: Keyspace, _: &[u8], _: &[u8]| Ok(());
        for cut in [5, 30, bytes.len() - 40, bytes.len() - 33, bytes.len() - 1] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            assert!(read_image(&path, false, none).is_err(), "cut at {cut} accepted");
        }
        let mut flipped = bytes.clone();
        flipped[70] ^= 0x40;
        std::fs::write(&path, &flipped).unwrap();
        assert!(read_image(&path, false, none).is_err());
        // Without its trailer, the image is accepted only when the check is skipped.
        std::fs::write(&path, &bytes[..bytes.len() - SHA_LEN]).unwrap();
        assert!(read_image(&path, false, none).is_err());
        assert!(!read_image(&path, true, none).unwrap().has_trailer);
    }

    /// A fuzz case: an image of random records, then damaged (bit flips, boundary values
    /// over its length fields, cuts, insertions), with its SHA-256 trailer recomputed half
    /// of the time so the damage reaches the structure checks; or random bytes after the
    /// magic.
    fn fuzzed_image(rng: &mut crate::fuzz::Rng) -> Vec<u8> {
        if rng.one_in(8) {
            let mut out = MAGIC.to_vec();
            out.extend(rng.bytes(200));
            return out;
        }
        let header = Header {
            revision: rng.interesting() as i64,
            compact_revision: 1,
            applied_index: rng.interesting(),
            cluster_id: 1,
            member_id: 2,
        };
        let mut w = ImageWriter::new(&header);
        let mut bytes = Vec::new();
        let keyspaces = [Keyspace::Meta, Keyspace::Kv, Keyspace::Lease];
        for _ in 0..rng.below(6) {
            let ks = keyspaces[rng.below(keyspaces.len())];
            w.record(ks, &rng.bytes(12), &rng.bytes(24));
            if rng.one_in(3) {
                bytes.extend(w.take());
            }
        }
        let (last, _) = w.finish();
        bytes.extend(last);
        if !rng.one_in(5) {
            rng.mutate(&mut bytes, 3);
        }
        if rng.one_in(2) {
            let sha: [u8; SHA_LEN] = Sha256::digest(&bytes).into();
            bytes.extend_from_slice(&sha);
        }
        bytes
    }

    #[test]
    fn fuzzed_images_are_read_with_an_error_or_their_records_never_a_panic_or_hang() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.db");
        crate::fuzz::Target {
            name: "cairn image",
            seed: 0x434e_5350,
            cases: 10_000,
            min_accepted: 0.05,
            limit: std::time::Duration::from_secs(120),
        }
        .run(fuzzed_image, move |bytes| {
            std::fs::write(&path, bytes).unwrap();
            let _ = is_cairn_image(&path);
            let _ = read_image(&path, false, &mut |_, _, _| Ok(()));
            read_image(&path, true, &mut |_, _, _| Ok(())).is_ok()
        });
    }
}
