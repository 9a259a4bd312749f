//! One scan at the counter: frame → quality gate → pill localisation → crop →
//! engine → verdict → durable audit record → answer.
//!
//! [`Scanner::scan`] is the only place these steps are wired together; the
//! decisions themselves live in [`crate::counter`] and do no I/O. The audit
//! record is appended (and flushed) before the result exists, so nothing can
//! answer a scan that has no record — including scans that end in `NO_PILL`
//! or `BAD_IMAGE`.

use std::sync::Arc;
use std::time::Instant;

use ring::digest::{digest, SHA256};
use rxvision_models::preprocess::{decode_with_limits, ImageLimits, PreprocessError};
use serde::Serialize;

use crate::audit::{AuditError, AuditEvent, AuditLog, RankedClass, RecordKind};
use crate::classify::{Classifier, Ranked};
use crate::counter::crop::crop_pill;
use crate::counter::localise::{localise, LocaliseOptions, PillBox};
use crate::counter::quality::{check_frame, check_sharpness, QualityLimits};
use crate::counter::size::SizeCue;
use crate::counter::verdict::{judge_pill, overall, Verdict};

/// How many classes each pill reports.
pub const TOP_K: usize = 3;

/// Pills described one by one in a scan's audit record; a tray with more is
/// summarised (counts by verdict), so that a record stays within the audit
/// log's size limit.
pub const MAX_PILLS_RECORDED: usize = 16;

/// What the pharmacy system asks.
#[derive(Debug, Clone, Default)]
pub struct ScanRequest {
    /// The NDC on the prescription; absent: identify only.
    pub expected_ndc: Option<String>,
    /// Who scans.
    pub operator_id: String,
    /// Prescription reference (stored only as a keyed hash).
    pub rx_ref: Option<String>,
}

/// One pill's answer.
#[derive(Debug, Clone, Serialize)]
pub struct PillResult {
    /// Most probable classes.
    pub top_k: Vec<Ranked>,
    /// This pill's verdict.
    pub verdict: Verdict,
    /// Why, in words.
    pub reason: String,
    /// Where the pill is in the frame.
    #[serde(rename = "box")]
    pub region: PillBox,
}

/// What the counter path concluded about a frame.
#[derive(Debug, Clone, Serialize)]
pub struct Analysis {
    /// The scan's verdict (any mismatch is a mismatch).
    pub verdict: Verdict,
    /// Why, in words a pharmacist acts on.
    pub reason: String,
    /// One entry per pill fully in view.
    pub pills: Vec<PillResult>,
    /// Number of pills fully in view.
    pub count: usize,
    /// Pills cut by the frame's edge, not verified.
    pub partial: usize,
    /// Model version.
    pub model_version: String,
    /// Engine that answered (`cpu`/`gpu`; of the last pill).
    pub engine: String,
    /// Frame in → verdict, milliseconds (the audit write comes after).
    pub latency_ms: f64,
}

/// The answer to a scan: the analysis and the audit record that holds it.
#[derive(Debug, Clone, Serialize)]
pub struct ScanResult {
    /// What the counter path concluded.
    #[serde(flatten)]
    pub analysis: Analysis,
    /// The audit record of this scan.
    pub audit_seq: u64,
}

impl std::ops::Deref for ScanResult {
    type Target = Analysis;
    fn deref(&self) -> &Analysis {
        &self.analysis
    }
}

