"""The gateway role: server-assisted FedAvg rounds over the same identity, codec and wire protocol.

A round: the gateway picks ``fedavg.fraction`` of its live clients, dials each, and sends the global
model as a delta against what that client holds (per-client references with error feedback, as in
gossip). Clients train ``fedavg.epochs`` locally and answer with their delta and sample count. When
``fedavg.quorum`` of them answered, or ``fedavg.deadline`` passed, the gateway aggregates with the
configured rule (``gossipfl.learning.aggregate``: mean, FedAvgM, trimmed mean, median, with optional norm
clipping) and sends the new global model back to every client that took part, so a round ends with
all of them holding it.

Stragglers: each client's session outlives its round. With ``late_updates = "drop"`` an update that
arrives after the aggregation is discarded; with ``"discount"`` it is kept and folded into the next
aggregation, scaled by ``1/sqrt(1 + staleness)`` (FedBuff), up to ``max_staleness`` rounds old.

A gateway that has training data takes part in its own rounds as one more client. Gateways gossip
their global models among themselves (gossip's loop, restricted to gateways), so two sites
with a gateway each converge too.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import trio

from gossipfl.config import NodeConfig, aggregator_config
from gossipfl.errors import AggregationError, CodecError
from gossipfl.learning.aggregate import AggregateResult, ClientUpdate, aggregate
from gossipfl.metrics import Counters
from gossipfl.protocol import messages
from gossipfl.protocol.codec import CodecConfig, decode_delta
from gossipfl.protocol.peers import Peer, PeerTable
from gossipfl.protocol.references import GossipState, Push

from .learner import Learner
from .link import EXCHANGE_FAILURES, Link, failure_reason
from .logs import fields
from .peering import Dialer
from .reporting import account
from .transfer import send_model

log = logging.getLogger("gossipfld.gateway")

MAX_CLIENTS = 1024  # clients whose copy of the global model we track
IDLE_WAIT = 1.0  # seconds between checks when there is no one to run a round with


@dataclass
class RoundReport:
    """What one round did: logged, kept in the status, and read by tests and benchmarks."""

    round: int
    selected: int
    answered: int
    late_applied: int
    participants: int
    samples: int
    update_norms: list[float]
    clipped: int
    aggregate_norm: float
    age: float
    seconds: float


@dataclass
class _Round:
    number: int
    params: np.ndarray
    age: float
    expected: int
    quorum_share: float
    updates: list[tuple[bytes, ClientUpdate, float]] = field(default_factory=list)
    enough: trio.Event = field(default_factory=trio.Event)
    published: trio.Event = field(default_factory=trio.Event)
    closed: bool = False
    result: np.ndarray | None = None
    result_age: float = 0.0

    def __post_init__(self) -> None:
        self._check()  # a round that expects nobody (only late updates to fold in) needs no deadline

    @property
    def quorum(self) -> int:
        return max(1, math.ceil(self.quorum_share * self.expected))

    def _check(self) -> None:
        if (self.updates and len(self.updates) >= self.quorum) or self.expected <= 0:
            self.enough.set()

    def offer(self, client: bytes, update: ClientUpdate, age: float) -> bool:
        """Take an update while the round is open; False once it has been aggregated (a late one)."""
        if self.closed:
            return False
        self.updates.append((client, update, age))
        self._check()
        return True

    def withdraw(self, client: bytes) -> None:
        """A selected client will not answer (unreachable, refused): do not wait for it."""
        if self.closed or any(c == client for c, _, _ in self.updates):
            return
        self.expected -= 1
        self._check()


class Gateway:
    def __init__(self, config: NodeConfig, learner: Learner, peers: PeerTable, dialer: Dialer, counters: Counters,
                 codec: CodecConfig, state: dict[str, Any]) -> None:
        self.config = config
        self.learner = learner
        self.peers = peers
        self.dialer = dialer
        self.counters = counters
        self.settings = config.fedavg
        self.aggregator = aggregator_config(self.settings)
        self.references = GossipState(learner.model.num_params, codec, MAX_CLIENTS, outlier_factor=math.inf)
        self.round: int = state.get("gateway_round", 0)  # checked by load_checkpoint
        self.momentum: np.ndarray | None = None
        self.late: list[tuple[int, bytes, ClientUpdate, float]] = []
        self.history: deque[RoundReport] = deque(maxlen=50)
        self.busy: set[bytes] = set()
        self.rng = random.Random()

    @property
    def trains_locally(self) -> bool:
        return self.config.training.enabled and len(self.learner.data.train) > 0

    def status(self) -> dict[str, Any]:
        return {"round": self.round, "rule": self.aggregator.rule, "late_buffered": len(self.late),
                "recent": [asdict(r) for r in list(self.history)[-5:]]}

    # ---------------------------------------------------------------- rounds

    async def run(self) -> None:
        async with trio.open_nursery() as sessions:  # a client's session may outlive its round
            while True:
                await trio.sleep(self.settings.round_pause)
                if self.learner.paused or 0 < self.settings.max_rounds <= self.round:
                    continue
                now = trio.current_time()
                clients = [p for p in self.peers.live()
                           if p.role != "gateway" and p.proven_id is not None and p.next_try <= now
                           and p.key not in self.busy]
                local = 1 if self.trains_locally else 0
                if len(clients) + local < self.settings.min_clients or not clients:
                    await trio.sleep(IDLE_WAIT)
                    continue
                await self.one_round(clients, sessions)

    async def one_round(self, clients: list[Peer], sessions: trio.Nursery) -> RoundReport | None:
        s = self.settings
        started = trio.current_time()
        count = max(1, math.ceil(s.fraction * len(clients)))
        selected = self.rng.sample(clients, min(count, len(clients)))
        params, age = await self.learner.snapshot()
        expected = len(selected) + (1 if self.trains_locally else 0)
        rnd = _Round(self.round + 1, params, age, expected, s.quorum)
        for peer in selected:
            self.busy.add(peer.key)
            sessions.start_soon(self._client_session, peer, rnd)
        if self.trains_locally:
            sessions.start_soon(self._local_update, rnd)
        with trio.move_on_after(s.deadline):
            await rnd.enough.wait()
        rnd.closed = True
        report = await self._aggregate(rnd, len(selected), started)
        rnd.published.set()
        return report

    async def _aggregate(self, rnd: _Round, selected: int, started: float) -> RoundReport | None:
        s = self.settings
        entries = [(client, update, age) for client, update, age in rnd.updates]
        late_applied = 0
        for old_round, client, update, age in self.late:
            staleness = rnd.number - old_round
            if staleness <= s.max_staleness:
                entries.append((client, ClientUpdate(update.delta, update.samples, staleness), age))
                late_applied += 1
        self.late.clear()
        if not entries:
            self.counters.add("fedavg.empty_rounds")
            log.info("round ended without updates", extra=fields(round=rnd.number, selected=selected))
            return None
        updates = [update for _, update, _ in entries]
        try:
            result: AggregateResult = await trio.to_thread.run_sync(aggregate, self.aggregator, updates,
                                                                     self.momentum)
        except AggregationError as exc:
            self.counters.add("fedavg.failed_rounds")
            log.warning("round not aggregated", extra=fields(round=rnd.number, error=str(exc)))
            return None
        rnd.result, rnd.result_age = await self.learner.apply_update(result.delta, [age for _, _, age in entries])
        self.round = rnd.number
        self.momentum = result.momentum
        report = RoundReport(rnd.number, selected, len(rnd.updates), late_applied, result.participants,
                             result.samples, [round(n, 6) for n in result.norms], result.clipped,
                             round(result.aggregate_norm, 6), rnd.result_age, round(trio.current_time() - started, 3))
        self.history.append(report)
        self.counters.add("fedavg.rounds")
        log.info("round aggregated", extra=fields(
            round=report.round, selected=selected, answered=report.answered, late=late_applied,
            participants=report.participants, samples=report.samples, clipped=report.clipped,
            aggregate_norm=report.aggregate_norm, max_update_norm=max(report.update_norms), age=rnd.result_age))
        return report

    async def _local_update(self, rnd: _Round) -> None:
        """The gateway's own data, as one more client of its own round."""
        me = self.dialer.admission.identity.node_id
        trained, samples = await self.learner.train_from(rnd.params, self.settings.epochs)
        if not samples:
            rnd.withdraw(me)
        elif not rnd.offer(me, ClientUpdate(trained - rnd.params, samples), rnd.age + samples):
            self.counters.add("fedavg.late_dropped")

    # ---------------------------------------------------------------- one client

    async def _client_session(self, peer: Peer, rnd: _Round) -> None:
        s, limits = self.settings, self.config.limits
        late_window = s.deadline * (1 + s.max_staleness) if s.late_updates == "discount" else s.deadline
        link: Link | None = None
        try:
            with trio.fail_after(limits.connect_timeout + late_window + s.deadline + 3 * limits.read_timeout):
                link, met = await self.dialer.dial(peer)
                await self._serve_client(link, met.peer_id, rnd, late_window)
            self.peers.succeeded(peer.key, trio.current_time())
        except (*EXCHANGE_FAILURES, CodecError) as exc:
            reason = failure_reason(exc)
            self.counters.add(f"fedavg.client_failed.{reason}")
            if reason == "peer-paused":
                self.peers.paused(peer.key, trio.current_time())
            else:
                self.peers.failed(peer.key, trio.current_time())  # back off: not asked again for a while
            log.info("client left the round", extra=fields(peer=peer.label, round=rnd.number,
                                                           reason=reason, error=str(exc)[:200]))
        finally:
            rnd.withdraw(peer.key)
            self.busy.discard(peer.key)
            if link is not None:
                await link.aclose()  # first: its close_notify is part of what the exchange cost
                account(self.counters, self.peers, peer.key, link.traffic)

    async def _send_global(self, link: Link, peer_id: bytes, number: int, params: np.ndarray, age: float,
                           epochs: int, wait: float, answer: type[messages.Message]) -> tuple[Push, messages.Message]:
        """Send the global model as a delta against the client's copy (whole, if it lost its copy); returns
        the push, to commit once the answer shows the client holds it, and the answer."""
        def wrap(push: Push) -> messages.GatewayRound:
            return messages.GatewayRound(number, push.base_seq, push.new_seq, age, self.settings.deadline, epochs,
                                     push.payload)

        return await send_model(link, self.references, peer_id, params, wrap, self.counters, answers=(answer,),
                                timeout=wait)

    async def _serve_client(self, link: Link, peer_id: bytes, rnd: _Round, late_window: float) -> None:
        s = self.settings
        push, update = await self._send_global(link, peer_id, rnd.number, rnd.params, rnd.age, s.epochs,
                                               late_window, messages.GatewayUpdate)
        assert isinstance(update, messages.GatewayUpdate)  # for this round against this global: the table checked
        self.references.commit_push(push)
        delta = await trio.to_thread.run_sync(decode_delta, update.payload, self.learner.model.num_params)
        client_update = ClientUpdate(delta, update.sample_count)
        if not rnd.offer(peer_id, client_update, update.age):
            if s.late_updates == "discount":
                self.late.append((rnd.number, peer_id, client_update, update.age))
                self.counters.add("fedavg.late_buffered")
            else:
                self.counters.add("fedavg.late_dropped")
            return
        self.counters.add("fedavg.updates_received")
        await rnd.published.wait()
        if rnd.result is None:
            return
        push, _ = await self._send_global(link, peer_id, rnd.number, rnd.result, rnd.result_age, 0,
                                          self.config.limits.read_timeout, messages.Ack)
        self.references.commit_push(push)
