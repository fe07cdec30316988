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

use std::collections::HashSet;

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
        let at = id
            .checked_mul(self.page_size)
            .filter(|a| a.checked_add(PAGE_HEADER as u64).is_some_and(|end| end <= self.len));
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
        self.walk_once(root, depth, visit, &mut HashSet::new())
    }

    /// [`Bolt::walk`], reading each page at most once: in a B+tree every page has one
    /// parent, and a damaged file whose branch pages point back at each other many times
    /// would otherwise take exponential time within the depth limit (found by fuzzing).
    fn walk_once(
        &self,
        root: &Root,
        depth: usize,
        visit: Entries<'_>,
        seen: &mut HashSet<u64>,
    ) -> Result<(), Error> {
        if depth > MAX_DEPTH {
            return Err(self.invalid("bbolt tree too deep (damaged)"));
        }
        let owned;
        let page: &[u8] = match root {
            Root::Page(id) => {
                if !seen.insert(*id) {
                    return Err(self.invalid(format!("bbolt page {id} is reached twice (damaged)")));
                }
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
                    self.walk_once(&Root::Page(child), depth + 1, visit, seen)?;
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
    let total_size = bolt
        .high_water
        .checked_mul(bolt.page_size)
        .ok_or_else(|| bolt.invalid("bbolt high-water page out of range"))?;
    Ok(Status { hash, revision, total_key, total_size })
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

    const PAGE: usize = 4096;

    /// A bbolt leaf page (or an inline bucket's page) holding `items` in order.
    fn leaf(id: u64, items: &[(Vec<u8>, Vec<u8>, bool)]) -> Vec<u8> {
        let mut page = vec![0u8; PAGE_HEADER + items.len() * ELEMENT];
        page[..8].copy_from_slice(&id.to_le_bytes());
        page[8..10].copy_from_slice(&FLAG_LEAF.to_le_bytes());
        page[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
        for (i, (k, v, bucket)) in items.iter().enumerate() {
            let e = PAGE_HEADER + i * ELEMENT;
            let pos = (page.len() - e) as u32;
            page[e..e + 4].copy_from_slice(&u32::from(*bucket).to_le_bytes());
            page[e + 4..e + 8].copy_from_slice(&pos.to_le_bytes());
            page[e + 8..e + 12].copy_from_slice(&(k.len() as u32).to_le_bytes());
            page[e + 12..e + 16].copy_from_slice(&(v.len() as u32).to_le_bytes());
            page.extend_from_slice(k);
            page.extend_from_slice(v);
        }
        page
    }

    /// A bucket's value: its header, and its tree inline (root 0) or on page `root`.
    fn bucket(root: u64, inline: Option<Vec<u8>>) -> Vec<u8> {
        let mut v = root.to_le_bytes().to_vec();
        v.extend_from_slice(&0u64.to_le_bytes());
        v.extend(inline.unwrap_or_default());
        v
    }

    /// Makes the meta pages' checksums valid again (after a mutation).
    fn seal_metas(db: &mut [u8]) {
        for at in [0, PAGE] {
            if let Some(m) = db.get_mut(at + PAGE_HEADER..at + PAGE_HEADER + 64) {
                let sum = fnv64a(&m[..56]);
                m[56..64].copy_from_slice(&sum.to_le_bytes());
            }
        }
    }

    /// A small etcd database: two metas, the root bucket on page 3, the `key` bucket on
    /// page 4, the `lease` and `meta` buckets inline.
    fn etcd_db(rng: &mut crate::fuzz::Rng) -> Vec<u8> {
        let mut db = vec![0u8; 5 * PAGE];
        for (at, txid) in [(0, 1u64), (PAGE, 2)] {
            db[at + 8..at + 10].copy_from_slice(&0x04u16.to_le_bytes());
            let m = &mut db[at + PAGE_HEADER..at + PAGE_HEADER + 64];
            m[0..4].copy_from_slice(&MAGIC.to_le_bytes());
            m[4..8].copy_from_slice(&2u32.to_le_bytes());
            m[8..12].copy_from_slice(&(PAGE as u32).to_le_bytes());
            m[16..24].copy_from_slice(&3u64.to_le_bytes());
            m[32..40].copy_from_slice(&2u64.to_le_bytes());
            m[40..48].copy_from_slice(&5u64.to_le_bytes());
            m[48..56].copy_from_slice(&txid.to_le_bytes());
        }
        seal_metas(&mut db);
        let mut revisions = Vec::new();
        for main in 2..3 + rng.below(6) as i64 {
            let mut k = main.to_be_bytes().to_vec();
            k.push(b'_');
            k.extend(0i64.to_be_bytes());
            let kv = cairn_proto::mvccpb::KeyValue {
                key: format!("k{}", rng.below(3)).into_bytes(),
                create_revision: 2,
                mod_revision: main,
                version: 1,
                value: rng.bytes(8),
                lease: 0,
            };
            revisions.push((k, kv.encode_to_vec(), false));
        }
        let lease = LeasePb { id: 7, ttl: 30, remaining_ttl: 10 }.encode_to_vec();
        let mut compact = 2i64.to_be_bytes().to_vec();
        compact.push(b'_');
        compact.extend(0i64.to_be_bytes());
        let root = leaf(
            3,
            &[
                (b"key".to_vec(), bucket(4, None), true),
                (
                    b"lease".to_vec(),
                    bucket(0, Some(leaf(0, &[(7i64.to_be_bytes().to_vec(), lease, false)]))),
                    true,
                ),
                (
                    b"meta".to_vec(),
                    bucket(0, Some(leaf(0, &[(b"finishedCompactRev".to_vec(), compact, false)]))),
                    true,
                ),
            ],
        );
        db[3 * PAGE..3 * PAGE + root.len()].copy_from_slice(&root);
        let keys = leaf(4, &revisions);
        db[4 * PAGE..4 * PAGE + keys.len()].copy_from_slice(&keys);
        db
    }

    /// A fuzz case: the database damaged in its pages (metas resealed, so the damage gets
    /// past them), in its metas, or random bytes; sometimes with a valid SHA-256 trailer.
    fn fuzzed_db(rng: &mut crate::fuzz::Rng) -> Vec<u8> {
        let mut db = etcd_db(rng);
        match rng.below(5) {
            0 => {}
            1 | 2 => {
                // Damage inside the tree pages, where a random flip would land rarely.
                for _ in 0..1 + rng.below(4) {
                    let at = 3 * PAGE + rng.below(64) + if rng.one_in(2) { 0 } else { PAGE };
                    let mut piece = db[at..at + 8].to_vec();
                    rng.mutate(&mut piece, 2);
                    piece.resize(8, 0);
                    db[at..at + 8].copy_from_slice(&piece);
                }
            }
            3 => {
                let mut meta = db[PAGE_HEADER..PAGE_HEADER + 56].to_vec();
                rng.mutate(&mut meta, 2);
                meta.resize(56, 0);
                db[PAGE_HEADER..PAGE_HEADER + 56].copy_from_slice(&meta);
                if rng.one_in(2) {
                    db[PAGE + PAGE_HEADER..PAGE + PAGE_HEADER + 56].copy_from_slice(&meta);
                }
                seal_metas(&mut db);
            }
            _ => rng.mutate(&mut db, 4),
        }
        if rng.one_in(3) {
            seal_metas(&mut db);
        }
        if rng.one_in(2) {
            db.resize(db.len().div_ceil(512) * 512, 0);
            let sha: [u8; 32] = Sha256::digest(&db).into();
            db.extend_from_slice(&sha);
        }
        db
    }

    #[test]
    fn the_test_database_converts_to_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etcd.db");
        let mut rng = crate::fuzz::Rng::new(1);
        std::fs::write(&path, etcd_db(&mut rng)).unwrap();
        let mut seen = Vec::new();
        read(&path, true, &mut |ks, _, _| {
            seen.push(ks);
            Ok(())
        })
        .unwrap();
        assert!(seen.contains(&Keyspace::Kv) && seen.contains(&Keyspace::Lease), "{seen:?}");
        let status = status(&path).unwrap();
        assert_eq!(status.total_key, seen.len() as u64 - 1, "{status:?} {seen:?}");
    }

    #[test]
    fn a_branch_page_pointing_back_at_itself_is_refused_at_once() {
        // The root is a branch page whose 255 children are all itself: without the
        // once-per-page rule, 255^64 page visits fit within the depth limit.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etcd.db");
        let mut db = etcd_db(&mut crate::fuzz::Rng::new(2));
        let root = &mut db[3 * PAGE..4 * PAGE];
        root.fill(0);
        root[8..10].copy_from_slice(&FLAG_BRANCH.to_le_bytes());
        root[10..12].copy_from_slice(&255u16.to_le_bytes());
        for i in 0..255 {
            let e = PAGE_HEADER + i * ELEMENT;
            root[e + 8..e + 16].copy_from_slice(&3u64.to_le_bytes());
        }
        std::fs::write(&path, &db).unwrap();
        let error = check(&path, true).unwrap_err();
        assert!(error.to_string().contains("reached twice"), "{error}");
        assert!(status(&path).is_err());
    }

    #[test]
    fn a_meta_with_a_huge_high_water_page_or_page_id_is_an_error_not_an_overflow() {
        // Kept crasher (fuzz case 7 of seed 0x42424f4c, reduced): `status` multiplied the
        // meta's high-water page by the page size and overflowed.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etcd.db");
        let mut db = etcd_db(&mut crate::fuzz::Rng::new(2));
        for at in [0, PAGE] {
            db[at + PAGE_HEADER + 40..at + PAGE_HEADER + 48]
                .copy_from_slice(&u64::MAX.to_le_bytes());
        }
        seal_metas(&mut db);
        std::fs::write(&path, &db).unwrap();
        assert!(status(&path).unwrap_err().to_string().contains("high-water"));
        // A root page id whose offset overflows is past the end, not a panic.
        for at in [0, PAGE] {
            db[at + PAGE_HEADER + 16..at + PAGE_HEADER + 24]
                .copy_from_slice(&(u64::MAX / 4096).to_le_bytes());
        }
        seal_metas(&mut db);
        std::fs::write(&path, &db).unwrap();
        assert!(check(&path, true).unwrap_err().to_string().contains("past the end"));
    }

    #[test]
    fn fuzzed_etcd_databases_are_read_with_an_error_or_records_never_a_panic_or_hang() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etcd.db");
        crate::fuzz::Target {
            name: "bbolt",
            seed: 0x4242_4f4c,
            cases: 5_000,
            min_accepted: 0.1,
            limit: std::time::Duration::from_secs(120),
        }
        .run(fuzzed_db, move |db| {
            std::fs::write(&path, db).unwrap();
            let _ = check(&path, false);
            let _ = read(&path, false, &mut |_, _, _| Ok(()));
            let _ = status(&path);
            let _ = check(&path, true);
            read(&path, true, &mut |_, _, _| Ok(())).is_ok()
        });
    }
}
