//! The write-ahead log under [`LogStore`](super::LogStore): preallocated segment files of
//! CRC-framed records, one `fdatasync` per write.
//!
//! This module owns the bytes on disk: segment files, record framing and encoding, replay
//! with torn-tail repair, and the background pipeline that prepares the next segment. It
//! knows nothing of raft's rules (contiguity, compaction, conflicting suffixes): replay hands
//! each decoded [`Record`] to the caller, which owns the in-memory log and rejects records
//! that break its invariants.
//!
//! # On-disk format
//!
//! - The log lives in one directory of segment files named `{seq:016x}.wal`, so lexical order
//!   is log order. Files ending in `.tmp` are segments being prepared; open deletes them.
//! - Every segment is preallocated by writing zeros (real blocks, not a sparse `set_len`) and
//!   `fsync`ed once, so the later `fdatasync`s flush data only and never wait on a metadata
//!   update (DEPENDENCIES.md trap 2: a growing file halves the sync rate).
//! - A record is `[len u32 LE][crc32 u32 LE][type u8][payload]`, where `len` counts the type
//!   byte and the payload and the CRC-32 (IEEE) covers the same bytes. A `len` of 0 (the
//!   preallocated zeros) marks the end of the written data.
//! - Record types: `1` base (hard state, conf state, compaction point index and term; it
//!   replaces the whole log state), `2` append (optional hard state, then entries; entries
//!   starting at or below the last index replace the conflicting suffix), `3` conf state,
//!   `4` compaction (index and term of the new compaction point; the entries up to it are
//!   dropped). Messages are rust-protobuf encodings, each behind a `u32 LE` length.
//! - Every segment starts with a base record followed by append records holding every entry
//!   after its compaction point (later compaction records only drop entries from the
//!   front), so a segment is self-contained and all older segments can
//!   be deleted as soon as it is durable.
//!
//! # Durability argument
//!
//! - [`Wal::write`] writes one buffer with one positioned `write_all` and then calls
//!   `fdatasync`; it returns only after both succeed, so whatever the caller acknowledges is
//!   on disk. A crash mid-write can leave only the last write torn, at the tail of the last
//!   segment: replay cuts it (and zeroes everything after it), which loses nothing that was
//!   acknowledged because that write never returned.
//! - [`Wal::rotate`] writes the new segment's whole content into an already preallocated
//!   temporary file, `fdatasync`s it, renames it to its final name and `fsync`s the directory;
//!   only then are older segments deleted (and the directory `fsync`ed again). A crash before
//!   the rename leaves a `.tmp` file that open deletes; a crash after it leaves a complete
//!   segment, possibly beside older ones that replay reads first and the new base overrides.
//! - After any failed write, sync, rename or delete the log refuses further writes
//!   ([`Error::Failed`]): after a failed `fdatasync` the kernel may have dropped the dirty
//!   pages, so retrying could report success for data that is not on disk (PostgreSQL's
//!   "fsyncgate"). Reopening replays what the disk really holds.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use raft::prelude::{ConfState, Entry, HardState};

use super::log_store::Error;

/// The size of a segment file: large enough that rotation is rare, small enough that the
/// rewrite at rotation and the zero fill stay cheap.
pub(super) const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;

/// Bytes before a record's body: `len` and `crc`.
const HEADER_LEN: usize = 8;

/// A record body (type byte included) may not exceed what `len` can express.
const MAX_BODY_LEN: usize = u32::MAX as usize;

/// Rewritten entries are split into append records of about this size, so that one record
/// stays far below the `u32` limit however long the in-memory log grows.
const REWRITE_RECORD_TARGET: usize = 4 << 20;

/// The zero-fill buffer size used when preallocating a segment.
const FILL_CHUNK: usize = 1 << 20;

/// Bespoke (oversized) segments are rounded up to this granularity.
const SIZE_ALIGN: u64 = 4096;

const TYPE_BASE: u8 = 1;
const TYPE_APPEND: u8 = 2;
const TYPE_CONF_STATE: u8 = 3;
const TYPE_COMPACT: u8 = 4;

/// One decoded log record, handed to the replay callback in log order.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Record {
    /// Replaces the whole log state: hard state, conf state and the compaction point; no
    /// entries survive it.
    Base {
        /// The hard state as of this record.
        hard_state: HardState,
        /// The conf state as of this record.
        conf_state: ConfState,
        /// The compaction point: the last index dropped from the log.
        index: u64,
        /// The term of the entry at `index`.
        term: u64,
    },
    /// Appends entries (replacing any suffix they conflict with) and sets the hard state.
    Append {
        /// The new hard state, if this write carried one.
        hard_state: Option<HardState>,
        /// Contiguous entries; possibly empty when only the hard state changed.
        entries: Vec<Entry>,
    },
    /// Sets the conf state.
    ConfState(ConfState),
    /// Drops the entries up to `index`, which becomes the compaction point.
    Compact {
        /// The new compaction point.
        index: u64,
        /// The term of the entry at `index`.
        term: u64,
    },
}

