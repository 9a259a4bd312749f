//! RxVision models: everything between a model artifact and a probability.
//!
//! # Layout
//!
//! * [`bundle`] — the bundle format (`manifest.json`, `model.onnx`,
//!   `labels.json`, `selftest/` …): loading from a directory or `.tar.gz`,
//!   hash checks, manifest ↔ graph consistency.
//! * [`preprocess`] — JPEG/PNG decoding and the exact resize + normalisation a
//!   bundle's input spec describes (Pillow-compatible bilinear).
//! * [`engine`] — one [`engine::Engine`] trait with two implementations, tract
//!   on the CPU (int8 as shipped) and wonnx on the GPU (float graph derived at
//!   load time), and [`engine::Engines`], the `auto | gpu | cpu` selector with
//!   per-request fallback to the CPU.
//! * [`classify`] — [`classify::Classifier`]: a loaded bundle with its
//!   engines and a preprocessor, image bytes in, top-k classes out; bundle
//!   discovery.
//! * [`selftest`] — parity of an engine with ONNX Runtime on the bundle's
//!   golden images.
//! * [`scan`] — the model security scan (external data, custom or unknown
//!   operators, sub-graphs, absurd sizes) the fleet runs on every push.
//! * [`formulary`] — the product descriptions
//!   (`models/formulary/formulary.json`): loading, validation, twin faces.
//! * [`features`] — the drift features the fleet watches, defined once.
//! * [`labels`] — `labels.csv`, the dataset layout the renderer writes and
//!   evaluation and training read.
//! * [`par`] — mapping over items on all cores, results in item order.
//!
//! The counter path's image analysis and decisions are `rxvision-counter`'s,
//! the renderer is `rxvision-synth`'s; both build on this crate.
//!
//! This crate never touches the network and depends on nothing of ours; the
//! daemon and the fleet server validate models with this very code.
//!
//! # Example
//!
//! ```no_run
//! use rxvision_models::{bundle::Bundle, engine::{Engines, EngineOptions}, preprocess::Preprocessor};
//!
//! let bundle = Bundle::load("models/bundles/fixture-cnn/0.1.0".as_ref())?;
//! let engines = Engines::select(&bundle, EngineOptions::default())?;
//! let mut preprocessor = Preprocessor::new(&bundle.manifest.input);
//! let mut input = vec![0.0; preprocessor.tensor_len()];
//! preprocessor.preprocess_bytes(&std::fs::read("pill.jpg")?, &mut input)?;
//! let inference = engines.run(&input)?;
//! println!("{:?} on {}", inference.probs, inference.engine);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod bundle;
pub mod classify;
pub mod engine;
pub mod features;
pub mod formulary;
pub mod labels;
pub mod par;
pub mod preprocess;
pub mod scan;
pub mod selftest;
