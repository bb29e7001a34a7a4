"""Sensor streams into rows, sans-I/O: MQTT payloads parsed into readings (``payload``), readings cut into
windows whose features are named like a model's schema (``windows``), and a bounded, persistable buffer of
the rows made (``buffer``), configured by ``settings.StreamSettings``.

Nothing here opens a socket, starts a thread or reads the clock: the caller passes each message and the time
it arrived. ``gossipfld.mqtt`` is the I/O side (paho-mqtt bridged to trio). docs/streams.md describes both.
"""

from __future__ import annotations

from gossipfl.streams.buffer import Row, RowBuffer
from gossipfl.streams.payload import PayloadError, Reading, TopicMap, parse_message
from gossipfl.streams.settings import StreamSettings
from gossipfl.streams.windows import STATS, Windower, WindowSpec

__all__ = [
    "STATS",
    "PayloadError",
    "Reading",
    "Row",
    "RowBuffer",
    "StreamSettings",
    "TopicMap",
    "WindowSpec",
    "Windower",
    "parse_message",
]
