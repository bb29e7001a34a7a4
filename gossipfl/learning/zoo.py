"""Ready-made architectures, written directly as ONNX so a device never needs PyTorch to start.

Weights are laid out as PyTorch's ``nn.Linear`` and ``nn.Conv1d`` lay them out (Gemm with
``transB=1``, Conv weights ``(out, in, k)``) and initialised the way PyTorch does (Kaiming-uniform
with a = sqrt(5), which gives U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases), so a model
from the zoo and the same model exported from PyTorch train alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gossipfl.errors import ModelError
from gossipfl.learning.model import IR_VERSION, TASK_KEY, TASKS, Model
from gossipfl.learning.schema import SCHEMA_KEY, Schema

OPSET = 17
ARCHITECTURES = ("logreg", "mlp", "cnn1d", "autoencoder")
INPUT_NAME = "input"
OUTPUT_NAME = "output"


@dataclass
class ArchSpec:
    """What ``gossipfl model init`` builds."""

    arch: str
    inputs: int
    classes: int
    hidden: Sequence[int] = field(default_factory=lambda: (128,))  # autoencoder: (h, b, h), a bottleneck b
    input_shape: tuple[int, int] | None = None  # (channels, length) for cnn1d
    task: str = "classification"
    seed: int = 0
    schema: Schema | None = None  # the data's columns and class names, carried in the model's metadata
    # Per-feature (mean, scale) fitted on the data: the model standardises its input itself, with constants
    # that are frozen, never trained or averaged (gossipfl.learning.model._frozen_constants).
    scaling: tuple[np.ndarray, np.ndarray] | None = None

    def validate(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ModelError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.task not in TASKS:
            raise ModelError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.inputs <= 0 or self.classes <= 0:
            raise ModelError("--inputs and --classes must be positive")
        if self.task == "classification" and self.classes < 2:
            raise ModelError("a classifier needs --classes 2 or more")
        if (self.arch == "autoencoder") != (self.task == "anomaly"):
            raise ModelError("an anomaly model is an autoencoder: use --arch autoencoder (its task is anomaly)")
        if self.arch == "autoencoder":
            _check_bottleneck(self.inputs, self.classes, self.hidden)
        if any(h <= 0 for h in self.hidden):
            raise ModelError("--hidden sizes must be positive")
        if self.arch == "cnn1d":
            channels, length = self.input_shape or (1, self.inputs)
            if channels * length != self.inputs:
                raise ModelError(
                    f"--input-shape {channels},{length} holds {channels * length} values, --inputs is {self.inputs}"
                )
            if length < 2:
                raise ModelError("cnn1d needs an input length of at least 2")
        if self.scaling is not None:
            mean, scale = self.scaling
            if mean.shape != (self.inputs,) or scale.shape != (self.inputs,):
                raise ModelError(f"scaling needs {self.inputs} means and scales")
            if not (np.isfinite(mean).all() and np.isfinite(scale).all() and (scale > 0).all()):
                raise ModelError("scaling: means must be finite and scales finite and positive")


class _GraphWriter:
    """Accumulates nodes and initializers with readable, PyTorch-like names."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def param(self, name: str, shape: tuple[int, ...], fan_in: int) -> str:
        bound = 1.0 / np.sqrt(fan_in)
        value = self.rng.uniform(-bound, bound, size=shape).astype(np.float32)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def linear(self, prefix: str, x: str, n_in: int, n_out: int) -> str:
        w = self.param(f"{prefix}.weight", (n_out, n_in), n_in)
        b = self.param(f"{prefix}.bias", (n_out,), n_in)
        return self.node("Gemm", [x, w, b], f"{prefix}.out", transB=1)


