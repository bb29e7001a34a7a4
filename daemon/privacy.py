"""Private training in the daemon: the ledger on disk, written before the steps it pays for are taken.

A model trained on the rows may be sent to a peer a moment later, so the steps that trained it must be in
the ledger on disk before they run: a crash between training and a checkpoint would otherwise forget what
was spent, and the next run would spend it again. Steps are reserved in blocks (``RESERVE_SLICES`` slices at
a time) and each reservation is written, atomically, before its first step; a crash loses at most the
unused part of a reservation, which stays counted: the ledger may overstate what was spent, never
understate it. The ledger has its own file (``privacy.json``), so moving a damaged checkpoint away does not
forget it; a ledger that cannot be read stops private training (what was spent is unknown) and says so.

With ``privacy.rows = "disjoint_files"`` the file holds a ledger per data file (``LedgerBook``), and a
reservation names the files whose rows it paid for: the learner trains on those rows only, so a file that
arrives between the reservation and the slice is never trained on before its own ledger counts the steps.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

from gossipfl.atomic import read_state_bytes, write_bytes_atomic
from gossipfl.config import PrivacySection
from gossipfl.errors import ConfigError
from gossipfl.learning.privacy_budget import LedgerBook, PrivacyBudget, planned_noise
from gossipfl.metrics import Counters

from .logs import fields

log = logging.getLogger("gossipfld.privacy")

LEDGER = "privacy.json"
MAX_LEDGER_BYTES = 8 * 1024 * 1024  # a ledger per data file: up to MAX_LEDGERS of them, a few hundred bytes each
RESERVE_SLICES = 10  # slices of steps reserved (and written) at a time


def load_ledger(path: Path) -> tuple[LedgerBook, str]:
    """The ledgers on disk (none on a first start), and why they could not be read ("" when they could)."""
    try:
        data = read_state_bytes(path, MAX_LEDGER_BYTES)
    except FileNotFoundError:
        return LedgerBook(), ""
    except OSError as exc:
        return LedgerBook(), f"cannot read {path}: {exc.strerror or exc}"
    try:
        return LedgerBook.from_dict(json.loads(data)), ""
    except (ValueError, RecursionError, ConfigError) as exc:
        return LedgerBook(), f"{path}: {exc}"


class PrivateTraining:
    """The budget, reservations against it, and the ledger's file."""

    def __init__(self, settings: PrivacySection, path: Path, counters: Counters) -> None:
        self.settings = settings
        self.path = path
        self.counters = counters
        book, damaged = load_ledger(path)
        if damaged:
            log.error("privacy ledger unreadable: no training on this node's rows until it is repaired or an "
                      "operator accepts a fresh budget by removing it", extra=fields(error=damaged))
        if settings.rows == "shared":
            book = book.shared()  # ledgers kept per file, added up: no file's spend is forgotten
        self.budget = PrivacyBudget(settings, book, settings.noise_multiplier, damaged)
        self.sample_rate: float | None = None
        self._reserved: tuple[dict[str, int], tuple[str, ...]] | None = None  # the rows and names of the block
        self._left = 0  # reserved steps not yet taken, on ``self._reserved``
        # Shared: stopped for good once the budget is spent. Per file: while no file can pay (a new one may).
        self.stopped = self.budget.exhausted if not self.budget.per_file else bool(damaged)
        self._said_stopped = False

    def plan(self, rows: int, batch: int) -> float:
        """The noise for this run: the configured one, or the least that fits the planned epochs of the rows
        there are now (fixed for the run once found). ConfigError when the budget cannot be met."""
        if self.budget.noise_multiplier <= 0:
            self.budget.noise_multiplier = planned_noise(self.settings, rows, batch)
            log.info("privacy noise planned", extra=fields(noise_multiplier=round(self.budget.noise_multiplier, 4),
                                                           epsilon=self.settings.epsilon, rows=rows))
        return self.budget.noise_multiplier

    async def reserve(self, rows: Mapping[str, int], batch: int, steps: int) -> tuple[str, ...]:
        """The sources (of ``rows``: source name -> training rows) whose rows ``steps`` private steps may train
        on now, the ledger on disk already counting them; none once the budget is spent (for good with one
        shared ledger; per file, until a new file brings a budget of its own)."""
        if self.budget.damaged or (self.stopped and not self.budget.per_file):
            return ()
        rows = dict(rows)
        if self._reserved is not None and self._reserved[0] == rows and self._left >= steps:
            self._left -= steps
            return self._reserved[1]
        taken = self.budget.take(rows, batch, (RESERVE_SLICES * steps, steps))
        if taken.changed:
            await self._save()
        for name in taken.closed:
            self.counters.add("privacy.files_spent")
            log.warning("privacy budget of a data file spent: no more training on its rows",
                        extra=fields(file=name, epsilon=round(self.budget.book.ledger(name).spent(
                            self.settings.delta).epsilon, 4), budget=self.settings.epsilon))
        if not taken.names:
            self._reserved, self._left = None, 0
            if self.budget.present:  # rows to train on, and none of them may be
                self._stop()
            return ()
        if self.stopped:
            self.stopped, self._said_stopped = False, False
            log.info("privacy: a new data file brings a budget of its own; training on its rows",
                     extra=fields(files=len(taken.names)))
        self.sample_rate = taken.sample_rate
        self._reserved, self._left = (rows, taken.names), taken.steps - steps
        return taken.names

    def _stop(self) -> None:
        self.stopped = True
        if not self._said_stopped:
            self._said_stopped = True
            self.counters.add("privacy.budget_spent")
            spent = self.budget.spent()
            log.warning("privacy budget spent" + (" on every data file" if self.budget.per_file else "")
                        + ": no more training on this node's rows; gossip, merges and predictions go on",
                        extra=fields(epsilon=round(spent.epsilon, 4), budget=self.settings.epsilon, steps=spent.steps))

    async def _save(self) -> None:
        data = json.dumps(self.budget.book.to_dict()).encode()
        await trio.to_thread.run_sync(lambda: write_bytes_atomic(self.path, data, mode=0o600))

    def report(self) -> dict[str, Any]:
        return self.budget.as_dict(self.sample_rate, self.stopped)
