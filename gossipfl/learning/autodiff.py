"""Reverse-mode differentiation of an ONNX graph, written out as standard ONNX operators.

onnxruntime's training builds are discontinued and never shipped for aarch64, so gossipfl writes the
backward pass itself: the result is an ordinary ONNX model that any plain onnxruntime (or the onnx
reference evaluator, which the float64 gradient checks use) can run. Gradient ops from the
``com.microsoft`` domain exist only in training builds and are never emitted.

The builder walks the forward graph backwards from the loss, applying one rule per operator. A node
whose inputs cannot carry a gradient back to a parameter needs no rule; a node on the path from a
parameter to the loss with no rule makes the model untrainable, and the error names it.

Conventions the rules rely on:
- labels are int64 class indices (classification) or float targets shaped like the output; an anomaly
  model's target is its own scaled input, read inside the graph (reconstruction.py), and its labels are unused;
- a model whose output is a Softmax or LogSoftmax over the last axis is trained on that node's input,
  with the fused softmax cross-entropy (the same loss, computed stably);
- the batch size is read from the data at run time, so one graph serves every batch size.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gossipfl.errors import ModelError, UnsupportedOpError
from gossipfl.learning.model import Dim, Model, tensor_shape
from gossipfl.learning.reconstruction import reconstruction_target

LABELS = "gossipfl.labels"
LOSS = "gossipfl.loss"
TRAINING_OPSET = 17  # ScatterElements(reduction="add") needs 16
GRAD_PREFIX = "gossipfl.grad."

SUPPORTED_OPS = (
    "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "BatchNormalization", "Relu", "LeakyRelu", "Sigmoid", "Tanh",
    "Softmax", "LogSoftmax", "Flatten", "Reshape", "Identity", "Conv", "MaxPool", "GlobalAveragePool",
)


@dataclass
class GradientGraph:
    """A forward + loss + backward graph.

    Inputs: the data input, ``LABELS``, then every parameter by name. Outputs: ``LOSS`` (a scalar),
    the model's own output (for metrics), then ``GRAD_PREFIX + name`` for every parameter.
    """

    proto: onnx.ModelProto
    grad_names: dict[str, str]


class _Builder:
    """Emits backward nodes and constants into one list, with unique names."""

    def __init__(self, shapes: dict[str, tuple[Dim, ...] | None], dtype: int) -> None:
        self.shapes = shapes
        self.dtype = dtype
        self.np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], str] = {}

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"gossipfl.bw{self._count}.{hint}"

    def op(self, op_type: str, inputs: Sequence[str], hint: str | None = None, n_out: int = 1,
           **attrs: object) -> str:
        outs = [self.fresh(hint or op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=outs[0], **attrs))
        return outs[0]

    def const(self, value: float | Sequence[int] | np.ndarray, dtype: np.dtype | type | None = None) -> str:
        array = np.asarray(value, dtype=dtype)
        if dtype is None and (array.dtype.kind == "f" or not isinstance(value, np.ndarray)):
            array = array.astype(self.np_dtype)  # plain numbers and float arrays follow the graph's dtype
        key = (array.dtype.str, array.tobytes(), array.shape)
        if key not in self._consts:
            name = self.fresh("const")
            self.inits.append(numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    def scale(self, x: str, factor: float) -> str:
        return x if factor == 1.0 else self.op("Mul", [x, self.const(factor)])

    def shape_of(self, name: str) -> tuple[Dim, ...] | None:
        return self.shapes.get(name)

    def sum_to(self, grad: str, grad_shape: tuple[Dim, ...] | None, target: str,
               node: onnx.NodeProto) -> str:
        """Undo numpy-style broadcasting: sum ``grad`` down to the shape of ``target``."""
        target_shape = self.shape_of(target)
        if grad_shape is None or target_shape is None:
            raise UnsupportedOpError(node.op_type, node.name, "operand shapes are unknown, cannot undo broadcast")
        if tuple(grad_shape) == tuple(target_shape):
            return grad
        lead = len(grad_shape) - len(target_shape)
        if lead < 0:
            raise UnsupportedOpError(node.op_type, node.name, "operand has more dimensions than the result")
        axes = list(range(lead))
        for i, dim in enumerate(target_shape):
            out_dim = grad_shape[lead + i]
            if dim == out_dim:
                continue
            if dim == 1:
                axes.append(lead + i)
            else:
                raise UnsupportedOpError(
                    node.op_type, node.name, f"cannot undo broadcast from {grad_shape} to {target_shape}")
        if not all(isinstance(d, int) for d in target_shape):
            raise UnsupportedOpError(node.op_type, node.name, "broadcast operand has a symbolic shape")
        summed = self.op("ReduceSum", [grad, self.const(axes, np.int64)], keepdims=1)
        return self.op("Reshape", [summed, self.const(list(target_shape), np.int64)])


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _static(shape: tuple[Dim, ...] | None) -> tuple[int, ...] | None:
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return tuple(int(d) for d in shape)  # type: ignore[arg-type]


# A rule gets the builder, the node, the gradient of its first output, and which inputs need a
# gradient; it returns {input index: gradient tensor name}.
Rule = Callable[[_Builder, onnx.NodeProto, str, Sequence[bool]], dict[int, str]]


def _gemm(b: _Builder, n: onnx.NodeProto, dy: str, need: Sequence[bool]) -> dict[int, str]:
    alpha = float(_attr(n, "alpha", 1.0))  # type: ignore[arg-type]
    beta = float(_attr(n, "beta", 1.0))  # type: ignore[arg-type]
    ta = int(_attr(n, "transA", 0))  # type: ignore[call-overload]
    tb = int(_attr(n, "transB", 0))  # type: ignore[call-overload]
    a, bb = n.input[0], n.input[1]
    out: dict[int, str] = {}
    if need[0]:
        if not ta:
            out[0] = b.op("Gemm", [dy, bb], alpha=alpha, transB=0 if tb else 1)
        else:
            out[0] = b.op("Gemm", [bb, dy], alpha=alpha, transA=tb, transB=1)
    if need[1]:
        if not tb:
            out[1] = b.op("Gemm", [a, dy], alpha=alpha, transA=0 if ta else 1)
        else:
            out[1] = b.op("Gemm", [dy, a], alpha=alpha, transA=1, transB=ta)
    if len(need) > 2 and need[2]:
        out[2] = b.sum_to(b.scale(dy, beta), b.shape_of(n.output[0]), n.input[2], n)
    return out


def _matmul(b: _Builder, n: onnx.NodeProto, dy: str, need: Sequence[bool]) -> dict[int, str]:
    a, w = n.input
    a_shape, w_shape = b.shape_of(a), b.shape_of(w)
    if a_shape is None or w_shape is None or len(w_shape) != 2 or len(a_shape) < 2:
        raise UnsupportedOpError("MatMul", n.name, "gradient needs a left operand of rank 2+ and a 2-D right one")
    out: dict[int, str] = {}
    if need[0]:
        w_t = b.op("Transpose", [w], perm=[1, 0])
        out[0] = b.op("MatMul", [dy, w_t])
    if need[1]:
        if len(a_shape) == 2:
            out[1] = b.op("Gemm", [a, dy], transA=1)
        else:
            k, m = w_shape
            a2 = b.op("Reshape", [a, b.const([-1, k], np.int64)])  # type: ignore[list-item]
            d2 = b.op("Reshape", [dy, b.const([-1, m], np.int64)])  # type: ignore[list-item]
            out[1] = b.op("Gemm", [a2, d2], transA=1)
    return out


def _add_sub(b: _Builder, n: onnx.NodeProto, dy: str, need: Sequence[bool]) -> dict[int, str]:
    y_shape = b.shape_of(n.output[0])
    out: dict[int, str] = {}
    if need[0]:
        out[0] = b.sum_to(dy, y_shape, n.input[0], n)
    if need[1]:
        g = b.sum_to(dy, y_shape, n.input[1], n)
        out[1] = b.op("Neg", [g]) if n.op_type == "Sub" else g
    return out


def _mul(b: _Builder, n: onnx.NodeProto, dy: str, need: Sequence[bool]) -> dict[int, str]:
    y_shape = b.shape_of(n.output[0])
    out: dict[int, str] = {}
    for i in (0, 1):
        if need[i]:
            out[i] = b.sum_to(b.op("Mul", [dy, n.input[1 - i]]), y_shape, n.input[i], n)
    return out


def _div(b: _Builder, n: onnx.NodeProto, dy: str, need: Sequence[bool]) -> dict[int, str]:
    """y = a / b: da = dy / b, db = -dy * y / b (y already holds a / b)."""
    y_shape = b.shape_of(n.output[0])
    out: dict[int, str] = {}
    if need[0]:
        out[0] = b.sum_to(b.op("Div", [dy, n.input[1]]), y_shape, n.input[0], n)
    if need[1]:
        ratio = b.op("Div", [n.output[0], n.input[1]])
        out[1] = b.sum_to(b.op("Neg", [b.op("Mul", [dy, ratio])]), y_shape, n.input[1], n)
    return out


def _batch_norm(b: _Builder, n: onnx.NodeProto, dy: str, need: Sequence[bool]) -> dict[int, str]:
    """Inference-mode BatchNormalization, y = (x - mean) / sqrt(var + eps) * scale + bias, with the running
    mean and variance frozen (gossipfl trains with the statistics the model came with: batch statistics
    on a device's few, skewed rows would describe that device, and averaging them across devices means
    nothing). Scale and bias train; the gradient of x is a per-channel factor."""
    if (len(n.output) > 1 and any(n.output[1:])) or int(_attr(n, "training_mode", 0)):  # type: ignore[call-overload]
        raise UnsupportedOpError("BatchNormalization", n.name, "only inference mode (training_mode 0) trains")
    x_shape = b.shape_of(n.input[0])
    if x_shape is None or len(x_shape) < 2:
        raise UnsupportedOpError("BatchNormalization", n.name, "the input's rank must be known")
    rank = len(x_shape)
    eps = float(_attr(n, "epsilon", 1e-5))  # type: ignore[call-overload]
    spread = b.op("Sqrt", [b.op("Add", [n.input[4], b.const(eps)])])

    def per_channel(vector: str) -> str:  # (C,) -> (C, 1, ..., 1), to broadcast over (N, C, ...)
        return vector if rank == 2 else b.op("Unsqueeze", [vector, b.const(list(range(1, rank - 1)), np.int64)])

    axes = b.const([0, *range(2, rank)], np.int64)
    out: dict[int, str] = {}
    if need[0]:
        out[0] = b.op("Mul", [dy, per_channel(b.op("Div", [n.input[1], spread]))])
    if need[1]:
        centred = b.op("Sub", [n.input[0], per_channel(n.input[3])])
        normalised = b.op("Div", [centred, per_channel(spread)])
        out[1] = b.op("ReduceSum", [b.op("Mul", [dy, normalised]), axes], keepdims=0)
    if need[2]:
        out[2] = b.op("ReduceSum", [dy, axes], keepdims=0)
    if need[3] or need[4]:
        raise UnsupportedOpError("BatchNormalization", n.name, "the running mean and variance must be constants")
    return out


def _relu(b: _Builder, n: onnx.NodeProto, dy: str, need: Sequence[bool]) -> dict[int, str]:
    positive = b.op("Greater", [n.input[0], b.const(0.0)])
    return {0: b.op("Where", [positive, dy, b.const(0.0)])}


def _leaky_relu(b: _Builder, n: onnx.NodeProto, dy: str, need: Sequence[bool]) -> dict[int, str]:
    alpha = float(_attr(n, "alpha", 0.01))  # type: ignore[arg-type]
    positive = b.op("Greater", [n.input[0], b.const(0.0)])
    return {0: b.op("Where", [positive, dy, b.scale(dy, alpha)])}


def _sigmoid(b: _Builder, n: onnx.NodeProto, dy: str, need: Sequence[bool]) -> dict[int, str]:
    y = n.output[0]
    one_minus = b.op("Sub", [b.const(1.0), y])
    return {0: b.op("Mul", [dy, b.op("Mul", [y, one_minus])])}


def _tanh(b: _Builder, n: onnx.NodeProto, dy: str, need: Sequence[bool]) -> dict[int, str]:
    y = n.output[0]
    one_minus_sq = b.op("Sub", [b.const(1.0), b.op("Mul", [y, y])])
    return {0: b.op("Mul", [dy, one_minus_sq])}


def _softmax(b: _Builder, n: onnx.NodeProto, dy: str, need: Sequence[bool]) -> dict[int, str]:
    axis = int(_attr(n, "axis", -1))  # type: ignore[call-overload]
    y = n.output[0]
    dot = b.op("ReduceSum", [b.op("Mul", [dy, y]), b.const([axis], np.int64)], keepdims=1)
    return {0: b.op("Mul", [y, b.op("Sub", [dy, dot])])}


def _log_softmax(b: _Builder, n: onnx.NodeProto, dy: str, need: Sequence[bool]) -> dict[int, str]:
    axis = int(_attr(n, "axis", -1))  # type: ignore[call-overload]
    total = b.op("ReduceSum", [dy, b.const([axis], np.int64)], keepdims=1)
    return {0: b.op("Sub", [dy, b.op("Mul", [b.op("Exp", [n.output[0]]), total])])}


def _reshape_back(b: _Builder, n: onnx.NodeProto, dy: str, need: Sequence[bool]) -> dict[int, str]:
    if not need[0]:
        return {}
    return {0: b.op("Reshape", [dy, b.op("Shape", [n.input[0]])])}


def _identity(b: _Builder, n: onnx.NodeProto, dy: str, need: Sequence[bool]) -> dict[int, str]:
    return {0: dy}


def _conv(b: _Builder, n: onnx.NodeProto, dy: str, need: Sequence[bool]) -> dict[int, str]:
    x, w = n.input[0], n.input[1]
    x_shape, _w_shape, y_shape = (_static(b.shape_of(t)[1:] if b.shape_of(t) else None)
                                 for t in (x, w, n.output[0]))
    w_full = _static(b.shape_of(w))
    if x_shape is None or w_full is None or y_shape is None or len(w_full) != 3:
        raise UnsupportedOpError("Conv", n.name, "only 1-D convolutions with static shapes are differentiable")
    if int(_attr(n, "group", 1)) != 1:  # type: ignore[call-overload]
        raise UnsupportedOpError("Conv", n.name, "grouped convolutions are not differentiable")
    auto_pad = _attr(n, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad not in ("NOTSET", "VALID"):
        raise UnsupportedOpError("Conv", n.name, f"auto_pad={auto_pad} is not differentiable; use explicit pads")
    c_out, c_in, k = w_full
    length_in, length_out = x_shape[1], y_shape[1]
    stride = int(next(iter(_attr(n, "strides", [1]))))  # type: ignore[call-overload]
    dilation = int(next(iter(_attr(n, "dilations", [1]))))  # type: ignore[call-overload]
    pads = [int(p) for p in _attr(n, "pads", [0, 0])] if auto_pad == "NOTSET" else [0, 0]  # type: ignore[attr-defined]
    out: dict[int, str] = {}
    if need[0]:
        covered = (length_out - 1) * stride + (k - 1) * dilation + 1 - pads[0] - pads[1]
        out[0] = b.op("ConvTranspose", [dy, w], kernel_shape=[k], strides=[stride], dilations=[dilation],
                      pads=pads, output_padding=[length_in - covered])
    if need[1]:
        # dW[o, c, j] = sum_n sum_t dY[n, o, t] * Xpad[n, c, t*stride + j*dilation]: a convolution of X
        # (batch and channels swapped) with dY as the kernel, stride and dilation swapped.
        x_t = b.op("Transpose", [x], perm=[1, 0, 2])
        dy_t = b.op("Transpose", [dy], perm=[1, 0, 2])
        corr = b.op("Conv", [x_t, dy_t], kernel_shape=[length_out], strides=[dilation], dilations=[stride],
                    pads=pads)
        corr = b.op("Slice", [corr, b.const([0], np.int64), b.const([k], np.int64), b.const([2], np.int64)])
        out[1] = b.op("Transpose", [corr], perm=[1, 0, 2])
    if len(need) > 2 and need[2]:
        out[2] = b.op("ReduceSum", [dy, b.const([0, 2], np.int64)], keepdims=0)
    del c_out, c_in
    return out


def _maxpool(b: _Builder, n: onnx.NodeProto, dy: str, need: Sequence[bool]) -> dict[int, str]:
    # The forward node was given an Indices output (flat positions in the whole input tensor);
    # the gradient of each window goes to the position that won it.
    x = n.input[0]
    shape = b.op("Shape", [x])
    zeros = b.op("ConstantOfShape", [shape], value=numpy_helper.from_array(np.zeros(1, b.np_dtype)))
    flat = b.const([-1], np.int64)
    scattered = b.op("ScatterElements", [b.op("Reshape", [zeros, flat]), b.op("Reshape", [n.output[1], flat]),
                                         b.op("Reshape", [dy, flat])], axis=0, reduction="add")
    return {0: b.op("Reshape", [scattered, shape])}


def _global_avg_pool(b: _Builder, n: onnx.NodeProto, dy: str, need: Sequence[bool]) -> dict[int, str]:
    x_shape = _static((b.shape_of(n.input[0]) or (None,))[2:])
    if x_shape is None:
        raise UnsupportedOpError("GlobalAveragePool", n.name, "spatial dimensions must be static")
    count = int(np.prod(x_shape))
    expanded = b.op("Expand", [dy, b.op("Shape", [n.input[0]])])
    return {0: b.scale(expanded, 1.0 / count)}


RULES: dict[str, Rule] = {
    "Gemm": _gemm, "MatMul": _matmul, "Add": _add_sub, "Sub": _add_sub, "Mul": _mul, "Div": _div,
    "BatchNormalization": _batch_norm, "Relu": _relu,
    "LeakyRelu": _leaky_relu, "Sigmoid": _sigmoid, "Tanh": _tanh, "Softmax": _softmax,
    "LogSoftmax": _log_softmax, "Flatten": _reshape_back, "Reshape": _reshape_back, "Identity": _identity,
    "Conv": _conv, "MaxPool": _maxpool, "GlobalAveragePool": _global_avg_pool,
}
assert set(RULES) == set(SUPPORTED_OPS)


def _infer_shapes(proto: onnx.ModelProto) -> dict[str, tuple[Dim, ...] | None]:
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except Exception as exc:  # onnx raises InferenceError and a few others
        raise ModelError(f"shape inference failed: {str(exc).splitlines()[0]}") from exc
    shapes: dict[str, tuple[Dim, ...] | None] = {}
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        shapes[vi.name] = tensor_shape(vi)
    for init in inferred.graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    return shapes


def _loss_logits(graph: onnx.GraphProto, output: str) -> str:
    """The tensor the classification loss reads."""
    producer = next((n for n in graph.node if output in n.output), None)
    # Walk back over Identity, then drop a final (Log)Softmax over the last axis: the fused loss
    # computes it stably from the logits.
    while producer is not None and producer.op_type == "Identity":
        output = producer.input[0]
        producer = next((n for n in graph.node if output in n.output), None)
    if producer is not None and producer.op_type in ("Softmax", "LogSoftmax"):
        axis = int(_attr(producer, "axis", -1))  # type: ignore[call-overload]
        if axis in (-1, 1):
            return producer.input[0]
    return output


def _sigmoid_input(graph: onnx.GraphProto, output: str) -> str:
    """The logit a binary classifier's final Sigmoid reads (through any Identity)."""
    producers = {o: n for n in graph.node for o in n.output}
    node = producers.get(output)
    while node is not None and node.op_type == "Identity":
        node = producers.get(node.input[0])
    assert node is not None and node.op_type == "Sigmoid"  # Model.binary promises it
    return node.input[0]


