"""Optimisers written into the training graph, so one onnxruntime call does forward, backward and step.

Measured on this project's machines (bench/train_step.py), the step inside the graph with IOBinding
beats the same update in numpy: it avoids a round trip of every gradient through Python. The
hyperparameters that change during a run (learning rate, Adam's bias-corrected rate) are graph
inputs bound to 0-d arrays that the trainer updates in place; the rest are constants.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gossipfl.errors import ConfigError

OPTIMIZERS = ("sgd", "adam")
LR = "gossipfl.opt.lr"
ADAM_EPS = "gossipfl.opt.eps"
NEW_PREFIX = "gossipfl.new."


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def validate(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optimizer: unknown {self.name!r}; choose one of {', '.join(OPTIMIZERS)}")
        checks = {
            "lr": self.lr > 0, "momentum": 0 <= self.momentum < 1, "weight_decay": self.weight_decay >= 0,
            "beta1": 0 <= self.beta1 < 1, "beta2": 0 <= self.beta2 < 1, "eps": self.eps > 0,
        }
        for key, ok in checks.items():
            if not ok or not np.isfinite(getattr(self, key)):
                raise ConfigError(f"optimizer.{key}: {getattr(self, key)!r} is out of range")

    @property
    def state_slots(self) -> tuple[str, ...]:
        """Per-parameter state vectors the optimiser keeps, each as long as the parameter vector."""
        if self.name == "adam":
            return ("m", "v")
        return ("velocity",) if self.momentum > 0 else ()


def state_name(slot: str, param: str) -> str:
    return f"gossipfl.state.{slot}.{param}"


def add_update_step(proto: onnx.ModelProto, params: dict[str, tuple[int, ...]], grads: dict[str, str],
                    config: OptimizerConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Append the update of every parameter to a gradient graph; returns the new outputs with their shapes.

    New values come out as ``NEW_PREFIX + name`` (parameters and state alike) and are bound by the
    trainer to separate buffers: reading a parameter and overwriting it in one graph run is unsafe,
    since onnxruntime may schedule the overwrite before the last read.
    """
    graph = proto.graph
    nodes: list[onnx.NodeProto] = []
    consts: dict[str, float] = {}

    def const(value: float) -> str:
        name = f"gossipfl.opt.c{len(consts)}"
        if value not in consts.values():
            consts[name] = value
            return name
        return next(k for k, v in consts.items() if v == value)

    def op(kind: str, inputs: list[str], out: str) -> str:
        nodes.append(helper.make_node(kind, inputs, [out], name=out))
        return out

    scalar = [helper.make_tensor_value_info(LR, TensorProto.FLOAT, [])]
    if config.name == "adam":
        scalar.append(helper.make_tensor_value_info(ADAM_EPS, TensorProto.FLOAT, []))
    graph.input.extend(scalar)
    outputs: list[tuple[str, tuple[int, ...]]] = []
    for name, shape in params.items():
        g = grads[name]
        p = name
        if config.weight_decay > 0:
            g = op("Add", [g, op("Mul", [p, const(config.weight_decay)], f"{name}.wd")], f"{name}.g_wd")
        if config.name == "sgd":
            if config.momentum > 0:
                v_in = state_name("velocity", name)
                graph.input.append(helper.make_tensor_value_info(v_in, TensorProto.FLOAT, shape))
                v = op("Add", [op("Mul", [v_in, const(config.momentum)], f"{name}.mv"), g], NEW_PREFIX + v_in)
                outputs.append((v, shape))
                g = v
            step = op("Mul", [g, LR], f"{name}.step")
        else:
            m_in, v_in = state_name("m", name), state_name("v", name)
            for s in (m_in, v_in):
                graph.input.append(helper.make_tensor_value_info(s, TensorProto.FLOAT, shape))
            m = op("Add", [op("Mul", [m_in, const(config.beta1)], f"{name}.m1"),
                           op("Mul", [g, const(1 - config.beta1)], f"{name}.m2")], NEW_PREFIX + m_in)
            sq = op("Mul", [g, g], f"{name}.g2")
            v = op("Add", [op("Mul", [v_in, const(config.beta2)], f"{name}.v1"),
                           op("Mul", [sq, const(1 - config.beta2)], f"{name}.v2")], NEW_PREFIX + v_in)
            outputs += [(m, shape), (v, shape)]
            denom = op("Add", [op("Sqrt", [v], f"{name}.sqrt"), ADAM_EPS], f"{name}.denom")
            step = op("Mul", [op("Div", [m, denom], f"{name}.ratio"), LR], f"{name}.step")
        outputs.append((op("Sub", [p, step], NEW_PREFIX + name), shape))

    graph.node.extend(nodes)
    graph.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), k) for k, v in consts.items())
    return outputs


def adam_scalars(config: OptimizerConfig, step: int) -> tuple[float, float]:
    """Adam's bias correction folded into the rate and epsilon (Kingma & Ba, section 2)."""
    c1 = 1 - config.beta1**step
    c2 = 1 - config.beta2**step
    return config.lr * np.sqrt(c2) / c1, config.eps * np.sqrt(c2)
