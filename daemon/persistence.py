"""The node's state on disk: the checkpoint (model and state in one atomic ONNX file) and the delta references.

At start: resume from the checkpoint if there is one (a bad one stops the start with a sentence saying to
move it away: never silently start over), and resume the references (a missing or damaged file costs only
need-fulls). While running: a checkpoint every ``state.checkpoint_seconds``, on demand (an operator's pause
must survive a restart) and at the end. Every write is atomic; temporary files a kill left are removed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import trio

from gossipfl.atomic import read_state_bytes, write_bytes_atomic
from gossipfl.errors import CodecError, ModelError
from gossipfl.learning.checkpoint import load_checkpoint, save_checkpoint
from gossipfl.learning.model import Model
from gossipfl.learning.privacy_budget import PRIVACY_KEY
from gossipfl.metrics import Counters
from gossipfl.protocol.references import GossipState

from .learner import Learner
from .logs import fields

log = logging.getLogger("gossipfld.persistence")

CHECKPOINT = "checkpoint.onnx"
REFERENCES = "references.bin"


class Persistence:
    def __init__(self, state_dir: Path, save_references: bool) -> None:
        self.state_dir = state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = state_dir / CHECKPOINT
        self.references_path = state_dir / REFERENCES
        self.save_references = save_references
        for name in (CHECKPOINT, REFERENCES):
            for stale in state_dir.glob(f".{name}.*.tmp"):  # left by a kill mid-write
                stale.unlink(missing_ok=True)

    def load_model(self, initial_path: Path) -> tuple[Model, dict[str, Any]]:
        """The model to start from, and the state saved with it (empty on a first start)."""
        initial = Model.load(initial_path)
        try:
            model, state = load_checkpoint(self.checkpoint_path, initial.fingerprint)
        except FileNotFoundError:
            return initial, {}
        except ModelError as exc:
            raise ModelError(f"cannot resume: {exc}; move {self.checkpoint_path} away to start afresh") from exc
        log.info("resumed from checkpoint", extra=fields(age=state.get("age"), path=str(self.checkpoint_path)))
        return model, state

    def restore_references(self, references: GossipState, fingerprint: bytes) -> None:
        """Resume deltas where the last run left them; a missing or damaged file only costs need-fulls."""
        if not self.save_references:
            self.references_path.unlink(missing_ok=True)  # never resume from a file this run will not update
            return
        try:
            data = read_state_bytes(self.references_path, references.max_dump_bytes)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot read the delta references; peers will send full models",
                        extra=fields(path=str(self.references_path), error=exc.strerror))
            return
        try:
            count = references.restore(data, fingerprint)
        except CodecError as exc:
            log.warning("ignoring the saved delta references; peers will send full models",
                        extra=fields(path=str(self.references_path), error=str(exc)))
            return
        log.info("resumed delta references", extra=fields(references=count))

    async def save(self, learner: Learner, references: GossipState, state: Callable[[], dict[str, Any]],
                   counters: Counters) -> None:
        """Checkpoint the model with ``state()`` (read right after the model, with no await between, so the
        age saved is the model's), then the references."""
        snapshot, age = await learner.export()
        saved = state()
        if not np.isfinite(snapshot.params).all():  # the learner rolls such a model back; never save one
            counters.add("checkpoints_refused.nonfinite")
            log.error("checkpoint skipped: the model is not finite")
            return
        learner.mark_good(snapshot.params, age)  # the learner keeps models finite: this is one to come back to
        private = learner.private
        metadata = {PRIVACY_KEY: json.dumps(private.budget.guarantee())} if private else None
        await trio.to_thread.run_sync(save_checkpoint, self.checkpoint_path, snapshot, saved, metadata)
        if self.save_references:
            frozen, fingerprint = references.frozen(), snapshot.fingerprint
            await trio.to_thread.run_sync(
                lambda: write_bytes_atomic(self.references_path, frozen.dump(fingerprint), mode=0o600))
        counters.add("checkpoints")
