"""Per-file privacy budgets (``privacy.rows``): with ``disjoint_files`` a node whose one file is spent stops
training, a new file dropped into its data directory brings a budget of its own and training resumes on that
file only (the spent file's ledger never grows again, not even across a restart); with ``shared`` (the
default) a new file brings nothing.

Real apps (DP-SGD in onnxruntime, the accountant, the ledger's file, the data directory rescanned by the
learner); the budget is small so that each file's runs out within seconds. Every wait is on a condition.
"""

from __future__ import annotations

import json

import trio

from gossipfl.cli.cli_control import _privacy_text
from gossipfl.cli.tls import load_identity
from gossipfl.config import load_config
from gossipfl.learning.datasets import load_digits, write_csv
from gossipfl.learning.privacy_budget import SHARED
from gossipfld.app import App
from gossipfld.privacy import LEDGER

PRIVACY = {"enabled": True, "epsilon": 3.0, "delta": 1e-5, "clip": 1.0, "noise_multiplier": 2.0}
FAST = {"gossip": {"period": 0.05}, "training": {"duty_cycle": 1.0, "slice_steps": 10}}
OLD, NEW = "shard.csv", "day2.csv"


def _new_rows():
    """Rows that are not the shard's (the fixture's are the first 400 of the set)."""
    x, y = load_digits()
    return x[400:700], y[400:700]


def _on_disk(app: App) -> dict:
    return json.loads((app.config.node.state_dir / LEDGER).read_text())


async def _until(condition, what: str, seconds: float = 120.0) -> None:
    with trio.move_on_after(seconds) as waited:
        while not condition():
            await trio.sleep(0.02)
    assert not waited.cancelled_caught, f"not within {seconds:g} s: {what}"


def test_a_new_disjoint_file_brings_its_own_budget(make_apps):
    (a,) = make_apps(1, extra={"privacy": {**PRIVACY, "rows": "disjoint_files"}}, **FAST)
    private = a.private
    assert private is not None and private.budget.per_file
    book = private.budget.book

    async def main():
        async with trio.open_nursery() as nursery:
            await trio.to_thread.run_sync(a.learner.data.refresh)
            a.pacer.begin()
            nursery.start_soon(a.learner.run, lambda: True)
            nursery.start_soon(a.learner.watch_data, 0.05)
            await _until(lambda: private.stopped, "the shard's budget is spent")
            assert OLD in book.closed and book.ledger(OLD).spent(PRIVACY["delta"]).epsilon <= PRIVACY["epsilon"]
            spent_steps = book.ledger(OLD).steps
            status = a.reporter.status()["privacy"]
            assert status["budget_spent"] is True and status["files"] == 1 and status["files_out_of_budget"] == 1
            assert status["state"].startswith("budget spent on every file")
            assert a.counters.values["privacy.budget_spent"] == 1
            assert a.counters.values["privacy.files_spent"] == 1
            stopped_at = a.counters.values["train_steps"]

            # A new file arrives: it has no ledger yet, so a budget of its own, and training resumes on it.
            write_csv(a.config.data.directory / NEW, *_new_rows())
            await _until(lambda: a.counters.values["train_steps"] > stopped_at, "training resumes")
            assert book.ledger(NEW).steps >= a.counters.values["train_steps"] - stopped_at > 0
            assert a.learner._subset is not None and a.learner._subset[1] == (NEW,)
            assert len(a.learner._subset[2]) == a.learner.data.train_by_source.rows()[NEW]
            status = a.reporter.status()["privacy"]
            assert status["files"] == 2 and status["files_in_budget"] == 1 and status["files_out_of_budget"] == 1
            assert "1 of 2 files out of budget" in _privacy_text(status)

            # ...until its budget is spent too; the shard's ledger never grew meanwhile.
            await _until(lambda: NEW in book.closed, "the new file's budget is spent")
            await _until(lambda: private.stopped, "training stops again")
            assert book.ledger(OLD).steps == spent_steps
            assert a.counters.values["privacy.files_spent"] == 2
            assert "2 of 2 files out of budget" in _privacy_text(a.reporter.status()["privacy"])
            nursery.cancel_scope.cancel()
        return spent_steps

    spent_steps = trio.run(main)
    ledger = _on_disk(a)
    assert ledger["version"] == 2 and ledger["closed"] == sorted([OLD, NEW])
    assert sum(s for _, _, s in ledger["ledgers"][OLD]["segments"]) == spent_steps
    # Every step taken was on the disk before it ran: what the file counts is at least what was trained.
    assert sum(s for _, _, s in ledger["ledgers"][NEW]["segments"]) + spent_steps >= a.counters.values["train_steps"]

    # A restart reads both ledgers back and trains on neither.
    config = load_config(a.config.source)
    again = App(config, load_identity(config.tls.cert, config.tls.key, config.tls.ca))
    assert again.private.budget.book.closed == {OLD, NEW}

    async def first_slice() -> bool:
        await trio.to_thread.run_sync(again.learner.data.refresh)
        return await again.learner.may_train(again.config.training.slice_steps)

    assert trio.run(first_slice) is False and again.private.stopped
    assert again.private.budget.book.ledger(OLD).steps == spent_steps


def test_a_new_file_brings_nothing_when_rows_are_shared(make_apps):
    (a,) = make_apps(1, extra={"privacy": PRIVACY}, **FAST)  # privacy.rows: the default, "shared"
    private = a.private
    assert private is not None and not private.budget.per_file

    async def main():
        async with trio.open_nursery() as nursery:
            await trio.to_thread.run_sync(a.learner.data.refresh)
            a.pacer.begin()
            nursery.start_soon(a.learner.run, lambda: True)
            nursery.start_soon(a.learner.watch_data, 0.05)
            await _until(lambda: private.stopped, "the budget is spent")
            steps, on_disk = a.counters.values["train_steps"], _on_disk(a)
            rows = len(a.learner.data.train)
            write_csv(a.config.data.directory / NEW, *_new_rows())
            await _until(lambda: len(a.learner.data.train) > rows, "the new file is read")
            # The learner asks again, as its loop does; the one shared ledger is spent, so the answer is no.
            assert await a.learner.rows_to_train(a.config.training.slice_steps) is None
            nursery.cancel_scope.cancel()
        assert a.counters.values["train_steps"] == steps and private.stopped
        assert _on_disk(a) == on_disk and "version" not in on_disk  # one ledger, the format it always had
        status = a.reporter.status()["privacy"]
        assert status["rows"] == "shared" and status["budget_spent"] is True and "files" not in status
        assert set(private.budget.book.ledgers) == {SHARED}

    trio.run(main)
