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
fn per_product_match_thresholds_are_read_and_checked() {
    let mut files = read_tree(&fixture_dir());
    assert!(fixture().manifest.thresholds.match_confidence.is_empty(), "bundles without the field");
    let labels: Vec<serde_json::Value> = serde_json::from_slice(&files["labels.json"]).unwrap();
    let ndc = labels[1]["ndc"].as_str().unwrap().to_string();
    let set = |m: &mut serde_json::Value, key: &str, p: f64| {
        m["thresholds"]["match_confidence"] = serde_json::json!({ key: p });
    };
    let (first, second) = (ndc.clone(), ndc.clone());
    with_manifest(&mut files, move |m| set(m, &first, 0.93));
    let thresholds = load_tree(&files).unwrap().manifest.thresholds;
    assert_eq!(thresholds.to_match(&second), 0.93);
    assert_eq!(thresholds.to_match("00000-0000-00"), thresholds.min_confidence, "a product not listed");

    let pristine = read_tree(&fixture_dir());
    let mut files = pristine.clone();
    with_manifest(&mut files, move |m| set(m, &ndc, 1.5));
    let message = load_tree(&files).unwrap_err().to_string();
    assert!(message.contains("match_confidence") && message.contains("0..=1"), "{message}");
    let mut files = pristine.clone();
    with_manifest(&mut files, |m| set(m, "99999-9999-99", 0.9));
    let message = load_tree(&files).unwrap_err().to_string();
    assert!(message.contains("99999-9999-99") && message.contains("not one of the model's classes"), "{message}");
}

#[test]
fn the_crop_is_read_from_the_manifest_and_defaults_to_square() {
    use rxvision_models::bundle::PillCrop;
    assert_eq!(fixture().manifest.input.crop, PillCrop::Square, "bundles without the field");
    let mut files = read_tree(&fixture_dir());
    with_manifest(&mut files, |m| m["input"]["crop"] = "upright".into());
    assert_eq!(load_tree(&files).unwrap().manifest.input.crop, PillCrop::Upright);
}

#[test]
fn an_upright_crops_margin_is_read_and_checked() {
    let pristine = read_tree(&fixture_dir());
    assert_eq!(fixture().manifest.input.crop_margin, None, "bundles without the field: the localiser's");
    let mut files = pristine.clone();
    with_manifest(&mut files, |m| {
        m["input"]["crop"] = "upright".into();
        m["input"]["crop_margin"] = 0.1.into();
    });
    assert_eq!(load_tree(&files).unwrap().manifest.input.crop_margin, Some(0.1));

    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit); 3] = [
        ("applies only to an upright crop", |m| m["input"]["crop_margin"] = 0.1.into()),
        ("must lie in 0..=1", |m| {
            m["input"]["crop"] = "upright".into();
            m["input"]["crop_margin"] = (-0.05).into();
        }),
        ("must lie in 0..=1", |m| {
            m["input"]["crop"] = "upright".into();
            m["input"]["crop_margin"] = 1.5.into();
        }),
    ];
    for (words, edit) in cases {
        let mut files = pristine.clone();
        with_manifest(&mut files, edit);
        let message = load_tree(&files).unwrap_err().to_string();
        assert!(
            message.starts_with("manifest.json") && message.contains("input.crop_margin") && message.contains(words),
            "{words}: {message}"
        );
    }
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

/// The fixture written to a fresh directory, and the directory.
fn fixture_copy() -> (tempfile::TempDir, BTreeMap<String, Vec<u8>>) {
    let files = read_tree(&fixture_dir());
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), &files);
    (dir, files)
}

fn expect_refused(result: Result<Bundle, BundleError>, file: &str, words: &[&str]) {
    match result {
        Err(BundleError::Invalid { file: f, problem }) => {
            assert_eq!(f, file, "{problem}");
            for w in words {
                assert!(problem.contains(w), "{file}: {problem:?} lacks {w:?}");
            }
        }
        Err(other) => panic!("expected {file} to be refused ({words:?}), got: {other}"),
        Ok(_) => panic!("expected {file} to be refused ({words:?}), the bundle loaded"),
    }
}

/// Runs `load` with a FIFO at `fifo`. Should `load` open it (the fault under
/// test: opening a FIFO blocks until a writer comes), a writer thread lets
/// that open return and the test fails on its assertions instead of hanging.
fn without_hanging_on<T>(fifo: &Path, load: impl FnOnce() -> T) -> T {
    let path = fifo.to_path_buf();
    let writer = std::thread::spawn(move || drop(std::fs::OpenOptions::new().write(true).open(&path)));
    let result = load();
    // Releases the writer whether or not a reader came: on Linux, opening a
    // FIFO for reading and writing at once never blocks.
    let release = std::fs::OpenOptions::new().read(true).write(true).open(fifo).unwrap();
    writer.join().unwrap();
    drop(release);
    result
}

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo").arg(path).status().expect("run mkfifo");
    assert!(status.success(), "mkfifo {}", path.display());
}

