"""gossipfl.streams alone: payloads (hostile ones refused by reason), windows (exact features on a known series,
incomplete windows dropped and counted), the row buffer (bounds by count and age, dump/restore, damaged dumps
refused, sequence numbers that never repeat), and the settings' checks."""

from __future__ import annotations

import dataclasses
import math
import struct
from pathlib import Path

import pytest

from gossipfl.errors import ConfigError, DataError
from gossipfl.learning.schema import Schema
from gossipfl.streams.buffer import RowBuffer
from gossipfl.streams.homeassistant import Discovery
from gossipfl.streams.payload import REASONS, PayloadError, Reading, TopicMap, parse_message, topic_matches
from gossipfl.streams.settings import StreamSettings, split_topic
from gossipfl.streams.windows import Windower, WindowSpec

TOPICS = TopicMap((("plant/+/temp", "temp"), ("plant/+/hum", "hum"), ("plant/all", None)), ("temp", "hum"))


def parse(topic: str, payload: bytes | str, received: float = 100.0):
    return parse_message(topic, payload.encode() if isinstance(payload, str) else payload, received, TOPICS)


# ---------------------------------------------------------------- payloads


@pytest.mark.parametrize(("topic", "payload", "values", "timestamp"), [
    ("plant/a/temp", "21.5", {"temp": 21.5}, None),
    ("plant/a/temp", " -3e2\n", {"temp": -300.0}, None),
    ("plant/a/hum", "40", {"hum": 40.0}, None),
    ("plant/all", '{"temp": 21.5, "hum": 40}', {"temp": 21.5, "hum": 40.0}, None),
    ("plant/all", '{"temp": 1, "ts": 1700000000.25}', {"temp": 1.0}, 1700000000.25),
    ("plant/b/temp", '{"hum": 2}', {"hum": 2.0}, None),  # an object names its channels on any topic
])
def test_payloads_that_make_readings(topic, payload, values, timestamp):
    reading = parse(topic, payload)
    assert dict(reading.values) == values
    assert reading.timestamp == timestamp
    assert reading.received == 100.0
    assert reading.topic == topic


@pytest.mark.parametrize(("topic", "payload", "reason"), [
    ("elsewhere/temp", "1", "unknown_topic"),
    ("plant/a/b/temp", "1", "unknown_topic"),  # + is one level
    ("plant/a/temp", "1" * 5000, "too_large"),
    ("plant/a/temp", b"\xff\xfe", "not_utf8"),
    ("plant/all", "{temp: 1}", "not_json"),
    ("plant/all", "[1, 2]", "not_json"),
    ("plant/all", '{"temp": {"x": {"y": 1}}}', "too_deep"),
    ("plant/all", "[" * 2000 + "]" * 2000, "too_deep"),
    ("plant/all", '{"temp": 1, "temp": 2}', "duplicate_key"),
    ("plant/all", '{"temp": "21.5"}', "not_a_number"),
    ("plant/all", '{"temp": true}', "not_a_number"),
    ("plant/all", '{"temp": null}', "not_a_number"),
    ("plant/all", '{"temp": [1]}', "not_a_number"),
    ("plant/all", '{"temp": 1' + "0" * 100 + "}", "not_a_number"),
    ("plant/a/temp", "hot", "not_a_number"),
    ("plant/a/temp", "1_000", "not_a_number"),  # float() would take it
    ("plant/a/temp", "", "not_a_number"),
    ("plant/a/temp", "true", "not_a_number"),
    ("plant/a/temp", "nan", "not_finite"),
    ("plant/a/temp", "-Infinity", "not_finite"),
    ("plant/a/temp", "1e999", "not_finite"),
    ("plant/all", '{"temp": NaN}', "not_finite"),
    ("plant/all", '{"temp": 1e400}', "not_finite"),
    ("plant/all", '{"pressure": 1}', "unknown_channel"),
    ("plant/all", "21.5", "no_channel"),
    ("plant/all", '{"ts": 5}', "no_channel"),
    ("plant/all", "{}", "no_channel"),
    ("plant/all", '{"temp": 1, "ts": 1.7e12}', "bad_timestamp"),
    ("plant/all", '{"temp": 1, "ts": "today"}', "bad_timestamp"),
    ("plant/all", '{"temp": 1, "ts": -1}', "bad_timestamp"),
])
def test_hostile_payloads_refused_by_reason(topic, payload, reason):
    with pytest.raises(PayloadError) as caught:
        parse(topic, payload)
    assert caught.value.reason == reason
    assert reason in REASONS
    assert "\n" not in str(caught.value) and str(caught.value).startswith(f"{reason}: ")


