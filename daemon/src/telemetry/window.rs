//! One telemetry window, accumulated without I/O.

use std::collections::BTreeMap;

use rxvision_counter::analysis::Analysis;
use rxvision_models::features;
use rxvision_protocol::{
    feature_bounds, ChainHead, Feedback, Histogram, OutboxLosses, Telemetry, Window, CONFIDENCE_BOUNDS,
    LATENCY_BOUNDS_MS, PROTOCOL_VERSION,
};

/// The counts of a window being filled.
#[derive(Debug, Clone)]
pub struct WindowCounts {
    start_ms: u64,
    scans: u64,
    verdicts: BTreeMap<String, u64>,
    refusals: BTreeMap<String, u64>,
    latency_ms: Histogram,
    confidence: Histogram,
    classes: BTreeMap<String, u64>,
    features: BTreeMap<String, Histogram>,
    feedback: Feedback,
    operators: BTreeMap<String, u64>,
}

/// What only the end of a window knows.
#[derive(Debug, Clone)]
pub struct WindowEnd {
    /// The device.
    pub device_id: String,
    /// The outbox's `seq` for this window.
    pub seq: u64,
    /// When the window ends (Unix milliseconds).
    pub end_ms: u64,
    /// Model version answering now.
    pub model_version: String,
    /// Engine answering now.
    pub engine: String,
    /// GPU fallbacks during the window.
    pub engine_fallbacks: u64,
    /// The audit chain's head now.
    pub audit: ChainHead,
    /// What the outbox gave up so far.
    pub outbox: OutboxLosses,
}

fn bump(map: &mut BTreeMap<String, u64>, key: &str) {
    *map.entry(key.to_string()).or_default() += 1;
}

impl WindowCounts {
    /// An empty window starting at `start_ms`.
    pub fn new(start_ms: u64) -> WindowCounts {
        WindowCounts {
            start_ms,
            scans: 0,
            verdicts: BTreeMap::new(),
            refusals: BTreeMap::new(),
            latency_ms: Histogram::new(&LATENCY_BOUNDS_MS),
            confidence: Histogram::new(&CONFIDENCE_BOUNDS),
            classes: BTreeMap::new(),
            features: feature_bounds()
                .into_iter()
                .map(|(name, bounds)| (name.to_string(), Histogram::new(&bounds)))
                .collect(),
            feedback: Feedback::default(),
            operators: BTreeMap::new(),
        }
    }

    /// When the window started.
    pub fn start_ms(&self) -> u64 {
        self.start_ms
    }

    /// Counts one answered scan; `operator` is the keyed hash of the operator id.
    /// The drift features are computed here from the pill crops the analysis
    /// kept: off the answer's path, and with no second decode.
    pub fn add_scan(&mut self, analysis: &Analysis, operator: &str) {
        self.scans += 1;
        bump(&mut self.verdicts, analysis.verdict.as_str());
        if let Some(code) = analysis.refusal {
            bump(&mut self.refusals, code);
        }
        self.latency_ms.observe(analysis.latency_ms);
        bump(&mut self.operators, operator);
        for pill in &analysis.pills {
            if let Some(code) = pill.refusal {
                bump(&mut self.refusals, code);
            }
            if let Some(best) = pill.top_k.first() {
                bump(&mut self.classes, &best.ndc);
                self.confidence.observe(f64::from(best.prob));
            }
            if let Some(crop) = &pill.crop {
                let f = features::compute(crop);
                for (name, value) in [
                    ("aspect_ratio", f.aspect_ratio),
                    ("mean_r", f.mean_r),
                    ("mean_g", f.mean_g),
                    ("mean_b", f.mean_b),
                    ("brightness", f.brightness),
                    ("blur", f.blur),
                    ("contrast", f.contrast),
                    ("entropy", f.entropy),
                ] {
                    if let Some(histogram) = self.features.get_mut(name) {
                        histogram.observe(value);
                    }
                }
            }
        }
    }

    /// Counts a pharmacist's confirmation (or correction) of an answer of class `answered`.
    pub fn add_feedback(&mut self, answered: &str, confirmed: bool) {
        let tally = if confirmed { &mut self.feedback.confirmed } else { &mut self.feedback.corrected };
        bump(tally, answered);
    }

    /// Scans counted so far.
    pub fn scans(&self) -> u64 {
        self.scans
    }

    /// The window as the protocol's telemetry message.
    pub fn finish(self, end: WindowEnd) -> Telemetry {
        Telemetry {
            v: PROTOCOL_VERSION,
            device_id: end.device_id,
            seq: end.seq,
            window: Window { start_ms: self.start_ms, end_ms: end.end_ms.max(self.start_ms + 1), windows: 1 },
            model_version: end.model_version,
            engine: end.engine,
            scans: self.scans,
            verdicts: self.verdicts,
            refusals: self.refusals,
            latency_ms: self.latency_ms,
            confidence: self.confidence,
            classes: self.classes,
            features: self.features,
            feedback: self.feedback,
            engine_fallbacks: end.engine_fallbacks,
            operators: self.operators,
            audit: end.audit,
            outbox: end.outbox,
        }
    }
}
