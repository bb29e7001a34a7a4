"""Push-pull gossip between real daemons: both ends of an exchange end with the same age-weighted average.

Training is off, so the only thing that moves a model is a merge; with the lossless float32 scheme
the averages can be checked to float precision. Push-only gossip, the control, leaves the two models
apart after the same number of exchanges.
"""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

from gossipfl.cli.client import ControlClient
from gossipfl.learning.checkpoint import load_checkpoint, save_checkpoint
from gossipfl.learning.datasets import load_digits
from gossipfl.learning.model import Model
from gossipfl.protocol import messages
from gossipfl.testing.cluster import Cluster, ClusterPlan, free_port_base, prepare
from gossipfl.testing.visitor import make_visitor

from ..conftest import wait_for

pytestmark = pytest.mark.slow

AGES = (100.0, 300.0)


def _two_nodes_apart(root, push_pull: bool, one_way: bool = False):
    """Two daemons whose checkpoints hold different models of known ages, with training off. ``one_way``:
    node1 knows no peer, so only node0 pushes (an inbound peer is never pushed to)."""
    x, y = load_digits()
    plan = ClusterPlan(nodes=2, base_port=free_port_base(), mdns=False, static_peers=True,
                       training={"enabled": False},
                       # the plain age rule: the test computes its exact shares
                       gossip={"period": 0.3, "scheme": "float32", "push_pull": push_pull, "merge": "age"},
                       per_node={1: {"discovery": {"static_peers": []}}} if one_way else {})
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
    with Cluster([]) as cluster:
        for spec in reversed(specs):  # node1, which node0 dials, listens first: no refused dial at start
            cluster.start(spec)
            assert cluster.wait_for_log(spec, "node started", 30), cluster.log_lines(spec)
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
    """One way only, as in the control below: exchanges that cross in flight (each end merging the
    other's push before answering a pull) need not keep the mean, and the claim here is exact."""
    specs, (a, b) = _two_nodes_apart(tmp_path, push_pull=True, one_way=True)
    expected = (AGES[0] * a + AGES[1] * b) / sum(AGES)
    (final_a, state_a), (final_b, state_b) = _run(specs, 6)
    assert state_a["counters"].get("pulls", 0) >= 1, state_a["counters"]
    assert state_b["counters"].get("pulls_answered", 0) >= 1, state_b["counters"]
    for state in (state_a, state_b):
        counters = state["counters"]
        assert not [k for k in counters if k.startswith(("refused.", "failed."))], counters
        assert state["age"] == max(AGES)
    assert np.allclose(final_a, expected, atol=1e-5), np.abs(final_a - expected).max()
    assert np.allclose(final_b, expected, atol=1e-5), np.abs(final_b - expected).max()


def test_push_only_gossip_does_not_keep_the_mean(tmp_path):
    """One way only: two pushes that cross in flight would average both ends alike (a push-pull by
    chance), which made this control pass or fail on timing when both nodes pushed."""
    specs, (a, b) = _two_nodes_apart(tmp_path, push_pull=False, one_way=True)
    expected = (AGES[0] * a + AGES[1] * b) / sum(AGES)
    (final_a, state_a), (final_b, state_b) = _run(specs, 6)
    assert state_b["counters"].get("merges", 0) >= 2, state_b["counters"]
    assert state_a["counters"].get("exchanges_out", 0) >= 2, state_a["counters"]
    for state in (state_a, state_b):
        assert not [k for k in state["counters"] if k.startswith(("pulls", "refused.", "failed."))], state
    # Each push moves only the receiver: the pusher keeps its model, the pair's mean leaves the average.
    assert np.array_equal(final_a, a)
    assert np.abs((final_a + final_b) / 2 - expected).max() > 1e-3


def test_a_pull_while_the_receiver_is_pushing_to_the_puller_is_declined_and_the_push_kept(tmp_path):
    """Two nodes pushing to each other at once must not both wait for the other's send lock: the one
    asked for a pull while its own push to the asker is in flight declines it (OVERLOADED), keeps the
    merged push, and answers the next pull once its push is done. The visitor holds the daemon's push
    unacknowledged to make that moment last."""
    specs, visitor = make_visitor(tmp_path, training={"enabled": False})
    spec = specs[0]
    with socket.create_server(("127.0.0.1", visitor.port)) as listener:
        listener.settimeout(30)
        with Cluster(specs) as cluster:
            held, theirs = visitor.accept(listener)  # the daemon's push to us, which we leave pending
            pushed = held.receive()
            assert isinstance(pushed, messages.ModelDelta)
            daemon_id = theirs.node_id

            asking = visitor.dial(spec)
            asking.send(visitor.full_model_delta(daemon_id))
            assert isinstance(asking.receive(), messages.Ack)  # our push is merged
            asking.send(messages.PullRequest(0))
            declined = asking.receive()
            asking.close()

            held.send(messages.Ack(pushed.new_seq))  # its push completes; it pulls, and we decline in turn
            assert isinstance(held.receive(), messages.PullRequest)
            held.send(messages.Error(messages.ErrorCode.OVERLOADED, "busy"))
            held.close()

            asking = visitor.dial(spec)  # nothing in flight to us now: the pull is answered
            asking.send(visitor.full_model_delta(daemon_id))
            assert isinstance(asking.receive(), messages.Ack)
            asking.send(messages.PullRequest(0))
            answered = asking.receive()
            if isinstance(answered, messages.ModelDelta):
                asking.send(messages.Ack(answered.new_seq))
            asking.close()
            counters = wait_for(lambda: (c := ControlClient(spec.socket, timeout=10).call("status")["counters"])
                                .get("pulls_answered") and c, 20, "the pull to be counted")
            assert cluster.running(spec)
    assert isinstance(declined, messages.Error) and declined.code == messages.ErrorCode.OVERLOADED, declined
    assert isinstance(answered, messages.ModelDelta) and answered.base_seq == 0, answered
    assert counters["exchanges_in"] == 2 and counters["pulls_answered"] == 1, counters
    assert counters["pulls_declined"] == 1 and counters["exchanges_out"] >= 1, counters
    assert not [k for k in counters if k.startswith("refused.")], counters
