//! Both engines against ONNX Runtime's outputs, selection and fallback.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rxvision_models::bundle::Bundle;
use rxvision_models::engine::{
    probe_adapter, Engine, EngineError, EngineKind, EngineOptions, EnginePreference, Engines, TractEngine, WonnxEngine,
};
use rxvision_models::preprocess::Preprocessor;
use rxvision_models::selftest;

use crate::support::fixture;

/// The GPU adapter (software Vulkan counts), or a printed reason.
fn adapter_or_skip() -> Option<rxvision_models::engine::Adapter> {
    match probe_adapter() {
        Ok(adapter) => Some(adapter),
        Err(why) => {
            if std::env::var("RXVISION_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("no GPU adapter: {why}");
            }
            eprintln!("SKIPPED: GPU engine test: {why}");
            None
        }
    }
}

fn assert_parity(engine: &dyn Engine) {
    let bundle = fixture();
    let report = selftest::run(&bundle, engine).expect("self-test runs");
    print!("{}", report.table());
    assert!(report.passed(), "{}", report.failure_summary());
    assert_eq!(report.cases.len(), bundle.selftest.cases.len());
    for (case, expected) in report.cases.iter().zip(&bundle.selftest.cases) {
        assert_eq!(case.top1, expected.top1, "{}", case.image);
        assert_eq!(case.top1, expected.label_index, "{}", case.image);
    }
}

#[test]
fn tract_matches_onnx_runtime_single_and_multi_threaded() {
    let bundle = fixture();
    for threads in [1, 2] {
        assert_parity(&TractEngine::prepare(&bundle, threads).unwrap());
    }
}

#[test]
fn wonnx_matches_onnx_runtime() {
    let Some(adapter) = adapter_or_skip() else { return };
    let bundle = fixture();
    let engine = WonnxEngine::prepare(&bundle, adapter, Duration::from_secs(30)).unwrap();
    assert_parity(&engine);
}

