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
//! runs the path.

use std::path::Path;

use rxvision_counter::analysis::{CounterPath, ScanRequest};
use rxvision_counter::eval::{EvalReport, Sample, Scorer, TwinRule};
use rxvision_models::labels;

/// Runs every image of `dataset` through `path` and scores it; with `twins`,
/// images of twin faces are scored apart (when the dataset has a `face`
/// column).
pub fn evaluate(path: &CounterPath, dataset: &Path, twins: Option<TwinRule<'_>>) -> Result<EvalReport, String> {
    let images = labels::read_dataset(&dataset.join("labels.csv"))?;
    let has_faces = images.iter().any(|i| i.face.is_some());
    let mut scorer = Scorer::new(&path.classifier().bundle().labels, twins.filter(|_| has_faces));
    let request = ScanRequest { expected_ndc: None, operator_id: "eval".into(), rx_ref: None };
    for image in &images {
        let file = &image.file;
        let bytes = std::fs::read(dataset.join(file)).map_err(|e| format!("{file}: cannot read: {e}"))?;
        let analysis = path.analyse(&request, &bytes).map_err(|e| format!("{file}: {e}"))?;
        let sample = Sample {
            file,
            ndc: &image.ndc,
            lookalike_group: Some(image.lookalike_group.as_str()),
            face: image.face.as_deref(),
        };
        scorer.add(&sample, &analysis);
    }
    Ok(scorer.report())
}
