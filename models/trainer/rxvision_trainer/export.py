"""ONNX export and ONNX Runtime static int8 QDQ quantisation.

The float graph is written directly from the BN-folded weights
(``model.fuse``) with ``onnx.helper``: Conv(+Relu) x N, GlobalAveragePool,
Flatten, Gemm, Softmax; opset 13, IR 8, static shapes ``[1,3,H,W]`` ->
``[1,C]``, unique node names, the input named ``image`` and the output
``probs``. The temperature is folded into the Gemm (weights and bias / T), so
``probs`` is the calibrated distribution. Writing the graph by hand keeps it
independent of torch's exporter (which changes between releases) and exactly
the op set the engines and ``f32_graph.rs`` expect; ``check_export`` holds it
to the torch model.

Quantisation follows ``models/fixture/make_fixture_bundle.py``: per-channel
int8 weights, uint8 activations, MinMax calibration on training images (no
augmentation), Softmax excluded and the Gemm's output (the logits) left in
float -- a uint8 grid on the logits makes the probabilities coarse and ties
classes. ORT 1.32 workarounds kept from the fixture: ``CalibStridedMinMax``
(bounded memory; the image count must be a multiple of the stride, so it is
trimmed) instead of ``CalibMaxIntermediateOutputs`` (which discards full
chunks in 1.32), and ``quant_pre_process`` without symbolic shape inference
(static shapes, no sympy).
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .model import FusedModel

log = logging.getLogger("rxvision_trainer")

INPUT_NAME = "image"
OUTPUT_NAME = "probs"
OPSET = 13
IR_VERSION = 8
MAX_CALIB_STRIDE = 32


def build_float_model(fm: FusedModel, size: int, temperature: float, doc: str = "") -> onnx.ModelProto:
    inits, nodes = [], []
    x = INPUT_NAME
    for i, c in enumerate(fm.convs):
        w, b = f"conv{i}.weight", f"conv{i}.bias"
        inits += [numpy_helper.from_array(c.weight.astype(np.float32), w),
                  numpy_helper.from_array(c.bias.astype(np.float32), b)]
        k = list(c.weight.shape[2:])
        nodes.append(helper.make_node("Conv", [x, w, b], [f"conv{i}_out"], name=f"conv{i}",
                                      kernel_shape=k, strides=[c.stride, c.stride],
                                      pads=[c.padding] * 4))
        nodes.append(helper.make_node("Relu", [f"conv{i}_out"], [f"relu{i}_out"], name=f"relu{i}"))
        x = f"relu{i}_out"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap_out"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap_out"], ["features"], name="flatten", axis=1))
    inv_t = np.float32(1.0 / temperature)
    inits += [numpy_helper.from_array((fm.head_weight * inv_t).astype(np.float32), "head.weight"),
              numpy_helper.from_array((fm.head_bias * inv_t).astype(np.float32), "head.bias")]
    nodes.append(helper.make_node("Gemm", ["features", "head.weight", "head.bias"], ["logits"], name="head",
                                  transB=1))
    nodes.append(helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], name="softmax", axis=1))
    n_classes = fm.head_weight.shape[0]
    graph = helper.make_graph(
        nodes, "pillnet",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [1, n_classes])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="rxvision-trainer")
    model.ir_version = IR_VERSION
    model.doc_string = doc
    onnx.checker.check_model(model, full_check=True)
    return model


def session(model: str | Path | onnx.ModelProto, threads: int = 0) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def run_all(sess: ort.InferenceSession, xs: np.ndarray) -> np.ndarray:
    """Runs a batch-1 model over (N,3,H,W); returns (N, C)."""
    return np.concatenate([sess.run(None, {INPUT_NAME: xs[i:i + 1]})[0] for i in range(len(xs))], axis=0)


def ort_predict(sess: ort.InferenceSession, samples, size: int) -> np.ndarray:
    """Runs the model over dataset samples one by one (reference preprocessing); returns (N, C)."""
    from .data import load_eval_tensor

    out = [sess.run(None, {INPUT_NAME: load_eval_tensor(s.path, size)[None]})[0] for s in samples]
    return np.concatenate(out, axis=0)


class _Reader:
    """CalibrationDataReader over preprocessed images; supports CalibStridedMinMax (set_range)."""

    def __init__(self, xs: np.ndarray):
        self.xs = xs
        self.i, self.end = 0, len(xs)

    def __len__(self):
        return len(self.xs)

    def set_range(self, start_index: int, end_index: int):
        self.i, self.end = start_index, min(end_index, len(self.xs))

    def get_next(self):
        if self.i >= self.end:
            return None
        x = self.xs[self.i:self.i + 1]
        self.i += 1
        return {INPUT_NAME: x}

    def rewind(self):
        self.i, self.end = 0, len(self.xs)


def quantize_qdq(f32_path: Path, out_path: Path, calib: np.ndarray, tmpdir: Path, check=None,
                 doc: str | None = None, calib_stride: int = MAX_CALIB_STRIDE) -> onnx.ModelProto:
    """The project's one int8 recipe (the trainer, the fixture generator and the
    architecture sweep all use it): ORT static QDQ, per-channel int8 weights,
    uint8 activations, MinMax calibration over chunks of ``calib_stride``
    inputs (which must divide ``len(calib)``), Softmax and the logits (Gemm
    output) in float, unique non-empty node names, no intermediate value_info.
    ``check(model)`` asserts the caller's I/O contract before saving.

    ORT 1.32 notes: ``CalibMaxIntermediateOutputs`` discards full chunks, hence
    ``CalibStridedMinMax``; a uint8 grid on the logits makes probabilities
    coarse and produces exact ties, hence the Gemm output stays float.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationDataReader
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_Reader, CalibrationDataReader):
        pass

    if len(calib) == 0 or len(calib) % calib_stride:
        raise ValueError(f"{len(calib)} calibration inputs are not a multiple of the stride {calib_stride}")
    pre = tmpdir / "model_f32_pre.onnx"
    quant_pre_process(str(f32_path), str(pre), skip_optimization=True, skip_onnx_shape=False,
                      skip_symbolic_shape=True)  # static shapes; no sympy needed
    raw = tmpdir / "model_int8_raw.onnx"
    quantize_static(
        str(pre), str(raw), Reader(calib),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=["softmax"],
        calibrate_method=CalibrationMethod.MinMax,
        calibration_providers=["CPUExecutionProvider"],
        extra_options={"CalibStridedMinMax": calib_stride, "OpTypesToExcludeOutputQuantization": ["Gemm"]},
    )
    model = onnx.load(str(raw))
    g = model.graph
    seen: set[str] = set()
    for i, node in enumerate(g.node):
        name = node.name or f"{node.op_type}_{i}"
        base, k = name, 1
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        seen.add(name)
    if check is not None:
        check(model)
    del g.value_info[:]
    if doc is not None:
        model.doc_string = doc
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out_path))
    return model


