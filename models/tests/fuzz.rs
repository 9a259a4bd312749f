//! Fuzzing with proptest: whatever bytes arrive — an upload, a bundle, a
//! model — the parsers answer with an error, never a panic, a hang or a
//! blow-up.
//!
//! Each property starts from arbitrary bytes or from a valid input mutated
//! (bit flips, truncation, inserted and removed bytes, header fields edited
//! with their checksums fixed so the mutation reaches past them, JSON values
//! replaced). Each runs a bounded number of cases: 256 by default (fewer for
//! the costly ones), or `PROPTEST_CASES` for all of them. A failing input is
//! kept in `tests/proptest-regressions/fuzz.txt` (replayed first on every
//! run) and, once fixed, as a plain named test at the end of this file.
//!
//! Also here: malformed ONNX graphs built by hand, one per unchecked access
//! the float-graph derivation once had.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::OnceLock;

use image::ImageEncoder;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::FileFailurePersistence;
use protobuf::Message;
use rxvision_models::bundle::{sha256_hex, Bundle};
use rxvision_models::engine::f32_graph::{derive, DeriveError};
use rxvision_models::preprocess::{decode, decode_with_limits, ImageLimits, RgbImage};
use wonnx::onnx::{ModelProto, NodeProto, TensorProto, TensorProto_DataType};

use crate::support::{fixture, fixture_dir, read_tree};

/// `default_cases` cases unless `PROPTEST_CASES` says otherwise; failures
/// persisted in the committed regressions file.
fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(default_cases);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("tests/proptest-regressions/fuzz.txt"))),
        max_shrink_iters: 2048,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------- mutations

/// One edit of a byte string; positions are taken modulo its length.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, mask: u8 },
    Set { at: usize, byte: u8 },
    Truncate { keep: usize },
    Insert { at: usize, bytes: Vec<u8> },
    Remove { at: usize, len: usize },
}

/// A position, half the time within the first 64 bytes (the headers).
fn position() -> impl Strategy<Value = usize> {
    prop_oneof![0usize..64, any::<usize>()]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (position(), 1u8..).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        2 => (position(), prop_oneof![Just(0u8), Just(0xFF), Just(0x7F), Just(0x80), any::<u8>()])
            .prop_map(|(at, byte)| Mutation::Set { at, byte }),
        1 => any::<usize>().prop_map(|keep| Mutation::Truncate { keep }),
        1 => (position(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (position(), 1usize..64).prop_map(|(at, len)| Mutation::Remove { at, len }),
    ]
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..6)
}

fn apply(bytes: &mut Vec<u8>, mutations: &[Mutation]) {
    for m in mutations {
        let len = bytes.len();
        match m {
            Mutation::Flip { at, mask } if len > 0 => bytes[at % len] ^= mask,
            Mutation::Set { at, byte } if len > 0 => bytes[at % len] = *byte,
            Mutation::Truncate { keep } => bytes.truncate(keep % (len + 1)),
            Mutation::Insert { at, bytes: new } => {
                let at = at % (len + 1);
                bytes.splice(at..at, new.iter().copied());
            }
            Mutation::Remove { at, len: n } if len > 0 => {
                let at = at % len;
                bytes.drain(at..(at + n).min(len));
            }
            _ => {}
        }
    }
}

// ------------------------------------------------------------------- images

fn pattern(width: u32, height: u32) -> image::RgbImage {
    image::RgbImage::from_fn(width, height, |x, y| {
        let noise = ((x * 7919 + y * 104_729) % 23) as u8;
        if (x / 5 + y / 7) % 2 == 0 {
            image::Rgb([230 - noise, 200, (x * 255 / width) as u8])
        } else {
            image::Rgb([(y * 255 / height) as u8, 90 + noise, 60])
        }
    })
}

