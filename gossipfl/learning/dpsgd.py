"""Record-level differentially private SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy"),
computed the way Opacus computes it, in plain onnxruntime.

One private step, on a batch drawn by Poisson sampling (every row joins independently with probability
q, so the batch may be empty):

1. every sample's own gradient g_i, over all parameters jointly, is clipped to L2 norm at most C:
   g_i * min(1, C / ||g_i||);
2. the clipped gradients are summed and Gaussian noise N(0, (sigma C)^2 I) is added to the sum;
3. the noisy sum is divided by the *expected* batch size q N (not the drawn one, whose size would
   itself reveal who joined), and the configured optimiser (optim.py: SGD, momentum or Adam, with
   weight decay) takes that as its gradient.

Why everything the node does afterwards is private too: one record changes the clipped sum by at most
C in L2, so with the noise each step is a subsampled Gaussian mechanism, and the accountant
(privacy.py) bounds what the whole sequence of noisy gradients reveals. The optimiser's update reads
only those noisy gradients, the public hyperparameters and the previous parameters (themselves a
function of earlier noisy gradients and of what peers sent). So the parameters after every step, and
everything derived from them alone (the model the node gossips, merges with peers' models, the deltas
it sends a gateway, checkpoints), are post-processing of DP-SGD's output, and post-processing cannot
weaken differential privacy. What is *not* covered: anything else computed from the raw data, such
as the training loss these functions return, evaluation metrics on the training rows, or the drawn
batch sizes. They are for the node's own use; sending them out would need their own privacy budget.

The noise (and the trainer's Poisson draws) come from numpy's ``default_rng`` seeded from the training
seed, so runs repeat exactly. That is right for tests and experiments, but an adversary who knows the
seed can subtract the noise and knows which rows were in which batch: a deployment must seed training
from a secret (e.g. ``secrets.randbits(64)``), never from a default or a published value.

Two ways to get the clipped sum, both of which avoid a copy of the model per sample:

* ``PerSampleLoop`` (any model the trainer can train): the gradient graph run on one sample at a
  time, each gradient landing in one flat buffer, clipped and added into one flat sum. This is the
  reference.
* ``GhostClipping`` (models made only of Gemm/MatMul layers with biases and elementwise activations,
  which mix no samples): one batched run. For a linear layer z = W a + b, sample i's weight gradient
  is the outer product delta_i a_i^T, so its squared norm is ||a_i||^2 ||delta_i||^2 (the bias adds
  ||delta_i||^2) without forming it ("ghost norm", Goodfellow 2015). Backprop is linear in the
  output gradient, so weighting sample i's loss by its clip factor c_i weights every delta_i by
  c_i: the clipped sum of a layer is (c * delta)^T A, one matrix product on the deltas the batched
  backward pass already computed.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from gossipfl.errors import ConfigError, ModelError
from gossipfl.learning.autodiff import GRAD_PREFIX, LABELS, LOSS, TRAINING_OPSET, GradientGraph, _infer_shapes
from gossipfl.learning.model import Model
from gossipfl.learning.optim import ADAM_EPS, LR, NEW_PREFIX, OptimizerConfig, add_update_step, state_name

SUM_PREFIX = "gossipfl.dp.sum."
CLIPPED = "gossipfl.dp.clipped"
PROVIDERS = ["CPUExecutionProvider"]


@dataclass(frozen=True)
class DpSgdConfig:
    """``clip`` is C, the L2 bound on each sample's gradient; ``noise_multiplier`` is sigma, the noise's
    standard deviation in units of C. The accountant turns sigma, the sampling rate and the number of
    steps into (epsilon, delta)."""

    clip: float
    noise_multiplier: float

    def validate(self) -> None:
        clip, sigma = self.clip, self.noise_multiplier
        if not isinstance(clip, (int, float)) or math.isnan(clip) or clip <= 0:
            raise ConfigError(f"dp.clip: {clip!r} must be a positive number")
        if not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
            raise ConfigError(f"dp.noise_multiplier: {sigma!r} must be a finite number >= 0")
        if math.isinf(clip) and sigma > 0:
            raise ConfigError("dp.clip: an infinite clip bound with noise gives infinite noise; set a finite clip")


def poisson_batch(rng: np.random.Generator, n: int, q: float) -> np.ndarray:
    """Row indices of a Poisson-sampled batch: each of ``n`` rows joins independently with probability
    ``q``. May be empty; the accountant's analysis (the subsampled Gaussian) assumes exactly this."""
    return np.flatnonzero(rng.random(n) < q)


