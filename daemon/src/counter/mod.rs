//! The counter path's decisions, free of I/O: whether a frame is usable
//! ([`quality`]), where the pills are in it ([`localise`]) and what the
//! pharmacist is told about them ([`verdict`]).
//! The service that takes frames from the camera, runs the engines and
//! writes the audit record before answering builds on these.
//!
//! The quality gate, the localiser and the crop are `rxvision_models::counter`'s: the
//! training data is cropped by the same code (see there).

pub use rxvision_models::counter::{crop, localise, quality};
pub mod size;
pub mod verdict;
