"""A bounded buffer of the most recent rows a stream made, numbered so a consumer can resume where it stopped.

Bounded two ways: at most ``max_rows`` rows, none older than ``max_age`` seconds; the oldest go first, and
each one dropped is counted by why (``dropped["count"]``, ``dropped["age"]``). A sensor that publishes faster
than the node trains loses its oldest rows, never the node's memory.

Every row gets the next number of a sequence that only grows (``seq``), also across a restart: the sequence
is part of what :meth:`RowBuffer.dump` writes and :meth:`RowBuffer.restore` reads back. A consumer that keeps
the last number it processed asks for ``after(n)`` and never sees a row twice; rows it missed while they
were evicted show as a gap (``first_seq > n + 1``). The numbers held are always consecutive, since rows leave
only from the old end.

Times are seconds on the caller's clock, passed in; for a buffer that outlives the process that is the wall
clock, so a row's time is never earlier than the row before it (a clock stepped back does not reorder them).

The dump is a versioned binary format read back as hostile input (it is a file someone else may have
replaced): a checksum, the exact length its header implies, the expected row width, finite numbers only::

    magic "GFLROWS" | version u8 = 1 | width u32 | count u32 | first_seq u64
    count x (time f64 | width x value f64)
    crc32 u32 of everything before it
"""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from gossipfl.errors import DataError

MAGIC = b"GFLROWS"
VERSION = 1
_HEADER = struct.Struct("<7sBIIQ")
_CRC = struct.Struct("<I")
MAX_ROWS = 10_000_000
MAX_SEQ = 2**63
MAX_DUMP_BYTES = 1 << 30


@dataclass(frozen=True)
class Row:
    """One row: its number in the stream, its time (seconds, the caller's clock) and its feature values."""

    seq: int
    time: float
    values: tuple[float, ...]


class RowBuffer:
    """The newest rows, at most ``max_rows`` of them and none older than ``max_age`` seconds."""

    def __init__(self, width: int, max_rows: int, max_age: float, *, first_seq: int = 0) -> None:
        if not 1 <= width <= 1_000_000:
            raise ValueError(f"width: must be 1 to 1000000, got {width}")
        if not 1 <= max_rows <= MAX_ROWS:
            raise ValueError(f"max_rows: must be 1 to {MAX_ROWS}, got {max_rows}")
        if not (math.isfinite(max_age) and max_age > 0):
            raise ValueError(f"max_age: must be a positive number of seconds, got {max_age}")
        if not 0 <= first_seq < MAX_SEQ:
            raise ValueError(f"first_seq: must be 0 to {MAX_SEQ - 1}, got {first_seq}")
        self.width, self.max_rows, self.max_age = width, max_rows, max_age
        self._rows: deque[Row] = deque()
        self._next = first_seq
        self.dropped: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def next_seq(self) -> int:
        """The number the next row will get."""
        return self._next

    @property
    def first_seq(self) -> int:
        """The number of the oldest row held (``next_seq`` when empty)."""
        return self._rows[0].seq if self._rows else self._next

    def _drop(self, reason: str, count: int) -> None:
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + count

    def add(self, values: Iterable[float], now: float) -> Row:
        """Append a row made at ``now``; evicts past ``max_rows`` and ``max_age``."""
        row_values = tuple(float(v) for v in values)
        if len(row_values) != self.width:
            raise ValueError(f"a row of {len(row_values)} values, the buffer holds rows of {self.width}")
        if not all(math.isfinite(v) for v in row_values) or not math.isfinite(now):
            raise ValueError("rows and times must be finite numbers")
        if self._rows:
            now = max(now, self._rows[-1].time)
        row = Row(self._next, now, row_values)
        self._rows.append(row)
        self._next += 1
        excess = len(self._rows) - self.max_rows
        for _ in range(excess):
            self._rows.popleft()
        self._drop("count", max(excess, 0))
        self.expire(now)
        return row

    def expire(self, now: float) -> int:
        """Drop rows older than ``max_age`` at ``now``; how many went."""
        gone = 0
        while self._rows and self._rows[0].time < now - self.max_age:
            self._rows.popleft()
            gone += 1
        self._drop("age", gone)
        return gone

    def after(self, seq: int, limit: int | None = None) -> list[Row]:
        """The rows numbered above ``seq``, oldest first (at most ``limit``). ``seq = -1``: every row held."""
        start = max(0, seq + 1 - self.first_seq)
        stop = None if limit is None else start + max(limit, 0)
        return list(itertools.islice(self._rows, start, stop))

    def rows(self) -> list[Row]:
        return list(self._rows)

    # ---- persistence

    def dump(self) -> bytes:
        record = struct.Struct(f"<{1 + self.width}d")
        parts = [_HEADER.pack(MAGIC, VERSION, self.width, len(self._rows), self.first_seq)]
        parts += [record.pack(row.time, *row.values) for row in self._rows]
        body = b"".join(parts)
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def restore(cls, data: bytes, *, width: int, max_rows: int, max_age: float, now: float) -> RowBuffer:
        """A buffer from :meth:`dump`'s bytes, checked as hostile; ``DataError`` saying what is wrong. Rows past
        ``max_rows`` (the oldest) and rows too old at ``now`` are dropped and counted, as if added now."""
        if len(data) > MAX_DUMP_BYTES:
            raise DataError(f"row buffer: {len(data)} bytes, over the limit of {MAX_DUMP_BYTES}")
        if len(data) < _HEADER.size + _CRC.size:
            raise DataError(f"row buffer: {len(data)} bytes, too short for a row buffer")
        magic, version, stored_width, count, first_seq = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise DataError("row buffer: not a row buffer (wrong magic bytes)")
        if version != VERSION:
            raise DataError(f"row buffer: format version {version}; this build reads version {VERSION}")
        (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
        if zlib.crc32(data[:-_CRC.size]) != crc:
            raise DataError("row buffer: damaged (checksum mismatch)")
        if stored_width != width:
            raise DataError(f"row buffer: holds rows of {stored_width} features, the stream makes {width}"
                            " (the window settings changed)")
        if count > MAX_ROWS or first_seq + count >= MAX_SEQ:
            raise DataError(f"row buffer: {count} rows from number {first_seq}, out of range")
        record = struct.Struct(f"<{1 + width}d")
        expected = _HEADER.size + count * record.size + _CRC.size
        if len(data) != expected:
            raise DataError(f"row buffer: {len(data)} bytes, its header says {expected}")
        buffer = cls(width, max_rows, max_age, first_seq=first_seq)
        previous = -math.inf
        for i in range(count):
            time, *values = record.unpack_from(data, _HEADER.size + i * record.size)
            if not (math.isfinite(time) and all(math.isfinite(v) for v in values)):
                raise DataError(f"row buffer: row {first_seq + i} holds a value that is not finite")
            if time < previous:
                raise DataError(f"row buffer: row {first_seq + i} is older than the row before it")
            previous = time
            buffer._rows.append(Row(first_seq + i, time, tuple(values)))
        buffer._next = first_seq + count
        excess = count - max_rows
        for _ in range(excess):
            buffer._rows.popleft()
        buffer._drop("count", max(excess, 0))
        buffer.expire(now)
        return buffer
