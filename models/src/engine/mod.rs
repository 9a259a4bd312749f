//! Inference engines: one trait, two implementations, one selector.
//!
//! * [`TractEngine`] runs the float graph derived from the int8 QDQ artifact
//!   ([`f32_graph`]) on the CPU with tract (faster there than the int8 graph).
//! * [`WonnxEngine`] runs the same derived graph on a GPU with wonnx (WebGPU).
//!
//! Each has the same life cycle — *check* (is there an adapter? does the graph
//! derive?), *prepare* (compile once), *run* (one `1×3×H×W` input in,
//! probabilities out) — and both are held to ONNX Runtime's outputs by the
//! bundle's self-test ([`crate::selftest`]).
//!
//! [`Engines`] is what the rest of the system calls. It applies the
//! `auto | gpu | cpu` preference and, whatever was chosen, keeps the CPU
//! engine as the fallback: a GPU error or watchdog timeout on a request runs
//! that request on the CPU instead of failing it, marks the GPU degraded so
//! later requests go straight to the CPU, and is counted.

pub mod f32_graph;
mod tract_cpu;
mod wonnx_gpu;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

pub use tract_cpu::TractEngine;
pub use wonnx_gpu::{probe_adapter, Adapter, WonnxEngine};

use crate::bundle::Bundle;
use crate::selftest;

/// Which engine ran (or is meant to run) a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// tract on the CPU.
    Cpu,
    /// wonnx on a GPU.
    Gpu,
}

impl EngineKind {
    /// `cpu` or `gpu`.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Cpu => "cpu",
            EngineKind::Gpu => "gpu",
        }
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an engine could not prepare or run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No GPU adapter, or none usable.
    #[error("no usable GPU: {0}")]
    NoGpu(String),
    /// The graph could not be compiled for this engine.
    #[error("{engine} engine: cannot prepare the model: {reason}")]
    Prepare {
        /// The engine that failed.
        engine: EngineKind,
        /// Why.
        reason: String,
    },
    /// The engine failed on a request.
    #[error("{engine} engine: inference failed: {reason}")]
    Run {
        /// The engine that failed.
        engine: EngineKind,
        /// Why.
        reason: String,
    },
    /// The engine did not answer within the watchdog bound.
    #[error("{engine} engine: no answer within {after:?}")]
    Timeout {
        /// The engine that hung.
        engine: EngineKind,
        /// The watchdog bound.
        after: Duration,
    },
    /// The caller passed a tensor of the wrong size (a programming error).
    #[error("input tensor has {got} values, the model takes {expected}")]
    BadInput {
        /// What the model takes.
        expected: usize,
        /// What was passed.
        got: usize,
    },
    /// The selected engine failed the bundle's self-test.
    #[error("{engine} engine fails the bundle's self-test: {summary}")]
    SelftestFailed {
        /// The engine that failed.
        engine: EngineKind,
        /// Which cases failed and by how much.
        summary: String,
    },
}

/// An inference engine: a prepared model that maps one preprocessed input
/// tensor to class probabilities.
pub trait Engine: Send + Sync + std::fmt::Debug {
    /// CPU or GPU.
    fn kind(&self) -> EngineKind;
    /// Human description: library, version, device.
    fn describe(&self) -> String;
    /// Runs one `1×3×H×W` input; returns the model's probabilities.
    fn run(&self, input: &[f32]) -> Result<Vec<f32>, EngineError>;
}

/// Which engine to use, as configured or given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnginePreference {
    /// GPU if a hardware adapter exists and passes the self-test, else CPU.
    #[default]
    Auto,
    /// The GPU (any adapter, software ones included); an error if there is none.
    Gpu,
    /// The CPU only.
    Cpu,
}

impl std::str::FromStr for EnginePreference {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(EnginePreference::Auto),
            "gpu" => Ok(EnginePreference::Gpu),
            "cpu" => Ok(EnginePreference::Cpu),
            other => Err(format!("unknown engine {other:?} (expected auto, gpu or cpu)")),
        }
    }
}