/// Appends a base record to `buf`.
pub(super) fn encode_base(
    buf: &mut Vec<u8>,
    hard_state: &HardState,
    conf_state: &ConfState,
    index: u64,
    term: u64,
) -> Result<(), Error> {
    let start = begin_record(buf, TYPE_BASE);
    put_message(buf, hard_state)?;
    put_message(buf, conf_state)?;
    buf.extend_from_slice(&index.to_le_bytes());
    buf.extend_from_slice(&term.to_le_bytes());
    finish_record(buf, start)
}

/// Appends one append record holding `hard_state` (if any) and all of `entries` to `buf`.
pub(super) fn encode_append<'a>(
    buf: &mut Vec<u8>,
    hard_state: Option<&HardState>,
    entries: impl IntoIterator<Item = &'a Entry>,
) -> Result<(), Error> {
    let start = begin_record(buf, TYPE_APPEND);
    put_optional_hard_state(buf, hard_state)?;
    for entry in entries {
        put_message(buf, entry)?;
    }
    finish_record(buf, start)
}

/// Appends a conf state record to `buf`.
pub(super) fn encode_conf_state(buf: &mut Vec<u8>, conf_state: &ConfState) -> Result<(), Error> {
    let start = begin_record(buf, TYPE_CONF_STATE);
    put_message(buf, conf_state)?;
    finish_record(buf, start)
}

/// Appends a compaction record to `buf`.
pub(super) fn encode_compact(buf: &mut Vec<u8>, index: u64, term: u64) -> Result<(), Error> {
    let start = begin_record(buf, TYPE_COMPACT);
    buf.extend_from_slice(&index.to_le_bytes());
    buf.extend_from_slice(&term.to_le_bytes());
    finish_record(buf, start)
}

/// Encodes a complete, self-contained log state: a base record, then the entries after the
/// compaction point in append records of bounded size. This is what a new segment holds.
pub(super) fn encode_state<'a>(
    hard_state: &HardState,
    conf_state: &ConfState,
    index: u64,
    term: u64,
    entries: impl IntoIterator<Item = &'a Entry>,
) -> Result<Vec<u8>, Error> {
    let mut buf = Vec::new();
    encode_base(&mut buf, hard_state, conf_state, index, term)?;
    let mut open: Option<usize> = None;
    for entry in entries {
        let start = match open {
            Some(start) => start,
            None => {
                let start = begin_record(&mut buf, TYPE_APPEND);
                put_optional_hard_state(&mut buf, None)?;
                start
            }
        };
        put_message(&mut buf, entry)?;
        if buf.len() - start >= REWRITE_RECORD_TARGET {
            finish_record(&mut buf, start)?;
            open = None;
        } else {
            open = Some(start);
        }
    }
    if let Some(start) = open {
        finish_record(&mut buf, start)?;
    }
    Ok(buf)
}

/// Reserves the header and writes the type byte; returns the record's start offset.
fn begin_record(buf: &mut Vec<u8>, record_type: u8) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER_LEN]);
    buf.push(record_type);
    start
}

/// Fills in `len` and `crc` for the record that starts at `start` and runs to the end of
/// `buf`.
fn finish_record(buf: &mut [u8], start: usize) -> Result<(), Error> {
    let body = buf.get(start + HEADER_LEN..).unwrap_or_default();
    if body.len() > MAX_BODY_LEN {
        return Err(Error::RecordTooLarge { len: body.len() });
    }
    let len = body.len() as u32;
    let crc = crc32fast::hash(body);
    if let Some(header) = buf.get_mut(start..start + HEADER_LEN) {
        let (len_bytes, crc_bytes) = header.split_at_mut(4);
        len_bytes.copy_from_slice(&len.to_le_bytes());
        crc_bytes.copy_from_slice(&crc.to_le_bytes());
    }
    Ok(())
}

/// Writes `message` behind a `u32 LE` length.
fn put_message(buf: &mut Vec<u8>, message: &impl protobuf::Message) -> Result<(), Error> {
    let at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    message.write_to_vec(buf).map_err(|e| Error::Encode { reason: e.to_string() })?;
    let len = buf.len() - at - 4;
    let len = u32::try_from(len).map_err(|_| Error::RecordTooLarge { len })?;
    if let Some(slot) = buf.get_mut(at..at + 4) {
        slot.copy_from_slice(&len.to_le_bytes());
    }
    Ok(())
}

/// Writes a presence byte and, when present, the hard state.
fn put_optional_hard_state(buf: &mut Vec<u8>, hard_state: Option<&HardState>) -> Result<(), Error> {
    match hard_state {
        Some(hard_state) => {
            buf.push(1);
            put_message(buf, hard_state)
        }
        None => {
            buf.push(0);
            Ok(())
        }
    }
}

