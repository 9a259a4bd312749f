//! The outbox: device messages (telemetry windows, events) kept until the
//! fleet's end-to-end acknowledgement says they are committed.
//!
//! [`tracker`] is the acknowledgement state machine, without I/O: which
//! message to send next, what an `ack` lets go, what a reconnect re-sends.
//! The durable store and the MQTT link drive it (telemetry issue, next
//! steps).

pub mod tracker;

pub use tracker::{AckOutcome, Entry, MessageKind, Tracker};
