"""The client side of server-assisted FedAvg: following a gateway's rounds on this node.

A gateway dials us with a ``GatewayRound``: the global model as a delta against the previous global
we hold (per-gateway references with error feedback, exactly as in gossip), a deadline and a number
of local epochs. We train those epochs from the global model (or from our own model, if gossip has
taken it further than the global while the gateway was away), answer with our delta and sample count,
and, once the gateway has aggregated, adopt the new global model (a second ``GatewayRound`` with zero
epochs). Between rounds we hold the global model, so ``gossipfl model export`` ships what the gateway
has.

Which gateway: the live one with the lowest node id (several gateways elect none of themselves;
every client makes the same choice from what it sees). A gateway counts as live while it has been in
touch, or announced, within ``fedavg.fallback_seconds``. In mode ``auto`` a node with no live gateway
learns by gossip from the model it has; one round from a gateway brings it back. A node never adopts a
global model younger than its own, so falling back and returning never loses what it learned.

The uplink delta is coded with error feedback too: what the lossy codec drops from one update is
added to the next (the residual), so ``int8`` or ``topk`` uplinks do not bias the average.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import trio

from gossipfl.protocol import messages
from gossipfl.protocol.codec import decode_delta, encode_delta
from gossipfl.protocol.references import GossipState, NeedFull, Refused

from .connection import MessageStream, PeerRefused, expect
from .logs import fields

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("gossipfld.follower")

MAX_GATEWAYS = 4  # references kept for this many gateways


class Follower:
    def __init__(self, node: Node) -> None:
        self.node = node
        # The global model is the gateway's, not a peer's opinion: no outlier test against our own model.
        self.references = GossipState(node.model.num_params, node.codec, MAX_GATEWAYS, outlier_factor=math.inf)
        self.residual: np.ndarray | None = None
        self.gateway: bytes | None = None  # the gateway whose round we took last
        self.last_round = 0
        self.rounds = 0

    # ---------------------------------------------------------------- which gateway

    def live_gateways(self, now: float) -> list[bytes]:
        window = self.node.config.fedavg.fallback_seconds
        return sorted(p.node_id for p in self.node.peers
                      if p.role == "gateway" and len(p.node_id) == 32 and not self.node.peers.is_blocked(p.node_id)
                      and p.stats.last_seen is not None and now - p.stats.last_seen < window)

    def following(self, now: float) -> bool:
        """Whether rounds, not gossip, drive learning now."""
        mode = self.node.config.node.mode
        if self.node.config.node.role == "gateway" or mode == "gossip":
            return False
        return mode == "fedavg" or bool(self.live_gateways(now))

    def _check_gateway(self, gateway_id: bytes) -> None:
        mode = self.node.config.node.mode
        if self.node.config.node.role == "gateway":
            raise PeerRefused("role", "a gateway does not follow another gateway")
        if mode == "gossip":
            raise PeerRefused("mode", "this node is in gossip mode and follows no gateway")
        if self.node.paused:
            raise PeerRefused("paused", "this node is paused by its operator")
        live = self.live_gateways(trio.current_time())
        if live and live[0] != gateway_id:
            raise PeerRefused("not-following", f"this node follows gateway {live[0].hex()[:12]}")

    # ---------------------------------------------------------------- one round

    async def session(self, conn: MessageStream, gateway_id: bytes, first: messages.GatewayRound) -> None:
        """Serve one round on an inbound connection from a gateway."""
        try:
            self._check_gateway(gateway_id)
        except PeerRefused as exc:
            await conn.send(messages.Error(messages.ErrorCode.REFUSED, str(exc)[:200]))
            raise
        node = self.node
        message = first
        global_params, global_seq = await self._receive_global(conn, gateway_id, message)
        if message.epochs == 0:  # a bare adoption (the gateway's result of a round we did not train in)
            await self._adopt(conn, gateway_id, message, global_params)
            return
        if self.residual is None or self.gateway != gateway_id:
            self.residual = np.zeros(node.model.num_params, np.float32)  # a new gateway holds none of it
        self.gateway = gateway_id
        start, base_age = (global_params, message.age) if message.age >= node.age else (None, node.age)
        with trio.fail_after(message.deadline):
            trained, samples = await node.train_from(start, message.epochs)
        reference = global_params
        delta = trained - reference
        corrected = delta + self.residual
        payload = await trio.to_thread.run_sync(encode_delta, corrected, node.codec)
        sent = await trio.to_thread.run_sync(decode_delta, payload, node.model.num_params)
        self.residual = corrected - sent
        await conn.send(messages.GatewayUpdate(message.round, global_seq, samples, base_age + samples, payload))
        node.counters.add("fedavg.updates_sent")
        self.last_round, self.rounds = message.round, self.rounds + 1
        # The gateway aggregates once its quorum answered or the deadline passed; then sends the result.
        result = expect(await conn.receive(timeout=message.deadline + node.config.limits.read_timeout),
                        messages.GatewayRound)
        assert isinstance(result, messages.GatewayRound)
        if result.epochs != 0 or result.round != message.round:
            raise PeerRefused("protocol", "expected the round's result (zero epochs, same round)")
        new_global, _ = await self._receive_global(conn, gateway_id, result)
        await self._adopt(conn, gateway_id, result, new_global)

    async def _receive_global(self, conn: MessageStream, gateway_id: bytes,
                              message: messages.GatewayRound) -> tuple[np.ndarray, int]:
        """Decode the global model, asking for it whole if our base is missing; returns it and its seq."""
        node = self.node
        while True:
            try:
                received = await trio.to_thread.run_sync(self.references.receive, gateway_id, message.base_seq,
                                                         message.new_seq, message.payload, node.model.params)
                break
            except NeedFull as exc:
                node.counters.add("need_full_sent")
                await conn.send(messages.NeedFull(exc.base_seq))
                retry = expect(await conn.receive(), messages.GatewayRound)
                assert isinstance(retry, messages.GatewayRound)
                if retry.round != message.round or retry.epochs != message.epochs:
                    raise PeerRefused("protocol", "the gateway changed the round while resending it") from None
                message = retry
            except Refused as exc:
                raise PeerRefused(exc.reason, str(exc)) from None
        self.references.commit_receive(received)
        node.peers.succeeded(gateway_id, trio.current_time())
        return received.model.copy(), message.new_seq

    async def _adopt(self, conn: MessageStream, gateway_id: bytes, message: messages.GatewayRound,
                     global_params: np.ndarray) -> None:
        node = self.node
        async with node.lock:
            if message.age >= node.age:
                node.model.set_params(global_params)
                node.age = message.age
                node.counters.add("fedavg.adopted")
            else:  # our own model learned more (gossip while the gateway was away): keep it
                node.counters.add("fedavg.kept_newer")
        await conn.send(messages.Ack(message.new_seq))
        log.debug("round adopted", extra=fields(gateway=gateway_id.hex()[:12], round=message.round, age=node.age))
