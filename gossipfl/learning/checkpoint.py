"""The node's checkpoint: its model and learning state in one file, replaced atomically.

The checkpoint is a standalone ONNX model (so it can be exported or inspected with any ONNX tool)
whose metadata carries the node's state as JSON under ``gossipfl.state``. One file means the model and
its age can never disagree after a crash; the atomic replace means a SIGKILL mid-write leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gossipfl.atomic import write_bytes_atomic
from gossipfl.errors import ModelError
from gossipfl.learning.model import Model

STATE_KEY = "gossipfl.state"
FORMAT = 1


def save_checkpoint(path: str | os.PathLike[str], model: Model, state: dict[str, Any]) -> None:
    proto = model.to_proto()
    entry = proto.metadata_props.add()
    entry.key, entry.value = STATE_KEY, json.dumps({"format": FORMAT, **state}, sort_keys=True)
    write_bytes_atomic(path, proto.SerializeToString(), mode=0o600)


def load_checkpoint(path: str | os.PathLike[str], expected_fingerprint: bytes | None = None
                    ) -> tuple[Model, dict[str, Any]]:
    """The checkpointed model and state; ModelError if unreadable or of another model."""
    file = Path(path)
    model = Model.load(file)
    try:
        state = json.loads(model.metadata[STATE_KEY])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ModelError(f"{file}: not a gossipfl checkpoint (no readable {STATE_KEY})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ModelError(f"{file}: unknown checkpoint format (expected {FORMAT})")
    if expected_fingerprint is not None and model.fingerprint != expected_fingerprint:
        raise ModelError(f"{file}: checkpoint holds a different model (fingerprint {model.fingerprint_hex[:16]})")
    return model, state
