//! Telemetry windows summed per hour, and what the API and `/metrics` make
//! of the sums: volume, verdict mix, rates, latency quantiles, confidence and
//! feedback accuracy.
//!
//! The ingest adds every stored window to three rows of `rollup_hourly`
//! (its device's, its site's and the fleet's, at the hour of the window's
//! end and its model version), summed per batch, in the batch's transaction.
//! Readers then sum a few rows per hour instead of every window: a fleet of
//! 10,000 devices at one window a minute writes 14 million windows a day but
//! about 24 fleet rows. A window the device merged from several (its outbox
//! budget) counts at its end's hour.

use std::collections::HashMap;

use rxvision_protocol::{Telemetry, CONFIDENCE_BOUNDS, LATENCY_BOUNDS_MS};
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::db::{Db, DbError};

/// Verdicts in the order of the `v_*` columns.
pub const VERDICTS: [&str; 6] = ["MATCH", "MISMATCH", "UNCERTAIN", "IDENTIFIED", "NO_PILL", "BAD_IMAGE"];

/// Latency buckets: one per bound of [`LATENCY_BOUNDS_MS`], then the overflow.
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// One hour in milliseconds.
pub const HOUR_MS: i64 = 3_600_000;

/// The integer columns of `rollup_hourly` after the key, in [`Counts`] order.
const INT_COLUMNS: [&str; 15] = [
    "windows",
    "scans",
    "v_match",
    "v_mismatch",
    "v_uncertain",
    "v_identified",
    "v_no_pill",
    "v_bad_image",
    "refusals",
    "engine_fallbacks",
    "feedback_confirmed",
    "feedback_corrected",
    "confidence_count",
    "latency_count",
    "confidence_low",
];

/// Top-1 probability at or below which a pill counts as identified with low confidence.
pub const LOW_CONFIDENCE: f64 = 0.9;

/// Sums of telemetry windows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    /// Base windows (a merged window counts all it holds).
    pub windows: i64,
    /// Scans answered.
    pub scans: i64,
    /// Scans by verdict, in [`VERDICTS`] order.
    pub verdicts: [i64; 6],
    /// Scans refused before the model.
    pub refusals: i64,
    /// Requests the CPU answered after a GPU failure.
    pub engine_fallbacks: i64,
    /// Answers a pharmacist confirmed.
    pub feedback_confirmed: i64,
    /// Answers a pharmacist corrected.
    pub feedback_corrected: i64,
    /// Pills with a confidence.
    pub confidence_count: i64,
    /// Sum of their confidences.
    pub confidence_sum: f64,
    /// Those at or below [`LOW_CONFIDENCE`] (windows with the protocol's confidence buckets).
    pub confidence_low: i64,
    /// Scans with a latency in the standard buckets.
    pub latency_count: i64,
    /// Sum of those latencies, ms.
    pub latency_sum_ms: f64,
    /// Scans per latency bucket ([`LATENCY_BOUNDS_MS`], then the overflow).
    pub latency: [i64; LATENCY_BUCKETS],
}

