"""Private training in the daemon: the ledger on disk, written before the steps it pays for are taken.

A model trained on the rows may be sent to a peer a moment later, so the steps that trained it must be in
the ledger on disk before they run: a crash between training and a checkpoint would otherwise forget what
was spent, and the next run would spend it again. Steps are reserved in blocks (``RESERVE_SLICES`` slices at
a time) and each reservation is written, atomically, before its first step; a crash loses at most the
unused part of a reservation, which stays counted: the ledger may overstate what was spent, never
understate it. The ledger has its own file (``privacy.json``), so moving a damaged checkpoint away does not
forget it; a ledger that cannot be read stops private training (what was spent is unknown) and says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import trio

from gossipfl.atomic import read_state_bytes, write_bytes_atomic
from gossipfl.config import PrivacySection
from gossipfl.errors import ConfigError
from gossipfl.learning.privacy_budget import Ledger, PrivacyBudget, planned_noise
from gossipfl.metrics import Counters

from .logs import fields

log = logging.getLogger("gossipfld.privacy")

LEDGER = "privacy.json"
MAX_LEDGER_BYTES = 64 * 1024
RESERVE_SLICES = 10  # slices of steps reserved (and written) at a time


def load_ledger(path: Path) -> tuple[Ledger, str]:
    """The ledger on disk (empty on a first start), and why it could not be read ("" when it could)."""
    try:
        data = read_state_bytes(path, MAX_LEDGER_BYTES)
    except FileNotFoundError:
        return Ledger(), ""
    except OSError as exc:
        return Ledger(), f"cannot read {path}: {exc.strerror or exc}"
    try:
        return Ledger.from_dict(json.loads(data)), ""
    except (ValueError, RecursionError, ConfigError) as exc:
        return Ledger(), f"{path}: {exc}"


class PrivateTraining:
    """The budget, reservations against it, and the ledger's file."""

    def __init__(self, settings: PrivacySection, path: Path, counters: Counters) -> None:
        self.settings = settings
        self.path = path
        self.counters = counters
        ledger, damaged = load_ledger(path)
        if damaged:
            log.error("privacy ledger unreadable: no training on this node's rows until it is repaired or an "
                      "operator accepts a fresh budget by removing it", extra=fields(error=damaged))
        self.budget = PrivacyBudget(settings, ledger, settings.noise_multiplier, damaged)
        self.sample_rate: float | None = None
        self._left = 0  # reserved steps not yet taken, at ``self.sample_rate``
        self.stopped = self.budget.exhausted
        self._said_stopped = False

    def plan(self, rows: int, batch: int) -> float:
        """The noise for this run: the configured one, or the least that fits the planned epochs of the rows
        there are now (fixed for the run once found). ConfigError when the budget cannot be met."""
        if self.budget.noise_multiplier <= 0:
            self.budget.noise_multiplier = planned_noise(self.settings, rows, batch)
            log.info("privacy noise planned", extra=fields(noise_multiplier=round(self.budget.noise_multiplier, 4),
                                                           epsilon=self.settings.epsilon, rows=rows))
        return self.budget.noise_multiplier

    async def reserve(self, sample_rate: float, steps: int) -> bool:
        """Whether ``steps`` private steps at ``sample_rate`` may run now; the ledger on disk already counts
        them when True. False once the budget is spent (for good: the rows' spend never shrinks)."""
        if self.stopped:
            return False
        if sample_rate == self.sample_rate and self._left >= steps:
            self._left -= steps
            return True
        for block in (RESERVE_SLICES * steps, steps):  # a whole block, or what is left of the budget
            if self.budget.allows(sample_rate, block):
                self.budget.ledger.record(self.budget.noise_multiplier, sample_rate, block)
                await self._save()
                self.sample_rate, self._left = sample_rate, block - steps
                return True
        self._stop()
        return False

    def _stop(self) -> None:
        self.stopped = True
        if not self._said_stopped:
            self._said_stopped = True
            self.counters.add("privacy.budget_spent")
            spent = self.budget.spent()
            log.warning("privacy budget spent: no more training on this node's rows; gossip, merges and "
                        "predictions go on", extra=fields(epsilon=round(spent.epsilon, 4),
                                                          budget=self.settings.epsilon, steps=spent.steps))

    async def _save(self) -> None:
        data = json.dumps(self.budget.ledger.to_dict()).encode()
        await trio.to_thread.run_sync(lambda: write_bytes_atomic(self.path, data, mode=0o600))

    def report(self) -> dict[str, Any]:
        return self.budget.as_dict(self.sample_rate, self.stopped)
