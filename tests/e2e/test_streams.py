"""Three gossipfld daemons, each subscribed to its own machine's sensor topic on a real mosquitto (127.0.0.1), learn
one autoencoder by gossip from the windows of their streams and raise alerts on the faults injected into them.

The machines (gossipfl/testing/sensors.py) run at different normal levels; a fault is vibration 40% above the
machine's own normal, a level another machine runs at every day. Phases, per machine:

1. warm-up: ``WARM`` normal windows; the nodes train on them and gossip until each has trained well;
2. evaluation: ``EVAL`` windows, a fault in every ``FAULT_EVERY``-th after the first ``SETTLE`` (the threshold is
   the quantile of the recent scores, so the first windows after the warm-up's training refresh it);
3. the daemons stop; windows sent meanwhile wait at the broker (each daemon has a client id, so its session
   and its QoS 1 messages outlive its connection); the daemons start again and judge them, and only them,
   against the threshold they saved;
4. the broker restarts; every daemon reconnects.

Every window is numbered by its daemon in arrival order (0, 1, ...): with nothing dropped (checked) window k of
a machine is the daemon's row k, which is how verdicts are matched to the faults.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from gossipfl.cli.client import ControlClient
from gossipfl.errors import ControlError
from gossipfl.testing.cluster import Cluster, ClusterPlan, NodeSpec, free_port_base, prepare
from gossipfl.testing.sensors import Machine, fault_steps, window_columns
from tests.streams_broker import Broker, Publisher, Subscriber

from ..conftest import wait_for

LENGTH = 4  # readings per window
WARM, SETTLE, EVAL, FAULT_EVERY = 600, 500, 1500, 100
DOWN = 60  # windows sent while the daemons are stopped
RATE = 0.015  # the expected anomaly rate each node is configured with (the faults are 1% of the evaluation)


def status(spec: NodeSpec) -> dict | None:
    try:
        return ControlClient(spec.socket, timeout=10).call("status")
    except ControlError:
        return None


def stream(spec: NodeSpec) -> dict:
    s = status(spec)
    return s["stream"] if s else {}


def counter(spec: NodeSpec, name: str) -> float:
    s = status(spec)
    return s["counters"].get(name, 0) if s else -1


def record_model(root: Path) -> Path:
    """An operator's first step: record some normal windows of every machine, and make the model from them."""
    recording = root / "recording"
    recording.mkdir(parents=True)
    rows = np.concatenate([Machine(i).windows(100_000, 200, LENGTH) for i in range(3)])
    lines = [",".join(window_columns(LENGTH))] + [",".join(f"{v:.6g}" for v in row) for row in rows]
    (recording / "windows.csv").write_text("\n".join(lines) + "\n")
    out = root / "ae.onnx"
    subprocess.run([sys.executable, "-m", "gossipfl.cli", "model", "init", "--arch", "autoencoder", "--data",
                    str(recording), "--out", str(out)], check=True, capture_output=True, timeout=120)
    return out


def send(publisher: Publisher, machine: int, first_window: int, count: int, faults: list[int] = ()) -> None:
    payloads = Machine(machine).payloads(first_window * LENGTH, count * LENGTH, fault_steps(faults, LENGTH))
    publisher.publish_many(f"plant/m{machine}/sensors", payloads)


def verdicts(subscriber: Subscriber, machine: int) -> list[dict]:
    """Live verdicts of a machine's node (a retained copy, sent on subscribing, is not a new verdict)."""
    return [json.loads(p) for t, p, retained in subscriber.taken() if t == f"plant/m{machine}/verdict" and not retained]


