//! The RxVision appliance daemon, `rxvisiond`.
//!
//! # Layout
//!
//! * [`classify`] — a loaded bundle with its engines: image bytes in, top-k
//!   classes out. The `classify` and `selftest` commands stand on it, and so
//!   will the counter verification path.
//!
//! The binary (`src/main.rs`) only parses the command line, sets up logging
//! and maps errors to exit codes.

pub mod classify;
