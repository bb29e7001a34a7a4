"""A local cluster of real ``gossipfld`` processes, for the demo, the end-to-end tests and the benchmarks.

``prepare`` writes everything a fleet would have: one cluster CA, a certificate per node, a config
per node, the shared initial model, and each node's own data shard. ``Cluster`` starts the daemons as
separate processes and stops them with SIGTERM (as systemd does), so every run exercises the same
start-up, checkpoint and shutdown paths as production.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gossipfl.cli.certs import init_ca, issue_node_cert
from gossipfl.errors import GossipflError
from gossipfl.learning.checkpoint import load_checkpoint
from gossipfl.learning.datasets import dirichlet_shards, iid_shards, write_csv
from gossipfl.learning.model import Model
from gossipfl.learning.optim import OptimizerConfig
from gossipfl.learning.quality import predicted_classes
from gossipfl.learning.trainer import Metrics, TrainConfig, Trainer, predict, prediction_session
from gossipfl.learning.zoo import ArchSpec, build

CONTROL_SOCKET = "control.sock"


class ClusterError(GossipflError):
    """The local cluster cannot be set up (no free ports, for example)."""


@dataclass
class NodeSpec:
    name: str
    directory: Path
    config: Path
    node_id: bytes
    port: int
    address: str = "127.0.0.1"
    netns: str | None = None
    program: tuple[str, ...] = ("-m", "gossipfld.main")  # what the interpreter runs (tests swap in variants)

    @property
    def checkpoint(self) -> Path:
        return self.directory / "state" / "checkpoint.onnx"

    @property
    def log(self) -> Path:
        return self.directory / "gossipfld.log"

    @property
    def socket(self) -> Path:
        return self.directory / CONTROL_SOCKET


@dataclass
class ClusterPlan:
    nodes: int = 4
    split: str = "dirichlet"  # or "iid"
    alpha: float = 0.5
    seed: int = 0
    hidden: Sequence[int] = (32,)
    base_port: int = 17800
    addresses: Sequence[str] | None = None  # one per node (network namespaces); default all 127.0.0.1
    mdns: bool = True
    static_peers: bool = False
    gossip: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    # Server-assisted FedAvg: the first ``gateways`` nodes are gateways without data of their own;
    # the others run in ``mode`` and share the data set among them.
    gateways: int = 0
    mode: str = "gossip"
    fedavg: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_node: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    model: Path | None = None  # the cluster's model; default an MLP built for the data (hidden, seed)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_toml(path: Path, tables: dict[str, dict[str, Any]]) -> None:
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))


def prepare(root: Path, plan: ClusterPlan, x: np.ndarray, y: np.ndarray) -> list[NodeSpec]:
    """Write CA, certificates, configs, model and data shards for ``plan.nodes`` nodes under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    init_ca(root / "ca")
    if plan.model is not None:
        model = Model.load(plan.model)
    else:
        model = build(ArchSpec("mlp", x.shape[1], int(y.max()) + 1, hidden=tuple(plan.hidden), seed=plan.seed))
    model.save(root / "model.onnx")
    learners = plan.nodes - plan.gateways
    if plan.split == "iid":
        shards = iid_shards(len(y), learners, plan.seed)
    else:
        shards = dirichlet_shards(y, learners, plan.alpha, plan.seed)
    shards = [np.zeros(0, dtype=np.int64)] * plan.gateways + list(shards)
    addresses = list(plan.addresses or ["127.0.0.1"] * plan.nodes)
    ports = [plan.base_port + i for i in range(plan.nodes)]
    specs = []
    node_ids = [issue_node_cert(root / "ca", f"node{i}", root / f"node{i}" / "certs") for i in range(plan.nodes)]
    granted = [node_ids[i].hex() for i in range(plan.gateways)]  # the cluster grants the gateway role
    for i in range(plan.nodes):
        name = f"node{i}"
        directory = root / name
        node_id = node_ids[i]
        gateway = i < plan.gateways
        if gateway:
            (directory / "data").mkdir(parents=True, exist_ok=True)
        else:
            write_csv(directory / "data" / "shard.csv", x[shards[i]], y[shards[i]])
        peers = [f"{addresses[j]}:{ports[j]}" for j in range(plan.nodes) if j != i] if plan.static_peers else []
        tables: dict[str, dict[str, Any]] = {
            "node": {"name": name, "state_dir": "state", "role": "gateway" if gateway else "node",
                     "mode": "gossip" if gateway else plan.mode},
            "listen": {"address": addresses[i], "port": ports[i]},
            "discovery": {"mdns": plan.mdns, "interfaces": [addresses[i]], "static_peers": peers},
            "tls": {"cert": "certs/node.crt", "key": "certs/node.key", "ca": "certs/ca.crt"},
            "model": {"path": str(root / "model.onnx")},
            "data": {"directory": "data", "validation_fraction": 0.2},
            "training": {"seed": plan.seed + i, **plan.training},
            "gossip": {"period": 0.5, **plan.gossip},
            "state": {"checkpoint_seconds": 5.0},
            "fedavg": {"gateways": granted, **plan.fedavg},
            "control": {"socket": str(directory / CONTROL_SOCKET)},
        }
        for table, values in [*plan.extra.items(), *plan.per_node.get(i, {}).items()]:
            tables.setdefault(table, {}).update(values)
        config = directory / "node.toml"
        write_toml(config, tables)
        specs.append(NodeSpec(name, directory, config, node_id, ports[i], addresses[i]))
    return specs


