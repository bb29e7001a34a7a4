"""The control socket: a Unix socket where the local ``gossipfl`` CLI asks questions and gives orders.

Who may do what is decided by the kernel's word, not the client's: SO_PEERCRED gives the caller's
uid, gid and pid. Root and the daemon's own user may change things (pause, block a peer); members
of the socket's group may only read. The socket file is 0660 and group-owned, so outsiders are
normally refused by the kernel at connect; the credential check is the second, authoritative line.

Every request is bounded: one line of at most ``max_request_bytes``, read and answered within
``timeout`` seconds, at most ``max_connections`` at once. A client that connects and says nothing
costs one slot for ``timeout`` seconds and then gets a timeout error.
"""

from __future__ import annotations

import grp
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from gossipfl import control
from gossipfl.errors import ConfigError, ControlError, GossipflError

from .logs import fields

log = logging.getLogger("gossipfld.control")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Caller:
    pid: int
    uid: int
    gid: int
    may_change: bool


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def supplementary_groups(pid: int) -> set[int]:
    """The caller's supplementary groups (SO_PEERCRED gives only the primary one)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass  # the caller may already be gone; then only its primary group counts
    return set()


def resolve_group(name: str) -> int | None:
    """The gid the socket is handed to: a group name or number; empty means the daemon's own group."""
    if not name:
        return None
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"control.group: no group named {name!r} on this system") from None