/// Valid images to mutate: PNGs in four pixel formats, baseline JPEGs from
/// the image crate and the fixture's (Pillow's) JPEGs.
fn image_seeds() -> &'static [Vec<u8>] {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let rgb = pattern(40, 36);
        let png = |data: &[u8], color| {
            let mut out = Vec::new();
            image::codecs::png::PngEncoder::new(&mut out).write_image(data, 40, 36, color).unwrap();
            out
        };
        let grey: Vec<u8> = rgb.pixels().map(|p| p[1]).collect();
        let rgba: Vec<u8> = rgb.pixels().flat_map(|p| [p[0], p[1], p[2], p[0] / 2]).collect();
        let rgb16: Vec<u8> = rgb.as_raw().iter().flat_map(|&v| [v, v ^ 0x5A]).collect();
        let mut seeds = vec![
            png(rgb.as_raw(), image::ExtendedColorType::Rgb8),
            png(&grey, image::ExtendedColorType::L8),
            png(&rgba, image::ExtendedColorType::Rgba8),
            png(&rgb16, image::ExtendedColorType::Rgb16),
        ];
        for quality in [40, 90] {
            let mut jpeg = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, quality).encode_image(&rgb).unwrap();
            seeds.push(jpeg);
        }
        let bundle = fixture();
        for case in bundle.selftest.cases.iter().filter(|c| c.image.ends_with(".jpg")).take(2) {
            seeds.push(bundle.selftest_image(case).unwrap().to_vec());
        }
        seeds
    })
}

/// Sets the width and height an image's header claims: a PNG's IHDR (its
/// CRC fixed, so the decoder believes it) or a JPEG's start-of-frame.
fn set_dimensions(bytes: &mut [u8], width: u32, height: u32) {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() >= 33 {
        bytes[16..20].copy_from_slice(&width.to_be_bytes());
        bytes[20..24].copy_from_slice(&height.to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.sum().to_be_bytes());
        return;
    }
    let sof = bytes.windows(2).position(|w| w[0] == 0xFF && (0xC0..=0xC2).contains(&w[1]));
    if let Some(at) = sof.filter(|at| at + 9 <= bytes.len()) {
        bytes[at + 5..at + 7].copy_from_slice(&(height as u16).to_be_bytes());
        bytes[at + 7..at + 9].copy_from_slice(&(width as u16).to_be_bytes());
    }
}

fn dimension() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..4, 30u32..34, 0u32..3000, Just(8192), Just(16_385), Just(65_535), Just(1 << 31), Just(u32::MAX)]
}

/// A decoded image must be what it says and within the limits.
fn check_decoded(result: Result<RgbImage, rxvision_models::preprocess::PreprocessError>, limits: &ImageLimits) {
    if let Ok(image) = result {
        assert_eq!(image.data.len(), image.width as usize * image.height as usize * 3);
        assert!(limits.check(image.width, image.height).is_ok(), "{}x{} decoded", image.width, image.height);
    }
}

/// Limits that keep a mutated header from asking for a large (legitimate)
/// buffer on every case; the default limits are exercised by the other
/// properties and the plain tests.
const SMALL: ImageLimits = ImageLimits { max_pixels: 4_000_000, max_side: 4096, min_side: 1 };

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(
        prefix in prop::sample::select(vec![&b""[..], b"\x89PNG\r\n\x1a\n", b"\xFF\xD8\xFF\xE0", b"\xFF\xD8\xFF\xDB"]),
        tail in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let bytes = [prefix, &tail[..]].concat();
        check_decoded(decode(&bytes), &ImageLimits::default());
    }

    #[test]
    fn decoding_mutated_images_never_panics(seed in any::<Index>(), edits in mutations()) {
        let seeds = image_seeds();
        let mut bytes = seeds[seed.index(seeds.len())].clone();
        apply(&mut bytes, &edits);
        check_decoded(decode(&bytes), &ImageLimits::default());
    }

    #[test]
    fn decoding_images_with_edited_dimensions_never_panics(
        seed in any::<Index>(),
        width in dimension(),
        height in dimension(),
        edits in prop::collection::vec(mutation(), 0..3),
    ) {
        let seeds = image_seeds();
        let mut bytes = seeds[seed.index(seeds.len())].clone();
        set_dimensions(&mut bytes, width, height);
        apply(&mut bytes, &edits);
        check_decoded(decode_with_limits(&bytes, &SMALL), &SMALL);
    }
}

// ------------------------------------------------------------------ bundles

/// The fixture bundle's files.
fn fixture_files() -> &'static BTreeMap<String, Vec<u8>> {
    static FILES: OnceLock<BTreeMap<String, Vec<u8>>> = OnceLock::new();
    FILES.get_or_init(|| read_tree(&fixture_dir()))
}

