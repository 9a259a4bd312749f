//! Model bundles: the only unit in which a model travels.
//!
//! # Layout
//!
//! A bundle is a directory, or a `.tar.gz` of one (the archive may hold the
//! files at its root or under a single top-level folder):
//!
//! ```text
//! manifest.json          schema version, name, semver version, input spec, classes,
//!                        thresholds, provenance, metrics, SHA-256 of every other file
//! manifest.json.sha256   the manifest's own SHA-256, `sha256sum -c` format
//! model.onnx             int8 QDQ graph, static shapes, Softmax in float
//! labels.json            one entry per output class, in output order
//! profile.json           (optional) reference drift-feature and confidence distributions
//! MODEL_CARD.md          what the model is, how it was made, its limits
//! selftest/expected.json golden images with ONNX Runtime's outputs for them
//! selftest/*.png|jpg     the golden images
//! ```
//!
//! # Invariants
//!
//! * `manifest.json` matches `manifest.json.sha256`, and every file listed in
//!   the manifest's `files` is read and its SHA-256 compared on load; a file in the bundle that the manifest does not list is
//!   refused too, so nothing unverified travels with a model.
//! * The manifest agrees with the graph: input name and `[1, 3, height, width]`
//!   shape, output name and class count, and the class count of `labels.json`.
//! * A loaded [`Bundle`] holds the verified bytes in memory; nothing is re-read
//!   from disk afterwards, so a file changed after loading cannot slip in.
//! * A bundle holds regular files and folders only. In a directory bundle a
//!   symbolic link, FIFO, socket or device is refused by its own metadata
//!   (`lstat`: links are never followed, and nothing but a regular file is
//!   ever opened, so a FIFO cannot block the loader and a link to
//!   `/dev/zero` cannot feed it forever); a `.tar.gz` entry that is a
//!   symbolic or hard link, a device, a FIFO or anything but a regular file
//!   or folder is refused likewise. The bundle path itself may be a link to a
//!   directory or an archive, but must be one or the other.
//! * Sizes are bounded before anything is read into memory ([`BundleLimits`],
//!   by default): at most [`MAX_FILE_BYTES`] (256 MiB) a file,
//!   [`MAX_TOTAL_BYTES`] (1 GiB) for all files together and [`MAX_ENTRIES`]
//!   (10,000) files and folders. A directory is walked whole (sizes from
//!   `lstat`) before any file is read; an archive's entries are counted as
//!   it streams, each header's size before its data, and its decompressed
//!   stream is cut a little above the total limit (2 KiB an entry for
//!   headers and padding, plus 1 MiB), whatever its headers claim. Archive
//!   entries have safe relative paths (no `..`, no absolute part) and appear
//!   once.
//!
//! Every error names the file and the problem.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";

/// The manifest's own checksum, one line in `sha256sum` format
/// (`<hex>  manifest.json`), so that a corrupt manifest is caught even where it
/// still parses.
pub const MANIFEST_CHECKSUM: &str = "manifest.json.sha256";

/// The manifest schema version this code reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// Largest single file accepted in a bundle (a corrupt tarball must not be
/// able to exhaust memory).
pub const MAX_FILE_BYTES: u64 = 256 * 1024 * 1024;

/// Largest total size of all files of a bundle.
pub const MAX_TOTAL_BYTES: u64 = 1024 * 1024 * 1024;

/// Most entries (files and folders, archive members) a bundle may hold.
pub const MAX_ENTRIES: usize = 10_000;

/// What a bundle may hold; [`Bundle::load`] uses the default, the constants
/// above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BundleLimits {
    /// Largest single file.
    pub max_file_bytes: u64,
    /// Largest total of all files.
    pub max_total_bytes: u64,
    /// Most entries (files and folders, archive members).
    pub max_entries: usize,
}

impl Default for BundleLimits {
    fn default() -> Self {
        BundleLimits { max_file_bytes: MAX_FILE_BYTES, max_total_bytes: MAX_TOTAL_BYTES, max_entries: MAX_ENTRIES }
    }
}

impl BundleLimits {
    /// Most bytes an archive's decompressed stream may hold: the files, plus
    /// four 512-byte blocks an entry (header, extension header and its data,
    /// padding), plus 1 MiB.
    fn max_archive_stream(&self) -> u64 {
        let per_entry = 4 * 512u64;
        self.max_total_bytes.saturating_add((self.max_entries as u64).saturating_mul(per_entry)).saturating_add(1 << 20)
    }
}

