"""Training and evaluation of a ``Model`` in plain onnxruntime.

One session runs the whole training step (forward, loss, backward, optimiser update). Parameters and
optimiser state are bound once through IOBinding as views of flat float32 vectors, so a step copies
no weights between Python and onnxruntime; only the batch is bound per step. The updated values land
in a second set of buffers and are copied back in one ``np.copyto`` per vector (see optim.py for why
the graph may not overwrite its own inputs).

Runs are repeatable: the seed fixes the shuffling, and the session is single-threaded by default.

With ``TrainConfig.dp`` set, every step is a DP-SGD step (dpsgd.py): ``train_steps`` draws Poisson batches
and ``step`` refuses, so no caller trains on the data without the privacy mechanism by accident.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from gossipfl.errors import ConfigError, DataError
from gossipfl.learning.autodiff import LABELS, LOSS, GradientGraph, build_gradient_graph
from gossipfl.learning.dpsgd import PROVIDERS, DpSgd, DpSgdConfig, poisson_batch
from gossipfl.learning.model import Model
from gossipfl.learning.optim import ADAM_EPS, LR, NEW_PREFIX, OptimizerConfig, adam_scalars, add_update_step, state_name
from gossipfl.learning.quality import classification_report, confusion_matrix, predicted_classes

EVAL_BATCH = 1024


@dataclass(frozen=True)
class TrainConfig:
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    batch_size: int = 32
    seed: int = 0
    threads: int = 1
    dp: DpSgdConfig | None = None  # None: plain (non-private) training

    def validate(self) -> None:
        self.optimizer.validate()
        if self.dp is not None:
            self.dp.validate()
        if not 1 <= self.batch_size <= 1_000_000:
            raise ConfigError(f"batch_size: {self.batch_size} is out of range (1 to 1000000)")
        if not 1 <= self.threads <= 256:
            raise ConfigError(f"threads: {self.threads} is out of range (1 to 256)")


@dataclass(frozen=True)
class Metrics:
    """How well a model does on some data. ``accuracy`` for classifiers, ``rmse`` for regression (and for an
    anomaly model, of its reconstruction of the scaled input)."""

    loss: float
    count: int
    accuracy: float | None = None
    rmse: float | None = None
    # classifiers: rows of class i predicted as j
    confusion: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def balanced_accuracy(self) -> float | None:
        return None if self.confusion is None else classification_report(self.confusion)["balanced_accuracy"]

    def as_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        base: dict[str, Any] = {"loss": self.loss, "count": self.count, "accuracy": self.accuracy, "rmse": self.rmse}
        if self.confusion is not None:
            report = classification_report(self.confusion, class_names)
            base.update({k: report[k] for k in ("balanced_accuracy", "macro_f1", "per_class", "confusion")})
        return base


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # onnxruntime's warnings go to stderr unformatted; keep errors only
    return options


class _FlatBuffer:
    """A flat float32 vector with per-parameter views, laid out as the model's parameter vector."""

    def __init__(self, model: Model, source: np.ndarray | None = None) -> None:
        self.flat = np.zeros(model.num_params, np.float32) if source is None else source
        self.views = {s.name: self.flat[s.offset : s.offset + s.size].reshape(s.shape) for s in model.specs}


