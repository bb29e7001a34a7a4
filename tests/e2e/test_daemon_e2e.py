"""End to end: real gossipfld processes, real mutual TLS, real mDNS on 127.0.0.1, real files.

Accuracy is read from the checkpoints the daemons write on SIGTERM, evaluated on a held-out part of
digits that no node trained on.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from gossipfl.cli.certs import init_ca, issue_node_cert
from gossipfl.cli.client import ControlClient
from gossipfl.learning.datasets import load_digits, train_test_split
from gossipfl.learning.model import Model
from gossipfl.learning.trainer import Trainer
from gossipfl.protocol import messages
from gossipfl.testing.cluster import (
    Cluster,
    ClusterPlan,
    evaluate_checkpoint,
    free_port_base,
    prepare,
    train_centrally,
    write_toml,
)

pytestmark = pytest.mark.slow

TRAINING = {"duty_cycle": 0.2, "lr": 0.05}


@pytest.fixture(scope="module")
def split():
    x, y = load_digits()
    return train_test_split(x, y, test_fraction=0.25, seed=1)


def _ts(line: str) -> float:
    match = re.match(r"ts=(\S+)Z", line)
    assert match, line
    return time.mktime(time.strptime(match.group(1)[:19], "%Y-%m-%dT%H:%M:%S")) + float("0." + match.group(1)[20:])


def test_three_daemons_find_each_other_by_mdns_and_exchange(tmp_path, split):
    x_train, y_train, x_test, y_test = split
    specs = prepare(tmp_path, ClusterPlan(nodes=3, base_port=free_port_base(), training=TRAINING), x_train, y_train)
    with Cluster(specs) as cluster:
        for spec in specs:
            assert cluster.wait_for_log(spec, "node started", 30), cluster.log_lines(spec)
        time.sleep(8)
        live = {spec.name: ControlClient(spec.socket, timeout=10).call("status")["counters"] for spec in specs}
        codes = cluster.stop_all()
    assert codes == {s.name: 0 for s in specs}, "SIGTERM stops every daemon cleanly"
    ids = {s.node_id.hex()[:12] for s in specs}
    for spec in specs:
        lines = cluster.log_lines(spec)
        registered = _ts(next(line for line in lines if "registered" in line))
        seen = {m.group(1): _ts(line) for line in lines if (m := re.search(r'"peer seen" peer=(\w+)', line))}
        assert set(seen) == ids - {spec.node_id.hex()[:12]}, "each sees the two others, never itself"
        last_registration = max(_ts(next(ln for ln in cluster.log_lines(s) if "registered" in ln)) for s in specs)
        assert max(seen.values()) - max(registered, last_registration) < 5.0
        assert any("node stopped" in line for line in lines)
        counters = live[spec.name]  # read while all ran: stopping together can cut an exchange in flight
        assert counters["merges"] >= 2 and counters["exchanges_out"] >= 2, counters
        assert not any(k.startswith("refused.") for k in counters), counters
        _metrics, state, _ = evaluate_checkpoint(spec, x_test, y_test)
        assert state["counters"]["merges"] >= counters["merges"], "the checkpoint at SIGTERM holds them too"


def test_two_clusters_on_one_lan_pass_over_each_other(tmp_path, split):
    """Two clusters (two CAs) gossip on the same loopback mDNS: each node ignores the other cluster's adverts
    by their cluster tag instead of dialling them and failing at TLS."""
    x_train, y_train, _, _ = split
    base = free_port_base(count=12)
    clusters = [prepare(tmp_path / name, ClusterPlan(nodes=2 if name != "green" else 1, base_port=base + 4 * i,
                                                     training=TRAINING, gossip={"period": 0.3}), x_train, y_train)
                for i, name in enumerate(("red", "blue", "green"))]
    lone = clusters[2][0]  # a node of a third cluster, alone: it sees only the others' adverts
    with Cluster(clusters[0]) as red, Cluster(clusters[1]) as blue, Cluster(clusters[2]) as green:
        for cluster, spec in [(red, s) for s in clusters[0]] + [(blue, s) for s in clusters[1]] + [(green, lone)]:
            assert cluster.wait_for_log(spec, "node started", 30), cluster.log_lines(spec)
        time.sleep(6)
        # Read while all run: stopping a cluster can cut an exchange in flight, which its peer counts.
        live = [ControlClient(spec.socket, timeout=10).call("status")["counters"]
                for spec in clusters[0] + clusters[1]]
        problems = ControlClient(lone.socket, timeout=10).call("status")["problems"]
        codes = [red.stop_all(), blue.stop_all(), green.stop_all()]
    assert codes == [{"node0": 0, "node1": 0}] * 2 + [{"node0": 0}], codes
    lonely = [p for p in problems if p.startswith("no peers of this cluster;")]
    assert lonely and "adverts of other clusters" in lonely[0], problems
    for counters in live:
        assert counters.get("ignored.other_cluster", 0) >= 2, counters  # the other cluster's two nodes
        assert counters.get("merges", 0) >= 1, counters
        assert not any(k.startswith(("refused.", "failed.")) for k in counters), counters


def _spread(vectors: list[np.ndarray]) -> float:
    mean = np.mean(vectors, axis=0)
    return float(np.mean([np.linalg.norm(v - mean) for v in vectors]))


def test_five_daemons_on_non_iid_shards_learn_together(tmp_path, split):
    x_train, y_train, x_test, y_test = split
    plan = ClusterPlan(nodes=5, alpha=0.5, base_port=free_port_base(), training=TRAINING, gossip={"period": 0.3})
    specs = prepare(tmp_path, plan, x_train, y_train)
    with Cluster(specs) as cluster:
        time.sleep(35)
        assert all(code == 0 for code in cluster.stop_all().values())
    from gossipfl.learning.data import DataSpec, load_directory

    gossip, alone = [], []
    for spec in specs:
        metrics, _, model = evaluate_checkpoint(spec, x_test, y_test)
        shard = load_directory(spec.directory / "data", DataSpec(features=64, classes=10)).all
        isolated = train_centrally(tmp_path / "model.onnx", shard.x, shard.y)
        alone_metrics = Trainer(isolated).evaluate(x_test, y_test)
        gossip.append((metrics.accuracy, model.params.copy()))
        alone.append((alone_metrics.accuracy, isolated.params.copy()))
    together, single = np.array([a for a, _ in gossip]), np.array([a for a, _ in alone])
    print("gossip accuracy", together.round(3), "shard alone", single.round(3))
    assert np.all(together > single), "every node beats what its own shard alone gives"
    assert together.mean() - single.mean() > 0.15, "and on average by far"
    assert together.min() > 0.85 and together.min() > single.min() + 0.25, "the poorest shard gains most"
    ratio = _spread([p for _, p in alone]) / _spread([p for _, p in gossip])
    print("spread alone / gossip", round(ratio, 1))
    assert ratio >= 10, ratio


def test_sigkill_restart_resumes_and_peers_take_it_back(tmp_path, split):
    x_train, y_train, _, _ = split
    plan = ClusterPlan(nodes=3, base_port=free_port_base(), training=TRAINING,
                       gossip={"period": 0.3, "failures_to_evict": 2, "max_backoff": 2.0},
                       extra={"state": {"checkpoint_seconds": 0.5}})
    specs = prepare(tmp_path, plan, x_train, y_train)
    victim = specs[0]
    with Cluster(specs) as cluster:
        time.sleep(6)
        cluster.kill(victim)
        _, before, _ = evaluate_checkpoint(victim, x_train, y_train)
        assert before["age"] > 0
        time.sleep(5)  # the others fail to reach it and evict it
        cluster.start(victim)
        assert cluster.wait_for_log(victim, "resumed from checkpoint", 30)
        time.sleep(8)
        codes = cluster.stop_all()
    assert all(code == 0 for code in codes.values())
    resumed = next(ln for ln in cluster.log_lines(victim) if "resumed from checkpoint" in ln)
    assert f"age={before['age']}" in resumed, "the restarted daemon starts from the checkpointed age"
    _, after, _ = evaluate_checkpoint(victim, x_train, y_train)
    assert after["age"] > before["age"] and after["counters"]["merges"] > before["counters"].get("merges", 0)
    for other in specs[1:]:
        _, state, _ = evaluate_checkpoint(other, x_train, y_train)
        assert state["counters"].get("evictions", 0) >= 1, state["counters"]
        evicted = [ln for ln in cluster.log_lines(other) if "peer evicted" in ln]
        assert any(f"peer={victim.node_id.hex()[:12]}" in ln for ln in evicted), evicted


def test_kill_during_checkpoint_writes_never_corrupts(tmp_path, split):
    x_train, y_train, _, _ = split
    plan = ClusterPlan(nodes=1, base_port=free_port_base(), mdns=False, training={"duty_cycle": 0.5},
                       extra={"state": {"checkpoint_seconds": 0.01}})
    specs = prepare(tmp_path, plan, x_train, y_train)
    spec = specs[0]
    rng = np.random.default_rng(0)
    cluster = Cluster([])  # started and killed by hand below; the context only guarantees the final kill
    with cluster:
        for _ in range(8):
            cluster.start(spec)
            assert cluster.wait_for_log(spec, "node started", 30)
            time.sleep(float(rng.uniform(0.2, 1.0)))
            cluster.kill(spec)
            _, state, _ = evaluate_checkpoint(spec, x_train, y_train)  # raises if unreadable
            assert state["age"] > 0
    assert len(cluster.log_lines(spec)) > 0


def test_foreign_ca_wrong_id_and_other_model_are_refused(tmp_path, split):
    x_train, y_train, _, _ = split
    base = free_port_base()
    plan = ClusterPlan(nodes=2, base_port=base, mdns=False, static_peers=True, training=TRAINING,
                       gossip={"period": 0.3})
    specs = prepare(tmp_path, plan, x_train, y_train)
    target = specs[0]
    rogues = []
    # 1. a certificate from another CA
    init_ca(tmp_path / "other-ca")
    issue_node_cert(tmp_path / "other-ca", "stranger", tmp_path / "stranger" / "certs")
    # 2. the same CA but another model
    issue_node_cert(tmp_path / "ca", "othermodel", tmp_path / "othermodel" / "certs")
    from gossipfl.learning.zoo import ArchSpec, build

    build(ArchSpec("mlp", 64, 10, hidden=(16,))).save(tmp_path / "other-model.onnx")
    for i, (name, model) in enumerate([("stranger", tmp_path / "model.onnx"),
                                       ("othermodel", tmp_path / "other-model.onnx")]):
        directory = tmp_path / name
        (directory / "data").mkdir(parents=True, exist_ok=True)
        config = directory / "node.toml"
        write_toml(config, {
            "node": {"name": name, "state_dir": "state"},
            "listen": {"address": "127.0.0.1", "port": base + 10 + i},
            "discovery": {"mdns": False, "static_peers": [f"127.0.0.1:{target.port}"]},
            "tls": {"cert": "certs/node.crt", "key": "certs/node.key", "ca": "certs/ca.crt"},
            "model": {"path": str(model)},
            "gossip": {"period": 0.3},
            "control": {"socket": str(directory / "control.sock")},
        })
        from gossipfl.testing.cluster import NodeSpec

        rogues.append(NodeSpec(name, directory, config, b"", base + 10 + i))
    with Cluster(specs + rogues) as cluster:
        time.sleep(6)
        codes = cluster.stop_all()
    assert all(code == 0 for code in codes.values()), codes
    _, state, _ = evaluate_checkpoint(target, x_train, y_train)
    counters = state["counters"]
    assert counters.get("refused.tls", 0) >= 1, counters  # the stranger's handshakes
    assert counters.get("refused.fingerprint", 0) >= 1, counters  # the other model's Hello
    assert counters.get("merges", 0) >= 1, "the honest peer still gets through"
    stranger = next(r for r in rogues if r.name == "stranger")
    _, s_state, _ = evaluate_checkpoint(stranger, x_train, y_train)
    assert s_state["counters"].get("merges", 0) == 0 and s_state["counters"].get("exchanges_out", 0) == 0


def test_valid_certificate_under_another_advertised_id_is_refused(tmp_path, split):
    """mDNS says node X listens on a port where node Y answers: the dialler refuses after TLS."""
    from zeroconf import Zeroconf

    from gossipfl.protocol.advert import Advertisement
    from gossipfld.discovery import service_info

    x_train, y_train, _, _ = split
    specs = prepare(tmp_path, ClusterPlan(nodes=2, base_port=free_port_base(), training=TRAINING,
                                          gossip={"period": 0.3}), x_train, y_train)
    fingerprint = Model.load(tmp_path / "model.onnx").fingerprint
    forged = Advertisement(bytes(range(32)), messages.PROTOCOL_VERSION, fingerprint, specs[1].port, "node",
                           ("127.0.0.1",))
    zc = Zeroconf(interfaces=["127.0.0.1"])
    try:
        with Cluster(specs) as cluster:
            assert cluster.wait_for_log(specs[0], "node started", 30)
            zc.register_service(service_info(forged))
            time.sleep(6)
            codes = cluster.stop_all()
    finally:
        zc.close()
    assert all(code == 0 for code in codes.values())
    _, state, _ = evaluate_checkpoint(specs[0], x_train, y_train)
    assert state["counters"].get("refused.identity", 0) >= 1, state["counters"]
    assert state["counters"].get("merges", 0) >= 1, "the real peer is still reached"


def test_bad_config_is_refused_at_start_and_by_config_check(tmp_path, split):
    import subprocess
    import sys

    x_train, y_train, _, _ = split
    spec = prepare(tmp_path, ClusterPlan(nodes=1, base_port=free_port_base(), mdns=False), x_train, y_train)[0]
    ok = subprocess.run([sys.executable, "-m", "gossipfl.cli", "config", "check", str(spec.config)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and spec.node_id.hex() in ok.stdout, ok.stderr
    text = spec.config.read_text().replace("period = 0.5", "period = 0.5\nperod = 3")
    spec.config.write_text(text)
    check = subprocess.run([sys.executable, "-m", "gossipfl.cli", "config", "check", str(spec.config)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode != 0 and check.stderr.strip().count("\n") == 0
    assert "gossip.perod: unknown key" in check.stderr
    daemon = subprocess.run([sys.executable, "-m", "gossipfld.main", "--config", str(spec.config)],
                            capture_output=True, text=True, timeout=60)
    assert daemon.returncode == 2 and "gossip.perod: unknown key" in daemon.stderr
    assert "Traceback" not in daemon.stderr
    spec.config.write_text(text.replace("\nperod = 3", "").replace("certs/node.key", "certs/missing.key"))
    daemon = subprocess.run([sys.executable, "-m", "gossipfld.main", "--config", str(spec.config)],
                            capture_output=True, text=True, timeout=60)
    assert daemon.returncode == 2 and "tls.key:" in daemon.stderr and "missing.key does not exist" in daemon.stderr
    check = subprocess.run([sys.executable, "-m", "gossipfl.cli", "config", "check", str(spec.config)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode != 0 and check.stderr.strip().count("\n") == 0
    assert "tls.key:" in check.stderr and "gossipfl certs issue" in check.stderr, check.stderr


def test_daemons_in_network_namespaces_find_each_other_by_mdns(tmp_path, split):
    """Three hosts on a bridge, one daemon each, mDNS only: they find each other and exchange models."""
    from gossipfl.testing.netns import netns_lab, require_netns

    require_netns()
    x_train, y_train, _, _ = split
    with netns_lab(3, subnet="10.78.0.0/24") as lab:
        plan = ClusterPlan(nodes=3, addresses=[h.address for h in lab.hosts], base_port=7900, training=TRAINING,
                           gossip={"period": 0.3})
        specs = prepare(tmp_path, plan, x_train, y_train)
        for spec, host in zip(specs, lab.hosts, strict=True):
            spec.netns = host.ns
        with Cluster(specs) as cluster:
            for spec in specs:
                assert cluster.wait_for_log(spec, "node started", 30), cluster.log_lines(spec)
            time.sleep(8)
            codes = cluster.stop_all()
    assert all(code == 0 for code in codes.values()), codes
    for spec in specs:
        seen = {m.group(1) for ln in cluster.log_lines(spec) if (m := re.search(r'"peer seen" peer=(\w+)', ln))}
        assert seen == {s.node_id.hex()[:12] for s in specs if s is not spec}
        _, state, _ = evaluate_checkpoint(spec, x_train, y_train)
        assert state["counters"].get("merges", 0) >= 1, state["counters"]
