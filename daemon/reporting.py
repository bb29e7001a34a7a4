"""What the node tells its operator: the status, the peers, Prometheus metrics, systemd's STATUS= line,
and the event loop's lag; plus the two bookkeeping calls every exchange ends with (``account``,
``refusal``), so that counters are named in one place.

It reads the other parts and changes none of them: the learner's model, the peer table, the counters,
and whatever the app adds as sections (the gateway's rounds, the follower's gateway, the control socket's
own counters).
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import trio

from gossipfl.config import NodeConfig
from gossipfl.identity.ids import format_node_id
from gossipfl.metrics import Counters, render
from gossipfl.protocol.peers import PeerTable

from .learner import Learner
from .link import Traffic
from .notify import SystemdNotifier

log = logging.getLogger("gossipfld.reporting")

STATUS_EVERY = 10.0  # seconds between STATUS= lines to systemd
RECENT_SECONDS = 600.0  # "recent" problems: the counters' growth over about this long
LAG_PROBE = 0.05  # seconds between probes of the loop's lag while the node learns at full speed
# ... and while it is quiet: each probe wakes the loop, and 20 a second cost 0.5% of a core measured on
# their own, a quarter of what a quiet node may spend in all. A blocked loop still shows, later.
LAG_PROBE_QUIET = 1.0


def short(node_id: bytes) -> str:
    """A node id as logs show it: its first 12 hex digits."""
    return node_id.hex()[:12]


def account(counters: Counters, peers: PeerTable, key: bytes, traffic: Traffic, exchanges: int = 1) -> None:
    """Count a connection's frame bytes since it was last accounted (``Traffic.take``) for the node and, when
    the table knows the peer, its frame and wire bytes for that peer (the node's wire bytes are counted as
    they pass, by ``link.CountedStream``). ``exchanges`` is 0 for the close of a kept-alive connection."""
    counters.add("bytes_out", traffic.bytes_out)
    counters.add("bytes_in", traffic.bytes_in)
    peer = peers.get(key)
    if peer is not None:
        peer.stats.exchanges += exchanges
        peer.stats.bytes_out += traffic.bytes_out
        peer.stats.bytes_in += traffic.bytes_in
        peer.stats.wire_out += traffic.wire_out
        peer.stats.wire_in += traffic.wire_in


def refusal(counters: Counters, peers: PeerTable, key: bytes, reason: str) -> None:
    """Count a refusal for the node as a whole and, when we know who it was, for that peer."""
    counters.add(f"refused.{reason}")
    peer = peers.get(key) if key else None
    if peer is not None:
        peer.stats.refusals[reason] = peer.stats.refusals.get(reason, 0) + 1


class Reporter:
    def __init__(self, config: NodeConfig, node_id: bytes, learner: Learner, peers: PeerTable,
                 counters: Counters, notifier: SystemdNotifier) -> None:
        self.config = config
        self.node_id = node_id
        self.learner = learner
        self.peers = peers
        self.counters = counters
        self.notifier = notifier
        self.started_at = time.time()
        self.max_lag = 0.0
        self.port: int | None = None
        # Named sections of the status that other parts own: "fedavg", and counters of the control socket.
        self.sections: dict[str, Callable[[], Any]] = {}
        self.extra_counters: list[Callable[[], dict[str, float]]] = []
        # (when, counters) every STATUS_EVERY, back RECENT_SECONDS: counters only grow (a node with a year of
        # uptime showed "refused 4,112" for a problem fixed months ago), so problems are shown as recent too.
        self._snapshots: deque[tuple[float, dict[str, float]]] = deque(
            maxlen=int(RECENT_SECONDS / STATUS_EVERY) + 1)

    def summary(self) -> str:
        """The one line ``systemctl status`` shows."""
        v = self.learner.validation
        quality = f"accuracy {v.accuracy:.3f}" if v and v.accuracy is not None else "not evaluated yet"
        state = "paused" if self.learner.paused else "learning"
        return f"{state}; {len(self.peers.live())} peers; age {self.learner.age:.0f}; {quality}"

    def problems(self) -> list[str]:
        """What an operator should look at, in words: a node with no usable rows learns only what the fleet
        teaches it, and a file or rows it cannot read are data lost."""
        data = self.learner.data
        found = []
        if self.config.training.enabled and self.config.node.role != "gateway" and len(data.train) == 0:
            found.append(f"no usable data in {data.directory}")
        if data.skipped:
            found.append(f"{len(data.skipped)} data files skipped ({next(iter(data.skipped.values()))})")
        power = self.learner.power
        if power is not None and not power.allowed:
            found.append(f"training stopped: {power.policy.reason}")
        skipped = data.skipped_rows
        bad = sum(n for reason, n in skipped.items() if reason != "unterminated")
        if bad:
            found.append(f"{bad} data rows skipped (" + ", ".join(f"{r} {n}" for r, n in sorted(skipped.items())) + ")")
        others = self.counters.values.get("ignored.other_cluster", 0)
        if others and not self.peers.live():
            found.append(f"no peers of this cluster; {others:.0f} adverts of other clusters (other CAs) ignored")
        return found

    def recent(self) -> dict[str, Any]:
        """How much each counter grew over the last ``RECENT_SECONDS`` (or since the start, if sooner)."""
        if not self._snapshots:
            return {"seconds": 0.0, "counters": {}}
        since, then = self._snapshots[0]
        grown = {k: v - then.get(k, 0) for k, v in self.counters.values.items() if v != then.get(k, 0)}
        return {"seconds": round(trio.current_time() - since, 1), "counters": grown}

    def status(self) -> dict[str, Any]:
        learner, m = self.learner, self.learner.model
        v = learner.validation
        counters = dict(self.counters.values)
        for extra in self.extra_counters:
            counters.update(extra())
        return {
            "node_id": format_node_id(self.node_id), "name": self.config.node.name, "role": self.config.node.role,
            "mode": self.config.node.mode, "fingerprint": m.fingerprint_hex, "age": learner.age,
            "model": {"params": m.num_params, "features": m.features_per_sample, "outputs": m.num_outputs,
                      "task": m.task, "schema": json.loads(m.schema.to_json()) if m.schema else None},
            "data": learner.data.report(),
            "port": self.port, "uptime": time.time() - self.started_at, "paused": learner.paused,
            "training": learner.training_active, "train_samples": len(learner.data.train),
            "validation": v.as_dict(m.schema.classes if m.schema else None) if v else None,
            "train_loss": learner.train_loss, "lr": learner.trainer.lr, "problems": self.problems(),
            "peers": len(self.peers.live()), "blocked": sorted(format_node_id(b) for b in self.peers.blocked),
            "max_loop_lag": self.max_lag, "param_norm": float(np.linalg.norm(m.params)),
            "counters": counters, "recent": self.recent(),
            **{name: section() for name, section in self.sections.items()},
        }

    def metrics_text(self) -> str:
        return render(self.status())

    def peers_report(self) -> list[dict[str, Any]]:
        now = trio.current_time()
        report = []
        for peer in self.peers:
            if peer.proven_id is None:
                continue  # a static address not yet dialled: no identity to show
            stats = peer.stats
            report.append({
                "node_id": format_node_id(peer.proven_id), "name": peer.name,
                "address": peer.address if peer.port else peer.host,
                "source": peer.source, "role": peer.role,
                "state": "blocked" if self.peers.is_blocked(peer.key) else "paused" if peer.paused_by_peer
                else "evicted" if peer.evicted
                else "inbound-only" if peer.source == "inbound" else "live",
                "last_seen_ago": None if stats.last_seen is None else round(now - stats.last_seen, 3),
                "failures": peer.failures, "exchanges": stats.exchanges, "bytes_in": stats.bytes_in,
                "bytes_out": stats.bytes_out, "wire_in": stats.wire_in, "wire_out": stats.wire_out,
                "refusals": dict(stats.refusals),
            })
        return report

    async def run(self) -> None:
        """STATUS= lines for systemd, and the loop-lag probe: a blocked loop shows here."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._lag_monitor)
            while True:
                self._snapshots.append((trio.current_time(), dict(self.counters.values)))
                await trio.sleep(STATUS_EVERY)
                self.notifier.status(self.summary())

    async def _lag_monitor(self) -> None:
        while True:
            start = trio.current_time()
            probe = LAG_PROBE if self.learner.pacer.pace.level == 0 else LAG_PROBE_QUIET
            await trio.sleep(probe)
            self.max_lag = max(self.max_lag, trio.current_time() - start - probe)
