//! The `classify` and `selftest` commands, run as a user runs them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn fixture_dir() -> PathBuf {
    workspace().join("models/bundles/fixture-cnn/0.1.0")
}

/// `rxvisiond ARGS` run from the workspace root (where `models/bundles/` is).
fn rxvisiond(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rxvisiond"))
        .args(args)
        .current_dir(workspace())
        .env("RXVISION_LOG", "error")
        .output()
        .expect("run rxvisiond")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn golden_images() -> Vec<(PathBuf, usize)> {
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture_dir().join("selftest/expected.json")).unwrap()).unwrap();
    expected["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (fixture_dir().join("selftest").join(c["image"].as_str().unwrap()), c["top1"].as_u64().unwrap() as usize)
        })
        .collect()
}

#[test]
fn classify_json_prints_one_object_per_image_with_the_documented_fields() {
    let images = golden_images();
    let fixture = fixture_dir();
    let mut args = vec!["classify", "--bundle", fixture.to_str().unwrap(), "--engine", "cpu", "--json", "--top", "2"];
    let paths: Vec<String> = images.iter().map(|(p, _)| p.display().to_string()).collect();
    args.extend(paths.iter().map(String::as_str));
    let out = rxvisiond(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), images.len());
    for (line, (path, top1)) in lines.iter().zip(&images) {
        assert_eq!(line["image"], path.display().to_string());
        let top_k = line["top_k"].as_array().unwrap();
        assert_eq!(top_k.len(), 2);
        assert_eq!(top_k[0]["index"], *top1);
        assert!(top_k[0]["ndc"].as_str().unwrap().starts_with("fixture-"));
        assert!(!top_k[0]["name"].as_str().unwrap().is_empty());
        assert!(top_k[0]["prob"].as_f64().unwrap() >= top_k[1]["prob"].as_f64().unwrap());
        assert_eq!(line["engine"], "cpu");
        assert_eq!(line["model_version"], "0.1.0");
        assert!(line["latency_ms"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn classify_reports_a_bad_image_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.jpg");
    let good = &golden_images()[0].0;
    let bytes = std::fs::read(good.with_file_name("c01_yellow_oval.jpg")).unwrap();
    std::fs::write(&corrupt, &bytes[..bytes.len() / 2]).unwrap();
    let missing = dir.path().join("missing.png");
    let out = rxvisiond(&[
        "classify",
        "--engine",
        "cpu",
        "--json",
        corrupt.to_str().unwrap(),
        missing.to_str().unwrap(),
        good.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[0]["error"].as_str().unwrap().contains("truncated"), "{}", lines[0]);
    assert!(lines[1]["error"].as_str().unwrap().contains("cannot read"), "{}", lines[1]);
    assert!(lines[2]["top_k"].is_array());
}

#[test]
fn selftest_passes_on_the_cpu_and_prints_a_table() {
    let out = rxvisiond(&["selftest", "--engine", "cpu", "--bundle", fixture_dir().to_str().unwrap()]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(text.contains("PASS: 8 of 8 cases pass"), "{text}");
    assert_eq!(text.lines().filter(|l| l.trim_end().ends_with(" ok")).count(), 8, "{text}");
}

#[test]
fn selftest_passes_on_the_gpu_engine() {
    if let Err(why) = rxvision_models::engine::probe_adapter() {
        if std::env::var("RXVISION_REQUIRE_GPU").as_deref() == Ok("1") {
            panic!("no GPU adapter: {why}");
        }
        eprintln!("SKIPPED: no GPU adapter: {why}");
        return;
    }
    // lavapipe shares two cores with the rest of the suite: the first
    // request compiles shaders and can take seconds, so the watchdog (tested
    // on its own in rxvision-models) is widened here.
    let fixture = fixture_dir();
    let out =
        rxvisiond(&["selftest", "--engine", "gpu", "--gpu-timeout-ms", "60000", "--bundle", fixture.to_str().unwrap()]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(text.contains("wonnx") && text.contains("PASS"), "{text}");
}

#[test]
fn without_bundle_the_newest_shipped_one_is_used() {
    let out = rxvisiond(&["classify", "--engine", "cpu", golden_images()[0].0.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The shipped pill model is the one production bundle: it wins over the fixtures.
    assert!(stderr(&out).contains("models/bundles/pillnet/"), "{}", stderr(&out));
}

#[test]
fn a_corrupt_bundle_is_refused_with_the_file_named_and_exit_65() {
    let dir = tempfile::tempdir().unwrap();
    for entry in ["manifest.json", "manifest.json.sha256", "labels.json", "model.onnx", "MODEL_CARD.md"] {
        std::fs::copy(fixture_dir().join(entry), dir.path().join(entry)).unwrap();
    }
    std::fs::create_dir(dir.path().join("selftest")).unwrap();
    for entry in std::fs::read_dir(fixture_dir().join("selftest")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join("selftest").join(entry.file_name())).unwrap();
    }
    let model = dir.path().join("model.onnx");
    let mut bytes = std::fs::read(&model).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&model, bytes).unwrap();
    let out = rxvisiond(&["selftest", "--engine", "cpu", "--bundle", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(65));
    assert!(stderr(&out).contains("model.onnx: SHA-256 mismatch"), "{}", stderr(&out));
}

#[test]
fn bad_usage_is_exit_64_with_a_message() {
    let out = rxvisiond(&["classify", "--engine", "tpu", "x.png"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("unknown engine \"tpu\""), "{}", stderr(&out));
}

mod audit_commands {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use rxvision_daemon::audit::{AuditEvent, AuditKey, AuditLog, KeyRing, RecordKind};

    use super::{rxvisiond, stderr, stdout};

    const KEY_HEX: &str = "3f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

    fn setup(records: u64) -> (tempfile::TempDir, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("audit.key");
        std::fs::write(&key, format!("{KEY_HEX}\n")).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let store = dir.path().join("audit");
        let log = AuditLog::open(&store, KeyRing::new(AuditKey::load(&key).unwrap())).unwrap();
        for i in 0..records {
            let mut event = AuditEvent::new(RecordKind::Verification);
            event.rx_ref = Some(format!("RX-{i}"));
            event.verdict = Some("MATCH".into());
            log.append(event).unwrap();
        }
        drop(log);
        (dir, store.display().to_string(), key.display().to_string())
    }

    #[test]
    fn verify_passes_on_an_intact_log_and_names_the_first_bad_record_otherwise() {
        let (_dir, store, key) = setup(5);
        let out = rxvisiond(&["audit", "verify", "--dir", &store, "--key", &key]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stdout(&out).contains("5 records checked (seq 0 to 4)"), "{}", stdout(&out));

        let db = crate::audit::raw_open(std::path::Path::new(&store));
        db.open_tree("records").unwrap().remove(3u64.to_be_bytes()).unwrap();
        db.flush().unwrap();
        drop(db);
        let out = rxvisiond(&["audit", "verify", "--dir", &store, "--key", &key]);
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains("first bad record is seq 3"), "{}", stderr(&out));
    }

    #[test]
    fn export_writes_the_range_to_a_new_file_and_audits_itself() {
        let (dir, store, key) = setup(3);
        let out_file = dir.path().join("export.jsonl");
        let args = ["audit", "export", "--dir", &store, "--key", &key, "--from", "2000-01-01", "--to", "2999-01-01"];
        let out = rxvisiond(&[&args[..], &["--operator", "officer-7", "--out", out_file.to_str().unwrap()]].concat());
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stderr(&out).contains("exported 3 records; the export is audit record 3"), "{}", stderr(&out));
        let text = std::fs::read_to_string(&out_file).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(!text.contains("RX-1"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&out_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "decrypted records are readable by their owner only, whatever the umask");
        // The file exists now: a second export must not overwrite it.
        let out = rxvisiond(&[&args[..], &["--operator", "officer-7", "--out", out_file.to_str().unwrap()]].concat());
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(std::fs::read_to_string(&out_file).unwrap(), text);
        let out = rxvisiond(&["audit", "verify", "--dir", &store, "--key", &key]);
        assert!(stdout(&out).contains("4 records checked"), "{}", stdout(&out));
    }

    #[test]
    fn a_readable_key_file_is_refused_and_never_printed() {
        let (_dir, store, key) = setup(1);
        std::fs::set_permissions(Path::new(&key), std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = rxvisiond(&["audit", "verify", "--dir", &store, "--key", &key]);
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
        assert!(!stderr(&out).contains(&KEY_HEX[..12]) && !stdout(&out).contains(&KEY_HEX[..12]));
    }

    #[test]
    fn bad_dates_are_refused() {
        let (_dir, store, key) = setup(1);
        let out = rxvisiond(&[
            "audit",
            "export",
            "--dir",
            &store,
            "--key",
            &key,
            "--from",
            "yesterday",
            "--to",
            "2999-01-01",
            "--operator",
            "x",
        ]);
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains("\"yesterday\" is not a date"), "{}", stderr(&out));
    }
}

mod config_commands {
    use super::{rxvisiond, stderr, stdout, workspace};

    #[test]
    fn print_default_config_is_the_shipped_annotated_file_and_it_checks() {
        let out = rxvisiond(&["print-default-config"]);
        assert!(out.status.success());
        let shipped = std::fs::read_to_string(workspace().join("firmware-cfg/rxvisiond.toml")).unwrap();
        assert_eq!(stdout(&out), shipped);
        let out = rxvisiond(&["config", "check", "firmware-cfg/rxvisiond.toml"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }

    #[test]
    fn a_bad_config_exits_64_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let shipped = std::fs::read_to_string(workspace().join("firmware-cfg/rxvisiond.toml")).unwrap();
        for (edit, words) in [
            (shipped.replace("gpu_timeout_ms = 2000", "gpu_timeout_ms = 2000\ngpu_timeout = 5"), "model.gpu_timeout"),
            (shipped.replace("cpu_threads = 1", "cpu_threads = 999"), "model.cpu_threads: 999 is outside 1..=64"),
            (shipped.replace("engine = \"auto\"", "engine = 3"), "model.engine"),
        ] {
            let file = dir.path().join("bad.toml");
            std::fs::write(&file, edit).unwrap();
            let out = rxvisiond(&["config", "check", file.to_str().unwrap()]);
            assert_eq!(out.status.code(), Some(64), "{words}");
            assert!(stderr(&out).contains(words), "{words}: {}", stderr(&out));
        }
        let out = rxvisiond(&["config", "check", dir.path().join("absent.toml").to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(64));
    }

    #[test]
    fn audit_commands_take_the_store_and_key_from_the_config() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("audit.key");
        std::fs::write(&key, "11".repeat(32)).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let store = dir.path().join("audit");
        let shipped = std::fs::read_to_string(workspace().join("firmware-cfg/rxvisiond.toml")).unwrap();
        let config = shipped
            .replace("dir = \"/var/lib/rxvision/audit\"", &format!("dir = {:?}", store.display().to_string()))
            .replace("\nkey_file = \"\"", &format!("\nkey_file = {:?}", key.display().to_string()))
            .replace("\nkey_credential = \"audit-key\"", "\nkey_credential = \"\"");
        let file = dir.path().join("rxvisiond.toml");
        std::fs::write(&file, config).unwrap();
        // No store yet: verification fails and creates nothing.
        let out = rxvisiond(&["audit", "verify", "--config", file.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
        assert!(stderr(&out).contains("there is no audit store"), "{}", stderr(&out));
        assert!(!store.exists());
        drop(rxvision_daemon::audit::AuditLog::open(&store, rxvision_daemon::audit::KeyRing::load(&key, &[]).unwrap()));
        let out = rxvisiond(&["audit", "verify", "--config", file.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stdout(&out).contains("0 records checked"), "{}", stdout(&out));
        // The credential form needs systemd's $CREDENTIALS_DIRECTORY.
        let out = rxvisiond(&["audit", "verify", "--config", "firmware-cfg/rxvisiond.toml"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains("CREDENTIALS_DIRECTORY"), "{}", stderr(&out));
    }
}

mod eval_command {
    use super::{golden_images, rxvisiond, stderr, stdout};

    /// `rxvisiond eval --json` with the shape fixture on the CPU over `dataset`, plus `extra`.
    fn eval_fixture(dataset: &std::path::Path, extra: &[&str]) -> std::process::Output {
        let fixture = super::fixture_dir();
        let mut args = vec!["eval", "--bundle", fixture.to_str().unwrap(), "--engine", "cpu", "--json"];
        args.extend(["--dataset", dataset.to_str().unwrap()]);
        args.extend(extra);
        rxvisiond(&args)
    }

    #[test]
    fn eval_scores_a_labelled_dataset_with_groups_and_an_open_set() {
        let dir = tempfile::tempdir().unwrap();
        let mut csv = String::from("file,ndc,face,name,strength,lookalike_group,seed\n");
        for (i, (path, top1)) in golden_images().iter().enumerate() {
            let name = format!("img{i}.{}", path.extension().unwrap().to_str().unwrap());
            std::fs::copy(path, dir.path().join(&name)).unwrap();
            let group = if *top1 < 4 { "G1" } else { "G2" };
            csv.push_str(&format!("{name},fixture-0{top1},front,x,\"1 mg, scored\",{group},{i}\n"));
        }
        // A product the model does not know.
        std::fs::copy(&golden_images()[0].0, dir.path().join("unknown.png")).unwrap();
        csv.push_str("unknown.png,99999-0000-01,front,y,,,9\n");
        // Empty trays, of a known and of an unknown product: refused before the model, not scored.
        let tray = image::RgbImage::from_fn(200, 160, |x, y| image::Rgb([120 + ((x * 3 + y) % 5) as u8, 124, 128]));
        tray.save(dir.path().join("empty.png")).unwrap();
        csv.push_str("empty.png,fixture-00,front,x,,G1,10\nempty.png,99999-0000-01,front,y,,,11\n");
        std::fs::write(dir.path().join("labels.csv"), csv).unwrap();
        let out = eval_fixture(dir.path(), &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
        assert_eq!(report["n"], 8, "{report}");
        assert_eq!(report["not_analysed"], 2, "{report}");
        assert_eq!(report["refusals"], serde_json::json!({"no_pill": 2}), "why they were refused");
        assert_eq!(report["top1"], 1.0, "{report}");
        assert_eq!(report["top3"], 1.0);
        assert_eq!(report["per_group"]["G1"]["n"], 4);
        assert_eq!(report["per_group"]["G2"]["top1"], 1.0);
        assert!(report["ece"].as_f64().unwrap() < 0.1, "{report}");
        assert_eq!(report["open_set"]["n"], 1);
        // The fixture is sure of itself: the unknown product is not caught.
        assert_eq!(report["open_set"]["uncertain_rate"], 0.0);
        assert_eq!(
            report["confusions"],
            serde_json::json!([{"expected": "fixture-00", "predicted": "NO_PILL", "count": 1}]),
            "a refusal is listed, not scored"
        );
    }

    #[test]
    fn eval_verify_asks_as_a_pharmacy_system_does_and_draws_the_threshold_curve() {
        let dir = tempfile::tempdir().unwrap();
        let mut csv = String::from("file,ndc,face,lookalike_group\n");
        let golden = golden_images();
        for (i, (path, top1)) in golden.iter().enumerate() {
            let name = format!("img{i}.{}", path.extension().unwrap().to_str().unwrap());
            std::fs::copy(path, dir.path().join(&name)).unwrap();
            let group = if *top1 < 4 { "G1" } else { "G2" };
            csv.push_str(&format!("{name},fixture-0{top1},front,{group}\n"));
        }
        // A product the model does not know, in G1, pictured as a G1 product looks.
        std::fs::copy(&golden[0].0, dir.path().join("unknown.png")).unwrap();
        csv.push_str("unknown.png,99999-0000-01,front,G1\n");
        // An empty tray of a known product: refused, so never a MATCH.
        let tray = image::RgbImage::from_fn(200, 160, |x, y| image::Rgb([120 + ((x * 3 + y) % 5) as u8, 124, 128]));
        tray.save(dir.path().join("empty.png")).unwrap();
        csv.push_str("empty.png,fixture-00,front,G1\n");
        std::fs::write(dir.path().join("labels.csv"), csv).unwrap();

        let scans_csv = dir.path().join("scans.csv");
        let out = eval_fixture(dir.path(), &["--verify", "--scans", scans_csv.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
        let verify = &report["verify"];
        assert_eq!(verify["products_with_own_threshold"], 0, "the fixture has one threshold for all");
        let answered = &verify["answered"];
        let known = golden.len() as u64 + 1;
        assert_eq!(answered["automation"]["n"], known, "every known image with its own NDC: {verify}");
        assert!(answered["automation"]["matched"].as_u64().unwrap() < known, "the empty tray is no MATCH");
        assert_eq!(answered["false_match_lookalike"]["n"], known, "and with a look-alike of its group");
        assert_eq!(answered["false_match_lookalike"]["matched"], 0, "{verify}");
        // The fixture is sure of itself: the unknown pill that looks like a G1 product is matched.
        assert_eq!(answered["false_match_unknown"]["n"], 1);
        assert_eq!(answered["false_match_unknown"]["matched"], 1, "{verify}");
        // The curve at the bundle's own threshold is what the counter answered, and a
        // higher threshold never matches more.
        let curve = verify["curve"].as_array().unwrap();
        let own = curve.iter().find(|p| p["min_confidence"] == verify["min_confidence"]).expect("the bundle's point");
        for case in ["automation", "false_match_lookalike", "false_match_unknown"] {
            assert_eq!(own[case], answered[case], "{case}: {verify}");
            let matched: Vec<u64> = curve.iter().map(|p| p[case]["matched"].as_u64().unwrap()).collect();
            assert!(matched.windows(2).all(|w| w[0] >= w[1]), "{case}: {matched:?}");
        }
        assert_eq!(curve.last().unwrap()["min_confidence"].as_f64().unwrap(), f64::from(0.9999f32));
        // --scans lists every scan, from which the counter's answers can be recounted.
        let text = std::fs::read_to_string(&scans_csv).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("file,expected,case,matched_at,length_px,width_px"));
        let threshold = verify["min_confidence"].as_f64().unwrap() as f32;
        let mut recount = std::collections::BTreeMap::<&str, (u64, u64)>::new();
        for line in lines {
            let fields: Vec<&str> = line.split(',').collect();
            let matched = !fields[3].is_empty() && fields[3].parse::<f32>().unwrap() >= threshold;
            if !fields[3].is_empty() {
                let length: f32 = fields[4].parse().unwrap();
                let width: f32 = fields[5].parse().unwrap();
                assert!(length >= width && width > 0.0, "a matchable scan has its pill's size: {line}");
            }
            let entry = recount.entry(fields[2]).or_default();
            *entry = (entry.0 + 1, entry.1 + u64::from(matched));
        }
        for (case, name) in
            [("own", "automation"), ("lookalike", "false_match_lookalike"), ("unknown", "false_match_unknown")]
        {
            let (n, matched) = recount[case];
            assert_eq!(
                (n, matched),
                (answered[name]["n"].as_u64().unwrap(), answered[name]["matched"].as_u64().unwrap()),
                "{case}"
            );
        }
        let out = eval_fixture(dir.path(), &["--scans", scans_csv.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(64), "--scans without --verify: {}", stderr(&out));
        assert!(stderr(&out).contains("--verify"), "{}", stderr(&out));
        // Without --verify nothing is asked twice and there is no curve.
        let plain: serde_json::Value = serde_json::from_str(stdout(&eval_fixture(dir.path(), &[])).trim()).unwrap();
        assert!(plain.get("verify").is_none());
        // The blur limit can be moved to measure what the gate refuses; nonsense is refused.
        let out = eval_fixture(dir.path(), &["--min-sharpness=-1"]);
        assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
        assert!(stderr(&out).contains("--min-sharpness -1 is outside"), "{}", stderr(&out));
        assert!(eval_fixture(dir.path(), &["--min-sharpness", "0"]).status.success());
    }

    /// Sildenafil 25 mg shows "Pfizer" on its front like the 50 and 100 mg tablets, at another
    /// size; its back reads VGR25. Without the size cue the fronts are twin faces, scored apart;
    /// with it they are not.
    #[test]
    fn eval_scores_twin_faces_apart() {
        use rxvision_models::formulary::{Face, Formulary};
        use rxvision_synth::scene::{render_sample, SceneOptions};
        let formulary = Formulary::load(&super::workspace().join("models/formulary/formulary.json")).unwrap();
        let sildenafil = formulary.get("00069-4200-30").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut csv = String::from("file,ndc,face,lookalike_group\n");
        for (i, face) in [Face::Front, Face::Back, Face::Front, Face::Back].into_iter().enumerate() {
            let options = SceneOptions { clean: true, ..SceneOptions::camera(640, 480) };
            let frame = render_sample(sildenafil, face, &[], 40 + i as u64, &options);
            std::fs::write(dir.path().join(format!("{i}.jpg")), frame.to_jpeg().unwrap()).unwrap();
            csv.push_str(&format!("{i}.jpg,00069-4200-30,{face},LA08\n"));
        }
        std::fs::write(dir.path().join("labels.csv"), csv).unwrap();
        let bundle = super::workspace().join("models/bundles/fixture-pills/0.1.0");
        let eval = |extra: &[&str]| -> serde_json::Value {
            let mut args = vec!["eval", "--bundle", bundle.to_str().unwrap(), "--engine", "cpu", "--json"];
            args.extend(["--dataset", dir.path().to_str().unwrap()]);
            args.extend(extra);
            let out = rxvisiond(&args);
            assert!(out.status.success(), "{}", stderr(&out));
            serde_json::from_str(stdout(&out).trim()).unwrap()
        };
        let without_cue = eval(&[]);
        assert_eq!(without_cue["not_analysed"], 0, "{without_cue}");
        assert_eq!(without_cue["twin_faces"]["n"], 2, "the fronts: {without_cue}");
        assert_eq!(without_cue["n"], 2, "the backs are scored: {without_cue}");
        assert_eq!(without_cue["per_group"]["LA08"]["n"], 2);
        let with_cue = eval(&["--px-per-mm", "9"]);
        assert_eq!(with_cue["twin_faces"]["n"], 0, "{with_cue}");
        assert_eq!(with_cue["n"], 4, "{with_cue}");
        // A formulary that cannot be read is refused before anything is scored.
        let out = rxvisiond(&["eval", "--dataset", dir.path().to_str().unwrap(), "--formulary", "/nonexistent.json"]);
        assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
        assert!(stderr(&out).contains("--formulary"), "{}", stderr(&out));
    }

    /// `--mistakes` lists each wrongly identified image with what the model
    /// said instead, and each refused one with the refusal's code.
    #[test]
    fn eval_writes_the_mistakes_it_scored() {
        let dir = tempfile::tempdir().unwrap();
        let images = golden_images();
        let ((right_path, right_class), (wrong_path, wrong_class)) = (&images[0], &images[1]);
        assert_ne!(right_class, wrong_class);
        std::fs::copy(right_path, dir.path().join("right.png")).unwrap();
        std::fs::copy(wrong_path, dir.path().join("mislabelled.png")).unwrap();
        image::RgbImage::from_pixel(200, 160, image::Rgb([2, 2, 2])).save(dir.path().join("dark.png")).unwrap();
        // The second image is labelled as the first image's class: the model will disagree.
        let csv = format!(
            "file,ndc,face\nright.png,fixture-0{right_class},front\nmislabelled.png,fixture-0{right_class},back\n\
             dark.png,fixture-0{right_class},front\n"
        );
        std::fs::write(dir.path().join("labels.csv"), csv).unwrap();
        let mistakes = dir.path().join("mistakes.csv");
        let eval = |out: &std::path::Path| eval_fixture(dir.path(), &["--mistakes", out.to_str().unwrap()]);
        let out = eval(&mistakes);
        assert!(out.status.success(), "{}", stderr(&out));
        let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
        assert_eq!(report["n"], 2, "{report}");
        assert_eq!(report["top1"], 0.5, "{report}");
        assert!(report.get("mistakes").is_none(), "the list goes to the file only: {report}");
        assert_eq!(report["not_analysed"], 1, "{report}");
        let text = std::fs::read_to_string(&mistakes).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[2], format!("dark.png,fixture-0{right_class},front,too_dark,0.0000,BAD_IMAGE,0.0,0.0,0.0"));
        assert_eq!(lines[0], "file,expected,face,predicted,confidence,verdict,length_px,width_px,contrast");
        let fields: Vec<&str> = lines[1].split(',').collect();
        assert_eq!(
            fields[..4],
            ["mislabelled.png", &format!("fixture-0{right_class}"), "back", &format!("fixture-0{wrong_class}")]
        );
        let confidence: f32 = fields[4].parse().unwrap();
        assert!(confidence > 0.0 && confidence <= 1.0, "{text}");
        assert!(fields[6].parse::<f32>().unwrap() > 0.0, "a measured length: {text}");
        // An unwritable file is an error, not a silent loss.
        let out = eval(&dir.path().join("no/such/dir/mistakes.csv"));
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(stderr(&out).contains("--mistakes"), "{}", stderr(&out));
    }

    #[test]
    fn eval_refuses_a_dataset_without_labels() {
        let dir = tempfile::tempdir().unwrap();
        let out = rxvisiond(&["eval", "--engine", "cpu", "--dataset", dir.path().to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains("labels.csv"), "{}", stderr(&out));
    }
}

#[test]
fn cameras_lists_the_v4l2_devices_of_the_machine() {
    let nodes: Vec<String> = std::fs::read_dir("/dev")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.strip_prefix("video").is_some_and(|i| i.parse::<u32>().is_ok()))
        .map(|n| format!("/dev/{n}"))
        .collect();
    let json = rxvisiond(&["cameras", "--json"]);
    assert!(json.status.success(), "{}", stderr(&json));
    let listed: serde_json::Value = serde_json::from_str(&stdout(&json)).unwrap();
    let mut devices: Vec<String> =
        listed.as_array().unwrap().iter().map(|c| c["device"].as_str().unwrap().to_string()).collect();
    devices.sort();
    let mut expected = nodes.clone();
    expected.sort();
    assert_eq!(devices, expected, "every /dev/videoN is listed, nothing else");
    let text = rxvisiond(&["cameras"]);
    assert!(text.status.success(), "{}", stderr(&text));
    if nodes.is_empty() {
        assert!(stdout(&text).contains("no V4L2 camera found"), "{}", stdout(&text));
    } else {
        assert!(nodes.iter().all(|n| stdout(&text).contains(n.as_str())), "{}", stdout(&text));
    }
}
