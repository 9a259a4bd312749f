//! The model security scan: what the fleet checks before it stores a bundle
//! for appliances (and what an appliance may check again before it installs
//! one). A loaded [`Bundle`] is already consistent and hash-checked; the
//! scan looks inside the graph for what a hostile or broken exporter could
//! hide there:
//!
//! - **external data**: a tensor whose bytes live in another file
//!   (`data_location = EXTERNAL` or `external_data` entries) would make an
//!   engine open paths the bundle does not control;
//! - **custom or unknown operators**: only standard-domain ops from
//!   [`ALLOWED_OPS`] (the convolutional classifiers the trainer exports and
//!   both engines run), no sub-graphs (`If`, `Loop`, graph attributes), no
//!   custom domains (`com.microsoft` contrib ops, local functions);
//! - **sizes beyond sanity**: tensors over [`MAX_TENSOR_ELEMENTS`] elements,
//!   negative or absurd dimensions, more than [`MAX_NODES`] nodes, opsets
//!   outside [`OPSETS`].
//!
//! Every finding is reported (not only the first), with the node or tensor.

use std::collections::BTreeMap;

use tract_onnx::pb;

use crate::bundle::Bundle;

/// Operators a model may use (ONNX standard domain).
pub const ALLOWED_OPS: &[&str] = &[
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Clip",
    "Concat",
    "Constant",
    "Conv",
    "DequantizeLinear",
    "Div",
    "Dropout",
    "Flatten",
    "Gather",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "LeakyRelu",
    "MatMul",
    "MaxPool",
    "Mul",
    "Pad",
    "QuantizeLinear",
    "ReduceMean",
    "Relu",
    "Reshape",
    "Shape",
    "Sigmoid",
    "Slice",
    "Softmax",
    "Squeeze",
    "Sub",
    "Transpose",
    "Unsqueeze",
];

/// Most elements one tensor (initializer or constant) may hold.
pub const MAX_TENSOR_ELEMENTS: i64 = 64 * 1024 * 1024;

/// Most nodes a graph may hold.
pub const MAX_NODES: usize = 10_000;

/// Standard-domain opset versions accepted.
pub const OPSETS: std::ops::RangeInclusive<i64> = 7..=21;

/// What the scan found in a clean model.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScanReport {
    /// Nodes per operator.
    pub ops: BTreeMap<String, usize>,
    /// Nodes in all.
    pub nodes: usize,
    /// Parameters (elements of all initializers).
    pub parameters: i64,
    /// The standard opset version.
    pub opset: i64,
    /// The ONNX graph's size in bytes.
    pub model_bytes: usize,
}

/// Scans a bundle's graph; every finding in words, or the report.
pub fn scan(bundle: &Bundle) -> Result<ScanReport, Vec<String>> {
    use tract_onnx::prelude::Framework;
    let model = bundle.model_bytes();
    let proto = tract_onnx::onnx()
        .proto_model_for_read(&mut &*model)
        .map_err(|e| vec![format!("not a readable ONNX model: {e}")])?;
    scan_proto(&proto, model.len())
}

fn scan_proto(proto: &pb::ModelProto, model_bytes: usize) -> Result<ScanReport, Vec<String>> {
    let mut findings = Vec::new();
    let mut opset = None;
    for import in &proto.opset_import {
        match import.domain.as_str() {
            "" | "ai.onnx" => opset = Some(import.version),
            other => findings.push(format!("imports operator domain {other:?}: custom operators are not allowed")),
        }
    }
    let opset = opset.unwrap_or(0);
    if !OPSETS.contains(&opset) {
        findings.push(format!("standard opset {opset} is outside {}..={}", OPSETS.start(), OPSETS.end()));
    }
    let Some(graph) = &proto.graph else {
        return Err(vec!["has no graph".into()]);
    };
    if graph.node.len() > MAX_NODES {
        findings.push(format!("{} nodes, more than {MAX_NODES}", graph.node.len()));
    }
    if !graph.sparse_initializer.is_empty() {
        findings.push("sparse initializers are not allowed".into());
    }
    let mut parameters: i64 = 0;
    for tensor in &graph.initializer {
        parameters =
            parameters.saturating_add(check_tensor(tensor, &format!("initializer {:?}", tensor.name), &mut findings));
    }
    let mut ops = BTreeMap::new();
    for (index, node) in graph.node.iter().enumerate() {
        let what = if node.name.is_empty() {
            format!("node {index} ({})", node.op_type)
        } else {
            format!("node {:?} ({})", node.name, node.op_type)
        };
        if !(node.domain.is_empty() || node.domain == "ai.onnx") {
            findings.push(format!("{what}: operator domain {:?} is not allowed", node.domain));
        } else if !ALLOWED_OPS.contains(&node.op_type.as_str()) {
            findings.push(format!("{what}: operator {:?} is not one the appliances' engines may run", node.op_type));
        }
        for attribute in &node.attribute {
            if attribute.g.is_some() || !attribute.graphs.is_empty() {
                findings.push(format!("{what}: attribute {:?} holds a sub-graph", attribute.name));
            }
            if let Some(t) = &attribute.t {
                check_tensor(t, &format!("{what} attribute {:?}", attribute.name), &mut findings);
            }
            for t in &attribute.tensors {
                check_tensor(t, &format!("{what} attribute {:?}", attribute.name), &mut findings);
            }
        }
        *ops.entry(node.op_type.clone()).or_insert(0) += 1;
    }
    if findings.is_empty() {
        Ok(ScanReport { ops, nodes: graph.node.len(), parameters, opset, model_bytes })
    } else {
        Err(findings)
    }
}

