"""Prometheus metrics over HTTP on a loopback port, for a local scraper or node exporter proxy.

Deliberately tiny: HTTP/1.0, ``GET /metrics`` only, one request per connection, a bounded request
head read under a deadline. Anything else gets a 4xx and the connection is closed; this is not a
general web server and must not grow into one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from gossipfl.config import parse_host_port

from .logs import fields

log = logging.getLogger("gossipfld.metrics")

MAX_HEAD = 8192
TIMEOUT = 5.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode() + body


async def serve_metrics(listen: str, render: Callable[[], str], *,
                        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    host, port = parse_host_port(listen, "control.metrics_listen")
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    log.info("metrics endpoint ready", extra=fields(url=f"http://{host}:{bound}/metrics"))
    async with trio.open_nursery() as nursery:
        task_status.started(bound)
        await trio.serve_listeners(lambda stream: _handle(stream, render), listeners, handler_nursery=nursery)


async def _handle(stream: trio.SocketStream, render: Callable[[], str]) -> None:
    """One request; a client that resets or stalls costs only its own connection, never the daemon."""
    try:
        async with stream:
            await _answer(stream, render)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.debug("metrics client went away", extra=fields(error=str(exc)))


async def _answer(stream: trio.SocketStream, render: Callable[[], str]) -> None:
    head = bytearray()
    with trio.move_on_after(TIMEOUT):
        while b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) <= MAX_HEAD:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            head += chunk
    request_line = bytes(head).split(b"\n", 1)[0].strip().split()
    if len(head) > MAX_HEAD:
        reply = _response("431 Request Header Fields Too Large", b"request head too large\n")
    elif len(request_line) < 2 or request_line[0] != b"GET":
        reply = _response("405 Method Not Allowed", b"only GET /metrics\n")
    elif request_line[1] != b"/metrics":
        reply = _response("404 Not Found", b"only /metrics\n")
    else:
        reply = _response("200 OK", render().encode(), CONTENT_TYPE)
    with trio.move_on_after(TIMEOUT):
        await stream.send_all(reply)
