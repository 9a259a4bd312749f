//! Acknowledgement tracking and the budget policy of the outbox, as a state
//! machine without I/O (modelled on rumqttc's `MqttState`: methods change
//! the state and say what to do; the caller does it).
//!
//! # Identity and sequence numbers
//!
//! A message the outbox accepts gets a local `id` (its place in the queue).
//! Its protocol `seq` is given only when it is first handed to the link
//! ([`Tracker::assign`]), in queue order: 1, 2, … without gaps, never reused
//! (the store keeps the next one). So the fleet sees every `seq` and can
//! acknowledge "everything up to `seq`", and the budget policy may merge or
//! drop messages that were never sent without leaving holes. A message that
//! has a `seq` may have reached the fleet: it is never merged or dropped.
//!
//! # Sending and acknowledgement
//!
//! Messages are sent in queue order, at most [`Tracker::max_in_flight`]
//! beyond the last acknowledgement, and stay until an `ack` at or above
//! their `seq` arrives: the fleet's `ack` means "committed to my database",
//! so that is the only thing that removes a message. A (re)connect starts
//! again at the oldest unacknowledged message; the fleet deduplicates by
//! `(device, seq)`.
//!
//! # The budget
//!
//! When the queue's bytes exceed the budget, [`Tracker::next_budget_action`]
//! names one step at a time, among messages not yet sent: merge the two
//! adjacent windows that hold the fewest base windows (oldest first), so old
//! windows grow coarser evenly; when no two windows are adjacent, drop the
//! oldest unsent window; only when no unsent window is left, drop the
//! oldest unsent event. Every merge and drop is counted ([`Losses`]) and the
//! counts travel upstream in every window; a dropped event is also announced
//! by an `outbox_overflow` event.
//!
//! # What the caller persists
//!
//! Each [`Entry`] when [`Tracker::append`] returns it; the `seq` and the next
//! `seq` when [`Tracker::assign`] returns (before publishing); the merges,
//! drops and loss counts it applies; the removals and the acknowledged `seq`
//! an [`AckOutcome`] names. After a crash [`Tracker::recover`] takes what the
//! store holds; messages whose removal did not reach the disk are sent again.

use std::collections::VecDeque;

/// What a message is (the budget policy treats them differently).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// A telemetry window (may be merged into a coarser one).
    Window,
    /// An event (dropped only when nothing else is left to drop, and counted).
    Event,
}

/// One message waiting for its acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Its place in the queue.
    pub id: u64,
    /// Its protocol `seq`, once it was handed to the link.
    pub seq: Option<u64>,
    /// Window or event.
    pub kind: MessageKind,
    /// How many base windows it holds (1 for a new window, more once merged; 0 for an event).
    pub windows: u32,
    /// Size of the stored payload.
    pub bytes: u64,
    /// When it was accepted (Unix milliseconds), for the oldest-unacked age.
    pub created_ms: u64,
}

/// What the budget policy gave up, cumulative over the outbox's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Losses {
    /// Windows merged into a neighbour.
    pub merged_windows: u64,
    /// Windows dropped.
    pub dropped_windows: u64,
    /// Events dropped.
    pub dropped_events: u64,
}

/// One step of the budget policy, for the caller to carry out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetAction {
    /// Merge window `from` into the later window `into` (then [`Tracker::merged`]).
    Merge {
        /// The earlier window, which disappears.
        from: u64,
        /// The later window, which holds both afterwards.
        into: u64,
    },
    /// Drop message `id` (then [`Tracker::dropped`]).
    Drop {
        /// The message.
        id: u64,
    },
}

/// What an acknowledgement did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckOutcome {
    /// These messages are committed by the fleet: remove them (by `id`), and
    /// store `acked` as the highest acknowledged `seq`.
    Committed {
        /// Ids to remove, in queue order.
        removed: Vec<u64>,
        /// The new highest acknowledged `seq`.
        acked: u64,
    },
    /// Not above what was already acknowledged (a replayed or retained ack): nothing to do.
    Stale,
    /// Above any `seq` this device ever gave out: a confused or forged ack,
    /// ignored (a fleet must never make a device forget what it has not sent).
    Ahead {
        /// The highest `seq` given out.
        highest: u64,
    },
}

