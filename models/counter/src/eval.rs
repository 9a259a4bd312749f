//! Scoring the counter path over a labelled dataset, as a pure accumulator:
//! [`Scorer::add`] takes each image's labels and its [`Analysis`] (from
//! [`CounterPath::analyse`](crate::analysis::CounterPath::analyse) in
//! identification mode, so that the thresholds decide UNCERTAIN exactly as
//! they would at the counter), [`Scorer::report`] gives the [`EvalReport`].
//! Reading the dataset and running the path is the caller's: `rxvisiond
//! eval`, and the fleet's validation gates, which thereby score the very
//! counter path the appliances run.
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
//! [`Product::face_twin`](rxvision_models::formulary::Product::face_twin):
//! with the size cue, products of different measured size are not twins.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use rxvision_models::bundle::Label;
use rxvision_models::formulary::{Face, Formulary};
use rxvision_models::labels;
use serde::Serialize;

use crate::analysis::Analysis;
use crate::verdict::Verdict;

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
    /// The model's top-1 NDC, or for a frame refused before the model, the
    /// refusal's code (`no_pill`, `blurred`, `size_contradicts` …).
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
        [
            labels::quote(&self.file),
            labels::quote(&self.expected),
            labels::quote(&self.face),
            labels::quote(&self.predicted),
            format!("{:.4}", self.confidence),
            self.verdict.as_str().to_string(),
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
    /// Those refusals by reason code (`no_pill`, `pill_at_edge`, `blurred`,
    /// `too_dark`, `size_contradicts` …).
    pub refusals: BTreeMap<String, usize>,
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

/// One image of the dataset, as its labels describe it.
#[derive(Debug, Clone, Copy)]
pub struct Sample<'s> {
    /// The image, as the dataset names it (kept in [`Mistake::file`]).
    pub file: &'s str,
    /// The pill's NDC.
    pub ndc: &'s str,
    /// Its look-alike group (`None` or empty when in none).
    pub lookalike_group: Option<&'s str>,
    /// The face in view (`front` / `back`), `None` when the dataset does not say.
    pub face: Option<&'s str>,
}

/// The running scores of a dataset's images (see the module's docs).
#[derive(Debug)]
pub struct Scorer<'a> {
    known: HashSet<String>,
    twins: Option<TwinRule<'a>>,
    /// (images, top-1 right, UNCERTAIN)
    twin_known: (usize, usize, usize),
    /// (images, UNCERTAIN)
    twin_open: (usize, usize),
    n: usize,
    top1: usize,
    top3: usize,
    uncertain: usize,
    not_analysed: usize,
    refusals: BTreeMap<String, usize>,
    /// (count, sum of confidence, correct)
    bins: [(usize, f64, usize); 15],
    groups: BTreeMap<String, (usize, usize)>,
    confusions: HashMap<(String, String), usize>,
    /// (images, UNCERTAIN)
    open: (usize, usize),
    mistakes: Vec<Mistake>,
}

