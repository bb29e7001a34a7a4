"""One MQTT message (topic, payload bytes) into one reading: values of the model's channels, by name.

A sensor publishes in one of three shapes, and the topic it publishes on says which channels it may carry:

* a plain-text number (``21.5``), on a topic configured for one channel (``sensors/t1=temp``);
* a JSON number (the same text: JSON's number grammar is a subset of the plain-text one);
* a JSON object ``{"temp": 21.5, "hum": 40, "ts": 1700000000.5}``, on any configured topic: each key names a
  channel, and the optional timestamp key carries the sensor's own time in seconds.

Payloads come from whatever can publish to the broker, so every one is hostile input: refused past a size
cap before it is decoded, nesting is measured before ``json.loads`` could recurse, number literals are
bounded, NaN and infinities are refused, a key that names no channel is refused rather than ignored (a
misspelt channel would otherwise leave every window incomplete without a word). A refusal is a
:class:`PayloadError` whose ``reason`` is one short word from :data:`REASONS`, meant as a counter's key
(``mqtt.dropped.not_json``), and whose message is one line.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gossipfl.errors import DataError

REASONS = (
    "unknown_topic",  # the topic matches no configured topic filter
    "too_large",  # over the size cap, refused before decoding
    "not_utf8",
    "not_json",  # starts like JSON and is not, or is JSON of an unsupported shape (an array)
    "too_deep",  # nested deeper than the limit
    "too_many_values",
    "duplicate_key",  # a JSON object naming one key twice (which one would win is the parser's whim)
    "not_a_number",  # a channel's value that is not a number, or a payload that is neither number nor JSON
    "not_finite",  # NaN, infinities, or a literal that overflows a double
    "unknown_channel",  # a JSON key that names none of the model's channels
    "no_channel",  # a bare number on a topic that carries several channels, or an object with no channel
    "bad_timestamp",
)

CHANNEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
# Decimal numbers only: Python's float() would also take "1_000", "inf", "nan" and "infinity".
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_NON_FINITE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)
MAX_LITERAL = 64  # characters in one number literal: a double needs about 25
MAX_TIMESTAMP = 1e11  # seconds; a millisecond epoch (1.7e12) is refused, not read as the year 55000


class PayloadError(DataError):
    """A message that yields no reading. ``reason`` is one of :data:`REASONS`; the message is one line."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class Reading:
    """The values one message carried, by channel name; ``timestamp`` is the sensor's own time (or None), and
    ``received`` is when the caller got the message, on the caller's clock."""

    values: Mapping[str, float]
    received: float
    timestamp: float | None = None
    topic: str = ""


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic matching: ``+`` matches one level, a final ``#`` this level and every one below; a topic
    starting with ``$`` is matched by no wildcard in its first level (MQTT 3.1.1, 4.7.2)."""
    filter_levels = topic_filter.split("/")
    levels = topic.split("/")
    if topic.startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for i, part in enumerate(filter_levels):
        if part == "#":
            return True
        if i >= len(levels) or (part != "+" and part != levels[i]):
            return False
    return len(levels) == len(filter_levels)


@dataclass(frozen=True)
class TopicMap:
    """Which topics carry which channels, and the limits a payload is held to.

    ``routes`` are (topic filter, channel) pairs, tried in order; a channel of None means the topic's
    payloads are JSON objects naming their channels. ``channels`` are the model's channel names."""

    routes: tuple[tuple[str, str | None], ...]
    channels: tuple[str, ...]
    timestamp_key: str = "ts"
    max_bytes: int = 4096
    max_depth: int = 2
    max_values: int = 64
    _known: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_known", frozenset(self.channels))
        for _, channel in self.routes:
            if channel is not None and channel not in self._known:
                raise ValueError(f"route channel {channel!r} is not one of the channels")

    @classmethod
    def single(cls, topic: str, channel: str, **limits: int) -> TopicMap:
        """One topic carrying one channel (tests, diagnostics)."""
        return cls(((topic, channel),), (channel,), **limits)

    def route(self, topic: str) -> tuple[bool, str | None]:
        """(matched, channel) of the first route whose filter matches ``topic``."""
        for topic_filter, channel in self.routes:
            if topic_matches(topic_filter, topic):
                return True, channel
        return False, None


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON text, brackets inside strings not counted."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _number_literal(text: str) -> float:
    if len(text) > MAX_LITERAL:
        raise PayloadError("not_a_number", f"a number literal of {len(text)} characters (limit {MAX_LITERAL})")
    value = float(text)
    if not math.isfinite(value):
        raise PayloadError("not_finite", f"{_short(text)} overflows a double")
    return value


