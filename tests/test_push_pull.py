"""Push-pull gossip between real daemons: both ends of an exchange end with the same age-weighted average.

Training is off, so the only thing that moves a model is a merge; with the lossless float32 scheme
the averages can be checked to float precision. Push-only gossip, the control, leaves the two models
apart after the same number of exchanges.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from gossipfl.checkpoint import load_checkpoint, save_checkpoint
from gossipfl.control import ControlClient
from gossipfl.datasets import load_digits
from gossipfl.model import Model
from gossipfld.cluster import Cluster, ClusterPlan, free_port_base, prepare

pytestmark = pytest.mark.slow

AGES = (100.0, 300.0)


def _two_nodes_apart(root, push_pull: bool):
    """Two daemons whose checkpoints hold different models of known ages, with training off."""
    x, y = load_digits()
    plan = ClusterPlan(nodes=2, base_port=free_port_base(), mdns=False, static_peers=True,
                       training={"enabled": False},
                       gossip={"period": 0.3, "scheme": "float32", "push_pull": push_pull})
    specs = prepare(root, plan, x[:200], y[:200])
    rng = np.random.default_rng(7)
    start = []
    for spec, age in zip(specs, AGES, strict=True):
        model = Model.load(root / "model.onnx")
        model.set_params(model.params + rng.normal(0, 0.5, model.num_params).astype(np.float32))
        spec.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(spec.checkpoint, model, {"age": age})
        start.append(model.params.copy())
    return specs, start


def _run(specs, seconds: float) -> list[tuple[np.ndarray, dict]]:
    """Each node's final model (its checkpoint) and its state, with the counters read while both still ran:
    stopping both at once can cut an exchange in flight, which the peer rightly counts as a failure."""
    with Cluster(specs) as cluster:
        time.sleep(seconds)
        live = [ControlClient(spec.socket, timeout=10).call("status")["counters"] for spec in specs]
        codes = cluster.stop_all()
    assert codes == {s.name: 0 for s in specs}, codes
    out = []
    for spec, counters in zip(specs, live, strict=True):
        model, state = load_checkpoint(spec.checkpoint)
        out.append((model.params.copy(), {**state, "counters": counters}))
    return out


def test_push_pull_leaves_both_ends_with_the_same_weighted_average(tmp_path):
    specs, (a, b) = _two_nodes_apart(tmp_path, push_pull=True)
    expected = (AGES[0] * a + AGES[1] * b) / sum(AGES)
    (final_a, state_a), (final_b, state_b) = _run(specs, 6)
    for state in (state_a, state_b):
        counters = state["counters"]
        assert counters.get("pulls", 0) >= 1 and counters.get("pulls_answered", 0) >= 1, counters
        assert not [k for k in counters if k.startswith(("refused.", "failed."))], counters
        assert state["age"] == max(AGES)
    assert np.allclose(final_a, expected, atol=1e-5), np.abs(final_a - expected).max()
    assert np.allclose(final_b, expected, atol=1e-5), np.abs(final_b - expected).max()


def test_push_only_gossip_does_not_keep_the_mean(tmp_path):
    specs, (a, b) = _two_nodes_apart(tmp_path, push_pull=False)
    expected = (AGES[0] * a + AGES[1] * b) / sum(AGES)
    (final_a, state_a), (final_b, state_b) = _run(specs, 6)
    for state in (state_a, state_b):
        assert state["counters"].get("merges", 0) >= 2, state["counters"]
        assert "pulls" not in state["counters"] and "pulls_answered" not in state["counters"]
    # Each push moves only the receiver: the pair's mean model wanders off the weighted average.
    assert np.abs((final_a + final_b) / 2 - expected).max() > 1e-3
