//! A stage's telemetry evidence, read from the devices' hourly rollups.
//!
//! The stage is the registered devices whose [`super::cohort_bucket`] falls
//! in the stage's percentage, counted only on the candidate version (so
//! only what they answered after installing it); the control cohort is the
//! devices outside the stage, on the previous version, over the same hours.
//! A device in neither (outside the stage on a third version, or in it and
//! not yet updated) is no evidence. Each hour since the stage began is one
//! period of every metric ([`Metric`]); the slow-scan threshold comes from
//! the control cohort's latencies over the stage's hours ([`slow_threshold`]).
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
    let mut control_latency = [0_i64; LATENCY_BUCKETS];
    for (_, control) in hours.values() {
        for (total, n) in control_latency.iter_mut().zip(control.latency) {
            *total += n;
        }
    }
    let slow_from = slow_threshold(&control_latency);
    let n = |value: i64| u64::try_from(value).unwrap_or(0);
    let count = |metric: Metric, c: &Counts| -> (u64, u64) {
        let [matched, mismatched, uncertain, _, no_pill, bad_image] = c.verdicts;
        match metric {
            Metric::Unanswered => (n(no_pill + bad_image), n(c.scans)),
            Metric::Uncertain => (n(uncertain), n(c.scans)),
            Metric::NotAutomated => (n(mismatched + uncertain), n(matched + mismatched + uncertain)),
            Metric::Slow => (n(c.latency[slow_from..].iter().sum()), n(c.latency_count)),
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

/// The first latency bucket that counts as slow, from the control cohort's
/// histogram: the bucket holding its p95, so that slow is above that
/// bucket's lower bound, which at least 5 % of the control exceed; unless
/// over half exceed it (it holds the bulk), then above its upper bound. A
/// rate ratio is only as measurable as the control's rate: the upper bound
/// alone can leave a handful in a thousand above it (a tight histogram
/// between coarse bounds), and then no stage shows "not slower" in a day.
fn slow_threshold(control: &[i64; LATENCY_BUCKETS]) -> usize {
    let all: i64 = control.iter().sum();
    if all == 0 {
        return LATENCY_BUCKETS;
    }
    let mut below = 0;
    let p95 = control
        .iter()
        .position(|n| {
            below += n;
            below * 100 >= all * 95
        })
        .unwrap_or(LATENCY_BUCKETS - 1);
    let from_p95: i64 = control[p95..].iter().sum();
    if from_p95 * 2 <= all {
        p95
    } else {
        p95 + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(pairs: &[(usize, i64)]) -> [i64; LATENCY_BUCKETS] {
        let mut h = [0; LATENCY_BUCKETS];
        for &(bucket, n) in pairs {
            h[bucket] = n;
        }
        h
    }

    #[test]
    fn the_slow_threshold_keeps_the_controls_slow_rate_measurable() {
        // Buckets 7 (50-100 ms), 8 (100-250), 9 (250-500): 94 % / 5.9 % / 0.1 %.
        // The p95 falls in bucket 8: its upper bound, 250 ms, is exceeded by
        // 0.1 % of the control, its lower bound, 100 ms, by 6 %.
        assert_eq!(slow_threshold(&histogram(&[(7, 940), (8, 59), (9, 1)])), 8);
        // 60 % / 38 % / 2 %: above 250 ms (38 %), not above 500 (2 %).
        assert_eq!(slow_threshold(&histogram(&[(8, 600), (9, 380), (10, 20)])), 9);
        // Spread evenly over ten buckets: the last holds the p95; 10 % exceed its lower bound.
        let even = histogram(&(2..12).map(|b| (b, 100)).collect::<Vec<_>>());
        assert_eq!(slow_threshold(&even), 11);
        // The p95's bucket holds the bulk (57 % and 3 % from it up): above it.
        assert_eq!(slow_threshold(&histogram(&[(7, 400), (8, 570), (9, 30)])), 9);
        // Every scan in one bucket: above it (as the control, no slow scans).
        assert_eq!(slow_threshold(&histogram(&[(7, 1000)])), 8);
        // No latencies: nothing is slow.
        assert_eq!(slow_threshold(&histogram(&[])), LATENCY_BUCKETS);
    }

    #[test]
    fn slow_scans_are_counted_from_the_threshold_in_both_cohorts() {
        let stage = Counts { latency: histogram(&[(7, 80), (8, 20)]), latency_count: 100, ..Counts::default() };
        let control =
            Counts { latency: histogram(&[(7, 940), (8, 59), (9, 1)]), latency_count: 1000, ..Counts::default() };
        let hours: Hours = [(0, (stage, control))].into();
        let slow = &periods(&hours)[&Metric::Slow];
        assert_eq!(
            (slow[0].stage_events, slow[0].stage_exposure, slow[0].control_events, slow[0].control_exposure),
            (20, 100, 60, 1000)
        );
    }
}
