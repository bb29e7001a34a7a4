"""Gradient checks: every supported operator and both losses against float64 central differences.

onnxruntime has no float64 kernels for Conv, ConvTranspose or GlobalAveragePool, so the float64
graph runs in onnx's reference evaluator (ONNX semantics in numpy). A second check runs the float32
graph in onnxruntime, the path that trains, against the same float64 gradients.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from gossipfl.errors import ModelError, UnsupportedOpError
from gossipfl.learning.autodiff import LABELS, LOSS, SUPPORTED_OPS, build_gradient_graph
from gossipfl.learning.model import TASK_KEY, Model

BATCH = 4
REL_TOL = 1e-5


def make_model(nodes, params: dict[str, np.ndarray], in_shape, out_shape, task="classification",
               consts: dict[str, np.ndarray] | None = None) -> Model:
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items()]
    inits += [numpy_helper.from_array(v, k) for k, v in (consts or {}).items()]
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *in_shape])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", *out_shape])], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    helper.set_model_props(proto, {TASK_KEY: task})
    return Model(proto)


def rnd(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + sum(shape)).normal(0, 0.5, size=shape)


def n(op: str, ins: list[str], out: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, ins, [out], name=f"{op}_{out}", **attrs)


# Each case: a small model whose path from parameters to the loss goes through the operator.
def case_gemm(trans_a: int, trans_b: int) -> Model:
    if trans_a:
        # transA on the data would mix samples, so it is exercised on a product of two parameters
        # that feeds the data path, with alpha and beta away from 1.
        q_shape = (3, 6) if trans_b else (6, 3)
        nodes = [n("Gemm", ["p", "q"], "pq", transA=1, transB=trans_b, alpha=0.7),
                 n("Gemm", ["x", "pq", "c"], "h", alpha=1.3, beta=0.8), n("Relu", ["h"], "out")]
        return make_model(nodes, {"p": rnd(6, 5), "q": rnd(*q_shape), "c": rnd(3)}, [5], [3])
    w_shape = (3, 5) if trans_b else (5, 3)
    nodes = [n("Gemm", ["x", "w"], "h", transB=trans_b), n("Identity", ["h"], "out")]
    return make_model(nodes, {"w": rnd(*w_shape)}, [5], [3])


CASES = {
    "Gemm": lambda: case_gemm(0, 1),
    "Gemm-transB0": lambda: case_gemm(0, 0),
    "Gemm-transA": lambda: case_gemm(1, 0),
    "Gemm-transA-transB": lambda: case_gemm(1, 1),
    "MatMul": lambda: make_model([n("MatMul", ["x", "w"], "h"), n("Add", ["h", "b"], "out")],
                                 {"w": rnd(5, 3), "b": rnd(3)}, [5], [3]),
    "MatMul-3d": lambda: make_model(
        [n("Reshape", ["x", "shape3"], "x3"), n("MatMul", ["x3", "w"], "h3"), n("Flatten", ["h3"], "out", axis=1)],
        {"w": rnd(3, 2)}, [6], [4], consts={"shape3": np.array([-1, 2, 3], np.int64)}),
    "Add": lambda: make_model([n("Gemm", ["x", "w"], "h", transB=1), n("Add", ["h", "b"], "out")],
                              {"w": rnd(3, 5), "b": rnd(1, 3)}, [5], [3]),
    "Sub": lambda: make_model([n("Gemm", ["x", "w"], "h", transB=1), n("Sub", ["b", "h"], "out")],
                              {"w": rnd(3, 5), "b": rnd(3)}, [5], [3]),
    "Mul": lambda: make_model([n("Gemm", ["x", "w"], "h", transB=1), n("Mul", ["h", "s"], "out")],
                              {"w": rnd(3, 5), "s": rnd(3)}, [5], [3]),
    "Div": lambda: make_model([n("Gemm", ["x", "w"], "h", transB=1), n("Div", ["h", "s"], "out")],
                              {"w": rnd(3, 5), "s": 1.5 + np.abs(rnd(3))}, [5], [3]),
    "Div-divisor": lambda: make_model([n("Gemm", ["x", "w", "c"], "h", transB=1), n("Div", ["k", "h"], "out")],
                                      {"w": rnd(3, 5) * 0.1, "c": 2.0 + np.abs(rnd(3))}, [5], [3],
                                      consts={"k": np.array([1.0, 2.0, 3.0], np.float32)}),
    "BatchNormalization": lambda: make_model(
        [n("Gemm", ["x", "w"], "h", transB=1), n("BatchNormalization", ["h", "g", "be", "mu", "var"], "out")],
        {"w": rnd(3, 5), "g": 1 + rnd(3), "be": rnd(3)}, [5], [3],
        consts={"mu": rnd(3).astype(np.float32), "var": (0.5 + np.abs(rnd(3))).astype(np.float32)}),
    "BatchNormalization-conv": lambda: make_model(
        [n("Conv", ["x", "k"], "c"), n("BatchNormalization", ["c", "g", "be", "mu", "var"], "b", epsilon=1e-3),
         n("Flatten", ["b"], "out", axis=1)],
        {"k": rnd(3, 2, 3), "g": 1 + rnd(3), "be": rnd(3)}, [2, 6], [12],
        consts={"mu": rnd(3).astype(np.float32), "var": (0.5 + np.abs(rnd(3))).astype(np.float32)}),
    "Relu": lambda: make_model([n("Gemm", ["x", "w", "b"], "h", transB=1), n("Relu", ["h"], "out")],
                               {"w": rnd(3, 5), "b": rnd(3)}, [5], [3]),
    "LeakyRelu": lambda: make_model([n("Gemm", ["x", "w"], "h", transB=1), n("LeakyRelu", ["h"], "out", alpha=0.2)],
                                    {"w": rnd(3, 5)}, [5], [3]),
    "Sigmoid": lambda: make_model([n("Gemm", ["x", "w"], "h", transB=1), n("Sigmoid", ["h"], "out")],
                                  {"w": rnd(3, 5)}, [5], [3]),
    "Tanh": lambda: make_model([n("Gemm", ["x", "w"], "h", transB=1), n("Tanh", ["h"], "out")],
                               {"w": rnd(3, 5)}, [5], [3]),
    # Softmax and LogSoftmax inside the network (the loss fuses only a final one).
    "Softmax": lambda: make_model([n("Gemm", ["x", "w"], "h", transB=1), n("Softmax", ["h"], "s", axis=1),
                                   n("Gemm", ["s", "v"], "out", transB=1)], {"w": rnd(4, 5), "v": rnd(3, 4)}, [5], [3]),
    "LogSoftmax": lambda: make_model([n("Gemm", ["x", "w"], "h", transB=1), n("LogSoftmax", ["h"], "s", axis=1),
                                      n("Gemm", ["s", "v"], "out", transB=1)], {"w": rnd(4, 5), "v": rnd(3, 4)},
                                     [5], [3]),
    "Flatten": lambda: make_model([n("Conv", ["x", "k"], "c"), n("Flatten", ["c"], "f", axis=1),
                                   n("Gemm", ["f", "w"], "out", transB=1)], {"k": rnd(2, 1, 3), "w": rnd(3, 8)},
                                  [1, 6], [3]),
    "Reshape": lambda: make_model([n("Gemm", ["x", "w"], "h", transB=1), n("Reshape", ["h", "shp"], "r"),
                                   n("Reshape", ["r", "shp2"], "out")], {"w": rnd(6, 5)}, [5], [6],
                                  consts={"shp": np.array([0, 2, 3], np.int64), "shp2": np.array([0, -1], np.int64)}),
    "Identity": lambda: make_model([n("Identity", ["w"], "wi"), n("Gemm", ["x", "wi"], "out", transB=1)],
                                   {"w": rnd(3, 5)}, [5], [3]),
    "Conv": lambda: make_model([n("Conv", ["x", "k", "kb"], "c", pads=[1, 2], strides=[2], dilations=[2]),
                                n("Relu", ["c"], "r"), n("Flatten", ["r"], "f", axis=1),
                                n("Gemm", ["f", "w"], "out", transB=1)],
                               {"k": rnd(3, 2, 3), "kb": rnd(3), "w": rnd(3, 12)}, [2, 9], [3]),
    "MaxPool": lambda: make_model([n("Conv", ["x", "k"], "c", pads=[1, 1]),
                                   n("MaxPool", ["c"], "p", kernel_shape=[3], strides=[2], pads=[1, 1]),
                                   n("Flatten", ["p"], "f", axis=1), n("Gemm", ["f", "w"], "out", transB=1)],
                                  {"k": rnd(2, 1, 3), "w": rnd(3, 8)}, [1, 8], [3]),
    "GlobalAveragePool": lambda: make_model([n("Conv", ["x", "k", "kb"], "c"), n("GlobalAveragePool", ["c"], "g"),
                                             n("Flatten", ["g"], "f", axis=1), n("Gemm", ["f", "w"], "out", transB=1)],
                                            {"k": rnd(4, 2, 3), "kb": rnd(4), "w": rnd(3, 4)}, [2, 7], [3]),
}


def test_every_supported_op_has_a_case():
    covered = {name.split("-")[0] for name in CASES}
    assert covered == set(SUPPORTED_OPS)


def _feeds(model: Model, task: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(BATCH, *model.input_shape[1:]))
    if task == "classification":
        y = rng.integers(0, model.num_outputs, BATCH)
    else:
        y = rng.normal(size=(BATCH, model.num_outputs))
    return {model.input_name: x, LABELS: y}


def _run_reference(model: Model, task: str):
    graph = build_gradient_graph(model, TensorProto.DOUBLE)
    evaluator = ReferenceEvaluator(graph.proto)
    feeds = _feeds(model, task)
    params = {s.name: model.views[s.name].astype(np.float64) for s in model.specs}
    names = [o.name for o in graph.proto.graph.output]
    results = dict(zip(names, evaluator.run(None, {**feeds, **params}), strict=True))
    return graph, evaluator, feeds, params, results


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient_matches_central_differences(case: str, task: str):
    model = CASES[case]()
    model.task = task
    graph, evaluator, feeds, params, results = _run_reference(model, task)
    _check_against_central_differences(model, graph, evaluator, feeds, params, results, f"{case}/{task}")


def _check_against_central_differences(model, graph, evaluator, feeds, params, results, what: str) -> None:
    eps = 1e-6
    for spec in model.specs:
        analytic = results[graph.grad_names[spec.name]]
        numeric = np.zeros_like(analytic)
        flat, out = params[spec.name].reshape(-1), numeric.reshape(-1)
        for i in range(flat.size):
            keep = flat[i]
            flat[i] = keep + eps
            plus = evaluator.run([LOSS], {**feeds, **params})[0]
            flat[i] = keep - eps
            minus = evaluator.run([LOSS], {**feeds, **params})[0]
            flat[i] = keep
            out[i] = (plus - minus) / (2 * eps)
        scale = max(np.linalg.norm(analytic), np.linalg.norm(numeric))
        assert scale > 1e-8, f"{what} {spec.name}: gradient is identically zero, the check proves nothing"
        rel = np.linalg.norm(analytic - numeric) / scale
        assert rel < REL_TOL, f"{what} {spec.name}: relative error {rel:.2e}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_onnxruntime_float32_gradients_agree(case: str):
    model = CASES[case]()
    graph64, _, feeds, _, expected = _run_reference(model, "classification")
    graph32 = build_gradient_graph(model)
    session = ort.InferenceSession(graph32.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds32 = {model.input_name: feeds[model.input_name].astype(np.float32), LABELS: feeds[LABELS],
               **model.views}
    names = [o.name for o in graph32.proto.graph.output]
    got = dict(zip(names, session.run(None, feeds32), strict=True))
    assert abs(got[LOSS] - expected[LOSS]) < 1e-5
    for spec in model.specs:
        g32, g64 = got[graph32.grad_names[spec.name]], expected[graph64.grad_names[spec.name]]
        assert np.linalg.norm(g32 - g64) <= 1e-4 * max(np.linalg.norm(g64), 1e-6), spec.name


def test_final_softmax_is_fused_into_the_loss():
    # Same weights with and without a final Softmax: the loss is the cross-entropy of the logits in both.
    w = rnd(3, 5)
    plain = make_model([n("Gemm", ["x", "w"], "out", transB=1)], {"w": w}, [5], [3])
    soft = make_model([n("Gemm", ["x", "w"], "h", transB=1), n("Softmax", ["h"], "out", axis=1)], {"w": w}, [5], [3])
    losses = [_run_reference(m, "classification")[4][LOSS] for m in (plain, soft)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)


def test_untrainable_op_is_refused_with_its_name():
    model = make_model([n("Gemm", ["x", "w"], "h", transB=1), helper.make_node("Erf", ["h"], ["out"], name="gelu_erf")],
                       {"w": rnd(3, 5)}, [5], [3])
    with pytest.raises(UnsupportedOpError) as err:
        build_gradient_graph(model)
    assert "Erf" in str(err.value) and "gelu_erf" in str(err.value)


def test_untrainable_op_off_the_gradient_path_is_accepted():
    # Erf on the data before any parameter needs no gradient.
    model = make_model([helper.make_node("Erf", ["x"], ["e"]), n("Gemm", ["e", "w"], "out", transB=1)],
                       {"w": rnd(3, 5)}, [5], [3])
    assert set(build_gradient_graph(model).grad_names) == {"w"}


def test_grouped_conv_is_refused():
    model = make_model([n("Conv", ["x", "k"], "c", group=2), n("Flatten", ["c"], "f", axis=1),
                        n("Gemm", ["f", "w"], "out", transB=1)], {"k": rnd(2, 1, 3), "w": rnd(3, 8)}, [2, 6], [3])
    with pytest.raises(UnsupportedOpError, match="grouped"):
        build_gradient_graph(model)


def test_classifier_needs_2d_logits():
    model = make_model([n("Gemm", ["x", "w"], "h", transB=1), n("Reshape", ["h", "s"], "out")],
                       {"w": rnd(4, 5)}, [5], [2, 2], consts={"s": np.array([0, 2, 2], np.int64)})
    model.task = "classification"
    with pytest.raises(ModelError, match="batch, classes"):
        build_gradient_graph(model)


def _binary_model() -> Model:
    """One logit and a Sigmoid, as torch.nn.Linear(5, 1) + torch.sigmoid exports: a binary classifier."""
    nodes = [n("Gemm", ["x", "w", "b"], "h", transB=1), n("Relu", ["h"], "r"),
             n("Gemm", ["r", "v", "c"], "z", transB=1), n("Sigmoid", ["z"], "p"), n("Identity", ["p"], "out")]
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 1])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in
                     {"w": rnd(4, 5), "b": rnd(4), "v": rnd(1, 4), "c": rnd(1)}.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return Model(proto)  # no task in the metadata: the Sigmoid says classification


def test_a_one_logit_sigmoid_model_is_a_binary_classifier_trained_with_cross_entropy():
    model = _binary_model()
    assert model.task == "classification" and model.binary and model.num_classes == 2
    graph = build_gradient_graph(model, TensorProto.DOUBLE)
    evaluator = ReferenceEvaluator(graph.proto)
    params = {s.name: model.views[s.name].astype(np.float64) for s in model.specs}
    rng = np.random.default_rng(3)
    feeds = {"x": rng.normal(size=(BATCH, 5)), LABELS: np.array([0, 1, 1, 0], np.int64)}
    results = dict(zip([o.name for o in graph.proto.graph.output], evaluator.run(None, {**feeds, **params}),
                       strict=True))
    z = np.maximum(feeds["x"] @ params["w"].T + params["b"], 0) @ params["v"].T + params["c"]
    p = 1 / (1 + np.exp(-z[:, 0]))
    y = feeds[LABELS]
    assert abs(results[LOSS] - np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p)))) < 1e-9
    _check_against_central_differences(model, graph, evaluator, feeds, params, results, "binary")


def test_a_binary_classifier_learns_and_reports_two_classes():
    from gossipfl.learning.trainer import Trainer

    model = _binary_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5)).astype(np.float32)
    y = (x[:, 0] - x[:, 1] > 0).astype(np.int64)
    trainer = Trainer(model)
    for _ in range(40):
        trainer.epoch(x, y)
    metrics = trainer.evaluate(x, y)
    assert metrics.accuracy > 0.95 and metrics.confusion.shape == (2, 2)
    assert metrics.balanced_accuracy > 0.95


def test_a_one_output_classifier_without_a_sigmoid_is_refused():
    with pytest.raises(ModelError, match="must end in Sigmoid"):
        make_model([n("Gemm", ["x", "w"], "out", transB=1)], {"w": rnd(1, 5)}, [5], [1])


def test_the_reconstruction_loss_of_an_autoencoder_reads_its_scaled_input_and_its_gradient_checks_out():
    # The target is the scaler's output inside the graph; the labels fed are ignored (reconstruction.py).
    from gossipfl.learning.zoo import ArchSpec, build

    mean, scale = np.array([1.0, -2.0, 0.5]), np.array([2.0, 0.5, 3.0])
    model = build(ArchSpec("autoencoder", 3, 3, hidden=(4, 2, 4), task="anomaly", scaling=(mean, scale), seed=3))
    graph = build_gradient_graph(model, TensorProto.DOUBLE)
    evaluator = ReferenceEvaluator(graph.proto)
    params = {s.name: model.views[s.name].astype(np.float64) for s in model.specs}
    x = np.random.default_rng(5).normal(size=(BATCH, 3)) * scale + mean
    feeds = {model.input_name: x, LABELS: np.full(BATCH, 99.0)}
    names = [o.name for o in graph.proto.graph.output]
    results = dict(zip(names, evaluator.run(None, {**feeds, **params}), strict=True))
    expected = np.mean((results[model.output_name] - (x - mean) / scale) ** 2)
    assert abs(results[LOSS] - expected) < 1e-12
    _check_against_central_differences(model, graph, evaluator, feeds, params, results, "autoencoder")