impl<'a> Scorer<'a> {
    /// Scores the answers of a model whose classes are `labels`; with
    /// `twins` (give it only when the dataset says which face is in view),
    /// images of twin faces are scored apart.
    pub fn new(labels: &[Label], twins: Option<TwinRule<'a>>) -> Scorer<'a> {
        Scorer {
            known: labels.iter().map(|l| l.ndc.clone()).collect(),
            twins,
            twin_known: (0, 0, 0),
            twin_open: (0, 0),
            n: 0,
            top1: 0,
            top3: 0,
            uncertain: 0,
            not_analysed: 0,
            refusals: BTreeMap::new(),
            bins: [(0, 0.0, 0); 15],
            groups: BTreeMap::new(),
            confusions: HashMap::new(),
            open: (0, 0),
            mistakes: Vec::new(),
        }
    }

    /// Whether image `ndc`/`face` shows a face some *other* known product
    /// shares (always false without a twin rule).
    pub fn is_twin(&self, ndc: &str, face: &str) -> bool {
        let Some(rule) = self.twins else { return false };
        let face = match face {
            "front" => Face::Front,
            "back" => Face::Back,
            _ => return false,
        };
        let Some(product) = rule.formulary.get(ndc) else { return false };
        self.known
            .iter()
            .filter_map(|k| rule.formulary.get(k))
            .any(|other| product.face_twin(face, other, rule.by_size))
    }

    /// Scores one image: what the counter path concluded about `sample`.
    pub fn add(&mut self, sample: &Sample<'_>, analysis: &Analysis) {
        let ndc = sample.ndc;
        let is_known = self.known.contains(ndc);
        let Some(pill) = analysis.pills.first().filter(|p| !p.top_k.is_empty()) else {
            self.not_analysed += 1;
            let code = analysis.refusal.or_else(|| analysis.pills.first().and_then(|p| p.refusal));
            *self.refusals.entry(code.unwrap_or("other").to_string()).or_default() += 1;
            if is_known {
                let verdict = analysis.pills.first().map_or(analysis.verdict, |p| p.verdict);
                let refusal = serde_json::to_value(verdict).ok().and_then(|v| v.as_str().map(String::from));
                *self.confusions.entry((ndc.to_string(), refusal.unwrap_or_default())).or_default() += 1;
                let region = analysis.pills.first().map(|p| (p.region.rectangle_px, p.region.contrast));
                self.mistakes.push(Mistake {
                    file: sample.file.to_string(),
                    expected: ndc.to_string(),
                    face: sample.face.unwrap_or_default().to_string(),
                    predicted: code.unwrap_or("other").to_string(),
                    confidence: 0.0,
                    verdict,
                    rectangle_px: region.map_or([0.0; 2], |r| r.0),
                    contrast: region.map_or(0.0, |r| r.1),
                });
            }
            return;
        };
        let right = pill.top_k[0].ndc == ndc;
        let said_uncertain = analysis.verdict == Verdict::Uncertain;
        if self.is_twin(ndc, sample.face.unwrap_or("")) {
            if is_known {
                self.twin_known.0 += 1;
                self.twin_known.1 += usize::from(right);
                self.twin_known.2 += usize::from(said_uncertain);
            } else {
                self.twin_open.0 += 1;
                self.twin_open.1 += usize::from(said_uncertain);
            }
            return;
        }
        if !is_known {
            self.open.0 += 1;
            self.open.1 += usize::from(said_uncertain);
            return;
        }
        self.n += 1;
        self.top1 += usize::from(right);
        self.top3 += usize::from(pill.top_k.iter().any(|r| r.ndc == ndc));
        self.uncertain += usize::from(said_uncertain);
        let confidence = f64::from(pill.top_k[0].prob);
        let bin = ((confidence * 15.0) as usize).min(14);
        self.bins[bin].0 += 1;
        self.bins[bin].1 += confidence;
        self.bins[bin].2 += usize::from(right);
        if let Some(group) = sample.lookalike_group.filter(|g| !g.is_empty()) {
            let entry = self.groups.entry(group.to_string()).or_default();
            entry.0 += 1;
            entry.1 += usize::from(right);
        }
        if !right {
            *self.confusions.entry((ndc.to_string(), pill.top_k[0].ndc.clone())).or_default() += 1;
            self.mistakes.push(Mistake {
                file: sample.file.to_string(),
                expected: ndc.to_string(),
                face: sample.face.unwrap_or_default().to_string(),
                predicted: pill.top_k[0].ndc.clone(),
                confidence: pill.top_k[0].prob,
                verdict: analysis.verdict,
                rectangle_px: pill.region.rectangle_px,
                contrast: pill.region.contrast,
            });
        }
    }

    /// The scores of every image added so far.
    pub fn report(self) -> EvalReport {
        let share = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let scored: usize = self.bins.iter().map(|b| b.0).sum();
        let ece = self
            .bins
            .iter()
            .filter(|b| b.0 > 0)
            .map(|&(count, conf, correct)| {
                (count as f64 / scored as f64) * (conf / count as f64 - correct as f64 / count as f64).abs()
            })
            .sum();
        let mut confusions: Vec<Confusion> = self
            .confusions
            .into_iter()
            .map(|((expected, predicted), count)| Confusion { expected, predicted, count })
            .collect();
        let refusal = |c: &Confusion| c.predicted == "NO_PILL" || c.predicted == "BAD_IMAGE";
        confusions
            .sort_by(|a, b| refusal(a).cmp(&refusal(b)).then(b.count.cmp(&a.count)).then(a.expected.cmp(&b.expected)));
        confusions.truncate(20);
        let (n, twin_known, twin_open, open) = (self.n, self.twin_known, self.twin_open, self.open);
        EvalReport {
            n,
            top1: share(self.top1, n),
            top3: share(self.top3, n),
            ece,
            uncertain_rate: share(self.uncertain, n),
            per_group: self
                .groups
                .into_iter()
                .map(|(g, (count, right))| (g, GroupScore { n: count, top1: share(right, count) }))
                .collect(),
            confusions,
            open_set: OpenSet { n: open.0, uncertain_rate: share(open.1, open.0) },
            not_analysed: self.not_analysed,
            refusals: self.refusals,
            twin_faces: self.twins.map(|_| TwinFaces {
                n: twin_known.0,
                top1: share(twin_known.1, twin_known.0),
                uncertain_rate: share(twin_known.2, twin_known.0),
                open_set_n: twin_open.0,
                open_set_uncertain_rate: share(twin_open.1, twin_open.0),
            }),
            mistakes: self.mistakes,
        }
    }
}

/// A share of verification scans answered MATCH.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct MatchRate {
    /// Scans.
    pub n: usize,
    /// Of them answered MATCH.
    pub matched: usize,
    /// `matched / n` (0 without scans).
    pub rate: f64,
}

