//! sled made durable: what the audit log and the outbox share.
//!
//! sled 0.34's `flush` writes its buffers with `pwrite` and waits with
//! `sync_file_range` on Linux: the data reaches the device, but the drive's
//! cache is not flushed and the file's new size is not recorded, so a power
//! cut can still lose it. [`SyncedDb::sync`] therefore follows sled's flush
//! with an `fdatasync` of sled's log file `<dir>/db`, which holds every page
//! below sled's blob threshold (a page above it goes to a `blobs/` file
//! sled never syncs: callers keep their values small — the audit log caps
//! them at 7 KiB). A new store's `conf`, log file and directory entries are
//! synced once when it is created.

use std::fs::File;
use std::path::Path;
use std::time::Duration;

/// How long [`SyncedDb::open`] waits for the store's lock.
pub const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Why a store could not be opened or synced.
#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    /// sled failed.
    #[error(transparent)]
    Sled(#[from] sled::Error),
    /// Syncing (or opening sled's log file to sync it) failed.
    #[error("sync: {0}")]
    Sync(std::io::Error),
    /// Another process holds the store.
    #[error("{dir} is in use by another process (a running rxvisiond?): {reason}")]
    InUse {
        /// The store.
        dir: String,
        /// sled's words.
        reason: String,
    },
}

/// A sled database whose writes can be made durable.
pub struct SyncedDb {
    /// The database.
    pub db: sled::Db,
    /// `<dir>/db`, sled's log, opened by us to `fdatasync` it.
    log_file: File,
}

impl SyncedDb {
    /// Whether `dir` holds a store.
    pub fn exists(dir: &Path) -> bool {
        dir.join("db").is_file()
    }

    /// Opens (or creates) the store in `dir`, waiting up to [`LOCK_WAIT`]
    /// for another handle to let go of it (a previous process still
    /// exiting, or an earlier handle whose background flusher has not
    /// stopped yet). A store created now is synced with its directory entries.
    pub fn open(dir: &Path) -> Result<SyncedDb, DurableError> {
        let existed = SyncedDb::exists(dir);
        let started = std::time::Instant::now();
        let db = loop {
            match sled::Config::new().path(dir).open() {
                Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                    if started.elapsed() >= LOCK_WAIT {
                        return Err(DurableError::InUse { dir: dir.display().to_string(), reason: e.to_string() });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        let log_file = File::open(dir.join("db")).map_err(DurableError::Sync)?;
        if !existed {
            let sync_path = |path: &Path| File::open(path).and_then(|f| f.sync_all());
            if dir.join("conf").exists() {
                sync_path(&dir.join("conf")).map_err(DurableError::Sync)?;
            }
            log_file.sync_all().map_err(DurableError::Sync)?;
            sync_path(dir).map_err(DurableError::Sync)?;
            if let Some(parent) = dir.parent() {
                sync_path(parent).map_err(DurableError::Sync)?;
            }
        }
        Ok(SyncedDb { db, log_file })
    }

    /// Everything inserted so far, on the platter.
    pub fn sync(&self) -> Result<(), DurableError> {
        self.db.flush()?;
        self.log_file.sync_data().map_err(DurableError::Sync)
    }
}
