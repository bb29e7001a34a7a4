"""The settings of one MQTT sensor stream: the broker, what to subscribe to, how payloads map to the model's
channels, the windows and the buffer. ``validate()`` refuses a bad value with its key's dotted name
(``mqtt.window_length: must be 1 to 4096 readings, got 0``), as ``gossipfl.config`` does for the rest.

This dataclass is the ``[mqtt]`` section of ``gossipfl.config`` as it is (checked there when ``enabled``); its
fields keep to the types that loader coerces. The last group says what the daemon does with the rows
(``gossipfld.streaming``): verdicts, the anomaly threshold, the topics they go to.

Topics are MQTT topic filters (``+`` and ``#`` wildcards allowed), each ``FILTER`` (its payloads are JSON
objects naming their channels) or ``FILTER=CHANNEL`` (its payloads are one channel's number). The password is
never a setting: ``password_file`` names a file only its owner can read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from gossipfl.errors import ConfigError
from gossipfl.streams.payload import CHANNEL_NAME, TopicMap, topic_matches
from gossipfl.streams.windows import FEATURES, MAX_LENGTH, MAX_STRIDE, WindowSpec

SECTION = "mqtt"
MAX_TOPICS = 256
MAX_TOPIC_BYTES = 65535  # MQTT's limit on a topic's UTF-8 length


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{SECTION}.{key}: {message}")


def split_topic(entry: str) -> tuple[str, str | None]:
    """``FILTER=CHANNEL`` into (filter, channel), ``FILTER`` into (filter, None). The split is at the last
    ``=`` and only when what follows is a channel name, so a filter may itself hold ``=``."""
    head, sep, tail = entry.rpartition("=")
    if sep and head and CHANNEL_NAME.fullmatch(tail):
        return head, tail
    return entry, None


def topic_filter_problem(topic_filter: str) -> str | None:
    """Why ``topic_filter`` is not a valid MQTT subscription, or None."""
    if not topic_filter:
        return "is empty"
    if "\x00" in topic_filter:
        return "holds a NUL character"
    if len(topic_filter.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        return f"is over {MAX_TOPIC_BYTES} bytes"
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "has '#' other than as the whole last level"
        if "+" in level and level != "+":
            return "has '+' other than as a whole level"
    return None


@dataclass(frozen=True)
class StreamSettings:
    """One MQTT stream. Paths are absolute or relative to the working directory (the config loader will
    resolve them against the config file's directory, as it does for every path)."""

    enabled: bool = False  # the daemon subscribes, scores windows and (anomaly models) trains on them
    host: str = "127.0.0.1"
    port: int = 1883
    tls_ca: Path | None = None  # TLS to the broker when any of ca/cert is set; None ca: the system's CAs
    tls_cert: Path | None = None  # client certificate (with tls_key), for brokers that want one
    tls_key: Path | None = None
    username: str = ""
    password_file: Path | None = None  # the password, one line; refused if group or others may read it
    client_id: str = ""  # "": the broker assigns one (a clean session each time)
    topics: list[str] = field(default_factory=list)  # "FILTER" or "FILTER=CHANNEL"
    # Filters to subscribe to; empty: those of ``topics``. Wider ones (``plant/#``) let messages on topics no
    # entry of ``topics`` maps reach the source, where they are counted (``unknown_topic``) and dropped.
    subscribe: list[str] = field(default_factory=list)
    channels: list[str] = field(default_factory=list)  # the model's channels, in order
    qos: int = 1
    timestamp_key: str = "ts"  # the JSON key of a sensor's own time (seconds)
    max_payload_bytes: int = 4096
    window_length: int = 10  # readings (steps) per window
    window_stride: int = 10  # readings between window starts
    window_features: list[str] = field(default_factory=lambda: ["raw"])  # "raw" and/or mean, std, min, max, rms
    buffer_max_rows: int = 10_000
    buffer_max_age: float = 3600.0  # seconds
    keepalive: int = 30  # seconds between MQTT pings when idle
    reconnect_min: float = 1.0  # seconds before the first reconnect; doubles up to reconnect_max
    reconnect_max: float = 60.0
    queue: int = 1024  # messages waiting between paho's thread and trio; more are dropped and counted
    # What the daemon does with the rows (daemon/streaming.py).
    train: bool = True  # anomaly models: the rows are training rows too (a stream has no labels to train others)
    anomaly_rate: float = 0.01  # the share of windows expected to be anomalies: the threshold's quantile
    calibration_scores: int = 4096  # the recent windows whose scores (by the current model) set the threshold
    warmup_scores: int = 200  # windows judged before the first verdict: too few for a quantile to mean anything
    result_topic: str = ""  # each window's verdict (JSON), retained; "": not published
    alert_topic: str = ""  # anomalies only (JSON), not retained; "": not published
    discovery_prefix: str = ""  # Home Assistant MQTT discovery ("homeassistant"); "": no discovery messages
    max_queued: int = 1000  # verdicts waiting for the broker while it is away; past it new ones are dropped

    def validate(self) -> None:
        _check(0 < len(self.host) <= 253 and not any(c.isspace() for c in self.host), "host",
               f"must be a host name or address, got {self.host!r}")
        _check(0 < self.port < 65536, "port", f"must be 1 to 65535, got {self.port}")
        _check((self.tls_cert is None) == (self.tls_key is None), "tls_key",
               "tls_cert and tls_key go together: set both or neither")
        _check(len(self.username) <= 256, "username", "must be at most 256 characters")
        _check(self.password_file is None or bool(self.username), "username",
               "must be set when password_file is (MQTT sends a password only with a user name)")
        _check(len(self.client_id) <= 128 and self.client_id.isprintable() and " " not in self.client_id,
               "client_id", f"must be at most 128 printable characters without spaces, got {self.client_id!r}")
        self._validate_topics()
        _check(self.qos in (0, 1, 2), "qos", f"must be 0, 1 or 2, got {self.qos}")
        _check(0 < len(self.timestamp_key) <= 64, "timestamp_key", "must be 1 to 64 characters")
        _check(self.timestamp_key not in self.channels, "timestamp_key",
               f"{self.timestamp_key!r} is also a channel's name")
        _check(16 <= self.max_payload_bytes <= 1024 * 1024, "max_payload_bytes",
               f"must be 16 to 1048576, got {self.max_payload_bytes}")
        _check(1 <= self.window_length <= MAX_LENGTH, "window_length",
               f"must be 1 to {MAX_LENGTH} readings, got {self.window_length}")
        _check(1 <= self.window_stride <= MAX_STRIDE, "window_stride",
               f"must be 1 to {MAX_STRIDE} readings, got {self.window_stride}")
        _check(bool(self.window_features), "window_features", f"must name one or more of {', '.join(FEATURES)}")
        for i, feature in enumerate(self.window_features):
            _check(feature in FEATURES, f"window_features[{i}]",
                   f"must be one of {', '.join(FEATURES)}, got {feature!r}")
        _check(len(set(self.window_features)) == len(self.window_features), "window_features",
               "names a feature twice")
        _check(1 <= self.buffer_max_rows <= 10_000_000, "buffer_max_rows",
               f"must be 1 to 10000000, got {self.buffer_max_rows}")
        _check(math.isfinite(self.buffer_max_age) and 1 <= self.buffer_max_age <= 30 * 86400, "buffer_max_age",
               f"must be 1 to 2592000 s, got {self.buffer_max_age:g}")
        _check(5 <= self.keepalive <= 65535, "keepalive", f"must be 5 to 65535 s, got {self.keepalive}")
        _check(0.05 <= self.reconnect_min <= 3600, "reconnect_min",
               f"must be 0.05 to 3600 s, got {self.reconnect_min:g}")
        _check(self.reconnect_min <= self.reconnect_max <= 86400, "reconnect_max",
               f"must be reconnect_min ({self.reconnect_min:g} s) to 86400 s, got {self.reconnect_max:g}")
        _check(1 <= self.queue <= 1_000_000, "queue", f"must be 1 to 1000000 messages, got {self.queue}")
        _check(0 < self.anomaly_rate <= 0.5, "anomaly_rate", f"must be in (0, 0.5], got {self.anomaly_rate:g}")
        _check(10 <= self.calibration_scores <= 1_000_000, "calibration_scores",
               f"must be 10 to 1000000, got {self.calibration_scores}")
        _check(1 <= self.warmup_scores <= self.calibration_scores, "warmup_scores",
               f"must be 1 to calibration_scores ({self.calibration_scores}), got {self.warmup_scores}")
        for key in ("result_topic", "alert_topic"):
            topic = getattr(self, key)
            problem = topic_filter_problem(topic) if topic else None
            _check(problem is None and "+" not in topic and "#" not in topic, key,
                   f"must be a topic without wildcards, got {topic!r}" + (f" ({problem})" if problem else ""))
        _check(self.discovery_prefix == "" or (topic_filter_problem(self.discovery_prefix) is None
               and not any(c in self.discovery_prefix for c in "+#")), "discovery_prefix",
               f"must be a topic prefix without wildcards, got {self.discovery_prefix!r}")
        _check(not self.discovery_prefix or bool(self.result_topic), "result_topic",
               "must be set when discovery_prefix is (Home Assistant reads the verdicts there)")
        for key in ("result_topic", "alert_topic"):
            topic = getattr(self, key)
            wider = next((f for f in self.subscriptions() if topic and topic_matches(f, topic)), None)
            _check(wider is None, key, f"{topic!r} is matched by the subscription {wider!r}: the node would read "
                                       "its own verdicts back as readings")
        _check(1 <= self.max_queued <= 1_000_000, "max_queued", f"must be 1 to 1000000, got {self.max_queued}")
        try:
            self.window_spec()
        except ValueError as exc:
            raise ConfigError(f"{SECTION}.window_features: {exc}") from None

    def _validate_topics(self) -> None:
        _check(bool(self.channels), "channels", "must name the model's channels (one or more)")
        for i, channel in enumerate(self.channels):
            _check(bool(CHANNEL_NAME.fullmatch(channel)), f"channels[{i}]",
                   f"{channel!r} is not a channel name (a letter or _, then letters, digits, _ . -; 64 at most)")
        _check(len(set(self.channels)) == len(self.channels), "channels", "names a channel twice")
        _check(0 < len(self.topics) <= MAX_TOPICS, "topics", f"must list 1 to {MAX_TOPICS} topic filters")
        seen: set[str] = set()
        for i, entry in enumerate(self.topics):
            topic_filter, channel = split_topic(entry)
            problem = topic_filter_problem(topic_filter)
            _check(problem is None, f"topics[{i}]", f"topic filter {topic_filter!r} {problem}")
            _check(channel is None or channel in self.channels, f"topics[{i}]",
                   f"channel {channel!r} is not one of mqtt.channels")
            _check(topic_filter not in seen, f"topics[{i}]", f"topic filter {topic_filter!r} is listed twice")
            seen.add(topic_filter)
        _check(len(self.subscribe) <= MAX_TOPICS, "subscribe", f"must list at most {MAX_TOPICS} topic filters")
        for i, topic_filter in enumerate(self.subscribe):
            problem = topic_filter_problem(topic_filter)
            _check(problem is None, f"subscribe[{i}]", f"topic filter {topic_filter!r} {problem}")

    def topic_map(self) -> TopicMap:
        return TopicMap(tuple(split_topic(t) for t in self.topics), tuple(self.channels), self.timestamp_key,
                        self.max_payload_bytes)

    def window_spec(self) -> WindowSpec:
        return WindowSpec(tuple(self.channels), self.window_length, self.window_stride, tuple(self.window_features))

    def subscriptions(self) -> list[str]:
        """The topic filters to subscribe to."""
        return list(self.subscribe) or [split_topic(t)[0] for t in self.topics]

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None