/// Why a scan has no answer at all. (A bad picture is an answer: `BAD_IMAGE`.)
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The audit record could not be written, so no answer may be given.
    #[error("the audit record could not be written: {0}")]
    Audit(#[from] AuditError),
    /// The engines failed on the CPU too.
    #[error("inference failed: {0}")]
    Engine(#[from] rxvision_models::engine::EngineError),
}

/// The counter path's analysis of a frame, without I/O of its own (used by
/// [`Scanner`] and by `rxvisiond eval`).
#[derive(Debug)]
pub struct CounterPath {
    classifier: Arc<Classifier>,
    quality: QualityLimits,
    localise: LocaliseOptions,
    size_cue: Option<SizeCue>,
    images: ImageLimits,
}

impl CounterPath {
    /// The counter path answering with `classifier` (no size cue).
    pub fn new(classifier: Arc<Classifier>) -> CounterPath {
        CounterPath {
            classifier,
            quality: QualityLimits::default(),
            localise: LocaliseOptions::default(),
            size_cue: None,
            images: ImageLimits::default(),
        }
    }

    /// Checks every picture against `limits` (from its header, before decoding).
    pub fn with_image_limits(mut self, limits: ImageLimits) -> CounterPath {
        self.images = limits;
        self
    }

    /// Weighs the model's probabilities by each pill's measured size (see
    /// [`crate::counter::size`]).
    pub fn with_size_cue(mut self, cue: SizeCue) -> CounterPath {
        self.size_cue = Some(cue);
        self
    }

    /// The classifier (model, engines).
    pub fn classifier(&self) -> &Classifier {
        &self.classifier
    }

    /// Quality gate, localisation, engines and verdicts for one encoded frame.
    pub fn analyse(&self, request: &ScanRequest, frame: &[u8]) -> Result<Analysis, ScanError> {
        let started = Instant::now();
        let manifest = &self.classifier.bundle().manifest;
        let mut result = Analysis {
            verdict: Verdict::BadImage,
            reason: String::new(),
            pills: Vec::new(),
            count: 0,
            partial: 0,
            model_version: manifest.version.to_string(),
            engine: self.classifier.engines().active().to_string(),
            latency_ms: 0.0,
        };
        match decode_with_limits(frame, &self.images) {
            Err(e @ PreprocessError::Dimensions { .. }) => result.reason = format!("the picture cannot be used: {e}"),
            Err(e) => result.reason = format!("the picture is unreadable: {e}"),
            Ok(image) => match check_frame(&image, self.quality) {
                Err(rejection) => result.reason = rejection.message,
                Ok(_) => {
                    let found = localise(&image, self.localise);
                    result.partial = found.partial.len();
                    result.count = found.pills.len();
                    if found.pills.is_empty() {
                        result.verdict = Verdict::NoPill;
                        result.reason = if found.partial.is_empty() {
                            "no pill in view: place the pill in the middle of the tray".into()
                        } else {
                            "the pill is at the edge of the picture: move it to the middle of the tray".into()
                        };
                    } else {
                        for region in found.pills {
                            result.pills.push(self.judge(&image, region, request)?);
                        }
                        let verdicts: Vec<Verdict> = result.pills.iter().map(|p| p.verdict).collect();
                        result.verdict = overall(&verdicts);
                        result.reason = summarise(&result.pills, result.verdict);
                        result.engine = self.classifier.engines().active().to_string();
                    }
                }
            },
        }
        result.latency_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(result)
    }

    fn judge(
        &self,
        image: &rxvision_models::preprocess::RgbImage,
        region: PillBox,
        request: &ScanRequest,
    ) -> Result<PillResult, ScanError> {
        if let Err(rejection) = check_sharpness(image, region, self.quality) {
            return Ok(PillResult { top_k: Vec::new(), verdict: Verdict::BadImage, reason: rejection.message, region });
        }
        let crop = crop_pill(image, &region, self.classifier.bundle().manifest.input.crop, self.localise.margin);
        let mut probs = self.classifier.infer(crop.view())?.probs;
        let bundle = self.classifier.bundle();
        if let Some(cue) = &self.size_cue {
            if let Err(refusal) = cue.apply(&mut probs, &region) {
                let reason = refusal.reason(&bundle.labels);
                return Ok(PillResult { top_k: Vec::new(), verdict: Verdict::BadImage, reason, region });
            }
        }
        let judged = judge_pill(&probs, &bundle.labels, bundle.manifest.thresholds, request.expected_ndc.as_deref());
        Ok(PillResult {
            top_k: self.classifier.top_k(&probs, TOP_K),
            verdict: judged.verdict,
            reason: judged.reason,
            region,
        })
    }
}

/// The counter path of one appliance: every analysis is recorded in the
/// audit log before it becomes an answer.
#[derive(Debug)]
pub struct Scanner {
    path: CounterPath,
    audit: Arc<AuditLog>,
}

impl Scanner {
    /// A scanner answering with `classifier` and recording into `audit`.
    pub fn new(classifier: Arc<Classifier>, audit: Arc<AuditLog>) -> Scanner {
        Scanner::with_path(CounterPath::new(classifier), audit)
    }

    /// A scanner answering through `path` and recording into `audit`.
    pub fn with_path(path: CounterPath, audit: Arc<AuditLog>) -> Scanner {
        Scanner { path, audit }
    }

    /// The classifier (model, engines).
    pub fn classifier(&self) -> &Classifier {
        self.path.classifier()
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The audit log, shared (for the control socket).
    pub fn shared_audit(&self) -> Arc<AuditLog> {
        self.audit.clone()
    }

    /// Verifies the pills in one encoded frame and records the scan.
    pub fn scan(&self, request: &ScanRequest, frame: &[u8]) -> Result<ScanResult, ScanError> {
        let analysis = self.path.analyse(request, frame)?;
        let audit_seq = self.record(request, frame, &analysis)?;
        Ok(ScanResult { analysis, audit_seq })
    }

    fn record(&self, request: &ScanRequest, frame: &[u8], result: &Analysis) -> Result<u64, AuditError> {
        let mut event = AuditEvent::new(RecordKind::Verification);
        event.operator = Some(request.operator_id.clone());
        event.rx_ref = request.rx_ref.clone();
        event.image_sha256 = Some(digest(&SHA256, frame).as_ref().iter().map(|b| format!("{b:02x}")).collect());
        event.model_version = Some(result.model_version.clone());
        event.engine = Some(result.engine.clone());
        event.top_k = result
            .pills
            .first()
            .map(|p| p.top_k.iter().map(|r| RankedClass { ndc: r.ndc.clone(), prob: r.prob }).collect())
            .unwrap_or_default();
        event.verdict = Some(
            serde_json::to_value(result.verdict).expect("verdicts serialise").as_str().unwrap_or_default().to_string(),
        );
        event.latency_ms = Some(result.latency_ms);
        event.details = serde_json::json!({
            "expected_ndc": request.expected_ndc,
            "count": result.count,
            "partial": result.partial,
            "reason": result.reason,
            "pills": result.pills.iter().take(MAX_PILLS_RECORDED).map(|p| serde_json::json!({
                "verdict": p.verdict, "box": p.region,
                "top_k": p.top_k.iter().map(|r| serde_json::json!({"ndc": r.ndc, "prob": r.prob})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        if result.pills.len() > MAX_PILLS_RECORDED {
            let mut by_verdict = std::collections::BTreeMap::<String, usize>::new();
            for pill in &result.pills[MAX_PILLS_RECORDED..] {
                let verdict = serde_json::to_value(pill.verdict).ok().and_then(|v| v.as_str().map(str::to_string));
                *by_verdict.entry(verdict.unwrap_or_default()).or_default() += 1;
            }
            event.details["more_pills"] = serde_json::json!(by_verdict);
        }
        Ok(self.audit.append(event)?.seq)
    }
}

fn summarise(pills: &[PillResult], verdict: Verdict) -> String {
    if pills.len() == 1 {
        return pills[0].reason.clone();
    }
    let deciding = pills.iter().find(|p| p.verdict == verdict).map_or(String::new(), |p| format!(": {}", p.reason));
    format!("{} pills{deciding}", pills.len())
}