def autoencoder_hidden(inputs: int) -> tuple[int, int, int]:
    """Default layer widths (h, b, h) for ``inputs`` features: a bottleneck of about a third of the features,
    which a few correlated channels fit through and an anomaly (correlation broken) does not."""
    bottleneck = max(1, inputs // 3)
    width = min(128, max(8, 2 * inputs))
    return width, bottleneck, width


def _check_bottleneck(inputs: int, outputs: int, hidden: Sequence[int]) -> None:
    """An autoencoder whose narrowest layer holds every feature can learn to copy its input: every row then
    reconstructs well and no score means anything, so the bottleneck must be narrower than the input."""
    if outputs != inputs:
        raise ModelError(f"an autoencoder reconstructs its {inputs} inputs: it has {inputs} outputs, not {outputs}")
    if inputs < 2:
        raise ModelError("an autoencoder needs at least 2 features")
    if not hidden:
        raise ModelError("an autoencoder needs --hidden layer widths, e.g. 16,2,16")
    if min(hidden) >= inputs:
        raise ModelError(f"the autoencoder's narrowest --hidden layer ({min(hidden)}) must be smaller than its "
                         f"{inputs} inputs, or it learns to copy them")


def _standardise(w: _GraphWriter, spec: ArchSpec, dims: tuple[int, ...]) -> str:
    """(x - mean) / scale, as the graph's first two nodes, with the constants shaped like one sample."""
    if spec.scaling is None:
        return INPUT_NAME
    mean, scale = (v.astype(np.float32).reshape(dims) for v in spec.scaling)
    w.inits += [numpy_helper.from_array(mean, "scaler.mean"), numpy_helper.from_array(scale, "scaler.scale")]
    centred = w.node("Sub", [INPUT_NAME, "scaler.mean"], "scaler.centred")
    return w.node("Div", [centred, "scaler.scale"], "scaler.out")


def range_scaling(low: float, high: float, inputs: int) -> tuple[np.ndarray, np.ndarray]:
    """A scaler that maps every feature's known range [low, high] to [-1, 1]: constants that read no row, so
    unlike a mean and spread fitted on the data they reveal nothing about any record (docs/privacy.md)."""
    return (np.full(inputs, (low + high) / 2, np.float32), np.full(inputs, (high - low) / 2, np.float32))


def build(spec: ArchSpec) -> Model:
    spec.validate()
    w = _GraphWriter(np.random.default_rng(spec.seed))
    outputs = spec.classes
    if spec.arch == "cnn1d":
        channels, length = spec.input_shape or (1, spec.inputs)
        input_dims: list[int | str] = ["batch", channels, length]
        x = _standardise(w, spec, (channels, length))
        sizes = list(spec.hidden) if spec.hidden else [8, 16]
        in_ch = channels
        for i, out_ch in enumerate(sizes):
            fan_in = in_ch * 3
            weight = w.param(f"conv{i}.weight", (out_ch, in_ch, 3), fan_in)
            bias = w.param(f"conv{i}.bias", (out_ch,), fan_in)
            x = w.node("Conv", [x, weight, bias], f"conv{i}.out", kernel_shape=[3], pads=[1, 1])
            x = w.node("Relu", [x], f"conv{i}.relu")
            if length >= 4:
                x = w.node("MaxPool", [x], f"pool{i}.out", kernel_shape=[2], strides=[2])
                length //= 2
            in_ch = out_ch
        # Flatten keeps where a feature occurred, which global pooling would average away.
        x = w.node("Flatten", [x], "flatten.out", axis=1)
        x = w.linear("head", x, in_ch * length, outputs)
    else:
        input_dims = ["batch", spec.inputs]
        x = _standardise(w, spec, (spec.inputs,))
        width = spec.inputs
        hidden = list(spec.hidden) if spec.arch in ("mlp", "autoencoder") else []
        # Tanh in an autoencoder: a bottleneck of a few Relu units can die and pass nothing at all.
        activation = "Tanh" if spec.arch == "autoencoder" else "Relu"
        for i, size in enumerate(hidden):
            x = w.linear(f"fc{i}", x, width, size)
            x = w.node(activation, [x], f"fc{i}.{activation.lower()}")
            width = size
        x = w.linear("head", x, width, outputs)
    w.node("Identity", [x], OUTPUT_NAME)

    graph = helper.make_graph(
        w.nodes,
        f"gossipfl-{spec.arch}",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, input_dims)],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", outputs])],
        initializer=w.inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="gossipfl")
    proto.ir_version = IR_VERSION
    helper.set_model_props(proto, {TASK_KEY: spec.task,
                                   **({SCHEMA_KEY: spec.schema.to_json()} if spec.schema is not None else {})})
    return Model(proto)
