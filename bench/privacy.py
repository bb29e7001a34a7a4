"""What differential privacy costs in accuracy: 8 daemons on digits at epsilon 1, 3 and 8 and without DP.

    .venv/bin/python bench/privacy.py [--nodes 8] [--epsilons 1,3,8,none] [--modes gossip,fedavg]
        [--seconds 60] [--epochs 30] [--batch 16] [--lr 0.5] [--clip 0.1] [--model logreg|mlp] [--csv F] [--png F]

For each mode (``gossip``: push-pull gossip; ``fedavg``: the same nodes following one gateway daemon) and
each budget, a cluster of real gossipfld daemons on loopback learns digits split by Dirichlet(0.5), with
``[privacy]`` on at that epsilon (delta 1e-5; the noise each node derives from its own rows, ``epochs``
passes and the budget), or off for ``none``. When the run ends (after ``--seconds``; a private node has
long spent its budget by then and only averages), every node's model is scored on a held-out quarter of
digits that no node trains on.

The baseline, in the same run: each node training alone on its own shard with the same budget (the same
noise, batches, clip, steps and optimiser, in this process, no daemon), and without DP for ``epochs``
passes. One table (mean and worst node per configuration, the gap to no DP, the gain over training alone),
and optionally a CSV of every node's final accuracy and a PNG.
"""

from __future__ import annotations

import argparse
import csv
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cluster import node_state

from gossipfl.cli.argtypes import bounded_float, bounded_int, positive_float
from gossipfl.config import PrivacySection
from gossipfl.learning.data import DataSpec, load_directory
from gossipfl.learning.datasets import load_digits, train_test_split
from gossipfl.learning.dpsgd import DpSgdConfig
from gossipfl.learning.model import Model
from gossipfl.learning.optim import OptimizerConfig
from gossipfl.learning.privacy import steps_for_epochs
from gossipfl.learning.privacy_budget import planned_noise
from gossipfl.learning.trainer import TrainConfig, Trainer
from gossipfl.learning.zoo import ArchSpec, build, range_scaling
from gossipfl.testing.cluster import Cluster, ClusterPlan, HeldOut, free_port_base, prepare

DELTA = 1e-5


@dataclass
class Result:
    mode: str  # gossip, fedavg or alone
    epsilon: float | None  # None: no DP
    final: list[float] = field(default_factory=list)
    spent: list[float] = field(default_factory=list)  # epsilon each node reports spent

    @property
    def label(self) -> str:
        return "none" if self.epsilon is None else f"{self.epsilon:g}"


def privacy_table(args: argparse.Namespace, epsilon: float | None) -> dict:
    if epsilon is None:
        return {"enabled": False}
    return {"enabled": True, "epsilon": epsilon, "delta": DELTA, "clip": args.clip, "epochs": args.epochs}


def write_model(args: argparse.Namespace, path: Path) -> Path:
    """The cluster's model: a softmax regression, or the cluster's usual MLP (32 hidden), behind a fixed
    scaler from the pixels' known range [0, 1] (no row read for it, so the DP guarantee covers everything)."""
    x, _ = load_digits()
    hidden = (32,) if args.model == "mlp" else ()
    build(ArchSpec(args.model, x.shape[1], 10, hidden=hidden, seed=0,
                   scaling=range_scaling(0.0, 1.0, x.shape[1]))).save(path)
    return path


def run_cluster(args: argparse.Namespace, mode: str, epsilon: float | None, root: Path, data) -> Result:
    x_train, y_train, x_test, y_test = data
    fedavg = mode == "fedavg"
    plan = ClusterPlan(nodes=args.nodes + fedavg, gateways=int(fedavg), mode="fedavg" if fedavg else "gossip",
                       model=args.model_path,
                       split="dirichlet", alpha=0.5, base_port=free_port_base(args.nodes + 1),
                       training={"batch_size": args.batch, "lr": args.lr, "duty_cycle": 0.5},
                       fedavg={"epochs": 2, "deadline": 10.0, "round_pause": 0.5},
                       extra={"data": {"validation_fraction": 0.0}, "privacy": privacy_table(args, epsilon)})
    specs = prepare(root, plan, x_train, y_train)
    score = HeldOut(root / "model.onnx", x_test, y_test).accuracy
    result = Result(mode, epsilon)
    with Cluster(specs) as cluster:
        time.sleep(args.seconds)
        finals = [s for s in map(node_state, specs[plan.gateways:]) if s is not None]
        result.final = [score(params) for params, _ in finals]
        result.spent = [st["privacy"].get("epsilon_spent") or 0.0 for _, st in finals if st["privacy"]["enabled"]]
        cluster.stop_all()
    return result