/// How engines are chosen and run.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// `auto`, `gpu` or `cpu`.
    pub preference: EnginePreference,
    /// tract threads (matrix products); 1 runs single-threaded.
    pub cpu_threads: usize,
    /// Watchdog bound on one GPU request before it falls back to the CPU.
    pub gpu_timeout: Duration,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            preference: EnginePreference::Auto,
            cpu_threads: std::thread::available_parallelism().map_or(1, |n| n.get()).min(4),
            gpu_timeout: Duration::from_secs(2),
        }
    }
}

/// The result of one inference.
#[derive(Debug, Clone)]
pub struct Inference {
    /// Class probabilities in label order.
    pub probs: Vec<f32>,
    /// The engine that produced them.
    pub engine: EngineKind,
    /// True when the GPU failed this request and the CPU answered instead.
    pub fell_back: bool,
}

/// The engines of one bundle and the policy between them.
#[derive(Debug)]
pub struct Engines {
    cpu: TractEngine,
    gpu: Option<Box<dyn Engine>>,
    gpu_degraded: AtomicBool,
    fallbacks: AtomicU64,
    /// Why the primary engine was chosen, in words, for logs and `status`.
    choice: String,
    last_gpu_error: Mutex<Option<String>>,
}

impl Engines {
    /// Prepares the engines for `bundle` as `options` say.
    ///
    /// `cpu` prepares tract only. `gpu` requires an adapter and a passing
    /// self-test on it. `auto` tries a hardware GPU and its self-test and
    /// otherwise settles on the CPU, recording why.
    pub fn select(bundle: &Bundle, options: EngineOptions) -> Result<Engines, EngineError> {
        let cpu = TractEngine::prepare(bundle, options.cpu_threads)?;
        let (gpu, choice) = match options.preference {
            EnginePreference::Cpu => (None, format!("cpu: requested ({})", cpu.describe())),
            EnginePreference::Gpu => {
                let adapter = probe_adapter().map_err(EngineError::NoGpu)?;
                let gpu = WonnxEngine::prepare(bundle, adapter, options.gpu_timeout)?;
                check_selftest(bundle, &gpu)?;
                let choice = format!("gpu: requested, self-test passed ({})", gpu.describe());
                (Some(Box::new(gpu) as Box<dyn Engine>), choice)
            }
            EnginePreference::Auto => match auto_gpu(bundle, options) {
                Ok(gpu) => {
                    let choice = format!("gpu: adapter found and self-test passed ({})", gpu.describe());
                    (Some(Box::new(gpu) as Box<dyn Engine>), choice)
                }
                Err(reason) => (None, format!("cpu: {reason} ({})", cpu.describe())),
            },
        };
        tracing::info!(bundle = %bundle.id(), choice = %choice, "inference engine selected");
        Ok(Engines::from_parts(cpu, gpu, choice))
    }

    /// Assembles engines prepared elsewhere (the GPU one may be any [`Engine`]).
    pub fn from_parts(cpu: TractEngine, gpu: Option<Box<dyn Engine>>, choice: String) -> Engines {
        Engines {
            cpu,
            gpu,
            gpu_degraded: AtomicBool::new(false),
            fallbacks: AtomicU64::new(0),
            choice,
            last_gpu_error: Mutex::new(None),
        }
    }

