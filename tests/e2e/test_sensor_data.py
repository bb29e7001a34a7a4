"""Raw sensor data, end to end through the CLI, as a new user brings it: raw units, string labels, a timestamp
column, bad rows and a half-written last line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ..conftest import one_line_error, run_cli

pytestmark = pytest.mark.slow


def _readings(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    rpm = rng.normal(1470, 15, n)
    temp = rng.normal(60, 5, n)
    vibration = rng.normal(0.3, 0.05, n)
    score = (temp - 60) / 5 + (vibration - 0.3) / 0.05 + 0.3 * rng.normal(size=n)
    return np.column_stack([rpm, temp, vibration]), ["faulty" if s > 1.2 else "normal" for s in score]


def _write(path, x: np.ndarray, labels: list[str], *, dirty: bool) -> None:
    lines = ["timestamp,rpm,temp,vibration,state"]
    for i, (row, label) in enumerate(zip(x, labels, strict=True)):
        lines.append(f"2026-11-{1 + i // 1440:02d}T{(i // 60) % 24:02d}:{i % 60:02d},"
                     f"{row[0]:.1f},{row[1]:.2f},{row[2]:.4f},{label}")
    text = "\n".join(lines) + "\n"
    if dirty:  # what devices write: a reading lost, a sensor fault, a garbled line, and a line being written
        text += "2026-11-30T00:00,1471.0,,0.3,normal\n2026-11-30T00:01,nan,61,0.31,normal\n"
        text += "2026-11-30T00:02,1470,60,0.3\n2026-11-30T00:03,1469.5,60.1,0.29,norm"
    path.write_text(text)


def test_raw_sensor_csv_trains_to_the_accuracy_of_hand_standardised_data_and_answers_in_class_names(tmp_path):
    train_dir, test_dir, hand_dir, hand_test = (tmp_path / d for d in ("train", "test", "hand", "hand_test"))
    for d in (train_dir, test_dir, hand_dir, hand_test):
        d.mkdir()
    x, labels = _readings(1500, 0)
    xt, test_labels = _readings(500, 1)
    _write(train_dir / "readings.csv", x, labels, dirty=True)
    _write(test_dir / "readings.csv", xt, test_labels, dirty=False)
    assert 0.05 < labels.count("faulty") / len(labels) < 0.3

    model = tmp_path / "m.onnx"
    out = run_cli("model", "init", "--arch", "mlp", "--data", str(train_dir), "--exclude", "timestamp",
                  "--label-column", "state", "--out", str(model)).stdout
    assert "features (3): rpm, temp, vibration" in out and "classes (2): faulty, normal" in out
    trained = tmp_path / "m2.onnx"
    proc = run_cli("train", "--model", str(model), "--data", str(train_dir), "--epochs", "30", "--out", str(trained))
    assert "skipped 4 rows" in proc.stderr  # the empty cell, the NaN, the short line, the unfinished one
    report = json.loads(run_cli("eval", "--model", str(trained), "--data", str(test_dir), "--json").stdout)

    # The same data standardised by hand, with numeric labels, through the same commands.
    mean, std = x.mean(axis=0), x.std(axis=0)
    for directory, rows, names in ((hand_dir, x, labels), (hand_test, xt, test_labels)):
        body = "\n".join(",".join(f"{v:.6f}" for v in (r - mean) / std) + f",{int(n == 'normal')}"
                         for r, n in zip(rows, names, strict=True))
        (directory / "d.csv").write_text("rpm,temp,vibration,label\n" + body + "\n")
    hand_model, hand_trained = tmp_path / "h.onnx", tmp_path / "h2.onnx"
    run_cli("model", "init", "--arch", "mlp", "--inputs", "3", "--classes", "2", "--out", str(hand_model))
    run_cli("train", "--model", str(hand_model), "--data", str(hand_dir), "--epochs", "30", "--out", str(hand_trained))
    hand = json.loads(run_cli("eval", "--model", str(hand_trained), "--data", str(hand_test), "--json").stdout)

    assert report["accuracy"] >= hand["accuracy"] - 0.02, (report["accuracy"], hand["accuracy"])
    assert report["accuracy"] > 0.9
    assert report["balanced_accuracy"] > 0.8
    per_class = {c["class"]: c for c in report["per_class"]}
    assert set(per_class) == {"faulty", "normal"} and per_class["faulty"]["support"] == test_labels.count("faulty")
    assert sum(map(sum, report["confusion"])) == 500

    (tmp_path / "new.csv").write_text("state,vibration,temp,rpm\n,0.30,60.0,1470\n,0.45,72.0,1470\n")
    answers = json.loads(run_cli("predict", "--model", str(trained), "--input", str(tmp_path / "new.csv"),
                                 "--json").stdout)
    assert [a["class"] for a in answers] == ["normal", "faulty"]
    assert all(abs(sum(a["probabilities"].values()) - 1) < 1e-4 for a in answers)


def test_a_data_file_missing_a_feature_column_is_one_line_naming_it(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    x, labels = _readings(200, 0)
    _write(data / "r.csv", x, labels, dirty=False)
    model = tmp_path / "m.onnx"
    run_cli("model", "init", "--arch", "mlp", "--data", str(data), "--exclude", "timestamp", "--label-column",
            "state", "--out", str(model))
    (data / "r.csv").write_text("timestamp,rpm,state\nx,1470,normal\n")
    proc = run_cli("eval", "--model", str(model), "--data", str(data), check=False)
    assert "no column 'temp', a feature of the model's schema" in one_line_error(proc)


def test_the_daemon_on_sensor_data_counts_skipped_rows_and_config_check_names_a_missing_column(tmp_path):
    from gossipfl.cli.client import ControlClient
    from gossipfl.learning.datasets import load_digits
    from gossipfl.testing.cluster import Cluster, ClusterPlan, free_port_base, prepare

    from ..conftest import wait_for

    dx, dy = load_digits()
    spec = prepare(tmp_path / "node", ClusterPlan(nodes=1, base_port=free_port_base(), mdns=False), dx[:50], dy[:50])[0]
    data = spec.directory / "data"
    for old in data.iterdir():
        old.unlink()
    x, labels = _readings(400, 0)
    _write(data / "readings.csv", x, labels, dirty=True)
    model = tmp_path / "node" / "model.onnx"  # the path every node's config names
    run_cli("model", "init", "--arch", "mlp", "--data", str(data), "--exclude", "timestamp", "--label-column",
            "state", "--out", str(model))
    assert "; data 400 rows, 4 skipped" in run_cli("config", "check", str(spec.config)).stdout
    checked = json.loads(run_cli("config", "check", str(spec.config), "--json").stdout)
    assert checked["ok"] and checked["data"]["rows"] == 400 and checked["node_id"] == spec.node_id.hex()

    with Cluster([spec]) as cluster:
        assert cluster.wait_for_log(spec, "node started", 60), cluster.log_lines(spec)
        status = wait_for(lambda: ControlClient(spec.socket, timeout=10).call("status"), 30, "status")
        assert status["data"]["rows"] == 400
        assert status["data"]["skipped_rows"] == {"empty": 1, "not_finite": 1, "fields": 1, "unterminated": 1}
        assert any("3 data rows skipped" in p for p in status["problems"]), status["problems"]
        assert status["model"]["schema"]["classes"] == ["faulty", "normal"]
        (data / "readings.csv").write_text("timestamp,rpm,state\nx,1470,normal\n")  # a sensor dropped out
        text = run_cli("status", "--socket", str(spec.socket)).stdout
        assert "data " in text
        codes = cluster.stop_all()
    assert codes == {spec.name: 0}
    proc = run_cli("config", "check", str(spec.config), check=False)
    assert "no column 'temp', a feature of the model's schema" in one_line_error(proc)
