//! Telemetry windows from real analyses of the counter path: counts add up,
//! the drift features come from the pill crops, no operator id appears in
//! clear, and the window is a valid protocol message.

use std::sync::Arc;

use rxvision_counter::analysis::{CounterPath, ScanRequest};
use rxvision_daemon::audit::{AuditKey, AuditLog, KeyRing};
use rxvision_daemon::scan::verification_event;
use rxvision_daemon::telemetry::{WindowCounts, WindowEnd};
use rxvision_models::classify::Classifier;
use rxvision_models::engine::{EngineOptions, EnginePreference};
use rxvision_protocol::{decode, encode, ChainHead, OutboxLosses, Telemetry};

use crate::service::{fixture, png};

#[test]
fn a_window_counts_what_the_counter_answered() {
    let options = EngineOptions { preference: EnginePreference::Cpu, cpu_threads: 1, ..EngineOptions::default() };
    let path = CounterPath::new(Arc::new(Classifier::open(Some(&fixture()), &[], options).unwrap()));
    let request = ScanRequest { expected_ndc: None, operator_id: "tech-1".into(), rx_ref: None };
    let frames: Vec<Vec<u8>> = std::fs::read_dir(fixture().join("selftest"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .map(|p| std::fs::read(p).unwrap())
        .take(4)
        .chain([png(&image::RgbImage::new(1, 1)), b"not a picture".to_vec()])
        .collect();
    // The counts come from the scans' audit records, as the service stores them.
    let dir = tempfile::tempdir().unwrap();
    let audit = AuditLog::open(dir.path(), KeyRing::new(AuditKey::from_master(&[7; 32]))).unwrap();
    let mut window = WindowCounts::new(u64::MAX);
    let mut pills_with_crops = 0;
    let mut answered_classes = 0;
    for frame in &frames {
        let analysis = path.analyse(&request, frame).unwrap();
        pills_with_crops += analysis.pills.iter().filter(|p| p.crop.is_some()).count() as u64;
        answered_classes += analysis.pills.iter().filter(|p| !p.top_k.is_empty()).count() as u64;
        let seq = audit.append(verification_event(&request, frame, &analysis)).unwrap().seq;
        let record = audit.get(seq).unwrap().unwrap();
        window.add_verification(&record, "3c9a61d0f2b4e587");
        window.add_features(&analysis);
    }
    assert!(window.start_ms() < u64::MAX, "the window starts no later than its first record");
    window.add_feedback("fixture-00", true);
    window.add_feedback("fixture-01", false);
    let end = WindowEnd {
        device_id: "counter-test".into(),
        seq: 7,
        end_ms: 61_000,
        model_version: "0.1.0".into(),
        engine: "cpu".into(),
        engine_fallbacks: 0,
        audit: ChainHead { next_seq: 6, head: "ab".repeat(32) },
        outbox: OutboxLosses::default(),
    };
    let telemetry = window.finish(end);
    assert_eq!(telemetry.scans, frames.len() as u64);
    assert_eq!(telemetry.verdicts.values().sum::<u64>(), telemetry.scans);
    assert_eq!(telemetry.latency_ms.total(), telemetry.scans);
    assert_eq!(telemetry.refusals.get("picture_size"), Some(&1), "{:?}", telemetry.refusals);
    assert_eq!(telemetry.refusals.get("unreadable"), Some(&1), "{:?}", telemetry.refusals);
    assert_eq!(telemetry.classes.values().sum::<u64>(), answered_classes);
    assert_eq!(telemetry.confidence.total(), answered_classes);
    assert!(pills_with_crops > 0, "the fixture frames show pills");
    for (name, histogram) in &telemetry.features {
        assert_eq!(histogram.total(), pills_with_crops, "feature {name}");
    }
    assert_eq!(telemetry.operators.keys().collect::<Vec<_>>(), ["3c9a61d0f2b4e587"]);
    assert_eq!((telemetry.feedback.confirmed.len(), telemetry.feedback.corrected.len()), (1, 1));
    // A valid message of the protocol, which decodes to itself.
    let bytes = encode(&telemetry).unwrap();
    assert!(!String::from_utf8_lossy(&bytes).contains("tech-1"), "no operator id in clear");
    assert_eq!(decode::<Telemetry>(&bytes).unwrap(), telemetry);
}

/// The service with `[telemetry]` on: scans and feedback become windows in
/// the outbox, status and metrics show it, and a stop keeps the window in
/// progress.
#[test]
fn the_service_stores_its_windows_in_the_outbox() {
    use crate::service::{b64, http, post, spawn, write_config};
    use rxvision_daemon::outbox::{MessageKind, Outbox};
    use rxvision_daemon::telemetry::finalize;
    use rxvision_protocol::{Event, EventKind};
    use serde_json::json;
    use std::process::Command;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 4 * 1024 * 1024);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("enabled = false\n# Length of a window", "enabled = true\n# Length of a window")
        .replace("window_seconds = 60", "window_seconds = 1");
    std::fs::write(&config, text).unwrap();
    let mut d = spawn(&config);
    let frame = b64(&std::fs::read(fixture().join("selftest/c00_white_round.png")).unwrap());
    let mut first_seq = None;
    for _ in 0..3 {
        let (code, body) = post(&d, "/v1/verify", &json!({"operator_id": "tech-1", "image": frame}));
        assert_eq!(code, 200, "{body}");
        first_seq.get_or_insert(body["audit_seq"].as_u64().unwrap());
    }
    let (code, body) =
        post(&d, "/v1/feedback", &json!({"audit_seq": first_seq.unwrap(), "confirmed": true, "operator_id": "tech-1"}));
    assert_eq!(code, 200, "{body}");
    // A window ends within a second or two: the outbox holds it.
    let started = Instant::now();
    loop {
        let (_, status) = http(d.addr, "GET", "/v1/status", Some(crate::service::API_KEY), None);
        if status["telemetry"]["outbox"]["depth"].as_u64().unwrap_or(0) >= 1 {
            assert_eq!(status["telemetry"]["enabled"], true);
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no window reached the outbox: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, metrics) = http(d.addr, "GET", "/metrics", None, None);
    assert!(metrics.as_str().unwrap().contains("rxvision_outbox_messages"), "{metrics}");
    let _ = Command::new("kill").args(["-TERM", &d.child.id().to_string()]).status();
    let _ = d.child.wait();

    let outbox = Outbox::open(&dir.path().join("outbox"), 1024).unwrap();
    outbox.connected();
    let mut windows: Vec<Telemetry> = Vec::new();
    let mut events = Vec::new();
    while let Some((seq, kind, bytes)) = outbox.next_to_send(finalize).unwrap() {
        outbox.sent(seq);
        match kind {
            MessageKind::Window => windows.push(decode(&bytes).unwrap()),
            MessageKind::Event => events.push(decode::<Event>(&bytes).unwrap()),
        }
    }
    // The daemon announced its start first (seq 1), then its windows followed.
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].seq, events[0].kind), (1, EventKind::DaemonStarted));
    assert_eq!(events[0].details["model"], "fixture-cnn");
    assert_eq!(windows.iter().map(|w| w.seq).collect::<Vec<_>>(), (2..=windows.len() as u64 + 1).collect::<Vec<_>>());
    assert_eq!(windows.iter().map(|w| w.scans).sum::<u64>(), 3, "every scan counted once");
    let confirmed: u64 = windows.iter().flat_map(|w| w.feedback.confirmed.values()).sum();
    assert_eq!(confirmed, 1);
    for window in &windows {
        assert_eq!(window.device_id, "counter-test");
        for operator in window.operators.keys() {
            assert!(operator.len() == 16 && operator.bytes().all(|b| b.is_ascii_hexdigit()), "{operator}");
        }
    }
}

