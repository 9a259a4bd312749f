//! The service assembled in-process: `serve` on a bound listener with a
//! shutdown future, and the API's JSON bodies fuzzed through the router
//! (proptest): any body is an answer with a stable error code or a result,
//! never a 500 or a panic, and the audit chain verifies afterwards.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use proptest::prelude::*;
use rxvision_daemon::api::{router, ApiLimits, AppState};
use rxvision_daemon::audit::{AuditKey, AuditLog, KeyRing};
use rxvision_daemon::scan::Scanner;
use rxvision_daemon::service::{serve, ServeOptions};
use rxvision_models::classify::Classifier;
use rxvision_models::engine::{EngineOptions, EnginePreference};
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::service::{fixture, http, API_KEY};

fn state(dir: &std::path::Path) -> Arc<AppState> {
    let options = EngineOptions { preference: EnginePreference::Cpu, cpu_threads: 1, ..EngineOptions::default() };
    let classifier = Classifier::open(Some(&fixture()), &[], options).unwrap();
    let audit = AuditLog::open(&dir.join("audit"), KeyRing::new(AuditKey::from_master(&[4; 32]))).unwrap();
    let scanner = Scanner::new(Arc::new(classifier), Arc::new(audit));
    Arc::new(AppState::new(scanner, None, API_KEY.into(), "counter-test".into(), None, ApiLimits::default()))
}

#[test]
fn serve_answers_on_a_bound_listener_and_stops_on_its_shutdown_future() {
    let dir = tempfile::tempdir().unwrap();
    let state = state(dir.path());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let options = ServeOptions { control: None, retention: Duration::from_secs(30 * 86_400) };
    let served = runtime.spawn(serve(listener, state.clone(), options, async move {
        let _ = stopped.await;
    }));
    let frame = std::fs::read(fixture().join("selftest/c00_white_round.png")).unwrap();
    let body = json!({"operator_id": "tech-1", "image": crate::service::b64(&frame)}).to_string();
    let (code, answer) = http(addr, "POST", "/v1/verify", Some(API_KEY), Some(body.as_bytes()));
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["audit_seq"], 0);
    stop.send(()).unwrap();
    runtime.block_on(async { tokio::time::timeout(Duration::from_secs(15), served).await }).unwrap().unwrap().unwrap();
    assert!(std::net::TcpStream::connect(addr).is_err(), "the listener is closed after shutdown");
    assert_eq!(state.scanner.audit().head().0, 1);
}

/// One service for every fuzz case (loading the model per case would take
/// most of the budget), in the integration tests' scratch directory.
fn shared_state() -> Arc<AppState> {
    static STATE: std::sync::OnceLock<Arc<AppState>> = std::sync::OnceLock::new();
    STATE
        .get_or_init(|| {
            let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("api-fuzz");
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            state(&dir)
        })
        .clone()
}

/// Bodies that are almost right: the request's fields with hostile values.
fn hostile_body() -> impl Strategy<Value = Vec<u8>> {
    let text = prop_oneof![
        Just(Value::Null),
        Just(json!("")),
        Just(json!(" ")),
        Just(json!("\u{0}")),
        Just(json!(-1)),
        Just(json!(1e308)),
        Just(json!(u64::MAX)),
        Just(json!([])),
        Just(json!({})),
        Just(json!("x".repeat(200))),
        "[ -~]{0,40}".prop_map(Value::String),
        "[A-Za-z0-9+/=]{0,64}".prop_map(Value::String),
    ];
    let field = prop_oneof![
        Just("expected_ndc"),
        Just("operator_id"),
        Just("rx_ref"),
        Just("image"),
        Just("audit_seq"),
        Just("confirmed"),
        Just("correct_ndc"),
        Just("unknown"),
    ];
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..200),
        proptest::collection::btree_map(field, text, 0..6).prop_map(|m| serde_json::to_vec(
            &m.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<serde_json::Map<_, _>>()
        )
        .unwrap()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::Direct(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/proptest-regressions/in_process.txt")))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_api_body_is_an_answer_never_a_failure(
        bodies in proptest::collection::vec((prop_oneof![Just("/v1/verify"), Just("/v1/feedback")], hostile_body()), 1..8)
    ) {
        let state = shared_state();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        for (path, body) in bodies {
            let request = Request::post(path)
                .header("authorization", format!("Bearer {API_KEY}"))
                .header("content-type", "application/json")
                .body(Body::from(body.clone()))
                .unwrap();
            let response = runtime.block_on(router(state.clone()).oneshot(request)).unwrap();
            let status = response.status();
            let bytes = runtime.block_on(axum::body::to_bytes(response.into_body(), 1 << 20)).unwrap();
            let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            prop_assert!(!status.is_server_error(), "{path} {:?}: {status} {answer}", String::from_utf8_lossy(&body));
            if status != StatusCode::OK {
                prop_assert!(answer["error"]["code"].is_string(), "{status}: {answer}");
            }
        }
        let report = state.scanner.audit().verify().unwrap();
        prop_assert!(report.tamper.is_none(), "{:?}", report);
    }
}