class Cluster:
    """Runs one ``gossipfld`` process per node; a context manager that always stops them all."""

    def __init__(self, specs: list[NodeSpec], extra_args: Sequence[str] = ()) -> None:
        self.specs = specs
        self.extra_args = list(extra_args)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def command(self, spec: NodeSpec) -> list[str]:
        cmd = [sys.executable, *spec.program, "--config", str(spec.config), *self.extra_args]
        return ["ip", "netns", "exec", spec.netns, *cmd] if spec.netns else cmd

    def start(self, spec: NodeSpec, env: dict[str, str] | None = None) -> None:
        log = spec.log.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.procs[spec.name] = subprocess.Popen(self.command(spec), stdout=log, stderr=log, env=env,
                                                 start_new_session=True)
        log.close()

    def start_all(self) -> None:
        for spec in self.specs:
            self.start(spec)

    def stop(self, spec: NodeSpec, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        proc = self.procs.pop(spec.name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                return None
        return proc.returncode

    def kill(self, spec: NodeSpec) -> None:
        self.stop(spec, signal.SIGKILL)

    def stop_all(self, timeout: float = 20.0) -> dict[str, int | None]:
        """SIGTERM every daemon at once, then wait for each; returns the exit codes."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        deadline = time.monotonic() + timeout
        for name, proc in list(self.procs.items()):
            try:
                codes[name] = proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                codes[name] = None
            del self.procs[name]
        return codes

    def running(self, spec: NodeSpec) -> bool:
        proc = self.procs.get(spec.name)
        return proc is not None and proc.poll() is None

    def log_lines(self, spec: NodeSpec) -> list[str]:
        return spec.log.read_text(errors="replace").splitlines() if spec.log.exists() else []

    def wait_for_log(self, spec: NodeSpec, needle: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(needle in line for line in self.log_lines(spec)):
                return True
            time.sleep(0.05)
        return False

    def __enter__(self) -> Cluster:
        self.start_all()
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            proc.wait()
        self.procs.clear()


class HeldOut:
    """Scores parameter vectors on rows no node trains on, with one prediction session reused throughout."""

    def __init__(self, model_path: Path, x: np.ndarray, y: np.ndarray) -> None:
        self.model = Model.load(model_path)
        self.session = prediction_session(self.model, threads=1)
        self.x, self.y = x, y

    def accuracy(self, params: np.ndarray | None = None) -> float:
        if params is not None:
            self.model.set_params(params)
        out = predict(self.model, self.x, self.session)
        return float(np.mean(predicted_classes(out) == self.y))

    def of_export(self, exported: dict[str, Any]) -> float:
        return self.accuracy(Model.from_bytes(base64.b64decode(exported["onnx"])).params)



def free_port_base(count: int = 20) -> int:
    """The first of ``count`` consecutive loopback ports that are free now (outside the ephemeral range)."""
    rng = np.random.default_rng()
    for _ in range(200):
        base = 20000 + int(rng.integers(0, 180)) * 50
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise ClusterError(f"found no {count} consecutive free ports on 127.0.0.1")


def train_centrally(model_path: Path, x: np.ndarray, y: np.ndarray, epochs: int = 40, lr: float = 0.05) -> Model:
    """The reference every distributed run is judged by: the same model trained on all the data at once."""
    model = Model.load(model_path)
    Trainer(model, TrainConfig(optimizer=OptimizerConfig("sgd", lr=lr))).fit(x, y, epochs)
    return model


def evaluate_checkpoint(spec: NodeSpec, x: np.ndarray, y: np.ndarray) -> tuple[Metrics, dict[str, Any], Model]:
    model, state = load_checkpoint(spec.checkpoint)
    return Trainer(model).evaluate(x, y), state, model