fn count(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Counts {
    /// What one window adds. A latency histogram with other bounds than the
    /// protocol's (a device of another version) is left out of the latency
    /// figures rather than mis-bucketed.
    pub fn of_window(w: &Telemetry) -> Counts {
        let mut verdicts = [0; 6];
        for (slot, name) in verdicts.iter_mut().zip(VERDICTS) {
            *slot = count(w.verdicts.get(name).copied().unwrap_or(0));
        }
        let mut latency = [0; LATENCY_BUCKETS];
        let (mut latency_count, mut latency_sum_ms) = (0, 0.0);
        if w.latency_ms.bounds == LATENCY_BOUNDS_MS && w.latency_ms.counts.len() == LATENCY_BUCKETS {
            for (slot, n) in latency.iter_mut().zip(&w.latency_ms.counts) {
                *slot = count(*n);
            }
            latency_count = count(w.latency_ms.total());
            latency_sum_ms = w.latency_ms.sum;
        }
        let mut confidence_low = 0;
        if w.confidence.bounds == CONFIDENCE_BOUNDS && w.confidence.counts.len() == CONFIDENCE_BOUNDS.len() + 1 {
            let low_buckets = CONFIDENCE_BOUNDS.iter().filter(|b| **b <= LOW_CONFIDENCE).count();
            confidence_low = count(w.confidence.counts[..low_buckets].iter().sum());
        }
        Counts {
            windows: i64::from(w.window.windows),
            scans: count(w.scans),
            verdicts,
            refusals: count(w.refusals.values().sum()),
            engine_fallbacks: count(w.engine_fallbacks),
            feedback_confirmed: count(w.feedback.confirmed.values().sum()),
            feedback_corrected: count(w.feedback.corrected.values().sum()),
            confidence_count: count(w.confidence.total()),
            confidence_sum: w.confidence.sum,
            confidence_low,
            latency_count,
            latency_sum_ms,
            latency,
        }
    }

    /// Adds `other` into these sums.
    pub fn add(&mut self, other: &Counts) {
        self.windows += other.windows;
        self.scans += other.scans;
        for (mine, theirs) in self.verdicts.iter_mut().zip(other.verdicts) {
            *mine += theirs;
        }
        self.refusals += other.refusals;
        self.engine_fallbacks += other.engine_fallbacks;
        self.feedback_confirmed += other.feedback_confirmed;
        self.feedback_corrected += other.feedback_corrected;
        self.confidence_count += other.confidence_count;
        self.confidence_sum += other.confidence_sum;
        self.confidence_low += other.confidence_low;
        self.latency_count += other.latency_count;
        self.latency_sum_ms += other.latency_sum_ms;
        for (mine, theirs) in self.latency.iter_mut().zip(other.latency) {
            *mine += theirs;
        }
    }

    fn ints(&self) -> [i64; 15] {
        let v = self.verdicts;
        [
            self.windows,
            self.scans,
            v[0],
            v[1],
            v[2],
            v[3],
            v[4],
            v[5],
            self.refusals,
            self.engine_fallbacks,
            self.feedback_confirmed,
            self.feedback_corrected,
            self.confidence_count,
            self.latency_count,
            self.confidence_low,
        ]
    }

    /// Reads the sums from a row laid out as [`sum_columns`] starting at `first`.
    pub(crate) fn from_row(row: &AnyRow, first: usize) -> Counts {
        let int = |k: usize| row.get::<Option<i64>, _>(first + k).unwrap_or(0);
        let float = |k: usize| row.get::<Option<f64>, _>(first + k).unwrap_or(0.0);
        let mut latency = [0; LATENCY_BUCKETS];
        for (k, slot) in latency.iter_mut().enumerate() {
            *slot = int(17 + k);
        }
        Counts {
            windows: int(0),
            scans: int(1),
            verdicts: [int(2), int(3), int(4), int(5), int(6), int(7)],
            refusals: int(8),
            engine_fallbacks: int(9),
            feedback_confirmed: int(10),
            feedback_corrected: int(11),
            confidence_count: int(12),
            latency_count: int(13),
            confidence_low: int(14),
            confidence_sum: float(15),
            latency_sum_ms: float(16),
            latency,
        }
    }

    /// The figures people read.
    pub fn summary(&self) -> Aggregate {
        let rate = |n: i64, of: i64| (of > 0).then(|| n as f64 / of as f64);
        let feedback = self.feedback_confirmed + self.feedback_corrected;
        Aggregate {
            scans: self.scans,
            verdicts: VerdictCounts {
                match_: self.verdicts[0],
                mismatch: self.verdicts[1],
                uncertain: self.verdicts[2],
                identified: self.verdicts[3],
                no_pill: self.verdicts[4],
                bad_image: self.verdicts[5],
            },
            match_rate: rate(self.verdicts[0], self.scans),
            uncertain_rate: rate(self.verdicts[2], self.scans),
            bad_image_rate: rate(self.verdicts[5], self.scans),
            refusals: self.refusals,
            engine_fallbacks: self.engine_fallbacks,
            latency_p50_ms: latency_quantile(&self.latency, 0.50),
            latency_p95_ms: latency_quantile(&self.latency, 0.95),
            confidence_mean: (self.confidence_count > 0).then(|| self.confidence_sum / self.confidence_count as f64),
            feedback_confirmed: self.feedback_confirmed,
            feedback_corrected: self.feedback_corrected,
            accuracy: rate(self.feedback_confirmed, feedback),
        }
    }
}

/// Scans by verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct VerdictCounts {
    /// MATCH.
    #[serde(rename = "MATCH")]
    pub match_: i64,
    /// MISMATCH.
    #[serde(rename = "MISMATCH")]
    pub mismatch: i64,
    /// UNCERTAIN.
    #[serde(rename = "UNCERTAIN")]
    pub uncertain: i64,
    /// IDENTIFIED (no expected product given).
    #[serde(rename = "IDENTIFIED")]
    pub identified: i64,
    /// NO_PILL.
    #[serde(rename = "NO_PILL")]
    pub no_pill: i64,
    /// BAD_IMAGE.
    #[serde(rename = "BAD_IMAGE")]
    pub bad_image: i64,
}

