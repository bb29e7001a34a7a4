"""The app: the one module that knows every part of the daemon, builds them and runs them in one nursery.

As Syncthing's ``lib/syncthing/syncthing.go`` does, this is where services are wired, and only here: the
learner (model, age, training), the peer table, admission and the dialer, the listener with its handlers
(gossip for ``ModelDelta``, the follower for ``GatewayRound``), the gateway when the node is one, mDNS
discovery, a sensor stream over MQTT when ``[mqtt]`` is on, the power watch, persistence, reporting, the control socket,
Prometheus metrics and systemd. The parts know one another only through what they are handed here, so none
imports another's owner and each is tested alone.

Tasks: the listener, discovery, gossip, the gateway's rounds, training, data rescans, checkpoints, status
and loop-lag reporting, the systemd watchdog. ``run`` returns on SIGTERM or SIGINT after a final checkpoint.
"""

from __future__ import annotations

import logging
import math
import secrets
import signal
import time
from typing import Any

import trio

from gossipfl.config import NodeConfig, parse_host_port
from gossipfl.errors import ConfigError, IdentityError
from gossipfl.identity.ids import format_node_id, parse_allowlist, parse_node_id
from gossipfl.identity.node import NodeIdentity
from gossipfl.learning.data import DataSpec, LocalData
from gossipfl.learning.dpsgd import DpSgdConfig
from gossipfl.learning.optim import OptimizerConfig
from gossipfl.learning.robust import ClipSettings, MergeGuard
from gossipfl.learning.trainer import TrainConfig, Trainer
from gossipfl.metrics import Counters
from gossipfl.protocol import framing, messages
from gossipfl.protocol.advert import Advertisement, PeerGone, PeerSeen
from gossipfl.protocol.codec import CodecConfig
from gossipfl.protocol.pace import Pace
from gossipfl.protocol.peers import PeerTable
from gossipfl.protocol.references import GossipState

from .commands import Commands
from .control import ControlServer
from .discovery import Discovery
from .follower import Follower
from .gateway import Gateway
from .gossiping import Gossip
from .learner import Learner
from .listener import Listener
from .logs import fields
from .metrics_http import serve_metrics
from .notify import SystemdNotifier, watchdog_task
from .pacing import Pacer
from .peering import Admission, Dialer
from .persistence import Persistence
from .power import PowerWatch
from .privacy import LEDGER, PrivateTraining
from .reporting import Reporter, short
from .streaming import StreamFeed

log = logging.getLogger("gossipfld.app")

MAX_FOREIGN_LOGGED = 256  # other clusters' nodes logged by id; past that a hostile LAN gets only the counter


def _node_ids(texts: Any) -> set[bytes]:
    """Node ids from saved state; a damaged entry is skipped with a warning, never fatal."""
    ids = set()
    for text in texts if isinstance(texts, list) else []:
        try:
            ids.add(parse_node_id(text))
        except (IdentityError, TypeError):
            log.warning("ignoring a malformed blocked id in the checkpoint", extra=fields(value=str(text)[:80]))
    return ids


