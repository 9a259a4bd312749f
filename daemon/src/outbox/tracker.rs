//! Acknowledgement tracking for the outbox, as a state machine without I/O
//! (modelled on rumqttc's `MqttState`: methods change the state and say
//! what to do; the caller does it).
//!
//! Every message the outbox accepts gets the device's next `seq` (1, 2, …;
//! never reused, also across restarts: the store remembers the next one).
//! Messages are sent in `seq` order, at most [`Tracker::max_in_flight`]
//! beyond the last acknowledgement, and stay until an `ack` with a `seq` at
//! or above theirs arrives: the fleet's `ack` means "committed to my
//! database", so that is the only thing that removes a message. A
//! (re)connect starts sending again from the oldest unacknowledged message;
//! the fleet deduplicates by `(device, seq)`.
//!
//! What the caller persists: each [`Entry`] when [`Tracker::append`]
//! returns it (before it is sent), and the removals and the acknowledged
//! `seq` an [`AckOutcome`] names. After a crash, [`Tracker::recover`] takes
//! what the store holds; messages whose removal did not reach the disk are
//! simply sent again.

use std::collections::VecDeque;

/// What a message is (the budget policy treats them differently).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// A telemetry window (may be merged into a coarser one).
    Window,
    /// An event (never dropped silently).
    Event,
}

/// One message waiting for its acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The device's message sequence number.
    pub seq: u64,
    /// Window or event.
    pub kind: MessageKind,
    /// Size of the stored payload.
    pub bytes: u64,
    /// When it was accepted (Unix milliseconds), for the oldest-unacked age.
    pub created_ms: u64,
}

/// What an acknowledgement did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckOutcome {
    /// These messages are committed by the fleet: remove them, and store
    /// `acked` as the highest acknowledged `seq`.
    Committed {
        /// Sequence numbers to remove, ascending.
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

/// The outbox's acknowledgement state.
#[derive(Debug, Clone)]
pub struct Tracker {
    /// The next `seq` to give out.
    next_seq: u64,
    /// Everything at or below this is acknowledged and gone.
    acked: u64,
    /// Unacknowledged messages in `seq` order.
    pending: VecDeque<Entry>,
    /// Sent on the current connection: the next to send is the first pending above this.
    sent_through: u64,
    /// Whether a connection is up.
    connected: bool,
    /// Messages sent but not acknowledged at most (so a reconnect does not flood the broker).
    max_in_flight: usize,
}

impl Tracker {
    /// A new, empty outbox.
    pub fn new(max_in_flight: usize) -> Tracker {
        Tracker::recover(Vec::new(), 0, 1, max_in_flight)
    }

    /// The state after a restart, from what the store holds: its pending
    /// entries (any order), the highest acknowledged `seq` and the next `seq`
    /// it would give out. Entries at or below `acked` (a removal that did not
    /// reach the disk) are dropped here and named by [`Tracker::stale_entries`].
    pub fn recover(mut entries: Vec<Entry>, acked: u64, next_seq: u64, max_in_flight: usize) -> Tracker {
        entries.sort_by_key(|e| e.seq);
        let highest = entries.last().map_or(0, |e| e.seq);
        Tracker {
            next_seq: next_seq.max(highest + 1).max(acked + 1),
            acked,
            pending: entries.into_iter().filter(|e| e.seq > acked).collect(),
            sent_through: acked,
            connected: false,
            max_in_flight: max_in_flight.max(1),
        }
    }

    /// Accepts a message: returns its entry (with its `seq`) to persist
    /// before it may be sent.
    pub fn append(&mut self, kind: MessageKind, bytes: u64, now_ms: u64) -> Entry {
        let entry = Entry { seq: self.next_seq, kind, bytes, created_ms: now_ms };
        self.next_seq += 1;
        self.pending.push_back(entry);
        entry
    }

    /// A connection came up: sending starts again at the oldest unacknowledged message.
    pub fn connected(&mut self) {
        self.connected = true;
        self.sent_through = self.acked;
    }

    /// The connection went down: nothing is sent until it is back.
    pub fn disconnected(&mut self) {
        self.connected = false;
    }

    /// The next message to publish, if the link is up and the in-flight
    /// window allows; the caller publishes it and calls [`Tracker::sent`].
    pub fn next_to_send(&self) -> Option<Entry> {
        if !self.connected {
            return None;
        }
        let in_flight = self.pending.iter().take_while(|e| e.seq <= self.sent_through).count();
        if in_flight >= self.max_in_flight {
            return None;
        }
        self.pending.iter().find(|e| e.seq > self.sent_through).copied()
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
        while self.pending.front().is_some_and(|e| e.seq <= seq) {
            removed.push(self.pending.pop_front().expect("checked").seq);
        }
        self.acked = seq;
        self.sent_through = self.sent_through.max(seq);
        AckOutcome::Committed { removed, acked: seq }
    }

    /// Entries a store holds at or below `acked` (their removal was lost in a crash).
    pub fn stale_entries(entries: &[Entry], acked: u64) -> Vec<u64> {
        entries.iter().filter(|e| e.seq <= acked).map(|e| e.seq).collect()
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
        self.pending.front().map(|e| e.created_ms)
    }

    /// The highest acknowledged `seq`.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The next `seq` to give out (persisted with every append).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The unacknowledged entries, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = &Entry> {
        self.pending.iter()
    }

    /// The most messages in flight.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }
}
