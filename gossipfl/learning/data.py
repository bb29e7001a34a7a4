"""A node's local data: a directory of ``.csv`` and ``.npz`` files that never leaves the device.

Files that appear later are picked up by ``refresh()``, and a changed file is re-read. Each row is
held out for validation or used for training by a hash of its file name and row number, so the split
is the same after a restart and does not move when files are added.

Data files are input from outside and are checked like any other: a malformed file names the file
and the line. A daemon skips it with a warning and goes on (``strict=False``); the offline CLI stops
with the error (``strict=True``). ``.npz`` files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gossipfl.errors import DataError

log = logging.getLogger(__name__)

SUFFIXES = (".csv", ".npz")
MAX_FILE_BYTES = 256 * 1024 * 1024
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


@dataclass
class Table:
    """Features and labels of some rows, plus where each file's rows came from."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class _Loaded:
    stamp: tuple[int, int]
    train: Table
    validation: Table


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


def read_csv(path: Path, spec: DataSpec, require_labels: bool = True) -> Table:
    """Parse one CSV file: a header row, a label column, every other column a float feature."""
    with path.open(newline="", encoding="utf-8", errors="strict") as handle:
        limit = max(MIN_LINE_CHARS, LINE_CHARS_PER_FIELD * (spec.features + 1))
        reader = csv.reader(_bounded_lines(handle, path, limit))
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty file (a header row is required)") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(f"{path}:1: {exc}") from exc
        header = [h.strip() for h in header]
        label_index = header.index(spec.label_column) if spec.label_column in header else None
        if label_index is None and require_labels:
            raise DataError(f"{path}:1: no label column {spec.label_column!r} in the header")
        feature_cols = [i for i in range(len(header)) if i != label_index]
        if len(feature_cols) != spec.features:
            raise DataError(f"{path}:1: {len(feature_cols)} feature columns, the model expects {spec.features}")
        rows: list[list[float]] = []
        labels: list[float] = []
        line = 1
        try:
            for line, row in enumerate(reader, start=2):
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
                try:
                    values = [float(c) for c in row]
                except ValueError:
                    bad = next(c for c in row if not _is_float(c))
                    raise DataError(f"{path}:{line}: {bad!r} is not a number") from None
                for i in feature_cols:
                    if not math.isfinite(values[i]):
                        raise DataError(f"{path}:{line}: feature {header[i]!r} is {row[i].strip()}, not finite")
                rows.append([values[i] for i in feature_cols])
                if label_index is not None:
                    problem = _label_problem(values[label_index], spec)
                    if problem:
                        raise DataError(f"{path}:{line}: {problem}")
                    labels.append(values[label_index])
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(f"{path}:{line + 1}: {exc}") from exc
    x = np.asarray(rows, dtype=np.float32).reshape(len(rows), spec.features)
    return Table(x, np.asarray(labels, dtype=np.int64 if spec.task == "classification" else np.float32))


def _bounded_lines(handle: Iterable[str], path: Path, limit: int) -> Iterator[str]:
    """The file's lines, each refused past ``limit`` characters before csv splits it: one 8 MB line of short
    fields cost 319 MB as a list of strings."""
    for number, line in enumerate(handle, start=1):
        if len(line) > limit:
            raise DataError(f"{path}:{number}: a line of {len(line)} characters, over the {limit} that "
                            f"{limit // LINE_CHARS_PER_FIELD} fields can need")
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


def read_file(path: Path, spec: DataSpec, require_labels: bool = True) -> Table:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from exc
    if size > MAX_FILE_BYTES:
        raise DataError(f"{path}: {size} bytes is over the limit of {MAX_FILE_BYTES}")
    if path.suffix == ".csv":
        return read_csv(path, spec, require_labels)
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
    skipped: dict[Path, str] = field(default_factory=dict)
    _files: dict[Path, _Loaded] = field(default_factory=dict)
    _skipped_stamps: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        if not 0.0 <= self.validation_fraction < 1.0:
            raise DataError(f"validation fraction {self.validation_fraction} must be in [0, 1)")
        self.train = _concat([], self.spec)
        self.validation = _concat([], self.spec)

    def refresh(self) -> list[Path]:
        """Read new and changed files, forget deleted ones; returns the files (re)loaded."""
        try:
            entries = sorted(p for p in self.directory.iterdir() if p.suffix in SUFFIXES and p.is_file())
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
                                        Table(table.x[held], table.y[held]))
            loaded.append(path)
            changed = True
        if changed:
            ordered = [self._files[p] for p in sorted(self._files)]
            self.train = _concat([f.train for f in ordered], self.spec)
            self.validation = _concat([f.validation for f in ordered], self.spec)
        if not entries and self.strict:
            raise DataError(f"no {' or '.join(SUFFIXES)} files in data directory {self.directory}")
        return loaded

    @property
    def all(self) -> Table:
        return _concat([self.train, self.validation], self.spec)


def load_directory(directory: str | os.PathLike[str], spec: DataSpec, validation_fraction: float = 0.0) -> LocalData:
    """Strictly load every file of a directory, as the offline CLI does."""
    data = LocalData(Path(directory), spec, validation_fraction, strict=True)
    data.refresh()
    if len(data.train) + len(data.validation) == 0:
        raise DataError(f"no samples in data directory {directory}")
    return data