/// Reads a record body (type byte and payload) whose CRC has already been checked.
///
/// A body that passed its CRC but does not decode is never a torn write: it means a format
/// mismatch or a bug, so the caller reports it as corruption wherever it sits.
fn decode_body(body: &[u8]) -> Result<Record, String> {
    let mut reader = Reader { rest: body };
    let record = match reader.u8()? {
        TYPE_BASE => Record::Base {
            hard_state: reader.message()?,
            conf_state: reader.message()?,
            index: reader.u64()?,
            term: reader.u64()?,
        },
        TYPE_APPEND => {
            let hard_state = match reader.u8()? {
                0 => None,
                1 => Some(reader.message()?),
                other => return Err(format!("bad hard state flag {other}")),
            };
            let mut entries = Vec::new();
            while !reader.rest.is_empty() {
                entries.push(reader.message()?);
            }
            Record::Append { hard_state, entries }
        }
        TYPE_CONF_STATE => Record::ConfState(reader.message()?),
        TYPE_COMPACT => Record::Compact { index: reader.u64()?, term: reader.u64()? },
        other => return Err(format!("unknown record type {other}")),
    };
    if !reader.rest.is_empty() {
        return Err(format!("{} trailing bytes in record", reader.rest.len()));
    }
    Ok(record)
}

/// A bounds-checked cursor over a record body.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.rest.len() < n {
            return Err(format!(
                "record body ends early: wanted {n} bytes, {} left",
                self.rest.len()
            ));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?.first().copied().unwrap_or_default())
    }

    fn u32(&mut self) -> Result<u32, String> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes(bytes.try_into().map_err(|_| "short u32".to_owned())?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let bytes = self.take(8)?;
        Ok(u64::from_le_bytes(bytes.try_into().map_err(|_| "short u64".to_owned())?))
    }

    fn message<M: protobuf::Message>(&mut self) -> Result<M, String> {
        let len = self.u32()? as usize;
        let bytes = self.take(len)?;
        M::parse_from_bytes(bytes).map_err(|e| format!("bad protobuf message: {e}"))
    }
}

/// Reads the `u32 LE` at `at`, if the data holds four bytes there.
fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    let bytes = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

/// The framing check of one record: where its body is, or why it is unreadable.
enum Frame<'a> {
    /// A zero `len` (or only zeros left): the end of the written data.
    End,
    /// A record whose length fits and whose CRC matches.
    Valid { body: &'a [u8], next: usize },
    /// A record whose length runs past the file or whose CRC does not match.
    Bad { reason: String, len: u32 },
}

fn frame_at(data: &[u8], at: usize) -> Frame<'_> {
    let rest = data.get(at..).unwrap_or_default();
    let (Some(len), Some(crc)) = (read_u32(data, at), read_u32(data, at + 4)) else {
        // Fewer than eight bytes left: a clean end when they are padding zeros.
        return if rest.iter().all(|&b| b == 0) {
            Frame::End
        } else {
            Frame::Bad { reason: "truncated record header".to_owned(), len: 0 }
        };
    };
    if len == 0 {
        return Frame::End;
    }
    let start = at + HEADER_LEN;
    let Some(body) = start.checked_add(len as usize).and_then(|end| data.get(start..end)) else {
        return Frame::Bad {
            reason: format!("record length {len} runs past the end of the segment"),
            len,
        };
    };
    if crc32fast::hash(body) != crc {
        return Frame::Bad { reason: "record checksum mismatch".to_owned(), len };
    }
    Frame::Valid { body, next: start + body.len() }
}

/// Reads the records of one segment, handing each to `apply`, and returns the offset just
/// past the last valid record.
///
/// In the last segment a bad record is a torn tail unless a valid record follows it: one
/// append is one record written by one `write_all`, so a torn write has nothing valid after
/// it, while a bit flip in the middle of the log does.
fn scan_segment(
    path: &Path,
    data: &[u8],
    last: bool,
    apply: &mut impl FnMut(Record) -> Result<(), String>,
) -> Result<usize, Error> {
    let corrupt = |offset: usize, reason: String| Error::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason,
    };
    let mut at = 0;
    loop {
        match frame_at(data, at) {
            Frame::End => {
                if at == 0 {
                    return Err(corrupt(0, "segment holds no base record".to_owned()));
                }
                return Ok(at);
            }
            Frame::Bad { reason, len } => {
                let followed_by_valid = at
                    .checked_add(HEADER_LEN + len as usize)
                    .is_some_and(|next| matches!(frame_at(data, next), Frame::Valid { .. }));
                if !last || followed_by_valid || at == 0 {
                    return Err(corrupt(at, reason));
                }
                return Ok(at);
            }
            Frame::Valid { body, next } => {
                let record = decode_body(body).map_err(|reason| corrupt(at, reason))?;
                if at == 0 && !matches!(record, Record::Base { .. }) {
                    return Err(corrupt(0, "segment does not start with a base record".to_owned()));
                }
                apply(record).map_err(|reason| corrupt(at, reason))?;
                at = next;
            }
        }
    }
}

