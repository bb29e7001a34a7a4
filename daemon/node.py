"""The gossip node: trio tasks that wire the gossipfl library to sockets, disk, the clock and mDNS.

Tasks, all in one nursery:
- ``_serve``: the mutual-TLS peer listener; each connection is handled in its own task, bounded in
  number, and every read has a deadline.
- ``_discovery``: mDNS advertisement and browsing (python-zeroconf in its own thread, see
  discovery.py); static peers are added at start.
- ``_gossip_loop``: every period (with jitter) push our model to one random live peer.
- ``_learn_loop``: local training in a worker thread, in short slices, at a configured duty cycle.
- ``_checkpoint_loop``, ``_data_loop``, ``_lag_monitor``.

``model.params`` is shared by training (in a worker thread) and merges (on the event loop): a trio
lock is held around each training slice and each merge, so they never overlap; a slice is short, so a
merge waits at most one slice. Coding and decoding large payloads also run in worker threads, so the
event loop stays responsive.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

from gossipfl.atomic import write_bytes_atomic
from gossipfl.cli.tls import client_context, server_context
from gossipfl.config import NodeConfig, parse_host_port
from gossipfl.errors import CodecError, ConfigError, GossipflError, IdentityError, ModelError, ProtocolError
from gossipfl.identity.ids import format_node_id, parse_allowlist, parse_node_id
from gossipfl.identity.node import NodeIdentity
from gossipfl.learning.checkpoint import load_checkpoint, save_checkpoint
from gossipfl.learning.data import DataSpec, LocalData
from gossipfl.learning.merge import age_weighted_merge
from gossipfl.learning.model import Model
from gossipfl.learning.optim import OptimizerConfig
from gossipfl.learning.trainer import Metrics, TrainConfig, Trainer
from gossipfl.metrics import render
from gossipfl.protocol import framing, messages
from gossipfl.protocol.advert import Advertisement, PeerGone, PeerSeen
from gossipfl.protocol.codec import CodecConfig
from gossipfl.protocol.peers import Peer, PeerTable
from gossipfl.protocol.references import GossipState, NeedFull, Refused

from .commands import command_table
from .connection import LinkBroken, MessageStream, PeerRefused, expect, failure_reason, tls_handshake, verify_peer
from .control import ControlServer
from .discovery import Discovery
from .follower import Follower
from .gateway import Gateway
from .logs import fields
from .metrics_http import serve_metrics
from .notify import SystemdNotifier, watchdog_task

log = logging.getLogger("gossipfld.node")

CHECKPOINT = "checkpoint.onnx"
REFERENCES = "references.bin"
EVAL_EVERY = 5.0  # seconds between validation runs
STATUS_EVERY = 10.0  # seconds between STATUS= lines to systemd
LAG_PROBE = 0.05
PUSHES_IN_FLIGHT = 3  # exchanges this node has started and not finished, at most
MAX_FOREIGN_LOGGED = 256  # other clusters' nodes logged by id; past that a hostile LAN gets only the counter
PUSH_PULL = "push-pull"  # Hello capability: this node asks for, and answers, pulls after a push


@dataclass(frozen=True)
class _BeforeMerge:
    """A node's model (when kept) and age as they were just before a merge: what the pusher's pull gets."""

    params: np.ndarray | None
    age: float


@dataclass
class Counters:
    values: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, amount: float = 1) -> None:
        self.values[name] = self.values.get(name, 0) + amount


def _node_ids(texts: Any) -> set[bytes]:
    """Node ids from saved state; a damaged entry is skipped with a warning, never fatal."""
    ids = set()
    for text in texts if isinstance(texts, list) else []:
        try:
            ids.add(parse_node_id(text))
        except (IdentityError, TypeError):
            log.warning("ignoring a malformed blocked id in the checkpoint", extra=fields(value=str(text)[:80]))
    return ids


def short(node_id: bytes) -> str:
    return node_id.hex()[:12] if len(node_id) == 32 else node_id.decode(errors="replace")


class Node:
    def __init__(self, config: NodeConfig, identity: NodeIdentity) -> None:
        self.config = config
        self.identity = identity
        self.node_id = identity.node_id
        self.state_dir = Path(config.node.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = self.state_dir / CHECKPOINT
        self.references_path = self.state_dir / REFERENCES
        for name in (CHECKPOINT, REFERENCES):
            for stale in self.state_dir.glob(f".{name}.*.tmp"):  # left by a kill mid-write
                stale.unlink(missing_ok=True)
        self.counters = Counters()
        self.started_at = time.time()
        self.age = 0.0
        self.model, state = self._load_model()
        self.age = float(state.get("age", 0.0))
        for key, value in state.get("counters", {}).items():
            if isinstance(value, int | float):
                self.counters.values[key] = value
        self.paused = state.get("paused") is True  # an operator's pause survives restarts
        t = config.training
        self.trainer = Trainer(self.model, TrainConfig(
            optimizer=OptimizerConfig(t.optimizer, lr=t.lr, momentum=t.momentum),
            batch_size=t.batch_size, seed=t.seed, threads=t.threads))
        self.data = LocalData(config.data.directory, DataSpec(
            features=self.model.features_per_sample, task=self.model.task,
            classes=self.model.num_outputs if self.model.task == "classification" else None,
            label_column=config.data.label_column), config.data.validation_fraction)
        g = config.gossip
        self.codec = CodecConfig(scheme=g.scheme, topk_fraction=g.topk_fraction, int8_block=256, nthreads=1)
        self.gossip = GossipState(self.model.num_params, self.codec, g.max_peers, config.limits.outlier_factor)
        self._restore_references()
        self.peers = PeerTable(g.period, g.failures_to_evict, g.max_backoff)
        self.peers.blocked.update(_node_ids(state.get("blocked", [])))
        self.allowlist = parse_allowlist(config.tls.allowlist) if config.tls.allowlist else None
        self.limits = framing.Limits.for_model(self.model.num_params)
        self.lock = trio.Lock()
        self.rng = random.Random()
        self.validation: Metrics | None = None
        self.train_loss: float | None = None
        self.max_lag = 0.0
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.control: ControlServer | None = None
        self.training_active = False
        # One delta in flight to a peer at a time (our push or our answer to its pull): both code against the
        # same reference, and two in flight could leave the peer's copy and ours at one sequence but differing.
        self._sending: dict[bytes, trio.Lock] = {}
        self._foreign: set[bytes] = set()  # nodes of other clusters seen on mDNS, logged once each
        self.open_connections = 0
        self.open_by_host: dict[str, int] = {}  # inbound connections per remote address
        self.discovery: Discovery | None = None
        self.notifier = SystemdNotifier.from_env()
        self.round_training = False
        self.follower = Follower(self)
        self.gateway = Gateway(self, state) if config.node.role == "gateway" else None

    # ---------------------------------------------------------------- start-up

    def _load_model(self) -> tuple[Model, dict[str, Any]]:
        initial = Model.load(self.config.model.path)
        if self.checkpoint_path.exists():
            try:
                model, state = load_checkpoint(self.checkpoint_path, initial.fingerprint)
            except ModelError as exc:
                # Never silently start over: an operator must move the bad checkpoint away.
                raise ModelError(f"cannot resume: {exc}; move {self.checkpoint_path} away to start afresh") from exc
            log.info("resumed from checkpoint", extra=fields(age=state.get("age"), path=str(self.checkpoint_path)))
            return model, state
        return initial, {}

    def _restore_references(self) -> None:
        """Resume deltas where the last run left them; a missing or damaged file only costs need-fulls."""
        if not self.config.state.save_references:
            self.references_path.unlink(missing_ok=True)  # never resume from a file this run will not update
            return
        try:
            data = self.references_path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot read the delta references; peers will send full models",
                        extra=fields(path=str(self.references_path), error=exc.strerror))
            return
        try:
            count = self.gossip.restore(data, self.model.fingerprint)
        except CodecError as exc:
            log.warning("ignoring the saved delta references; peers will send full models",
                        extra=fields(path=str(self.references_path), error=str(exc)))
            return
        log.info("resumed delta references", extra=fields(references=count))

    @property
    def hello(self) -> messages.Hello:
        caps = (self.config.gossip.scheme, PUSH_PULL) if self.config.gossip.push_pull else (self.config.gossip.scheme,)
        return messages.Hello(self.node_id, messages.PROTOCOL_VERSION, self.model.fingerprint, self.config.node.role,
                              caps)

    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled or signalled; then checkpoint. ``started`` once peers can connect."""
        # Signals stay captured until the final checkpoint is written: a second SIGTERM must not
        # kill the process half-way through its shutdown.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            try:
                async with trio.open_nursery() as nursery:
                    await self._start(nursery, signals)
                    task_status.started(self)
            finally:
                with trio.CancelScope(shield=True):
                    await self.checkpoint()
                    log.info("node stopped", extra=fields(age=self.age))

    async def _start(self, nursery: trio.Nursery, signals: Any) -> None:
        await nursery.start(self._serve)
        nursery.start_soon(self._signals, signals, nursery.cancel_scope)
        ctl = self.config.control
        if ctl.enabled:
            self.control = ControlServer(ctl.socket, command_table(self), group=ctl.group,
                                         max_request_bytes=ctl.max_request_bytes,
                                         max_connections=ctl.max_connections, timeout=ctl.timeout)
            await nursery.start(self.control.serve)
        if ctl.metrics_listen:
            self.metrics_port = await nursery.start(serve_metrics, ctl.metrics_listen, self.metrics_text)
        await trio.to_thread.run_sync(self.data.refresh)
        for index, text in enumerate(self.config.discovery.static_peers):
            host, port = parse_host_port(text, f"discovery.static_peers[{index}]")
            self.peers.seen(b"static:" + text.encode(), host, port, "static", trio.current_time())
        if self.config.discovery.mdns:
            await nursery.start(self._discovery)
        nursery.start_soon(self._gossip_loop)
        if self.gateway is not None:
            nursery.start_soon(self.gateway.run)
        nursery.start_soon(self._learn_loop)
        nursery.start_soon(self._checkpoint_loop)
        nursery.start_soon(self._data_loop)
        nursery.start_soon(self._lag_monitor)
        log.info("node started", extra=fields(
            id=format_node_id(self.node_id), port=self.port, model=self.model.fingerprint_hex[:16],
            params=self.model.num_params, age=self.age, samples=len(self.data.train)))
        # systemd's READY=1 only now: peers can connect and `gossipfl status` answers.
        self.notifier.ready()
        self.notifier.status(self.summary())
        nursery.start_soon(watchdog_task, self.notifier)
        nursery.start_soon(self._status_loop)

    async def _status_loop(self) -> None:
        while True:
            await trio.sleep(STATUS_EVERY)
            self.notifier.status(self.summary())

    def summary(self) -> str:
        """The one line ``systemctl status`` shows."""
        v = self.validation
        quality = f"accuracy {v.accuracy:.3f}" if v and v.accuracy is not None else "not evaluated yet"
        state = "paused" if self.paused else "learning"
        return f"{state}; {len(self.peers.live())} peers; age {self.age:.0f}; {quality}"

    async def _signals(self, signals: Any, cancel_scope: trio.CancelScope) -> None:
        async for signum in signals:
            log.info("stopping", extra=fields(signal=signal.Signals(signum).name))
            self.notifier.stopping()
            cancel_scope.cancel()
            return

    # ---------------------------------------------------------------- learning

    @property
    def learns_by_gossip(self) -> bool:
        """Free-running local training and gossip; gateways and nodes following one learn in rounds."""
        return self.gateway is None and not self.follower.following(trio.current_time())

    async def _learn_loop(self) -> None:
        t = self.config.training
        while True:
            train = self.data.train
            if trio.current_time() - getattr(self, "_last_eval", -math.inf) > EVAL_EVERY:
                await self.evaluate()
            if not t.enabled or self.paused or len(train) == 0 or not self.learns_by_gossip:
                self.training_active = self.round_training
                await trio.sleep(0.5)
                continue
            self.training_active = True
            start = trio.current_time()
            async with self.lock:
                _, samples = await self._train_slice(t.slice_steps)
            self.age += samples
            await trio.sleep(self._polite_pause(trio.current_time() - start))

    async def _train_slice(self, steps: int) -> tuple[float, int]:
        """One slice of training in a worker thread; the caller holds the lock."""
        train = self.data.train
        loss, samples = await trio.to_thread.run_sync(self.trainer.train_steps, train.x, train.y, steps)
        self.train_loss = loss
        self.counters.add("train_steps", steps)
        self.counters.add("train_samples", samples)
        return loss, samples

    def _polite_pause(self, busy: float) -> float:
        """Sleep after ``busy`` seconds of training so training takes ``duty_cycle`` of the wall time."""
        duty = self.config.training.duty_cycle
        return max(busy * (1 - duty) / duty, 0.001)

    async def train_from(self, start: np.ndarray | None, epochs: int) -> tuple[np.ndarray, int]:
        """``epochs`` of local training from ``start`` (None: from our own model), for a FedAvg round.

        Returns the trained parameters and the samples seen, and leaves the node's model as it was:
        a client keeps the global model between rounds, a gateway its aggregate. The lock is held for
        the whole run, pauses included, so no merge lands in the middle of a round's training.
        """
        t, train = self.config.training, self.data.train
        if not t.enabled or len(train) == 0:
            return (self.model.params.copy() if start is None else start.copy()), 0
        steps = math.ceil(len(train) / t.batch_size) * epochs
        samples = 0
        async with self.lock:
            saved = self.model.params.copy()
            self.round_training = True
            try:
                if start is not None:
                    self.model.set_params(start)
                self.trainer.reset_optimizer()
                done = 0
                while done < steps:
                    began = trio.current_time()
                    count = min(t.slice_steps, steps - done)
                    _, seen = await self._train_slice(count)
                    done, samples = done + count, samples + seen
                    await trio.sleep(self._polite_pause(trio.current_time() - began))
                trained = self.model.params.copy()
            finally:
                self.model.set_params(saved)
                self.round_training = False
        return trained, samples

    async def evaluate(self) -> Metrics | None:
        self._last_eval = trio.current_time()
        validation = self.data.validation
        if len(validation) == 0:
            return None
        async with self.lock:
            self.validation = await trio.to_thread.run_sync(self.trainer.evaluate, validation.x, validation.y)
        return self.validation

    async def _data_loop(self) -> None:
        while True:
            await trio.sleep(self.config.data.rescan_seconds)
            try:
                loaded = await trio.to_thread.run_sync(self.data.refresh)
            except GossipflError as exc:
                log.warning("data directory unreadable", extra=fields(error=str(exc)))
                continue
            if loaded:
                log.info("new data", extra=fields(files=len(loaded), samples=len(self.data.train)))

    # ---------------------------------------------------------------- state

    def state(self) -> dict[str, Any]:
        return {"age": self.age, "node_id": format_node_id(self.node_id), "counters": dict(self.counters.values),
                "max_loop_lag": self.max_lag, "saved_at": time.time(), "paused": self.paused,
                "blocked": sorted(format_node_id(b) for b in self.peers.blocked),
                **({"gateway_round": self.gateway.round} if self.gateway is not None else {})}

    def set_paused(self, paused: bool) -> None:
        if paused != self.paused:
            log.info("paused" if paused else "resumed")
        self.paused = paused

    async def checkpoint(self) -> None:
        async with self.lock:
            snapshot = self.model.copy()
            state = self.state()
        await trio.to_thread.run_sync(save_checkpoint, self.checkpoint_path, snapshot, state)
        if self.config.state.save_references:
            frozen, fingerprint = self.gossip.frozen(), self.model.fingerprint
            await trio.to_thread.run_sync(
                lambda: write_bytes_atomic(self.references_path, frozen.dump(fingerprint), mode=0o600))
        self.counters.add("checkpoints")

    async def _checkpoint_loop(self) -> None:
        while True:
            await trio.sleep(self.config.state.checkpoint_seconds)
            try:
                await self.checkpoint()
            except OSError as exc:
                log.error("checkpoint failed", extra=fields(error=str(exc)))

    async def _lag_monitor(self) -> None:
        """How late the event loop wakes up: a blocked loop shows here (and stops the watchdog)."""
        while True:
            start = trio.current_time()
            await trio.sleep(LAG_PROBE)
            lag = trio.current_time() - start - LAG_PROBE
            self.max_lag = max(self.max_lag, lag)

    # ---------------------------------------------------------------- discovery

    async def _discovery(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        interfaces = self.config.mdns_interfaces
        advertised = [self.config.listen.address] if self.config.listen.address not in ("0.0.0.0", "::") \
            else interfaces
        assert self.port is not None
        advert = Advertisement(self.node_id, messages.PROTOCOL_VERSION, self.model.fingerprint, self.port,
                               self.config.node.role, tuple(advertised), self.identity.cluster_tag)
        self.discovery = Discovery(advert, interfaces)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.discovery.run)
            task_status.started()
            async for event in self.discovery.events:
                now = trio.current_time()
                if isinstance(event, PeerSeen):
                    if event.cluster and event.cluster != self.identity.cluster_tag:
                        self._other_cluster(event)
                        continue
                    if event.fingerprint != self.model.fingerprint:
                        self.counters.add("refused.fingerprint")
                        log.info("ignoring peer with another model", extra=fields(peer=short(event.node_id)))
                        continue
                    self.peers.seen(event.node_id, event.addresses[0], event.port, "mdns", now, event.role,
                                    event.fingerprint)
                    log.info("peer seen", extra=fields(peer=short(event.node_id), addr=event.addresses[0],
                                                       port=event.port))
                elif isinstance(event, PeerGone):
                    self.peers.gone(event.node_id)
                    log.info("peer gone", extra=fields(peer=short(event.node_id)))

    def _other_cluster(self, event: PeerSeen) -> None:
        """Another cluster's node on our LAN: not dialled (its TLS would refuse us), logged once."""
        self.counters.add("ignored.other_cluster")
        if event.node_id not in self._foreign and len(self._foreign) < MAX_FOREIGN_LOGGED:
            self._foreign.add(event.node_id)
            log.info("ignoring a node of another cluster", extra=fields(peer=short(event.node_id),
                                                                       cluster=event.cluster.hex()))
        self.peers.gone(event.node_id)

    # ---------------------------------------------------------------- gossip: the active side

    async def _gossip_loop(self) -> None:
        """Start one exchange every period, without waiting for the last one to end.

        A peer that went away mid-exchange, or a dial into a black hole, holds its exchange until a
        timeout (``limits.connect_timeout``, ``read_timeout``): run one after the other, those would stall
        all gossip for that long. So exchanges run side by side, at most ``PUSHES_IN_FLIGHT``, never two
        with the same peer.
        """
        g = self.config.gossip
        in_flight: set[bytes] = set()
        async with trio.open_nursery() as nursery:
            while True:
                await trio.sleep(g.period * (1 + self.rng.uniform(-g.jitter, g.jitter)))
                if self.paused or (not self.learns_by_gossip and self.gateway is None):
                    continue
                if len(in_flight) >= PUSHES_IN_FLIGHT:
                    self.counters.add("pushes_skipped_busy")
                    continue
                # Nodes gossip with nodes; gateways gossip their global models with other gateways.
                peer = self.peers.choose(trio.current_time(), self.rng, role=self.config.node.role,
                                         exclude=in_flight)
                if peer is not None:
                    in_flight.add(peer.node_id)
                    nursery.start_soon(self._push_tracked, peer, in_flight)

    async def _push_tracked(self, peer: Peer, in_flight: set[bytes]) -> None:
        try:
            await self.push_to(peer)
        finally:
            in_flight.discard(peer.node_id)

    async def push_to(self, peer: Peer) -> bool:
        """One push exchange with ``peer``; failures count against its liveness, never raise."""
        expected = peer.node_id if len(peer.node_id) == 32 else None
        try:
            with trio.fail_after(self.config.limits.read_timeout * 3):
                return await self._push(peer, expected)
        except (PeerRefused, LinkBroken, ProtocolError, CodecError, OSError, trio.TooSlowError,
                trio.BrokenResourceError) as exc:
            reason = failure_reason(exc)
            self.counters.add(f"failed.{reason}")
            if isinstance(exc, PeerRefused) and exc.reason in ("identity", "tls", "peer-fingerprint_mismatch"):
                self._refusal(peer.node_id, exc.reason)
            if self.peers.failed(peer.node_id, trio.current_time()):
                self.counters.add("evictions")
                log.info("peer evicted", extra=fields(peer=short(peer.node_id), error=str(exc) or reason))
            else:
                log.debug("push failed", extra=fields(peer=short(peer.node_id), error=str(exc) or reason))
            return False

    async def _dial(self, peer: Peer) -> trio.SSLStream:
        with trio.fail_after(self.config.limits.connect_timeout):
            tcp = await trio.open_tcp_stream(peer.host, peer.port)
        return trio.SSLStream(tcp, client_context(self.identity), server_hostname=None)

    async def _push(self, peer: Peer, expected: bytes | None) -> bool:
        stream = await self._dial(peer)
        conn = MessageStream(stream, self.limits, self.config.limits.read_timeout)
        peer_id = b""
        try:
            await tls_handshake(stream, self.config.limits.connect_timeout)
            peer_id = verify_peer(stream, expected, self.allowlist)
            await conn.send(self.hello)
            theirs = expect(await conn.receive(), messages.Hello)
            self._check_hello(theirs, peer_id)
            if expected is None:  # a static peer: now we know who it is
                self.peers.gone(peer.node_id)
                peer = self.peers.seen(peer_id, peer.host, peer.port, "static", trio.current_time(), theirs.role)
            async with self._send_lock(peer_id):
                async with self.lock:
                    params, age = self.model.params.copy(), self.age
                await self._send_model(conn, peer_id, params, age, base_seq=None)
            self.peers.succeeded(peer_id, trio.current_time())
            self.counters.add("exchanges_out")
            if self.config.gossip.push_pull and PUSH_PULL in theirs.capabilities:
                await self._pull(conn, peer_id)
            return True
        finally:
            if peer_id:
                self._account(peer, conn, peer_id)
            await conn.aclose()

    def _send_lock(self, peer_id: bytes) -> trio.Lock:
        # One lock per authenticated peer we ever exchanged with: bounded by the cluster's size. Never
        # pruned while running, since a task may hold a lock it has not acquired yet.
        lock = self._sending.get(peer_id)
        if lock is None:
            lock = self._sending[peer_id] = trio.Lock()
        return lock

    async def _send_model(self, conn: MessageStream, peer_id: bytes, params: np.ndarray, age: float,
                          base_seq: int | None) -> None:
        """Send ``params`` as a delta against what ``peer_id`` holds of us, resending in full on need-full.

        ``base_seq`` is the reference the peer says it holds (a pull names it); None: trust ours. The
        caller holds the peer's send lock.
        """
        held = self.gossip.outgoing.get(peer_id)
        full = base_seq is not None and (held is None or held.seq != base_seq)
        push = await trio.to_thread.run_sync(lambda: self.gossip.prepare_push(peer_id, params, full=full))
        await conn.send(messages.ModelDelta(push.base_seq, push.new_seq, age, 0, push.payload))
        reply = expect(await conn.receive(), messages.Ack, messages.NeedFull)
        if isinstance(reply, messages.NeedFull):
            self.counters.add("need_full_received")
            self.gossip.forget(peer_id)
            push = await trio.to_thread.run_sync(lambda: self.gossip.prepare_push(peer_id, params, full=True))
            await conn.send(messages.ModelDelta(push.base_seq, push.new_seq, age, 0, push.payload))
            expect(await conn.receive(), messages.Ack)
        self.gossip.commit_push(push)
        if push.base_seq == 0:
            self.counters.add("full_models_sent")  # what lost references cost: a whole model, not a delta

    async def _pull(self, conn: MessageStream, peer_id: bytes) -> None:
        """The pull half of push-pull: ask for the peer's pre-merge model and merge it as it merged ours."""
        held = self.gossip.incoming.get(peer_id)
        await conn.send(messages.PullRequest(held.seq if held is not None else 0))
        reply = expect(await conn.receive(), messages.ModelDelta, messages.Error)
        if isinstance(reply, messages.Error):
            if reply.code != messages.ErrorCode.OVERLOADED:
                raise PeerRefused(f"peer-{reply.code}", reply.text or "pull refused")
            self.counters.add("pulls_declined")  # it was sending to us at that moment: the push stands
            return
        if await self._receive_delta(conn, peer_id, reply, keep_before=False) is not None:
            self.counters.add("pulls")

    def _account(self, peer: Peer | None, conn: MessageStream, peer_id: bytes) -> None:
        self.counters.add("bytes_out", conn.traffic.bytes_out)
        self.counters.add("bytes_in", conn.traffic.bytes_in)
        target = self.peers.get(peer_id) or peer
        if target is not None:
            target.stats.exchanges += 1
            target.stats.bytes_out += conn.traffic.bytes_out
            target.stats.bytes_in += conn.traffic.bytes_in

    def _refusal(self, peer_id: bytes, reason: str) -> None:
        """Count a refusal for the node as a whole and, when we know who it was, for that peer."""
        self.counters.add(f"refused.{reason}")
        peer = self.peers.get(peer_id) if peer_id else None
        if peer is not None:
            peer.stats.refusals[reason] = peer.stats.refusals.get(reason, 0) + 1

    def _check_hello(self, hello: messages.Hello, peer_id: bytes) -> None:
        if hello.node_id != peer_id:
            raise PeerRefused("identity", "Hello names another node id than the certificate")
        if hello.model_fingerprint != self.model.fingerprint:
            raise PeerRefused("fingerprint", "peer trains another model")
        if self.peers.is_blocked(peer_id):
            raise PeerRefused("blocked", "peer is blocked by the operator")
        if self.paused:
            raise PeerRefused("paused", "this node is paused by its operator")

    # ---------------------------------------------------------------- gossip: the passive side

    async def _serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listen = self.config.listen
        try:
            listeners = await trio.open_tcp_listeners(listen.port, host=listen.address)
        except OSError as exc:
            raise ConfigError(f"listen: cannot listen on {listen.address}:{listen.port}: {exc.strerror}") from None
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)
            task_status.started(self.port)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    tcp = await listener.accept()
                except OSError as exc:  # EMFILE and friends: back off, never die
                    log.warning("accept failed", extra=fields(error=str(exc)))
                    await trio.sleep(0.1)
                    continue
                # One address may hold at most half the slots, so a host flooding us with connections
                # cannot starve the honest peers' pushes (tests/e2e/test_faults.py).
                limit = self.config.limits.max_connections
                try:
                    remote = str(tcp.socket.getpeername()[0])
                except OSError:  # reset before we got to it
                    remote = ""
                if not remote or self.open_connections >= limit or self.open_by_host.get(remote, 0) >= (limit + 1) // 2:
                    self.counters.add("refused.overloaded")
                    await tcp.aclose()
                    continue
                self.open_connections += 1
                self.open_by_host[remote] = self.open_by_host.get(remote, 0) + 1
                nursery.start_soon(self._handle, tcp, remote)

    async def _handle(self, tcp: trio.SocketStream, remote: str) -> None:
        stream = trio.SSLStream(tcp, server_context(self.identity), server_side=True)
        conn = MessageStream(stream, self.limits, self.config.limits.read_timeout)
        peer_id = b""
        try:
            with trio.fail_after(self.config.limits.read_timeout * 3):
                await tls_handshake(stream, self.config.limits.connect_timeout)
                peer_id = verify_peer(stream, None, self.allowlist)
                theirs = expect(await conn.receive(), messages.Hello)
                try:
                    self._check_hello(theirs, peer_id)
                except PeerRefused as exc:
                    code = messages.ErrorCode.FINGERPRINT_MISMATCH if exc.reason == "fingerprint" \
                        else messages.ErrorCode.REFUSED
                    await conn.send(messages.Error(code, str(exc)))
                    raise
                await conn.send(self.hello)
                host, _ = tcp.socket.getpeername()[:2]
                peer = self.peers.seen(peer_id, host, 0, "inbound", trio.current_time())
                peer.role = theirs.role  # an inbound gateway must be known as one, to be followed
                first = await self._first_message(conn)
                if first is not None and not isinstance(first, messages.GatewayRound):
                    await self._serve_deltas(conn, peer_id, first)
            if isinstance(first, messages.GatewayRound):  # a FedAvg round: local epochs take their time
                await self.follower.session(conn, peer_id, first)
        except (PeerRefused, ProtocolError, CodecError, trio.TooSlowError) as exc:
            reason = failure_reason(exc)
            if reason != "closed":
                self._refusal(peer_id, reason)
                log.info("inbound connection refused", extra=fields(peer=short(peer_id) if peer_id else "?",
                                                                   reason=reason, error=str(exc)))
        except (LinkBroken, trio.BrokenResourceError, OSError) as exc:
            # The link broke under an exchange we were willing to finish: not a refusal of the peer.
            self.counters.add("dropped.link")
            log.info("inbound connection dropped", extra=fields(peer=short(peer_id) if peer_id else "?",
                                                               error=str(exc)))
        finally:
            if peer_id:
                self._account(None, conn, peer_id)
            await conn.aclose()
            self.open_connections -= 1
            self.open_by_host[remote] -= 1
            if not self.open_by_host[remote]:
                del self.open_by_host[remote]

    @staticmethod
    async def _first_message(conn: MessageStream) -> messages.Message | None:
        """The next message, or None when the peer closes the connection cleanly."""
        try:
            return await conn.receive()
        except PeerRefused as exc:
            if exc.reason == "closed":
                return None
            raise

    def _check_gossip_from(self, peer_id: bytes) -> None:
        """Gossip goes node to node and gateway to gateway; a node following a gateway takes none."""
        peer = self.peers.get(peer_id)
        role = peer.role if peer is not None else "node"
        if self.gateway is not None and role != "gateway":
            raise PeerRefused("role", "a gateway takes gossip only from gateways; follow it instead")
        if self.gateway is None and role == "gateway":
            raise PeerRefused("role", "a node takes a gateway's model only in rounds")
        if not self.learns_by_gossip and self.gateway is None:
            raise PeerRefused("following", "this node follows a gateway and takes no gossip now")

    async def _serve_deltas(self, conn: MessageStream, peer_id: bytes, message: messages.Message | None) -> None:
        """Serve pushes from ``peer_id`` and, after a merged push, its pull of our pre-merge model."""
        before_merge: _BeforeMerge | None = None
        while message is not None:
            if isinstance(message, messages.PullRequest):
                await self._answer_pull(conn, peer_id, message, before_merge)
                before_merge = None
                message = await self._first_message(conn)
                continue
            delta = expect(message, messages.ModelDelta)
            try:
                self._check_gossip_from(peer_id)
            except PeerRefused as exc:
                await conn.send(messages.Error(messages.ErrorCode.REFUSED, str(exc)[:200]))
                raise
            before_merge = await self._receive_delta(conn, peer_id, delta, keep_before=self.config.gossip.push_pull)
            if before_merge is None:
                return
            self.counters.add("exchanges_in")
            message = await self._first_message(conn)

    async def _receive_delta(self, conn: MessageStream, peer_id: bytes, delta: messages.ModelDelta, *,
                             keep_before: bool) -> _BeforeMerge | None:
        """Decode a delta from ``peer_id`` (asking for the full model when we lack its base), merge it and
        acknowledge it. Returns our model and age as they were just before the merge (what a pull gets; the
        model only with ``keep_before``, so merges that no pull can follow copy nothing); None when the
        update was refused (the peer has been told why)."""
        while True:
            async with self.lock:
                local = self.model.params.copy()
            try:
                received = await trio.to_thread.run_sync(
                    self.gossip.receive, peer_id, delta.base_seq, delta.new_seq, delta.payload, local)
                break
            except NeedFull as exc:
                self.counters.add("need_full_sent")
                await conn.send(messages.NeedFull(exc.base_seq))
                delta = expect(await conn.receive(), messages.ModelDelta)
            except Refused as exc:
                self._refusal(peer_id, exc.reason)
                log.warning("update refused", extra=fields(peer=short(peer_id), reason=exc.reason, error=str(exc)))
                await conn.send(messages.Error(messages.ErrorCode.REFUSED, str(exc)[:200]))
                return None
            except CodecError as exc:
                self._refusal(peer_id, "codec")
                log.warning("bad update", extra=fields(peer=short(peer_id), error=str(exc)))
                await conn.send(messages.Error(messages.ErrorCode.CODEC, str(exc)[:200]))
                return None
        async with self.lock:
            before = _BeforeMerge(self.model.params.copy() if keep_before else None, self.age)
            merged = age_weighted_merge(self.model.params, self.age, received.model, delta.age)
            self.age = merged.age
            self.gossip.commit_receive(received)
        self.counters.add("merges")
        self.peers.succeeded(peer_id, trio.current_time())
        log.debug("merged", extra=fields(peer=short(peer_id), weight=round(merged.weight_remote, 3),
                                         age=self.age, distance=round(received.distance, 4)))
        await conn.send(messages.Ack(delta.new_seq))
        return before

    async def _answer_pull(self, conn: MessageStream, peer_id: bytes, request: messages.PullRequest,
                           before_merge: _BeforeMerge | None) -> None:
        """Send our model as it was before we merged the peer's push, so that both ends average alike."""
        if before_merge is None or before_merge.params is None:
            await conn.send(messages.Error(messages.ErrorCode.REFUSED, "a pull must follow a merged push"))
            raise PeerRefused("pull", "pull without a merged push, or push-pull is off here")
        lock = self._send_lock(peer_id)
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:  # our own push to that peer is in flight: never wait (both could wait)
            await conn.send(messages.Error(messages.ErrorCode.OVERLOADED, "already sending to you; push kept"))
            return
        try:
            await self._send_model(conn, peer_id, before_merge.params, before_merge.age, base_seq=request.base_seq)
        finally:
            lock.release()
        self.counters.add("pulls_answered")

    # ---------------------------------------------------------------- reporting

    def status(self) -> dict[str, Any]:
        v, m = self.validation, self.model
        return {
            "node_id": format_node_id(self.node_id), "name": self.config.node.name, "role": self.config.node.role,
            "mode": self.config.node.mode, "fingerprint": m.fingerprint_hex, "age": self.age,
            "model": {"params": m.num_params, "features": m.features_per_sample, "outputs": m.num_outputs,
                      "task": m.task},
            "port": self.port, "uptime": time.time() - self.started_at, "paused": self.paused,
            "training": self.training_active, "train_samples": len(self.data.train),
            "validation": v.as_dict() if v else None, "train_loss": self.train_loss,
            "peers": len(self.peers.live()), "blocked": sorted(format_node_id(b) for b in self.peers.blocked),
            "max_loop_lag": self.max_lag, "param_norm": float(np.linalg.norm(self.model.params)),
            "counters": {**self.counters.values, **self._control_counters()},
            "fedavg": self._fedavg_status(),
        }

    def _fedavg_status(self) -> dict[str, Any]:
        if self.gateway is not None:
            return {"gateway": self.gateway.status()}
        now = trio.current_time()
        live = self.follower.live_gateways(now)
        return {"following": format_node_id(live[0]) if live and self.follower.following(now) else None,
                "learning_by": "gossip" if self.learns_by_gossip else "rounds",
                "rounds": self.follower.rounds, "last_round": self.follower.last_round}

    def _control_counters(self) -> dict[str, float]:
        if self.control is None:
            return {}
        return {"control.ok": self.control.served, **{f"control.{k}": v for k, v in self.control.refused.items()}}

    def metrics_text(self) -> str:
        return render(self.status())

    def peers_report(self) -> list[dict[str, Any]]:
        now = trio.current_time()
        report = []
        for peer in self.peers:
            if len(peer.node_id) != 32:
                continue  # a static address not yet dialled: no identity to show
            stats = peer.stats
            report.append({
                "node_id": format_node_id(peer.node_id), "address": peer.address if peer.port else peer.host,
                "source": peer.source, "role": peer.role,
                "state": "blocked" if self.peers.is_blocked(peer.node_id) else "evicted" if peer.evicted
                else "inbound-only" if peer.source == "inbound" else "live",
                "last_seen_ago": None if stats.last_seen is None else round(now - stats.last_seen, 3),
                "failures": peer.failures, "exchanges": stats.exchanges, "bytes_in": stats.bytes_in,
                "bytes_out": stats.bytes_out, "refusals": dict(stats.refusals),
            })
        return report
