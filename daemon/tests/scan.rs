//! The counter path end to end on the fixture model: verdicts and audit records.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rxvision_daemon::audit::{AuditKey, AuditLog, KeyRing};
use rxvision_daemon::classify::Classifier;
use rxvision_daemon::counter::verdict::Verdict;
use rxvision_daemon::scan::{ScanRequest, Scanner};
use rxvision_models::engine::{EngineOptions, EnginePreference};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/bundles/fixture-cnn/0.1.0")
}

fn scanner(dir: &Path) -> Scanner {
    let options = EngineOptions { preference: EnginePreference::Cpu, ..EngineOptions::default() };
    let classifier = Classifier::open(Some(&fixture_dir()), &[], options).unwrap();
    let audit = AuditLog::open(dir, KeyRing::new(AuditKey::from_master(&[5; 32]))).unwrap();
    Scanner::new(Arc::new(classifier), Arc::new(audit))
}

fn request(expected: Option<&str>) -> ScanRequest {
    ScanRequest {
        expected_ndc: expected.map(str::to_string),
        operator_id: "tech-1".into(),
        rx_ref: Some("RX-42".into()),
    }
}

fn golden(name: &str) -> Vec<u8> {
    std::fs::read(fixture_dir().join("selftest").join(name)).unwrap()
}

#[test]
fn the_right_product_matches_and_another_mismatches_each_with_a_record() {
    let dir = tempfile::tempdir().unwrap();
    let scanner = scanner(dir.path());
    let frame = golden("c00_white_round.png");
    let ok = scanner.scan(&request(Some("fixture-00")), &frame).unwrap();
    println!("{ok:?}");
    assert_eq!(ok.count, 1, "{ok:?}");
    assert_eq!(ok.verdict, Verdict::Match, "{ok:?}");
    assert_eq!(ok.pills[0].top_k[0].ndc, "fixture-00");
    let wrong = scanner.scan(&request(Some("fixture-03")), &frame).unwrap();
    assert_eq!(wrong.verdict, Verdict::Mismatch, "{wrong:?}");
    assert_eq!((ok.audit_seq, wrong.audit_seq), (0, 1));
    let report = scanner.audit().verify().unwrap();
    assert_eq!(report.checked, 2);
    let mut out = Vec::new();
    scanner.audit().export(0, u64::MAX, "officer", &mut out).unwrap();
    let first: serde_json::Value =
        serde_json::from_str(String::from_utf8(out).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(first["verdict"], "MATCH");
    assert_eq!(first["operator"], "tech-1");
    assert_eq!(first["rx_ref_hmac"], scanner.audit().pseudonym("RX-42"));
    assert_eq!(first["details"]["expected_ndc"], "fixture-00");
}

#[test]
fn every_golden_image_is_found_and_identified_as_its_class() {
    let dir = tempfile::tempdir().unwrap();
    let scanner = scanner(dir.path());
    let bundle = scanner.classifier().bundle().clone();
    let mut right = 0;
    for case in &bundle.selftest.cases {
        let result = scanner.scan(&request(None), bundle.selftest_image(case).unwrap()).unwrap();
        assert_eq!(result.count, 1, "{}: {result:?}", case.image);
        if result.pills[0].top_k[0].index == case.label_index {
            right += 1;
        }
        println!("{}: {:?} {}", case.image, result.verdict, result.reason);
    }
    assert!(
        right >= bundle.selftest.cases.len() - 1,
        "only {right} of {} crops identified",
        bundle.selftest.cases.len()
    );
}

#[test]
fn an_empty_tray_a_corrupt_upload_and_a_dark_frame_are_answered_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let scanner = scanner(dir.path());
    let mut empty = Vec::new();
    let tray = image::RgbImage::from_fn(200, 160, |x, y| image::Rgb([120 + ((x + y) % 7) as u8, 124, 128]));
    tray.write_to(&mut std::io::Cursor::new(&mut empty), image::ImageFormat::Png).unwrap();
    let r = scanner.scan(&request(Some("fixture-00")), &empty).unwrap();
    assert_eq!(r.verdict, Verdict::NoPill, "{r:?}");
    assert!(r.reason.contains("no pill in view"));

    let mut corrupt = golden("c01_yellow_oval.jpg");
    corrupt.truncate(corrupt.len() / 2);
    let r = scanner.scan(&request(Some("fixture-01")), &corrupt).unwrap();
    assert_eq!(r.verdict, Verdict::BadImage);
    assert!(r.reason.contains("unreadable"), "{}", r.reason);

    let mut dark = Vec::new();
    image::RgbImage::from_pixel(200, 160, image::Rgb([8, 8, 10]))
        .write_to(&mut std::io::Cursor::new(&mut dark), image::ImageFormat::Png)
        .unwrap();
    let r = scanner.scan(&request(None), &dark).unwrap();
    assert_eq!(r.verdict, Verdict::BadImage);
    assert!(r.reason.contains("too dark"), "{}", r.reason);

    let report = scanner.audit().verify().unwrap();
    assert_eq!(report.checked, 3);
}