impl MatchRate {
    fn add(&mut self, matched: bool) {
        self.n += 1;
        self.matched += usize::from(matched);
        self.rate = self.matched as f64 / self.n as f64;
    }
}

/// The counter as a pharmacy system uses it, with an expected NDC: scans of
/// a correct known pill answered MATCH (automation; refusals count against
/// it; twin faces, which no picture can decide, left out), and scans of a
/// wrong pill answered MATCH (false MATCH) when a look-alike the model knows
/// is expected, for pills of known products and of products the model does
/// not know.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct VerifyReport {
    /// The pill's own NDC expected: MATCH is right.
    pub automation: MatchRate,
    /// A known look-alike expected for a known pill: MATCH is wrong.
    pub false_match_lookalike: MatchRate,
    /// A known look-alike expected for a pill of a product the model does not know: MATCH is wrong.
    pub false_match_unknown: MatchRate,
}

impl VerifyReport {
    /// Adds one verification scan: `own` says whether the pill's product is
    /// one the model knows, `expected_own` whether its own NDC was expected,
    /// `verdict` what the counter answered.
    pub fn add(&mut self, known: bool, expected_own: bool, verdict: Verdict) {
        let matched = verdict == Verdict::Match;
        match (known, expected_own) {
            (true, true) => self.automation.add(matched),
            (true, false) => self.false_match_lookalike.add(matched),
            (false, _) => self.false_match_unknown.add(matched),
        }
    }
}

/// Which known product a verification scan expects in place of an image's
/// own: for an impostor (`imitates`), the product it imitates when the
/// model knows it; otherwise the first other product (by NDC) of the
/// image's look-alike group that the model knows.
#[derive(Debug, Clone, Default)]
pub struct Lookalikes {
    known: BTreeSet<String>,
    by_group: BTreeMap<String, BTreeSet<String>>,
}

impl Lookalikes {
    /// The look-alikes of a dataset's images for a model whose classes are `model_labels`.
    pub fn new<'i>(images: impl IntoIterator<Item = &'i labels::DatasetImage>, model_labels: &[Label]) -> Lookalikes {
        let known: BTreeSet<String> = model_labels.iter().map(|l| l.ndc.clone()).collect();
        let mut by_group: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for image in images {
            if known.contains(&image.ndc) && !image.lookalike_group.is_empty() {
                by_group.entry(image.lookalike_group.clone()).or_default().insert(image.ndc.clone());
            }
        }
        Lookalikes { known, by_group }
    }

    /// The known product to expect in place of `image`'s own, if any.
    pub fn instead_of<'s>(&'s self, image: &labels::DatasetImage) -> Option<&'s str> {
        if let Some(imitated) = self.known.get(&image.imitates) {
            return Some(imitated);
        }
        if image.lookalike_group.is_empty() {
            return None;
        }
        self.by_group.get(&image.lookalike_group)?.iter().map(String::as_str).find(|other| *other != image.ndc)
    }
}

/// One verification scan a dataset image stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyCase<'a> {
    /// Whether the pill's product is one the model knows.
    pub known: bool,
    /// Whether its own NDC is expected (MATCH right) or a look-alike's (MATCH wrong).
    pub expected_own: bool,
    /// The NDC expected.
    pub expected: &'a str,
}

/// The verification scans an image stands for ([`VerifyReport`]): its own
/// NDC expected (a known product, unless its face is a twin no picture can
/// decide), and a known look-alike expected ([`Lookalikes::instead_of`],
/// when there is one).
pub fn verify_cases<'a>(
    image: &'a labels::DatasetImage,
    known: bool,
    twin: bool,
    lookalikes: &'a Lookalikes,
) -> Vec<VerifyCase<'a>> {
    let mut cases = Vec::with_capacity(2);
    if known && !twin {
        cases.push(VerifyCase { known, expected_own: true, expected: &image.ndc });
    }
    if let Some(other) = lookalikes.instead_of(image) {
        cases.push(VerifyCase { known, expected_own: false, expected: other });
    }
    cases
}

