//! The audit log: every verification, feedback, model change, configuration
//! change, export and pruning, encrypted, hash-chained and durable before the
//! caller answers anyone.
//!
//! # On-disk format
//!
//! A sled database in the audit directory with two trees.
//!
//! `records`: key = sequence number (`u64`, big-endian, so iteration is in
//! sequence order); value =
//!
//! ```text
//! offset  size  field
//!      0     4  magic "RXA2" (format version 2; "RXA1" records are still read)
//!      4     8  seq, u64 big-endian (same as the key)
//!     12     4  key id, u32 big-endian (which audit key encrypted it)
//!     16    12  AES-GCM nonce: 96 random bits (RXA1: store epoch ‖ seq)
//!     28    32  SHA-256 of the previous record's whole value (the chain)
//!     60     n  AES-256-GCM ciphertext of the record's JSON, then the 16-byte tag
//! ```
//!
//! The 60-byte header is the AEAD's associated data, so seq, key id, nonce
//! and previous hash are authenticated with the contents. A record's chain
//! hash is the SHA-256 of its whole value. The first record's previous hash
//! is 32 zero bytes, or the hash in the pruning checkpoint. A value is at
//! most [`MAX_VALUE_BYTES`]: sled keeps up to 17 values in one page, and a
//! page above 128 KiB would go to a separate blob file that sled never syncs.
//!
//! Nonces are random and stored, not derived from the sequence number: a
//! store restored from a backup, or cut at its end, would otherwise encrypt
//! new records under (key, nonce) pairs it already used. 96 random bits
//! keep the chance of any repeat below 2⁻³² for 2³² records under one key.
//!
//! `meta`: `checkpoint` (JSON, see [`Checkpoint`]), present once records
//! have been pruned; `epoch` in stores created before format 2.
//!
//! Outside the store, the daemon keeps the confirmed chain head in
//! `<state_dir>/audit-anchor` ([`anchor`]).
//!
//! # Durability: what is synced, and when
//!
//! [`AuditLog::append`] returns only after
//! 1. sled's `flush` wrote the record into its log file `<dir>/db` (on Linux
//!    that is `pwrite` + `sync_file_range`: the data reaches the device, but
//!    neither the device's cache is flushed nor the file's size recorded);
//! 2. we `fdatasync` `<dir>/db` ourselves (data, the size the data needs, and
//!    a cache flush to the platter);
//! 3. the anchor file, when there is one, holds the new head, `fdatasync`ed.
//!
//! Concurrent appenders share these steps (group commit): one of them leads
//! and syncs everything inserted so far while the others wait on a condition
//! variable; when it is done, those it covered return and one of the rest
//! leads the next sync (see `make_durable`). `conf` and the directory
//! entries are synced when the store is created. sled's snapshot files are
//! an optimisation it writes atomically; recovery replays its log from the
//! newest snapshot it finds.
//!
//! # Invariants
//!
//! * Sequence numbers are contiguous from the checkpoint's `next_seq` (or 0),
//!   and never reused: a store shorter than its anchor is refused.
//! * Every record's previous hash is the hash of the record before it.
//! * Record times never go backwards: a record is stamped with the later of
//!   the wall clock and the previous record's time; a clock found behind the
//!   last record is itself recorded ([`RecordKind::ClockJump`]).
//! * Nothing within [`AuditOptions::retention_floor`] of the newest record
//!   is pruned, whatever the clock or the operator says.
//! * A record the daemon could not confirm durable was never answered, and
//!   is marked so by an [`RecordKind::Unanswered`] record before anything
//!   else is written.
//! * Key material and decrypted contents never reach logs or error messages.
//!
//! # Concurrency
//!
//! Appends run concurrently: the chain state is one mutex (sequence, hash,
//! time, insert), the group commit's state another (held only to decide who
//! syncs, never during a sync). Prunings are serialised by
//! their own mutex and run beside appends. The store handle is behind a
//! read-write lock: every operation reads it; only reopening after a failed
//! write takes it exclusively.
//!
//! # Crashes and failures
//!
//! * Before the insert: nothing was written, nothing was acknowledged.
//! * After the insert, before the sync and anchor return: the record may or
//!   may not be on disk; it was not acknowledged. sled recovers a prefix of
//!   its writes, so the chain stays contiguous either way; at the next start
//!   the records beyond the anchor are marked unanswered.
//! * During pruning: the checkpoint is synced before any record is removed.
//!   A crash in between leaves records the checkpoint already covers; they are
//!   skipped by verification and removed by the next pruning.
//! * A failed write (full disk, I/O error) leaves sled unusable. The log
//!   drops it and reopens the store at once; the records it cannot confirm
//!   are marked unanswered by the next append. If the store cannot be
//!   reopened, or reopening shows confirmed records missing, the log reports
//!   [`StoreHealth::Lost`] and the service exits so that systemd restarts it.
//!
//! # What verification catches
//!
//! A flipped byte anywhere (tag or header check fails), a removed record (gap
//! in the sequence), a reordered or replayed record (its authenticated seq
//! differs from its position), a forged checkpoint (its MAC). Removing records
//! from the *end* leaves a shorter valid chain: that is caught against the
//! anchor at start, and by the fleet against the head it was sent.

pub mod anchor;
pub mod keys;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::aead;
use ring::digest::{digest, SHA256};
use serde::{Deserialize, Serialize};

pub use anchor::{Anchor, AnchorError, AnchorFile};

use crate::durable::{DurableError, SyncedDb};
use keys::{hex, unhex};
pub use keys::{AuditKey, KeyError, KeyRing};

const MAGIC_V1: &[u8; 4] = b"RXA1";
const MAGIC: &[u8; 4] = b"RXA2";
const HEADER_LEN: usize = 60;
const TAG_LEN: usize = 16;
const GENESIS: [u8; 32] = [0; 32];
/// The largest stored value (header, ciphertext, tag). See the format above.
pub const MAX_VALUE_BYTES: usize = 7 * 1024;
/// A wall clock this far behind the last record is recorded as a clock jump.
const CLOCK_TOLERANCE_MS: u64 = 1_000;

