//! Engine benchmark: tract and wonnx against ONNX Runtime on the same
//! artifact, the same input, the same machine, in the same run.
//!
//! `cargo bench -p rxvision-models --bench engines [-- BUNDLE]`
//!
//! Prints p50/p95 per engine, batch 1, and the ratio of each p50 to ONNX
//! Runtime's with the same model and thread count. Besides the shipped int8
//! graph it times the float graph the GPU engine derives, which tells how
//! much int8 costs or saves on each runtime. ONNX Runtime runs through
//! `models/fixture/ort_bench.py` in the project's virtual environment
//! (`scripts/setup-python`); without it those rows say why they are missing.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{ort, reference_python, time};

use rxvision_models::bundle::Bundle;
use rxvision_models::engine::{f32_graph, probe_adapter, Engine, TractEngine, WonnxEngine};
use rxvision_models::preprocess::Preprocessor;

struct Row {
    engine: String,
    model: &'static str,
    threads: String,
    p50_ms: f64,
    p95_ms: f64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bundle_path = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("bundles/fixture-cnn/0.1.0"));
    let iters: usize = std::env::var("RXVISION_BENCH_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let bundle = Bundle::load(&bundle_path)?;
    let spec = bundle.manifest.input.clone();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut thread_counts = vec![1, 2];
    if cores > 2 {
        thread_counts.push(cores.min(8));
    }
    println!("bundle {} ({}x{} input), {iters} timed runs per row, {cores} cores", bundle, spec.width, spec.height);

    // The counter path's first half: decode + resize + normalise one golden image.
    let case = &bundle.selftest.cases[0];
    let image = bundle.selftest_image(case).unwrap().to_vec();
    let mut preprocessor = Preprocessor::new(&spec);
    let mut input = vec![0f32; preprocessor.tensor_len()];
    let (pre50, pre95) = time(iters, || preprocessor.preprocess_bytes(&image, &mut input).unwrap());
    println!("preprocess {} (decode + resize + normalise): p50 {pre50:.3} ms, p95 {pre95:.3} ms\n", case.image);

    let dir = tempfile::tempdir()?;
    let input_path = dir.path().join("input.f32");
    std::fs::write(&input_path, input.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())?;
    let int8_path = dir.path().join("model_int8.onnx");
    std::fs::write(&int8_path, bundle.model_bytes())?;
    let derived =
        f32_graph::derive(bundle.model_bytes(), &spec.name, [1, 3, spec.height as usize, spec.width as usize])?;
    let f32_bytes = derived.to_bytes();
    let f32_path = dir.path().join("model_f32_derived.onnx");
    std::fs::write(&f32_path, &f32_bytes)?;

    let shape = [1, 3, spec.height as usize, spec.width as usize];
    let mut rows = Vec::new();
    for (model, bytes) in [("int8", bundle.model_bytes()), ("f32", f32_bytes.as_slice())] {
        for &threads in &thread_counts {
            let engine = TractEngine::prepare_onnx(bytes, shape, &bundle.manifest.output.name, threads)?;
            let (p50, p95) = time(iters, || {
                engine.run(&input).unwrap();
            });
            rows.push(Row { engine: "tract".into(), model, threads: threads.to_string(), p50_ms: p50, p95_ms: p95 });
        }
    }
    match probe_adapter() {
        Ok(adapter) => {
            let name = format!("wonnx ({}{})", adapter.name, if adapter.software { ", software" } else { "" });
            let engine = WonnxEngine::prepare(&bundle, adapter, Duration::from_secs(30))?;
            let (p50, p95) = time(iters, || {
                engine.run(&input).unwrap();
            });
            rows.push(Row { engine: name, model: "f32", threads: "gpu".into(), p50_ms: p50, p95_ms: p95 });
        }
        Err(why) => println!("wonnx: not measured: {why}"),
    }
    let python = reference_python();
    let mut ort_version = String::new();
    for (model, path) in [("int8", &int8_path), ("f32", &f32_path)] {
        for &threads in &thread_counts {
            match ort(&python, path, &input_path, spec.width, spec.height, threads, iters.max(200)) {
                Ok((p50, p95, version)) => {
                    ort_version = version;
                    rows.push(Row {
                        engine: "onnxruntime".into(),
                        model,
                        threads: threads.to_string(),
                        p50_ms: p50,
                        p95_ms: p95,
                    });
                }
                Err(why) => println!("onnxruntime {model} {threads} thread(s): not measured: {why}"),
            }
        }
    }

    println!("{:<56} {:>5} {:>7} {:>9} {:>9} {:>12}", "engine", "model", "threads", "p50 ms", "p95 ms", "p50 / ORT");
    for row in &rows {
        let peer = rows.iter().find(|r| {
            r.engine == "onnxruntime"
                && r.model == row.model
                && (r.threads == row.threads || row.threads == "gpu" && r.threads == "1")
        });
        let ratio = peer.map_or("-".to_string(), |p| format!("{:.2}x", row.p50_ms / p.p50_ms));
        println!(
            "{:<56} {:>5} {:>7} {:>9.3} {:>9.3} {:>12}",
            row.engine, row.model, row.threads, row.p50_ms, row.p95_ms, ratio
        );
    }
    if !ort_version.is_empty() {
        println!(
            "(ONNX Runtime {ort_version}, CPUExecutionProvider; the GPU row is compared with ORT on 1 CPU thread)"
        );
    }
    Ok(())
}
