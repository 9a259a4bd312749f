//! The counter path's decisions, free of I/O: where the pills are in a frame
//! ([`localise`]) and what the pharmacist is told about them ([`verdict`]).
//! The service that takes frames from the camera, runs the engines and
//! writes the audit record before answering builds on these.

pub mod localise;
pub mod verdict;
