"""The device's power and temperature, read from sysfs every ``power.check_seconds``, and the policy's verdict
on training (``gossipfl.protocol.power``). The learner asks ``allowed`` before each slice and each round.

Every file is read with a small size cap and without following a link out of the tree; anything unreadable is
left out of the reading (the policy does not hold a missing file against the device). A change of verdict is
one log line and a counter (``power.stopped``, ``power.resumed``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import trio

from gossipfl.metrics import Counters
from gossipfl.protocol.power import PowerPolicy, PowerReading, PowerSettings, reading_from

from .logs import fields

log = logging.getLogger("gossipfld.power")

MAX_ENTRIES = 64  # supplies or zones read; a stranger tree is not walked further
MAX_BYTES = 64
SUPPLY_FILES = ("type", "online", "capacity", "status")


def _read(path: Path) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        return os.read(fd, MAX_BYTES).decode("ascii", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _entries(directory: Path, prefix: str = "") -> list[Path]:
    try:
        names = sorted(n for n in os.listdir(directory) if n.startswith(prefix))
    except OSError:
        return []
    return [directory / n for n in names[:MAX_ENTRIES]]


def read_sysfs(root: Path) -> PowerReading:
    """What ``root``/class/power_supply and ``root``/class/thermal say now (blocking: run it in a thread)."""
    supplies = {}
    for entry in _entries(root / "class" / "power_supply"):
        values = {name: text for name in SUPPLY_FILES if (text := _read(entry / name)) is not None}
        if values:
            supplies[entry.name] = values
    zones = {entry.name: text for entry in _entries(root / "class" / "thermal", "thermal_zone")
             if (text := _read(entry / "temp")) is not None}
    return reading_from(supplies, zones)


class PowerWatch:
    def __init__(self, settings: PowerSettings, counters: Counters) -> None:
        self.settings = settings
        self.counters = counters
        self.policy = PowerPolicy(settings)
        self.checks = 0

    @property
    def allowed(self) -> bool:
        return self.policy.allowed

    async def check(self) -> None:
        reading = await trio.to_thread.run_sync(read_sysfs, self.settings.sysfs)
        self.checks += 1
        if self.policy.update(reading):
            if self.policy.allowed:
                self.counters.add("power.resumed")
                log.info("training resumes", extra=fields(reason=self.policy.reason))
            else:
                self.counters.add("power.stopped")
                log.warning("training stops", extra=fields(reason=self.policy.reason))

    async def run(self) -> None:
        while True:
            await self.check()
            await trio.sleep(self.settings.check_seconds)

    def report(self) -> dict[str, object]:
        return self.policy.report()
