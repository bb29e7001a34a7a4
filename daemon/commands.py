"""What each control-socket command does to a running node; arguments are checked here, as hostile.

Kept apart from the socket server (control.py: transport, credentials, limits) and from the parts it
drives (the learner, the peer table, the reporter), which it is handed by the app, so each can be read, and
tested, on its own.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import trio

from gossipfl import control
from gossipfl.errors import ControlError, IdentityError
from gossipfl.identity.ids import format_node_id, parse_node_id
from gossipfl.learning.privacy_budget import PRIVACY_KEY
from gossipfl.learning.quality import predicted_classes
from gossipfl.protocol.peers import PeerTable
from gossipfl.protocol.references import GossipState

from .control import Handler
from .learner import Learner
from .reporting import Reporter

MAX_PREDICT_ROWS = 100_000
FLOAT32_MAX = float(np.finfo(np.float32).max)  # a model's inputs are float32: larger is infinity


def _bad(message: str) -> ControlError:
    return ControlError(message, control.BAD_REQUEST)


def _node_id_arg(args: dict[str, Any]) -> bytes:
    text = args.get("id")
    if not isinstance(text, str):
        raise _bad("\"id\" must be a node id string")
    try:
        return parse_node_id(text.lower())
    except IdentityError as exc:
        raise _bad(str(exc)) from None


def _rows_arg(args: dict[str, Any], features: int) -> np.ndarray:
    rows = args.get("rows")
    if not isinstance(rows, list) or not rows:
        raise _bad("\"rows\" must be a non-empty list of rows")
    if len(rows) > MAX_PREDICT_ROWS:
        raise _bad(f"at most {MAX_PREDICT_ROWS} rows per request, got {len(rows)}")
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != features:
            raise _bad(f"row {i}: must be a list of {features} numbers (the model's features per sample)")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and abs(v) <= FLOAT32_MAX for v in row):
            raise _bad(f"row {i}: every value must be a finite number within float32's range")
    return np.asarray(rows, dtype=np.float32)


class Commands:
    """One method per command of ``gossipfl.control.COMMANDS`` (its name with ``_`` for ``.``): the names are
    written once, in the library, where the CLI reads them too."""

    def __init__(self, node_id: bytes, learner: Learner, reporter: Reporter, peers: PeerTable,
                 references: GossipState, checkpoint: Callable[[], Awaitable[None]]) -> None:
        self.node_id = node_id
        self.learner = learner
        self.reporter = reporter
        self.peer_table = peers
        self.references = references
        self.checkpoint = checkpoint

    def table(self) -> dict[str, Handler]:
        return {name: getattr(self, name.replace(".", "_")) for name in control.COMMANDS}

    async def status(self, args: dict[str, Any]) -> Any:
        return self.reporter.status()

    async def peers(self, args: dict[str, Any]) -> Any:
        return self.reporter.peers_report()

    async def metrics(self, args: dict[str, Any]) -> Any:
        return self.reporter.metrics_text()

    async def model_export(self, args: dict[str, Any]) -> Any:
        snapshot, age = await self.learner.export()
        private = self.learner.private
        metadata = {PRIVACY_KEY: json.dumps(private.budget.guarantee())} if private else None
        data = await trio.to_thread.run_sync(snapshot.to_bytes, metadata)
        return {"fingerprint": snapshot.fingerprint_hex, "age": age, "onnx": base64.b64encode(data).decode()}

    async def predict(self, args: dict[str, Any]) -> Any:
        model = self.learner.model
        x = _rows_arg(args, model.features_per_sample)
        out, age = await self.learner.predict(x)
        rows = out.reshape(len(x), -1)
        result: dict[str, Any] = {"outputs": rows.tolist(), "age": age}
        if model.task == "classification":
            result["labels"] = predicted_classes(rows).tolist()
        return result

    async def pause(self, args: dict[str, Any]) -> Any:
        self.learner.set_paused(True)
        await self.checkpoint()  # an operator's pause must survive a restart
        return {"paused": True}

    async def resume(self, args: dict[str, Any]) -> Any:
        self.learner.set_paused(False)
        await self.checkpoint()
        return {"paused": False}

    async def peer_block(self, args: dict[str, Any]) -> Any:
        peer_id = _node_id_arg(args)
        if peer_id == self.node_id:
            raise _bad("a node cannot block itself")
        self.peer_table.blocked.add(peer_id)
        self.references.forget(peer_id)
        await self.checkpoint()
        return {"blocked": sorted(format_node_id(b) for b in self.peer_table.blocked)}

    async def peer_unblock(self, args: dict[str, Any]) -> Any:
        peer_id = _node_id_arg(args)
        if peer_id not in self.peer_table.blocked:
            raise ControlError(f"{format_node_id(peer_id)} is not blocked", control.FAILED)
        self.peer_table.blocked.discard(peer_id)
        await self.checkpoint()
        return {"blocked": sorted(format_node_id(b) for b in self.peer_table.blocked)}
