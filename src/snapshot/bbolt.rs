//! Reading snapshots saved from etcd 3.4/3.5/3.6 (`etcdctl snapshot save`): etcd's bbolt
//! database file followed by the SHA-256 of the file, read page by page (never whole) and
//! converted into Cairn's storage records.
//!
//! # The bbolt facts relied on (etcd-io/bbolt `internal/common`, little-endian fields)
//!
//! - The file is an array of pages of `page_size` bytes; page `n` starts at `n *
//!   page_size`. Every page opens with a 16-byte header: `id u64, flags u16, count u16,
//!   overflow u32`; a page with `overflow = k` spans `k + 1` pages. Flags: branch 0x01,
//!   leaf 0x02, meta 0x04, freelist 0x10.
//! - Pages 0 and 1 are meta pages; after the header: `magic u32 = 0xED0CDAED, version u32
//!   = 2, page_size u32, flags u32, root {pgid u64, sequence u64}, freelist u64, pgid u64
//!   (high-water page), txid u64, checksum u64` (FNV-1a 64 of the 56 bytes before it). The
//!   valid meta with the larger txid is current; its root is the tree of top-level
//!   buckets.
//! - A branch page holds `count` elements of `pos u32, ksize u32, pgid u64`; a leaf page
//!   `count` elements of `flags u32, pos u32, ksize u32, vsize u32`. `pos` is counted from
//!   the element's own first byte; a leaf's value follows its key. Leaf flag 0x01 marks a
//!   nested bucket, whose value is `{root pgid u64, sequence u64}`, with `root = 0`
//!   meaning an inline bucket whose page follows those 16 bytes inside the value.
//! - A snapshot stream has the SHA-256 trailer when its size modulo 512 is 32 (etcd's
//!   `hasChecksum`); the hash covers everything before it.
//!
//! # The etcd facts relied on (server/storage/schema, mvcc)
//!
//! - Bucket `key`: key = revision as 17 bytes `main u64 BE, '_', sub u64 BE`, plus `'t'`
//!   for a tombstone; value = an `mvccpb.KeyValue` protobuf (a tombstone's holds the key).
//! - Bucket `lease`: key = lease id u64 BE; value = `leasepb.Lease {ID=1, TTL=2,
//!   RemainingTTL=3}` (int64 fields).
//! - Bucket `meta`: `finishedCompactRev` and `scheduledCompactRev` hold 17-byte
//!   revisions (a scheduled compaction that never finished is completed on restore, as
//!   etcd's own restore does); `consistent_index` and `term` belong to the old raft log
//!   and are not carried over.
//! - Buckets `authUsers` and `authRoles`: key = name; value = an `authpb.User` /
//!   `authpb.Role` (bcrypt hash, roles, permissions), kept as they are. Bucket `auth`:
//!   `authEnabled` (one byte, 1 = on) and `authRevision` (u64 BE).
//! - Members, alarms and the cluster version are not carried over: a restore makes a new
//!   cluster.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::Path;

use prost::Message as _;
use sha2::{Digest, Sha256};

use super::cli::Status;
use super::{Error, Visit};
use crate::storage::Keyspace;

const MAGIC: u32 = 0xED0C_DAED;
const PAGE_HEADER: usize = 16;
const ELEMENT: usize = 16;
const FLAG_BRANCH: u16 = 0x01;
const FLAG_LEAF: u16 = 0x02;
const BUCKET_LEAF: u32 = 0x01;
/// Deeper trees than this are damaged (a cycle); bbolt trees are a handful of levels.
const MAX_DEPTH: usize = 64;

/// etcd's `leasepb.Lease`.
#[derive(Clone, PartialEq, prost::Message)]
struct LeasePb {
    #[prost(int64, tag = "1")]
    id: i64,
    #[prost(int64, tag = "2")]
    ttl: i64,
    #[prost(int64, tag = "3")]
    remaining_ttl: i64,
}

/// Receives each `(key, value, is_bucket)` of a bbolt tree in key order.
type Entries<'a> = &'a mut dyn FnMut(&[u8], &[u8], bool) -> Result<(), Error>;

/// Where a tree's root lives: a page of the file, or inline in a bucket value.
enum Root {
    Page(u64),
    Inline(Vec<u8>),
}

