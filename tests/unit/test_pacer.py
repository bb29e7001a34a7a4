"""The daemon's pacer measures how far the model moved, per full-speed window, from its own snapshots.

Driven on trio's ``MockClock``: the pace's windows are seconds of the event loop's clock, and the model is a
vector that moves by a known share of its norm each window.
"""

from __future__ import annotations

import numpy as np
import pytest
import trio
import trio.testing

from gossipfl.metrics import Counters
from gossipfl.protocol.pace import FULL, Pace, PaceSettings
from gossipfld.pacing import Pacer

PERIOD, WINDOW = 1.0, 4  # 4 s windows at full speed; the movement is measured over 3 of them (12 s)


def _pacer(tolerance: float = 0.01) -> Pacer:
    settings = PaceSettings(window=WINDOW, tolerance=tolerance, max_period=16.0, min_duty_cycle=0.02)
    return Pacer(Pace(settings, PERIOD, 0.5, now=0.0), Counters())


async def _judge_windows(pacer: Pacer, params: np.ndarray, step: np.ndarray, windows: int) -> np.ndarray:
    """``windows`` judged windows, the model moving by ``step`` a second meanwhile."""
    for _ in range(windows):
        while not pacer.due():
            await trio.sleep(PERIOD)
            params = params + step * PERIOD
        pacer.tick(params.copy())
    return params


def _run(main) -> None:
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.parametrize("per_window", [0.002, 0.03])
def test_the_movement_is_measured_over_three_windows_per_full_speed_window(per_window):
    pacer = _pacer(tolerance=0.01)
    direction = np.zeros(100, np.float32)
    direction[0] = 1.0

    async def main():
        pacer.begin()
        params = np.full(100, 1.0, np.float32)  # norm 10
        step = direction * (per_window * 10.0 / (WINDOW * PERIOD))  # per second, of a norm of about 10
        params = await _judge_windows(pacer, params, step, 3)
        assert pacer.pace.last_move is None  # 12 s of snapshots are needed: not yet
        await _judge_windows(pacer, params, step, 1)
        assert pacer.pace.last_move == pytest.approx(per_window, rel=0.05)

    _run(main)
    assert (pacer.pace.state == FULL) == (per_window > 0.01)


def test_after_a_wake_the_movement_while_resting_is_not_counted():
    pacer = _pacer(tolerance=0.01)

    async def main():
        pacer.begin()
        params = np.full(100, 1.0, np.float32)
        still = np.zeros(100, np.float32)
        params = await _judge_windows(pacer, params, still, 6)
        assert pacer.pace.level > 0
        pacer.new_data(1)
        assert pacer.pace.level == 0 and pacer.period == PERIOD
        moves = pacer.pace.last_move
        await _judge_windows(pacer, params, still, 2)  # 8 s since the wake: the movement is not yet measured
        assert pacer.pace.level == 0 and pacer.pace.last_move == moves
        await _judge_windows(pacer, params, still, 1)  # 12 s: the model did not move, the wake taught nothing
        assert pacer.pace.level > 0 and "the wake found nothing to learn" in pacer.pace.reason
        assert pacer.counters.values["pace.wakes"] == 1

    _run(main)


def test_a_model_whose_size_changed_is_not_compared_with_its_old_self():
    pacer = _pacer()

    async def main():
        pacer.begin()
        await _judge_windows(pacer, np.ones(10, np.float32), np.zeros(10, np.float32), 3)
        await _judge_windows(pacer, np.ones(12, np.float32), np.zeros(12, np.float32), 1)
        assert pacer.pace.last_move is None and pacer.pace.level == 0

    _run(main)
