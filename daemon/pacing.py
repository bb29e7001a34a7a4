"""The node's pace in the event loop: sleeps that stretch while the node is quiet and end when it wakes.

``gossipfl.protocol.pace.Pace`` decides the level; this wraps it with the clock and one ``trio.Event``, so
that a wake (new rows, a far peer, a drop in accuracy) cuts short the long sleep of a quiet gossip loop and
of a quiet trainer, and the node is back at full speed within a period, not at the end of a minute's nap.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import numpy as np
import trio

from gossipfl.metrics import Counters
from gossipfl.protocol.pace import Pace

from .logs import fields

log = logging.getLogger("gossipfld.pace")


class Pacer:
    def __init__(self, pace: Pace, counters: Counters) -> None:
        self.pace = pace
        self.counters = counters
        self._woken = trio.Event()
        self._trail: deque[tuple[float, np.ndarray]] = deque()  # (time, params) at each judged window

    def begin(self) -> None:
        """Start the first window on the event loop's clock (the pace was made before the loop ran)."""
        self.pace.restart(trio.current_time())

    @property
    def period(self) -> float:
        return self.pace.period

    @property
    def duty_cycle(self) -> float:
        return self.pace.duty_cycle

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if the node wakes meanwhile."""
        woken = self._woken
        with trio.move_on_after(seconds):
            await woken.wait()

    def due(self) -> bool:
        return self.pace.due(trio.current_time())

    def tick(self, params: np.ndarray) -> None:
        """Judge the window with ``params``, a copy of the model now: how far it moved since the newest snapshot
        at least ``span_seconds`` old (and no older than the last wake), per full-speed window."""
        now, pace = trio.current_time(), self.pace
        trail = self._trail
        while trail and trail[0][0] < pace.measured_since:
            trail.popleft()
        span = pace.span_seconds - pace.period / 2  # windows end within half a period of their length
        while len(trail) > 1 and now - trail[1][0] >= span:
            trail.popleft()  # the newest snapshot old enough is kept, older ones are not needed
        moved = None
        if trail and now - trail[0][0] >= span:
            then, old = trail[0]
            norm = float(np.linalg.norm(params))
            if old.shape == params.shape and norm > 0:
                moved = float(np.linalg.norm(params - old)) / norm * pace.base_window_seconds / (now - then)
        trail.append((now, params))
        before = pace.state
        if pace.tick(now, moved):
            self._changed(before)

    def loss(self, value: float) -> None:
        self.pace.loss(value, trio.current_time())

    def peer_distance(self, relative: float) -> None:
        self._woke_if(self.pace.peer_distance(relative, trio.current_time()))

    def accuracy(self, value: float) -> None:
        self.pace.accuracy(value, trio.current_time())

    def new_data(self, files: int) -> None:
        self._woke_if(self.pace.new_data(files, trio.current_time()))

    def _woke_if(self, woke: bool) -> None:
        if woke:
            self.counters.add("pace.wakes")  # by kind in status: pace.wakes_by_kind
            log.info("back to full speed", extra=fields(reason=self.pace.reason))
            self._woken.set()
            self._woken = trio.Event()

    def _changed(self, before: str) -> None:
        p = self.pace
        if p.level == 0:
            self._woke_if(True)
            return
        self.counters.add("pace.slowdowns")
        log.log(logging.INFO if p.state != before else logging.DEBUG, "slowing down",
                extra=fields(level=p.level, period=round(p.period, 2), duty_cycle=round(p.duty_cycle, 4),
                             reason=p.reason))

    def report(self) -> dict[str, Any]:
        return self.pace.as_dict(trio.current_time())