/// `files` with `manifest` as the manifest and its checksum recomputed.
fn with_manifest_bytes(files: &BTreeMap<String, Vec<u8>>, manifest: Vec<u8>) -> BTreeMap<String, Vec<u8>> {
    let mut files = files.clone();
    files.insert("manifest.json.sha256".into(), format!("{}  manifest.json\n", sha256_hex(&manifest)).into_bytes());
    files.insert("manifest.json".into(), manifest);
    files
}

/// Any JSON value, nested a little.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![Just(0.0), Just(-1.0), Just(1e300), Just(-0.0), any::<f64>()]
            .prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
        prop_oneof![Just(0i64), Just(1), Just(2), Just(-1), Just(4096), Just(4097)].prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
        prop_oneof![Just("../x"), Just("/etc/passwd"), Just("manifest.json"), Just("model.onnx"), Just("")]
            .prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Every path (object keys, array indices) in `value`, in document order.
fn json_paths(value: &serde_json::Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(prefix.clone());
    let children: Vec<(String, &serde_json::Value)> = match value {
        serde_json::Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), v)).collect(),
        serde_json::Value::Array(items) => items.iter().enumerate().map(|(i, v)| (i.to_string(), v)).collect(),
        _ => Vec::new(),
    };
    for (key, child) in children {
        prefix.push(key);
        json_paths(child, prefix, out);
        prefix.pop();
    }
}

/// Replaces (or, with `replacement` None, removes) the value at `path`.
fn json_edit(value: &mut serde_json::Value, path: &[String], replacement: Option<serde_json::Value>) {
    let Some((last, parents)) = path.split_last() else {
        if let Some(new) = replacement {
            *value = new;
        }
        return;
    };
    let mut target = value;
    for key in parents {
        target = match target {
            serde_json::Value::Object(map) => map.get_mut(key).unwrap(),
            serde_json::Value::Array(items) => &mut items[key.parse::<usize>().unwrap()],
            _ => unreachable!("paths come from the value"),
        };
    }
    match (target, replacement) {
        (serde_json::Value::Object(map), Some(new)) => {
            map.insert(last.clone(), new);
        }
        (serde_json::Value::Object(map), None) => {
            map.remove(last);
        }
        (serde_json::Value::Array(items), Some(new)) => items[last.parse::<usize>().unwrap()] = new,
        (serde_json::Value::Array(items), None) => {
            items.remove(last.parse::<usize>().unwrap());
        }
        _ => unreachable!("paths come from the value"),
    }
}

/// A JSON document edited at one of its paths.
fn edited_json(original: &[u8], at: Index, replacement: Option<serde_json::Value>) -> Vec<u8> {
    let mut value: serde_json::Value = serde_json::from_slice(original).unwrap();
    let mut paths = Vec::new();
    json_paths(&value, &mut Vec::new(), &mut paths);
    json_edit(&mut value, &paths[at.index(paths.len())], replacement);
    serde_json::to_vec_pretty(&value).unwrap()
}

/// `files` with `labels.json` replaced, its hash in the manifest updated.
fn with_labels_bytes(labels: Vec<u8>) -> BTreeMap<String, Vec<u8>> {
    let files = fixture_files();
    let mut manifest: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
    manifest["files"]["labels.json"] = sha256_hex(&labels).into();
    let mut files = with_manifest_bytes(files, serde_json::to_vec_pretty(&manifest).unwrap());
    files.insert("labels.json".into(), labels);
    files
}

fn load_files(files: BTreeMap<String, Vec<u8>>) -> Result<Bundle, rxvision_models::bundle::BundleError> {
    Bundle::from_files("fuzz".into(), files)
}

/// The fixture as an uncompressed tar (files under one folder).
fn fixture_tar() -> &'static [u8] {
    static TAR: OnceLock<Vec<u8>> = OnceLock::new();
    TAR.get_or_init(|| {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, bytes) in fixture_files() {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            builder.append_data(&mut header, format!("fixture-cnn/{name}"), bytes.as_slice()).unwrap();
        }
        builder.into_inner().unwrap()
    })
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn load_tar_gz(bytes: &[u8]) -> Result<Bundle, rxvision_models::bundle::BundleError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bundle.tar.gz");
    std::fs::write(&path, bytes).unwrap();
    Bundle::load(&path)
}

