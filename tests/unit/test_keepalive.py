"""The dialler's kept connections: one per peer, at most ``limit``, none older than ``idle``, oldest closed first."""

from __future__ import annotations

import trio
import trio.testing

from gossipfld.keepalive import KeptConnections


class _Link:
    """Stands in for a Link: the pool only holds it and hands it to the closer."""

    def __init__(self, name: str) -> None:
        self.name = name


def _pool(idle: float = 10.0, limit: int = 2) -> tuple[KeptConnections, list[str]]:
    closed: list[str] = []

    async def close(peer_id: bytes, link) -> None:
        closed.append(f"{peer_id.decode()}:{link.name}")

    return KeptConnections(idle, limit, close), closed


def test_a_kept_connection_is_taken_once_and_only_while_fresh():
    async def main():
        pool, closed = _pool()
        await pool.keep(b"a", _Link("1"), None, now=0.0)
        assert pool.take(b"b", 1.0) is None
        kept = pool.take(b"a", 9.0)
        assert kept is not None and kept.link.name == "1"
        assert pool.take(b"a", 9.0) is None  # taken out while in use
        await pool.keep(b"a", kept.link, None, now=9.0)
        assert pool.take(b"a", 19.0) is None  # idle 10 s: too old to trust, left for the janitor
        await pool.close_expired(19.0)
        assert closed == ["a:1"] and len(pool) == 0

    trio.run(main)


def test_past_the_limit_the_oldest_idle_connection_closes():
    async def main():
        pool, closed = _pool(limit=2)
        for i, peer in enumerate((b"a", b"b", b"c")):
            await pool.keep(peer, _Link(str(i)), None, now=float(i))
        assert closed == ["a:0"] and len(pool) == 2
        assert pool.take(b"b", 3.0) is not None and pool.take(b"c", 3.0) is not None

    trio.run(main)


def test_the_janitor_closes_expired_connections_and_all_when_cancelled():
    async def main():
        pool, closed = _pool(idle=4.0, limit=8)
        await pool.keep(b"a", _Link("old"), None, now=trio.current_time())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run)
            await trio.sleep(2.0)
            await pool.keep(b"b", _Link("new"), None, now=trio.current_time())
            await trio.sleep(3.0)  # "old" is 5 s idle, "new" 3 s
            assert closed == ["a:old"]
            nursery.cancel_scope.cancel()
        assert closed == ["a:old", "b:new"]  # what was still kept closes with the pool

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_idle_zero_keeps_nothing():
    pool, _ = _pool(idle=0.0)
    assert not pool.enabled
