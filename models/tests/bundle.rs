//! Bundle loading: verification, corruption, inconsistency, archives.

use std::collections::BTreeMap;
use std::path::Path;

use rxvision_models::bundle::{find_newest, Bundle, BundleError, Purpose};

use crate::support::{fixture, fixture_dir, load_tree, read_tree, reseal, with_manifest, write_tree};

#[test]
fn the_fixture_bundle_loads_and_describes_itself() {
    let bundle = fixture();
    assert_eq!(bundle.manifest.name, "fixture-cnn");
    assert_eq!(bundle.manifest.purpose, Purpose::Fixture);
    assert_eq!(bundle.labels.len(), bundle.manifest.num_classes);
    assert_eq!(bundle.selftest.cases.len(), 8);
    assert!(bundle.model_bytes().len() > 10_000);
    for case in &bundle.selftest.cases {
        assert!(bundle.selftest_image(case).is_some(), "{}", case.image);
    }
}

/// Flips one byte at the start, the middle and the end of every file of the
/// bundle, one at a time: each must fail to load with an error naming that file.
#[test]
fn a_flipped_byte_in_any_file_is_refused_naming_the_file() {
    let pristine = read_tree(&fixture_dir());
    let kinds: Vec<&str> = pristine.keys().map(|k| k.rsplit('.').next().unwrap()).collect();
    for kind in ["json", "sha256", "onnx", "md", "png", "jpg"] {
        assert!(kinds.contains(&kind), "the fixture has no .{kind} file to corrupt");
    }
    for (name, bytes) in &pristine {
        for at in [0, bytes.len() / 2, bytes.len() - 1] {
            let mut files = pristine.clone();
            files.get_mut(name).unwrap()[at] ^= 0x01;
            let err = load_tree(&files).expect_err(&format!("{name} with byte {at} flipped loaded"));
            let message = err.to_string();
            assert!(message.contains(name.as_str()), "{name} byte {at}: error does not name the file: {message}");
        }
    }
}

#[test]
fn a_truncated_or_missing_file_is_refused_naming_the_file() {
    let pristine = read_tree(&fixture_dir());
    for name in pristine.keys() {
        let mut files = pristine.clone();
        let len = files[name].len();
        files.get_mut(name).unwrap().truncate(len / 2);
        let message = load_tree(&files).expect_err(name).to_string();
        assert!(message.contains(name.as_str()), "truncated {name}: {message}");

        let mut files = pristine.clone();
        files.remove(name);
        let message = load_tree(&files).expect_err(name).to_string();
        assert!(message.contains(name.as_str()) && message.contains("missing"), "missing {name}: {message}");
    }
}

#[test]
fn a_file_the_manifest_does_not_list_is_refused() {
    let mut files = read_tree(&fixture_dir());
    files.insert("selftest/extra.png".into(), b"not listed".to_vec());
    let err = load_tree(&files).unwrap_err();
    assert!(matches!(&err, BundleError::Unlisted { file } if file == "selftest/extra.png"), "{err}");
}

#[test]
fn an_unknown_schema_version_is_refused() {
    let mut files = read_tree(&fixture_dir());
    with_manifest(&mut files, |m| m["schema_version"] = 2.into());
    let err = load_tree(&files).unwrap_err();
    assert!(matches!(err, BundleError::UnknownSchema { found: 2 }), "{err}");
    assert!(err.to_string().contains("manifest.json"));
}

fn expect_invalid(files: &BTreeMap<String, Vec<u8>>, file: &str, words: &str) {
    match load_tree(files) {
        Err(BundleError::Invalid { file: f, problem }) => {
            assert_eq!(f, file, "{problem}");
            assert!(problem.contains(words), "{problem:?} lacks {words:?}");
        }
        other => panic!("expected an invalid {file}, got {other:?}"),
    }
}

