"""An ONNX model as gossipfl sees it: a fixed structure plus one contiguous float32 parameter vector.

Everything that moves parameters around (training, the codec, merge rules, checkpoints) wants one
flat vector, so the model's float32 initializers are copied once into ``params`` and each initializer
is exposed as a zero-copy view of it. The ONNX graph is kept with those initializers turned into
graph inputs ("lifted"), so one onnxruntime session serves every parameter value: changing
parameters never rebuilds a session.

The fingerprint hashes the structure (opsets, graph inputs and outputs, nodes, parameter names,
shapes and dtypes, constant initializers) but not the trainable values: two nodes holding "the same
model" in different states have the same fingerprint, and peers with different fingerprints never
exchange parameters.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gossipfl.atomic import write_bytes_atomic
from gossipfl.errors import ModelError
from gossipfl.learning.schema import SCHEMA_KEY, Schema

log = logging.getLogger(__name__)

#: Largest model file accepted, before parsing (a protobuf parser given 2 GB will try to use it).
MAX_MODEL_BYTES = 512 * 1024 * 1024
#: Opsets of the default domain the training-graph builder is written against.
MIN_OPSET, MAX_OPSET = 13, 21
#: IR version written by gossipfl; onnxruntime 1.14 and newer load it.
IR_VERSION = 8
#: "anomaly": a model that reconstructs its scaled input (an autoencoder; reconstruction.py says how it trains).
TASKS = ("classification", "regression", "anomaly")
TASK_KEY = "gossipfl.task"

Dim = int | str | None


@dataclass(frozen=True)
class ParamSpec:
    """Where one trainable initializer lives inside the flat parameter vector."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def tensor_shape(value_info: onnx.ValueInfoProto) -> tuple[Dim, ...] | None:
    """Shape of a graph value: ints where static, the symbol where symbolic, None where unknown."""
    ttype = value_info.type.tensor_type
    if not ttype.HasField("shape"):
        return None
    dims: list[Dim] = []
    for dim in ttype.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


#: Operators that run a subgraph: gossipfl has no gradient rule for them, and a ``Loop`` of 10^12
#: iterations hung offline ``predict``, so a model holding one is refused at load, before any session.
CONTROL_FLOW = frozenset({"Loop", "Scan", "If", "SequenceMap"})


def _tensors_of(attr: onnx.AttributeProto) -> list[onnx.TensorProto]:
    tensors = list(attr.tensors)
    if attr.HasField("t"):
        tensors.append(attr.t)
    if attr.HasField("sparse_tensor"):
        tensors += [attr.sparse_tensor.values, attr.sparse_tensor.indices]
    for sparse in attr.sparse_tensors:
        tensors += [sparse.values, sparse.indices]
    return tensors


def _check_self_contained(graph: onnx.GraphProto) -> None:
    """Refuse data outside the model file anywhere in the graph: a ``Constant`` node whose value lived in
    "external data" at a relative path once made ``predict`` return the bytes of another file. onnxruntime
    resolves such paths itself, so the only safe answer is to never hand it one."""
    for init in graph.initializer:
        if init.data_location == TensorProto.EXTERNAL or init.external_data:
            raise ModelError(f"initializer {init.name!r} uses external data; embed it in the model file")
    for sparse in graph.sparse_initializer:
        if TensorProto.EXTERNAL in (sparse.values.data_location, sparse.indices.data_location):
            raise ModelError(f"sparse initializer {sparse.values.name!r} uses external data")
    for node in graph.node:
        where = f"operator {node.op_type} (node {node.name or (node.output[0] if node.output else '?')!r})"
        if node.op_type in CONTROL_FLOW:
            raise ModelError(f"{where}: control flow is not supported; gossipfl runs feed-forward graphs only")
        for attr in node.attribute:
            if attr.HasField("g") or attr.graphs:
                raise ModelError(f"{where}: attribute {attr.name!r} holds a subgraph; gossipfl runs feed-forward "
                                 "graphs only")
            if any(t.data_location == TensorProto.EXTERNAL or t.external_data for t in _tensors_of(attr)):
                raise ModelError(f"{where}: attribute {attr.name!r} uses external data; embed it in the model file")


