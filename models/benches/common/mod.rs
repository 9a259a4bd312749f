//! Helpers shared by the benchmarks: timing and the ONNX Runtime peer.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The Python that runs ONNX Runtime: `$RXVISION_PYTHON` or the project's `.venv`.
pub fn reference_python() -> PathBuf {
    std::env::var_os("RXVISION_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

/// A file of `models/fixture/`, found from the workspace root, the models
/// crate, or where this benchmark was built.
pub fn fixture_file(name: &str) -> PathBuf {
    [Path::new("models/fixture").join(name), Path::new("fixture").join(name)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("fixture").join(name))
}

/// (p50, p95) of the samples.
pub fn percentiles(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    (at(0.50), at(0.95))
}

/// Runs `f` a few times to warm up, then `iters` times; (p50, p95) in ms.
pub fn time(iters: usize, mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..iters / 10 + 5 {
        f();
    }
    let samples: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    percentiles(samples)
}

/// ONNX Runtime's (p50, p95, version) on `model` with the raw f32 `input`, via `ort_bench.py`.
pub fn ort(
    python: &Path,
    model: &Path,
    input: &Path,
    width: u32,
    height: u32,
    threads: usize,
    iters: usize,
) -> Result<(f64, f64, String), String> {
    let script = fixture_file("ort_bench.py");
    let out = Command::new(python)
        .arg(script)
        .arg("--model")
        .arg(model)
        .args(["--width", &width.to_string(), "--height", &height.to_string()])
        .args(["--threads", &threads.to_string(), "--iters", &iters.to_string()])
        .arg("--input")
        .arg(input)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("failed").to_string());
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim()).map_err(|e| format!("bad output {line:?}: {e}"))?;
    Ok((
        v["p50_ms"].as_f64().unwrap_or(f64::NAN),
        v["p95_ms"].as_f64().unwrap_or(f64::NAN),
        v["version"].as_str().unwrap_or("?").to_string(),
    ))
}