#[test]
fn links_in_a_directory_bundle_are_refused_never_followed() {
    use std::os::unix::fs::symlink;

    // A link to an exact copy of the file: following it would load the bundle.
    let (dir, files) = fixture_copy();
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::write(elsewhere.path().join("labels.json"), &files["labels.json"]).unwrap();
    std::fs::remove_file(dir.path().join("labels.json")).unwrap();
    symlink(elsewhere.path().join("labels.json"), dir.path().join("labels.json")).unwrap();
    expect_refused(Bundle::load(dir.path()), "labels.json", &["symbolic link", "not followed"]);

    // A link to /dev/zero would feed the loader forever.
    let (dir, _) = fixture_copy();
    let image = dir.path().join("selftest/c00_white_round.png");
    std::fs::remove_file(&image).unwrap();
    symlink("/dev/zero", &image).unwrap();
    expect_refused(Bundle::load(dir.path()), "selftest/c00_white_round.png", &["symbolic link to /dev/zero"]);

    // A link to a directory holding the very same files.
    let (dir, _) = fixture_copy();
    let selftest = elsewhere.path().join("selftest");
    std::fs::rename(dir.path().join("selftest"), &selftest).unwrap();
    symlink(&selftest, dir.path().join("selftest")).unwrap();
    expect_refused(Bundle::load(dir.path()), "selftest", &["symbolic link"]);

    // The bundle path itself may be a link (`current` → a version).
    let (dir, _) = fixture_copy();
    let current = elsewhere.path().join("current");
    symlink(dir.path(), &current).unwrap();
    assert_eq!(Bundle::load(&current).unwrap().model_bytes(), fixture().model_bytes());
}

#[test]
fn fifos_sockets_and_devices_are_refused_without_being_opened() {
    // A FIFO among the files.
    let (dir, _) = fixture_copy();
    let fifo = dir.path().join("selftest/c01_yellow_oval.jpg");
    std::fs::remove_file(&fifo).unwrap();
    mkfifo(&fifo);
    let result = without_hanging_on(&fifo, || Bundle::load(dir.path()));
    expect_refused(result, "selftest/c01_yellow_oval.jpg", &["FIFO"]);

    // A socket among the files.
    let (dir, _) = fixture_copy();
    let socket = dir.path().join("MODEL_CARD.md");
    std::fs::remove_file(&socket).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    expect_refused(Bundle::load(dir.path()), "MODEL_CARD.md", &["socket"]);

    // A FIFO or a device as the bundle path.
    let elsewhere = tempfile::tempdir().unwrap();
    let fifo = elsewhere.path().join("bundle.tar.gz");
    mkfifo(&fifo);
    let result = without_hanging_on(&fifo, || Bundle::load(&fifo));
    expect_refused(result, &fifo.display().to_string(), &["FIFO", "neither a bundle directory nor a .tar.gz"]);
    expect_refused(Bundle::load(Path::new("/dev/zero")), "/dev/zero", &["character device"]);
}

#[test]
fn archive_entries_other_than_files_and_folders_are_refused_by_kind() {
    let files = read_tree(&fixture_dir());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bundle.tar.gz");
    for (kind, link, words) in [
        (tar::EntryType::Symlink, Some("/dev/zero"), "is a symbolic link"),
        (tar::EntryType::Link, Some("model.onnx"), "is a hard link"),
        (tar::EntryType::Char, None, "is a character device"),
        (tar::EntryType::Block, None, "is a block device"),
        (tar::EntryType::Fifo, None, "is a FIFO"),
    ] {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        for (name, bytes) in &files {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, bytes.as_slice()).unwrap();
        }
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_size(0);
        header.set_mode(0o644);
        if let Some(link) = link {
            header.set_link_name(link).unwrap();
        }
        header.set_path("selftest/special.png").unwrap();
        header.set_cksum();
        builder.append(&header, std::io::empty()).unwrap();
        std::fs::write(&path, builder.into_inner().unwrap().finish().unwrap()).unwrap();
        expect_refused(
            Bundle::load(&path),
            &path.display().to_string(),
            &["\"selftest/special.png\"", words, "not a regular file"],
        );
    }
}

/// A `.tar.gz` of regular files, in the order given.
fn tar_gz_in_order<'a>(entries: impl IntoIterator<Item = (String, &'a [u8])>) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for (name, bytes) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        builder.append_data(&mut header, &name, bytes).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

