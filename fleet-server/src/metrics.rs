//! `/metrics`: the fleet in Prometheus' text format, in base units.
//!
//! The prediction figures come from the fleet-wide hourly rollups (so every
//! replica reports the same totals, and a restart loses nothing): they are
//! counters over everything the fleet ever committed, with the latency
//! already bucketed by the appliances. prometheus-client's types record
//! observations one by one and cannot take pre-bucketed counts, so the
//! exposition is written here, by the format's rules (`promtool check
//! metrics` checks it in the tests). Device gauges are sparse: a device
//! appears only while it is offline or has an unreviewed audit chain
//! rewrite, which keeps a 100,000-device fleet's scrape small.
//!
//! Replicas: the fleet-wide figures (everything read from the database)
//! are exposed only by the replica holding the leader lease, so summing a
//! metric over every scraped replica counts the fleet once; after a
//! failover the series continue on the new leader (a new `instance`,
//! which `rate` handles). Every replica exposes its own process figures
//! and `rxvision_fleet_leader`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use rxvision_protocol::LATENCY_BOUNDS_MS;

use crate::api::AppState;
use crate::devices::{Attention, DeviceQuery, Scope};
use crate::now_ms;
use crate::rollup::{Counts, HOUR_MS, VERDICTS};

/// Accuracy is reported only from this many feedback answers in 24 hours.
pub const MIN_FEEDBACK: i64 = 20;

/// Bounds of the API latency histogram, seconds.
const API_BOUNDS: [f64; 11] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// API request durations by route.
#[derive(Debug, Default)]
pub struct LatencyHistograms {
    routes: BTreeMap<String, ([u64; API_BOUNDS.len() + 1], f64)>,
}

impl LatencyHistograms {
    /// Counts one request of `route` that took `seconds`.
    pub fn observe(&mut self, route: &str, seconds: f64) {
        let (counts, sum) = self.routes.entry(route.to_string()).or_insert(([0; API_BOUNDS.len() + 1], 0.0));
        let bucket = API_BOUNDS.iter().position(|&b| seconds <= b).unwrap_or(API_BOUNDS.len());
        counts[bucket] += 1;
        *sum += seconds;
    }
}

/// Prometheus text exposition, one family at a time.
#[derive(Default)]
struct Exposition(String);

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
    format!("{{{}}}", inner.join(","))
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, pairs: &[(&str, &str)], value: f64) {
        let _ = writeln!(self.0, "{name}{} {value}", labels(pairs));
    }

    /// A histogram's buckets (cumulative, `le` in the bounds' unit), sum and count.
    fn histogram(&mut self, name: &str, pairs: &[(&str, &str)], bounds: &[f64], counts: &[i64], sum: f64) {
        let mut cumulative = 0;
        for (k, n) in counts.iter().enumerate() {
            cumulative += n;
            let le = bounds.get(k).map_or_else(|| "+Inf".to_string(), |b| format!("{b}"));
            let mut with_le = pairs.to_vec();
            with_le.push(("le", &le));
            self.sample(&format!("{name}_bucket"), &with_le, cumulative as f64);
        }
        self.sample(&format!("{name}_sum"), pairs, sum);
        self.sample(&format!("{name}_count"), pairs, cumulative as f64);
    }
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<AppState>) -> Response {
    match render(&state).await {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "metrics: the database failed");
            (axum::http::StatusCode::SERVICE_UNAVAILABLE, format!("the fleet's database failed: {e}\n")).into_response()
        }
    }
}

async fn render(state: &AppState) -> Result<String, crate::db::DbError> {
    let mut out = Exposition::default();
    if state.leader.load(Ordering::Relaxed) {
        render_fleet(state, &mut out).await?;
    }
    render_replica(state, &mut out);
    Ok(out.0)
}