/// Telemetry over a time range: rates are `null` when nothing was counted.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Aggregate {
    /// Scans answered.
    pub scans: i64,
    /// Scans by verdict.
    pub verdicts: VerdictCounts,
    /// MATCH share of scans (automation).
    pub match_rate: Option<f64>,
    /// UNCERTAIN share of scans.
    pub uncertain_rate: Option<f64>,
    /// BAD_IMAGE share of scans.
    pub bad_image_rate: Option<f64>,
    /// Scans refused before the model.
    pub refusals: i64,
    /// Requests the CPU answered after a GPU failure.
    pub engine_fallbacks: i64,
    /// Median frame-to-verdict latency, ms (interpolated in its bucket).
    pub latency_p50_ms: Option<f64>,
    /// 95th percentile latency, ms (interpolated in its bucket).
    pub latency_p95_ms: Option<f64>,
    /// Mean top-1 probability of identified pills.
    pub confidence_mean: Option<f64>,
    /// Answers pharmacists confirmed.
    pub feedback_confirmed: i64,
    /// Answers pharmacists corrected.
    pub feedback_corrected: i64,
    /// confirmed / (confirmed + corrected): accuracy as pharmacists judged it.
    pub accuracy: Option<f64>,
}

/// The `q` quantile of bucketed latencies, interpolated linearly within its
/// bucket as Prometheus' `histogram_quantile` does; in the overflow bucket
/// the last bound (a floor: "at least").
pub fn latency_quantile(buckets: &[i64; LATENCY_BUCKETS], q: f64) -> Option<f64> {
    let total: i64 = buckets.iter().sum();
    if total <= 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0.0;
    for (k, &n) in buckets.iter().enumerate() {
        let n = n as f64;
        if n > 0.0 && below + n >= rank {
            let Some(&upper) = LATENCY_BOUNDS_MS.get(k) else { return Some(LATENCY_BOUNDS_MS[k - 1]) };
            let lower = if k == 0 { 0.0 } else { LATENCY_BOUNDS_MS[k - 1] };
            return Some(lower + (upper - lower) * ((rank - below) / n).clamp(0.0, 1.0));
        }
        below += n;
    }
    LATENCY_BOUNDS_MS.last().copied()
}

/// The rows a batch adds: (scope, hour, model version) → sums.
#[derive(Debug, Default)]
pub struct BatchRollup(pub HashMap<(String, i64, String), Counts>);

impl BatchRollup {
    /// Adds a stored window of a device at `site` (if registered).
    pub fn add(&mut self, window: &Telemetry, site: Option<&str>) {
        let counts = Counts::of_window(window);
        let end = i64::try_from(window.window.end_ms).unwrap_or(i64::MAX).saturating_sub(1).max(0);
        let hour = end - end % HOUR_MS;
        let mut scopes = vec![format!("device:{}", window.device_id), "fleet".to_string()];
        if let Some(site) = site {
            scopes.push(format!("site:{site}"));
        }
        for scope in scopes {
            self.0.entry((scope, hour, window.model_version.clone())).or_default().add(&counts);
        }
    }
}

pub(crate) fn sum_columns() -> String {
    let mut columns: Vec<String> = INT_COLUMNS.iter().map(|c| format!("CAST(SUM({c}) AS BIGINT)")).collect();
    columns.push("CAST(SUM(confidence_sum) AS DOUBLE PRECISION)".into());
    columns.push("CAST(SUM(latency_sum_ms) AS DOUBLE PRECISION)".into());
    columns.extend((0..LATENCY_BUCKETS).map(|k| format!("CAST(SUM(lat_{k}) AS BIGINT)")));
    columns.join(", ")
}

/// One hour of a scope.
#[derive(Debug, Clone, PartialEq)]
pub struct HourCounts {
    /// The hour's start, Unix ms.
    pub hour_ms: i64,
    /// Its sums.
    pub counts: Counts,
}

