"""Models people bring from PyTorch (issue 14): scaling written as ``(x - mean) / scale`` with a BatchNorm1d, a
binary classifier with one logit and a Sigmoid, and a model exported with a fixed batch size and its weights in
an external data file. The fixtures were exported by torch (tests/fixtures/make_torch_fixtures.py); these tests
need no torch: they compare with the outputs torch computed (torch_fixtures_reference2.npz), train with the
project's Trainer, and run the real CLI on broken imports, each of which must be one line, never a traceback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from gossipfl.errors import ModelError
from gossipfl.learning.datasets import write_csv
from gossipfl.learning.model import Model
from gossipfl.learning.optim import OptimizerConfig
from gossipfl.learning.trainer import TrainConfig, Trainer, predict

from ..conftest import FIXTURES, one_line_error, run_cli

BN_DIV = "torch_bn_div.onnx"
BINARY = "torch_binary.onnx"
FIXED = "torch_fixed_batch_external.onnx"
FIXED_DATA = FIXED + ".data"  # the name torch gives a model's external data file
ADAM = TrainConfig(optimizer=OptimizerConfig("adam", lr=0.01), batch_size=32, seed=0)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "torch_fixtures_reference2.npz") as npz:
        return {key: npz[key] for key in npz.files}


def _learnable(n: int, features: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Standard normal rows and labels a linear rule gives them: something every one of the models can learn."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, features)).astype(np.float32)
    w = rng.normal(size=(features, classes))
    scores = z @ w
    y = (scores[:, 0] > scores[:, 1]) if classes == 2 else np.argmax(scores, axis=1)
    return z, y.astype(np.int64)


def _initializers(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def _scaling_and_statistics(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The constants of the file's Sub/Div scaling and its BatchNormalization's running mean and variance."""
    inits = _initializers(proto)
    names: set[str] = set()
    for node in proto.graph.node:
        if node.op_type in ("Sub", "Div"):
            names.update(name for name in node.input if name in inits)
        if node.op_type == "BatchNormalization":
            names.update(node.input[3:5])
    return {name: inits[name] for name in names}