/// Returns the segment sequence number encoded in a file name, if it is a segment's name.
fn parse_segment_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".wal")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.wal"))
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// `fsync`s a directory, which makes file creations, renames and deletions in it durable.
fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_error(dir))
}

/// Creates `path` holding `size` bytes of real zeros and makes its size durable.
fn preallocate(path: &Path, size: u64) -> io::Result<File> {
    let mut file =
        OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
    let chunk = vec![0u8; FILL_CHUNK.min(usize::try_from(size).unwrap_or(FILL_CHUNK))];
    let mut left = size;
    while left > 0 {
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
        file.write_all(chunk.get(..n).unwrap_or_default())?;
        left -= n as u64;
    }
    // sync_all, not sync_data: the new size and block allocation are metadata, and they
    // must be durable once here so that each later fdatasync flushes data only.
    file.sync_all()?;
    Ok(file)
}

/// Writes zeros over `[from, to)` of `file`.
fn zero_range(file: &File, from: u64, to: u64) -> io::Result<()> {
    let chunk = vec![0u8; FILL_CHUNK];
    let mut at = from;
    while at < to {
        let n = usize::try_from(to - at).unwrap_or(usize::MAX).min(chunk.len());
        file.write_all_at(chunk.get(..n).unwrap_or_default(), at)?;
        at += n as u64;
    }
    Ok(())
}

/// A preallocated, zero-filled segment file not yet holding any record.
struct Prepared {
    path: PathBuf,
    file: File,
    capacity: u64,
}

/// The background thread that keeps one preallocated segment ready, so rotation only
/// writes the new segment's content instead of first zero-filling 64 MiB (etcd's
/// `filePipeline`).
struct Pipeline {
    /// Dropped first on shutdown, which makes the thread's pending `send` fail.
    ready: Option<Receiver<Result<Prepared, Error>>>,
    thread: Option<JoinHandle<()>>,
}

impl Pipeline {
    fn spawn(dir: &Path, size: u64) -> Result<Pipeline, Error> {
        // A rendezvous channel: the thread prepares exactly one file ahead and waits.
        let (tx, rx) = mpsc::sync_channel(0);
        let dir = dir.to_path_buf();
        let thread_dir = dir.clone();
        let thread = std::thread::Builder::new()
            .name("cairn-wal-pipeline".to_owned())
            .spawn(move || prepare_loop(&thread_dir, size, &tx))
            .map_err(|source| Error::Io { path: dir.clone(), source })?;
        Ok(Pipeline { ready: Some(rx), thread: Some(thread) })
    }

