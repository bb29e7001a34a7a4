"""A whole app on a fake sysfs tree (gossipfld.power): unplugged at a low battery it stops training, says why in
its status and its problems, and trains again once plugged in."""

from __future__ import annotations

import trio

from gossipfl.testing.cluster import free_port_base
from tests.unit.test_power import fake_sysfs

TIMEOUT = 30.0


async def until(predicate, what: str) -> None:
    with trio.fail_after(TIMEOUT):
        while not predicate():
            await trio.sleep(0.02)  # polls a condition; the power watch reads every 0.05 s


def test_a_low_battery_stops_training_and_mains_brings_it_back(tmp_path, make_apps):
    sysfs = fake_sysfs(tmp_path / "sys", {"AC": {"type": "Mains", "online": "1"},
                                          "BAT0": {"type": "Battery", "capacity": "15", "status": "Charging"}},
                       {"thermal_zone0": "50000"})
    (app,) = make_apps(1, base_port=free_port_base(),
                       per_node={0: {"power": {"sysfs": str(sysfs), "check_seconds": 0.05, "min_battery": 20.0}}})
    assert app.power is not None
    online = sysfs / "class" / "power_supply" / "AC" / "online"
    status = sysfs / "class" / "power_supply" / "BAT0" / "status"

    def steps() -> float:
        return app.counters.values.get("train_steps", 0)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(app.run)
            await until(lambda: steps() > 0, "training on mains")
            online.write_text("0\n")
            status.write_text("Discharging\n")
            await until(lambda: not app.power.allowed, "the unplugged battery seen")
            report = app.reporter.status()
            assert report["power"]["reason"] == "on battery at 15%, the limit is 20%"
            assert "training stopped: on battery at 15%, the limit is 20%" in report["problems"]
            await until(lambda: not app.learner.training_active, "the slice under way to end")
            stopped_at, checks = steps(), app.power.checks
            await until(lambda: app.power.checks >= checks + 20, "twenty more readings")
            assert steps() == stopped_at  # no slice while on a low battery
            assert app.counters.values.get("power.stopped") == 1
            assert app.reporter.recent()["counters"].get("power.stopped") == 1  # grown since the first snapshot
            online.write_text("1\n")
            await until(lambda: steps() > stopped_at, "training again on mains")
            assert app.counters.values.get("power.resumed") == 1
            nursery.cancel_scope.cancel()

    trio.run(main)
