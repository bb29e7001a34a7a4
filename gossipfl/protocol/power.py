"""Whether the device may train now: on mains or above a battery level, and below a temperature.

Training is the one thing a node does that costs real power and heat; gossip and merges cost little and go on,
so a node on a low battery still learns from its peers and keeps serving predictions. The readings come from
Linux's sysfs (``/sys/class/power_supply``, ``/sys/class/thermal``), which ``gossipfld.power`` reads; this
module only parses what was read and decides. What it cannot read it does not hold against the device: a board
with no battery driver is on mains, a machine with no thermal zone is cool. Thresholds have a hysteresis
(``RESUME_MARGIN_*``), so a battery hovering at the limit does not start and stop training every check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

RESUME_MARGIN_PERCENT = 5.0  # training resumes at min_battery plus this
RESUME_MARGIN_DEGREES = 5.0  # and at max_temperature minus this
MAX_SANE_DEGREES = 200.0  # a zone reading above this (or below -40) is a broken sensor, not a hot device


@dataclass(frozen=True)
class PowerSettings:
    """``[power]`` in the config: see docs/config.md."""

    enabled: bool = True
    mains_only: bool = False  # train only on mains (or USB) power
    min_battery: float = 20.0  # percent; below it, on battery, no training
    max_temperature: float = 85.0  # degrees Celsius of the hottest thermal zone; above it, no training
    sysfs: Path = Path("/sys")  # where power_supply and thermal are read (tests point it at a fake tree)
    check_seconds: float = 10.0


@dataclass(frozen=True)
class PowerReading:
    on_mains: bool | None  # None: no power supply is described (taken as mains)
    battery: float | None  # percent of the emptiest battery; None: no battery
    temperature: float | None  # degrees Celsius of the hottest zone; None: no zone


def _number(text: str | None) -> float | None:
    try:
        value = float((text or "").strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def reading_from(supplies: dict[str, dict[str, str]], zones: dict[str, str]) -> PowerReading:
    """A reading from the attribute files of each power supply (``type``, ``online``, ``capacity``, ``status``)
    and the ``temp`` file of each thermal zone (millidegrees), as text. Unparseable entries are left out."""
    mains = [s for s in supplies.values() if s.get("type", "").strip() in ("Mains", "USB", "USB_C", "USB_PD")]
    batteries = [s for s in supplies.values() if s.get("type", "").strip() == "Battery"]
    statuses = [s.get("status", "").strip() for s in batteries]
    on_mains: bool | None = None  # unknown: a battery that states no status, or nothing described
    if any(s.get("online", "").strip() == "1" for s in mains) or any(st in ("Charging", "Full") for st in statuses):
        on_mains = True
    elif mains or "Discharging" in statuses:
        on_mains = False
    levels = [v for s in batteries if (v := _number(s.get("capacity"))) is not None and 0 <= v <= 100]
    degrees = [v / 1000 for t in zones.values() if (v := _number(t)) is not None
               and -40 <= v / 1000 <= MAX_SANE_DEGREES]
    return PowerReading(on_mains, min(levels) if levels else None, max(degrees) if degrees else None)


@dataclass
class PowerPolicy:
    settings: PowerSettings
    allowed: bool = True
    reason: str = "not checked yet"
    reading: PowerReading | None = None

    def update(self, reading: PowerReading) -> bool:
        """Take a new reading; True when it changed whether training is allowed."""
        self.reading = reading
        s = self.settings
        if not s.enabled:
            self.allowed, self.reason = True, "power checks are off"
            return False
        was = self.allowed
        on_battery = reading.on_mains is False
        temp, level = reading.temperature, reading.battery
        # Hysteresis: a device stopped by a limit must come back past it by a margin.
        battery_floor = s.min_battery + (0 if was else RESUME_MARGIN_PERCENT)
        temp_ceiling = s.max_temperature - (0 if was else RESUME_MARGIN_DEGREES)
        if temp is not None and temp > temp_ceiling:
            self.allowed = False
            self.reason = f"too hot: {temp:.1f} C, the limit is {s.max_temperature:g} C"
        elif on_battery and s.mains_only:
            self.allowed, self.reason = False, "on battery, and power.mains_only is set"
        elif on_battery and level is not None and level < battery_floor:
            self.allowed = False
            self.reason = f"on battery at {level:.0f}%, the limit is {s.min_battery:g}%"
        else:
            self.allowed = True
            self.reason = ("on mains" if reading.on_mains else f"on battery at {level:.0f}%" if on_battery and
                           level is not None else "no battery or power supply described") + (
                f", {temp:.1f} C" if temp is not None else "")
        return self.allowed != was

    def report(self) -> dict[str, object]:
        r = self.reading
        return {"enabled": self.settings.enabled, "training_allowed": self.allowed, "reason": self.reason,
                "on_mains": r.on_mains if r else None, "battery": r.battery if r else None,
                "temperature": r.temperature if r else None}
