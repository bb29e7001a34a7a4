"""The node's pace in the event loop: sleeps that stretch while the node is quiet and end when it wakes.

``gossipfl.protocol.pace.Pace`` decides the level; this wraps it with the clock and one ``trio.Event``, so
that a wake (new rows, a far peer, a drop in accuracy) cuts short the long sleep of a quiet gossip loop and
of a quiet trainer, and the node is back at full speed within a period, not at the end of a minute's nap.
"""

from __future__ import annotations

import logging
from typing import Any

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

    def tick(self) -> None:
        before = self.pace.state
        if self.pace.tick(trio.current_time()):
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