def test_too_many_values():
    many = TopicMap((("t", None),), tuple(f"c{i}" for i in range(100)), max_values=8)
    with pytest.raises(PayloadError) as caught:
        parse_message("t", ("{" + ",".join(f'"c{i}": {i}' for i in range(9)) + "}").encode(), 0.0, many)
    assert caught.value.reason == "too_many_values"


@pytest.mark.parametrize(("topic_filter", "topic", "matches"), [
    ("a/b", "a/b", True), ("a/+", "a/b", True), ("a/+", "a/b/c", False), ("a/#", "a", True),
    ("a/#", "a/b/c", True), ("#", "a/b", True), ("#", "$SYS/x", False), ("+/x", "$SYS/x", False),
    ("a/b", "a/b/", False), ("a/+/c", "a//c", True),
])
def test_topic_matching(topic_filter, topic, matches):
    assert topic_matches(topic_filter, topic) is matches


# ---------------------------------------------------------------- windows


def step(temp: float | None, hum: float | None, received: float, ts: float | None = None) -> Reading:
    values = {k: v for k, v in (("temp", temp), ("hum", hum)) if v is not None}
    return Reading(values, received, ts)


def run(windower: Windower, readings: list[Reading]):
    return [w for r in readings for w in windower.push(r)]


def test_raw_windows_channel_major_with_stride():
    spec = WindowSpec(("temp", "hum"), length=3, stride=2)
    assert spec.feature_names() == ("temp_0", "temp_1", "temp_2", "hum_0", "hum_1", "hum_2")
    windows = run(Windower(spec), [step(i, 10 * i, received=i) for i in range(7)])
    assert [w.values for w in windows] == [
        (0, 1, 2, 0, 10, 20), (2, 3, 4, 20, 30, 40), (4, 5, 6, 40, 50, 60)]
    assert [w.received for w in windows] == [2, 4, 6]


def test_statistics_exact_on_a_known_series():
    spec = WindowSpec(("temp",), length=4, stride=4, features=("mean", "std", "min", "max", "rms"))
    assert spec.feature_names() == ("temp_mean", "temp_std", "temp_min", "temp_max", "temp_rms")
    (window,) = run(Windower(spec), [Reading({"temp": v}, 0.0) for v in (1.0, 3.0, 5.0, 7.0)])
    # mean 4; deviations -3 -1 1 3 -> variance 5; squares 1 9 25 49 -> mean 21
    assert window.values == (4.0, math.sqrt(5.0), 1.0, 7.0, math.sqrt(21.0))


def test_statistics_do_not_overflow():
    spec = WindowSpec(("temp",), length=2, stride=2, features=("mean", "std", "rms"))
    (window,) = run(Windower(spec), [Reading({"temp": v}, 0.0) for v in (1e308, -1e308)])
    assert window.values == (0.0, 1e308, 1e308)


def test_raw_and_statistics_together():
    spec = WindowSpec(("temp", "hum"), length=2, stride=2, features=("raw", "max"))
    assert spec.feature_names() == ("temp_0", "temp_1", "temp_max", "hum_0", "hum_1", "hum_max")
    (window,) = run(Windower(spec), [step(1, 5, 0), step(2, 4, 1)])
    assert window.values == (1, 2, 2, 5, 4, 5)


def test_single_channel_messages_gather_into_steps():
    spec = WindowSpec(("temp", "hum"), length=2, stride=2)
    readings = [Reading({"temp": 1.0}, 0), Reading({"hum": 10.0}, 1), Reading({"hum": 20.0}, 2),
                Reading({"temp": 2.0}, 3)]
    (window,) = run(Windower(spec), readings)
    assert window.values == (1, 2, 10, 20)
    assert window.received == 3


def test_window_with_a_missing_channel_is_dropped_and_counted():
    spec = WindowSpec(("temp", "hum"), length=2, stride=2)
    windower = Windower(spec)
    # The second step lacks hum: the next temp starts a new step, and the window holding it is dropped.
    readings = [step(1, 10, 0), Reading({"temp": 2.0}, 1), step(3, 30, 2), step(4, 40, 3), step(5, 50, 4)]
    windows = run(windower, readings)
    assert [w.values for w in windows] == [(3, 4, 30, 40)]
    assert windower.dropped == {"missing_channel": 1}
    assert windower.steps == 5 and windower.windows == 1