def flat_views(model: Model, flat: np.ndarray) -> dict[str, np.ndarray]:
    """Per-parameter views of a vector laid out like ``model.params``."""
    return {s.name: flat[s.offset : s.offset + s.size].reshape(s.shape) for s in model.specs}


class _Binder:
    """An IOBinding that keeps the OrtValues it binds alive (they share the numpy arrays' memory)."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.io = session.io_binding()
        self._alive: list[ort.OrtValue] = []

    def bind(self, name: str, array: np.ndarray, output: bool = False) -> None:
        value = ort.OrtValue.ortvalue_from_numpy(array)
        self._alive.append(value)
        (self.io.bind_ortvalue_output if output else self.io.bind_ortvalue_input)(name, value)

    def run(self, x_name: str, x: np.ndarray, y: np.ndarray) -> None:
        self.io.bind_cpu_input(x_name, x)
        self.io.bind_cpu_input(LABELS, y)
        self.session.run_with_iobinding(self.io)


def _prune(proto: onnx.ModelProto, outputs: list[onnx.ValueInfoProto]) -> None:
    """Keep only the nodes and constants that ``outputs`` need (onnxruntime would run the rest)."""
    graph = proto.graph
    needed = {o.name for o in outputs}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.node[:], graph.initializer[:], graph.output[:]
    graph.node.extend(keep)
    graph.initializer.extend(inits)
    graph.output.extend(outputs)


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


# ---------------------------------------------------------------- the clipped sum, general path


class PerSampleLoop:
    """Clipped per-sample gradients summed into ``self.sum``, one gradient-graph run per sample."""

    def __init__(self, model: Model, gradient: GradientGraph, clip: float, options: ort.SessionOptions) -> None:
        self.model = model
        self.clip = float(clip)
        proto = _copy(gradient.proto)
        _prune(proto, [helper.make_tensor_value_info(LOSS, TensorProto.FLOAT, []),
                       *(helper.make_tensor_value_info(gradient.grad_names[s.name], TensorProto.FLOAT, s.shape)
                         for s in model.specs)])
        self._binder = _Binder(ort.InferenceSession(proto.SerializeToString(), options, providers=PROVIDERS))
        self.sum = np.zeros(model.num_params, np.float32)
        self._grad = np.zeros(model.num_params, np.float32)
        self._loss = np.zeros((), np.float32)
        grads = flat_views(model, self._grad)
        for spec in model.specs:
            self._binder.bind(spec.name, model.views[spec.name])
            self._binder.bind(gradient.grad_names[spec.name], grads[spec.name], output=True)
        self._binder.bind(LOSS, self._loss, output=True)
        self.clipped = 0  # samples whose gradient the last call clipped

    def accumulate(self, x: np.ndarray, y: np.ndarray) -> float:
        """Set ``self.sum`` to the sum of the clipped gradients of the rows of (x, y); returns the sum of
        their losses. ``x`` is shaped for the model, ``y`` typed for the loss."""
        self.sum.fill(0)
        self.clipped = 0
        total = 0.0
        for i in range(len(x)):
            self._binder.run(self.model.input_name, x[i : i + 1], y[i : i + 1])
            total += float(self._loss)
            norm = math.sqrt(float(np.dot(self._grad, self._grad)))
            if norm > self.clip:
                self.clipped += 1
                self.sum += self._grad * np.float32(self.clip / norm)
            else:
                self.sum += self._grad
        return total


# ---------------------------------------------------------------- the clipped sum, ghost clipping

_ELEMENTWISE = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Identity", "Add", "Sub", "Mul", "Div"})


@dataclass
class LinearLayer:
    """A Gemm/MatMul layer ghost clipping handles: weight, optional bias, and the tensors it reads."""

    weight: str
    activations: str  # the layer's input a, (batch, in)
    output: str  # the tensor whose gradient is delta: the Gemm/MatMul output
    out_in: bool  # weight laid out (out, in), as Gemm transB=1 and nn.Linear; else (in, out)
    bias: str | None = None


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def linear_layers(model: Model) -> list[LinearLayer] | str:
    """The model's linear layers if ghost clipping applies to it, else why not.

    It applies when every parameter is the weight or bias of exactly one Gemm/MatMul layer on
    (batch, features) rows, and every other node acts on each sample alone (elementwise ops and
    activations, softmax over the class axis): then sample i's gradient is delta_i a_i^T per layer.
    """
    graph = model.lifted.graph
    params = {s.name: s for s in model.specs}
    uses = Counter(i for node in graph.node for i in node.input if i)
    if any(uses[p] != 1 for p in params):
        return "a parameter is read more than once"
    shapes = _infer_shapes(model.lifted)
    layers: dict[str, LinearLayer] = {}
    for node in graph.node:
        op, ins = node.op_type, list(node.input)
        if node.domain not in ("", "ai.onnx"):
            return f"operator {node.domain}.{op}"
        if op in ("Gemm", "MatMul"):
            if len(ins) < 2 or ins[1] not in params or ins[0] in params:
                return f"{op} {node.name!r} is not a layer with a parameter weight"
            if op == "Gemm" and (_attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0
                                 or _attr(node, "beta", 1.0) != 1.0):
                return f"Gemm {node.name!r} has transA, alpha or beta"
            if len(shapes.get(ins[0]) or ()) != 2 or len(params[ins[1]].shape) != 2:
                return f"{op} {node.name!r} does not act on (batch, features) rows"
            out_in = op == "Gemm" and bool(_attr(node, "transB", 0))
            layer = LinearLayer(ins[1], ins[0], node.output[0], out_in)
            width = params[ins[1]].shape[0 if out_in else 1]
            if len(ins) > 2 and ins[2] in params:
                if params[ins[2]].shape not in ((width,), (1, width)):
                    return f"Gemm {node.name!r} has a bias that is not one value per output"
                layer.bias = ins[2]
            layers[node.output[0]] = layer
        elif op not in _ELEMENTWISE and op not in ("Softmax", "LogSoftmax"):
            return f"operator {op} ({node.name!r})"
        elif any(i in params for i in ins):
            bias = [i for i in ins if i in params]
            other = [i for i in ins if i not in params]
            layer = layers.get(other[0]) if op == "Add" and len(bias) == 1 and len(other) == 1 else None
            if layer is None or layer.bias is not None or uses[layer.output] != 1:
                return f"{op} {node.name!r} reads a parameter and is not a layer's bias"
            width = params[layer.weight].shape[0 if layer.out_in else 1]
            if params[bias[0]].shape not in ((width,), (1, width)):
                return f"Add {node.name!r} adds a bias that is not one value per output"
            layer.bias = bias[0]
        elif op in ("Softmax", "LogSoftmax") and (_attr(node, "axis", -1) not in (-1, 1)
                                                   or len(shapes.get(ins[0]) or ()) != 2):
            return f"{op} {node.name!r} is not over the class axis of (batch, classes)"
    covered = {p for layer in layers.values() for p in (layer.weight, layer.bias) if p}
    if covered != set(params):
        return "a parameter is not a linear layer's weight or bias"
    return list(layers.values())


class GhostClipping:
    """The same clipped sum as ``PerSampleLoop`` in one batched run, for models ``linear_layers`` accepts."""

    def __init__(self, model: Model, gradient: GradientGraph, clip: float, options: ort.SessionOptions) -> None:
        layers = linear_layers(model)
        if isinstance(layers, str):
            raise ModelError(f"ghost clipping does not apply to this model: {layers}")
        self.model = model
        proto = _copy(gradient.proto)
        graph = proto.graph
        producers = {o: node for node in graph.node for o in node.output}
        nodes: list[onnx.NodeProto] = []
        inits: dict[str, np.ndarray] = {}

        def const(name: str, value: np.ndarray) -> str:
            inits[f"gossipfl.dp.{name}"] = value
            return f"gossipfl.dp.{name}"

        def op(kind: str, inputs: list[str], name: str, **attrs: object) -> str:
            out = f"gossipfl.dp.{name}"
            nodes.append(helper.make_node(kind, inputs, [out], name=out, **attrs))
            return out

        axis1, axis0 = const("axis1", np.array([1], np.int64)), const("axis0", np.array([0], np.int64))
        one = const("one", np.array(1.0, np.float32))
        deltas: list[str] = []
        norms: list[str] = []
        for k, layer in enumerate(layers):
            # delta (times 1/batch, as LOSS is the batch mean) is the output gradient that autodiff's
            # Gemm rule multiplied into this layer's weight gradient: find it there.
            weight_grad = producers.get(producers[gradient.grad_names[layer.weight]].input[0])
            slot = 0 if layer.out_in else 1
            if weight_grad is None or weight_grad.op_type != "Gemm" or weight_grad.input[1 - slot] != layer.activations:
                raise ModelError(f"ghost clipping: unexpected gradient graph around {layer.weight!r}")
            delta = weight_grad.input[slot]
            deltas.append(delta)
            a2 = op("ReduceSum", [op("Mul", [layer.activations] * 2, f"a2.{k}"), axis1], f"a2sum.{k}", keepdims=0)
            d2 = op("ReduceSum", [op("Mul", [delta, delta], f"d2.{k}"), axis1], f"d2sum.{k}", keepdims=0)
            if layer.bias is not None:
                a2 = op("Add", [a2, one], f"a2b.{k}")
            norms.append(op("Mul", [a2, d2], f"norm2.{k}"))
        total = op("Sum", norms, "norm2") if len(norms) > 1 else norms[0]
        batch = op("Cast", [op("Shape", [deltas[0]], "shape", start=0, end=1)], "batch", to=TensorProto.FLOAT)
        norm = op("Mul", [op("Sqrt", [total], "sqrt"), batch], "norm")  # of sum-loss gradients
        factor = op("Min", [op("Div", [const("clip", np.array(clip, np.float32)), norm], "ratio"), one], "factor")
        weight = op("Unsqueeze", [op("Mul", [factor, batch], "weight"), axis1], "weight2d")
        outputs = [helper.make_tensor_value_info(LOSS, TensorProto.FLOAT, [])]
        shapes = {s.name: s.shape for s in model.specs}
        for k, (layer, delta) in enumerate(zip(layers, deltas, strict=True)):
            scaled = op("Mul", [delta, weight], f"scaled.{k}")
            pair = [scaled, layer.activations] if layer.out_in else [layer.activations, scaled]
            nodes.append(helper.make_node("Gemm", pair, [SUM_PREFIX + layer.weight], transA=1))
            outputs.append(helper.make_tensor_value_info(SUM_PREFIX + layer.weight, TensorProto.FLOAT,
                                                         shapes[layer.weight]))
            if layer.bias is not None:
                summed = op("ReduceSum", [scaled, axis0], f"bias.{k}", keepdims=0)
                shape = const(f"bshape.{k}", np.array(shapes[layer.bias], np.int64))
                nodes.append(helper.make_node("Reshape", [summed, shape], [SUM_PREFIX + layer.bias]))
                outputs.append(helper.make_tensor_value_info(SUM_PREFIX + layer.bias, TensorProto.FLOAT,
                                                             shapes[layer.bias]))
        clipped = op("Cast", [op("Less", [factor, one], "is_clipped")], "clipped_f", to=TensorProto.FLOAT)
        nodes.append(helper.make_node("ReduceSum", [clipped], [CLIPPED], keepdims=0))
        outputs.append(helper.make_tensor_value_info(CLIPPED, TensorProto.FLOAT, []))
        graph.node.extend(nodes)
        graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items())
        _prune(proto, outputs)
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=PROVIDERS)
        self._binder = _Binder(session)
        self.sum = np.zeros(model.num_params, np.float32)
        self._loss = np.zeros((), np.float32)
        sums = flat_views(model, self.sum)
        for spec in model.specs:
            self._binder.bind(spec.name, model.views[spec.name])
            self._binder.bind(SUM_PREFIX + spec.name, sums[spec.name], output=True)
        self._binder.bind(LOSS, self._loss, output=True)
        self._clipped = np.zeros((), np.float32)
        self._binder.bind(CLIPPED, self._clipped, output=True)
        self.clipped = 0

    def accumulate(self, x: np.ndarray, y: np.ndarray) -> float:
        """As ``PerSampleLoop.accumulate``."""
        self.clipped = 0
        if len(x) == 0:
            self.sum.fill(0)
            return 0.0
        self._binder.run(self.model.input_name, x, y)
        self.clipped = int(self._clipped)
        return float(self._loss) * len(x)


# ---------------------------------------------------------------- noise and the optimiser step


class DpSgd:
    """One DP-SGD step at a time: ``noisy_gradient`` fills ``self.gradient``, ``apply`` runs the optimiser.

    The optimiser is optim.py's ``add_update_step`` on a graph whose gradients are inputs, bound to
    ``self.gradient``; parameters are ``model.params`` itself and the optimiser state is the caller's
    (the trainer's, so ``reset_optimizer`` keeps working). ``lr`` and ``eps`` are the caller's 0-d
    arrays, updated in place before each ``apply``.
    """

    def __init__(self, model: Model, gradient: GradientGraph, optimizer: OptimizerConfig, config: DpSgdConfig,
                 state: dict[str, np.ndarray], lr: np.ndarray, eps: np.ndarray, seed: int,
                 options: ort.SessionOptions, fast: bool | None = None) -> None:
        """``fast``: True for ghost clipping (a ModelError if it does not apply), False for the per-sample
        loop, None for ghost clipping where it applies."""
        config.validate()
        self.model = model
        self.config = config
        clipper: GhostClipping | PerSampleLoop | None = None
        if fast is not False:
            try:
                clipper = GhostClipping(model, gradient, config.clip, options)
            except ModelError:
                if fast:
                    raise
        self.clipper: GhostClipping | PerSampleLoop = clipper or PerSampleLoop(model, gradient, config.clip, options)
        self.fast = isinstance(self.clipper, GhostClipping)
        # A stream of its own, so the noise does not shift with how many batches were drawn.
        self._rng = np.random.default_rng([seed, 0x445053])
        self.gradient = self.clipper.sum  # the clipped sum becomes the noisy gradient in place
        self._noise = np.zeros(model.num_params, np.float32)

        opsets = [helper.make_opsetid("", TRAINING_OPSET)]
        proto = helper.make_model(helper.make_graph([], "gossipfl-dp-update", [], []), opset_imports=opsets)
        proto.ir_version = helper.find_min_ir_version_for(opsets)
        shapes = {s.name: s.shape for s in model.specs}
        grads = {name: GRAD_PREFIX + name for name in shapes}
        proto.graph.input.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                                 for name, s in shapes.items() for n in (name, grads[name]))
        new_outputs = add_update_step(proto, shapes, grads, optimizer)
        proto.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in new_outputs)
        self._update = _Binder(ort.InferenceSession(proto.SerializeToString(), options, providers=PROVIDERS))
        self._next_params = np.zeros_like(model.params)
        self._state = state
        self._next_state = {slot: np.zeros_like(flat) for slot, flat in state.items()}
        views = flat_views(model, self.gradient)
        next_params = flat_views(model, self._next_params)
        state_views = {slot: flat_views(model, flat) for slot, flat in state.items()}
        next_state = {slot: flat_views(model, flat) for slot, flat in self._next_state.items()}
        for spec in model.specs:
            self._update.bind(spec.name, model.views[spec.name])
            self._update.bind(grads[spec.name], views[spec.name])
            self._update.bind(NEW_PREFIX + spec.name, next_params[spec.name], output=True)
            for slot in state:
                self._update.bind(state_name(slot, spec.name), state_views[slot][spec.name])
                self._update.bind(NEW_PREFIX + state_name(slot, spec.name), next_state[slot][spec.name], output=True)
        self._update.bind(LR, lr)
        if optimizer.name == "adam":
            self._update.bind(ADAM_EPS, eps)

    def noisy_gradient(self, x: np.ndarray, y: np.ndarray, expected_batch: float) -> float:
        """(sum of clipped per-sample gradients + N(0, (sigma C)^2 I)) / ``expected_batch`` into
        ``self.gradient``; returns the sum of the batch's losses (0 for an empty batch)."""
        if not expected_batch > 0 or not math.isfinite(expected_batch):
            raise ValueError(f"expected batch size {expected_batch!r} must be positive")
        loss = self.clipper.accumulate(x, y)
        sigma = self.config.noise_multiplier * self.config.clip
        if sigma > 0:
            self._rng.standard_normal(dtype=np.float32, out=self._noise)
            self._noise *= np.float32(sigma)
            self.gradient += self._noise
        self.gradient *= np.float32(1.0 / expected_batch)
        return loss

    def apply(self) -> None:
        """The optimiser's step with ``self.gradient`` as the gradient."""
        self._update.session.run_with_iobinding(self._update.io)
        np.copyto(self.model.params, self._next_params)
        for slot, flat in self._state.items():
            np.copyto(flat, self._next_state[slot])
