from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto
from onnx.reference import ReferenceEvaluator

from gossipfl.errors import ConfigError, DataError
from gossipfl.learning.autodiff import LABELS, build_gradient_graph
from gossipfl.learning.model import Model
from gossipfl.learning.optim import OptimizerConfig
from gossipfl.learning.trainer import TrainConfig, Trainer
from gossipfl.learning.zoo import ArchSpec, build

from ..conftest import FIXTURES, rows


def _grads(model: Model, x, y) -> dict[str, np.ndarray]:
    graph = build_gradient_graph(model, TensorProto.DOUBLE)
    names = [o.name for o in graph.proto.graph.output]
    feeds = {model.input_name: x.astype(np.float64), LABELS: y,
             **{s.name: model.views[s.name].astype(np.float64) for s in model.specs}}
    out = dict(zip(names, ReferenceEvaluator(graph.proto).run(None, feeds), strict=True))
    return {s.name: out[graph.grad_names[s.name]] for s in model.specs}


@pytest.mark.parametrize("opt", [
    OptimizerConfig("sgd", lr=0.1, momentum=0.0),
    OptimizerConfig("sgd", lr=0.1, momentum=0.9, weight_decay=0.01),
    OptimizerConfig("adam", lr=0.01),
])
def test_in_graph_step_matches_the_textbook_update(opt):
    model = build(ArchSpec("mlp", 6, 3, hidden=(5,), seed=1))
    x, y = rows(8, 6, 3)
    trainer = Trainer(model, TrainConfig(optimizer=opt))
    p = {s.name: model.views[s.name].astype(np.float64).copy() for s in model.specs}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(v) for k, v in p.items()}
    for t in range(1, 4):
        grads = _grads(model, x, y)
        trainer.step(x, y)
        for name, g in grads.items():
            g = g + opt.weight_decay * p[name]
            if opt.name == "sgd":
                m[name] = opt.momentum * m[name] + g
                p[name] -= opt.lr * m[name]
            else:
                m[name] = opt.beta1 * m[name] + (1 - opt.beta1) * g
                v[name] = opt.beta2 * v[name] + (1 - opt.beta2) * g * g
                mhat, vhat = m[name] / (1 - opt.beta1**t), v[name] / (1 - opt.beta2**t)
                p[name] -= opt.lr * mhat / (np.sqrt(vhat) + opt.eps)
            assert np.allclose(model.views[name], p[name], atol=2e-6), (t, name)


def test_training_lowers_loss_on_digits(digits):
    x_train, y_train, x_test, y_test = digits
    cnn = ArchSpec("cnn1d", 64, 10, hidden=(8, 16), input_shape=(1, 64))
    for spec, opt in [(ArchSpec("mlp", 64, 10, hidden=(64,)), OptimizerConfig("sgd", lr=0.05)),
                      (cnn, OptimizerConfig("adam", lr=0.01))]:
        model = build(spec)
        trainer = Trainer(model, TrainConfig(optimizer=opt))
        before = trainer.evaluate(x_test, y_test)
        trainer.fit(x_train, y_train, 5)
        after = trainer.evaluate(x_test, y_test)
        assert after.loss < 0.7 * before.loss, spec.arch
        assert after.accuracy > before.accuracy + 0.2, spec.arch


@pytest.mark.parametrize("fixture", ["torch_mlp.onnx", "torch_cnn1d.onnx"])
def test_pytorch_exports_train(digits, fixture):
    x_train, y_train, x_test, y_test = digits
    model = Model.load(FIXTURES / fixture)
    trainer = Trainer(model, TrainConfig(optimizer=OptimizerConfig("adam", lr=0.005)))
    before = trainer.evaluate(x_test, y_test)
    trainer.fit(x_train, y_train, 3)
    after = trainer.evaluate(x_test, y_test)
    assert after.loss < 0.5 * before.loss
    assert after.accuracy > 0.8


def test_regression_head_learns_a_linear_map():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 4)).astype(np.float32)
    y = (x @ np.array([1.5, -2.0, 0.5, 0.0]) + 0.3).astype(np.float32)
    model = build(ArchSpec("logreg", 4, 1, task="regression"))
    trainer = Trainer(model, TrainConfig(optimizer=OptimizerConfig("sgd", lr=0.05)))
    before = trainer.evaluate(x, y).rmse
    trainer.fit(x, y, 20)
    after = trainer.evaluate(x, y)
    assert after.rmse < 0.05 < before
    assert after.accuracy is None


def test_same_seed_same_run(digits):
    x_train, y_train, _, _ = digits
    results = []
    for _ in range(2):
        model = build(ArchSpec("mlp", 64, 10, hidden=(32,), seed=5))
        Trainer(model, TrainConfig(seed=9)).fit(x_train, y_train, 2)
        results.append(model.params.copy())
    assert np.array_equal(results[0], results[1])
    other = build(ArchSpec("mlp", 64, 10, hidden=(32,), seed=5))
    Trainer(other, TrainConfig(seed=10)).fit(x_train, y_train, 2)
    assert not np.array_equal(other.params, results[0])


def test_external_parameter_changes_are_seen_by_the_next_step(mlp):
    x, y = rows(16, 64, 10)
    trainer = Trainer(mlp, TrainConfig(optimizer=OptimizerConfig("sgd", lr=0.1, momentum=0.0)))
    mlp.set_params(np.zeros(mlp.num_params, np.float32))  # as a gossip merge would
    trainer.step(x, y)
    # From all-zero weights only the output bias gets a gradient in the first step.
    nonzero = {s.name for s in mlp.specs if np.any(mlp.views[s.name] != 0)}
    assert nonzero == {"head.bias"}


def test_wrong_feature_count_is_a_data_error(mlp):
    x, y = rows(4, 30, 10)
    with pytest.raises(DataError, match="30 features per sample, the model expects 64"):
        Trainer(mlp).step(x, y)


def test_bad_config_is_refused(mlp):
    with pytest.raises(ConfigError, match="lr"):
        Trainer(mlp, TrainConfig(optimizer=OptimizerConfig(lr=-1)))
    with pytest.raises(ConfigError, match="batch_size"):
        Trainer(mlp, TrainConfig(batch_size=0))
