//! The shipped alert rules (`packaging/prometheus/`) through promtool — they
//! load, and their unit tests pass — and, with or without promtool, the rules,
//! their tests and the Grafana dashboard (`packaging/grafana/`) agree with the
//! metrics `rxfleet` exposes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

const RULES: &str = "packaging/prometheus/rxvision-alerts.yml";
const RULE_TESTS: &str = "packaging/prometheus/rxvision-alerts.test.yml";
const DASHBOARD: &str = "packaging/grafana/rxvision-fleet.json";

/// The alerts the design asks for.
const ALERTS: &[&str] = &[
    "RxVisionModelAccuracyLow",
    "RxVisionPredictionLatencyHigh",
    "RxVisionDataDriftRising",
    "RxVisionPredictionVolumeHigh",
    "RxVisionPredictionVolumeLow",
    "RxVisionDeviceOffline",
    "RxVisionAuditChainRewritten",
    "RxVisionIngestRejecting",
];

/// What `rxfleet` serves at /metrics, histograms apart.
const METRICS: &[&str] = &[
    "rxvision_predictions_total",
    "rxvision_model_accuracy",
    "rxvision_feedback_total",
    "rxvision_data_drift_score",
    "rxvision_devices",
    "rxvision_device_offline",
    "rxvision_device_audit_chain_rewritten",
    "rxvision_ingest_messages_total",
    "rxvision_ingest_rejects_total",
    "rxvision_ingest_commit_failures_total",
    "rxvision_outbox_backlog_messages",
    "rxvision_outbox_oldest_unacked_seconds",
    "rxvision_engine_fallbacks_total",
    "rxvision_fleet_leader",
];
const HISTOGRAMS: &[&str] = &["rxvision_prediction_latency_seconds", "rxvision_api_request_duration_seconds"];

/// The dashboard's panels, by title.
const PANELS: &[&str] = &[
    "Devices by state",
    "Predictions per second by outcome",
    "MATCH share",
    "UNCERTAIN share",
    "Prediction latency p50 / p95",
    "Accuracy by model version",
    "Data drift score",
    "Ingest rate and rejects",
    "Outbox backlog",
    "Devices offline",
    "Audit chain rewritten",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(workspace().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Whether promtool is here; without it the test says so and, where it must
/// be (`scripts/test`), fails.
fn promtool_present(test: &str) -> bool {
    let present = Command::new("sh").args(["-c", "command -v promtool"]).output().is_ok_and(|o| o.status.success());
    if !present {
        assert!(
            std::env::var_os("RXVISION_REQUIRE_REFERENCES").is_none(),
            "promtool is not installed (scripts/setup-system installs it)"
        );
        eprintln!("SKIPPED {test}: promtool is not installed (scripts/setup-system installs it)");
    }
    present
}

/// Runs promtool from the workspace root, failing the test with its output.
fn promtool(args: &[&str]) {
    let out = Command::new("promtool").args(args).current_dir(workspace()).output().unwrap();
    assert!(
        out.status.success(),
        "promtool {}:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `rxvision_…` metric names in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (start, _) in text.match_indices("rxvision_") {
        let preceded =
            text[..start].chars().next_back().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        if preceded {
            continue;
        }
        let len = text[start..].find(|c: char| !(c.is_ascii_lowercase() || c == '_')).unwrap_or(text.len() - start);
        names.insert(text[start..start + len].to_string());
    }
    names
}

/// The names in `text` that are not series `rxfleet` exposes: a histogram
/// only as its `_bucket`, `_sum` and `_count` series.
fn unknown_metrics(text: &str) -> Vec<String> {
    metric_names(text)
        .into_iter()
        .filter(|name| {
            let histogram_series = ["_bucket", "_sum", "_count"]
                .iter()
                .any(|suffix| name.strip_suffix(suffix).is_some_and(|stem| HISTOGRAMS.contains(&stem)));
            !(METRICS.contains(&name.as_str()) || histogram_series)
        })
        .collect()
}

/// The alert names a rule file defines.
fn alerts_defined(rules: &str) -> BTreeSet<String> {
    rules.lines().filter_map(|line| line.trim().strip_prefix("- alert:")).map(|name| name.trim().to_string()).collect()
}

/// Whether a unit-test case expects alerts (`true`) or none (`false`).
type Case = (String, bool);

/// The alert unit-test cases of a promtool test file, read line by line:
/// each case is `eval_time`, `alertname`, `exp_alerts` in this order, and a
/// case that expects alerts gives their labels and annotations.
fn alert_cases(tests: &str) -> Vec<Case> {
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    let mut cases = Vec::new();
    let mut alertname: Option<String> = None;
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with("- eval_time:") {
            alertname = None;
        } else if let Some(name) = line.strip_prefix("alertname:") {
            alertname = Some(name.trim().to_string());
        } else if let Some(rest) = line.strip_prefix("exp_alerts:") {
            let name = alertname.take().unwrap_or_else(|| {
                panic!("{RULE_TESTS}:{}: exp_alerts without an alertname after the case's eval_time", i + 1)
            });
            match rest.trim() {
                "[]" => cases.push((name, false)),
                "" => {
                    // Up to the next list item that is not one of the expected alerts.
                    let case: Vec<&str> = lines[i + 1..]
                        .iter()
                        .take_while(|l| !l.starts_with("- ") || l.starts_with("- exp_labels:"))
                        .copied()
                        .collect();
                    for key in ["- exp_labels:", "exp_annotations:"] {
                        assert!(
                            case.iter().any(|l| l.starts_with(key)),
                            "{RULE_TESTS}:{}: the firing case of {name} has no {key}",
                            i + 1
                        );
                    }
                    cases.push((name, true));
                }
                other => panic!("{RULE_TESTS}:{}: exp_alerts written inline ({other}): write [] or a list", i + 1),
            }
        }
    }
    cases
}

#[test]
fn the_alert_rules_define_the_designed_alerts_on_rxfleet_metrics_only() {
    let rules = read(RULES);
    let expected: BTreeSet<String> = ALERTS.iter().map(|a| a.to_string()).collect();
    assert_eq!(alerts_defined(&rules), expected, "the alerts of {RULES}");
    assert_eq!(unknown_metrics(&rules), Vec::<String>::new(), "metrics {RULES} names that rxfleet does not expose");
    assert!(metric_names(&rules).len() >= 6, "{RULES} names hardly any metrics: is the scan broken?");
}

#[test]
fn every_alert_has_a_unit_test_that_fires_it_and_one_where_it_must_not() {
    let cases = alert_cases(&read(RULE_TESTS));
    let mut seen: BTreeMap<&str, (bool, bool)> = ALERTS.iter().map(|a| (*a, (false, false))).collect();
    for (name, fires) in &cases {
        let entry = seen
            .get_mut(name.as_str())
            .unwrap_or_else(|| panic!("{RULE_TESTS} tests {name}, which is not an alert of {RULES}"));
        if *fires {
            entry.0 = true;
        } else {
            entry.1 = true;
        }
    }
    for (alert, (fires, quiet)) in seen {
        assert!(fires, "{RULE_TESTS} has no case in which {alert} fires");
        assert!(quiet, "{RULE_TESTS} has no case in which {alert} must not fire");
    }
}

#[test]
fn the_alert_rules_pass_promtool_check() {
    if !promtool_present("the_alert_rules_pass_promtool_check") {
        return;
    }
    promtool(&["check", "rules", RULES]);
}

#[test]
fn the_alert_rules_pass_their_unit_tests() {
    if !promtool_present("the_alert_rules_pass_their_unit_tests") {
        return;
    }
    promtool(&["test", "rules", RULE_TESTS]);
}

/// The dashboard's panels (rows' panels included).
fn panels(dashboard: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut all = Vec::new();
    let mut stack: Vec<&serde_json::Value> =
        dashboard["panels"].as_array().expect("the dashboard has panels").iter().collect();
    while let Some(panel) = stack.pop() {
        if let Some(inner) = panel["panels"].as_array() {
            stack.extend(inner);
        }
        all.push(panel);
    }
    all
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// Every query of the dashboard, by panel title.
fn queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    let mut queries = Vec::new();
    for panel in panels(dashboard).into_iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().expect("every panel has a title").to_string();
        let targets = panel["targets"].as_array().filter(|t| !t.is_empty());
        for target in targets.unwrap_or_else(|| panic!("panel {title:?} has no queries")) {
            let expr = target["expr"].as_str().unwrap_or_else(|| panic!("a query of {title:?} has no expr"));
            assert!(!expr.trim().is_empty(), "a query of {title:?} is empty");
            queries.push((title.clone(), expr.to_string()));
        }
    }
    queries
}