/// The lowest `min_confidence` at which the counter would answer MATCH for
/// `expected`, given the scan's identification-mode analysis (same frame,
/// same model, same size cue): every pill judged, each with `expected` on
/// top at least `min_margin` ahead of the next. `None`: no threshold makes
/// it a MATCH (refused, another product on top, a narrow margin).
pub fn matched_at(analysis: &Analysis, expected: &str, min_margin: f32) -> Option<f32> {
    if analysis.refusal.is_some() || analysis.pills.is_empty() {
        return None;
    }
    let mut lowest = f32::INFINITY;
    for pill in &analysis.pills {
        let top = pill.top_k.first().filter(|_| pill.refusal.is_none())?;
        let next = pill.top_k.get(1).map_or(0.0, |r| r.prob);
        if top.ndc != expected || top.prob - next < min_margin {
            return None;
        }
        lowest = lowest.min(top.prob);
    }
    Some(lowest)
}

/// The confidence thresholds the verification curve is drawn at.
pub const CURVE_THRESHOLDS: [f32; 13] =
    [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999];

/// Verification at every confidence threshold: automation against false
/// MATCH, from each verification scan's [`matched_at`]. One threshold for
/// every product: a bundle's per-product MATCH thresholds are calibrated
/// from these scans ([`VerifyScan`]), not drawn here.
#[derive(Debug, Clone, Default)]
pub struct VerifyCurve {
    scans: Vec<VerifyScan>,
}

/// One verification scan as the curve keeps it (`rxvisiond eval --verify
/// --scans FILE` writes them for calibrating per-product MATCH thresholds).
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyScan {
    /// The image, as `labels.csv` names it.
    pub file: String,
    /// The NDC expected.
    pub expected: String,
    /// Whether the pill's product is one the model knows.
    pub known: bool,
    /// Whether its own NDC was expected.
    pub expected_own: bool,
    /// The lowest `min_confidence` answering MATCH ([`matched_at`]).
    pub matched_at: Option<f32>,
    /// The first pill's measured length and width, frame pixels (smallest
    /// rectangle); `None` when no pill was measured.
    pub rectangle_px: Option<[f32; 2]>,
}

impl VerifyScan {
    /// The CSV header of [`VerifyScan::csv_row`]: `case` is `own` (automation),
    /// `lookalike` or `unknown` (false MATCH); `matched_at` is empty when no
    /// threshold answers MATCH; `length_px` and `width_px` are the pill's
    /// measured size (empty when none was measured), for studying the size
    /// cue offline.
    pub const CSV_HEADER: &'static str = "file,expected,case,matched_at,length_px,width_px";

    /// The scan's case name.
    pub fn case(&self) -> &'static str {
        match (self.known, self.expected_own) {
            (true, true) => "own",
            (true, false) => "lookalike",
            (false, _) => "unknown",
        }
    }

    /// One CSV row.
    pub fn csv_row(&self) -> String {
        // The shortest form that reads back as the same f32: thresholds are chosen from these values.
        let matched_at = self.matched_at.map_or(String::new(), |p| p.to_string());
        let size = |i: usize| self.rectangle_px.map_or(String::new(), |r| format!("{:.1}", r[i]));
        [
            labels::quote(&self.file),
            labels::quote(&self.expected),
            self.case().to_string(),
            matched_at,
            size(0),
            size(1),
        ]
        .join(",")
    }
}

/// One point of the curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CurvePoint {
    /// The `min_confidence` it assumes.
    pub min_confidence: f32,
    /// The three cases at that threshold.
    #[serde(flatten)]
    pub report: VerifyReport,
}

impl VerifyCurve {
    /// Adds one verification scan of the image `file`, with the first pill's
    /// measured size in frame pixels (`None`: no pill measured).
    pub fn add(&mut self, file: &str, case: VerifyCase<'_>, matched_at: Option<f32>, rectangle_px: Option<[f32; 2]>) {
        self.scans.push(VerifyScan {
            file: file.to_string(),
            expected: case.expected.to_string(),
            known: case.known,
            expected_own: case.expected_own,
            matched_at,
            rectangle_px,
        });
    }

    /// The scans, in the order added.
    pub fn into_scans(self) -> Vec<VerifyScan> {
        self.scans
    }

