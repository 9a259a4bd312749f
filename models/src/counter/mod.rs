//! The counter path's image analysis, free of I/O: whether a frame is usable
//! ([`quality`]), where the pills are in it ([`localise`]) and the picture of
//! each pill the model is shown ([`crop`]).
//!
//! It lives here, beside preprocessing, because two programs must crop pills
//! identically: the daemon before it asks the model, and `rxvision-synth
//! dataset --pill-crops` when it writes the training images, so the model is
//! trained on exactly what the counter will show it.

pub mod crop;
pub mod localise;
pub mod quality;