#[test]
fn an_archive_entry_that_appears_twice_or_outside_the_folder_is_refused() {
    let files = read_tree(&fixture_dir());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bundle.tar.gz");
    let pristine = || files.iter().map(|(k, v)| (k.clone(), v.as_slice()));

    // A second labels.json after the first: which one would count?
    let twice = pristine().chain([("labels.json".to_string(), &b"[]"[..])]);
    std::fs::write(&path, tar_gz_in_order(twice)).unwrap();
    expect_refused(Bundle::load(&path), &path.display().to_string(), &["\"labels.json\" appears twice"]);

    // A file beside the bundle's top-level folder.
    let stray =
        pristine().map(|(k, v)| (format!("fixture-cnn-0.1.0/{k}"), v)).chain([("stray.txt".to_string(), &b"x"[..])]);
    std::fs::write(&path, tar_gz_in_order(stray)).unwrap();
    expect_refused(Bundle::load(&path), &path.display().to_string(), &["\"stray.txt\" lies outside"]);
}

#[test]
fn bundles_beyond_the_total_size_and_file_size_limits_are_refused() {
    use rxvision_models::bundle::BundleLimits;

    let (dir, files) = fixture_copy();
    let archive = dir.path().with_extension("tar.gz");
    std::fs::write(&archive, tar_gz(&files, "")).unwrap();
    let total: u64 = files.values().map(|v| v.len() as u64).sum();
    let exact = BundleLimits { max_total_bytes: total, ..BundleLimits::default() };
    let under = BundleLimits { max_total_bytes: total - 1, ..BundleLimits::default() };
    let largest = files.values().map(|v| v.len() as u64).max().unwrap();
    let small_files = BundleLimits { max_file_bytes: largest - 1, ..BundleLimits::default() };
    for path in [dir.path(), archive.as_path()] {
        Bundle::load_with_limits(path, &exact).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let message = Bundle::load_with_limits(path, &under).unwrap_err().to_string();
        assert!(message.contains(&format!("past the {}-byte limit for all files together", total - 1)), "{message}");
        let message = Bundle::load_with_limits(path, &small_files).unwrap_err().to_string();
        assert!(message.contains(&format!("above the {}-byte limit", largest - 1)), "{message}");
    }
    assert_eq!(
        BundleLimits::default(),
        BundleLimits { max_file_bytes: 256 << 20, max_total_bytes: 1 << 30, max_entries: 10_000 }
    );
    let _ = std::fs::remove_file(&archive);
}

#[test]
fn bundles_with_more_than_ten_thousand_entries_are_refused() {
    use rxvision_models::bundle::MAX_ENTRIES;

    let (dir, files) = fixture_copy();
    std::fs::create_dir(dir.path().join("extra")).unwrap();
    for i in 0..MAX_ENTRIES {
        std::fs::write(dir.path().join(format!("extra/{i}")), b"").unwrap();
    }
    let whole = dir.path().display().to_string();
    expect_refused(Bundle::load(dir.path()), &whole, &["more than 10000 files and folders"]);

    let mut many = files.clone();
    for i in 0..MAX_ENTRIES {
        many.insert(format!("extra/{i}"), Vec::new());
    }
    let archive = tempfile::tempdir().unwrap();
    let path = archive.path().join("bundle.tar.gz");
    std::fs::write(&path, tar_gz(&many, "")).unwrap();
    expect_refused(Bundle::load(&path), &path.display().to_string(), &["more than 10000 files and folders"]);
}

#[test]
fn an_archive_whose_stream_outgrows_its_limits_is_cut() {
    use rxvision_models::bundle::BundleLimits;

    // A 2 MB GNU long name is no file's data, but it is streamed and kept in
    // memory by the tar reader: the decompressed stream is bounded anyway.
    let files = read_tree(&fixture_dir());
    let long = ("a/".repeat(1 << 20) + "b", &b"x"[..]);
    let entries = [long].into_iter().chain(files.iter().map(|(k, v)| (k.clone(), v.as_slice())));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bundle.tar.gz");
    std::fs::write(&path, tar_gz_in_order(entries)).unwrap();
    let limits = BundleLimits { max_total_bytes: 400_000, max_entries: 20, ..BundleLimits::default() };
    let message = Bundle::load_with_limits(&path, &limits).unwrap_err().to_string();
    assert!(message.contains("decompressed archive is larger than"), "{message}");
}

/// A candidate whose manifest is a FIFO (opening it would block) or a link
/// to /dev/zero (reading it would never end) is skipped, not opened.
#[test]
fn the_newest_bundle_search_skips_manifests_that_are_not_regular_files() {
    let root = tempfile::tempdir().unwrap();
    let files = read_tree(&fixture_dir());
    let good = root.path().join("fixture-cnn/0.1.0");
    write_tree(&good, &files);
    for (name, make) in [("pillnet/9.0.0", "fifo"), ("pillnet/9.1.0", "zero")] {
        let dir = root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let manifest = dir.join("manifest.json");
        match make {
            "fifo" => mkfifo(&manifest),
            _ => std::os::unix::fs::symlink("/dev/zero", &manifest).unwrap(),
        }
    }
    let fifo = root.path().join("pillnet/9.0.0/manifest.json");
    let found = without_hanging_on(&fifo, || find_newest(&[root.path().to_path_buf()]));
    assert_eq!(found, Some(good));
}