class App:
    def __init__(self, config: NodeConfig, identity: NodeIdentity) -> None:
        self.config, self.identity = config, identity
        self.node_id = identity.node_id
        self.persistence = Persistence(config.node.state_dir, config.state.save_references)
        model, state = self.persistence.load_model(config.model.path)
        self.counters = Counters()
        self.counters.values.update(state.get("counters", {}))  # checked by load_checkpoint
        t, g, p = config.training, config.gossip, config.privacy
        # Under DP the noise and the batches must not be predictable: a known seed would let anyone who reads
        # the config subtract the noise. The noise multiplier is planned once the rows are known (learner).
        dp = DpSgdConfig(clip=p.clip, noise_multiplier=p.noise_multiplier or 1.0) if p.enabled else None
        trainer = Trainer(model, TrainConfig(optimizer=OptimizerConfig(t.optimizer, lr=t.lr, momentum=t.momentum),
                                             batch_size=t.batch_size, seed=secrets.randbits(63) if dp else t.seed,
                                             threads=t.threads, dp=dp))
        self.private = PrivateTraining(p, config.node.state_dir / LEDGER, self.counters) if p.enabled else None
        data = LocalData(config.data.directory, DataSpec.of(model, config.data.label_column or None,
                                                            config.data.delimiter or None),
                         config.data.validation_fraction, max_rows=config.data.max_rows)
        guard = None
        if g.merge == "clipped":
            guard = MergeGuard(ClipSettings(max_share=g.max_share, radius_factor=g.clip_factor,
                                            max_age_rate=g.max_age_rate))
            guard.restore(state.get("merge_guard"))
        self.pacer = Pacer(Pace(config.quiet, g.period, t.duty_cycle, now=0.0), self.counters)
        self.power = PowerWatch(config.power, self.counters) if config.power.enabled else None
        self.learner = Learner(model, trainer, data, t, self.counters, self.pacer, float(state.get("age", 0.0)),
                               paused=state.get("paused", False), guard=guard,  # a pause survives restarts
                               private=self.private, power=self.power)
        self.codec = CodecConfig(scheme=g.scheme, topk_fraction=g.topk_fraction, int8_block=256, nthreads=1)
        # The clipped rule merges a far model a bounded step instead of refusing it as an outlier.
        outlier_factor = config.limits.outlier_factor if g.merge == "age" else math.inf
        self.references = GossipState(model.num_params, self.codec, g.max_peers, outlier_factor)
        self.persistence.restore_references(self.references, model.fingerprint)
        self.peers = PeerTable(g.period, g.failures_to_evict, g.max_backoff)
        self.peers.blocked.update(_node_ids(state.get("blocked", [])))
        allowlist = parse_allowlist(config.tls.allowlist) if config.tls.allowlist else None
        self.admission = Admission.for_node(identity, model.fingerprint, config.node.role, g.scheme, g.push_pull,
                                            self.peers, allowlist, lambda: self.learner.paused,
                                            parse_allowlist(config.fedavg.gateways), keep_alive=g.keep_alive > 0)
        wire_limits = framing.Limits.for_model(model.num_params)
        if wire_limits.max_frame_size > config.limits.max_frame_bytes:
            raise ConfigError(f"limits.max_frame_bytes: {config.limits.max_frame_bytes} bytes cannot carry this "
                              f"model of {model.num_params} parameters whole (up to {wire_limits.max_frame_size} "
                              "bytes); raise it, or train a smaller model")
        lim = config.limits
        self.dialer = Dialer(self.admission, wire_limits, lim.connect_timeout, lim.read_timeout, self.counters)
        self.listener = Listener(self.admission, self.peers, self.counters, lim, wire_limits, g.keep_alive)
        self.notifier = SystemdNotifier.from_env()
        self.reporter = Reporter(config, self.node_id, self.learner, self.peers, self.counters, self.notifier)
        # One history of how far the fleet's models usually are, for gossip merges and a gateway's global models
        # alike; with the plain age rule (no gossip guard) the rounds keep one of their own.
        round_guard = guard
        if round_guard is None:
            round_guard = MergeGuard(ClipSettings(radius_factor=g.clip_factor, max_age_rate=g.max_age_rate))
            round_guard.restore(state.get("follower_guard"))
        self.follower = Follower(config, self.learner, self.peers, self.counters, self.codec, round_guard)
        self.gateway = Gateway(config, self.learner, self.peers, self.dialer, self.counters, self.codec, state) \
            if config.node.role == "gateway" else None
        self.gossip = Gossip(config, self.learner, self.references, self.peers, self.dialer, self.counters,
                             self.learns_by_gossip)
        self.listener.handle(messages.ModelDelta, self.gossip.serve)
        self.listener.handle(messages.GatewayRound, self.follower.session)
        self.reporter.sections["fedavg"] = self._fedavg_status
        self.reporter.sections["pace"] = self.pacer.report
        self.reporter.sections["power"] = self.power.report if self.power else lambda: {"enabled": False}
        self.reporter.sections["privacy"] = self.private.report if self.private else lambda: {"enabled": False}
        self.stream = StreamFeed(config.mqtt, self.learner, self.counters, config.node.state_dir, config.node.name) \
            if config.mqtt.enabled else None
        if self.stream is not None:
            self.reporter.sections["stream"] = self.stream.status
        self.control: ControlServer | None = None
        self.discovery: Discovery | None = None
        self.metrics_port: int | None = None
        self._foreign: set[bytes] = set()  # nodes of other clusters seen on mDNS, logged once each

    # ------------------------------------------------------------------ what the parts ask of each other

    def learns_by_gossip(self) -> bool:
        """Gossip between nodes, or between gateways; a node following a gateway learns in rounds."""
        if self.gateway is not None:
            return True
        return not self.follower.following(trio.current_time())

    def _fedavg_status(self) -> dict[str, Any]:
        if self.gateway is not None:
            return {"gateway": self.gateway.status()}
        return self.follower.status()

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps beside the model."""
        return {"age": self.learner.age, "node_id": format_node_id(self.node_id),
                "counters": dict(self.counters.values), "max_loop_lag": self.reporter.max_lag,
                "saved_at": time.time(), "paused": self.learner.paused,
                "blocked": sorted(format_node_id(b) for b in self.peers.blocked),
                **({"gateway_round": self.gateway.round} if self.gateway is not None else {}),
                **({"follower_guard": self.follower.guard.state(trio.current_time())}
                   if self.follower.guard is not self.learner.guard else {}),
                **({"merge_guard": self.learner.guard.state(trio.current_time())} if self.learner.guard else {})}

    async def checkpoint(self) -> None:
        await self.persistence.save(self.learner, self.references, self.state, self.counters)
        if self.stream is not None:
            self.stream.save()

    # ------------------------------------------------------------------ running

    @property
    def port(self) -> int | None:
        return self.reporter.port

    async def run(self, *, task_status: trio.TaskStatus[App] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled or signalled; then checkpoint. ``started`` once peers can connect."""
        # Signals stay captured until the final checkpoint is written: a second SIGTERM must not kill the
        # process half-way through its shutdown.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            try:
                async with trio.open_nursery() as nursery:
                    await self._start(nursery, signals)
                    task_status.started(self)
            finally:
                with trio.CancelScope(shield=True):
                    await self.checkpoint()
                    log.info("node stopped", extra=fields(age=self.learner.age))

    async def _start(self, nursery: trio.Nursery, signals: Any) -> None:
        listen, ctl = self.config.listen, self.config.control
        self.reporter.port = await nursery.start(self.listener.serve, listen.address, listen.port)
        nursery.start_soon(self._signals, signals, nursery.cancel_scope)
        if ctl.enabled:
            commands = Commands(self.node_id, self.learner, self.reporter, self.peers, self.references,
                                self.checkpoint).table()
            self.control = ControlServer(ctl.socket, commands, group=ctl.group,
                                         max_request_bytes=ctl.max_request_bytes,
                                         max_connections=ctl.max_connections, timeout=ctl.timeout)
            self.reporter.extra_counters.append(self.control.counters)
            await nursery.start(self.control.serve)
        if ctl.metrics_listen:
            self.metrics_port = await nursery.start(serve_metrics, ctl.metrics_listen, self.reporter.metrics_text)
        await trio.to_thread.run_sync(self.learner.data.refresh)
        for index, text in enumerate(self.config.discovery.static_peers):
            host, port = parse_host_port(text, f"discovery.static_peers[{index}]")
            self.peers.add_static(host, port, trio.current_time())
        if self.config.discovery.mdns:
            await nursery.start(self._discovery)
        if self.stream is not None:
            await nursery.start(self.stream.source.run)
            nursery.start_soon(self.stream.run)
        self.pacer.begin()
        if self.power is not None:
            await self.power.check()  # before the first slice: a hot or flat device does not train at all
            nursery.start_soon(self.power.run)
        nursery.start_soon(self.gossip.run)
        if self.gateway is not None:
            nursery.start_soon(self.gateway.run)
        nursery.start_soon(self.learner.run, self.learns_by_gossip)
        nursery.start_soon(self.learner.watch_data, self.config.data.rescan_seconds)
        nursery.start_soon(self._checkpoint_loop)
        log.info("node started", extra=fields(
            id=format_node_id(self.node_id), port=self.port, model=self.learner.model.fingerprint_hex[:16],
            params=self.learner.model.num_params, age=self.learner.age, samples=len(self.learner.data.train)))
        # systemd's READY=1 only now: peers can connect and `gossipfl status` answers.
        self.notifier.ready()
        self.notifier.status(self.reporter.summary())
        nursery.start_soon(watchdog_task, self.notifier)
        nursery.start_soon(self.reporter.run)

    async def _signals(self, signals: Any, cancel_scope: trio.CancelScope) -> None:
        async for signum in signals:
            log.info("stopping", extra=fields(signal=signal.Signals(signum).name))
            self.notifier.stopping()
            cancel_scope.cancel()
            return

    async def _checkpoint_loop(self) -> None:
        while True:
            await trio.sleep(self.config.state.checkpoint_seconds)
            try:
                await self.checkpoint()
            except OSError as exc:
                log.error("checkpoint failed", extra=fields(error=str(exc)))

    # ------------------------------------------------------------------ discovery into the peer table

    async def _discovery(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        interfaces = self.config.mdns_interfaces
        address = self.config.listen.address
        advertised = [address] if address not in ("0.0.0.0", "::") else interfaces
        assert self.port is not None
        advert = Advertisement(self.node_id, messages.PROTOCOL_VERSION, self.learner.model.fingerprint, self.port,
                               self.config.node.role, tuple(advertised), self.identity.cluster_tag)
        self.discovery = Discovery(advert, interfaces)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.discovery.run)
            task_status.started()
            async for event in self.discovery.events:
                if isinstance(event, PeerSeen):
                    self._peer_seen(event)
                elif isinstance(event, PeerGone):
                    self.peers.gone(event.node_id)
                    log.info("peer gone", extra=fields(peer=short(event.node_id)))

    def _peer_seen(self, event: PeerSeen) -> None:
        if event.cluster and event.cluster != self.identity.cluster_tag:
            # Another cluster's node on our LAN: not dialled (its TLS would refuse us), logged once.
            self.counters.add("ignored.other_cluster")
            if event.node_id not in self._foreign and len(self._foreign) < MAX_FOREIGN_LOGGED:
                self._foreign.add(event.node_id)
                log.info("ignoring a node of another cluster", extra=fields(peer=short(event.node_id),
                                                                           cluster=event.cluster.hex()))
            self.peers.gone(event.node_id)
            return
        if event.fingerprint != self.learner.model.fingerprint:
            self.counters.add("refused.fingerprint")
            log.info("ignoring peer with another model", extra=fields(peer=short(event.node_id)))
            return
        role = self.admission.role_of(event.node_id, event.role)  # an advert claims a role; the cluster grants it
        if self.peers.seen(event.node_id, event.addresses[0], event.port, "mdns", trio.current_time(), role,
                           event.fingerprint) is None:
            self.counters.add("ignored.unverified")  # the table holds its share of adverts nobody has proven
            log.debug("advert ignored: too many unverified peers", extra=fields(peer=short(event.node_id)))
            return
        log.info("peer seen", extra=fields(peer=short(event.node_id), addr=event.addresses[0], port=event.port))