def test_a_new_sensor_timestamp_starts_a_new_step():
    spec = WindowSpec(("temp", "hum"), length=1, stride=1)
    windower = Windower(spec)
    assert run(windower, [Reading({"temp": 1.0}, 0, timestamp=5.0), Reading({"hum": 2.0}, 0, timestamp=6.0),
                          Reading({"temp": 3.0}, 0, timestamp=6.0)])[0].values == (3.0, 2.0)
    assert windower.dropped == {"missing_channel": 1}


def test_window_names_fit_a_models_schema():
    spec = WindowSpec(("temp", "hum"), length=2, stride=1, features=("mean", "max"))
    schema = Schema(features=("hum_max", "temp_mean"), label="state")
    assert spec.columns_for(schema) == [3, 0]
    with pytest.raises(DataError, match="'temp_rms'"):
        spec.columns_for(Schema(features=("temp_rms",)))


@pytest.mark.parametrize("change", [{"length": 0}, {"stride": 0}, {"features": ("median",)}, {"channels": ()},
                                    {"channels": ("a", "a")}, {"channels": ("a=b",)}, {"features": ()}])
def test_window_spec_refuses(change):
    with pytest.raises(ValueError):
        WindowSpec(**{"channels": ("temp",), "length": 2, "stride": 1, **change})


# ---------------------------------------------------------------- the row buffer


def test_buffer_bounded_by_count():
    buffer = RowBuffer(width=2, max_rows=3, max_age=1000)
    for i in range(5):
        buffer.add((i, -i), now=float(i))
    assert [r.seq for r in buffer.rows()] == [2, 3, 4]
    assert buffer.dropped == {"count": 2}
    assert buffer.first_seq == 2 and buffer.next_seq == 5


def test_buffer_bounded_by_age():
    buffer = RowBuffer(width=1, max_rows=100, max_age=10)
    for t in (0.0, 5.0, 9.0, 16.0):
        buffer.add((t,), now=t)
    assert [r.time for r in buffer.rows()] == [9.0, 16.0]  # 0 and 5 are older than 10 s at 16
    assert buffer.expire(now=100.0) == 2
    assert len(buffer) == 0 and buffer.dropped == {"age": 4}
    assert buffer.next_seq == 4 and buffer.first_seq == 4


def test_buffer_after_resumes_without_repeats():
    buffer = RowBuffer(width=1, max_rows=10, max_age=1000)
    for i in range(6):
        buffer.add((i,), now=0.0)
    assert [r.seq for r in buffer.after(-1)] == [0, 1, 2, 3, 4, 5]
    assert [r.seq for r in buffer.after(3)] == [4, 5]
    assert [r.seq for r in buffer.after(2, limit=2)] == [3, 4]
    assert buffer.after(5) == [] and buffer.after(99) == []


def test_buffer_times_never_go_back():
    buffer = RowBuffer(width=1, max_rows=10, max_age=1000)
    buffer.add((1,), now=50.0)
    assert buffer.add((2,), now=40.0).time == 50.0  # the wall clock stepped back


def test_buffer_refuses_bad_rows():
    buffer = RowBuffer(width=2, max_rows=10, max_age=1000)
    with pytest.raises(ValueError):
        buffer.add((1.0,), now=0.0)
    with pytest.raises(ValueError):
        buffer.add((1.0, math.nan), now=0.0)


def test_dump_restore_round_trip_and_sequence_continues():
    buffer = RowBuffer(width=3, max_rows=4, max_age=100)
    for i in range(6):
        buffer.add((i, i + 0.5, -i), now=1000.0 + i)
    restored = RowBuffer.restore(buffer.dump(), width=3, max_rows=4, max_age=100, now=1006.0)
    assert restored.rows() == buffer.rows()
    assert restored.next_seq == 6
    seen = {r.seq for r in restored.rows()}
    for i in range(3):
        row = restored.add((9, 9, 9), now=1010.0 + i)
        assert row.seq not in seen
        seen.add(row.seq)
    assert [r.seq for r in restored.after(5)] == [6, 7, 8]
    # an empty buffer still carries its sequence across a restore
    empty = RowBuffer.restore(RowBuffer.restore(restored.dump(), width=3, max_rows=4, max_age=100,
                                                now=1e6).dump(), width=3, max_rows=4, max_age=100, now=1e6)
    assert len(empty) == 0 and empty.next_seq == 9 and empty.add((0, 0, 0), now=1e6).seq == 9


