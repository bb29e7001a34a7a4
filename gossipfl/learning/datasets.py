"""Real data sets for the demo, the tests and the benchmarks, written as a node's data directory.

The digits set (1,797 8x8 images of handwritten digits, UCI) comes from scikit-learn, which ships it
inside its wheel, so nothing is downloaded. scikit-learn is an extra (``gossipfl[demo]``): the
library proper never needs it, so it is imported only here and only when asked for.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gossipfl.atomic import write_bytes_atomic
from gossipfl.errors import DataError


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """Features scaled to [0, 1] (64 per sample) and labels 0-9."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:
        raise DataError("the digits data set needs scikit-learn: pip install 'gossipfl[demo]'") from exc
    bunch = sklearn_digits()
    return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def train_test_split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(len(x))
    cut = round(len(x) * (1 - test_fraction))
    train, test = order[:cut], order[cut:]
    return x[train], y[train], x[test], y[test]


def dirichlet_shards(y: np.ndarray, shards: int, alpha: float, seed: int, min_size: int = 10) -> list[np.ndarray]:
    """Row indices for ``shards`` non-IID shards: each class is spread over shards by Dirichlet(alpha).

    Smaller alpha means more skew (alpha 0.5 leaves most shards with a few dominant classes). Draws
    are repeated until every shard holds at least ``min_size`` rows, as in the usual FL benchmarks.
    """
    if shards < 1 or alpha <= 0:
        raise DataError("need at least one shard and a positive alpha")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(shards)]
        for c in classes:
            rows = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(shards, alpha))) * len(rows)).astype(int)[:-1]
            for shard, chunk in enumerate(np.split(rows, cuts)):
                parts[shard].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise DataError(f"could not split {len(y)} rows into {shards} shards of at least {min_size}")


def iid_shards(count: int, shards: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(count)
    return [np.sort(part) for part in np.array_split(order, shards)]


def write_csv(path: str | os.PathLike[str], x: np.ndarray, y: np.ndarray, label_column: str = "label") -> None:
    """One data file in the format nodes read: a header, feature columns f0.., then the label."""
    header = ",".join([*(f"f{i}" for i in range(x.shape[1])), label_column])
    lines = [header]
    for row, label in zip(x, y, strict=True):
        lines.append(",".join([*(f"{v:.6g}" for v in row), str(int(label))]))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, ("\n".join(lines) + "\n").encode())
