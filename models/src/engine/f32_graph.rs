//! Derives the f32 graph the GPU engine runs from the bundle's int8 QDQ graph.
//!
//! wonnx has no int8 kernels, so at load time the shipped artifact is turned
//! into an equivalent float graph; one artifact travels, each engine prepares
//! what it needs. The derivation:
//!
//! 1. **Dequantise constants.** A `DequantizeLinear` whose input is an
//!    initializer (int8/uint8 weights, int32 biases) becomes an f32
//!    initializer `(q - zero_point) * scale`, per tensor or per channel along
//!    `axis`.
//! 2. **Fold activation pairs.** A `QuantizeLinear` whose every consumer is a
//!    `DequantizeLinear` is removed together with them; consumers read the
//!    float tensor that was quantised. Where the quantised range starts at
//!    zero (uint8 with zero point 0) the pair also acted as a ReLU — ONNX
//!    Runtime deletes ReLUs before such pairs — so a `Relu` takes its place.
//!    Rounding to the quantisation grid and saturation at the calibrated
//!    maximum are dropped (wonnx's `Clip` prints its bounds with one decimal,
//!    too coarse to carry them), which is why parity is a tolerance, not bit
//!    equality.
//! 3. **Add what wonnx needs.** `Conv` gets `kernel_shape` from its weight,
//!    every node a unique name, and every tensor an inferred static shape
//!    (`value_info`), computed by tract's shape inference on the float graph.
//!
//! Anything else quantised (a `QLinearConv`, a lone `QuantizeLinear` feeding a
//! float op, a `Constant` node holding a scale) is refused with the node's
//! name rather than guessed at.

use std::collections::{HashMap, HashSet};

use protobuf::{Message, RepeatedField};
use wonnx::onnx::{
    AttributeProto, AttributeProto_AttributeType, ModelProto, NodeProto, TensorProto, TensorProto_DataType,
    TensorShapeProto, TensorShapeProto_Dimension, TypeProto, TypeProto_Tensor, ValueInfoProto,
};

/// Why the float graph could not be derived.
#[derive(Debug, thiserror::Error)]
pub enum DeriveError {
    /// The bytes are not an ONNX model.
    #[error("cannot parse the ONNX model: {0}")]
    Parse(String),
    /// A quantisation pattern this derivation does not handle.
    #[error("node {node:?} ({op}): {problem}")]
    Unsupported {
        /// The node's name (or its first output when unnamed).
        node: String,
        /// Its operator type.
        op: String,
        /// What is unsupported.
        problem: String,
    },
    /// tract could not infer the float graph's shapes.
    #[error("shape inference on the derived graph failed: {0}")]
    Shapes(String),
    /// The graph contradicts itself (e.g. tensors renamed in a cycle).
    #[error("malformed graph: {0}")]
    Malformed(String),
}

fn unsupported(node: &NodeProto, problem: impl Into<String>) -> DeriveError {
    let name = if node.get_name().is_empty() {
        node.get_output().first().cloned().unwrap_or_default()
    } else {
        node.get_name().to_string()
    };
    DeriveError::Unsupported { node: name, op: node.get_op_type().to_string(), problem: problem.into() }
}

/// The node's `i`-th input, which must be present and named: `what` says
/// what it is for the error.
fn input<'a>(node: &'a NodeProto, i: usize, what: &str) -> Result<&'a str, DeriveError> {
    node.get_input()
        .get(i)
        .filter(|n| !n.is_empty())
        .map(String::as_str)
        .ok_or_else(|| unsupported(node, format!("has no {what} (input {i})")))
}

/// The node's first output, which must be present and named.
fn first_output(node: &NodeProto) -> Result<&str, DeriveError> {
    node.get_output()
        .first()
        .filter(|n| !n.is_empty())
        .map(String::as_str)
        .ok_or_else(|| unsupported(node, "has no output"))
}

/// A tensor's dims as sizes, and their product, refusing negative or
/// overflowing dims.
fn tensor_dims(node: &NodeProto, tensor: &TensorProto) -> Result<(Vec<usize>, usize), DeriveError> {
    let bad = || unsupported(node, format!("tensor {:?} has invalid dims {:?}", tensor.get_name(), tensor.get_dims()));
    let dims: Vec<usize> =
        tensor.get_dims().iter().map(|&d| usize::try_from(d).map_err(|_| bad())).collect::<Result<_, _>>()?;
    let count = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(bad)?;
    Ok((dims, count))
}