/// What the database says of the fleet (the leader only).
async fn render_fleet(state: &AppState, out: &mut Exposition) -> Result<(), crate::db::DbError> {
    let db = &state.db;
    let now = now_ms();
    let ever = db.fleet_by_model(0).await?;
    let day = db.fleet_by_model(now - 24 * HOUR_MS).await?;

    out.family("rxvision_predictions_total", "counter", "Scans answered by the fleet's appliances, by verdict.");
    for (version, counts) in &ever {
        for (outcome, n) in VERDICTS.iter().zip(counts.verdicts) {
            let outcome = outcome.to_ascii_lowercase();
            out.sample("rxvision_predictions_total", &[("model_version", version), ("outcome", &outcome)], n as f64);
        }
    }
    out.family(
        "rxvision_prediction_latency_seconds",
        "histogram",
        "Frame-to-verdict latency of the appliances' scans.",
    );
    let bounds: Vec<f64> = LATENCY_BOUNDS_MS.iter().map(|ms| ms / 1000.0).collect();
    for (version, counts) in &ever {
        out.histogram(
            "rxvision_prediction_latency_seconds",
            &[("model_version", version)],
            &bounds,
            &counts.latency,
            counts.latency_sum_ms / 1000.0,
        );
    }
    out.family("rxvision_feedback_total", "counter", "Pharmacist feedback on answers, by kind.");
    for (version, counts) in &ever {
        out.sample(
            "rxvision_feedback_total",
            &[("model_version", version), ("kind", "confirmed")],
            counts.feedback_confirmed as f64,
        );
        out.sample(
            "rxvision_feedback_total",
            &[("model_version", version), ("kind", "corrected")],
            counts.feedback_corrected as f64,
        );
    }
    out.family(
        "rxvision_model_accuracy",
        "gauge",
        "Share of answers pharmacists confirmed over the last 24 hours (only with at least 20 answers).",
    );
    for (version, counts) in &day {
        accuracy(out, version, counts);
    }
    out.family("rxvision_engine_fallbacks_total", "counter", "Scans the CPU answered after a GPU failure.");
    for (version, counts) in &ever {
        out.sample("rxvision_engine_fallbacks_total", &[("model_version", version)], counts.engine_fallbacks as f64);
    }

    let limits = state.config.attention;
    let (devices, _, _) = db.device_counts(&Scope::Fleet, now, limits).await?;
    out.family("rxvision_devices", "gauge", "Registered and heard-from devices, by state.");
    for (name, n) in [
        ("online", devices.online),
        ("offline", devices.offline),
        ("retired", devices.retired),
        ("never_seen", devices.never_seen),
    ] {
        out.sample("rxvision_devices", &[("state", name)], n as f64);
    }
    let query = DeviceQuery { state: Some("attention".into()), limit: 10_000, ..DeviceQuery::default() };
    let (flagged, _) = db.device_page(&Scope::Fleet, &query, now, limits).await?;
    out.family("rxvision_device_offline", "gauge", "1 for each live device that is offline.");
    for d in flagged.iter().filter(|d| d.attention.contains(&Attention::Offline)) {
        out.sample(
            "rxvision_device_offline",
            &[("device_id", &d.device_id), ("site", d.site.as_deref().unwrap_or(""))],
            1.0,
        );
    }
    out.family(
        "rxvision_device_audit_chain_rewritten",
        "gauge",
        "1 for each device whose audit chain was found rewritten and not yet reviewed.",
    );
    for d in flagged.iter().filter(|d| d.attention.contains(&Attention::ChainRewritten)) {
        out.sample(
            "rxvision_device_audit_chain_rewritten",
            &[("device_id", &d.device_id), ("site", d.site.as_deref().unwrap_or(""))],
            1.0,
        );
    }
    let (backlog, oldest) = db.outbox_backlog().await?;
    out.family("rxvision_outbox_backlog_messages", "gauge", "Messages waiting in online devices' outboxes.");
    out.sample("rxvision_outbox_backlog_messages", &[], backlog as f64);
    out.family(
        "rxvision_outbox_oldest_unacked_seconds",
        "gauge",
        "Age of the oldest unacknowledged message of any online device.",
    );
    out.sample("rxvision_outbox_oldest_unacked_seconds", &[], oldest as f64);

    out.family("rxvision_ingest_rejects_total", "counter", "Payloads the fleet refused, by reason.");
    for (reason, n) in db.rejects_by_reason().await? {
        out.sample("rxvision_ingest_rejects_total", &[("reason", &reason)], n as f64);
    }
    Ok(())
}