    /// Runs one input on the primary engine, falling back to the CPU if the GPU fails.
    pub fn run(&self, input: &[f32]) -> Result<Inference, EngineError> {
        if input.len() != self.cpu.input_len() {
            return Err(EngineError::BadInput { expected: self.cpu.input_len(), got: input.len() });
        }
        if let Some(gpu) = self.gpu.as_ref().filter(|_| !self.gpu_degraded.load(Ordering::Acquire)) {
            match gpu.run(input) {
                Ok(probs) => return Ok(Inference { probs, engine: EngineKind::Gpu, fell_back: false }),
                Err(e) => {
                    self.gpu_degraded.store(true, Ordering::Release);
                    self.fallbacks.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "GPU engine failed; this request and later ones run on the CPU");
                    *self.last_gpu_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    let probs = self.cpu.run(input)?;
                    return Ok(Inference { probs, engine: EngineKind::Cpu, fell_back: true });
                }
            }
        }
        let probs = self.cpu.run(input)?;
        Ok(Inference { probs, engine: EngineKind::Cpu, fell_back: false })
    }

    /// The engine requests currently go to.
    pub fn active(&self) -> EngineKind {
        if self.gpu.is_some() && !self.gpu_degraded.load(Ordering::Acquire) {
            EngineKind::Gpu
        } else {
            EngineKind::Cpu
        }
    }

    /// The engine that answers requests now.
    pub fn active_engine(&self) -> &dyn Engine {
        match (&self.gpu, self.active()) {
            (Some(gpu), EngineKind::Gpu) => gpu.as_ref(),
            _ => &self.cpu,
        }
    }

    /// Prepares exactly the engine `options` ask for, without the selector's
    /// self-test for `cpu` and `gpu` (the self-test command runs it and shows
    /// its table even when it fails); `auto` selects as the service does.
    /// Returns the engine and why it was chosen.
    pub fn prepare_requested(
        bundle: &Bundle,
        options: EngineOptions,
    ) -> Result<(Box<dyn Engine>, String), EngineError> {
        Ok(match options.preference {
            EnginePreference::Cpu => {
                (Box::new(TractEngine::prepare(bundle, options.cpu_threads)?), "cpu: requested".to_string())
            }
            EnginePreference::Gpu => {
                let adapter = probe_adapter().map_err(EngineError::NoGpu)?;
                (Box::new(WonnxEngine::prepare(bundle, adapter, options.gpu_timeout)?), "gpu: requested".to_string())
            }
            EnginePreference::Auto => {
                let engines = Engines::select(bundle, options)?;
                let choice = engines.choice().to_string();
                (engines.into_active_engine(), choice)
            }
        })
    }

    /// The engine requests currently go to, taken out of the selector.
    pub fn into_active_engine(self) -> Box<dyn Engine> {
        let active = self.active();
        match (self.gpu, active) {
            (Some(gpu), EngineKind::Gpu) => gpu,
            _ => Box::new(self.cpu),
        }
    }

    /// The CPU engine (always prepared).
    pub fn cpu(&self) -> &TractEngine {
        &self.cpu
    }

    /// The GPU engine, if one was selected.
    pub fn gpu(&self) -> Option<&dyn Engine> {
        self.gpu.as_deref()
    }

    /// Why the primary engine was chosen.
    pub fn choice(&self) -> &str {
        &self.choice
    }

    /// True once a GPU failure moved requests to the CPU.
    pub fn gpu_degraded(&self) -> bool {
        self.gpu_degraded.load(Ordering::Acquire)
    }

    /// How many requests fell back from the GPU to the CPU.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// The last GPU failure, if any.
    pub fn last_gpu_error(&self) -> Option<String> {
        self.last_gpu_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn auto_gpu(bundle: &Bundle, options: EngineOptions) -> Result<WonnxEngine, String> {
    let adapter = probe_adapter()?;
    if adapter.software {
        return Err(format!("only a software adapter is present ({adapter}), which is slower than tract"));
    }
    let description = adapter.to_string();
    let gpu = WonnxEngine::prepare(bundle, adapter, options.gpu_timeout)
        .map_err(|e| format!("GPU {description} could not prepare the model: {e}"))?;
    check_selftest(bundle, &gpu).map_err(|e| format!("GPU {description} was rejected: {e}"))?;
    Ok(gpu)
}

fn check_selftest(bundle: &Bundle, engine: &dyn Engine) -> Result<(), EngineError> {
    let report = selftest::run(bundle, engine)
        .map_err(|e| EngineError::SelftestFailed { engine: engine.kind(), summary: e.to_string() })?;
    if report.passed() {
        Ok(())
    } else {
        Err(EngineError::SelftestFailed { engine: engine.kind(), summary: report.failure_summary() })
    }
}