/// Why a bundle could not be loaded. Every variant names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The bundle path or one of its files could not be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file or directory that failed.
        path: String,
        /// The underlying cause.
        source: std::io::Error,
    },
    /// A JSON file of the bundle is not what its schema says.
    #[error("{file}: invalid JSON: {source}")]
    Json {
        /// The bundle-relative file name.
        file: String,
        /// The parser's complaint, with line and column.
        source: serde_json::Error,
    },
    /// The manifest's schema version is not one this build understands.
    #[error("manifest.json: unsupported schema_version {found} (this build reads {SCHEMA_VERSION})")]
    UnknownSchema {
        /// The version found in the manifest.
        found: u32,
    },
    /// A file's SHA-256 does not match the manifest.
    #[error("{file}: SHA-256 mismatch (manifest.json says {expected}, the file has {actual}): the file is corrupt, truncated or altered")]
    HashMismatch {
        /// The bundle-relative file name.
        file: String,
        /// The hash recorded in the manifest.
        expected: String,
        /// The hash of the bytes found.
        actual: String,
    },
    /// A file the manifest lists is not in the bundle.
    #[error("{file}: missing from the bundle")]
    Missing {
        /// The bundle-relative file name.
        file: String,
    },
    /// The bundle holds a file the manifest does not list.
    #[error("{file}: present in the bundle but not listed in manifest.json")]
    Unlisted {
        /// The bundle-relative file name.
        file: String,
    },
    /// The manifest, labels or graph are inconsistent with each other.
    #[error("{file}: {problem}")]
    Invalid {
        /// The bundle-relative file name at fault.
        file: String,
        /// What is wrong, in words.
        problem: String,
    },
}

impl BundleError {
    fn invalid(file: &str, problem: impl Into<String>) -> Self {
        BundleError::Invalid { file: file.to_string(), problem: problem.into() }
    }
}

/// `manifest.json`: what a bundle is and how to use it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Layout version of this file; see [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Model family name, e.g. `pillnet`.
    pub name: String,
    /// Semantic version of this model; updates never go backwards without a signed order.
    pub version: semver::Version,
    /// `production` for a model meant for the counter, `fixture` for test fixtures.
    pub purpose: Purpose,
    /// When the bundle was produced (RFC 3339).
    pub created: String,
    /// One sentence for humans.
    pub description: String,
    /// File name of the ONNX graph.
    pub model: String,
    /// File name of the class list.
    pub labels: String,
    /// File name of the drift reference profile, when the trainer produced one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Number of output classes; must match the graph and `labels.json`.
    pub num_classes: usize,
    /// How to turn an image into the model input.
    pub input: InputSpec,
    /// The graph output the engines read.
    pub output: OutputSpec,
    /// Decision thresholds of the counter path.
    pub thresholds: Thresholds,
    /// Where the golden self-test lives and how close engines must be.
    pub selftest: SelftestSpec,
    /// How the model was made (free-form, for the model card and the registry).
    pub provenance: serde_json::Value,
    /// Measured quality and size (free-form numbers).
    pub metrics: serde_json::Value,
    /// SHA-256 (lowercase hex) of every file except `manifest.json`, by relative path.
    pub files: BTreeMap<String, String>,
}

/// Whether a bundle is a real model or a test fixture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Purpose {
    /// A model meant to identify pills at the counter.
    Production,
    /// A test fixture: exercises the machinery, identifies nothing real.
    Fixture,
}

/// Exactly how an image becomes the model input, precise enough to rebuild it
/// elsewhere: decode, convert to RGB, resize to `width`×`height` with
/// `resize`, then `(pixel * scale - mean[c]) / std[c]` per channel, laid out
/// as `layout`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Graph input name.
    pub name: String,
    /// Model input width in pixels.
    pub width: u32,
    /// Model input height in pixels.
    pub height: u32,
    /// Tensor layout; only `NCHW`.
    pub layout: String,
    /// Channel order; only `RGB`.
    pub color: String,
    /// Resampling filter; only `bilinear` (Pillow's `Image.resize(..., BILINEAR)`).
    pub resize: String,
    /// Multiplier applied to the 0..=255 pixel value before mean/std.
    pub scale: f32,
    /// Per-channel mean subtracted after scaling.
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by after subtracting the mean.
    pub std: [f32; 3],
    /// How the counter cuts a pill out of a camera frame before this
    /// preprocessing (absent: [`PillCrop::Square`], the first bundles' crop).
    #[serde(default, skip_serializing_if = "PillCrop::is_square")]
    pub crop: PillCrop,
    /// The room an upright crop leaves around the pill, as a fraction of the
    /// pill's length on each side (absent: the localiser's margin, 0.3, the
    /// first upright bundles' crop). A tighter crop shows the imprint with
    /// more of the model's pixels. Only with `crop: upright`; see
    /// [`check_crop_margin`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop_margin: Option<f32>,
}

