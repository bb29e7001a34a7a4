"""An MQTT sensor stream under trio: paho-mqtt's client in its own thread, bridged to trio the way
``discovery`` bridges python-zeroconf, feeding ``gossipfl.streams`` (payload -> readings -> windows -> rows).

* paho's network loop runs in the thread ``loop_start`` makes; it connects, reconnects with back-off
  (``reconnect_delay_set``: ``reconnect_min`` doubling up to ``reconnect_max``) and calls our callbacks there;
* each callback hands its news to trio with ``trio.from_thread.run_sync(..., trio_token=...)``, which runs a
  short function in the trio thread: connection changes update the state at once, a message goes into a
  bounded memory channel with ``send_nowait`` (full: dropped and counted as ``mqtt.dropped.queue_full``), so
  paho's thread waits only for the event loop's next turn, never for the consumer. A finished trio run or any
  error is logged and swallowed there: paho kills its loop thread on a callback's exception;
* a trio task reads the channel and parses, windows and buffers each message; every counter is touched in
  the trio thread only (``Counters`` is not thread-safe);
* every blocking paho call that could wait on that thread (``disconnect``, ``loop_stop``) runs in
  ``trio.to_thread``, never in the trio thread, whose callbacks the paho thread may be waiting on.

Counters (``family.detail``): ``mqtt.messages`` (every message paho delivered), ``mqtt.dropped.<reason>``
(a payload refused, by ``gossipfl.streams.payload.REASONS``, or ``queue_full``), ``mqtt.readings``,
``mqtt.rows``, ``mqtt.windows_dropped.missing_channel``, ``mqtt.rows_dropped.count`` / ``.age`` (evicted
from the buffer), ``mqtt.connects``, ``mqtt.disconnects``, ``mqtt.connect_failures``,
``mqtt.subscribe_failures``, ``mqtt.published`` and ``mqtt.publish_dropped`` (what ``publish`` handed to paho,
or could not).

``gossipfld.streaming`` is what the daemon does with the rows: it starts a source when ``[mqtt]`` is enabled.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import ssl
import stat
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import trio
from paho.mqtt.enums import CallbackAPIVersion

from gossipfl.atomic import read_state_bytes, write_bytes_atomic
from gossipfl.errors import ConfigError, DataError
from gossipfl.metrics import Counters
from gossipfl.streams.buffer import MAX_DUMP_BYTES, Row, RowBuffer
from gossipfl.streams.payload import PayloadError, parse_message
from gossipfl.streams.settings import SECTION, StreamSettings
from gossipfl.streams.windows import Windower

log = logging.getLogger(__name__)

MAX_PASSWORD_BYTES = 4096
WARNED_KEYS = 256  # (reason, topic) pairs whose next bad payload is logged at debug level, not warning


def read_password(path: Path) -> str:
    """The password in ``path`` (its first line). Refused in one line, naming the key, when the file is a
    symbolic link, not a regular file, readable or writable by group or others, too large, or empty."""
    key = f"{SECTION}.password_file"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{key}: {path} is a symbolic link; name the file itself") from None
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{key}: {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise ConfigError(f"{key}: {path} is open to group or others (mode {mode:04o}); "
                              f"chmod 600 {path}")
        data = handle.read(MAX_PASSWORD_BYTES + 1)
    if len(data) > MAX_PASSWORD_BYTES:
        raise ConfigError(f"{key}: {path} is over {MAX_PASSWORD_BYTES} bytes; it holds one password")
    try:
        password = data.decode("utf-8").split("\n", 1)[0].rstrip("\r")
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not UTF-8 text") from None
    if not password:
        raise ConfigError(f"{key}: {path} is empty; its first line is the password")
    return password


def tls_context(settings: StreamSettings) -> ssl.SSLContext:
    """A client context for the broker: its certificate checked against ``tls_ca`` (or the system's CAs) and
    its host name, TLS 1.2 at least, and our certificate when one is configured."""
    try:
        cafile = str(settings.tls_ca) if settings.tls_ca is not None else None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{SECTION}.tls_ca: cannot load {settings.tls_ca}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.tls_cert is not None:
        try:
            context.load_cert_chain(settings.tls_cert, settings.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{SECTION}.tls_cert: cannot load {settings.tls_cert} with {settings.tls_key}: "
                              f"{exc}") from None
    return context


@dataclass(frozen=True)
class _Message:
    topic: str | None  # None: the topic is not UTF-8
    payload: bytes


class MqttSource:
    """Subscribe to a broker's sensor topics and turn what arrives into rows in :attr:`buffer`.

    Start :meth:`run` in a nursery (``await nursery.start(source.run)`` returns once paho's thread is
    started; a bad password file or TLS file fails it there); it runs until cancelled. Read rows with
    :meth:`rows` (an async iterator that resumes after a sequence number) or :meth:`rows_after`.
    ``state_file``, when given, holds the buffer across restarts: read at start (a damaged one fails the start,
    so sequence numbers never start over silently), written atomically at the end.
    """

    def __init__(self, settings: StreamSettings, counters: Counters | None = None, *,
                 state_file: Path | None = None, clock: Callable[[], float] = time.time) -> None:
        settings.validate()
        self.settings = settings
        self.counters = counters if counters is not None else Counters()
        self.state_file = state_file
        self._clock = clock
        self._topics = settings.topic_map()
        self.windower = Windower(settings.window_spec())
        self.buffer = RowBuffer(self.windower.spec.width, settings.buffer_max_rows, settings.buffer_max_age)
        self.connected = False
        self.subscribed = False  # the broker acknowledged every subscription of the current connection
        self.last_error: str | None = None
        self._send, self._recv = trio.open_memory_channel[_Message](settings.queue)
        self._token: trio.lowlevel.TrioToken | None = None
        self._changed = trio.Event()
        self._warned: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._reported: dict[str, int] = {}  # library drop counts already added to the counters
        self._started = False
        self._stopping = False
        self._refused = False  # the broker refused the current attempt's CONNECT (its disconnect follows)
        # Published (retained) at every connection, from paho's thread: Home Assistant's discovery messages and
        # "online"; ``will`` is what the broker publishes (retained) if the connection drops without a goodbye.
        self.announce: list[tuple[str, bytes]] = []
        self.will: tuple[str, bytes] | None = None
        self._paho: paho.Client | None = None

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.windower.spec.feature_names()

    # ---- the trio side

    async def run(self, *, task_status: trio.TaskStatus[MqttSource] = trio.TASK_STATUS_IGNORED) -> None:
        if self._started:
            raise RuntimeError("MqttSource.run can only run once")
        self._started = True
        self._token = trio.lowlevel.current_trio_token()
        s = self.settings
        password = read_password(s.password_file) if s.password_file is not None else None
        context = tls_context(s) if s.tls else None
        if self.state_file is not None:
            self._restore(self.state_file)
        client = self._client(password, context)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._process)
                client.connect_async(s.host, s.port, keepalive=s.keepalive)
                client.loop_start()
                log.info("MQTT: connecting to %s:%d (%d topics)", s.host, s.port, len(s.topics))
                task_status.started(self)
        finally:
            with trio.CancelScope(shield=True):
                self._stopping = True
                await trio.to_thread.run_sync(self._stop_client, client)
                self.connected = self.subscribed = False
                self._notify()
                self.save()

    def _client(self, password: str | None, context: ssl.SSLContext | None) -> paho.Client:
        s = self.settings
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=s.client_id,
                             clean_session=not s.client_id, protocol=paho.MQTTv311)
        # With a client id the broker keeps the session (subscriptions, QoS 1/2 messages) across reconnects.
        client.reconnect_delay_set(s.reconnect_min, s.reconnect_max)  # type: ignore[arg-type]
        if s.username:
            client.username_pw_set(s.username, password)
        if context is not None:
            client.tls_set_context(context)
        client.max_queued_messages_set(s.max_queued)
        if self.will is not None:
            client.will_set(self.will[0], self.will[1], qos=1, retain=True)
        self._paho = client
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    @staticmethod
    def _stop_client(client: paho.Client) -> None:
        """In a worker thread: paho's thread may be waiting on the trio thread meanwhile."""
        try:
            client.disconnect()
        except Exception:
            log.exception("MQTT: disconnecting failed")
        client.loop_stop()

    async def _process(self) -> None:
        async for message in self._recv:
            self._handle(message)

    def _handle(self, message: _Message) -> None:
        now = self._clock()
        try:
            if message.topic is None:
                raise PayloadError("not_utf8", "the topic is not UTF-8")
            reading = parse_message(message.topic, message.payload, now, self._topics)
        except PayloadError as exc:
            self.counters.add(f"mqtt.dropped.{exc.reason}")
            self._log_bad(exc, message.topic)
            return
        self.counters.add("mqtt.readings")
        for window in self.windower.push(reading):
            self.buffer.add(window.values, window.received)
            self.counters.add("mqtt.rows")
        self._report("mqtt.windows_dropped", self.windower.dropped)
        self._report("mqtt.rows_dropped", self.buffer.dropped)
        self._notify()

    def _report(self, family: str, dropped: dict[str, int]) -> None:
        for reason, count in dropped.items():
            name = f"{family}.{reason}"
            new = count - self._reported.get(name, 0)
            if new:
                self.counters.add(name, new)
                self._reported[name] = count

    def _log_bad(self, exc: PayloadError, topic: str | None) -> None:
        """One line for every bad payload: a warning the first time a (reason, topic) is seen, at debug level
        after that, so a flood of one mistake does not flood the log."""
        shown = repr(topic[:120]) if topic is not None else "(not UTF-8)"
        key = (exc.reason, shown)
        level = logging.DEBUG if key in self._warned else logging.WARNING
        self._warned[key] = None
        self._warned.move_to_end(key)
        while len(self._warned) > WARNED_KEYS:
            self._warned.popitem(last=False)
        log.log(level, "MQTT: dropped a message on %s: %s", shown, exc)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; it is checked after every change (a message, a connection)."""
        while not predicate():
            await self._changed.wait()

    def rows_after(self, seq: int, limit: int | None = None) -> list[Row]:
        """Rows numbered above ``seq`` still held (older than ``buffer_max_age`` ones are dropped first)."""
        self._report("mqtt.rows_dropped", self.buffer.dropped)
        self.buffer.expire(self._clock())
        return self.buffer.after(seq, limit)

    async def rows(self, after: int = -1) -> AsyncIterator[Row]:
        """Every row numbered above ``after``, as it comes, forever."""
        cursor = after
        while True:
            rows = self.rows_after(cursor)
            if not rows:
                await self._changed.wait()
                continue
            for row in rows:
                cursor = row.seq
                yield row

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """Hand a message to paho, which sends it from its thread: now, or for QoS 1 and 2 once reconnected.
        False (counted as ``mqtt.publish_dropped``) when it cannot be: ``max_queued`` messages are waiting
        already, or QoS 0 with no connection."""
        client = self._paho
        if client is None or self._stopping:
            return False
        rc = client.publish(topic, payload, qos=self.settings.qos, retain=retain).rc
        if rc == paho.MQTT_ERR_SUCCESS or (rc == paho.MQTT_ERR_NO_CONN and self.settings.qos > 0):
            self.counters.add("mqtt.published")
            return True
        self.counters.add("mqtt.publish_dropped")
        log.debug("MQTT: a message to %s was dropped: %s", topic, paho.error_string(rc))
        return False

    def status(self) -> dict[str, Any]:
        return {"broker": f"{self.settings.host}:{self.settings.port}", "connected": self.connected,
                "subscribed": self.subscribed, "rows": len(self.buffer), "first_seq": self.buffer.first_seq,
                "next_seq": self.buffer.next_seq, "last_error": self.last_error}

    def _restore(self, path: Path) -> None:
        try:
            data = read_state_bytes(path, MAX_DUMP_BYTES)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise DataError(f"MQTT row buffer {path}: {exc}; remove it to start a new sequence") from None
        s = self.settings
        try:
            self.buffer = RowBuffer.restore(data, width=self.windower.spec.width, max_rows=s.buffer_max_rows,
                                            max_age=s.buffer_max_age, now=self._clock())
        except DataError as exc:
            raise DataError(f"{path}: {exc}; remove it to start a new sequence") from None
        log.info("MQTT: %d rows restored from %s (next row %d)", len(self.buffer), path, self.buffer.next_seq)

    def save(self) -> None:
        """Write the buffer to ``state_file`` atomically (at the end, and at the daemon's checkpoints)."""
        if self.state_file is None:
            return
        try:
            write_bytes_atomic(self.state_file, self.buffer.dump(), mode=0o600)
        except OSError as exc:
            log.error("MQTT: cannot save the row buffer to %s: %s", self.state_file, exc)

    # ---- state changes and messages, run in the trio thread on paho's behalf

    def _link(self, event: str, detail: str = "") -> None:
        if event == "connected":
            self.connected, self.subscribed, self.last_error, self._refused = True, False, None, False
            self.counters.add("mqtt.connects")
            log.info("MQTT: connected to %s:%d", self.settings.host, self.settings.port)
        elif event == "subscribed":
            self.subscribed = True
        elif event == "subscribe_failed":
            self.counters.add("mqtt.subscribe_failures")
            self.last_error = f"subscription refused: {detail}"
            log.error("MQTT: the broker refused a subscription: %s", detail)
        elif event == "disconnected":
            if self.connected:
                self.counters.add("mqtt.disconnects")
                log.log(logging.INFO if self._stopping else logging.WARNING, "MQTT: disconnected from %s:%d: %s",
                        self.settings.host, self.settings.port, detail)
            elif self._refused:
                self._refused = False  # paho closes after a refused CONNACK: that failure is counted already
            elif not self._stopping:  # closed before the broker answered: a TLS or protocol refusal
                self._link("connect_failed", f"the connection closed before the broker accepted it ({detail})")
            self.connected = self.subscribed = False
        elif event in ("connect_failed", "refused"):
            self._refused = event == "refused"
            self.counters.add("mqtt.connect_failures")
            level = logging.DEBUG if self.last_error == detail else logging.WARNING
            self.last_error = detail
            log.log(level, "MQTT: cannot connect to %s:%d: %s", self.settings.host, self.settings.port, detail)
        self._notify()

    def _deliver(self, message: _Message) -> None:
        self.counters.add("mqtt.messages")
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            self.counters.add("mqtt.dropped.queue_full")
            log.debug("MQTT: %d messages waiting already: dropped one", self.settings.queue)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # shutting down

    def _to_trio(self, function: Callable[..., None], *args: object) -> None:
        """Run ``function(*args)`` in the trio thread, from paho's; never raise into paho (it would end its
        loop thread)."""
        if self._token is None:
            return
        try:
            trio.from_thread.run_sync(function, *args, trio_token=self._token)
        except trio.RunFinishedError:
            pass
        except Exception:
            log.exception("MQTT: handing %s to trio failed", getattr(function, "__name__", function))

    # ---- paho's callbacks, in paho's thread

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._to_trio(self._link, "refused", f"the broker refused the connection: {reason}")
            return
        try:
            client.subscribe([(topic, self.settings.qos) for topic in self.settings.subscriptions()])
            for topic, payload in self.announce:
                client.publish(topic, payload, qos=1, retain=True)
        except Exception as exc:
            self._to_trio(self._link, "subscribe_failed", str(exc))
        self._to_trio(self._link, "connected")

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self._to_trio(self._link, "connect_failed", "no connection (broker down or unreachable)")

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._to_trio(self._link, "disconnected", str(reason))

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: list[Any],
                      properties: Any) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:
            self._to_trio(self._link, "subscribe_failed", ", ".join(refused))
        else:
            self._to_trio(self._link, "subscribed")

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            topic: str | None = message.topic
        except UnicodeDecodeError:
            topic = None
        with contextlib.suppress(Exception):
            self._to_trio(self._deliver, _Message(topic, bytes(message.payload)))
