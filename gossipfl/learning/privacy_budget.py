"""A node's privacy budget: what its rows have paid for every private training step, and when to stop.

Rényi DP adds up across steps whatever their sample rate and noise, so the ledger keeps one segment per
(noise multiplier, sample rate) the node trained at, with its step count: rows come and go (the sample
rate ``batch / rows`` moves with them) and an operator may change the noise between runs, and each change
starts a segment. Epsilon is converted from the summed RDP at the configured delta.

The default rule is the safe one (``privacy.rows = "shared"``): every row of the node's data shares one
ledger. A new file may hold the same people as an old one (a re-export, a sensor's overlapping window), so
new rows never bring a fresh budget; once the budget is spent the node stops training on its rows for good,
and keeps gossiping, merging and predicting, which cost its rows nothing more (post-processing).

With ``privacy.rows = "disjoint_files"`` the operator states that no person or record is in two data files;
only then does each file keep a ledger of its own (:class:`LedgerBook`). Every private step is recorded in
the ledger of every file whose rows took part, at the sample rate of the whole step (each of those rows was
sampled at that rate, whichever file it came from): conservative, never per-file shares. A file whose
ledger cannot pay for the next slice leaves the training rows for good; a new file starts with an empty
ledger, so it brings its own budget. A sensor stream's rows share one ledger of their own.

Sans-I/O: the daemon saves :meth:`LedgerBook.to_dict` in a file of its own and reads it back through
:meth:`LedgerBook.from_dict`, which treats it as hostile.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gossipfl.config import PrivacySection
from gossipfl.errors import ConfigError
from gossipfl.learning.privacy import (
    ORDERS,
    PrivacySpent,
    _check_noise,
    _check_sample_rate,
    _count,
    _epsilon_and_order,
    noise_for_budget,
    rdp_subsampled_gaussian,
    steps_for_epochs,
)

PRIVACY_KEY = "gossipfl.privacy"  # a model's metadata: the guarantee its trainer's rows were trained under
MAX_SEGMENTS = 32  # past this, the two smallest segments merge into one that costs at least both
SHARED = "*"  # the ledger of every row: privacy.rows = "shared", and the one ledger a version-1 file holds
VERSION = 2  # of the file format with a ledger per source; version 1 (no "version" key) is one shared ledger
MAX_LEDGERS = 4096  # sources with a ledger; a file past this is not trained on (there is no ledger to pay it)
MAX_NAME_CHARS = 255  # a file name, as a file system allows it


@functools.lru_cache(maxsize=512)
def _step_rdp(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """One step's RDP at each order: shared by every ledger, since per-file ledgers record the same steps
    (about 17 ms each to compute, once per (noise, rate))."""
    rdp = rdp_subsampled_gaussian(sample_rate, noise_multiplier, ORDERS)
    rdp.flags.writeable = False
    return rdp


class Ledger:
    """The RDP a node's rows have spent, by (noise multiplier, sample rate) segment."""

    def __init__(self, segments: list[tuple[float, float, int]] | None = None) -> None:
        self._segments: dict[tuple[float, float], int] = {}
        self._spent: dict[float, PrivacySpent] = {}  # by delta, until the next record: status asks often
        for noise, rate, steps in segments or []:
            self.record(noise, rate, steps)

    def segments(self) -> list[tuple[float, float, int]]:
        return [(noise, rate, steps) for (noise, rate), steps in sorted(self._segments.items())]

    @classmethod
    def combined(cls, ledgers: list[Ledger]) -> Ledger:
        """One ledger that costs at least all of these together: their steps added up (a step two of them
        recorded counts twice, which overstates, never understates)."""
        return cls([segment for ledger in ledgers for segment in ledger.segments()])

    @property
    def steps(self) -> int:
        return sum(self._segments.values())

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """``steps`` private steps at this noise and sample rate."""
        key = (_check_noise(noise_multiplier), _check_sample_rate(sample_rate))
        more = _count("steps", steps)
        if more:
            self._segments[key] = self._segments.get(key, 0) + more
            self._spent.clear()
        while len(self._segments) > MAX_SEGMENTS:
            self._merge_smallest()

    def _merge_smallest(self) -> None:
        """Two segments as one that costs no less: RDP grows with the sample rate and falls with the noise,
        so the larger rate and the smaller noise over both step counts bound their sum from above."""
        (a, sa), (b, sb) = sorted(self._segments.items(), key=lambda kv: kv[1])[:2]
        del self._segments[a], self._segments[b]
        key = (min(a[0], b[0]), max(a[1], b[1]))
        self._segments[key] = self._segments.get(key, 0) + sa + sb

    def rdp(self, extra: tuple[float, float, int] | None = None) -> np.ndarray:
        total = np.zeros(len(ORDERS))
        items = list(self._segments.items()) + ([((extra[0], extra[1]), extra[2])] if extra else [])
        for key, steps in items:
            if steps:
                total = total + _step_rdp(*key) * float(steps)
        return total

    def spent(self, delta: float, extra: tuple[float, float, int] | None = None) -> PrivacySpent:
        """Epsilon at ``delta`` after the steps recorded (and ``extra``, a (noise, rate, steps) not yet taken)."""
        if extra is None and delta in self._spent:
            return self._spent[delta]
        steps = self.steps + (extra[2] if extra else 0)
        if steps == 0:
            return PrivacySpent(epsilon=0.0, delta=delta, steps=0, order=float(ORDERS[0]))
        eps, order = _epsilon_and_order(self.rdp(extra), np.asarray(ORDERS, dtype=np.float64), delta)
        spent = PrivacySpent(epsilon=eps, delta=delta, steps=steps, order=order)
        if extra is None:
            self._spent[delta] = spent
        return spent

    def to_dict(self) -> dict[str, Any]:
        return {"segments": [list(segment) for segment in self.segments()]}

    @classmethod
    def from_dict(cls, data: object) -> Ledger:
        """The ledger :meth:`to_dict` saved, read as hostile: a ConfigError naming what is wrong."""
        if not isinstance(data, Mapping) or set(data) != {"segments"}:
            raise ConfigError("privacy ledger must be an object with exactly one key, 'segments'")
        segments = data["segments"]
        if not isinstance(segments, list) or len(segments) > MAX_SEGMENTS:
            raise ConfigError(f"privacy ledger 'segments' must be a list of at most {MAX_SEGMENTS}")
        out: list[tuple[float, float, int]] = []
        for i, entry in enumerate(segments):
            if not isinstance(entry, list) or len(entry) != 3:
                raise ConfigError(f"privacy ledger segment {i} must be [noise_multiplier, sample_rate, steps]")
            noise, rate, steps = entry
            try:
                out.append((_check_noise(noise), _check_sample_rate(rate), _count("steps", steps)))
            except ConfigError as exc:
                raise ConfigError(f"privacy ledger segment {i}: {exc}") from None
        return cls(out)


