//! The GPU engine: wonnx (WebGPU through wgpu) running the float graph
//! derived from the bundle's int8 artifact (see [`super::f32_graph`]).
//!
//! wonnx is async and its session is tied to the wgpu device it created, so
//! the session lives on one dedicated worker thread that blocks on each
//! future; callers send a job and wait for the answer with a watchdog
//! timeout. A panic inside wonnx or wgpu (wonnx panics when no adapter
//! exists) is caught on the worker and becomes an error, never a crash.
//! A job that outlives the watchdog leaves the worker busy; the caller gets
//! [`EngineError::Timeout`] and the selector stops using this engine.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::time::Duration;

use super::{f32_graph, Engine, EngineError, EngineKind};
use crate::bundle::Bundle;

/// How long compiling the graph for the GPU may take (software Vulkan is slow).
const PREPARE_TIMEOUT: Duration = Duration::from_secs(300);

/// The adapter wgpu would hand to wonnx.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adapter {
    /// Adapter name as the driver reports it (e.g. `NVIDIA H100 80GB HBM3`, `llvmpipe (LLVM 15.0.6, 256 bits)`).
    pub name: String,
    /// Graphics API backend (`Vulkan`, `Metal`, …).
    pub backend: String,
    /// True for a software rasteriser such as lavapipe: correct but slower than tract.
    pub software: bool,
    /// Driver name and version, when reported.
    pub driver: String,
}

impl std::fmt::Display for Adapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}{}", self.name, self.backend, if self.software { ", software" } else { "" })?;
        if !self.driver.is_empty() {
            write!(f, ", {}", self.driver)?;
        }
        write!(f, ")")
    }
}

/// Finds the adapter wonnx will use, honouring `WGPU_BACKEND`,
/// `WGPU_ADAPTER_NAME` and `WGPU_POWER_PREF` exactly as wonnx does, or says
/// why there is none.
pub fn probe_adapter() -> Result<Adapter, String> {
    let probe = || {
        let backends = wgpu::util::backend_bits_from_env().unwrap_or(wgpu::Backends::PRIMARY);
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor { backends, dx12_shader_compiler: wgpu::Dx12Compiler::Fxc });
        let adapter = pollster::block_on(wgpu::util::initialize_adapter_from_env_or_default(&instance, backends, None));
        adapter.map(|a| {
            let info = a.get_info();
            Adapter {
                name: info.name,
                backend: format!("{:?}", info.backend),
                software: info.device_type == wgpu::DeviceType::Cpu,
                driver: [info.driver, info.driver_info]
                    .into_iter()
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join(" "),
            }
        })
    };
    match catch_unwind(probe) {
        Ok(Some(adapter)) => Ok(adapter),
        Ok(None) => Err("no WebGPU adapter found (no Vulkan driver with a usable device; install a GPU driver or mesa-vulkan-drivers)".into()),
        Err(_) => Err("probing for a WebGPU adapter panicked inside wgpu".into()),
    }
}

struct Job {
    input: Vec<f32>,
    reply: mpsc::SyncSender<Result<Vec<f32>, String>>,
}

/// wonnx on a GPU adapter.
#[derive(Debug)]
pub struct WonnxEngine {
    adapter: Adapter,
    input_len: usize,
    timeout: Duration,
    /// Closed on drop, which ends the worker's loop.
    jobs: Option<mpsc::Sender<Job>>,
    /// Signalled by the worker once its session (and GPU device) is dropped.
    finished: std::sync::Mutex<mpsc::Receiver<()>>,
}

/// How long dropping the engine waits for the worker to release the GPU.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

impl Drop for WonnxEngine {
    /// Releases the GPU session on its own thread before returning: process
    /// exit while the worker still tears the device down crashed the NVIDIA
    /// Vulkan driver (seen on an H100: SIGSEGV or `free(): invalid pointer`).
    fn drop(&mut self) {
        self.jobs.take();
        let finished = self.finished.get_mut().unwrap_or_else(|p| p.into_inner());
        if finished.recv_timeout(RELEASE_TIMEOUT).is_err() {
            tracing::warn!("the GPU worker did not release the device within {RELEASE_TIMEOUT:?} (a request is stuck)");
        }
    }
}