def _no_constants(name: str) -> float:
    raise PayloadError("not_finite", f"{name} is not a finite number")


def _unique_pairs(pairs: Sequence[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise PayloadError("duplicate_key", f"key {_short(key)} appears twice")
        seen[key] = value
    return seen


def _load_json(text: str, limits: TopicMap) -> object:
    if text.count("{") + text.count("[") > limits.max_depth and _depth(text) > limits.max_depth:
        raise PayloadError("too_deep", f"JSON nested deeper than {limits.max_depth} levels")
    try:
        return json.loads(text, parse_int=_number_literal, parse_float=_number_literal,
                          parse_constant=_no_constants, object_pairs_hook=_unique_pairs)
    except PayloadError:
        raise
    except (ValueError, RecursionError) as exc:
        raise PayloadError("not_json", f"not JSON ({str(exc).splitlines()[0][:80]})") from None


def _channel_value(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, float):
        kind = "true/false" if isinstance(value, bool) else type(value).__name__.replace("NoneType", "null")
        raise PayloadError("not_a_number", f"channel {_short(key)} is {kind}, not a number")
    return value


def _from_object(body: dict[str, object], limits: TopicMap, received: float, topic: str) -> Reading:
    if len(body) > limits.max_values:
        raise PayloadError("too_many_values", f"{len(body)} keys (limit {limits.max_values})")
    values: dict[str, float] = {}
    timestamp: float | None = None
    for key, value in body.items():
        if key == limits.timestamp_key:
            if isinstance(value, bool) or not isinstance(value, float) or not 0 <= value <= MAX_TIMESTAMP:
                raise PayloadError("bad_timestamp", f"{key!r} must be seconds from 0 to {MAX_TIMESTAMP:g}, "
                                                    f"got {_short(str(value))}")
            timestamp = value
        elif key in limits._known:
            values[key] = _channel_value(key, value)
        else:
            raise PayloadError("unknown_channel", f"key {_short(key)} names none of the channels")
    if not values:
        raise PayloadError("no_channel", "the object carries no channel's value")
    return Reading(values, received, timestamp, topic)


def parse_message(topic: str, payload: bytes, received: float, topics: TopicMap) -> Reading:
    """The reading ``payload`` carries, published on ``topic`` and received at ``received`` (seconds, the
    caller's clock); :class:`PayloadError` when there is none."""
    matched, channel = topics.route(topic)
    if not matched:
        raise PayloadError("unknown_topic", f"topic {_short(topic)} matches no configured topic")
    if len(payload) > topics.max_bytes:
        raise PayloadError("too_large", f"{len(payload)} bytes (limit {topics.max_bytes})")
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise PayloadError("not_utf8", "the payload is not UTF-8 text") from None
    if text[:1] in ("{", "["):
        body = _load_json(text, topics)
        if not isinstance(body, dict):
            raise PayloadError("not_json", "a JSON array; a reading is a JSON object or a number")
        return _from_object(body, topics, received, topic)
    if _NON_FINITE.fullmatch(text):
        raise PayloadError("not_finite", f"{_short(text)} is not a finite number")
    if not _NUMBER.fullmatch(text):
        raise PayloadError("not_a_number", f"{_short(text) if text else 'an empty payload'} is not a number")
    value = _number_literal(text)
    if channel is None:
        raise PayloadError("no_channel", f"a bare number on topic {_short(topic)}, which names no channel")
    return Reading({channel: value}, received, None, topic)
