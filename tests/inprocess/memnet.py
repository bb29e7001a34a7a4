"""In-memory links between whole apps in one process: everything the daemon does but TCP.

``MemoryNet`` stands in for TCP only: a dial to a node's listen address becomes a
``trio.testing.memory_stream_pair`` whose far end the node's listener (or a test's hand-driven peer) serves,
TLS and all. A test can cut the dialler's end after any number of writes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
import trio.testing

from gossipfld.app import App


class CutStream(trio.abc.Stream):
    """A stream that breaks after ``writes`` calls to ``send_all``, as a link that goes away mid-exchange."""

    def __init__(self, inner: trio.abc.Stream, writes: int) -> None:
        self.inner, self.left = inner, writes

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.left <= 0:
            await self.inner.aclose()
            raise trio.BrokenResourceError("link cut by the test")
        self.left -= 1
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.left <= 0:
            raise trio.BrokenResourceError("link cut by the test")
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class MemoryNet:
    """Listen addresses to what serves them (an app's listener, or a test's hand-driven peer); ``connect``
    is what the apps' dialers call instead of TCP."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.serve: dict[tuple[str, int], Callable[[trio.abc.Stream, str], Awaitable[None]]] = {}
        self.cut_after: int | None = None  # wrap the next dial's client end in a CutStream
        self.writes = 0  # send_all calls of the last dial, for tests that cut at every step
        self.dialled: list[_Counting] = []  # the dialler's ends of the connections made so far

    def vanish(self) -> None:
        """The far ends of every connection made so far go silent, as a peer behind a partition: no close,
        no answer. Later dials work."""
        for stream in self.dialled:
            stream.silent = True

    def add(self, app: App) -> None:
        listen = app.config.listen
        self.serve[listen.address, listen.port] = app.listener.serve_connection
        app.dialer.connect = self.connect

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.serve[host, port], server, host)
        if self.cut_after is not None:
            return CutStream(client, self.cut_after)
        return _Counting(client, self)


class _Counting(CutStream):
    def __init__(self, inner: trio.abc.Stream, net: MemoryNet) -> None:
        super().__init__(inner, 1 << 30)
        net.writes = 0
        net.dialled.append(self)
        self.net = net
        self.silent = False  # the far end vanished: what is sent is lost, and nothing ever comes back

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.net.writes += 1
        if not self.silent:
            await super().send_all(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.silent:
            await trio.sleep_forever()
        return await super().receive_some(max_bytes)
