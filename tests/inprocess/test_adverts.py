"""Forged mDNS adverts that point into a black hole do not stop a node merging with the peers it has met."""

from __future__ import annotations

import trio

from .memnet import MemoryNet


def test_sixty_black_hole_adverts_leave_gossip_with_a_proven_peer_running(make_apps):
    a, b = make_apps(2, gossip={"period": 0.1, "max_backoff": 0.2})

    async def main():
        async with trio.open_nursery() as nursery:
            net = MemoryNet(nursery)
            net.add(a), net.add(b)
            listen = b.config.listen
            a.peers.seen(b.node_id, listen.address, listen.port, "mdns", trio.current_time())
            assert await a.gossip.push_to(a.peers.get(b.node_id))  # met once: a proven peer
            for i in range(60):  # adverts copied from the LAN, each to a port that accepts and never speaks
                port = 30000 + i
                net.serve["127.0.0.1", port] = lambda stream, remote: trio.sleep_forever()
                a.peers.seen(bytes([i + 1]) * 32, "127.0.0.1", port, "mdns", trio.current_time())
            before = a.counters.values["exchanges_out"]
            nursery.start_soon(a.gossip.run)
            with trio.fail_after(30):  # three exchanges in flight, each stuck 5 s on a fake: about 0.3 a minute
                while a.counters.values["exchanges_out"] < before + 10:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    trio.run(main)