    /// Takes the prepared segment, waiting if the thread is still filling it.
    fn take(&mut self, dir: &Path) -> Result<Prepared, Error> {
        let gone = || Error::Io {
            path: dir.to_path_buf(),
            source: io::Error::other("the segment pipeline thread has stopped"),
        };
        self.ready.as_ref().ok_or_else(gone)?.recv().map_err(|_| gone())?
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // Closing the channel wakes the thread; joining it guarantees that its temporary file
        // is gone before a new `Wal` opens the same directory and starts its own pipeline.
        self.ready = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The pipeline thread's body. Files alternate between two names because the previous file
/// may still be being written under its temporary name when the next one is prepared.
fn prepare_loop(dir: &Path, size: u64, tx: &SyncSender<Result<Prepared, Error>>) {
    for n in (0..2u8).cycle() {
        let path = dir.join(format!("pipeline-{n}.tmp"));
        let prepared = preallocate(&path, size)
            .map(|file| Prepared { path: path.clone(), file, capacity: size })
            .map_err(|source| Error::Io { path: path.clone(), source });
        let failed = prepared.is_err();
        if let Err(mpsc::SendError(unsent)) = tx.send(prepared) {
            if let Ok(unsent) = unsent {
                let _ = fs::remove_file(&unsent.path);
            }
            return;
        }
        if failed {
            return;
        }
    }
}

/// The segment currently being appended to.
struct Active {
    seq: u64,
    path: PathBuf,
    file: File,
    /// Where the next record goes: just past the last valid record.
    offset: u64,
    /// The file's length; records never extend the file.
    capacity: u64,
}

/// The open log: the active segment, the pipeline, and the failure latch.
pub(super) struct Wal {
    dir: PathBuf,
    segment_size: u64,
    active: Active,
    pipeline: Pipeline,
    failed: bool,
}

impl Wal {
    /// Opens (creating if needed) the log in `dir` and replays every record through `apply`,
    /// oldest first.
    ///
    /// A torn record at the tail of the last segment is cut and everything after it zeroed
    /// and synced, so the next append starts at a clean offset and a later replay sees no
    /// stale bytes. Segments older than the last are deleted after replay: the last one is
    /// self-contained.
    ///
    /// # Errors
    ///
    /// [`Error::Corrupt`] on a bad record anywhere but the torn tail, or when `apply` rejects a
    /// record; [`Error::Io`] when the directory or a file cannot be read or written.
    pub(super) fn open(
        dir: &Path,
        segment_size: u64,
        mut apply: impl FnMut(Record) -> Result<(), String>,
    ) -> Result<Wal, Error> {
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(io_error(dir))?;
            // The new directory's own entry must be durable too, or a crash could lose the
            // whole log along with it.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        let mut seqs = Vec::new();
        for item in fs::read_dir(dir).map_err(io_error(dir))? {
            let item = item.map_err(io_error(dir))?;
            let name = item.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".tmp") {
                // Leftover of a crash during preparation or rotation: never part of the log.
                let path = item.path();
                fs::remove_file(&path).map_err(io_error(&path))?;
            } else if let Some(seq) = parse_segment_name(&name) {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();

        let mut active = None;
        for (i, &seq) in seqs.iter().enumerate() {
            let path = segment_path(dir, seq);
            let last = i + 1 == seqs.len();
            let data = fs::read(&path).map_err(io_error(&path))?;
            let end = scan_segment(&path, &data, last, &mut apply)?;
            if last {
                active = Some(open_active(seq, path, &data, end)?);
            }
        }
        let pipeline = Pipeline::spawn(dir, segment_size)?;
        let mut wal = match active {
            Some(active) => {
                Wal { dir: dir.to_path_buf(), segment_size, active, pipeline, failed: false }
            }
            None => Wal::create(dir, segment_size, pipeline)?,
        };
        wal.delete_older_segments(&seqs)?;
        Ok(wal)
    }

    /// Starts a log in an empty directory with a first segment holding an empty base record.
    fn create(dir: &Path, segment_size: u64, mut pipeline: Pipeline) -> Result<Wal, Error> {
        let content = encode_state(&HardState::default(), &ConfState::default(), 0, 0, [])?;
        let prepared = pipeline.take(dir)?;
        let active = install(dir, 1, prepared, &content)?;
        Ok(Wal { dir: dir.to_path_buf(), segment_size, active, pipeline, failed: false })
    }

    /// Whether a write of `len` bytes fits in the active segment.
    pub(super) fn fits(&self, len: usize) -> bool {
        self.active.offset.saturating_add(len as u64) <= self.active.capacity
    }

    /// Writes `buf` (whole records) to the active segment as one write, made durable with
    /// one `fdatasync` when `sync`. Without it the records ride on the next synced write:
    /// for records whose loss a crash may cause without harm (the commit index, which raft
    /// re-learns; a compaction point). The caller checks [`Wal::fits`] first.
    ///
    /// # Errors
    ///
    /// [`Error::Failed`] after an earlier failure; [`Error::Io`] when the write or the sync
    /// fails, after which the log is failed too.
    pub(super) fn write(&mut self, buf: &[u8], sync: bool) -> Result<(), Error> {
        self.check_failed()?;
        if !self.fits(buf.len()) {
            return Err(Error::Io {
                path: self.active.path.clone(),
                source: io::Error::other("record does not fit in the active segment"),
            });
        }
        let result = self
            .active
            .file
            .write_all_at(buf, self.active.offset)
            .and_then(|()| if sync { fdatasync(&self.active.file) } else { Ok(()) })
            .map_err(io_error(&self.active.path));
        if result.is_err() {
            self.failed = true;
        }
        result?;
        self.active.offset += buf.len() as u64;
        if let Some(m) = crate::metrics::get() {
            m.disk.wal_write_bytes_total.add(i64::try_from(buf.len()).unwrap_or(i64::MAX));
        }
        Ok(())
    }

    /// Starts a new segment whose content is `content` (a full state from [`encode_state`]),
    /// makes it durable, and deletes the previous segment.
    ///
    /// The new segment comes from the pipeline when the content leaves at least half of it
    /// free; otherwise one of twice the content's size is created inline, so that appends
    /// between rotations stay at least as large as the rewrite and its cost stays amortised.
    ///
    /// # Errors
    ///
    /// [`Error::Failed`] after an earlier failure; [`Error::Io`] on any file system failure,
    /// after which the log is failed: the caller cannot know which segment replay will
    /// use, so it must reopen.
    pub(super) fn rotate(&mut self, content: &[u8]) -> Result<(), Error> {
        self.check_failed()?;
        let result = self.rotate_inner(content);
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn rotate_inner(&mut self, content: &[u8]) -> Result<(), Error> {
        let seq = self.active.seq + 1;
        let len = content.len() as u64;
        let prepared = if len.saturating_mul(2) <= self.segment_size {
            self.pipeline.take(&self.dir)?
        } else {
            let capacity = len.saturating_mul(2).div_ceil(SIZE_ALIGN).saturating_mul(SIZE_ALIGN);
            let path = self.dir.join(format!("{seq:016x}.wal.tmp"));
            let file = preallocate(&path, capacity).map_err(io_error(&path))?;
            Prepared { path, file, capacity }
        };
        let previous =
            std::mem::replace(&mut self.active, install(&self.dir, seq, prepared, content)?);
        let Active { path, file, .. } = previous;
        drop(file);
        fs::remove_file(&path).map_err(io_error(&path))?;
        sync_dir(&self.dir)
    }

    /// Deletes every segment older than the active one; each is superseded by its base.
    fn delete_older_segments(&mut self, seqs: &[u64]) -> Result<(), Error> {
        let mut deleted = false;
        for &seq in seqs.iter().filter(|&&seq| seq < self.active.seq) {
            let path = segment_path(&self.dir, seq);
            fs::remove_file(&path).map_err(io_error(&path))?;
            deleted = true;
        }
        if deleted {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    fn check_failed(&self) -> Result<(), Error> {
        if self.failed { Err(Error::Failed) } else { Ok(()) }
    }

    /// The active segment's sequence number (for tests and diagnostics).
    #[cfg(test)]
    pub(super) fn active_seq(&self) -> u64 {
        self.active.seq
    }
}

/// `fdatasync`s `file`, timing the call for `etcd_disk_wal_fsync_duration_seconds` (every
/// durable point of the log goes through here: appends, rotations, torn-tail repair).
fn fdatasync(file: &File) -> io::Result<()> {
    let start = std::time::Instant::now();
    let result = file.sync_data();
    if let Some(m) = crate::metrics::get() {
        m.disk.wal_fsync_duration_seconds.observe(start.elapsed().as_secs_f64());
    }
    result
}

/// Writes `content` at the start of a prepared file, syncs it, and gives it its final name.
fn install(dir: &Path, seq: u64, prepared: Prepared, content: &[u8]) -> Result<Active, Error> {
    let Prepared { path: tmp, file, capacity } = prepared;
    if content.len() as u64 > capacity {
        let _ = fs::remove_file(&tmp);
        return Err(Error::Io {
            path: tmp,
            source: io::Error::other("segment content exceeds the prepared segment"),
        });
    }
    file.write_all_at(content, 0).map_err(io_error(&tmp))?;
    fdatasync(&file).map_err(io_error(&tmp))?;
    let path = segment_path(dir, seq);
    // The rename publishes a fully synced segment: replay never sees a half-written one.
    fs::rename(&tmp, &path).map_err(io_error(&tmp))?;
    sync_dir(dir)?;
    Ok(Active { seq, path, file, offset: content.len() as u64, capacity })
}

/// Opens the last segment for appending at the end of its valid data, first zeroing
/// whatever follows it (a torn record, or pages of one that reached the disk out of order).
fn open_active(seq: u64, path: PathBuf, data: &[u8], end: usize) -> Result<Active, Error> {
    let file = OpenOptions::new().read(true).write(true).open(&path).map_err(io_error(&path))?;
    let tail = data.get(end..).unwrap_or_default();
    if let Some(last_nonzero) = tail.iter().rposition(|&b| b != 0) {
        // Zeroing, not truncating: the segment keeps its preallocated blocks, and a zero
        // `len` at `end` is exactly the end-of-data mark replay looks for.
        let to = (end + last_nonzero + 1) as u64;
        zero_range(&file, end as u64, to).map_err(io_error(&path))?;
        fdatasync(&file).map_err(io_error(&path))?;
    }
    Ok(Active { seq, path, file, offset: end as u64, capacity: data.len() as u64 })
}

#[cfg(test)]
mod tests {
    use std::fs;

    use raft::prelude::{ConfState, Entry, HardState};

    use super::{
        Frame, HEADER_LEN, Record, Wal, decode_body, encode_append, encode_base, encode_compact,
        encode_conf_state, encode_state, frame_at,
    };

    fn entry(index: u64, len: usize) -> Entry {
        Entry { index, term: 7, data: vec![index as u8; len].into(), ..Entry::default() }
    }

    /// Splits a buffer of records into decoded records.
    fn decode_all(buf: &[u8]) -> Vec<Record> {
        let mut at = 0;
        let mut records = Vec::new();
        loop {
            match frame_at(buf, at) {
                Frame::End => return records,
                Frame::Valid { body, next } => {
                    records.push(decode_body(body).unwrap());
                    at = next;
                }
                Frame::Bad { reason, .. } => panic!("bad record at {at}: {reason}"),
            }
        }
    }

    #[test]
    fn records_round_trip_through_their_encoding() {
        let hard_state = HardState { term: 3, vote: 2, commit: 9, ..HardState::default() };
        let conf_state = ConfState::from((vec![1, 2], vec![3]));
        let entries = vec![entry(10, 5), entry(11, 0)];

        let mut buf = Vec::new();
        encode_base(&mut buf, &hard_state, &conf_state, 9, 2).unwrap();
        encode_append(&mut buf, Some(&hard_state), &entries).unwrap();
        encode_append(&mut buf, None, &entries[..1]).unwrap();
        encode_append(&mut buf, None, []).unwrap();
        encode_conf_state(&mut buf, &conf_state).unwrap();
        encode_compact(&mut buf, 10, 2).unwrap();

        assert_eq!(
            decode_all(&buf),
            vec![
                Record::Base {
                    hard_state: hard_state.clone(),
                    conf_state: conf_state.clone(),
                    index: 9,
                    term: 2
                },
                Record::Append { hard_state: Some(hard_state), entries: entries.clone() },
                Record::Append { hard_state: None, entries: entries[..1].to_vec() },
                Record::Append { hard_state: None, entries: vec![] },
                Record::ConfState(conf_state),
                Record::Compact { index: 10, term: 2 },
            ]
        );
    }

    #[test]
    fn a_rewritten_state_splits_large_logs_into_bounded_records() {
        let entries: Vec<Entry> = (1..=5).map(|i| entry(i, 1 << 20)).collect();
        let buf =
            encode_state(&HardState::default(), &ConfState::default(), 0, 0, &entries).unwrap();
        let records = decode_all(&buf);
        assert_eq!(records.len(), 3, "a base and two append records");
        let decoded: Vec<Entry> = records
            .into_iter()
            .flat_map(|record| match record {
                Record::Append { entries, .. } => entries,
                _ => vec![],
            })
            .collect();
        assert_eq!(decoded, entries);
    }

    #[test]
    fn framing_detects_bad_lengths_and_checksums() {
        let mut buf = Vec::new();
        encode_conf_state(&mut buf, &ConfState::from((vec![1], vec![]))).unwrap();
        let len = buf.len();
        buf.extend_from_slice(&[0; 16]);
        assert!(matches!(frame_at(&buf, 0), Frame::Valid { next, .. } if next == len));
        assert!(matches!(frame_at(&buf, len), Frame::End));

        let mut flipped = buf.clone();
        flipped[HEADER_LEN + 2] ^= 1;
        assert!(matches!(frame_at(&flipped, 0), Frame::Bad { .. }));
        assert!(matches!(frame_at(&buf[..len - 1], 0), Frame::Bad { .. }));
        assert!(matches!(frame_at(&buf[..3], 0), Frame::Bad { .. }));
        assert!(matches!(frame_at(&[0, 0, 0], 0), Frame::End));
    }

    #[test]
    fn open_deletes_leftover_temporary_files_and_drop_stops_the_pipeline() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("0000000000000009.wal.tmp"), b"half a rotation").unwrap();
        let wal = Wal::open(dir.path(), 8192, |_| Ok(())).unwrap();
        assert_eq!(wal.active_seq(), 1);
        assert!(!dir.path().join("0000000000000009.wal.tmp").exists());
        drop(wal);
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|item| item.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["0000000000000001.wal".to_owned()]);
    }

    #[test]
    fn a_segment_without_a_base_record_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let mut buf = Vec::new();
        encode_append(&mut buf, None, &[entry(1, 3)]).unwrap();
        buf.resize(4096, 0);
        fs::write(dir.path().join("0000000000000001.wal"), &buf).unwrap();
        let error = Wal::open(dir.path(), 8192, |_| Ok(())).err().unwrap();
        assert!(matches!(error, super::Error::Corrupt { offset: 0, .. }), "{error:?}");
    }

    /// A segment as the writers make it: a base record, then appends (mostly contiguous
    /// entries, sometimes with a hard state) and conf state records, each body kept apart
    /// so a case can damage a body and still frame it with a valid CRC.
    fn segment_bodies(rng: &mut crate::fuzz::Rng) -> Vec<Vec<u8>> {
        let body = |framed: Vec<u8>| framed[HEADER_LEN..].to_vec();
        // A commit index at or below `last`, as raft writes it.
        let hard_state = |rng: &mut crate::fuzz::Rng, last: u64| HardState {
            term: 1 + rng.below(4) as u64,
            vote: rng.below(4) as u64,
            commit: rng.below(last as usize + 1) as u64,
            ..HardState::default()
        };
        let conf_state = |rng: &mut crate::fuzz::Rng| {
            ConfState::from(((1..=1 + rng.below(3) as u64).collect::<Vec<_>>(), vec![]))
        };
        let mut bodies = Vec::new();
        let mut buf = Vec::new();
        let base_index = rng.below(8) as u64;
        let (hs, cs) = (hard_state(rng, base_index), conf_state(rng));
        encode_base(&mut buf, &hs, &cs, base_index, rng.below(3) as u64).unwrap();
        bodies.push(body(std::mem::take(&mut buf)));
        let mut next = base_index + 1;
        for _ in 0..rng.below(6) {
            if rng.one_in(5) {
                encode_conf_state(&mut buf, &conf_state(rng)).unwrap();
            } else {
                // Mostly the next index; sometimes a rewrite of the suffix or a gap.
                let first = match rng.below(12) {
                    0 => next.saturating_sub(rng.below(3) as u64 + 1).max(base_index + 1),
                    1 => next + rng.below(3) as u64 + 1,
                    _ => next,
                };
                let entries: Vec<Entry> = (first..first + rng.below(4) as u64)
                    .map(|i| Entry {
                        index: i,
                        term: 1 + rng.below(3) as u64,
                        ..entry(i, rng.below(12))
                    })
                    .collect();
                next = first + entries.len() as u64;
                let hs = (rng.one_in(2)).then(|| hard_state(rng, next - 1));
                encode_append(&mut buf, hs.as_ref(), &entries).unwrap();
            }
            bodies.push(body(std::mem::take(&mut buf)));
        }
        bodies
    }

    /// Frames `bodies` as records (length and CRC), then pads with zeros as a preallocated
    /// segment is.
    fn frame(bodies: &[Vec<u8>], pad: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for b in bodies {
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(&crc32fast::hash(b).to_le_bytes());
            out.extend_from_slice(b);
        }
        out.resize(out.len() + pad, 0);
        out
    }

    /// A fuzz case: a valid segment, a segment with damaged bodies under valid CRCs (so the
    /// body decoder and the log's invariants see them), damaged framing, or random bytes.
    fn fuzzed_segment(rng: &mut crate::fuzz::Rng) -> Vec<u8> {
        let mut bodies = segment_bodies(rng);
        match rng.below(4) {
            0 => frame(&bodies, rng.below(64)),
            1 => {
                for _ in 0..1 + rng.below(2) {
                    let i = rng.below(bodies.len());
                    rng.mutate(&mut bodies[i], 3);
                }
                frame(&bodies, rng.below(64))
            }
            2 => {
                let mut data = frame(&bodies, rng.below(64));
                rng.mutate(&mut data, 4);
                data
            }
            _ => rng.bytes(256),
        }
    }

    #[test]
    fn fuzzed_segments_and_record_bodies_never_panic_or_hang() {
        crate::fuzz::Target {
            name: "wal segment",
            seed: 0x5741_4c31,
            cases: 20_000,
            min_accepted: 0.2,
            limit: std::time::Duration::from_secs(120),
        }
        .run(fuzzed_segment, |data| {
            let path = std::path::Path::new("fuzz.wal");
            let _ = super::scan_segment(path, data, false, &mut |_| Ok(()));
            let _ = decode_body(data);
            let _ = decode_body(data.get(HEADER_LEN..).unwrap_or_default());
            super::scan_segment(path, data, true, &mut |_| Ok(())).is_ok()
        });
    }

    #[test]
    fn fuzzed_log_directories_open_with_an_error_or_a_log_raft_accepts() {
        use raft::Storage as _;
        crate::fuzz::Target {
            name: "raft log open",
            seed: 0x4c4f_4731,
            cases: 1_500,
            min_accepted: 0.2,
            limit: std::time::Duration::from_secs(240),
        }
        .run(fuzzed_segment, |data| {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join("0000000000000001.wal"), data).unwrap();
            let Ok(store) = super::super::LogStore::open_with_segment_size(dir.path(), 8192) else {
                return false;
            };
            // What raft-rs reads at start must be consistent, or RawNode::new panics.
            let state = store.initial_state().unwrap();
            let first = raft::Storage::first_index(&store).unwrap();
            let last = raft::Storage::last_index(&store).unwrap();
            let _ = store.term(last);
            let _ = store.entries(first, last + 1, None, raft::GetEntriesContext::empty(false));
            let config = raft::Config { id: 1, ..raft::Config::default() };
            let logger = slog::Logger::root(slog::Discard, slog::o!());
            // raft::start raises a commit index below the compaction point (a lagging
            // commit record) to the applied index first; do the same.
            if state.hard_state.commit < first - 1 {
                store.set_commit(first - 1).unwrap();
            }
            raft::RawNode::new(&config, store.clone(), &logger).is_ok()
        });
    }

    /// Crashers the fuzz tests above found, kept: each made raft-rs panic in
    /// `RawNode::new` before the log refused it on open.
    const LOG_CRASHERS: &[(&str, &str)] = &[
        (
            "a hard state committing past the last entry (raft: hs.commit is out of range)",
            "21000000dcf2d39b01060000000801100218160200000008010500000000000000020000000000000016000000129fcf2f0201040000001003180d080000001003180622020606",
        ),
        (
            "a conf state with voter id 0 (raft: invalid restore)",
            "230000006029beb5010600000008021001182704000000080108000400000000000000020000000000000026000000750d1bcb0201060000000804100218030a0000001003180522040505050508000000100218062202060600000000000000000000",
        ),
    ];

    #[test]
    fn logs_raft_would_panic_on_are_refused_on_open_as_corrupt() {
        for (what, bytes) in LOG_CRASHERS {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join("0000000000000001.wal"), crate::fuzz::unhex(bytes)).unwrap();
            let error = super::super::LogStore::open_with_segment_size(dir.path(), 8192).err();
            assert!(matches!(error, Some(super::Error::Corrupt { .. })), "{what}: {error:?}");
        }
    }
}