/// The derived float model, ready for wonnx.
#[derive(Debug, Clone)]
pub struct F32Graph {
    /// The model, with weights dequantised and shapes annotated.
    pub model: ModelProto,
}

impl F32Graph {
    /// The model serialised as ONNX bytes (also runnable by tract or ONNX Runtime).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.model.write_to_bytes().expect("serialising an in-memory ONNX model cannot fail")
    }
}

/// Derives the float graph from int8 QDQ ONNX bytes whose single input is
/// `input_name` with shape `input_shape`.
pub fn derive(onnx: &[u8], input_name: &str, input_shape: [usize; 4]) -> Result<F32Graph, DeriveError> {
    let mut model = ModelProto::parse_from_bytes(onnx).map_err(|e| DeriveError::Parse(e.to_string()))?;
    let graph = model.mut_graph();

    let mut initializers: HashMap<String, TensorProto> =
        graph.take_initializer().into_iter().map(|t| (t.get_name().to_string(), t)).collect();
    let nodes: Vec<NodeProto> = graph.take_node().into_vec();

    // Who consumes each tensor, to know which QuantizeLinear can be folded.
    let mut consumers: HashMap<&str, Vec<&NodeProto>> = HashMap::new();
    for node in &nodes {
        for input in node.get_input() {
            consumers.entry(input.as_str()).or_default().push(node);
        }
    }
    let graph_outputs: HashSet<String> = graph.get_output().iter().map(|o| o.get_name().to_string()).collect();

    let mut renamed: HashMap<String, String> = HashMap::new();
    let mut dequantised: Vec<TensorProto> = Vec::new();
    let mut folded: HashSet<*const NodeProto> = HashSet::new();
    // Folded QuantizeLinear → (its float input, the Relu output replacing it).
    let mut relus: HashMap<*const NodeProto, (String, String)> = HashMap::new();
    for node in &nodes {
        match node.get_op_type() {
            "QuantizeLinear" => {
                let out = first_output(node)?;
                let float_input = input(node, 0, "input")?.to_string();
                let users = consumers.get(out).map(Vec::as_slice).unwrap_or_default();
                if users.is_empty()
                    || graph_outputs.contains(out)
                    || users.iter().any(|u| u.get_op_type() != "DequantizeLinear")
                {
                    return Err(unsupported(node, "its output feeds something other than DequantizeLinear"));
                }
                folded.insert(node as *const _);
                // Quantising to a range that starts at zero is a ReLU (ONNX
                // Runtime removes ReLUs for exactly that reason): keep it.
                let source = if clamps_at_zero(node, &initializers)? {
                    let relu_out = format!("{out}__relu");
                    relus.insert(node as *const _, (float_input, relu_out.clone()));
                    relu_out
                } else {
                    float_input
                };
                for dq in users {
                    renamed.insert(first_output(dq)?.to_string(), source.clone());
                    folded.insert(*dq as *const _);
                }
            }
            "DequantizeLinear" if node.get_input().first().is_some_and(|n| initializers.contains_key(n)) => {
                let tensor = dequantise(node, &initializers)?;
                dequantised.push(tensor);
                folded.insert(node as *const _);
            }
            // Its producer must be a QuantizeLinear seen earlier (topological order).
            "DequantizeLinear" if !folded.contains(&(node as *const _)) => {
                return Err(unsupported(
                    node,
                    "dequantises a tensor that is neither a constant nor a QuantizeLinear output",
                ));
            }
            op @ ("QLinearConv" | "QLinearMatMul" | "ConvInteger" | "MatMulInteger" | "DynamicQuantizeLinear") => {
                return Err(unsupported(
                    node,
                    format!("{op} (operator-oriented quantisation) is not supported; export QDQ"),
                ));
            }
            "Constant" => {
                return Err(unsupported(node, "Constant nodes are not supported; store constants as initializers"))
            }
            _ => {}
        }
    }
    for tensor in dequantised {
        initializers.insert(tensor.get_name().to_string(), tensor);
    }

    // Follows folded pairs to the tensor a name now stands for. Each step
    // consumes one renaming, so more steps than renamings is a cycle.
    let resolve = |name: &str| -> Result<String, DeriveError> {
        let mut current = name;
        for _ in 0..=renamed.len() {
            match renamed.get(current) {
                Some(next) => current = next,
                None => return Ok(current.to_string()),
            }
        }
        Err(DeriveError::Malformed(format!(
            "tensor {name:?} is renamed in a cycle by QuantizeLinear/DequantizeLinear pairs"
        )))
    };

    let mut kept: Vec<NodeProto> = Vec::new();
    let mut used_names: HashSet<String> = HashSet::new();
    for (i, node) in nodes.iter().enumerate() {
        if let Some((input, output)) = relus.get(&(node as *const _)) {
            let mut relu = NodeProto::new();
            relu.set_op_type("Relu".into());
            relu.set_name(format!("{}__relu", node.get_name()));
            relu.set_input(RepeatedField::from_vec(vec![resolve(input)?]));
            relu.set_output(RepeatedField::from_vec(vec![output.clone()]));
            used_names.insert(relu.get_name().to_string());
            kept.push(relu);
        }
        if folded.contains(&(node as *const _)) {
            continue;
        }
        let mut node = node.clone();
        let inputs: Vec<String> = node
            .get_input()
            .iter()
            .map(|n| if n.is_empty() { Ok(n.clone()) } else { resolve(n) })
            .collect::<Result<_, _>>()?;
        node.set_input(RepeatedField::from_vec(inputs));
        if node.get_op_type() == "Conv" && !node.get_attribute().iter().any(|a| a.get_name() == "kernel_shape") {
            let weight = initializers
                .get(input(&node, 1, "weight")?)
                .ok_or_else(|| unsupported(&node, "weight is not a constant, cannot infer kernel_shape"))?;
            let kernel: Vec<i64> = match weight.get_dims() {
                [_, _, kernel @ ..] if !kernel.is_empty() && kernel.iter().all(|&k| k > 0) => kernel.to_vec(),
                dims => {
                    return Err(unsupported(
                        &node,
                        format!("weight has dims {dims:?}, expected [out, in, kernel...] with positive kernel sizes"),
                    ))
                }
            };
            node.mut_attribute().push(ints_attribute("kernel_shape", kernel));
        }
        if node.get_op_type() == "Gemm" {
            rewrite_gemm(&mut node, &mut initializers)?;
        }
        let mut name = node.get_name().to_string();
        if name.is_empty() || used_names.contains(&name) {
            name = format!("{}_{}", node.get_op_type(), i);
            while used_names.contains(&name) {
                name.push('_');
            }
            node.set_name(name.clone());
        }
        used_names.insert(name);
        kept.push(node);
    }
    // A graph output produced by a folded pair is re-exposed through Identity.
    for output in graph.get_output() {
        let source = resolve(output.get_name())?;
        if source != output.get_name() {
            let mut identity = NodeProto::new();
            identity.set_op_type("Identity".into());
            identity.set_name(format!("Identity_{}", output.get_name()));
            identity.set_input(RepeatedField::from_vec(vec![source]));
            identity.set_output(RepeatedField::from_vec(vec![output.get_name().to_string()]));
            kept.push(identity);
        }
    }

    // Keep only initializers still referenced.
    let referenced: HashSet<&str> = kept.iter().flat_map(|n| n.get_input().iter().map(String::as_str)).collect();
    let mut kept_initializers: Vec<TensorProto> =
        initializers.into_values().filter(|t| referenced.contains(t.get_name())).collect();
    kept_initializers.sort_by(|a, b| a.get_name().cmp(b.get_name()));
    let kept_names: HashSet<String> = kept_initializers.iter().map(|t| t.get_name().to_string()).collect();
    let inputs: Vec<ValueInfoProto> = graph
        .get_input()
        .iter()
        .filter(|i| i.get_name() == input_name || kept_names.contains(i.get_name()))
        .cloned()
        .collect();
    graph.set_input(RepeatedField::from_vec(inputs));
    graph.set_node(RepeatedField::from_vec(kept));
    graph.set_initializer(RepeatedField::from_vec(kept_initializers));
    graph.clear_value_info();

    annotate_shapes(&mut model, input_shape)?;
    Ok(F32Graph { model })
}

