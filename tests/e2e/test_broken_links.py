"""A link that breaks in the middle of an accepted exchange is a failure of the link, not a refusal.

Before this was told apart, every peer that stopped or crashed mid-exchange showed up as ``refused.tls``
(TLS 1.3 reports a reset as a broken SSL stream), so an operator could not tell a hostile peer from a
flaky Wi-Fi link. Real daemon, real TLS; the other end is this test with a certificate of the cluster's CA,
which speaks the protocol up to a point and then resets the TCP connection.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from gossipfl.cli.client import ControlClient
from gossipfl.metrics import render
from gossipfl.protocol import messages
from gossipfl.testing.cluster import Cluster
from gossipfl.testing.visitor import make_visitor

from ..conftest import wait_for

pytestmark = pytest.mark.slow


def test_a_dialler_reset_after_its_hello_is_dropped_not_refused(tmp_path):
    specs, visitor = make_visitor(tmp_path)
    with Cluster(specs) as cluster:
        spec = specs[0]
        assert cluster.wait_for_log(spec, "node started", 30), cluster.log_lines(spec)
        control = ControlClient(spec.socket, timeout=10)
        visitor.dial(spec).reset()  # accepted, then gone: the daemon was waiting for a delta
        counters = wait_for(lambda: (c := control.call("status")["counters"]).get("dropped.link") and c,
                            20, "the daemon to count the dropped link")
        metrics = render(control.call("status"))
        assert cluster.running(spec)
    assert 'gossipfl_inbound_drops_total{reason="link"} 1' in metrics.splitlines(), metrics
    assert counters["dropped.link"] == 1, counters
    assert not [k for k in counters if k.startswith("refused.")], counters


def test_a_receiver_reset_mid_exchange_is_a_failed_push_not_a_refusal(tmp_path):
    specs, visitor = make_visitor(tmp_path)
    seen: list[messages.Message] = []
    errors: list[BaseException] = []
    with socket.create_server(("127.0.0.1", visitor.port)) as listener:
        listener.settimeout(30)

        def serve_one_exchange() -> None:
            try:
                link, theirs = visitor.accept(listener)
                seen.append(theirs)
                seen.append(link.receive())  # its delta: the exchange is under way
                link.reset()
            except BaseException as exc:  # reported by the test below
                errors.append(exc)

        thread = threading.Thread(target=serve_one_exchange, daemon=True)
        thread.start()
        with Cluster(specs) as cluster:
            spec = specs[0]
            control = ControlClient(spec.socket, timeout=10)
            thread.join(40)
            assert not errors, errors
            counters = wait_for(lambda: (c := control.call("status")["counters"]).get("failed.link") and c,
                                20, "the daemon to count the failed push")
            time.sleep(1)  # later dials wait unaccepted in the backlog: none of that may count as a refusal
            assert cluster.running(spec)
    assert [type(m) for m in seen] == [messages.Hello, messages.ModelDelta], seen
    assert counters["failed.link"] == 1, counters
    assert not [k for k in counters if k.startswith("refused.")], counters
