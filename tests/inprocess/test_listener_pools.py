"""Idle connections from hosts without a certificate never take the slots of peers we have met (real TCP)."""

from __future__ import annotations

import trio

STRANGERS = ("127.0.0.2", "127.0.0.3")


def test_strangers_holding_idle_connections_leave_room_for_a_proven_peer(make_apps):
    a, b = make_apps(2)  # limits.max_connections 32: 16 idle connections from each of two hosts filled them

    async def main():
        async with trio.open_nursery() as nursery:
            port = await nursery.start(b.listener.serve, "127.0.0.1", 0)
            a.peers.seen(b.node_id, "127.0.0.1", port, "mdns", trio.current_time())
            peer = a.peers.get(b.node_id)
            assert await a.gossip.push_to(peer)  # B has met A: A's address is a peer's now
            idle = []
            for host in STRANGERS:
                for _ in range(b.config.limits.max_connections // 2):
                    idle.append(await trio.open_tcp_stream("127.0.0.1", port, local_address=host))
            with trio.fail_after(10):  # every stranger connection is accepted and held, or turned away
                while b.listener.strangers + b.counters.values.get("refused.overloaded", 0) < len(idle):
                    await trio.sleep(0.01)
            assert b.listener.strangers == b.listener.stranger_pool
            merges = b.counters.values["merges"]
            assert await a.gossip.push_to(peer), a.counters.values
            assert b.counters.values["merges"] > merges
            for stream in idle:
                await stream.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)
