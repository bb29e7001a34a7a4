"""Anomaly scores of rows, the threshold that turns them into verdicts, and how good those verdicts are.

A row's score is its mean squared reconstruction error in the model's scaled units (reconstruction.py).
Scores have no natural unit a threshold could be written in: how well a model reconstructs depends on the
data, on how long it trained and on what its peers taught it. So the threshold is not configured, the
expected anomaly *rate* is: ``ThresholdCalibrator`` keeps the most recent scores in a fixed-size ring and
puts the threshold at their ``1 - rate`` quantile, so that about ``rate`` of rows like the recent ones are
flagged, and the threshold follows the model as it changes. A row is an anomaly when its score is strictly
above the threshold.

The calibrator's state is meant to be persisted (``to_dict``/``from_dict``); what is read back is checked as
hostile input. Evaluation on labelled data uses ``roc_auc`` (threshold-free: the chance that an anomaly
scores above a normal row) and precision and recall at a threshold. Nothing here prints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from gossipfl.errors import ConfigError, DataError
from gossipfl.learning.model import Model
from gossipfl.learning.reconstruction import SCORE, check_anomaly_model, score_proto
from gossipfl.learning.trainer import EVAL_BATCH, session_options, shape_inputs

DEFAULT_RATE = 0.01
MAX_RATE = 0.5  # past half the rows, "anomaly" is the normal case
DEFAULT_CAPACITY = 4096
MAX_CAPACITY = 1_000_000  # 8 MB of float64 scores
STATE_VERSION = 1

Scores = Sequence[float] | np.ndarray
Flags = Sequence[bool] | np.ndarray


# ---------------------------------------------------------------- scores


def scoring_session(model: Model, threads: int = 1) -> ort.InferenceSession:
    """A session computing each row's score; parameters are fed per run, so it serves every parameter value."""
    return ort.InferenceSession(score_proto(model).SerializeToString(), session_options(threads),
                                providers=["CPUExecutionProvider"])


def anomaly_scores(model: Model, x: np.ndarray, session: ort.InferenceSession | None = None) -> np.ndarray:
    """Each row's mean squared reconstruction error in scaled units, as float64."""
    check_anomaly_model(model)
    session = session or scoring_session(model)
    feeds = {s.name: model.views[s.name] for s in model.specs}
    parts = [session.run([SCORE], {**feeds, model.input_name: shape_inputs(model, x[i : i + EVAL_BATCH])})[0]
             for i in range(0, len(x), EVAL_BATCH)]
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0, np.float64)


# ---------------------------------------------------------------- the threshold


def _check_rate(rate: object, error: type[Exception]) -> float:
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 < rate <= MAX_RATE:
        raise error(f"anomaly rate {rate!r} must be a number in (0, {MAX_RATE}]")
    return float(rate)


def _check_capacity(capacity: object, error: type[Exception]) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= MAX_CAPACITY:
        raise error(f"calibrator capacity {capacity!r} must be a whole number from 1 to {MAX_CAPACITY}")
    return capacity


def _check_scores(scores: object, error: type[Exception]) -> np.ndarray:
    try:
        values = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise error(f"scores must be numbers: {exc}") from exc
    if values.ndim != 1:
        raise error(f"scores must be one number per row, got shape {values.shape}")
    if not (np.isfinite(values).all() and (values >= 0).all()):
        raise error("scores must be finite and not negative (a model that diverged scores NaN)")
    return values