/// Why `margin` cannot be the margin of a `crop` cut (`input.crop_margin`,
/// `rxvision-synth dataset --crop-margin`): only an upright crop takes one,
/// and it must lie in 0..=1.
pub fn check_crop_margin(crop: PillCrop, margin: f32) -> Result<(), String> {
    if crop != PillCrop::Upright {
        return Err("a crop margin applies only to an upright crop".into());
    }
    if !(0.0..=1.0).contains(&margin) {
        return Err(format!("crop margin {margin} must lie in 0..=1 (a fraction of the pill's length on each side)"));
    }
    Ok(())
}

/// How the counter cuts one pill out of a camera frame for the model; the
/// training crops must have been cut the same way (`rxvision-synth dataset
/// --pill-crops --crop …`). See `rxvision_counter::crop`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PillCrop {
    /// The frame's pixels in a square around the pill, as they are.
    #[default]
    Square,
    /// A square turned so that an elongated pill's long axis lies
    /// horizontal (round and regular pills are cut as `square`): the model
    /// then reads an oblong's imprint in one of two orientations, not any.
    Upright,
}

impl PillCrop {
    fn is_square(&self) -> bool {
        *self == PillCrop::Square
    }
}

impl std::str::FromStr for PillCrop {
    type Err = String;
    fn from_str(s: &str) -> Result<PillCrop, String> {
        match s {
            "square" => Ok(PillCrop::Square),
            "upright" => Ok(PillCrop::Upright),
            other => Err(format!("unknown crop {other:?} (square or upright)")),
        }
    }
}

/// The graph output engines read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// Graph output name.
    pub name: String,
    /// What the output holds; only `probabilities` (calibrated Softmax output).
    pub kind: String,
}

/// Decision thresholds shipped with the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// Below this top-1 probability the verdict is UNCERTAIN.
    pub min_confidence: f32,
    /// Below this gap between top-1 and top-2 the verdict is UNCERTAIN.
    pub min_margin: f32,
    /// Per expected product (NDC): the top-1 probability a verification
    /// needs to answer MATCH for it, in place of `min_confidence`. Calibrated
    /// against the product's look-alikes and pills that imitate it (`python
    /// -m rxvision_trainer calibrate-match`); a product not listed uses
    /// `min_confidence`. Every other decision (MISMATCH, IDENTIFIED) keeps
    /// `min_confidence`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_confidence: BTreeMap<String, f32>,
}

impl Thresholds {
    /// The thresholds without per-product MATCH thresholds.
    pub fn uniform(min_confidence: f32, min_margin: f32) -> Thresholds {
        Thresholds { min_confidence, min_margin, match_confidence: BTreeMap::new() }
    }

    /// The top-1 probability at which a scan expecting `ndc` answers MATCH.
    pub fn to_match(&self, ndc: &str) -> f32 {
        self.match_confidence.get(ndc).copied().unwrap_or(self.min_confidence)
    }
}

/// Where the self-test lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelftestSpec {
    /// Bundle-relative path of the expected-outputs file.
    pub expected: String,
    /// Largest allowed absolute difference between an engine's probability and ONNX Runtime's.
    pub tolerance: f32,
}

/// One class of `labels.json`, in output order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Label {
    /// Position in the model output.
    pub index: usize,
    /// National Drug Code (or `fixture-NN` for fixtures).
    pub ndc: String,
    /// Product name as a pharmacist knows it.
    pub name: String,
    /// Strength, e.g. `10 mg`.
    #[serde(default)]
    pub strength: String,
    /// Everything else the formulary knows (shape, colours, imprint, score, size…).
    #[serde(flatten)]
    pub attributes: serde_json::Map<String, serde_json::Value>,
}

/// `selftest/expected.json`: golden images and ONNX Runtime's outputs for them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SelftestExpected {
    /// The reference runtime and version that produced the outputs.
    pub reference: String,
    /// Allowed absolute difference per probability.
    pub tolerance: f32,
    /// One case per golden image.
    pub cases: Vec<SelftestCase>,
}

/// One golden image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SelftestCase {
    /// Bundle-relative path below `selftest/`.
    pub image: String,
    /// The class the image shows.
    pub label_index: usize,
    /// ONNX Runtime's output probabilities.
    pub probs: Vec<f32>,
    /// ONNX Runtime's top-1 class.
    pub top1: usize,
}

/// A loaded, verified bundle. All bytes are held in memory.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// Where it was loaded from (directory or archive).
    pub source: PathBuf,
    /// The parsed manifest.
    pub manifest: Manifest,
    /// The parsed class list, in output order.
    pub labels: Vec<Label>,
    /// The parsed self-test expectations.
    pub selftest: SelftestExpected,
    files: BTreeMap<String, Vec<u8>>,
}

impl fmt::Display for Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ({})", self.manifest.name, self.manifest.version, self.source.display())
    }
}

