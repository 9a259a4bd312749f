//! The durable outbox: a sled store driven by the [`Tracker`].
//!
//! # On-disk format
//!
//! A sled database (`<state_dir>/outbox`, synced as [`crate::durable`]
//! says) with two trees:
//!
//! * `messages`: key = the message's queue id (u64 big-endian, so iteration
//!   is in queue order); value = kind (1 byte: 0 window, 1 event),
//!   accepted-at (u64 BE, Unix ms), `seq` (u64 BE, 0 until it is first sent),
//!   base windows held (u32 BE), then the payload as the caller stored it
//!   (without its `seq`: the caller's `finalize` puts it in when sending).
//! * `meta`: `acked`, `next_seq` and `next_id` (u64 BE each) and `losses`
//!   (three u64 BE: merged windows, dropped windows, dropped events).
//!
//! # Invariants and crashes
//!
//! * A message is synced before [`Outbox::push`] returns: nothing accepted
//!   is lost.
//! * A `seq` is synced with the new `next_seq` before the message carrying
//!   it is handed to the link: no `seq` is given twice, also across a crash.
//! * A budget step (merge or drop) and its loss count are one transaction
//!   over both trees, synced before the next step reads the store.
//! * An acknowledgement removes its messages and stores `acked` in one
//!   transaction; a crash before the sync leaves them in the store, and they
//!   are sent again (the fleet deduplicates by `(device, seq)`); at the next
//!   open, entries at or below `acked` are removed.
//! * Only one process holds the store (sled's lock).

use std::path::Path;
use std::sync::Mutex;

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::durable::{DurableError, SyncedDb};
use crate::outbox::tracker::{AckOutcome, BudgetAction, Entry, Losses, MessageKind, Persisted, Tracker};

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
    /// The caller's `finalize` or `merge` refused a stored payload.
    #[error("outbox message {id}: {reason}")]
    Payload {
        /// The message's queue id.
        id: u64,
        /// What is wrong.
        reason: String,
    },
}

impl From<TransactionError<sled::Error>> for OutboxError {
    fn from(e: TransactionError<sled::Error>) -> OutboxError {
        match e {
            TransactionError::Abort(e) | TransactionError::Storage(e) => OutboxError::Store(e),
        }
    }
}

const HEADER: usize = 21;

fn encode_record(entry: &Entry, payload: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(HEADER + payload.len());
    value.push(match entry.kind {
        MessageKind::Window => 0,
        MessageKind::Event => 1,
    });
    value.extend_from_slice(&entry.created_ms.to_be_bytes());
    value.extend_from_slice(&entry.seq.unwrap_or(0).to_be_bytes());
    value.extend_from_slice(&entry.windows.to_be_bytes());
    value.extend_from_slice(payload);
    value
}

fn decode_record(key: &[u8], value: &[u8]) -> Result<Entry, OutboxError> {
    let corrupt = |reason: &str| OutboxError::Corrupt {
        key: key.iter().map(|b| format!("{b:02x}")).collect(),
        reason: reason.into(),
    };
    let id = u64::from_be_bytes(key.try_into().map_err(|_| corrupt("key is not a queue id"))?);
    if value.len() < HEADER {
        return Err(corrupt("shorter than its header"));
    }
    let kind = match value[0] {
        0 => MessageKind::Window,
        1 => MessageKind::Event,
        _ => return Err(corrupt("unknown kind")),
    };
    let u64_at = |at: usize| u64::from_be_bytes(value[at..at + 8].try_into().expect("header length checked"));
    let seq = u64_at(9);
    Ok(Entry {
        id,
        seq: (seq != 0).then_some(seq),
        kind,
        windows: u32::from_be_bytes(value[17..21].try_into().expect("header length checked")),
        bytes: (value.len() - HEADER) as u64,
        created_ms: u64_at(1),
    })
}

fn losses_bytes(losses: Losses) -> Vec<u8> {
    [losses.merged_windows, losses.dropped_windows, losses.dropped_events]
        .iter()
        .flat_map(|n| n.to_be_bytes())
        .collect()
}

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