@dataclass
class ThresholdCalibrator:
    """The ``1 - rate`` quantile of the last ``capacity`` scores: memory is bounded however long it runs."""

    rate: float = DEFAULT_RATE
    capacity: int = DEFAULT_CAPACITY
    seen: int = field(default=0, init=False)  # scores ever added; the ring holds the last min(seen, capacity)
    _ring: np.ndarray = field(init=False, repr=False)
    _next: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.rate = _check_rate(self.rate, ConfigError)
        self.capacity = _check_capacity(self.capacity, ConfigError)
        self._ring = np.zeros(self.capacity, np.float64)

    def update(self, scores: Scores) -> None:
        """Add scores, oldest first; past ``capacity`` the oldest are forgotten."""
        values = _check_scores(scores, DataError)
        self.seen += len(values)
        values = values[-self.capacity :]
        end = self._next + len(values)
        first = min(end, self.capacity) - self._next
        self._ring[self._next : self._next + first] = values[:first]
        self._ring[: len(values) - first] = values[first:]
        self._next = end % self.capacity

    @property
    def count(self) -> int:
        return min(self.seen, self.capacity)

    def recent(self) -> np.ndarray:
        """The scores held, oldest first."""
        if self.seen < self.capacity:
            return self._ring[: self.seen].copy()
        return np.concatenate([self._ring[self._next :], self._ring[: self._next]])

    @property
    def threshold(self) -> float | None:
        """Scores above this are anomalies; None until a score has been seen."""
        if self.count == 0:
            return None
        return float(np.quantile(self.recent(), 1.0 - self.rate))

    def is_anomaly(self, scores: Scores) -> np.ndarray:
        threshold = self.threshold
        if threshold is None:
            raise DataError("no threshold yet: the calibrator has seen no scores")
        return _check_scores(scores, DataError) > threshold

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "rate": self.rate, "capacity": self.capacity, "seen": self.seen,
                "scores": self.recent().tolist()}

    @classmethod
    def from_dict(cls, state: object) -> ThresholdCalibrator:
        """The calibrator ``to_dict`` described, with every field checked: the state comes from a file."""
        if not isinstance(state, dict):
            raise DataError("calibrator state must be a JSON object")
        if state.get("version") != STATE_VERSION:
            raise DataError(f"calibrator state: version {state.get('version')!r} is not {STATE_VERSION}")
        calibrator = cls(_check_rate(state.get("rate"), DataError), _check_capacity(state.get("capacity"), DataError))
        seen, scores = state.get("seen"), state.get("scores")
        if isinstance(seen, bool) or not isinstance(seen, int) or not 0 <= seen < 2**63:
            raise DataError(f"calibrator state: seen {seen!r} must be a whole number >= 0")
        if not isinstance(scores, list) or len(scores) != min(seen, calibrator.capacity):
            raise DataError(f"calibrator state: scores must be a list of the last min(seen, capacity) = "
                            f"{min(seen, calibrator.capacity)} scores")
        if any(isinstance(v, bool) or not isinstance(v, int | float) for v in scores):
            raise DataError("calibrator state: scores must be numbers")
        calibrator.update(_check_scores(scores, DataError))
        calibrator.seen = seen
        return calibrator


def calibrated_threshold(scores: Scores, rate: float = DEFAULT_RATE) -> float:
    """The threshold a calibrator fed ``scores`` alone would give (``predict`` on a file: its own rows)."""
    values = _check_scores(scores, DataError)
    if len(values) == 0:
        raise DataError("no scores to calibrate a threshold on")
    calibrator = ThresholdCalibrator(rate, capacity=max(1, min(len(values), MAX_CAPACITY)))
    calibrator.update(values)
    assert calibrator.threshold is not None
    return calibrator.threshold


# ---------------------------------------------------------------- quality on labelled data


def _pair(scores: Scores, is_anomaly: Flags) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(is_anomaly)
    if values.ndim != 1 or truth.shape != values.shape:
        raise DataError(f"scores {values.shape} and labels {truth.shape} must be one per row, alike")
    if truth.dtype != np.bool_:
        raise DataError("is_anomaly must be booleans")
    if not np.isfinite(values).all():
        raise DataError("scores must be finite")
    return values, truth


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(ordered)) + 1])
    ends = np.concatenate([starts[1:], [len(values)]])
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
    return ranks


def roc_auc(scores: Scores, is_anomaly: Flags) -> float | None:
    """The area under the ROC curve (Mann-Whitney U over both counts): the chance that a random anomaly scores
    above a random normal row, ties counting one half. None when either kind is absent (it is undefined)."""
    values, truth = _pair(scores, is_anomaly)
    positives = int(truth.sum())
    negatives = len(truth) - positives
    if positives == 0 or negatives == 0:
        return None
    rank_sum = float(_average_ranks(values)[truth].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def precision_recall(scores: Scores, is_anomaly: Flags, threshold: float) -> dict[str, Any]:
    """Flagging rows scoring above ``threshold``: precision (None when nothing is flagged), recall (None when
    no row is an anomaly), their F1, and the counts behind them."""
    if not math.isfinite(threshold):
        raise DataError(f"threshold {threshold} must be finite")
    values, truth = _pair(scores, is_anomaly)
    flagged = values > threshold
    hits, positives = int((flagged & truth).sum()), int(truth.sum())
    precision = hits / int(flagged.sum()) if flagged.any() else None
    recall = hits / positives if positives else None
    p, r = precision or 0.0, recall or 0.0
    return {"precision": precision, "recall": recall, "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "flagged": int(flagged.sum()), "anomalies": positives, "count": len(values), "threshold": threshold}