def _made_dynamic(directory: Path) -> Path:
    """The fixed-batch export with its batch dimension made symbolic, which is what the refusal asks for, and
    its weights left in the external data file beside it."""
    proto = onnx.load(FIXTURES / FIXED, load_external_data=False)
    for value in (proto.graph.input[0], proto.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"  # replaces the dim_value 1
    assert all(i.data_location == TensorProto.EXTERNAL for i in proto.graph.initializer)
    path = directory / FIXED
    path.write_bytes(proto.SerializeToString())
    shutil.copyfile(FIXTURES / FIXED_DATA, directory / FIXED_DATA)
    return path


# ---------------------------------------------------------------- (x - mean) / scale and BatchNorm1d


def test_scaling_and_batchnorm_load_match_torch_and_are_not_trainable(reference: dict[str, np.ndarray]) -> None:
    model = Model.load(FIXTURES / BN_DIV)
    assert model.task == "classification" and model.num_classes == 3 and not model.binary
    assert np.allclose(predict(model, reference["x_bn_div"]), reference["logits_bn_div"], atol=1e-5)
    frozen = _scaling_and_statistics(onnx.load(FIXTURES / BN_DIV))
    assert set(frozen) == {"mean", "scale", "bn.running_mean", "bn.running_var"}
    trainable = {s.name for s in model.specs}
    assert not trainable & set(frozen)
    assert trainable == {"fc1.weight", "fc1.bias", "bn.weight", "bn.bias", "fc2.weight", "fc2.bias"}
    assert model.num_params == 8 * 16 + 16 + 16 + 16 + 16 * 3 + 3
    # The statistics are the ones torch gathered, not BatchNorm's initial 0 and 1.
    assert not np.allclose(frozen["bn.running_mean"], 0) and not np.allclose(frozen["bn.running_var"], 1)


def test_scaling_and_batchnorm_train_and_keep_their_constants(tmp_path: Path) -> None:
    original = Model.load(FIXTURES / BN_DIV)
    model = Model.load(FIXTURES / BN_DIV)
    frozen = _scaling_and_statistics(onnx.load(FIXTURES / BN_DIV))
    z, y = _learnable(768, 8, 3, seed=1)
    x = frozen["mean"] + frozen["scale"] * z  # rows in the sensors' own units, as the scaling expects
    x_train, y_train, x_test, y_test = x[:512], y[:512], x[512:], y[512:]
    trainer = Trainer(model, ADAM)
    before = trainer.evaluate(x_test, y_test)
    losses = trainer.fit(x_train, y_train, 8)
    after = trainer.evaluate(x_test, y_test)
    assert losses[-1] < losses[0]
    assert after.loss < 0.6 * before.loss and after.accuracy is not None and after.accuracy > 0.85
    assert after.count == len(x_test) and after.confusion is not None and after.confusion.shape == (3, 3)

    trained = _initializers(model.to_proto())
    for name, value in frozen.items():
        assert np.array_equal(trained[name], value), f"{name} changed in training"
    for name in ("bn.weight", "bn.bias"):  # BatchNorm's scale and bias do train
        assert not np.array_equal(trained[name], original.views[name]), name
    model.save(tmp_path / "trained.onnx")
    again = Model.load(tmp_path / "trained.onnx")
    assert again.fingerprint == original.fingerprint  # the constants are part of the fingerprint
    assert np.array_equal(again.params, model.params)


# ---------------------------------------------------------------- one logit and a Sigmoid


def test_one_logit_with_sigmoid_is_a_two_class_classifier(reference: dict[str, np.ndarray]) -> None:
    model = Model.load(FIXTURES / BINARY)
    assert model.task == "classification" and model.binary and model.num_classes == 2 and model.num_outputs == 1
    probability = predict(model, reference["x_binary"])
    assert probability.shape == (8, 1) and np.all((probability > 0) & (probability < 1))
    assert np.allclose(probability, reference["probability_binary"], atol=1e-5)


def test_one_logit_trains_with_binary_cross_entropy() -> None:
    model = Model.load(FIXTURES / BINARY)
    x, y = _learnable(768, 6, 2, seed=2)
    x_train, y_train, x_test, y_test = x[:512], y[:512], x[512:], y[512:]
    trainer = Trainer(model, ADAM)
    before = trainer.evaluate(x_test, y_test)
    p = predict(model, x_test)[:, 0].astype(np.float64)
    cross_entropy = -np.mean(y_test * np.log(p) + (1 - y_test) * np.log(1 - p))
    assert before.loss == pytest.approx(cross_entropy, rel=1e-4)  # the loss is BCE, not a regression's MSE
    losses = trainer.fit(x_train, y_train, 8)
    after = trainer.evaluate(x_test, y_test)
    assert losses[-1] < losses[0] and after.loss < 0.5 * before.loss
    assert after.accuracy is not None and after.accuracy > 0.9
    assert after.confusion is not None and after.confusion.shape == (2, 2)


# ---------------------------------------------------------------- a fixed batch size, weights in external data


def test_a_fixed_batch_size_is_refused_at_load_in_one_line() -> None:
    with pytest.raises(ModelError) as caught:
        Model.load(FIXTURES / FIXED)  # the data file is beside it: the refusal is the batch, not the weights
    message = str(caught.value)
    assert "\n" not in message
    assert FIXED in message and "fixed batch size of 1" in message and "dynamic_axes" in message


def test_external_data_is_embedded_on_load_and_the_model_trains(tmp_path: Path,
                                                                reference: dict[str, np.ndarray]) -> None:
    path = _made_dynamic(tmp_path)
    model = Model.load(path)
    assert model.task == "classification" and model.num_classes == 4 and model.input_shape == ("batch", 12)
    assert np.allclose(predict(model, reference["x_fixed"]), reference["logits_fixed"], atol=1e-5)

    data = model.to_bytes()
    assert FIXED_DATA.encode() not in data
    proto = onnx.load_from_string(data)
    assert all(i.data_location != TensorProto.EXTERNAL and not i.external_data for i in proto.graph.initializer)
    (tmp_path / FIXED_DATA).unlink()  # the loaded model needs the data file no more
    alone = Model.from_bytes(data)
    assert np.array_equal(alone.params, model.params) and alone.fingerprint == model.fingerprint

    x, y = _learnable(768, 12, 4, seed=3)
    trainer = Trainer(model, ADAM)
    before = trainer.evaluate(x[512:], y[512:])
    losses = trainer.fit(x[:512], y[:512], 8)
    after = trainer.evaluate(x[512:], y[512:])
    assert losses[-1] < losses[0] and after.loss < 0.6 * before.loss
    assert after.accuracy is not None and after.accuracy > 0.8


# ---------------------------------------------------------------- the CLI


@pytest.mark.parametrize("name", [BN_DIV, BINARY, FIXED])
def test_model_info_takes_the_exports(tmp_path: Path, name: str) -> None:
    path = _made_dynamic(tmp_path) if name == FIXED else FIXTURES / name
    info = json.loads(run_cli("model", "info", str(path), "--json").stdout)
    assert info["task"] == "classification"
    assert info["outputs"] == {BN_DIV: 3, BINARY: 1, FIXED: 4}[name]
    assert not {"mean", "scale", "bn.running_mean", "bn.running_var"} & set(info["tensors"])


def test_cli_trains_and_evaluates_the_one_logit_classifier(tmp_path: Path) -> None:
    x, y = _learnable(512, 6, 2, seed=4)
    write_csv(tmp_path / "data" / "rows.csv", x, y)
    out = tmp_path / "trained.onnx"
    result = json.loads(run_cli("train", "--model", str(FIXTURES / BINARY), "--data", str(tmp_path / "data"),
                                "--epochs", "6", "--optimizer", "adam", "--lr", "0.01", "--out", str(out),
                                "--json").stdout)
    assert result["losses"][-1] < result["losses"][0] and result["train"]["accuracy"] > 0.9
    metrics = json.loads(run_cli("eval", "--model", str(out), "--data", str(tmp_path / "data"), "--json").stdout)
    assert metrics["accuracy"] > 0.9 and len(metrics["confusion"]) == 2
    assert Model.load(out).binary


def _bad_model(case: str, directory: Path) -> tuple[Path, list[str]]:
    """A broken import and what its one line must name."""
    if case == "truncated":
        path = directory / "cut.onnx"
        whole = (FIXTURES / BN_DIV).read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
        return path, ["cut.onnx", "not an ONNX model"]
    if case == "external data missing":
        shutil.copyfile(FIXTURES / FIXED, directory / FIXED)
        return directory / FIXED, [FIXED_DATA, "No such file or directory"]
    if case == "external data short":
        shutil.copyfile(FIXTURES / FIXED, directory / FIXED)
        (directory / FIXED_DATA).write_bytes((FIXTURES / FIXED_DATA).read_bytes()[:100])
        return directory / FIXED, [FIXED_DATA, "does not hold its"]
    if case == "no gradient rule":
        return FIXTURES / "unsupported_erf.onnx", ["operator Erf", "gelu_erf", "no gradient rule"]
    assert case == "fixed batch"
    return FIXTURES / FIXED, [FIXED, "fixed batch size of 1"]


@pytest.mark.parametrize("command", ["info", "train"])
@pytest.mark.parametrize("case", ["truncated", "external data missing", "external data short", "no gradient rule",
                                  "fixed batch"])
def test_a_bad_import_is_one_line_never_a_traceback(tmp_path: Path, case: str, command: str) -> None:
    path, named = _bad_model(case, tmp_path)
    out = tmp_path / "out.onnx"
    if command == "info":
        proc = run_cli("model", "info", str(path), check=False)
    else:
        x, y = _learnable(64, 6, 2, seed=5)
        write_csv(tmp_path / "data" / "rows.csv", x, y)
        proc = run_cli("train", "--model", str(path), "--data", str(tmp_path / "data"), "--epochs", "1",
                       "--out", str(out), check=False)
    line = one_line_error(proc)
    assert line.startswith("gossipfl: error: ")
    for part in named:
        assert part in line, (part, line)
    assert not out.exists(), "a refused import writes no model"
