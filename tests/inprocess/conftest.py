"""Whole daemons in one process: real apps (learner, TLS, conversation, gossip, gateway), joined by
``memnet.MemoryNet``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from gossipfl.cli.tls import load_identity
from gossipfl.config import load_config
from gossipfl.learning.datasets import load_digits
from gossipfl.testing.cluster import ClusterPlan, prepare
from gossipfld.app import App


@pytest.fixture(scope="session")
def small_digits():
    x, y = load_digits()
    return x[:400], y[:400]


@pytest.fixture
def make_apps(tmp_path: Path, small_digits) -> Callable[..., list[App]]:
    """``make_apps(n, **plan)``: n apps of one cluster, built from the files a fleet would have."""

    made: list[Path] = []

    def make(nodes: int = 2, **plan: object) -> list[App]:
        options: dict = {"nodes": nodes, "mdns": False, "base_port": 17000, **plan}
        extra = options.setdefault("extra", {})
        extra.setdefault("control", {})["enabled"] = False
        made.append(tmp_path / f"cluster{len(made)}")  # a test may make more than one cluster
        specs = prepare(made[-1], ClusterPlan(**options), *small_digits)
        apps = []
        for spec in specs:
            config = load_config(spec.config)
            identity = load_identity(config.tls.cert, config.tls.key, config.tls.ca)
            apps.append(App(config, identity))
        return apps

    return make