/// The wall clock the log stamps records with, in Unix milliseconds (a
/// parameter so tests can set it years ahead, a day back, or to 1970).
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system's wall clock.
pub fn system_clock() -> Clock {
    Arc::new(now_ms)
}

/// Why the audit log could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The store failed (disk full, I/O error, corrupt database).
    #[error("audit store: {0}")]
    Store(#[from] sled::Error),
    /// Opening or syncing the store failed.
    #[error("audit store: {0}")]
    Durable(#[from] DurableError),
    /// The chain-head anchor could not be read or written.
    #[error(transparent)]
    Anchor(#[from] AnchorError),
    /// Writing an export failed.
    #[error("audit export: {0}")]
    Export(#[from] std::io::Error),
    /// The store's metadata is unreadable.
    #[error("audit store metadata: {0}")]
    Meta(String),
    /// There is no audit store where one was expected.
    #[error("there is no audit store in {0}")]
    NoStore(PathBuf),
    /// The store does not continue the chain this appliance confirmed.
    #[error("audit store {dir} refused: {reason}; if this is intended (a restored backup, a replaced disk), accept it with `rxvisiond audit accept-store --config FILE --operator ID --reason TEXT`")]
    Refused {
        /// The store.
        dir: PathBuf,
        /// Missing, shorter or forked, with the numbers.
        reason: String,
    },
    /// The store failed earlier and could not be reopened.
    #[error("audit store unavailable: {0}")]
    Unavailable(String),
    /// A pruning would remove records the retention floor protects.
    #[error("refusing to prune before {requested}: records written after {floor} are within the retention period ({days} days before the newest record, {newest})")]
    WithinRetention {
        /// The requested cut-off (RFC 3339).
        requested: String,
        /// The earliest allowed cut-off (RFC 3339).
        floor: String,
        /// The newest record's time (RFC 3339).
        newest: String,
        /// The retention period in days.
        days: u64,
    },
    /// A record could not be read (tampering or a missing key).
    #[error("audit record {seq}: {reason}")]
    Record {
        /// The record's sequence number.
        seq: u64,
        /// What is wrong.
        reason: String,
    },
}

impl AuditError {
    /// Whether the error leaves the store unusable until it is reopened.
    fn breaks_store(&self) -> bool {
        matches!(self, AuditError::Store(_) | AuditError::Durable(_) | AuditError::Anchor(_))
    }
}

/// The state of the store, for health checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum StoreHealth {
    /// The last write was durable.
    Ok,
    /// A write failed; the store was reopened and the next write will tell.
    Failed {
        /// What failed.
        error: String,
    },
    /// The store could not be reopened: the service must stop.
    Lost {
        /// Why.
        error: String,
    },
}

/// How to open the audit log.
#[derive(Clone)]
pub struct AuditOptions {
    /// Create the store when the directory holds none. The service does on
    /// its first start; the `audit` commands never do.
    pub create: bool,
    /// Where the confirmed chain head is kept outside the store; `None` for
    /// a copy examined on another machine.
    pub anchor: Option<PathBuf>,
    /// Accept a store that does not continue the anchored chain (missing,
    /// shorter, forked): the acceptance is the first thing recorded.
    pub accept: Option<Acceptance>,
    /// Nothing within this period before the newest record is pruned.
    pub retention_floor: Duration,
    /// The wall clock.
    pub clock: Clock,
}

impl std::fmt::Debug for AuditOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditOptions")
            .field("create", &self.create)
            .field("anchor", &self.anchor)
            .field("accept", &self.accept)
            .field("retention_floor", &self.retention_floor)
            .finish_non_exhaustive()
    }
}

/// The default retention floor: the default `retention_days` (7 years).
pub const DEFAULT_RETENTION_FLOOR: Duration = Duration::from_secs(2555 * 86_400);

impl Default for AuditOptions {
    fn default() -> AuditOptions {
        AuditOptions {
            create: true,
            anchor: None,
            accept: None,
            retention_floor: DEFAULT_RETENTION_FLOOR,
            clock: system_clock(),
        }
    }
}

/// An operator's acceptance of a store that does not continue the anchored chain.
#[derive(Debug, Clone)]
pub struct Acceptance {
    /// Who accepts.
    pub operator: String,
    /// Why (a restored backup, a replaced disk …).
    pub reason: String,
}

/// What an audit record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// A pill verification answered at the counter.
    Verification,
    /// A pharmacist confirmed or corrected a verification.
    Feedback,
    /// A model was installed, rejected or rolled back.
    ModelChange,
    /// The configuration changed.
    ConfigChange,
    /// Records were exported (decrypted) for a compliance officer.
    Export,
    /// Old records were pruned under the retention policy.
    Retention,
    /// The wall clock was found behind the last record (records keep the
    /// last record's time until it catches up).
    ClockJump,
    /// Records stored but never confirmed durable, so never answered (a
    /// failed write, or a stop between the write and its confirmation).
    Unanswered,
    /// An operator accepted a store that does not continue the anchored chain.
    StoreAccepted,
}

/// One class of a verification's top-k.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankedClass {
    /// The product's NDC.
    pub ndc: String,
    /// Its probability.
    pub prob: f32,
}

/// What a caller records. The log adds sequence number, time and chain hash,
/// and replaces the prescription reference by its keyed hash.
#[derive(Debug, Clone, Default)]
pub struct AuditEvent {
    /// What happened.
    pub kind: Option<RecordKind>,
    /// Who did it (operator id as the pharmacy system gives it).
    pub operator: Option<String>,
    /// Prescription reference, in clear: only its HMAC is stored.
    pub rx_ref: Option<String>,
    /// SHA-256 (hex) of the image that was verified.
    pub image_sha256: Option<String>,
    /// Model version that answered.
    pub model_version: Option<String>,
    /// Engine that answered (`cpu` / `gpu`).
    pub engine: Option<String>,
    /// The most probable classes.
    pub top_k: Vec<RankedClass>,
    /// MATCH, MISMATCH, UNCERTAIN, NO_PILL or BAD_IMAGE.
    pub verdict: Option<String>,
    /// Frame to verdict, in milliseconds.
    pub latency_ms: Option<f64>,
    /// Kind-specific details (feedback target, export range, config diff …).
    pub details: serde_json::Value,
}

