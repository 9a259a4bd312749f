//! `rxvisiond eval`: the full counter path over a labelled dataset.
//!
//! The dataset is a directory with `labels.csv` (columns `file`, `ndc`, and
//! optionally `lookalike_group`; the layout `rxvision-synth dataset` writes and
//! the trainer reads). Every image goes through the same path as a scan at
//! the counter — quality gate, localisation, crop, preprocessing, engine,
//! thresholds — in identification mode (no expected NDC), so that the
//! thresholds decide UNCERTAIN exactly as they would at the counter.
//!
//! Scoring covers the images the model was asked about. An image the counter
//! refuses before the model — no whole pill found, too dark, over-exposed,
//! blurred — is the counter asking for a new picture, not an identification:
//! it is counted in `not_analysed` (and, for known products, listed among the
//! confusions as `NO_PILL` / `BAD_IMAGE`), not scored.
//! * products in the model's formulary: top-1 / top-3 of the first pill, ECE
//!   of the top-1 probability in 15 equal-width bins, the UNCERTAIN rate,
//!   accuracy per look-alike group, and the confusions;
//! * products **not** in the formulary (open set): correct exactly when the
//!   verdict is UNCERTAIN (`open_set.uncertain_rate`).
//!
//! **Twin faces.** Some pills show a face that another product of the model
//! shares exactly: the blank bisected backs of prednisone 20 mg and trazodone
//! 50 mg (white rounds of 9.5 mm), or of hydrocodone/APAP `M365` and `M367`.
//! No picture of that face can tell them apart; the pharmacist must turn the
//! pill over. Given the formulary and a `face` column, such images (of known
//! products and of the open set alike) are scored apart in `twin_faces`
//! rather than in the figures above, which then measure what a picture can
//! decide. Whether two faces are twins follows
//! [`Product::face_twin`](rxvision_models::synth::formulary::Product::face_twin):
//! with the size cue, products of different measured size are not twins.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use rxvision_models::synth::formulary::{Face, Formulary};
use rxvision_models::synth::labels;
use serde::Serialize;

use crate::counter::verdict::Verdict;
use crate::scan::{CounterPath, ScanRequest};

/// Accuracy inside one look-alike group.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GroupScore {
    /// Images of the group's products.
    pub n: usize,
    /// Share whose top-1 was right.
    pub top1: f64,
}

/// One kind of mistake.
#[derive(Debug, Clone, Serialize)]
pub struct Confusion {
    /// The pill's NDC.
    pub expected: String,
    /// What the model said (top-1 NDC, or `NO_PILL` / `BAD_IMAGE`).
    pub predicted: String,
    /// How often.
    pub count: usize,
}

/// The open-set part of the report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OpenSet {
    /// Images of products the model does not know, that the model was asked about.
    pub n: usize,
    /// Share answered UNCERTAIN (the right answer for them).
    pub uncertain_rate: f64,
}

/// One scored image whose top-1 was wrong, for looking at the mistakes
/// themselves (`rxvisiond eval --mistakes FILE`).
#[derive(Debug, Clone, Serialize)]
pub struct Mistake {
    /// The image, as `labels.csv` names it.
    pub file: String,
    /// The pill's NDC.
    pub expected: String,
    /// The face in view (`front` / `back`; empty without a `face` column).
    pub face: String,
    /// The model's top-1 NDC.
    pub predicted: String,
    /// Its probability (after the size cue, when on).
    pub confidence: f32,
    /// The verdict the counter gave.
    pub verdict: Verdict,
    /// The pill's measured length and width, frame pixels (smallest rectangle).
    pub rectangle_px: [f32; 2],
    /// Its mean colour distance from the tray (0–441).
    pub contrast: f32,
}

impl Mistake {
    /// The CSV header of [`Mistake::csv_row`].
    pub const CSV_HEADER: &'static str = "file,expected,face,predicted,confidence,verdict,length_px,width_px,contrast";

