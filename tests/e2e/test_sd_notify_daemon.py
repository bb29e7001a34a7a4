"""A real gossipfld under a fake service manager: a bound datagram socket in $NOTIFY_SOCKET.

systemd is not PID 1 here, so the test plays its part: it receives READY=1, STATUS=, WATCHDOG=1 and
STOPPING=1 exactly as systemd would, on a filesystem path and on an abstract (``@``) socket.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from gossipfl.learning.checkpoint import load_checkpoint
from gossipfl.learning.datasets import load_digits
from gossipfl.testing.cluster import Cluster, ClusterPlan, free_port_base, prepare

pytestmark = pytest.mark.slow

WATCHDOG_USEC = 1_000_000  # pings expected every 0.5 s


def _status_answers(sock_path) -> bool:
    proc = subprocess.run([sys.executable, "-m", "gossipfl.cli", "status", "--json", "--socket", str(sock_path)],
                          capture_output=True, text=True, timeout=30)
    return proc.returncode == 0


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_ready_watchdog_status_and_stopping(tmp_path, kind):
    x, y = load_digits()
    spec = prepare(tmp_path, ClusterPlan(nodes=1, base_port=free_port_base(), mdns=False,
                                         training={"duty_cycle": 0.3}), x, y)[0]
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if kind == "path":
        address, env_value = str(tmp_path / "notify.sock"), str(tmp_path / "notify.sock")
    else:
        name = f"gossipfl-test-{uuid.uuid4().hex}"
        address, env_value = "\0" + name, "@" + name
    manager.bind(address)
    manager.settimeout(60)
    cluster = Cluster([spec])
    try:
        cluster.start(spec, env={"NOTIFY_SOCKET": env_value, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
        before_ready: list[str] = []
        while True:
            message = manager.recv(4096).decode()
            if "READY=1" in message.split("\n"):
                break
            before_ready.append(message)
        # At READY=1 the control socket must already answer (and so must the peer listener).
        assert _status_answers(spec.socket)
        assert not any("WATCHDOG=1" in m for m in before_ready), before_ready

        # Pings sent while the CLI above started up are queued in the socket: drop them, count from now.
        manager.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                manager.recv(4096)
        manager.settimeout(60)
        watchdog_times, statuses = [], []
        start = time.monotonic()
        while time.monotonic() - start < 3.0:
            message = manager.recv(4096).decode()
            if message == "WATCHDOG=1":
                watchdog_times.append(time.monotonic())
            elif message.startswith("STATUS="):
                statuses.append(message)
        # About one ping per half interval: 0.5 s here, so roughly 6 in 3 s; a loose band, not a timer test.
        assert 3 <= len(watchdog_times) <= 10, watchdog_times
        gaps = [b - a for a, b in itertools.pairwise(watchdog_times)]
        assert sorted(gaps)[len(gaps) // 2] < WATCHDOG_USEC / 1e6  # the median gap is under the timeout

        sent_at = time.time()
        cluster.procs[spec.name].send_signal(signal.SIGTERM)
        stopping = False
        while not stopping:
            message = manager.recv(4096).decode()
            stopping = "STOPPING=1" in message.split("\n")
        assert cluster.procs[spec.name].wait(30) == 0
        _, state = load_checkpoint(spec.checkpoint)
        assert state["saved_at"] >= sent_at  # the final checkpoint was written after SIGTERM
        assert os.path.getmtime(spec.checkpoint) >= sent_at - 1
        assert any("node stopped" in line for line in cluster.log_lines(spec))
    finally:
        cluster.__exit__(None, None, None)
        manager.close()


def test_statuses_name_the_state(tmp_path):
    """STATUS= is what `systemctl status` shows: it must say whether the node learns, and with whom."""
    x, y = load_digits()
    spec = prepare(tmp_path, ClusterPlan(nodes=1, base_port=free_port_base(), mdns=False), x, y)[0]
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "n.sock"))
    manager.settimeout(60)
    cluster = Cluster([spec])
    try:
        cluster.start(spec, env={"NOTIFY_SOCKET": str(tmp_path / "n.sock")})
        while True:
            message = manager.recv(4096).decode()
            if message.startswith("STATUS="):
                break
        assert "learning" in message and "peers" in message and "age" in message
        assert cluster.stop(spec) == 0
    finally:
        cluster.__exit__(None, None, None)
        manager.close()