impl WonnxEngine {
    /// Derives the float graph, compiles it for `adapter` on a worker thread
    /// and returns once the session is ready. `timeout` bounds each request.
    pub fn prepare(bundle: &Bundle, adapter: Adapter, timeout: Duration) -> Result<WonnxEngine, EngineError> {
        let spec = &bundle.manifest.input;
        let shape = [1, 3, spec.height as usize, spec.width as usize];
        let graph = f32_graph::derive(bundle.model_bytes(), &spec.name, shape)
            .map_err(|e| EngineError::Prepare { engine: EngineKind::Gpu, reason: e.to_string() })?;
        let input_name = spec.name.clone();
        let output_name = bundle.manifest.output.name.clone();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), String>>(1);
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (finished_tx, finished) = mpsc::sync_channel::<()>(1);
        let model = graph.model;
        std::thread::Builder::new()
            .name("rxv-wonnx".into())
            .spawn(move || {
                let config = wonnx::SessionConfig::new().with_outputs(Some(vec![output_name.clone()]));
                let session = catch_unwind(AssertUnwindSafe(|| {
                    pollster::block_on(wonnx::Session::from_model_with_config(model, &config))
                }));
                let session = match session {
                    Ok(Ok(session)) => session,
                    Ok(Err(e)) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                    Err(panic) => {
                        let _ =
                            ready_tx.send(Err(format!("wonnx panicked while compiling: {}", panic_message(&panic))));
                        return;
                    }
                };
                if ready_tx.send(Ok(())).is_err() {
                    return;
                }
                for job in job_rx {
                    let result = catch_unwind(AssertUnwindSafe(|| {
                        let mut inputs = HashMap::new();
                        inputs.insert(input_name.clone(), wonnx::utils::InputTensor::F32(job.input.as_slice().into()));
                        let mut outputs = pollster::block_on(session.run(&inputs)).map_err(|e| e.to_string())?;
                        let output =
                            outputs.remove(&output_name).ok_or_else(|| format!("no output named {output_name:?}"))?;
                        Vec::<f32>::try_from(output).map_err(|e| e.to_string())
                    }))
                    .unwrap_or_else(|panic| Err(format!("wonnx panicked: {}", panic_message(&panic))));
                    let _ = job.reply.send(result);
                }
                drop(session);
                let _ = finished_tx.send(());
            })
            .map_err(|e| EngineError::Prepare {
                engine: EngineKind::Gpu,
                reason: format!("cannot start the GPU worker thread: {e}"),
            })?;
        match ready_rx.recv_timeout(PREPARE_TIMEOUT) {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => return Err(EngineError::Prepare { engine: EngineKind::Gpu, reason }),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(EngineError::Prepare {
                    engine: EngineKind::Gpu,
                    reason: format!("compiling the graph did not finish within {PREPARE_TIMEOUT:?}"),
                })
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(EngineError::Prepare {
                    engine: EngineKind::Gpu,
                    reason: "the GPU worker thread died".into(),
                })
            }
        }
        Ok(WonnxEngine {
            adapter,
            input_len: shape.iter().product(),
            timeout,
            jobs: Some(jobs),
            finished: finished.into(),
        })
    }

    /// The adapter this engine runs on.
    pub fn adapter(&self) -> &Adapter {
        &self.adapter
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl Engine for WonnxEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Gpu
    }

    fn describe(&self) -> String {
        format!("wonnx 0.5.1 on {}", self.adapter)
    }

    fn run(&self, input: &[f32]) -> Result<Vec<f32>, EngineError> {
        if input.len() != self.input_len {
            return Err(EngineError::BadInput { expected: self.input_len, got: input.len() });
        }
        let (reply, answer) = mpsc::sync_channel(1);
        let jobs = self.jobs.as_ref().expect("taken only on drop");
        jobs.send(Job { input: input.to_vec(), reply }).map_err(|_| EngineError::Run {
            engine: EngineKind::Gpu,
            reason: "the GPU worker thread is gone".into(),
        })?;
        match answer.recv_timeout(self.timeout) {
            Ok(Ok(probs)) => Ok(probs),
            Ok(Err(reason)) => Err(EngineError::Run { engine: EngineKind::Gpu, reason }),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(EngineError::Timeout { engine: EngineKind::Gpu, after: self.timeout })
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(EngineError::Run { engine: EngineKind::Gpu, reason: "the GPU worker thread died".into() })
            }
        }
    }
}