    /// One CSV row.
    pub fn csv_row(&self) -> String {
        let verdict = serde_json::to_value(self.verdict).ok().and_then(|v| v.as_str().map(String::from));
        [
            labels::quote(&self.file),
            labels::quote(&self.expected),
            labels::quote(&self.face),
            labels::quote(&self.predicted),
            format!("{:.4}", self.confidence),
            verdict.unwrap_or_default(),
            format!("{:.1}", self.rectangle_px[0]),
            format!("{:.1}", self.rectangle_px[1]),
            format!("{:.1}", self.contrast),
        ]
        .join(",")
    }
}

/// What `rxvisiond eval` prints.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Images of products in the formulary that the model was asked about.
    pub n: usize,
    /// Top-1 accuracy on them.
    pub top1: f64,
    /// Top-3 accuracy on them.
    pub top3: f64,
    /// Expected calibration error of the top-1 probability (15 bins).
    pub ece: f64,
    /// Share of them answered UNCERTAIN.
    pub uncertain_rate: f64,
    /// Top-1 accuracy per look-alike group.
    pub per_group: BTreeMap<String, GroupScore>,
    /// The most frequent mistakes (at most 20): wrong products first, then
    /// refusals (`NO_PILL` / `BAD_IMAGE`), each most frequent first.
    pub confusions: Vec<Confusion>,
    /// Products absent from the formulary.
    pub open_set: OpenSet,
    /// Images (of any product) the counter refused before the model: no
    /// whole pill found, or the frame or the pill failed the quality gate.
    pub not_analysed: usize,
    /// Images showing a face that another product of the model shares
    /// exactly, scored apart (absent without a formulary or a `face` column).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub twin_faces: Option<TwinFaces>,
    /// Every scored image of a known product whose top-1 was wrong, in
    /// dataset order (not printed with the report).
    #[serde(skip)]
    pub mistakes: Vec<Mistake>,
}

/// Images of faces no picture can identify (see the module's docs).
#[derive(Debug, Clone, Default, Serialize)]
pub struct TwinFaces {
    /// Such images of products the model knows.
    pub n: usize,
    /// Share of them whose top-1 was still the right product (by chance).
    pub top1: f64,
    /// Share of them answered UNCERTAIN (the safe answer).
    pub uncertain_rate: f64,
    /// Such images of products the model does not know (a known product looks the same).
    pub open_set_n: usize,
    /// Share of those answered UNCERTAIN.
    pub open_set_uncertain_rate: f64,
}

/// Which faces are twins: the formulary, and whether the size cue is on.
#[derive(Debug, Clone, Copy)]
pub struct TwinRule<'a> {
    /// Product descriptions.
    pub formulary: &'a Formulary,
    /// Whether the counter weighs by measured size (then sizes must agree too).
    pub by_size: bool,
}

