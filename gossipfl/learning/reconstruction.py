"""What an anomaly model (an autoencoder) reconstructs, and the graph that scores rows by it.

An anomaly model's output is its input as it reconstructs it, in the units the model computes in: after the
frozen scaler (``scaler.mean``/``scaler.scale``, model.py ``_frozen_constants``) when the model has one. The
reconstruction target is therefore not a column of the data but a tensor inside the graph: the end of the
chain of frozen scaling nodes on the data input (the data input itself without a scaler). Reading the target
there, rather than feeding it as a label, is what keeps training unchanged:

- the gradient graph (autodiff.py) uses the regression loss with this tensor in place of the labels, and
  since nothing upstream of it is a parameter, the target carries no gradient of its own;
- the trainer and DP-SGD feed the ``LABELS`` input as for any model (a placeholder per row, which the loss
  never reads), so batching, shuffling and Poisson sampling need no anomaly case;
- the target is in scaled units whatever the raw units of a column, so no channel dominates the loss or the
  score because its readings are large.

The score of a row is its mean squared reconstruction error in those units (``score_proto``): the per-row
version of the training loss, computed by onnxruntime in one graph so the scaler is applied exactly once.
This module only builds graphs; anomaly.py runs them and calibrates thresholds.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gossipfl.errors import ModelError
from gossipfl.learning.model import SCALING_OPS, Model

#: The task of a model trained to reconstruct its (scaled) input and scored by its reconstruction error.
ANOMALY = "anomaly"
#: The output of the scoring graph: one score per row.
SCORE = "gossipfl.score"


def reconstruction_target(graph: onnx.GraphProto, input_name: str) -> str:
    """The scaled input: follow the data input through ``Sub``/``Div``/``Mul``/``Add`` nodes whose other operand
    is a constant (an initializer of ``graph``; trainable ones are graph inputs in a lifted graph), while the
    tensor has exactly that one consumer. Where the chain branches or reaches a layer, it ends."""
    constants = {init.name for init in graph.initializer}
    tensor = input_name
    while True:
        consumers = [node for node in graph.node if tensor in node.input]
        if len(consumers) != 1:
            return tensor
        node = consumers[0]
        if node.op_type not in SCALING_OPS or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            return tensor
        other = node.input[1] if node.input[0] == tensor else node.input[0]
        if other not in constants or (node.op_type == "Div" and node.input[0] != tensor):
            return tensor
        tensor = node.output[0]


def check_anomaly_model(model: Model) -> None:
    """Refuse a model that is not an anomaly model (Model itself checks that its output has its input's shape)."""
    if model.task != ANOMALY:
        raise ModelError(f"this is a {model.task} model, not an anomaly model (build one with --arch autoencoder)")


def score_proto(model: Model) -> onnx.ModelProto:
    """``model``'s lifted graph with one output, ``SCORE``: each row's mean squared difference between the
    output and the reconstruction target. Parameters stay graph inputs, so one session serves every value."""
    check_anomaly_model(model)
    proto = onnx.ModelProto()
    proto.CopyFrom(model.lifted)
    graph = proto.graph
    target = reconstruction_target(graph, model.input_name)
    values = model.features_per_sample
    # Written with ReduceSum (axes as an input since opset 13): ReduceMean's axes moved in opset 18.
    axes = list(range(1, len(model.input_shape)))
    graph.initializer.extend([
        numpy_helper.from_array(np.array(axes, np.int64), "gossipfl.score.axes"),
        numpy_helper.from_array(np.array(values, np.float32), "gossipfl.score.count"),
    ])
    graph.node.extend([
        helper.make_node("Sub", [model.output_name, target], ["gossipfl.score.diff"]),
        helper.make_node("Mul", ["gossipfl.score.diff", "gossipfl.score.diff"], ["gossipfl.score.squares"]),
        helper.make_node("ReduceSum", ["gossipfl.score.squares", "gossipfl.score.axes"], ["gossipfl.score.sum"],
                         keepdims=0),
        helper.make_node("Div", ["gossipfl.score.sum", "gossipfl.score.count"], [SCORE]),
    ])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(SCORE, TensorProto.FLOAT, ["batch"]))
    return proto
