"""The node's checkpoint: its model and learning state in one file, replaced atomically.

The checkpoint is a standalone ONNX model (so it can be exported or inspected with any ONNX tool)
whose metadata carries the node's state as JSON under ``gossipfl.state``. One file means the model and
its age can never disagree after a crash; the atomic replace means a SIGKILL mid-write leaves the
previous checkpoint intact.

A checkpoint is read back as hostile input: no symbolic link, a size cap, the SHA-256 of the parameters
(format 2) so that one flipped byte of a weight is refused rather than resumed, and every state key of the
type it must have. Format 1 (no digest) is still read, so an upgrade resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from gossipfl.atomic import read_state_bytes, write_bytes_atomic
from gossipfl.errors import ModelError
from gossipfl.learning.model import MAX_MODEL_BYTES, Model

STATE_KEY = "gossipfl.state"
FORMAT = 2
FORMATS = (1, 2)  # 1: before the parameters' digest
MAX_AGE = 1e18  # samples: a million a second for thirty thousand years


def params_digest(model: Model) -> str:
    return hashlib.sha256(model.params.tobytes()).hexdigest()


def save_checkpoint(path: str | os.PathLike[str], model: Model, state: dict[str, Any],
                    metadata: dict[str, str] | None = None) -> None:
    proto = model.to_proto(metadata)
    entry = proto.metadata_props.add()
    body = {**state, "format": FORMAT, "params_sha256": params_digest(model)}
    entry.key, entry.value = STATE_KEY, json.dumps(body, sort_keys=True)
    write_bytes_atomic(path, proto.SerializeToString(), mode=0o600)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _state_problem(state: dict[str, Any]) -> str | None:
    """What is wrong with a checkpoint's state, by key, or None."""
    age = state.get("age", 0.0)
    if not _number(age) or not 0 <= age <= MAX_AGE:
        return f"'age' must be a number of samples from 0 to {MAX_AGE:g}, got {str(age)[:40]!r}"
    if not isinstance(state.get("paused", False), bool):
        return "'paused' must be true or false"
    blocked = state.get("blocked", [])
    if not isinstance(blocked, list) or not all(isinstance(b, str) for b in blocked):
        return "'blocked' must be a list of node ids"
    counters = state.get("counters", {})
    if not isinstance(counters, dict) or not all(isinstance(k, str) and _number(v) for k, v in counters.items()):
        return "'counters' must map names to finite numbers"
    rnd = state.get("gateway_round", 0)
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
        return "'gateway_round' must be a whole number >= 0"
    return None


def load_checkpoint(path: str | os.PathLike[str], expected_fingerprint: bytes | None = None
                    ) -> tuple[Model, dict[str, Any]]:
    """The checkpointed model and state; ModelError naming what is wrong if the file is unreadable, damaged,
    of another model, or holds a state of the wrong shape. ``FileNotFoundError`` when there is none."""
    file = Path(path)
    try:
        data = read_state_bytes(file, MAX_MODEL_BYTES)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ModelError(f"cannot read checkpoint {file}: {exc.strerror}") from exc
    try:
        model = Model.from_bytes(data)
    except ModelError as exc:
        raise ModelError(f"{file}: {exc}") from exc
    try:
        state = json.loads(model.metadata[STATE_KEY])
    except (KeyError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise ModelError(f"{file}: not a gossipfl checkpoint (no readable {STATE_KEY})") from exc
    if not isinstance(state, dict) or state.get("format") not in FORMATS:
        raise ModelError(f"{file}: unknown checkpoint format (expected one of {FORMATS})")
    if state["format"] >= 2 and state.get("params_sha256") != params_digest(model):
        raise ModelError(f"{file}: the parameters do not match the checkpoint's digest (a damaged file)")
    problem = _state_problem(state)
    if problem:
        raise ModelError(f"{file}: state {problem}")
    if expected_fingerprint is not None and model.fingerprint != expected_fingerprint:
        raise ModelError(f"{file}: checkpoint holds a different model (fingerprint {model.fingerprint_hex[:16]})")
    return model, state