def test_restore_applies_the_current_bounds():
    buffer = RowBuffer(width=1, max_rows=10, max_age=1000)
    for i in range(10):
        buffer.add((i,), now=float(i))
    smaller = RowBuffer.restore(buffer.dump(), width=1, max_rows=4, max_age=1000, now=9.0)
    assert [r.seq for r in smaller.rows()] == [6, 7, 8, 9] and smaller.dropped == {"count": 6}
    aged = RowBuffer.restore(buffer.dump(), width=1, max_rows=10, max_age=3, now=10.0)
    assert [r.seq for r in aged.rows()] == [7, 8, 9] and aged.dropped == {"age": 7}


def _dump() -> bytes:
    buffer = RowBuffer(width=2, max_rows=10, max_age=1000)
    for i in range(3):
        buffer.add((i, i), now=float(i))
    return buffer.dump()


def _with_crc(body: bytes) -> bytes:
    import zlib
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: d[:-1], "checksum|short"),
    (lambda d: d[:10], "too short"),
    (lambda d: b"", "too short"),
    (lambda d: d[:20] + bytes([d[20] ^ 1]) + d[21:], "checksum"),
    (lambda d: d + b"\0", "checksum"),
    (lambda d: _with_crc(b"NOTROWS" + d[7:-4]), "magic"),
    (lambda d: _with_crc(d[:7] + b"\x02" + d[8:-4]), "version 2"),
    (lambda d: _with_crc(d[:-4] + b"\0" * 24), "header says"),
    (lambda d: _with_crc(d[:12] + struct.pack("<I", 4) + d[16:-4]), "header says"),
    (lambda d: _with_crc(d[:32] + struct.pack("<d", math.nan) + d[40:-4]), "not finite"),
    (lambda d: _with_crc(d[:-28] + struct.pack("<d", -5.0) + d[-20:-4]), "older than"),
    (lambda d: _with_crc(d[:16] + struct.pack("<Q", 2**63 - 1) + d[24:-4]), "out of range"),
])
def test_restore_refuses_damaged_bytes(damage, message):
    data = damage(_dump())
    with pytest.raises(DataError, match=message):
        RowBuffer.restore(data, width=2, max_rows=10, max_age=1000, now=3.0)


def test_restore_refuses_another_width():
    with pytest.raises(DataError, match="rows of 2 features, the stream makes 3"):
        RowBuffer.restore(_dump(), width=3, max_rows=10, max_age=1000, now=3.0)


# ---------------------------------------------------------------- settings


def settings(**change) -> StreamSettings:
    base = StreamSettings(topics=["plant/+/temp=temp", "plant/all"], channels=["temp", "hum"])
    return dataclasses.replace(base, **change)


def test_settings_make_the_parts():
    s = settings(window_length=4, window_stride=2, window_features=["mean", "rms"])
    s.validate()
    assert s.subscriptions() == ["plant/+/temp", "plant/all"]
    assert s.topic_map().routes == (("plant/+/temp", "temp"), ("plant/all", None))
    assert s.window_spec().feature_names() == ("temp_mean", "temp_rms", "hum_mean", "hum_rms")
    assert settings(subscribe=["plant/#"]).subscriptions() == ["plant/#"]
    assert split_topic("a=b/c") == ("a=b/c", None) and split_topic("a=b/c=hum") == ("a=b/c", "hum")


