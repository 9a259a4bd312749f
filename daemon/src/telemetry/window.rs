//! One telemetry window, accumulated without I/O.

use std::collections::BTreeMap;

use crate::audit::AuditRecord;
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

    /// Counts one answered scan from its audit record (the log is the
    /// durable source of what the counter answered: a window counts the
    /// records between two chain heads, so a crash loses no scan and counts
    /// none twice); `operator` is the keyed hash of the operator id.
    pub fn add_verification(&mut self, record: &AuditRecord, operator: &str) {
        self.scans += 1;
        self.start_ms = self.start_ms.min(record.time_ms);
        bump(&mut self.verdicts, record.verdict.as_deref().unwrap_or("UNKNOWN"));
        if let Some(code) = record.details.get("refusal").and_then(|c| c.as_str()) {
            bump(&mut self.refusals, code);
        }
        if let Some(latency) = record.latency_ms {
            self.latency_ms.observe(latency);
        }
        if !operator.is_empty() {
            bump(&mut self.operators, operator);
        }
        let pills = record.details.get("pills").and_then(|p| p.as_array()).map(Vec::as_slice).unwrap_or_default();
        for pill in pills {
            if let Some(code) = pill.get("refusal").and_then(|c| c.as_str()) {
                bump(&mut self.refusals, code);
            }
            let best = pill.get("top_k").and_then(|t| t.get(0));
            if let (Some(ndc), Some(prob)) =
                (best.and_then(|b| b["ndc"].as_str()), best.and_then(|b| b["prob"].as_f64()))
            {
                bump(&mut self.classes, ndc);
                self.confidence.observe(prob);
            }
        }
    }

    /// Adds the drift features of the pill crops an analysis kept: computed
    /// here, off the answer's path, with no second decode. Best effort: the
    /// crops live only in memory, so a scan whose analysis never reached the
    /// worker (a crash, a full queue) is counted without its features.
    pub fn add_features(&mut self, analysis: &Analysis) {
        for crop in analysis.pills.iter().filter_map(|p| p.crop.as_ref()) {
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