/// Checks one tensor; returns its element count (0 when refused).
fn check_tensor(tensor: &pb::TensorProto, what: &str, findings: &mut Vec<String>) -> i64 {
    let external = tensor.data_location == Some(pb::tensor_proto::DataLocation::External as i32);
    if external || !tensor.external_data.is_empty() {
        let location =
            tensor.external_data.iter().find(|e| e.key == "location").map(|e| e.value.as_str()).unwrap_or("?");
        findings.push(format!("{what}: external data ({location:?}): every byte must be inside model.onnx"));
        return 0;
    }
    let mut elements: i64 = 1;
    for &d in &tensor.dims {
        if d < 0 {
            findings.push(format!("{what}: negative dimension {d}"));
            return 0;
        }
        elements = elements.saturating_mul(d);
    }
    if elements > MAX_TENSOR_ELEMENTS {
        findings.push(format!("{what}: {elements} elements, more than {MAX_TENSOR_ELEMENTS}"));
        return 0;
    }
    elements
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(nodes: Vec<pb::NodeProto>, initializers: Vec<pb::TensorProto>) -> pb::ModelProto {
        pb::ModelProto {
            opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 13 }],
            graph: Some(pb::GraphProto { node: nodes, initializer: initializers, ..Default::default() }),
            ..Default::default()
        }
    }

    fn node(op: &str, domain: &str) -> pb::NodeProto {
        pb::NodeProto { op_type: op.into(), domain: domain.into(), name: format!("n_{op}"), ..Default::default() }
    }

    #[test]
    fn a_plain_classifier_passes_with_its_op_counts() {
        let w = pb::TensorProto { name: "w".into(), dims: vec![8, 3, 3, 3], ..Default::default() };
        let report =
            scan_proto(&model(vec![node("Conv", ""), node("Relu", ""), node("Softmax", "")], vec![w]), 100).unwrap();
        assert_eq!(report.parameters, 216);
        assert_eq!(report.ops["Conv"], 1);
        assert_eq!(report.nodes, 3);
    }

    #[test]
    fn external_data_custom_ops_subgraphs_and_huge_tensors_are_all_named() {
        let external = pb::TensorProto {
            name: "w".into(),
            dims: vec![4],
            data_location: Some(pb::tensor_proto::DataLocation::External as i32),
            external_data: vec![pb::StringStringEntryProto { key: "location".into(), value: "/etc/shadow".into() }],
            ..Default::default()
        };
        let huge = pb::TensorProto { name: "big".into(), dims: vec![1 << 20, 1 << 10], ..Default::default() };
        let mut branch = node("If", "");
        branch.attribute.push(pb::AttributeProto {
            name: "then_branch".into(),
            g: Some(Default::default()),
            ..Default::default()
        });
        let findings = scan_proto(
            &model(
                vec![node("Conv", ""), node("FusedConv", "com.microsoft"), node("MyOp", ""), branch],
                vec![external, huge],
            ),
            100,
        )
        .unwrap_err();
        let all = findings.join("\n");
        for expected in ["/etc/shadow", "com.microsoft", "\"MyOp\"", "sub-graph", "\"If\"", "more than 67108864"] {
            assert!(all.contains(expected), "{expected} missing from:\n{all}");
        }
    }

    #[test]
    fn a_custom_domain_import_and_a_strange_opset_are_refused() {
        let mut m = model(vec![node("Relu", "")], vec![]);
        m.opset_import = vec![
            pb::OperatorSetIdProto { domain: String::new(), version: 3 },
            pb::OperatorSetIdProto { domain: "com.evil".into(), version: 1 },
        ];
        let all = scan_proto(&m, 10).unwrap_err().join("\n");
        assert!(all.contains("com.evil") && all.contains("opset 3"), "{all}");
    }

    #[test]
    fn every_shipped_bundle_passes() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bundles");
        let mut scanned = 0;
        for family in std::fs::read_dir(&root).unwrap() {
            for version in std::fs::read_dir(family.unwrap().path()).unwrap() {
                let bundle = Bundle::load(&version.unwrap().path()).unwrap();
                let report = scan(&bundle).unwrap_or_else(|f| panic!("{bundle}: {f:?}"));
                assert!(report.parameters > 0 && report.ops.contains_key("Softmax"), "{bundle}: {report:?}");
                scanned += 1;
            }
        }
        assert!(scanned >= 3, "{scanned} bundles under {}", root.display());
    }
}