def train_alone(args: argparse.Namespace, epsilon: float | None, shards: list[Path], model_path: Path,
                x_test, y_test) -> Result:
    """Each node's shard, trained alone in this process, with the daemon's own private training."""
    result = Result("alone", epsilon)
    for i, shard in enumerate(shards):
        model = Model.load(model_path)
        table = load_directory(shard, DataSpec.of(model, None)).all
        rows, batch = len(table.y), min(args.batch, len(table.y))
        opt = OptimizerConfig("sgd", lr=args.lr, momentum=0.9)
        if epsilon is None:
            trainer = Trainer(model, TrainConfig(optimizer=opt, batch_size=batch, seed=i))
            trainer.train_steps(table.x, table.y, math.ceil(args.epochs * rows / batch))
        else:
            settings = PrivacySection(enabled=True, epsilon=epsilon, delta=DELTA, clip=args.clip, epochs=args.epochs)
            noise = planned_noise(settings, rows, batch)
            dp = DpSgdConfig(clip=args.clip, noise_multiplier=noise)
            trainer = Trainer(model, TrainConfig(optimizer=opt, batch_size=batch, seed=i, dp=dp))
            trainer.train_steps(table.x, table.y, steps_for_epochs(rows, batch, args.epochs))
        result.final.append(float(trainer.evaluate(x_test, y_test).accuracy))
    return result


def write_png(path: Path, results: list[Result], epsilons: list[float | None]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["none" if e is None else f"{e:g}" for e in epsilons]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for mode in dict.fromkeys(r.mode for r in results):
        rows = {r.label: r for r in results if r.mode == mode}
        xs = [i for i, lab in enumerate(labels) if lab in rows]
        ax.plot(xs, [np.mean(rows[labels[i]].final) for i in xs], marker="o", label=f"{mode}: mean")
        ax.plot(xs, [min(rows[labels[i]].final) for i in xs], linestyle=":", marker=".", label=f"{mode}: worst node")
    ax.set_xticks(range(len(labels)), [f"epsilon {lab}" if lab != "none" else "no DP" for lab in labels])
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("digits, Dirichlet 0.5: accuracy under a privacy budget (delta 1e-5)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=bounded_int(2, 32), default=8)
    parser.add_argument("--epsilons", default="1,3,8,none", help="comma-separated budgets; none: without DP")
    parser.add_argument("--modes", default="gossip,fedavg", help="comma-separated: gossip, fedavg")
    parser.add_argument("--seconds", type=bounded_float(10, 3600), default=60)
    parser.add_argument("--epochs", type=bounded_float(0.1, 10000), default=30,
                        help="passes over its rows each node plans its budget for")
    parser.add_argument("--batch", type=bounded_int(1, 4096), default=16, help="expected batch size")
    parser.add_argument("--lr", type=positive_float, default=0.5)
    parser.add_argument("--clip", type=positive_float, default=0.1)
    parser.add_argument("--model", choices=("logreg", "mlp"), default="logreg",
                        help="softmax regression (650 parameters) or an MLP with 32 hidden units (2,410)")
    parser.add_argument("--csv", type=Path)
    parser.add_argument("--png", type=Path)
    args = parser.parse_args()
    try:
        epsilons = [None if e == "none" else float(e) for e in args.epsilons.split(",") if e]
    except ValueError:
        parser.error(f"--epsilons: numbers or none, got {args.epsilons!r}")
    modes = [m for m in args.modes.split(",") if m]
    if not epsilons or not modes or set(modes) - {"gossip", "fedavg"}:
        parser.error("--modes: gossip and/or fedavg; --epsilons: at least one")

    x, y = load_digits()
    data = train_test_split(x, y, test_fraction=0.25, seed=1)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="gfl-privacy-") as tmp:
        root = Path(tmp)
        args.model_path = write_model(args, root / "model.onnx")
        for mode in modes:
            for epsilon in epsilons:
                results.append(run_cluster(args, mode, epsilon, root / f"{mode}-{epsilon}", data))
        first = root / f"{modes[0]}-{epsilons[0]}"
        learners = 1 if modes[0] == "fedavg" else 0
        shards = [first / f"node{i}" / "data" for i in range(learners, learners + args.nodes)]
        for epsilon in epsilons:
            results.append(train_alone(args, epsilon, shards, first / "model.onnx", data[2], data[3]))

    print(f"{args.nodes} gossipfld daemons on loopback, digits split by Dirichlet(0.5), {args.seconds:g} s a run; "
          f"DP-SGD at delta {DELTA:g}, clip {args.clip:g}, expected batch {args.batch}, {args.epochs:g} planned "
          f"passes, SGD lr {args.lr:g} momentum 0.9; model {args.model} behind a fixed [0, 1] scaler")
    baseline = {r.mode: np.mean(r.final) for r in results if r.epsilon is None}
    alone = {r.label: r for r in results if r.mode == "alone"}
    print("| mode | epsilon | final acc mean (worst node) | vs no DP, same mode | vs alone, same budget "
          "| epsilon spent (max) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        mean = np.mean(r.final)
        vs_none = f"{100 * (mean - baseline[r.mode]):+.1f} pts" if r.mode in baseline else "-"
        vs_alone = f"{100 * (mean - np.mean(alone[r.label].final)):+.1f} pts" if r.mode != "alone" else "-"
        spent = f"{max(r.spent):.3f}" if r.spent else "-"
        print(f"| {r.mode} | {r.label} | {mean:.4f} ({min(r.final):.4f}) | {vs_none} | {vs_alone} | {spent} |")
    if args.csv:
        with args.csv.open("w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["mode", "epsilon", "node", "accuracy"])
            for r in results:
                out.writerows([r.mode, r.label, i, f"{acc:.4f}"] for i, acc in enumerate(r.final))
        print(f"wrote {args.csv}")
    if args.png:
        write_png(args.png, results, epsilons)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