class Trainer:
    """Trains ``model`` in place: ``model.params`` always holds the latest weights."""

    def __init__(self, model: Model, config: TrainConfig | None = None) -> None:
        self.model = model
        self.config = config or TrainConfig()
        self.config.validate()
        self.steps = 0
        options = session_options(self.config.threads)
        opt = self.config.optimizer

        gradient = build_gradient_graph(model)  # refuses untrainable models, naming the operator
        eval_proto = onnx.ModelProto()
        eval_proto.CopyFrom(gradient.proto)
        keep = [o for o in eval_proto.graph.output if o.name in (LOSS, model.output_name)]
        del eval_proto.graph.output[:]
        eval_proto.graph.output.extend(keep)
        self._eval = ort.InferenceSession(eval_proto.SerializeToString(), options, providers=PROVIDERS)

        self.state = {slot: _FlatBuffer(model) for slot in opt.state_slots}
        self._lr = np.array(opt.lr, np.float32)
        self.lr_scale = 1.0  # lowered by ``lower_lr`` when training diverges
        self._eps = np.array(opt.eps, np.float32)
        self._loss = np.zeros((), np.float32)
        self.dp_steps = 0  # private steps taken, empty batches included: what the accountant is stepped by
        self.dp_sample_rate: float | None = None  # q of the last ``train_steps_private``
        self._private: DpSgd | None = None
        if self.config.dp is None:
            self._bind_train_step(gradient, options)
        else:
            state = {slot: buffer.flat for slot, buffer in self.state.items()}
            self._private = DpSgd(model, gradient, opt, self.config.dp, state, self._lr, self._eps,
                                  self.config.seed, options)
        self._rng = np.random.default_rng(self.config.seed)
        self._order: np.ndarray | None = None
        self._cursor = 0
        self._predict: ort.InferenceSession | None = None

    def _bind_train_step(self, gradient: GradientGraph, options: ort.SessionOptions) -> None:
        """The plain training session: forward, backward and update in one run, bound to the buffers."""
        model, opt = self.model, self.config.optimizer
        train_proto = gradient.proto
        shapes = {s.name: s.shape for s in model.specs}
        new_outputs = add_update_step(train_proto, shapes, gradient.grad_names, opt)
        del train_proto.graph.output[:]
        train_proto.graph.output.append(helper.make_tensor_value_info(LOSS, onnx.TensorProto.FLOAT, []))
        for name, shape in new_outputs:
            train_proto.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape))
        self._train = ort.InferenceSession(train_proto.SerializeToString(), options, providers=PROVIDERS)

        # Buffers: parameters (the model's own vector), their next values, optimiser state in and out.
        self._params = _FlatBuffer(model, model.params)
        self._next_params = _FlatBuffer(model)
        self._next_state = {slot: _FlatBuffer(model) for slot in opt.state_slots}

        io = self._train.io_binding()
        self._keep_alive: list[ort.OrtValue] = []

        def bind_in(name: str, array: np.ndarray) -> None:
            value = ort.OrtValue.ortvalue_from_numpy(array)
            self._keep_alive.append(value)
            io.bind_ortvalue_input(name, value)

        def bind_out(name: str, array: np.ndarray) -> None:
            value = ort.OrtValue.ortvalue_from_numpy(array)
            self._keep_alive.append(value)
            io.bind_ortvalue_output(name, value)

        for spec in model.specs:
            bind_in(spec.name, self._params.views[spec.name])
            bind_out(NEW_PREFIX + spec.name, self._next_params.views[spec.name])
            for slot in opt.state_slots:
                bind_in(state_name(slot, spec.name), self.state[slot].views[spec.name])
                bind_out(NEW_PREFIX + state_name(slot, spec.name), self._next_state[slot].views[spec.name])
        bind_in(LR, self._lr)
        if opt.name == "adam":
            bind_in(ADAM_EPS, self._eps)
        bind_out(LOSS, self._loss)
        self._io = io

    # ---------------------------------------------------------------- training

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One optimiser step on one batch; returns the batch's loss before the step."""
        if self._private is not None:
            raise ConfigError("step() trains without differential privacy and training is configured with dp; "
                              "use dp_step or train_steps")
        x = shape_inputs(self.model, x)
        y = self._labels(y)
        self._next_rates()
        self._io.bind_cpu_input(self.model.input_name, x)
        self._io.bind_cpu_input(LABELS, y)
        self._train.run_with_iobinding(self._io)
        np.copyto(self.model.params, self._next_params.flat)
        for slot, buf in self.state.items():
            np.copyto(buf.flat, self._next_state[slot].flat)
        return float(self._loss)

    def _next_rates(self) -> None:
        """Count a step and set the rates it runs with (Adam's bias correction depends on the count)."""
        opt = self.config.optimizer
        self.steps += 1
        if opt.name == "adam":
            lr_t, eps_t = adam_scalars(opt, self.steps)
            self._lr[...] = lr_t * self.lr_scale
            self._eps[...] = eps_t
        else:
            self._lr[...] = opt.lr * self.lr_scale

    def dp_step(self, x: np.ndarray, y: np.ndarray, expected_batch: float) -> float:
        """One DP-SGD step on a (Poisson-drawn, possibly empty) batch: clipped per-sample gradients, noise,
        divided by ``expected_batch`` (q N), then the optimiser. Returns the batch's mean loss before the
        step (NaN for an empty batch). The loss is computed from the raw rows: it is not private."""
        if self._private is None:
            raise ConfigError("dp_step needs TrainConfig.dp (the clip bound and noise multiplier)")
        x = shape_inputs(self.model, x)
        y = self._labels(y)
        loss = self._private.noisy_gradient(x, y, expected_batch)
        self.dp_steps += 1
        self._next_rates()
        self._private.apply()
        return loss / len(x) if len(x) else math.nan

    def train_steps_private(self, x: np.ndarray, y: np.ndarray, steps: int) -> tuple[float, int, int]:
        """``steps`` DP-SGD steps, each on a Poisson batch of (x, y) with q = batch_size / len(x).

        Returns the mean loss over the samples seen (NaN if every batch was empty), the samples seen and
        the steps taken (all of them: an empty batch still adds noise and counts for the accountant).
        """
        if len(x) == 0:
            raise DataError("no training samples")
        q = min(1.0, self.config.batch_size / len(x))
        self.dp_sample_rate = q
        total, samples = 0.0, 0
        for _ in range(steps):
            rows = poisson_batch(self._rng, len(x), q)
            loss = self.dp_step(x[rows], y[rows], q * len(x))
            if len(rows):
                total += loss * len(rows)
                samples += len(rows)
        return (total / samples if samples else math.nan), samples, steps

    def epoch(self, x: np.ndarray, y: np.ndarray, max_steps: int | None = None) -> float:
        """One pass over (x, y) in shuffled batches; returns the mean batch loss."""
        if len(x) == 0:
            raise DataError("no training samples")
        order = self._rng.permutation(len(x))
        xs, ys = np.ascontiguousarray(x[order]), np.ascontiguousarray(y[order])
        size = self.config.batch_size
        losses = []
        for start in range(0, len(xs), size):
            if max_steps is not None and len(losses) >= max_steps:
                break
            losses.append(self.step(xs[start : start + size], ys[start : start + size]))
        return float(np.mean(losses))

    def train_steps(self, x: np.ndarray, y: np.ndarray, steps: int) -> tuple[float, int]:
        """``steps`` batches from a shuffled pass over (x, y) that carries over between calls.

        The daemon trains in short slices between merges; the cursor makes consecutive slices walk
        through an epoch instead of re-drawing the first batches. A new pass starts, reshuffled,
        when the data ends or changes size. Returns the mean loss and the number of samples seen.
        With ``config.dp`` set the steps are private ones (``train_steps_private``) instead.
        """
        if self._private is not None:
            loss, samples, _ = self.train_steps_private(x, y, steps)
            return loss, samples
        if len(x) == 0:
            raise DataError("no training samples")
        if self._order is None or len(self._order) != len(x) or self._cursor >= len(x):
            self._order, self._cursor = self._rng.permutation(len(x)), 0
        losses, samples = [], 0
        for _ in range(steps):
            if self._cursor >= len(x):
                self._order, self._cursor = self._rng.permutation(len(x)), 0
            rows = self._order[self._cursor : self._cursor + self.config.batch_size]
            self._cursor += len(rows)
            losses.append(self.step(x[rows], y[rows]))
            samples += len(rows)
        return float(np.mean(losses)), samples

    @property
    def lr(self) -> float:
        """The step size in use: the configured one times what divergences left of it."""
        return self.config.optimizer.lr * self.lr_scale

    def set_noise(self, noise_multiplier: float) -> None:
        """The noise multiplier of the next private steps (the daemon plans it once it knows its rows)."""
        if self._private is None:
            raise ConfigError("set_noise needs TrainConfig.dp (training is not private)")
        config = DpSgdConfig(self._private.config.clip, noise_multiplier)
        config.validate()
        self._private.config = config

    def lower_lr(self, factor: float = 0.5, floor: float = 1 / 1024) -> bool:
        """Lower the step size after a divergence; False once it is at ``floor`` of the configured one."""
        if self.lr_scale <= floor:
            return False
        self.lr_scale = max(self.lr_scale * factor, floor)
        return True

    def reset_optimizer(self) -> None:
        """Zero the optimiser's state (momentum, Adam moments): a FedAvg round starts each client afresh
        from the global model, and momentum from another starting point would push it off course."""
        for buffer in self.state.values():
            buffer.flat.fill(0)

    def fit(self, x: np.ndarray, y: np.ndarray, epochs: int) -> list[float]:
        return [self.epoch(x, y) for _ in range(epochs)]

    # ---------------------------------------------------------------- evaluation

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> Metrics:
        if len(x) == 0:
            raise DataError("no samples to evaluate on")
        total_loss, squared = 0.0, 0.0
        classes = self.model.num_classes or 0
        confusion = np.zeros((classes, classes), np.int64)
        feeds = {s.name: self.model.views[s.name] for s in self.model.specs}
        for start in range(0, len(x), EVAL_BATCH):
            xb = shape_inputs(self.model, x[start : start + EVAL_BATCH])
            yb = self._labels(y[start : start + EVAL_BATCH])
            loss, out = self._eval.run([LOSS, self.model.output_name],
                                       {**feeds, self.model.input_name: xb, LABELS: yb})
            total_loss += float(loss) * len(xb)
            if self.model.task == "classification":
                confusion += confusion_matrix(yb, predicted_classes(out), classes)
            elif self.model.task == "regression":
                squared += float(np.sum((out.reshape(len(xb), -1) - yb.reshape(len(xb), -1)) ** 2))
        n = len(x)
        if self.model.task == "classification":
            return Metrics(loss=total_loss / n, count=n, accuracy=float(np.trace(confusion)) / n, confusion=confusion)
        if self.model.task == "anomaly":  # the loss is the mean reconstruction error: rmse in the scaler's units
            return Metrics(loss=total_loss / n, count=n, rmse=math.sqrt(max(total_loss / n, 0.0)))
        return Metrics(loss=total_loss / n, count=n, rmse=math.sqrt(squared / (n * self.model.num_outputs)))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The model's own output (class scores or regression values) for each row of ``x``."""
        return predict(self.model, x, session=self._predict_session())

    def _predict_session(self) -> ort.InferenceSession:
        if self._predict is None:
            self._predict = prediction_session(self.model, self.config.threads)
        return self._predict

    # ---------------------------------------------------------------- input checks

    def _labels(self, y: np.ndarray) -> np.ndarray:
        if self.model.task == "classification":
            return np.ascontiguousarray(y, dtype=np.int64)
        return np.ascontiguousarray(y, dtype=np.float32)


