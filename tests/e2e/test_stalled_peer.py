"""A peer that accepts TCP but never speaks TLS holds an exchange until the connect timeout; gossip with the
other peers must keep flowing meanwhile (exchanges run side by side, never two with one peer).

Real daemons, real TLS; the black hole is a listening socket on 127.0.0.1 that this test never accepts on,
so the kernel completes the TCP handshake and the daemon's TLS handshake waits.
"""

from __future__ import annotations

import socket
import time

import pytest

from gossipfl.cli.client import ControlClient
from gossipfl.learning.datasets import load_digits
from gossipfl.testing.cluster import Cluster, ClusterPlan, free_port_base, prepare

pytestmark = pytest.mark.slow

WINDOW = 10.0  # seconds of gossip observed, well inside the 60 s the black hole holds a dial


def test_a_black_hole_peer_does_not_stall_gossip_with_the_others(tmp_path):
    x, y = load_digits()
    base = free_port_base()
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", base + 10))
        hole.listen(64)  # never accepted: connections complete in the kernel and then hang
        plan = ClusterPlan(nodes=2, base_port=base, mdns=False, static_peers=True,
                           training={"duty_cycle": 0.1}, gossip={"period": 0.3},
                           per_node={0: {"discovery": {"static_peers": [f"127.0.0.1:{base + 1}",
                                                                        f"127.0.0.1:{base + 10}"]},
                                         "limits": {"connect_timeout": 60.0, "read_timeout": 60.0}}})
        specs = prepare(tmp_path, plan, x[:400], y[:400])
        with Cluster([]) as cluster:
            for spec in reversed(specs):  # node1 listens before node0 first dials it: no refused dial
                cluster.start(spec)
                assert cluster.wait_for_log(spec, "node started", 30), cluster.log_lines(spec)
            time.sleep(WINDOW)
            pusher = ControlClient(specs[0].socket, timeout=10).call("status")["counters"]
            receiver = ControlClient(specs[1].socket, timeout=10).call("status")["counters"]
            codes = cluster.stop_all()
    assert codes == {s.name: 0 for s in specs}, "a dial still hanging does not hold up SIGTERM"
    # One period in two would pick the black hole if it could be picked again while its dial hangs; run
    # one after the other, the first such pick would stop all gossip for the rest of the window.
    assert receiver.get("exchanges_in", 0) >= 10, (pusher, receiver)
    assert pusher.get("exchanges_out", 0) >= 10, pusher
    assert not any(k.startswith("failed.") for k in pusher), "the hanging dial has not timed out yet"