/// An open bbolt file.
struct Bolt<'p> {
    path: &'p Path,
    file: File,
    page_size: u64,
    /// Bytes of the database (the file without its trailer).
    len: u64,
    /// The current meta's root bucket page and high-water page.
    root: u64,
    high_water: u64,
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// FNV-1a, 64 bits (bbolt's meta checksum).
fn fnv64a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl<'p> Bolt<'p> {
    fn invalid(&self, reason: impl Into<String>) -> Error {
        Error::Invalid { path: self.path.to_owned(), reason: reason.into() }
    }

    /// Opens the file, checks its trailer (unless skipped) and picks the current meta.
    fn open(path: &'p Path, skip_hash_check: bool) -> Result<Self, Error> {
        let io = |source| Error::Io { path: path.to_owned(), source };
        let invalid =
            |reason: &str| Error::Invalid { path: path.to_owned(), reason: reason.into() };
        let file = File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let has_trailer = size % 512 == super::image::SHA_LEN as u64;
        let len = if has_trailer { size - super::image::SHA_LEN as u64 } else { size };
        if has_trailer && !skip_hash_check {
            let mut sha = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut at = 0u64;
            while at < len {
                let n = usize::try_from((len - at).min(buf.len() as u64)).unwrap_or(0);
                let chunk = buf.get_mut(..n).unwrap_or_default();
                file.read_exact_at(chunk, at).map_err(io)?;
                sha.update(&*chunk);
                at += n as u64;
            }
            let mut trailer = [0u8; 32];
            file.read_exact_at(&mut trailer, len).map_err(io)?;
            let actual: [u8; 32] = sha.finalize().into();
            if actual != trailer {
                return Err(Error::HashMismatch {
                    path: path.to_owned(),
                    expected: super::image::hex(&trailer),
                    actual: super::image::hex(&actual),
                });
            }
        } else if !has_trailer && !skip_hash_check {
            return Err(invalid(
                "not a Cairn snapshot, and not an etcd snapshot either: snapshot missing hash but --skip-hash-check=false",
            ));
        }
        let mut metas = Vec::new();
        let mut first = vec![0u8; PAGE_HEADER + 64];
        for page_size_guess in [None, Some(())] {
            let offset = match (page_size_guess, metas.first()) {
                (None, _) => 0,
                (Some(()), Some(&(_, ps, _, _, _))) => ps,
                (Some(()), None) => {
                    // Page 0 is damaged; the page size is unknown, try the usual 4 KiB.
                    4096
                }
            };
            if offset + first.len() as u64 > len {
                continue;
            }
            file.read_exact_at(&mut first, offset).map_err(io)?;
            let m = first.get(PAGE_HEADER..).unwrap_or_default();
            let ok = le_u32(m, 0) == Some(MAGIC)
                && le_u32(m, 4) == Some(2)
                && le_u64(m, 56) == Some(fnv64a(m.get(..56).unwrap_or_default()));
            if ok {
                let ps = u64::from(le_u32(m, 8).unwrap_or(0));
                let (root, hw, txid) = (
                    le_u64(m, 16).unwrap_or(0),
                    le_u64(m, 40).unwrap_or(0),
                    le_u64(m, 48).unwrap_or(0),
                );
                metas.push((txid, ps, root, hw, offset));
            }
        }
        let Some(&(_, page_size, root, high_water, _)) = metas.iter().max_by_key(|m| m.0) else {
            return Err(invalid(
                "not a Cairn snapshot, and no valid bbolt meta page (not an etcd snapshot)",
            ));
        };
        if !(512..=1 << 20).contains(&page_size) {
            return Err(invalid("bbolt page size out of range"));
        }
        Ok(Bolt { path, file, page_size, len, root, high_water })
    }

    /// Reads page `id` with its overflow pages.
    fn page(&self, id: u64) -> Result<Vec<u8>, Error> {
        let at = id.checked_mul(self.page_size).filter(|a| *a + PAGE_HEADER as u64 <= self.len);
        let at = at.ok_or_else(|| {
            self.invalid(format!("page {id} lies past the end (the file is truncated)"))
        })?;
        let io = |source| Error::Io { path: self.path.to_owned(), source };
        let mut head = [0u8; PAGE_HEADER];
        self.file.read_exact_at(&mut head, at).map_err(io)?;
        let overflow = u64::from(le_u32(&head, 12).unwrap_or(0));
        let span = (overflow + 1).saturating_mul(self.page_size);
        if at.saturating_add(span) > self.len {
            return Err(
                self.invalid(format!("page {id} runs past the end (the file is truncated)"))
            );
        }
        let mut page =
            vec![0u8; usize::try_from(span).map_err(|_| self.invalid("page too large"))?];
        self.file.read_exact_at(&mut page, at).map_err(io)?;
        Ok(page)
    }

    /// Visits every `(key, value, is_bucket)` of the tree at `root`, in key order.
    fn walk(&self, root: &Root, depth: usize, visit: Entries<'_>) -> Result<(), Error> {
        if depth > MAX_DEPTH {
            return Err(self.invalid("bbolt tree too deep (damaged)"));
        }
        let owned;
        let page: &[u8] = match root {
            Root::Page(id) => {
                owned = self.page(*id)?;
                &owned
            }
            Root::Inline(bytes) => bytes,
        };
        let bad = || self.invalid("damaged bbolt page");
        let flags = le_u16(page, 8).ok_or_else(bad)?;
        let count = usize::from(le_u16(page, 10).ok_or_else(bad)?);
        for i in 0..count {
            let e = PAGE_HEADER + i * ELEMENT;
            match flags {
                FLAG_BRANCH => {
                    let child = le_u64(page, e + 8).ok_or_else(bad)?;
                    self.walk(&Root::Page(child), depth + 1, visit)?;
                }
                FLAG_LEAF => {
                    let eflags = le_u32(page, e).ok_or_else(bad)?;
                    let pos = le_u32(page, e + 4).ok_or_else(bad)? as usize;
                    let ksize = le_u32(page, e + 8).ok_or_else(bad)? as usize;
                    let vsize = le_u32(page, e + 12).ok_or_else(bad)? as usize;
                    let k0 = e.checked_add(pos).ok_or_else(bad)?;
                    let key = page.get(k0..k0 + ksize).ok_or_else(bad)?;
                    let value = page.get(k0 + ksize..k0 + ksize + vsize).ok_or_else(bad)?;
                    visit(key, value, eflags & BUCKET_LEAF != 0)?;
                }
                other => {
                    return Err(self.invalid(format!("unexpected bbolt page flags {other:#x}")));
                }
            }
        }
        Ok(())
    }

    /// The root of a bucket from its leaf value.
    fn bucket_root(&self, value: &[u8]) -> Result<Root, Error> {
        let root = le_u64(value, 0).ok_or_else(|| self.invalid("damaged bucket header"))?;
        Ok(if root == 0 {
            Root::Inline(value.get(16..).unwrap_or_default().to_vec())
        } else {
            Root::Page(root)
        })
    }

    /// Every top-level bucket: its name and root.
    fn buckets(&self) -> Result<Vec<(Vec<u8>, Root)>, Error> {
        let mut out = Vec::new();
        let mut roots = Vec::new();
        self.walk(&Root::Page(self.root), 0, &mut |k, v, is_bucket| {
            if is_bucket {
                roots.push((k.to_vec(), v.to_vec()));
            }
            Ok(())
        })?;
        for (name, v) in roots {
            out.push((name, self.bucket_root(&v)?));
        }
        Ok(out)
    }

    fn bucket(&self, name: &[u8]) -> Result<Option<Root>, Error> {
        Ok(self.buckets()?.into_iter().find(|(n, _)| n == name).map(|(_, r)| r))
    }
}