@pytest.mark.parametrize(("change", "key"), [
    ({"window_length": 0}, "mqtt.window_length:"),
    ({"window_stride": 0}, "mqtt.window_stride:"),
    ({"window_features": ["median"]}, "mqtt.window_features[0]:"),
    ({"window_features": []}, "mqtt.window_features:"),
    ({"window_features": ["raw", "raw"]}, "mqtt.window_features:"),
    ({"port": 0}, "mqtt.port:"),
    ({"host": ""}, "mqtt.host:"),
    ({"qos": 3}, "mqtt.qos:"),
    ({"topics": []}, "mqtt.topics:"),
    ({"topics": ["a/#/b"]}, "mqtt.topics[0]:"),
    ({"topics": ["a/b+"]}, "mqtt.topics[0]:"),
    ({"topics": ["a=pressure"]}, "mqtt.topics[0]:"),
    ({"topics": ["a", "a"]}, "mqtt.topics[1]:"),
    ({"subscribe": ["a/#/"]}, "mqtt.subscribe[0]:"),
    ({"channels": []}, "mqtt.channels:"),
    ({"channels": ["temp", "bad name"]}, "mqtt.channels[1]:"),
    ({"channels": ["temp", "temp"]}, "mqtt.channels:"),
    ({"tls_cert": Path("c.pem")}, "mqtt.tls_key:"),
    ({"password_file": Path("pw")}, "mqtt.username:"),
    ({"client_id": "has space"}, "mqtt.client_id:"),
    ({"buffer_max_rows": 0}, "mqtt.buffer_max_rows:"),
    ({"buffer_max_age": math.inf}, "mqtt.buffer_max_age:"),
    ({"reconnect_min": 10.0, "reconnect_max": 5.0}, "mqtt.reconnect_max:"),
    ({"queue": 0}, "mqtt.queue:"),
    ({"max_payload_bytes": 1}, "mqtt.max_payload_bytes:"),
    ({"timestamp_key": "temp"}, "mqtt.timestamp_key:"),
    ({"anomaly_rate": 0.0}, "mqtt.anomaly_rate:"),
    ({"anomaly_rate": 0.6}, "mqtt.anomaly_rate:"),
    ({"calibration_scores": 5}, "mqtt.calibration_scores:"),
    ({"warmup_scores": 5000}, "mqtt.warmup_scores:"),
    ({"result_topic": "out/+"}, "mqtt.result_topic:"),
    ({"alert_topic": "alerts/#"}, "mqtt.alert_topic:"),
    ({"result_topic": "plant/x/temp"}, "mqtt.result_topic:"),  # read back by the plant/+/temp subscription
    ({"subscribe": ["plant/#"], "alert_topic": "plant/alerts"}, "mqtt.alert_topic:"),
    ({"discovery_prefix": "homeassistant"}, "mqtt.result_topic:"),  # discovery needs the verdicts' topic
    ({"discovery_prefix": "home/+", "result_topic": "out"}, "mqtt.discovery_prefix:"),
    ({"max_queued": 0}, "mqtt.max_queued:"),
])
def test_settings_refused_naming_the_key(change, key):
    with pytest.raises(ConfigError) as caught:
        settings(**change).validate()
    assert str(caught.value).startswith(key), str(caught.value)
    assert "\n" not in str(caught.value)


def test_mqtt_section_checked_only_when_enabled():
    from gossipfl.config import config_from_dict

    assert config_from_dict({"mqtt": {"window_length": 0}}).mqtt.window_length == 0  # off: not checked
    with pytest.raises(ConfigError, match=r"^mqtt\.channels:"):
        config_from_dict({"mqtt": {"enabled": True, "topics": ["a"]}})
    on = config_from_dict({"mqtt": {"enabled": True, "topics": ["a"], "channels": ["x"], "tls_ca": "ca.pem",
                                    "password_file": "", "username": "u"}}, base_dir=Path("/etc/g"))
    assert on.mqtt.tls_ca == Path("/etc/g/ca.pem") and on.mqtt.password_file is None  # "" is no file
    with pytest.raises(ConfigError, match=r"^mqtt\.tls_ca: must be a path string"):
        config_from_dict({"mqtt": {"tls_ca": 3}})


@pytest.mark.parametrize(("task", "entities"), [
    ("anomaly", {"sensor/gossipfl_n_1/score", "binary_sensor/gossipfl_n_1/anomaly"}),
    ("classification", {"sensor/gossipfl_n_1/class"}),
    ("regression", {"sensor/gossipfl_n_1/value"}),
])
def test_home_assistant_discovery_messages(task, entities):
    import json

    discovery = Discovery("homeassistant", "n.1", "plant/n1/verdict", task)
    messages = dict(discovery.messages())
    assert {t.removeprefix("homeassistant/").removesuffix("/config") for t in messages} == entities
    for payload in messages.values():
        config = json.loads(payload)
        assert config["state_topic"] == "plant/n1/verdict"
        assert config["availability_topic"] == discovery.availability_topic == "plant/n1/verdict/availability"
        assert config["unique_id"].startswith("gossipfl_n_1_")
        assert config["device"]["identifiers"] == ["gossipfl_n_1"]  # one device holding every entity