/// The window worker counts from the audit log: a record it has not yet
/// counted is counted after a restart, audit notices become events stored
/// with their window, and nothing is counted twice.
#[test]
fn windows_and_events_come_from_the_audit_log_exactly_once() {
    use rxvision_daemon::audit::{AuditEvent, RecordKind};
    use rxvision_daemon::outbox::{MessageKind, Outbox};
    use rxvision_daemon::telemetry::{finalize, TelemetryService};
    use rxvision_protocol::{Event, EventKind};
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    let options = EngineOptions { preference: EnginePreference::Cpu, cpu_threads: 1, ..EngineOptions::default() };
    let classifier = Arc::new(Classifier::open(Some(&fixture()), &[], options).unwrap());
    let path = CounterPath::new(classifier.clone());
    let request = ScanRequest { expected_ndc: None, operator_id: "tech-1".into(), rx_ref: None };
    let frame = std::fs::read(fixture().join("selftest/c00_white_round.png")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let audit =
        Arc::new(AuditLog::open(&dir.path().join("audit"), KeyRing::new(AuditKey::from_master(&[7; 32]))).unwrap());
    let scan = |audit: &AuditLog| {
        let analysis = path.analyse(&request, &frame).unwrap();
        audit.append(verification_event(&request, &frame, &analysis)).unwrap();
    };
    let run_worker = |audit: &Arc<AuditLog>| {
        let outbox = Arc::new(Outbox::open(&dir.path().join("outbox"), 64).unwrap());
        let service = TelemetryService::new(
            "counter-test",
            Duration::from_secs(3600),
            1 << 20,
            outbox.clone(),
            audit.clone(),
            classifier.clone(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let worker = service.start(stop.clone()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::Release);
        worker.join().unwrap();
        outbox
    };
    // A first run marks where counting starts: the record before it is history.
    scan(&audit);
    drop(run_worker(&audit));
    // Two scans and a clock notice, then a run that stops (storing its window).
    scan(&audit);
    let mut notice = AuditEvent::new(RecordKind::ClockJump);
    notice.details = serde_json::json!({ "clock_ms": 1, "last_record_ms": 2 });
    audit.append(notice).unwrap();
    scan(&audit);
    let outbox = run_worker(&audit);
    let mut windows = Vec::new();
    let mut events = Vec::new();
    outbox.connected();
    while let Some((seq, kind, payload)) = outbox.next_to_send(finalize).unwrap() {
        outbox.sent(seq);
        match kind {
            MessageKind::Window => windows.push(decode::<Telemetry>(&payload).unwrap()),
            MessageKind::Event => events.push(decode::<Event>(&payload).unwrap()),
        }
    }
    assert_eq!(windows.iter().map(|w| w.scans).sum::<u64>(), 2, "only the records after the mark, once");
    let jumps: Vec<&Event> = events.iter().filter(|e| e.kind == EventKind::ClockJump).collect();
    assert_eq!(jumps.len(), 1, "{events:?}");
    assert_eq!(jumps[0].details["audit_seq"], 2);
    // Another run counts nothing again.
    drop(outbox);
    let outbox = run_worker(&audit);
    assert_eq!(outbox.depth().0, windows.len() + events.len(), "nothing new was stored");
}
