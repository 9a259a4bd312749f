//! The RxVision fleet server (`rxfleet`).
//!
//! This crate holds the telemetry ingest of the fleet: appliance messages
//! from the MQTT broker into the fleet's database (SQLite or PostgreSQL),
//! the end-to-end acknowledgement back to each appliance, and chain-head
//! anchoring of every appliance's audit log. See `shared/design/SYSTEM.md`
//! ("Fleet server") and `docs/protocol.md`.
//!
//! # Layout
//!
//! * [`config`] — `rxfleet.toml` (annotated default in `firmware-cfg/`).
//! * [`classify`] — a broker message → a valid payload or a counted refusal (pure).
//! * [`chain`] — does a reported audit chain head continue the history? (pure).
//! * [`db`] — the database: migrations, the batch commit with deduplication
//!   and acknowledgement, and the queries the commands print.
//! * [`ingest`] — the MQTT session: batches in, commits, acks out.

pub mod chain;
pub mod classify;
pub mod config;
pub mod db;
pub mod ingest;
