"""Data gossipfl was not tuned on, with its defaults and no tuning: central training and an 8-daemon gossip run
against scikit-learn's MLPClassifier on the same split.

    .venv/bin/python bench/datasets.py [--sets wine,breast_cancer,digits] [--epochs 100] [--nodes 8] [--seconds 60]

Each data set is used as scikit-learn ships it, in raw units (wine's features run from 0.1 to 1680, breast
cancer's from 0.001 to 4254; digits are pixel counts 0-16), split 75/25. gossipfl's figures come from its
own commands with their defaults: ``gossipfl model init --arch mlp --data`` (which reads the schema and
fits the scaling step into the model), ``gossipfl train`` and ``gossipfl eval``. The gossip run is
``--nodes`` daemons on loopback with Dirichlet(0.5) shards of the training rows and the same model file,
scored on the test rows. The baseline, measured in the same run: ``MLPClassifier()`` with scikit-learn's
defaults (hidden 100, Adam, 200 iterations), on the raw features and, as scikit-learn's documentation
advises, on standardised ones.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from cluster import node_state

from gossipfl.cli.argtypes import bounded_float, bounded_int
from gossipfl.learning.datasets import train_test_split, write_csv
from gossipfl.testing.cluster import Cluster, ClusterPlan, HeldOut, free_port_base, prepare

SETS = ("wine", "breast_cancer", "digits")


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

    x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    return x.astype(np.float32), y.astype(np.int64)


def sklearn_scores(x_train, y_train, x_test, y_test) -> tuple[float, float]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        raw = MLPClassifier(random_state=0).fit(x_train, y_train).score(x_test, y_test)
        scaled = make_pipeline(StandardScaler(), MLPClassifier(random_state=0)).fit(x_train, y_train)
    return float(raw), float(scaled.score(x_test, y_test))


def gossipfl(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "gossipfl.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"gossipfl {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def central(root: Path, epochs: int, x_train, y_train, x_test, y_test) -> tuple[Path, float]:
    train, test = root / "train", root / "test"
    write_csv(train / "rows.csv", x_train, y_train)
    write_csv(test / "rows.csv", x_test, y_test)
    model = root / "model.onnx"
    gossipfl("model", "init", "--arch", "mlp", "--data", str(train), "--out", str(model))
    gossipfl("train", "--model", str(model), "--data", str(train), "--epochs", str(epochs), "--out",
             str(root / "trained.onnx"))
    report = json.loads(gossipfl("eval", "--model", str(root / "trained.onnx"), "--data", str(test), "--json"))
    return model, float(report["accuracy"])


def gossip(root: Path, model: Path, args: argparse.Namespace, x_train, y_train, x_test, y_test) -> list[float]:
    plan = ClusterPlan(nodes=args.nodes, base_port=free_port_base(args.nodes), model=model,
                       gossip={"period": 0.5}, training={"duty_cycle": 0.2},
                       extra={"data": {"validation_fraction": 0.0}})
    specs = prepare(root, plan, x_train, y_train)
    score = HeldOut(root / "model.onnx", x_test, y_test).accuracy
    with Cluster(specs) as cluster:
        time.sleep(args.seconds)
        finals = [state for state in map(node_state, specs) if state is not None]
        cluster.stop_all()
    return [score(params) for params, _ in finals]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--epochs", type=bounded_int(1, 10000), default=100)
    parser.add_argument("--nodes", type=bounded_int(2, 32), default=8)
    parser.add_argument("--seconds", type=bounded_float(5, 3600), default=60)
    args = parser.parse_args()
    sets = [s for s in args.sets.split(",") if s]
    if not sets or set(sets) - set(SETS):
        parser.error(f"--sets: choose from {', '.join(SETS)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="gfl-sets-") as tmp:
        for name in sets:
            x, y = load(name)
            x_train, y_train, x_test, y_test = train_test_split(x, y, test_fraction=0.25, seed=1)
            raw, scaled = sklearn_scores(x_train, y_train, x_test, y_test)
            model, alone = central(Path(tmp) / name, args.epochs, x_train, y_train, x_test, y_test)
            nodes = gossip(Path(tmp) / f"{name}-gossip", model, args, x_train, y_train, x_test, y_test)
            rows.append((name, len(x), x.shape[1], raw, scaled, alone, float(np.mean(nodes)), min(nodes)))
            print(f"ran {name}", flush=True)
    print(f"\nraw units, 75/25 split; gossipfl defaults (model init --data, train --epochs {args.epochs}); "
          f"{args.nodes} daemons, Dirichlet(0.5), {args.seconds:.0f}s")
    header = ("| data set | rows | features | sklearn MLP (raw) | sklearn MLP (scaled) | gossipfl central "
              "| vs sklearn scaled | gossip mean (min) | gossip vs central |")
    print(header)
    print("|" + "|".join("-" * len(p) for p in header.split("|")[1:-1]) + "|")
    for name, n, f, raw, scaled, alone, mean, low in rows:
        print(f"| {name} | {n} | {f} | {raw:.4f} | {scaled:.4f} | {alone:.4f} | {100 * (alone - scaled):+.2f} pts "
              f"| {mean:.4f} ({low:.4f}) | {100 * (mean - alone):+.2f} pts |")


if __name__ == "__main__":
    main()
