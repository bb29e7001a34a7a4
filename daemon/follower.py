"""The client side of server-assisted FedAvg: following a gateway's rounds on this node.

A gateway dials us with a ``GatewayRound``: the global model as a delta against the previous global we hold
(per-gateway references with error feedback, exactly as in gossip), a deadline and a number of local epochs.
We train those epochs from the global model (or from our own model, if gossip has taken it further than the
global while the gateway was away), answer with our delta and sample count, and, once the gateway has
aggregated, adopt the new global model (the round's result: a ``GatewayRound`` with zero epochs). Between
rounds we hold the global model, so ``gossipfl model export`` ships what the gateway has.

Which gateway: the live one with the lowest node id (several gateways elect none of themselves; every client
makes the same choice from what it sees). A gateway counts as live while it has been in touch, or announced,
within ``fedavg.fallback_seconds``. In mode ``auto`` a node with no live gateway learns by gossip from the
model it has; one round from a gateway brings it back. A node never adopts a global model younger than its
own, so falling back and returning never loses what it learned.

A global model is checked before it is taken (issue 13): a gateway's certificate can be stolen, and the role
alone must not let its holder replace every client's model. A global model is suspect when it is both far
from ours and worse on our own rows. Far: beyond the radius the node's one history of gossip merges sets
(``robust.MergeGuard``: ``gossip.clip_factor`` times the median distance of recent merges), and never less
than half our model's norm (``NORM_FLOOR``). Distance alone could not tell: an honest first round of five
epochs moved a model by its whole size, as far as a sign flip does. Worse: its loss on up to 256 of our
training rows above ``LOSS_FACTOR`` times our model's, plus ``LOSS_MARGIN`` (as in Zeno, Xie, Koyejo and Gupta
2019: a server's step judged by the data the client holds). A suspect model is not taken whole: the client
takes a clipped step towards it, scaled by the gateway's trust, which halves at every suspect round; a gateway
suspect ``DISTRUST_AFTER`` rounds in a row is not followed for ``DISTRUST_SECONDS`` (its rounds are refused as
``untrusted``; in mode ``auto`` the node learns by gossip meanwhile). A stolen gateway certificate used from the
first round took every honest node of bench/byzantine.py to chance when clients only clipped by distance. An
honest gateway restarted after its clients learned by gossip is suspect for a round at most: the clients train
from where they are, their updates carry the difference, and its next global model is theirs. Without rows,
or under DP (a decision that read the rows would be a release the accountant does not count), a client cannot
judge, and takes the global model whole. A suspect model is taken with our own age, never the gateway's claim.

The uplink delta is coded with error feedback too: what the lossy codec drops from one update is added to
the next (the residual), so ``int8`` or ``topk`` uplinks do not bias the average.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import trio

from gossipfl.config import NodeConfig
from gossipfl.errors import RefusedByUs
from gossipfl.learning.merge import Merged
from gossipfl.learning.robust import MergeGuard
from gossipfl.metrics import Counters
from gossipfl.protocol import messages
from gossipfl.protocol.codec import CodecConfig
from gossipfl.protocol.feedback import Reference
from gossipfl.protocol.peers import PeerTable
from gossipfl.protocol.references import GossipState

from .learner import Learner
from .link import Link
from .logs import fields
from .reporting import short
from .transfer import receive_model, refusal_code

log = logging.getLogger("gossipfld.follower")

MAX_GATEWAYS = 4  # references kept for this many gateways
DISTRUST_AFTER = 3  # clipped global models in a row after which a gateway is not followed
DISTRUST_SECONDS = 600.0
NORM_FLOOR = 0.5  # the radius is never below this share of our own model's norm
LOSS_FACTOR, LOSS_MARGIN = 1.5, 0.1  # a far global model is suspect when its loss on our rows is above this


class Follower:
    def __init__(self, config: NodeConfig, learner: Learner, peers: PeerTable, counters: Counters,
                 codec: CodecConfig, guard: MergeGuard) -> None:
        self.config = config
        self.learner = learner
        self.peers = peers
        self.counters = counters
        self.codec = codec
        count = learner.model.num_params
        # No outlier rule on the references: it refused an honest gateway restarted after clients had learned by
        # gossip ("15.7 away, recent median 0.19") and stopped every round after its return. The guard clips.
        self.references = GossipState(count, codec, MAX_GATEWAYS, outlier_factor=math.inf)
        self.guard = guard
        self.clipped_in_a_row: dict[bytes, int] = {}
        self.distrusted: dict[bytes, float] = {}  # gateway -> until when its rounds are refused
        self.residual = np.zeros(count, np.float32)  # what the uplink codec has not delivered yet
        self.gateway: bytes | None = None  # the gateway whose round we took last
        self.last_round = 0
        self.rounds = 0

    # ------------------------------------------------------------------ which gateway

    def trusted(self, gateway_id: bytes, now: float) -> bool:
        return self.distrusted.get(gateway_id, -math.inf) <= now

    def live_gateways(self, now: float) -> list[bytes]:
        window = self.config.fedavg.fallback_seconds
        return sorted(p.key for p in self.peers
                      if p.role == "gateway" and p.proven_id is not None and not self.peers.is_blocked(p.key)
                      and self.trusted(p.key, now)
                      and p.stats.last_seen is not None and now - p.stats.last_seen < window)

    def following(self, now: float) -> bool:
        """Whether rounds, not gossip, drive learning now."""
        mode = self.config.node.mode
        if self.config.node.role == "gateway" or mode == "gossip":
            return False
        return mode == "fedavg" or bool(self.live_gateways(now))

    def status(self) -> dict[str, object]:
        now = trio.current_time()
        live = self.live_gateways(now)
        return {"following": live[0].hex() if live and self.following(now) else None,
                "learning_by": "rounds" if self.following(now) else "gossip",
                "rounds": self.rounds, "last_round": self.last_round,
                "distrusted": {g.hex(): round(until - now, 1) for g, until in self.distrusted.items() if until > now}}

    def _check_gateway(self, gateway_id: bytes) -> None:
        mode = self.config.node.mode
        if self.config.node.role == "gateway":
            raise RefusedByUs("role", "a gateway does not follow another gateway")
        if mode == "gossip":
            raise RefusedByUs("mode", "this node is in gossip mode and follows no gateway")
        peer = self.peers.get(gateway_id)
        if peer is None or peer.role != "gateway":  # the role the cluster granted (fedavg.gateways), not a claim
            raise RefusedByUs("not-a-gateway", "this node follows only the gateways listed in fedavg.gateways")
        now = trio.current_time()
        if not self.trusted(gateway_id, now):
            raise RefusedByUs("untrusted", f"this node does not follow gateway {short(gateway_id)} for "
                                           f"{self.distrusted[gateway_id] - now:.0f} s more: its global models "
                                           f"were clipped {DISTRUST_AFTER} rounds in a row")
        live = self.live_gateways(now)
        if live and live[0] != gateway_id:
            raise RefusedByUs("not-following", f"this node follows gateway {short(live[0])}")

    # ------------------------------------------------------------------ one round

    async def session(self, link: Link, gateway_id: bytes, first: messages.Message) -> None:
        """Serve one round on an inbound connection from a gateway (the listener's handler for GatewayRound)."""
        assert isinstance(first, messages.GatewayRound)
        try:
            self._check_gateway(gateway_id)
            global_params, message = await self._receive_global(link, gateway_id, first)
        except RefusedByUs as exc:
            await link.refuse(refusal_code(exc), exc)
            raise
        if message.epochs == 0:  # a bare adoption (the gateway's result of a round we did not train in)
            await self._adopt(link, gateway_id, message, global_params)
            return
        if self.gateway != gateway_id:
            self.residual[:] = 0  # a new gateway holds none of what the last one was still owed
        self.gateway = gateway_id
        our_age = self.learner.age
        point, age = await self._checked(gateway_id, global_params, message.age)
        start, base_age = (point, age) if age >= our_age else (None, our_age)
        with trio.fail_after(message.deadline):
            trained, samples = await self.learner.train_from(start, message.epochs)
        if not samples:  # no data, or training that diverged: nothing worth a place in the average
            # It still learns from the fleet: the global model is taken (a client with no rows once stayed at the
            # untrained model, 0.53 where the others reached 0.97), and the round is told why no update comes.
            await self.learner.adopt(point, age)
            refused = RefusedByUs("no-update", "this node has no update for the round (no data, training "
                                               "diverged, or its power or temperature stops training)")
            await link.refuse(messages.ErrorCode.REFUSED, refused)
            raise refused
        payload = await trio.to_thread.run_sync(self._code_update, trained - global_params)
        await link.send(messages.GatewayUpdate(message.round, message.new_seq, samples, base_age + samples, payload))
        self.counters.add("fedavg.updates_sent")
        self.last_round, self.rounds = message.round, self.rounds + 1
        # The gateway aggregates once its quorum answered or the deadline passed; then sends the result.
        result = await link.next(timeout=message.deadline + self.config.limits.read_timeout)
        if result is None:
            return  # the round ended without us (a late update) or without any update
        assert isinstance(result, messages.GatewayRound)
        new_global, result = await self._receive_global(link, gateway_id, result)
        await self._adopt(link, gateway_id, result, new_global)

    def _code_update(self, delta: np.ndarray) -> bytes:
        """Code ``delta`` plus what earlier updates still owe, keeping what this one cannot carry."""
        corrected = delta + self.residual
        uplink = Reference(corrected.size)
        payload = uplink.encode_towards(corrected, self.codec)
        np.subtract(corrected, uplink.values, out=self.residual)
        return payload

    async def _receive_global(self, link: Link, gateway_id: bytes,
                              message: messages.GatewayRound) -> tuple[np.ndarray, messages.GatewayRound]:
        """Decode the global model (whole, if our base is missing); returns it and the message that carried it."""
        local, _ = await self.learner.snapshot()
        received, message = await receive_model(link, self.references, gateway_id, message, local, self.counters)
        self.references.commit_receive(received)
        self.peers.succeeded(gateway_id, trio.current_time())
        assert isinstance(message, messages.GatewayRound)
        return received.model.copy(), message

    async def _checked(self, gateway_id: bytes, global_params: np.ndarray, claimed_age: float
                       ) -> tuple[np.ndarray, float]:
        """What this client takes of a gateway's global model, and the age it believes: the whole model unless
        it is suspect, a clipped step scaled by the gateway's trust if it is (keeping our own age then)."""
        local, our_age = await self.learner.snapshot()
        now = trio.current_time()
        self.guard.believed_age(gateway_id, claimed_age, our_age, now)  # registers the gateway (its trust)
        age = claimed_age  # a granted gateway's age is the fleet's; the learner caps it like any (MAX_AGE)
        diff = global_params - local
        distance = float(np.linalg.norm(diff))
        norm = float(np.linalg.norm(local))
        radius = max(self.guard.radius(norm) or 0.0, NORM_FLOOR * norm) if norm > 0 else math.inf
        losses = await self.learner.losses([local, global_params]) if distance > radius else None
        suspect = losses is not None and not losses[1] <= LOSS_FACTOR * losses[0] + LOSS_MARGIN
        # The gateway's trust moves with each verdict; its distances stay out of the history (moved=0): a global
        # step is no gossip merge, and honest ones are large enough to widen the gossip radius for everyone.
        if not suspect:
            self.guard.record(gateway_id, Merged(age, 1.0, 0.0, distance), radius)
            self.clipped_in_a_row[gateway_id] = 0
            return global_params, age
        assert losses is not None
        share = self.guard.share(gateway_id) * radius / distance
        self.guard.record(gateway_id, Merged(our_age, share, 0.0, distance, clipped=True), radius)
        self.counters.add("fedavg.global_clipped")
        streak = self.clipped_in_a_row[gateway_id] = self.clipped_in_a_row.get(gateway_id, 0) + 1
        log.warning("a global model far from ours and worse on our rows: a clipped step taken", extra=fields(
            gateway=short(gateway_id), distance=round(distance, 4), radius=round(radius, 4), share=round(share, 4),
            loss=round(losses[1], 4), our_loss=round(losses[0], 4), in_a_row=streak))
        if streak >= DISTRUST_AFTER and self.trusted(gateway_id, now):
            self.distrusted[gateway_id] = now + DISTRUST_SECONDS
            self.clipped_in_a_row[gateway_id] = DISTRUST_AFTER - 1  # after the pause, one more clip is enough
            self.counters.add("fedavg.gateway_distrusted")
            log.error("gateway not followed: its global models were clipped rounds in a row", extra=fields(
                gateway=short(gateway_id), rounds=streak, seconds=DISTRUST_SECONDS))
        return local + np.float32(share) * diff, our_age

    async def _adopt(self, link: Link, gateway_id: bytes, message: messages.GatewayRound, params: np.ndarray) -> None:
        params, age = await self._checked(gateway_id, params, message.age)
        await self.learner.adopt(params, age)
        await link.send(messages.Ack(message.new_seq))
        log.debug("round adopted", extra=fields(gateway=short(gateway_id), round=message.round,
                                                age=self.learner.age))
