"""Asynchronous gossip, both sides: every period push our model to a random live peer, and serve the pushes
and pulls of others.

The active side (``run``, ``push_to``): no rounds; every period (with jitter) one exchange starts without
waiting for the last to end, at most ``PUSHES_IN_FLIGHT`` at once and never two with the same peer, so a
peer that went away mid-exchange or a dial into a black hole holds one exchange until its timeout, not all
gossip. An exchange is a push of our model as a delta and, when the peer offers it, the pull of the peer's
model as it was before it merged ours, so both ends hold the same average (push-pull).

The passive side (``serve``, registered with the listener for ``ModelDelta``): decode, merge by age,
acknowledge; then answer the pusher's pull with the pre-merge model.

One delta in flight to a peer at a time (our push or our answer to its pull): both code against the same
reference, and two in flight could leave the peer's copy and ours at one sequence but differing. A pull that
meets our own push in flight is declined (``OVERLOADED``), never waited for, since both ends could wait.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import trio

from gossipfl.config import NodeConfig
from gossipfl.errors import LinkBroken, RefusedByPeer, RefusedByUs
from gossipfl.metrics import Counters
from gossipfl.protocol import messages
from gossipfl.protocol.budget import PeerBudget
from gossipfl.protocol.peers import Peer, PeerTable
from gossipfl.protocol.references import GossipState

from .keepalive import KeptConnections
from .learner import BeforeMerge, Learner
from .link import EXCHANGE_FAILURES, Link, failure_reason, peer_error
from .logs import fields
from .peering import Dialer, Met
from .reporting import account, refusal, short
from .transfer import receive_model, refusal_code, send_model

log = logging.getLogger("gossipfld.gossip")

PUSHES_IN_FLIGHT = 3  # exchanges this node has started and not finished, at most


class Gossip:
    def __init__(self, config: NodeConfig, learner: Learner, references: GossipState, peers: PeerTable,
                 dialer: Dialer, counters: Counters, learns_by_gossip: Callable[[], bool]) -> None:
        self.config = config
        self.learner = learner
        self.references = references
        self.peers = peers
        self.dialer = dialer
        self.counters = counters
        self.learns_by_gossip = learns_by_gossip
        self.rng = random.Random()
        period = config.gossip.period
        # An honest peer pushes to us about once a period at most (less with more peers); twice that, in bursts
        # of 4, is its budget. A whole model in answer to its pulls at most once every 10 periods.
        self.budget = PeerBudget(rate=2 / period, burst=4, full_every=10 * period)
        # One lock per authenticated peer we ever exchanged with: bounded by the cluster's size. Never pruned
        # while running, since a task may hold a lock it has not acquired yet.
        self._sending: dict[bytes, trio.Lock] = {}
        self.kept = KeptConnections(config.gossip.keep_alive, config.gossip.max_peers, self._close_kept)

    def _send_lock(self, peer_id: bytes) -> trio.Lock:
        return self._sending.setdefault(peer_id, trio.Lock())

    def _wrap(self, age: float) -> Callable:
        return lambda push: messages.ModelDelta(push.base_seq, push.new_seq, age, 0, push.payload)

    # ------------------------------------------------------------------ the active side

    async def run(self) -> None:
        g, role = self.config.gossip, self.config.node.role
        in_flight: dict[bytes, Peer] = {}
        async with trio.open_nursery() as nursery:
            if self.kept.enabled:
                nursery.start_soon(self.kept.run)
            while True:
                await self.learner.pacer.sleep(self.learner.pacer.period * (1 + self.rng.uniform(-g.jitter, g.jitter)))
                if self.learner.paused or not self.learns_by_gossip():
                    continue
                await self.learner.judge_pace()
                if len(in_flight) >= PUSHES_IN_FLIGHT:
                    self.counters.add("pushes_skipped_busy")
                    continue
                # Nodes gossip with nodes; gateways gossip their global models with other gateways. A peer known
                # only from an advert gets at most one exchange in flight: adverts are free to forge.
                trying_unverified = any(not p.verified for p in in_flight.values())
                peer = self.peers.choose(trio.current_time(), self.rng, role=role, exclude=in_flight,
                                         verified_only=trying_unverified)
                if peer is not None:
                    in_flight[peer.key] = peer
                    nursery.start_soon(self._push_tracked, peer, in_flight)

    async def _push_tracked(self, peer: Peer, in_flight: dict[bytes, Peer]) -> None:
        try:
            await self.push_to(peer)
        finally:
            in_flight.pop(peer.key, None)

    async def push_to(self, peer: Peer) -> bool:
        """One exchange with ``peer``; failures count against its liveness, never raise."""
        try:
            with trio.fail_after(self.config.limits.read_timeout * 3):
                await self._exchange(peer)
            return True
        except EXCHANGE_FAILURES as exc:
            reason = failure_reason(exc)
            self.counters.add(f"failed.{reason}")
            if isinstance(exc, RefusedByUs | RefusedByPeer) and reason in ("identity", "tls",
                                                                            "peer-fingerprint_mismatch"):
                refusal(self.counters, self.peers, peer.key, reason)
            if reason == "peer-paused":
                self.peers.paused(peer.key, trio.current_time())
                log.debug("peer is paused by its operator", extra=fields(peer=peer.label))
            elif self.peers.failed(peer.key, trio.current_time()):
                self.counters.add("evictions")
                log.info("peer evicted", extra=fields(peer=peer.label, error=str(exc) or reason))
            else:
                log.debug("push failed", extra=fields(peer=peer.label, error=str(exc) or reason))
            return False

    async def _exchange(self, peer: Peer) -> None:
        """One exchange on the connection kept from the last one with this peer, else on a new one."""
        kept = self.kept.take(peer.proven_id, trio.current_time()) if peer.proven_id is not None else None
        if kept is not None:
            if await self._exchange_on(kept.link, kept.met, reused=True):
                self.counters.add("connections_reused")
                return
            self.counters.add("connections_stale")  # the peer had closed it: no answer lost, dial anew
        link, met = await self.dialer.dial(peer)
        await self._exchange_on(link, met, reused=False)

    async def _exchange_on(self, link: Link, met: Met, *, reused: bool) -> bool:
        """Push (and pull) over ``link``; False when a kept connection broke before the peer said anything in
        this exchange (it was closed at the other end while idle), or the peer did not answer on it within
        ``limits.connect_timeout``: a kept connection must show life as soon as a new dial would. A peer that
        vanished (power cut, a partition) leaves no close behind, and the push on its kept connection held one
        of the few push slots for the whole read timeout: in tests/e2e/test_faults.py's partition, the kept
        connections to the three peers behind the cut held all three for 10 s, and gossip inside each half all
        but stopped (2-6 exchanges a node in 11 s, at a period of 0.3 s)."""
        peer_id = met.peer_id
        answers_before = link.messages_in
        keep = False
        try:
            try:
                async with self._send_lock(peer_id):
                    params, age = await self.learner.snapshot()
                    push, _ = await send_model(
                        link, self.references, peer_id, params, self._wrap(age), self.counters,
                        first_answer_timeout=self.config.limits.connect_timeout if reused else None)
                    self.references.commit_push(push)
            except (LinkBroken, trio.TooSlowError):
                if reused and link.messages_in == answers_before:
                    return False
                raise
            self.peers.succeeded(peer_id, trio.current_time())
            self.counters.add("exchanges_out")
            if self.config.gossip.push_pull and link.conversation.peer_pulls:
                await self._pull(link, peer_id)
            keep = self.kept.enabled and link.conversation.reusable and not self.peers.is_blocked(peer_id)
            return True
        finally:
            if keep:
                account(self.counters, self.peers, peer_id, link.traffic.take())
                await self.kept.keep(peer_id, link, met, trio.current_time())
            else:
                await link.aclose()  # first: its close_notify is part of what the exchange cost
                account(self.counters, self.peers, peer_id, link.traffic.take())

    async def _close_kept(self, peer_id: bytes, link: Link) -> None:
        await link.aclose()
        account(self.counters, self.peers, peer_id, link.traffic.take(), exchanges=0)

    async def _pull(self, link: Link, peer_id: bytes) -> None:
        """The pull half of push-pull: ask for the peer's pre-merge model and merge it as it merged ours."""
        held = self.references.incoming.get(peer_id)
        await link.send(messages.PullRequest(held.seq if held is not None else 0))
        reply = await link.receive(messages.ModelDelta, messages.Error)
        if isinstance(reply, messages.Error):
            if reply.code != messages.ErrorCode.OVERLOADED:
                raise peer_error(reply)
            self.counters.add("pulls_declined")  # it was sending to us at that moment: the push stands
            return
        assert isinstance(reply, messages.ModelDelta)
        if await self._take(link, peer_id, reply, keep_before=False) is not None:
            self.counters.add("pulls")

    # ------------------------------------------------------------------ the passive side

    def _check_gossip_from(self, peer_id: bytes) -> None:
        """Gossip goes node to node and gateway to gateway; a node following a gateway takes none."""
        peer = self.peers.get(peer_id)
        theirs, ours = (peer.role if peer is not None else "node"), self.config.node.role
        if ours == "gateway" and theirs != "gateway":
            raise RefusedByUs("role", "a gateway takes gossip only from gateways; follow it instead")
        if ours != "gateway" and theirs == "gateway":
            raise RefusedByUs("role", "a node takes a gateway's model only in rounds")
        if not self.learns_by_gossip():
            raise RefusedByUs("following", "this node follows a gateway and takes no gossip now")

    async def serve(self, link: Link, peer_id: bytes, push: messages.Message) -> messages.Message | None:
        """A push from ``peer_id`` (the listener's handler for ModelDelta), then its pull when both Hellos
        offered push-pull. Returns the message after the push that is not a pull (the next push on a kept
        connection, from a peer that chose not to pull), for the listener to serve as a new exchange."""
        assert isinstance(push, messages.ModelDelta)
        with trio.fail_after(self.config.limits.read_timeout * 3):
            try:
                self._check_gossip_from(peer_id)
            except RefusedByUs as exc:
                await link.refuse(messages.ErrorCode.REFUSED, exc)
                raise
            if not self.budget.take_exchange(peer_id, trio.current_time()):
                refused = RefusedByUs("rate", "more exchanges than an honest peer makes; try later")
                await link.refuse(messages.ErrorCode.OVERLOADED, refused)
                raise refused
            before = await self._take(link, peer_id, push, keep_before=self.config.gossip.push_pull)
            if before is None:
                return None
            self.counters.add("exchanges_in")
            if not link.conversation.both_pull:
                return None  # the pusher will not pull: the connection ends, or waits for its next push
            request = await link.next()
            if not isinstance(request, messages.PullRequest):
                return request  # it did not pull after all: the end, or (kept alive) its next push
            await self._answer_pull(link, peer_id, request, before)
            return None

    async def _take(self, link: Link, peer_id: bytes, delta: messages.ModelDelta, *,
                    keep_before: bool) -> BeforeMerge | None:
        """Decode a delta from ``peer_id``, merge it by age and acknowledge it; None when it was refused (the
        peer has been told why)."""
        local, _ = await self.learner.snapshot()
        try:
            received, delta = await receive_model(link, self.references, peer_id, delta, local, self.counters)
        except RefusedByUs as exc:
            refusal(self.counters, self.peers, peer_id, exc.reason)
            log.warning("update refused", extra=fields(peer=short(peer_id), reason=exc.reason, error=str(exc)))
            await link.refuse(refusal_code(exc), exc)
            return None
        assert isinstance(delta, messages.ModelDelta)
        before = await self.learner.merge(peer_id, received.model, delta.age, keep_before=keep_before)
        self.references.commit_receive(received)
        self.peers.succeeded(peer_id, trio.current_time())
        log.debug("merged", extra=fields(peer=short(peer_id), weight=round(before.weight_remote, 3),
                                         age=self.learner.age, distance=round(received.distance, 4)))
        await link.send(messages.Ack(delta.new_seq))
        return before

    async def _answer_pull(self, link: Link, peer_id: bytes, request: messages.PullRequest,
                           before: BeforeMerge) -> None:
        """Send our model as it was before we merged the peer's push, so that both ends average alike."""
        assert before.params is not None  # push-pull is on here, or the Hello offered no pulls
        lock = self._send_lock(peer_id)
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:  # our own push to that peer is in flight: never wait (both could wait)
            await link.send(messages.Error(messages.ErrorCode.OVERLOADED, "already sending to you; push kept"))
            return
        try:
            held = self.references.outgoing.get(peer_id)
            full = held is None or held.seq != request.base_seq
            now = trio.current_time()
            whole_allowed = self.budget.may_send_full(peer_id, now)
            if full and not whole_allowed:
                raise RefusedByUs("full-budget", "this peer had a whole model from us too recently")
            push, _ = await send_model(link, self.references, peer_id, before.params, self._wrap(before.age),
                                       self.counters, full=full, resend_full=whole_allowed)
            self.references.commit_push(push)
            if push.base_seq == 0:
                self.budget.sent_full(peer_id, now)
        except RefusedByUs as exc:  # the push stands; the pull is declined, as when we are busy sending
            self.counters.add("pulls_declined_full")
            log.info("pull declined", extra=fields(peer=short(peer_id), reason=exc.reason))
            await link.refuse(messages.ErrorCode.OVERLOADED, exc)
            return
        finally:
            lock.release()
        self.counters.add("pulls_answered")
