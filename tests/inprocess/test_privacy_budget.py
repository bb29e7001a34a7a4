"""A node's privacy budget runs out mid-run: it stops training on its rows, keeps merging and predicting, and
says so; its epsilon never grows after that, not even across a restart.

Real apps (DP-SGD in onnxruntime, the accountant, the ledger's file, TLS over ``MemoryNet``); the budget is
small so that it runs out within seconds.
"""

from __future__ import annotations

import json

import numpy as np
import trio

from gossipfl.cli.tls import load_identity
from gossipfl.config import load_config
from gossipfl.learning.model import Model
from gossipfl.learning.privacy_budget import PRIVACY_KEY
from gossipfld.app import App
from gossipfld.privacy import LEDGER

from .memnet import MemoryNet

PRIVACY = {"enabled": True, "epsilon": 8.0, "delta": 1e-5, "clip": 1.0, "noise_multiplier": 2.0}


def test_a_spent_budget_stops_training_but_not_merging_or_predicting(make_apps, small_digits, tmp_path):
    a, b = make_apps(2, extra={"privacy": PRIVACY}, training={"duty_cycle": 1.0})
    assert a.private is not None and a.learner.trainer.config.dp is not None
    x, _ = small_digits

    async def main():
        async with trio.open_nursery() as nursery:
            net = MemoryNet(nursery)
            net.add(a), net.add(b)
            await trio.to_thread.run_sync(a.learner.data.refresh)
            a.pacer.begin()
            nursery.start_soon(a.learner.run, lambda: True)
            while not a.private.stopped:
                await trio.sleep(0.05)
            spent = a.private.budget.spent()
            steps = a.counters.values["train_steps"]
            status = a.reporter.status()["privacy"]
            assert status["budget_spent"] is True and status["state"].startswith("budget spent")
            assert PRIVACY["epsilon"] / 2 < spent.epsilon <= PRIVACY["epsilon"]
            assert a.counters.values["privacy.budget_spent"] == 1

            # it goes on merging: B pushes its model, A takes it in
            a_before = a.learner.model.params.copy()
            b.learner.model.params[:] += 0.05  # a peer that learned something else, and has an age to show
            b.learner._age = a.learner.age
            b.peers.seen(a.node_id, a.config.listen.address, a.config.listen.port, "mdns", trio.current_time())
            assert await b.gossip.push_to(b.peers.get(a.node_id))
            while a.listener.busy:
                await trio.sleep(0.01)
            assert a.counters.values["merges"] >= 1
            assert not np.array_equal(a.learner.model.params, a_before)
            # and predicting
            out, _ = await a.learner.predict(x[:5])
            assert out.shape == (5, 10)
            await trio.sleep(1.0)  # the learner keeps looking for training it may do
            assert a.counters.values["train_steps"] == steps
            assert a.private.budget.spent().epsilon == spent.epsilon and not a.learner.training_active
            await a.checkpoint()
            nursery.cancel_scope.cancel()
        return spent

    spent = trio.run(main)
    # The ledger on disk counts every step taken (reserved before it ran), and the checkpoint says so too.
    ledger = json.loads((a.config.node.state_dir / LEDGER).read_text())
    assert sum(steps for _, _, steps in ledger["segments"]) >= spent.steps
    checkpoint = Model.load(a.config.node.state_dir / "checkpoint.onnx")
    guarantee = json.loads(checkpoint.metadata[PRIVACY_KEY])
    assert guarantee["epsilon"] == spent.epsilon and guarantee["delta"] == PRIVACY["delta"]

    # A restart finds the budget spent: no training, the same epsilon.
    config = load_config(a.config.source)
    again = App(config, load_identity(config.tls.cert, config.tls.key, config.tls.ca))
    assert again.private.budget.spent().epsilon == spent.epsilon

    async def first_slice() -> bool:
        await trio.to_thread.run_sync(again.learner.data.refresh)
        return await again.learner.may_train(again.config.training.slice_steps)

    assert trio.run(first_slice) is False and again.private.stopped
    assert again.private.budget.spent().epsilon == spent.epsilon


def test_an_unreadable_ledger_stops_private_training(make_apps):
    (a,) = make_apps(1, extra={"privacy": PRIVACY})
    ledger = a.config.node.state_dir / LEDGER
    ledger.write_text('{"segments": [[1.0, 0.1, -5]]}')
    config = load_config(a.config.source)
    again = App(config, load_identity(config.tls.cert, config.tls.key, config.tls.ca))
    assert again.private.stopped and again.private.budget.damaged
    assert "segment 0" in again.private.report()["state"]