def _check_name(name: object, where: str) -> str:
    """A source's name as the ledger file may hold it: SHARED, or one file name (no folder, no control
    characters; the data directory is flat)."""
    if not isinstance(name, str):
        raise ConfigError(f"privacy ledger {where}: a name must be a string, got {type(name).__name__}")
    if name != SHARED and not (0 < len(name) <= MAX_NAME_CHARS and name.isprintable() and "/" not in name
                               and name not in (".", "..")):
        raise ConfigError(f"privacy ledger {where}: {name[:80]!r} is not a file name")
    return name


@dataclass
class LedgerBook:
    """A node's ledgers by source: one (``SHARED``) for every row, or one per data file name (and one for a
    sensor stream's rows), with the files found out of budget (``closed``, for good: a file that could not
    pay for a slice at one sample rate is not tried again at a smaller one, so its ledger never grows again).

    On disk, a book that is only the shared ledger is written as version 1, the format every gossipfld has
    read (``{"segments": [...]}``), so a node that never declares its files disjoint writes what it always
    wrote; a book with per-file ledgers is version 2, which an older gossipfld refuses, and so stops
    training rather than misreads it."""

    ledgers: dict[str, Ledger] = field(default_factory=dict)
    closed: set[str] = field(default_factory=set)

    def ledger(self, name: str) -> Ledger:
        """The ledger of ``name`` (an empty one, not kept, when it has none yet)."""
        return self.ledgers.get(name) or Ledger()

    def record(self, name: str, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        self.ledgers.setdefault(name, Ledger()).record(noise_multiplier, sample_rate, steps)

    def shared(self) -> LedgerBook:
        """This book as one shared ledger (``privacy.rows = "shared"``): per-file ledgers written under
        ``disjoint_files`` are added up, which costs at least what every row spent."""
        if set(self.ledgers) <= {SHARED}:
            return LedgerBook(dict(self.ledgers))
        return LedgerBook({SHARED: Ledger.combined(list(self.ledgers.values()))})

    def split(self, names: list[str]) -> bool:
        """Per-file ledgers from a shared one (``rows`` switched from "shared" to "disjoint_files"): the files
        present now may have been trained on under it, so each takes a copy of what it spent; files that
        arrive later start empty. True when the book changed."""
        shared = self.ledgers.pop(SHARED, None)
        if shared is None:
            return False
        for name in names:
            self.ledgers[name] = Ledger.combined([shared, self.ledger(name)])
        return True

    def to_dict(self) -> dict[str, Any]:
        if set(self.ledgers) <= {SHARED} and not self.closed:
            return self.ledger(SHARED).to_dict()
        return {"version": VERSION, "ledgers": {name: self.ledgers[name].to_dict() for name in sorted(self.ledgers)},
                "closed": sorted(self.closed)}

    @classmethod
    def from_dict(cls, data: object) -> LedgerBook:
        """The book :meth:`to_dict` saved (either version), read as hostile: a one-line ConfigError."""
        if isinstance(data, Mapping) and "version" not in data:
            return cls({SHARED: Ledger.from_dict(data)})
        if not isinstance(data, Mapping) or set(data) != {"version", "ledgers", "closed"}:
            raise ConfigError("privacy ledger must be an object with the keys 'version', 'ledgers' and 'closed' "
                              "(or, version 1, only 'segments')")
        version = data["version"]
        if version != VERSION or isinstance(version, bool) or not isinstance(version, int):
            raise ConfigError(f"privacy ledger version {str(version)[:20]!r} is not known (this gossipfld reads "
                              f"1 and {VERSION})")
        ledgers, closed = data["ledgers"], data["closed"]
        if not isinstance(ledgers, Mapping) or len(ledgers) > MAX_LEDGERS:
            raise ConfigError(f"privacy ledger 'ledgers' must be an object of at most {MAX_LEDGERS} ledgers")
        book = cls()
        for name, entry in ledgers.items():
            _check_name(name, "'ledgers'")
            try:
                book.ledgers[name] = Ledger.from_dict(entry)
            except ConfigError as exc:
                raise ConfigError(f"{exc} (of {name[:80]!r})") from None
        if not isinstance(closed, list) or len(closed) > MAX_LEDGERS:
            raise ConfigError(f"privacy ledger 'closed' must be a list of at most {MAX_LEDGERS} names")
        for name in closed:
            if _check_name(name, "'closed'") not in book.ledgers:
                raise ConfigError(f"privacy ledger 'closed': {name[:80]!r} has no ledger")
            book.closed.add(name)
        return book


def planned_noise(settings: PrivacySection, rows: int, batch: int) -> float:
    """The noise multiplier training runs with: the configured one, or the least that fits ``epochs`` passes
    over ``rows`` rows in the budget (ConfigError when no noise does)."""
    if settings.noise_multiplier > 0:
        return settings.noise_multiplier
    rate = min(1.0, batch / rows)
    steps = steps_for_epochs(rows, min(batch, rows), settings.epochs)
    return noise_for_budget(settings.epsilon, settings.delta, rate, steps)


@dataclass(frozen=True)
class Reservation:
    """What :meth:`PrivacyBudget.take` granted: ``steps`` steps at ``sample_rate`` on the rows of ``names``
    (none: no training), the files it found out of budget, and whether the book changed (to be saved before
    the steps run)."""

    names: tuple[str, ...]
    sample_rate: float | None
    steps: int
    closed: tuple[str, ...] = ()
    changed: bool = False


@dataclass
class PrivacyBudget:
    """The budget, its ledgers, and the mechanism training runs with now."""

    settings: PrivacySection
    book: LedgerBook
    noise_multiplier: float
    damaged: str = ""  # why the ledger could not be read: the spend is unknown, so nothing more is spent
    present: tuple[str, ...] = ()  # the sources with training rows at the last ``take``, for status

    @property
    def per_file(self) -> bool:
        return self.settings.rows == "disjoint_files"

    @property
    def ledger(self) -> Ledger:
        """The shared ledger (``privacy.rows = "shared"``)."""
        return self.book.ledger(SHARED)

    def spent(self) -> PrivacySpent:
        """What the rows that spent most have spent: the shared ledger's, or the most of any file's."""
        spent = [ledger.spent(self.settings.delta) for ledger in self.book.ledgers.values()]
        return max(spent, key=lambda s: (s.epsilon, s.steps), default=Ledger().spent(self.settings.delta))

    def allows(self, sample_rate: float, steps: int, name: str = SHARED) -> bool:
        """Whether ``steps`` more at ``sample_rate`` keep the rows of ``name`` within the budget."""
        if self.damaged:
            return False
        after = self.book.ledger(name).spent(self.settings.delta, (self.noise_multiplier, sample_rate, steps))
        return after.epsilon <= self.settings.epsilon

    @property
    def exhausted(self) -> bool:
        return bool(self.damaged) or self.spent().epsilon >= self.settings.epsilon

    def take(self, rows: Mapping[str, int], batch: int, blocks: tuple[int, ...]) -> Reservation:
        """Record the first of ``blocks`` (step counts, largest first) that the rows can pay for, training on
        ``rows`` (source name -> training rows): all of them on the shared ledger, or, per file, the files
        that can pay. A file that cannot pay even the last block at the rate of the files left is closed, and
        the rate is worked out again without it (fewer rows: a higher rate, a dearer step for the others)."""
        self.present = tuple(name for name, count in rows.items() if count > 0)
        if self.damaged or not self.present:
            return Reservation((), None, 0)
        if not self.per_file:
            rate = min(1.0, batch / sum(rows[name] for name in self.present))
            for block in blocks:
                if self.allows(rate, block):
                    self.book.record(SHARED, self.noise_multiplier, rate, block)
                    return Reservation(self.present, rate, block, changed=True)
            return Reservation((), rate, 0)
        changed = self.book.split(list(self.present))
        room = MAX_LEDGERS - len(self.book.ledgers)
        active = []
        for name in self.present:
            if name not in self.book.closed and (name in self.book.ledgers or room > 0):
                room -= name not in self.book.ledgers
                active.append(name)
        closed: list[str] = []
        while active:
            rate = min(1.0, batch / sum(rows[name] for name in active))
            for block in blocks:
                if all(self.allows(rate, block, name) for name in active):
                    for name in active:
                        self.book.record(name, self.noise_multiplier, rate, block)
                    return Reservation(tuple(active), rate, block, tuple(closed), changed=True)
            spent = [name for name in active if not self.allows(rate, blocks[-1], name)]
            self.book.closed.update(spent)
            closed += spent
            active = [name for name in active if name not in spent]
        return Reservation((), None, 0, tuple(closed), changed=changed or bool(closed))

    def files(self) -> tuple[int, int]:
        """Of the files with training rows at the last look: how many, and how many are out of budget (closed,
        or past the number of ledgers kept)."""
        out = [name for name in self.present if name in self.book.closed
               or (name not in self.book.ledgers and len(self.book.ledgers) >= MAX_LEDGERS)]
        return len(self.present), len(out)

    def as_dict(self, sample_rate: float | None, stopped: bool) -> dict[str, Any]:
        spent = self.spent()
        out: dict[str, Any] = {
            "enabled": True, "rows": self.settings.rows,
            "epsilon_spent": spent.epsilon if math.isfinite(spent.epsilon) else None,
            "epsilon_budget": self.settings.epsilon, "delta": self.settings.delta,
            "noise_multiplier": self.noise_multiplier, "clip": self.settings.clip, "steps": spent.steps,
            "sample_rate": sample_rate, "budget_spent": stopped}
        if self.damaged:
            out["state"] = "ledger unreadable: " + self.damaged
        elif not self.per_file:
            out["state"] = "budget spent: no more training on this node's rows" if stopped else "training"
        else:
            files, spent_files = self.files()
            out.update(files=files, files_in_budget=files - spent_files, files_out_of_budget=spent_files,
                       ledgers=len(self.book.ledgers))
            out["state"] = ("budget spent on every file: no more training on this node's rows until a new file "
                            "arrives" if stopped else "training")
        return out

    def guarantee(self) -> dict[str, Any]:
        """What a model trained under this budget carries in its metadata: the guarantee, not a promise. Per
        file, the guarantee is that of the file whose rows spent most."""
        spent = self.spent()
        unit = ("one row of one data file (privacy.rows = disjoint_files: the operator states that no record is "
                "in two files)" if self.per_file else "one row of the node's local data (add or remove)")
        return {"mechanism": "DP-SGD, Poisson sampling, Gaussian noise, RDP accountant", "unit": unit,
                "epsilon": spent.epsilon, "delta": self.settings.delta, "noise_multiplier": self.noise_multiplier,
                "clip": self.settings.clip, "steps": spent.steps}
