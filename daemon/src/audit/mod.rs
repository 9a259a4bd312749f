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
//!      0     4  magic "RXA1" (format version 1)
//!      4     8  seq, u64 big-endian (same as the key)
//!     12     4  key id, u32 big-endian (which audit key encrypted it)
//!     16    12  AES-GCM nonce = store epoch (4 bytes) ‖ seq (8 bytes)
//!     28    32  SHA-256 of the previous record's whole value (the chain)
//!     60     n  AES-256-GCM ciphertext of the record's JSON, then the 16-byte tag
//! ```
//!
//! The 60-byte header is the AEAD's associated data, so seq, key id, nonce
//! and previous hash are authenticated with the contents. A record's chain
//! hash is the SHA-256 of its whole value. The first record's previous hash
//! is 32 zero bytes, or the hash in the pruning checkpoint.
//!
//! `meta`: `epoch` (4 random bytes chosen when the store is created: nonces
//! are `epoch ‖ seq`, unique for every record a store ever writes under a
//! key) and `checkpoint` (JSON, see [`Checkpoint`]), present once records have
//! been pruned.
//!
//! # Invariants
//!
//! * Sequence numbers are contiguous from the checkpoint's `next_seq` (or 0).
//! * Every record's previous hash is the hash of the record before it.
//! * [`AuditLog::append`] returns only after sled has flushed the record to
//!   disk: no acknowledgement without a durable record.
//! * Key material and decrypted contents never reach logs or error messages.
//!
//! # Crashes
//!
//! * Before the insert: nothing was written, nothing was acknowledged.
//! * After the insert, before the flush returns: the record may or may not be
//!   on disk; it was not acknowledged. sled recovers a prefix of its writes,
//!   so the chain stays contiguous either way, and the next append continues
//!   from whatever record is last.
//! * During pruning: the checkpoint is flushed before any record is removed.
//!   A crash in between leaves records the checkpoint already covers; they are
//!   skipped by verification and removed by the next pruning.
//!
//! # What verification catches
//!
//! A flipped byte anywhere (tag or header check fails), a removed record (gap
//! in the sequence), a reordered or replayed record (its authenticated seq
//! differs from its position), a forged checkpoint (its MAC). Removing records
//! from the *end* leaves a shorter valid chain: that is caught by comparing the
//! chain head with the one reported to the fleet or printed by an earlier
//! `audit verify`.

pub mod keys;

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::aead;
use ring::digest::{digest, SHA256};
use serde::{Deserialize, Serialize};

use keys::{hex, unhex};
pub use keys::{AuditKey, KeyError, KeyRing};

const MAGIC: &[u8; 4] = b"RXA1";
const HEADER_LEN: usize = 60;
const TAG_LEN: usize = 16;
const GENESIS: [u8; 32] = [0; 32];