#: Elementwise operators that, applied to the data input and a constant, are feature scaling.
SCALING_OPS = frozenset({"Sub", "Div", "Mul", "Add"})


def _frozen_constants(graph: onnx.GraphProto) -> frozenset[str]:
    """Initializers that scale the data input before the first layer: ``Sub``/``Div``/``Mul``/``Add`` nodes
    on the input (or on such a node's output) with an initializer as the other operand. They are frozen,
    constants of the model's structure rather than weights: trained, the scaler's mean and scale drifted like
    weights, and averaged between nodes they would be meaningless. Being constants, they are part of the
    fingerprint, so nodes that scale differently never exchange parameters."""
    initializers = {i.name for i in graph.initializer}
    chain = {i.name for i in graph.input if i.name not in initializers}
    frozen: set[str] = set()
    for node in graph.node:  # nodes are topologically sorted (the checker insists)
        if node.op_type not in SCALING_OPS or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        a, b = node.input
        if a in chain and b in initializers:
            frozen.add(b)
        elif b in chain and a in initializers and node.op_type != "Div":
            frozen.add(a)
        else:
            continue
        chain.add(node.output[0])
    # A constant also used elsewhere (as a weight of a layer) is not only a scaler: leave it trainable.
    elsewhere = {name for node in graph.node if node.op_type not in SCALING_OPS for name in node.input}
    # BatchNormalization's running mean and variance: statistics of the data it was exported with, kept as
    # they are (inference mode; gossipfl.learning.autodiff._batch_norm says why).
    statistics = {name for node in graph.node if node.op_type == "BatchNormalization"
                  for name in node.input[3:5] if name in initializers}
    return frozenset(frozen - elsewhere) | statistics


def _check_opset(proto: onnx.ModelProto) -> int:
    versions = {op.domain: op.version for op in proto.opset_import}
    opset = versions.get("", versions.get("ai.onnx"))
    if opset is None:
        raise ModelError("model imports no opset of the default ONNX domain")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ModelError(f"model uses opset {opset}; gossipfl supports opsets {MIN_OPSET} to {MAX_OPSET}")
    foreign = sorted(d for d in versions if d not in ("", "ai.onnx"))
    if foreign:
        raise ModelError(f"model uses operator domains gossipfl cannot train: {', '.join(foreign)}")
    return opset


def _parse(data: bytes) -> onnx.ModelProto:
    if len(data) > MAX_MODEL_BYTES:
        raise ModelError(f"model is {len(data)} bytes, over the limit of {MAX_MODEL_BYTES}")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as exc:  # protobuf raises its own DecodeError, and others on garbage
        raise ModelError("not an ONNX model (protobuf parse failed)") from exc
    if not proto.graph.node:
        raise ModelError("not an ONNX model (no graph nodes)")
    return proto


