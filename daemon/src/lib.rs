//! The RxVision appliance daemon, `rxvisiond`.
//!
//! # Layout
//!
//! * [`camera`] — frame sources behind one trait: a V4L2 camera (nokhwa)
//!   with reconnection, a folder replay, the renderer.
//! * [`scan`] — one scan wired end to end: the counter path's analysis
//!   (`rxvision-counter`) and the durable audit record before the answer.
//! * [`api`] — the local HTTP API under `/v1`, `/metrics`.
//! * [`control`] — the Unix control socket through which the `audit`
//!   commands reach a running daemon (which holds the store's lock).
//! * [`service`] — `rxvisiond run`: assembles the parts from the
//!   configuration, serves, shuts down gracefully on SIGTERM.
//! * [`eval`] — the counter path over a labelled dataset, scored by
//!   `rxvision-counter`'s `eval::Scorer` (top-1/top-3, ECE, UNCERTAIN rate,
//!   per look-alike group, confusions, open set).
//! * [`config`] — versioned TOML configuration, parsed then validated; the
//!   annotated default is `firmware-cfg/rxvisiond.toml`.
//! * [`audit`] — the encrypted, hash-chained, durable audit log (sled, ring)
//!   and its keys; `audit verify` and `audit export` stand on it.
//! * [`updates`] — signed model and daemon updates: the fleet's TUF
//!   repository, A/B slots, verification before a switch, automatic return
//!   after a crash loop, the launcher that starts an installed release.
//!
//! The classifier (`Classifier`) is `rxvision-models`' `classify`, the
//! counter path's decisions and analysis are `rxvision-counter`'s, the
//! renderer behind the synthetic camera and the reference pictures is
//! `rxvision-synth`'s.
//!
//! The binary (`src/main.rs`) only parses the command line, sets up logging
//! and maps errors to exit codes.

/// This daemon's version: what `rxvisiond --version` prints, the status
/// page, the telemetry and the updater use. The binary sets it
/// ([`set_daemon_version`]: a release build may stamp another version than
/// the crate's); the crate's version otherwise.
pub fn daemon_version() -> &'static str {
    DAEMON_VERSION.get().copied().unwrap_or(env!("CARGO_PKG_VERSION"))
}

static DAEMON_VERSION: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// Sets [`daemon_version`] (once, at start).
pub fn set_daemon_version(version: &'static str) {
    let _ = DAEMON_VERSION.set(version);
}

pub mod api;
pub mod audit;
pub mod camera;
pub mod commands;
pub mod config;
pub mod control;
pub mod durable;
pub mod eval;
pub mod link;
pub mod outbox;
pub mod scan;
pub mod service;
pub mod telemetry;
pub mod updates;
