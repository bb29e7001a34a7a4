from __future__ import annotations

import logging
import os
import zipfile

import numpy as np
import pytest

from gossipfl.errors import DataError
from gossipfl.learning.data import DataSpec, LocalData, load_directory
from gossipfl.learning.datasets import dirichlet_shards, write_csv

from ..conftest import rows

SPEC = DataSpec(features=3, classes=4)


def _csv(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_csv_and_npz_are_read_together(tmp_path):
    _csv(tmp_path / "a.csv", "f0,label,f1,f2\n1,0,2,3\n4,1,5,6\n")
    np.savez(tmp_path / "b.npz", x=np.ones((3, 3)), y=np.array([3, 2, 1]))
    data = load_directory(tmp_path, SPEC)
    table = data.all
    assert table.x.shape == (5, 3) and table.x.dtype == np.float32
    assert sorted(table.y.tolist()) == [0, 1, 1, 2, 3]
    assert [1, 2, 3] in table.x.tolist(), "the label column may stand anywhere"


def test_new_and_changed_files_are_picked_up(tmp_path):
    x, y = rows(20, 3, 4)
    write_csv(tmp_path / "one.csv", x, y)
    data = LocalData(tmp_path, SPEC, validation_fraction=0.0)
    assert data.refresh() == [tmp_path / "one.csv"]
    assert len(data.train) == 20
    assert data.refresh() == [], "unchanged files are not read again"
    write_csv(tmp_path / "two.csv", x[:5], y[:5])
    assert data.refresh() == [tmp_path / "two.csv"]
    assert len(data.train) == 25
    (tmp_path / "one.csv").unlink()
    data.refresh()
    assert len(data.train) == 5


def test_validation_split_is_stable_across_restarts_and_new_files(tmp_path):
    x, y = rows(400, 3, 4)
    write_csv(tmp_path / "a.csv", x, y)
    first = LocalData(tmp_path, SPEC, validation_fraction=0.25)
    first.refresh()
    assert 60 < len(first.validation) < 140
    write_csv(tmp_path / "b.csv", x[:50], y[:50])
    second = LocalData(tmp_path, SPEC, validation_fraction=0.25)
    second.refresh()
    held = first.validation.x
    assert np.array_equal(second.validation.x[: len(held)], held)


@pytest.mark.parametrize("text, message", [
    ("f0,f1,label\n1,2,0\n", r"bad\.csv:1: 2 feature columns, the model expects 3"),
    ("f0,f1,f2,f3\n1,2,3,0\n", r"bad\.csv:1: no label column 'label'"),
    ("", r"bad\.csv: empty file"),
])
def test_a_csv_whose_header_does_not_fit_names_the_file(tmp_path, text, message):
    _csv(tmp_path / "bad.csv", text)
    with pytest.raises(DataError, match=message):
        load_directory(tmp_path, SPEC)


def test_bad_rows_are_skipped_and_counted_by_reason_and_the_rest_of_the_file_is_kept(tmp_path):
    _csv(tmp_path / "rows.csv", "f0,f1,f2,label\n"
         "1,2,3,0\n"
         "1,2,nan,0\n"  # not finite
         "1,2,0\n"  # a field short
         "1,2,x3,0\n"  # not a number
         "1,,3,0\n"  # an empty cell
         "1,2,3,7\n"  # no such class
         "1,2,3,0.5\n"  # not a class index
         "4,5,6,1\n"
         "7,8,9,2")  # half-written: no newline yet
    data = load_directory(tmp_path, SPEC)
    assert data.all.x.tolist() == [[1, 2, 3], [4, 5, 6]] and data.all.y.tolist() == [0, 1]
    assert data.skipped_rows == {"not_finite": 1, "fields": 1, "not_a_number": 1, "empty": 1, "label": 2,
                                 "unterminated": 1}
    with (tmp_path / "rows.csv").open("a") as f:  # the writer finishes its line
        f.write("\n")
    data.refresh()
    assert data.all.y.tolist() == [0, 1, 2] and "unterminated" not in data.skipped_rows


def test_daemon_mode_skips_unreadable_files_with_a_warning(tmp_path, caplog):
    x, y = rows(10, 3, 4)
    write_csv(tmp_path / "good.csv", x, y)
    _csv(tmp_path / "bad.csv", "f0,f1,label\n1,2,0\n")
    data = LocalData(tmp_path, SPEC, validation_fraction=0.0)
    with caplog.at_level(logging.WARNING):
        data.refresh()
    assert len(data.train) == 10
    assert any("bad.csv:1" in r.getMessage() for r in caplog.records)
    assert tmp_path / "bad.csv" in data.skipped
    caplog.clear()
    data.refresh()
    assert not caplog.records, "a skipped file is not re-read until it changes"
    _csv(tmp_path / "bad.csv", "f0,f1,f2,label\n1,2,3,0\n")
    st = (tmp_path / "bad.csv").stat()
    os.utime(tmp_path / "bad.csv", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    data.refresh()
    assert len(data.train) == 11 and not data.skipped


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "evil.npz", x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(DataError, match=r"evil\.npz"):
        load_directory(tmp_path, SPEC)


def test_npz_checks(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((2, 5)), y=np.array([0, 1]))
    with pytest.raises(DataError, match="5 features per sample, the model expects 3"):
        load_directory(tmp_path, SPEC)
    np.savez(tmp_path / "d.npz", x=np.array([[1, np.nan, 2]]), y=np.array([0]))
    with pytest.raises(DataError, match="NaN"):
        load_directory(tmp_path, SPEC)
    (tmp_path / "d.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="not a readable"):
        load_directory(tmp_path, SPEC)


def test_empty_or_missing_directory(tmp_path):
    with pytest.raises(DataError, match=r"no \.csv or \.csv\.gz or \.npz files"):
        load_directory(tmp_path, SPEC)
    with pytest.raises(DataError, match="missing"):
        load_directory(tmp_path / "missing", SPEC)


def test_dirichlet_shards_cover_every_row_once_and_are_skewed():
    y = np.repeat(np.arange(10), 100)
    shards = dirichlet_shards(y, 5, alpha=0.5, seed=0)
    joined = np.concatenate(shards)
    assert sorted(joined.tolist()) == list(range(1000))
    top_share = [np.bincount(y[s], minlength=10).max() / len(s) for s in shards]
    assert max(top_share) > 0.2, "alpha 0.5 gives shards dominated by a few classes"


def _npy_declaring(shape: tuple[int, ...]) -> bytes:
    """A .npy member whose header declares ``shape`` of float32 and holds 64 bytes of data."""
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + bytes(64)


def test_an_npz_declaring_a_huge_shape_is_refused_before_anything_is_allocated(tmp_path, caplog):
    """Its header declared (10**12, 64): numpy tried to allocate 256 TB, and the daemon died at every rescan."""
    x, y = rows(10, 3, 4)
    write_csv(tmp_path / "good.csv", x, y)
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as archive:
        archive.writestr("x.npy", _npy_declaring((10**12, 3)))
        archive.writestr("y.npy", _npy_declaring((10**12,)))
    data = LocalData(tmp_path, SPEC, validation_fraction=0.0)
    with caplog.at_level(logging.WARNING):
        data.refresh()
    assert len(data.train) == 10 and tmp_path / "huge.npz" in data.skipped
    assert "declares shape (1000000000000, 3)" in data.skipped[tmp_path / "huge.npz"]


def test_a_csv_line_far_longer_than_its_fields_need_is_refused_before_it_is_split(tmp_path):
    """One 8 MB line of short fields cost 319 MB as a list of strings."""
    _csv(tmp_path / "long.csv", "f0,f1,f2,label\n1,2,3,0\n" + "1," * 4_000_000 + "0\n")
    with pytest.raises(DataError, match=r"long\.csv:3: a line of 8000002 characters, over the 65536"):
        load_directory(tmp_path, SPEC)


def test_past_max_rows_the_oldest_files_rows_are_left_out(tmp_path):
    x, y = rows(30, 3, 4)
    for i, name in enumerate(("old.csv", "mid.csv", "new.csv")):
        write_csv(tmp_path / name, x[10 * i : 10 * i + 10], y[10 * i : 10 * i + 10])
        os.utime(tmp_path / name, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))
    data = LocalData(tmp_path, SPEC, validation_fraction=0.0, max_rows=15)
    data.refresh()
    assert len(data.train) == 15 and data.rows_over_cap == 15
    np.testing.assert_allclose(data.train.x, x[15:], atol=1e-4)  # the newest 15: half of mid, all of new
    assert data.report()["rows_over_cap"] == 15


def test_stream_rows_join_as_the_newest_and_replace_the_last_ones(tmp_path):
    spec = DataSpec(features=3, task="anomaly")
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    np.savez(tmp_path / "old.npz", x=x[:4])
    data = LocalData(tmp_path, spec, validation_fraction=0.0, max_rows=8)
    data.refresh()
    held = np.zeros(6, bool)
    held[[1, 4]] = True
    data.set_stream(x[4:], held)
    # Under max_rows the stream's rows, the newest, stay; the file's oldest rows go first.
    np.testing.assert_array_equal(data.train.x, np.concatenate([x[2:4], x[[4, 6, 7, 9]]]))
    np.testing.assert_array_equal(data.validation.x, x[[5, 8]])
    assert data.rows_over_cap == 2 and data.report()["stream_rows"] == 6
    data.set_stream(x[9:], np.zeros(1, bool))  # the buffer moved on: the old stream rows are gone
    np.testing.assert_array_equal(data.train.x, np.concatenate([x[:4], x[9:]]))
    assert len(data.validation) == 0
    data.refresh()  # a rescan keeps the stream's rows
    assert len(data.train) == 5
