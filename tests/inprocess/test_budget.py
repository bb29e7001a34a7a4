"""A member with a valid certificate that pushes a little and pulls from base 0 in a loop: the amplification
attack (one 261-byte push and a pull cost the victim a whole model each time) meets the peer's budget."""

from __future__ import annotations

import trio

from gossipfl.errors import RefusedByPeer
from gossipfl.protocol.messages import Ack, Error, ErrorCode, ModelDelta, PullRequest
from gossipfld.transfer import send_model

from .memnet import MemoryNet

ROUNDS = 40


def test_push_and_pull_from_base_zero_in_a_loop_gets_one_whole_model_and_then_a_rate_limit(make_apps):
    victim, attacker = make_apps(2, gossip={"period": 2.0, "max_backoff": 4.0})
    outcomes: dict[str, int] = {}

    async def main():
        async with trio.open_nursery() as nursery:
            net = MemoryNet(nursery)
            net.add(victim), net.add(attacker)
            listen = victim.config.listen
            attacker.peers.seen(victim.node_id, listen.address, listen.port, "mdns", trio.current_time())
            peer = attacker.peers.get(victim.node_id)
            params, age = await attacker.learner.snapshot()

            def wrap(push):
                return ModelDelta(push.base_seq, push.new_seq, age, 0, push.payload)

            for _ in range(ROUNDS):
                link, met = await attacker.dialer.dial(peer)
                try:
                    push, _ = await send_model(link, attacker.references, met.peer_id, params, wrap,
                                               attacker.counters)
                    attacker.references.commit_push(push)
                    await link.send(PullRequest(0))  # "I hold nothing of yours": asks for a whole model
                    reply = await link.receive(ModelDelta, Error)
                    if isinstance(reply, ModelDelta):
                        outcome = "whole model" if reply.base_seq == 0 else "delta"
                        await link.send(Ack(reply.new_seq))
                    else:
                        assert reply.code == ErrorCode.OVERLOADED
                        outcome = "pull declined"
                except RefusedByPeer as exc:
                    assert exc.reason == "peer-overloaded", exc
                    outcome = "exchange refused"
                finally:
                    await link.aclose()
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert outcomes.get("whole model") == 1, outcomes
    assert victim.counters.values["full_models_sent"] == 1
    assert outcomes.get("exchange refused", 0) >= ROUNDS // 2, outcomes
    assert victim.counters.values["refused.rate"] == outcomes["exchange refused"]
    assert victim.counters.values["merges"] < ROUNDS // 2  # each cycle used to count as a merge
