"""Shared fixtures: the bundled digits data set and small models from the zoo."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gossipfl.learning.datasets import load_digits, train_test_split, write_csv
from gossipfl.learning.zoo import ArchSpec, build

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


def run_cli(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``gossipfl ARGS`` as a real process, as an operator runs it."""
    proc = subprocess.run([sys.executable, "-m", "gossipfl.cli", *args], capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The CLI's contract for errors: a non-zero exit and exactly one line on stderr, no traceback."""
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def wait_for(predicate, timeout: float, what: str):
    """Poll ``predicate`` until it returns something true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
