//! The RxVision fleet server (`rxfleet`).
//!
//! One binary runs a whole fleet (`rxfleet serve`): the managed MQTT broker,
//! the telemetry ingest (appliance messages into SQLite or PostgreSQL, the
//! end-to-end acknowledgement, chain-head anchoring), the device registry,
//! the API with bearer tokens and roles, the dashboard and Prometheus
//! metrics. Replicas share the database and elect a leader through a lease.
//! See `shared/design/SYSTEM.md` ("Fleet server") and `docs/protocol.md`.
//!
//! # Layout
//!
//! * [`config`] — `rxfleet.toml` (annotated default in `firmware-cfg/`).
//! * [`serve`] — `rxfleet serve`: the parts below started and stopped together.
//! * [`broker`] — the managed Mosquitto: files, supervision, account reloads.
//! * [`lease`] — the leader lease and the fence every ingest commit checks.
//! * [`ingest`] — the MQTT session: batches in, commits, acks out.
//! * [`classify`] — a broker message → a valid payload or a counted refusal (pure).
//! * [`chain`] — does a reported audit chain head continue the history? (pure).
//! * [`db`] — the database: migrations, the batch commit with deduplication
//!   and acknowledgement, and the ingest's queries.
//! * [`rollup`] — telemetry windows summed per hour and scope, and the figures made of them.
//! * [`devices`] — the registry, broker credentials, and each device's view and attention.
//! * [`ca`] — the fleet's CA: client certificates for appliances.
//! * [`provision`] — the configuration fragment a new appliance is given.
//! * [`tokens`] — API tokens, roles and scopes.
//! * [`api`] — the HTTP API (axum, OpenAPI by utoipa) and the router of everything HTTP.
//! * [`dashboard`] — the embedded single-page dashboard.
//! * [`metrics`] — `/metrics` in Prometheus' text format.
//! * [`tls`] — HTTPS.
//! * [`registry`] — model versions: push (checked, scanned, stored by hash), states, aliases.
//! * [`releases`] — daemon releases: push (a whole ELF executable), staged deployment, halts.
//! * [`datasets`] — held-out datasets for the gates, content-hashed and copied.
//! * [`gates`] — a model measured with the appliances' counter path and judged against budgets and production.
//! * [`updates`] — the TUF repository: keys, signed metadata, publishing.
//! * [`rollout`] — staged rollouts judged against a concurrent control cohort.

pub mod api;
pub mod broker;
pub mod ca;
pub mod chain;
pub mod classify;
mod commit;
pub mod config;
pub mod dashboard;
pub mod datasets;
pub mod db;
pub mod devices;
pub mod gates;
pub mod ingest;
pub mod lease;
pub mod metrics;
pub mod provision;
pub mod registry;
pub mod releases;
pub mod rollout;
pub mod rollup;
pub mod serve;
pub mod tls;
pub mod tokens;
pub mod updates;

/// The fleet's wall clock, Unix milliseconds (0 before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
