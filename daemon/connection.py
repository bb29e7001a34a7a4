"""One peer connection: mutual TLS, the identity checks, and wire messages with timeouts.

Every read has a deadline and every frame a size limit (the wire decoder refuses a frame from its
prefix, before buffering it), so a slow or hostile peer costs one connection slot for a bounded
time and bounded memory. With TLS 1.3 a client that the server refuses still completes the
handshake and fails on its first receive; that surfaces here as ``PeerRefused``.
"""

from __future__ import annotations

import contextlib
import ssl
from dataclasses import dataclass

import trio

from gossipfl.errors import GossipflError, ProtocolError
from gossipfl.identity.ids import check_peer
from gossipfl.protocol import framing, messages

READ_SIZE = 1 << 16


class PeerRefused(GossipflError):
    """The TLS layer or the peer refused us (or we refused it); ``reason`` is a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


class LinkBroken(GossipflError):
    """The connection broke in the middle of an exchange both ends had accepted: a peer that stopped or
    crashed, a route that went away. A failure of the link, counted apart from refusals so that an
    operator's ``refused.*`` counters mean what they say."""

    reason = "link"


def failure_reason(exc: BaseException) -> str:
    """The metric label for why an exchange ended early: the refusal's reason, ``timeout``, ``link``, or
    the error's type (``ConnectionRefusedError``, ``FrameError``) where that says it best."""
    if isinstance(exc, PeerRefused | LinkBroken):
        return exc.reason
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    if isinstance(exc, trio.BrokenResourceError):
        return "link"
    return type(exc).__name__


@dataclass
class Traffic:
    bytes_in: int = 0
    bytes_out: int = 0


class MessageStream:
    """Wire messages over a TLS stream. Not safe for concurrent senders; one task owns it."""

    def __init__(self, stream: trio.SSLStream, limits: framing.Limits, read_timeout: float) -> None:
        self.stream = stream
        self.decoder = framing.FrameDecoder(limits)
        self.read_timeout = read_timeout
        self.traffic = Traffic()
        self.messages_in = 0

    def _broken(self, exc: trio.BrokenResourceError) -> GossipflError:
        """What a broken stream means here. With TLS 1.3 the server checks the client's certificate after
        the client's handshake has returned, so a dialler refused by the peer only learns of it as a broken
        stream before the peer's first message; any other break is the link's."""
        detail = f"connection broken: {exc.__cause__ or exc}"
        if not self.stream.server_side and self.messages_in == 0:
            return PeerRefused("tls", detail + " (before the peer's first message: it may refuse our certificate)")
        return LinkBroken(detail)

    async def send(self, message: messages.Message) -> None:
        frame = framing.encode(message)
        try:
            with trio.fail_after(self.read_timeout):
                await self.stream.send_all(frame)
        except trio.BrokenResourceError as exc:
            raise self._broken(exc) from exc
        self.traffic.bytes_out += len(frame)

    async def receive(self, timeout: float | None = None) -> messages.Message:
        """The next message; ProtocolError on garbage, trio.TooSlowError on silence, PeerRefused on EOF.

        ``timeout`` overrides the read timeout for a wait that is long by design, such as a gateway
        waiting for a client to finish its local epochs."""
        with trio.fail_after(self.read_timeout if timeout is None else timeout):
            while True:
                message = self.decoder.next_message()
                if message is not None:
                    self.messages_in += 1
                    return message
                try:
                    data = await self.stream.receive_some(READ_SIZE)
                except trio.BrokenResourceError as exc:
                    raise self._broken(exc) from exc
                if not data:
                    raise PeerRefused("closed", "peer closed the connection")
                self.traffic.bytes_in += len(data)
                self.decoder.feed(data)

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
                await self.stream.aclose()


async def tls_handshake(stream: trio.SSLStream, timeout: float) -> None:
    try:
        with trio.fail_after(timeout):
            await stream.do_handshake()
    except trio.TooSlowError:
        raise PeerRefused("timeout", "TLS handshake timed out") from None
    except trio.BrokenResourceError as exc:
        raise PeerRefused("tls", f"TLS handshake failed: {exc.__cause__ or exc}") from exc


def verify_peer(stream: trio.SSLStream, expected_id: bytes | None, allowlist: frozenset[bytes] | None) -> bytes:
    """The peer's node id from its certificate, checked against what we dialled and the allowlist."""
    try:
        return check_peer(stream, expected_id=expected_id, allowlist=allowlist)
    except GossipflError as exc:
        raise PeerRefused("identity", str(exc)) from exc


def expect(message: messages.Message, *types: type[messages.Message]) -> messages.Message:
    """Raise on a peer's Error or on a message of the wrong kind at this point of the exchange."""
    if isinstance(message, messages.Error) and messages.Error not in types:
        known = message.code in messages.ErrorCode.__members__.values()
        code = messages.ErrorCode(message.code).name.lower() if known else str(message.code)
        raise PeerRefused(f"peer-{code}", message.text or "no detail")
    if not isinstance(message, types):
        names = " or ".join(t.__name__ for t in types)
        raise ProtocolError(f"expected {names}, got {type(message).__name__}")
    return message
