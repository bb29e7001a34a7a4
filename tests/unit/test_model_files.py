"""Model files are hostile: nothing in one reaches outside the file, and nothing in one runs without bound."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gossipfl.errors import ModelError
from gossipfl.learning.model import Model
from gossipfl.learning.trainer import predict

from ..conftest import one_line_error, run_cli


def _graph(extra_nodes: list[onnx.NodeProto], last: str, inits: list[onnx.TensorProto] = ()) -> onnx.ModelProto:
    """x (1, 4) -> MatMul W -> ``extra_nodes`` -> ``last`` is the output y (1, 2)."""
    weights = numpy_helper.from_array(np.ones((4, 2), np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="matmul"), *extra_nodes,
             helper.make_node("Identity", [last], ["y"], name="out")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])], [weights, *inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _external(name: str, location: str) -> onnx.TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[2])
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return tensor


def test_a_plain_model_of_the_same_shape_loads_and_predicts():
    model = Model(_graph([helper.make_node("Add", ["h", "b"], ["z"], name="add")], "z",
                         [numpy_helper.from_array(np.full(2, 0.5, np.float32), "b")]))
    assert predict(model, np.ones((1, 4), np.float32)).tolist() == [[4.5, 4.5]]


def test_a_constant_node_with_external_data_is_refused_before_onnxruntime_reads_the_file(tmp_path, monkeypatch):
    # The attack: the "constant" is another file's bytes, read relative to wherever the process runs.
    (tmp_path / "secret.bin").write_bytes(np.array([1234.0, 5678.0], np.float32).tobytes())
    monkeypatch.chdir(tmp_path)
    constant = helper.make_node("Constant", [], ["c"], name="leak", value=_external("c", "secret.bin"))
    proto = _graph([constant, helper.make_node("Add", ["h", "c"], ["z"], name="add")], "z")
    with pytest.raises(ModelError, match=r"Constant \(node 'leak'\): attribute 'value' uses external data"):
        Model(proto)
    path = tmp_path / "leak.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(ModelError, match="external data"):
        Model.load(path)


def test_an_initializer_with_external_data_is_refused(tmp_path):
    inits = [_external("b", "secret.bin")]
    with pytest.raises(ModelError, match="initializer 'b' uses external data"):
        Model(_graph([helper.make_node("Add", ["h", "b"], ["z"], name="add")], "z", inits))


def _loop_model(trips: int) -> onnx.ModelProto:
    """y = h + (sum over ``trips`` iterations of 1): a Loop whose count is a constant of the file."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]),
         helper.make_node("Add", ["acc", "one"], ["acc_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(np.ones((1, 2), np.float32), "one")])
    inits = [numpy_helper.from_array(np.array(trips, np.int64), "trips"),
             numpy_helper.from_array(np.array(True), "go")]
    loop = helper.make_node("Loop", ["trips", "go", "h"], ["z"], name="spin", body=body)
    return _graph([loop], "z", inits)


def test_a_loop_is_refused_at_load_so_offline_predict_never_spins(tmp_path):
    with pytest.raises(ModelError, match=r"operator Loop \(node 'spin'\): control flow is not supported"):
        Model(_loop_model(10**12))
    model_path = tmp_path / "spin.onnx"
    model_path.write_bytes(_loop_model(10**12).SerializeToString())
    (tmp_path / "x.csv").write_text("a,b,c,d\n1,2,3,4\n")
    proc = run_cli("predict", "--model", str(model_path), "--input", str(tmp_path / "x.csv"), check=False,
                   timeout=60)
    assert "control flow is not supported" in one_line_error(proc)


def test_a_subgraph_in_any_attribute_is_refused():
    branch = helper.make_graph([helper.make_node("Identity", ["h"], ["o"])], "branch", [],
                               [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, 2])])
    odd = helper.make_node("Identity", ["h"], ["z"], name="odd")
    odd.attribute.append(helper.make_attribute("hidden", branch))
    with pytest.raises(ModelError, match="attribute 'hidden' holds a subgraph"):
        Model(_graph([odd], "z"))


def test_a_fixed_batch_size_is_refused_at_load_in_one_line_that_says_how_to_export():
    proto = _graph([helper.make_node("Add", ["h", "b"], ["z"], name="add")], "z",
                   [numpy_helper.from_array(np.full(2, 0.5, np.float32), "b")])
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    with pytest.raises(ModelError, match="fixed batch size of 1; export it with a dynamic first dimension"):
        Model(proto)


def test_external_weights_beside_the_model_are_embedded_on_load_and_nowhere_else(tmp_path):
    """What torch.onnx.export writes for larger models: the weights in a file beside the model."""
    inits = [numpy_helper.from_array(np.arange(2, dtype=np.float32), "b")]
    proto = _graph([helper.make_node("Add", ["h", "b"], ["z"], name="add")], "z", inits)
    onnx.save_model(proto, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    model = Model.load(tmp_path / "m.onnx")
    assert predict(model, np.ones((1, 4), np.float32)).tolist() == [[4.0, 5.0]]
    assert all(i.data_location != TensorProto.EXTERNAL for i in model.to_proto().graph.initializer)
    with pytest.raises(ModelError, match="external data"):  # bytes alone (a checkpoint, the wire): refused
        Model.from_bytes((tmp_path / "m.onnx").read_bytes())
    (tmp_path / "m.onnx.data").rename(tmp_path / "real.data")
    (tmp_path / "m.onnx.data").symlink_to(tmp_path / "real.data")
    with pytest.raises(ModelError, match="not a regular file"):
        Model.load(tmp_path / "m.onnx")
    raw = (tmp_path / "m.onnx").read_bytes().replace(b"m.onnx.data", b"../etc/pass")
    (tmp_path / "evil.onnx").write_bytes(raw)
    with pytest.raises(ModelError, match="is not a file name beside the model"):
        Model.load(tmp_path / "evil.onnx")
