"""Server-assisted FedAvg end to end: a real gateway daemon and real client daemons over mDNS and TLS.

Accuracy is measured on a held-out part of digits that no node trains on. For the comparisons with
central training the nodes keep no validation split of their own (``validation_fraction = 0``), so
the federated run and the central run learn from exactly the same rows.
"""

from __future__ import annotations

import base64
import itertools
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gossipfl.cli.client import ControlClient
from gossipfl.errors import ControlError
from gossipfl.learning.datasets import load_digits, train_test_split
from gossipfl.learning.model import Model
from gossipfl.learning.trainer import Trainer
from gossipfl.testing.cluster import (
    Cluster,
    ClusterPlan,
    NodeSpec,
    evaluate_checkpoint,
    free_port_base,
    prepare,
    train_centrally,
)

from ..conftest import wait_for

pytestmark = pytest.mark.slow

BYZANTINE = Path(__file__).parent.parent / "byzantine_gossipfld.py"
ALL_DATA = {"data": {"validation_fraction": 0.0}}


@pytest.fixture(scope="module")
def split():
    x, y = load_digits()
    return train_test_split(x, y, test_fraction=0.25, seed=1)


def status(spec: NodeSpec) -> dict | None:
    try:
        return ControlClient(spec.socket, timeout=10).call("status")
    except ControlError:
        return None


def gateway_round(spec: NodeSpec) -> int:
    s = status(spec)
    return s["fedavg"]["gateway"]["round"] if s else -1


def accuracy(spec: NodeSpec, x, y) -> float:
    exported = ControlClient(spec.socket, timeout=10).call("model.export")
    model = Model.from_bytes(base64.b64decode(exported["onnx"]))
    return float(Trainer(model).evaluate(x, y).accuracy)


def run_rounds(root: Path, split, plan: ClusterPlan, rounds: int, byzantine: float | None = None
               ) -> tuple[list[NodeSpec], dict[str, int | None]]:
    x_train, y_train, _, _ = split
    specs = prepare(root, plan, x_train, y_train)
    if byzantine is not None:
        specs[-1].program = (str(BYZANTINE), str(byzantine))
    with Cluster(specs) as cluster:
        def honest_clients_left() -> bool:  # a gateway whose global models turned bad is no longer followed
            return all((s := status(spec)) and s["fedavg"].get("distrusted") for spec in specs[1:-1])

        wait_for(lambda: gateway_round(specs[0]) >= rounds or (byzantine is not None and honest_clients_left()),
                 240, f"{rounds} rounds")
        if byzantine is None:  # the last round's result reaches every client before they stop

            def adopted() -> bool:
                ages = [(s := status(spec)) and s["age"] for spec in specs]
                return all(age == ages[0] for age in ages[1:])

            wait_for(adopted, 30, "every client to adopt the last global model")
        else:
            time.sleep(1.0)
        codes = cluster.stop_all()
    return specs, codes


def test_gateway_and_five_clients_match_central_training(tmp_path, split):
    x_train, y_train, x_test, y_test = split
    plan = ClusterPlan(nodes=6, gateways=1, mode="fedavg", alpha=0.5, base_port=free_port_base(),
                       training={"lr": 0.05, "duty_cycle": 0.5}, extra=ALL_DATA,
                       fedavg={"epochs": 5, "max_rounds": 100, "deadline": 5.0, "round_pause": 0.1,
                               "min_clients": 5})  # no round before all five are found
    specs, codes = run_rounds(tmp_path, split, plan, 100)
    assert all(code == 0 for code in codes.values()), codes
    central = Trainer(train_centrally(tmp_path / "model.onnx", x_train, y_train)).evaluate(x_test, y_test).accuracy
    gateway_metrics, gateway_state, global_model = evaluate_checkpoint(specs[0], x_test, y_test)
    assert gateway_state["gateway_round"] == 100
    assert gateway_metrics.accuracy >= central - 0.01, (gateway_metrics.accuracy, central)
    for spec in specs[1:]:  # every client ends with the gateway's global model
        metrics, state, model = evaluate_checkpoint(spec, x_test, y_test)
        gap = np.linalg.norm(model.params - global_model.params) / np.linalg.norm(global_model.params)
        assert gap < 1e-3, (spec.name, gap)
        assert state["age"] == gateway_state["age"]
        assert abs(metrics.accuracy - gateway_metrics.accuracy) < 0.005
        assert state["counters"]["fedavg.adopted"] >= 95
    logged = [line for line in Cluster(specs).log_lines(specs[0]) if 'msg="round aggregated"' in line]
    assert len(logged) == 100 and "participants=5" in logged[-1] and "aggregate_norm=" in logged[-1]


