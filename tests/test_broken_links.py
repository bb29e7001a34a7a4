"""A link that breaks in the middle of an accepted exchange is a failure of the link, not a refusal.

Before this was told apart, every peer that stopped or crashed mid-exchange showed up as ``refused.tls``
(TLS 1.3 reports a reset as a broken SSL stream), so an operator could not tell a hostile peer from a
flaky Wi-Fi link. Real daemon, real TLS; the other end is this test with a certificate of the cluster's CA,
which speaks the protocol up to a point and then resets the TCP connection.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time

import pytest

from gossipfl import wire
from gossipfl.certs import issue_node_cert
from gossipfl.control import ControlClient
from gossipfl.datasets import load_digits
from gossipfl.identity import NodeIdentity, client_context, server_context
from gossipfl.metrics import render
from gossipfl.model import Model
from gossipfld.cluster import Cluster, ClusterPlan, free_port_base, prepare

from .conftest import wait_for

pytestmark = pytest.mark.slow


def _reset(sock: ssl.SSLSocket) -> None:
    """Close with an RST, as a crashed peer's kernel does, instead of a clean TLS and TCP goodbye."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _receive_message(sock: ssl.SSLSocket) -> wire.Message:
    decoder = wire.FrameDecoder(wire.Limits())
    while (message := decoder.next_message()) is None:
        data = sock.recv(65536)
        assert data, "the daemon closed the connection"
        decoder.feed(data)
    return message


@pytest.fixture
def visitor_setup(tmp_path):
    x, y = load_digits()
    base = free_port_base()
    visitor_port = base + 10
    plan = ClusterPlan(nodes=1, base_port=base, mdns=False, training={"duty_cycle": 0.1},
                       gossip={"period": 0.3},
                       per_node={0: {"discovery": {"static_peers": [f"127.0.0.1:{visitor_port}"]}}})
    specs = prepare(tmp_path, plan, x[:300], y[:300])
    visitor_id = issue_node_cert(tmp_path / "ca", "visitor", tmp_path / "visitor")
    identity = NodeIdentity.load(tmp_path / "visitor" / "node.crt", tmp_path / "visitor" / "node.key",
                                 tmp_path / "visitor" / "ca.crt")
    hello = wire.Hello(visitor_id, wire.PROTOCOL_VERSION, Model.load(tmp_path / "model.onnx").fingerprint, "node")
    return specs, identity, hello, visitor_port


def test_a_dialler_reset_after_its_hello_is_dropped_not_refused(visitor_setup):
    specs, identity, hello, _ = visitor_setup
    with Cluster(specs) as cluster:
        spec = specs[0]
        assert cluster.wait_for_log(spec, "node started", 30), cluster.log_lines(spec)
        control = ControlClient(spec.socket, timeout=10)
        with socket.create_connection(("127.0.0.1", spec.port), timeout=10) as tcp:
            tls = client_context(identity).wrap_socket(tcp, server_hostname=None)
            tls.sendall(wire.encode(hello))
            assert isinstance(_receive_message(tls), wire.Hello)  # accepted: the daemon waits for a delta
            _reset(tls)
        counters = wait_for(lambda: (c := control.call("status")["counters"]).get("dropped.link") and c,
                            20, "the daemon to count the dropped link")
        metrics = render(control.call("status"))
        assert cluster.running(spec)
    assert 'gossipfl_inbound_drops_total{reason="link"} 1' in metrics.splitlines(), metrics
    assert counters["dropped.link"] == 1, counters
    assert not [k for k in counters if k.startswith("refused.")], counters


def test_a_receiver_reset_mid_exchange_is_a_failed_push_not_a_refusal(visitor_setup):
    specs, identity, hello, visitor_port = visitor_setup
    seen: list[wire.Message] = []
    errors: list[BaseException] = []
    with socket.create_server(("127.0.0.1", visitor_port)) as listener:
        listener.settimeout(30)

        def serve_one_exchange() -> None:
            try:
                tcp, _ = listener.accept()
                tcp.settimeout(10)
                tls = server_context(identity).wrap_socket(tcp, server_side=True)
                seen.append(_receive_message(tls))  # the daemon's Hello
                tls.sendall(wire.encode(hello))
                seen.append(_receive_message(tls))  # its delta: the exchange is under way
                _reset(tls)
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
            time.sleep(1)  # later dials find nobody listening on the visitor's port once it is closed
            assert cluster.running(spec)
    assert [type(m) for m in seen] == [wire.Hello, wire.ModelDelta], seen
    assert counters["failed.link"] == 1, counters
    assert not [k for k in counters if k.startswith("refused.")], counters
