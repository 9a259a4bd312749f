//! Telemetry: what the appliance tells the fleet about its counter, in
//! windows (`[telemetry]`, 60 s by default) that go through the outbox.
//!
//! [`window`] accumulates one window from the counter path's analyses and
//! the pharmacists' feedback, without I/O, and turns it into the protocol's
//! [`rxvision_protocol::Telemetry`]. No prescription reference and no
//! operator id leaves the appliance in clear: operators are counted under a
//! keyed hash the caller provides (the audit log's pseudonym key).
//! [`collector`] feeds windows from the running service into the outbox.

pub mod collector;
pub mod window;

pub use collector::{
    finalize, merge_windows, stored_event, stored_window, Collector, Observation, TelemetryService, WindowWorker,
};
pub use window::{WindowCounts, WindowEnd};
