"""Gateway rounds in one process: a real gateway app and a real client app, and a hand-driven late client.

The late client is the daemon's own peering code with the test choosing when to answer: it holds its
update until the gateway has closed the round, which no timing of a real client can promise.
"""

from __future__ import annotations

import numpy as np
import pytest
import trio

from gossipfl.protocol.codec import encode_delta
from gossipfl.protocol.messages import GatewayRound, GatewayUpdate
from gossipfld.peering import meet, server_link

from .memnet import MemoryNet


def _know(gateway_app, client_app) -> None:
    listen = client_app.config.listen
    gateway_app.peers.seen(client_app.node_id, listen.address, listen.port, "mdns", trio.current_time())


async def _connect(g, c, nursery: trio.Nursery) -> None:
    """Gateway ``g`` and client ``c`` on one memory network, the client's data read, the gateway knowing it."""
    net = MemoryNet(nursery)
    net.add(g), net.add(c)
    await trio.to_thread.run_sync(c.learner.data.refresh)
    _know(g, c)


async def _rounds(g, c, count: int, nursery: trio.Nursery) -> list:
    """``count`` rounds of gateway ``g`` with client ``c``, each awaited until the client adopted its result."""
    reports = []
    for number in range(1, count + 1):
        reports.append(await g.gateway.one_round(g.peers.live(), nursery))
        while c.counters.values.get("fedavg.adopted", 0) < number:
            await trio.sleep(0.01)
    return reports


def test_a_round_leaves_the_client_holding_the_global_model(make_apps):
    g, c = make_apps(2, gateways=1, mode="fedavg", fedavg={"deadline": 30.0})

    async def main():
        async with trio.open_nursery() as nursery:
            await _connect(g, c, nursery)
            before = g.learner.model.params.copy()
            reports = await _rounds(g, c, 2, nursery)
            assert [(r.round, r.answered) for r in reports] == [(1, 1), (2, 1)]
            nursery.cancel_scope.cancel()
        assert np.abs(g.learner.model.params - before).max() > 1e-3  # the client's training moved the model
        # int8 downlink with error feedback: the client holds the global model to the codec's precision.
        np.testing.assert_allclose(c.learner.model.params, g.learner.model.params, atol=0.02)
        assert c.learner.age == g.learner.age > 0
        assert g.counters.values["fedavg.updates_received"] == 2 and c.counters.values["fedavg.updates_sent"] == 2

    trio.run(main)


@pytest.mark.parametrize("late_updates", ["drop", "discount"])
def test_an_answer_after_the_round_closed_is_dropped_or_folded_into_the_next(make_apps, late_updates):
    """Two clients, a quorum of one: the prompt client closes the round, and the late one answers after."""
    g, prompt, late = make_apps(3, gateways=1, mode="fedavg",
                                fedavg={"deadline": 30.0, "quorum": 0.5, "late_updates": late_updates})
    ends: list[object] = []
    step = np.full(g.learner.model.num_params, 0.01, np.float32)

    async def late_client(stream: trio.abc.Stream, remote: str) -> None:
        link = server_link(stream, late.admission, g.dialer.limits, 10.0, late.counters)
        await meet(link, late.admission, 10.0)
        opening = await link.receive(GatewayRound)
        assert isinstance(opening, GatewayRound) and opening.epochs == 1
        while g.counters.values.get("fedavg.rounds", 0) < 1:  # the round closed with the prompt client's answer
            await trio.sleep(0.01)
        await link.send(GatewayUpdate(opening.round, opening.new_seq, 50, opening.age + 50, encode_delta(step)))
        ends.append(await link.next())  # the gateway ends the exchange: no result for a late update
        await link.aclose()

    async def main():
        async with trio.open_nursery() as nursery:
            net = MemoryNet(nursery)
            net.add(g), net.add(prompt)
            listen = late.config.listen
            net.serve[listen.address, listen.port] = late_client
            await trio.to_thread.run_sync(prompt.learner.data.refresh)
            _know(g, prompt), _know(g, late)
            first = await g.gateway.one_round(g.peers.live(), nursery)
            assert first is not None and first.answered == 1 and first.selected == 2
            while not ends:
                await trio.sleep(0.01)
            after_first = g.learner.model.params.copy()
            second = await g.gateway.one_round([], nursery)  # a round with nobody new: only the buffer
            nursery.cancel_scope.cancel()
        assert ends == [None]
        if late_updates == "drop":
            assert g.counters.values["fedavg.late_dropped"] == 1
            assert second is None  # nothing to aggregate: the late update is gone
            np.testing.assert_array_equal(g.learner.model.params, after_first)
        else:
            assert g.counters.values["fedavg.late_buffered"] == 1
            assert second is not None and second.late_applied == 1 and second.participants == 1
            moved = g.learner.model.params - after_first
            assert np.all(moved > 0) and np.all(moved <= 0.01 + 1e-3)  # the step, discounted for staleness

    trio.run(main)


def test_a_member_claiming_the_gateway_role_is_not_followed_and_a_granted_gateway_is(make_apps):
    """Any certificate used to be followed once its Hello said role=gateway (0.95 -> 0.38 with a bad model)."""
    gateway, victim, impostor = make_apps(3, gateways=1, mode="auto", fedavg={"deadline": 30.0},
                                          per_node={2: {"node": {"role": "gateway", "mode": "gossip"}}})
    assert impostor.gateway is not None and victim.admission.gateways == {gateway.node_id}

    async def main():
        async with trio.open_nursery() as nursery:
            net = MemoryNet(nursery)
            net.add(gateway), net.add(victim), net.add(impostor)
            await trio.to_thread.run_sync(victim.learner.data.refresh)
            before = victim.learner.model.params.copy()
            _know(impostor, victim)
            assert await impostor.gateway.one_round(impostor.peers.live(), nursery) is None
            assert impostor.counters.values["fedavg.client_failed.peer-refused"] == 1
            assert victim.counters.values["refused.not-a-gateway"] == 1
            np.testing.assert_array_equal(victim.learner.model.params, before)
            assert victim.peers.get(impostor.node_id).role == "node"  # its claim bought no role
            _know(gateway, victim)
            report = await gateway.gateway.one_round(gateway.peers.live(), nursery)
            assert report is not None and report.answered == 1
            while victim.counters.values.get("fedavg.adopted", 0) < 1:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_client_with_no_usable_rows_still_takes_the_global_model(make_apps):
    g, c = make_apps(2, gateways=1, mode="fedavg", fedavg={"deadline": 30.0})
    for file in c.config.data.directory.iterdir():
        file.unlink()

    async def main():
        async with trio.open_nursery() as nursery:
            net = MemoryNet(nursery)
            net.add(g), net.add(c)
            await trio.to_thread.run_sync(c.learner.data.refresh)
            assert len(c.learner.data.train) == 0
            _know(g, c)
            g.learner.model.params[:] += 0.05  # a global model the fleet has moved
            g.learner._age = 500.0
            report = await g.gateway.one_round(g.peers.live(), nursery)
            assert report is None  # no update came back
            while c.counters.values.get("fedavg.adopted", 0) < 1:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        np.testing.assert_allclose(c.learner.model.params, g.learner.model.params, atol=0.02)
        assert c.learner.age == 500.0
        assert c.counters.values["refused.no-update"] == 1

    trio.run(main)