/// True when a `QuantizeLinear`'s range starts at exactly zero (every zero
/// point equals the type's minimum), i.e. it clamps negatives like a ReLU.
fn clamps_at_zero(node: &NodeProto, initializers: &HashMap<String, TensorProto>) -> Result<bool, DeriveError> {
    let Some(name) = node.get_input().get(2).filter(|n| !n.is_empty()) else {
        return Ok(true); // no zero point: uint8 with zero point 0
    };
    let zero_point =
        initializers.get(name).ok_or_else(|| unsupported(node, format!("zero point {name:?} is not a constant")))?;
    let minimum = match zero_point.get_data_type() {
        x if x == TensorProto_DataType::UINT8 as i32 => 0.0,
        x if x == TensorProto_DataType::INT8 as i32 => -128.0,
        other => return Err(unsupported(node, format!("zero point of data type {other} (expected int8 or uint8)"))),
    };
    let values = tensor_values(zero_point).map_err(|p| unsupported(node, p))?;
    Ok(values.iter().all(|&z| z == minimum))
}

/// `(q - zero_point) * scale` for a constant `DequantizeLinear`.
fn dequantise(node: &NodeProto, initializers: &HashMap<String, TensorProto>) -> Result<TensorProto, DeriveError> {
    let constant = |i: usize| -> Result<Option<&TensorProto>, DeriveError> {
        match node.get_input().get(i) {
            None => Ok(None),
            Some(name) if name.is_empty() => Ok(None),
            Some(name) => initializers
                .get(name)
                .map(Some)
                .ok_or_else(|| unsupported(node, format!("input {name:?} is not a constant"))),
        }
    };
    let q = constant(0)?.ok_or_else(|| unsupported(node, "has no input to dequantise"))?;
    let scale = constant(1)?.ok_or_else(|| unsupported(node, "has no scale"))?;
    let zero_point = constant(2)?;

    let values = tensor_values(q).map_err(|p| unsupported(node, p))?;
    let scales = tensor_values(scale).map_err(|p| unsupported(node, p))?;
    let zeros = match zero_point {
        Some(z) => tensor_values(z).map_err(|p| unsupported(node, p))?,
        None => vec![0.0; scales.len()],
    };
    if zeros.len() != scales.len() {
        return Err(unsupported(node, "scale and zero point differ in length"));
    }
    let (dims, count) = tensor_dims(node, q)?;
    if values.len() != count {
        return Err(unsupported(node, format!("tensor holds {} values for dims {dims:?}", values.len())));
    }
    let out: Vec<f32> = if let ([scale], [zero]) = (&scales[..], &zeros[..]) {
        values.iter().map(|&v| (v - zero) * scale).collect()
    } else {
        let axis_attr = node.get_attribute().iter().find(|a| a.get_name() == "axis").map_or(1, |a| a.get_i());
        let axis = if axis_attr < 0 { axis_attr + dims.len() as i64 } else { axis_attr } as usize;
        if axis >= dims.len() || dims[axis] != scales.len() {
            return Err(unsupported(
                node,
                format!("per-axis scale of length {} does not fit axis {axis_attr} of {dims:?}", scales.len()),
            ));
        }
        // Sizes of a tensor whose total fits, so this product fits too.
        let inner: usize = dims[axis + 1..].iter().product();
        values
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let c = (i / inner) % dims[axis];
                (v - zeros[c]) * scales[c]
            })
            .collect()
    };
    Ok(float_tensor(first_output(node)?, q.get_dims().to_vec(), out))
}

