//! The outbox: device messages (telemetry windows, events) kept until the
//! fleet's end-to-end acknowledgement says they are committed.
//!
//! [`tracker`] is the acknowledgement state machine, without I/O: which
//! message to send next, what an `ack` lets go, what a reconnect re-sends.
//! and the budget policy (merge old unsent windows, then drop, all counted).
//! [`store`] keeps the messages durable (sled, synced like the audit log)
//! and drives the tracker; [`crate::link`] sends it.

pub mod store;
pub mod tracker;

pub use store::{Outbox, OutboxError};
pub use tracker::{AckOutcome, BudgetAction, Entry, Losses, MessageKind, Persisted, Tracker};
