"""A node's local data: a directory of ``.csv`` and ``.npz`` files that never leaves the device.

Files that appear later are picked up by ``refresh()``, and a changed file is re-read. Each row is
held out for validation or used for training by a hash of its file name and row number, so the split
is the same after a restart and does not move when files are added. The training rows are also known by
source (``train_by_source``: each file's name, and ``<stream>`` for a sensor stream's rows), so that private
training can charge each file's rows to a budget of its own (``privacy.rows = "disjoint_files"``).

Data files are input from outside and are checked like any other: a malformed file names the file
and the line. A daemon skips it with a warning and goes on (``strict=False``); the offline CLI stops
with the error (``strict=True``). ``.npz`` files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import logging
import math
import os
import zipfile
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from gossipfl.errors import DataError, ModelError
from gossipfl.learning.model import Model
from gossipfl.learning.schema import DELIMITERS, Schema, choose_features, class_names

log = logging.getLogger(__name__)

SUFFIXES = (".csv", ".csv.gz", ".npz")
MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_TEXT_CHARS = MAX_FILE_BYTES  # what a file may unpack to
LINE_CHARS_PER_FIELD = 64  # a float written at full precision needs about 25
MIN_LINE_CHARS = 64 * 1024


@dataclass(frozen=True)
class DataSpec:
    """What the model needs from a data file."""

    features: int
    task: str = "classification"
    classes: int | None = None  # label range for classifiers
    outputs: int = 1  # target columns for regression (only 1 is read from CSV)
    label_column: str = "label"
    schema: Schema | None = None  # columns by name and class names; without it, every column but the label
    delimiter: str | None = None  # None: detected from the header (comma, semicolon or tab)

    @classmethod
    def of(cls, model: Model, label_column: str | None = None, delimiter: str | None = None) -> DataSpec:
        """What ``model`` reads: its schema's columns when it carries one, else ``features`` columns."""
        schema = model.schema
        label = label_column or (schema.label if schema is not None else "label")
        return cls(features=model.features_per_sample, task=model.task,
                   classes=model.num_classes, outputs=model.num_outputs, label_column=label, schema=schema,
                   delimiter=delimiter)


@dataclass
class Table:
    """Features and labels of some rows, and the rows that were skipped, by reason."""

    x: np.ndarray
    y: np.ndarray
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.x)


STREAM = "<stream>"  # the source name of a sensor stream's rows (set_stream): never a data file's name


@dataclass(frozen=True)
class BySource:
    """The training rows with the source each came from, in one object so that a reader in another thread
    never pairs one refresh's rows with another's sources: private training pays for each source's rows in
    its own ledger (``privacy.rows = "disjoint_files"``), so it must know exactly whose rows it trains on."""

    table: Table
    counts: tuple[tuple[str, int], ...] = ()  # (file name, or STREAM; rows) in the table's order, none empty

    def rows(self) -> dict[str, int]:
        return dict(self.counts)

    def of(self, names: Collection[str]) -> Table:
        """The rows of these sources only (the whole table, uncopied, when they are all of them)."""
        if all(name in names for name, _ in self.counts):
            return self.table
        xs, ys, start = [], [], 0
        for name, count in self.counts:
            if name in names:
                xs.append(self.table.x[start:start + count])
                ys.append(self.table.y[start:start + count])
            start += count
        if not xs:
            return Table(self.table.x[:0], self.table.y[:0])
        return Table(np.concatenate(xs), np.concatenate(ys))


@dataclass
class _Loaded:
    stamp: tuple[int, int]
    train: Table
    validation: Table
    skipped: dict[str, int]


def _label_problem(value: float, spec: DataSpec) -> str | None:
    """Why ``value`` is not a usable label, or None."""
    if not math.isfinite(value):
        return f"label {value} is not a finite number"
    if spec.task == "classification":
        top = (spec.classes or 0) - 1
        if value != int(value) or value < 0 or (spec.classes is not None and value > top):
            return f"label {value:g} is not a class index in 0..{top}"
    return None