impl Bundle {
    /// Loads a bundle from a directory or a `.tar.gz`/`.tgz` archive and
    /// verifies it, within the default [`BundleLimits`].
    pub fn load(path: &Path) -> Result<Bundle, BundleError> {
        Self::load_with_limits(path, &BundleLimits::default())
    }

    /// Loads a bundle as [`Bundle::load`] does, within `limits`.
    pub fn load_with_limits(path: &Path, limits: &BundleLimits) -> Result<Bundle, BundleError> {
        // The bundle path itself may be a link (e.g. `current` → a version).
        let meta = std::fs::metadata(path).map_err(|e| io_err(path, e))?;
        let files = if meta.is_dir() {
            read_dir_files(path, limits)?
        } else if meta.is_file() {
            read_tar_gz(path, limits)?
        } else {
            return Err(BundleError::invalid(
                &path.display().to_string(),
                format!("is a {}, neither a bundle directory nor a .tar.gz", file_kind(&meta.file_type())),
            ));
        };
        Self::from_files(path.to_path_buf(), files)
    }

    /// Verifies and parses a bundle given as (relative path → bytes).
    pub fn from_files(source: PathBuf, mut files: BTreeMap<String, Vec<u8>>) -> Result<Bundle, BundleError> {
        let manifest_bytes = files.remove(MANIFEST).ok_or_else(|| BundleError::Missing { file: MANIFEST.into() })?;
        let checksum =
            files.remove(MANIFEST_CHECKSUM).ok_or_else(|| BundleError::Missing { file: MANIFEST_CHECKSUM.into() })?;
        check_manifest_checksum(&manifest_bytes, &checksum)?;
        let manifest = parse_manifest(&manifest_bytes)?;

        for (name, expected) in &manifest.files {
            let bytes = files.get(name).ok_or_else(|| BundleError::Missing { file: name.clone() })?;
            let actual = sha256_hex(bytes);
            if !actual.eq_ignore_ascii_case(expected) {
                return Err(BundleError::HashMismatch { file: name.clone(), expected: expected.clone(), actual });
            }
        }
        if let Some(extra) = files.keys().find(|k| !manifest.files.contains_key(*k)) {
            return Err(BundleError::Unlisted { file: extra.clone() });
        }
        for required in [&manifest.model, &manifest.labels, &manifest.selftest.expected] {
            if !files.contains_key(required) {
                return Err(BundleError::invalid(
                    "manifest.json",
                    format!("names {required} but does not list it in files"),
                ));
            }
        }
        if let Some(profile) = &manifest.profile {
            if !files.contains_key(profile) {
                return Err(BundleError::invalid(
                    "manifest.json",
                    format!("names {profile} but does not list it in files"),
                ));
            }
        }

        let labels: Vec<Label> = parse_json(&manifest.labels, &files[&manifest.labels])?;
        check_labels(&manifest, &labels)?;
        let selftest: SelftestExpected = parse_json(&manifest.selftest.expected, &files[&manifest.selftest.expected])?;
        check_selftest(&manifest, &selftest, &files)?;
        check_graph(&manifest, &files[&manifest.model])?;

        Ok(Bundle { source, manifest, labels, selftest, files })
    }

    /// The verified bytes of a bundle file, by relative path.
    pub fn file(&self, name: &str) -> Option<&[u8]> {
        self.files.get(name).map(Vec::as_slice)
    }

    /// The verified ONNX graph.
    pub fn model_bytes(&self) -> &[u8] {
        &self.files[&self.manifest.model]
    }

    /// The bytes of a self-test image (path relative to the self-test file's folder).
    pub fn selftest_image(&self, case: &SelftestCase) -> Option<&[u8]> {
        self.file(&self.selftest_path(case))
    }

    /// Bundle-relative path of a self-test case's image.
    pub fn selftest_path(&self, case: &SelftestCase) -> String {
        match self.manifest.selftest.expected.rsplit_once('/') {
            Some((dir, _)) => format!("{dir}/{}", case.image),
            None => case.image.clone(),
        }
    }

    /// Short identity for logs and outputs: `name@version`.
    pub fn id(&self) -> String {
        format!("{}@{}", self.manifest.name, self.manifest.version)
    }
}

fn check_manifest_checksum(manifest: &[u8], checksum: &[u8]) -> Result<(), BundleError> {
    let line = std::str::from_utf8(checksum).ok().and_then(|s| s.strip_suffix('\n')).unwrap_or_default();
    let expected = match line.split_once("  ") {
        Some((hash, MANIFEST)) if hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => hash,
        _ => {
            return Err(BundleError::invalid(
                MANIFEST_CHECKSUM,
                "is not one line `<sha256 hex>  manifest.json` (corrupt or truncated)",
            ))
        }
    };
    let actual = sha256_hex(manifest);
    if !actual.eq_ignore_ascii_case(expected) {
        return Err(BundleError::invalid(
            MANIFEST,
            format!(
                "SHA-256 is {actual} but {MANIFEST_CHECKSUM} says {expected}: manifest.json (or its checksum) is corrupt, truncated or altered"
            ),
        ));
    }
    Ok(())
}