def _embed_external_initializers(proto: onnx.ModelProto, directory: Path) -> None:
    """Read the weights ``torch.onnx.export`` puts in a file beside the model into the model itself, so the
    rest of gossipfl sees one self-contained model. Only a plain file name in the model's own directory, a
    regular file (no symlink), with the offset and length the tensor needs: a relative path once made
    ``predict`` return the bytes of another file. Data outside initializers stays refused."""
    budget = MAX_MODEL_BYTES
    for init in proto.graph.initializer:
        if init.data_location != TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in init.external_data}
        location = info.get("location", "")
        if not location or Path(location).name != location or location.startswith("."):
            raise ModelError(f"initializer {init.name!r}: external data {location!r} is not a file name beside "
                             "the model")
        path = directory / location
        try:
            st = path.lstat()
        except OSError as exc:
            raise ModelError(f"initializer {init.name!r}: external data {location}: {exc.strerror}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise ModelError(f"initializer {init.name!r}: external data {location} is not a regular file")
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
            offset, length = int(info.get("offset", 0)), info.get("length")
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelError(f"initializer {init.name!r}: external data of an unreadable type or offset") from exc
        needed = int(np.prod(init.dims, dtype=np.int64)) * itemsize
        if (length is not None and int(length) != needed) or offset < 0 or offset + needed > st.st_size:
            raise ModelError(f"initializer {init.name!r}: external data {location} does not hold its "
                             f"{needed} bytes at offset {offset}")
        budget -= needed
        if budget < 0:
            raise ModelError(f"external data over the limit of {MAX_MODEL_BYTES} bytes")
        with path.open("rb") as handle:
            handle.seek(offset)
            init.raw_data = handle.read(needed)
        del init.external_data[:]
        init.data_location = TensorProto.DEFAULT


class Model:
    """A validated ONNX model with its parameters held in one float32 vector."""

    def __init__(self, proto: onnx.ModelProto, task: str | None = None) -> None:
        _check_self_contained(proto.graph)  # before the checker, which would follow external paths itself
        try:
            onnx.checker.check_model(proto)
        except (onnx.checker.ValidationError, ValueError) as exc:
            raise ModelError(f"invalid ONNX model: {str(exc).splitlines()[0]}") from exc
        if proto.graph.sparse_initializer:
            raise ModelError("sparse initializers are not supported")
        self.opset = _check_opset(proto)
        graph = proto.graph

        trainable: list[onnx.TensorProto] = []
        constants: list[onnx.TensorProto] = []
        frozen = _frozen_constants(graph)
        for init in graph.initializer:
            if init.name in frozen:
                constants.append(init)
            elif init.data_type == TensorProto.FLOAT:
                trainable.append(init)
            elif init.data_type in (TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16):
                raise ModelError(
                    f"initializer {init.name!r} is {TensorProto.DataType.Name(init.data_type)}; "
                    "gossipfl trains float32 parameters only"
                )
            else:
                constants.append(init)
        if not trainable:
            raise ModelError("model has no float32 initializers, so nothing to train")

        param_names = {t.name for t in trainable}
        data_inputs = [i for i in graph.input if i.name not in param_names and
                       i.name not in {c.name for c in constants}]
        if len(data_inputs) != 1:
            raise ModelError(f"model must have exactly one data input, it has {len(data_inputs)}")
        if len(graph.output) != 1:
            raise ModelError(f"model must have exactly one output, it has {len(graph.output)}")
        data_input = data_inputs[0]
        if data_input.type.tensor_type.elem_type != TensorProto.FLOAT:
            raise ModelError(f"model input {data_input.name!r} must be float32")
        self.input_name: str = data_input.name
        self.input_shape: tuple[Dim, ...] = tensor_shape(data_input) or ()
        if len(self.input_shape) < 2 or any(not isinstance(d, int) for d in self.input_shape[1:]):
            raise ModelError(
                f"model input {self.input_name!r} must be (batch, ...) with static non-batch dimensions, "
                f"got {self.input_shape}"
            )
        if isinstance(self.input_shape[0], int):
            # Trained in batches of 32 and evaluated in batches of 1024, a model exported for one batch size
            # passed `model info` and then crashed `train` inside onnxruntime.
            raise ModelError(
                f"model input {self.input_name!r} has a fixed batch size of {self.input_shape[0]}; export it with "
                f"a dynamic first dimension (torch.onnx.export(..., dynamic_axes={{{self.input_name!r}: "
                "{0: 'batch'}}))")
        self.output_name: str = graph.output[0].name
        self.output_shape: tuple[Dim, ...] = tensor_shape(graph.output[0]) or ()

        specs: list[ParamSpec] = []
        offset = 0
        for init in trainable:
            spec = ParamSpec(init.name, tuple(int(d) for d in init.dims), offset)
            specs.append(spec)
            offset += spec.size
        self.specs: tuple[ParamSpec, ...] = tuple(specs)
        self.params: np.ndarray = np.empty(offset, dtype=np.float32)
        self.views: dict[str, np.ndarray] = {}
        for spec, init in zip(self.specs, trainable, strict=True):
            view = self.params[spec.offset : spec.offset + spec.size].reshape(spec.shape)
            view[...] = numpy_helper.to_array(init)
            self.views[spec.name] = view
        if not np.all(np.isfinite(self.params)):
            raise ModelError("model parameters contain NaN or Inf")

        #: The file's metadata_props (the task, and a checkpoint's state), as found at load.
        self.metadata: dict[str, str] = {p.key: p.value for p in proto.metadata_props}
        self._proto_graph = graph
        self.task = self._resolve_task(proto, task)
        self.schema = self._read_schema()
        self.lifted = self._lift(proto, trainable)
        del self._proto_graph  # it holds the file's initializers: a second copy of every weight
        self.fingerprint: bytes = self._fingerprint()

    # ---------------------------------------------------------------- loading and saving

    @classmethod
    def load(cls, path: str | os.PathLike[str], task: str | None = None) -> Model:
        file = Path(path)
        try:
            size = file.stat().st_size
        except OSError as exc:
            raise ModelError(f"cannot read model file {file}: {exc.strerror}") from exc
        if size > MAX_MODEL_BYTES:
            raise ModelError(f"model file {file} is {size} bytes, over the limit of {MAX_MODEL_BYTES}")
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise ModelError(f"cannot read model file {file}: {exc.strerror}") from exc
        try:
            proto = _parse(data)
            _embed_external_initializers(proto, file.parent)
            return cls(proto, task)
        except ModelError as exc:
            raise ModelError(f"{file}: {exc}") from exc

    @classmethod
    def from_bytes(cls, data: bytes, task: str | None = None) -> Model:
        """A model from bytes alone (the wire, a checkpoint): no directory, so external data is refused."""
        return cls(_parse(data), task)

    def to_proto(self, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        """A standalone ONNX model holding the current parameter values, with ``metadata`` added to the
        task and schema it always carries (a privacy guarantee, a checkpoint's state)."""
        proto = onnx.ModelProto()
        proto.CopyFrom(self.lifted)
        for key, value in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        graph = proto.graph
        names = {s.name for s in self.specs}
        kept_inputs = [i for i in graph.input if i.name not in names]
        del graph.input[:]
        graph.input.extend(kept_inputs)
        for spec in self.specs:
            graph.initializer.append(numpy_helper.from_array(self.views[spec.name], spec.name))
        return proto

    def to_bytes(self, metadata: dict[str, str] | None = None) -> bytes:
        return self.to_proto(metadata).SerializeToString()

    def save(self, path: str | os.PathLike[str]) -> None:
        write_bytes_atomic(path, self.to_bytes())

    def copy(self) -> Model:
        twin = Model.__new__(Model)
        twin.__dict__.update(self.__dict__)
        twin.params = self.params.copy()
        twin.views = {
            s.name: twin.params[s.offset : s.offset + s.size].reshape(s.shape) for s in self.specs
        }
        return twin

    # ---------------------------------------------------------------- parameters

    @property
    def num_params(self) -> int:
        return int(self.params.size)

    def set_params(self, values: np.ndarray) -> None:
        """Overwrite the parameters in place, so views and bound sessions see the new values."""
        if values.shape != self.params.shape:
            raise ModelError(f"parameter vector has {values.size} elements, the model has {self.params.size}")
        if not np.all(np.isfinite(values)):
            raise ModelError("refusing parameters that contain NaN or Inf")
        np.copyto(self.params, values, casting="same_kind")

    @property
    def num_outputs(self) -> int:
        last = self.output_shape[-1] if self.output_shape else None
        return last if isinstance(last, int) else 1

    @property
    def features_per_sample(self) -> int:
        return int(np.prod([int(d) for d in self.input_shape[1:]], dtype=np.int64))  # type: ignore[arg-type]

    # ---------------------------------------------------------------- internals

    @property
    def ends_in_sigmoid(self) -> bool:
        """The output is a ``Sigmoid`` (through any ``Identity``): one logit made a probability."""
        graph, name = self._graph_for_output(), self.output_name
        producers = {o: n for n in graph.node for o in n.output}
        node = producers.get(name)
        while node is not None and node.op_type == "Identity":
            node = producers.get(node.input[0])
        return node is not None and node.op_type == "Sigmoid"

    def _graph_for_output(self) -> onnx.GraphProto:
        return self.lifted.graph if hasattr(self, "lifted") else self._proto_graph

    @property
    def binary(self) -> bool:
        """A classifier with one output column, a probability: two classes (the output is class 1's)."""
        return self.task == "classification" and self.num_outputs == 1

    @property
    def num_classes(self) -> int | None:
        if self.task != "classification":
            return None
        return 2 if self.binary else self.num_outputs

    def _resolve_task(self, proto: onnx.ModelProto, task: str | None) -> str:
        chosen = task or self.metadata.get(TASK_KEY)
        if chosen is None:
            # Several output columns are class scores; one is a regression head, unless a Sigmoid makes it
            # a binary classifier's probability (a PyTorch one-logit model once trained as a regression).
            chosen = "classification" if self.num_outputs > 1 or self.ends_in_sigmoid else "regression"
        if chosen == "classification" and self.num_outputs == 1 and not self.ends_in_sigmoid:
            raise ModelError("a classifier with one output must end in Sigmoid (the probability of class 1)")
        if chosen not in TASKS:
            raise ModelError(f"unknown task {chosen!r}; expected one of {', '.join(TASKS)}")
        if chosen == "anomaly" and tuple(self.output_shape[1:]) != tuple(self.input_shape[1:]):
            raise ModelError(f"an anomaly model reconstructs its input: its output {self.output_shape} must have "
                             f"the shape of its input {self.input_shape}")
        return chosen

    def _read_schema(self) -> Schema | None:
        text = self.metadata.get(SCHEMA_KEY)
        if text is None:
            return None
        schema = Schema.from_json(text)
        if len(schema.features) != self.features_per_sample:
            raise ModelError(f"schema names {len(schema.features)} features, the model's input takes "
                             f"{self.features_per_sample}")
        if self.task == "classification" and schema.classes is not None and len(schema.classes) != self.num_classes:
            raise ModelError(f"schema names {len(schema.classes)} classes, the model has {self.num_classes}")
        return schema

    def _lift(self, proto: onnx.ModelProto, trainable: list[onnx.TensorProto]) -> onnx.ModelProto:
        lifted = onnx.ModelProto()
        lifted.CopyFrom(proto)
        graph = lifted.graph
        names = {t.name for t in trainable}
        keep = [i for i in graph.initializer if i.name not in names]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        old_inputs = [i for i in graph.input if i.name not in names]
        del graph.input[:]
        graph.input.extend(old_inputs)
        for spec in self.specs:
            graph.input.append(onnx.helper.make_tensor_value_info(spec.name, TensorProto.FLOAT, spec.shape))
        del lifted.metadata_props[:]
        entry = lifted.metadata_props.add()
        entry.key, entry.value = TASK_KEY, self.task
        if self.schema is not None:
            entry = lifted.metadata_props.add()
            entry.key, entry.value = SCHEMA_KEY, self.schema.to_json()
        # The lowest IR version that carries these opsets, so older onnxruntime builds load the model.
        lifted.ir_version = max(IR_VERSION, onnx.helper.find_min_ir_version_for(list(lifted.opset_import)))
        return lifted

    def _fingerprint(self) -> bytes:
        h = hashlib.sha256(b"gossipfl-model-fingerprint-v1\0")

        def put(*parts: object) -> None:
            for part in parts:
                h.update(repr(part).encode())
                h.update(b"\0")

        graph = self.lifted.graph
        put("opsets", sorted((o.domain, o.version) for o in self.lifted.opset_import))
        put("task", self.task)
        if self.schema is not None:  # models that read their columns differently must not average
            put("schema", self.schema.to_json())
        for vi in (*graph.input, *graph.output):
            put("io", vi.name, vi.type.tensor_type.elem_type, tensor_shape(vi))
        for node in graph.node:
            attrs = sorted(
                (a.name, a.SerializeToString(deterministic=True)) for a in node.attribute
            )
            put("node", node.domain, node.op_type, tuple(node.input), tuple(node.output), attrs)
        for init in graph.initializer:
            put("const", init.name, init.data_type, tuple(init.dims), hashlib.sha256(
                numpy_helper.to_array(init).tobytes()).hexdigest())
        for spec in self.specs:
            put("param", spec.name, spec.shape, "float32")
        return h.digest()

    @property
    def fingerprint_hex(self) -> str:
        return self.fingerprint.hex()

    def describe(self) -> str:
        return (
            f"{self.task} model: input {self.input_name} {self.input_shape}, output {self.output_name} "
            f"{self.output_shape}, {self.num_params} parameters in {len(self.specs)} tensors, "
            f"fingerprint {self.fingerprint_hex[:16]}"
        )