/// What the store keeps of the tracker, to [`Tracker::recover`] from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Persisted {
    /// The queued entries (any order).
    pub entries: Vec<Entry>,
    /// The highest acknowledged `seq`.
    pub acked: u64,
    /// The next `seq` to give out (0 or 1 for a new outbox).
    pub next_seq: u64,
    /// The next queue id to give out (0 or 1 for a new outbox).
    pub next_id: u64,
    /// What the budget policy gave up so far.
    pub losses: Losses,
}

/// The outbox's state.
#[derive(Debug, Clone)]
pub struct Tracker {
    next_id: u64,
    next_seq: u64,
    acked: u64,
    /// Unacknowledged messages in queue order; those with a `seq` come first.
    pending: VecDeque<Entry>,
    /// Sent on the current connection through this `seq`.
    sent_through: u64,
    connected: bool,
    max_in_flight: usize,
    losses: Losses,
}

impl Tracker {
    /// A new, empty outbox.
    pub fn new(max_in_flight: usize) -> Tracker {
        Tracker::recover(Persisted::default(), max_in_flight)
    }

    /// The state after a restart, from what the store holds. Entries
    /// acknowledged already (a removal that did not reach the disk) are left
    /// out: see [`Tracker::stale_entries`]. Neither a queue id nor a `seq` is
    /// ever given twice, whatever the counters say.
    pub fn recover(persisted: Persisted, max_in_flight: usize) -> Tracker {
        let Persisted { mut entries, acked, next_seq, next_id, losses } = persisted;
        entries.sort_by_key(|e| e.id);
        let highest_id = entries.last().map_or(0, |e| e.id);
        let highest_seq = entries.iter().filter_map(|e| e.seq).max().unwrap_or(0);
        Tracker {
            next_id: next_id.max(highest_id + 1),
            next_seq: next_seq.max(highest_seq + 1).max(acked + 1),
            acked,
            pending: entries.into_iter().filter(|e| e.seq.is_none_or(|s| s > acked)).collect(),
            sent_through: acked,
            connected: false,
            max_in_flight: max_in_flight.max(1),
            losses,
        }
    }

    /// Entries a store holds that are acknowledged already.
    pub fn stale_entries(entries: &[Entry], acked: u64) -> Vec<u64> {
        entries.iter().filter(|e| e.seq.is_some_and(|s| s <= acked)).map(|e| e.id).collect()
    }

    /// Accepts a message: returns its entry to persist.
    pub fn append(&mut self, kind: MessageKind, bytes: u64, now_ms: u64) -> Entry {
        let windows = u32::from(kind == MessageKind::Window);
        let entry = Entry { id: self.next_id, seq: None, kind, windows, bytes, created_ms: now_ms };
        self.next_id += 1;
        self.pending.push_back(entry);
        entry
    }

    /// A connection came up: sending starts again at the oldest unacknowledged message.
    pub fn connected(&mut self) {
        self.connected = true;
        self.sent_through = self.acked;
    }

    /// No acknowledgement came for too long: send again from the oldest
    /// unacknowledged message (a broker can accept a message and lose it —
    /// a crash without persistence — and only the fleet's `ack` says it arrived).
    pub fn rewind(&mut self) {
        self.sent_through = self.acked;
    }

    /// Whether messages were sent and are waiting for their acknowledgement.
    pub fn awaiting_ack(&self) -> bool {
        self.pending.front().and_then(|e| e.seq).is_some_and(|seq| seq <= self.sent_through)
    }

    /// The connection went down: nothing is sent until it is back.
    pub fn disconnected(&mut self) {
        self.connected = false;
    }

    /// The next message to publish, if the link is up and the in-flight
    /// window allows. Without a `seq` yet, the caller [`Tracker::assign`]s
    /// one (and persists it) first; then publishes and calls [`Tracker::sent`].
    pub fn next_to_send(&self) -> Option<Entry> {
        if !self.connected {
            return None;
        }
        let in_flight = self.pending.iter().take_while(|e| e.seq.is_some_and(|s| s <= self.sent_through)).count();
        if in_flight >= self.max_in_flight {
            return None;
        }
        self.pending.iter().find(|e| e.seq.is_none_or(|s| s > self.sent_through)).copied()
    }