/// A mutation of a tar archive that lands in its 512-byte headers (where the
/// names, types, sizes and checksums are), with the header checksum fixed half
/// the time so the reader believes it.
#[derive(Debug, Clone)]
struct HeaderEdit {
    header: Index,
    at: usize,
    byte: u8,
    fix_checksum: bool,
}

fn header_edit() -> impl Strategy<Value = HeaderEdit> {
    (any::<Index>(), 0usize..512, any::<u8>(), any::<bool>()).prop_map(|(header, at, byte, fix_checksum)| HeaderEdit {
        header,
        at,
        byte,
        fix_checksum,
    })
}

/// Offsets of the tar headers in `tar` (walking the sizes they declare).
fn tar_headers(tar: &[u8]) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut at = 0;
    while at + 512 <= tar.len() && tar[at..at + 512].iter().any(|&b| b != 0) {
        offsets.push(at);
        let size = std::str::from_utf8(&tar[at + 124..at + 136])
            .ok()
            .and_then(|s| u64::from_str_radix(s.trim_matches(|c: char| c == '\0' || c == ' '), 8).ok())
            .unwrap_or(0) as usize;
        at += 512 + size.div_ceil(512) * 512;
    }
    offsets
}

fn apply_header_edits(tar: &mut [u8], edits: &[HeaderEdit]) {
    let headers = tar_headers(tar);
    for edit in edits {
        let start = headers[edit.header.index(headers.len())];
        tar[start + edit.at] = edit.byte;
        if edit.fix_checksum {
            let header = &mut tar[start..start + 512];
            header[148..156].fill(b' ');
            let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
            header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn manifests_of_arbitrary_bytes_are_refused_without_panicking(
        bytes in prop::collection::vec(any::<u8>(), 0..1024),
    ) {
        prop_assert!(load_files(with_manifest_bytes(fixture_files(), bytes)).is_err());
    }

    #[test]
    fn mutated_manifest_bytes_never_panic(edits in mutations()) {
        let mut manifest = fixture_files()["manifest.json"].clone();
        apply(&mut manifest, &edits);
        let _ = load_files(with_manifest_bytes(fixture_files(), manifest));
    }

    #[test]
    fn manifests_with_a_value_replaced_never_panic(
        at in any::<Index>(),
        replacement in prop::option::weighted(0.9, json_value()),
    ) {
        let manifest = edited_json(&fixture_files()["manifest.json"], at, replacement);
        let _ = load_files(with_manifest_bytes(fixture_files(), manifest));
    }

    #[test]
    fn labels_of_arbitrary_or_mutated_bytes_never_panic(
        arbitrary in prop::option::of(prop::collection::vec(any::<u8>(), 0..512)),
        edits in mutations(),
    ) {
        let labels = arbitrary.unwrap_or_else(|| {
            let mut labels = fixture_files()["labels.json"].clone();
            apply(&mut labels, &edits);
            labels
        });
        let _ = load_files(with_labels_bytes(labels));
    }

    #[test]
    fn labels_with_a_value_replaced_never_panic(
        at in any::<Index>(),
        replacement in prop::option::weighted(0.9, json_value()),
    ) {
        let labels = edited_json(&fixture_files()["labels.json"], at, replacement);
        let _ = load_files(with_labels_bytes(labels));
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn tarballs_with_mutated_headers_never_panic(edits in prop::collection::vec(header_edit(), 1..4)) {
        let mut tar = fixture_tar().to_vec();
        apply_header_edits(&mut tar, &edits);
        let _ = load_tar_gz(&gzip(&tar));
    }

    #[test]
    fn tarballs_with_mutated_bytes_never_panic(edits in mutations(), compressed in any::<bool>()) {
        let bytes = if compressed {
            let mut gz = gzip(fixture_tar());
            apply(&mut gz, &edits);
            gz
        } else {
            let mut tar = fixture_tar().to_vec();
            apply(&mut tar, &edits);
            gzip(&tar)
        };
        let _ = load_tar_gz(&bytes);
    }
}

// ---------------------------------------------------------------- f32 graph

fn fixture_model() -> ModelProto {
    ModelProto::parse_from_bytes(fixture().model_bytes()).unwrap()
}

fn input_shape() -> [usize; 4] {
    let spec = &fixture().manifest.input;
    [1, 3, spec.height as usize, spec.width as usize]
}

fn derive_model(model: &ModelProto) -> Result<(), DeriveError> {
    derive(&model.write_to_bytes().unwrap(), "image", input_shape()).map(|_| ())
}

/// A structural edit of an ONNX graph: the kind of damage a re-sealed bundle
/// can carry past the loader's checks.
#[derive(Debug, Clone)]
enum GraphEdit {
    TruncateInputs { node: Index, keep: usize },
    ClearOutputs { node: Index },
    RenameInput { node: Index, input: Index, to: Index },
    SetOpType { node: Index, op: &'static str },
    RemoveAttributes { node: Index },
    SetAxis { node: Index, axis: i64 },
    SetDims { tensor: Index, dims: Vec<i64> },
    TruncateData { tensor: Index, keep: usize },
    SetDataType { tensor: Index, data_type: i32 },
    RemoveInitializer { tensor: Index },
}

fn graph_edit() -> impl Strategy<Value = GraphEdit> {
    let index = any::<Index>;
    let ops = prop::sample::select(vec![
        "QuantizeLinear",
        "DequantizeLinear",
        "Conv",
        "Gemm",
        "Relu",
        "Flatten",
        "Softmax",
        "GlobalAveragePool",
        "Identity",
    ]);
    prop_oneof![
        (index(), 0usize..3).prop_map(|(node, keep)| GraphEdit::TruncateInputs { node, keep }),
        index().prop_map(|node| GraphEdit::ClearOutputs { node }),
        (index(), index(), index()).prop_map(|(node, input, to)| GraphEdit::RenameInput { node, input, to }),
        (index(), ops).prop_map(|(node, op)| GraphEdit::SetOpType { node, op }),
        index().prop_map(|node| GraphEdit::RemoveAttributes { node }),
        (index(), -6i64..6).prop_map(|(node, axis)| GraphEdit::SetAxis { node, axis }),
        (index(), prop::collection::vec(prop_oneof![-2i64..20, Just(i64::MAX), Just(i64::MIN)], 0..5))
            .prop_map(|(tensor, dims)| GraphEdit::SetDims { tensor, dims }),
        (index(), 0usize..64).prop_map(|(tensor, keep)| GraphEdit::TruncateData { tensor, keep }),
        (index(), 0i32..17).prop_map(|(tensor, data_type)| GraphEdit::SetDataType { tensor, data_type }),
        index().prop_map(|tensor| GraphEdit::RemoveInitializer { tensor }),
    ]
}

fn apply_graph_edit(model: &mut ModelProto, edit: &GraphEdit) {
    let graph = model.mut_graph();
    let names: Vec<String> = graph
        .get_node()
        .iter()
        .flat_map(|n| n.get_output().iter().cloned())
        .chain(graph.get_initializer().iter().map(|t| t.get_name().to_string()))
        .collect();
    let tensor_count = graph.get_initializer().len();
    fn node<'a>(graph: &'a mut wonnx::onnx::GraphProto, i: &Index) -> &'a mut NodeProto {
        let count = graph.get_node().len();
        &mut graph.mut_node()[i.index(count)]
    }
    fn tensor<'a>(graph: &'a mut wonnx::onnx::GraphProto, i: &Index) -> &'a mut TensorProto {
        let count = graph.get_initializer().len();
        &mut graph.mut_initializer()[i.index(count)]
    }
    let on_tensor = matches!(
        edit,
        GraphEdit::SetDims { .. }
            | GraphEdit::TruncateData { .. }
            | GraphEdit::SetDataType { .. }
            | GraphEdit::RemoveInitializer { .. }
    );
    if on_tensor && tensor_count == 0 {
        return;
    }
    match edit {
        GraphEdit::TruncateInputs { node: n, keep } => node(graph, n).mut_input().truncate(*keep),
        GraphEdit::ClearOutputs { node: n } => node(graph, n).mut_output().clear(),
        GraphEdit::RenameInput { node: n, input, to } => {
            let node = node(graph, n);
            let inputs = node.mut_input();
            if !inputs.is_empty() {
                let i = input.index(inputs.len());
                inputs[i] = names[to.index(names.len())].clone();
            }
        }
        GraphEdit::SetOpType { node: n, op } => node(graph, n).set_op_type(op.to_string()),
        GraphEdit::RemoveAttributes { node: n } => node(graph, n).mut_attribute().clear(),
        GraphEdit::SetAxis { node: n, axis } => {
            for attribute in node(graph, n).mut_attribute().iter_mut() {
                if attribute.get_name() == "axis" {
                    attribute.set_i(*axis);
                }
            }
        }
        GraphEdit::SetDims { tensor: t, dims } => tensor(graph, t).set_dims(dims.clone()),
        GraphEdit::TruncateData { tensor: t, keep } => {
            let tensor = tensor(graph, t);
            let mut raw = tensor.get_raw_data().to_vec();
            raw.truncate(*keep);
            tensor.set_raw_data(raw);
            tensor.mut_float_data().truncate(*keep);
            tensor.mut_int32_data().truncate(*keep);
        }
        GraphEdit::SetDataType { tensor: t, data_type } => tensor(graph, t).set_data_type(*data_type),
        GraphEdit::RemoveInitializer { tensor: t } => {
            graph.mut_initializer().remove(t.index(tensor_count));
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn deriving_the_float_graph_of_an_edited_model_never_panics(
        edits in prop::collection::vec(graph_edit(), 1..4),
    ) {
        let mut model = fixture_model();
        for edit in &edits {
            apply_graph_edit(&mut model, edit);
        }
        let _ = derive_model(&model);
    }

    #[test]
    fn deriving_the_float_graph_of_mutated_bytes_never_panics(edits in mutations()) {
        let mut bytes = fixture().model_bytes().to_vec();
        apply(&mut bytes, &edits);
        let _ = derive(&bytes, "image", input_shape());
    }
}

// ------------------------------------------- malformed graphs, one by one

fn node_mut<'a>(model: &'a mut ModelProto, op: &str, nth: usize) -> &'a mut NodeProto {
    model.mut_graph().mut_node().iter_mut().filter(|n| n.get_op_type() == op).nth(nth).expect("the fixture has it")
}