/// Runs every image of `dataset` through `path` and scores it; with `twins`,
/// images of twin faces are scored apart.
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
    let known: HashMap<&str, ()> = path.classifier().bundle().labels.iter().map(|l| (l.ndc.as_str(), ())).collect();
    let twins = twins.zip(column("face"));
    // Whether image `ndc`/`face` shows a face some *other* known product shares.
    let is_twin = |ndc: &str, face: &str| -> bool {
        let Some((rule, _)) = twins else { return false };
        let face = match face {
            "front" => Face::Front,
            "back" => Face::Back,
            _ => return false,
        };
        let Some(product) = rule.formulary.get(ndc) else { return false };
        known.keys().filter_map(|k| rule.formulary.get(k)).any(|other| product.face_twin(face, other, rule.by_size))
    };
    let mut twin_known = (0usize, 0usize, 0usize); // (images, top-1 right, UNCERTAIN)
    let mut twin_open = (0usize, 0usize); // (images, UNCERTAIN)

    let mut n = 0usize;
    let (mut top1, mut top3, mut uncertain, mut not_analysed) = (0usize, 0usize, 0usize, 0usize);
    let mut bins = [(0usize, 0f64, 0usize); 15]; // (count, sum of confidence, correct)
    let mut groups: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut confusions: HashMap<(String, String), usize> = HashMap::new();
    let mut open = (0usize, 0usize);
    let mut mistakes = Vec::new();
    let face_col = column("face");
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
        let is_known = known.contains_key(ndc.as_str());
        let Some(pill) = analysis.pills.first().filter(|p| !p.top_k.is_empty()) else {
            not_analysed += 1;
            if is_known {
                let refusal = analysis.pills.first().map_or(analysis.verdict, |p| p.verdict);
                let refusal = serde_json::to_value(refusal).ok().and_then(|v| v.as_str().map(String::from));
                *confusions.entry((ndc.clone(), refusal.unwrap_or_default())).or_default() += 1;
            }
            continue;
        };
        let right = pill.top_k[0].ndc == *ndc;
        let said_uncertain = analysis.verdict == Verdict::Uncertain;
        if is_twin(ndc, twins.and_then(|(_, c)| row.get(c)).map_or("", String::as_str)) {
            if is_known {
                twin_known.0 += 1;
                twin_known.1 += usize::from(right);
                twin_known.2 += usize::from(said_uncertain);
            } else {
                twin_open.0 += 1;
                twin_open.1 += usize::from(said_uncertain);
            }
            continue;
        }
        if !is_known {
            open.0 += 1;
            open.1 += usize::from(said_uncertain);
            continue;
        }
        n += 1;
        top1 += usize::from(right);
        top3 += usize::from(pill.top_k.iter().any(|r| r.ndc == *ndc));
        uncertain += usize::from(said_uncertain);
        let confidence = f64::from(pill.top_k[0].prob);
        let bin = ((confidence * 15.0) as usize).min(14);
        bins[bin].0 += 1;
        bins[bin].1 += confidence;
        bins[bin].2 += usize::from(right);
        if let Some(group) = group_col.and_then(|c| row.get(c)).filter(|g| !g.is_empty()) {
            let entry = groups.entry(group.clone()).or_default();
            entry.0 += 1;
            entry.1 += usize::from(right);
        }
        if !right {
            *confusions.entry((ndc.clone(), pill.top_k[0].ndc.clone())).or_default() += 1;
            mistakes.push(Mistake {
                file: file.clone(),
                expected: ndc.clone(),
                face: face_col.and_then(|c| row.get(c)).cloned().unwrap_or_default(),
                predicted: pill.top_k[0].ndc.clone(),
                confidence: pill.top_k[0].prob,
                verdict: analysis.verdict,
                rectangle_px: pill.region.rectangle_px,
                contrast: pill.region.contrast,
            });
        }
    }
    let share = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let scored: usize = bins.iter().map(|b| b.0).sum();
    let ece = bins
        .iter()
        .filter(|b| b.0 > 0)
        .map(|&(count, conf, correct)| {
            (count as f64 / scored as f64) * (conf / count as f64 - correct as f64 / count as f64).abs()
        })
        .sum();
    let mut confusions: Vec<Confusion> =
        confusions.into_iter().map(|((expected, predicted), count)| Confusion { expected, predicted, count }).collect();
    let refusal = |c: &Confusion| c.predicted == "NO_PILL" || c.predicted == "BAD_IMAGE";
    confusions
        .sort_by(|a, b| refusal(a).cmp(&refusal(b)).then(b.count.cmp(&a.count)).then(a.expected.cmp(&b.expected)));
    confusions.truncate(20);
    Ok(EvalReport {
        n,
        top1: share(top1, n),
        top3: share(top3, n),
        ece,
        uncertain_rate: share(uncertain, n),
        per_group: groups
            .into_iter()
            .map(|(g, (count, right))| (g, GroupScore { n: count, top1: share(right, count) }))
            .collect(),
        confusions,
        open_set: OpenSet { n: open.0, uncertain_rate: share(open.1, open.0) },
        not_analysed,
        twin_faces: twins.map(|_| TwinFaces {
            n: twin_known.0,
            top1: share(twin_known.1, twin_known.0),
            uncertain_rate: share(twin_known.2, twin_known.0),
            open_set_n: twin_open.0,
            open_set_uncertain_rate: share(twin_open.1, twin_open.0),
        }),
        mistakes,
    })
}
