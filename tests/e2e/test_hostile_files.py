"""Hostile files at start: the real daemon, run as systemd runs it, on a model or state file that was tampered with.

Each ends the start with exit code 2 (the unit's RestartPreventExitStatus: no restart loop) and one log line
that names the file and the problem, never a traceback; a damaged optional file (the delta references) costs
only a warning, and the node starts.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from gossipfl.learning.checkpoint import save_checkpoint
from gossipfl.learning.datasets import load_digits
from gossipfl.learning.model import Model
from gossipfl.testing.cluster import Cluster, ClusterPlan, NodeSpec, free_port_base, prepare

from ..unit.test_model_files import _loop_model

pytestmark = pytest.mark.slow


@pytest.fixture
def node(tmp_path) -> NodeSpec:
    x, y = load_digits()
    return prepare(tmp_path, ClusterPlan(nodes=1, base_port=free_port_base(), mdns=False), x[:300], y[:300])[0]


def _start(spec: NodeSpec) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gossipfld.main", "--config", str(spec.config)],
                          capture_output=True, text=True, timeout=120)


def _model_path(spec: NodeSpec):
    return spec.directory.parent / "model.onnx"


def _garbage_model(spec: NodeSpec) -> None:
    _model_path(spec).write_bytes(b"\x08\x07not a model at all" * 10)


def _loop(spec: NodeSpec) -> None:
    _model_path(spec).write_bytes(_loop_model(10**12).SerializeToString())


def _checkpoint(spec: NodeSpec, state: dict) -> None:
    spec.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(spec.checkpoint, Model.load(_model_path(spec)), state)


def _flipped_weight(spec: NodeSpec) -> None:
    model = Model.load(_model_path(spec))
    _checkpoint(spec, {"age": 10.0})
    data = bytearray(spec.checkpoint.read_bytes())
    at = bytes(data).index(model.params[5:9].tobytes())  # a weight's bytes, inside the file
    data[at] ^= 0x01
    spec.checkpoint.write_bytes(bytes(data))


def _age_not_a_number(spec: NodeSpec) -> None:
    _checkpoint(spec, {"age": "abc"})


def _checkpoint_symlink(spec: NodeSpec) -> None:
    spec.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    os.symlink("/dev/zero", spec.checkpoint)


@pytest.mark.parametrize(("tamper", "names"), [
    (_garbage_model, "not an ONNX model"),
    (_loop, "control flow is not supported"),
    (_flipped_weight, "do not match the checkpoint's digest"),
    (_age_not_a_number, "state"),
    (_checkpoint_symlink, "checkpoint.onnx"),
])
def test_a_tampered_model_or_checkpoint_stops_the_start_with_one_line_and_exit_2(node, tamper, names):
    tamper(node)
    proc = _start(node)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "level=error" in line]
    assert len(errors) == 1 and "cannot start" in errors[0] and names in errors[0], proc.stderr


def test_damaged_references_cost_a_warning_and_the_node_starts(node):
    state = node.checkpoint.parent
    state.mkdir(parents=True, exist_ok=True)
    os.symlink("/dev/zero", state / "references.bin")
    with Cluster([node]) as cluster:
        assert cluster.wait_for_log(node, "node started", 60), cluster.log_lines(node)
        codes = cluster.stop_all()
    assert codes == {node.name: 0}
    log = "\n".join(cluster.log_lines(node))
    assert "peers will send full models" in log and "Traceback" not in log
    assert np.isfinite(Model.load(node.checkpoint).params).all()