fn expect_derive_error(model: &ModelProto, words: &str) {
    match derive_model(model) {
        Err(e) => assert!(e.to_string().contains(words), "{e} lacks {words:?}"),
        Ok(()) => panic!("a malformed graph was derived ({words})"),
    }
}

#[test]
fn the_fixture_graph_derives() {
    derive_model(&fixture_model()).unwrap();
}

#[test]
fn a_quantize_linear_without_inputs_is_an_error() {
    let mut model = fixture_model();
    node_mut(&mut model, "QuantizeLinear", 0).mut_input().clear();
    expect_derive_error(&model, "has no input (input 0)");
}

#[test]
fn a_dequantize_linear_without_inputs_or_outputs_is_an_error() {
    // A constant one (weights) without inputs.
    let mut model = fixture_model();
    node_mut(&mut model, "DequantizeLinear", 0).mut_input().clear();
    expect_derive_error(&model, "neither a constant nor a QuantizeLinear output");
    // An activation one (after a QuantizeLinear) without outputs.
    let mut model = fixture_model();
    model
        .mut_graph()
        .mut_node()
        .iter_mut()
        .find(|n| n.get_op_type() == "DequantizeLinear" && n.get_input()[0].ends_with("_QuantizeLinear_Output"))
        .unwrap()
        .mut_output()
        .clear();
    expect_derive_error(&model, "has no output");
}

