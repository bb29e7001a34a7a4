"""The schema a model carries, and data read against it: sensor files as devices write them."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from gossipfl.errors import DataError, ModelError
from gossipfl.learning.data import DataSpec, load_directory
from gossipfl.learning.model import Model
from gossipfl.learning.schema import SCHEMA_KEY, Schema, choose_features, class_names
from gossipfl.learning.trainer import Trainer
from gossipfl.learning.zoo import ArchSpec, build

SCHEMA = Schema(("rpm", "temp"), "state", ("faulty", "normal"))


def _model(schema: Schema = SCHEMA, scaling=None) -> Model:
    return build(ArchSpec("mlp", 2, 2, hidden=(4,), schema=schema, scaling=scaling))


def test_the_schema_travels_in_the_model_and_its_checkpoints_and_joins_the_fingerprint():
    model = _model()
    again = Model.from_bytes(model.to_bytes())
    assert again.schema == SCHEMA and again.fingerprint == model.fingerprint
    other = _model(Schema(("temp", "rpm"), "state", ("faulty", "normal")))
    assert other.fingerprint != model.fingerprint, "nodes reading columns in another order must not average"


@pytest.mark.parametrize(("text", "problem"), [
    ("[1]", "must be a JSON object"),
    ('{"features": ["a", "a"]}', "appears twice"),
    ('{"features": ["a", 3]}', "list of strings"),
    ('{"features": ["a", "b", "c"], "label": "label"}', "names 3 features"),
    ('{"features": ["a", "label"], "label": "label"}', "also a feature"),
    ('{"features": ["a", "b"], "classes": ["x", "y", "z"]}', "names 3 classes"),
    ("{" * 5000, "not JSON"),
])
def test_a_hostile_schema_is_refused_with_a_reason(text, problem):
    proto = _model().to_proto()
    for entry in proto.metadata_props:
        if entry.key == SCHEMA_KEY:
            entry.value = text
    with pytest.raises(ModelError, match=problem):
        Model(proto)


def test_files_are_read_by_column_name_with_string_labels_whatever_the_order_or_extra_columns(tmp_path):
    (tmp_path / "a.csv").write_text("timestamp,temp,state,rpm\n2026-01-01T00:00,60.5,normal,1470\n"
                                    "2026-01-01T00:01,71.0,faulty,1490\n2026-01-01T00:02,61,broken,1471\n")
    with gzip.open(tmp_path / "b.csv.gz", "wt") as f:
        f.write("rpm;state;temp\n1465;normal;59.5\n")
    (tmp_path / "c.csv").write_text("rpm\ttemp\tstate\n1480\t65\tfaulty\n")
    data = load_directory(tmp_path, DataSpec.of(_model()))
    table = data.all
    assert table.x.tolist() == [[1470, 60.5], [1490, 71.0], [1465, 59.5], [1480, 65]]
    assert table.y.tolist() == [1, 0, 1, 0]  # normal is class 1, faulty class 0
    assert data.skipped_rows == {"label": 1}  # "broken" is not a class of the model


def test_a_missing_feature_column_is_named(tmp_path):
    (tmp_path / "a.csv").write_text("timestamp,state,rpm\nx,normal,1470\n")
    with pytest.raises(DataError, match="no column 'temp', a feature of the model's schema"):
        load_directory(tmp_path, DataSpec.of(_model()))


def test_scaling_constants_are_frozen_and_the_model_learns_raw_units():
    rng = np.random.default_rng(0)
    x = rng.normal([1470.0, 60.0], [10.0, 5.0], (256, 2)).astype(np.float32)
    y = (x[:, 0] + 2 * x[:, 1] > 1470 + 120).astype(np.int64)
    model = _model(scaling=(x.mean(axis=0), x.std(axis=0)))
    assert [s.name for s in model.specs] == ["fc0.weight", "fc0.bias", "head.weight", "head.bias"]
    trainer = Trainer(model)
    for _ in range(60):
        trainer.epoch(x, y)
    assert trainer.evaluate(x, y).accuracy > 0.95
    # The constants are in the graph, unchanged, and not in the parameter vector averaged with peers.
    consts = {i.name: numpy_helper.to_array(i) for i in model.lifted.graph.initializer}
    np.testing.assert_allclose(consts["scaler.mean"], x.mean(axis=0), rtol=1e-6)


def test_sub_and_div_by_constants_in_an_imported_model_are_frozen_not_weights():
    mean = numpy_helper.from_array(np.array([5.0, 6.0], np.float32), "mu")
    std = numpy_helper.from_array(np.array([2.0, 3.0], np.float32), "sigma")
    weight = numpy_helper.from_array(np.ones((2, 2), np.float32), "W")
    nodes = [helper.make_node("Sub", ["x", "mu"], ["c"]), helper.make_node("Div", ["c", "sigma"], ["s"]),
             helper.make_node("MatMul", ["s", "W"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])], [mean, std, weight])
    model = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    assert [s.name for s in model.specs] == ["W"]
    Trainer(model)  # Div on the input needs no gradient: nothing upstream of it is trained


def test_choosing_features_and_naming_classes():
    header = ["timestamp", "rpm", "temp", "state"]
    assert choose_features(header, "state", exclude=["timestamp"]) == ("rpm", "temp")
    assert choose_features(header, "state", include=["temp"]) == ("temp",)
    with pytest.raises(ModelError, match="no column 'tmestamp'"):
        choose_features(header, "state", exclude=["tmestamp"])
    assert class_names(["normal", "faulty", "normal"]) == ("faulty", "normal")
    assert class_names(["10", "9", "1"]) == ("1", "9", "10")
