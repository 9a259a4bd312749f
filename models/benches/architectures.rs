//! Which architectures tract runs fast: candidate CNNs timed in tract (int8
//! and f32, 1 and 2 threads) next to ONNX Runtime on the same files, in the
//! same run.
//!
//! `cargo bench -p rxvision-models --bench architectures [-- INDEX.json]`
//!
//! The candidates come from `models/fixture/arch_sweep.py` (random weights:
//! only speed matters); when its index is missing the script is run first.
//! The table feeds the choice of the pill model's architecture.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixture_file, ort, reference_python, time};
use rxvision_models::engine::{Engine, TractEngine};

#[derive(serde::Deserialize)]
struct Candidate {
    name: String,
    size: usize,
    macs: u64,
    params: u64,
    f32: String,
    int8: String,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let python = reference_python();
    let index = match std::env::args().skip(1).find(|a| !a.starts_with('-')) {
        Some(path) => PathBuf::from(path),
        None => {
            let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixture/build/sweep");
            let index = out.join("index.json");
            if !index.exists() {
                println!("generating the candidates with arch_sweep.py ...");
                let status =
                    Command::new(&python).arg(fixture_file("arch_sweep.py")).arg("--out").arg(&out).status()?;
                if !status.success() {
                    return Err("arch_sweep.py failed".into());
                }
            }
            index
        }
    };
    let dir = index.parent().unwrap_or(Path::new(".")).to_path_buf();
    let candidates: Vec<Candidate> = serde_json::from_slice(&std::fs::read(&index)?)?;
    let iters: usize = std::env::var("RXVISION_BENCH_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let scratch = tempfile::tempdir()?;

    println!(
        "{:<16} {:>5} {:>7} {:>7} | {:>9} {:>9} {:>9} {:>9} | {:>9} {:>9} | {:>10}",
        "model",
        "input",
        "MMAC",
        "kparam",
        "tr i8 1t",
        "tr i8 2t",
        "tr f32 1t",
        "tr f32 2t",
        "ort i8 1t",
        "ort f32 1t",
        "best/ORTi8"
    );
    for c in &candidates {
        let shape = [1, 3, c.size, c.size];
        let input: Vec<f32> = (0..3 * c.size * c.size).map(|i| ((i * 7919 % 255) as f32 / 64.0) - 2.0).collect();
        let input_path = scratch.path().join(format!("{}.f32", c.name));
        std::fs::write(&input_path, input.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())?;
        let mut tract = Vec::new();
        for (file, threads) in [(&c.int8, 1), (&c.int8, 2), (&c.f32, 1), (&c.f32, 2)] {
            let engine = TractEngine::prepare_onnx(&std::fs::read(dir.join(file))?, shape, "probs", threads)?;
            tract.push(time(iters, || {
                engine.run(&input).expect("tract runs the candidate");
            }));
        }
        let ort_ms = |file: &str| {
            ort(&python, &dir.join(file), &input_path, c.size as u32, c.size as u32, 1, iters.max(200))
                .map(|(p50, _, _)| p50)
                .unwrap_or(f64::NAN)
        };
        let (ort_int8, ort_f32) = (ort_ms(&c.int8), ort_ms(&c.f32));
        let best = tract.iter().map(|t| t.0).fold(f64::INFINITY, f64::min);
        println!(
            "{:<16} {:>5} {:>7.1} {:>7.1} | {:>9.3} {:>9.3} {:>9.3} {:>9.3} | {:>9.3} {:>9.3} | {:>9.1}x",
            c.name,
            c.size,
            c.macs as f64 / 1e6,
            c.params as f64 / 1e3,
            tract[0].0,
            tract[1].0,
            tract[2].0,
            tract[3].0,
            ort_int8,
            ort_f32,
            best / ort_int8
        );
    }
    println!(
        "(p50 in ms, batch 1; tr = tract, ort = ONNX Runtime CPUExecutionProvider; {iters} timed runs per tract cell)"
    );
    Ok(())
}
