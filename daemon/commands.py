"""What each control-socket command does to a running node; arguments are checked here, as hostile.

Kept apart from the socket server (control.py: transport, credentials, limits) and from the node
(node.py: learning and gossip), so each can be read, and tested, on its own.
"""

from __future__ import annotations

import base64
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from gossipfl import control
from gossipfl.errors import ControlError, IdentityError
from gossipfl.identity.ids import format_node_id, parse_node_id
from gossipfl.metrics import render

from .control import Handler

if TYPE_CHECKING:
    from .node import Node

MAX_PREDICT_ROWS = 100_000


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
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in row):
            raise _bad(f"row {i}: every value must be a finite number")
    return np.asarray(rows, dtype=np.float32)


def command_table(node: Node) -> dict[str, Handler]:
    async def status(args: dict[str, Any]) -> Any:
        return node.status()

    async def peers(args: dict[str, Any]) -> Any:
        return node.peers_report()

    async def metrics(args: dict[str, Any]) -> Any:
        return render(node.status())

    async def export(args: dict[str, Any]) -> Any:
        async with node.lock:
            snapshot = node.model.copy()
        data = await trio.to_thread.run_sync(snapshot.to_bytes)
        return {"fingerprint": snapshot.fingerprint_hex, "age": node.age, "onnx": base64.b64encode(data).decode()}

    async def predict(args: dict[str, Any]) -> Any:
        x = _rows_arg(args, node.model.features_per_sample)
        async with node.lock:
            out = await trio.to_thread.run_sync(node.trainer.predict, x)
        result: dict[str, Any] = {"outputs": out.reshape(len(x), -1).tolist(), "age": node.age}
        if node.model.task == "classification":
            result["labels"] = np.argmax(out.reshape(len(x), -1), axis=1).tolist()
        return result

    async def pause(args: dict[str, Any]) -> Any:
        node.set_paused(True)
        await node.checkpoint()  # an operator's pause must survive a restart
        return {"paused": True}

    async def resume(args: dict[str, Any]) -> Any:
        node.set_paused(False)
        await node.checkpoint()
        return {"paused": False}

    async def block(args: dict[str, Any]) -> Any:
        peer_id = _node_id_arg(args)
        if peer_id == node.node_id:
            raise _bad("a node cannot block itself")
        node.peers.blocked.add(peer_id)
        node.gossip.forget(peer_id)
        await node.checkpoint()
        return {"blocked": sorted(format_node_id(b) for b in node.peers.blocked)}

    async def unblock(args: dict[str, Any]) -> Any:
        peer_id = _node_id_arg(args)
        if peer_id not in node.peers.blocked:
            raise ControlError(f"{format_node_id(peer_id)} is not blocked", control.FAILED)
        node.peers.blocked.discard(peer_id)
        await node.checkpoint()
        return {"blocked": sorted(format_node_id(b) for b in node.peers.blocked)}

    return {"status": status, "peers": peers, "metrics": metrics, "model.export": export, "predict": predict,
            "pause": pause, "resume": resume, "peer.block": block, "peer.unblock": unblock}
