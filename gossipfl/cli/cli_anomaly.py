"""``gossipfl predict`` and ``gossipfl eval`` for anomaly models (autoencoders): scores, verdicts, ROC AUC.

The threshold is the same wherever it is not given: the ``1 - rate`` quantile of the scores of the rows at
hand (learning/anomaly.py says why a rate is configured rather than a score). ``offline`` registers the
options and sends anomaly models here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from gossipfl.cli.argtypes import bounded_float
from gossipfl.errors import DataError
from gossipfl.learning.anomaly import (
    DEFAULT_RATE,
    MAX_RATE,
    anomaly_scores,
    calibrated_threshold,
    precision_recall,
    roc_auc,
)
from gossipfl.learning.data import SUFFIXES, DataSpec, Table, read_file
from gossipfl.learning.model import Model
from gossipfl.learning.reconstruction import ANOMALY, check_anomaly_model

THRESHOLD_HELP = (f"anomaly models: the share of rows expected to be anomalies (default {DEFAULT_RATE}); without "
                  "--threshold, the threshold is the (1 - rate) quantile of the scores of the rows read, and a "
                  "row scoring above it is an anomaly")


def add_threshold_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=bounded_float(1e-6, MAX_RATE), help=THRESHOLD_HELP)
    parser.add_argument("--threshold", type=bounded_float(0.0, 1e300),
                        help="anomaly models: a fixed threshold on the score (mean squared reconstruction error in "
                             "the model's scaled units) instead of one calibrated at --rate")


def refuse_misplaced_options(model: Model, args: argparse.Namespace) -> None:
    """Options only anomaly models take are refused on any other model (a wrong model path is then noticed)."""
    given = [name for name in ("rate", "threshold", "anomaly_label") if getattr(args, name, None) is not None]
    if given and model.task != ANOMALY:
        flag = "--" + given[0].replace("_", "-")
        raise DataError(f"{flag} applies to anomaly models; this is a {model.task} model")
    if args.rate is not None and args.threshold is not None:
        raise DataError("give --rate or --threshold, not both")


def _threshold(args: argparse.Namespace, scores: np.ndarray) -> tuple[float, str]:
    """The threshold and how it was chosen."""
    if args.threshold is not None:
        return float(args.threshold), "given"
    rate = args.rate if args.rate is not None else DEFAULT_RATE
    return calibrated_threshold(scores, rate), f"the {1 - rate:g} quantile of the scores of these {len(scores)} rows"


def predict_anomalies(args: argparse.Namespace, model: Model, table: Table) -> int:
    """Each row's score and verdict: ``score anomaly|normal`` per line, or JSON objects."""
    refuse_misplaced_options(model, args)
    scores = anomaly_scores(model, table.x)
    threshold, how = _threshold(args, scores)
    flagged = scores > threshold
    if args.json:
        print(json.dumps([{"score": float(s), "anomaly": bool(f), "threshold": threshold}
                          for s, f in zip(scores, flagged, strict=True)]))
    else:
        print("\n".join(f"{s:.6g} {'anomaly' if f else 'normal'}" for s, f in zip(scores, flagged, strict=True)))
        print(f"note: {int(flagged.sum())} of {len(scores)} rows above the threshold {threshold:.6g} ({how})",
              file=sys.stderr)
    return 0


def _labelled_rows(directory: str, spec: DataSpec) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Every row of the CSV files in ``directory``, with its label as text, and the rows skipped by reason."""
    root = Path(directory)
    try:
        files = sorted(p for p in root.iterdir() if p.name.endswith(SUFFIXES) and p.is_file())
    except OSError as exc:
        raise DataError(f"data directory {root}: {exc.strerror}") from exc
    if not files:
        raise DataError(f"no {' or '.join(SUFFIXES)} files in data directory {root}")
    tables = [read_file(path, spec, raw_labels=True) for path in files]
    skipped: dict[str, int] = {}
    for table in tables:
        for reason, count in table.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
    x = np.concatenate([t.x for t in tables])
    labels = np.concatenate([t.y.astype(str) for t in tables])
    if len(x) == 0:
        raise DataError(f"no samples in data directory {root}")
    return x, labels, skipped


def evaluate_anomalies(args: argparse.Namespace, model: Model) -> int:
    """ROC AUC, and precision and recall at the threshold, on data whose label column says which rows are
    anomalies (the ones equal to ``--anomaly-label``)."""
    check_anomaly_model(model)
    refuse_misplaced_options(model, args)
    spec = DataSpec.of(model, args.label_column)
    x, labels, skipped = _labelled_rows(args.data, spec)
    truth = labels == args.anomaly_label
    if not truth.any() or truth.all():
        seen = ", ".join(repr(v) for v in sorted(set(labels.tolist()))[:10])
        which = "no row" if not truth.any() else "every row"
        raise DataError(f"{which} of column {spec.label_column!r} is {args.anomaly_label!r}: evaluating needs "
                        f"anomalies and normal rows (values seen: {seen})")
    scores = anomaly_scores(model, x)
    threshold, how = _threshold(args, scores)
    report: dict[str, Any] = {"roc_auc": roc_auc(scores, truth), **precision_recall(scores, truth, threshold),
                              "threshold_from": how, "mean_score": float(scores.mean()), "skipped_rows": skipped}
    if skipped:
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items()))
        print(f"note: skipped {sum(skipped.values())} rows ({reasons})", file=sys.stderr)
    if args.json:
        print(json.dumps(report))
    else:
        def fmt(value: float | None) -> str:
            return "-" if value is None else f"{value:.4f}"
        print(f"roc_auc {fmt(report['roc_auc'])}  precision {fmt(report['precision'])}  recall "
              f"{fmt(report['recall'])}  at threshold {threshold:.6g} ({how})  anomalies {report['anomalies']}  "
              f"flagged {report['flagged']}  samples {report['count']}")
    return 0
