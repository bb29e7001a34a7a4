"""DP-SGD in the ONNX trainer: per-sample clipping, noise, Poisson batches, the ghost-clipping fast path.

Everything runs in real onnxruntime. The per-sample loop (one gradient-graph run per sample) is the
reference the batched ghost-clipping path is held to.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from gossipfl.errors import ConfigError, ModelError
from gossipfl.learning.autodiff import build_gradient_graph
from gossipfl.learning.dpsgd import DpSgd, DpSgdConfig, GhostClipping, PerSampleLoop, linear_layers, poisson_batch
from gossipfl.learning.model import TASK_KEY, Model
from gossipfl.learning.optim import OptimizerConfig
from gossipfl.learning.trainer import TrainConfig, Trainer, session_options, shape_inputs
from gossipfl.learning.zoo import ArchSpec, build

from ..conftest import FIXTURES, rows

SGD = OptimizerConfig("sgd", lr=0.1, momentum=0.0)
MOMENTUM = OptimizerConfig("sgd", lr=0.1, momentum=0.9, weight_decay=0.01)
ADAM = OptimizerConfig("adam", lr=0.01)


def mlp() -> Model:
    return build(ArchSpec("mlp", 12, 4, hidden=(8,), seed=1))


def cnn() -> Model:
    return build(ArchSpec("cnn1d", 16, 3, hidden=(4, 6), input_shape=(1, 16), seed=2))


def hand_made(binary: bool = False) -> Model:
    """MatMul + Add bias, a Gemm with transB=0, Tanh, LeakyRelu and a final Softmax (or a Sigmoid on one
    output, a binary classifier): the layer forms and losses the zoo's MLP does not use."""
    rng = np.random.default_rng(7)
    out = 1 if binary else 3
    params = {"w0": rng.normal(0, 0.5, (5, 6)), "b0": rng.normal(0, 0.5, (6,)), "w1": rng.normal(0, 0.5, (6, 3)),
              "b1": rng.normal(0, 0.5, (1, 3)), "w2": rng.normal(0, 0.5, (3, out))}
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["m0"]), helper.make_node("Add", ["b0", "m0"], ["h0"]),
             helper.make_node("Tanh", ["h0"], ["t0"]), helper.make_node("Gemm", ["t0", "w1", "b1"], ["h1"]),
             helper.make_node("LeakyRelu", ["h1"], ["r1"], alpha=0.1), helper.make_node("Gemm", ["r1", "w2"], ["z"]),
             helper.make_node("Sigmoid", ["z"], ["out"]) if binary else helper.make_node("Softmax", ["z"], ["out"])]
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", out])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    helper.set_model_props(proto, {TASK_KEY: "classification"})
    return Model(proto)