def _check_labels(y: np.ndarray, spec: DataSpec, where: str) -> np.ndarray:
    for index, value in enumerate(y.tolist()):
        problem = _label_problem(float(value), spec)
        if problem:
            raise DataError(f"{where}: sample {index}: {problem}")
    return y.astype(np.int64 if spec.task == "classification" else np.float32)


def sniff_delimiter(header: str) -> str:
    """The delimiter of a header line: whichever of comma, semicolon and tab it holds most of (comma on a tie).
    A semicolon-separated file once read as one column and reported a missing label column."""
    counts = {d: header.count(d) for d in DELIMITERS}
    return max(DELIMITERS, key=lambda d: (counts[d], d == ","))


def _columns(path: Path, header: list[str], spec: DataSpec, require_labels: bool) -> tuple[list[int], int | None]:
    """Indices of the feature columns, in the model's order, and of the label column (None: absent)."""
    label_index = header.index(spec.label_column) if spec.label_column in header else None
    if not require_labels and spec.schema is not None:
        label_index = None  # rows to predict: a label column, even an empty one, is just another column
    if label_index is None and require_labels:
        raise DataError(f"{path}:1: no label column {spec.label_column!r} in the header "
                        f"(columns: {', '.join(header[:20])})")
    if spec.schema is not None:
        missing = [name for name in spec.schema.features if name not in header]
        if missing:
            raise DataError(f"{path}:1: no column {missing[0]!r}, a feature of the model's schema"
                            + (f" ({len(missing)} missing)" if len(missing) > 1 else ""))
        return [header.index(name) for name in spec.schema.features], label_index
    feature_cols = [i for i in range(len(header)) if i != label_index]
    if len(feature_cols) != spec.features:
        raise DataError(f"{path}:1: {len(feature_cols)} feature columns, the model expects {spec.features}")
    return feature_cols, label_index


class _Rows:
    """Parses rows against a spec, skipping and counting the bad ones: one empty cell or NaN once dropped a
    whole file (744 -> 493 samples)."""

    def __init__(self, spec: DataSpec, feature_cols: list[int], label_index: int | None, width: int,
                 raw_labels: bool = False) -> None:
        self.spec, self.feature_cols, self.label_index, self.width = spec, feature_cols, label_index, width
        self.raw_labels = raw_labels  # keep label cells as text (surveying data whose classes are not known yet)
        self.classes = spec.schema.class_index() if spec.schema is not None and spec.schema.classes else None
        self.x: list[list[float]] = []
        self.y: list[float | str] = []
        self.skipped: dict[str, int] = {}
        self.first_problem: str | None = None

    def skip(self, reason: str, line: int, detail: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if self.first_problem is None:
            self.first_problem = f"line {line}: {detail}"

    def add(self, row: list[str], line: int) -> None:
        if len(row) != self.width:
            return self.skip("fields", line, f"{len(row)} fields, the header has {self.width}")
        values: list[float] = []
        for i in self.feature_cols:
            cell = row[i].strip()
            if not cell:
                return self.skip("empty", line, f"column {i + 1} is empty")
            try:
                value = float(cell)
            except ValueError:
                return self.skip("not_a_number", line, f"{cell[:40]!r} is not a number")
            if not math.isfinite(value):
                return self.skip("not_finite", line, f"{cell!r} is not finite")
            values.append(value)
        if self.label_index is not None:
            cell = row[self.label_index].strip()
            if self.raw_labels:
                if not cell:
                    return self.skip("label", line, "the label is empty")
                self.y.append(cell)
            else:
                label = self._label(cell)
                if isinstance(label, str):
                    return self.skip("label", line, label)
                self.y.append(label)
        self.x.append(values)
        return None

    def _label(self, cell: str) -> float | str:
        """The label's class index (or target), or why it is not usable."""
        if self.classes is not None:
            index = self.classes.get(cell)
            return float(index) if index is not None else f"label {cell[:40]!r} is not one of the model's classes"
        try:
            value = float(cell)
        except ValueError:
            return f"label {cell[:40]!r} is not a number (a model made with --data names its classes)"
        return _label_problem(value, self.spec) or value


def _open_text(path: Path) -> TextIO:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", newline="", encoding="utf-8", errors="strict")
    return path.open(newline="", encoding="utf-8", errors="strict")


def _header(path: Path, delimiter: str | None) -> tuple[list[str], str]:
    """A CSV file's column names and its delimiter."""
    try:
        with _open_text(path) as handle:
            line = next(_bounded_lines(handle, path, MIN_LINE_CHARS * 16, []), None)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, OSError) as exc:
        raise DataError(f"{path}: {exc}") from exc
    if line is None:
        raise DataError(f"{path}: empty file (a header row is required)")
    delimiter = delimiter or sniff_delimiter(line)
    return [h.strip() for h in next(csv.reader([line], delimiter=delimiter))], delimiter


