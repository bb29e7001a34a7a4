"""Keep-alive between two real apps in one process: the next push rides the last exchange's connection.

TLS, the Hellos, the conversation's table, the references and the merge are the daemon's own; only TCP is a
memory stream. Each exchange is awaited to its end, and the tests wait for the listener to be idle (waiting
for the next push), never for a time.
"""

from __future__ import annotations

import numpy as np
import trio

from gossipfl.protocol import messages
from gossipfl.protocol.budget import PeerBudget
from gossipfld.transfer import send_model

from .memnet import MemoryNet
from .test_gossip_exchange import _expected_average, _meet, _train


def _count_dials(app) -> list[int]:
    """Dials made by ``app`` from now on (one entry each)."""
    dials: list[int] = []
    connect = app.dialer.connect

    async def counting(host: str, port: int):
        dials.append(port)
        return await connect(host, port)

    app.dialer.connect = counting
    return dials


async def _wait_idle(app, connections: int = 1) -> None:
    """Until ``app``'s listener holds ``connections`` connections, all waiting for a next push."""
    while app.listener.busy or app.listener.serving != connections:
        await trio.sleep(0.01)


def _overhead(app) -> int:
    """Bytes on the wire beyond the protocol's frames, both ways: TLS records, and handshakes."""
    c = app.counters.values
    return c.get("wire_out", 0) + c.get("wire_in", 0) - c.get("bytes_out", 0) - c.get("bytes_in", 0)


def _apps(make_apps, n: int = 2, **plan):
    apps = make_apps(n, gossip={"scheme": "float32", "merge": "age"}, **plan)  # exact averages, computed here
    for app in apps:
        app.gossip.budget = PeerBudget(rate=1e6, burst=1e6, full_every=0)  # these tests are not about rates
    return apps


async def _exchange_checked(a, b, peer) -> None:
    """One push-pull from A to B that must give both the exact age-weighted average."""
    await _train(a, 5)
    pa, age_a = a.learner.model.params.copy(), a.learner.age
    pb, age_b = b.learner.model.params.copy(), b.learner.age
    assert await a.gossip.push_to(peer)
    expected, _ = _expected_average(pb, age_b, pa, age_a)
    np.testing.assert_allclose(b.learner.model.params, expected, atol=1e-6)
    np.testing.assert_allclose(a.learner.model.params, b.learner.model.params, atol=1e-6)


async def _joined(nursery, *apps) -> MemoryNet:
    """The apps on one memory network, each trained apart, all but the second knowing the second's address."""
    net = MemoryNet(nursery)
    for app in apps:
        net.add(app)
    for app, steps in zip(apps, (20, 35, 15), strict=False):
        await _train(app, steps)
    for app in apps[:1] + apps[2:]:
        _meet(app, apps[1], trio.current_time())
    return net


def test_the_next_push_reuses_the_connection_and_pays_no_second_handshake(make_apps):
    a, b = _apps(make_apps)

    async def main():
        async with trio.open_nursery() as nursery:
            await _joined(nursery, a, b)
            dials = _count_dials(a)
            peer = a.peers.get(b.node_id)
            overheads = []
            for _ in range(3):
                before = _overhead(a)
                await _exchange_checked(a, b, peer)
                await _wait_idle(b)
                overheads.append(_overhead(a) - before)
            nursery.cancel_scope.cancel()
        assert len(dials) == 1 and a.counters.values["connections_reused"] == 2
        assert b.counters.values["exchanges_in"] == 3 and b.counters.values["pulls_answered"] == 3
        # The first exchange carried the TLS handshake (two certificates); the others only record framing.
        assert overheads[0] > 2000, overheads
        assert max(overheads[1:]) < 400, overheads
        assert b.peers.get(a.node_id).stats.exchanges == 3 and a.peers.get(b.node_id).stats.exchanges == 3

    trio.run(main)


def test_a_connection_the_listener_closed_while_idle_is_dialled_anew(make_apps):
    a, b = _apps(make_apps)

    async def main():
        async with trio.open_nursery() as nursery:
            await _joined(nursery, a, b)
            dials = _count_dials(a)
            peer = a.peers.get(b.node_id)
            b.listener.keep_alive = 0  # B offered keep-alive in its Hello, but closes each connection at once
            await _exchange_checked(a, b, peer)
            while b.listener.serving:  # B closed it; A still holds its end, kept for the next push
                await trio.sleep(0.01)
            assert len(a.gossip.kept) == 1
            failed = {k: v for k, v in a.counters.values.items() if k.startswith("failed.")}
            await _exchange_checked(a, b, peer)
            nursery.cancel_scope.cancel()
        assert len(dials) == 2 and a.counters.values["connections_stale"] == 1
        assert {k: v for k, v in a.counters.values.items() if k.startswith("failed.")} == failed
        assert not any(k.startswith(("refused.", "dropped.")) for k in b.counters.values)

    trio.run(main)


