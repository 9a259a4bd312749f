//! The CPU engine: tract running the float graph derived from the bundle's
//! int8 QDQ artifact (see [`super::f32_graph`]), the graph the GPU engine
//! runs too.
//!
//! Why not the int8 graph as shipped: tract runs a QDQ graph by requantising
//! every activation, and on the shipped pill model that is 1.4× slower than
//! the same graph in float on this project's 2-core machine (4.03 against
//! 2.93 ms p50 with 2 threads, release build; the engines benchmark prints
//! both), while ONNX Runtime runs the int8 form faster still.
//! The int8 artifact stays what travels and is signed; the derivation is
//! checked like any engine, by the bundle's self-test against ONNX Runtime's
//! outputs within the bundle's tolerance (which drops only the activations'
//! rounding to the int8 grid). [`TractEngine::prepare_onnx`] runs any graph
//! as it is (the benchmarks time the int8 graph with it).
//!
//! The graph is loaded with the input shape made concrete (`1×3×H×W`),
//! optimised once, and run by a plan whose state is kept between calls so
//! that tract reuses its buffers; matrix products run on a private rayon pool
//! of the configured size (tract's `multithread-mm`). The input tensor is kept
//! too and refilled in place, so a call allocates only its output.

use std::sync::{Arc, Mutex};

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::TValue;

use super::{f32_graph, Engine, EngineError, EngineKind};
use crate::bundle::Bundle;

/// The pinned tract version (see `models/Cargo.toml`).
const TRACT_VERSION: &str = "0.23.9";

type Plan = TypedSimplePlan;
type State = TypedSimpleState;

/// tract on the CPU.
#[derive(Debug)]
pub struct TractEngine {
    threads: usize,
    /// Which graph runs, in words (for `describe`).
    graph: &'static str,
    input_len: usize,
    output_name: String,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// Reused input tensor; uniquely owned again once tract is done with it.
    input: Arc<Tensor>,
}

impl TractEngine {
    /// Prepares the float graph derived from the bundle's artifact for
    /// `threads` CPU threads (1 = single-threaded).
    pub fn prepare(bundle: &Bundle, threads: usize) -> Result<TractEngine, EngineError> {
        let spec = &bundle.manifest.input;
        let shape = [1, 3, spec.height as usize, spec.width as usize];
        let derived = f32_graph::derive(bundle.model_bytes(), &spec.name, shape)
            .map_err(|e| EngineError::Prepare { engine: EngineKind::Cpu, reason: e.to_string() })?;
        let mut engine = Self::prepare_onnx(&derived.to_bytes(), shape, &bundle.manifest.output.name, threads)?;
        engine.graph = "float graph derived from the int8 artifact";
        Ok(engine)
    }

    /// Prepares any single-input ONNX graph taking an f32 tensor of `shape`
    /// and reading `output_name` (the derived float graph, benchmark models).
    pub fn prepare_onnx(
        onnx: &[u8],
        shape: [usize; 4],
        output_name: &str,
        threads: usize,
    ) -> Result<TractEngine, EngineError> {
        let prepare_err = |e: TractError| EngineError::Prepare { engine: EngineKind::Cpu, reason: format!("{e:#}") };
        let output_name = output_name.to_string();
        let model = tract_onnx::onnx()
            .model_for_read(&mut &*onnx)
            .and_then(|m| m.with_input_fact(0, f32::fact(shape).into()))
            .and_then(|mut m| {
                m.select_outputs_by_name([output_name.as_str()])?;
                Ok(m)
            })
            .and_then(|m| m.into_optimized())
            .map_err(prepare_err)?;
        let options =
            RunOptions { executor: (threads > 1).then(|| tract_linalg_executor(threads)), ..RunOptions::default() };
        let plan: Arc<Plan> = model.into_runnable_with_options(&options).map_err(prepare_err)?;
        let state = plan.spawn().map_err(prepare_err)?;
        let input = Arc::new(Tensor::zero::<f32>(&shape).map_err(prepare_err)?);
        Ok(TractEngine {
            threads: threads.max(1),
            graph: "graph as given",
            input_len: shape.iter().product(),
            output_name,
            inner: Mutex::new(Inner { state, input }),
        })
    }

    /// Number of `f32` in one input tensor.
    pub fn input_len(&self) -> usize {
        self.input_len
    }
}

fn tract_linalg_executor(threads: usize) -> tract_linalg::multithread::Executor {
    tract_linalg::multithread::Executor::multithread_with_name(threads, "rxv-tract")
}

impl Engine for TractEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Cpu
    }

    fn describe(&self) -> String {
        format!("tract {TRACT_VERSION} on CPU, {} thread(s), {}", self.threads, self.graph)
    }

    fn run(&self, input: &[f32]) -> Result<Vec<f32>, EngineError> {
        if input.len() != self.input_len {
            return Err(EngineError::BadInput { expected: self.input_len, got: input.len() });
        }
        let run_err = |e: TractError| EngineError::Run { engine: EngineKind::Cpu, reason: format!("{e:#}") };
        let mut guard = self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let inner = &mut *guard;
        match Arc::get_mut(&mut inner.input) {
            Some(tensor) => tensor
                .try_as_plain_ram_mut()
                .and_then(|mut v| v.as_slice_mut::<f32>().map(|s| s.copy_from_slice(input)))
                .map_err(run_err)?,
            None => {
                let shape: Vec<usize> = inner.input.shape().to_vec();
                inner.input = Arc::new(Tensor::from_shape(&shape, input).map_err(run_err)?);
            }
        }
        let outputs = inner.state.run(tvec![TValue::from_const(inner.input.clone())]).map_err(run_err)?;
        let output = outputs.into_iter().next().ok_or_else(|| EngineError::Run {
            engine: EngineKind::Cpu,
            reason: format!("graph produced no output {:?}", self.output_name),
        })?;
        let view = output.try_as_plain_ram().map_err(run_err)?;
        Ok(view.as_slice::<f32>().map_err(run_err)?.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_input_tensor_is_reused_between_calls() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bundles/fixture-cnn/0.1.0");
        let bundle = Bundle::load(&dir).unwrap();
        let engine = TractEngine::prepare(&bundle, 1).unwrap();
        let input = vec![0.25f32; engine.input_len()];
        let first = engine.run(&input).unwrap();
        let before = Arc::as_ptr(&engine.inner.lock().unwrap().input);
        let second = engine.run(&input).unwrap();
        let inner = engine.inner.lock().unwrap();
        assert_eq!(Arc::strong_count(&inner.input), 1, "tract kept a reference to the input");
        assert_eq!(Arc::as_ptr(&inner.input), before, "the input tensor was reallocated");
        assert_eq!(first, second);
    }
}