def test_three_daemons_learn_normal_by_gossip_and_alert_on_faults_across_a_restart(tmp_path):
    broker = Broker(tmp_path / "broker").start()
    try:
        model = record_model(tmp_path)
        plan = ClusterPlan(nodes=3, split="iid", base_port=free_port_base(), model=model, mdns=False,
                           static_peers=True, training={"lr": 0.05, "duty_cycle": 0.5}, gossip={"period": 0.3},
                           extra={"quiet": {"enabled": False}},
                           per_node={i: {"mqtt": {
                               "enabled": True, "port": broker.port, "client_id": f"gossipfl-m{i}",
                               "topics": [f"plant/m{i}/sensors"],
                               "subscribe": [f"plant/m{i}/sensors", f"plant/m{i}/aux/#"],
                               "channels": ["temp", "vib", "cur"], "window_length": LENGTH, "window_stride": LENGTH,
                               "anomaly_rate": RATE, "calibration_scores": 500, "warmup_scores": 200,
                               "queue": 20_000, "max_queued": 20_000, "reconnect_min": 0.2, "reconnect_max": 1.0,
                               "result_topic": f"plant/m{i}/verdict", "alert_topic": f"plant/m{i}/alert",
                               **({"discovery_prefix": "homeassistant"} if i == 0 else {})}} for i in range(3)})
        specs = prepare(tmp_path / "cluster", plan, np.zeros((3, 3 * LENGTH)), np.zeros(3, np.int64))
        for spec in specs:
            (spec.directory / "data" / "shard.csv").unlink()  # the stream is the only data
        subscriber = Subscriber(broker.port, ["plant/+/verdict", "plant/+/verdict/availability", "plant/+/alert",
                                                "homeassistant/#"])
        publisher = Publisher(broker.port)
        with Cluster(specs) as cluster:
            wait_for(lambda: all(stream(s).get("subscribed") for s in specs), 60, "every daemon subscribed")
            # Hostile input first: a payload that is no JSON, and a topic no entry maps. Both counted, no harm.
            publisher.publish("plant/m0/sensors", b"{oops")
            publisher.publish("plant/m0/aux/other", b"1.0")
            for i in range(3):
                send(publisher, i, 0, WARM)
            wait_for(lambda: all(stream(s).get("judged_through") == WARM - 1 for s in specs), 60,
                     "the warm-up windows judged")
            # Learned together: every node has trained on its rows and merged its peers' models.
            wait_for(lambda: all(counter(s, "train_samples") > 30 * WARM and counter(s, "merges") > 20
                                 for s in specs), 120, "training and gossip on the warm-up windows")
            faults = {i: list(range(WARM + SETTLE + FAULT_EVERY // 2, WARM + EVAL, FAULT_EVERY)) for i in range(3)}
            for i in range(3):
                send(publisher, i, WARM, EVAL, faults[i])
            last = WARM + EVAL - 1
            wait_for(lambda: all(stream(s).get("judged_through") == last for s in specs), 60, "the windows judged")
            wait_for(lambda: all(len(verdicts(subscriber, i)) == WARM + EVAL for i in range(3)), 30,
                     "every verdict at the test's subscriber")
            for spec in specs:
                counters = status(spec)["counters"]
                assert counters.get("mqtt.rows") == WARM + EVAL, counters
                assert not [k for k in counters if k.startswith(("mqtt.windows_dropped", "mqtt.rows_dropped"))
                            or k == "mqtt.dropped.queue_full"], counters
            m0 = status(specs[0])["counters"]
            assert m0.get("mqtt.dropped.not_json") == 1 and m0.get("mqtt.dropped.unknown_topic") == 1, m0

            hits = normal = false_alarms = 0
            total_faults = 0
            alerts = {i: {json.loads(p)["seq"] for t, p, _ in subscriber.taken() if t == f"plant/m{i}/alert"}
                      for i in range(3)}
            for i in range(3):
                judged = {v["seq"]: v for v in verdicts(subscriber, i)}
                assert sorted(judged) == list(range(WARM + EVAL))  # each window judged once, in order
                evaluated = range(WARM + SETTLE, WARM + EVAL)
                total_faults += len(faults[i])
                hits += sum(1 for w in faults[i] if judged[w]["anomaly"])
                normals = [w for w in evaluated if w not in faults[i]]
                normal += len(normals)
                false_alarms += sum(1 for w in normals if judged[w]["anomaly"])
                assert alerts[i] == {s for s, v in judged.items() if v["anomaly"]}  # an alert for each anomaly
            assert total_faults == 30
            assert hits >= 0.9 * total_faults, (hits, total_faults)
            assert false_alarms < 0.02 * normal, (false_alarms, normal)

            shown = subprocess.run([sys.executable, "-m", "gossipfl.cli", "status", "--socket", str(specs[0].socket)],
                                   capture_output=True, text=True, timeout=60, check=True).stdout
            line = next(line for line in shown.splitlines() if line.startswith("stream"))
            assert f"subscribed; {WARM + EVAL} windows held, last judged {last}; threshold " in line, line

            # Home Assistant discovery from node 0 (retained, so a Home Assistant that starts later sees it).
            configs = {t: json.loads(p) for t, p, _ in subscriber.taken() if t.endswith("/config")}
            assert set(configs) == {"homeassistant/sensor/gossipfl_node0/score/config",
                                    "homeassistant/binary_sensor/gossipfl_node0/anomaly/config"}
            assert all(c["state_topic"] == "plant/m0/verdict" for c in configs.values())
            assert ("plant/m0/verdict/availability", b"online", False) in subscriber.taken()

            # 3. Stopped, while the machines keep publishing; started again.
            codes = cluster.stop_all()
            assert all(code == 0 for code in codes.values()), codes
            saved = [json.loads((s.directory / "state" / "stream.json").read_text()) for s in specs]
            assert all(state["judged_through"] == last for state in saved)
            for i in range(3):
                send(publisher, i, WARM + EVAL, DOWN, [WARM + EVAL + DOWN // 2])
            cluster.start_all()
            wait_for(lambda: all(stream(s).get("judged_through") == last + DOWN for s in specs), 60,
                     "the windows sent while the daemons were down, judged")
            wait_for(lambda: all(len(verdicts(subscriber, i)) == WARM + EVAL + DOWN for i in range(3)), 30,
                     "their verdicts")
            for i, spec in enumerate(specs):
                after = [v for v in verdicts(subscriber, i) if v["seq"] > last]
                # Only the new windows, each once, numbered on from where the daemon stopped.
                assert [v["seq"] for v in after] == list(range(last + 1, last + 1 + DOWN))
                # The threshold resumed: the first window after the restart has one (a new node has none for its
                # first `warmup_scores` windows), set on the saved windows. Its value is the current model's, not
                # the one saved: a merge with a restarted peer can move the model before the first window comes
                # (CI saw 0.027 against 0.093 for the saved model), and the threshold moves with the model.
                assert after[0]["threshold"] is not None and after[0]["threshold"] > 0, after[0]
                assert after[DOWN // 2]["anomaly"] is True, after[DOWN // 2]  # the fault sent while it was down
                assert counter(spec, "stream.windows_judged") == WARM + EVAL + DOWN  # counters survive restarts

            # 4. The broker goes away and comes back: every daemon keeps running and reconnects.
            broker.stop()
            wait_for(lambda: all(stream(s).get("connected") is False for s in specs), 30, "the daemons see it gone")
            broker.start()
            wait_for(lambda: all(stream(s).get("subscribed") for s in specs), 60, "every daemon back")
            assert all(cluster.running(s) for s in specs)
            assert all(counter(s, "mqtt.disconnects") >= 1 for s in specs)
        publisher.close()
        subscriber.close()
    finally:
        broker.stop()
