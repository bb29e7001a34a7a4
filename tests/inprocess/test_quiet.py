"""A quiet node wakes when new rows arrive, and is back at full speed within two gossip periods.

Two real apps over ``MemoryNet``: node A has learned and rests at its quietest pace (a push a minute);
a new data file lands in its directory; its own rescan finds it, and the gossip loop that was asleep for a
minute pushes within two (full-speed) periods of the wake.
"""

from __future__ import annotations

import numpy as np
import trio

from gossipfl.learning.datasets import write_csv
from gossipfl.protocol.pace import FULL, QUIET

from .memnet import MemoryNet

PERIOD = 1.0


def test_a_quiet_node_returns_to_full_speed_within_two_periods_when_new_rows_arrive(make_apps, small_digits):
    a, b = make_apps(2, gossip={"period": PERIOD, "jitter": 0.0},
                     extra={"quiet": {"max_period": 60.0}, "data": {"rescan_seconds": 0.2}})
    pace = a.pacer.pace
    assert pace.max_level >= 5 and a.pacer.period == PERIOD

    async def main():
        async with trio.open_nursery() as nursery:
            net = MemoryNet(nursery)
            net.add(a), net.add(b)
            a.peers.seen(b.node_id, b.config.listen.address, b.config.listen.port, "mdns", trio.current_time())
            await trio.to_thread.run_sync(a.learner.data.refresh)  # the files it started with, as at a start
            a.pacer.begin()
            pace.level = pace.max_level  # as after windows of a loss that stopped moving
            assert pace.state == QUIET and a.pacer.period == 60.0
            nursery.start_soon(a.gossip.run)
            nursery.start_soon(a.learner.watch_data, a.config.data.rescan_seconds)
            await trio.sleep(3 * PERIOD)
            assert a.counters.values.get("exchanges_out", 0) == 0  # asleep: its next push is a minute away

            x, y = small_digits
            write_csv(a.config.data.directory / "new-rows.csv", x[:50], np.asarray(y[:50]))
            while pace.state != FULL:  # the rescan finds the file
                await trio.sleep(0.01)
            woke = trio.current_time()
            while a.counters.values.get("exchanges_out", 0) == 0:
                await trio.sleep(0.01)
            elapsed = trio.current_time() - woke
            nursery.cancel_scope.cancel()
        assert pace.reason.startswith("woken: new rows") and a.counters.values["pace.wakes"] == 1
        assert a.pacer.period == PERIOD and a.pacer.duty_cycle == a.config.training.duty_cycle
        assert elapsed < 2 * PERIOD, f"the first push came {elapsed:.2f} s after the wake"

    trio.run(main)


async def _run_until_judged(apps, windows: int, rested: bool = False) -> None:
    """Two apps training and gossiping until each pace has measured its model's movement ``windows`` times
    (or, with ``rested``, until each has stepped down, if that comes first)."""
    async with trio.open_nursery() as nursery:
        net = MemoryNet(nursery)
        for app in apps:
            net.add(app)
        a, b = apps
        a.peers.seen(b.node_id, b.config.listen.address, b.config.listen.port, "mdns", trio.current_time())
        b.peers.seen(a.node_id, a.config.listen.address, a.config.listen.port, "mdns", trio.current_time())
        for app in apps:
            await trio.to_thread.run_sync(app.learner.data.refresh)  # its rows, as at a start
            app.pacer.begin()
            nursery.start_soon(app.gossip.run)
            nursery.start_soon(app.learner.run, lambda: True)
        measured = {id(app): 0 for app in apps}
        last = {id(app): None for app in apps}
        while min(measured.values()) < windows and not (rested and all(app.pacer.pace.level for app in apps)):
            await trio.sleep(0.05)
            for app in apps:
                seen = (app.pacer.pace.last_move, app.pacer.pace.since, app.pacer.pace.level)
                if app.pacer.pace.last_move is not None and seen != last[id(app)]:
                    measured[id(app)] += 1
                    last[id(app)] = seen
        nursery.cancel_scope.cancel()


def test_nodes_whose_models_move_less_than_the_tolerance_rest_on_their_own(make_apps):
    # the real loop: the gossip loop hands the pace a copy of the trained model once a window
    apps = make_apps(2, gossip={"period": 0.1, "jitter": 0.0, "keep_alive": 0},
                     extra={"quiet": {"window": 2, "tolerance": 1.0, "max_period": 0.8}})
    trio.run(_run_until_judged, apps, 50, True)
    for app in apps:
        pace = app.pacer.pace
        assert pace.level > 0 and pace.last_move is not None and pace.last_move < 1.0
        assert "of its norm per window of 2 periods, under 100%" in pace.reason or pace.state == QUIET
        assert app.counters.values["pace.slowdowns"] >= 1


def test_nodes_whose_models_still_move_stay_at_full_speed(make_apps):
    apps = make_apps(2, gossip={"period": 0.1, "jitter": 0.0, "keep_alive": 0},
                     extra={"quiet": {"window": 2, "tolerance": 1e-6, "max_period": 0.8}})
    trio.run(_run_until_judged, apps, 3)
    for app in apps:
        pace = app.pacer.pace
        assert pace.level == 0 and pace.last_move > 1e-6
        assert "pace.slowdowns" not in app.counters.values