def test_a_kept_connection_that_goes_silent_is_given_up_after_the_connect_timeout(make_apps):
    # The read timeout is far longer than the test waits: only the connect timeout can end the silent push.
    a, b = _apps(make_apps, extra={"limits": {"connect_timeout": 0.2, "read_timeout": 60.0}})

    async def main():
        async with trio.open_nursery() as nursery:
            net = await _joined(nursery, a, b)
            dials = _count_dials(a)
            peer = a.peers.get(b.node_id)
            await _exchange_checked(a, b, peer)
            await _wait_idle(b)
            net.vanish()  # B's end of the kept connection says nothing more, and nothing closes it
            with trio.fail_after(30):  # a bound on a hang, not a timing: the read timeout is 60 s
                await _exchange_checked(a, b, peer)
            nursery.cancel_scope.cancel()
        assert len(dials) == 2 and a.counters.values["connections_stale"] == 1
        assert not any(k.startswith("failed.") for k in a.counters.values)

    trio.run(main)


def test_a_peer_blocked_after_the_hellos_is_refused_on_its_kept_connection(make_apps):
    a, b = _apps(make_apps)

    async def main():
        async with trio.open_nursery() as nursery:
            await _joined(nursery, a, b)
            peer = a.peers.get(b.node_id)
            await _exchange_checked(a, b, peer)
            await _wait_idle(b)
            b.peers.blocked.add(a.node_id)  # what `gossipfl peer block` does
            merges = b.counters.values["merges"]
            assert not await a.gossip.push_to(peer)
            while b.listener.serving:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert b.counters.values["refused.blocked"] == 1 and b.counters.values["merges"] == merges
        assert a.counters.values["failed.peer-refused"] == 1
        assert len(a.gossip.kept) == 0  # a refused exchange's connection is never kept

    trio.run(main)


def test_an_idle_connection_yields_its_slot_to_a_new_one(make_apps):
    # One connection slot per host (max_connections 2: a host may hold half): A's idle one holds it.
    a, b, c = _apps(make_apps, 3, extra={"limits": {"max_connections": 2}})

    async def main():
        async with trio.open_nursery() as nursery:
            await _joined(nursery, a, b, c)
            # Every dial comes from a host B knows: the known pool, where a host may hold one slot.
            b.peers.seen(c.node_id, "127.0.0.1", 1, "static", trio.current_time())
            await _exchange_checked(a, b, a.peers.get(b.node_id))
            await _wait_idle(b)
            await _exchange_checked(c, b, c.peers.get(b.node_id))  # takes the slot A's idle connection held
            await _exchange_checked(a, b, a.peers.get(b.node_id))  # A finds its connection closed: dials anew
            nursery.cancel_scope.cancel()
        assert b.counters.values["connections_yielded"] >= 1
        assert "refused.overloaded" not in b.counters.values
        assert a.counters.values["connections_stale"] == 1

    trio.run(main)


def test_push_only_pushes_follow_each_other_on_one_connection(make_apps):
    # No pulls: after its Ack the listener waits for the next push, not for a pull that will not come.
    a, b = make_apps(2, gossip={"scheme": "float32", "push_pull": False})
    b.gossip.budget = PeerBudget(rate=1e6, burst=1e6, full_every=0)

    async def main():
        async with trio.open_nursery() as nursery:
            await _joined(nursery, a, b)
            dials = _count_dials(a)
            for _ in range(3):
                await _train(a, 5)
                assert await a.gossip.push_to(a.peers.get(b.node_id))
                await _wait_idle(b)
            nursery.cancel_scope.cancel()
        assert len(dials) == 1 and b.counters.values["merges"] == 3
        assert not [k for k in {**a.counters.values, **b.counters.values} if k.startswith(("failed.", "refused.",
                                                                                             "dropped.", "pulls"))]

    trio.run(main)


def test_a_peer_that_offered_pulls_may_push_again_instead_of_pulling(make_apps):
    """Both Hellos offer push-pull, so B waits for a pull after its Ack; a second push comes instead. The table
    allows it on a kept-alive connection: B serves it as the next exchange (this once ended the daemon)."""
    a, b = _apps(make_apps)

    async def main():
        async with trio.open_nursery() as nursery:
            await _joined(nursery, a, b)
            link, met = await a.dialer.dial(a.peers.get(b.node_id))
            for _ in range(2):
                params, age = await a.learner.snapshot()
                push, answer = await send_model(link, a.references, met.peer_id, params, a.gossip._wrap(age),
                                                a.counters)
                a.references.commit_push(push)
                assert isinstance(answer, messages.Ack)
            await link.aclose()
            while b.listener.serving:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert b.counters.values["merges"] == 2 and b.counters.values["exchanges_in"] == 2
        assert not [k for k in b.counters.values if k.startswith(("refused.", "dropped.", "pulls"))]

    trio.run(main)
