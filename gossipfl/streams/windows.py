"""Readings into rows: a time series of multi-channel readings cut into windows, each window one row whose
feature names can be a model's schema.

Readings arrive one message at a time, and a message may carry one channel (``sensors/t1`` says ``21.5``) or
several (``{"temp": 21.5, "hum": 40}``). They are gathered into *steps*, one value of every channel each: a
reading joins the current step unless it names a channel the step already holds, or carries a sensor
timestamp different from the step's, and either starts a new step. A step is closed as soon as it holds every
channel, so a sensor publishing whole objects yields one step per message with no delay.

A window is ``length`` consecutive steps, and a new one starts every ``stride`` steps (stride = length:
disjoint windows; stride 1: sliding). Its features, per channel (channel-major), in the configured order:

* ``raw``: the channel's values, named ``temp_0`` .. ``temp_{length-1}``;
* ``mean``, ``std`` (population, ddof 0), ``min``, ``max``, ``rms``: one value each, named ``temp_mean`` etc.

A window with a step that lacks a channel (a sensor that missed a beat) is dropped and counted
(``dropped["missing_channel"]``), never filled in: an interpolated value would be a value no sensor measured.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gossipfl.errors import DataError
from gossipfl.learning.schema import MAX_COLUMNS, Schema
from gossipfl.streams.payload import CHANNEL_NAME, Reading

STATS = ("mean", "std", "min", "max", "rms")
FEATURES = ("raw", *STATS)
MAX_LENGTH = 4096  # steps in one window
MAX_STRIDE = 100_000


@dataclass(frozen=True)
class WindowSpec:
    """The channels (in the model's order), the window's length and stride in steps, and its features."""

    channels: tuple[str, ...]
    length: int
    stride: int
    features: tuple[str, ...] = ("raw",)

    def __post_init__(self) -> None:
        if not self.channels or len(set(self.channels)) != len(self.channels):
            raise ValueError("channels: must be one or more distinct names")
        bad = [c for c in self.channels if not CHANNEL_NAME.fullmatch(c)]
        if bad:
            raise ValueError(f"channels: {bad[0]!r} is not a channel name (letters, digits, _ . -)")
        if not 1 <= self.length <= MAX_LENGTH:
            raise ValueError(f"length: must be 1 to {MAX_LENGTH} readings, got {self.length}")
        if not 1 <= self.stride <= MAX_STRIDE:
            raise ValueError(f"stride: must be 1 to {MAX_STRIDE} readings, got {self.stride}")
        if not self.features or len(set(self.features)) != len(self.features):
            raise ValueError("features: must be one or more distinct names")
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown:
            raise ValueError(f"features: {unknown[0]!r} is not one of {', '.join(FEATURES)}")
        if self.width > MAX_COLUMNS:
            raise ValueError(f"{self.width} features a row, over the limit of {MAX_COLUMNS}")

    @property
    def width(self) -> int:
        per_channel = sum(self.length if f == "raw" else 1 for f in self.features)
        return per_channel * len(self.channels)

    def feature_names(self) -> tuple[str, ...]:
        """The row's column names, in the row's order: usable as ``Schema.features``."""
        names: list[str] = []
        for channel in self.channels:
            for feature in self.features:
                if feature == "raw":
                    names += [f"{channel}_{i}" for i in range(self.length)]
                else:
                    names.append(f"{channel}_{feature}")
        return tuple(names)

    def columns_for(self, schema: Schema) -> list[int]:
        """Where each of ``schema``'s features is in a row (a model reads its columns by name, in its own
        order); ``DataError`` naming the first feature the windows do not make."""
        index = {name: i for i, name in enumerate(self.feature_names())}
        missing = [name for name in schema.features if name not in index]
        if missing:
            raise DataError(f"the model's feature {missing[0]!r} is not made by these windows"
                            f" (they make {', '.join(list(index)[:8])}{', ...' if len(index) > 8 else ''})")
        return [index[name] for name in schema.features]

    def features_of(self, steps: Sequence[Mapping[str, float]]) -> tuple[float, ...]:
        """The row of one window of complete steps."""
        row: list[float] = []
        for channel in self.channels:
            values = [step[channel] for step in steps]
            stats = _stats(values) if any(f != "raw" for f in self.features) else {}
            for feature in self.features:
                if feature == "raw":
                    row += values
                else:
                    row.append(stats[feature])
        return tuple(row)


def _stats(values: Sequence[float]) -> dict[str, float]:
    """Mean, population std, min, max and rms of finite values, without overflow: computed on the values
    scaled by a power of two (exact) near their largest magnitude, so 1e308 squared never becomes inf."""
    n = len(values)
    top = max(abs(v) for v in values)
    scale = math.ldexp(1.0, math.frexp(top)[1] - 1) if top > 0 else 1.0  # |v| / scale < 2
    scaled = [v / scale for v in values]
    mean = math.fsum(scaled) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in scaled) / n)
    rms = math.sqrt(math.fsum(v * v for v in scaled) / n)
    return {"mean": mean * scale, "std": std * scale, "min": min(values), "max": max(values), "rms": rms * scale}


@dataclass(frozen=True)
class Window:
    """One row: ``values`` in ``WindowSpec.feature_names()`` order; ``received`` is when its last reading
    arrived (the caller's clock), ``timestamp`` the sensor's time of its last step, if it sent one."""

    values: tuple[float, ...]
    received: float
    timestamp: float | None = None


@dataclass
class _Step:
    values: dict[str, float] = field(default_factory=dict)
    received: float = 0.0
    timestamp: float | None = None


class Windower:
    """Gathers readings into steps and steps into windows. ``push`` returns the windows a reading completes;
    ``dropped`` counts windows left out, by reason."""

    def __init__(self, spec: WindowSpec) -> None:
        self.spec = spec
        self._channels = frozenset(spec.channels)
        self._step = _Step()
        self._steps: deque[_Step] = deque(maxlen=spec.length)
        self.steps = 0  # steps closed so far
        self.windows = 0  # windows made
        self.dropped: dict[str, int] = {}

    def push(self, reading: Reading) -> list[Window]:
        unknown = [c for c in reading.values if c not in self._channels]
        if unknown:
            raise ValueError(f"reading names channel {unknown[0]!r}, not one of the window's channels")
        made: list[Window] = []
        step = self._step
        if step.values and (not step.values.keys().isdisjoint(reading.values) or (
                reading.timestamp is not None and step.timestamp is not None
                and reading.timestamp != step.timestamp)):
            made += self._close()
            step = self._step
        step.received = max(step.received, reading.received) if step.values else reading.received
        step.values.update(reading.values)
        if reading.timestamp is not None:
            step.timestamp = reading.timestamp
        if len(step.values) == len(self._channels):
            made += self._close()
        return made

    def flush(self) -> list[Window]:
        """Close the step being gathered (at the end of a stream), incomplete or not."""
        return self._close() if self._step.values else []

    def _close(self) -> list[Window]:
        self._steps.append(self._step)
        self._step = _Step()
        self.steps += 1
        spec = self.spec
        if self.steps < spec.length or (self.steps - spec.length) % spec.stride:
            return []
        if any(len(s.values) != len(self._channels) for s in self._steps):
            self.dropped["missing_channel"] = self.dropped.get("missing_channel", 0) + 1
            return []
        self.windows += 1
        last = self._steps[-1]
        return [Window(spec.features_of([s.values for s in self._steps]), last.received, last.timestamp)]