    /// The three cases as the counter would answer with `min_confidence`.
    pub fn at(&self, min_confidence: f32) -> VerifyReport {
        let mut report = VerifyReport::default();
        for scan in &self.scans {
            let verdict =
                if scan.matched_at.is_some_and(|p| p >= min_confidence) { Verdict::Match } else { Verdict::Uncertain };
            report.add(scan.known, scan.expected_own, verdict);
        }
        report
    }

    /// The curve at `thresholds`.
    pub fn points(&self, thresholds: &[f32]) -> Vec<CurvePoint> {
        thresholds.iter().map(|&t| CurvePoint { min_confidence: t, report: self.at(t) }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verification_scans_land_in_their_case() {
        let mut report = VerifyReport::default();
        report.add(true, true, Verdict::Match);
        report.add(true, true, Verdict::BadImage);
        report.add(true, false, Verdict::Mismatch);
        report.add(false, false, Verdict::Match);
        assert_eq!((report.automation.n, report.automation.matched, report.automation.rate), (2, 1, 0.5));
        assert_eq!((report.false_match_lookalike.n, report.false_match_lookalike.matched), (1, 0));
        assert_eq!((report.false_match_unknown.n, report.false_match_unknown.rate), (1, 1.0));
    }

    #[test]
    fn the_curve_matches_a_scan_up_to_its_own_confidence() {
        let case = |known, expected_own| VerifyCase { known, expected_own, expected: "a" };
        let mut curve = VerifyCurve::default();
        let size = Some([153.04, 57.96]);
        curve.add("1.jpg", case(true, true), Some(0.97), size);
        curve.add("2.jpg", case(true, true), Some(0.9995), size);
        curve.add("3.jpg", case(true, true), None, size);
        curve.add("4,a.jpg", case(true, false), Some(0.8), size);
        curve.add("5.jpg", case(false, false), None, None);
        let rows: Vec<String> = curve.clone().into_scans().iter().map(VerifyScan::csv_row).collect();
        assert_eq!(rows[0], "1.jpg,a,own,0.97,153.0,58.0");
        assert_eq!(rows[1], "2.jpg,a,own,0.9995,153.0,58.0");
        assert_eq!(rows[3], "\"4,a.jpg\",a,lookalike,0.8,153.0,58.0");
        assert_eq!(rows[4], "5.jpg,a,unknown,,,");
        assert_eq!(VerifyScan::CSV_HEADER.split(',').count(), rows[4].split(',').count());
        let at = |t| {
            let r = curve.at(t);
            (r.automation.matched, r.automation.n, r.false_match_lookalike.matched, r.false_match_unknown.n)
        };
        assert_eq!(at(0.5), (2, 3, 1, 1));
        assert_eq!(at(0.97), (2, 3, 0, 1), "a threshold equal to the confidence still matches");
        assert_eq!(at(0.999), (1, 3, 0, 1));
        assert_eq!(at(0.9999), (0, 3, 0, 1));
        let points = curve.points(&[0.5, 0.999]);
        assert_eq!((points[1].min_confidence, points[1].report), (0.999, curve.at(0.999)));
    }

    #[test]
    fn the_lookalike_is_the_imitated_product_or_another_known_product_of_the_group() {
        let image = |ndc: &str, group: &str, imitates: &str| labels::DatasetImage {
            file: String::new(),
            ndc: ndc.into(),
            lookalike_group: group.into(),
            face: None,
            imitates: imitates.into(),
        };
        let label = |ndc: &str| Label {
            index: 0,
            ndc: ndc.into(),
            name: String::new(),
            strength: String::new(),
            attributes: Default::default(),
        };
        let images = [image("a", "LA01", ""), image("b", "LA01", ""), image("c", "", ""), image("x", "LA01", "")];
        let lookalikes = Lookalikes::new(&images, &[label("a"), label("b"), label("c")]);
        let instead = |ndc, group, imitates| lookalikes.instead_of(&image(ndc, group, imitates)).map(str::to_owned);
        assert_eq!(instead("a", "LA01", ""), Some("b".into()));
        assert_eq!(instead("b", "LA01", ""), Some("a".into()));
        assert_eq!(instead("x", "LA01", ""), Some("a".into()), "an unknown product gets the first known one");
        assert_eq!(instead("a", "", ""), None);
        assert_eq!(instead("a", "LA02", ""), None);
        assert_eq!(instead("99999-c", "", "c"), Some("c".into()), "an impostor expects what it imitates");
        assert_eq!(instead("99999-b", "LA01", "b"), Some("b".into()));
        assert_eq!(instead("99999-x", "LA01", "x"), Some("a".into()), "x is not known: its group's first");
        assert_eq!(instead("99999-y", "", "y"), None);
    }
}