/// Every bundle committed under `models/bundles/` (the shipped pill model
/// and the fixtures) reproduces ONNX Runtime's self-test outputs on both
/// engines, so a bundle that stops loading or drifts from its reference
/// fails here rather than at a counter.
#[test]
fn every_committed_bundle_passes_its_selftest_on_both_engines() {
    fn sorted_dirs(dir: &Path) -> Vec<PathBuf> {
        let mut dirs: Vec<_> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
        dirs.sort();
        dirs
    }
    let adapter = adapter_or_skip();
    let mut checked = Vec::new();
    for name in sorted_dirs(&Path::new(env!("CARGO_MANIFEST_DIR")).join("bundles")) {
        for dir in sorted_dirs(&name) {
            let bundle = Bundle::load(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            let mut engines: Vec<Box<dyn Engine>> = vec![Box::new(TractEngine::prepare(&bundle, 2).unwrap())];
            if let Some(adapter) = &adapter {
                // lavapipe compiles shaders on the first request: a wide watchdog.
                engines
                    .push(Box::new(WonnxEngine::prepare(&bundle, adapter.clone(), Duration::from_secs(120)).unwrap()));
            }
            for engine in &engines {
                let report = selftest::run(&bundle, engine.as_ref()).expect("self-test runs");
                println!("{} on {}:\n{}", dir.display(), engine.describe(), report.table());
                assert!(report.passed(), "{} on {}: {}", dir.display(), engine.describe(), report.failure_summary());
                assert_eq!(report.cases.len(), bundle.selftest.cases.len());
            }
            checked.push(format!("{}/{}", bundle.manifest.name, bundle.manifest.version));
        }
    }
    assert!(checked.iter().any(|b| b.starts_with("pillnet/")), "no shipped pill model among {checked:?}");
    assert!(checked.iter().any(|b| b.starts_with("fixture-cnn/")), "{checked:?}");
}

#[test]
fn the_derived_float_graph_matches_onnx_runtime_on_the_cpu_too() {
    // Separates "the derivation is right" from "wonnx computes right".
    let bundle = fixture();
    let spec = &bundle.manifest.input;
    let graph = rxvision_models::engine::f32_graph::derive(
        bundle.model_bytes(),
        &spec.name,
        [1, 3, spec.height as usize, spec.width as usize],
    )
    .unwrap();
    let ops: Vec<&str> = graph.model.get_graph().get_node().iter().map(|n| n.get_op_type()).collect();
    assert!(!ops.iter().any(|op| op.contains("Quantize")), "{ops:?}");
    assert!(graph.model.get_graph().get_node().iter().all(|n| !n.get_name().is_empty()));
    assert!(graph
        .model
        .get_graph()
        .get_node()
        .iter()
        .filter(|n| n.get_op_type() == "Conv")
        .all(|n| n.get_attribute().iter().any(|a| a.get_name() == "kernel_shape")));
    assert_parity(
        &TractEngine::prepare_onnx(&graph.to_bytes(), [1, 3, spec.height as usize, spec.width as usize], "probs", 1)
            .unwrap(),
    );
}

#[test]
fn cpu_preference_never_touches_the_gpu() {
    let bundle = fixture();
    let engines =
        Engines::select(&bundle, EngineOptions { preference: EnginePreference::Cpu, ..EngineOptions::default() })
            .unwrap();
    assert_eq!(engines.active(), EngineKind::Cpu);
    assert!(engines.gpu().is_none());
    assert!(engines.choice().starts_with("cpu: requested"), "{}", engines.choice());
}

#[test]
fn auto_says_which_engine_and_why() {
    let bundle = fixture();
    let engines = Engines::select(&bundle, EngineOptions::default()).unwrap();
    println!("auto chose: {}", engines.choice());
    match probe_adapter() {
        Ok(adapter) if adapter.software => {
            assert_eq!(engines.active(), EngineKind::Cpu);
            assert!(engines.choice().contains("software adapter"), "{}", engines.choice());
        }
        Ok(_) => assert_eq!(engines.active(), EngineKind::Gpu, "{}", engines.choice()),
        Err(why) => {
            assert_eq!(engines.active(), EngineKind::Cpu);
            assert!(engines.choice().contains(&why), "{}", engines.choice());
        }
    }
}

fn one_input() -> Vec<f32> {
    let bundle = fixture();
    let mut p = Preprocessor::new(&bundle.manifest.input);
    let mut input = vec![0.0; p.tensor_len()];
    p.preprocess_bytes(bundle.selftest_image(&bundle.selftest.cases[0]).unwrap(), &mut input).unwrap();
    input
}

#[test]
fn a_gpu_watchdog_timeout_falls_back_to_the_cpu_without_failing_the_request() {
    let Some(adapter) = adapter_or_skip() else { return };
    let bundle = fixture();
    // A real wonnx engine whose watchdog is far shorter than any GPU round trip.
    let gpu = WonnxEngine::prepare(&bundle, adapter, Duration::from_nanos(1)).unwrap();
    let engines = Engines::from_parts(TractEngine::prepare(&bundle, 1).unwrap(), Some(Box::new(gpu)), "test".into());
    assert_eq!(engines.active(), EngineKind::Gpu);
    let input = one_input();
    let first = engines.run(&input).unwrap();
    assert!(first.fell_back);
    assert_eq!(first.engine, EngineKind::Cpu);
    assert!(engines.gpu_degraded());
    assert_eq!(engines.fallbacks(), 1);
    assert!(engines.last_gpu_error().unwrap().contains("no answer within"));
    // Later requests go straight to the CPU and are not counted as fallbacks.
    let second = engines.run(&input).unwrap();
    assert!(!second.fell_back);
    assert_eq!(second.engine, EngineKind::Cpu);
    assert_eq!(engines.fallbacks(), 1);
    assert_eq!(first.probs, second.probs);
}

/// A GPU that fails mid-request: a fault no real adapter produces on demand.
#[derive(Debug)]
struct DeviceLost;

impl Engine for DeviceLost {
    fn kind(&self) -> EngineKind {
        EngineKind::Gpu
    }
    fn describe(&self) -> String {
        "a GPU that lost its device".into()
    }
    fn run(&self, _input: &[f32]) -> Result<Vec<f32>, EngineError> {
        Err(EngineError::Run { engine: EngineKind::Gpu, reason: "device lost".into() })
    }
}

#[test]
fn a_gpu_error_falls_back_to_the_cpu_and_is_counted() {
    let bundle = fixture();
    let cpu = TractEngine::prepare(&bundle, 1).unwrap();
    let engines = Engines::from_parts(cpu, Some(Box::new(DeviceLost)), "test".into());
    let input = one_input();
    let inference = engines.run(&input).unwrap();
    assert!(inference.fell_back);
    assert_eq!(inference.engine, EngineKind::Cpu);
    assert_eq!(engines.fallbacks(), 1);
    assert_eq!(engines.active(), EngineKind::Cpu);
    assert!(engines.last_gpu_error().unwrap().contains("device lost"));
    let (top1, _) = selftest::argmax(&inference.probs);
    assert_eq!(top1, bundle.selftest.cases[0].top1);
}

#[test]
fn a_wrongly_sized_input_is_an_error_on_both_engines() {
    let bundle = fixture();
    let cpu = TractEngine::prepare(&bundle, 1).unwrap();
    assert!(matches!(cpu.run(&[0.0; 10]), Err(EngineError::BadInput { got: 10, .. })));
    let engines = Engines::from_parts(cpu, Some(Box::new(DeviceLost)), "test".into());
    assert!(matches!(engines.run(&[0.0; 10]), Err(EngineError::BadInput { .. })));
    assert_eq!(engines.fallbacks(), 0, "a caller's mistake is not a GPU failure");
}
