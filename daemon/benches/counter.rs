//! Counter-path benchmark: one frame → verdict with its durable audit record,
//! on the CPU (and on the GPU engine when an adapter is present), next to a Python reference pipeline doing the same job in the
//! same run (Pillow decode and resize, numpy normalise, onnxruntime on the same
//! bundle, a durable sqlite3 insert): p50/p95 and the ratio. Also the peak
//! resident memory of this process after the run.
//!
//! `cargo bench -p rxvision-daemon --bench counter [-- BUNDLE]` (BUNDLE relative to the workspace root)
//!
//! Budget (design brief): p95 ≤ 30 ms on 2 cores; resident memory ≤ 200 MB.
//! Our path does more than the reference: it also checks quality, finds the
//! pill and crops it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use rxvision_counter::analysis::ScanRequest;
use rxvision_daemon::audit::{AuditKey, AuditLog, KeyRing};
use rxvision_daemon::scan::Scanner;
use rxvision_models::classify::Classifier;
use rxvision_models::engine::{probe_adapter, EngineOptions, EnginePreference};

fn percentiles(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[(v.len() as f64 * 0.95) as usize])
}

fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// p50/p95 of whole scans (after a warm-up) with `options`; also the frame used.
fn measure(bundle: &Path, options: EngineOptions, iters: usize) -> (PathBuf, f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let classifier = Classifier::open(Some(bundle), &[], options).unwrap();
    let case = classifier.bundle().selftest.cases[0].clone();
    let expected_ndc = classifier.bundle().labels[case.label_index].ndc.clone();
    let image_path = bundle.join(classifier.bundle().selftest_path(&case));
    let frame = std::fs::read(&image_path).unwrap();
    let audit = AuditLog::open(&dir.path().join("audit"), KeyRing::new(AuditKey::from_master(&[3; 32]))).unwrap();
    let scanner = Scanner::new(Arc::new(classifier), Arc::new(audit));
    let request =
        ScanRequest { expected_ndc: Some(expected_ndc), operator_id: "bench".into(), rx_ref: Some("RX-1".into()) };
    for _ in 0..20 {
        scanner.scan(&request, &frame).unwrap();
    }
    let wanted = if options.preference == EnginePreference::Gpu { "gpu" } else { "cpu" };
    let samples: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            let result = scanner.scan(&request, &frame).unwrap();
            assert_eq!(result.engine, wanted, "the scan ran on the engine measured (no fallback)");
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let (p50, p95) = percentiles(samples);
    (image_path, p50, p95)
}

fn main() {
    // cargo runs benches in the package directory: a relative BUNDLE is read
    // from the workspace root, where the command is typed.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bundle = workspace.join(
        std::env::args().skip(1).find(|a| !a.starts_with('-')).as_deref().unwrap_or("models/bundles/fixture-cnn/0.1.0"),
    );
    let iters: usize = std::env::var("RXVISION_BENCH_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let threads = 2;
    let cpu = EngineOptions { preference: EnginePreference::Cpu, cpu_threads: threads, ..EngineOptions::default() };
    let (image_path, cpu_p50, cpu_p95) = measure(&bundle, cpu, iters);
    let frame_len = std::fs::metadata(&image_path).map_or(0, |m| m.len());
    println!("frame {} ({frame_len} bytes), {iters} scans, CPU engine with {threads} threads", image_path.display());
    println!("{:<58} {:>8} {:>8}", "pipeline", "p50 ms", "p95 ms");
    println!(
        "{:<58} {:>8.2} {:>8.2}",
        "rxvisiond scan (quality, localise, crop, tract, verdict, audit)", cpu_p50, cpu_p95
    );
    match probe_adapter() {
        Ok(adapter) => {
            let gpu = EngineOptions { preference: EnginePreference::Gpu, ..cpu };
            let (_, p50, p95) = measure(&bundle, gpu, iters);
            let kind = if adapter.software { "software adapter" } else { "hardware adapter" };
            println!("{:<58} {:>8.2} {:>8.2}", format!("rxvisiond scan, wonnx on {} ({kind})", adapter.name), p50, p95);
        }
        Err(why) => println!("GPU engine not measured: no adapter ({why})"),
    }
    let (p50, p95) = (cpu_p50, cpu_p95);
    let python = std::env::var("RXVISION_PYTHON")
        .unwrap_or_else(|_| format!("{}/../.venv/bin/python", env!("CARGO_MANIFEST_DIR")));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/reference_counter.py");
    let out = Command::new(&python)
        .arg(script)
        .args(["--bundle", bundle.to_str().unwrap(), "--image", image_path.to_str().unwrap()])
        .args(["--iters", &iters.to_string(), "--threads", &threads.to_string()])
        .output();
    match out {
        Ok(out) if out.status.success() => {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let (r50, r95) = (v["p50_ms"].as_f64().unwrap(), v["p95_ms"].as_f64().unwrap());
            println!("{:<58} {:>8.2} {:>8.2}", "Python reference (Pillow, numpy, onnxruntime, sqlite3)", r50, r95);
            println!("ratio rxvisiond / reference: p50 {:.2}x, p95 {:.2}x", p50 / r50, p95 / r95);
        }
        Ok(out) => println!("reference not measured: {}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => println!("reference not measured: cannot run {python}: {e}"),
    }
    match peak_rss_mb() {
        Some(mb) => println!("peak resident memory of this process: {mb:.0} MB (budget 200 MB)"),
        None => println!("peak resident memory: /proc/self/status unavailable"),
    }
    println!("budget: p95 <= 30 ms on 2 cores");
}