impl Outbox {
    /// Opens (or creates) the outbox in `dir`; at most `max_in_flight`
    /// messages are sent ahead of the fleet's acknowledgement.
    pub fn open(dir: &Path, max_in_flight: usize) -> Result<Outbox, OutboxError> {
        let store = SyncedDb::open(dir)?;
        let messages = store.db.open_tree("messages")?;
        let meta = store.db.open_tree("meta")?;
        let acked = read_u64(&meta, "acked")?.unwrap_or(0);
        let next_seq = read_u64(&meta, "next_seq")?.unwrap_or(1);
        let next_id = read_u64(&meta, "next_id")?.unwrap_or(1);
        let losses = match meta.get("losses")? {
            None => Losses::default(),
            Some(bytes) if bytes.len() == 24 => {
                let n = |i: usize| u64::from_be_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("length checked"));
                Losses { merged_windows: n(0), dropped_windows: n(1), dropped_events: n(2) }
            }
            Some(_) => return Err(OutboxError::Corrupt { key: "losses".into(), reason: "not 24 bytes".into() }),
        };
        let mut entries = Vec::new();
        for item in messages.iter() {
            let (key, value) = item?;
            entries.push(decode_record(&key, &value)?);
        }
        let stale = Tracker::stale_entries(&entries, acked);
        if !stale.is_empty() {
            let mut batch = sled::Batch::default();
            stale.iter().for_each(|id| batch.remove(&id.to_be_bytes()));
            messages.apply_batch(batch)?;
            store.sync()?;
        }
        let tracker = Tracker::recover(Persisted { entries, acked, next_seq, next_id, losses }, max_in_flight);
        Ok(Outbox { store, messages, meta, tracker: Mutex::new(tracker) })
    }

    fn tracker(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accepts a message (its payload without a `seq`); returns its queue id
    /// once it is durable.
    pub fn push(&self, kind: MessageKind, now_ms: u64, payload: &[u8]) -> Result<u64, OutboxError> {
        self.push_marked(kind, now_ms, payload, None)
    }

    /// Accepts the events found in the audit records `[.., audit_through)`
    /// and the telemetry window that counted them (events first), with the
    /// audit mark, in one transaction: after a crash the next window counts
    /// exactly the records no stored window counted, and no event is
    /// announced twice ([`Outbox::audit_through`]).
    pub fn push_window(
        &self,
        now_ms: u64,
        events: &[Vec<u8>],
        window: &[u8],
        audit_through: u64,
    ) -> Result<u64, OutboxError> {
        let mut messages: Vec<(MessageKind, &[u8])> =
            events.iter().map(|e| (MessageKind::Event, e.as_slice())).collect();
        messages.push((MessageKind::Window, window));
        let ids = self.push_all(&messages, now_ms, Some(audit_through))?;
        Ok(*ids.last().expect("the window was pushed"))
    }

    /// The audit sequence number the last stored window counted up to
    /// (exclusive); `None` before the first window.
    pub fn audit_through(&self) -> Result<Option<u64>, OutboxError> {
        read_u64(&self.meta, "audit_through")
    }

    /// Sets the audit mark (the chain position telemetry counts from) of a
    /// new outbox, or of one whose audit store was restored, durably.
    pub fn start_audit_mark(&self, audit_through: u64) -> Result<(), OutboxError> {
        let _tracker = self.tracker();
        self.meta.insert("audit_through", &audit_through.to_be_bytes())?;
        self.store.sync()?;
        Ok(())
    }

    fn push_marked(
        &self,
        kind: MessageKind,
        now_ms: u64,
        payload: &[u8],
        audit_through: Option<u64>,
    ) -> Result<u64, OutboxError> {
        Ok(self.push_all(&[(kind, payload)], now_ms, audit_through)?[0])
    }

    /// Stores messages (and the audit mark) in one transaction; the tracker
    /// learns of them only once they are durable.
    fn push_all(
        &self,
        messages: &[(MessageKind, &[u8])],
        now_ms: u64,
        audit_through: Option<u64>,
    ) -> Result<Vec<u64>, OutboxError> {
        let mut tracker = self.tracker();
        let first = tracker.next_id();
        let records: Vec<(u64, Vec<u8>)> = messages
            .iter()
            .enumerate()
            .map(|(i, (kind, payload))| {
                let entry = Entry {
                    id: first + i as u64,
                    seq: None,
                    kind: *kind,
                    windows: u32::from(*kind == MessageKind::Window),
                    bytes: payload.len() as u64,
                    created_ms: now_ms,
                };
                (entry.id, encode_record(&entry, payload))
            })
            .collect();
        let next_id = first + messages.len() as u64;
        (&self.messages, &self.meta).transaction(|(tree, meta)| {
            for (id, record) in &records {
                tree.insert(&id.to_be_bytes(), record.as_slice())?;
            }
            meta.insert("next_id", &next_id.to_be_bytes())?;
            if let Some(through) = audit_through {
                meta.insert("audit_through", &through.to_be_bytes())?;
            }
            Ok::<(), ConflictableTransactionError<sled::Error>>(())
        })?;
        self.store.sync()?;
        Ok(messages.iter().map(|(kind, payload)| tracker.append(*kind, payload.len() as u64, now_ms).id).collect())
    }

    /// The next message to publish: its `seq` (given and synced now if it
    /// had none), its kind (which says its topic) and its payload as
    /// `finalize(kind, seq, stored)` makes it.
    pub fn next_to_send(
        &self,
        finalize: impl FnOnce(MessageKind, u64, &[u8]) -> Result<Vec<u8>, String>,
    ) -> Result<Option<(u64, MessageKind, Vec<u8>)>, OutboxError> {
        let mut tracker = self.tracker();
        let Some(entry) = tracker.next_to_send() else { return Ok(None) };
        let key = entry.id.to_be_bytes();
        let value = self.messages.get(key)?.ok_or_else(|| OutboxError::Corrupt {
            key: format!("{:016x}", entry.id),
            reason: "missing from the store".into(),
        })?;
        let seq = match entry.seq {
            Some(seq) => seq,
            None => {
                let seq = tracker.assign(entry.id).expect("the next unsent message is the first without a seq");
                let assigned = Entry { seq: Some(seq), ..entry };
                self.messages.insert(key, encode_record(&assigned, &value[HEADER..]))?;
                self.meta.insert("next_seq", &(seq + 1).to_be_bytes())?;
                self.store.sync()?;
                seq
            }
        };
        let payload = finalize(entry.kind, seq, &value[HEADER..])
            .map_err(|reason| OutboxError::Payload { id: entry.id, reason })?;
        Ok(Some((seq, entry.kind, payload)))
    }

    /// `seq` was handed to the link.
    pub fn sent(&self, seq: u64) {
        self.tracker().sent(seq);
    }

    /// The link is up: sending starts at the oldest unacknowledged message.
    pub fn connected(&self) {
        self.tracker().connected();
    }

    /// No acknowledgement for too long: send again from the oldest unacknowledged message.
    pub fn rewind(&self) {
        self.tracker().rewind();
    }

    /// Whether sent messages are waiting for their acknowledgement.
    pub fn awaiting_ack(&self) -> bool {
        self.tracker().awaiting_ack()
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
            (&self.messages, &self.meta).transaction(|(messages, meta)| {
                for id in removed {
                    messages.remove(&id.to_be_bytes())?;
                }
                meta.insert("acked", &acked.to_be_bytes())?;
                Ok::<(), ConflictableTransactionError<sled::Error>>(())
            })?;
            self.store.sync()?;
        }
        Ok(outcome)
    }

    /// Brings the queue within `budget` bytes by merging unsent windows
    /// (`merge(earlier, later)` makes the payload of both) and, if that is
    /// not enough, dropping unsent messages; returns the steps taken.
    pub fn enforce_budget(
        &self,
        budget: u64,
        merge: impl Fn(&[u8], &[u8]) -> Result<Vec<u8>, String>,
    ) -> Result<Vec<BudgetAction>, OutboxError> {
        let mut tracker = self.tracker();
        let mut steps = Vec::new();
        while let Some(action) = tracker.next_budget_action(budget) {
            match action {
                BudgetAction::Merge { from, into } => {
                    let read = |id: u64| {
                        self.messages.get(id.to_be_bytes())?.ok_or_else(|| OutboxError::Corrupt {
                            key: format!("{id:016x}"),
                            reason: "missing from the store".into(),
                        })
                    };
                    let (earlier, later) = (read(from)?, read(into)?);
                    let payload = merge(&earlier[HEADER..], &later[HEADER..])
                        .map_err(|reason| OutboxError::Payload { id: into, reason })?;
                    let mut after = tracker.clone();
                    after.merged(from, into, payload.len() as u64);
                    let target = after.get(into).expect("merged into a queued window");
                    let record = encode_record(&target, &payload);
                    let losses = losses_bytes(after.losses());
                    (&self.messages, &self.meta).transaction(|(messages, meta)| {
                        messages.remove(&from.to_be_bytes())?;
                        messages.insert(&into.to_be_bytes(), record.clone())?;
                        meta.insert("losses", losses.clone())?;
                        Ok::<(), ConflictableTransactionError<sled::Error>>(())
                    })?;
                    self.store.sync()?;
                    *tracker = after;
                }
                BudgetAction::Drop { id } => {
                    let mut after = tracker.clone();
                    after.dropped(id);
                    let losses = losses_bytes(after.losses());
                    (&self.messages, &self.meta).transaction(|(messages, meta)| {
                        messages.remove(&id.to_be_bytes())?;
                        meta.insert("losses", losses.clone())?;
                        Ok::<(), ConflictableTransactionError<sled::Error>>(())
                    })?;
                    self.store.sync()?;
                    *tracker = after;
                }
            }
            steps.push(action);
        }
        Ok(steps)
    }

    /// Messages waiting, their bytes, the oldest one's acceptance time and
    /// the highest acknowledged `seq`.
    pub fn depth(&self) -> (usize, u64, Option<u64>, u64) {
        let tracker = self.tracker();
        (tracker.depth(), tracker.bytes(), tracker.oldest_created_ms(), tracker.acked())
    }

    /// What the budget policy gave up so far.
    pub fn losses(&self) -> Losses {
        self.tracker().losses()
    }
}