def read_csv(path: Path, spec: DataSpec, require_labels: bool = True, raw_labels: bool = False) -> Table:
    """Parse one CSV file (or ``.csv.gz``): a header row, then rows read by column name against the model's
    schema (or every column but the label, in order, without one). Bad rows are skipped and counted in the
    table's ``skipped``; a last line without its newline is a row still being written and is left for the
    next read."""
    limit = max(MIN_LINE_CHARS, LINE_CHARS_PER_FIELD * (spec.features + 1))
    try:
        with _open_text(path) as handle:
            tail: list[str] = []
            lines = _bounded_lines(handle, path, limit, tail)
            header_line = next(lines, None)
            if header_line is None:
                raise DataError(f"{path}: empty file (a header row is required)")
            delimiter = spec.delimiter or sniff_delimiter(header_line)
            header = [h.strip() for h in next(csv.reader([header_line], delimiter=delimiter))]
            # An anomaly model needs no labels: a label column is never a feature, and is read only as text, to
            # evaluate (raw_labels); its training target is its own input (reconstruction.py).
            unlabelled = spec.task == "anomaly" and not raw_labels
            feature_cols, label_index = _columns(path, header, spec, require_labels and not unlabelled)
            rows = _Rows(spec, feature_cols, None if unlabelled else label_index, len(header), raw_labels)
            line = 1
            for line, row in enumerate(csv.reader(lines, delimiter=delimiter), start=2):
                if row and any(c.strip() for c in row):
                    rows.add(row, line)
    except (csv.Error, UnicodeDecodeError, gzip.BadGzipFile, EOFError, OSError) as exc:
        raise DataError(f"{path}: {exc}") from exc
    if tail:
        rows.skipped["unterminated"] = 1
    if rows.skipped:
        log.info("%s: skipped rows %s; the first at %s", path, rows.skipped,
                 rows.first_problem or "the last line, still being written (read again once it ends)")
    x = np.asarray(rows.x, dtype=np.float32).reshape(len(rows.x), spec.features)
    if unlabelled:  # one placeholder target per row, which the loss never reads
        return Table(x, np.zeros(len(x), np.float32), rows.skipped)
    label_dtype = str if raw_labels else np.int64 if spec.task == "classification" else np.float32
    return Table(x, np.asarray(rows.y, dtype=label_dtype), rows.skipped)


