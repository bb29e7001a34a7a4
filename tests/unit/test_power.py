"""The power policy (gossipfl/protocol/power.py) and the sysfs reader (gossipfld.power) on fake sysfs trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from gossipfl.protocol.power import PowerPolicy, PowerReading, PowerSettings, reading_from
from gossipfld.power import read_sysfs


def fake_sysfs(root: Path, supplies: dict[str, dict[str, str]], zones: dict[str, str]) -> Path:
    for name, files in supplies.items():
        for key, text in files.items():
            path = root / "class" / "power_supply" / name / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")
    for name, text in zones.items():
        path = root / "class" / "thermal" / name / "temp"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return root


def test_a_laptop_on_battery_read_from_sysfs(tmp_path):
    root = fake_sysfs(tmp_path, {"AC": {"type": "Mains", "online": "0"},
                                 "BAT0": {"type": "Battery", "capacity": "57", "status": "Discharging"},
                                 "BAT1": {"type": "Battery", "capacity": "12", "status": "Discharging"}},
                      {"thermal_zone0": "45000", "thermal_zone1": "61500", "cooling_device0": "1"})
    (tmp_path / "class" / "thermal" / "thermal_zone2").mkdir()  # a zone without a reading is left out
    assert read_sysfs(root) == PowerReading(on_mains=False, battery=12.0, temperature=61.5)


def test_nothing_described_is_mains_and_cool(tmp_path):
    assert read_sysfs(tmp_path / "missing") == PowerReading(None, None, None)
    policy = PowerPolicy(PowerSettings(mains_only=True))
    assert not policy.update(PowerReading(None, None, None)) and policy.allowed


@pytest.mark.parametrize(("supplies", "zones", "expected"), [
    ({"ac": {"type": "Mains", "online": "1"}}, {}, PowerReading(True, None, None)),
    ({"b": {"type": "Battery", "capacity": "80", "status": "Charging"}}, {}, PowerReading(True, 80.0, None)),
    ({"b": {"type": "Battery", "capacity": "nan", "status": "Discharging"}}, {}, PowerReading(False, None, None)),
    ({"b": {"type": "Battery", "capacity": "250"}}, {}, PowerReading(None, None, None)),  # out of range: left out
    ({}, {"z": "999999999"}, PowerReading(None, None, None)),  # a broken sensor, not a hot device
    ({}, {"z": "garbage", "y": "30000"}, PowerReading(None, None, 30.0)),
])
def test_readings_parsed(supplies, zones, expected):
    assert reading_from(supplies, zones) == expected


def test_battery_and_heat_stop_training_with_hysteresis():
    policy = PowerPolicy(PowerSettings(min_battery=20, max_temperature=80))
    assert not policy.update(PowerReading(False, 50, 40)) and policy.allowed
    assert policy.update(PowerReading(False, 19, 40)) and not policy.allowed
    assert policy.reason == "on battery at 19%, the limit is 20%"
    assert not policy.update(PowerReading(False, 22, 40)) and not policy.allowed  # not yet past the margin
    assert policy.update(PowerReading(False, 25, 40)) and policy.allowed
    assert policy.update(PowerReading(True, 25, 81)) and not policy.allowed and policy.reason.startswith("too hot")
    assert not policy.update(PowerReading(True, 25, 77)) and not policy.allowed
    assert policy.update(PowerReading(True, 25, 74.9)) and policy.allowed
    assert policy.report()["temperature"] == 74.9


def test_mains_only_and_off():
    policy = PowerPolicy(PowerSettings(mains_only=True))
    assert policy.update(PowerReading(False, 100, None)) and not policy.allowed
    off = PowerPolicy(PowerSettings(enabled=False))
    off.update(PowerReading(False, 1, 150))
    assert off.allowed and off.reason == "power checks are off"
