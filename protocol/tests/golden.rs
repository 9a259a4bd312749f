//! Golden payloads: one example of every message, stored in `tests/golden/`
//! and shown in `docs/protocol.md`. A change of the wire format changes
//! these files, so it cannot happen by accident: run with
//! `RXVISION_BLESS=1` to rewrite them, and review the diff.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rxvision_protocol::{
    decode, encode, Ack, ChainHead, Desired, EngineState, Event, EventKind, Feedback, Histogram, Message, ModelRef,
    OutboxLosses, OutboxState, Status, Telemetry, Window, PROTOCOL_VERSION,
};
use serde_json::json;

const HEAD: &str = "9f2c1be0a4d35e6f7788990011223344556677889900aabbccddeeff00112233";

fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn histogram(bounds: &[f64], values: &[f64]) -> Histogram {
    let mut h = Histogram::new(bounds);
    values.iter().for_each(|&v| h.observe(v));
    h
}

/// The examples `docs/protocol.md` shows.
pub fn telemetry() -> Telemetry {
    let features = [
        ("aspect_ratio", histogram(&[1.0, 1.25, 1.5, 2.0, 3.0], &[1.02, 1.1, 2.4])),
        ("brightness", histogram(&[50.0, 100.0, 150.0, 200.0], &[120.0, 140.5, 161.0])),
    ];
    Telemetry {
        v: PROTOCOL_VERSION,
        device_id: "store-0412-counter-1".into(),
        seq: 1842,
        window: Window { start_ms: 1_795_996_800_000, end_ms: 1_795_996_860_000, windows: 1 },
        model_version: "0.4.0".into(),
        engine: "cpu".into(),
        scans: 5,
        verdicts: counts(&[("BAD_IMAGE", 1), ("MATCH", 3), ("UNCERTAIN", 1)]),
        refusals: counts(&[("blurred", 1)]),
        latency_ms: histogram(&[5.0, 10.0, 15.0, 25.0, 50.0, 100.0], &[6.1, 7.9, 9.3, 12.0, 48.0]),
        confidence: histogram(&[0.5, 0.8, 0.9, 0.95, 0.99], &[0.999, 0.997, 0.993, 0.71]),
        classes: counts(&[("00008-0841-81", 3), ("00093-3145-01", 1)]),
        features: features.into_iter().map(|(k, h)| (k.to_string(), h)).collect(),
        feedback: Feedback { confirmed: counts(&[("00008-0841-81", 2)]), corrected: BTreeMap::new() },
        engine_fallbacks: 0,
        operators: counts(&[("3c9a61d0f2b4e587", 5)]),
        audit: ChainHead { next_seq: 20411, head: HEAD.into() },
        outbox: OutboxLosses::default(),
    }
}

pub fn event() -> Event {
    let details = json!({"from": "0.3.0", "to": "0.4.0", "engine": "cpu", "selftest": "passed"});
    Event {
        v: PROTOCOL_VERSION,
        device_id: "store-0412-counter-1".into(),
        seq: 1843,
        time_ms: 1_795_996_861_250,
        kind: EventKind::ModelInstalled,
        details: details.as_object().unwrap().clone(),
    }
}

pub fn status() -> Status {
    Status {
        v: PROTOCOL_VERSION,
        device_id: "store-0412-counter-1".into(),
        online: true,
        time_ms: 1_795_996_860_000,
        daemon_version: Some("0.1.0".into()),
        model: Some(ModelRef { name: "pillnet".into(), version: "0.4.0".into() }),
        engine: Some(EngineState {
            active: "cpu".into(),
            choice: "cpu: no hardware GPU adapter".into(),
            gpu_degraded: false,
            fallbacks: 0,
        }),
        outbox: Some(OutboxState { depth: 2, bytes: 9412, oldest_unacked_s: 41, acked_seq: 1841 }),
        audit: Some(ChainHead { next_seq: 20411, head: HEAD.into() }),
    }
}

pub fn last_will() -> Status {
    Status::last_will("store-0412-counter-1", 1_795_990_000_000)
}

pub fn ack() -> Ack {
    Ack { v: PROTOCOL_VERSION, device_id: "store-0412-counter-1".into(), seq: 1843 }
}

pub fn desired() -> Desired {
    Desired {
        v: PROTOCOL_VERSION,
        device_id: "store-0412-counter-1".into(),
        fetch_updates: true,
        issued_ms: 1_795_997_000_000,
    }
}

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(format!("{name}.json"))
}

/// The example serialises to the golden file, and the golden file decodes to the example.
fn check<M: Message + PartialEq + std::fmt::Debug>(name: &str, example: M) {
    let path = golden_path(name);
    let encoded = encode(&example).unwrap();
    let value: serde_json::Value = serde_json::from_slice(&encoded).unwrap();
    if std::env::var_os("RXVISION_BLESS").is_some() {
        std::fs::write(&path, serde_json::to_string_pretty(&value).unwrap() + "\n").unwrap();
    }
    let golden_text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let golden: serde_json::Value = serde_json::from_str(&golden_text).unwrap();
    assert_eq!(
        value,
        golden,
        "{name}: the wire format changed; if that is deliberate, bump the protocol version or rerun with RXVISION_BLESS=1 and review tests/golden/{name}.json"
    );
    let decoded: M = decode(golden_text.as_bytes()).unwrap();
    assert_eq!(decoded, example, "{name}: the golden payload decodes to the example");
}

#[test]
fn every_message_matches_its_golden_payload() {
    check("telemetry", telemetry());
    check("event", event());
    check("status", status());
    check("status-last-will", last_will());
    check("ack", ack());
    check("desired", desired());
}

#[test]
fn the_protocol_document_shows_every_golden_payload() {
    let doc = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol.md");
    let doc = std::fs::read_to_string(&doc).unwrap();
    for name in ["telemetry", "event", "status", "status-last-will", "ack", "desired"] {
        let golden = std::fs::read_to_string(golden_path(name)).unwrap();
        assert!(doc.contains(golden.trim()), "docs/protocol.md does not show tests/golden/{name}.json as it is");
    }
}
