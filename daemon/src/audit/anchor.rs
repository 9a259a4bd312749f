//! The chain head, remembered outside the store.
//!
//! A restored backup, a deleted tail or a replaced store is a valid chain on
//! its own: only a copy of the head kept elsewhere shows that records are
//! missing. The daemon keeps that copy in `<state_dir>/audit-anchor` and
//! refuses, at start, a store that is missing, shorter than the anchor, or
//! whose record at the anchor's position is not the one the anchor names,
//! until an operator accepts it with `rxvisiond audit accept-store` (itself
//! audited). The fleet keeps a second copy (telemetry).
//!
//! # On-disk format
//!
//! Two slots of [`SLOT_LEN`] bytes at offsets 0 and [`SLOT_LEN`]:
//!
//! ```text
//! offset  size  field
//!      0     4  magic "RXH1"
//!      4     8  generation, u64 big-endian (one more at every write)
//!     12     8  next_seq, u64 big-endian (records 0..next_seq are confirmed)
//!     20    32  chain hash of record next_seq - 1 (or the genesis / checkpoint hash)
//!     52    32  SHA-256 of bytes 0..52
//! ```
//!
//! A write goes to the slot *not* holding the newest generation and is
//! `fdatasync`ed before it counts, so a torn write (power cut mid-write)
//! leaves the other slot intact: reading takes the valid slot with the
//! highest generation. Both slots invalid is damage or tampering and is
//! refused like a forked store.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ring::digest::{digest, SHA256};

const MAGIC: &[u8; 4] = b"RXH1";
/// Bytes per slot.
pub const SLOT_LEN: usize = 96;
const BODY_LEN: usize = 52;

/// The confirmed head of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    /// Which write this was (slots are told apart by it).
    pub generation: u64,
    /// Every record below this sequence number was durable and confirmed.
    pub next_seq: u64,
    /// Chain hash of record `next_seq - 1`.
    pub head: [u8; 32],
}

impl Anchor {
    fn encode(&self) -> [u8; SLOT_LEN] {
        let mut slot = [0u8; SLOT_LEN];
        slot[..4].copy_from_slice(MAGIC);
        slot[4..12].copy_from_slice(&self.generation.to_be_bytes());
        slot[12..20].copy_from_slice(&self.next_seq.to_be_bytes());
        slot[20..52].copy_from_slice(&self.head);
        let sum = digest(&SHA256, &slot[..BODY_LEN]);
        slot[BODY_LEN..BODY_LEN + 32].copy_from_slice(sum.as_ref());
        slot
    }

    fn decode(slot: &[u8]) -> Option<Anchor> {
        if slot.len() < BODY_LEN + 32 || &slot[..4] != MAGIC {
            return None;
        }
        if digest(&SHA256, &slot[..BODY_LEN]).as_ref() != &slot[BODY_LEN..BODY_LEN + 32] {
            return None;
        }
        Some(Anchor {
            generation: u64::from_be_bytes(slot[4..12].try_into().ok()?),
            next_seq: u64::from_be_bytes(slot[12..20].try_into().ok()?),
            head: slot[20..52].try_into().ok()?,
        })
    }
}

/// Why the anchor file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    /// Reading, writing or syncing it failed.
    #[error("chain-head anchor {path}: {source}")]
    Io {
        /// The anchor file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Neither slot holds a valid anchor although the file is not empty.
    #[error("chain-head anchor {path} is damaged (no valid slot)")]
    Damaged {
        /// The anchor file.
        path: PathBuf,
    },
}

/// The open anchor file.
#[derive(Debug)]
pub struct AnchorFile {
    path: PathBuf,
    file: File,
    last: Option<Anchor>,
}

impl AnchorFile {
    /// Opens the anchor at `path`, creating an empty one (mode 0600) when
    /// there is none. [`AnchorFile::last`] is `None` for a new file.
    pub fn open(path: &Path) -> Result<AnchorFile, AnchorError> {
        let io_error = |source| AnchorError::Io { path: path.to_path_buf(), source };
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io_error)?;
        if !existed {
            // The new file's directory entry must survive a power cut too.
            file.sync_all().map_err(io_error)?;
            if let Some(parent) = path.parent() {
                File::open(parent).and_then(|d| d.sync_all()).map_err(io_error)?;
            }
        }
        let mut slots = [0u8; 2 * SLOT_LEN];
        let len = file.metadata().map_err(io_error)?.len() as usize;
        let read = len.min(slots.len());
        file.read_exact_at(&mut slots[..read], 0).map_err(io_error)?;
        let last = [Anchor::decode(&slots[..SLOT_LEN]), Anchor::decode(&slots[SLOT_LEN..])]
            .into_iter()
            .flatten()
            .max_by_key(|a| a.generation);
        if last.is_none() && slots[..read].iter().any(|&b| b != 0) {
            return Err(AnchorError::Damaged { path: path.to_path_buf() });
        }
        Ok(AnchorFile { path: path.to_path_buf(), file, last })
    }

    /// The newest valid anchor, `None` if none was ever written.
    pub fn last(&self) -> Option<Anchor> {
        self.last
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records a new head and returns once it is on disk.
    pub fn record(&mut self, next_seq: u64, head: [u8; 32]) -> Result<(), AnchorError> {
        let generation = self.last.map_or(1, |a| a.generation + 1);
        let anchor = Anchor { generation, next_seq, head };
        let offset = (generation % 2) * SLOT_LEN as u64;
        let io_error = |source| AnchorError::Io { path: self.path.clone(), source };
        self.file.write_all_at(&anchor.encode(), offset).map_err(io_error)?;
        self.file.sync_data().map_err(io_error)?;
        self.last = Some(anchor);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_valid_slot_wins_and_a_torn_slot_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("anchor");
        let mut file = AnchorFile::open(&path).unwrap();
        assert_eq!(file.last(), None);
        file.record(5, [1; 32]).unwrap();
        file.record(9, [2; 32]).unwrap();
        let reopened = AnchorFile::open(&path).unwrap();
        assert_eq!(reopened.last().map(|a| (a.next_seq, a.head)), Some((9, [2; 32])));

        // Tear the newest slot (generation 2 lives at offset 0): the older one is used.
        let raw = std::fs::read(&path).unwrap();
        let mut torn = raw.clone();
        torn[30] ^= 0xff;
        std::fs::write(&path, &torn).unwrap();
        assert_eq!(AnchorFile::open(&path).unwrap().last().map(|a| a.next_seq), Some(5));

        // Both slots damaged: refused, never silently treated as new.
        torn[SLOT_LEN + 30] ^= 0xff;
        std::fs::write(&path, &torn).unwrap();
        assert!(matches!(AnchorFile::open(&path), Err(AnchorError::Damaged { .. })));
    }

    #[test]
    fn a_new_anchor_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("anchor");
        AnchorFile::open(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
