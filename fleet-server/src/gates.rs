//! Validation gates: a pushed model is measured on a registered held-out
//! dataset with the appliances' own engine and counter path
//! (`rxvision-counter`: quality gate, localiser, crop, size cue, thresholds),
//! and may be rolled out only when every gate passes.
//!
//! [`measure`] runs every image through the path three ways, as a pharmacy
//! system would: identification (top-1, latency), its own NDC expected
//! (automation: MATCH, refusals counting against it, twin faces left out),
//! and a known look-alike expected (false MATCH, for known products and for
//! products the model does not know). [`judge`] (pure) holds the measures
//! against the limits of `[gates]` — by default the brief's budgets — and
//! against production's measures on the same dataset. [`Db::validate_model`]
//! stores the report (numbers, dataset hash, engine, code version) and moves
//! the version to `validated` or `rejected` with the failed gates as reason.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use rxvision_counter::analysis::{CounterPath, ScanRequest};
use rxvision_counter::eval::{verify_cases, Lookalikes, Sample, Scorer, TwinRule, VerifyReport};
use rxvision_models::classify::Classifier;
use rxvision_models::engine::{EngineOptions, EnginePreference};
use rxvision_models::formulary::Formulary;
use rxvision_models::labels;
use serde::{Deserialize, Serialize};

use crate::config::FleetConfig;
use crate::datasets::Dataset;
use crate::db::Db;
use crate::registry::{artifact_path, ModelError, ModelState, PRODUCTION};

/// The formulary the fleet's models are made for (sizes for the size cue,
/// twin faces), as shipped.
const FORMULARY: &str = include_str!("../../models/formulary/formulary.json");

/// The limits a model must meet (`[gates]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GateLimits {
    /// Top-1 on the analysed images of known products, at least.
    pub min_top1: f64,
    /// Automation (own NDC expected → MATCH), at least.
    pub min_automation: f64,
    /// False MATCH with a known look-alike expected, at most.
    pub max_false_match_lookalike: f64,
    /// False MATCH on products the model does not know, at most.
    pub max_false_match_unknown: f64,
    /// How far (points, of 100) automation may fall, or false MATCH rise, against production.
    pub max_regression_points: f64,
    /// Counter-path p95, milliseconds, at most.
    pub max_p95_ms: f64,
    /// Peak resident memory while measuring, MB, at most.
    pub max_peak_memory_mb: f64,
}

impl Default for GateLimits {
    /// The brief's budgets.
    fn default() -> GateLimits {
        GateLimits {
            min_top1: 0.90,
            min_automation: 0.90,
            max_false_match_lookalike: 0.002,
            max_false_match_unknown: 0.01,
            max_regression_points: 1.0,
            max_p95_ms: 15.0,
            max_peak_memory_mb: 2048.0,
        }
    }
}

/// A share of scans answered MATCH.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    /// Scans.
    pub n: usize,
    /// Of them MATCH.
    pub matched: usize,
    /// `matched / n`.
    pub rate: f64,
}

impl From<rxvision_counter::eval::MatchRate> for Rate {
    fn from(r: rxvision_counter::eval::MatchRate) -> Rate {
        Rate { n: r.n, matched: r.matched, rate: r.rate }
    }
}

/// What one model did on one dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measures {
    /// The dataset's hash.
    pub dataset: String,
    /// The engine that answered.
    pub engine: String,
    /// Images.
    pub images: usize,
    /// Analysed images of known products (not twin faces).
    pub identified: usize,
    /// Top-1 on them.
    pub top1: f64,
    /// Share of them answered UNCERTAIN.
    pub uncertain_rate: f64,
    /// Images refused before the model.
    pub not_analysed: usize,
    /// Own NDC expected → MATCH.
    pub automation: Rate,
    /// A known look-alike expected for a known pill → MATCH.
    pub false_match_lookalike: Rate,
    /// A known look-alike expected for an unknown product's pill → MATCH.
    pub false_match_unknown: Rate,
    /// Counter-path latency (identification), ms.
    pub p50_ms: f64,
    /// See `p50_ms`.
    pub p95_ms: f64,
    /// Peak resident memory of the measuring process, MB (an upper bound for the model's).
    pub peak_memory_mb: f64,
}

/// One gate's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    /// What is checked.
    pub name: String,
    /// The measured value.
    pub value: f64,
    /// The limit it is held to.
    pub limit: f64,
    /// Whether it passed.
    pub passed: bool,
    /// In words.
    pub detail: String,
}

