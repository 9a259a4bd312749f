//! The counter path's decisions, free of I/O: whether a frame is usable
//! ([`quality`]), where the pills are in it ([`localise`]) and what the
//! pharmacist is told about them ([`verdict`]).
//! The service that takes frames from the camera, runs the engines and
//! writes the audit record before answering builds on these.

pub mod localise;
pub mod quality;
pub mod verdict;
