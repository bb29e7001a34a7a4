"""The clipped merge rule in a running app: a member claiming an age of 1e300 with a sign-flipped model."""

from __future__ import annotations

import numpy as np
import trio

from gossipfl.protocol.messages import ModelDelta
from gossipfld.transfer import send_model

from .memnet import MemoryNet


def _attack(make_apps, merge: str) -> tuple[float, float, dict]:
    victim, attacker = make_apps(2, gossip={"merge": merge, "push_pull": False, "scheme": "float32"})
    result = {}

    async def main():
        async with trio.open_nursery() as nursery:
            net = MemoryNet(nursery)
            net.add(victim), net.add(attacker)
            await trio.to_thread.run_sync(victim.learner.data.refresh)
            train = victim.learner.data.train
            async with victim.learner.lock:  # a victim that has learned something, at a known age
                await trio.to_thread.run_sync(victim.learner.trainer.train_steps, train.x, train.y, 50)
            victim.learner._age = 5000.0
            before = victim.learner.model.params.copy()
            listen = victim.config.listen
            attacker.peers.seen(victim.node_id, listen.address, listen.port, "mdns", trio.current_time())
            link, met = await attacker.dialer.dial(attacker.peers.get(victim.node_id))
            flipped = -10 * before

            def wrap(push):
                return ModelDelta(push.base_seq, push.new_seq, 1e300, 0, push.payload)

            await send_model(link, attacker.references, met.peer_id, flipped, wrap, attacker.counters)
            await link.aclose()
            while victim.listener.busy:
                await trio.sleep(0.01)
            result["moved"] = float(np.linalg.norm(victim.learner.model.params - before))
            result["scale"] = float(np.linalg.norm(before))
            nursery.cancel_scope.cancel()

    trio.run(main)
    return result["moved"], result["scale"], victim.counters.values


def test_a_huge_age_and_a_flipped_model_take_over_with_the_age_rule_and_not_with_the_clipped_one(make_apps):
    moved, scale, counters = _attack(make_apps, "age")
    assert moved > 10 * scale  # the age rule handed the attacker the whole model (the outlier rule had no history)
    moved, scale, counters = _attack(make_apps, "clipped")
    assert counters["merges"] == 1 and not any(k.startswith("refused.") for k in counters)
    assert moved <= 0.5 * 11 * scale + 1e-3  # at most half the way, believed age capped at the victim's own
    assert np.isfinite(moved)