#[test]
fn the_dashboard_has_its_panels_on_the_templated_prometheus_and_rxfleet_metrics_only() {
    let dashboard = dashboard();
    let titles: BTreeSet<&str> = panels(&dashboard).iter().filter_map(|p| p["title"].as_str()).collect();
    for title in PANELS {
        assert!(titles.contains(title), "{DASHBOARD} has no panel {title:?}");
    }
    let variable = dashboard["templating"]["list"]
        .as_array()
        .and_then(|vars| vars.iter().find(|v| v["name"] == "DS_PROMETHEUS"))
        .expect("a DS_PROMETHEUS variable");
    assert!(variable["type"] == "datasource" && variable["query"] == "prometheus", "DS_PROMETHEUS: {variable}");
    for panel in panels(&dashboard).into_iter().filter(|p| p["type"] != "row") {
        let sources = std::iter::once(&panel["datasource"])
            .chain(panel["targets"].as_array().into_iter().flatten().map(|t| &t["datasource"]));
        for source in sources {
            assert_eq!(source["uid"], "${DS_PROMETHEUS}", "the data source of panel {}", panel["title"]);
        }
    }
    let queries = queries(&dashboard);
    assert!(queries.len() >= PANELS.len());
    for (title, expr) in &queries {
        assert!(!metric_names(expr).is_empty(), "panel {title:?} queries no rxvision metric: {expr}");
        assert_eq!(
            unknown_metrics(expr),
            Vec::<String>::new(),
            "metrics rxfleet does not expose, in {title:?}: {expr}"
        );
    }
}

#[test]
fn the_dashboard_queries_are_promql_promtool_accepts() {
    if !promtool_present("the_dashboard_queries_are_promql_promtool_accepts") {
        return;
    }
    // Each query as a recording rule, Grafana's interval variables replaced.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (title, expr)) in queries(&dashboard()).iter().enumerate() {
        let expr = ["$__rate_interval", "$__interval", "$__range"].iter().fold(expr.clone(), |e, v| e.replace(v, "5m"));
        assert!(!expr.contains('$'), "panel {title:?} uses a variable the check does not know: {expr}");
        // A JSON string is a YAML double-quoted scalar.
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::Value::from(expr)
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.yml");
    std::fs::write(&file, rules).unwrap();
    promtool(&["check", "rules", file.to_str().unwrap()]);
}