/// Decodes etcd's 17-byte revision (`main '_' sub`), with the tombstone mark.
fn etcd_revision(key: &[u8]) -> Option<(i64, i64, bool)> {
    let main = i64::from_be_bytes(key.get(..8)?.try_into().ok()?);
    if key.get(8) != Some(&b'_') {
        return None;
    }
    let sub = i64::from_be_bytes(key.get(9..17)?.try_into().ok()?);
    let tombstone = match key.get(17..) {
        Some([]) => false,
        Some([b't']) => true,
        _ => return None,
    };
    Some((main, sub, tombstone))
}

/// Converts the etcd database into Cairn records; returns the current revision.
fn convert(bolt: &Bolt<'_>, visit: Visit<'_>) -> Result<i64, Error> {
    let mut current = 1i64;
    if let Some(root) = bolt.bucket(b"key")? {
        bolt.walk(&root, 0, &mut |k, v, _| {
            let (main, sub, tombstone) = etcd_revision(k)
                .ok_or_else(|| bolt.invalid("a key bucket entry is not an etcd revision"))?;
            let kv = cairn_proto::mvccpb::KeyValue::decode(v)
                .map_err(|e| bolt.invalid(format!("revision {main}: {e}")))?;
            let domain = if tombstone {
                crate::mvcc::KeyValue { key: kv.key, mod_revision: main, ..Default::default() }
            } else {
                crate::mvcc::KeyValue {
                    key: kv.key,
                    create_revision: kv.create_revision,
                    mod_revision: kv.mod_revision,
                    version: kv.version,
                    value: kv.value,
                    lease: kv.lease,
                }
            };
            current = current.max(main);
            let (key, value) = crate::mvcc::storage_record(main, sub, tombstone, &domain);
            visit(Keyspace::Kv, &key, &value)
        })?;
    }
    if let Some(root) = bolt.bucket(b"lease")? {
        bolt.walk(&root, 0, &mut |_, v, _| {
            let l = LeasePb::decode(v).map_err(|e| bolt.invalid(format!("lease: {e}")))?;
            let (key, value) = crate::lease::storage_record(l.id, l.ttl, l.remaining_ttl);
            visit(Keyspace::Lease, &key, &value)
        })?;
    }
    // etcd's auth buckets hold the same authpb records Cairn keeps.
    if let Some(root) = bolt.bucket(b"authUsers")? {
        bolt.walk(&root, 0, &mut |k, v, _| {
            let (key, value) = crate::auth::etcd_user_record(k, v);
            visit(Keyspace::Auth, &key, &value)
        })?;
    }
    if let Some(root) = bolt.bucket(b"authRoles")? {
        bolt.walk(&root, 0, &mut |k, v, _| {
            let (key, value) = crate::auth::etcd_role_record(k, v);
            visit(Keyspace::Auth, &key, &value)
        })?;
    }
    if let Some(root) = bolt.bucket(b"auth")? {
        bolt.walk(&root, 0, &mut |k, v, _| match crate::auth::etcd_auth_record(k, v) {
            Some((key, value)) => visit(Keyspace::Auth, &key, &value),
            None => Ok(()),
        })?;
    }
    let mut compacted = 0i64;
    if let Some(root) = bolt.bucket(b"meta")? {
        bolt.walk(&root, 0, &mut |k, v, _| {
            if k == b"finishedCompactRev" || k == b"scheduledCompactRev" {
                let (main, _, _) =
                    etcd_revision(v).ok_or_else(|| bolt.invalid("bad compact revision"))?;
                compacted = compacted.max(main);
            }
            Ok(())
        })?;
    }
    let current = current.max(compacted);
    for (k, v) in crate::mvcc::revision_records(current, compacted) {
        visit(Keyspace::Meta, &k, &v)?;
    }
    Ok(current)
}

