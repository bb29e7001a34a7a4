"""Merge rules for asynchronous gossip: pure functions of two models and their ages.

A model's age is the number of training samples it has learned from. The age-weighted average
(Hegedus, Danner, Jelasity, DAIS 2019) lets a fresh node catch up in one merge and keeps an old model
from being dragged back by a new one; the merged age is the larger of the two, since averaging two
models does not add what either has seen. Rules are kept pure so others (a CHOCO consensus step, a
limited merge) can sit beside this one and be tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_AGE = 1e18  # samples: a million a second for thirty thousand years; no claim is believed beyond it


@dataclass(frozen=True)
class Merged:
    age: float
    weight_remote: float  # the share the remote model got, for logs and metrics
    moved: float = 0.0  # how far the model moved (L2)
    distance: float = 0.0  # how far the remote model was (L2)
    clipped: bool = False  # the step towards the remote model was cut to the radius


def age_share(local_age: float, remote_age: float) -> float:
    """``remote / (local + remote)``, computed so that no pair of finite ages overflows (two ages of 1.8e308
    summed to infinity and gave every later merge a share of 0); 0.5 when both are 0."""
    local, remote = min(max(local_age, 0.0), MAX_AGE), min(max(remote_age, 0.0), MAX_AGE)
    if remote == 0:
        return 0.5 if local == 0 else 0.0
    return 1.0 / (1.0 + local / remote)


def age_weighted_merge(local: np.ndarray, local_age: float, remote: np.ndarray, remote_age: float) -> Merged:
    """Average ``remote`` into ``local`` in place, weighted by age; returns the new age."""
    share = age_share(local_age, remote_age)
    # local <- local + share * (remote - local), without a temporary the size of the model twice
    diff = remote - local
    local += np.float32(share) * diff
    distance = float(np.linalg.norm(diff))
    return Merged(age=min(max(local_age, remote_age), MAX_AGE), weight_remote=share, moved=share * distance,
                  distance=distance)


def clipped_merge(local: np.ndarray, local_age: float, remote: np.ndarray, remote_age: float, *,
                  max_share: float, radius: float | None) -> Merged:
    """The age-weighted step towards ``remote``, with the share capped at ``max_share`` and the step's
    direction cut to ``radius`` (self-centred clipping, He, Karimireddy and Jaggi 2022): whatever a peer
    claims and sends, one merge moves the model by at most ``max_share * radius``. ``radius`` None: no cut
    (too little history to set one)."""
    share = min(age_share(local_age, remote_age), max_share)
    diff = remote - local
    norm = float(np.linalg.norm(diff))
    scale = 1.0 if radius is None or norm <= radius else radius / norm
    local += np.float32(share * scale) * diff
    return Merged(age=min(max(local_age, remote_age), MAX_AGE), weight_remote=share, moved=share * scale * norm,
                  distance=norm, clipped=scale < 1.0)


def update_norm_is_outlier(norm: float, recent: list[float], factor: float, min_history: int = 5,
                           floor: float = 0.0) -> bool:
    """True when ``norm`` is far above the median of recently accepted update norms.

    Until enough history exists nothing is refused, so a cluster can start; a model that is not
    finite is refused earlier, by the codec. ``floor`` is the smallest median the rule believes: once
    the nodes agree closely (push-pull gets them within a fraction of a percent of each other) the
    median falls towards zero, and without a floor the next honest step of training, or a model from
    a peer that was away for a while, would look like an attack and be refused for good.
    """
    if len(recent) < min_history:
        return False
    median = max(float(np.median(recent)), floor)
    return median > 0 and norm > factor * median