/// Why the audit log could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The store failed (disk full, I/O error, corrupt database).
    #[error("audit store: {0}")]
    Store(#[from] sled::Error),
    /// Writing an export failed.
    #[error("audit export: {0}")]
    Export(#[from] std::io::Error),
    /// The store's metadata is unreadable.
    #[error("audit store metadata: {0}")]
    Meta(String),
    /// A record could not be read (tampering or a missing key).
    #[error("audit record {seq}: {reason}")]
    Record {
        /// The record's sequence number.
        seq: u64,
        /// What is wrong.
        reason: String,
    },
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
}

/// The audit log of one appliance.
pub struct AuditLog {
    db: sled::Db,
    records: sled::Tree,
    meta: sled::Tree,
    keys: KeyRing,
    epoch: [u8; 4],
    state: Mutex<ChainState>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("keys", &self.keys).finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
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

struct Header {
    seq: u64,
    key_id: u32,
    prev: [u8; 32],
}

fn parse_header(value: &[u8]) -> Option<Header> {
    if value.len() < HEADER_LEN + TAG_LEN || &value[..4] != MAGIC {
        return None;
    }
    let seq = u64::from_be_bytes(value[4..12].try_into().ok()?);
    let key_id = u32::from_be_bytes(value[12..16].try_into().ok()?);
    if value[16 + 4..28] != seq.to_be_bytes() {
        return None; // the nonce must carry the record's own seq
    }
    Some(Header { seq, key_id, prev: value[28..60].try_into().ok()? })
}

impl AuditLog {
    /// Opens (or creates) the audit store in `dir` with `keys`.
    pub fn open(dir: &Path, keys: KeyRing) -> Result<AuditLog, AuditError> {
        let db = open_db(dir)?;
        let records = db.open_tree("records")?;
        let meta = db.open_tree("meta")?;
        let epoch = match meta.get("epoch")? {
            Some(e) => e.as_ref().try_into().map_err(|_| AuditError::Meta("epoch is not 4 bytes".into()))?,
            None => {
                let mut epoch = [0u8; 4];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut epoch)
                    .map_err(|_| AuditError::Meta("no system randomness for the store epoch".into()))?;
                meta.insert("epoch", &epoch)?;
                meta.flush()?;
                epoch
            }
        };
        let log =
            AuditLog { db, records, meta, keys, epoch, state: Mutex::new(ChainState { next_seq: 0, head: GENESIS }) };
        let state = log.recover_state()?;
        *log.state.lock().unwrap_or_else(|p| p.into_inner()) = state;
        Ok(log)
    }

    fn recover_state(&self) -> Result<ChainState, AuditError> {
        if let Some((key, value)) = self.records.last()? {
            let seq = u64::from_be_bytes(
                key.as_ref().try_into().map_err(|_| AuditError::Meta("a record key is not 8 bytes".into()))?,
            );
            return Ok(ChainState { next_seq: seq + 1, head: sha256(&value) });
        }
        match self.checkpoint()? {
            Some(c) => {
                let head = unhex(&c.head_hash)
                    .and_then(|h| h.try_into().ok())
                    .ok_or_else(|| AuditError::Meta("checkpoint head hash is malformed".into()))?;
                Ok(ChainState { next_seq: c.next_seq, head })
            }
            None => Ok(ChainState { next_seq: 0, head: GENESIS }),
        }
    }

    /// The pruning checkpoint, if records were ever pruned.
    pub fn checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        match self.meta.get("checkpoint")? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| AuditError::Meta(format!("checkpoint is unreadable: {e}"))),
        }
    }

    /// The keyed hash the log stores for a prescription reference (to look
    /// a prescription up in an export).
    pub fn pseudonym(&self, rx_ref: &str) -> String {
        self.keys.active().pseudonym(rx_ref)
    }

    /// The next sequence number and the chain head.
    pub fn head(&self) -> (u64, [u8; 32]) {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (state.next_seq, state.head)
    }

    /// Appends a record and returns once it is durable on disk.
    pub fn append(&self, event: AuditEvent) -> Result<Appended, AuditError> {
        let key = self.keys.active();
        let time_ms = now_ms();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let seq = state.next_seq;
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
            prev_hash: hex(&state.head),
        };
        let mut value = Vec::with_capacity(HEADER_LEN + 512);
        value.extend_from_slice(MAGIC);
        value.extend_from_slice(&seq.to_be_bytes());
        value.extend_from_slice(&key.id().to_be_bytes());
        let mut nonce = [0u8; 12];
        nonce[..4].copy_from_slice(&self.epoch);
        nonce[4..].copy_from_slice(&seq.to_be_bytes());
        value.extend_from_slice(&nonce);
        value.extend_from_slice(&state.head);
        let mut body = serde_json::to_vec(&record).expect("audit records serialise");
        key.aead()
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(&value[..HEADER_LEN]),
                &mut body,
            )
            .map_err(|_| AuditError::Record { seq, reason: "encryption failed".into() })?;
        value.extend_from_slice(&body);
        self.records.insert(seq.to_be_bytes(), value.as_slice())?;
        let hash = sha256(&value);
        state.next_seq = seq + 1;
        state.head = hash;
        drop(state);
        // Outside the lock: concurrent appenders share one flush (group commit).
        self.records.flush()?;
        Ok(Appended { seq, hash })
    }

    /// Reads and decrypts one record (`None` if there is no such record).
    pub fn get(&self, seq: u64) -> Result<Option<AuditRecord>, AuditError> {
        match self.records.get(seq.to_be_bytes())? {
            None => Ok(None),
            Some(value) => self
                .open_record(seq, &value)
                .map(|(_, record)| Some(record))
                .map_err(|reason| AuditError::Record { seq, reason }),
        }
    }

    /// Decrypts one stored value, checking its header against `seq`.
    fn open_record(&self, seq: u64, value: &[u8]) -> Result<(Header, AuditRecord), String> {
        let header = parse_header(value).ok_or("malformed record (bad magic, length or nonce)")?;
        if header.seq != seq {
            return Err(format!("record stored at {seq} carries seq {} (moved or replayed)", header.seq));
        }
        let key = self
            .keys
            .get(header.key_id)
            .ok_or(format!("encrypted under key {:08x}, which is not loaded", header.key_id))?;
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

    /// Walks the chain in order, calling `each` on every good record, and
    /// stops at the first bad one.
    fn walk(&self, mut each: impl FnMut(&AuditRecord) -> Result<(), AuditError>) -> Result<VerifyReport, AuditError> {
        let checkpoint = self.checkpoint()?;
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
        for entry in self.records.iter() {
            let (key, value) = entry?;
            let Ok(seq_bytes) = <[u8; 8]>::try_from(key.as_ref()) else {
                report.tamper = Some(Tamper { seq: expected, reason: "a record key is not a sequence number".into() });
                break;
            };
            let seq = u64::from_be_bytes(seq_bytes);
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
            let (header, record) = match self.open_record(seq, &value) {
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

    /// Writes the records with `from_ms <= time_ms < to_ms` as JSON lines to
    /// `out`, then records the export itself. Refuses to export from a chain
    /// that does not verify.
    pub fn export(
        &self,
        from_ms: u64,
        to_ms: u64,
        operator: &str,
        out: &mut dyn Write,
    ) -> Result<ExportSummary, AuditError> {
        let (mut count, mut first_seq, mut last_seq) = (0u64, None, None);
        let report = self.walk(|record| {
            if (from_ms..to_ms).contains(&record.time_ms) {
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
        let mut event = AuditEvent::new(RecordKind::Export);
        event.operator = Some(operator.to_string());
        event.details = serde_json::json!({
            "from": rfc3339(from_ms), "to": rfc3339(to_ms), "count": count, "first_seq": first_seq, "last_seq": last_seq,
        });
        let appended = self.append(event)?;
        Ok(ExportSummary { count, first_seq, last_seq, audit_seq: appended.seq })
    }

    /// Removes records older than `before_ms`, leaving a signed checkpoint so
    /// that the rest of the chain still verifies, and records the pruning.
    pub fn prune(&self, before_ms: u64, operator: &str) -> Result<PruneSummary, AuditError> {
        let mut last: Option<(u64, [u8; 32])> = None;
        let report = self.walk(|_| Ok(()))?;
        if let Some(t) = report.tamper {
            return Err(AuditError::Record { seq: t.seq, reason: format!("{}; refusing to prune", t.reason) });
        }
        let floor = self.checkpoint()?.map_or(0, |c| c.next_seq);
        for entry in self.records.range(floor.to_be_bytes()..) {
            let (key, value) = entry?;
            let seq = u64::from_be_bytes(key.as_ref().try_into().expect("verified keys are 8 bytes"));
            let (_, record) = self.open_record(seq, &value).map_err(|reason| AuditError::Record { seq, reason })?;
            if record.time_ms >= before_ms {
                break;
            }
            last = Some((seq, sha256(&value)));
        }
        let previous = self.checkpoint()?;
        let mut removed = 0;
        let checkpoint = match last {
            // Nothing old enough: no change, and nothing to record.
            None => return Ok(PruneSummary { removed: 0, checkpoint: previous, audit_seq: None }),
            Some((through_seq, hash)) => {
                let key = self.keys.active();
                let pruned_before = previous.as_ref().map_or(0, |c| c.pruned_total);
                let mut checkpoint = Checkpoint {
                    through_seq,
                    next_seq: through_seq + 1,
                    head_hash: hex(&hash),
                    pruned_total: pruned_before + (through_seq + 1 - floor),
                    time: rfc3339(now_ms()),
                    key_id: format!("{:08x}", key.id()),
                    mac: String::new(),
                };
                checkpoint.mac = key.sign_checkpoint(&checkpoint.signed_bytes());
                self.meta.insert("checkpoint", serde_json::to_vec(&checkpoint).expect("checkpoint serialises"))?;
                self.meta.flush()?;
                let mut batch = sled::Batch::default();
                for entry in self.records.range(..=through_seq.to_be_bytes()) {
                    batch.remove(entry?.0);
                    removed += 1;
                }
                self.records.apply_batch(batch)?;
                self.db.flush()?;
                Some(checkpoint)
            }
        };
        let mut event = AuditEvent::new(RecordKind::Retention);
        event.operator = Some(operator.to_string());
        event.details = serde_json::json!({
            "before": rfc3339(before_ms), "removed": removed,
            "through_seq": checkpoint.as_ref().map(|c| c.through_seq),
        });
        let appended = self.append(event)?;
        Ok(PruneSummary { removed, checkpoint, audit_seq: Some(appended.seq) })
    }
}

/// Opens the sled database, waiting up to [`LOCK_WAIT`] for another handle
/// to let go of it (a previous process still exiting, or a test's earlier
/// handle whose background flusher has not stopped yet).
fn open_db(dir: &Path) -> Result<sled::Db, AuditError> {
    let started = std::time::Instant::now();
    loop {
        match sled::Config::new().path(dir).open() {
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                if started.elapsed() >= LOCK_WAIT {
                    return Err(AuditError::Meta(format!(
                        "{} is in use by another process (a running rxvisiond?): {e}",
                        dir.display()
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return Ok(other?),
        }
    }
}

/// How long [`AuditLog::open`] waits for the store's lock.
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Parses `YYYY-MM-DD` (midnight UTC) or an RFC 3339 time into Unix milliseconds.
pub fn parse_time(text: &str) -> Result<u64, String> {
    let full = if text.len() == 10 { format!("{text}T00:00:00Z") } else { text.to_string() };
    humantime::parse_rfc3339_weak(&full)
        .map_err(|e| format!("{text:?} is not a date (YYYY-MM-DD) or RFC 3339 time: {e}"))
        .and_then(|t| t.duration_since(UNIX_EPOCH).map_err(|_| format!("{text:?} is before 1970")))
        .map(|d| d.as_millis() as u64)
}