fn parse_manifest(bytes: &[u8]) -> Result<Manifest, BundleError> {
    // Read the schema version first so that a future layout gets a clear
    // "unsupported schema" rather than a confusing field error.
    #[derive(Deserialize)]
    struct Versioned {
        schema_version: u32,
    }
    let versioned: Versioned = parse_json("manifest.json", bytes)?;
    if versioned.schema_version != SCHEMA_VERSION {
        return Err(BundleError::UnknownSchema { found: versioned.schema_version });
    }
    let manifest: Manifest = parse_json("manifest.json", bytes)?;
    let input = &manifest.input;
    let bad = |problem: String| Err(BundleError::invalid("manifest.json", problem));
    if input.layout != "NCHW" {
        return bad(format!("input.layout {:?} is not supported (only \"NCHW\")", input.layout));
    }
    if input.color != "RGB" {
        return bad(format!("input.color {:?} is not supported (only \"RGB\")", input.color));
    }
    if input.resize != "bilinear" {
        return bad(format!("input.resize {:?} is not supported (only \"bilinear\")", input.resize));
    }
    if input.width == 0 || input.height == 0 || input.width > 4096 || input.height > 4096 {
        return bad(format!("input size {}x{} is out of range 1..=4096", input.width, input.height));
    }
    if !(input.scale.is_finite() && input.scale > 0.0) {
        return bad(format!("input.scale {} must be a positive number", input.scale));
    }
    if input.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) || input.mean.iter().any(|m| !m.is_finite()) {
        return bad("input.mean must be finite and input.std positive".into());
    }
    if let Some(margin) = input.crop_margin {
        if let Err(problem) = check_crop_margin(input.crop, margin) {
            return bad(format!("input.crop_margin: {problem}"));
        }
    }
    if manifest.output.kind != "probabilities" {
        return bad(format!("output.kind {:?} is not supported (only \"probabilities\")", manifest.output.kind));
    }
    if manifest.num_classes < 2 {
        return bad(format!("num_classes {} must be at least 2", manifest.num_classes));
    }
    let t = &manifest.thresholds;
    if !(0.0..=1.0).contains(&t.min_confidence) || !(0.0..=1.0).contains(&t.min_margin) {
        return bad("thresholds must lie in 0..=1".into());
    }
    for (ndc, p) in &t.match_confidence {
        if !(0.0..=1.0).contains(p) {
            return bad(format!("thresholds.match_confidence[{ndc:?}] {p} must lie in 0..=1"));
        }
    }
    if !(manifest.selftest.tolerance > 0.0 && manifest.selftest.tolerance < 1.0) {
        return bad("selftest.tolerance must lie in (0, 1)".into());
    }
    for (name, hash) in &manifest.files {
        if !is_safe_relative(name) || name == MANIFEST || name == MANIFEST_CHECKSUM {
            return bad(format!("files lists an invalid path {name:?}"));
        }
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return bad(format!("files[{name:?}] is not a SHA-256 hex digest"));
        }
    }
    Ok(manifest)
}

fn check_labels(manifest: &Manifest, labels: &[Label]) -> Result<(), BundleError> {
    let file = &manifest.labels;
    if labels.len() != manifest.num_classes {
        return Err(BundleError::invalid(
            file,
            format!("has {} classes but manifest.json says num_classes = {}", labels.len(), manifest.num_classes),
        ));
    }
    for (i, label) in labels.iter().enumerate() {
        if label.index != i {
            return Err(BundleError::invalid(
                file,
                format!("entry {i} has index {} (entries must be in output order)", label.index),
            ));
        }
        if label.ndc.trim().is_empty() || label.name.trim().is_empty() {
            return Err(BundleError::invalid(file, format!("entry {i} has an empty ndc or name")));
        }
    }
    let mut ndcs: Vec<&str> = labels.iter().map(|l| l.ndc.as_str()).collect();
    ndcs.sort_unstable();
    if let Some(dup) = ndcs.windows(2).find(|w| w[0] == w[1]) {
        return Err(BundleError::invalid(file, format!("ndc {} appears twice", dup[0])));
    }
    if let Some(ndc) = manifest.thresholds.match_confidence.keys().find(|n| ndcs.binary_search(&n.as_str()).is_err()) {
        return Err(BundleError::invalid(
            MANIFEST,
            format!("thresholds.match_confidence names {ndc}, which is not one of the model's classes"),
        ));
    }
    Ok(())
}