/// The stored report of a validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateReport {
    /// The version validated.
    pub version: String,
    /// Its artifact's SHA-256.
    pub sha256: String,
    /// The dataset's name and hash.
    pub dataset_name: String,
    /// See `dataset_name`.
    pub dataset_hash: String,
    /// The code that measured (`rxfleet` version).
    pub code_version: String,
    /// The candidate's measures.
    pub measures: Measures,
    /// Production's version and measures on the same dataset, when there is one.
    pub production: Option<(String, Measures)>,
    /// Every gate.
    pub gates: Vec<Gate>,
    /// Whether all passed.
    pub passed: bool,
    /// When it ran, Unix ms, and how long it took.
    pub at_ms: i64,
    /// See `at_ms`.
    pub duration_ms: i64,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Peak resident memory of this process so far (VmHWM), MB.
fn peak_memory_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Measures the bundle at `bundle` on the dataset copy in `dir` (blocking:
/// run it off the async runtime).
pub fn measure(bundle: &Path, dataset: &Dataset, dir: &Path, engine: EnginePreference) -> Result<Measures, String> {
    let formulary =
        Formulary::parse(FORMULARY, Path::new("models/formulary/formulary.json")).map_err(|e| e.to_string())?;
    let options = EngineOptions { preference: engine, ..EngineOptions::default() };
    let classifier = Classifier::open(Some(bundle), &[], options).map_err(|e| e.to_string())?;
    let mut path = CounterPath::new(Arc::new(classifier));
    if let Some(scale) = dataset.px_per_mm {
        let cue =
            rxvision_counter::size::SizeCue::from_formulary(scale, &path.classifier().bundle().labels, &formulary);
        path = path.with_size_cue(cue);
    }
    let images = labels::read_dataset(&dir.join("labels.csv"))?;
    let has_faces = images.iter().any(|i| i.face.is_some());
    let labels = &path.classifier().bundle().labels;
    let known: BTreeSet<&str> = labels.iter().map(|l| l.ndc.as_str()).collect();
    let lookalikes = Lookalikes::new(&images, labels);
    let twins = TwinRule { formulary: &formulary, by_size: dataset.px_per_mm.is_some() };
    let mut scorer = Scorer::new(labels, has_faces.then_some(twins));
    let mut verify = VerifyReport::default();
    let mut latencies = Vec::with_capacity(images.len());
    let ask = |expected: Option<&str>, bytes: &[u8], file: &str| {
        let request =
            ScanRequest { expected_ndc: expected.map(str::to_string), operator_id: "gates".into(), rx_ref: None };
        path.analyse(&request, bytes).map_err(|e| format!("{file}: {e}"))
    };
    for image in &images {
        let bytes = std::fs::read(dir.join(&image.file)).map_err(|e| format!("{}: {e}", image.file))?;
        let identified = ask(None, &bytes, &image.file)?;
        latencies.push(identified.latency_ms);
        let sample = Sample {
            file: &image.file,
            ndc: &image.ndc,
            lookalike_group: Some(image.lookalike_group.as_str()),
            face: image.face.as_deref(),
        };
        scorer.add(&sample, &identified);
        let is_known = known.contains(image.ndc.as_str());
        let twin = scorer.is_twin(&image.ndc, image.face.as_deref().unwrap_or(""));
        for case in verify_cases(image, is_known, twin, &lookalikes) {
            verify.add(case.known, case.expected_own, ask(Some(case.expected), &bytes, &image.file)?.verdict);
        }
    }
    latencies.sort_by(f64::total_cmp);
    let engine = path.classifier().engines().active().to_string();
    let report = scorer.report();
    Ok(Measures {
        dataset: dataset.hash.clone(),
        engine,
        images: images.len(),
        identified: report.n,
        top1: report.top1,
        uncertain_rate: report.uncertain_rate,
        not_analysed: report.not_analysed,
        automation: verify.automation.into(),
        false_match_lookalike: verify.false_match_lookalike.into(),
        false_match_unknown: verify.false_match_unknown.into(),
        p50_ms: percentile(&latencies, 0.5),
        p95_ms: percentile(&latencies, 0.95),
        peak_memory_mb: peak_memory_mb(),
    })
}

/// Holds a candidate's measures against the limits and against
/// production's (when given). A case the dataset does not exercise (no
/// look-alike scans, say) fails: no evidence is not a pass.
pub fn judge(candidate: &Measures, production: Option<&Measures>, limits: &GateLimits) -> Vec<Gate> {
    let mut gates = Vec::new();
    let mut at_least = |name: &str, value: f64, limit: f64, n: usize, what: &str| {
        let passed = n > 0 && value >= limit;
        let detail = if n == 0 {
            format!("no {what} in the dataset")
        } else {
            format!("{value:.4} over {n} {what}, needs ≥ {limit}")
        };
        gates.push(Gate { name: name.into(), value, limit, passed, detail });
    };
    at_least("top1", candidate.top1, limits.min_top1, candidate.identified, "identified images");
    at_least("automation", candidate.automation.rate, limits.min_automation, candidate.automation.n, "own-NDC scans");
    let mut at_most = |name: &str, value: f64, limit: f64, n: usize, what: &str| {
        let passed = n > 0 && value <= limit;
        let detail = if n == 0 {
            format!("no {what} in the dataset")
        } else {
            format!("{value:.4} over {n} {what}, needs ≤ {limit}")
        };
        gates.push(Gate { name: name.into(), value, limit, passed, detail });
    };
    let m = candidate;
    at_most(
        "false_match_lookalike",
        m.false_match_lookalike.rate,
        limits.max_false_match_lookalike,
        m.false_match_lookalike.n,
        "look-alike scans",
    );
    at_most(
        "false_match_unknown",
        m.false_match_unknown.rate,
        limits.max_false_match_unknown,
        m.false_match_unknown.n,
        "unknown-product scans",
    );
    at_most("p95_ms", m.p95_ms, limits.max_p95_ms, m.images, "images");
    at_most("peak_memory_mb", m.peak_memory_mb, limits.max_peak_memory_mb, 1, "measurement");
    if let Some(p) = production {
        let points = limits.max_regression_points / 100.0;
        let regression = |name: &str, worse_by: f64, production: f64, candidate: f64| Gate {
            name: name.into(),
            value: worse_by * 100.0,
            limit: limits.max_regression_points,
            passed: worse_by <= points,
            detail: format!(
                "{candidate:.4} against production's {production:.4}: {:+.2} points worse",
                worse_by * 100.0
            ),
        };
        gates.push(regression(
            "automation_vs_production",
            p.automation.rate - m.automation.rate,
            p.automation.rate,
            m.automation.rate,
        ));
        gates.push(regression(
            "false_match_lookalike_vs_production",
            m.false_match_lookalike.rate - p.false_match_lookalike.rate,
            p.false_match_lookalike.rate,
            m.false_match_lookalike.rate,
        ));
        gates.push(regression(
            "false_match_unknown_vs_production",
            m.false_match_unknown.rate - p.false_match_unknown.rate,
            p.false_match_unknown.rate,
            m.false_match_unknown.rate,
        ));
    }
    gates
}

impl Db {
    /// Runs the gates for `version` on the dataset `dataset` (default: the
    /// newest registered), stores the report, and moves a candidate (or a
    /// re-validated version) to `validated` or `rejected`. Versions already
    /// rolling out or beyond keep their state; their report is stored.
    pub async fn validate_model(
        &self,
        version: &str,
        dataset: Option<&str>,
        config: &FleetConfig,
        actor: &str,
        now_ms: i64,
    ) -> Result<GateReport, ModelError> {
        let model = self.model(version).await?.ok_or_else(|| ModelError::NotFound(version.into()))?;
        let dataset = self.dataset(dataset).await?.ok_or_else(|| {
            ModelError::Conflict(match dataset {
                Some(d) => format!("no dataset {d:?} (`rxfleet datasets list`)"),
                None => "no held-out dataset registered: `rxfleet datasets add DIR`".into(),
            })
        })?;
        let started = std::time::Instant::now();
        let gates = &config.gates;
        let run = |sha256: String| {
            let bundle = artifact_path(&config.updates.artifacts_dir, &sha256);
            let (dataset, dir, engine) = (dataset.clone(), dataset.dir(&gates.datasets_dir), gates.engine);
            async move {
                tokio::task::spawn_blocking(move || measure(&bundle, &dataset, &dir, engine))
                    .await
                    .map_err(|e| ModelError::Conflict(format!("the measurement failed: {e}")))?
                    .map_err(ModelError::Conflict)
            }
        };
        let measures = run(model.sha256.clone()).await?;
        let production = match self.model(PRODUCTION).await? {
            Some(p) if p.version != model.version => {
                let stored = p
                    .gate_report
                    .as_ref()
                    .and_then(|r| serde_json::from_value::<GateReport>(r.clone()).ok())
                    .filter(|r| r.measures.dataset == dataset.hash && r.measures.engine == measures.engine);
                let measured = match stored {
                    Some(report) => report.measures,
                    None => run(p.sha256.clone()).await?,
                };
                Some((p.version, measured))
            }
            _ => None,
        };
        let results = judge(&measures, production.as_ref().map(|(_, m)| m), &gates.limits);
        let passed = results.iter().all(|g| g.passed);
        let report = GateReport {
            version: model.version.clone(),
            sha256: model.sha256.clone(),
            dataset_name: dataset.name.clone(),
            dataset_hash: dataset.hash.clone(),
            code_version: format!("rxfleet {}", env!("CARGO_PKG_VERSION")),
            measures,
            production,
            gates: results,
            passed,
            at_ms: now_ms,
            duration_ms: started.elapsed().as_millis() as i64,
        };
        let failed: Vec<String> =
            report.gates.iter().filter(|g| !g.passed).map(|g| format!("{}: {}", g.name, g.detail)).collect();
        let movable = matches!(model.state, ModelState::Candidate | ModelState::Validated | ModelState::Rejected);
        let (state, reason) = match (movable, passed) {
            (false, _) => (model.state, model.state_reason.clone()),
            (true, true) => {
                (ModelState::Validated, format!("gates passed on {} ({} images)", dataset.name, dataset.images))
            }
            (true, false) => (ModelState::Rejected, format!("gates failed: {}", failed.join("; "))),
        };
        let mut tx = self.begin_write().await?;
        sqlx::query("UPDATE model_versions SET gate_report = $2, state = $3, state_reason = $4, updated_ms = $5 WHERE version = $1")
            .bind(&model.version)
            .bind(serde_json::to_string(&report).expect("a report serialises"))
            .bind(state.as_str())
            .bind(&reason)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        let kind = if passed { "model_validated" } else { "model_rejected" };
        let details = serde_json::json!({
            "version": model.version, "dataset": dataset.hash, "passed": passed, "failed": failed,
            "top1": report.measures.top1, "automation": report.measures.automation.rate,
            "false_match_lookalike": report.measures.false_match_lookalike.rate,
            "false_match_unknown": report.measures.false_match_unknown.rate, "p95_ms": report.measures.p95_ms,
        });
        crate::devices::record_change(&mut tx, now_ms, actor, kind, None, details).await?;
        tx.commit().await?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measures(automation: f64, lookalike: f64) -> Measures {
        let rate = |rate: f64, n: usize| Rate { n, matched: (rate * n as f64) as usize, rate };
        Measures {
            dataset: "d".into(),
            engine: "cpu".into(),
            images: 1000,
            identified: 900,
            top1: 0.97,
            uncertain_rate: 0.05,
            not_analysed: 10,
            automation: rate(automation, 900),
            false_match_lookalike: rate(lookalike, 1000),
            false_match_unknown: rate(0.0, 200),
            p50_ms: 8.0,
            p95_ms: 12.0,
            peak_memory_mb: 300.0,
        }
    }

    fn failed(gates: &[Gate]) -> Vec<&str> {
        gates.iter().filter(|g| !g.passed).map(|g| g.name.as_str()).collect()
    }

    #[test]
    fn a_model_within_every_budget_passes() {
        assert!(failed(&judge(&measures(0.93, 0.001), None, &GateLimits::default())).is_empty());
    }

    #[test]
    fn each_budget_and_a_regression_against_production_fail_by_name() {
        let limits = GateLimits::default();
        assert_eq!(failed(&judge(&measures(0.85, 0.001), None, &limits)), ["automation"]);
        assert_eq!(failed(&judge(&measures(0.93, 0.01), None, &limits)), ["false_match_lookalike"]);
        let production = measures(0.95, 0.0);
        assert_eq!(failed(&judge(&measures(0.93, 0.001), Some(&production), &limits)), ["automation_vs_production"]);
        assert!(
            failed(&judge(&measures(0.945, 0.001), Some(&production), &limits)).is_empty(),
            "half a point is within one"
        );
        let mut slow = measures(0.93, 0.001);
        slow.p95_ms = 40.0;
        slow.peak_memory_mb = 4096.0;
        assert_eq!(failed(&judge(&slow, None, &limits)), ["p95_ms", "peak_memory_mb"]);
    }

    #[test]
    fn a_case_the_dataset_does_not_exercise_is_not_a_pass() {
        let mut m = measures(0.93, 0.001);
        m.false_match_unknown = Rate::default();
        assert_eq!(failed(&judge(&m, None, &GateLimits::default())), ["false_match_unknown"]);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!((percentile(&xs, 0.5), percentile(&xs, 0.95), percentile(&[], 0.95)), (50.0, 95.0, 0.0));
    }
}
