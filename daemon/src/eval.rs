//! `rxvisiond eval`: the full counter path over a labelled dataset.
//!
//! The dataset is a directory with `labels.csv` (columns `file`, `ndc`, and
//! optionally `lookalike_group` and `face`; the layout `rxvision-synth
//! dataset` writes and the trainer reads). Every image goes through the same
//! path as a scan at the counter — quality gate, localisation, crop,
//! preprocessing, engine, thresholds — in identification mode (no expected
//! NDC), so that the thresholds decide UNCERTAIN exactly as they would at the
//! counter. The scoring (what is scored, open set, twin faces) is
//! [`rxvision_counter::eval`]'s [`Scorer`]; this module reads the dataset and
//! runs the path. With `--verify` each image is also asked as a pharmacy
//! system asks, with an expected NDC (its own, and a known look-alike's), and
//! the same scans give the curve of automation against false MATCH over the
//! confidence threshold.

use std::path::Path;

use rxvision_counter::analysis::{CounterPath, ScanRequest};
use rxvision_counter::eval::{
    matched_at, verify_cases, CurvePoint, EvalReport, Lookalikes, Sample, Scorer, TwinRule, VerifyCurve, VerifyReport,
    VerifyScan, CURVE_THRESHOLDS,
};
use rxvision_models::labels;
use serde::Serialize;

/// `rxvisiond eval --verify`: the counter as a pharmacy system uses it, with
/// an expected NDC ([`VerifyReport`]'s three cases).
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// The bundle's `min_confidence`.
    pub min_confidence: f32,
    /// The bundle's `min_margin`.
    pub min_margin: f32,
    /// How many products have their own MATCH threshold (`thresholds.match_confidence`).
    pub products_with_own_threshold: usize,
    /// What the counter answered, each scan asked with its expected NDC.
    pub answered: VerifyReport,
    /// The same scans at other `min_confidence` thresholds, one for every
    /// product (the bundle's among them, where it equals `answered` unless
    /// products have their own): automation against false MATCH.
    pub curve: Vec<CurvePoint>,
    /// Every verification scan (`--scans FILE`).
    #[serde(skip)]
    pub scans: Vec<VerifyScan>,
}

/// Runs every image of `dataset` through `path` and scores it; with `twins`,
/// images of twin faces are scored apart (when the dataset has a `face`
/// column); with `verify`, every image is also asked as the verification
/// scans it stands for ([`verify_cases`]).
pub fn evaluate(
    path: &CounterPath,
    dataset: &Path,
    twins: Option<TwinRule<'_>>,
    verify: bool,
) -> Result<(EvalReport, Option<Verification>), String> {
    let images = labels::read_dataset(&dataset.join("labels.csv"))?;
    let has_faces = images.iter().any(|i| i.face.is_some());
    let model_labels = &path.classifier().bundle().labels;
    let mut scorer = Scorer::new(model_labels, twins.filter(|_| has_faces));
    let lookalikes = Lookalikes::new(&images, model_labels);
    let thresholds = &path.classifier().bundle().manifest.thresholds;
    let (mut answered, mut curve) = (VerifyReport::default(), VerifyCurve::default());
    let ask = |expected: Option<&str>, bytes: &[u8], file: &str| {
        let request =
            ScanRequest { expected_ndc: expected.map(str::to_string), operator_id: "eval".into(), rx_ref: None };
        path.analyse(&request, bytes).map_err(|e| format!("{file}: {e}"))
    };
    for image in &images {
        let file = &image.file;
        let bytes = std::fs::read(dataset.join(file)).map_err(|e| format!("{file}: cannot read: {e}"))?;
        let analysis = ask(None, &bytes, file)?;
        let sample = Sample {
            file,
            ndc: &image.ndc,
            lookalike_group: Some(image.lookalike_group.as_str()),
            face: image.face.as_deref(),
        };
        scorer.add(&sample, &analysis);
        if verify {
            let known = model_labels.iter().any(|l| l.ndc == image.ndc);
            let twin = scorer.is_twin(&image.ndc, image.face.as_deref().unwrap_or(""));
            let size = analysis.pills.first().map(|p| p.region.rectangle_px);
            for case in verify_cases(image, known, twin, &lookalikes) {
                answered.add(case.known, case.expected_own, ask(Some(case.expected), &bytes, file)?.verdict);
                curve.add(file, case, matched_at(&analysis, case.expected, thresholds.min_margin), size);
            }
        }
    }
    let verification = verify.then(|| {
        let mut at: Vec<f32> = CURVE_THRESHOLDS.to_vec();
        at.push(thresholds.min_confidence);
        at.sort_by(f32::total_cmp);
        at.dedup();
        Verification {
            min_confidence: thresholds.min_confidence,
            min_margin: thresholds.min_margin,
            products_with_own_threshold: thresholds.match_confidence.len(),
            answered,
            curve: curve.points(&at),
            scans: curve.into_scans(),
        }
    });
    Ok((scorer.report(), verification))
}