impl AuditEvent {
    /// An event of `kind` with nothing else filled in.
    pub fn new(kind: RecordKind) -> AuditEvent {
        AuditEvent { kind: Some(kind), details: serde_json::Value::Null, ..AuditEvent::default() }
    }
}

/// A stored record, as decrypted and exported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// Position in the chain.
    pub seq: u64,
    /// When it was written (RFC 3339, UTC, milliseconds).
    pub time: String,
    /// Milliseconds since the Unix epoch (for range queries).
    pub time_ms: u64,
    /// What it is about.
    pub kind: RecordKind,
    /// Who acted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// HMAC-SHA256 (hex) of the prescription reference under the record's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_ref_hmac: Option<String>,
    /// SHA-256 of the verified image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_sha256: Option<String>,
    /// Model version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    /// Engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    /// Top-k classes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_k: Vec<RankedClass>,
    /// Verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    /// Latency in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// Kind-specific details.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
    /// Id of the key the record is encrypted under (hex).
    pub key_id: String,
    /// SHA-256 of the previous record (hex), as in the header.
    pub prev_hash: String,
}

/// The signed summary of a pruned prefix of the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Last pruned sequence number.
    pub through_seq: u64,
    /// First sequence number still stored.
    pub next_seq: u64,
    /// Chain hash of record `through_seq` (hex): the next record's previous hash.
    pub head_hash: String,
    /// Records pruned over the store's life.
    pub pruned_total: u64,
    /// When the pruning happened (RFC 3339).
    pub time: String,
    /// Key that signed it (hex id).
    pub key_id: String,
    /// HMAC-SHA256 (hex) over the fields above.
    pub mac: String,
}

impl Checkpoint {
    fn signed_bytes(&self) -> Vec<u8> {
        format!(
            "rxvision-checkpoint-v1|{}|{}|{}|{}|{}|{}",
            self.through_seq, self.next_seq, self.head_hash, self.pruned_total, self.time, self.key_id
        )
        .into_bytes()
    }
}

/// Where a record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Its sequence number.
    pub seq: u64,
    /// Its chain hash.
    pub hash: [u8; 32],
}

/// The first problem verification found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tamper {
    /// The first bad sequence number.
    pub seq: u64,
    /// What is wrong with it.
    pub reason: String,
}

/// The outcome of [`AuditLog::verify`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Records whose tag and chain link were checked.
    pub checked: u64,
    /// First stored sequence number.
    pub first_seq: Option<u64>,
    /// Last good sequence number.
    pub last_seq: Option<u64>,
    /// Chain hash after the last good record (hex): compare with the fleet's copy.
    pub head_hash: String,
    /// Records covered by the pruning checkpoint.
    pub pruned: u64,
    /// The first bad record, if any.
    pub tamper: Option<Tamper>,
}

/// What an export wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportSummary {
    /// Records written.
    pub count: u64,
    /// First exported sequence number.
    pub first_seq: Option<u64>,
    /// Last exported sequence number.
    pub last_seq: Option<u64>,
    /// The export's own audit record.
    pub audit_seq: u64,
}

/// What a pruning removed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PruneSummary {
    /// Records removed now.
    pub removed: u64,
    /// The checkpoint now in force, if any.
    pub checkpoint: Option<Checkpoint>,
    /// The pruning's own audit record (none when nothing was old enough).
    pub audit_seq: Option<u64>,
}

struct ChainState {
    next_seq: u64,
    head: [u8; 32],
    /// The newest record's time: no record is stamped earlier.
    last_time_ms: u64,
    /// A clock jump was recorded and the clock has not caught up since.
    clock_behind: bool,
    /// Stored records never confirmed (seq range), to be marked unanswered.
    unconfirmed: Option<(u64, u64)>,
}

/// The group commit's state (under [`AuditLog::durable`]).
struct Durable {
    /// Records below this are on disk and in the anchor.
    synced_next: u64,
    /// A sync is running (its leader does it without holding the lock).
    syncing: bool,
    /// The last failed sync: records below `.0` that it did not confirm failed with it.
    failed: Option<(u64, String)>,
    /// Taken by the leader for the duration of its sync.
    anchor: Option<AnchorFile>,
}

/// The open sled database and the file handle we sync it through.
struct Store {
    synced: SyncedDb,
    records: sled::Tree,
    meta: sled::Tree,
}

impl Store {
    fn open(dir: &Path) -> Result<Store, AuditError> {
        let synced = SyncedDb::open(dir)?;
        let records = synced.db.open_tree("records")?;
        let meta = synced.db.open_tree("meta")?;
        Ok(Store { synced, records, meta })
    }

    /// Everything inserted so far, on the platter (see [`crate::durable`]).
    fn sync(&self) -> Result<(), AuditError> {
        Ok(self.synced.sync()?)
    }

    fn checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        match self.meta.get("checkpoint")? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| AuditError::Meta(format!("checkpoint is unreadable: {e}"))),
        }
    }
}

/// The audit log of one appliance.
pub struct AuditLog {
    dir: PathBuf,
    store: RwLock<Option<Store>>,
    keys: KeyRing,
    clock: Clock,
    retention_floor: Duration,
    state: Mutex<ChainState>,
    durable: Mutex<Durable>,
    /// Wakes the appenders waiting for a sync to finish.
    synced: Condvar,
    prune_lock: Mutex<()>,
    health: Mutex<StoreHealth>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("dir", &self.dir).field("keys", &self.keys).finish_non_exhaustive()
    }
}

