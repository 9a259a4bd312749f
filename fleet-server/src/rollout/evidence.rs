//! A stage's telemetry evidence, read from the devices' hourly rollups.
//!
//! The stage is the registered devices whose [`super::cohort_bucket`] falls
//! in the stage's percentage, counted only on the candidate version (so
//! only what they answered after installing it); the control cohort is the
//! devices outside the stage, on the previous version, over the same hours.
//! A device in neither (outside the stage on a third version, or in it and
//! not yet updated) is no evidence. Each hour since the stage began is one
//! period of every metric ([`Metric`]); the slow-scan threshold is the
//! control cohort's own p95 latency bucket over the stage's hours.
//!
//! Vetoes (install failures, crash-loop rollbacks) come from the updater's
//! events, not from telemetry, and are the caller's to add.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::Row;

use super::sequential::PeriodCounts;
use super::stage::{Evidence, Metric};
use crate::db::{Db, DbError};
use crate::rollup::{Counts, HOUR_MS, LATENCY_BUCKETS};

/// Which stage is read.
#[derive(Debug, Clone)]
pub struct StageQuery<'a> {
    /// The version being rolled out.
    pub candidate: &'a str,
    /// The version the control cohort runs.
    pub previous: &'a str,
    /// The stage's share of the fleet, percent.
    pub percent: u32,
    /// When the stage began, Unix ms.
    pub since_ms: i64,
}

/// Per hour: the stage's sums and the control's.
type Hours = BTreeMap<i64, (Counts, Counts)>;

impl Db {
    /// The evidence about a stage from telemetry (see the module documentation).
    pub async fn stage_evidence(&self, query: &StageQuery<'_>) -> Result<Evidence, DbError> {
        let registered: Vec<String> = sqlx::query("SELECT device_id FROM device_registry WHERE retired_ms IS NULL")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let stage_devices = registered.iter().filter(|id| super::in_stage(id, query.percent)).count();
        let first_hour = query.since_ms - query.since_ms.rem_euclid(HOUR_MS);
        let columns = crate::rollup::sum_columns();
        let sql = format!(
            "SELECT scope, hour_ms, {columns} FROM rollup_hourly WHERE model_version = $1 AND hour_ms >= $2 \
             AND scope >= 'device:' AND scope < 'device;' GROUP BY scope, hour_ms"
        );
        let mut hours: Hours = BTreeMap::new();
        let mut reporting: BTreeSet<String> = BTreeSet::new();
        let mut stage_scans = 0;
        for (version, stage_side) in [(query.candidate, true), (query.previous, false)] {
            let rows = sqlx::query(&sql).bind(version).bind(first_hour).fetch_all(&self.pool).await?;
            for row in rows {
                let scope: String = row.get(0);
                let device = &scope["device:".len()..];
                if super::in_stage(device, query.percent) != stage_side {
                    continue;
                }
                let counts = Counts::from_row(&row, 2);
                let hour = hours.entry(row.get(1)).or_default();
                if stage_side {
                    stage_scans += counts.scans;
                    reporting.insert(device.to_string());
                    hour.0.add(&counts);
                } else {
                    hour.1.add(&counts);
                }
            }
        }
        let last_telemetry_ms = sqlx::query("SELECT MAX(end_ms) FROM telemetry_windows")
            .fetch_one(&self.pool)
            .await?
            .get::<Option<i64>, _>(0);
        Ok(Evidence {
            metrics: periods(&hours),
            stage_devices: u32::try_from(stage_devices).unwrap_or(u32::MAX),
            stage_devices_reporting: u32::try_from(reporting.len()).unwrap_or(u32::MAX),
            stage_scans: u64::try_from(stage_scans).unwrap_or(0),
            install_failures: 0,
            crash_loops: 0,
            last_telemetry_ms,
        })
    }
}

/// Every metric's periods from the hourly sums of both cohorts.
fn periods(hours: &Hours) -> BTreeMap<Metric, Vec<PeriodCounts>> {
    // Slow: above the control cohort's p95 bucket over all the stage's hours.
    let mut control_latency = [0_i64; LATENCY_BUCKETS];
    for (_, control) in hours.values() {
        for (total, n) in control_latency.iter_mut().zip(control.latency) {
            *total += n;
        }
    }
    let all: i64 = control_latency.iter().sum();
    let mut below = 0;
    let p95_bucket = control_latency
        .iter()
        .position(|n| {
            below += n;
            below * 100 >= all * 95
        })
        .unwrap_or(LATENCY_BUCKETS - 1);
    let n = |value: i64| u64::try_from(value).unwrap_or(0);
    let count = |metric: Metric, c: &Counts| -> (u64, u64) {
        let [matched, mismatched, uncertain, _, no_pill, bad_image] = c.verdicts;
        match metric {
            Metric::Unanswered => (n(no_pill + bad_image), n(c.scans)),
            Metric::Uncertain => (n(uncertain), n(c.scans)),
            Metric::NotAutomated => (n(mismatched + uncertain), n(matched + mismatched + uncertain)),
            Metric::Slow => (n(c.latency[p95_bucket + 1..].iter().sum()), n(c.latency_count)),
            Metric::LowConfidence => (n(c.confidence_low), n(c.confidence_count)),
            Metric::Fallbacks => (n(c.engine_fallbacks), n(c.scans)),
            Metric::Corrected => (n(c.feedback_corrected), n(c.feedback_confirmed + c.feedback_corrected)),
        }
    };
    let mut out: BTreeMap<Metric, Vec<PeriodCounts>> = BTreeMap::new();
    for (stage, control) in hours.values() {
        for metric in Metric::ALL {
            let (stage_events, stage_exposure) = count(metric, stage);
            let (control_events, control_exposure) = count(metric, control);
            out.entry(metric).or_default().push(PeriodCounts {
                stage_events,
                stage_exposure,
                control_events,
                control_exposure,
            });
        }
    }
    out
}