def _bounded_lines(handle: Iterable[str], path: Path, limit: int, tail: list[str]) -> Iterator[str]:
    """The file's complete lines, each refused past ``limit`` characters before csv splits it (one 8 MB line
    of short fields cost 319 MB as a list of strings), and all of them past ``MAX_TEXT_CHARS`` (a small
    ``.csv.gz`` can unpack to gigabytes). A last line with no newline is not yielded but put in ``tail``: a
    writer is still on it."""
    total = 0
    for number, line in enumerate(handle, start=1):
        if len(line) > limit:
            raise DataError(f"{path}:{number}: a line of {len(line)} characters, over the {limit} that "
                            f"{limit // LINE_CHARS_PER_FIELD} fields can need")
        total += len(line)
        if total > MAX_TEXT_CHARS:
            raise DataError(f"{path}: more than {MAX_TEXT_CHARS} characters of text, over the limit")
        if not line.endswith(("\n", "\r")):
            tail.append(line)
            return
        yield line


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_npz(path: Path, spec: DataSpec, require_labels: bool = True) -> Table:
    """Arrays ``x`` (samples, features...) and ``y`` (samples,), numeric, no pickled objects."""
    try:
        _check_npz_shapes(path)
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files:
                raise DataError(f"{path}: no array named 'x' (found: {', '.join(archive.files) or 'none'})")
            x = archive["x"]
            y = archive["y"] if "y" in archive.files else None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable numpy .npz archive: {exc}") from exc
    if x.dtype.kind not in "fiub" or x.ndim < 1:
        raise DataError(f"{path}: array 'x' must be numeric with one row per sample, got {x.dtype} {x.shape}")
    x = x.reshape(len(x), -1)
    if x.shape[1] != spec.features:
        raise DataError(f"{path}: 'x' has {x.shape[1]} features per sample, the model expects {spec.features}")
    if not np.all(np.isfinite(x)):
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise DataError(f"{path}: sample {bad} of 'x' has a NaN or infinite feature")
    if spec.task == "anomaly":  # no labels needed; a placeholder target per row (see read_csv)
        return Table(x.astype(np.float32), np.zeros(len(x), np.float32))
    if y is None:
        if require_labels:
            raise DataError(f"{path}: no array named 'y' (labels)")
        return Table(x.astype(np.float32), np.zeros(0))
    if y.dtype.kind not in "fiub" or len(y) != len(x):
        raise DataError(f"{path}: 'y' must be numeric with {len(x)} entries, got {y.dtype} {y.shape}")
    return Table(x.astype(np.float32), _check_labels(y.astype(np.float64), spec, str(path)))


