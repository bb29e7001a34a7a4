from __future__ import annotations

import numpy as np
import onnx
import pytest

from gossipfl.errors import ModelError
from gossipfl.learning.model import Model
from gossipfl.learning.trainer import predict
from gossipfl.learning.zoo import ArchSpec, build

from ..conftest import FIXTURES


def test_views_share_the_flat_vector(mlp):
    first = mlp.specs[0]
    view = mlp.views[first.name]
    assert np.shares_memory(view, mlp.params)
    view[0, 0] = 42.0
    assert mlp.params[first.offset] == 42.0
    mlp.params[:] = 0.5
    assert np.all(view == 0.5)
    assert sum(s.size for s in mlp.specs) == mlp.num_params


def test_set_params_refuses_bad_vectors(mlp):
    with pytest.raises(ModelError, match="elements"):
        mlp.set_params(np.zeros(mlp.num_params + 1, np.float32))
    bad = mlp.params.copy()
    bad[3] = np.nan
    with pytest.raises(ModelError, match="NaN"):
        mlp.set_params(bad)


def test_fingerprint_ignores_values_but_not_structure():
    a = build(ArchSpec("mlp", 64, 10, hidden=(32,), seed=1))
    b = build(ArchSpec("mlp", 64, 10, hidden=(32,), seed=2))
    assert not np.array_equal(a.params, b.params)
    assert a.fingerprint == b.fingerprint
    assert build(ArchSpec("mlp", 64, 10, hidden=(33,))).fingerprint != a.fingerprint
    assert build(ArchSpec("mlp", 64, 10, hidden=(32,), task="classification")).fingerprint == a.fingerprint
    assert build(ArchSpec("logreg", 64, 10)).fingerprint != a.fingerprint


def test_save_and_load_round_trip(tmp_path, mlp):
    mlp.params[:] = np.linspace(-1, 1, mlp.num_params, dtype=np.float32)
    path = tmp_path / "m.onnx"
    mlp.save(path)
    again = Model.load(path)
    assert np.array_equal(again.params, mlp.params)
    assert again.fingerprint == mlp.fingerprint and again.task == mlp.task
    onnx.checker.check_model(onnx.load(path), full_check=True)
    x = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32)
    assert np.allclose(predict(again, x), predict(mlp, x))
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"], "atomic save leaves no temporary files"


def test_copy_is_independent(mlp):
    twin = mlp.copy()
    twin.params[:] = 0
    assert not np.all(mlp.params == 0)
    assert np.all(twin.views[mlp.specs[0].name] == 0)


@pytest.mark.parametrize("content, message", [
    (b"", "not an ONNX model"),
    (b"\x00\x01garbage that is not protobuf\xff\xff", "not an ONNX model"),
    (b"name,label\n1,2\n", "not an ONNX model"),
])
def test_garbage_files_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=message):
        Model.load(path)


def test_truncated_model_is_refused(tmp_path, mlp):
    path = tmp_path / "cut.onnx"
    path.write_bytes(mlp.to_bytes()[:-200])
    with pytest.raises(ModelError):
        Model.load(path)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ModelError, match=r"nope\.onnx"):
        Model.load(tmp_path / "nope.onnx")


def test_pytorch_exports_load_and_match_torch_outputs():
    reference = np.load(FIXTURES / "torch_fixtures_reference.npz")
    for name, key in (("torch_mlp.onnx", "mlp"), ("torch_cnn1d.onnx", "cnn")):
        model = Model.load(FIXTURES / name)
        assert model.task == "classification" and model.num_outputs == 10
        out = predict(model, reference[f"x_{key}"].reshape(len(reference[f"x_{key}"]), -1))
        assert np.allclose(out, reference[f"logits_{key}"], atol=1e-5)