    /// Gives message `id` — the first without a `seq` — the next `seq`.
    pub fn assign(&mut self, id: u64) -> Option<u64> {
        let entry = self.pending.iter_mut().find(|e| e.seq.is_none())?;
        if entry.id != id {
            return None;
        }
        let seq = self.next_seq;
        entry.seq = Some(seq);
        self.next_seq += 1;
        Some(seq)
    }

    /// `seq` was handed to the link.
    pub fn sent(&mut self, seq: u64) {
        if self.connected && seq > self.sent_through {
            self.sent_through = seq;
        }
    }

    /// The fleet acknowledged everything up to `seq`.
    pub fn ack(&mut self, seq: u64) -> AckOutcome {
        let highest = self.next_seq - 1;
        if seq > highest {
            return AckOutcome::Ahead { highest };
        }
        if seq <= self.acked {
            return AckOutcome::Stale;
        }
        let mut removed = Vec::new();
        while self.pending.front().is_some_and(|e| e.seq.is_some_and(|s| s <= seq)) {
            removed.push(self.pending.pop_front().expect("checked").id);
        }
        self.acked = seq;
        self.sent_through = self.sent_through.max(seq);
        AckOutcome::Committed { removed, acked: seq }
    }

    /// The next step to bring the queue within `budget` bytes, if it is over
    /// and something unsent is left to merge or drop (see the module documentation).
    pub fn next_budget_action(&self, budget: u64) -> Option<BudgetAction> {
        if self.bytes() <= budget {
            return None;
        }
        let unsent: Vec<&Entry> = self.pending.iter().filter(|e| e.seq.is_none()).collect();
        let merge = unsent
            .windows(2)
            .filter(|pair| pair[0].kind == MessageKind::Window && pair[1].kind == MessageKind::Window)
            .min_by_key(|pair| (pair[0].windows + pair[1].windows, pair[0].id));
        if let Some(pair) = merge {
            return Some(BudgetAction::Merge { from: pair[0].id, into: pair[1].id });
        }
        let window = unsent.iter().find(|e| e.kind == MessageKind::Window);
        window.or_else(|| unsent.first()).map(|e| BudgetAction::Drop { id: e.id })
    }

    /// Window `from` was merged into `into`, which now takes `bytes`.
    pub fn merged(&mut self, from: u64, into: u64, bytes: u64) {
        let Some(position) = self.pending.iter().position(|e| e.id == from && e.seq.is_none()) else { return };
        let absorbed = self.pending.remove(position).expect("found");
        if let Some(target) = self.pending.iter_mut().find(|e| e.id == into) {
            target.windows += absorbed.windows;
            target.bytes = bytes;
            target.created_ms = target.created_ms.min(absorbed.created_ms);
        }
        self.losses.merged_windows += u64::from(absorbed.windows);
    }

    /// Message `id` was dropped.
    pub fn dropped(&mut self, id: u64) {
        let Some(position) = self.pending.iter().position(|e| e.id == id && e.seq.is_none()) else { return };
        let entry = self.pending.remove(position).expect("found");
        match entry.kind {
            MessageKind::Window => self.losses.dropped_windows += u64::from(entry.windows),
            MessageKind::Event => self.losses.dropped_events += 1,
        }
    }

    /// Unacknowledged messages.
    pub fn depth(&self) -> usize {
        self.pending.len()
    }

    /// Their size in bytes.
    pub fn bytes(&self) -> u64 {
        self.pending.iter().map(|e| e.bytes).sum()
    }

    /// When the oldest of them was accepted.
    pub fn oldest_created_ms(&self) -> Option<u64> {
        self.pending.iter().map(|e| e.created_ms).min()
    }

    /// The queue id the next [`Tracker::append`] gives.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// The highest acknowledged `seq`.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The next `seq` to give out.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// What the budget policy gave up so far.
    pub fn losses(&self) -> Losses {
        self.losses
    }

    /// The unacknowledged entries, in queue order.
    pub fn pending(&self) -> impl Iterator<Item = &Entry> {
        self.pending.iter()
    }

    /// The entry of `id`, if it is still queued.
    pub fn get(&self, id: u64) -> Option<Entry> {
        self.pending.iter().find(|e| e.id == id).copied()
    }

    /// The most messages in flight.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }
}