/// The wall clock in Unix milliseconds (0 before 1970): the one the daemon
/// stamps records, windows and statuses with.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// RFC 3339 with milliseconds; times past year 9999 (open-ended ranges) clamp to its end.
fn rfc3339(ms: u64) -> String {
    const LAST_MS: u64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms.min(LAST_MS))).to_string()
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    digest(&SHA256, bytes).as_ref().try_into().expect("SHA-256 is 32 bytes")
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

struct Header {
    seq: u64,
    key_id: u32,
    prev: [u8; 32],
}

fn parse_header(value: &[u8]) -> Option<Header> {
    if value.len() < HEADER_LEN + TAG_LEN {
        return None;
    }
    let seq = u64::from_be_bytes(value[4..12].try_into().ok()?);
    match &value[..4] {
        m if m == MAGIC => {}
        // Format 1 derived the nonce from the store epoch and the seq.
        m if m == MAGIC_V1 && value[16 + 4..28] == seq.to_be_bytes() => {}
        _ => return None,
    }
    let key_id = u32::from_be_bytes(value[12..16].try_into().ok()?);
    Some(Header { seq, key_id, prev: value[28..60].try_into().ok()? })
}

fn seq_of(key: &[u8]) -> Result<u64, AuditError> {
    <[u8; 8]>::try_from(key).map(u64::from_be_bytes).map_err(|_| AuditError::Meta("a record key is not 8 bytes".into()))
}

impl AuditLog {
    /// Opens (or creates) the audit store in `dir` with `keys`, without an
    /// anchor (tests and tools; the service uses [`AuditLog::open_with`]).
    pub fn open(dir: &Path, keys: KeyRing) -> Result<AuditLog, AuditError> {
        AuditLog::open_with(dir, keys, AuditOptions::default())
    }

    /// Opens the audit store in `dir` as `options` say; see [`AuditOptions`]
    /// and the module documentation for what is refused.
    pub fn open_with(dir: &Path, keys: KeyRing, options: AuditOptions) -> Result<AuditLog, AuditError> {
        // The audit commands (create = false) use an anchor the daemon left, and never start one.
        let anchor_path = options.anchor.as_deref().filter(|path| options.create || path.exists());
        let mut anchor = anchor_path.map(AnchorFile::open).transpose()?;
        let anchored = anchor.as_ref().and_then(AnchorFile::last);
        let exists = SyncedDb::exists(dir);
        if !exists {
            if let (Some(a), None) = (anchored, &options.accept) {
                return Err(AuditError::Refused {
                    dir: dir.to_path_buf(),
                    reason: format!(
                        "the store is missing, but this appliance confirmed {} records in it (head {})",
                        a.next_seq,
                        hex(&a.head)
                    ),
                });
            }
            if !options.create && options.accept.is_none() {
                return Err(AuditError::NoStore(dir.to_path_buf()));
            }
        }
        let store = Store::open(dir)?;
        let mut state = recover_state(&store, &keys)?;
        if let Some(a) = anchored {
            match check_anchor(&store, &state, a) {
                Ok(()) if state.next_seq > a.next_seq => state.unconfirmed = Some((a.next_seq, state.next_seq)),
                Ok(()) => {}
                Err(reason) if options.accept.is_none() => {
                    return Err(AuditError::Refused { dir: dir.to_path_buf(), reason })
                }
                Err(_) => {}
            }
        }
        let synced_next = state.next_seq;
        let log = AuditLog {
            dir: dir.to_path_buf(),
            store: RwLock::new(Some(store)),
            keys,
            clock: options.clock,
            retention_floor: options.retention_floor,
            state: Mutex::new(state),
            durable: Mutex::new(Durable { synced_next, syncing: false, failed: None, anchor: None }),
            synced: Condvar::new(),
            prune_lock: Mutex::new(()),
            health: Mutex::new(StoreHealth::Ok),
        };
        match (&options.accept, anchored) {
            (Some(acceptance), _) => {
                let mut event = AuditEvent::new(RecordKind::StoreAccepted);
                event.operator = Some(acceptance.operator.clone());
                let (next_seq, head) = log.head();
                event.details = serde_json::json!({
                    "reason": acceptance.reason,
                    "anchor": anchored.map(|a| serde_json::json!({"next_seq": a.next_seq, "head": hex(&a.head)})),
                    "store": {"next_seq": next_seq, "head": hex(&head), "created": !exists},
                });
                // This append's commit rewrites the anchor: from here on the
                // accepted store is the confirmed chain.
                lock(&log.durable).anchor = anchor.take();
                log.append(event)?;
            }
            (None, None) => {
                if let Some(mut file) = anchor.take() {
                    // First start with an anchor (a new appliance, or a store from
                    // before anchors): the store as it is becomes the confirmed chain.
                    let (next_seq, head) = log.head();
                    file.record(next_seq, head)?;
                    lock(&log.durable).anchor = Some(file);
                }
            }
            (None, Some(_)) => lock(&log.durable).anchor = anchor.take(),
        }
        Ok(log)
    }

