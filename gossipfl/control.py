"""The control-socket protocol between ``gossipfl`` and a running ``gossipfld``.

One connection per request, like ``syncthing cli`` over its REST socket but simpler: the client sends
one line of JSON, ``{"v": 1, "command": "status", "args": {}}``, and reads one line back, either
``{"v": 1, "ok": true, "result": ...}`` or ``{"v": 1, "ok": false, "error": {"code": ..., "message": ...}}``.
The version lets a newer CLI talk to an older daemon and say so plainly instead of misreading a reply.

Parsing is pure (bytes in, typed values or ``ControlError`` out) so the daemon's server and the CLI's
client (``gossipfl.cli.client``, blocking on purpose: the CLI is a short-lived synchronous program) share it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gossipfl.errors import ControlError, ControlForbidden

PROTOCOL = 1
DEFAULT_SOCKET = Path("/run/gossipfl/control.sock")
SOCKET_ENV = "GOSSIPFL_SOCKET"
MAX_REPLY_BYTES = 1 << 30  # a model export of ~200 M parameters, base64-coded
# AF_UNIX paths are limited by sun_path (108 bytes on Linux, including the terminating NUL).
MAX_SOCKET_PATH = 107

# Every command the daemon knows, and whether it changes anything. Read-only commands are open to
# members of the socket's group; changing ones need root or the daemon's own user.
COMMANDS: dict[str, bool] = {
    "status": False,
    "peers": False,
    "metrics": False,
    "model.export": False,
    "predict": False,
    "pause": True,
    "resume": True,
    "peer.block": True,
    "peer.unblock": True,
}

# Error codes a reply may carry; the CLI maps some of them to their own exit codes.
BAD_REQUEST = "bad_request"
TOO_LARGE = "too_large"
UNKNOWN_COMMAND = "unknown_command"
FORBIDDEN = "forbidden"
TIMEOUT = "timeout"
BUSY = "busy"
FAILED = "failed"
VERSION = "version"


@dataclass(frozen=True)
class Request:
    command: str
    args: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps({"v": PROTOCOL, "command": self.command, "args": self.args},
                          separators=(",", ":")).encode() + b"\n"

    @property
    def changes_state(self) -> bool:
        return COMMANDS[self.command]


MAX_DEPTH = 8  # nesting of arrays and objects in a request; a predict request needs 3
MAX_NUMBER_CHARS = 40  # digits of one JSON number: more is no sensor reading, and big ints cost quadratic time


def _bounded_int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise ValueError(f"a number of {len(text)} digits (at most {MAX_NUMBER_CHARS})")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text) if len(text) <= MAX_NUMBER_CHARS else math.inf
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]}... is not a finite float")
    return value


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _depth(obj: Any) -> int:
    """How deeply arrays and objects nest, without recursion (a hostile request must not be able to
    exhaust the stack of the process that parses it)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:
                stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_request(line: bytes) -> Request:
    """A request line, checked: ``ControlError`` with a code that the reply will carry. Hostile input (deep
    nesting, huge numbers, NaN) is refused before it can cost more than one pass over its bytes."""
    try:
        obj = json.loads(line, parse_int=_bounded_int, parse_float=_finite_float, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ControlError(f"request is not valid JSON: {exc}", BAD_REQUEST) from None
    except RecursionError:  # json recurses once per level, and stops cleanly at the interpreter's limit
        raise ControlError(f"request nests deeper than {MAX_DEPTH} levels", BAD_REQUEST) from None
    except ValueError as exc:
        raise ControlError(f"request refused: {exc}", BAD_REQUEST) from None
    if _depth(obj) > MAX_DEPTH:
        raise ControlError(f"request nests deeper than {MAX_DEPTH} levels", BAD_REQUEST)
    if not isinstance(obj, dict):
        raise ControlError("request must be a JSON object", BAD_REQUEST)
    if obj.get("v") != PROTOCOL:
        raise ControlError(f"unsupported protocol version {obj.get('v')!r}; this daemon speaks {PROTOCOL}", VERSION)
    command, args = obj.get("command"), obj.get("args", {})
    if not isinstance(command, str):
        raise ControlError("request has no \"command\" string", BAD_REQUEST)
    if command not in COMMANDS:
        raise ControlError(f"unknown command {command[:64]!r} (known: {', '.join(COMMANDS)})", UNKNOWN_COMMAND)
    if not isinstance(args, dict):
        raise ControlError("\"args\" must be a JSON object", BAD_REQUEST)
    return Request(command, args)


def encode_result(result: Any) -> bytes:
    return json.dumps({"v": PROTOCOL, "ok": True, "result": result}, separators=(",", ":")).encode() + b"\n"


def encode_error(code: str, message: str) -> bytes:
    return json.dumps({"v": PROTOCOL, "ok": False, "error": {"code": code, "message": message}},
                      separators=(",", ":")).encode() + b"\n"


def parse_reply(data: bytes) -> Any:
    """The result of a reply, or the daemon's error raised as the matching ``ControlError``."""
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ControlError(f"the daemon's reply is not valid JSON: {exc}") from None
    if not isinstance(obj, dict) or obj.get("v") != PROTOCOL or not isinstance(obj.get("ok"), bool):
        raise ControlError(f"the daemon speaks another control protocol than version {PROTOCOL}", VERSION)
    if obj["ok"]:
        return obj.get("result")
    error = obj.get("error") if isinstance(obj.get("error"), dict) else {}
    code, message = str(error.get("code", FAILED)), str(error.get("message", "no message"))
    if code == FORBIDDEN:
        raise ControlForbidden(message)
    raise ControlError(f"daemon refused {code}: {message}", code)


def socket_path(explicit: str | None = None, config_socket: Path | None = None) -> Path:
    """Where to find the daemon: --socket, else $GOSSIPFL_SOCKET, else the config's, else the default."""
    if explicit:
        return Path(explicit)
    if os.environ.get(SOCKET_ENV):
        return Path(os.environ[SOCKET_ENV])
    return config_socket or DEFAULT_SOCKET