class ControlServer:
    def __init__(self, path: Path, commands: dict[str, Handler], *, group: str = "",
                 max_request_bytes: int = 1 << 20, max_connections: int = 8, timeout: float = 5.0) -> None:
        if set(commands) != set(control.COMMANDS):
            raise ValueError(f"handlers must cover exactly {sorted(control.COMMANDS)}")
        self.path = path
        self.commands = commands
        self.gid = resolve_group(group)
        self.max_request_bytes = max_request_bytes
        self.max_connections = max_connections
        self.timeout = timeout
        self.open = 0
        self.open_by_uid: dict[int, int] = {}
        self.served = 0
        self.refused: dict[str, int] = {}

    def _room_for(self, caller: Caller) -> bool:
        """Whether ``caller`` gets a slot: readers share all but one (kept for root and the daemon's own user,
        so a group member holding idle connections never locks the operator out), and one reader uid may hold
        at most half of theirs."""
        if caller.may_change:
            return self.open <= self.max_connections
        readers = self.open - sum(n for uid, n in self.open_by_uid.items() if uid == 0 or uid == os.geteuid())
        per_uid = max(1, (self.max_connections - 1) // 2)
        return readers <= self.max_connections - 1 and self.open_by_uid.get(caller.uid, 0) <= per_uid

    def counters(self) -> dict[str, float]:
        """Requests answered and refused, as ``control.*`` counters of the node's status."""
        return {"control.ok": self.served, **{f"control.{k}": v for k, v in self.refused.items()}}

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = await self._bind()
        try:
            listener = trio.SocketListener(sock)
            log.info("control socket ready", extra=fields(path=str(self.path)))
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle, [listener])
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                self._unlink_own_socket()

    # ---------------------------------------------------------------- socket file

    async def _bind(self) -> trio.socket.SocketType:
        path = self.path
        if len(os.fsencode(path)) > control.MAX_SOCKET_PATH:
            raise ConfigError(f"control.socket: {path} is longer than {control.MAX_SOCKET_PATH} bytes, "
                              "the limit of a Unix socket path")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as exc:
            raise ConfigError(f"control.socket: cannot create {path.parent}: {exc.strerror}; "
                              "set control.socket to a writable place") from None
        await self._remove_stale()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(os.fsencode(path))
            os.chmod(path, 0o660)
            if self.gid is not None:
                os.chown(path, -1, self.gid)
            sock.listen(self.max_connections)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"control.socket: cannot listen on {path}: {exc.strerror}") from None
        self._inode = os.stat(path).st_ino
        return sock

    async def _remove_stale(self) -> None:
        """A socket file left by a killed daemon is removed; one a live daemon answers on is not."""
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"control.socket: {self.path} exists and is not a socket; remove it or choose "
                              "another path")
        probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await probe.connect(os.fsencode(self.path))
        except ConnectionRefusedError:
            self.path.unlink(missing_ok=True)
            return
        except OSError as exc:
            raise ConfigError(f"control.socket: cannot check {self.path}: {exc.strerror}") from None
        finally:
            probe.close()
        raise ConfigError(f"control.socket: another gossipfld already answers on {self.path}")

    def _unlink_own_socket(self) -> None:
        try:
            if os.stat(self.path).st_ino == getattr(self, "_inode", None):
                self.path.unlink()
        except OSError:
            pass

    # ---------------------------------------------------------------- requests

    def _caller(self, stream: trio.SocketStream) -> Caller | None:
        pid, uid, gid = peer_credentials(stream.socket)
        if uid == 0 or uid == os.geteuid():
            return Caller(pid, uid, gid, may_change=True)
        socket_gid = self.gid if self.gid is not None else os.getegid()
        if gid == socket_gid or socket_gid in supplementary_groups(pid):
            return Caller(pid, uid, gid, may_change=False)
        return None

    def _refuse(self, code: str) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            caller = self._caller(stream)
        except OSError as exc:  # gone before we asked the kernel who it was
            log.debug("control client went away", extra=fields(error=str(exc)))
            await stream.aclose()
            return
        uid = caller.uid if caller is not None else -1
        self.open += 1
        self.open_by_uid[uid] = self.open_by_uid.get(uid, 0) + 1
        try:
            reply = await self._answer(stream, caller)
            with trio.move_on_after(self.timeout):
                await stream.send_all(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("control client went away", extra=fields(error=str(exc)))
        finally:
            self.open -= 1
            self.open_by_uid[uid] -= 1
            if not self.open_by_uid[uid]:
                del self.open_by_uid[uid]
            with trio.move_on_after(0.5):
                await stream.aclose()

    async def _answer(self, stream: trio.SocketStream, caller: Caller | None) -> bytes:
        if caller is None:
            self._refuse(control.FORBIDDEN)
            log.warning("control request refused", extra=fields(reason="not in the socket's group"))
            return control.encode_error(control.FORBIDDEN, "only root, the daemon's user and members of the "
                                                           "socket's group may use this socket")
        if not self._room_for(caller):
            self._refuse(control.BUSY)
            return control.encode_error(control.BUSY, f"over {self.max_connections} control connections; "
                                                      "try again")
        try:
            with trio.move_on_after(self.timeout) as scope:
                line = await self._read_line(stream)
            if scope.cancelled_caught:
                raise ControlError(f"no complete request within {self.timeout:g} s", control.TIMEOUT)
            request = control.parse_request(line)
            if request.changes_state and not caller.may_change:
                raise ControlError(f"{request.command!r} changes the daemon: only root and the daemon's own user "
                                   "may do that", control.FORBIDDEN)
            with trio.fail_after(self.timeout):
                result = await self.commands[request.command](request.args)
        except ControlError as exc:
            self._refuse(exc.code)
            return control.encode_error(exc.code, str(exc))
        except trio.TooSlowError:
            self._refuse(control.TIMEOUT)
            return control.encode_error(control.TIMEOUT, f"the command took over {self.timeout:g} s")
        except GossipflError as exc:
            self._refuse(control.FAILED)
            return control.encode_error(control.FAILED, str(exc))
        except Exception as exc:  # a handler's bug or an input it did not foresee: never the daemon's end
            self._refuse(control.BAD_REQUEST)
            log.exception("control request failed", extra=fields(error=str(exc)[:200]))
            return control.encode_error(control.BAD_REQUEST, f"the request could not be served: "
                                                             f"{type(exc).__name__}: {str(exc)[:200]}")
        self.served += 1
        if request.changes_state:
            log.info("control command", extra=fields(command=request.command, uid=caller.uid, pid=caller.pid))
        return control.encode_result(result)

    async def _read_line(self, stream: trio.SocketStream) -> bytes:
        buffer = bytearray()
        while b"\n" not in buffer:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            buffer += chunk
            if len(buffer) > self.max_request_bytes:
                raise _TooLarge(self.max_request_bytes)
        return bytes(buffer.split(b"\n", 1)[0])


class _TooLarge(ControlError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request is over the limit of {limit} bytes", control.TOO_LARGE)