    fn store(&self) -> Result<RwLockReadGuard<'_, Option<Store>>, AuditError> {
        let guard = self.store.read().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            return Err(AuditError::Unavailable(match &*lock(&self.health) {
                StoreHealth::Lost { error } | StoreHealth::Failed { error } => error.clone(),
                StoreHealth::Ok => "closed".into(),
            }));
        }
        Ok(guard)
    }

    /// The store's health (for `/v1/health` and `/v1/status`).
    pub fn health(&self) -> StoreHealth {
        lock(&self.health).clone()
    }

    /// The pruning checkpoint, if records were ever pruned.
    pub fn checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        let guard = self.store()?;
        guard.as_ref().expect("checked by store()").checkpoint()
    }

    /// The keyed hash the log stores for a prescription reference (to look
    /// a prescription up in an export).
    pub fn pseudonym(&self, rx_ref: &str) -> String {
        self.keys.active().pseudonym(rx_ref)
    }

    /// The next sequence number and the chain head.
    pub fn head(&self) -> (u64, [u8; 32]) {
        let state = lock(&self.state);
        (state.next_seq, state.head)
    }

    /// The newest record's time (Unix milliseconds; 0 for an empty store).
    pub fn newest_time_ms(&self) -> u64 {
        lock(&self.state).last_time_ms
    }

    /// The latest cut-off a pruning may use: the retention floor before the newest record.
    pub fn prune_floor_ms(&self) -> u64 {
        self.newest_time_ms().saturating_sub(self.retention_floor.as_millis() as u64)
    }

    /// Appends a record and returns once it is durable on disk (see the
    /// module documentation). On a failed write the store is reopened at once.
    pub fn append(&self, event: AuditEvent) -> Result<Appended, AuditError> {
        let result = self.try_append(event);
        if let Err(e) = &result {
            if e.breaks_store() {
                self.reopen_after(e);
            }
        }
        result
    }

    fn try_append(&self, event: AuditEvent) -> Result<Appended, AuditError> {
        let guard = self.store()?;
        let store = guard.as_ref().expect("checked by store()");
        let appended = {
            let mut state = lock(&self.state);
            let now = (self.clock)();
            let mut events = Vec::with_capacity(3);
            if let Some((from, to)) = state.unconfirmed {
                let mut notice = AuditEvent::new(RecordKind::Unanswered);
                notice.details = serde_json::json!({
                    "first_seq": from, "last_seq": to - 1,
                    "reason": "stored but never confirmed durable (a failed write, or a stop before the confirmation): never answered",
                });
                events.push(notice);
            }
            if now.saturating_add(CLOCK_TOLERANCE_MS) < state.last_time_ms && !state.clock_behind {
                let mut notice = AuditEvent::new(RecordKind::ClockJump);
                notice.details = serde_json::json!({
                    "wall_clock": rfc3339(now), "last_record_time": rfc3339(state.last_time_ms),
                    "behind_ms": state.last_time_ms - now,
                    "note": "records keep the last record's time until the clock catches up",
                });
                events.push(notice);
            }
            events.push(event);
            let time_ms = now.max(state.last_time_ms);
            let (mut next, mut head) = (state.next_seq, state.head);
            let mut batch = sled::Batch::default();
            for event in events {
                let value = self.seal(event, next, head, time_ms)?;
                head = sha256(&value);
                batch.insert(&next.to_be_bytes(), value);
                next += 1;
            }
            store.records.apply_batch(batch)?;
            state.clock_behind = now.saturating_add(CLOCK_TOLERANCE_MS) < time_ms;
            state.unconfirmed = None;
            state.next_seq = next;
            state.head = head;
            state.last_time_ms = time_ms;
            Appended { seq: next - 1, hash: head }
        };
        self.make_durable(store, appended.seq)?;
        Ok(appended)
    }

    /// Encrypts one record at `seq` after `prev`.
    fn seal(&self, event: AuditEvent, seq: u64, prev: [u8; 32], time_ms: u64) -> Result<Vec<u8>, AuditError> {
        let key = self.keys.active();
        let record = AuditRecord {
            seq,
            time: rfc3339(time_ms),
            time_ms,
            kind: event.kind.unwrap_or(RecordKind::Verification),
            operator: event.operator,
            rx_ref_hmac: event.rx_ref.as_deref().map(|r| key.pseudonym(r)),
            image_sha256: event.image_sha256,
            model_version: event.model_version,
            engine: event.engine,
            top_k: event.top_k,
            verdict: event.verdict,
            latency_ms: event.latency_ms,
            details: event.details,
            key_id: format!("{:08x}", key.id()),
            prev_hash: hex(&prev),
        };
        let mut nonce = [0u8; 12];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| AuditError::Record { seq, reason: "no system randomness for the nonce".into() })?;
        let mut value = Vec::with_capacity(HEADER_LEN + 512);
        value.extend_from_slice(MAGIC);
        value.extend_from_slice(&seq.to_be_bytes());
        value.extend_from_slice(&key.id().to_be_bytes());
        value.extend_from_slice(&nonce);
        value.extend_from_slice(&prev);
        let mut body = serde_json::to_vec(&record).expect("audit records serialise");
        if HEADER_LEN + body.len() + TAG_LEN > MAX_VALUE_BYTES {
            return Err(AuditError::Record {
                seq,
                reason: format!("{} bytes of record, above the {MAX_VALUE_BYTES}-byte limit", body.len()),
            });
        }
        key.aead()
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(&value[..HEADER_LEN]),
                &mut body,
            )
            .map_err(|_| AuditError::Record { seq, reason: "encryption failed".into() })?;
        value.extend_from_slice(&body);
        Ok(value)
    }

    /// Group commit: returns once record `seq` is synced and anchored.
    ///
    /// One appender at a time leads: it takes everything inserted so far,
    /// syncs the store and then the anchor *without* holding the lock, and
    /// wakes all waiters at once; those it covered return, one of the others
    /// leads the next sync. Appenders arriving during a sync wait on the
    /// condition variable rather than queue on a mutex, so a group holds
    /// every record inserted while the previous sync ran.
    fn make_durable(&self, store: &Store, seq: u64) -> Result<(), AuditError> {
        let mut durable = lock(&self.durable);
        loop {
            if durable.synced_next > seq {
                return Ok(());
            }
            if let Some((through, error)) = &durable.failed {
                if seq < *through {
                    return Err(AuditError::Unavailable(format!("the sync of this record failed: {error}")));
                }
            }
            if !durable.syncing {
                break;
            }
            durable = self.synced.wait(durable).unwrap_or_else(|p| p.into_inner());
        }
        durable.syncing = true;
        let mut anchor = durable.anchor.take();
        drop(durable);
        let (next, head) = self.head();
        let result = store.sync().and_then(|()| match anchor.as_mut() {
            Some(anchor) => anchor.record(next, head).map_err(AuditError::from),
            None => Ok(()),
        });
        let mut durable = lock(&self.durable);
        durable.syncing = false;
        durable.anchor = anchor;
        match &result {
            Ok(()) => {
                durable.synced_next = next;
                *lock(&self.health) = StoreHealth::Ok;
            }
            Err(e) => durable.failed = Some((next, e.to_string())),
        }
        drop(durable);
        self.synced.notify_all();
        result
    }

    /// After a write failed: drop sled (its error is permanent), reopen the
    /// store and continue from what is on disk, or report it lost.
    fn reopen_after(&self, error: &AuditError) {
        let mut guard = self.store.write().unwrap_or_else(|p| p.into_inner());
        tracing::error!(error = %error, dir = %self.dir.display(), "audit write failed; reopening the store");
        *guard = None;
        let synced_next = lock(&self.durable).synced_next;
        let reopened = Store::open(&self.dir).and_then(|store| {
            let state = recover_state(&store, &self.keys)?;
            if state.next_seq < synced_next {
                return Err(AuditError::Unavailable(format!(
                    "after reopening, the store ends at {} but {synced_next} records were confirmed",
                    state.next_seq
                )));
            }
            Ok((store, state))
        });
        match reopened {
            Ok((store, mut state)) => {
                if state.next_seq > synced_next {
                    state.unconfirmed = Some((synced_next, state.next_seq));
                }
                *lock(&self.state) = state;
                // Sequence numbers after the reopened store's end are free again.
                lock(&self.durable).failed = None;
                *guard = Some(store);
                *lock(&self.health) = StoreHealth::Failed { error: error.to_string() };
                tracing::warn!("audit store reopened; the next write tells whether it is usable again");
            }
            Err(e) => {
                tracing::error!(error = %e, "the audit store cannot be reopened");
                *lock(&self.health) = StoreHealth::Lost { error: format!("{error}; reopening failed: {e}") };
            }
        }
    }

    /// Reads and decrypts one record (`None` if there is no such record).
    pub fn get(&self, seq: u64) -> Result<Option<AuditRecord>, AuditError> {
        let guard = self.store()?;
        let store = guard.as_ref().expect("checked by store()");
        match store.records.get(seq.to_be_bytes())? {
            None => Ok(None),
            Some(value) => open_record(&self.keys, seq, &value)
                .map(|(_, record)| Some(record))
                .map_err(|reason| AuditError::Record { seq, reason }),
        }
    }

    /// Walks the chain in order, calling `each` on every good record, and
    /// stops at the first bad one.
    fn walk(&self, mut each: impl FnMut(&AuditRecord) -> Result<(), AuditError>) -> Result<VerifyReport, AuditError> {
        let guard = self.store()?;
        let store = guard.as_ref().expect("checked by store()");
        let checkpoint = store.checkpoint()?;
        let mut report = VerifyReport {
            checked: 0,
            first_seq: None,
            last_seq: None,
            head_hash: hex(&GENESIS),
            pruned: checkpoint.as_ref().map_or(0, |c| c.pruned_total),
            tamper: None,
        };
        let (mut expected, mut running) = (0u64, GENESIS);
        if let Some(c) = &checkpoint {
            let key_ok = u32::from_str_radix(&c.key_id, 16)
                .ok()
                .and_then(|id| self.keys.get(id))
                .is_some_and(|k| k.verify_checkpoint(&c.signed_bytes(), &c.mac));
            let head = unhex(&c.head_hash).and_then(|h| <[u8; 32]>::try_from(h).ok());
            match (key_ok, head) {
                (true, Some(head)) => {
                    expected = c.next_seq;
                    running = head;
                }
                _ => {
                    report.tamper = Some(Tamper {
                        seq: c.next_seq,
                        reason: "the pruning checkpoint's signature does not verify".into(),
                    });
                    return Ok(report);
                }
            }
        }
        report.head_hash = hex(&running);
        for entry in store.records.iter() {
            let (key, value) = entry?;
            let Ok(seq) = seq_of(&key) else {
                report.tamper = Some(Tamper { seq: expected, reason: "a record key is not a sequence number".into() });
                break;
            };
            if seq < expected && checkpoint.is_some() {
                continue; // covered by the checkpoint, removal was interrupted
            }
            if seq != expected {
                let reason = if seq > expected {
                    format!("record {expected} is missing (next stored record is {seq})")
                } else {
                    format!("record {seq} appears again")
                };
                report.tamper = Some(Tamper { seq: expected.min(seq), reason });
                break;
            }
            let (header, record) = match open_record(&self.keys, seq, &value) {
                Ok(opened) => opened,
                Err(reason) => {
                    report.tamper = Some(Tamper { seq, reason });
                    break;
                }
            };
            if header.prev != running {
                report.tamper = Some(Tamper {
                    seq,
                    reason: "chain broken: its previous hash is not the hash of the record before it".into(),
                });
                break;
            }
            each(&record)?;
            running = sha256(&value);
            report.first_seq.get_or_insert(seq);
            report.last_seq = Some(seq);
            report.checked += 1;
            expected = seq + 1;
        }
        report.head_hash = hex(&running);
        Ok(report)
    }

    /// Checks every record's tag and chain link; names the first bad record.
    pub fn verify(&self) -> Result<VerifyReport, AuditError> {
        self.walk(|_| Ok(()))
    }

    /// Records the export, then writes the records with `from_ms <= time_ms
    /// < to_ms` as JSON lines to `out`. The export's record comes first, so
    /// a reader who stops halfway still leaves a trace. Refuses to export
    /// from a chain that does not verify.
    pub fn export(
        &self,
        from_ms: u64,
        to_ms: u64,
        operator: &str,
        out: &mut dyn Write,
    ) -> Result<ExportSummary, AuditError> {
        let mut event = AuditEvent::new(RecordKind::Export);
        event.operator = Some(operator.to_string());
        event.details = serde_json::json!({ "from": rfc3339(from_ms), "to": rfc3339(to_ms) });
        let appended = self.append(event)?;
        let (mut count, mut first_seq, mut last_seq) = (0u64, None, None);
        let report = self.walk(|record| {
            // The export's own record is the trace of this request, not part of its answer.
            if record.seq < appended.seq && (from_ms..to_ms).contains(&record.time_ms) {
                serde_json::to_writer(&mut *out, record).map_err(std::io::Error::from)?;
                out.write_all(b"\n")?;
                count += 1;
                first_seq.get_or_insert(record.seq);
                last_seq = Some(record.seq);
            }
            Ok(())
        })?;
        out.flush()?;
        if let Some(t) = report.tamper {
            return Err(AuditError::Record { seq: t.seq, reason: format!("{}; export stopped there", t.reason) });
        }
        Ok(ExportSummary { count, first_seq, last_seq, audit_seq: appended.seq })
    }

    /// Removes records older than `before_ms`, leaving a signed checkpoint so
    /// that the rest of the chain still verifies, and records the pruning.
    /// Refuses a cut-off after [`AuditLog::prune_floor_ms`]; prunings run
    /// one at a time.
    pub fn prune(&self, before_ms: u64, operator: &str) -> Result<PruneSummary, AuditError> {
        let _one_at_a_time = lock(&self.prune_lock);
        let floor = self.prune_floor_ms();
        if before_ms > floor {
            return Err(AuditError::WithinRetention {
                requested: rfc3339(before_ms),
                floor: rfc3339(floor),
                newest: rfc3339(self.newest_time_ms()),
                days: self.retention_floor.as_secs() / 86_400,
            });
        }
        let report = self.walk(|_| Ok(()))?;
        if let Some(t) = report.tamper {
            return Err(AuditError::Record { seq: t.seq, reason: format!("{}; refusing to prune", t.reason) });
        }
        let (removed, checkpoint) = match self.remove_before(before_ms) {
            Ok(done) => done,
            Err(e) => {
                if e.breaks_store() {
                    self.reopen_after(&e);
                }
                return Err(e);
            }
        };
        if removed == 0 {
            // Nothing old enough: no change, and nothing to record.
            return Ok(PruneSummary { removed: 0, checkpoint, audit_seq: None });
        }
        let mut event = AuditEvent::new(RecordKind::Retention);
        event.operator = Some(operator.to_string());
        event.details = serde_json::json!({
            "before": rfc3339(before_ms), "removed": removed,
            "through_seq": checkpoint.as_ref().map(|c| c.through_seq),
        });
        let appended = self.append(event)?;
        Ok(PruneSummary { removed, checkpoint, audit_seq: Some(appended.seq) })
    }

    /// Signs a checkpoint over the records before `before_ms`, syncs it, then
    /// removes them. Returns how many were removed and the checkpoint in force.
    fn remove_before(&self, before_ms: u64) -> Result<(u64, Option<Checkpoint>), AuditError> {
        let guard = self.store()?;
        let store = guard.as_ref().expect("checked by store()");
        let previous = store.checkpoint()?;
        let floor = previous.as_ref().map_or(0, |c| c.next_seq);
        let mut last: Option<(u64, [u8; 32])> = None;
        for entry in store.records.range(floor.to_be_bytes()..) {
            let (key, value) = entry?;
            let seq = seq_of(&key)?;
            let (_, record) =
                open_record(&self.keys, seq, &value).map_err(|reason| AuditError::Record { seq, reason })?;
            if record.time_ms >= before_ms {
                break;
            }
            last = Some((seq, sha256(&value)));
        }
        let Some((through_seq, hash)) = last else {
            return Ok((0, previous));
        };
        let key = self.keys.active();
        let pruned_before = previous.as_ref().map_or(0, |c| c.pruned_total);
        let mut checkpoint = Checkpoint {
            through_seq,
            next_seq: through_seq + 1,
            head_hash: hex(&hash),
            pruned_total: pruned_before + (through_seq + 1 - floor),
            time: rfc3339((self.clock)().max(self.newest_time_ms())),
            key_id: format!("{:08x}", key.id()),
            mac: String::new(),
        };
        checkpoint.mac = key.sign_checkpoint(&checkpoint.signed_bytes());
        store.meta.insert("checkpoint", serde_json::to_vec(&checkpoint).expect("checkpoint serialises"))?;
        store.sync()?;
        let mut batch = sled::Batch::default();
        let mut removed = 0;
        for entry in store.records.range(..=through_seq.to_be_bytes()) {
            batch.remove(entry?.0);
            removed += 1;
        }
        store.records.apply_batch(batch)?;
        store.sync()?;
        Ok((removed, Some(checkpoint)))
    }
}

