"""How fast a node gossips and trains: at full speed while it learns, quieter step by step once it has learned.

A converged cluster that keeps gossiping at its learning pace spends a battery and a data plan on nothing:
three daemons that had long agreed kept 20-29% of a core each, and eight sent 30 kB/s each, long after their
accuracy stopped moving. So a node watches for the sign that it has stopped learning: its model, measured
once a window of gossip periods against itself a few windows before, moves less than ``tolerance`` of its
norm per window. After each such window it steps down one level: the gossip period doubles and the training
duty cycle falls fourfold, down to the configured floors. Anything that means there is something to learn
again brings it back to full speed at once: new rows, a peer whose model is far from ours (a newcomer, a
changed world) or validation accuracy that drops. A wake that found nothing to
learn (its first measured stretch at full speed moved less than ``tolerance``) goes straight back to the level
it woke from: a wake is cheap to be wrong about, so the signals that wake a node can stay sensitive.

Time is passed in, nothing here sleeps: the daemon (``gossipfld.pacing``) turns a wake into an interrupted
sleep, and the tests drive this class with made-up clocks.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

FULL, SLOWING, QUIET = "full", "slowing", "quiet"
DUTY_STEP = 4  # each level divides the training duty cycle by this, and doubles the gossip period
SPAN_WINDOWS = 3  # the model's movement is measured over this many full-speed windows (or the longer stretch
# since the last wake): over one window a node's model moves by the jitter of training between merges as much as
# by what the fleet still learns; over three, the eight nodes of bench/idle.py measured within 2% of each other
DISTANCE_FLOOR = 0.05  # a peer's model nearer than this (of our model's norm) never wakes the node
MIN_WINDOW_PERIODS = 1  # a window holds at least this many periods at the current pace


@dataclass(frozen=True)
class PaceSettings:
    """``[quiet]`` in the config: see docs/config.md."""

    enabled: bool = True
    window: int = 10  # gossip periods at full speed a level is judged over (and one period at the current pace)
    tolerance: float = 0.008  # a model that moves less than this share of its norm per window has stopped changing
    wake_distance: float = 4.0  # a peer's model this many times farther than usual wakes a quiet node
    accuracy_drop: float = 0.05  # a window's validation accuracy this far below the one it went quiet at
    max_period: float = 60.0  # the longest gossip period when quiet, seconds
    min_duty_cycle: float = 0.0005  # the smallest share of wall time spent training when quiet


@dataclass
class Pace:
    """The node's pace: a level (0 is full speed), why it is there, and what it has seen in this window."""

    settings: PaceSettings
    base_period: float
    base_duty: float
    now: float
    level: int = 0
    reason: str = "starting"
    since: float = 0.0
    wakes: int = 0
    last_move: float | None = None  # the model's movement per full-speed window, as last judged (of its norm)
    last_loss: float | None = None  # the last judged window's mean training loss
    measured_since: float = 0.0  # movement before this (the last wake or start) is not evidence
    _window_start: float = 0.0
    _losses: list[float] = field(default_factory=list)
    _accuracies: list[float] = field(default_factory=list)
    _distances: list[float] = field(default_factory=list)
    wake_kinds: dict[str, int] = field(default_factory=dict)  # wakes by kind: new_rows, far_peer, accuracy
    _usual_distance: float | None = None  # the median relative distance of peers when we went quiet
    _quiet_accuracy: float | None = None  # the window mean when we first stepped down
    _woke_from: int = 0  # the level the last wake left, until a measured window shows what the wake was worth

    def __post_init__(self) -> None:
        self.since = self._window_start = self.measured_since = self.now

    # ------------------------------------------------------------------ what the node does at this pace

    @property
    def max_level(self) -> int:
        """Steps until both floors are reached (0 when quieting is off or the floors are the base values)."""
        s = self.settings
        if not s.enabled:
            return 0
        periods = math.log2(max(s.max_period / self.base_period, 1.0))
        duties = math.log(max(self.base_duty / max(s.min_duty_cycle, 1e-9), 1.0), DUTY_STEP)
        return math.ceil(max(periods, duties) - 1e-9)

    @property
    def period(self) -> float:
        return max(min(self.base_period * 2**self.level, self.settings.max_period), self.base_period)

    @property
    def duty_cycle(self) -> float:
        """The duty cycle falls faster than the gossip period grows: a resting node's accuracy comes from its
        merges, not from training between them (bench/idle.py: at a floor of 0.001 instead of 0.01 the resting
        fleet's accuracy was the same, 0.96, and a node at the floor used 0.25% of a core instead of 1.4%)."""
        return min(max(self.base_duty / DUTY_STEP**self.level, self.settings.min_duty_cycle), self.base_duty)

    @property
    def slowdown(self) -> float:
        """How many times longer the node now waits between pushes than at full speed."""
        return self.period / self.base_period

    @property
    def base_window_seconds(self) -> float:
        return self.settings.window * self.base_period

    @property
    def window_seconds(self) -> float:
        """How long a window lasts at this pace: ``window`` full-speed periods, and at least one of today's, so
        that it holds an exchange. Not more: at three periods a window the way from full speed to the floors
        took 3.5 minutes, the CPU of a 10-minute run's last 3 minutes (bench/idle.py)."""
        return max(self.base_window_seconds, MIN_WINDOW_PERIODS * self.period)

    @property
    def span_seconds(self) -> float:
        """The least time the model's movement is measured over."""
        return SPAN_WINDOWS * self.base_window_seconds

    @property
    def state(self) -> str:
        return FULL if self.level == 0 else QUIET if self.level >= self.max_level else SLOWING

    def due(self, now: float) -> bool:
        """The window is long enough to be judged: the caller measures the model's movement and ticks. Asked
        once a gossip period, whose length jitters: a window within half a period of its length is due, or
        half the windows of a quiet node would last two of its periods (bench/idle.py: the way down took 140 s
        instead of 90)."""
        return now - self._window_start >= self.window_seconds - self.period / 2

    # ------------------------------------------------------------------ what the node sees

    def loss(self, value: float, now: float) -> None:
        if math.isfinite(value):
            self._losses.append(value)

    def accuracy(self, value: float, now: float) -> None:
        if math.isfinite(value):
            self._accuracies.append(value)

    def peer_distance(self, relative: float, now: float) -> bool:
        """A peer's model was ``relative`` (of our model's norm) from ours: True when that woke us."""
        if not math.isfinite(relative):
            return False
        self._distances.append(relative)
        usual = self._usual_distance
        if self.level > 0 and usual is not None and relative > max(self.settings.wake_distance * usual,
                                                                    DISTANCE_FLOOR):
            return self.wake(f"a peer's model is {relative / max(usual, 1e-12):.1f} times farther than usual", now,
                             "far_peer")
        return False

    def new_data(self, files: int, now: float) -> bool:
        """New or changed data files: new rows to learn from."""
        return self.wake(f"new rows ({files} new or changed data file{'s' if files != 1 else ''})", now, "new_rows")

    def wake(self, reason: str, now: float, kind: str) -> bool:
        """Back to full speed at once; True when the node was not there already. The model's movement is
        measured afresh from here: what it did while resting says nothing of what the wake brings."""
        self._start_window(now)
        self.measured_since = now
        if self.level == 0:
            return False
        self.level, self.reason, self.since, self._woke_from = 0, f"woken: {reason}", now, self.level
        self._usual_distance = self._quiet_accuracy = None
        self.wakes += 1
        self.wake_kinds[kind] = self.wake_kinds.get(kind, 0) + 1
        return True

    def tick(self, now: float, moved: float | None) -> bool:
        """Judge the window once it is long enough. ``moved``: how far the model moved per full-speed window,
        relative to its norm, over at least ``span_seconds`` since ``measured_since`` (None until there is that
        much). A model that moves less than ``tolerance`` has stopped changing: a step down. True when the level
        changed.

        Why the model's movement, not its loss: on the small, non-IID shards of bench/idle.py every node fits
        its own rows within a minute (training loss 1e-4, jumping 20-30% from window to window with each
        merge), so a rest judged on the loss came at any time from minute 2 to 7.5, while the fleet's models
        were still closing on each other (+0.7 points of accuracy from minute 5 to 10). Their movement falls
        smoothly, the same on every node: they rest together, when the fleet has stopped changing."""
        if not self.due(now):
            return False
        loss = statistics.fmean(self._losses) if self._losses else None
        accuracy = statistics.fmean(self._accuracies) if self._accuracies else None
        distances = statistics.median(self._distances) if self._distances else None
        self._start_window(now)
        if loss is not None:
            self.last_loss = loss  # shown, not judged: see above, and no wake listens to it either (a resting
            # node's window holds a few slices between merges, and its mean jumped 7-fold from one window to the
            # next at the floor; judged as a rise over two windows, it woke a node of bench/idle.py for nothing)
        if self.level > 0:
            drop = self.settings.accuracy_drop
            if accuracy is not None and self._quiet_accuracy is not None and accuracy < self._quiet_accuracy - drop:
                return self.wake(f"validation accuracy fell from {self._quiet_accuracy:.3f} to {accuracy:.3f}", now,
                                 "accuracy")
        if moved is None or not math.isfinite(moved):
            return False
        self.last_move = moved
        woke_from, self._woke_from = self._woke_from, 0  # judged once: the first measured window after a wake
        if moved >= self.settings.tolerance or self.level >= self.max_level:
            return False  # still learning, or resting as quietly as it may
        if self.level == 0:
            self._usual_distance, self._quiet_accuracy = distances, accuracy
        if woke_from > self.level + 1:
            self.level = min(woke_from, self.max_level)
            self.reason = f"the wake found nothing to learn: back to level {self.level}"
        else:
            self.level += 1
            self.reason = (f"the model moves {100 * moved:.2g}% of its norm per window of {self.settings.window} "
                           f"periods, under {100 * self.settings.tolerance:g}%")
        self.since = now
        return True

    def restart(self, now: float) -> None:
        """A fresh start at full speed from ``now``, as after a restart of the node."""
        self.level, self.since, self._woke_from, self.measured_since = 0, now, 0, now
        self._start_window(now)

    def _start_window(self, now: float) -> None:
        self._window_start = now
        self._losses.clear()
        self._accuracies.clear()
        self._distances.clear()

    def as_dict(self, now: float) -> dict[str, Any]:
        return {"state": self.state, "level": self.level, "max_level": self.max_level, "period": self.period,
                "duty_cycle": self.duty_cycle, "reason": self.reason,
                "for_seconds": round(now - self.since, 1),
                "wakes": self.wakes, "wakes_by_kind": dict(self.wake_kinds), "enabled": self.settings.enabled,
                "last_move": self.last_move, "last_loss": self.last_loss}