impl Db {
    /// Adds a batch's rows to `rollup_hourly` inside its transaction
    /// (multi-row upserts; each key appears once in a batch).
    pub(crate) async fn add_rollups(
        tx: &mut crate::db::Tx<'_>,
        backend: crate::db::Backend,
        rollup: &BatchRollup,
    ) -> Result<(), DbError> {
        let mut columns: Vec<String> = INT_COLUMNS.iter().map(|c| (*c).to_string()).collect();
        columns.push("confidence_sum".into());
        columns.push("latency_sum_ms".into());
        columns.extend((0..LATENCY_BUCKETS).map(|k| format!("lat_{k}")));
        let updates: Vec<String> = columns.iter().map(|c| format!("{c} = rollup_hourly.{c} + excluded.{c}")).collect();
        let into = format!("INSERT INTO rollup_hourly (scope, hour_ms, model_version, {})", columns.join(", "));
        let tail = format!("ON CONFLICT (scope, hour_ms, model_version) DO UPDATE SET {}", updates.join(", "));
        let mut rows: Vec<_> = rollup.0.iter().collect();
        rows.sort_by(|a, b| a.0.cmp(b.0)); // one lock order for every writer
        crate::commit::insert_rows(
            tx,
            backend,
            &into,
            3 + columns.len(),
            &tail,
            &rows,
            |query, ((scope, hour, version), counts)| {
                let mut query = query.bind(scope).bind(*hour).bind(version);
                for value in counts.ints() {
                    query = query.bind(value);
                }
                query = query.bind(counts.confidence_sum).bind(counts.latency_sum_ms);
                for value in counts.latency {
                    query = query.bind(value);
                }
                query
            },
        )
        .await
    }

    /// A scope's hours in `[from_ms, to_ms)` with data, ascending.
    pub async fn hourly(&self, scope: &str, from_ms: i64, to_ms: i64) -> Result<Vec<HourCounts>, DbError> {
        let sql = format!(
            "SELECT hour_ms, {} FROM rollup_hourly WHERE scope = $1 AND hour_ms >= $2 AND hour_ms < $3 \
             GROUP BY hour_ms ORDER BY hour_ms",
            sum_columns()
        );
        let rows = sqlx::query(&sql).bind(scope).bind(from_ms).bind(to_ms).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(|r| HourCounts { hour_ms: r.get(0), counts: Counts::from_row(r, 1) }).collect())
    }

    /// Every scope starting with `prefix` (`site:`), summed over `[from_ms, to_ms)`.
    pub async fn scopes_summed(
        &self,
        prefix: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<HashMap<String, Counts>, DbError> {
        // A prefix range rather than LIKE, so both engines use the key's index.
        let mut upper = prefix.to_string();
        let last = upper.pop().expect("a non-empty prefix");
        upper.push(char::from_u32(u32::from(last) + 1).expect("an ASCII prefix"));
        let sql = format!(
            "SELECT scope, {} FROM rollup_hourly WHERE scope >= $1 AND scope < $2 AND hour_ms >= $3 AND hour_ms < $4 \
             GROUP BY scope",
            sum_columns()
        );
        let rows = sqlx::query(&sql).bind(prefix).bind(upper).bind(from_ms).bind(to_ms).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(|r| (r.get::<String, _>(0)[prefix.len()..].to_string(), Counts::from_row(r, 1))).collect())
    }

    /// The fleet's sums per model version since `from_ms` (0: ever).
    pub async fn fleet_by_model(&self, from_ms: i64) -> Result<Vec<(String, Counts)>, DbError> {
        let sql = format!(
            "SELECT model_version, {} FROM rollup_hourly WHERE scope = 'fleet' AND hour_ms >= $1 \
             GROUP BY model_version ORDER BY model_version",
            sum_columns()
        );
        let rows = sqlx::query(&sql).bind(from_ms).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(|r| (r.get(0), Counts::from_row(r, 1))).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_the_bucket() {
        let mut buckets = [0; LATENCY_BUCKETS];
        assert_eq!(latency_quantile(&buckets, 0.5), None);
        buckets[2] = 100; // (5, 10] ms
        assert_eq!(latency_quantile(&buckets, 0.5), Some(7.5));
        assert_eq!(latency_quantile(&buckets, 0.95), Some(9.75));
        buckets[LATENCY_BUCKETS - 1] = 100; // above 2500 ms
        assert_eq!(latency_quantile(&buckets, 0.95), Some(2500.0));
        assert_eq!(latency_quantile(&buckets, 0.25), Some(7.5));
    }

    #[test]
    fn rates_are_null_without_a_denominator() {
        let summary = Counts::default().summary();
        assert_eq!((summary.match_rate, summary.accuracy, summary.confidence_mean), (None, None, None));
        let counts = Counts {
            scans: 10,
            verdicts: [7, 1, 2, 0, 0, 0],
            feedback_confirmed: 3,
            feedback_corrected: 1,
            ..Counts::default()
        };
        let summary = counts.summary();
        assert_eq!(summary.match_rate, Some(0.7));
        assert_eq!(summary.uncertain_rate, Some(0.2));
        assert_eq!(summary.accuracy, Some(0.75));
    }
}
