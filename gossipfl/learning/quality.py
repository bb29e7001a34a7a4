"""How good a classifier is, in the figures that survive imbalanced data.

On a node where 5% of the rows are "faulty", a model that always answers "normal" scores 0.95 accuracy.
Per-class recall and precision, their F1, balanced accuracy (the mean recall over classes that occur) and
the confusion matrix tell that model apart; they are what ``eval --json`` and ``status --json`` report
beside accuracy. Pure functions of labels and predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> np.ndarray:
    """``m[i, j]``: rows of class ``i`` predicted as ``j``."""
    matrix = np.zeros((classes, classes), np.int64)
    np.add.at(matrix, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return matrix


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def classification_report(matrix: np.ndarray, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1 and per-class precision, recall, F1 and support. A class with
    no rows has recall None and does not count in the balanced accuracy; one never predicted has precision
    None (and F1 0 if it has rows)."""
    classes = matrix.shape[0]
    names = list(names) if names is not None else [str(i) for i in range(classes)]
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    per_class = []
    recalls, f1s = [], []
    for i in range(classes):
        hit = int(matrix[i, i])
        precision, recall = _ratio(hit, predicted[i]), _ratio(hit, support[i])
        f1 = None
        if support[i]:
            p, r = precision or 0.0, recall or 0.0
            f1 = 2 * p * r / (p + r) if p + r else 0.0
            recalls.append(r)
            f1s.append(f1)
        per_class.append({"class": names[i], "support": int(support[i]), "precision": precision,
                          "recall": recall, "f1": f1})
    total = int(matrix.sum())
    return {
        "accuracy": _ratio(float(np.trace(matrix)), total),
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "macro_f1": float(np.mean(f1s)) if f1s else None,
        "per_class": per_class,
        "confusion": matrix.tolist(),
    }


def predicted_classes(scores: np.ndarray) -> np.ndarray:
    """The class of each row: the top score, or for a one-column output (a binary classifier's probability
    of class 1) whether it reaches one half."""
    scores = np.asarray(scores)
    if scores.ndim == 2 and scores.shape[1] == 1:
        return (scores[:, 0] >= 0.5).astype(np.int64)
    return np.argmax(scores, axis=1)


def class_probabilities(scores: np.ndarray) -> np.ndarray:
    """A classifier's outputs as probabilities: kept when they already are (a model ending in ``Softmax``),
    exponentiated when they are log-probabilities (``LogSoftmax``), else the softmax of the logits."""
    scores = np.asarray(scores, np.float64)
    if len(scores) == 0:
        return scores
    if scores.shape[1] == 1:  # a binary classifier's probability of class 1
        return np.column_stack([1.0 - scores[:, 0], scores[:, 0]])
    if (scores >= 0).all() and np.allclose(scores.sum(axis=1), 1.0, atol=1e-4):
        return scores
    if (scores <= 0).all() and np.allclose(np.exp(scores).sum(axis=1), 1.0, atol=1e-4):
        return np.exp(scores)
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
