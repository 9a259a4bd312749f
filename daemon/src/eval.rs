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
    let labels_path = dataset.join("labels.csv");
    let text =
        std::fs::read_to_string(&labels_path).map_err(|e| format!("{}: cannot read: {e}", labels_path.display()))?;
    let records = labels::parse(&text).map_err(|e| format!("{}: {e}", labels_path.display()))?;
    let (header, rows) = records.split_first().ok_or_else(|| format!("{}: empty", labels_path.display()))?;
    let column = |name: &str| header.iter().position(|h| h == name);
    let (file_col, ndc_col) = match (column("file"), column("ndc")) {
        (Some(f), Some(n)) => (f, n),
        _ => return Err(format!("{}: the header needs `file` and `ndc` columns", labels_path.display())),
    };
    let group_col = column("lookalike_group");
    let face_col = column("face");
    let mut scorer = Scorer::new(&path.classifier().bundle().labels, twins.filter(|_| face_col.is_some()));
    let request = ScanRequest { expected_ndc: None, operator_id: "eval".into(), rx_ref: None };
    for (i, row) in rows.iter().enumerate() {
        if row.len() == 1 && row[0].is_empty() {
            continue;
        }
        let (Some(file), Some(ndc)) = (row.get(file_col), row.get(ndc_col)) else {
            return Err(format!("{}: row {} is short", labels_path.display(), i + 2));
        };
        let bytes = std::fs::read(dataset.join(file)).map_err(|e| format!("{file}: cannot read: {e}"))?;
        let analysis = path.analyse(&request, &bytes).map_err(|e| format!("{file}: {e}"))?;
        let field = |col: Option<usize>| col.and_then(|c| row.get(c)).map(String::as_str);
        let sample = Sample { file, ndc, lookalike_group: field(group_col), face: field(face_col) };
        scorer.add(&sample, &analysis);
    }
    Ok(scorer.report())
}