def _check_npz_shapes(path: Path) -> None:
    """Refuse an archive whose arrays claim more bytes than they hold, before numpy allocates them: a header
    declaring shape (10**12, 64) killed the daemon at the next rescan, and at every start after."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.file_size > MAX_FILE_BYTES * 4:
                raise DataError(f"{path}: member {info.filename} unpacks to {info.file_size} bytes, over the limit")
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                elif version in ((2, 0), (3, 0)):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(member)
                else:
                    raise DataError(f"{path}: member {info.filename} has an unknown .npy version {version}")
            declared = math.prod(shape) * dtype.itemsize
            if declared > info.file_size:
                raise DataError(f"{path}: member {info.filename} declares shape {shape} of {dtype} ({declared} "
                                f"bytes) but holds {info.file_size}")


def read_file(path: Path, spec: DataSpec, require_labels: bool = True, raw_labels: bool = False) -> Table:
    """One data file; ``raw_labels`` keeps the label column as text (CSV only: an ``.npz``'s labels are numbers)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from exc
    if size > MAX_FILE_BYTES:
        raise DataError(f"{path}: {size} bytes is over the limit of {MAX_FILE_BYTES}")
    if path.name.endswith((".csv", ".csv.gz")):
        return read_csv(path, spec, require_labels, raw_labels)
    if path.suffix == ".npz" and raw_labels:
        raise DataError(f"{path}: labels are read by name from CSV files; an .npz file has none")
    if path.suffix == ".npz":
        return read_npz(path, spec, require_labels)
    raise DataError(f"{path}: unknown data format (expected {' or '.join(SUFFIXES)})")


def _held_out(name: str, count: int, fraction: float) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng(seed).random(count) < fraction


def _concat(tables: list[Table], spec: DataSpec) -> Table:
    if not tables:
        label_dtype = np.int64 if spec.task == "classification" else np.float32
        return Table(np.zeros((0, spec.features), np.float32), np.zeros(0, label_dtype))
    return Table(np.concatenate([t.x for t in tables]), np.concatenate([t.y for t in tables]))


@dataclass
class LocalData:
    """The data directory of one node, split into training and validation rows."""

    directory: Path
    spec: DataSpec
    validation_fraction: float = 0.2
    strict: bool = False
    max_rows: int = 0  # rows kept in memory, newest files first; 0: no cap
    skipped: dict[Path, str] = field(default_factory=dict)
    rows_over_cap: int = 0  # rows of the oldest files left out to stay under max_rows
    _files: dict[Path, _Loaded] = field(default_factory=dict)
    _skipped_stamps: dict[Path, tuple[int, int]] = field(default_factory=dict)
    _stream: _Loaded | None = None  # rows of a sensor stream (set_stream), the newest of all

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        if not 0.0 <= self.validation_fraction < 1.0:
            raise DataError(f"validation fraction {self.validation_fraction} must be in [0, 1)")
        self.train = _concat([], self.spec)
        self.validation = _concat([], self.spec)
        self.train_by_source = BySource(self.train)

    def refresh(self) -> list[Path]:
        """Read new and changed files, forget deleted ones; returns the files (re)loaded."""
        try:
            entries = sorted(p for p in self.directory.iterdir() if p.name.endswith(SUFFIXES) and p.is_file())
        except OSError as exc:
            raise DataError(f"data directory {self.directory}: {exc.strerror}") from exc
        loaded: list[Path] = []
        present = set(entries)
        changed = any(p not in present for p in self._files)
        for path in [p for p in self._files if p not in present]:
            del self._files[path]
        for path in entries:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            known = self._files.get(path)
            if (known and known.stamp == stamp) or self._skipped_stamps.get(path) == stamp:
                continue
            try:
                table = read_file(path, self.spec)
            except DataError as exc:
                if self.strict:
                    raise
                log.warning("skipping data file: %s", exc)
                self.skipped[path] = str(exc)
                self._skipped_stamps[path] = stamp
                self._files.pop(path, None)
                changed = True
                continue
            self.skipped.pop(path, None)
            self._skipped_stamps.pop(path, None)
            held = _held_out(path.name, len(table), self.validation_fraction)
            self._files[path] = _Loaded(stamp, Table(table.x[~held], table.y[~held]),
                                        Table(table.x[held], table.y[held]), table.skipped)
            loaded.append(path)
            changed = True
        if changed:
            self._gather()
        if not entries and self.strict:
            raise DataError(f"no {' or '.join(SUFFIXES)} files in data directory {self.directory}")
        return loaded

    def set_stream(self, x: np.ndarray, held: np.ndarray) -> None:
        """The rows a sensor stream holds now (gossipfld.streaming), replacing the last ones; ``held`` marks those
        kept for validation. They count as the newest rows, so ``max_rows`` leaves out file rows first."""
        y = np.zeros(len(x), np.float32)  # a stream has no labels: the anomaly models it trains read none
        self._stream = _Loaded((0, 0), Table(x[~held], y[~held]), Table(x[held], y[held]), {})
        self._gather()

    def _gather(self) -> None:
        """Join the files' rows, oldest file first; past ``max_rows`` the oldest rows are left out (a small
        device's memory is the bound, and the newest readings are the ones that describe it now)."""
        ordered = [(p.name, self._files[p]) for p in sorted(self._files, key=lambda p: (self._files[p].stamp, p))]
        ordered += [(STREAM, self._stream)] if self._stream is not None else []
        budget = self.max_rows or math.inf
        trains: list[Table] = []
        validations: list[Table] = []
        names: list[str] = []
        self.rows_over_cap = 0
        for name, loaded in reversed(ordered):
            rows = len(loaded.train) + len(loaded.validation)
            names.append(name)
            if rows <= budget:
                trains.append(loaded.train)
                validations.append(loaded.validation)
                budget -= rows
                continue
            keep = int(budget)
            share = keep / rows if rows else 0.0
            n_train = round(len(loaded.train) * share)
            n_val = max(keep - n_train, 0)
            tail_train, tail_val = len(loaded.train) - n_train, max(len(loaded.validation) - n_val, 0)
            trains.append(Table(loaded.train.x[tail_train:], loaded.train.y[tail_train:]))
            validations.append(Table(loaded.validation.x[tail_val:], loaded.validation.y[tail_val:]))
            self.rows_over_cap += rows - n_train - min(n_val, len(loaded.validation))
            budget = 0
        train = _concat(trains[::-1], self.spec)
        counts = tuple((name, len(t)) for name, t in zip(names[::-1], trains[::-1], strict=True) if len(t))
        self.train_by_source = BySource(train, counts)
        self.train = train
        self.validation = _concat(validations[::-1], self.spec)

    @property
    def skipped_rows(self) -> dict[str, int]:
        """Rows of the files in use that were skipped, by reason (``fields``, ``empty``, ``not_a_number``,
        ``not_finite``, ``label``, ``unterminated``)."""
        total: dict[str, int] = {}
        for loaded in self._files.values():
            for reason, count in loaded.skipped.items():
                total[reason] = total.get(reason, 0) + count
        return total

    def report(self) -> dict[str, object]:
        """For ``status``: the files in use, the rows used, the rows and the files skipped and why."""
        return {"directory": str(self.directory), "files": len(self._files),
                "rows": len(self.train) + len(self.validation), "train_rows": len(self.train),
                "validation_rows": len(self.validation), "skipped_rows": self.skipped_rows,
                "rows_over_cap": self.rows_over_cap,
                "stream_rows": len(self._stream.train) + len(self._stream.validation) if self._stream else 0,
                "skipped_files": {p.name: why for p, why in sorted(self.skipped.items())}}

    @property
    def all(self) -> Table:
        return _concat([self.train, self.validation], self.spec)


def load_directory(directory: str | os.PathLike[str], spec: DataSpec, validation_fraction: float = 0.0) -> LocalData:
    """Strictly load every file of a directory, as the offline CLI does."""
    data = LocalData(Path(directory), spec, validation_fraction, strict=True)
    data.refresh()
    if len(data.train) + len(data.validation) == 0:
        skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(data.skipped_rows.items()))
        raise DataError(f"no samples in data directory {directory}" + (f": every row skipped ({skipped})"
                                                                        if skipped else ""))
    return data


