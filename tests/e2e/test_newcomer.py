"""Churn: a fresh node joining a converged cluster is merged, not refused, and catches up.

Under the outlier rule a newcomer looked like an attacker (``model is 9.73 away, recent median 0.761``) and
was refused by every member, for good. The default merge rule must let it in and bring it to the cluster's
accuracy, with no refusal counted anywhere.
"""

from __future__ import annotations

import numpy as np
import pytest

from gossipfl.cli.client import ControlClient
from gossipfl.learning.datasets import load_digits, train_test_split
from gossipfl.testing.cluster import Cluster, ClusterPlan, HeldOut, NodeSpec, free_port_base, prepare

from ..conftest import wait_for

pytestmark = pytest.mark.slow


def test_a_fresh_node_joins_a_converged_cluster_with_no_refusal_and_reaches_its_accuracy(tmp_path):
    x, y = load_digits()
    x_train, y_train, x_test, y_test = train_test_split(x, y, test_fraction=0.25, seed=1)
    plan = ClusterPlan(nodes=4, base_port=free_port_base(), gossip={"period": 0.3},
                       training={"duty_cycle": 0.2, "lr": 0.05}, extra={"data": {"validation_fraction": 0.0}})
    specs = prepare(tmp_path, plan, x_train, y_train)
    members, newcomer = specs[:3], specs[3]
    held_out = HeldOut(tmp_path / "model.onnx", x_test, y_test)
    assert held_out.accuracy() < 0.5, "every node, the newcomer too, starts from this untrained model"

    def accuracy(spec: NodeSpec) -> float:
        return held_out.of_export(ControlClient(spec.socket, timeout=10).call("model.export"))

    def counters(spec: NodeSpec) -> dict:
        return ControlClient(spec.socket, timeout=10).call("status")["counters"]

    with Cluster(members) as cluster:
        for spec in members:
            assert cluster.wait_for_log(spec, "node started", 60), cluster.log_lines(spec)

        def converged() -> list[float] | None:
            if min(counters(s).get("merges", 0) for s in members) < 20:  # merged often enough to have a history
                return None
            scores = [accuracy(s) for s in members]
            return scores if min(scores) >= 0.85 and max(scores) - min(scores) <= 0.03 else None

        cluster_scores = wait_for(converged, 180, "the three members to converge")

        cluster.start(newcomer)
        assert cluster.wait_for_log(newcomer, "node started", 60), cluster.log_lines(newcomer)
        target = float(np.mean(cluster_scores)) - 0.03
        wait_for(lambda: accuracy(newcomer) >= target, 120, f"the newcomer to reach {target:.3f}")
        wait_for(lambda: all(counters(s)["merges"] > 0 for s in specs), 60, "every node to have merged")
        seen = {s.name: counters(s) for s in specs}
        codes = cluster.stop_all()
    for name, values in seen.items():
        assert not any(k.startswith("refused.") for k in values), (name, values)
    assert set(codes.values()) == {0}
