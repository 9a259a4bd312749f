//! The counter path, free of I/O: whether a frame is usable ([`quality`]),
//! where the pills are in it ([`localise`]), the picture of each pill the
//! model is shown ([`crop`]), the size cue ([`size`]), what the pharmacist is
//! told ([`verdict`]), all of it wired together for one frame ([`analysis`]),
//! and the scoring of analyses over a labelled dataset ([`eval`]).
//!
//! It is its own crate because three programs must run it identically: the
//! appliance daemon before it answers a scan, `rxvision-synth dataset
//! --pill-crops` when it cuts the training images (so the model is trained on
//! exactly what the counter will show it), and the fleet's validation gates
//! when they score a candidate model.
//!
//! # Layout
//!
//! * [`quality`] — the quality gate: too dark, over-exposed, blurred, each
//!   with advice.
//! * [`localise`] — the tray's colour, the pills on it (boxes, count, size,
//!   long axis), pills cut by the frame's edge.
//! * [`crop`] — the picture of one pill the model is shown, square or
//!   upright as the bundle's `input.crop` says.
//! * [`size`] — the size cue: the measured size against each class's
//!   formulary size, applied to the probabilities before the verdict.
//! * [`verdict`] — MATCH / MISMATCH / UNCERTAIN / IDENTIFIED / NO_PILL /
//!   BAD_IMAGE, per pill and per scan.
//! * [`analysis`] — [`analysis::CounterPath::analyse`]: decode, quality,
//!   localise, per pill sharpness, crop, engines, size cue, verdict.
//! * [`eval`] — [`eval::Scorer`], scoring analyses of a labelled dataset
//!   (top-1/top-3, ECE, UNCERTAIN rate, look-alike groups, open set, twin
//!   faces).
//!
//! It depends on `rxvision-models` only (the classifier, preprocessing, the
//! formulary): it reads no files, touches no network and runs no async
//! runtime; the only clock it reads times an analysis (`latency_ms`).

pub mod analysis;
pub mod crop;
pub mod eval;
pub mod localise;
pub mod quality;
pub mod size;
pub mod verdict;