#[test]
fn manifest_and_graph_must_agree() {
    let pristine = read_tree(&fixture_dir());

    let mut files = pristine.clone();
    with_manifest(&mut files, |m| m["input"]["name"] = "pixels".into());
    expect_invalid(&files, "model.onnx", "named \"image\"");

    let mut files = pristine.clone();
    with_manifest(&mut files, |m| m["input"]["width"] = 96.into());
    expect_invalid(&files, "model.onnx", "input shape");

    let mut files = pristine.clone();
    with_manifest(&mut files, |m| m["output"]["name"] = "logits".into());
    expect_invalid(&files, "model.onnx", "no output named");

    // Nine classes everywhere but in the graph.
    let mut files = pristine.clone();
    let mut labels: Vec<serde_json::Value> = serde_json::from_slice(&files["labels.json"]).unwrap();
    let mut extra = labels[0].clone();
    extra["index"] = 8.into();
    extra["ndc"] = "fixture-08".into();
    labels.push(extra);
    files.insert("labels.json".into(), serde_json::to_vec(&labels).unwrap());
    let mut expected: serde_json::Value = serde_json::from_slice(&files["selftest/expected.json"]).unwrap();
    for case in expected["cases"].as_array_mut().unwrap() {
        case["probs"].as_array_mut().unwrap().push(0.0.into());
    }
    files.insert("selftest/expected.json".into(), serde_json::to_vec(&expected).unwrap());
    with_manifest(&mut files, |m| m["num_classes"] = 9.into());
    expect_invalid(&files, "model.onnx", "num_classes = 9");
}

#[test]
fn labels_must_match_the_manifest() {
    let pristine = read_tree(&fixture_dir());
    let mut files = pristine.clone();
    let mut labels: Vec<serde_json::Value> = serde_json::from_slice(&files["labels.json"]).unwrap();
    labels.pop();
    files.insert("labels.json".into(), serde_json::to_vec(&labels).unwrap());
    with_manifest(&mut files, |_| {});
    expect_invalid(&files, "labels.json", "num_classes = 8");

    let mut files = pristine.clone();
    let mut labels: Vec<serde_json::Value> = serde_json::from_slice(&files["labels.json"]).unwrap();
    labels[3]["ndc"] = labels[2]["ndc"].clone();
    files.insert("labels.json".into(), serde_json::to_vec(&labels).unwrap());
    with_manifest(&mut files, |_| {});
    expect_invalid(&files, "labels.json", "appears twice");
}

#[test]
fn manifest_values_out_of_range_are_refused_by_key() {
    let pristine = read_tree(&fixture_dir());
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit); 6] = [
        ("input.layout", |m| m["input"]["layout"] = "NHWC".into()),
        ("unknown variant `diagonal`", |m| m["input"]["crop"] = "diagonal".into()),
        ("input.resize", |m| m["input"]["resize"] = "nearest".into()),
        ("thresholds", |m| m["thresholds"]["min_confidence"] = 1.5.into()),
        ("input.mean", |m| m["input"]["std"][1] = 0.0.into()),
        ("unknown field `surprise`", |m| m["surprise"] = true.into()),
    ];
    for (words, edit) in cases {
        let mut files = pristine.clone();
        with_manifest(&mut files, edit);
        let message = load_tree(&files).unwrap_err().to_string();
        assert!(message.starts_with("manifest.json") && message.contains(words), "{words}: {message}");
    }
}

#[test]
fn the_crop_is_read_from_the_manifest_and_defaults_to_square() {
    use rxvision_models::bundle::PillCrop;
    assert_eq!(fixture().manifest.input.crop, PillCrop::Square, "bundles without the field");
    let mut files = read_tree(&fixture_dir());
    with_manifest(&mut files, |m| m["input"]["crop"] = "upright".into());
    assert_eq!(load_tree(&files).unwrap().manifest.input.crop, PillCrop::Upright);
}

