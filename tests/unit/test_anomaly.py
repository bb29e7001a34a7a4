"""Anomaly detection with an autoencoder: training on unlabelled rows, scores, the calibrated threshold, ROC AUC,
and the offline CLI, on synthetic multi-channel sensor data. Real onnxruntime, no mocks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from gossipfl.cli import main
from gossipfl.errors import ConfigError, DataError, ModelError
from gossipfl.learning.anomaly import (
    MAX_CAPACITY,
    ThresholdCalibrator,
    anomaly_scores,
    calibrated_threshold,
    precision_recall,
    roc_auc,
)
from gossipfl.learning.data import DataSpec, load_directory, read_file, survey_directory
from gossipfl.learning.model import TASK_KEY, Model
from gossipfl.learning.optim import OptimizerConfig
from gossipfl.learning.reconstruction import reconstruction_target
from gossipfl.learning.schema import Schema
from gossipfl.learning.trainer import TrainConfig, Trainer
from gossipfl.learning.zoo import ArchSpec, autoencoder_hidden, build

NAMES = ("rpm", "temp", "vibration", "current", "pressure", "flow")
# Six channels driven by two hidden factors, each in its own raw units and offset.
MIX = np.array([[1.0, 0.6, -0.8, 0.4, 0.9, -0.5], [0.3, -0.9, 0.5, 1.0, -0.2, 0.8]])
UNITS = np.array([10.0, 1.0, 3.0, 0.05, 100.0, 2.0])
BASE = np.array([1470.0, 60.0, 0.0, 0.3, 1000.0, 5.0])


def normal_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """Correlated channels with noise, as a healthy machine reads them."""
    return (rng.normal(size=(n, 2)) @ MIX + rng.normal(scale=0.1, size=(n, len(NAMES)))) * UNITS + BASE


def anomalous_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """Half of them: one channel offset by 4 standard deviations. The other half: the correlation broken, one
    channel reading a value taken from another healthy row (plausible on its own, so a per-channel range check
    misses it) at least 1.5 standard deviations away from what the other channels imply."""
    rows = normal_rows(rng, n)
    spread = np.sqrt((MIX**2).sum(axis=0) + 0.1**2) * UNITS  # each channel's standard deviation
    channels = rng.integers(0, len(NAMES), n)
    donors = normal_rows(rng, 20 * n)
    for i, c in enumerate(channels):
        if i < n // 2:
            rows[i, c] += 4 * spread[c] * rng.choice([-1.0, 1.0])
        else:
            far = donors[np.abs(donors[:, c] - rows[i, c]) > 1.5 * spread[c], c]
            rows[i, c] = far[i]
    return rows


def train_autoencoder(x: np.ndarray, epochs: int = 30, seed: int = 0) -> Model:
    features = x.shape[1]
    model = build(ArchSpec("autoencoder", features, features, hidden=autoencoder_hidden(features), task="anomaly",
                           scaling=(x.mean(axis=0), x.std(axis=0)), schema=Schema(NAMES), seed=seed))
    trainer = Trainer(model, TrainConfig(optimizer=OptimizerConfig("adam", lr=0.01), seed=seed))
    trainer.fit(x.astype(np.float32), np.zeros(len(x), np.float32), epochs)
    return model


@pytest.fixture(scope="module")
def trained() -> Model:
    return train_autoencoder(normal_rows(np.random.default_rng(0), 2000))


# ---------------------------------------------------------------- the model and its training


def test_a_trained_autoencoder_tells_anomalies_from_normal_rows(trained):
    rng = np.random.default_rng(1)
    normal, anomalous = normal_rows(rng, 1000), anomalous_rows(rng, 100)
    scores = anomaly_scores(trained, np.concatenate([normal, anomalous]))
    truth = np.r_[np.zeros(1000, bool), np.ones(100, bool)]
    assert roc_auc(scores, truth) > 0.95
    broken = np.r_[scores[:1000], scores[1050:]]  # the correlation-broken half alone, whose values are plausible
    assert roc_auc(broken, np.r_[np.zeros(1000, bool), np.ones(50, bool)]) > 0.95


def test_the_score_is_the_mean_squared_error_of_the_scaled_input(trained):
    x = normal_rows(np.random.default_rng(2), 7).astype(np.float32)
    out = Trainer(trained).predict(x)
    mean = next(v for k, v in _constants(trained).items() if k == "scaler.mean")
    scale = next(v for k, v in _constants(trained).items() if k == "scaler.scale")
    expected = (((x - mean) / scale - out) ** 2).mean(axis=1)
    np.testing.assert_allclose(anomaly_scores(trained, x), expected, rtol=1e-4, atol=1e-7)
    metrics = Trainer(trained).evaluate(x, np.zeros(len(x), np.float32))
    assert metrics.loss == pytest.approx(expected.mean(), rel=1e-4)
    assert metrics.rmse == pytest.approx(np.sqrt(expected.mean()), rel=1e-4) and metrics.accuracy is None


def _constants(model: Model) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.lifted.graph.initializer}


def test_the_scaler_is_frozen_and_is_the_reconstruction_target():
    model = build(ArchSpec("autoencoder", 3, 3, hidden=(4, 2, 4), task="anomaly",
                           scaling=(np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 2.0]))))
    assert "scaler.mean" not in {s.name for s in model.specs}
    assert reconstruction_target(model.lifted.graph, model.input_name) == "scaler.out"
    unscaled = build(ArchSpec("autoencoder", 3, 3, hidden=(2,), task="anomaly"))
    assert reconstruction_target(unscaled.lifted.graph, unscaled.input_name) == unscaled.input_name
    again = Model.from_bytes(model.to_bytes())
    assert again.task == "anomaly" and again.fingerprint == model.fingerprint


@pytest.mark.parametrize(("spec", "problem"), [
    (ArchSpec("autoencoder", 4, 4, hidden=(8, 4, 8), task="anomaly"), "smaller than its 4 inputs"),
    (ArchSpec("autoencoder", 4, 4, hidden=(8, 2, 8)), "use --arch autoencoder"),
    (ArchSpec("mlp", 4, 4, hidden=(8,), task="anomaly"), "use --arch autoencoder"),
    (ArchSpec("autoencoder", 4, 3, hidden=(2,), task="anomaly"), "4 outputs, not 3"),
    (ArchSpec("autoencoder", 1, 1, hidden=(1,), task="anomaly"), "at least 2 features"),
])
def test_an_autoencoder_that_could_copy_its_input_or_is_not_one_is_refused(spec, problem):
    with pytest.raises(ModelError, match=problem):
        build(spec)


def test_an_anomaly_model_whose_output_is_not_its_input_shape_is_refused_at_load():
    w = numpy_helper.from_array(np.ones((2, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["out"], transB=1)], "t",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 2])],
                              initializer=[w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    helper.set_model_props(proto, {TASK_KEY: "anomaly"})
    with pytest.raises(ModelError, match="must have the shape of its input"):
        Model(proto)


# ---------------------------------------------------------------- unlabelled data


def test_anomaly_data_needs_no_labels_and_a_label_column_is_never_a_feature(tmp_path):
    (tmp_path / "a.csv").write_text("timestamp,b,a\n1,2.0,1.0\n2,4.0,3.0\n")
    (tmp_path / "b.csv").write_text("a,label,b\n5,faulty,6\n7,,8\n")
    survey = survey_directory(tmp_path, "label", "anomaly", exclude=["timestamp"])
    assert survey.schema.features == ("b", "a") and survey.schema.classes is None and survey.rows == 4
    model = build(ArchSpec("autoencoder", 2, 2, hidden=(1,), task="anomaly", schema=survey.schema))
    table = load_directory(tmp_path, DataSpec.of(model)).all
    assert sorted(table.x.tolist()) == [[2, 1], [4, 3], [6, 5], [8, 7]] and table.y.tolist() == [0, 0, 0, 0]
    labelled = read_file(tmp_path / "b.csv", DataSpec.of(model), raw_labels=True)
    assert labelled.y.tolist() == ["faulty"] and labelled.skipped == {"label": 1}
    with pytest.raises(DataError, match="no label column 'state'"):
        read_file(tmp_path / "a.csv", DataSpec.of(model, "state"), raw_labels=True)


def test_a_named_label_column_must_exist_for_an_anomaly_model_too(tmp_path):
    (tmp_path / "a.csv").write_text("a,b,state\n1,2,normal\n")
    with pytest.raises(DataError, match="no label column 'stat'"):
        survey_directory(tmp_path, "stat", "anomaly", require_label=True)
    assert survey_directory(tmp_path, "state", "anomaly").schema.features == ("a", "b")


# ---------------------------------------------------------------- the threshold


def test_the_calibrated_threshold_flags_about_the_configured_rate_of_normal_rows(trained):
    rng = np.random.default_rng(3)
    calibrator = ThresholdCalibrator(rate=0.02, capacity=3000)
    for _ in range(5):  # a stream longer than the ring: the threshold is of the most recent 3000
        calibrator.update(anomaly_scores(trained, normal_rows(rng, 1000)))
    assert calibrator.count == 3000 and calibrator.seen == 5000
    fresh = anomaly_scores(trained, normal_rows(rng, 10_000))
    assert 0.01 < float(np.mean(calibrator.is_anomaly(fresh))) < 0.03


def test_the_ring_keeps_the_last_scores_in_order():
    calibrator = ThresholdCalibrator(rate=0.1, capacity=5)
    assert calibrator.threshold is None
    calibrator.update([1.0, 2.0, 3.0])
    assert calibrator.recent().tolist() == [1, 2, 3]
    calibrator.update([4.0, 5.0, 6.0, 7.0])
    assert calibrator.recent().tolist() == [3, 4, 5, 6, 7] and calibrator.seen == 7
    calibrator.update(np.arange(100, 112, dtype=float))
    assert calibrator.recent().tolist() == [107, 108, 109, 110, 111]
    assert calibrator.threshold == pytest.approx(np.quantile([107, 108, 109, 110, 111], 0.9))
    assert calibrator.is_anomaly([110.0, 111.0]).tolist() == [False, True]
    assert calibrated_threshold(np.arange(101, dtype=float), 0.05) == pytest.approx(95.0)


def test_the_calibrator_state_round_trips_through_json():
    calibrator = ThresholdCalibrator(rate=0.05, capacity=4)
    calibrator.update([0.5, 0.1, 0.2, 0.9, 0.3, 0.4])
    again = ThresholdCalibrator.from_dict(json.loads(json.dumps(calibrator.to_dict())))
    assert again.recent().tolist() == calibrator.recent().tolist() and again.seen == 6
    assert again.threshold == calibrator.threshold and again.rate == 0.05 and again.capacity == 4
    again.update([7.0])
    assert again.recent().tolist() == [0.9, 0.3, 0.4, 7.0]


def _state(**change: object) -> dict[str, object]:
    state: dict[str, object] = {"version": 1, "rate": 0.01, "capacity": 3, "seen": 2, "scores": [0.1, 0.2]}
    state.update(change)
    return state


@pytest.mark.parametrize(("state", "problem"), [
    ([1, 2], "JSON object"),
    (_state(version=2), "version"),
    (_state(rate=0.0), "anomaly rate"),
    (_state(rate=True), "anomaly rate"),
    (_state(rate="0.01"), "anomaly rate"),
    (_state(rate=0.9), "anomaly rate"),
    (_state(capacity=MAX_CAPACITY + 1), "capacity"),
    (_state(capacity=2.5), "capacity"),
    (_state(seen=-1), "seen"),
    (_state(seen=5), "scores must be a list"),
    (_state(scores=[0.1, 0.2, 0.3, 0.4], seen=4), "scores must be a list"),
    (_state(scores=[0.1, "x"]), "must be numbers"),
    (_state(scores=[0.1, True]), "must be numbers"),
    (_state(scores=[0.1, float("nan")]), "finite"),
    (_state(scores=[0.1, -1.0]), "not negative"),
    (_state(scores=[[0.1], [0.2]]), "must be numbers"),
    (_state(scores="0.1,0.2"), "scores must be a list"),
])
def test_a_hostile_calibrator_state_is_refused(state, problem):
    with pytest.raises(DataError, match=problem):
        ThresholdCalibrator.from_dict(state)


def test_bad_rates_and_scores_are_refused():
    with pytest.raises(ConfigError, match="anomaly rate"):
        ThresholdCalibrator(rate=0.0)
    with pytest.raises(ConfigError, match="capacity"):
        ThresholdCalibrator(capacity=0)
    with pytest.raises(DataError, match="finite"):
        ThresholdCalibrator().update([float("inf")])
    with pytest.raises(DataError, match="no threshold yet"):
        ThresholdCalibrator().is_anomaly([1.0])


# ---------------------------------------------------------------- ROC AUC, precision and recall


def _pairwise_auc(scores: np.ndarray, truth: np.ndarray) -> float:
    pos, neg = scores[truth], scores[~truth]
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


def test_roc_auc_counts_ties_as_one_half_like_the_pairwise_definition():
    rng = np.random.default_rng(4)
    scores = rng.integers(0, 6, 300).astype(float)  # many ties
    truth = rng.random(300) < 0.2
    assert roc_auc(scores, truth) == pytest.approx(_pairwise_auc(scores, truth), abs=1e-12)
    assert roc_auc([0.1, 0.2, 0.3], [False, False, True]) == 1.0
    assert roc_auc([0.3, 0.2, 0.1], [False, False, True]) == 0.0
    assert roc_auc([1.0, 1.0, 1.0, 1.0], [True, False, True, False]) == 0.5
    assert roc_auc([0.1, 0.2], [False, False]) is None
    with pytest.raises(DataError, match="booleans"):
        roc_auc([0.1, 0.2], [0, 1])
    with pytest.raises(DataError, match="alike"):
        roc_auc([0.1, 0.2], [True])


def test_precision_and_recall_at_a_threshold():
    got = precision_recall([0.1, 0.5, 0.7, 0.9, 0.2], [False, True, False, True, True], threshold=0.5)
    assert got["flagged"] == 2 and got["precision"] == 0.5 and got["recall"] == pytest.approx(1 / 3)
    assert got["f1"] == pytest.approx(0.4) and got["anomalies"] == 3 and got["count"] == 5
    nothing = precision_recall([0.1, 0.2], [False, True], threshold=1.0)
    assert nothing["precision"] is None and nothing["recall"] == 0.0 and nothing["f1"] == 0.0


# ---------------------------------------------------------------- the CLI


def _write_csv(path: Path, x: np.ndarray, labels: list[str] | None = None) -> None:
    header = ["timestamp", *NAMES] + (["state"] if labels is not None else [])
    lines = [",".join(header)]
    for i, row in enumerate(x):
        lines.append(",".join([f"2026-01-01T{i:06d}", *(f"{v:.6f}" for v in row)] +
                              ([labels[i]] if labels is not None else [])))
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("anomaly")
    rng = np.random.default_rng(5)
    (root / "train").mkdir()
    (root / "test").mkdir()
    _write_csv(root / "train" / "readings.csv", normal_rows(rng, 1500))
    normal, anomalous = normal_rows(rng, 400), anomalous_rows(rng, 40)
    _write_csv(root / "test" / "labelled.csv", np.concatenate([normal, anomalous]),
               ["normal"] * 400 + ["faulty"] * 40)
    _write_csv(root / "new.csv", np.concatenate([normal_rows(rng, 95), anomalous_rows(rng, 6)[:5]]))
    return {"root": root, "train": root / "train", "test": root / "test", "new": root / "new.csv"}


@pytest.fixture(scope="module")
def cli_model(cli_files) -> Path:
    root = cli_files["root"]
    assert main(["model", "init", "--arch", "autoencoder", "--data", str(cli_files["train"]), "--exclude",
                 "timestamp", "--out", str(root / "m.onnx")]) == 0
    assert main(["train", "--model", str(root / "m.onnx"), "--data", str(cli_files["train"]), "--epochs", "30",
                 "--optimizer", "adam", "--lr", "0.01", "--json", "--out", str(root / "m2.onnx")]) == 0
    return root / "m2.onnx"


def test_cli_init_reads_the_features_and_needs_no_label(cli_files, capsys, tmp_path):
    out = tmp_path / "m.onnx"
    assert main(["model", "init", "--arch", "autoencoder", "--data", str(cli_files["train"]), "--exclude",
                 "timestamp", "--hidden", "8,3,8", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "anomaly model" in text and "features (6): rpm, temp, vibration, current, pressure, flow" in text
    model = Model.load(out)
    assert model.task == "anomaly" and model.num_outputs == 6 and model.views["fc1.weight"].shape == (3, 8)


def test_cli_train_predict_and_eval(cli_files, cli_model, capsys):
    capsys.readouterr()
    assert main(["eval", "--model", str(cli_model), "--data", str(cli_files["test"]), "--label-column", "state",
                 "--anomaly-label", "faulty", "--rate", "0.09", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["roc_auc"] > 0.95 and report["anomalies"] == 40 and report["count"] == 440
    assert report["precision"] > 0.8 and report["recall"] > 0.8 and report["threshold"] > 0

    assert main(["predict", "--model", str(cli_model), "--input", str(cli_files["new"]), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 100 and set(rows[0]) == {"score", "anomaly", "threshold"}
    assert 1 <= sum(r["anomaly"] for r in rows) <= 2  # calibrated on these rows at the default rate, 0.01
    assert main(["predict", "--model", str(cli_model), "--input", str(cli_files["new"]), "--rate", "0.05"]) == 0
    captured = capsys.readouterr()
    verdicts = [line.split()[1] for line in captured.out.splitlines()]
    assert len(verdicts) == 100 and verdicts.count("anomaly") == 5
    assert verdicts[95:] == ["anomaly"] * 5  # the five anomalous rows are the ones flagged
    assert "5 of 100 rows above the threshold" in captured.err
    assert main(["predict", "--model", str(cli_model), "--input", str(cli_files["new"]), "--threshold", "1e9",
                 "--json"]) == 0
    assert not any(r["anomaly"] for r in json.loads(capsys.readouterr().out))


@pytest.mark.parametrize(("args", "words"), [
    (["eval", "--data", "{test}", "--label-column", "state", "--anomaly-label", "broken"], "no row of column 'state'"),
    (["eval", "--data", "{test}", "--anomaly-label", "faulty"], "no label column 'label'"),
    (["predict", "--input", "{new}", "--rate", "0.1", "--threshold", "1"], "not both"),
])
def test_cli_errors_are_one_line(cli_files, cli_model, capsys, args, words):
    capsys.readouterr()
    argv = [a.format(test=cli_files["test"], new=cli_files["new"]) for a in args]
    assert main([argv[0], "--model", str(cli_model), *argv[1:]]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and err.startswith("gossipfl: error:")


def test_cli_anomaly_options_on_a_classifier_are_refused(tmp_path, capsys):
    model = tmp_path / "c.onnx"
    build(ArchSpec("mlp", 2, 2, hidden=(3,))).save(model)
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    assert main(["predict", "--model", str(model), "--input", str(tmp_path / "x.csv"), "--rate", "0.1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--rate applies to anomaly models" in err
