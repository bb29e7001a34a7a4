"""The offline CLI, run as a real process, as an operator runs it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from gossipfl.cli.cli_control import _problems
from gossipfl.learning.datasets import write_csv

from ..conftest import FIXTURES, one_line_error, run_cli

gossipfl = run_cli


def test_init_train_eval_predict_on_digits(tmp_path, digits_dirs):
    train_dir, test_dir = digits_dirs
    model, trained = tmp_path / "m.onnx", tmp_path / "t.onnx"
    gossipfl("model", "init", "--arch", "mlp", "--inputs", "64", "--classes", "10", "--hidden", "128",
             "--out", str(model))
    untrained = json.loads(gossipfl("eval", "--model", str(model), "--data", str(test_dir), "--json").stdout)
    gossipfl("train", "--model", str(model), "--data", str(train_dir), "--epochs", "20", "--out", str(trained))
    result = json.loads(gossipfl("eval", "--model", str(trained), "--data", str(test_dir), "--json").stdout)
    assert result["accuracy"] >= 0.95, result
    assert result["count"] == 449 and result["loss"] < untrained["loss"]
    human = gossipfl("eval", "--model", str(trained), "--data", str(test_dir)).stdout
    assert human.startswith(f"accuracy {result['accuracy']:.4f}")

    out = json.loads(gossipfl("predict", "--model", str(trained), "--input", str(test_dir / "digits.csv"),
                              "--json").stdout)
    labels = np.loadtxt(test_dir / "digits.csv", delimiter=",", skiprows=1)[:, -1]
    agree = np.mean([row["label"] == lbl for row, lbl in zip(out, labels, strict=True)])
    assert agree == pytest.approx(result["accuracy"])
    plain = gossipfl("predict", "--model", str(trained), "--input", str(test_dir / "digits.csv")).stdout.split()
    assert [int(v) for v in plain] == [row["label"] for row in out]


def test_model_zoo_variants(tmp_path):
    for args in (["--arch", "logreg", "--inputs", "8", "--classes", "3"],
                 ["--arch", "cnn1d", "--inputs", "32", "--classes", "4", "--input-shape", "2,16", "--hidden", "4,8"],
                 ["--arch", "mlp", "--inputs", "5", "--task", "regression", "--hidden", "16,8"]):
        out = tmp_path / "z.onnx"
        gossipfl("model", "init", *args, "--out", str(out))
        info = json.loads(gossipfl("model", "info", str(out), "--json").stdout)
        assert info["parameters"] > 0 and len(info["fingerprint"]) == 64


def test_a_fixed_input_range_scales_without_reading_rows(tmp_path):
    """--input-range builds the scaler from public constants: [lo, hi] maps to [-1, 1] whatever the data holds."""
    data = tmp_path / "d"
    data.mkdir()
    (data / "a.csv").write_text("x,y,label\n0,10,a\n0,30,b\n0,20,a\n")  # x never moves: a fitted scaler would
    out = tmp_path / "m.onnx"
    said = gossipfl("model", "init", "--arch", "logreg", "--data", str(data), "--input-range=-40:85",
                    "--out", str(out)).stdout
    assert "scaled from -40..85 to -1..1" in said and "standardised" not in said
    inits = {t.name: t for t in onnx.load(out).graph.initializer}
    assert np.allclose(numpy_helper.to_array(inits["scaler.mean"]), 22.5)
    assert np.allclose(numpy_helper.to_array(inits["scaler.scale"]), 62.5)
    for bad, problem in (("1:0", "LO below HI"), ("0:inf", "finite"), ("5", "LO:HI")):
        line = one_line_error(gossipfl("model", "init", "--arch", "logreg", "--inputs", "2", "--classes", "2",
                                       "--input-range", bad, "--out", str(out), check=False))
        assert "--input-range" in line and problem in line, line
    line = one_line_error(gossipfl("model", "init", "--arch", "logreg", "--data", str(data), "--input-range",
                                   "0:1", "--no-scaling", "--out", str(out), check=False))
    assert "drop --no-scaling" in line


def test_regression_train_and_predict(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 3))
    y = x @ np.array([1.0, -1.0, 2.0])
    lines = ["a,b,c,label", *(",".join(f"{v:.6f}" for v in (*r, t)) for r, t in zip(x, y, strict=True))]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "r.csv").write_text("\n".join(lines) + "\n")
    model = tmp_path / "r.onnx"
    gossipfl("model", "init", "--arch", "logreg", "--inputs", "3", "--task", "regression", "--out", str(model))
    gossipfl("train", "--model", str(model), "--data", str(tmp_path / "d"), "--epochs", "30", "--lr", "0.02",
             "--out", str(model))
    result = json.loads(gossipfl("eval", "--model", str(model), "--data", str(tmp_path / "d"), "--json").stdout)
    assert result["rmse"] < 0.05 and result["accuracy"] is None
    values = gossipfl("predict", "--model", str(model), "--input", str(tmp_path / "d" / "r.csv")).stdout.split()
    assert np.allclose([float(v) for v in values], y, atol=0.2)


@pytest.fixture
def small_model(tmp_path):
    path = tmp_path / "small.onnx"
    gossipfl("model", "init", "--arch", "logreg", "--inputs", "3", "--classes", "2", "--out", str(path))
    return path


def test_bad_model_files(tmp_path, small_model):
    data = tmp_path / "data"
    write_csv(data / "a.csv", np.ones((4, 3)), np.array([0, 1, 0, 1]))
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(small_model.read_bytes()[: len(small_model.read_bytes()) // 2])
    text = tmp_path / "text.onnx"
    text.write_text("hello, I am not a model\n")
    for bad in (corrupt, text, tmp_path / "absent.onnx"):
        line = one_line_error(gossipfl("eval", "--model", str(bad), "--data", str(data), check=False))
        assert str(bad.name) in line
    line = one_line_error(gossipfl("train", "--model", str(FIXTURES / "unsupported_erf.onnx"), "--data", str(data),
                                   "--epochs", "1", "--out", str(tmp_path / "o.onnx"), check=False))
    assert "Erf" in line and "gelu" in line


def test_bad_data(tmp_path, small_model):
    cases = {
        "wrong-features": ("f0,f1,label\n1,2,0\n", "2 feature columns, the model expects 3"),
        "nan": ("f0,f1,f2,label\n1,NaN,2,0\n", "every row skipped (not_finite 1)"),
    }
    for name, (text, expected) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.csv").write_text(text)
        line = one_line_error(gossipfl("train", "--model", str(small_model), "--data", str(tmp_path / name),
                                       "--epochs", "1", "--out", str(tmp_path / "o.onnx"), check=False))
        assert expected in line and ("x.csv" in line or name == "nan")
    (tmp_path / "empty").mkdir()
    line = one_line_error(gossipfl("eval", "--model", str(small_model), "--data", str(tmp_path / "empty"),
                                   check=False))
    assert "no .csv or .csv.gz or .npz files" in line
    assert not (tmp_path / "o.onnx").exists(), "a failed run writes no model"


def test_bad_arguments_are_one_line():
    line = one_line_error(gossipfl("train", "--epochs", "zero", check=False))
    assert "error" in line
    line = one_line_error(gossipfl("model", "init", "--arch", "mlp", "--inputs", "4", "--out", "/dev/null",
                                   check=False))
    assert "--classes" in line


def test_status_problems_line_sums_each_family_and_names_the_commonest_reasons():
    assert _problems({"exchanges_in": 5, "control.ok": 3}) == "none"
    counters = {"refused.tls": 2, "refused.blocked": 5, "refused.codec": 1, "refused.outlier": 1,
                "failed.link": 1, "dropped.link": 3, "merges": 9}
    assert _problems(counters) == ("refused 9 (blocked 5, tls 2, codec 1, ...); failed pushes 1 (link 1); "
                                   "dropped links 3 (link 3)")
    # Totals never reset; status's "recent" says how many are new (the counters' growth over ~10 minutes).
    recent = {"seconds": 600.0, "counters": {"refused.tls": 2, "merges": 4}}
    assert _problems(counters, recent) == ("refused 9 (blocked 5, tls 2, codec 1, ...), 2 in the last 10m 0s; "
                                           "failed pushes 1 (link 1), 0 in the last 10m 0s; "
                                           "dropped links 3 (link 3), 0 in the last 10m 0s")


def test_output_cut_short_by_the_reader_ends_quietly(tmp_path, small_model):
    """`gossipfl ... | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    import subprocess
    import sys

    rows = np.random.default_rng(0).normal(size=(20000, 3))
    (tmp_path / "rows.csv").write_text("f0,f1,f2\n" + "\n".join(",".join(f"{v:.3f}" for v in r) for r in rows) + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "gossipfl.cli", "predict", "--model", str(small_model), "--input",
                             str(tmp_path / "rows.csv"), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(10)  # the first bytes, as head would read them
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
