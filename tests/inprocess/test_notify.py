"""sd_notify against real AF_UNIX datagram sockets, the way systemd listens for them."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from gossipfld.notify import SystemdNotifier, watchdog_task


class Listener:
    """A bound datagram socket standing in for systemd's notification socket."""

    def __init__(self, env_value: str, bind_address: str | bytes) -> None:
        self.env_value = env_value
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_address)

    def recv(self, timeout: float = 2.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(65536).decode()

    def drain(self) -> list[str]:
        """Every datagram already queued, without waiting for more."""
        self.sock.setblocking(False)
        messages = []
        while True:
            try:
                messages.append(self.sock.recv(65536).decode())
            except BlockingIOError:
                return messages

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 107-byte limit of a socket path; this cannot.
    with tempfile.TemporaryDirectory(prefix="gfl-") as d:
        yield Path(d)


@pytest.fixture
def path_listener(short_dir: Path) -> Iterator[Listener]:
    path = str(short_dir / "notify.sock")
    listener = Listener(path, path)
    yield listener
    listener.close()


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    name = f"gossipfl-test-{uuid.uuid4().hex}"
    listener = Listener("@" + name, "\0" + name)
    yield listener
    listener.close()


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, path_listener: Listener, abstract_listener: Listener) -> Listener:
    return path_listener if request.param == "path" else abstract_listener


def test_messages_arrive_with_their_content(listener: Listener) -> None:
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": listener.env_value})
    assert notifier.enabled
    assert notifier.ready()
    assert listener.recv() == "READY=1"
    assert notifier.status("learning; 3 peers")
    assert listener.recv() == "STATUS=learning; 3 peers"
    assert notifier.stopping()
    assert listener.recv() == "STOPPING=1"
    assert notifier.notify(status="x", EXTEND_TIMEOUT_USEC=5_000_000)
    assert listener.recv() == "STATUS=x\nEXTEND_TIMEOUT_USEC=5000000"
    assert notifier.send("READY=1", "STATUS=up")
    assert listener.recv() == "READY=1\nSTATUS=up"


def test_status_is_one_line(path_listener: Listener) -> None:
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": path_listener.env_value})
    notifier.status("first\nREADY=1\r\nthird\n")
    assert path_listener.recv() == "STATUS=first READY=1  third"
    notifier.notify(status="a\nWATCHDOG=1")
    assert path_listener.recv() == "STATUS=a WATCHDOG=1"


def test_malformed_assignments_are_programming_errors(path_listener: Listener) -> None:
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": path_listener.env_value})
    for bad in ("READY", "ready=1", "STATUS=a\nREADY=1", "=1"):
        with pytest.raises(ValueError):
            notifier.send(bad)
    assert path_listener.drain() == []


def test_unset_socket_is_a_no_op() -> None:
    notifier = SystemdNotifier.from_env({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert not notifier.ready()
    assert not notifier.status("x")
    assert not notifier.stopping()
    assert not notifier.watchdog()
    assert not notifier.notify(STATUS="x")
    assert SystemdNotifier.from_env({"NOTIFY_SOCKET": ""}).address is None


def test_from_env_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch, path_listener: Listener) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_listener.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = SystemdNotifier.from_env()
    assert notifier.watchdog_interval == pytest.approx(1.5)
    assert notifier.watchdog()
    assert path_listener.recv() == "WATCHDOG=1"


def test_addresses() -> None:
    assert SystemdNotifier.from_env({"NOTIFY_SOCKET": "/run/systemd/notify"}).address == b"/run/systemd/notify"
    assert SystemdNotifier.from_env({"NOTIFY_SOCKET": "@foo/bar"}).address == b"\0foo/bar"


@pytest.mark.parametrize("value", ["relative/notify", "@", "/" + "x" * 120, "@" + "x" * 120])
def test_unusable_socket_values_are_logged_and_ignored(value: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gossipfld.notify"):
        notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": value})
    assert notifier.address is None
    assert not notifier.ready()
    assert any("NOTIFY_SOCKET" in r.getMessage() for r in caplog.records)


def test_missing_socket_path_does_not_raise_and_logs_once(short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": str(short_dir / "nobody-listens")})
    with caplog.at_level(logging.DEBUG, logger="gossipfld.notify"):
        assert not notifier.ready()
        assert not notifier.status("x")
        assert not notifier.stopping()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cannot notify systemd" in warnings[0].getMessage()


@pytest.mark.parametrize("value", ["abc", "1.5e6", "-5", "0", " "])
def test_malformed_watchdog_usec_is_ignored(value: str, path_listener: Listener,
                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gossipfld.notify"):
        notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": path_listener.env_value, "WATCHDOG_USEC": value})
    assert notifier.watchdog_interval is None
    assert not notifier.watchdog()
    assert notifier.ready()  # the rest of the protocol still works
    assert path_listener.recv() == "READY=1"
    assert any("WATCHDOG_USEC" in r.getMessage() for r in caplog.records)


def test_watchdog_pid(path_listener: Listener) -> None:
    env = {"NOTIFY_SOCKET": path_listener.env_value, "WATCHDOG_USEC": "200000"}
    assert SystemdNotifier.from_env(env).watchdog_interval == pytest.approx(0.1)
    ours = SystemdNotifier.from_env({**env, "WATCHDOG_PID": str(os.getpid())})
    assert ours.watchdog_interval == pytest.approx(0.1)
    other = SystemdNotifier.from_env({**env, "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_interval is None
    assert not other.watchdog()
    assert SystemdNotifier.from_env({**env, "WATCHDOG_PID": "nope"}).watchdog_interval is None
    assert path_listener.drain() == []


def test_watchdog_task_pings_at_half_the_timeout(listener: Listener) -> None:
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": "200000"})
    assert notifier.watchdog_interval == pytest.approx(0.1)

    async def main() -> None:
        with trio.move_on_after(0.55):
            await watchdog_task(notifier)

    trio.run(main)
    pings = listener.drain()
    assert set(pings) == {"WATCHDOG=1"}
    assert 3 <= len(pings) <= 8, pings


def test_a_blocked_loop_stops_the_pings(path_listener: Listener) -> None:
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": path_listener.env_value, "WATCHDOG_USEC": "100000"})

    async def main() -> tuple[int, int]:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watchdog_task, notifier)
            await trio.sleep(0.2)
            before = len(path_listener.drain())
            time.sleep(0.4)  # wedge the event loop: eight intervals pass with no chance to ping
            during = len(path_listener.drain())
            nursery.cancel_scope.cancel()
        return before, during

    before, during = trio.run(main)
    assert before >= 1
    assert during == 0


def test_watchdog_task_returns_at_once_without_a_watchdog(path_listener: Listener) -> None:
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": path_listener.env_value})

    async def main() -> None:
        with trio.fail_after(1):
            await watchdog_task(notifier)

    trio.run(main)
    assert path_listener.drain() == []
