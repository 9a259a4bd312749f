//! The durable outbox: a sled store driven by the [`Tracker`].
//!
//! # On-disk format
//!
//! A sled database (`<state_dir>/outbox`, synced as [`crate::durable`]
//! says) with two trees:
//!
//! * `messages`: key = `seq` (u64 big-endian, so iteration is in `seq`
//!   order); value = kind (1 byte: 0 window, 1 event), accepted-at (u64
//!   big-endian Unix milliseconds), then the payload exactly as it is
//!   published.
//! * `meta`: `acked` (u64 BE, the highest acknowledged `seq`) and `next_seq`
//!   (u64 BE, the next `seq` to give out).
//!
//! # Invariants and crashes
//!
//! * A message is synced (with the new `next_seq`) before [`Outbox::push`]
//!   returns, so nothing that was accepted is lost and no `seq` is given out
//!   twice, also across a crash.
//! * An acknowledgement removes its messages and stores `acked` in one sled
//!   batch per tree; a crash before the sync leaves them in the store and
//!   they are sent again (the fleet deduplicates by `(device, seq)`); at the
//!   next open, entries at or below `acked` are removed.
//! * Only one process holds the store (sled's lock).

use std::path::Path;
use std::sync::Mutex;

use crate::durable::{DurableError, SyncedDb};
use crate::outbox::tracker::{AckOutcome, Entry, MessageKind, Tracker};

/// Why the outbox failed.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The store could not be opened, written or synced.
    #[error("outbox store: {0}")]
    Durable(#[from] DurableError),
    /// sled failed.
    #[error("outbox store: {0}")]
    Store(#[from] sled::Error),
    /// A stored record is not in the format above.
    #[error("outbox record {key}: {reason}")]
    Corrupt {
        /// Its key (hex).
        key: String,
        /// What is wrong.
        reason: String,
    },
}

const HEADER: usize = 9;

/// The outbox of one appliance.
pub struct Outbox {
    store: SyncedDb,
    messages: sled::Tree,
    meta: sled::Tree,
    tracker: Mutex<Tracker>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("tracker", &*self.tracker()).finish_non_exhaustive()
    }
}

fn read_u64(meta: &sled::Tree, key: &str) -> Result<Option<u64>, OutboxError> {
    match meta.get(key)? {
        None => Ok(None),
        Some(bytes) => <[u8; 8]>::try_from(bytes.as_ref())
            .map(|b| Some(u64::from_be_bytes(b)))
            .map_err(|_| OutboxError::Corrupt { key: key.into(), reason: "not 8 bytes".into() }),
    }
}

fn decode_entry(key: &[u8], value: &[u8]) -> Result<Entry, OutboxError> {
    let corrupt = |reason: &str| OutboxError::Corrupt {
        key: key.iter().map(|b| format!("{b:02x}")).collect(),
        reason: reason.into(),
    };
    let seq = u64::from_be_bytes(key.try_into().map_err(|_| corrupt("key is not a seq"))?);
    if value.len() < HEADER {
        return Err(corrupt("shorter than its header"));
    }
    let kind = match value[0] {
        0 => MessageKind::Window,
        1 => MessageKind::Event,
        _ => return Err(corrupt("unknown kind")),
    };
    let created_ms = u64::from_be_bytes(value[1..HEADER].try_into().expect("header length checked"));
    Ok(Entry { seq, kind, bytes: (value.len() - HEADER) as u64, created_ms })
}

impl Outbox {
    /// Opens (or creates) the outbox in `dir`; at most `max_in_flight`
    /// messages are sent ahead of the fleet's acknowledgement.
    pub fn open(dir: &Path, max_in_flight: usize) -> Result<Outbox, OutboxError> {
        let store = SyncedDb::open(dir)?;
        let messages = store.db.open_tree("messages")?;
        let meta = store.db.open_tree("meta")?;
        let acked = read_u64(&meta, "acked")?.unwrap_or(0);
        let next_seq = read_u64(&meta, "next_seq")?.unwrap_or(1);
        let mut entries = Vec::new();
        for item in messages.iter() {
            let (key, value) = item?;
            entries.push(decode_entry(&key, &value)?);
        }
        let stale = Tracker::stale_entries(&entries, acked);
        if !stale.is_empty() {
            let mut batch = sled::Batch::default();
            stale.iter().for_each(|seq| batch.remove(&seq.to_be_bytes()));
            messages.apply_batch(batch)?;
            store.sync()?;
        }
        let tracker = Tracker::recover(entries, acked, next_seq, max_in_flight);
        Ok(Outbox { store, messages, meta, tracker: Mutex::new(tracker) })
    }

    fn tracker(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accepts a message: `build(seq)` makes its payload (which carries the
    /// `seq`); returns once it is durable.
    pub fn push(&self, kind: MessageKind, now_ms: u64, build: impl FnOnce(u64) -> Vec<u8>) -> Result<u64, OutboxError> {
        let mut tracker = self.tracker();
        let seq = tracker.next_seq();
        let payload = build(seq);
        let mut value = Vec::with_capacity(HEADER + payload.len());
        value.push(match kind {
            MessageKind::Window => 0,
            MessageKind::Event => 1,
        });
        value.extend_from_slice(&now_ms.to_be_bytes());
        value.extend_from_slice(&payload);
        self.messages.insert(seq.to_be_bytes(), value)?;
        self.meta.insert("next_seq", &(seq + 1).to_be_bytes())?;
        self.store.sync()?;
        let entry = tracker.append(kind, payload.len() as u64, now_ms);
        debug_assert_eq!(entry.seq, seq);
        Ok(seq)
    }

    /// The next message to publish (its `seq` and payload), when the link is
    /// up and the in-flight window allows.
    pub fn next_to_send(&self) -> Result<Option<(u64, Vec<u8>)>, OutboxError> {
        let Some(entry) = self.tracker().next_to_send() else { return Ok(None) };
        match self.messages.get(entry.seq.to_be_bytes())? {
            Some(value) if value.len() >= HEADER => Ok(Some((entry.seq, value[HEADER..].to_vec()))),
            _ => Err(OutboxError::Corrupt {
                key: format!("{:016x}", entry.seq),
                reason: "missing from the store".into(),
            }),
        }
    }

    /// `seq` was handed to the link.
    pub fn sent(&self, seq: u64) {
        self.tracker().sent(seq);
    }

    /// The link is up: sending starts at the oldest unacknowledged message.
    pub fn connected(&self) {
        self.tracker().connected();
    }

    /// The link is down.
    pub fn disconnected(&self) {
        self.tracker().disconnected();
    }

    /// The fleet committed everything up to `seq`: those messages go (durably).
    pub fn ack(&self, seq: u64) -> Result<AckOutcome, OutboxError> {
        let mut tracker = self.tracker();
        let outcome = tracker.ack(seq);
        if let AckOutcome::Committed { removed, acked } = &outcome {
            let mut batch = sled::Batch::default();
            removed.iter().for_each(|seq| batch.remove(&seq.to_be_bytes()));
            self.messages.apply_batch(batch)?;
            self.meta.insert("acked", &acked.to_be_bytes())?;
            self.store.sync()?;
        }
        Ok(outcome)
    }

    /// Messages waiting, their bytes, the oldest one's acceptance time and
    /// the highest acknowledged `seq`.
    pub fn depth(&self) -> (usize, u64, Option<u64>, u64) {
        let tracker = self.tracker();
        (tracker.depth(), tracker.bytes(), tracker.oldest_created_ms(), tracker.acked())
    }
}