@dataclass(frozen=True)
class Survey:
    """What ``gossipfl model init --data`` learns of a data directory: the schema and the scaling."""

    schema: Schema
    mean: np.ndarray
    scale: np.ndarray
    rows: int
    skipped: dict[str, int]


def survey_directory(directory: str | os.PathLike[str], label: str, task: str = "classification",
                     include: Sequence[str] | None = None, exclude: Sequence[str] = (),
                     delimiter: str | None = None, require_label: bool | None = None) -> Survey:
    """Read the CSV files of ``directory`` for their columns, their classes (label values as text, so
    "normal"/"faulty" and "0".."9" alike) and each feature's mean and spread. An anomaly model's data needs no
    label column (``require_label`` defaults to ``task != "anomaly"``); one that is there is not a feature."""
    root = Path(directory)
    try:
        files = sorted(p for p in root.iterdir() if p.name.endswith((".csv", ".csv.gz")) and p.is_file())
    except OSError as exc:
        raise DataError(f"data directory {root}: {exc.strerror}") from exc
    if not files:
        raise DataError(f"no .csv or .csv.gz files in {root} to read a schema from")
    header, delimiter = _header(files[0], delimiter)
    try:
        features = choose_features(header, label, include, exclude,
                                   task != "anomaly" if require_label is None else require_label)
    except ModelError as exc:
        raise DataError(f"{files[0]}: {exc}") from exc
    spec = DataSpec(features=len(features), task=task, label_column=label, schema=Schema(features, label),
                    delimiter=delimiter)
    tables = [read_csv(p, spec, raw_labels=task == "classification") for p in files]
    x = np.concatenate([t.x for t in tables])
    if len(x) == 0:
        raise DataError(f"no usable rows in {root}")
    skipped: dict[str, int] = {}
    for t in tables:
        for reason, count in t.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
    classes = None
    if task == "classification":
        classes = class_names([str(v) for t in tables for v in t.y.tolist()])
        if len(classes) < 2:
            raise DataError(f"the label column {label!r} holds one class ({classes[0]!r}); a classifier needs two")
    mean = x.astype(np.float64).mean(axis=0)
    scale = x.astype(np.float64).std(axis=0)
    scale[~(scale > 1e-12)] = 1.0  # a constant column: centre it, do not divide by zero
    return Survey(Schema(features, label, classes), mean.astype(np.float32), scale.astype(np.float32), len(x),
                  skipped)