/// The values of an int8 / uint8 / int32 / float initializer, as f32.
fn tensor_values(t: &TensorProto) -> Result<Vec<f32>, String> {
    let raw = t.get_raw_data();
    let dt = t.get_data_type();
    let values = match dt {
        x if x == TensorProto_DataType::INT8 as i32 => {
            if raw.is_empty() {
                t.get_int32_data().iter().map(|&v| v as f32).collect()
            } else {
                raw.iter().map(|&b| b as i8 as f32).collect()
            }
        }
        x if x == TensorProto_DataType::UINT8 as i32 => {
            if raw.is_empty() {
                t.get_int32_data().iter().map(|&v| v as f32).collect()
            } else {
                raw.iter().map(|&b| b as f32).collect()
            }
        }
        x if x == TensorProto_DataType::INT32 as i32 => {
            if raw.is_empty() {
                t.get_int32_data().iter().map(|&v| v as f32).collect()
            } else {
                raw.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32).collect()
            }
        }
        x if x == TensorProto_DataType::FLOAT as i32 => {
            if raw.is_empty() {
                t.get_float_data().to_vec()
            } else {
                raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
            }
        }
        other => {
            return Err(format!(
                "tensor {:?} has data type {other}, expected int8, uint8, int32 or float",
                t.get_name()
            ))
        }
    };
    Ok(values)
}