#[test]
fn a_conv_without_its_weight_or_with_a_flat_weight_is_an_error() {
    let mut model = fixture_model();
    node_mut(&mut model, "Conv", 0).mut_input().truncate(1);
    expect_derive_error(&model, "has no weight (input 1)");

    // The stem's weight made a flat, per-tensor quantised vector: it
    // dequantises, but has no kernel dims.
    let mut model = fixture_model();
    for t in model.mut_graph().mut_initializer().iter_mut() {
        match t.get_name() {
            "stem_W_quantized" => {
                let n = t.get_raw_data().len() as i64;
                t.set_dims(vec![n]);
            }
            "stem_W_scale" => {
                t.set_dims(vec![]);
                t.set_raw_data(0.01f32.to_le_bytes().to_vec());
                t.mut_float_data().clear();
            }
            "stem_W_zero_point" => {
                t.set_dims(vec![]);
                t.set_raw_data(vec![0]);
                t.mut_int32_data().clear();
            }
            _ => {}
        }
    }
    expect_derive_error(&model, "expected [out, in, kernel...]");
}

#[test]
fn an_initializer_with_negative_dims_or_the_wrong_data_length_is_an_error() {
    let mut model = fixture_model();
    let weight = model.mut_graph().mut_initializer().iter_mut().find(|t| t.get_name() == "head_W_quantized").unwrap();
    weight.set_dims(vec![-1, -1]);
    expect_derive_error(&model, "invalid dims");

    let mut model = fixture_model();
    let weight = model.mut_graph().mut_initializer().iter_mut().find(|t| t.get_name() == "stem_W_quantized").unwrap();
    let raw = weight.get_raw_data()[1..].to_vec();
    weight.set_raw_data(raw);
    expect_derive_error(&model, "values for dims");
}