/// This replica's own figures.
fn render_replica(state: &AppState, out: &mut Exposition) {
    let ingest = &state.ingest;
    out.family("rxvision_ingest_messages_total", "counter", "Device messages this replica's ingest took, by result.");
    for (result, n) in [
        ("stored", ingest.stored.load(Ordering::Relaxed)),
        ("duplicate", ingest.duplicates.load(Ordering::Relaxed)),
        ("status", ingest.statuses.load(Ordering::Relaxed)),
    ] {
        out.sample("rxvision_ingest_messages_total", &[("result", result)], n as f64);
    }
    out.family("rxvision_ingest_commit_failures_total", "counter", "Batches this replica could not commit (retried).");
    out.sample("rxvision_ingest_commit_failures_total", &[], ingest.commit_failures.load(Ordering::Relaxed) as f64);
    out.family("rxvision_fleet_leader", "gauge", "1 while this replica holds the leader lease (runs the ingest).");
    out.sample("rxvision_fleet_leader", &[], if state.leader.load(Ordering::Relaxed) { 1.0 } else { 0.0 });
    out.family("rxvision_broker_restarts_total", "counter", "Times the managed Mosquitto exited and was restarted.");
    out.sample("rxvision_broker_restarts_total", &[], state.broker.restarts.load(Ordering::Relaxed) as f64);

    out.family("rxvision_api_request_duration_seconds", "histogram", "Time to answer HTTP requests, by route.");
    let routes = state.latency.lock().map(|h| h.routes.clone()).unwrap_or_default();
    for (route, (counts, sum)) in &routes {
        let counts: Vec<i64> = counts.iter().map(|&n| i64::try_from(n).unwrap_or(i64::MAX)).collect();
        out.histogram("rxvision_api_request_duration_seconds", &[("route", route)], &API_BOUNDS, &counts, *sum);
    }
}

fn accuracy(out: &mut Exposition, version: &str, counts: &Counts) {
    let answers = counts.feedback_confirmed + counts.feedback_corrected;
    if answers >= MIN_FEEDBACK {
        out.sample(
            "rxvision_model_accuracy",
            &[("model_version", version)],
            counts.feedback_confirmed as f64 / answers as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped_and_histograms_cumulative() {
        let mut out = Exposition::default();
        out.histogram("h_seconds", &[("route", "a\"b\\c")], &[0.1, 1.0], &[1, 2, 3], 4.5);
        assert_eq!(
            out.0,
            "h_seconds_bucket{route=\"a\\\"b\\\\c\",le=\"0.1\"} 1\n\
             h_seconds_bucket{route=\"a\\\"b\\\\c\",le=\"1\"} 3\n\
             h_seconds_bucket{route=\"a\\\"b\\\\c\",le=\"+Inf\"} 6\n\
             h_seconds_sum{route=\"a\\\"b\\\\c\"} 4.5\n\
             h_seconds_count{route=\"a\\\"b\\\\c\"} 6\n"
        );
    }

    #[test]
    fn accuracy_needs_enough_answers() {
        let mut out = Exposition::default();
        accuracy(&mut out, "1.0.0", &Counts { feedback_confirmed: 18, feedback_corrected: 1, ..Counts::default() });
        assert!(out.0.is_empty());
        accuracy(&mut out, "1.0.0", &Counts { feedback_confirmed: 18, feedback_corrected: 2, ..Counts::default() });
        assert_eq!(out.0, "rxvision_model_accuracy{model_version=\"1.0.0\"} 0.9\n");
    }
}