def test_clients_fall_back_to_gossip_and_return_to_the_gateway(tmp_path, split):
    _, _, x_test, y_test = split
    plan = ClusterPlan(nodes=5, gateways=1, mode="auto", base_port=free_port_base(),
                       training={"lr": 0.01, "duty_cycle": 0.3}, gossip={"period": 0.3},
                       fedavg={"epochs": 1, "deadline": 3.0, "round_pause": 0.3, "fallback_seconds": 3.0})
    x_train, y_train, _, _ = split
    specs = prepare(tmp_path, plan, x_train, y_train)
    gateway, clients = specs[0], specs[1:]
    ages: dict[str, list[float]] = {s.name: [] for s in clients}
    stop = threading.Event()

    def watch_ages() -> None:  # a client must never go back to a younger model than it had
        while not stop.is_set():
            for spec in clients:
                s = status(spec)
                if s is not None:
                    ages[spec.name].append(s["age"])
            time.sleep(0.3)

    with Cluster(specs) as cluster:
        watcher = threading.Thread(target=watch_ages, daemon=True)
        watcher.start()
        try:
            wait_for(lambda: gateway_round(gateway) >= 8, 90, "8 rounds")
            wait_for(lambda: all(status(s)["fedavg"]["learning_by"] == "rounds" for s in clients), 30,
                     "every client to learn by rounds")
            cluster.kill(gateway)
            at_kill = np.mean([accuracy(s, x_test, y_test) for s in clients])
            wait_for(lambda: all(status(s)["fedavg"]["learning_by"] == "gossip" for s in clients), 30,
                     "clients to fall back to gossip")
            exchanged = {s.name: status(s)["counters"].get("exchanges_out", 0) for s in clients}
            # 20 pushes each (six seconds at the period), then the clients learning by gossip alone must lift
            # the accuracy they had when the gateway died
            wait_for(lambda: all(status(s)["counters"].get("exchanges_out", 0) >= exchanged[s.name] + 20
                                 for s in clients), 60, "20 gossip pushes from every client")
            wait_for(lambda: np.mean([accuracy(s, x_test, y_test) for s in clients]) > at_kill, 60,
                     f"gossip alone to lift the clients' mean accuracy above {at_kill:.4f}")
            after_gossip = np.mean([accuracy(s, x_test, y_test) for s in clients])

            cluster.start(gateway)
            wait_for(lambda: gateway_round(gateway) >= 0, 30, "the gateway to come back")
            back_at = gateway_round(gateway)
            wait_for(lambda: gateway_round(gateway) >= back_at + 5, 90, "5 rounds after the return")

            def back(spec) -> bool:  # the restarted gateway finds each client by mDNS, then dials it
                s = status(spec)
                return s is not None and s["fedavg"]["learning_by"] == "rounds" \
                    and s["fedavg"]["following"] == gateway.node_id.hex()

            wait_for(lambda: all(back(s) for s in clients), 60, "every client back with the gateway")
            returned = np.mean([accuracy(s, x_test, y_test) for s in clients])
            assert returned >= after_gossip - 0.02, (after_gossip, returned)
        finally:
            stop.set()
            watcher.join()
    for name, seen in ages.items():
        assert len(seen) > 20, name
        drops = [(a, b) for a, b in itertools.pairwise(seen) if b < a]
        assert not drops, (name, drops[:3])


@pytest.mark.parametrize("rule", ["trimmed_mean", "median", "mean"])
def test_a_client_scaling_its_update_by_100(tmp_path, split, rule):
    """Robust rules shrug the attack off; the plain mean shows the damage, so the defence matters."""
    _, _, x_test, y_test = split
    results = {}
    for attacked in (False, True):
        plan = ClusterPlan(nodes=6, gateways=1, mode="fedavg", split="iid", base_port=free_port_base(),
                           training={"lr": 0.05, "duty_cycle": 0.5}, extra=ALL_DATA,
                           fedavg={"epochs": 2, "max_rounds": 30, "deadline": 5.0, "round_pause": 0.1,
                                   "rule": rule, "trim_fraction": 0.2, "min_clients": 5})
        root = tmp_path / ("attacked" if attacked else "clean")
        specs, codes = run_rounds(root, split, plan, 30, byzantine=100.0 if attacked else None)
        assert codes[specs[0].name] == 0, codes
        metrics, _, _ = evaluate_checkpoint(specs[0], x_test, y_test)
        results[attacked] = metrics.accuracy
    clean, attacked = results[False], results[True]
    if rule == "mean":
        assert attacked < clean - 0.05, (clean, attacked)
    else:
        assert abs(clean - attacked) < 0.01, (clean, attacked)