def quantize(f32_path: Path, out_path: Path, calib: np.ndarray, tmpdir: Path, n_classes: int, size: int,
             doc: str = "") -> onnx.ModelProto:
    """Static int8 QDQ quantisation of ``f32_path`` into ``out_path``; returns the saved model."""
    stride = min(MAX_CALIB_STRIDE, len(calib))
    n = len(calib) - len(calib) % stride if stride else 0
    if n == 0:
        raise ValueError("no calibration images")
    model = quantize_qdq(f32_path, out_path, calib[:n], tmpdir, check=lambda m: check_contract(m, n_classes, size),
                         doc=doc, calib_stride=stride)
    log.info("quantized with %d calibration images (stride %d): %s", n, stride, dict(op_counts(model)))
    return model


def _dims(vi) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]


def check_contract(model: onnx.ModelProto, n_classes: int, size: int) -> None:
    """What the Rust loader and engines rely on (models/src/bundle.rs, engine/)."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    assert [i.name for i in inputs] == [INPUT_NAME], [i.name for i in inputs]
    assert [o.name for o in g.output] == [OUTPUT_NAME], [o.name for o in g.output]
    assert _dims(inputs[0]) == [1, 3, size, size], _dims(inputs[0])
    assert _dims(g.output[0]) == [1, n_classes], _dims(g.output[0])
    names = [n.name for n in g.node]
    assert all(names) and len(set(names)) == len(names), "node names must be unique and non-empty"
    softmax = [n for n in g.node if n.op_type == "Softmax"]
    assert len(softmax) == 1 and softmax[0].output[0] == OUTPUT_NAME, "exactly one float Softmax producing probs"
    producers = {o: n for n in g.node for o in n.output}
    src = producers.get(softmax[0].input[0])
    assert src is not None and src.op_type == "Gemm", "Softmax must read the float Gemm output (logits)"
    bad = [n.op_type for n in g.node if n.op_type.startswith("QLinear") or n.op_type in ("ConvInteger", "MatMulInteger")]
    assert not bad, f"unexpected integer ops {bad} (QDQ format expected)"


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)