/// Rewrites `Gemm(A, B, C, transB=1, alpha, beta)` with constant `B` (and
/// `C`) into the plain `Gemm(A, B', C')` wonnx supports: `B' = alpha·Bᵀ`,
/// `C' = beta·C`.
fn rewrite_gemm(node: &mut NodeProto, initializers: &mut HashMap<String, TensorProto>) -> Result<(), DeriveError> {
    let attr = |name: &str| node.get_attribute().iter().find(|a| a.get_name() == name).cloned();
    let trans_a = attr("transA").map_or(0, |a| a.get_i());
    let trans_b = attr("transB").map_or(0, |a| a.get_i());
    let alpha = attr("alpha").map_or(1.0, |a| a.get_f());
    let beta = attr("beta").map_or(1.0, |a| a.get_f());
    if trans_a != 0 {
        return Err(unsupported(node, "transA=1 is not supported"));
    }
    if trans_b == 0 && alpha == 1.0 && beta == 1.0 {
        return Ok(());
    }
    let b_name = input(node, 1, "weight")?.to_string();
    let b = initializers.get(&b_name).ok_or_else(|| unsupported(node, "transB/alpha need a constant weight"))?;
    let dims = b.get_dims().to_vec();
    let (shape, count) = tensor_dims(node, b)?;
    let [rows, cols] = shape[..] else {
        return Err(unsupported(node, format!("weight has dims {dims:?}, expected 2")));
    };
    let values = tensor_values(b).map_err(|p| unsupported(node, p))?;
    if values.len() != count {
        return Err(unsupported(node, format!("weight holds {} values for dims {dims:?}", values.len())));
    }
    let (new_dims, new_values) = if trans_b != 0 {
        let mut t = vec![0f32; values.len()];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = alpha * values[r * cols + c];
            }
        }
        (vec![cols as i64, rows as i64], t)
    } else {
        (dims.clone(), values.iter().map(|v| alpha * v).collect())
    };
    let new_b = format!("{b_name}__plain_{}", node.get_name());
    initializers.insert(new_b.clone(), float_tensor(&new_b, new_dims, new_values));
    let mut inputs = node.get_input().to_vec();
    inputs[1] = new_b;
    if beta != 1.0 {
        if let Some(c_name) = inputs.get(2).filter(|n| !n.is_empty()).cloned() {
            let c = initializers.get(&c_name).ok_or_else(|| unsupported(node, "beta needs a constant bias"))?;
            let scaled: Vec<f32> =
                tensor_values(c).map_err(|p| unsupported(node, p))?.iter().map(|v| beta * v).collect();
            let new_c = format!("{c_name}__plain_{}", node.get_name());
            initializers.insert(new_c.clone(), float_tensor(&new_c, c.get_dims().to_vec(), scaled));
            inputs[2] = new_c;
        }
    }
    node.set_input(RepeatedField::from_vec(inputs));
    let kept: Vec<AttributeProto> = node
        .get_attribute()
        .iter()
        .filter(|a| !matches!(a.get_name(), "transA" | "transB" | "alpha" | "beta"))
        .cloned()
        .collect();
    node.set_attribute(RepeatedField::from_vec(kept));
    Ok(())
}

