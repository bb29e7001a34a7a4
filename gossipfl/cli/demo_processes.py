"""The demo's processes: stop every daemon it started, also on Ctrl-C, SIGTERM or SIGHUP, and kill whatever
still runs from its cluster directory (a daemon's own children, a previous demo's leftovers)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any

from gossipfl.testing.cluster import Cluster


class Stopped(BaseException):
    """SIGTERM (or SIGHUP) arrived; unwinds like KeyboardInterrupt so every daemon is stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def pids_mentioning(root: Path) -> list[int]:
    """Processes (other than this one) whose command line names something under ``root``."""
    needle = os.fsencode(str(root.resolve()))
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            found.append(int(entry.name))
    return found


def kill_leftovers(root: Path) -> list[int]:
    pids = pids_mentioning(root)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return pids


def stop_everything(cluster: Cluster, root: Path, timeout: float) -> dict[str, int | None]:
    """SIGTERM every daemon (they checkpoint and exit), SIGKILL each process group that outlives ``timeout``.

    A second Ctrl-C or SIGTERM while waiting skips the rest of the wait. Whatever still mentions the
    cluster directory afterwards (a daemon's own children, say) is killed too.
    """
    hurry = False

    def impatient(signum: int, frame: FrameType | None) -> None:
        nonlocal hurry
        hurry = True

    previous = {sig: signal.signal(sig, impatient) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        for proc in cluster.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while not hurry and time.monotonic() < deadline and any(p.poll() is None for p in cluster.procs.values()):
            time.sleep(0.05)
        codes: dict[str, int | None] = {}
        for name, proc in cluster.procs.items():
            if proc.poll() is None:  # not reaped yet, so its pid (= its process group) is still ours
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                codes[name] = None
            else:
                codes[name] = proc.returncode
        cluster.procs.clear()
        kill_leftovers(root)
        return codes
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def stop_on_signals() -> Any:
    """SIGTERM and SIGHUP unwind the demo as Ctrl-C does, through every ``finally``.

    Ctrl-C raises KeyboardInterrupt even when the demo was started with SIGINT ignored (``make demo &``).
    """

    def raise_stopped(signum: int, frame: FrameType | None) -> None:
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, raise_stopped) for sig in (signal.SIGTERM, signal.SIGHUP)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
