"""The blocking client of a running daemon's control socket, for the CLI (a short-lived synchronous program).

One connection per request: one line of JSON out, one line back (``gossipfl.control`` has the protocol,
shared with the daemon's server).
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gossipfl.control import MAX_REPLY_BYTES, TIMEOUT, Request, parse_reply
from gossipfl.errors import ControlError, ControlForbidden, DaemonNotRunning


@dataclass
class ControlClient:
    path: Path
    timeout: float = 30.0

    def call(self, command: str, **args: Any) -> Any:
        request = Request(command, args).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            self._connect(sock)
            try:
                sock.sendall(request)
                reply = self._read_line(sock)
            except TimeoutError:
                raise ControlError(f"the daemon at {self.path} did not answer within {self.timeout:g} s",
                                   TIMEOUT) from None
            except OSError as exc:
                raise ControlError(f"lost the connection to the daemon at {self.path}: {exc.strerror}") from None
        return parse_reply(reply)

    def _connect(self, sock: socket.socket) -> None:
        try:
            sock.connect(os.fsencode(self.path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning(f"gossipfld is not running (nothing listens on {self.path}); for another "
                                   "daemon give --socket PATH or --config NODE.toml, or set GOSSIPFL_SOCKET") from None
        except PermissionError:
            raise ControlForbidden(f"permission denied on {self.path}: run as root or as a member of the "
                                   f"socket's group (usually 'gossipfl')") from None
        except OSError as exc:
            if exc.errno in (errno.ENOTSOCK, errno.ENOTDIR):
                raise DaemonNotRunning(f"{self.path} is not a gossipfld control socket") from None
            raise ControlError(f"cannot reach the daemon at {self.path}: {exc.strerror}") from None

    def _read_line(self, sock: socket.socket) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if chunk.endswith(b"\n"):
                break
            if size > MAX_REPLY_BYTES:
                raise ControlError(f"the daemon's reply is over {MAX_REPLY_BYTES} bytes")
        if not chunks:
            raise ControlError(f"the daemon at {self.path} closed the connection without a reply")
        return b"".join(chunks)
