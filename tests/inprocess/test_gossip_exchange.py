"""Gossip between two real apps in one process: push, need-full, push-pull, and a link cut at every step.

Everything but TCP is the daemon's own: TLS with the cluster's certificates, the conversation's table, the
references, the learner's merge. No daemon process, no sleeps: each exchange is awaited to its end.
"""

from __future__ import annotations

import numpy as np
import trio

from gossipfl.learning.merge import age_weighted_merge
from gossipfl.protocol.budget import PeerBudget

from .memnet import MemoryNet


def _meet(a, b, now: float) -> None:
    """A knows B's address, as mDNS would have told it."""
    listen = b.config.listen
    a.peers.seen(b.node_id, listen.address, listen.port, "mdns", now)


async def _train(app, steps: int = 20) -> None:
    await trio.to_thread.run_sync(app.learner.data.refresh)
    train = app.learner.data.train
    async with app.learner.lock:  # what the learner's training loop does, a known amount of it
        await trio.to_thread.run_sync(app.learner.trainer.train_steps, train.x, train.y, steps)


def _expected_average(a_params, a_age, b_params, b_age):
    local = a_params.copy()
    merged = age_weighted_merge(local, a_age, b_params, b_age)
    return local, merged.age


def test_push_pull_leaves_both_ends_with_the_same_average(make_apps):
    # lossless, so the averages can be compared exactly; the plain age rule, whose shares the test computes
    a, b = make_apps(2, gossip={"scheme": "float32", "merge": "age"})

    async def main():
        async with trio.open_nursery() as nursery:
            net = MemoryNet(nursery)
            net.add(a), net.add(b)
            await _train(a), await _train(b, 35)
            a.learner._age, b.learner._age = 100.0, 300.0
            pa, pb = a.learner.model.params.copy(), b.learner.model.params.copy()
            assert np.abs(pa - pb).max() > 0.05
            _meet(a, b, trio.current_time())
            assert await a.gossip.push_to(a.peers.get(b.node_id))
            await wait_quiet(b)
            nursery.cancel_scope.cancel()
        # B merged A's model by age; A pulled B's pre-merge model and merged it the same way.
        expected, age = _expected_average(pb, 300.0, pa, 100.0)
        np.testing.assert_allclose(b.learner.model.params, expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(a.learner.model.params, b.learner.model.params, rtol=0, atol=1e-6)
        assert a.learner.age == b.learner.age == age
        assert a.counters.values["exchanges_out"] == 1 and a.counters.values["pulls"] == 1
        assert b.counters.values["exchanges_in"] == 1 and b.counters.values["pulls_answered"] == 1
        assert a.counters.values["full_models_sent"] == 1  # nobody held a reference yet: base 0 both ways
        # Bytes on the wire are counted under TLS: the frames plus records and the handshake's certificates.
        ca, cb = a.counters.values, b.counters.values
        assert ca["wire_out"] > ca["bytes_out"] + 1000 and ca["wire_in"] > ca["bytes_in"] + 1000
        # what one end sent is what the other received (a close_notify still in flight at most)
        assert ca["wire_in"] - 100 <= cb["wire_out"] and cb["wire_in"] <= ca["wire_out"] <= cb["wire_in"] + 100
        stats = a.peers.get(b.node_id).stats  # one connection: the peer's share is all of it
        assert (stats.wire_out, stats.wire_in, stats.bytes_out) == (ca["wire_out"], ca["wire_in"], ca["bytes_out"])

    trio.run(main)


async def wait_quiet(app) -> None:
    """Until no inbound connection is in an exchange (kept-alive idle ones do not count)."""
    while app.listener.busy:
        await trio.sleep(0.01)


def test_a_receiver_that_lost_its_reference_asks_for_the_whole_model(make_apps):
    a, b = make_apps(2, gossip={"push_pull": False})

    async def main():
        async with trio.open_nursery() as nursery:
            net = MemoryNet(nursery)
            net.add(a), net.add(b)
            _meet(a, b, trio.current_time())
            peer = a.peers.get(b.node_id)
            assert await a.gossip.push_to(peer)
            await wait_quiet(b)
            await _train(a)
            assert await a.gossip.push_to(peer)  # a delta against the reference B holds
            await wait_quiet(b)
            assert "need_full_sent" not in b.counters.values
            b.references.forget(a.node_id)  # B restarted without its references
            await _train(a)
            assert await a.gossip.push_to(peer)
            await wait_quiet(b)
            nursery.cancel_scope.cancel()
        assert b.counters.values["need_full_sent"] == 1 and a.counters.values["need_full_received"] == 1
        assert a.counters.values["full_models_sent"] == 2  # the first push, and the resend
        assert b.counters.values["merges"] == 3
        # Both ends hold the same copy of A's model: the next delta would decode against the same base.
        held_by_b = b.references.incoming[a.node_id]
        held_of_b = a.references.outgoing[b.node_id]
        assert held_by_b.seq == held_of_b.seq
        np.testing.assert_array_equal(held_by_b.values, held_of_b.values)

    trio.run(main)


def test_a_link_cut_at_every_step_leaves_both_ends_consistent(make_apps):
    """Cut the dialler's link after each of its writes (TLS handshake, Hello, push, pull, acks): no crash, the
    failure is counted, and the next clean exchange still gives both ends one exact average."""
    # The exact average the test computes; a new connection for every exchange, each cut on its own dial.
    a, b = make_apps(2, gossip={"scheme": "float32", "merge": "age", "keep_alive": 0})
    b.gossip.budget = PeerBudget(rate=1e6, burst=1e6, full_every=0)  # this test is about consistency, not rates

    async def main():
        async with trio.open_nursery() as nursery:
            net = MemoryNet(nursery)
            net.add(a), net.add(b)
            await _train(a), await _train(b, 35)
            _meet(a, b, trio.current_time())
            peer = a.peers.get(b.node_id)
            assert await a.gossip.push_to(peer)  # a clean exchange first: count the writes it takes
            await wait_quiet(b)
            writes = net.writes
            assert writes >= 5
            for cut in range(writes - 1):  # the last write is TLS's goodbye, after the exchange is complete
                net.cut_after = cut
                failed = sum(v for k, v in a.counters.values.items() if k.startswith("failed."))
                assert not await a.gossip.push_to(peer), cut
                await wait_quiet(b)
                assert sum(v for k, v in a.counters.values.items() if k.startswith("failed.")) == failed + 1
                peer.failures, peer.next_try, peer.evicted = 0, 0.0, False  # keep it chosen
                net.cut_after = None
                await _train(a, 5)
                pa, age_a = a.learner.model.params.copy(), a.learner.age
                pb, age_b = b.learner.model.params.copy(), b.learner.age
                assert await a.gossip.push_to(peer), cut
                await wait_quiet(b)
                expected, _ = _expected_average(pb, age_b, pa, age_a)
                np.testing.assert_allclose(b.learner.model.params, expected, atol=1e-6, err_msg=f"cut {cut}")
                np.testing.assert_allclose(a.learner.model.params, b.learner.model.params, atol=1e-6)
                assert np.all(np.isfinite(a.learner.model.params))
            nursery.cancel_scope.cancel()
        dropped = b.counters.values.get("dropped.link", 0) + sum(
            v for k, v in b.counters.values.items() if k.startswith("refused."))
        assert dropped >= 1

    trio.run(main)
