"""sd_notify(3) without libsystemd: readiness, status, stopping and watchdog pings for ``Type=notify``.

The protocol is small enough that a C dependency is not worth it: each notification is one
``AF_UNIX``/``SOCK_DGRAM`` datagram of newline-separated ``KEY=VALUE`` assignments sent to the path in
``$NOTIFY_SOCKET`` (a leading ``@`` names a Linux abstract socket). Outside systemd the variable is unset
and every call does nothing, so the daemon runs the same under a shell, a test or the service manager.

Notifications are best effort by design: a lost READY=1 makes systemd time the start out, which is
visible and recoverable, while an exception here would take the node down. So sending never raises or
blocks; the first failure is logged as a warning and later ones at debug level, so a missing socket
cannot flood the journal every watchdog period.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

import trio

log = logging.getLogger("gossipfld.notify")

# sockaddr_un.sun_path is 108 bytes: a path needs room for its terminating NUL, an abstract name
# (which starts with a NUL byte) may use all of them.
_SUN_PATH_BYTES = 108
_KEY = re.compile(r"[A-Z][A-Z0-9_]*\Z")
# A STATUS line is for humans (systemctl status); systemd itself truncates long ones, and a datagram
# near the socket's buffer size could fail to send at all.
MAX_STATUS_CHARS = 1024


def _one_line(text: str) -> str:
    """Newlines would start new assignments in the datagram, so a value is folded onto one line."""
    return " ".join(text.split("\n")).replace("\r", " ").strip()


def _parse_address(value: str) -> bytes | None:
    """The datagram address for ``$NOTIFY_SOCKET``, or None (logged) when systemd could not have meant it.

    systemd only ever sets an absolute path or an ``@`` abstract name; anything else (a relative path, a
    ``vsock:`` address from a VM manager) is refused rather than guessed at.
    """
    if value.startswith("@"):
        name = b"\0" + os.fsencode(value[1:])
        if len(value) == 1 or len(name) > _SUN_PATH_BYTES:
            log.warning("NOTIFY_SOCKET: abstract socket name %r is empty or too long; notifications are off", value)
            return None
        return name
    if value.startswith("/"):
        path = os.fsencode(value)
        if len(path) >= _SUN_PATH_BYTES:
            log.warning("NOTIFY_SOCKET: path is over %d bytes; notifications are off", _SUN_PATH_BYTES - 1)
            return None
        return path
    log.warning("NOTIFY_SOCKET: %r is neither an absolute path nor an @abstract name; notifications are off", value)
    return None


def _parse_watchdog(environ: Mapping[str, str], pid: int) -> int | None:
    """WATCHDOG_USEC in microseconds if the watchdog is meant for this process, else None.

    WATCHDOG_PID exists because the variables are inherited: a child of the daemon must not ping on the
    parent's behalf (and with NotifyAccess=main its pings would be dropped anyway). A malformed value
    disables the watchdog with a warning; systemd then restarts a silent service, which is loud enough.
    """
    usec_text = environ.get("WATCHDOG_USEC")
    if usec_text is None or usec_text == "":
        return None
    try:
        usec = int(usec_text.strip())
    except ValueError:
        log.warning("WATCHDOG_USEC: %r is not a whole number of microseconds; watchdog pings are off", usec_text)
        return None
    if usec <= 0:
        log.warning("WATCHDOG_USEC: must be positive, got %d; watchdog pings are off", usec)
        return None
    pid_text = environ.get("WATCHDOG_PID")
    if pid_text is not None and pid_text != "":
        try:
            owner = int(pid_text.strip())
        except ValueError:
            log.warning("WATCHDOG_PID: %r is not a process id; watchdog pings are off", pid_text)
            return None
        if owner != pid:
            log.debug("watchdog belongs to pid %d, not this process (%d); pings are off", owner, pid)
            return None
    return usec


@dataclass
class SystemdNotifier:
    """Where notifications go, and whether the service manager expects watchdog pings from us.

    ``address`` is the raw ``sockaddr_un`` path (a leading NUL byte for an abstract name) or None when not
    running under ``Type=notify``; ``watchdog_usec`` is None when no watchdog applies to this process.
    Build it with :meth:`from_env`; the fields are public so a test can aim it at its own socket.
    """

    address: bytes | None = None
    watchdog_usec: int | None = None
    _failed: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, pid: int | None = None) -> SystemdNotifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID; malformed values are logged and ignored.

        ``environ`` defaults to ``os.environ`` read at call time (not at import), so a test or a caller that
        changes the environment first is honoured.
        """
        env = os.environ if environ is None else environ
        socket_text = env.get("NOTIFY_SOCKET", "")
        address = _parse_address(socket_text) if socket_text else None
        usec = _parse_watchdog(env, os.getpid() if pid is None else pid)
        return cls(address=address, watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        """Whether anything is listening for notifications at all."""
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half the timeout, as sd_watchdog_enabled(3) advises, to absorb jitter."""
        if self.address is None or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2 / 1e6

    # ------------------------------------------------------------ the messages the daemon sends

    def ready(self) -> bool:
        """Startup is over: systemd releases units ordered after us and starts the watchdog clock."""
        return self.send("READY=1")

    def status(self, text: str) -> bool:
        """The one line ``systemctl status`` shows under the unit's name."""
        line = _one_line(text)
        if len(line) > MAX_STATUS_CHARS:
            line = line[: MAX_STATUS_CHARS - 3] + "..."
        return self.send(f"STATUS={line}")

    def stopping(self) -> bool:
        """Shutdown has begun (the final checkpoint may take a while), so systemd does not think we hang."""
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        """One keep-alive; a no-op when no watchdog applies, so callers need not check first."""
        if self.watchdog_interval is None:
            return False
        return self.send("WATCHDOG=1")

    def notify(self, **fields: object) -> bool:
        """Any assignments, e.g. ``notify(STATUS="x", EXTEND_TIMEOUT_USEC=5_000_000)``.

        Keys are upper-cased so ``notify(ready=1)`` works; values are folded onto one line, because a newline
        would smuggle in an assignment the caller did not write.
        """
        return self.send(*(f"{key.upper()}={_one_line(str(value))}" for key, value in fields.items()))

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; True if the datagram left, False otherwise.

        A malformed assignment is a programming error and raises ValueError; a delivery failure (no
        listener, a full socket buffer, a read-only filesystem) is logged once and returns False.
        """
        for item in assignments:
            key, sep, value = item.partition("=")
            if not sep or not _KEY.match(key) or "\n" in value:
                raise ValueError(f"not a one-line KEY=VALUE assignment: {item!r}")
        if self.address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)  # a wedged service manager must never wedge the event loop
                sock.sendto(payload, self.address)
        except OSError as exc:
            level = logging.DEBUG if self._failed else logging.WARNING
            self._failed = True
            log.log(level, "cannot notify systemd at %r: %s", self.address, exc.strerror or exc)
            return False
        return True


async def watchdog_task(notifier: SystemdNotifier) -> None:
    """Ping every ``watchdog_interval`` from the trio loop itself, until cancelled.

    Running on the event loop (not in a thread) is the point: if a task blocks the loop, the pings stop
    and systemd kills and restarts the wedged daemon. Returns at once when no watchdog applies. After a
    stall the schedule restarts from now instead of sending a burst of catch-up pings.
    """
    interval = notifier.watchdog_interval
    if interval is None or not math.isfinite(interval) or interval <= 0:
        return
    log.debug("watchdog pings every %.3f s", interval)
    deadline = trio.current_time()
    while True:
        notifier.watchdog()
        deadline = max(deadline + interval, trio.current_time())
        await trio.sleep_until(deadline)
