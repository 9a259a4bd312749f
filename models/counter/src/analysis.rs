//! The counter path's analysis of one frame: decode (with the image limits)
//! → quality gate → pill localisation → per pill: sharpness, crop, engines,
//! size cue, verdict → the scan's verdict.
//!
//! [`CounterPath::analyse`] is the only place these steps are wired together;
//! it does no I/O of its own (the engines run in memory). The appliance
//! records every analysis in its audit log before it becomes an answer
//! (`rxvision-daemon`'s `Scanner`); `rxvisiond eval` scores analyses of a
//! labelled dataset with [`crate::eval::Scorer`], and so can the fleet's
//! validation gates.

use std::sync::Arc;
use std::time::Instant;

use rxvision_models::classify::{Classifier, Ranked};
use rxvision_models::engine::EngineError;
use rxvision_models::preprocess::{decode_with_limits, ImageLimits, PreprocessError, RgbImage};
use serde::Serialize;

use crate::crop::crop_pill;
use crate::localise::{localise, LocaliseOptions, PillBox};
use crate::quality::{check_frame, check_sharpness, QualityLimits};
use crate::size::SizeCue;
use crate::verdict::{judge_pill, overall, Verdict};

/// How many classes each pill reports.
pub const TOP_K: usize = 3;

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
    /// Why the pill was refused before or at the model, as a stable code
    /// (`blurred`, `size_unmeasurable`, `size_contradicts`); `None` when judged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<&'static str>,
    /// The picture of the pill the model was shown (for the drift features,
    /// computed off the answer's path; not part of the answer).
    #[serde(skip)]
    pub crop: Option<RgbImage>,
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
    /// Why the frame was refused before any pill was judged, as a stable code
    /// (`unreadable`, `picture_size`, `too_dark`, `over_exposed`, `blurred`,
    /// `no_pill`, `pill_at_edge`); `None` when pills were judged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<&'static str>,
}

/// Why a frame could not be analysed at all. (A bad picture is an answer:
/// `BAD_IMAGE`.)
#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    /// The engines failed on the CPU too.
    #[error("inference failed: {0}")]
    Engine(#[from] EngineError),
}

/// The counter path's analysis of a frame, without I/O of its own (used by
/// the daemon's `Scanner` and by `rxvisiond eval`).
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
    /// [`crate::size`]).
    pub fn with_size_cue(mut self, cue: SizeCue) -> CounterPath {
        self.size_cue = Some(cue);
        self
    }

    /// Refuses frames and pills by `limits` instead of the defaults (to
    /// calibrate the gate against what the model can read).
    pub fn with_quality(mut self, limits: QualityLimits) -> CounterPath {
        self.quality = limits;
        self
    }

    /// The classifier (model, engines).
    pub fn classifier(&self) -> &Classifier {
        &self.classifier
    }

    /// Quality gate, localisation, engines and verdicts for one encoded frame.
    pub fn analyse(&self, request: &ScanRequest, frame: &[u8]) -> Result<Analysis, AnalysisError> {
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
            refusal: None,
        };
        match decode_with_limits(frame, &self.images) {
            Err(e @ PreprocessError::Dimensions { .. }) => {
                result.reason = format!("the picture cannot be used: {e}");
                result.refusal = Some("picture_size");
            }
            Err(e) => {
                result.reason = format!("the picture is unreadable: {e}");
                result.refusal = Some("unreadable");
            }
            Ok(image) => match check_frame(&image, self.quality) {
                Err(rejection) => {
                    result.reason = rejection.message;
                    result.refusal = Some(rejection.code);
                }
                Ok(_) => {
                    let found = localise(&image, self.localise);
                    result.partial = found.partial.len();
                    result.count = found.pills.len();
                    if found.pills.is_empty() {
                        result.verdict = Verdict::NoPill;
                        (result.reason, result.refusal) = if found.partial.is_empty() {
                            ("no pill in view: place the pill in the middle of the tray".into(), Some("no_pill"))
                        } else {
                            (
                                "the pill is at the edge of the picture: move it to the middle of the tray".into(),
                                Some("pill_at_edge"),
                            )
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

    fn judge(&self, image: &RgbImage, region: PillBox, request: &ScanRequest) -> Result<PillResult, AnalysisError> {
        if let Err(rejection) = check_sharpness(image, region, self.quality) {
            return Ok(PillResult {
                top_k: Vec::new(),
                verdict: Verdict::BadImage,
                reason: rejection.message,
                region,
                refusal: Some(rejection.code),
                crop: None,
            });
        }
        let input = &self.classifier.bundle().manifest.input;
        let crop = crop_pill(image, &region, input.crop, input.crop_margin.unwrap_or(self.localise.margin));
        let mut probs = self.classifier.infer(crop.view())?.probs;
        let bundle = self.classifier.bundle();
        if let Some(cue) = &self.size_cue {
            if let Err(refusal) = cue.apply(&mut probs, &region) {
                let reason = refusal.reason(&bundle.labels);
                return Ok(PillResult {
                    top_k: Vec::new(),
                    verdict: Verdict::BadImage,
                    reason,
                    region,
                    refusal: Some(refusal.code()),
                    crop: Some(crop),
                });
            }
        }
        let judged = judge_pill(&probs, &bundle.labels, &bundle.manifest.thresholds, request.expected_ndc.as_deref());
        Ok(PillResult {
            top_k: self.classifier.top_k(&probs, TOP_K),
            verdict: judged.verdict,
            reason: judged.reason,
            region,
            refusal: None,
            crop: Some(crop),
        })
    }
}

fn summarise(pills: &[PillResult], verdict: Verdict) -> String {
    if pills.len() == 1 {
        return pills[0].reason.clone();
    }
    let deciding = pills.iter().find(|p| p.verdict == verdict).map_or(String::new(), |p| format!(": {}", p.reason));
    format!("{} pills{deciding}", pills.len())
}