fn float_tensor(name: &str, dims: Vec<i64>, values: Vec<f32>) -> TensorProto {
    let mut tensor = TensorProto::new();
    tensor.set_name(name.to_string());
    tensor.set_dims(dims);
    tensor.set_data_type(TensorProto_DataType::FLOAT as i32);
    tensor.set_float_data(values);
    tensor
}

fn ints_attribute(name: &str, values: Vec<i64>) -> AttributeProto {
    let mut attribute = AttributeProto::new();
    attribute.set_name(name.to_string());
    attribute.set_field_type(AttributeProto_AttributeType::INTS);
    attribute.set_ints(values);
    attribute
}

/// Fills `value_info` (and any shapeless graph output) with static f32
/// shapes inferred by tract on the float graph.
fn annotate_shapes(model: &mut ModelProto, input_shape: [usize; 4]) -> Result<(), DeriveError> {
    let bytes = model.write_to_bytes().map_err(|e| DeriveError::Shapes(e.to_string()))?;
    // tract's analysis of a hostile graph is not ours to vouch for: a panic
    // in it is an error of this graph, not of the process.
    let shapes = std::panic::catch_unwind(|| infer_shapes(&bytes, input_shape)).map_err(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown cause".into());
        DeriveError::Shapes(format!("tract panicked: {why}"))
    })??;

    let graph = model.mut_graph();
    let known: HashSet<String> = graph
        .get_input()
        .iter()
        .map(|i| i.get_name().to_string())
        .chain(graph.get_initializer().iter().map(|t| t.get_name().to_string()))
        .collect();
    let mut value_info = Vec::new();
    for node in graph.get_node() {
        for output in node.get_output() {
            if known.contains(output) {
                continue;
            }
            let dims = shapes.get(output).ok_or_else(|| {
                DeriveError::Shapes(format!("no static shape for {output:?} (node {:?})", node.get_name()))
            })?;
            value_info.push(value_info_proto(output, dims));
        }
    }
    for output in graph.mut_output().iter_mut() {
        if let Some(dims) = shapes.get(output.get_name()) {
            *output = value_info_proto(output.get_name(), dims);
        }
    }
    graph.set_value_info(RepeatedField::from_vec(value_info));
    Ok(())
}

/// Every labelled tensor's static shape, as tract infers it.
fn infer_shapes(bytes: &[u8], input_shape: [usize; 4]) -> Result<HashMap<String, Vec<usize>>, DeriveError> {
    use tract_onnx::prelude::*;

    let mut inference = tract_onnx::onnx()
        .model_for_read(&mut &*bytes)
        .and_then(|m| m.with_input_fact(0, f32::fact(input_shape).into()))
        .map_err(|e| DeriveError::Shapes(format!("{e:#}")))?;
    inference.analyse(false).map_err(|e| DeriveError::Shapes(format!("{e:#}")))?;

    let mut shapes: HashMap<String, Vec<usize>> = HashMap::new();
    for node in inference.nodes() {
        for ix in 0..node.outputs.len() {
            let outlet = OutletId::new(node.id, ix);
            let Some(label) = inference.outlet_label(outlet) else { continue };
            let fact = inference.outlet_fact(outlet).map_err(|e| DeriveError::Shapes(e.to_string()))?;
            if let Ok(Some(dims)) = fact.shape.as_concrete_finite() {
                shapes.insert(label.to_string(), dims.to_vec());
            }
        }
    }
    Ok(shapes)
}

fn value_info_proto(name: &str, dims: &[usize]) -> ValueInfoProto {
    let mut shape = TensorShapeProto::new();
    shape.set_dim(RepeatedField::from_vec(
        dims.iter()
            .map(|&d| {
                let mut dim = TensorShapeProto_Dimension::new();
                dim.set_dim_value(d as i64);
                dim
            })
            .collect(),
    ));
    let mut tensor = TypeProto_Tensor::new();
    tensor.set_elem_type(TensorProto_DataType::FLOAT as i32);
    tensor.set_shape(shape);
    let mut ty = TypeProto::new();
    ty.set_tensor_type(tensor);
    let mut info = ValueInfoProto::new();
    info.set_name(name.to_string());
    info.set_field_type(ty);
    info
}
