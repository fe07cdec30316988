//! The data directory: its layout, the marker that says Cairn made it, and the identity it
//! remembers so a member restarts from its data dir alone.
//!
//! Layout: `<data-dir>/cairn.meta` (marker and identity, written last at creation and
//! fsynced), `<data-dir>/raft/` (the raft log), `<data-dir>/state/` (the state machine).

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The marker file's name.
const MARKER: &str = "cairn.meta";
/// The marker's first line; a future layout change bumps the version.
const MAGIC: &str = "cairn-data-dir v1";

/// Errors while preparing the data directory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The directory holds files but no Cairn marker (an etcd data dir, say).
    #[error(
        "data dir {path} was not created by Cairn (it holds {found:?} but no {MARKER}); refusing to use it"
    )]
    Foreign {
        /// The data dir.
        path: PathBuf,
        /// Some of what it holds.
        found: Vec<String>,
    },
    /// The marker exists but cannot be understood.
    #[error("data dir marker {path} is malformed: {reason}")]
    BadMarker {
        /// The marker file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A filesystem operation failed.
    #[error("data dir I/O on {path}: {source}")]
    Io {
        /// The path touched.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Identity recorded in the data dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// This member's id.
    pub member_id: u64,
    /// The cluster's id.
    pub cluster_id: u64,
}

/// An opened data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_owned(), source }
}

impl DataDir {
    /// Checks `root` without writing: returns the recorded identity if Cairn made it, `None`
    /// if it is missing or empty, and an error if it belongs to something else.
    ///
    /// # Errors
    /// [`Error::Foreign`], [`Error::BadMarker`] or [`Error::Io`].
    pub fn inspect(root: &Path) -> Result<Option<Identity>, Error> {
        let marker = root.join(MARKER);
        match fs::read_to_string(&marker) {
            Ok(text) => return parse_marker(&marker, &text).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&marker)(e)),
        }
        match fs::read_dir(root) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(root)(e)),
            Ok(entries) => {
                let found: Vec<String> = entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .take(5)
                    .collect();
                if found.is_empty() {
                    Ok(None)
                } else {
                    Err(Error::Foreign { path: root.to_owned(), found })
                }
            }
        }
    }

    /// Opens `root`, creating it with `identity` when new. Call [`DataDir::inspect`] first.
    ///
    /// # Errors
    /// [`Error::Io`] when the directory or marker cannot be written.
    pub fn create_or_open(root: &Path, identity: Identity) -> Result<DataDir, Error> {
        let marker = root.join(MARKER);
        if !marker.exists() {
            fs::create_dir_all(root).map_err(io(root))?;
            let tmp = root.join(format!("{MARKER}.tmp"));
            let text = format!(
                "{MAGIC}\nmember_id={:016x}\ncluster_id={:016x}\n",
                identity.member_id, identity.cluster_id
            );
            let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(text.as_bytes()).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
            fs::rename(&tmp, &marker).map_err(io(&marker))?;
            fs::File::open(root).and_then(|d| d.sync_all()).map_err(io(root))?;
        }
        Ok(DataDir { root: root.to_owned() })
    }

    /// The raft log directory.
    pub fn raft_dir(&self) -> PathBuf {
        self.root.join("raft")
    }

    /// The state machine directory.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }
}

/// Builds a new data dir at `root` for a member restored from a snapshot: `fill` writes
/// the state machine into the fresh engine, which is then synced, and only when all of it
/// succeeded does the directory appear at `root` (it is built under a temporary name and
/// renamed), so a failed restore leaves nothing behind.
///
/// # Errors
/// The outer error: [`Error::Foreign`] when `root` exists and is not empty, or
/// [`Error::Io`]; the inner one is `fill`'s own.
pub fn create_restored<E>(
    root: &Path,
    identity: Identity,
    fill: impl FnOnce(&dyn crate::storage::Engine) -> Result<(), E>,
) -> Result<Result<(), E>, Error> {
    if let Ok(mut entries) = fs::read_dir(root)
        && let Some(first) = entries.next()
    {
        let found = first.map(|e| e.file_name().to_string_lossy().into_owned()).unwrap_or_default();
        return Err(Error::Foreign { path: root.to_owned(), found: vec![found] });
    }
    let name = root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = root.with_file_name(format!(".{name}.restoring"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    let dir = DataDir::create_or_open(&tmp, identity)?;
    let filled = {
        let engine = crate::storage::SledEngine::open(&dir.state_dir())
            .map_err(|e| Error::Io { path: dir.state_dir(), source: std::io::Error::other(e) })?;
        match fill(&engine) {
            Ok(()) => crate::storage::Engine::sync(&engine)
                .map_err(|e| Error::Io { path: dir.state_dir(), source: std::io::Error::other(e) })
                .map(Ok),
            Err(e) => Ok(Err(e)),
        }
    };
    match filled {
        Ok(Ok(())) => {}
        other => {
            let _ = fs::remove_dir_all(&tmp);
            return other;
        }
    }
    if root.exists() {
        // An empty directory (checked above) is replaced.
        fs::remove_dir(root).map_err(io(root))?;
    }
    fs::rename(&tmp, root).map_err(io(root))?;
    if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::File::open(parent).and_then(|d| d.sync_all()).map_err(io(parent))?;
    }
    Ok(Ok(()))
}

fn parse_marker(path: &Path, text: &str) -> Result<Identity, Error> {
    let bad = |reason: &str| Error::BadMarker { path: path.to_owned(), reason: reason.to_owned() };
    let mut lines = text.lines();
    if lines.next() != Some(MAGIC) {
        return Err(bad("unknown format"));
    }
    let mut member_id = None;
    let mut cluster_id = None;
    for line in lines {
        let Some((k, v)) = line.split_once('=') else { continue };
        let v = u64::from_str_radix(v.trim(), 16).map_err(|_| bad("bad id"))?;
        match k {
            "member_id" => member_id = Some(v),
            "cluster_id" => cluster_id = Some(v),
            _ => {}
        }
    }
    Ok(Identity {
        member_id: member_id.ok_or_else(|| bad("no member_id"))?,
        cluster_id: cluster_id.ok_or_else(|| bad("no cluster_id"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_foreign_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("member")).unwrap();
        assert!(matches!(DataDir::inspect(dir.path()), Err(Error::Foreign { .. })));
    }

    #[test]
    fn identity_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("d");
        assert!(DataDir::inspect(&root).unwrap().is_none());
        let id = Identity { member_id: 7, cluster_id: 9 };
        DataDir::create_or_open(&root, id).unwrap();
        assert_eq!(DataDir::inspect(&root).unwrap(), Some(id));
    }
}