/// The chain's next sequence number, head and newest time, from the store.
fn recover_state(store: &Store, keys: &KeyRing) -> Result<ChainState, AuditError> {
    let mut state = ChainState { next_seq: 0, head: GENESIS, last_time_ms: 0, clock_behind: false, unconfirmed: None };
    if let Some((key, value)) = store.records.last()? {
        let seq = seq_of(&key)?;
        state.next_seq = seq + 1;
        state.head = sha256(&value);
        // The newest time needs the record's key; a store whose last record
        // cannot be read is damaged, and verification will say where.
        state.last_time_ms = open_record(keys, seq, &value).map_or(0, |(_, r)| r.time_ms);
        return Ok(state);
    }
    if let Some(c) = store.checkpoint()? {
        state.head = unhex(&c.head_hash)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| AuditError::Meta("checkpoint head hash is malformed".into()))?;
        state.next_seq = c.next_seq;
        state.last_time_ms = humantime::parse_rfc3339(&c.time)
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
    }
    Ok(state)
}

/// Whether the store continues the anchored chain: `Err` says how it does not.
fn check_anchor(store: &Store, state: &ChainState, anchor: Anchor) -> Result<(), String> {
    if state.next_seq < anchor.next_seq {
        return Err(format!(
            "it ends at record {} but this appliance confirmed records up to {} (a restored backup or a removed tail)",
            state.next_seq.saturating_sub(1),
            anchor.next_seq - 1
        ));
    }
    if anchor.next_seq == 0 {
        return Ok(());
    }
    let at = anchor.next_seq - 1;
    let hash = match store.records.get(at.to_be_bytes()) {
        Ok(Some(value)) => sha256(&value),
        Ok(None) => match store.checkpoint() {
            Ok(Some(c)) if c.through_seq == at => match unhex(&c.head_hash).and_then(|h| h.try_into().ok()) {
                Some(h) => h,
                None => return Err("its checkpoint is malformed".into()),
            },
            Ok(Some(c)) if c.through_seq > at => return Ok(()), // pruned since; the checkpoint's MAC vouches
            _ => return Err(format!("record {at}, the confirmed head, is missing")),
        },
        Err(e) => return Err(format!("record {at} cannot be read: {e}")),
    };
    if hash != anchor.head {
        return Err(format!(
            "its record {at} is not the one this appliance confirmed (forked: {} instead of {})",
            hex(&hash),
            hex(&anchor.head)
        ));
    }
    Ok(())
}