fn check_selftest(
    manifest: &Manifest,
    selftest: &SelftestExpected,
    files: &BTreeMap<String, Vec<u8>>,
) -> Result<(), BundleError> {
    let file = &manifest.selftest.expected;
    if selftest.cases.is_empty() {
        return Err(BundleError::invalid(file, "has no cases"));
    }
    let dir = file.rsplit_once('/').map(|(d, _)| format!("{d}/")).unwrap_or_default();
    for case in &selftest.cases {
        let path = format!("{dir}{}", case.image);
        if !files.contains_key(&path) {
            return Err(BundleError::invalid(
                file,
                format!("case {} names an image that is not in the bundle", case.image),
            ));
        }
        if case.probs.len() != manifest.num_classes
            || case.top1 >= manifest.num_classes
            || case.label_index >= manifest.num_classes
        {
            return Err(BundleError::invalid(
                file,
                format!("case {} does not match num_classes = {}", case.image, manifest.num_classes),
            ));
        }
    }
    Ok(())
}

/// Checks input name and shape, output name and class count against the graph.
fn check_graph(manifest: &Manifest, model: &[u8]) -> Result<(), BundleError> {
    use tract_onnx::pb::type_proto::Value;
    use tract_onnx::prelude::Framework;

    let file = manifest.model.as_str();
    let proto = tract_onnx::onnx()
        .proto_model_for_read(&mut &*model)
        .map_err(|e| BundleError::invalid(file, format!("not a readable ONNX model: {e}")))?;
    let graph = proto.graph.as_ref().ok_or_else(|| BundleError::invalid(file, "has no graph"))?;
    let initializers: std::collections::HashSet<&str> = graph.initializer.iter().map(|i| i.name.as_str()).collect();
    let inputs: Vec<_> = graph.input.iter().filter(|i| !initializers.contains(i.name.as_str())).collect();
    let dims = |vi: &tract_onnx::pb::ValueInfoProto| -> Option<Vec<i64>> {
        let Some(Value::TensorType(t)) = vi.r#type.as_ref()?.value.as_ref() else { return None };
        t.shape.as_ref().map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(tract_onnx::pb::tensor_shape_proto::dimension::Value::DimValue(v)) => v,
                    _ => -1,
                })
                .collect()
        })
    };
    let [input] = inputs.as_slice() else {
        return Err(BundleError::invalid(file, format!("has {} inputs, expected exactly one", inputs.len())));
    };
    if input.name != manifest.input.name {
        return Err(BundleError::invalid(
            file,
            format!("graph input is named {:?} but manifest.json says {:?}", input.name, manifest.input.name),
        ));
    }
    let want = vec![1, 3, manifest.input.height as i64, manifest.input.width as i64];
    match dims(input) {
        Some(d) if d == want || (d.len() == 4 && d[0] <= 0 && d[1..] == want[1..]) => {}
        other => {
            return Err(BundleError::invalid(
                file,
                format!(
                    "graph input shape {other:?} does not match manifest.json's [1, 3, {}, {}]",
                    manifest.input.height, manifest.input.width
                ),
            ))
        }
    }
    let output = graph.output.iter().find(|o| o.name == manifest.output.name).ok_or_else(|| {
        BundleError::invalid(
            file,
            format!("graph has no output named {:?} (manifest.json's output.name)", manifest.output.name),
        )
    })?;
    match dims(output) {
        Some(d) if d.last() == Some(&(manifest.num_classes as i64)) => {}
        other => {
            return Err(BundleError::invalid(
                file,
                format!("graph output shape {other:?} does not end in num_classes = {}", manifest.num_classes),
            ))
        }
    }
    Ok(())
}

fn parse_json<T: serde::de::DeserializeOwned>(file: &str, bytes: &[u8]) -> Result<T, BundleError> {
    serde_json::from_slice(bytes).map_err(|source| BundleError::Json { file: file.to_string(), source })
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn io_err(path: &Path, source: std::io::Error) -> BundleError {
    BundleError::Io { path: path.display().to_string(), source }
}

/// A relative path with `/` separators, no `..`, no absolute part.
fn is_safe_relative(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && !name.contains('\\')
        && Path::new(name).components().all(|c| matches!(c, Component::Normal(_)))
}

/// What kind of file system object `kind` is, in words.
fn file_kind(kind: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_symlink() {
        "symbolic link"
    } else if kind.is_dir() {
        "directory"
    } else if kind.is_file() {
        "regular file"
    } else if kind.is_fifo() {
        "FIFO (named pipe)"
    } else if kind.is_socket() {
        "socket"
    } else if kind.is_block_device() {
        "block device"
    } else if kind.is_char_device() {
        "character device"
    } else {
        "special file"
    }
}

/// Running totals of a bundle being read, against its limits.
struct Budget<'a> {
    limits: &'a BundleLimits,
    entries: usize,
    bytes: u64,
}

