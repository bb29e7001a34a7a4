"""One peer connection as the daemon drives it: a trio stream, the conversation's table, a deadline on every read.

``Link`` is the only place where bytes meet the protocol: what it sends goes through
``Conversation.send`` and what it receives comes out of ``Conversation.next_event``, so the order of the
exchange is checked in one table (``gossipfl.protocol.exchange``) for every part of the daemon alike. Every
read has a deadline and every frame a size limit, so a slow or hostile peer costs one connection slot for a
bounded time and bounded memory.

How an exchange ended is told apart here, because operators read it in the counters: a peer's ``Error``
is ``RefusedByPeer`` (reason ``peer-<code>``); the end of the stream where the conversation may end is a
clean close (``receive`` returns None); a break anywhere else is ``LinkBroken``. With TLS 1.3 a client that
the server refuses completes its handshake and only sees the stream break before the server's first
message: on a dial, that is the peer's TLS refusing us.
"""

from __future__ import annotations

import contextlib
import ssl
from dataclasses import dataclass

import trio

from gossipfl.errors import LinkBroken, ProtocolError, Refusal, RefusedByPeer, RemoteProtocolError
from gossipfl.metrics import Counters
from gossipfl.protocol import framing, messages
from gossipfl.protocol.exchange import NEED_DATA, Closed, Conversation, Party

READ_SIZE = 1 << 16


def failure_reason(exc: BaseException) -> str:
    """The metric label for why an exchange ended early: a refusal's reason, ``timeout``, ``link``, or the
    error's type (``ConnectionRefusedError``, ``FrameTooLarge``) where that says it best."""
    if isinstance(exc, Refusal):
        return exc.reason
    if isinstance(exc, LinkBroken | trio.BrokenResourceError):
        return "link"
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    if isinstance(exc, RemoteProtocolError):
        return "protocol"
    return type(exc).__name__


# What a failed exchange may raise; everything else is a bug and propagates.
EXCHANGE_FAILURES = (Refusal, LinkBroken, ProtocolError, OSError, trio.TooSlowError, trio.BrokenResourceError)


@dataclass
class Traffic:
    """One connection's bytes: ``bytes_*`` are the protocol's frames, ``wire_*`` what crossed the socket
    (TLS records and handshakes included), which is what a router, a data plan and a radio pay for."""

    bytes_in: int = 0
    bytes_out: int = 0
    wire_in: int = 0
    wire_out: int = 0

    def take(self) -> Traffic:
        """The bytes since the last take: a kept-alive connection is accounted exchange by exchange."""
        taken = Traffic(self.bytes_in, self.bytes_out, self.wire_in, self.wire_out)
        self.bytes_in = self.bytes_out = self.wire_in = self.wire_out = 0
        return taken


class CountedStream(trio.abc.Stream):
    """The TCP stream under TLS, counting every byte it carries: for this connection (``traffic``) and for
    the node (``counters``, ``wire_in`` / ``wire_out``), so that a handshake refused before any frame, a
    stranger's garbage and a close_notify are counted too."""

    def __init__(self, stream: trio.abc.Stream, traffic: Traffic, counters: Counters) -> None:
        self.stream = stream
        self.traffic = traffic
        self.counters = counters

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)
        self.traffic.wire_out += len(data)
        self.counters.add("wire_out", len(data))

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.stream.receive_some(max_bytes)
        self.traffic.wire_in += len(data)
        self.counters.add("wire_in", len(data))
        return data

    async def aclose(self) -> None:
        await self.stream.aclose()


class Link:
    """Messages over one stream, in the conversation's order. Not safe for concurrent senders: one task owns it."""

    def __init__(self, stream: trio.abc.Stream, party: Party, limits: framing.Limits, read_timeout: float,
                 traffic: Traffic | None = None) -> None:
        self.stream = stream
        self.conversation = Conversation(party, limits)
        self.read_timeout = read_timeout
        self.traffic = traffic or Traffic()
        self.messages_in = 0

    @property
    def party(self) -> Party:
        return self.conversation.party

    def _broken(self, detail: str) -> LinkBroken | RefusedByPeer:
        if self.party is Party.DIALER and self.messages_in == 0 and isinstance(self.stream, trio.SSLStream):
            return RefusedByPeer("tls", detail + " (before the peer's first message: it may refuse our certificate)")
        return LinkBroken(detail)

    async def send(self, message: messages.Message) -> None:
        frame = self.conversation.send(message)
        try:
            with trio.fail_after(self.read_timeout):
                await self.stream.send_all(frame)
        except trio.BrokenResourceError as exc:
            raise self._broken(f"connection broken: {exc.__cause__ or exc}") from exc
        self.traffic.bytes_out += len(frame)

    async def refuse(self, code: messages.ErrorCode, exc: BaseException) -> None:
        """Tell the peer why we end the exchange, if the conversation is still open; never raises."""
        if self.conversation.finished:
            return
        with contextlib.suppress(*EXCHANGE_FAILURES):
            await self.send(messages.Error(code, str(exc)[:200]))

    async def next(self, timeout: float | None = None) -> messages.Message | None:
        """The next message, or None when the peer ended the stream where the exchange may end.

        ``timeout`` overrides the read timeout for a wait that is long by design (a client's local epochs)."""
        with trio.fail_after(self.read_timeout if timeout is None else timeout):
            while True:
                event = self.conversation.next_event()
                if isinstance(event, Closed):
                    if event.expected:
                        return None
                    raise self._broken(f"peer closed the connection in phase {event.phase.value}")
                if event is not NEED_DATA:
                    assert isinstance(event, messages.Message)
                    self.messages_in += 1
                    return event
                try:
                    data = await self.stream.receive_some(READ_SIZE)
                except trio.BrokenResourceError as exc:
                    raise self._broken(f"connection broken: {exc.__cause__ or exc}") from exc
                self.traffic.bytes_in += len(data)
                self.conversation.receive_data(data)

    async def receive(self, *kinds: type[messages.Message], timeout: float | None = None) -> messages.Message:
        """The next message, which must be one of ``kinds``: the peer's Error is ``RefusedByPeer`` (unless
        Error is a kind asked for), a clean close ``LinkBroken`` (we were waiting for an answer)."""
        message = await self.next(timeout)
        if message is None:
            raise LinkBroken("peer closed the connection instead of answering")
        if isinstance(message, messages.Error) and messages.Error not in kinds:
            raise peer_error(message)
        if not isinstance(message, kinds):
            raise RemoteProtocolError(f"expected {' or '.join(k.__name__ for k in kinds)}, got "
                                      f"{type(message).__name__}")
        return message

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
                await self.stream.aclose()


def peer_error(message: messages.Error) -> RefusedByPeer:
    """The peer's Error as a refusal, labelled ``peer-<code name>`` (or the number, for codes we do not know)."""
    try:
        code = messages.ErrorCode(message.code).name.lower()
    except ValueError:
        code = str(message.code)
    return RefusedByPeer(f"peer-{code}", message.text or "no detail")