/// Checks an etcd snapshot completely (trailer, every page of the converted buckets),
/// returning its revision.
pub(super) fn check(path: &Path, skip_hash_check: bool) -> Result<i64, Error> {
    let bolt = Bolt::open(path, skip_hash_check)?;
    convert(&bolt, &mut |_, _, _| Ok(()))
}

/// Reads an etcd snapshot as Cairn storage records.
pub(super) fn read(path: &Path, skip_hash_check: bool, visit: Visit<'_>) -> Result<(), Error> {
    let bolt = Bolt::open(path, skip_hash_check)?;
    convert(&bolt, visit).map(|_| ())
}

/// CRC-32C (Castagnoli), bitwise: what etcdutl's status hash uses.
fn crc32c_update(mut crc: u32, bytes: &[u8]) -> u32 {
    crc = !crc;
    for b in bytes {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

/// etcdutl's status of an etcd snapshot: CRC-32C over every bucket's name, keys and
/// values, the newest revision, the key count of every bucket, and the database size.
pub(super) fn status(path: &Path) -> Result<Status, Error> {
    let bolt = Bolt::open(path, true)?;
    let mut hash = 0u32;
    let mut total_key = 0u64;
    let mut revision = 0i64;
    for (name, root) in bolt.buckets()? {
        hash = crc32c_update(hash, &name);
        let is_key = name == b"key";
        bolt.walk(&root, 0, &mut |k, v, _| {
            hash = crc32c_update(hash, k);
            hash = crc32c_update(hash, v);
            total_key += 1;
            if is_key && let Some((main, _, _)) = etcd_revision(k) {
                revision = revision.max(main);
            }
            Ok(())
        })?;
    }
    Ok(Status { hash, revision, total_key, total_size: bolt.high_water * bolt.page_size })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c_update(0, b"123456789"), 0xE306_9283);
    }

    #[test]
    fn etcd_revisions_decode_with_their_tombstone_mark() {
        let mut k = 5i64.to_be_bytes().to_vec();
        k.push(b'_');
        k.extend(2i64.to_be_bytes());
        assert_eq!(etcd_revision(&k), Some((5, 2, false)));
        k.push(b't');
        assert_eq!(etcd_revision(&k), Some((5, 2, true)));
        assert_eq!(etcd_revision(&k[..10]), None);
    }
}
