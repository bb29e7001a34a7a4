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


@dataclass(frozen=True)
class Merged:
    age: float
    weight_remote: float  # the share the remote model got, for logs and metrics


def age_weighted_merge(local: np.ndarray, local_age: float, remote: np.ndarray, remote_age: float) -> Merged:
    """Average ``remote`` into ``local`` in place, weighted by age; returns the new age."""
    total = local_age + remote_age
    share = 0.5 if total <= 0 else remote_age / total
    # local <- local + share * (remote - local), without a temporary the size of the model twice
    local += np.float32(share) * (remote - local)
    return Merged(age=max(local_age, remote_age), weight_remote=share)


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
