//! Raft snapshots that are never held whole in memory: the handoff between apply (which
//! produces and installs state images), raft (which decides when a member needs one) and
//! the transport (which moves the bytes).
//!
//! A raft `Snapshot` message carries, instead of the state image, a short *reference*:
//!
//! - on the sender, [`Reference::Pinned`] names the applied index of an image that apply
//!   registered with [`Images::offer`]: a point-in-time view (an mvcc pin plus the small
//!   keyspaces) that the transport reads page by page while it streams;
//! - on the receiver, [`Reference::Staged`] names the file the peer service wrote the
//!   streamed image to; apply installs from that file, page by page.
//!
//! Data that is neither (a peer of an older version sending the image inline) is the image
//! itself. raft never looks inside: it moves bytes, and only the index, term and conf state
//! of the metadata matter to it. A reference is meaningful only on the member that made
//! it; a member serving a snapshot it did not register (say, the staged one it received
//! before becoming leader) tells raft to drop it and get a fresh one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

/// Leading bytes of a [`Reference::Pinned`].
const PINNED: &[u8] = b"cairn-raft-snapshot-pinned\0";
/// Leading bytes of a [`Reference::Staged`].
const STAGED: &[u8] = b"cairn-raft-snapshot-staged\0";

/// What a raft snapshot's data stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference<'a> {
    /// The image registered on this member at this applied index.
    Pinned(u64),
    /// An image received from the leader, staged in this file.
    Staged(PathBuf),
    /// The image itself, inline.
    Inline(&'a [u8]),
}

impl<'a> Reference<'a> {
    /// Reads the reference a snapshot's `data` carries.
    pub fn parse(data: &'a [u8]) -> Reference<'a> {
        if let Some(rest) = data.strip_prefix(PINNED)
            && let Ok(index) = <[u8; 8]>::try_from(rest)
        {
            return Reference::Pinned(u64::from_be_bytes(index));
        }
        if let Some(rest) = data.strip_prefix(STAGED)
            && let Ok(path) = std::str::from_utf8(rest)
        {
            return Reference::Staged(PathBuf::from(path));
        }
        Reference::Inline(data)
    }

    /// The snapshot data for a pinned image at `index`.
    pub fn pinned(index: u64) -> Vec<u8> {
        [PINNED, &index.to_be_bytes()].concat()
    }

    /// The snapshot data for an image staged at `path`; `None` when the path is not UTF-8.
    pub fn staged(path: &Path) -> Option<Vec<u8>> {
        Some([STAGED, path.to_str()?.as_bytes()].concat())
    }
}

/// A state image that can be read again from the start, in pieces, while writes go on.
pub trait SnapshotImage: Send + Sync {
    /// Hands the image to `out` in pieces of about `piece` bytes, in order, until `out`
    /// returns false (the receiver went away) or the image ends.
    ///
    /// # Errors
    /// A description of why the image can no longer be read (the view it reads was
    /// invalidated by a newer compaction or a replaced state, or storage failed).
    fn stream(&self, piece: usize, out: &mut dyn FnMut(Vec<u8>) -> bool) -> Result<(), String>;
}

/// The image this member currently offers to members behind its compacted log; shared by
/// the raft handle's clones.
#[derive(Default)]
pub struct Images {
    current: Mutex<Option<(u64, Arc<dyn SnapshotImage>)>>,
}

impl std::fmt::Debug for Images {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let index =
            self.current.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(|c| c.0);
        f.debug_struct("Images").field("index", &index).finish()
    }
}

impl Images {
    /// Registers `image` as the state at applied index `index`, replacing the previous one.
    pub fn offer(&self, index: u64, image: Arc<dyn SnapshotImage>) {
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some((index, image));
    }

    /// The registered image at exactly `index`, if it is still the current one.
    pub fn get(&self, index: u64) -> Option<Arc<dyn SnapshotImage>> {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        current.as_ref().filter(|(i, _)| *i == index).map(|(_, image)| image.clone())
    }

    /// Forgets the image at `index` (it can no longer be read).
    pub fn forget(&self, index: u64) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.as_ref().is_some_and(|(i, _)| *i == index) {
            *current = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_round_trip_and_anything_else_is_inline() {
        let pinned = Reference::pinned(42);
        assert_eq!(Reference::parse(&pinned), Reference::Pinned(42));
        let staged = Reference::staged(Path::new("/data/snap/7.incoming")).unwrap();
        assert_eq!(Reference::parse(&staged), Reference::Staged("/data/snap/7.incoming".into()));
        for inline in [&b""[..], b"image", &pinned[..pinned.len() - 1]] {
            assert_eq!(Reference::parse(inline), Reference::Inline(inline));
        }
    }
}
