"""A node's privacy budget: what its rows have paid for every private training step, and when to stop.

Rényi DP adds up across steps whatever their sample rate and noise, so the ledger keeps one segment per
(noise multiplier, sample rate) the node trained at, with its step count: rows come and go (the sample
rate ``batch / rows`` moves with them) and an operator may change the noise between runs, and each change
starts a segment. Epsilon is converted from the summed RDP at the configured delta.

The budget's rule is the safe one: every row of the node's data shares one ledger. A new file may hold the
same people as an old one (a re-export, a sensor's overlapping window), so new rows never bring a fresh
budget; once the budget is spent the node stops training on its rows for good, and keeps gossiping,
merging and predicting, which cost its rows nothing more (post-processing). Per-file budgets for data an
operator knows to be disjoint are not built: docs/privacy.md says what they would need.

Sans-I/O: the daemon saves :meth:`Ledger.to_dict` in a file of its own and reads it back through
:meth:`Ledger.from_dict`, which treats it as hostile.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
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


class Ledger:
    """The RDP a node's rows have spent, by (noise multiplier, sample rate) segment."""

    def __init__(self, segments: list[tuple[float, float, int]] | None = None) -> None:
        self._segments: dict[tuple[float, float], int] = {}
        for noise, rate, steps in segments or []:
            self.record(noise, rate, steps)
        self._rdp_cache: dict[tuple[float, float], np.ndarray] = {}

    @property
    def steps(self) -> int:
        return sum(self._segments.values())

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """``steps`` private steps at this noise and sample rate."""
        key = (_check_noise(noise_multiplier), _check_sample_rate(sample_rate))
        more = _count("steps", steps)
        if more:
            self._segments[key] = self._segments.get(key, 0) + more
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
                if key not in self._rdp_cache:
                    self._rdp_cache[key] = rdp_subsampled_gaussian(key[1], key[0], ORDERS)
                total = total + self._rdp_cache[key] * float(steps)
        return total

    def spent(self, delta: float, extra: tuple[float, float, int] | None = None) -> PrivacySpent:
        """Epsilon at ``delta`` after the steps recorded (and ``extra``, a (noise, rate, steps) not yet taken)."""
        steps = self.steps + (extra[2] if extra else 0)
        if steps == 0:
            return PrivacySpent(epsilon=0.0, delta=delta, steps=0, order=float(ORDERS[0]))
        eps, order = _epsilon_and_order(self.rdp(extra), np.asarray(ORDERS, dtype=np.float64), delta)
        return PrivacySpent(epsilon=eps, delta=delta, steps=steps, order=order)

    def to_dict(self) -> dict[str, Any]:
        return {"segments": [[noise, rate, steps] for (noise, rate), steps in sorted(self._segments.items())]}

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


def planned_noise(settings: PrivacySection, rows: int, batch: int) -> float:
    """The noise multiplier training runs with: the configured one, or the least that fits ``epochs`` passes
    over ``rows`` rows in the budget (ConfigError when no noise does)."""
    if settings.noise_multiplier > 0:
        return settings.noise_multiplier
    rate = min(1.0, batch / rows)
    steps = steps_for_epochs(rows, min(batch, rows), settings.epochs)
    return noise_for_budget(settings.epsilon, settings.delta, rate, steps)


@dataclass
class PrivacyBudget:
    """The budget, its ledger, and the mechanism training runs with now."""

    settings: PrivacySection
    ledger: Ledger
    noise_multiplier: float
    damaged: str = ""  # why the ledger could not be read: the spend is unknown, so nothing more is spent

    def spent(self) -> PrivacySpent:
        return self.ledger.spent(self.settings.delta)

    def allows(self, sample_rate: float, steps: int) -> bool:
        """Whether ``steps`` more at ``sample_rate`` keep the rows within the budget."""
        if self.damaged:
            return False
        after = self.ledger.spent(self.settings.delta, (self.noise_multiplier, sample_rate, steps))
        return after.epsilon <= self.settings.epsilon

    @property
    def exhausted(self) -> bool:
        return bool(self.damaged) or self.spent().epsilon >= self.settings.epsilon

    def as_dict(self, sample_rate: float | None, stopped: bool) -> dict[str, Any]:
        spent = self.spent()
        return {"enabled": True, "epsilon_spent": spent.epsilon if math.isfinite(spent.epsilon) else None,
                "epsilon_budget": self.settings.epsilon, "delta": self.settings.delta,
                "noise_multiplier": self.noise_multiplier, "clip": self.settings.clip, "steps": spent.steps,
                "sample_rate": sample_rate, "budget_spent": stopped,
                "state": ("ledger unreadable: " + self.damaged) if self.damaged
                else "budget spent: no more training on this node's rows" if stopped else "training"}

    def guarantee(self) -> dict[str, Any]:
        """What a model trained under this budget carries in its metadata: the guarantee, not a promise."""
        spent = self.spent()
        return {"mechanism": "DP-SGD, Poisson sampling, Gaussian noise, RDP accountant",
                "unit": "one row of the node's local data (add or remove)", "epsilon": spent.epsilon,
                "delta": self.settings.delta, "noise_multiplier": self.noise_multiplier,
                "clip": self.settings.clip, "steps": spent.steps}