impl<'a> Budget<'a> {
    fn new(limits: &'a BundleLimits) -> Self {
        Budget { limits, entries: 0, bytes: 0 }
    }

    /// Counts one more entry; `whole` names the bundle.
    fn entry(&mut self, whole: &str) -> Result<(), BundleError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(BundleError::invalid(
                whole,
                format!("holds more than {} files and folders, the limit for a bundle", self.limits.max_entries),
            ));
        }
        Ok(())
    }

    /// Counts `len` more bytes for the file `name`.
    fn bytes(&mut self, name: &str, len: u64) -> Result<(), BundleError> {
        let (max_file, max_total) = (self.limits.max_file_bytes, self.limits.max_total_bytes);
        if len > max_file {
            return Err(BundleError::invalid(name, format!("is {len} bytes, above the {max_file}-byte limit")));
        }
        self.bytes = self.bytes.saturating_add(len);
        if self.bytes > max_total {
            return Err(BundleError::invalid(
                name,
                format!("takes the bundle's files past the {max_total}-byte limit for all files together"),
            ));
        }
        Ok(())
    }
}

/// Reads a bundle directory: first the whole tree is walked with `lstat`
/// (links never followed) and checked against `limits` and for anything but
/// regular files and folders, then the files are read.
fn read_dir_files(root: &Path, limits: &BundleLimits) -> Result<BTreeMap<String, Vec<u8>>, BundleError> {
    use std::os::unix::fs::MetadataExt;

    let whole = root.display().to_string();
    let mut budget = Budget::new(limits);
    let mut found: Vec<(String, PathBuf, std::fs::Metadata)> = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| io_err(&dir, e))? {
            let entry = entry.map_err(|e| io_err(&dir, e))?;
            budget.entry(&whole)?;
            let path = entry.path();
            let Ok(rel) = path.strip_prefix(root) else {
                return Err(BundleError::invalid(&path.display().to_string(), "is not below the bundle directory"));
            };
            let name = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
            // lstat: the entry itself, never what a link points to.
            let meta = std::fs::symlink_metadata(&path).map_err(|e| io_err(&path, e))?;
            let kind = meta.file_type();
            if kind.is_dir() {
                stack.push(path);
                continue;
            }
            if !kind.is_file() {
                let target = match std::fs::read_link(&path) {
                    Ok(target) if kind.is_symlink() => format!(" to {}", target.display()),
                    _ => String::new(),
                };
                return Err(BundleError::invalid(
                    &name,
                    format!(
                        "is a {}{target}: a bundle holds only regular files and folders (links are not followed)",
                        file_kind(&kind)
                    ),
                ));
            }
            budget.bytes(&name, meta.len())?;
            found.push((name, path, meta));
        }
    }
    let mut files = BTreeMap::new();
    for (name, path, meta) in found {
        let file = std::fs::File::open(&path).map_err(|e| io_err(&path, e))?;
        // The file opened must be the one inspected (not swapped since).
        let opened = file.metadata().map_err(|e| io_err(&path, e))?;
        if !opened.is_file() || opened.dev() != meta.dev() || opened.ino() != meta.ino() {
            return Err(BundleError::invalid(&name, "changed while the bundle was being read"));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.take(meta.len().saturating_add(1)).read_to_end(&mut bytes).map_err(|e| io_err(&path, e))?;
        if bytes.len() as u64 != meta.len() {
            return Err(BundleError::invalid(&name, "changed size while the bundle was being read"));
        }
        files.insert(name, bytes);
    }
    Ok(files)
}

/// Reads at most `left` bytes of `inner`, then fails if there is more: an
/// archive's decompressed stream is bounded whatever its headers say.
struct Bounded<R> {
    inner: R,
    left: u64,
    limit: u64,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(std::io::Error::other(format!("decompressed archive is larger than {} bytes", self.limit))),
            };
        }
        let want = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let read = self.inner.read(&mut buf[..want])?;
        self.left -= read as u64;
        Ok(read)
    }
}

/// What a tar entry type is, in words.
fn tar_kind(kind: tar::EntryType) -> String {
    if kind.is_symlink() {
        "a symbolic link".into()
    } else if kind.is_hard_link() {
        "a hard link".into()
    } else if kind.is_character_special() {
        "a character device".into()
    } else if kind.is_block_special() {
        "a block device".into()
    } else if kind.is_fifo() {
        "a FIFO (named pipe)".into()
    } else {
        format!("of tar entry type {:?}", char::from(kind.as_byte()))
    }
}

