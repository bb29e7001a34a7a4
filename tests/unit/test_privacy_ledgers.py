"""The privacy ledgers on disk and the per-file budget (``privacy.rows``): the file format (both versions, and
hostile content refused in one line) and which files a reservation trains on."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import trio

from gossipfl.cli.cli_control import _privacy_text
from gossipfl.config import PrivacySection, config_from_dict
from gossipfl.errors import ConfigError
from gossipfl.learning.data import STREAM, BySource, Table
from gossipfl.learning.privacy_budget import (
    MAX_LEDGERS,
    SHARED,
    Ledger,
    LedgerBook,
    PrivacyBudget,
)
from gossipfl.metrics import Counters
from gossipfld.privacy import LEDGER, PrivateTraining

SHARED_ROWS = PrivacySection(enabled=True, epsilon=3.0, noise_multiplier=2.0)
PER_FILE = dataclasses.replace(SHARED_ROWS, rows="disjoint_files")
BLOCKS = (100, 10)


def _budget(settings: PrivacySection, book: LedgerBook | None = None) -> PrivacyBudget:
    return PrivacyBudget(settings, book or LedgerBook(), settings.noise_multiplier)


def _through_json(book: LedgerBook) -> LedgerBook:
    return LedgerBook.from_dict(json.loads(json.dumps(book.to_dict())))


# ---------------------------------------------------------------- the format


def test_a_book_of_files_round_trips_as_version_2():
    book = LedgerBook({"a.csv": Ledger([(2.0, 0.1, 30), (1.5, 0.2, 5)]), STREAM: Ledger([(2.0, 0.05, 7)])},
                      {"a.csv"})
    data = book.to_dict()
    assert data["version"] == 2 and data["closed"] == ["a.csv"] and set(data["ledgers"]) == {"a.csv", STREAM}
    back = _through_json(book)
    assert back.to_dict() == data and back.closed == {"a.csv"}
    assert back.ledger("a.csv").spent(1e-5) == book.ledger("a.csv").spent(1e-5)


def test_one_shared_ledger_is_written_and_read_as_version_1():
    """A node that never declares its files disjoint writes what gossipfld always wrote, and an old file
    loads as the shared ledger."""
    old = {"segments": [[2.0, 0.1, 40]]}
    book = LedgerBook.from_dict(old)
    assert set(book.ledgers) == {SHARED} and book.ledger(SHARED).steps == 40
    assert book.to_dict() == old
    assert LedgerBook().to_dict() == {"segments": []}


def test_switching_between_shared_and_per_file_never_forgets_a_step():
    # shared -> per file: the files present at the first reservation inherit what the shared ledger spent...
    book = LedgerBook.from_dict({"segments": [[2.0, 0.1, 40]]})
    budget = _budget(PER_FILE, book)
    taken = budget.take({"a.csv": 300, "b.csv": 300}, 32, BLOCKS)
    assert taken.changed and SHARED not in book.ledgers
    assert book.ledger("a.csv").steps == book.ledger("b.csv").steps == 40 + taken.steps
    # ...and a file that arrives later starts empty.
    budget.take({"a.csv": 300, "b.csv": 300, "c.csv": 300}, 32, BLOCKS)
    assert book.ledger("c.csv").steps < book.ledger("a.csv").steps
    # per file -> shared: the ledgers are added up, which costs at least what any row spent
    shared = _through_json(book).shared()
    assert set(shared.ledgers) == {SHARED}
    assert shared.ledger(SHARED).steps == sum(ledger.steps for ledger in book.ledgers.values())
    assert shared.ledger(SHARED).spent(1e-5).epsilon >= max(x.spent(1e-5).epsilon for x in book.ledgers.values())


GOOD = {"version": 2, "ledgers": {"a.csv": {"segments": [[2.0, 0.1, 3]]}}, "closed": []}


@pytest.mark.parametrize(("data", "words"), [
    (None, "keys 'version'"), ([], "keys 'version'"), ("x", "keys 'version'"),
    ({"segments": [[1.0, 0.1, -5]]}, "segment 0"),  # version 1, damaged, as before
    ({"segments": [], "extra": 1}, "exactly one key"),
    ({**GOOD, "version": 3}, "version '3' is not known"), ({**GOOD, "version": True}, "version 'True'"),
    ({**GOOD, "version": 2.0}, "version '2.0'"), ({**GOOD, "version": [2]}, "version"),
    ({k: v for k, v in GOOD.items() if k != "closed"}, "keys 'version'"), ({**GOOD, "more": 1}, "keys 'version'"),
    ({**GOOD, "ledgers": []}, "'ledgers' must be an object"),
    ({**GOOD, "ledgers": {f"{i}.csv": {"segments": []} for i in range(MAX_LEDGERS + 1)}}, "at most 4096"),
    ({**GOOD, "ledgers": {"../etc/passwd": {"segments": []}}}, "is not a file name"),
    ({**GOOD, "ledgers": {"": {"segments": []}}}, "is not a file name"),
    ({**GOOD, "ledgers": {"a\nb.csv": {"segments": []}}}, "is not a file name"),
    ({**GOOD, "ledgers": {"x" * 256: {"segments": []}}}, "is not a file name"),
    ({**GOOD, "ledgers": {"a.csv": {"segments": [[1.0, 0.1, -5]]}}}, r"segment 0: .* \(of 'a.csv'\)"),
    ({**GOOD, "ledgers": {"a.csv": []}}, r"exactly one key, 'segments' \(of 'a.csv'\)"),
    ({**GOOD, "ledgers": {"a.csv": {"segments": [[math.nan, 0.1, 1]]}}}, "noise_multiplier"),
    ({**GOOD, "closed": "a.csv"}, "'closed' must be a list"),
    ({**GOOD, "closed": [1]}, "a name must be a string"),
    ({**GOOD, "closed": ["b.csv"]}, "'b.csv' has no ledger"),
])
def test_hostile_ledgers_are_refused_in_one_line(data, words):
    with pytest.raises(ConfigError, match=words) as info:
        LedgerBook.from_dict(data)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- which files train


def test_a_spent_file_leaves_and_a_new_file_brings_its_own_budget():
    budget = _budget(PER_FILE)
    book = budget.book
    while True:
        taken = budget.take({"old.csv": 320}, 32, BLOCKS)
        if not taken.names:
            break
        assert taken.names == ("old.csv",) and taken.sample_rate == pytest.approx(0.1)
    assert taken.closed == ("old.csv",) and taken.changed and book.closed == {"old.csv"}
    spent = book.ledger("old.csv").steps
    assert 0 < book.ledger("old.csv").spent(1e-5).epsilon <= PER_FILE.epsilon
    assert budget.files() == (1, 1)
    assert budget.take({"old.csv": 320}, 32, BLOCKS) == type(taken)((), None, 0)  # closed for good

    # A new file trains alone, at the sample rate of its own rows; the old file's ledger never grows again.
    taken = budget.take({"old.csv": 320, "new.csv": 160}, 32, BLOCKS)
    assert taken.names == ("new.csv",) and taken.sample_rate == pytest.approx(0.2)
    assert book.ledger("old.csv").steps == spent and budget.files() == (2, 1)
    report = budget.as_dict(taken.sample_rate, stopped=False)
    assert (report["files"], report["files_in_budget"], report["files_out_of_budget"]) == (2, 1, 1)
    assert report["epsilon_spent"] == book.ledger("old.csv").spent(1e-5).epsilon  # the most of any file
    assert "1 of 2 files out of budget" in _privacy_text(report)
    assert "one data file" in budget.guarantee()["unit"]


def test_every_file_present_pays_for_the_whole_steps_rate():
    """Conservative accounting: each file's rows were sampled at batch / all rows, so every file records every
    step at that rate, not at a share of it."""
    budget = _budget(PER_FILE)
    taken = budget.take({"a.csv": 100, STREAM: 60, "b.csv": 0}, 32, BLOCKS)
    assert taken.names == ("a.csv", STREAM) and taken.sample_rate == pytest.approx(0.2)
    for name in taken.names:
        assert budget.book.ledger(name).segments() == [(2.0, 0.2, taken.steps)]
    assert "b.csv" not in budget.book.ledgers  # no rows, no steps


def test_a_file_too_dear_at_the_shared_rate_is_closed_and_the_rate_worked_out_again():
    book = LedgerBook({"a.csv": Ledger([(2.0, 0.1, 10_000)])})  # far past the budget already
    budget = _budget(PER_FILE, book)
    taken = budget.take({"a.csv": 160, "b.csv": 160}, 32, BLOCKS)
    assert taken.names == ("b.csv",) and taken.closed == ("a.csv",) and taken.sample_rate == pytest.approx(0.2)
    assert book.ledger("a.csv").steps == 10_000


def test_shared_rows_never_take_a_new_budget(tmp_path):
    """The daemon's side: once the one shared ledger cannot pay, a new file's rows (a lower sample rate, a
    cheaper step) bring nothing, and the file on disk keeps the format it always had."""
    path = tmp_path / LEDGER
    private = PrivateTraining(SHARED_ROWS, path, Counters())

    async def spend() -> tuple[str, ...]:
        while await private.reserve({"old.csv": 320}, 32, 10):
            pass
        on_disk = path.read_bytes()
        names = await private.reserve({"old.csv": 320, "new.csv": 160}, 32, 10)
        assert path.read_bytes() == on_disk
        return names

    assert trio.run(spend) == () and private.stopped
    assert set(json.loads(path.read_text())) == {"segments"}
    assert set(private.budget.book.ledgers) == {SHARED} and not private.budget.book.closed
    report = private.report()
    assert report["rows"] == "shared" and "files" not in report and report["state"].startswith("budget spent")
    assert "files out of budget" not in _privacy_text(report)


def test_the_daemon_reads_an_old_ledger_and_refuses_a_damaged_one(tmp_path):
    path = tmp_path / LEDGER
    path.write_text('{"segments": [[2.0, 0.1, 40]]}')
    for settings in (SHARED_ROWS, PER_FILE):
        private = PrivateTraining(settings, path, Counters())
        assert not private.budget.damaged and private.budget.book.ledger(SHARED).steps == 40
    path.write_text('{"version": 2, "ledgers": {"a/b.csv": {"segments": []}}, "closed": []}')
    private = PrivateTraining(PER_FILE, path, Counters())
    assert private.stopped and "is not a file name" in private.report()["state"]
    assert trio.run(private.reserve, {"a.csv": 100}, 32, 10) == ()


def test_a_damaged_ledger_trains_nothing():
    budget = PrivacyBudget(PER_FILE, LedgerBook(), 2.0, damaged="privacy.json: bad")
    assert budget.take({"a.csv": 100}, 32, BLOCKS).names == ()
    assert budget.as_dict(None, stopped=True)["state"] == "ledger unreadable: privacy.json: bad"


# ---------------------------------------------------------------- the key and the rows by source


def test_privacy_rows_is_checked():
    assert config_from_dict({}).privacy.rows == "shared"
    assert config_from_dict({"privacy": {"rows": "disjoint_files"}}).privacy.rows == "disjoint_files"
    with pytest.raises(ConfigError, match=r"^privacy.rows: must be one of shared, disjoint_files, got 'files'$"):
        config_from_dict({"privacy": {"rows": "files"}})
    with pytest.raises(ConfigError, match=r"^privacy.rows: must be a string"):
        config_from_dict({"privacy": {"rows": 1}})


def test_rows_by_source():
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    view = BySource(Table(x, np.arange(10)), (("a.csv", 3), ("b.csv", 5), (STREAM, 2)))
    assert view.rows() == {"a.csv": 3, "b.csv": 5, STREAM: 2}
    assert view.of({"a.csv", "b.csv", STREAM}) is view.table  # all of them: no copy
    part = view.of({"a.csv", STREAM})
    assert part.x[:, 0].tolist() == [0, 1, 2, 8, 9] and part.y.tolist() == [0, 1, 2, 8, 9]
    assert len(view.of(set())) == 0
