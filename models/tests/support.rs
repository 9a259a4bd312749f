//! Shared helpers: the fixture bundle, bundle copies to corrupt, the Python reference tools.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use rxvision_models::bundle::{sha256_hex, Bundle};

/// The committed fixture bundle.
pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bundles/fixture-cnn/0.1.0")
}

pub fn fixture() -> Bundle {
    Bundle::load(&fixture_dir()).expect("the committed fixture bundle loads")
}

/// Every file of a bundle directory, by relative path.
pub fn read_tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
                files.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

/// Writes `files` as a bundle directory under `dir`.
pub fn write_tree(dir: &Path, files: &BTreeMap<String, Vec<u8>>) {
    for (name, bytes) in files {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

/// Rewrites `manifest.json` through `edit` and refreshes its checksum and the
/// hashes of every file, as a (buggy or malicious) producer would.
pub fn with_manifest(files: &mut BTreeMap<String, Vec<u8>>, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut manifest: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
    edit(&mut manifest);
    reseal(files, manifest);
}

/// Recomputes every file hash and the manifest checksum.
pub fn reseal(files: &mut BTreeMap<String, Vec<u8>>, mut manifest: serde_json::Value) {
    let hashes: serde_json::Map<String, serde_json::Value> = files
        .iter()
        .filter(|(k, _)| !k.starts_with("manifest.json"))
        .map(|(k, v)| (k.clone(), serde_json::Value::String(sha256_hex(v))))
        .collect();
    manifest["files"] = serde_json::Value::Object(hashes);
    let bytes = serde_json::to_vec_pretty(&manifest).unwrap();
    files.insert("manifest.json.sha256".into(), format!("{}  manifest.json\n", sha256_hex(&bytes)).into_bytes());
    files.insert("manifest.json".into(), bytes);
}

/// Loads `files` written to a fresh temporary directory.
pub fn load_tree(files: &BTreeMap<String, Vec<u8>>) -> Result<Bundle, rxvision_models::bundle::BundleError> {
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), files);
    Bundle::load(dir.path())
}

/// The project-local Python with Pillow, numpy and ONNX Runtime, or why there is none.
///
/// `scripts/test` creates it and sets `RXVISION_REQUIRE_REFERENCES=1`, which
/// turns a missing reference into a failure instead of a printed skip.
pub fn reference_python() -> Option<PathBuf> {
    let python = std::env::var_os("RXVISION_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
    let ok = Command::new(&python)
        .args(["-c", "import numpy, PIL, onnxruntime"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return Some(python);
    }
    let why =
        format!("no Python with numpy, Pillow and onnxruntime at {} (run scripts/setup-python)", python.display());
    if std::env::var("RXVISION_REQUIRE_REFERENCES").as_deref() == Ok("1") {
        panic!("{why}");
    }
    eprintln!("SKIPPED: {why}");
    None
}

pub fn fixture_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixture").join(name)
}
