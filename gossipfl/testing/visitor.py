"""A hand-driven peer for tests that need one end of an exchange to misbehave on cue.

The visitor holds a certificate of the cluster's CA and speaks the real wire protocol with the stdlib's
blocking ``ssl`` sockets, one step at a time, so a test can stop, hold or reset the connection at an
exact point of an exchange that a real daemon would carry through.
"""

from __future__ import annotations

import socket
import ssl
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gossipfl.cli.certs import issue_node_cert
from gossipfl.cli.tls import client_context, load_identity, server_context
from gossipfl.identity.node import NodeIdentity
from gossipfl.learning.datasets import load_digits
from gossipfl.learning.model import Model
from gossipfl.protocol import framing, messages
from gossipfl.protocol.codec import CodecConfig
from gossipfl.protocol.references import GossipState
from gossipfl.testing.cluster import ClusterPlan, NodeSpec, free_port_base, prepare


@dataclass
class Visitor:
    identity: NodeIdentity
    hello: messages.Hello
    model: Model
    port: int  # where the daemon under test dials it (its only static peer)
    gossip: GossipState = field(init=False)

    def __post_init__(self) -> None:
        self.gossip = GossipState(self.model.num_params, CodecConfig())

    def dial(self, spec: NodeSpec) -> Link:
        """A TLS connection to ``spec`` with Hellos exchanged: the daemon now waits for our first message."""
        tcp = socket.create_connection((spec.address, spec.port), timeout=10)
        link = Link(client_context(self.identity).wrap_socket(tcp, server_hostname=None))
        link.send(self.hello)
        assert isinstance(link.receive(), messages.Hello)
        return link

    def accept(self, listener: socket.socket) -> tuple[Link, messages.Message]:
        """The daemon's next dial, with our Hello sent back; returns the connection and the daemon's Hello."""
        tcp, _ = listener.accept()
        tcp.settimeout(10)
        link = Link(server_context(self.identity).wrap_socket(tcp, server_side=True))
        theirs = link.receive()
        link.send(self.hello)
        return link, theirs

    def full_model_delta(self, peer: bytes, age: float = 50.0) -> messages.ModelDelta:
        """Our model in full (base 0), as a push a daemon accepts: near its own initial model."""
        rng = np.random.default_rng(0)
        params = self.model.params + rng.normal(0, 1e-3, self.model.num_params).astype(np.float32)
        push = self.gossip.prepare_push(peer, params, full=True)
        return messages.ModelDelta(push.base_seq, push.new_seq, age, 0, push.payload)


def make_visitor(tmp_path: Path, **plan_options: object) -> tuple[list[NodeSpec], Visitor]:
    """One daemon's files (its only static peer is the visitor's port) and a visitor of the same cluster."""
    x, y = load_digits()
    base = free_port_base()
    visitor_port = base + 10
    options: dict = {"nodes": 1, "base_port": base, "mdns": False, "training": {"duty_cycle": 0.1},
                     "gossip": {"period": 0.3}, **plan_options}
    options.setdefault("per_node", {}).setdefault(0, {}).setdefault("discovery", {})["static_peers"] = [
        f"127.0.0.1:{visitor_port}"]
    specs = prepare(tmp_path, ClusterPlan(**options), x[:300], y[:300])
    directory = tmp_path / "visitor"
    visitor_id = issue_node_cert(tmp_path / "ca", "visitor", directory)
    identity = load_identity(directory / "node.crt", directory / "node.key", directory / "ca.crt")
    model = Model.load(tmp_path / "model.onnx")
    hello = messages.Hello(visitor_id, messages.PROTOCOL_VERSION, model.fingerprint, "node", ("push-pull",))
    return specs, Visitor(identity, hello, model, visitor_port)


@dataclass
class Link:
    """One connection, with its own frame decoder (a read may carry more than one message)."""

    sock: ssl.SSLSocket
    decoder: framing.FrameDecoder = field(default_factory=lambda: framing.FrameDecoder(framing.Limits()))

    def send(self, message: messages.Message) -> None:
        self.sock.sendall(framing.encode(message))

    def receive(self) -> messages.Message:
        while (message := self.decoder.next_message()) is None:
            data = self.sock.recv(65536)
            assert data, "the daemon closed the connection"
            self.decoder.feed(data)
        return message

    def reset(self) -> None:
        """Close with an RST, as a crashed peer's kernel does, instead of a clean TLS and TCP goodbye."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()