def test_two_gateways_clients_follow_the_lowest_id_and_gateways_gossip(tmp_path, split):
    x_train, y_train, x_test, y_test = split
    plan = ClusterPlan(nodes=6, gateways=2, mode="auto", base_port=free_port_base(),
                       training={"lr": 0.05, "duty_cycle": 0.5}, gossip={"period": 0.3},
                       fedavg={"epochs": 1, "deadline": 3.0, "round_pause": 0.2})
    specs = prepare(tmp_path, plan, x_train, y_train)
    gateways, clients = specs[:2], specs[2:]
    leader, other = sorted(gateways, key=lambda s: s.node_id)
    with Cluster(specs) as cluster:
        wait_for(lambda: gateway_round(leader) >= 15, 120, "15 rounds at the lowest-id gateway")
        for spec in clients:
            assert status(spec)["fedavg"]["following"] == leader.node_id.hex()
        # A client that heard from the other gateway before the leader rightly follows it until the leader is
        # live (CI once saw one such update); from here on, with every client following the leader, none may.
        updates_before = status(other)["counters"].get("fedavg.updates_received", 0)
        wait_for(lambda: status(other)["counters"].get("merges", 0) > 0
                 and status(leader)["counters"].get("merges", 0) > 0, 60, "gossip between the gateways")

        def caught_up() -> bool:  # the idle gateway learns the leader's global model by gossip alone
            ours, theirs = accuracy(other, x_test, y_test), accuracy(leader, x_test, y_test)
            return ours > 0.8 and abs(ours - theirs) < 0.05

        # One merge is not enough (CI once stopped after the first, at 0.58): the clipped rule takes a bounded
        # share of a peer's model at first, so the idle gateway gets there over a few merges.
        wait_for(caught_up, 90, "the idle gateway to learn the leader's model by gossip")
        other_counters = status(other)["counters"]
        client_counters = [status(spec)["counters"] for spec in clients]
        codes = cluster.stop_all()
    assert all(code == 0 for code in codes.values()), codes
    # The other gateway's rounds found no client willing to follow it.
    assert other_counters.get("fedavg.updates_received", 0) == updates_before, other_counters
    assert other_counters.get("fedavg.client_failed.peer-refused", 0) > 0, other_counters
    assert sum(c.get("refused.not-following", 0) for c in client_counters) > 0, client_counters


def test_a_gateway_with_a_stolen_certificate_cannot_take_over_its_clients(tmp_path, split):
    """A granted gateway whose certificate was stolen sends sign-flipped global models claiming an age of 1e12.
    Without a check every client adopted them (0.975 to 0.087 in this test); now each client takes clipped steps
    that shrink with the gateway's trust, stops following it after three, and learns by gossip again."""
    _, _, x_test, y_test = split
    x_train, y_train, _, _ = split
    plan = ClusterPlan(nodes=5, gateways=1, mode="auto", split="iid", base_port=free_port_base(),
                       training={"lr": 0.05, "duty_cycle": 0.5}, gossip={"period": 0.3},
                       fedavg={"epochs": 1, "deadline": 3.0, "round_pause": 0.2})
    specs = prepare(tmp_path, plan, x_train, y_train)
    gateway, clients = specs[0], specs[1:]
    gateway.program = (str(BYZANTINE), "gateway-flip")
    cluster = Cluster(clients)
    with cluster:
        # The fleet learns by gossip first: the history that tells a far model from a usual one.
        wait_for(lambda: all((s := status(c)) and s["counters"].get("merges", 0) >= 30 for c in clients), 120,
                 "30 merges at every client")
        before = np.mean([accuracy(c, x_test, y_test) for c in clients])
        cluster.start(gateway)
        wait_for(lambda: all((s := status(c)) and s["counters"].get("fedavg.gateway_distrusted", 0) >= 1
                             for c in clients), 120, "every client to stop following the stolen gateway")
        merges = {c.name: status(c)["counters"]["merges"] for c in clients}
        wait_for(lambda: all(status(c)["counters"]["merges"] >= merges[c.name] + 10 for c in clients), 60,
                 "gossip again")
        after = [accuracy(c, x_test, y_test) for c in clients]
        states = [status(c) for c in clients]
        codes = cluster.stop_all()
    assert all(code == 0 for code in codes.values()), codes
    assert min(after) > before - 0.05, (before, after)
    for s in states:
        assert s["counters"].get("fedavg.global_clipped", 0) >= 3, s["counters"]
        assert s["fedavg"]["learning_by"] == "gossip" and gateway.node_id.hex() in s["fedavg"]["distrusted"]
