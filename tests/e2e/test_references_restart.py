"""A restarted daemon resumes its per-peer delta references, so neither side falls back to full models.

Real daemons, real TLS, static peers. Control: the same restart with ``state.save_references = false``,
after which both ends must send a full model again.
"""

from __future__ import annotations

import time

import pytest

from gossipfl.cli.client import ControlClient
from gossipfl.learning.datasets import load_digits
from gossipfl.testing.cluster import Cluster, ClusterPlan, evaluate_checkpoint, free_port_base, prepare

from ..conftest import wait_for

pytestmark = pytest.mark.slow


def _wait_until_they_met(cluster: Cluster, specs) -> None:
    """Both up, and each has pushed twice (so each holds a reference of the other, both ways)."""
    for spec in specs:
        assert cluster.wait_for_log(spec, "node started", 30), cluster.log_lines(spec)

    def met() -> bool:
        counters = [ControlClient(s.socket, timeout=10).call("status")["counters"] for s in specs]
        return all(c.get("exchanges_out", 0) >= 2 and c.get("full_models_sent", 0) >= 1 for c in counters)

    wait_for(met, 30, "the two nodes to exchange both ways")


def _restart_once(root, save_references: bool) -> tuple[dict, dict, list[str]]:
    """Restart node1 once; returns the full models each node sent from just before the restart to the
    end (live counters, so that nothing the final stop cuts is counted), node1's end counters and log."""
    x, y = load_digits()
    plan = ClusterPlan(nodes=2, base_port=free_port_base(), mdns=False, static_peers=True,
                       training={"duty_cycle": 0.1}, gossip={"period": 0.3},
                       extra={"state": {"save_references": save_references}})
    specs = prepare(root, plan, x[:400], y[:400])

    def fulls() -> list[int]:
        return [ControlClient(s.socket, timeout=10).call("status")["counters"].get("full_models_sent", 0)
                for s in specs]

    with Cluster(specs) as cluster:
        _wait_until_they_met(cluster, specs)
        time.sleep(1)
        before = fulls()
        assert cluster.stop(specs[1]) == 0, "SIGTERM: checkpoint and references written"
        cluster.start(specs[1])
        assert cluster.wait_for_log(specs[1], "node started", 30)
        time.sleep(4)
        after = fulls()
        end = ControlClient(specs[1].socket, timeout=10).call("status")["counters"]
        codes = cluster.stop_all()
    assert codes == {s.name: 0 for s in specs}, codes
    sent = {"pusher": after[0] - before[0], "restarted": after[1] - before[1]}
    return sent, end, cluster.log_lines(specs[1])


def test_restart_resumes_delta_references(tmp_path):
    sent, restarted, log = _restart_once(tmp_path, save_references=True)
    assert any("resumed delta references" in line and "references=2" in line for line in log), log
    # No full model after the restart. (One at most: an exchange cut by the SIGTERM after the receiver
    # committed but before its ack arrived leaves the two ends one apart, which costs that direction a
    # need-full and a full model; the control costs both directions.)
    assert sum(sent.values()) <= 1, sent
    assert restarted.get("merges", 0) >= 4, restarted
    assert (tmp_path / "node1" / "state" / "references.bin").stat().st_mode & 0o777 == 0o600


def test_without_saved_references_a_restart_costs_need_full(tmp_path):
    sent, _, log = _restart_once(tmp_path, save_references=False)
    assert not any("resumed delta references" in line for line in log)
    # The restarted node starts a new chain (a full model), and its peer must too, after a need-full or a
    # pull that names no base.
    assert sent["restarted"] >= 1 and sent["pusher"] >= 1, sent
    assert not (tmp_path / "node1" / "state" / "references.bin").exists()


def test_a_damaged_references_file_is_ignored_with_a_warning(tmp_path):
    x, y = load_digits()
    plan = ClusterPlan(nodes=2, base_port=free_port_base(), mdns=False, static_peers=True,
                       training={"duty_cycle": 0.1}, gossip={"period": 0.3})
    specs = prepare(tmp_path, plan, x[:400], y[:400])
    with Cluster(specs) as cluster:
        _wait_until_they_met(cluster, specs)
        assert cluster.stop(specs[1]) == 0
        refs = specs[1].checkpoint.parent / "references.bin"
        data = bytearray(refs.read_bytes())
        data[len(data) // 2] ^= 0xFF
        refs.write_bytes(bytes(data))
        cluster.start(specs[1])
        assert cluster.wait_for_log(specs[1], "node started", 30)
        time.sleep(3)
        codes = cluster.stop_all()
    assert codes == {s.name: 0 for s in specs}, codes
    log = cluster.log_lines(specs[1])
    assert any("ignoring the saved delta references" in line and "digest mismatch" in line for line in log), log
    counters = evaluate_checkpoint(specs[1], x, y)[1]["counters"]
    assert counters.get("merges", 0) >= 4, "it learns on, after need-full and full models"