#[test]
fn a_gemm_without_its_weight_or_with_a_short_one_is_an_error() {
    let mut model = fixture_model();
    node_mut(&mut model, "Gemm", 0).mut_input().truncate(1);
    expect_derive_error(&model, "has no weight (input 1)");

    // A float weight (no DequantizeLinear) claiming more values than it holds.
    let mut model = fixture_model();
    let mut weight = TensorProto::new();
    weight.set_name("short_weight".into());
    weight.set_data_type(TensorProto_DataType::FLOAT as i32);
    weight.set_dims(vec![64, 8]);
    weight.set_float_data(vec![0.5; 10]);
    model.mut_graph().mut_initializer().push(weight);
    node_mut(&mut model, "Gemm", 0).mut_input()[1] = "short_weight".into();
    expect_derive_error(&model, "holds 10 values for dims [64, 8]");
}

/// Two QuantizeLinear/DequantizeLinear pairs that each stand for the
/// other's input: following the renaming would never end.
#[test]
fn pairs_renaming_each_other_in_a_cycle_are_an_error() {
    let mut model = fixture_model();
    let graph = model.mut_graph();
    let mut zero = TensorProto::new();
    zero.set_name("cycle_zero".into());
    zero.set_data_type(TensorProto_DataType::INT8 as i32);
    zero.set_raw_data(vec![0]);
    graph.mut_initializer().push(zero);
    let node = |op: &str, input: &str, output: &str| {
        let mut n = NodeProto::new();
        n.set_op_type(op.into());
        n.set_input(vec![input.to_string(), "image_scale".into(), "cycle_zero".into()].into());
        n.set_output(vec![output.to_string()].into());
        n
    };
    let nodes = graph.mut_node();
    nodes.push(node("QuantizeLinear", "cycle_b", "cycle_qa"));
    nodes.push(node("DequantizeLinear", "cycle_qa", "cycle_a"));
    nodes.push(node("QuantizeLinear", "cycle_a", "cycle_qb"));
    nodes.push(node("DequantizeLinear", "cycle_qb", "cycle_b"));
    let mut relu = NodeProto::new();
    relu.set_op_type("Relu".into());
    relu.set_input(vec!["cycle_a".to_string()].into());
    relu.set_output(vec!["cycle_out".to_string()].into());
    nodes.push(relu);
    expect_derive_error(&model, "renamed in a cycle");
}

/// Found by `deriving_the_float_graph_of_an_edited_model_never_panics`: the
/// first node, a constant DequantizeLinear, without outputs.
#[test]
fn found_by_fuzzing_a_constant_dequantize_linear_without_outputs() {
    let mut model = fixture_model();
    model.mut_graph().mut_node()[0].mut_output().clear();
    expect_derive_error(&model, "has no output");
}

/// Found by `deriving_the_float_graph_of_an_edited_model_never_panics`: the
/// first node (a constant DequantizeLinear) relabelled Conv, so its "weight"
/// is a scale of one dimension.
#[test]
fn found_by_fuzzing_a_dequantize_linear_turned_into_a_conv() {
    let mut model = fixture_model();
    model.mut_graph().mut_node()[0].set_op_type("Conv".into());
    expect_derive_error(&model, "expected [out, in, kernel...]");
}

/// Found by `deriving_the_float_graph_of_an_edited_model_never_panics`: the
/// head's weight with dims [i64::MAX, 3], whose product overflows.
#[test]
fn found_by_fuzzing_dims_whose_product_overflows() {
    let mut model = fixture_model();
    let weight = model.mut_graph().mut_initializer().iter_mut().find(|t| t.get_name() == "head_W_quantized").unwrap();
    weight.set_dims(vec![i64::MAX, 3]);
    expect_derive_error(&model, "invalid dims");
}