fn tar_gz(files: &BTreeMap<String, Vec<u8>>, prefix: &str) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default()));
    for (name, bytes) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, format!("{prefix}{name}"), bytes.as_slice()).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

#[test]
fn tarballs_load_with_or_without_a_top_level_folder() {
    let files = read_tree(&fixture_dir());
    let dir = tempfile::tempdir().unwrap();
    for prefix in ["", "fixture-cnn-0.1.0/", "./"] {
        let path = dir.path().join("bundle.tar.gz");
        std::fs::write(&path, tar_gz(&files, prefix)).unwrap();
        let bundle = Bundle::load(&path).unwrap_or_else(|e| panic!("prefix {prefix:?}: {e}"));
        assert_eq!(bundle.model_bytes(), fixture().model_bytes());
    }
}

#[test]
fn truncated_or_hostile_tarballs_are_refused() {
    let files = read_tree(&fixture_dir());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bundle.tar.gz");
    let whole = tar_gz(&files, "");
    std::fs::write(&path, &whole[..whole.len() / 2]).unwrap();
    let message = Bundle::load(&path).unwrap_err().to_string();
    assert!(message.contains("bundle.tar.gz"), "{message}");

    let mut hostile = files.clone();
    hostile.insert("../escape.txt".into(), b"x".to_vec());
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default()));
    for (name, bytes) in &hostile {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        // set_path refuses "..", so write the name into the raw header.
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_cksum();
        builder.append(&header, bytes.as_slice()).unwrap();
    }
    std::fs::write(&path, builder.into_inner().unwrap().finish().unwrap()).unwrap();
    let message = Bundle::load(&path).unwrap_err().to_string();
    assert!(message.contains("unsafe path"), "{message}");
    assert!(!dir.path().join("../escape.txt").exists());
}

#[test]
fn the_newest_production_bundle_wins_over_fixtures() {
    let root = tempfile::tempdir().unwrap();
    let pristine = read_tree(&fixture_dir());
    let place = |name: &str, version: &str, purpose: &str| {
        let mut files = pristine.clone();
        let manifest: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
        let mut manifest = manifest;
        manifest["name"] = name.into();
        manifest["version"] = version.into();
        manifest["purpose"] = purpose.into();
        reseal(&mut files, manifest);
        let dir = root.path().join(name).join(version);
        write_tree(&dir, &files);
        dir
    };
    place("fixture-cnn", "9.0.0", "fixture");
    place("pillnet", "1.2.0", "production");
    let newest = place("pillnet", "1.10.0", "production");
    std::fs::create_dir_all(root.path().join("junk/0.0.1")).unwrap();
    std::fs::write(root.path().join("junk/0.0.1/manifest.json"), b"{").unwrap();
    assert_eq!(find_newest(&[root.path().to_path_buf()]), Some(newest));
    assert_eq!(find_newest(&[root.path().join("absent")]), None);
}

#[test]
fn equal_bundles_are_decided_by_root_order_then_name_not_by_listing_order() {
    let pristine = read_tree(&fixture_dir());
    let place = |root: &Path, name: &str| {
        let mut files = pristine.clone();
        let mut manifest: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
        manifest["name"] = name.into();
        reseal(&mut files, manifest);
        let dir = root.join(name).join("0.1.0");
        write_tree(&dir, &files);
        dir
    };
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Several same-version fixtures, created out of name order: the listing order of a
    // directory is the file system's business, the choice must not follow it.
    for name in ["fixture-pills", "fixture-zeta", "fixture-cnn", "fixture-pills-b", "fixture-dots"] {
        place(first.path(), name);
    }
    let in_second = place(second.path(), "fixture-aaa");
    let roots = [first.path().to_path_buf(), second.path().to_path_buf()];
    assert_eq!(find_newest(&roots), Some(first.path().join("fixture-cnn/0.1.0")));
    assert_eq!(find_newest(&[second.path().to_path_buf(), first.path().to_path_buf()]), Some(in_second));
}
