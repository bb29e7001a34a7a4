"""Shared fixtures: the bundled digits data set and small models from the zoo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gossipfl.datasets import load_digits, train_test_split, write_csv
from gossipfl.zoo import ArchSpec, build

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def digits():
    x, y = load_digits()
    return train_test_split(x, y, test_fraction=0.25, seed=0)


@pytest.fixture(scope="session")
def digits_dirs(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("digits")
    x_train, y_train, x_test, y_test = digits
    write_csv(root / "train" / "digits.csv", x_train, y_train)
    write_csv(root / "test" / "digits.csv", x_test, y_test)
    return root / "train", root / "test"


@pytest.fixture
def mlp():
    return build(ArchSpec("mlp", inputs=64, classes=10, hidden=(32,), seed=3))


def rows(n: int, features: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, features)).astype(np.float32), rng.integers(0, classes, n)