/// Decrypts one stored value, checking its header against `seq`.
fn open_record(keys: &KeyRing, seq: u64, value: &[u8]) -> Result<(Header, AuditRecord), String> {
    let header = parse_header(value).ok_or("malformed record (bad magic, length or nonce)")?;
    if header.seq != seq {
        return Err(format!("record stored at {seq} carries seq {} (moved or replayed)", header.seq));
    }
    let key =
        keys.get(header.key_id).ok_or(format!("encrypted under key {:08x}, which is not loaded", header.key_id))?;
    let nonce: [u8; 12] = value[16..28].try_into().expect("header length checked");
    let mut body = value[HEADER_LEN..].to_vec();
    let plain = key
        .aead()
        .open_in_place(aead::Nonce::assume_unique_for_key(nonce), aead::Aad::from(&value[..HEADER_LEN]), &mut body)
        .map_err(|_| "authentication failed: the record was altered, moved or replayed".to_string())?;
    let record: AuditRecord =
        serde_json::from_slice(plain).map_err(|e| format!("decrypted contents are not a record: {e}"))?;
    if record.seq != seq {
        return Err(format!("decrypted record says seq {}", record.seq));
    }
    Ok((header, record))
}

/// Parses `YYYY-MM-DD` (midnight UTC) or an RFC 3339 time into Unix milliseconds.
pub fn parse_time(text: &str) -> Result<u64, String> {
    let full = if text.len() == 10 { format!("{text}T00:00:00Z") } else { text.to_string() };
    humantime::parse_rfc3339_weak(&full)
        .map_err(|e| format!("{text:?} is not a date (YYYY-MM-DD) or RFC 3339 time: {e}"))
        .and_then(|t| t.duration_since(UNIX_EPOCH).map_err(|_| format!("{text:?} is before 1970")))
        .map(|d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> AuditEvent {
        let mut event = AuditEvent::new(RecordKind::Verification);
        event.verdict = Some("MATCH".into());
        event
    }

    /// The in-process recovery after a failed sync, with the failure injected
    /// (a full disk that still lets sled reopen cannot be made on demand; the
    /// daemon test on a full tmpfs covers the reopen that fails).
    #[test]
    fn a_reopened_store_marks_what_it_could_not_confirm_and_heals_on_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let options = AuditOptions { anchor: Some(dir.path().join("audit-anchor")), ..AuditOptions::default() };
        let log =
            AuditLog::open_with(&dir.path().join("audit"), KeyRing::new(AuditKey::from_master(&[1; 32])), options)
                .unwrap();
        assert_eq!(log.append(event()).unwrap().seq, 0);
        // Record 1 reaches sled, then its sync fails: it is never answered.
        {
            let guard = log.store().unwrap();
            let store = guard.as_ref().unwrap();
            let mut state = lock(&log.state);
            let value = log.seal(event(), 1, state.head, now_ms()).unwrap();
            store.records.insert(1u64.to_be_bytes(), value.as_slice()).unwrap();
            state.head = sha256(&value);
            state.next_seq = 2;
        }
        log.reopen_after(&AuditError::Durable(DurableError::Sync(std::io::Error::other(
            "injected: no space left on device",
        ))));
        assert!(matches!(log.health(), StoreHealth::Failed { ref error } if error.contains("injected")));
        // The next write marks record 1, is itself durable, and the store is healthy again.
        let next = log.append(event()).unwrap();
        assert_eq!(next.seq, 3);
        let notice = log.get(2).unwrap().unwrap();
        assert_eq!(notice.kind, RecordKind::Unanswered);
        assert_eq!((notice.details["first_seq"].as_u64(), notice.details["last_seq"].as_u64()), (Some(1), Some(1)));
        assert_eq!(log.health(), StoreHealth::Ok);
        assert!(log.verify().unwrap().tamper.is_none());
        // The anchor followed: a reopen with it finds nothing unconfirmed.
        drop(log);
        let options = AuditOptions { anchor: Some(dir.path().join("audit-anchor")), ..AuditOptions::default() };
        let log =
            AuditLog::open_with(&dir.path().join("audit"), KeyRing::new(AuditKey::from_master(&[1; 32])), options)
                .unwrap();
        assert_eq!(log.append(event()).unwrap().seq, 4);
    }

    /// A waiter whose record was in a failed group gets an error, not a hang
    /// or a false success.
    #[test]
    fn a_failed_group_commit_fails_every_record_it_held() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), KeyRing::new(AuditKey::from_master(&[2; 32]))).unwrap();
        log.append(event()).unwrap();
        lock(&log.durable).failed = Some((5, "injected".into()));
        let guard = log.store().unwrap();
        let result = log.make_durable(guard.as_ref().unwrap(), 3);
        assert!(matches!(result, Err(AuditError::Unavailable(ref e)) if e.contains("injected")), "{result:?}");
    }
}