def data(model: Model, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows for ``model``: class labels, 0/1 for a binary head, float targets for regression."""
    x, y = rows(n, model.features_per_sample, model.num_classes or 2, seed)
    if model.task == "regression":
        y = np.random.default_rng(seed).normal(size=(n, model.num_outputs)).astype(np.float32)
    return x, y


def private(model: Model, clip: float = math.inf, sigma: float = 0.0, opt: OptimizerConfig = SGD,
            seed: int = 0, batch_size: int = 8) -> Trainer:
    return Trainer(model, TrainConfig(optimizer=opt, batch_size=batch_size, seed=seed,
                                      dp=DpSgdConfig(clip=clip, noise_multiplier=sigma)))


def batch(model: Model, x, y) -> tuple[np.ndarray, np.ndarray]:
    return shape_inputs(model, x), np.asarray(y, np.int64 if model.task == "classification" else np.float32)


def per_sample_sum(model: Model, x, y, clip: float) -> np.ndarray:
    loop = PerSampleLoop(model, build_gradient_graph(model), clip, session_options(1))
    loop.accumulate(*batch(model, x, y))
    return loop.sum.copy()


def clipped_sums(model: Model, x, y, clip: float) -> tuple[np.ndarray, np.ndarray, float, float]:
    """The clipped sum by the per-sample loop and by ghost clipping, and both loss sums."""
    gradient, options = build_gradient_graph(model), session_options(1)
    slow, fast = PerSampleLoop(model, gradient, clip, options), GhostClipping(model, gradient, clip, options)
    slow_loss, fast_loss = slow.accumulate(*batch(model, x, y)), fast.accumulate(*batch(model, x, y))
    assert slow.clipped == fast.clipped
    return slow.sum.copy(), fast.sum.copy(), slow_loss, fast_loss


# ---------------------------------------------------------------- DP-SGD without clipping or noise is SGD


@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("opt", [SGD, MOMENTUM, ADAM], ids=["sgd", "momentum", "adam"])
def test_unclipped_noiseless_full_batch_step_is_the_plain_step(make, opt):
    plain_model, dp_model = make(), make()
    x, y = data(plain_model, 10)
    plain = Trainer(plain_model, TrainConfig(optimizer=opt))
    dp = private(dp_model, opt=opt)
    assert dp._private is not None and dp._private.fast == (make is mlp)  # the MLP takes the ghost path
    for _ in range(3):
        plain_loss = plain.step(x, y)
        dp_loss = dp.dp_step(x, y, expected_batch=len(x))
        assert dp_loss == pytest.approx(plain_loss, rel=1e-5)
        np.testing.assert_allclose(dp_model.params, plain_model.params, rtol=1e-5, atol=2e-6)
    assert dp.steps == dp.dp_steps == 3


# ---------------------------------------------------------------- clipping


@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
def test_a_large_gradient_is_clipped_to_the_bound(make):
    model = make()
    x, y = data(model, 6, seed=3)
    clip, expected = 1e-3, 4.0
    assert np.linalg.norm(per_sample_sum(model, x[:1], y[:1], math.inf)) > 100 * clip  # far above the bound
    trainer = private(model, clip=clip)
    before = model.params.copy()
    trainer.dp_step(x[:1], y[:1], expected_batch=expected)
    assert np.linalg.norm(model.params - before) == pytest.approx(SGD.lr * clip / expected, rel=1e-4)

    before = model.params.copy()
    trainer.dp_step(x, y, expected_batch=expected)
    moved = np.linalg.norm(model.params - before)
    assert moved <= SGD.lr * len(x) * clip / expected * (1 + 1e-5)
    assert moved > 0.5 * SGD.lr * clip / expected
    assert trainer._private is not None and trainer._private.clipper.clipped == len(x)


def test_a_gradient_under_the_bound_is_left_alone():
    model = mlp()
    x, y = data(model, 1)
    unclipped = per_sample_sum(model, x, y, math.inf)
    norm = float(np.linalg.norm(unclipped))
    kept = per_sample_sum(model, x, y, 2 * norm)
    np.testing.assert_allclose(kept, unclipped, rtol=1e-6)
    halved = per_sample_sum(model, x, y, norm / 2)
    np.testing.assert_allclose(halved, unclipped / 2, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- noise


def test_noise_has_std_sigma_clip_over_expected_batch():
    model = build(ArchSpec("mlp", 64, 10, hidden=(32,), seed=1))  # 2410 parameters
    sigma, clip, expected = 2.0, 0.5, 4.0
    trainer = private(model, clip=clip, sigma=sigma, opt=OptimizerConfig("sgd", lr=1.0, momentum=0.0), seed=11)
    x, y = data(model, 0)
    moves = []
    for _ in range(4):  # empty batches: the step is the noise alone
        before = model.params.copy()
        loss = trainer.dp_step(x, y, expected_batch=expected)
        moves.append(model.params - before)
        assert math.isnan(loss)
    noise = np.concatenate(moves).astype(np.float64)
    assert noise.size > 9000
    assert np.std(noise) == pytest.approx(sigma * clip / expected, rel=0.05)
    assert abs(np.mean(noise)) < 0.05 * sigma * clip / expected
    assert trainer.dp_steps == 4  # an empty batch still counts


def test_noise_repeats_with_the_seed_and_changes_with_it():
    runs = []
    for seed in (5, 5, 6):
        model = mlp()
        x, y = data(model, 32)
        private(model, clip=1.0, sigma=1.0, seed=seed).train_steps(x, y, 3)
        runs.append(model.params.copy())
    assert np.array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


# ---------------------------------------------------------------- ghost clipping against the per-sample loop


@pytest.mark.parametrize("make", [
    mlp, hand_made, lambda: hand_made(binary=True), lambda: Model.load(FIXTURES / "torch_mlp.onnx"),
    lambda: build(ArchSpec("logreg", 7, 3, seed=4)),
    lambda: build(ArchSpec("mlp", 6, 2, hidden=(5, 4), task="regression", seed=5)),
    lambda: build(ArchSpec("mlp", 5, 3, hidden=(4,), seed=6, scaling=(np.full(5, 0.5), np.full(5, 2.0)))),
    lambda: build(ArchSpec("autoencoder", 5, 5, hidden=(4, 2, 4), task="anomaly", seed=7,
                           scaling=(np.full(5, 0.5), np.full(5, 2.0)))),
], ids=["mlp", "hand-made", "binary", "torch-mlp", "logreg", "regression", "scaled-input", "autoencoder"])
@pytest.mark.parametrize("clip", [math.inf, 0.3, 1e-3])
def test_ghost_clipping_equals_the_per_sample_loop(make, clip):
    model = make()
    assert not isinstance(linear_layers(model), str)
    x, y = data(model, 9, seed=2)
    slow, fast, slow_loss, fast_loss = clipped_sums(model, x, y, clip)
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(slow).max())))
    assert fast_loss == pytest.approx(slow_loss, rel=1e-5)


def test_both_paths_give_the_same_noisy_step():
    results = []
    for fast in (True, False):
        model = mlp()
        x, y = data(model, 8)
        trainer = private(model, clip=0.2, sigma=0.7, opt=ADAM, seed=3)
        assert trainer._private is not None
        state = {slot: buf.flat for slot, buf in trainer.state.items()}
        trainer._private = DpSgd(model, build_gradient_graph(model), ADAM, DpSgdConfig(0.2, 0.7), state,
                                 trainer._lr, trainer._eps, 3, session_options(1), fast=fast)
        for _ in range(3):
            trainer.dp_step(x, y, expected_batch=6.5)
        results.append(model.params.copy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-4, atol=1e-6)


def test_ghost_clipping_refuses_models_that_need_the_loop():
    model = cnn()
    reason = linear_layers(model)
    assert isinstance(reason, str) and "Conv" in reason
    with pytest.raises(ModelError, match="ghost clipping does not apply"):
        GhostClipping(model, build_gradient_graph(model), 1.0, session_options(1))


# ---------------------------------------------------------------- Poisson sampling and the trainer's API


def test_poisson_batches_have_mean_q_n_and_may_be_empty():
    rng = np.random.default_rng(1)
    n, q = 100, 0.04
    sizes = np.array([len(poisson_batch(rng, n, q)) for _ in range(4000)])
    assert sizes.mean() == pytest.approx(q * n, rel=0.05)
    assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.15)  # binomial, not a fixed size
    assert (sizes == 0).any()
    batch = poisson_batch(rng, n, 1.0)
    assert np.array_equal(batch, np.arange(n))


def test_train_steps_is_private_when_dp_is_configured():
    model = mlp()
    x, y = data(model, 40)
    trainer = private(model, clip=1.0, sigma=1.0, batch_size=8)
    loss, samples = trainer.train_steps(x, y, 25)
    assert trainer.dp_steps == trainer.steps == 25
    assert trainer.dp_sample_rate == pytest.approx(8 / 40)
    assert 0 < samples < 25 * 40 and math.isfinite(loss)
    loss, samples, steps = trainer.train_steps_private(x, y, 5)
    assert steps == 5 and trainer.dp_steps == 30
    with pytest.raises(ConfigError, match="without differential privacy"):
        trainer.step(x[:8], y[:8])
    with pytest.raises(ConfigError, match=r"needs TrainConfig\.dp"):
        Trainer(mlp()).dp_step(x, y, 8)


def test_steps_of_empty_batches_count_and_report_no_loss():
    model = mlp()
    x, y = data(model, 200)
    trainer = private(model, clip=1.0, sigma=1.0, batch_size=1)  # q = 1/200: most batches are empty
    before = model.params.copy()
    loss, samples, steps = trainer.train_steps_private(x, y, 3)
    assert steps == 3 and trainer.dp_steps == 3 and samples <= 3
    assert (samples == 0) == math.isnan(loss)
    assert not np.array_equal(model.params, before)  # noise moved the model all the same
    loss, samples, steps = trainer.train_steps_private(x[:1], y[:1], 2)  # q = 1: the one row every step
    assert (samples, steps) == (2, 2) and math.isfinite(loss)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(("clip", "sigma", "message"), [
    (0.0, 1.0, "dp.clip: 0.0 must be a positive number"),
    (-1.0, 1.0, "dp.clip: -1.0 must be a positive number"),
    (math.nan, 1.0, "dp.clip: nan must be a positive number"),
    ("1", 1.0, "dp.clip: '1' must be a positive number"),
    (1.0, -0.5, "dp.noise_multiplier: -0.5 must be a finite number >= 0"),
    (1.0, math.inf, "dp.noise_multiplier: inf must be a finite number >= 0"),
    (1.0, math.nan, "dp.noise_multiplier: nan must be a finite number >= 0"),
    (math.inf, 1.0, "infinite clip bound with noise"),
])
def test_config_validation(clip, sigma, message):
    config = DpSgdConfig(clip=clip, noise_multiplier=sigma)
    with pytest.raises(ConfigError) as caught:
        config.validate()
    assert message in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ConfigError):
        TrainConfig(dp=config).validate()
    with pytest.raises(ConfigError):
        Trainer(mlp(), TrainConfig(dp=config))


def test_valid_configs_pass():
    DpSgdConfig(clip=math.inf, noise_multiplier=0.0).validate()
    DpSgdConfig(clip=1, noise_multiplier=0).validate()
    DpSgdConfig(clip=0.1, noise_multiplier=1.3).validate()
    assert TrainConfig().dp is None