def shape_inputs(model: Model, x: np.ndarray) -> np.ndarray:
    """Rows of features reshaped to the model's input, e.g. 64 columns to (1, 64) for a 1-D CNN."""
    x = np.asarray(x)
    per_sample = model.features_per_sample
    if x.ndim < 1 or x.size != len(x) * per_sample:
        got = x.shape[1] if x.ndim == 2 else x.shape[1:]
        raise DataError(f"data has {got} features per sample, the model expects {per_sample}")
    shape = (len(x), *[int(d) for d in model.input_shape[1:]])  # type: ignore[arg-type]
    return np.ascontiguousarray(x.reshape(shape), dtype=np.float32)


def prediction_session(model: Model, threads: int = 1) -> ort.InferenceSession:
    return ort.InferenceSession(model.lifted.SerializeToString(), session_options(threads),
                                providers=["CPUExecutionProvider"])


def predict(model: Model, x: np.ndarray, session: ort.InferenceSession | None = None) -> np.ndarray:
    session = session or prediction_session(model)
    feeds = {s.name: model.views[s.name] for s in model.specs}
    outputs = [
        session.run([model.output_name], {**feeds, model.input_name: shape_inputs(model, x[i : i + EVAL_BATCH])})[0]
        for i in range(0, len(x), EVAL_BATCH)
    ]
    return np.concatenate(outputs) if outputs else np.zeros((0, model.num_outputs), np.float32)