def build_gradient_graph(model: Model, dtype: int = TensorProto.FLOAT) -> GradientGraph:
    """Forward, loss and backward for ``model``, as one ONNX model.

    ``dtype`` FLOAT is what trains; DOUBLE exists for the gradient checks (run with the onnx
    reference evaluator, since onnxruntime lacks float64 kernels for Conv and pooling).
    """
    proto = onnx.ModelProto()
    proto.CopyFrom(model.lifted)
    if dtype == TensorProto.DOUBLE:
        proto = _to_float64(proto)
    _set_opset(proto, max(model.opset, TRAINING_OPSET))
    graph = proto.graph
    output = model.output_name

    # MaxPool gradients need the argmax positions: give every MaxPool an Indices output.
    for node in graph.node:
        if node.op_type == "MaxPool" and (len(node.output) < 2 or not node.output[1]):
            if len(node.output) < 2:
                node.output.append("")
            node.output[1] = f"{node.output[0]}.gossipfl_indices"

    shapes = _infer_shapes(proto)
    b = _Builder(shapes, dtype)
    _data, labels = model.input_name, LABELS
    params = [s.name for s in model.specs]

    # ---- loss and its gradient with respect to the tensor the loss reads
    if model.binary:
        # One logit and a Sigmoid: binary cross-entropy on the logit, softplus(z) - y z, written stably;
        # its gradient is (sigmoid(z) - y) / batch.
        logit = _sigmoid_input(graph, output)
        label_info = helper.make_tensor_value_info(labels, TensorProto.INT64, ["batch"])
        target = b.op("Cast", [b.op("Unsqueeze", [labels, b.const([1], np.int64)])], to=dtype)
        tail = b.op("Exp", [b.op("Neg", [b.op("Abs", [logit])])])
        softplus = b.op("Add", [b.op("Relu", [logit]), b.op("Log", [b.op("Add", [b.const(1.0), tail])])])
        batch = b.op("Cast", [b.op("Gather", [b.op("Shape", [logit]), b.const(0, np.int64)], axis=0)], to=dtype)
        total = b.op("ReduceSum", [b.op("Sub", [softplus, b.op("Mul", [target, logit])])], keepdims=0)
        b.nodes.append(helper.make_node("Div", [total, batch], [LOSS], name=LOSS))
        seed_grad = b.op("Div", [b.op("Sub", [b.op("Sigmoid", [logit]), target]), batch])
        seed_tensor = logit
    elif model.task == "classification":
        logits = _loss_logits(graph, output)
        logits_shape = shapes.get(logits)
        if logits_shape is None or len(logits_shape) != 2 or not isinstance(logits_shape[1], int):
            raise ModelError(f"classifier output {logits!r} must be (batch, classes), got {logits_shape}")
        classes = int(logits_shape[1])
        label_info = helper.make_tensor_value_info(labels, TensorProto.INT64, ["batch"])
        log_probs = b.op("LogSoftmax", [logits], "log_probs", axis=1)
        target = b.op("Unsqueeze", [labels, b.const([1], np.int64)])
        onehot = b.op("Cast", [b.op("Equal", [target, b.const(np.arange(classes, dtype=np.int64))])], to=dtype)
        batch = b.op("Cast", [b.op("Gather", [b.op("Shape", [logits]), b.const(0, np.int64)], axis=0)], to=dtype)
        picked = b.op("ReduceSum", [b.op("Mul", [log_probs, onehot])], keepdims=0)
        b.nodes.append(helper.make_node("Div", [b.op("Neg", [picked]), batch], [LOSS], name=LOSS))
        probs = b.op("Exp", [log_probs])
        seed_grad, seed_tensor = b.op("Div", [b.op("Sub", [probs, onehot]), batch]), logits
    else:
        label_info = helper.make_tensor_value_info(labels, dtype, None)
        if model.task == "anomaly":  # the target is the scaled input; the labels fed are ignored (reconstruction.py)
            target = reconstruction_target(graph, model.input_name)
        else:
            target = b.op("Reshape", [labels, b.op("Shape", [output])])
        diff = b.op("Sub", [output, target])
        count = b.op("Cast", [b.op("Size", [output])], to=dtype)
        squares = b.op("ReduceSum", [b.op("Mul", [diff, diff])], keepdims=0)
        b.nodes.append(helper.make_node("Div", [squares, count], [LOSS], name=LOSS))
        seed_grad = b.op("Div", [b.op("Mul", [diff, b.const(2.0)]), count])
        seed_tensor = output

    # ---- which tensors carry a gradient back to a parameter
    requires: set[str] = set(params)
    for node in graph.node:
        if any(i in requires for i in node.input if i):
            requires.update(o for o in node.output if o)

    grads: dict[str, list[str]] = defaultdict(list)
    grads[seed_tensor].append(seed_grad)

    def total(name: str) -> str | None:
        parts = grads.get(name)
        if not parts:
            return None
        if len(parts) > 1:
            grads[name] = [b.op("Sum", parts, "grad_sum")]
        return grads[name][0]

    for node in reversed(list(graph.node)):
        dy = total(node.output[0]) if node.output else None
        if dy is None:
            continue
        need = [bool(i) and i in requires for i in node.input]
        if not any(need):
            continue
        if node.domain not in ("", "ai.onnx") or node.op_type not in RULES:
            raise UnsupportedOpError(node.op_type, node.name or node.output[0])
        for index, grad in RULES[node.op_type](b, node, dy, need).items():
            if need[index]:
                grads[node.input[index]].append(grad)

    # Parameters outside the path to the loss (an unused initializer) get a zero gradient.
    grad_names: dict[str, str] = {}
    for spec in model.specs:
        name = GRAD_PREFIX + spec.name
        grad = total(spec.name)
        if grad is None:
            grad = b.const(np.zeros(spec.shape, dtype=b.np_dtype))
        b.nodes.append(helper.make_node("Identity", [grad], [name], name=name))
        grad_names[spec.name] = name

    graph.node.extend(b.nodes)
    graph.initializer.extend(b.inits)
    graph.input.append(label_info)
    out_info = list(graph.output)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(LOSS, dtype, []))
    graph.output.extend(out_info)
    for spec in model.specs:
        graph.output.append(helper.make_tensor_value_info(grad_names[spec.name], dtype, spec.shape))
    return GradientGraph(proto, grad_names)


def _set_opset(proto: onnx.ModelProto, version: int) -> None:
    for op in proto.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = version
    proto.ir_version = max(proto.ir_version, helper.find_min_ir_version_for(list(proto.opset_import)))


def _to_float64(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The same model computing in float64: float tensors, casts and constant values widened."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    for vi in (*graph.input, *graph.output, *graph.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(init).astype(np.float64), init.name))
    for node in graph.node:
        for a in node.attribute:
            if a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.DOUBLE
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
    return out