fn read_tar_gz(path: &Path, limits: &BundleLimits) -> Result<BTreeMap<String, Vec<u8>>, BundleError> {
    let archive_name = path.display().to_string();
    let bad_archive =
        |e: std::io::Error| BundleError::invalid(&archive_name, format!("not a readable .tar.gz bundle: {e}"));
    let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let limit = limits.max_archive_stream();
    let stream = Bounded { inner: flate2::read::GzDecoder::new(file), left: limit, limit };
    let mut archive = tar::Archive::new(stream);
    let mut raw = BTreeMap::new();
    let mut budget = Budget::new(limits);
    for entry in archive.entries().map_err(bad_archive)? {
        let mut entry = entry.map_err(bad_archive)?;
        budget.entry(&archive_name)?;
        let kind = entry.header().entry_type();
        let name = entry.path().map_err(bad_archive)?.to_string_lossy().trim_start_matches("./").to_string();
        // Even a skipped entry's data is streamed through: count it.
        budget.bytes(&name, entry.size())?;
        if kind.is_dir() {
            continue;
        }
        if !kind.is_file() {
            return Err(BundleError::invalid(
                &archive_name,
                format!("entry {name:?} is {}, not a regular file", tar_kind(kind)),
            ));
        }
        if !is_safe_relative(&name) {
            return Err(BundleError::invalid(&archive_name, format!("entry {name:?} has an unsafe path")));
        }
        if raw.contains_key(&name) {
            return Err(BundleError::invalid(&archive_name, format!("entry {name:?} appears twice")));
        }
        // Grown as data arrives: a header's size is a claim, not a promise.
        let mut bytes = Vec::with_capacity(entry.size().min(1 << 20) as usize);
        entry.read_to_end(&mut bytes).map_err(bad_archive)?;
        raw.insert(name, bytes);
    }
    // Accept both `manifest.json` at the root and a single top-level folder.
    if raw.contains_key(MANIFEST) {
        return Ok(raw);
    }
    let prefixes: std::collections::BTreeSet<&str> =
        raw.keys().filter_map(|k| k.split_once('/').map(|(p, _)| p)).collect();
    match prefixes.into_iter().collect::<Vec<_>>().as_slice() {
        [prefix] if raw.contains_key(&format!("{prefix}/manifest.json")) => {
            let (prefix, strip) = (prefix.to_string(), format!("{prefix}/"));
            let mut files = BTreeMap::new();
            for (name, bytes) in raw {
                let Some(inner) = name.strip_prefix(&strip) else {
                    return Err(BundleError::invalid(
                        &archive_name,
                        format!("entry {name:?} lies outside the archive's top-level folder {prefix:?}"),
                    ));
                };
                files.insert(inner.to_string(), bytes);
            }
            Ok(files)
        }
        _ => Err(BundleError::Missing { file: "manifest.json".into() }),
    }
}

/// Finds the bundle to use when none is named: the newest version among the
/// bundle directories below each root (`<root>/<name>/<version>/manifest.json`),
/// preferring production bundles over fixtures. Ties (same purpose and
/// version) go to the earlier root, then to the bundle name that sorts first
/// (`fixture-cnn` before `fixture-pills`), so the choice never depends on the
/// order a directory happens to list. Unreadable candidates, and those whose
/// `manifest.json` is not a regular file (a link, a FIFO: never opened), are
/// skipped with a warning; the chosen one is loaded and verified by the caller.
pub fn find_newest(roots: &[PathBuf]) -> Option<PathBuf> {
    fn sorted_dirs(dir: &Path) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        paths
    }
    let mut best: Option<((bool, semver::Version), PathBuf)> = None;
    for root in roots {
        for name in sorted_dirs(root) {
            for dir in sorted_dirs(&name) {
                let path = dir.join(MANIFEST);
                // As in a bundle: a regular file, never a link, FIFO or device.
                let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
                if !meta.is_file() || meta.len() > MAX_FILE_BYTES {
                    tracing::warn!(
                        bundle = %dir.display(),
                        "skipping bundle: manifest.json is a {} of {} bytes, not a regular file within the limit",
                        file_kind(&meta.file_type()),
                        meta.len()
                    );
                    continue;
                }
                let Ok(bytes) = std::fs::read(&path) else { continue };
                let manifest = match parse_manifest(&bytes) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(bundle = %dir.display(), error = %e, "skipping unreadable bundle");
                        continue;
                    }
                };
                let key = (manifest.purpose == Purpose::Production, manifest.version);
                if best.as_ref().is_none_or(|(k, _)| key > *k) {
                    best = Some((key, dir));
                }
            }
        }
    }
    best.map(|(_, dir)| dir)
}
