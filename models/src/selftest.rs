//! The bundle self-test: parity of an engine with ONNX Runtime.
//!
//! A bundle's `selftest/` holds golden images and ONNX Runtime's outputs for
//! them, computed by the trainer from the same `model.onnx` and the reference
//! preprocessing. An engine passes when, on every image, its top-1 equals ONNX
//! Runtime's and every probability lies within the bundle's tolerance of ONNX
//! Runtime's. Each case goes through the full path — decode, resize,
//! normalise, engine — so the self-test also proves the preprocessing.

use std::time::Instant;

use crate::bundle::Bundle;
use crate::engine::{Engine, EngineError, EngineKind};
use crate::preprocess::{PreprocessError, Preprocessor};

/// Why the self-test could not run at all (as opposed to running and failing).
#[derive(Debug, thiserror::Error)]
pub enum SelftestError {
    /// A golden image could not be decoded.
    #[error("self-test image {image}: {source}")]
    Image {
        /// The bundle-relative image path.
        image: String,
        /// The decoder's complaint.
        source: PreprocessError,
    },
    /// The engine failed on a golden image.
    #[error("self-test image {image}: {source}")]
    Engine {
        /// The bundle-relative image path.
        image: String,
        /// The engine's error.
        source: EngineError,
    },
}

/// One golden image's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaseResult {
    /// Bundle-relative image path.
    pub image: String,
    /// ONNX Runtime's top-1.
    pub expected_top1: usize,
    /// The engine's top-1.
    pub top1: usize,
    /// The engine's top-1 probability.
    pub top1_prob: f32,
    /// Largest |engine − ONNX Runtime| over all classes.
    pub max_abs_diff: f32,
    /// Wall time of preprocessing plus inference.
    pub latency_ms: f64,
    /// Top-1 equal and difference within tolerance.
    pub passed: bool,
}

/// The outcome of a self-test on one engine.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SelftestReport {
    /// Which engine was tested.
    pub engine: EngineKind,
    /// The engine's own description.
    pub engine_description: String,
    /// Allowed |difference| per probability.
    pub tolerance: f32,
    /// The reference runtime named by the bundle.
    pub reference: String,
    /// One row per golden image.
    pub cases: Vec<CaseResult>,
}

impl SelftestReport {
    /// True when every case passed.
    pub fn passed(&self) -> bool {
        !self.cases.is_empty() && self.cases.iter().all(|c| c.passed)
    }

    /// The largest probability difference seen.
    pub fn max_abs_diff(&self) -> f32 {
        self.cases.iter().map(|c| c.max_abs_diff).fold(0.0, f32::max)
    }

    /// One line naming the failing cases.
    pub fn failure_summary(&self) -> String {
        let failed: Vec<String> = self
            .cases
            .iter()
            .filter(|c| !c.passed)
            .map(|c| format!("{} (top-1 {} vs {}, max diff {:.4})", c.image, c.top1, c.expected_top1, c.max_abs_diff))
            .collect();
        format!(
            "{} of {} cases fail, tolerance {}: {}",
            failed.len(),
            self.cases.len(),
            self.tolerance,
            failed.join(", ")
        )
    }

    /// A fixed-width table for terminals.
    pub fn table(&self) -> String {
        let mut out = format!(
            "self-test on {} against {} (tolerance {})\n{:<40} {:>8} {:>6} {:>8} {:>10} {:>10}  result\n",
            self.engine_description,
            self.reference,
            self.tolerance,
            "image",
            "expected",
            "top-1",
            "prob",
            "max diff",
            "ms"
        );
        for c in &self.cases {
            out.push_str(&format!(
                "{:<40} {:>8} {:>6} {:>8.4} {:>10.5} {:>10.2}  {}\n",
                c.image,
                c.expected_top1,
                c.top1,
                c.top1_prob,
                c.max_abs_diff,
                c.latency_ms,
                if c.passed { "ok" } else { "FAIL" }
            ));
        }
        out.push_str(&format!(
            "{}: {} of {} cases pass, max diff {:.5}\n",
            if self.passed() { "PASS" } else { "FAIL" },
            self.cases.iter().filter(|c| c.passed).count(),
            self.cases.len(),
            self.max_abs_diff()
        ));
        out
    }
}

/// Index and value of the largest probability (first one on ties).
pub fn argmax(probs: &[f32]) -> (usize, f32) {
    probs
        .iter()
        .copied()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, p)| if p > best.1 { (i, p) } else { best })
}

/// Runs every golden image of `bundle` through `engine`.
pub fn run(bundle: &Bundle, engine: &dyn Engine) -> Result<SelftestReport, SelftestError> {
    let tolerance = bundle.manifest.selftest.tolerance;
    let mut preprocessor = Preprocessor::new(&bundle.manifest.input);
    let mut input = vec![0f32; preprocessor.tensor_len()];
    let mut cases = Vec::with_capacity(bundle.selftest.cases.len());
    for case in &bundle.selftest.cases {
        let image = bundle.selftest_path(case);
        let bytes = bundle.selftest_image(case).expect("bundle load checked every self-test image exists");
        let started = Instant::now();
        preprocessor
            .preprocess_bytes(bytes, &mut input)
            .map_err(|source| SelftestError::Image { image: image.clone(), source })?;
        let probs = engine.run(&input).map_err(|source| SelftestError::Engine { image: image.clone(), source })?;
        let latency_ms = started.elapsed().as_secs_f64() * 1e3;
        let max_abs_diff = if probs.len() == case.probs.len() {
            probs.iter().zip(&case.probs).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
        } else {
            f32::INFINITY
        };
        let (top1, top1_prob) = argmax(&probs);
        cases.push(CaseResult {
            image,
            expected_top1: case.top1,
            top1,
            top1_prob,
            max_abs_diff,
            latency_ms,
            passed: top1 == case.top1 && max_abs_diff <= tolerance,
        });
    }
    Ok(SelftestReport {
        engine: engine.kind(),
        engine_description: engine.describe(),
        tolerance,
        reference: bundle.selftest.reference.clone(),
        cases,
    })
}
